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
"""

from __future__ import annotations

import torch

from .quantizers import dequantize_codes, quantize_codes


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, and the
    mask of input channels that never saw a nonzero input (``H_ii = 0``; their diagonal is set to 1).

    With ``J`` the order-reversing permutation and ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)``
    and ``J L⁻¹ J`` is upper triangular with a positive diagonal: one Cholesky factor and one
    triangular inverse, where ``chol(chol_inverse(chol(H)))`` takes two factors and a full inverse.
    """
    hessian = hessian.double().clone()
    dead = torch.diagonal(hessian) <= 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damp * torch.diagonal(hessian).mean())
    lower = torch.linalg.cholesky(hessian.flip(0, 1))
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1), dead


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """uint8 codes ``(out, in)`` of ``weight`` on the fixed grid ``(scale, zero)``, GPTQ-rounded.

    ``weight``: ``(out, in)``; ``hessian``: ``(in, in)``, ``XᵀX`` of the inputs the
    weight multiplies (rows ``x``, ``y = x Wᵀ``); ``scale``, ``zero``: ``(out, groups)``
    with groups of ``in / groups`` consecutive input channels. ``damp``: the
    fraction of the mean diagonal added to ``H`` (GPTQ's 1%). Columns are
    processed in blocks of ``block_size`` (a speed setting, not a result one).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} != ({in_features}, {in_features})")
    if not damp >= 0:
        raise ValueError(f"damp={damp} must be >= 0")
    group = in_features // scale.shape[1]
    upper, dead = damped_inverse_cholesky(hessian, damp)
    # Transposed, (in, out): column i of W is the contiguous row i here, and each step below is a few
    # whole-row ops (the per-column Python loop is the cost, so every op it saves counts). The arithmetic
    # is quantize_codes / dequantize_codes' own, so the codes are those of the plain column loop.
    work = weight.double().T.contiguous()
    work[dead] = 0.0  # nothing reaches them: any code will do, the zero-error one is cheapest
    scale_rows, zero_rows = scale.double().T.contiguous(), zero.double().T.contiguous()  # (groups, out)
    levels = 2**bits - 1
    codes = torch.empty_like(work)
    errors = torch.empty(min(block_size, in_features), out_features, dtype=work.dtype, device=work.device)
    diagonal = torch.diagonal(upper).tolist()
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        for column in range(start, end):
            g_scale, g_zero = scale_rows[column // group], zero_rows[column // group]
            value, code, error = work[column], codes[column], errors[column - start]
            torch.round(value / g_scale + g_zero, out=code).clamp_(0, levels)
            torch.sub(value, (code - g_zero) * g_scale, out=error).div_(diagonal[column])
            if column + 1 < end:  # W[:, j] -= e · U_ij for the rest of this block
                work[column + 1:end].addr_(upper[column, column + 1:end], error, alpha=-1)
        if end < in_features:  # and for the columns after it, as one product
            work[end:].addmm_(upper[start:end, end:].T, errors[:end - start], alpha=-1)
    return codes.to(torch.uint8).T.contiguous()
