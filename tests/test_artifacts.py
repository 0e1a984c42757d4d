"""artifacts.py and the callbacks around it: a layer's folded artifact and the PCA init from cached inputs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from hh_lightning.artifacts import (
    SHIPPABLE_STATES,
    artifact_paths,
    keep_best_state_,
    load_layer_artifact,
    read_layer_artifact,
    write_layer_artifact,
)
from hh_lightning.block import BlockQuantConfig, HHDecoderBlock
from hh_lightning.callbacks import RotationInitCallback, WeightQuantizerInitCallback, init_rotations_from_dataset_
from hh_lightning.linear import rotations_disabled
from hh_lightning.module import HHBlockModule, OptimConfig, block_mse
from hh_lightning.quantizers import quantization_disabled

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


def _module(quant: BlockQuantConfig = QUANT, optim: OptimConfig | None = None) -> HHBlockModule:
    model = tiny_model("qwen2")
    module = HHBlockModule(quant=quant, optim=optim or OptimConfig(), layer_index=1)
    module.attach_source(model.model.layers[1], model.config, model.model.rotary_emb)
    module.configure_model()
    return module


def _fp_pairs(block: HHDecoderBlock, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` windows with ``y`` the source layer's own output: the block's, everything bypassed."""
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(count):
        x = torch.randn(1, 12, block.linears["q_proj"].in_features, generator=generator)
        with torch.no_grad(), quantization_disabled(block), rotations_disabled(block):
            pairs.append((x, block(x)))
    return pairs


def _wrecked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every clip ratio near 0: each quantizer's range collapses, whatever the rotation."""
    return {name: torch.full_like(value, -8.0) if "clip_logit" in name else value.clone()
            for name, value in state.items()}


@pytest.mark.parametrize("best", SHIPPABLE_STATES)
def test_the_kept_state_has_the_lowest_held_out_error_the_fixed_start_included(best) -> None:
    """Trained, initial (PCA) and fixed (as built) states, each in turn left whole while the other two are
    wrecked: keep_best_state_ keeps it, leaves the block in it, and reports each state's measured error."""
    module = _module()
    block = module.block
    pairs = _fp_pairs(block)
    block.init_rotations_pca_(block.collect_statistics(pairs[0][0]))
    block.initialize_weight_quantizers()
    states = {"initial": module.trainable_state(), "fixed": module.fixed_state,
              "trained": {name: value + 0.01 * torch.randn_like(value) if name.endswith("vectors") else value
                          for name, value in module.trainable_state().items()}}
    states = {name: state if name == best else _wrecked(state) for name, state in states.items()}
    module.initial_state, module.fixed_state = states["initial"], states["fixed"]
    module.load_trainable_state_(states["initial"])
    module.mse_init.fill_(block_mse(block.round_rotations_(), pairs, "cpu"))
    module.load_trainable_state_(states["trained"])

    kept, errors = keep_best_state_(module, pairs)

    assert kept == best and errors.keys() == set(SHIPPABLE_STATES)
    assert all(errors[best] < errors[other] for other in SHIPPABLE_STATES if other != best), errors
    assert block_mse(block, pairs, "cpu") == pytest.approx(errors[best], rel=1e-6)
    for name in SHIPPABLE_STATES:  # each figure is its state's, as it ships
        module.load_trainable_state_(states[name])
        if name == "fixed":
            block.initialize_weight_quantizers()
        assert block_mse(block.round_rotations_(), pairs, "cpu") == pytest.approx(errors[name], rel=1e-6)


def test_a_state_equal_to_one_measured_is_not_measured_again(monkeypatch) -> None:
    """Identity reflections, nothing learned: the fixed start is the initial state, so it takes that figure."""
    import hh_lightning.artifacts as artifacts

    module = _module(BlockQuantConfig(**{**QUANT.to_dict(), "rotation_init": "identity"}))
    pairs = _fp_pairs(module.block)
    module.block.initialize_weight_quantizers()
    module.initial_state = module.trainable_state()
    module.mse_init.fill_(block_mse(module.block.round_rotations_(), pairs, "cpu"))
    module.load_trainable_state_({name: value + 0.5 for name, value in module.initial_state.items()
                                  if name.endswith("vectors")})  # the trained state differs from both
    calls = []
    monkeypatch.setattr(artifacts, "block_mse", lambda *args: calls.append(args) or 1.0)
    kept, errors = keep_best_state_(module, pairs)
    assert len(calls) == 1  # the trained state, which has no validation epoch to reuse
    assert kept == "initial" and errors["fixed"] == errors["initial"] == float(module.mse_init)


def _fixed_row_optim(monkeypatch: pytest.MonkeyPatch) -> OptimConfig:
    """A recipe that learns every group at a nonzero lr, with the fair baseline's fixed-row overrides
    (``benchmarks/fair_baseline.py``'s ``FIXED_OVERRIDES``) applied on top."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    overrides = importlib.import_module("fair_baseline").FIXED_OVERRIDES
    optim = {"lr_transforms": 0.01, "lr_clips": 0.05, "lr_smoothing": 0.05}
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if flag.startswith("--model.optim."):
            optim[flag.removeprefix("--model.optim.")] = float(value)
    return OptimConfig(**optim)


def test_the_fixed_rows_config_trains_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fair baseline's fixed row (reflections at identity, its learning rate overrides), on a recipe
    that learns rotations, smoothing and clips: after a fit of several steps every trainable value is bit
    for bit where it started, and the rotations are as built."""
    import lightning as L

    quant = BlockQuantConfig(**{**QUANT.to_dict(), "rotation_init": "identity", "w_rounding": "gptq",
                                "smoothing": True})
    module = _module(quant, _fixed_row_optim(monkeypatch))
    assert module.block.parameter_groups()["smoothing"]
    pairs = [(x[0], y[0]) for x, y in _fp_pairs(module.block, 4)]
    built = module.fixed_state

    class Windows(L.LightningDataModule):
        train_dataset = pairs

        def train_dataloader(self):
            return torch.utils.data.DataLoader(pairs, batch_size=2)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(pairs[:2], batch_size=2)

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[RotationInitCallback(), WeightQuantizerInitCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few batches, no workers
        trainer.fit(module, datamodule=Windows())
    assert trainer.global_step == 4
    after = module.trainable_state()
    assert after.keys() == module.initial_state.keys()
    assert all(torch.equal(after[name], module.initial_state[name]) for name in after)
    rotations = [name for name in after if name.endswith("vectors")]
    assert rotations and all(torch.equal(after[name], built[name]) for name in rotations)
