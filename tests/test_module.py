"""module.py: the training step's optional torch.compile path agrees with eager."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from hh_lightning.block import BlockQuantConfig
from hh_lightning.module import HHBlockModule, OptimConfig

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
