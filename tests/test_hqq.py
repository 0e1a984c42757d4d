"""Tests for hh_lightning.hqq: shapes and conventions, error vs. RTN, vs. the `hqq` package."""

from __future__ import annotations

import pytest
import torch

from hh_lightning.hqq import HQQResult, hqq_quantize, rtn_quantize

# The reference's solver never grows beta (see the hh_lightning.hqq module notes), so
# matching its settings means kappa = 1 on our side; everything else is its default.
REFERENCE_SETTINGS = dict(lp_norm=0.7, beta=10.0, kappa=1.0, iters=20, early_stop=True)
# The acceptance bar: ours may be at most 1% worse than the reference in either metric.
REFERENCE_TOLERANCE = 1.01
STUDENT_T_DF = 3.0  # heavy tails, like the outlier-prone rows of LLM weights


def _weight(distribution: str, shape: tuple[int, int] = (256, 512), seed: int = 0, std: float = 1.0) -> torch.Tensor:
    """A seeded random weight: "normal", or "t3", Student-t with STUDENT_T_DF degrees of freedom."""
    torch.manual_seed(seed)
    if distribution == "normal":
        return std * torch.randn(shape)
    return std * torch.distributions.StudentT(STUDENT_T_DF).sample(shape)


def _errors(weight: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    difference = weight - reconstruction
    return difference.abs().mean().item(), difference.square().mean().item()


def _expand_param(param: torch.Tensor, group_size: int | None, axis: int, shape: torch.Size) -> torch.Tensor:
    """Spell the per-group broadcast out with repeat_interleave, independently of hqq.py."""
    out_features, in_features = shape
    if axis == 1:
        return param.repeat_interleave(in_features if group_size is None else group_size, dim=1)
    return param.repeat_interleave(out_features if group_size is None else group_size, dim=0)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("quantize", [hqq_quantize, rtn_quantize], ids=["hqq", "rtn"])
@pytest.mark.parametrize(
    "bits, group_size, axis, param_shape",
    [
        (4, 16, 1, (32, 3)),
        (2, None, 1, (32, 1)),
        (3, 8, 0, (4, 48)),
        (8, None, 0, (1, 48)),
        (1, 16, 1, (32, 3)),
    ],
)
def test_shapes_and_dequantize_convention(quantize, bits, group_size, axis, param_shape):
    weight = _weight("normal", (32, 48)).to(torch.bfloat16)
    original = weight.clone()
    result = quantize(weight, bits, group_size, axis)

    assert isinstance(result, HQQResult)
    assert (result.bits, result.group_size, result.axis) == (bits, group_size, axis)
    assert result.codes.dtype == torch.uint8 and result.codes.shape == weight.shape
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 2**bits - 1
    assert result.scale.dtype == result.zero.dtype == torch.float32
    assert tuple(result.scale.shape) == tuple(result.zero.shape) == param_shape
    assert torch.equal(weight, original), "the input weight must not be modified"

    dequantized = result.dequantize()
    assert dequantized.dtype == torch.float32 and dequantized.shape == weight.shape
    expected = (result.codes.float() - _expand_param(result.zero, group_size, axis, weight.shape)) * _expand_param(
        result.scale, group_size, axis, weight.shape
    )
    torch.testing.assert_close(dequantized, expected)


@pytest.mark.parametrize("axis", [0, 1])
def test_groups_are_consecutive_entries_along_the_axis(axis):
    """RTN's scale is each group's range / (2^b − 1): pins down which entries form a group."""
    group_size, bits = 4, 3
    weight = _weight("t3", (8, 12), seed=3)
    result = rtn_quantize(weight, bits, group_size, axis)
    if axis == 1:
        grouped = weight.reshape(8, 12 // group_size, group_size)
        value_range = grouped.amax(dim=2) - grouped.amin(dim=2)
    else:
        grouped = weight.reshape(8 // group_size, group_size, 12)
        value_range = grouped.amax(dim=1) - grouped.amin(dim=1)
    torch.testing.assert_close(result.scale, value_range / (2**bits - 1))
    # Min-max init puts each group's minimum on code 0 and its maximum on the top code.
    torch.testing.assert_close(result.dequantize(), weight, atol=0.5 * float(result.scale.max()), rtol=0)


def test_representable_and_constant_groups_are_exact():
    group_size, bits = 8, 4
    codes = torch.randint(0, 2**bits, (6, 32), generator=torch.Generator().manual_seed(1)).float()
    codes[:, ::group_size] = 0  # every group spans the full code range, so min-max finds this grid
    codes[:, 1::group_size] = 2**bits - 1
    weight = 0.01 * (codes - 3.5)
    weight[0] = 0.0  # all-zero groups
    weight[1] = 3.0  # constant groups
    for quantize in (rtn_quantize, hqq_quantize):
        dequantized = quantize(weight, bits, group_size).dequantize()
        assert torch.isfinite(dequantized).all()
        torch.testing.assert_close(dequantized, weight, atol=1e-6, rtol=1e-6)


def test_zero_iterations_is_rtn():
    weight = _weight("normal", (16, 64))
    hqq, rtn = hqq_quantize(weight, 3, 16, iters=0), rtn_quantize(weight, 3, 16)
    assert torch.equal(hqq.codes, rtn.codes)
    torch.testing.assert_close(hqq.zero, rtn.zero)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=0), "bits=0"),
        (dict(bits=9), "bits=9"),
        (dict(group_size=48), "group_size=48 does not divide in_features=100"),
        (dict(group_size=16, axis=0), "group_size=16 does not divide out_features=20"),
        (dict(group_size=0), "group_size=0"),
        (dict(axis=2), "axis=2"),
    ],
)
@pytest.mark.parametrize("quantize", [hqq_quantize, rtn_quantize], ids=["hqq", "rtn"])
def test_invalid_settings_raise_value_error_naming_the_setting(quantize, kwargs, message):
    arguments = dict(bits=4, group_size=None, axis=1) | kwargs
    with pytest.raises(ValueError, match=message):
        quantize(torch.zeros(20, 100), **arguments)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lp_norm=1.5), "lp_norm=1.5"),
        (dict(beta=0.0), "beta=0.0"),
        (dict(kappa=0.9), "kappa=0.9"),
        (dict(iters=-1), "iters=-1"),
    ],
)
def test_invalid_solver_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hqq_quantize(torch.zeros(4, 64), **kwargs)


