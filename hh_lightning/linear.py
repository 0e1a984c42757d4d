"""Linear layers with an input rotation and fake quantization, and their folded form.

A linear ``y = x Wᵀ + b`` becomes ``y = Q_a(x̃) Q_w(W̃)ᵀ + b`` with
``x̃ = (x / c) R`` and ``W̃ = (W · diag(c)) R``: ``c`` optional per-channel
smoothing scales, ``R`` a Householder rotation. With both quantizers off it
computes exactly the original linear. Sibling linears that read the same input
(q/k/v, gate/up) share one ``InputTransform`` so the input is rotated and
quantized once.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import gptq_codes
from .quantizers import ActivationQuantizer, WeightQuantizer, dequantize_codes, flag_set
from .rotation import Rotation


class InputTransform(nn.Module):
    """``x ↦ Q_a((x / c) R)`` on the last dimension, shared by sibling linears.

    Args:
        dim: input features ``d``.
        rotation: the online rotation ``R`` (``None``: none).
        act_quantizer: the activation quantizer (``None``: off).
        smoothing: learn per-channel scales ``c = exp(log_smoothing)`` (init 1).
    """

    def __init__(self, dim: int, rotation: Rotation | None = None,
                 act_quantizer: ActivationQuantizer | None = None, smoothing: bool = False) -> None:
        super().__init__()
        if rotation is not None and rotation.dim != dim:
            raise ValueError(f"rotation dim={rotation.dim} != input dim={dim}")
        self.dim = dim
        self.rotation = rotation
        self.act_quantizer = act_quantizer if act_quantizer is not None else ActivationQuantizer(bits=16)
        self.log_smoothing = nn.Parameter(torch.zeros(dim)) if smoothing else None
        self.rotation_bypass = False  # set by rotations_disabled(); not a setting

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x / c) R`` before quantization, ``x``: ``(..., dim)``."""
        if self.rotation_bypass:
            return x
        if self.log_smoothing is not None:
            x = x * torch.exp(-self.log_smoothing).to(x.dtype)
        if self.rotation is not None:
            x = self.rotation.rotate(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quantizer(self.transform_input(x))

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``(W · diag(c)) R`` for a weight ``(out, dim)`` that reads this input."""
        if self.rotation_bypass:
            return weight
        if self.log_smoothing is not None:
            weight = weight * torch.exp(self.log_smoothing).to(weight.dtype)
        if self.rotation is not None:
            weight = self.rotation.rotate_weight(weight)
        return weight


def rotations_disabled(module: nn.Module) -> AbstractContextManager[None]:
    """Temporarily skip every rotation and smoothing under ``module`` (``rotation_bypass``).

    Each skipped input rotation is skipped in its weights too, so what is computed is the
    full-precision function itself, with no rounding from ``(x R)(W R)ᵀ``: the result does not
    depend on the rotations' values, bit for bit.
    """
    return flag_set([m for m in module.modules() if hasattr(m, "rotation_bypass")], "rotation_bypass")


def rotate_blocks(x: torch.Tensor, rotation: Rotation, transpose: bool = False) -> torch.Tensor:
    """Apply one ``rotation`` of size ``b`` to every consecutive ``b``-block of the last dim.

    ``x``: ``(..., n·b)``; each block ``x_j`` becomes ``x_j R`` (or ``x_j Rᵀ``),
    i.e. ``x ↦ x · blockdiag(R, …, R)``. Used for head-dim rotations.
    """
    blocks = x.unflatten(-1, (-1, rotation.dim))
    out = rotation.rotate_transposed(blocks) if transpose else rotation.rotate(blocks)
    return out.flatten(-2)


class HHLinear(nn.Module):
    """A frozen ``nn.Linear`` seen through an ``InputTransform`` and a weight quantizer.

    Only the transform's and the quantizers' parameters train; ``weight`` and
    ``bias`` are frozen copies of the original layer's.

    Two optional weight-only head-dim rotations fold a rotation exactly into a
    pair of layers (``R_o`` between ``v_proj`` and ``o_proj``):

    * ``output_rotation``: outputs become ``y · blockdiag(R)``, i.e.
      ``W ↦ blockdiag(Rᵀ) W`` and ``b ↦ b · blockdiag(R)`` (``v_proj``).
    * ``prerotated_input``: the input arrives already multiplied by
      ``blockdiag(R)``, so ``W ↦ W · blockdiag(R)`` undoes it (``o_proj``);
      nothing is applied to the input online.
    """

    def __init__(self, linear: nn.Linear, transform: InputTransform,
                 weight_quantizer: WeightQuantizer | None = None,
                 output_rotation: Rotation | None = None,
                 prerotated_input: Rotation | None = None) -> None:
        super().__init__()
        self.output_rotation = output_rotation
        self.prerotated_input = prerotated_input
        if transform.dim != linear.in_features:
            raise ValueError(f"transform dim={transform.dim} != in_features={linear.in_features}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # float32 copies whatever the model's dtype: rotations and clip searches need the precision.
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
                     if linear.bias is not None else None)
        self.transform = transform
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else WeightQuantizer(
            linear.out_features, linear.in_features, bits=16)
        self.rotation_bypass = False  # set by rotations_disabled(); not a setting

    def transformed_weight(self) -> torch.Tensor:
        """``W̃ = (W · diag(c)) R`` (and the head-dim rotations) in full precision, ``(out, in)``."""
        if self.rotation_bypass:
            return self.weight
        weight = self.transform.transform_weight(self.weight)
        if self.prerotated_input is not None:
            weight = rotate_blocks(weight, self.prerotated_input)
        if self.output_rotation is not None:
            weight = rotate_blocks(weight.T, self.output_rotation).T
        return weight

    def transformed_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.output_rotation is None or self.rotation_bypass:
            return self.bias
        return rotate_blocks(self.bias, self.output_rotation)

    def forward_transformed(self, x_transformed: torch.Tensor) -> torch.Tensor:
        """The output for an input already passed through the shared transform."""
        weight = self.weight_quantizer(self.transformed_weight())
        bias = self.transformed_bias()
        return F.linear(x_transformed, weight.to(x_transformed.dtype),
                        None if bias is None else bias.to(x_transformed.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_transformed(self.transform(x))

    @torch.no_grad()
    def transformed_hessian(self, covariance: torch.Tensor) -> torch.Tensor:
        """``X̃ᵀX̃`` of the inputs ``W̃`` multiplies, from ``XᵀX`` (``covariance``, ``(in, in)``) of the
        layer's unrotated inputs ``x``: ``x̃ = transform_input(x · blockdiag(R_o))``, where a
        ``prerotated_input`` ``R_o`` applies (the symmetric ``C`` is mapped on both sides)."""
        def both_sides(matrix: torch.Tensor, apply) -> torch.Tensor:
            return apply(apply(matrix).T.contiguous())

        covariance = covariance.to(device=self.weight.device, dtype=torch.float32)
        if self.prerotated_input is not None:
            covariance = both_sides(covariance, lambda m: rotate_blocks(m, self.prerotated_input))
        return both_sides(covariance, self.transform.transform_input)

    @torch.no_grad()
    def fold(self, hessian: torch.Tensor | None = None, damp: float = 0.01,
             codes: torch.Tensor | None = None, transformed_weight: torch.Tensor | None = None,
             act_order: bool = False) -> "FoldedLinear":
        """The deployable form: ``W̃`` quantized once to codes, the transform kept online.

        ``hessian``: ``X̃ᵀX̃`` of the transformed inputs (``transformed_hessian``); given, the
        codes are GPTQ-rounded on the same grid (``gptq.gptq_codes`` with ``damp`` and ``act_order``), else rounded
        to nearest. ``codes``: uint8 ``(out, in)`` already chosen on this grid (``HHDecoderBlock``
        GPTQ-rounds the linears that share an input together); they replace the rounding.
        ``transformed_weight``: ``W̃`` (``transformed_weight()``) where the caller computed it already.
        """
        weight = (self.transformed_weight() if transformed_weight is None else transformed_weight).float()
        bias = self.transformed_bias()
        bias = None if bias is None else bias.detach().clone()
        if not self.weight_quantizer.enabled:
            return FoldedLinear(self.transform, bias=bias, weight=weight)
        nearest, scale, zero = self.weight_quantizer.quantize(weight)
        if codes is None:
            codes = nearest if hessian is None else gptq_codes(weight, hessian, scale, zero,
                                                               self.weight_quantizer.bits, damp=damp,
                                                               act_order=act_order)
        elif codes.shape != nearest.shape:
            raise ValueError(f"codes shape {tuple(codes.shape)} != weight shape {tuple(nearest.shape)}")
        return FoldedLinear(self.transform, bias=bias, codes=codes, scale=scale, zero=zero,
                            bits=self.weight_quantizer.bits)

    def fold_placeholder(self) -> "FoldedLinear":
        """A ``FoldedLinear`` of the shapes ``fold()`` gives, all zeros, for loaders that fill in
        saved codes: nothing is computed, and the buffers are zeros on the weight's device
        (on the meta device for a model built there, so a loader allocates only what the file holds)."""
        like = dict(device=self.weight.device)
        bias = None if self.bias is None else torch.zeros(self.out_features, **like)
        if not self.weight_quantizer.enabled:
            return FoldedLinear(self.transform, bias=bias, weight=torch.zeros(self.out_features, self.in_features,
                                                                              **like))
        grid = (self.out_features, self.weight_quantizer.num_groups)
        return FoldedLinear(self.transform, bias=bias,
                            codes=torch.zeros(self.out_features, self.in_features, dtype=torch.uint8, **like),
                            scale=torch.zeros(grid, **like), zero=torch.zeros(grid, **like),
                            bits=self.weight_quantizer.bits)


class FoldedLinear(nn.Module):
    """Deployable linear: integer codes with per-group scale and zero (or a float weight).

    ``codes``: uint8 ``(out, in)``; ``scale``/``zero``: ``(out, groups)``,
    groups running along the input dimension. ``dequantized_weight()`` is
    ``(codes - zero) · scale``.
    """

    def __init__(self, transform: InputTransform, bias: torch.Tensor | None = None, *,
                 weight: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 bits: int = 16) -> None:
        super().__init__()
        if (weight is None) == (codes is None):
            raise ValueError("FoldedLinear takes either a float weight or integer codes")
        self.transform = transform
        self.bits = bits
        self.register_buffer("bias", bias)
        self.register_buffer("weight", weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        reference = weight if weight is not None else codes
        self.out_features, self.in_features = reference.shape

    @property
    def group_size(self) -> int | None:
        if self.codes is None or self.scale.shape[1] == 1:
            return None
        return self.in_features // self.scale.shape[1]

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        groups = self.scale.shape[1]
        grouped = self.codes.reshape(self.out_features, groups, -1)
        weight = dequantize_codes(grouped, self.scale.unsqueeze(-1), self.zero.unsqueeze(-1))
        return weight.reshape(self.out_features, self.in_features)

    def forward_transformed(self, x_transformed: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x_transformed.dtype)
        return F.linear(x_transformed, self.dequantized_weight().to(x_transformed.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_transformed(self.transform(x))
