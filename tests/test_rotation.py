"""HouseholderRotation: orthogonality, WY vs loop vs dense, inits."""

import math

import pytest
import torch

from hh_lightning.rotation import (
    HouseholderRotation,
    flat_targets,
    hadamard_like,
    householder_apply,
    householder_apply_loop,
    householder_matrix,
    power_of_two_factor,
    top_eigenvectors,
)


@pytest.mark.parametrize("dim,k", [(576, 16), (896, 64), (1536, 1536), (4864, 64), (4864, 4864)])
def test_matrix_is_orthogonal(dim: int, k: int) -> None:
    rotation = HouseholderRotation(dim, k, init="random", seed=dim + k)
    r = rotation.matrix().detach()
    eye = torch.eye(dim)
    assert (r @ r.T - eye).abs().max() < 1e-5
    assert (r.T @ r - eye).abs().max() < 1e-5


def _dense_product(vectors: torch.Tensor) -> torch.Tensor:
    dim = vectors.shape[1]
    r = torch.eye(dim, dtype=vectors.dtype)
    for v in vectors:  # R = H(v_k) ⋯ H(v_1): later reflections multiply on the left
        if not v.abs().sum():
            continue  # an inactive reflection is the identity
        r = (torch.eye(dim, dtype=vectors.dtype) - 2 * torch.outer(v, v) / (v @ v)) @ r
    return r


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("method", ["wy", "wy_vectors", "materialized", "auto"])
def test_wy_matches_dense_and_loop_forward_and_backward(transpose: bool, method: str) -> None:
    torch.manual_seed(0)
    dim, k = 48, 20
    vectors = torch.randn(k, dim, dtype=torch.float64)
    vectors[3] = 0.0  # an inactive reflection among active ones
    vectors.requires_grad_(True)
    x = torch.randn(3, 5, dim, dtype=torch.float64, requires_grad=True)
    dense = _dense_product(vectors)
    expected = x @ (dense.T if transpose else dense)
    wy = householder_apply(x, vectors, transpose=transpose, method=method)
    loop = householder_apply_loop(x, vectors, transpose=transpose)
    assert torch.allclose(wy, expected, atol=1e-12)
    assert torch.allclose(loop, expected, atol=1e-12)
    upstream = torch.randn_like(expected)
    grads = [torch.autograd.grad(out, (x, vectors), upstream) for out in (expected, wy, loop)]
    for grad_x, grad_v in grads[1:]:
        assert torch.allclose(grad_x, grads[0][0], atol=1e-10)
        assert torch.allclose(grad_v, grads[0][1], atol=1e-10)


def test_rotation_rotates_weight_and_input_consistently() -> None:
    torch.manual_seed(1)
    rotation = HouseholderRotation(32, 8, init="random")
    x, w = torch.randn(7, 32), torch.randn(11, 32)
    assert torch.allclose(rotation.rotate(x) @ rotation.rotate(w).T, x @ w.T, atol=1e-5)
    assert torch.allclose(rotation.rotate_transposed(rotation.rotate(x)), x, atol=1e-5)


