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
    mask of input channels that never saw a nonzero input (``H_ii = 0``; their diagonal is set to 1)."""
    hessian = hessian.double().clone()
    dead = torch.diagonal(hessian) <= 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damp * torch.diagonal(hessian).mean())
    lower = torch.linalg.cholesky(hessian)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


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
    work = weight.double().clone()
    work[:, dead] = 0.0  # nothing reaches them: any code will do, the zero-error one is cheapest
    scale, zero = scale.double(), zero.double()
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        errors = torch.empty(out_features, end - start, dtype=work.dtype, device=work.device)
        for column in range(start, end):
            g = column // group
            value = work[:, column]
            code = quantize_codes(value, scale[:, g], zero[:, g], bits)
            error = (value - dequantize_codes(code, scale[:, g], zero[:, g])) / upper[column, column]
            work[:, column + 1:end] -= error[:, None] * upper[column, column + 1:end][None, :]
            codes[:, column] = code
            errors[:, column - start] = error
        work[:, end:] -= errors @ upper[start:end, end:]
    return codes