def test_non_matrix_weight_is_rejected():
    with pytest.raises(ValueError, match="shape=\\(64,\\)"):
        hqq_quantize(torch.zeros(64))


# --------------------------------------------------------------------------- quality


def _literal_hqq(weight, bits, group_size, lp_norm, beta, kappa, iters):
    """docs/design.md §3.2's HQQ update transcribed literally (original domain, pow, global best iterate), axis=1."""
    max_code = 2**bits - 1
    grouped = weight.reshape(-1, group_size)
    low, high = grouped.amin(1, keepdim=True), grouped.amax(1, keepdim=True)
    scale = (high - low) / max_code
    zero = -low / scale
    best_error, best_reconstruction = float("inf"), None
    for _ in range(iters + 1):
        codes = torch.clamp(torch.round(grouped / scale + zero), 0, max_code)
        reconstruction = scale * (codes - zero)
        error = (grouped - reconstruction).abs().mean().item()
        if error >= best_error:
            break
        best_error, best_reconstruction = error, reconstruction
        residual = grouped - reconstruction
        magnitude = residual.abs()
        sparse_error = torch.sign(residual) * torch.relu(magnitude - magnitude.pow(lp_norm - 1) / beta)
        zero = torch.mean(codes - (grouped - sparse_error) / scale, dim=1, keepdim=True)
        beta *= kappa
    return best_reconstruction.reshape(weight.shape)


