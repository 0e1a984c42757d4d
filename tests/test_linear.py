"""HHLinear: exactness with quantization off, fold equivalence."""

import pytest
import torch
from torch import nn

from hh_lightning.linear import HHLinear, InputTransform, rotate_blocks
from hh_lightning.quantizers import ActivationQuantizer, WeightQuantizer
from hh_lightning.rotation import HouseholderRotation


@pytest.mark.parametrize("init,k", [("random", 5), ("random", 32), ("hadamard", 32)])
@pytest.mark.parametrize("smoothing", [False, True])
def test_quantization_off_equals_plain_linear(init: str, k: int, smoothing: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 20, bias=True)
    transform = InputTransform(32, HouseholderRotation(32, k, init=init), smoothing=smoothing)
    if smoothing:
        with torch.no_grad():
            transform.log_smoothing.normal_(0.0, 0.3)
    wrapped = HHLinear(linear, transform)
    x = torch.randn(3, 9, 32)
    assert torch.allclose(wrapped(x), linear(x), atol=1e-5)


def _quantized_linear(bias: bool, group_size: int | None, symmetric: bool) -> HHLinear:
    torch.manual_seed(1)
    linear = nn.Linear(64, 48, bias=bias)
    transform = InputTransform(64, HouseholderRotation(64, 8, init="random"),
                               ActivationQuantizer(bits=4, learnable_clip=True), smoothing=True)
    quantizer = WeightQuantizer(48, 64, bits=4, symmetric=symmetric, group_size=group_size)
    quantizer.initialize(transform.transform_weight(linear.weight).detach(), method="search")
    return HHLinear(linear, transform, quantizer)


@pytest.mark.parametrize("group_size,symmetric,bias", [(None, True, True), (16, False, False)])
def test_fold_equals_fake_quant(group_size: int | None, symmetric: bool, bias: bool) -> None:
    wrapped = _quantized_linear(bias, group_size, symmetric)
    x = torch.randn(2, 7, 64)
    folded = wrapped.fold()
    assert folded.codes.dtype == torch.uint8
    assert folded.group_size == group_size
    with torch.no_grad():
        assert torch.allclose(folded(x), wrapped(x), atol=1e-5)


def test_fold_without_weight_quantization_keeps_float_weight() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(16, 8)
    wrapped = HHLinear(linear, InputTransform(16, HouseholderRotation(16, 4, init="random")))
    folded = wrapped.fold()  # with gradients enabled: the float weight must still be a plain tensor
    assert folded.codes is None
    assert not folded.weight.requires_grad
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), linear(x), atol=1e-5)


def test_only_transform_and_quantizer_parameters_train() -> None:
    wrapped = _quantized_linear(True, None, True)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert "weight" not in trainable and "bias" not in trainable
    assert "transform.rotation.vectors" in trainable
    assert "weight_quantizer.clip_logit_max" in trainable


def test_mismatched_dims_raise() -> None:
    with pytest.raises(ValueError, match="rotation dim=8"):
        InputTransform(16, HouseholderRotation(8, 2))
    with pytest.raises(ValueError, match="in_features=12"):
        HHLinear(nn.Linear(12, 4), InputTransform(16))


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("prerotated", [False, True])
def test_transformed_hessian_is_that_of_the_inputs_w_tilde_multiplies(smoothing: bool, prerotated: bool) -> None:
    """GPTQ's Hessian from the unrotated inputs' XᵀX equals X̃ᵀX̃ of what the folded weight really sees."""
    torch.manual_seed(0)
    transform = InputTransform(32, HouseholderRotation(32, 6, init="random", seed=1), smoothing=smoothing)
    if smoothing:
        with torch.no_grad():
            transform.log_smoothing.normal_(0, 0.3)
    head_rotation = HouseholderRotation(8, 8, init="random", seed=2) if prerotated else None
    linear = HHLinear(nn.Linear(32, 16), transform, prerotated_input=head_rotation)
    x = torch.randn(200, 32)
    seen = x if head_rotation is None else rotate_blocks(x, head_rotation)  # what o_proj receives
    seen = transform.transform_input(seen)
    assert torch.allclose(linear.transformed_hessian(x.T @ x), seen.T @ seen, rtol=1e-4, atol=1e-3)
