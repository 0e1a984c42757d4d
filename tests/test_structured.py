"""Rotation structures: orthogonality, online apply vs the dense matrix, PCA on top of the Hadamard,
and storage that stays linear in d on a 7B-shaped block (meta device)."""

import math

import pytest
import torch
from torch import nn

from hh_lightning.block import BlockQuantConfig, HHDecoderBlock
from hh_lightning.rotation import dct_matrix, sylvester_hadamard, top_eigenvectors
from hh_lightning.structured import (
    ROTATION_STRUCTURES,
    STRUCTURE_INITS,
    HadamardHouseholderRotation,
    KroneckerRotation,
    balanced_factors,
    kronecker_apply,
    make_rotation,
    rotation_parameter_count,
)

# Every structure with every init it accepts, at sizes of real models (and an odd one).
DIMS = [64, 96, 576, 896, 1536]
CASES = [(structure, init) for structure in ROTATION_STRUCTURES for init in STRUCTURE_INITS[structure]]


def _build(structure: str, init: str, dim: int, seed: int = 0) -> nn.Module:
    reflections = dim if (structure, init) == ("householder", "hadamard") else min(16, dim)
    rotation = make_rotation(structure, dim, reflections, init, seed)
    if init == "pca":
        x = torch.randn(256, dim, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 5, dim)
        rotation.init_pca_(x.T @ x / x.shape[0])
    if init == "identity":  # move off the identity so the test sees a real rotation
        with torch.no_grad():
            for parameter in rotation.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    return rotation


@pytest.mark.parametrize("structure,init", CASES)
@pytest.mark.parametrize("dim", DIMS)
def test_every_structure_is_orthogonal(structure: str, init: str, dim: int) -> None:
    matrix = _build(structure, init, dim).matrix().detach()
    eye = torch.eye(dim)
    assert (matrix @ matrix.T - eye).abs().max() < 1e-5
    assert (matrix.T @ matrix - eye).abs().max() < 1e-5


@pytest.mark.parametrize("structure,init", CASES)
def test_online_apply_equals_dense_matrix_forward_and_gradients(structure: str, init: str) -> None:
    dim = 96
    rotation = _build(structure, init, dim, seed=1)
    x = torch.randn(2, 5, dim, requires_grad=True)
    weight = torch.randn(7, dim)
    upstream = torch.randn(2, 5, dim)
    params = [p for p in rotation.parameters() if p.requires_grad]
    for online, dense in ((lambda: rotation.rotate(x), lambda: x @ rotation.matrix()),
                          (lambda: rotation.rotate_transposed(x), lambda: x @ rotation.matrix().T)):
        got, expected = online(), dense()
        assert torch.allclose(got, expected, atol=1e-5)
        grads_got = torch.autograd.grad(got, [x, *params], upstream)
        grads_expected = torch.autograd.grad(expected, [x, *params], upstream)
        for a, b in zip(grads_got, grads_expected, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # W R, and the no-grad path (cached factors) agrees
        assert torch.allclose(rotation.rotate_weight(weight), weight @ rotation.matrix(), atol=1e-5)
        assert torch.allclose(rotation.rotate(x), x @ rotation.matrix(), atol=1e-5)
        assert torch.allclose(rotation.rotate_transposed(rotation.rotate(x)), x, atol=1e-5)


@pytest.mark.parametrize("structure,init", CASES)
@pytest.mark.parametrize("grad", [True, False])  # training's path; inference's cached factors
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_reach_any_rotation(structure: str, init: str, grad: bool, dtype: torch.dtype) -> None:
    """Under autocast (Lightning's ``*-mixed`` precision) every structure computes ``x R``, ``x Rᵀ``
    and ``W R`` of float32 rows exactly as outside it: the rotated rows must not depend on the
    precision setting, and the WY triangular solve has no bf16 kernel at all."""
    dim = 96
    x, weight = torch.randn(2, 5, dim), torch.randn(7, dim)
    results = []
    for enabled in (False, True):
        rotation = _build(structure, init, dim, seed=2)  # fresh: no factors cached by the other pass
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=enabled):
            results.append((rotation.rotate(x), rotation.rotate_transposed(x), rotation.rotate_weight(weight)))
    for plain, autocast in zip(*results, strict=True):
        assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


