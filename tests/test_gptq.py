"""gptq.py: error-compensating rounding on a fixed grid (and act-order) beats round-to-nearest on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from hh_lightning.gptq import TRIANGULAR_SOLVE_SIZE, damped_inverse_cholesky, gptq_codes, triangular_inverse
from hh_lightning.quantizers import WeightQuantizer, dequantize_codes, quantize_codes


def _layer(out_features=48, in_features=64, rows=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    inputs = torch.randn(rows, in_features, generator=generator) @ (torch.eye(in_features) + 2 * mixing)
    return weight, inputs


def _grid(weight, bits, group_size, symmetric):
    quantizer = WeightQuantizer(*weight.shape, bits=bits, symmetric=symmetric, group_size=group_size)
    quantizer.initialize(weight, "minmax")
    codes, scale, zero = quantizer.quantize(weight)
    return codes, scale, zero


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, True), (4, 16, False), (3, 32, False)])
def test_gptq_beats_round_to_nearest_on_the_output(bits, group_size, symmetric, act_order) -> None:
    weight, inputs = _layer()
    rtn_codes, scale, zero = _grid(weight, bits, group_size, symmetric)
    codes = gptq_codes(weight, inputs.T @ inputs, scale, zero, bits, act_order=act_order)
    expand = weight.shape[1] // scale.shape[1]

    def output_error(c):
        dequantized = dequantize_codes(c, scale.repeat_interleave(expand, 1), zero.repeat_interleave(expand, 1))
        return (inputs @ (weight - dequantized).T).norm()

    assert output_error(codes) < 0.8 * output_error(rtn_codes)
    assert codes.max() <= 2**bits - 1  # the same grid: the packed format is unchanged


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_a_diagonal_hessian_gives_round_to_nearest_exactly(block_size, act_order) -> None:
    """No off-diagonal term, no error moves: the identity, and an unequal diagonal (which act-order sorts)."""
    weight, _ = _layer(seed=1)
    rtn_codes, scale, zero = _grid(weight, 4, 16, False)
    unequal = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.1)
    for hessian in (torch.eye(64), unequal):
        for damp in (0.0, 0.01):
            assert torch.equal(gptq_codes(weight, hessian, scale, zero, 4, damp=damp, block_size=block_size,
                                          act_order=act_order), rtn_codes)


def test_block_size_does_not_change_the_codes_and_dead_inputs_are_handled() -> None:
    weight, inputs = _layer(seed=2)
    inputs[:, 5] = 0.0  # a channel that never fires
    _, scale, zero = _grid(weight, 4, None, True)
    hessian = inputs.T @ inputs
    reference = gptq_codes(weight, hessian, scale, zero, 4, block_size=64)
    assert torch.equal(gptq_codes(weight, hessian, scale, zero, 4, block_size=5), reference)
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_codes(weight, hessian[:10, :10], scale, zero, 4)


def _reference_gptq(weight, hessian, scale, zero, bits, damp=0.01):
    """GPTQ as its definition reads: one column at a time, its error moved onto every later column."""
    upper, dead = damped_inverse_cholesky(hessian, damp)
    work = weight.double().clone()
    work[:, dead] = 0.0
    group = weight.shape[1] // scale.shape[1]
    codes = torch.empty(weight.shape, dtype=torch.uint8)
    for column in range(weight.shape[1]):
        s, z = scale[:, column // group].double(), zero[:, column // group].double()
        codes[:, column] = quantize_codes(work[:, column], s, z, bits)
        error = (work[:, column] - dequantize_codes(codes[:, column], s, z)) / upper[column, column]
        work[:, column + 1:] -= error[:, None] * upper[column, column + 1:][None, :]
    return codes


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, True), (3, 16, False)])
def test_codes_equal_the_column_by_column_definition_and_rows_are_independent(bits, group_size, symmetric) -> None:
    weight, inputs = _layer(out_features=40, in_features=96, seed=3)
    inputs[:, 7] = 0.0
    _, scale, zero = _grid(weight, bits, group_size, symmetric)
    hessian = inputs.T @ inputs
    codes = gptq_codes(weight, hessian, scale, zero, bits, block_size=32)
    assert codes.is_contiguous() and codes.shape == weight.shape
    # The blocked, transposed loop is exact (it only regroups the later-column updates into products).
    reference = _reference_gptq(weight, hessian, scale, zero, bits)
    assert (codes.int() - reference.int()).abs().max() <= 1 and (codes != reference).float().mean() < 1e-3
    # Rows never mix, so linears sharing an input can be rounded together (block.fold_ does).
    top = gptq_codes(weight[:25], hessian, scale[:25], zero[:25], bits, block_size=32)
    bottom = gptq_codes(weight[25:], hessian, scale[25:], zero[25:], bits, block_size=32)
    assert torch.equal(torch.cat([top, bottom]), codes)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, True), (3, 16, False)])
def test_act_order_is_gptq_on_the_columns_sorted_by_their_hessian_diagonal(bits, group_size, symmetric) -> None:
    """Act-order's codes are the definition's on the permuted problem, each column with its own group's grid."""
    weight, inputs = _layer(out_features=40, in_features=96, seed=4)
    inputs = inputs * torch.linspace(0.2, 3.0, 96)  # unequal channel energies, so the order is not the index's
    inputs[:, 11] = 0.0
    _, scale, zero = _grid(weight, bits, group_size, symmetric)
    hessian = inputs.T @ inputs
    codes = gptq_codes(weight, hessian, scale, zero, bits, block_size=32, act_order=True)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    expand = weight.shape[1] // scale.shape[1]
    reference = _reference_gptq(weight[:, order], hessian[order][:, order],
                                scale.repeat_interleave(expand, 1)[:, order],
                                zero.repeat_interleave(expand, 1)[:, order], bits)
    permuted = codes[:, order]
    assert (permuted.int() - reference.int()).abs().max() <= 1 and (permuted != reference).float().mean() < 1e-3
    assert not torch.equal(codes, gptq_codes(weight, hessian, scale, zero, bits, block_size=32))


@pytest.mark.parametrize("dead_channels", [0, 3])
def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(dead_channels) -> None:
    _, inputs = _layer(rows=256, seed=2)
    inputs[:, :dead_channels] = 0.0
    hessian, damp = (inputs.T @ inputs).double(), 0.05
    upper, dead = damped_inverse_cholesky(hessian, damp)
    assert dead.sum() == dead_channels
    damped = hessian.clone()
    damped[dead, dead] = 1.0
    damped.diagonal().add_(damp * damped.diagonal().mean())
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, TRIANGULAR_SOLVE_SIZE, TRIANGULAR_SOLVE_SIZE + 1, 2 * TRIANGULAR_SOLVE_SIZE + 3])
def test_the_blocked_triangular_inverse_is_the_inverse(size) -> None:
    """Below, at and above the size where the blocked form takes over, odd halves included."""
    generator = torch.Generator().manual_seed(size)
    lower = torch.randn(size, size, generator=generator, dtype=torch.float64).tril() / size**0.5
    lower.diagonal().copy_(1.0 + torch.rand(size, generator=generator, dtype=torch.float64))
    inverse = triangular_inverse(lower)
    assert torch.equal(inverse, inverse.tril())
    torch.testing.assert_close(inverse @ lower, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-10)
