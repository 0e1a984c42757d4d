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
