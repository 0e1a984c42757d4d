"""Data-free weight quantization: HQQ (half-quadratic quantization) and plain RTN.

Both quantizers produce the same thing: integer codes, a per-group float scale and
a per-group real-valued zero point, with the convention

    Ŵ = (codes − zero) · scale

for a weight of shape ``(out_features, in_features)``. A group is ``group_size``
consecutive entries along one axis:

* ``axis=1``: along the input (column) dimension of one output row; scale and zero
  have shape ``(out, in // group_size)``.
* ``axis=0``: along the output (row) dimension of one input column; scale and zero
  have shape ``(out // group_size, in)``.
* ``group_size=None``: one group per channel, i.e. shape ``(out, 1)`` for ``axis=1``
  and ``(1, in)`` for ``axis=0``.

HQQ (Badri & Shaji, 2023) starts from min-max RTN and refines the zero point by
half-quadratic splitting of ``min ‖W − Ŵ‖_p^p`` with ``p < 1`` (docs/design.md §3.2).

Implementation notes (why it looks the way it does):

* Every weight is viewed as a 3-D tensor ``(A, group_size, B)`` whose middle
  dimension is one group, so both axes are plain views (no transpose copy) and
  per-group reductions are ``dim=1`` with ``keepdim`` broadcasting.
* The scale never changes during the iterations, so the solver works in the
  *scaled* domain ``U = W / scale`` (computed once). There the sparse-error prox
  ``shrink_p(x, β) = sign(x)·relu(|x| − |x|^{p−1}/β)`` with ``x = scale·y`` becomes
  ``scale · sign(y)·relu(|y| − c·|y|^{p−1})`` with a per-group ``c = scale^{p−2}/β``,
  and the zero update ``z = mean(codes − (W − W_e)/scale)`` needs no division.
* "Keep the best iterate" is refined per group: groups are independent, so each
  group takes its own lowest-mean-|error| iterate wherever that does not raise its
  squared error above the global best iterate's. The result is never worse than
  the global best iterate in mean |error| or MSE, nor than RTN (iterate 0) in
  mean |error|.
* β is in the weight's own units, so the prox depends on the weight's scale: for
  weights at LLM scale (std ~0.02) its threshold is many quantization steps, the
  sparse error is zero and each update is the plain mean residual. The solver
  detects that and skips the transcendental work.

Relation to the reference (the ``hqq`` package, 0.2.x): its default solver
(``optimize_weights_proximal_legacy``) takes ``kappa`` but never grows β, and
returns the zero computed *after* the last evaluated iterate. With ``kappa=1.0``
this solver follows the same trajectory (up to float rounding) and returns an
evaluated iterate at least as good; with the default ``kappa=1.01`` the
prox shrinks less each step: on unit-scale random weights that lands within ±0.4%
of the reference at 3-4 bits but up to ~2-3% behind at 1-2 bits after 20
iterations; at LLM scale, where the prox is inactive, it makes no difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch

__all__ = ["HQQResult", "hqq_quantize", "rtn_quantize"]

MIN_BITS = 1
MAX_BITS = 8  # codes are stored as uint8

# The dimension of the (A, group_size, B) grouped view that holds one group.
_GROUP_DIM = 1


@dataclass
class HQQSettings:
    """HQQ's solver settings (docs/design.md §3.2); ``hqq_quantize(..., **asdict(settings))``.

    Args:
        lp_norm: the ``p`` of the ``‖W − Ŵ‖_p^p`` objective, in (0, 1].
        beta: initial half-quadratic penalty (> 0); larger = smaller sparse error.
        kappa: growth factor of ``beta`` per iteration (>= 1).
        iters: zero-point updates (>= 0).
    """

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20

    def validate(self, prefix: str = "hqq") -> None:
        """One-line errors naming ``prefix.field``."""
        checks = {"lp_norm": 0.0 < self.lp_norm <= 1.0, "beta": self.beta > 0.0, "kappa": self.kappa >= 1.0,
                  "iters": isinstance(self.iters, Integral) and not isinstance(self.iters, bool) and self.iters >= 0}
        ranges = {"lp_norm": "in (0, 1]", "beta": "> 0", "kappa": ">= 1", "iters": "an integer >= 0"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r} must be {ranges[name]}")


@dataclass
class HQQResult:
    """Integer codes plus per-group affine parameters; ``Ŵ = (codes − zero) · scale``.

    Attributes:
        codes: uint8, shape ``(out_features, in_features)``, values in ``[0, 2**bits − 1]``.
        scale: float32, ``(out, in // group_size)`` for ``axis=1``, ``(out // group_size, in)``
            for ``axis=0``; ``(out, 1)`` / ``(1, in)`` when ``group_size`` is None.
        zero: float32, same shape as ``scale``; a real-valued (not rounded) zero point.
        bits: code width, 1..8.
        group_size: entries per group, or None for one group per channel.
        axis: 1 = groups along the input dimension, 0 = along the output dimension.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int | None
    axis: int

    def dequantize(self) -> torch.Tensor:
        """Return ``(codes − zero) · scale`` broadcast per group: float32, shape ``(out, in)``."""
        grouped_codes = _grouped_view(self.codes, self.group_size, self.axis)
        grouped_shape = _grouped_param_shape(grouped_codes)
        zero = self.zero.reshape(grouped_shape)
        scale = self.scale.reshape(grouped_shape)
        return ((grouped_codes.float() - zero) * scale).reshape(self.codes.shape)


# --------------------------------------------------------------------------- grouping


def _validate(weight: torch.Tensor, bits: int, group_size: int | None, axis: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape={tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got dtype={weight.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is not supported: use an integer in {MIN_BITS}..{MAX_BITS}")
    if axis not in (0, 1):
        raise ValueError(f"axis={axis!r} is not supported: use 1 (groups along in_features) or 0 (along out_features)")
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive integer or None (per channel)")
    dim_name = "in_features" if axis == 1 else "out_features"
    dim_size = weight.shape[axis]
    if dim_size % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide {dim_name}={dim_size}")


def _grouped_view(tensor: torch.Tensor, group_size: int | None, axis: int) -> torch.Tensor:
    """View an ``(out, in)`` tensor as ``(A, group_size, B)``, one group per ``[a, :, b]``.

    ``axis=1``: ``(out · in/g, g, 1)``; ``axis=0``: ``(out/g, g, in)``. Both are views of
    a contiguous tensor, so no data moves.
    """
    out_features, in_features = tensor.shape
    if axis == 1:
        size = in_features if group_size is None else group_size
        return tensor.reshape(out_features * in_features // size, size, 1)
    size = out_features if group_size is None else group_size
    return tensor.reshape(out_features // size, size, in_features)


def _grouped_param_shape(grouped: torch.Tensor) -> tuple[int, int, int]:
    """Shape of a per-group parameter that broadcasts against the grouped view."""
    return (grouped.shape[0], 1, grouped.shape[2])


def _param_shape(weight_shape: torch.Size, group_size: int | None, axis: int) -> tuple[int, int]:
    """Public shape of scale / zero (see ``HQQResult``)."""
    out_features, in_features = weight_shape
    if axis == 1:
        return (out_features, 1 if group_size is None else in_features // group_size)
    return (1 if group_size is None else out_features // group_size, in_features)


def _min_max_init(grouped: torch.Tensor, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and real-valued zero per group, shape ``(A, 1, B)``.

    A group whose range is below float32 resolution of its values is treated as
    constant: with ``scale = max|w|`` every entry maps to code 0 and dequantizes to
    the group minimum, instead of dividing by a (sub)normal-tiny range.
    """
    group_min = grouped.amin(dim=_GROUP_DIM, keepdim=True)
    group_max = grouped.amax(dim=_GROUP_DIM, keepdim=True)
    value_range = group_max - group_min
    magnitude = torch.maximum(group_min.abs(), group_max.abs())
    is_constant = value_range <= torch.finfo(torch.float32).eps * magnitude
    constant_scale = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    scale = torch.where(is_constant, constant_scale, value_range / max_code)
    zero = -group_min / scale
    return scale, zero


def _result(
    scaled_weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight_shape: torch.Size,
    bits: int,
    group_size: int | None,
    axis: int,
) -> HQQResult:
    """Round ``W/scale + zero`` to codes and pack everything into an ``HQQResult``."""
    max_code = 2**bits - 1
    codes = (scaled_weight + zero).round_().clamp_(0, max_code).to(torch.uint8)
    param_shape = _param_shape(weight_shape, group_size, axis)
    return HQQResult(
        codes=codes.reshape(weight_shape),
        scale=scale.reshape(param_shape),
        zero=zero.reshape(param_shape),
        bits=int(bits),  # plain ints even when given numpy / torch integers
        group_size=None if group_size is None else int(group_size),
        axis=int(axis),
    )


def _prox_kept_sum(
    residual: torch.Tensor,
    abs_residual: torch.Tensor,
    scratch: torch.Tensor,
    log_shrink_coef: torch.Tensor,
    lp_norm: float,
) -> torch.Tensor:
    """Per-group sum of ``y − W_e/scale``, the part of the residual the l_p prox keeps.

    In the scaled domain the prox leaves ``W_e/scale = y − sign(y)·min(|y|, c·|y|^(p−1))``,
    so the closed-form zero update ``mean(codes − W/scale + W_e/scale)`` is
    ``zero − mean(sign(y)·min(|y|, c·|y|^(p−1)))``. All tensors are grouped
    ``(A, group_size, B)``; ``log_shrink_coef`` (log c) is ``(A, 1, B)``. Clobbers
    ``abs_residual`` and ``scratch``.
    """
    # min(|y|, c·|y|^(p−1)) = |y| wherever |y| <= c^(1/(2−p)). For weights at LLM scale
    # that threshold is many quantization steps, so the prox is the identity and the
    # update is just the mean residual: skip the transcendental work.
    log_threshold = log_shrink_coef / (2.0 - lp_norm)
    largest = abs_residual.amax(dim=_GROUP_DIM, keepdim=True)
    if not bool((largest.log_() > log_threshold).any()):
        return residual.sum(dim=_GROUP_DIM, keepdim=True)

    if lp_norm == 1.0:
        # c·|y|^0 = c; the log form below would hit 0·log(0) = NaN.
        torch.minimum(abs_residual, log_shrink_coef.exp(), out=scratch)
    else:
        # c·|y|^(p−1) = exp(log c + (p−1)·log|y|); log|y| = −inf at y = 0 gives +inf, and
        # the minimum then picks |y| = 0, as it should.
        torch.log(abs_residual, out=scratch)
        torch.add(log_shrink_coef, scratch, alpha=lp_norm - 1.0, out=scratch)
        scratch.exp_()
        torch.minimum(scratch, abs_residual, out=scratch)
    scratch.copysign_(residual)
    return scratch.sum(dim=_GROUP_DIM, keepdim=True)


# --------------------------------------------------------------------------- quantizers


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, axis: int = 1) -> HQQResult:
    """Min-max asymmetric round-to-nearest: the baseline and HQQ's starting point.

    Args:
        weight: ``(out_features, in_features)``, any float dtype, any device.
        bits: 1..8.
        group_size: entries per group along ``axis`` (must divide that dimension), or
            None for one group per channel.
        axis: 1 = groups along the input dimension, 0 = along the output dimension.

    Returns:
        An ``HQQResult`` on ``weight.device`` with float32 scale and zero.
    """
    _validate(weight, bits, group_size, axis)
    weight = weight.detach().to(torch.float32)
    grouped = _grouped_view(weight, group_size, axis)
    scale, zero = _min_max_init(grouped, 2**bits - 1)
    return _result(grouped / scale, scale, zero, weight.shape, bits, group_size, axis)


@torch.no_grad()
def hqq_quantize(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 64,
    axis: int = 1,
    *,
    lp_norm: float = HQQSettings.lp_norm,
    beta: float = HQQSettings.beta,
    kappa: float = HQQSettings.kappa,
    iters: int = HQQSettings.iters,
    early_stop: bool = True,
) -> HQQResult:
    """Half-quadratic quantization: min-max init, then refine the zero point per group.

    Each iteration re-quantizes with the current zero, measures the mean absolute
    error, splits off the sparse error ``W_e = shrink_p(W − Ŵ, β)`` and sets the zero
    to its closed-form optimum (a group mean), then ``β ← κ·β``. The iterate with the
    lowest global mean absolute error is kept, except in groups whose own
    lowest-mean-|error| iterate is no worse in MSE (see the module notes).

    Args:
        weight: ``(out_features, in_features)``, any float dtype, any device; the
            solver runs in float32 on that device.
        bits: 1..8.
        group_size: entries per group along ``axis`` (must divide that dimension), or
            None for one group per channel.
        axis: 1 = groups along the input dimension, 0 = along the output dimension.
        lp_norm: the ``p`` of the ``‖W − Ŵ‖_p^p`` objective, in (0, 1].
        beta: initial half-quadratic penalty; larger = smaller sparse error.
        kappa: growth factor of ``beta`` per iteration, >= 1.
        iters: number of zero-point updates (``iters + 1`` iterates are evaluated).
        early_stop: stop as soon as an iterate's global mean absolute error does
            not fall below the best so far.

    Returns:
        An ``HQQResult`` on ``weight.device`` with float32 scale and zero.
    """
    _validate(weight, bits, group_size, axis)
    if not 0.0 < lp_norm <= 1.0:
        raise ValueError(f"lp_norm={lp_norm!r} must be in (0, 1]")
    if not beta > 0.0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if not kappa >= 1.0:
        raise ValueError(f"kappa={kappa!r} must be >= 1")
    if isinstance(iters, bool) or not isinstance(iters, Integral) or iters < 0:
        raise ValueError(f"iters={iters!r} must be a non-negative integer")

    weight = weight.detach().to(torch.float32)
    grouped = _grouped_view(weight, group_size, axis)
    max_code = 2**bits - 1
    scale, zero = _min_max_init(grouped, max_code)
    scaled_weight = grouped / scale
    group_entries = grouped.shape[_GROUP_DIM]

    # Prox threshold coefficient per group in the scaled domain, c = scale^(p−2)/β, kept
    # as a log (β ← κβ is then a subtraction) so the prox can run on log/exp, which
    # are vectorized on CPU where a float-exponent pow is not (about 5x slower).
    log_shrink_coef = scale.log().mul_(lp_norm - 2.0).sub_(math.log(beta))
    log_kappa = math.log(kappa)

    # Three full-size work buffers, reused every iteration (no allocation in the loop).
    residual = torch.empty_like(scaled_weight)  # y = W/scale + zero − codes = (W − Ŵ)/scale
    abs_residual = torch.empty_like(scaled_weight)
    scratch = torch.empty_like(scaled_weight)

    # Two candidates are tracked. The *global* best iterate (lowest mean |W − Ŵ| over
    # the whole weight) is what HQQ returns. Groups are independent, though, so each
    # group may instead take its own lowest-mean-|error| iterate; it does so only
    # where that iterate's squared error is not higher either, so the result is never
    # worse than the global best iterate in either metric, group by group.
    group_best_zero = zero
    group_best_abs = torch.full_like(zero, math.inf)
    group_best_sq = torch.full_like(zero, math.inf)
    global_best_zero = zero
    global_best_sq = torch.full_like(zero, math.inf)
    global_best_error = math.inf

    for iteration in range(iters + 1):
        torch.add(scaled_weight, zero, out=residual)
        torch.round(residual, out=scratch).clamp_(0, max_code)
        residual.sub_(scratch)

        # Per-group errors in the scaled domain: comparisons within a group do not
        # need the (constant) scale, only the global error does.
        torch.abs(residual, out=abs_residual)
        group_abs = abs_residual.sum(dim=_GROUP_DIM, keepdim=True)
        group_sq = torch.linalg.vector_norm(residual, dim=_GROUP_DIM, keepdim=True).square_()
        improved = group_abs < group_best_abs
        group_best_abs = torch.where(improved, group_abs, group_best_abs)
        group_best_sq = torch.where(improved, group_sq, group_best_sq)
        group_best_zero = torch.where(improved, zero, group_best_zero)

        global_error = float(torch.linalg.vecdot(group_abs.flatten(), scale.flatten()))
        if global_error < global_best_error:
            global_best_error = global_error
            global_best_zero, global_best_sq = zero, group_sq
        elif early_stop:
            break
        if iteration == iters:
            break

        kept_sum = _prox_kept_sum(residual, abs_residual, scratch, log_shrink_coef, lp_norm)
        zero = zero - kept_sum.div_(group_entries)
        log_shrink_coef.sub_(log_kappa)

    best_zero = torch.where(group_best_sq <= global_best_sq, group_best_zero, global_best_zero)
    return _result(scaled_weight, scale, best_zero, weight.shape, bits, group_size, axis)
