"""Error-compensating weight rounding on a fixed grid (GPTQ, Frantar et al. 2022).

Round-to-nearest picks each code alone. GPTQ rounds the columns of ``W``
(``out × in``) one at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian ``H = XᵀX`` of the
layer's inputs ``X`` (rows), so the *output* error ``‖X (W − Ŵ)ᵀ‖`` shrinks
rather than the weight error. With ``U`` the upper Cholesky factor of
``H⁻¹``, column ``i``'s error ``e = (w_i − q_i) / U_ii`` updates the rest by
``W[:, j] -= e · U_ij`` for ``j > i``.

Here the grid (``scale``, ``zero`` per output row and input group) is fixed
beforehand, by the learned clip ratios, the clip search or HQQ, so GPTQ
changes only which code each weight takes and the packed format is
unchanged. With ``H = I`` no error moves and the result is exactly
round-to-nearest on that grid.

Act-order (GPTQ's ``desc_act``) rounds the columns in decreasing order of
``H_ii``, so the inputs with the most energy are rounded first, while the most
columns remain to absorb their error. Each column keeps its own group's grid
(GPTQ's static groups), so the codes still pack into the same format.
"""

from __future__ import annotations

import torch

from .quantizers import dequantize_codes, quantize_codes


# Below this size a triangular inverse is one LAPACK triangular solve; above it, two half-size inverses
# and two matrix products (``triangular_inverse``), which run as GEMMs at about half the solve's time.
TRIANGULAR_SOLVE_SIZE = 256


def triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``(n, n)`` ``L``, by blocks:
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]``.

    A triangular solve against the identity does ``n³/2`` multiply-adds and ignores the zeros of
    its right-hand side; the blocked form does about ``n³/3``, mostly in matrix products.
    """
    size = lower.shape[0]
    if size <= TRIANGULAR_SOLVE_SIZE:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, identity, upper=False)
    half = size // 2
    inverse = torch.zeros_like(lower)
    top, bottom = triangular_inverse(lower[:half, :half]), triangular_inverse(lower[half:, half:])
    inverse[:half, :half], inverse[half:, half:] = top, bottom
    inverse[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return inverse


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, and the
    mask of input channels that never saw a nonzero input (``H_ii = 0``; their diagonal is set to 1).

    With ``J`` the order-reversing permutation and ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)``
    and ``J L⁻¹ J`` is upper triangular with a positive diagonal: one Cholesky factor and one
    triangular inverse, where ``chol(chol_inverse(chol(H)))`` takes two factors and a full inverse.
    """
    flipped = hessian.flip(0, 1).to(torch.float64)  # J H J, a copy: the damping below must not touch H
    diagonal = torch.diagonal(flipped)
    dead_flipped = diagonal <= 0
    diagonal.masked_fill_(dead_flipped, 1.0)
    diagonal.add_(damp * diagonal.mean())
    lower = torch.linalg.cholesky(flipped)
    return triangular_inverse(lower).flip(0, 1), dead_flipped.flip(0)


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> torch.Tensor:
    """uint8 codes ``(out, in)`` of ``weight`` on the fixed grid ``(scale, zero)``, GPTQ-rounded.

    ``weight``: ``(out, in)``; ``hessian``: ``(in, in)``, ``XᵀX`` of the inputs the
    weight multiplies (rows ``x``, ``y = x Wᵀ``); ``scale``, ``zero``: ``(out, groups)``
    with groups of ``in / groups`` consecutive input channels. ``damp``: the
    fraction of the mean diagonal added to ``H`` (GPTQ's 1%). ``act_order``: round
    the columns in decreasing ``H_ii`` (module docstring). Columns are processed in
    blocks of ``block_size`` (a speed setting, not a result one).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} != ({in_features}, {in_features})")
    if not damp >= 0:
        raise ValueError(f"damp={damp} must be >= 0")
    group = in_features // scale.shape[1]
    # The order the columns are rounded in, and the group (grid) of each in that order.
    if act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        weight, hessian = weight[:, order], hessian[order][:, order]
    else:
        order = torch.arange(in_features, device=weight.device)
    group_of = (order // group).tolist()
    # A block shares one grid: it ends at block_size columns or where the next column's group differs.
    run_ends = [i for i in range(1, in_features) if group_of[i] != group_of[i - 1]] + [in_features]
    upper, dead = damped_inverse_cholesky(hessian, damp)
    # Row i over U_ii: an error e = w_i − q_i (not yet divided) then moves onto column j as e · U_ij / U_ii.
    steps = upper / upper.diagonal()[:, None]
    # Transposed, (in, out): column i of W is the contiguous row i here, and each step below is a few
    # whole-row ops (the per-column Python loop is the cost, so every op it saves counts).
    work = weight.double().T.contiguous()
    work[dead] = 0.0  # nothing reaches them: any code will do, the zero-error one is cheapest
    scale_rows, zero_rows = scale.double().T.contiguous(), zero.double().T.contiguous()
    levels = 2**bits - 1
    codes = torch.empty_like(work)
    errors = torch.empty(min(block_size, in_features), out_features, dtype=work.dtype, device=work.device)
    work_rows, code_rows, step_rows = work.unbind(0), codes.unbind(0), steps.unbind(0)
    # Blocks never straddle a group, so the columns of one share a grid and run in code units,
    # w / scale + zero (quantize_codes' arithmetic): a code is then one rounding, and an error moves
    # between columns of the block unscaled. Leaving the block, errors go back to weight units.
    start, run = 0, 0
    while start < in_features:
        while run_ends[run] <= start:
            run += 1
        end = min(start + block_size, run_ends[run])
        g_scale, g_zero = scale_rows[group_of[start]], zero_rows[group_of[start]]
        work[start:end].div_(g_scale).add_(g_zero)
        for column in range(start, end):
            value, code, error = work_rows[column], code_rows[column], errors[column - start]
            torch.round(value, out=code).clamp_(0, levels)
            torch.sub(value, code, out=error)
            if column + 1 < end:  # W[:, j] -= e · U_ij / U_ii for the rest of this block
                work[column + 1:end].addr_(step_rows[column][column + 1:end], error, alpha=-1)
        if end < in_features:  # and for the columns after it, as one product, in weight units
            work[end:].addmm_(steps[start:end, end:].T, errors[:end - start].mul_(g_scale), alpha=-1)
        start = end
    if act_order:  # back to the input channels' own order
        codes = codes[torch.argsort(order)]
    return codes.to(torch.uint8).T.contiguous()
