"""artifacts.py and the callbacks around it: a layer's folded artifact and the PCA init from cached inputs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from hh_lightning.artifacts import (
    artifact_paths,
    load_layer_artifact,
    read_layer_artifact,
    write_layer_artifact,
)
from hh_lightning.block import BlockQuantConfig, HHDecoderBlock
from hh_lightning.callbacks import RotationInitCallback, init_rotations_from_dataset_

QUANT = BlockQuantConfig(qkv_reflections=8, upgate_reflections=8, down_reflections=8, kv_bits=4,
                         kv_reflections=None)


def _block(model, layer: int = 1) -> HHDecoderBlock:
    return HHDecoderBlock(model.model.layers[layer], model.config, model.model.rotary_emb, QUANT, layer)


def _pairs(count: int = 3, hidden: int = 64):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(12, hidden, generator=generator), torch.zeros(12, hidden)) for _ in range(count)]


def test_pca_init_from_a_dataset_equals_the_blocks_own(tmp_path) -> None:
    model = tiny_model("qwen2")
    pairs = _pairs()
    from_dataset, direct = _block(model), _block(model)
    init_rotations_from_dataset_(from_dataset, pairs, count=2)
    statistics = None
    for x, _ in pairs[:2]:
        statistics = direct.collect_statistics(x[None], statistics)
    direct.init_rotations_pca_(statistics)
    for name, rotation in direct.rotations().items():
        assert torch.equal(rotation.matrix(), from_dataset.rotations()[name].matrix()), name


@pytest.mark.parametrize("initialized,init", [(True, "pca"), (False, "identity")])
def test_rotation_init_callback_leaves_a_resumed_or_non_pca_block_alone(initialized, init) -> None:
    model = tiny_model("qwen2")
    block = _block(model)
    before = copy.deepcopy(block.state_dict())
    module = SimpleNamespace(initialized=torch.tensor(initialized), quant=SimpleNamespace(rotation_init=init),
                             block=block, device="cpu")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataset=_pairs()))
    RotationInitCallback().on_train_start(trainer, module)
    assert all(torch.equal(before[key], value) for key, value in block.state_dict().items())


def test_a_layer_artifact_round_trips_and_vouches_for_itself(tmp_path) -> None:
    model = tiny_model("qwen2")
    block = _block(model)
    init_rotations_from_dataset_(block, _pairs())
    block.initialize_weight_quantizers()
    folded = copy.deepcopy(block).fold_()
    assert read_layer_artifact(tmp_path, 1) is None  # nothing written yet
    write_layer_artifact(folded, tmp_path, {"mse_final": 0.5})
    meta = read_layer_artifact(tmp_path, 1)
    assert meta["mse_final"] == 0.5 and meta["layer"] == 1 and meta["quant"] == QUANT.to_dict()
    loaded = load_layer_artifact(_block(tiny_model("qwen2")), tmp_path)
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
    weights, _ = artifact_paths(tmp_path, 1)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="layer_001.safetensors"):
        read_layer_artifact(tmp_path, 1)
    assert read_layer_artifact(tmp_path, 1, verify=False) == meta  # sizes alone still agree


def test_gptq_export_reuses_the_pca_statistics_and_equals_a_resumed_fits_export(tmp_path) -> None:
    """The PCA init's statistics serve the fold; a resumed fit (no PCA pass) recomputes the same codes."""
    from safetensors.torch import load_file

    from hh_lightning.artifacts import export_block
    from hh_lightning.module import HHBlockModule

    model = tiny_model("qwen2")
    quant = BlockQuantConfig(**{**QUANT.to_dict(), "w_rounding": "gptq", "w_bits": 3})
    pairs = _pairs(count=4)
    val = [(x[None], x[None]) for x, _ in pairs[:1]]
    modules = []
    for _ in range(2):
        module = HHBlockModule(quant=quant, layer_index=1)
        module.attach_source(model.model.layers[1], model.config, model.model.rotary_emb)
        module.configure_model()
        trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataset=pairs,
                                                             hparams=SimpleNamespace(batch_size=3)))
        RotationInitCallback().on_train_start(trainer, module)
        module.block.initialize_weight_quantizers()
        with torch.no_grad():  # "training" moved the rotations away from where the statistics were taken
            for rotation in module.block.rotations().values():
                for parameter in rotation.parameters():
                    parameter.add_(0.1 * torch.randn_like(parameter))
        modules.append(module)
    modules[1].load_state_dict(modules[0].state_dict())
    assert modules[0].calibration_statistics[0] == len(pairs)
    modules[1].calibration_statistics = None  # as after a resume from a checkpoint
    directories = [tmp_path / "cached", tmp_path / "recomputed"]
    for module, directory in zip(modules, directories):
        export_block(module, val, directory, 0, pairs, batch_size=3)  # windows 0-2, then 3, as the init took them
        assert module.calibration_statistics is None  # freed after the fold
    cached, recomputed = (load_file(artifact_paths(d, 1)[0]) for d in directories)
    assert cached.keys() == recomputed.keys()
    assert all(torch.equal(cached[key], recomputed[key]) for key in cached)
