"""module.py: the learning-rate schedule of a block's fit, the optional torch.compile path, bf16 autocast."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from hh_lightning.block import BlockQuantConfig, HHDecoderBlock
from hh_lightning.module import HHBlockModule, OptimConfig, cosine_factor
from hh_lightning.structured import ROTATION_STRUCTURES, STRUCTURE_INITS


@pytest.mark.parametrize("total,warmup,floor", [(4, 0, 1e-3), (32, 8, 1e-3), (100, 25, 0.1), (1, 0, 0.5)])
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor(total, warmup, floor) -> None:
    factors = [cosine_factor(step, total, floor, warmup) for step in range(total + 1)]
    rising, decaying = factors[:warmup + 1], factors[warmup:]
    assert rising == pytest.approx([(step + 1) / (warmup + 1) for step in range(warmup)] + [1.0])
    assert all(b > a for a, b in zip(rising, rising[1:]))
    assert decaying[0] == 1.0 and decaying[-1] == pytest.approx(floor)
    assert all(b <= a for a, b in zip(decaying, decaying[1:]))
    assert cosine_factor(total + 10, total, floor, warmup) == pytest.approx(floor)  # clamped past the end


def test_no_warmup_is_the_plain_cosine() -> None:
    assert [cosine_factor(s, 10, 0.01) for s in range(11)] == [cosine_factor(s, 10, 0.01, 0) for s in range(11)]
    assert cosine_factor(5, 10, 0.0) == pytest.approx(0.5)


QUANT = BlockQuantConfig(qkv_reflections=4, upgate_reflections=4, down_reflections=4, w_init="minmax")


def _module(compile_mode: str) -> HHBlockModule:
    model = tiny_model("llama")
    module = HHBlockModule(quant=QUANT, optim=OptimConfig(compile=compile_mode), layer_index=0)
    module.attach_source(model.model.layers[0], model.config, model.model.rotary_emb)
    module.configure_model()
    module.block.init_rotations_pca_(module.block.collect_statistics(_batch()[0]))
    module.block.initialize_weight_quantizers()
    return module


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 64, generator=generator), torch.randn(2, 16, 64, generator=generator)


@pytest.mark.slow  # inductor compiles forward and backward: ~50 s on 2 CPU cores, cold cache
def test_compiled_training_step_equals_eager_loss_and_gradients() -> None:
    """One compiled step (inductor, on the CPU) against eager: loss and every gradient to float rounding."""
    torch._dynamo.reset()
    batch = _batch()
    results = []
    for mode in ("none", "default"):
        module = _module(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            loss = module.training_step(batch, 0)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.block.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, module))
    (eager_loss, eager_grads, _), (compiled_loss, compiled_grads, compiled) = results
    assert compiled._compiled_forward is not None  # the compiled path really ran
    assert set(compiled.state_dict()) == set(results[0][2].state_dict())  # and left the checkpoint keys alone
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4)
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-3, atol=1e-5 * grad.abs().max()), name
    with torch.no_grad():  # validation and the fold stay eager
        assert torch.equal(compiled(batch[0]), compiled.block(batch[0]))
    assert not torch.equal(eager_loss, F.mse_loss(torch.zeros_like(batch[1]), batch[1]))


@pytest.mark.parametrize("structure", ROTATION_STRUCTURES)
def test_training_step_runs_under_bf16_autocast(structure: str) -> None:
    """``trainer.precision: bf16-mixed`` (the 7B config's) runs the step under bf16 autocast: every
    structure, with a 4-bit KV cache behind its rotation, gives a finite loss near fp32's and
    finite gradients for every trained parameter."""
    inits = STRUCTURE_INITS[structure]  # the PCA start where the structure has one, as shipped
    quant = BlockQuantConfig(rotation_structure=structure, qkv_reflections=4, upgate_reflections=4,
                             down_reflections=4, kv_bits=4, kv_reflections=2, w_init="minmax",
                             rotation_init="pca" if "pca" in inits else inits[-1])
    model = tiny_model("llama")
    batch = _batch()
    losses = []
    for autocast in (False, True):
        module = HHBlockModule(quant=quant, optim=OptimConfig(), layer_index=0)
        module.attach_source(model.model.layers[0], model.config, model.model.rotary_emb)
        module.configure_model()
        module.block.init_rotations_pca_(module.block.collect_statistics(batch[0]))
        module.block.initialize_weight_quantizers()
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            warnings.simplefilter("ignore")  # self.log without a Trainer
            loss = module.training_step(batch, 0)
        loss.backward()
        trained = [p for p in module.block.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
        losses.append(loss.item())
    assert math.isfinite(losses[1]) and abs(losses[1] - losses[0]) <= 0.05 * losses[0]


def test_unknown_compile_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"model.optim.compile='fastest' is not one of"):
        OptimConfig(compile="fastest").validate()


# ------------------------------------------------------------------ checkpoints and validation
def _built(model_type: str, layer: int = 0, quant: BlockQuantConfig = QUANT) -> HHBlockModule:
    model = tiny_model(model_type)
    module = HHBlockModule(quant=quant, layer_index=0)
    module.attach_source(model.model.layers[layer], model.config, model.model.rotary_emb)
    module.configure_model()
    return module


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_checkpoint_leaves_out_the_layers_weights_and_takes_them_back_from_the_same_layer(model_type) -> None:
    source = _built(model_type)
    source.block.init_rotations_pca_(source.block.collect_statistics(_batch()[0]))
    source.block.initialize_weight_quantizers()
    full = source.state_dict()
    checkpoint = {"state_dict": dict(full)}
    source.on_save_checkpoint(checkpoint)
    left_out = {f"block.{name}" for name in source.block.source_state_names()}
    # Every linear's weight (and bias, where the model has them) and both norms: all of the layer's copies.
    assert any(name.endswith(".bias") for name in left_out) == (model_type == "qwen2")
    assert len([n for n in left_out if n.endswith(".weight")]) == 9 and not left_out & set(checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) | left_out == set(full)
    kept_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert kept_bytes < 0.5 * sum(t.numel() * t.element_size() for t in full.values())
    saved = torch.load(_saved(checkpoint), weights_only=True)

    resumed = _built(model_type)
    resumed.on_load_checkpoint(saved)
    resumed.load_state_dict(saved["state_dict"])  # strict: nothing is missing
    torch.testing.assert_close(resumed.state_dict(), full, rtol=0, atol=0, equal_nan=True)  # mse_init: NaN

    other_layer = _built(model_type, layer=1)
    with pytest.raises(ValueError, match=r"^layer 0: its checkpoint was trained on other weights "
                                         r"\(block\.linears\.q_proj\.weight differs"):
        other_layer.on_load_checkpoint(torch.load(_saved(checkpoint), weights_only=True))
    older = {"state_dict": dict(full)}  # written before checkpoints left the weights out: loads as it is
    _built(model_type).on_load_checkpoint(older)
    assert older["state_dict"].keys() == full.keys()


def test_validation_measures_the_block_as_it_ships_and_export_reuses_the_last_epoch(monkeypatch) -> None:
    """The validation epochs round the rotations as export does, then put the trained values back; the
    figure of the last one is the trained state's, so export (``artifacts.trained_mse``) does not measure it again."""
    import lightning as L

    from hh_lightning import artifacts
    from hh_lightning.module import block_mse

    module = _built("llama")
    generator = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator)) for _ in range(4)]

    class Windows(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(pairs, batch_size=2)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(pairs[:3], batch_size=2)  # 2 batches, the second of 1 window

    datamodule = Windows()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few batches, no workers
        trainer.fit(module, datamodule=datamodule)
    step, batches, mse = module.shipped_val_mse
    assert (step, batches) == (trainer.global_step, len(datamodule.val_dataloader()))
    trained = {name: p.detach().clone() for name, p in module.block.named_parameters()}
    reflections = [p for name, p in trained.items() if name.endswith("reflections.vectors")]
    assert any(not torch.equal(p, p.half().float()) for p in reflections)  # the trained values, not rounded
    shipped = copy.deepcopy(module.block).round_rotations_()
    assert mse == pytest.approx(block_mse(shipped, datamodule.val_dataloader(), "cpu"), rel=1e-6)

    monkeypatch.setattr(artifacts, "block_mse", lambda *_: pytest.fail("measured the trained state again"))
    assert artifacts.trained_mse(module, datamodule.val_dataloader()) == mse
    module.shipped_val_mse = (step, batches - 1, mse)  # fewer batches than the export's loader: measured
    monkeypatch.setattr(artifacts, "block_mse", lambda *_: 1.5)
    assert artifacts.trained_mse(module, datamodule.val_dataloader()) == 1.5


def _saved(obj: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("lr_smoothing", [None, 0.0, 0.2])
def test_each_parameter_group_trains_at_its_own_learning_rate(lr_smoothing) -> None:
    """Reflections, smoothing log-scales and clip logits fall in one group each, and the optimizer gives
    each its lr (the smoothing's is the rotations' unless set): one step moves exactly the groups whose
    lr is nonzero."""
    model = tiny_model("qwen2")
    quant = BlockQuantConfig(qkv_reflections=4, upgate_reflections=4, down_reflections=4, smoothing=True)
    block = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, quant, 0)
    groups = block.parameter_groups()
    names = {id(p): name for name, p in block.named_parameters()}
    assert all("log_smoothing" in names[id(p)] for p in groups["smoothing"]) and groups["smoothing"]
    assert all("clip_logit" in names[id(p)] for p in groups["clips"]) and groups["clips"]
    assert all("vectors" in names[id(p)] for p in groups["transforms"]) and groups["transforms"]
    assert sum(map(len, groups.values())) == sum(p.requires_grad for p in block.parameters())

    optim = OptimConfig(lr_transforms=0.0, lr_clips=0.0, lr_smoothing=lr_smoothing)
    optimizer = optim.optimizer(groups)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {
        "transforms": 0.0, "clips": 0.0, "smoothing": 0.0 if lr_smoothing is None else lr_smoothing}
    before = {name: p.detach().clone() for name, p in block.named_parameters() if p.requires_grad}
    hidden = torch.randn(2, 8, model.config.hidden_size)
    block(hidden).pow(2).mean().backward()
    optimizer.step()
    moved = {name for name, p in block.named_parameters() if p.requires_grad and not torch.equal(p, before[name])}
    assert moved == ({name for name in before if "log_smoothing" in name} if lr_smoothing else set())
