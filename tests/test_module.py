"""module.py: the learning-rate schedule of a block's fit, and the optional torch.compile path."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from hh_lightning.block import BlockQuantConfig
from hh_lightning.module import HHBlockModule, OptimConfig, cosine_factor


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


def test_unknown_compile_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"model.optim.compile='fastest' is not one of"):
        OptimConfig(compile="fastest").validate()