@pytest.mark.parametrize("structure,init", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_a_storage_dtype_keeps_the_rotation_orthogonal_and_close(structure, init, dtype) -> None:
    dim = 96
    rotation = _build(structure, init, dim, seed=2)
    before = rotation.matrix().detach().clone()
    rotation.round_to_(dtype)
    values = {name: p.detach().clone() for name, p in rotation.named_parameters()}
    for name, value in values.items():
        assert value.dtype == torch.float32, name  # rounded in place, the parameter keeps its dtype
        assert torch.equal(value.to(dtype).float(), value), name
    after = rotation.matrix().detach()
    eye = torch.eye(dim)
    assert (after @ after.T - eye).abs().max() < 1e-5
    # A relative rounding of u = 2^-11 (fp16) or 2^-8 (bf16) per entry moves R by a few u.
    unit = torch.finfo(dtype).eps / 2
    assert (after - before).abs().max() < 40 * unit
    rotation.round_to_(dtype)  # idempotent: fold_ may be reached after an explicit round_rotations_
    for name, parameter in rotation.named_parameters():
        assert torch.equal(parameter.detach(), values[name]), name


@pytest.mark.parametrize("scale", [1e-6, 1e12])
def test_rounding_rescales_far_off_vectors_exactly_instead_of_flushing_them(scale: float) -> None:
    """fp16 holds 6e-8 to 65504: a trained vector far outside is scaled by a power of two, H(v) unchanged."""
    rotation = make_rotation("householder", 64, 8, "random", 0)
    with torch.no_grad():
        rotation.vectors.mul_(scale)
    before = rotation.matrix().detach().clone()
    rotation.round_to_(torch.float16)
    assert torch.isfinite(rotation.vectors).all() and (rotation.vectors.norm(dim=1) > 1).all()
    assert (rotation.matrix() - before).abs().max() < 40 * 2.0**-11


@pytest.mark.parametrize("dim", [1, 64, 97, 576, 896, 1536, 3584, 4864, 8960, 18944, 2 * 3 * 5 * 7 * 11])
def test_balanced_factors_are_the_divisor_pair_closest_to_the_square_root(dim: int) -> None:
    a, b = balanced_factors(dim)
    assert a * b == dim and 1 <= a <= b
    # No divisor lies strictly between a and √dim, so no pair is more balanced (cheaper to apply).
    assert not [c for c in range(a + 1, math.isqrt(dim) + 1) if dim % c == 0]


@pytest.mark.parametrize("sizes", [(7,), (4, 5), (3, 4, 5)])
def test_kronecker_apply_equals_kron_of_factors(sizes) -> None:
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(size, size, generator=generator, dtype=torch.float64) for size in sizes]
    x = torch.randn(2, 6, math.prod(sizes), generator=generator, dtype=torch.float64)
    dense = factors[0]
    for factor in factors[1:]:
        dense = torch.kron(dense, factor)
    assert torch.allclose(kronecker_apply(x, factors), x @ dense, atol=1e-10)


def test_kronecker_is_signs_times_kron_of_its_factors() -> None:
    rotation = KroneckerRotation(96, init="hadamard", seed=3)
    a, b = rotation.factor_a.matrix().detach(), rotation.factor_b.matrix().detach()
    expected = rotation.signs.float()[:, None] * torch.kron(a, b)
    assert torch.allclose(rotation.matrix().detach(), expected, atol=1e-6)
    # The Hadamard start is flat, like a dense randomized Hadamard: no entry above 2/√d.
    assert rotation.matrix().abs().max() * math.sqrt(96) <= 2 + 1e-4
    assert sum(p.numel() for p in rotation.parameters()) == 8**2 + 12**2


def test_fixed_hadamard_is_randomized_hadamard_kron_dct() -> None:
    dim = 1536  # 512 · 3
    rotation = HadamardHouseholderRotation(dim, 0, init="identity", seed=4)
    expected = rotation.signs.double()[:, None] * torch.kron(sylvester_hadamard(512, torch.float64) / math.sqrt(512),
                                                             dct_matrix(3, torch.float64))
    assert torch.allclose(rotation.matrix().double(), expected, atol=1e-6)
    assert not list(rotation.parameters())
    assert set(rotation.state_dict()) == {"signs"} and rotation.signs.dtype == torch.int8


@pytest.mark.parametrize("dim", [64, 576])
def test_fixed_part_cached_for_inference_equals_the_uncached_and_follows_new_signs_and_dtypes(dim: int) -> None:
    rotation = HadamardHouseholderRotation(dim, 4, init="random", seed=0)
    other = HadamardHouseholderRotation(dim, 4, init="random", seed=7)
    x = torch.randn(3, dim)
    expected = {"fixed": rotation.fixed_rotate(x), "transposed": rotation.fixed_rotate_transposed(x)}  # uncached
    with torch.no_grad():
        for _ in range(2):  # the first call fills the cache, the second reads it
            assert torch.equal(rotation.fixed_rotate(x), expected["fixed"])
            assert torch.equal(rotation.fixed_rotate_transposed(x), expected["transposed"])
        rotation.load_state_dict(other.state_dict())  # other signs, written in place into the same buffer
        assert torch.equal(rotation.fixed_rotate(x), other.fixed_rotate(x))
        assert torch.equal(rotation.rotate(x), other.rotate(x))
        wide = rotation.fixed_rotate(x.double())
        assert wide.dtype == torch.float64
        torch.testing.assert_close(wide, other.fixed_rotate(x).double(), rtol=1e-5, atol=1e-6)
        moved = rotation.to(torch.float64)  # a new factor dtype; the int8 signs stay the same tensor
        assert torch.equal(moved.fixed_rotate(x.double()), wide)


