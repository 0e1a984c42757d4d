"""Fake quantizers with a straight-through estimator.

One grid convention for weights, activations and the KV cache:
``codes = clamp(round(x / scale + zero), 0, 2**bits - 1)`` and
``x̂ = (codes - zero) · scale``. ``zero`` is real-valued (as in HQQ), so the
min and max of a range land exactly on the grid. Symmetric quantization is the
special case ``zero = 2**(bits-1)`` with ``scale = absmax / (2**(bits-1) - 1)``.

Rounding passes gradients straight through; clamping does not, so gradients
reach ``scale``/``zero`` and, through them, the clip ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .hqq import HQQSettings, hqq_quantize

# Keeps a range of all-equal values from producing a zero scale (0/0 below).
SCALE_EPS = 1e-8
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = tuple(range(2, 17))
OFF_BITS = 16  # 16 bits means "not quantized" for both quantizer kinds.

WeightInit = Literal["minmax", "search", "hqq"]
WEIGHT_INITS: tuple[str, ...] = ("minmax", "search", "hqq")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x/scale + zero), 0, 2^bits-1)`` as uint8 (bits ≤ 8)."""
    codes = torch.clamp(torch.round(x / scale + zero), 0, 2**bits - 1)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) · scale`` in ``scale``'s dtype."""
    return (codes.to(scale.dtype) - zero) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through round; ``scale``/``zero`` broadcast to ``x``."""
    codes = torch.clamp(round_ste(x / scale + zero), 0, 2**bits - 1)
    return (codes - zero) * scale


def range_to_scale_zero(low: torch.Tensor, high: torch.Tensor, bits: int,
                        symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``(scale, zero)`` covering ``[low, high]`` (``low ≤ 0 ≤ high`` not required).

    Symmetric grids cover ``[-max(|low|,|high|), +…]`` with a fixed zero of ``2^(bits-1)``.
    """
    if symmetric:
        half_levels = 2 ** (bits - 1) - 1
        absmax = torch.maximum(low.abs(), high.abs())
        scale = torch.clamp(absmax / half_levels, min=SCALE_EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    scale = torch.clamp((high - low) / (2**bits - 1), min=SCALE_EPS)
    return scale, -low / scale


def _check_bits(bits: int, allowed: tuple[int, ...], name: str) -> None:
    if bits not in allowed and bits != OFF_BITS:
        raise ValueError(f"{name}={bits} is not supported; use one of {allowed} or {OFF_BITS} (off)")


def _ratio_logit(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"clip_ratio_init={ratio} must be in (0, 1) when clipping is learnable")
    return math.log(ratio / (1.0 - ratio))


@dataclass
class ClipSearch:
    """The ``search`` weight init: per group, the clip ratio on a grid that minimizes ``Σ|W − Q(W)|^p``.

    Args:
        grid_points: ratios tried, evenly spaced in ``[min_ratio, 1]`` (>= 1).
        min_ratio: the smallest ratio tried, in (0, 1].
        error_norm: the ``p`` of the error (> 0; 2.4 is the norm AWQ/GPTQ clip searches use).
    """

    grid_points: int = 20
    min_ratio: float = 0.5
    error_norm: float = 2.4

    def validate(self, prefix: str = "search") -> None:
        """One-line errors naming ``prefix.field``."""
        if self.grid_points < 1:
            raise ValueError(f"{prefix}.grid_points={self.grid_points} must be >= 1")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"{prefix}.min_ratio={self.min_ratio} must be in (0, 1]")
        if not self.error_norm > 0.0:
            raise ValueError(f"{prefix}.error_norm={self.error_norm} must be > 0")


