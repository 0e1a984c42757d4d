"""Quantizers: error bounds, idempotence, gradients, settings."""

import pytest
import torch

from hh_lightning.quantizers import (
    ActivationQuantizer,
    WeightQuantizer,
    dequantize_codes,
    fake_quantize,
    quantize_codes,
    range_to_scale_zero,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_error_within_half_step_and_idempotent(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(6, 10, 64) * 3
    quantizer = ActivationQuantizer(bits=bits, symmetric=symmetric)
    scale, zero = quantizer.scale_zero(x)
    out = quantizer(x)
    error = (out - x).abs().reshape(6, 10, 1, 64)
    assert (error <= scale / 2 + 1e-6).all()
    assert torch.allclose(quantizer(out), out, atol=1e-6)
    levels = [torch.unique(row).numel() for row in out.reshape(-1, 64)]
    assert max(levels) <= 2**bits


def test_activation_groups_per_head() -> None:
    x = torch.randn(2, 5, 4 * 16)
    x[..., :16] *= 100  # one loud head must not coarsen the others' grids
    per_head = ActivationQuantizer(bits=4, group_size=16)
    per_token = ActivationQuantizer(bits=4)
    quiet = slice(16, None)
    assert (per_head(x) - x)[..., quiet].pow(2).mean() < 0.1 * (per_token(x) - x)[..., quiet].pow(2).mean()


def test_sixteen_bits_is_identity() -> None:
    x = torch.randn(3, 7)
    assert torch.equal(ActivationQuantizer(bits=16)(x), x)
    w = torch.randn(5, 8)
    assert torch.equal(WeightQuantizer(5, 8, bits=16)(w), w)


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_error_bound_codes_roundtrip(group_size: int | None, symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    quantizer = WeightQuantizer(24, 64, bits=4, symmetric=symmetric, group_size=group_size)
    out = quantizer(w)
    scale, zero = quantizer.scale_zero(w)
    grouped_error = (out - w).reshape(24, scale.shape[1], -1).abs()
    assert (grouped_error <= scale / 2 + 1e-6).all()
    codes, scale2, zero2 = quantizer.quantize(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    groups = scale2.shape[1]
    rebuilt = dequantize_codes(codes.reshape(24, groups, -1), scale2[..., None], zero2[..., None]).reshape(24, 64)
    assert torch.equal(rebuilt, out)


def test_fixed_grid_is_idempotent() -> None:
    x = torch.randn(100)
    scale, zero = range_to_scale_zero(x.min() * 0.7, x.max() * 0.7, 3, symmetric=False)
    once = fake_quantize(x, scale, zero, 3)
    assert torch.equal(fake_quantize(once, scale, zero, 3), once)
    assert torch.equal(dequantize_codes(quantize_codes(x, scale, zero, 3), scale, zero), once)


def test_gradients_reach_clip_parameters() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)
    weight_quantizer = WeightQuantizer(8, 32, bits=4, symmetric=False, group_size=8)
    act_quantizer = ActivationQuantizer(bits=4, learnable_clip=True)
    x = torch.randn(4, 32, requires_grad=True)
    loss = (act_quantizer(x) @ weight_quantizer(w).T).pow(2).sum()
    loss.backward()
    for parameter in (weight_quantizer.clip_logit_max, weight_quantizer.clip_logit_min,
                      act_quantizer.clip_logit_max, act_quantizer.clip_logit_min):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert w.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # straight-through


def test_clip_search_and_hqq_init_do_not_increase_error() -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 128))
    errors = {}
    for method in ("minmax", "search", "hqq"):
        quantizer = WeightQuantizer(32, 128, bits=3, symmetric=False, group_size=64)
        quantizer.initialize(w, method=method)
        errors[method] = (quantizer(w) - w).pow(2).mean().item()
    assert errors["search"] < errors["minmax"]
    assert errors["hqq"] < errors["minmax"]


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: WeightQuantizer(8, 32, bits=1), "weight bits=1"),
        (lambda: WeightQuantizer(8, 32, bits=9), "weight bits=9"),
        (lambda: WeightQuantizer(8, 30, group_size=8), "group_size=8 does not divide in_features=30"),
        (lambda: ActivationQuantizer(bits=17), "activation bits=17"),
        (lambda: ActivationQuantizer(bits=4, learnable_clip=True, clip_ratio_init=1.5), "clip_ratio_init=1.5"),
        (lambda: WeightQuantizer(8, 32).initialize(torch.zeros(8, 32), method="gptq"), "init='gptq'"),
    ],
)
def test_bad_settings_name_the_setting(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