def test_hadamard_householder_pca_flattens_what_the_hadamard_left() -> None:
    dim, k = 256, 8
    generator = torch.Generator().manual_seed(5)
    # Outliers that stay after the Hadamard: a few directions that the fixed H maps onto single channels.
    rotation = HadamardHouseholderRotation(dim, k, init="pca", seed=6)
    fixed = rotation.fixed_rotate(torch.eye(dim))
    x = torch.randn(4096, dim, generator=generator)
    x = x + 30 * torch.randn(4096, 1, generator=generator) * fixed[:, 3] + 20 * torch.randn(4096, 1) * fixed[:, 9]
    covariance = x.T @ x / x.shape[0]
    rotation.init_pca_(covariance)
    rotated_by_fixed = rotation.fixed_rotate(x)
    top = top_eigenvectors(rotated_by_fixed.T @ rotated_by_fixed / x.shape[0], 2)  # directions in x F space
    mapped = rotation.reflections.rotate(top).detach()
    assert (mapped.abs() * math.sqrt(dim) - 1).abs().max() < 1e-3  # each top direction now flat

    def max_to_rms(t: torch.Tensor) -> float:
        return (t.abs().amax(dim=1) / t.pow(2).mean(dim=1).sqrt()).mean().item()

    with torch.no_grad():
        assert max_to_rms(rotation.rotate(x)) < 0.7 * max_to_rms(rotated_by_fixed)


def test_bad_structure_settings_raise() -> None:
    with pytest.raises(ValueError, match="structure='nope'"):
        make_rotation("nope", 8, 2, "identity", 0)
    with pytest.raises(ValueError, match="not available for the 'kronecker' structure"):
        make_rotation("kronecker", 8, 2, "pca", 0)
    with pytest.raises(ValueError, match="not available for the 'hadamard_householder' structure"):
        make_rotation("hadamard_householder", 8, 2, "hadamard", 0)
    with pytest.raises(ValueError, match="do not multiply"):
        KroneckerRotation(12, init="identity", factors=(3, 5))
    with pytest.raises(ValueError, match="num_reflections=9"):
        HadamardHouseholderRotation(8, 9)


# ---------------------------------------------------------------- 7B shapes
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 head_dim=128, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096)


@pytest.mark.parametrize("structure,init,reflections,head_reflections", [("kronecker", "hadamard", None, None),
                                                                          ("hadamard_householder", "pca", 64, 16)])
def test_structured_rotations_of_a_7b_block_are_never_d_by_d(structure, init, reflections, head_reflections) -> None:
    """Fold a Qwen2.5-7B-shaped block on the meta device: what export stores of its rotations is O(d)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RotaryEmbedding,
    )

    config = Qwen2Config(**QWEN25_7B)
    with torch.device("meta"):
        layer, rotary = Qwen2DecoderLayer(config, 0), Qwen2RotaryEmbedding(config)
    quant = BlockQuantConfig(rotation_structure=structure, rotation_init=init, qkv_reflections=reflections,
                             upgate_reflections=reflections, down_reflections=reflections, kv_reflections=head_reflections,
                             o_reflections=reflections,
                             o_rotation="full", w_init="minmax")
    block = HHDecoderBlock(layer, config, rotary, quant, 0).fold_()
    assert block.is_folded
    rotations = block.rotations()
    assert set(rotations) == {"qkv", "o", "upgate", "down", "kv"}
    weights = sum(linear.in_features * linear.out_features for linear in block.linears.values())
    stored = 0
    for name, rotation in rotations.items():
        assert rotation.structure == structure
        for key, tensor in rotation.state_dict().items():
            assert tensor.numel() <= 128 * rotation.dim, (name, key, tuple(tensor.shape))  # O(d), k ≤ 128
            assert tuple(tensor.shape) != (rotation.dim, rotation.dim), (name, key)
        stored += rotation_parameter_count(rotation)
    assert stored / weights < 0.01  # rotations stay under 1% of the block's weights