class ActivationQuantizer(nn.Module):
    """Dynamic per-token quantizer over the last dimension (or groups of it).

    Args:
        bits: 2..16; 16 turns it off (identity).
        symmetric: symmetric grid; asymmetric (default) suits post-norm activations.
        group_size: ``None`` = one range per token over the whole last dim;
            otherwise ranges per ``group_size`` consecutive channels (the KV
            cache uses ``head_dim``, i.e. per token per head).
        learnable_clip: learn scalar clip ratios ``sigmoid(logit)`` for the
            range's max (and min), as FlatQuant's LAC.
        clip_ratio_init: initial clip ratio in (0, 1), only with ``learnable_clip``.
    """

    def __init__(self, bits: int = 16, symmetric: bool = False, group_size: int | None = None,
                 learnable_clip: bool = False, clip_ratio_init: float = 0.98) -> None:
        super().__init__()
        _check_bits(bits, ACTIVATION_BITS, "activation bits")
        if group_size is not None and group_size < 1:
            raise ValueError(f"activation group_size={group_size} must be positive")
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size
        self.learnable_clip = learnable_clip and self.enabled
        self.bypass = False  # set by quantization_disabled(); not a setting
        if self.learnable_clip:
            logit = _ratio_logit(clip_ratio_init)
            self.clip_logit_max = nn.Parameter(torch.tensor(logit))
            self.clip_logit_min = nn.Parameter(torch.tensor(logit))

    @property
    def enabled(self) -> bool:
        return self.bits < OFF_BITS

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, group_size={self.group_size}, "
                f"learnable_clip={self.learnable_clip}")

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return x.unsqueeze(-2)
        if x.shape[-1] % self.group_size:
            raise ValueError(f"activation group_size={self.group_size} does not divide "
                             f"the last dimension {x.shape[-1]}")
        return x.unflatten(-1, (-1, self.group_size))

    def scale_zero(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (per-group) ``(scale, zero)`` of shape ``(..., groups, 1)``."""
        grouped = self._grouped(x)
        high = grouped.amax(-1, keepdim=True)
        low = grouped.amin(-1, keepdim=True)
        if self.learnable_clip:
            high = high * torch.sigmoid(self.clip_logit_max)
            low = low * torch.sigmoid(self.clip_logit_min)
        return range_to_scale_zero(low, high, self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bypass:
            return x
        scale, zero = self.scale_zero(x)
        out = fake_quantize(self._grouped(x), scale, zero, self.bits)
        return out.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer form of ``forward(x)`` for ``x`` ``(..., dim)``: ``codes`` uint8 ``(..., groups, g)``
        (``groups = 1``, ``g = dim`` without ``group_size``), ``scale`` and ``zero`` ``(..., groups, 1)``
        in ``x``'s dtype, with ``dequantize_codes(codes, scale, zero)`` equal to ``forward(x)`` bit for
        bit: the same ranges and the same arithmetic, one rounding pass in place."""
        if not self.enabled:
            raise ValueError("an activation quantizer that is off has no integer form")
        scale, zero = self.scale_zero(x)
        # x / scale + zero, rounded and clamped: fake_quantize's forward values (its straight-through
        # round adds (round(t) - t) to t, which gives round(t) exactly), without its temporaries.
        codes = torch.div(self._grouped(x), scale).add_(zero).round_().clamp_(0, 2**self.bits - 1)
        return codes.to(torch.uint8), scale, zero


class WeightQuantizer(nn.Module):
    """Quantizer of a ``(out_features, in_features)`` weight.

    Groups run along the input dimension: ``group_size=None`` gives one range
    per output channel, otherwise ``in_features // group_size`` ranges per row.
    The learnable part is a clip ratio ``sigmoid(logit)`` per group on the max
    (and, asymmetric, on the min) of the current weight (OmniQuant's LWC), so
    the grid follows a weight that changes while rotations train.

    Args:
        bits: 2..8, or 16 for off.
        symmetric: symmetric (default, as W4A4 recipes) or asymmetric grid.
        learnable_clip: make the clip logits trainable parameters.
    """

    def __init__(self, out_features: int, in_features: int, bits: int = 4, symmetric: bool = True,
                 group_size: int | None = None, learnable_clip: bool = True) -> None:
        super().__init__()
        _check_bits(bits, WEIGHT_BITS, "weight bits")
        if group_size is not None and (group_size < 1 or in_features % group_size):
            raise ValueError(f"weight group_size={group_size} does not divide in_features={in_features}")
        self.out_features = out_features
        self.in_features = in_features
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size
        groups = 1 if group_size is None else in_features // group_size
        no_clip = _ratios_to_logits(torch.ones(out_features, groups, 1))
        self.clip_logit_max = nn.Parameter(no_clip.clone(), requires_grad=learnable_clip)
        self.clip_logit_min = nn.Parameter(no_clip.clone(), requires_grad=learnable_clip and not symmetric)
        self.bypass = False  # set by quantization_disabled(); not a setting

    @property
    def enabled(self) -> bool:
        return self.bits < OFF_BITS

    @property
    def num_groups(self) -> int:
        return self.clip_logit_max.shape[1]

    def extra_repr(self) -> str:
        return (f"{self.out_features}x{self.in_features}, bits={self.bits}, symmetric={self.symmetric}, "
                f"group_size={self.group_size}")

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_features, self.num_groups, -1)

    def _ranges(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = self._grouped(weight)
        return grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)

    def scale_zero(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` of shape ``(out, groups, 1)`` for the current weight."""
        low, high = self._ranges(weight)
        high = high * torch.sigmoid(self.clip_logit_max)
        low = low * torch.sigmoid(self.clip_logit_min)
        return range_to_scale_zero(low, high, self.bits, self.symmetric)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, same shape and dtype as ``weight``."""
        if not self.enabled or self.bypass:
            return weight
        scale, zero = self.scale_zero(weight)
        return fake_quantize(self._grouped(weight), scale, zero, self.bits).reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer form: ``codes`` uint8 ``(out, in)``, ``scale`` and ``zero`` ``(out, groups)``.

        ``dequantize_codes`` of these equals ``forward(weight)`` exactly.
        """
        scale, zero = self.scale_zero(weight)
        codes = quantize_codes(self._grouped(weight), scale, zero, self.bits)
        return codes.reshape(weight.shape), scale.squeeze(-1), zero.squeeze(-1)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, method: WeightInit = "minmax", search: ClipSearch | None = None,
                   hqq: HQQSettings | None = None) -> None:
        """Set the clip ratios for ``weight``.

        ``minmax``: no clipping. ``search``: per group, the ratio on the
        ``search`` grid (``ClipSearch``) minimizing ``Σ|W - Q(W)|^error_norm``.
        ``hqq``: solve HQQ (``hqq`` settings) on the weight and take the clip
        ratios that reproduce its range (asymmetric: both ends; symmetric: the larger end).
        """
        search = search or ClipSearch()
        hqq = hqq or HQQSettings()
        if method not in WEIGHT_INITS:
            raise ValueError(f"weight init={method!r} is not one of {WEIGHT_INITS}")
        if not self.enabled:
            return
        weight = weight.float()
        low, high = self._ranges(weight)
        ratio_high = torch.ones_like(high)
        ratio_low = torch.ones_like(low)
        if method == "search":
            best_error = torch.full_like(high, float("inf"))
            grouped = self._grouped(weight)
            levels = 2**self.bits - 1
            for ratio in torch.linspace(1.0, search.min_ratio, search.grid_points).tolist():
                scale, zero = range_to_scale_zero(low * ratio, high * ratio, self.bits, self.symmetric)
                # fake_quantize's forward, in place in one buffer (its straight-through round gives the same
                # values): this loop is a block's whole clip search, so each pass it saves counts.
                error = torch.div(grouped, scale).add_(zero).round_().clamp_(0, levels).sub_(zero).mul_(scale)
                # |e|^p as exp(p·log|e|): twice as fast as pow_ on the CPU for a non-integer p (0 stays 0).
                error = error.sub_(grouped).abs_().log_().mul_(search.error_norm).exp_().sum(-1, keepdim=True)
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                ratio_high = torch.where(better, torch.full_like(high, ratio), ratio_high)
            ratio_low = ratio_high.clone()
        elif method == "hqq":
            solved = hqq_quantize(weight, bits=self.bits, group_size=self.group_size or self.in_features, axis=1,
                                  **asdict(hqq))
            scale = solved.scale.reshape_as(high)
            zero = solved.zero.reshape_as(high)
            grid_low, grid_high = -zero * scale, (2**self.bits - 1 - zero) * scale
            if self.symmetric:
                absmax = torch.maximum(low.abs(), high.abs())
                ratio_high = torch.maximum(grid_low.abs(), grid_high.abs()) / absmax.clamp_min(SCALE_EPS)
                ratio_low = ratio_high.clone()
            else:
                ratio_high = grid_high / high.where(high.abs() > SCALE_EPS, torch.ones_like(high))
                ratio_low = grid_low / low.where(low.abs() > SCALE_EPS, torch.ones_like(low))
        self.clip_logit_max.copy_(_ratios_to_logits(ratio_high))
        self.clip_logit_min.copy_(_ratios_to_logits(ratio_low))


@contextmanager
def flag_set(modules: list[nn.Module], attribute: str) -> Iterator[None]:
    """Temporarily set the boolean ``attribute`` of every one of ``modules`` to True, then restore each."""
    previous = [getattr(m, attribute) for m in modules]
    for m in modules:
        setattr(m, attribute, True)
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            setattr(m, attribute, state)


def quantization_disabled(module: nn.Module) -> AbstractContextManager[None]:
    """Temporarily turn every quantizer under ``module`` into the identity (full precision)."""
    return flag_set([m for m in module.modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))], "bypass")


def _ratios_to_logits(ratio: torch.Tensor) -> torch.Tensor:
    # sigmoid cannot reach 1; ratios ≥ the cap mean "unclipped" and map to a large logit.
    capped = ratio.clamp(1e-3, 1.0 - 1e-5)
    return torch.log(capped / (1.0 - capped))