@pytest.mark.parametrize(
    "std, lp_norm",
    # Unit scale exercises the l_p prox; LLM scale (0.02) the path where the prox is
    # the identity and is skipped; p = 1 the soft-threshold special case.
    [(1.0, 0.7), (0.02, 0.7), (1.0, 1.0)],
)
def test_never_worse_than_the_literal_algorithm(std, lp_norm):
    weight = _weight("t3", (64, 256), seed=5, std=std)
    settings = dict(lp_norm=lp_norm, beta=10.0, kappa=1.01, iters=20)
    ours = _errors(weight, hqq_quantize(weight, 3, 64, **settings).dequantize())
    literal = _errors(weight, _literal_hqq(weight, 3, 64, **settings))
    float_slack = 1.0 + 1e-5  # the two evaluate round() on differently rounded inputs
    assert ours[0] <= literal[0] * float_slack and ours[1] <= literal[1] * float_slack


@pytest.mark.parametrize(
    "std, lp_norm, kappa", [(1.0, 0.7, 1.01), (1.0, 0.7, 1.5), (1.0, 1.0, 1.5), (0.02, 0.7, 1.01)]
)
def test_one_group_follows_the_literal_algorithm(std, lp_norm, kappa):
    """With a single group the per-group refinement has nothing to choose: same trajectory."""
    weight = _weight("t3", (1, 1024), seed=5, std=std)
    settings = dict(lp_norm=lp_norm, beta=10.0, kappa=kappa, iters=20)
    ours = _errors(weight, hqq_quantize(weight, 3, None, **settings).dequantize())
    literal = _errors(weight, _literal_hqq(weight, 3, 1024, **settings))
    # Float rounding (W/scale here vs. the literal's order of operations) may flip a
    # code on a rounding tie; a wrong beta schedule moves these errors by percents.
    assert ours == pytest.approx(literal, rel=1e-4)


def test_default_settings_beat_rtn():
    weight = _weight("t3", (64, 256), seed=7)
    for bits in (2, 3, 4):
        hqq = _errors(weight, hqq_quantize(weight, bits).dequantize())
        rtn = _errors(weight, rtn_quantize(weight, bits, 64).dequantize())
        assert hqq[0] < rtn[0] and hqq[1] < rtn[1], f"bits={bits}: hqq {hqq} vs rtn {rtn}"


# --------------------------------------------------------------------------- vs. the hqq package


def _reference_dequantized(weight: torch.Tensor, bits: int, group_size: int, axis: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    if axis == 0:
        # hqq's axis=0 groups are reshape([group_size, -1]) columns, i.e. *strided* rows
        # (r, r + out/g, ...), not consecutive ones. Its axis=1 on the transpose groups
        # exactly our axis=0 entries, so compare on identical groups.
        return _reference_dequantized(weight.T.contiguous(), bits, group_size, axis=1).T
    codes, meta = Quantizer.quantize(
        weight,
        nbits=bits,
        group_size=group_size,
        optimize=True,
        round_zero=False,
        axis=axis,
        bitpack=False,
        compute_dtype=torch.float32,
        device="cpu",
    )
    meta["compute_dtype"] = torch.float32  # dequantize falls back to float16 otherwise
    return Quantizer.dequantize(codes, meta)


@pytest.mark.parametrize(
    "distribution, bits, axis",
    [
        ("normal", 4, 1),
        ("normal", 3, 1),
        ("normal", 2, 1),
        ("t3", 4, 1),
        ("t3", 3, 1),
        ("t3", 2, 1),
        ("normal", 4, 0),
        ("t3", 3, 0),
    ],
)
def test_matches_or_beats_the_hqq_package(distribution, bits, axis):
    pytest.importorskip("hqq")
    group_size = 64
    weight = _weight(distribution, (256, 512), seed=bits + 10 * axis)

    ours = _errors(weight, hqq_quantize(weight, bits, group_size, axis, **REFERENCE_SETTINGS).dequantize())
    reference = _errors(weight, _reference_dequantized(weight, bits, group_size, axis))
    rtn = _errors(weight, rtn_quantize(weight, bits, group_size, axis).dequantize())

    assert ours[0] <= reference[0] * REFERENCE_TOLERANCE, f"mean |error|: ours {ours[0]} vs hqq {reference[0]}"
    assert ours[1] <= reference[1] * REFERENCE_TOLERANCE, f"MSE: ours {ours[1]} vs hqq {reference[1]}"
    assert ours[0] < rtn[0] and ours[1] < rtn[1], f"ours {ours} vs rtn {rtn}"