def test_inactive_reflection_is_identity_with_finite_gradients() -> None:
    torch.manual_seed(2)
    vectors = torch.randn(4, 16, dtype=torch.float64)
    vectors[2] = 0.0
    vectors.requires_grad_(True)
    x = torch.randn(5, 16, dtype=torch.float64)
    out = householder_apply(x, vectors)
    active = vectors.detach()[[0, 1, 3]]
    assert torch.allclose(out, x @ _dense_product(active), atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(vectors.grad).all()
    all_zero = torch.zeros(3, 16, requires_grad=True)
    assert torch.equal(householder_apply(x.float(), all_zero), x.float())


def test_identity_init_is_identity_but_trainable() -> None:
    rotation = HouseholderRotation(64, 9, init="identity")
    assert (rotation.matrix() - torch.eye(64)).abs().max() < 1e-5
    x = torch.randn(4, 64)
    target = torch.randn(4, 64)
    ((rotation.rotate(x) - target) ** 2).sum().backward()
    assert rotation.vectors.grad.abs().sum() > 0


def test_flat_targets_are_orthonormal_and_flat() -> None:
    for dim in (576, 896, 1536, 4864, 8960):
        targets = flat_targets(dim, torch.float64)
        assert targets.shape == (power_of_two_factor(dim), dim)
        assert torch.allclose(targets @ targets.T, torch.eye(targets.shape[0], dtype=torch.float64), atol=1e-12)
        assert torch.allclose(targets.abs() * math.sqrt(dim), torch.ones_like(targets))


def test_hadamard_init_is_dense_and_flat() -> None:
    dim = 96
    matrix = hadamard_like(dim, torch.Generator().manual_seed(0), torch.float64)
    assert torch.allclose(matrix @ matrix.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    rotation = HouseholderRotation(dim, dim, init="hadamard")
    r = rotation.matrix().detach()
    assert (r @ r.T - torch.eye(dim)).abs().max() < 1e-5
    assert r.abs().max() * math.sqrt(dim) <= math.sqrt(2) + 1e-4  # flat up to the DCT factor
    with pytest.raises(ValueError, match="hadamard"):
        HouseholderRotation(dim, 8, init="hadamard")


def _planted_outliers(tokens: int, dim: int, channels: list[int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=generator)
    for rank, channel in enumerate(channels):
        x[:, channel] *= 40.0 / (rank + 1)
    return x


@pytest.mark.parametrize("dim,k", [(576, 16), (256, 64)])
def test_pca_init_flattens_top_directions(dim: int, k: int) -> None:
    x = _planted_outliers(2048, dim, [3, 100, 201])
    covariance = x.T @ x / x.shape[0]
    rotation = HouseholderRotation(dim, k, init="pca")
    rotation.init_pca_(covariance)
    top = top_eigenvectors(covariance, k)  # row vectors u_i, as the init computes them
    mapped = rotation.rotate(top).detach()
    assert (mapped.abs().amax(dim=1) * math.sqrt(dim) - 1).abs().max() < 1e-4
    assert (mapped.abs().amin(dim=1) * math.sqrt(dim) - 1).abs().max() < 1e-4

    def max_to_rms(t: torch.Tensor) -> float:
        return (t.abs().amax(dim=1) / t.pow(2).mean(dim=1).sqrt()).mean().item()

    rotated = rotation.rotate(x).detach()
    assert max_to_rms(rotated) < 0.5 * max_to_rms(x)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="num_reflections=65"):
        HouseholderRotation(64, 65)
    with pytest.raises(ValueError, match="init="):
        HouseholderRotation(64, 4, init="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="covariance shape"):
        HouseholderRotation(8, 2, init="pca").init_pca_(torch.eye(9))


def test_auto_method_picks_the_cheapest_order() -> None:
    from hh_lightning.rotation import _apply_costs

    costs = _apply_costs(rows=16, num_reflections=64, dim=896)
    assert min(costs, key=costs.get) == "wy"  # few rows (decoding): solve the n × k projections
    costs = _apply_costs(rows=2048, num_reflections=64, dim=896)
    assert min(costs, key=costs.get) == "wy_vectors"  # n > d: solve against the vectors once
    costs = _apply_costs(rows=2048, num_reflections=576, dim=576)
    assert min(costs, key=costs.get) == "materialized"  # many rows, k = d: one dense GEMM wins


def test_householder_matrix_matches_dense_product() -> None:
    vectors = torch.randn(6, 10, dtype=torch.float64)
    assert torch.allclose(householder_matrix(vectors), _dense_product(vectors), atol=1e-12)


@pytest.mark.parametrize("k", [32, 20, 8, 3])  # dense R reused for 2k ≥ d, solved WY factors below
def test_inference_cache_matches_wy_and_follows_updates(k: int) -> None:
    torch.manual_seed(3)
    rotation = HouseholderRotation(32, k, init="random")
    with torch.no_grad():
        rotation.vectors[1] = 0.0  # an inactive reflection
    x = torch.randn(7, 32)
    with torch.no_grad():
        cached = rotation.rotate(x)
        assert len(rotation._frozen_cache[1]) == (1 if 2 * k >= 32 else 3)
        assert torch.allclose(rotation.rotate_transposed(x), householder_apply(x, rotation.vectors, True), atol=1e-5)
        assert torch.allclose(cached, householder_apply(x, rotation.vectors), atol=1e-5)
        assert torch.allclose(rotation.rotate_transposed(cached), x, atol=1e-5)
        rotation.vectors.add_(0.5)  # an in-place update must invalidate the cache
        assert torch.allclose(rotation.rotate(x), householder_apply(x, rotation.vectors), atol=1e-5)
    assert rotation.rotate(x).requires_grad  # with gradients on, the WY path runs


@pytest.mark.parametrize("method", ["wy", "wy_vectors", "materialized"])
def test_autocast_does_not_reach_householder_apply(method: str) -> None:
    """Every evaluation order of the WY product runs in float32 under bf16 autocast, bit for bit
    as outside it (the triangular solve has no bf16 kernel). The structures: test_structured.py."""
    vectors, x = torch.randn(8, 32), torch.randn(7, 32)
    expected = householder_apply(x, vectors, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = householder_apply(x, vectors, method=method)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dim,count", [(1024, 32), (300, 32), (64, 0)])
def test_top_eigenvectors_match_eigh(dim: int, count: int) -> None:
    """Subspace iteration (count ≪ dim) or eigh: orthonormal rows whose Rayleigh quotients are the top
    eigenvalues, in order, on a decaying spectrum like an activation covariance's."""
    generator = torch.Generator().manual_seed(dim)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = 100.0 * torch.arange(1, dim + 1, dtype=torch.float64) ** -1.5
    covariance = (basis * eigenvalues) @ basis.T
    top = top_eigenvectors(covariance, count).double()
    assert top.shape == (count, dim)
    torch.testing.assert_close(top @ top.T, torch.eye(count, dtype=torch.float64), atol=1e-5, rtol=0)
    rayleigh = ((top @ covariance) * top).sum(1)
    torch.testing.assert_close(rayleigh, eigenvalues[:count], rtol=1e-3, atol=0)
    alignment = (top * basis[:, :count].T).sum(1).abs()
    assert bool((alignment[:8] > 0.999).all())  # the well-separated leading directions themselves
