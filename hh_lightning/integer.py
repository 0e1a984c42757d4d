"""Integer execution of a folded model: activation codes times weight codes on integer units.

Fake quantization rounds each linear's input to per-token codes and then multiplies floats, so a
W4A4 model served that way pays W4A4's rounding and gets none of its speed. Here the codes
themselves are multiplied, int8 by int8 into int32, and the grids' scales and zeros are applied
to the integer product afterwards.

The algebra. A token's activation grid is ``x̂ = s_x (q_x − z_x)`` (one ``s_x``, ``z_x`` per row,
``ActivationQuantizer`` without ``group_size``); a weight's is ``ŵ = s_w (q_w − z_w)`` per output
channel ``n`` and group ``g`` of ``K_g`` input channels. Both codes are shifted by their grid's
midpoint ``m = 2^(b−1)`` into int8 (``x' = q_x − m_x``, ``w' = q_w − m_w``) and so are the zeros
(``z'_x = z_x − m_x``, ``z'_w = z_w − m_w``), which keeps the correction terms small. Then::

    y[t, n] = s_x[t] · Σ_g s_w[n, g] · (A_g[t, n] − z'_x[t] W_g[n] − z'_w[n, g] X_g[t] + K_g z'_x[t] z'_w[n, g]) + b[n]

with ``A_g = x'_g w'_gᵀ`` the integer product, ``W_g[n] = Σ_k w'[n, k]`` (constant: precomputed)
and ``X_g[t] = Σ_k x'[t, k]`` (one sum per token, needed only for an asymmetric weight grid). A
symmetric weight grid has ``z'_w = 0``, and the last two terms vanish. ``A_g`` is exact in int32
for these ranges (``K · 128 · 128 < 2^31`` up to ``K = 131072``), so the integer linear equals the
fake-quant linear up to the float rounding of this final scaling: the fake-quant model is its
exact test oracle.

Two GEMM backends compute ``A_g``:

* ``onednn`` (the CPU default): ``torch.ops.onednn.qlinear_pointwise`` on a weight packed once
  (``qlinear_prepack``) for the CPU's int8 units (VNNI/AMX), the activation codes as uint8 with
  zero point ``m_x``. It returns ``s_w ⊙ A_g`` in float32. The packed weight is the only copy
  of the codes a linear keeps (``codes()`` reads them back).
* ``int_mm``: ``torch._int_mm`` (on CUDA the int8 tensor cores; on the CPU a slower oneDNN path,
  used by tests and where ``onednn`` is absent). Its shape rules (more than 16 rows; inner and
  output sizes multiples of 8) are met by zero padding, which adds nothing to ``A_g``.

``IntegerLinear`` serves the linears that read one input together (q/k/v, gate/up: one GEMM on
their stacked rows, one set of activation codes); ``use_integer_kernels_`` installs it in every
folded block. A linear whose grid the path cannot take (weights over 8 bits, unquantized
activations, per-group activation ranges) keeps its current form, with a warning naming it.

Inputs of at most ``IntegerKernelConfig.int4_rows_max`` rows (a decoding step) instead go through
the int4 weight-only kernel (``kernels.Int4Linear``) on the fake-quantized rows, where that kernel
is faster for the shape; that keeps a second, int4 layout of the weights, counted in
``IntegerLinear.weight_bytes`` and in the served model's memory (``benchmarks/deploy_integer.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block import LINEAR_INPUTS, named_blocks
from .kernels import Int4Linear, Int4LayoutError, int4_layout
from .linear import FoldedLinear, InputTransform
from .quantizers import dequantize_codes
from .rotation import as_dtype

__all__ = ["BACKENDS", "ActivationCodes", "IntegerInputTransform", "IntegerKernelConfig", "IntegerLinear",
           "IntegerReport", "integer_refusal", "use_integer_kernels_"]

BACKENDS = ("auto", "onednn", "int_mm")
MAX_CODE_BITS = 8
# torch._int_mm's CUDA shape rules: more than this many rows, inner and output sizes multiples of INT_MM_MULTIPLE.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8


@dataclass
class IntegerKernelConfig:
    """How a folded model runs its integer linears.

    Args:
        backend: the int8 GEMM: ``auto`` (``onednn`` on the CPU where it is built in, else
            ``int_mm``), ``onednn`` or ``int_mm`` (see the module docstring).
        int4_rows_max: products of at most this many rows (a decoding step's batch) go through
            the int4 weight-only kernel on the dequantized activation codes instead, which holds
            a second, int4 layout of the weights (half a byte a weight more); 0 keeps every row on
            the integer path and one layout. On a 2-core AVX-512/AMX CPU the int4 kernel is
            10-30% faster than the integer GEMM at one row and slower from two rows on (SmolLM2 and
            Qwen2.5-0.5B shapes), and batch-1 decoding of the SmolLM2 demo export runs about a
            third faster with 1 than with 0 (``benchmarks/deploy_integer.py``, forms
            ``w4a4_integer_bf16_int8head`` and ``..._one_layout``): hence 1.
    """

    backend: str = "auto"
    int4_rows_max: int = 1

    def validate(self) -> None:
        """One-line errors naming the field."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if not isinstance(self.int4_rows_max, int) or isinstance(self.int4_rows_max, bool) or self.int4_rows_max < 0:
            raise ValueError(f"int4_rows_max={self.int4_rows_max!r} must be an integer >= 0")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The GEMM backend ``backend`` means on ``device`` (``auto`` resolved; ``onednn`` is CPU-only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "onednn" if device.type == "cpu" and _onednn_available() else "int_mm"
    if backend == "onednn" and (device.type != "cpu" or not _onednn_available()):
        raise ValueError(f"backend='onednn' needs a CPU torch built with oneDNN, not {device.type}")
    return backend


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class ActivationCodes:
    """One input's per-token codes, as ``IntegerInputTransform`` makes them.

    Args:
        codes: uint8 ``(rows, dim)`` in ``[0, 2^bits − 1]``.
        scale: float32 ``(rows, 1)``, the grid's step.
        zero: float32 ``(rows, 1)``, the grid's real-valued zero.
        bits: the grid's bits.
        shape: the input's shape ``(..., dim)``; outputs take its leading dimensions.
        dtype: the input's dtype; outputs return in it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> torch.Tensor:
        """``(codes − zero) · scale`` in the input's shape and dtype: for a float32 input, the fake
        quantizer's output bit for bit."""
        return dequantize_codes(self.codes, self.scale, self.zero).reshape(self.shape).to(self.dtype)


class IntegerInputTransform(nn.Module):
    """An ``InputTransform`` (smoothing, online rotation, activation quantizer) whose output is codes.

    ``forward(x)`` takes ``x`` ``(..., dim)`` and returns the ``ActivationCodes`` of
    ``transform(x)``: the rotated input rounded once, exactly as the fake quantizer rounds it.
    The rotation and the rounding run in float32 whatever ``x``'s dtype (the rotations compute in
    float32 anyway): a float32 model's codes are the fake-quant model's bit for bit, and a bf16
    model's are those of its float32 rows, with no bf16 rounding in between.
    """

    def __init__(self, transform: InputTransform) -> None:
        super().__init__()
        refusal = integer_refusal(transform)
        if refusal is not None:
            raise ValueError(refusal)
        self.transform = transform
        # Inputs of at most this many rows come back fake-quantized (floats), for the int4 kernel that
        # serves decoding steps; set by the IntegerLinear reading this input when it holds that kernel.
        self.fake_quant_rows_max = 0

    @property
    def dim(self) -> int:
        return self.transform.dim

    @property
    def rotation(self):
        """The wrapped transform's online rotation (``None``: none), as ``InputTransform.rotation``."""
        return self.transform.rotation

    def forward(self, x: torch.Tensor) -> ActivationCodes | torch.Tensor:
        if x.numel() <= self.fake_quant_rows_max * self.dim:
            return self.transform(x)  # a decoding step: no codes to make for the int4 kernel
        rows = as_dtype(x, torch.float32).reshape(-1, self.dim)
        quantizer = self.transform.act_quantizer
        codes, scale, zero = quantizer.quantize(self.transform.transform_input(rows))
        return ActivationCodes(codes.reshape(-1, self.dim), scale.reshape(-1, 1), zero.reshape(-1, 1),
                               quantizer.bits, x.shape, x.dtype)


def integer_refusal(transform: InputTransform, folded: list[FoldedLinear] | None = None) -> str | None:
    """Why the linears ``folded`` reading ``transform`` cannot run on integer codes (``None``: they can)."""
    quantizer = transform.act_quantizer
    if not quantizer.enabled:
        return "its input is not quantized (activation bits 16)"
    if quantizer.bits > MAX_CODE_BITS:
        return f"its input has {quantizer.bits}-bit codes; the integer path takes at most {MAX_CODE_BITS}"
    if quantizer.group_size is not None:
        return f"its input has per-group ranges (group_size={quantizer.group_size}); the integer path takes one range per token"
    for linear in folded or []:
        if linear.codes is None:
            return "it holds a float weight, not codes"
        if linear.bits > MAX_CODE_BITS:
            return f"its weight has {linear.bits}-bit codes; the integer path takes at most {MAX_CODE_BITS}"
    return None


class IntegerLinear(nn.Module):
    """Folded linears that read one input, served by one integer GEMM on their stacked rows.

    Args:
        transform: the shared ``IntegerInputTransform``.
        folded: the ``FoldedLinear``s (one, or siblings such as q/k/v), in output order; each with
            codes of at most 8 bits and the same group size.
        config: the backend and the row dispatch (``IntegerKernelConfig``).

    ``forward(x)`` takes ``x`` ``(..., in)``; ``forward_transformed(codes)`` takes the shared
    ``ActivationCodes``. Both return each linear's output ``(..., out_i)`` in the input's dtype:
    a tensor for one linear, a tuple for several.
    """

    def __init__(self, transform: IntegerInputTransform, folded: list[FoldedLinear],
                 config: IntegerKernelConfig | None = None) -> None:
        super().__init__()
        config = config or IntegerKernelConfig()
        config.validate()
        refusal = integer_refusal(transform.transform, folded)
        if refusal is not None:
            raise ValueError(refusal)
        groups = {linear.scale.shape[1] for linear in folded}
        if len(groups) != 1:
            raise ValueError("the linears have different weight group counts")
        self.transform = transform
        self.split_sizes = [linear.out_features for linear in folded]
        self.in_features = folded[0].in_features
        self.out_features = sum(self.split_sizes)
        self.groups = groups.pop()
        self.group_size = self.in_features // self.groups
        device = folded[0].codes.device
        self.backend = resolve_backend(config.backend, device)
        self.int4_rows_max = config.int4_rows_max

        with torch.no_grad():
            codes = torch.cat([linear.codes for linear in folded])
            scale = torch.cat([linear.scale for linear in folded]).float()
            zero = torch.cat([linear.zero for linear in folded]).float()
            bits = {linear.bits for linear in folded}
            # Codes of fewer bits shift by their own midpoint: a grid's zero moves with it.
            midpoints = torch.cat([torch.full((linear.out_features, 1), 2.0 ** (linear.bits - 1), device=device)
                                   for linear in folded])
            shifted = (codes.to(torch.int16) - midpoints.to(torch.int16)).to(torch.int8)
            grouped = shifted.reshape(self.out_features, self.groups, self.group_size)
            weight_sums = grouped.sum(-1, dtype=torch.int32).float()  # W_g, (out, groups)
            zero_shifted = zero - midpoints  # z'_w
            self.register_buffer("scale", scale.contiguous())
            # Per-group views the GEMM reads (contiguous copies only where there are several groups).
            self._group_scales = [scale[:, g].contiguous() for g in range(self.groups)]
            self.register_buffer("_kernel_zero_points", torch.zeros(self.out_features, dtype=torch.int64,
                                                                    device=device), persistent=False)
            # The terms after s_w ⊙ A, over every token at once: y = s_x ⊙ (Σ_g s_w ⊙ A_g) + U C, with
            # C's rows Σ_g s_w W_g, then the bias, then (asymmetric grids) s_w z'_w per group, and
            # U's columns −s_x z'_x, 1, −s_x (X_g − K_g z'_x). One low-rank product, one pass over y.
            corrections = [(scale * weight_sums).sum(1, keepdim=True).T]
            bias = [linear.bias for linear in folded]
            self.has_bias = bias[0] is not None
            if self.has_bias:
                corrections.append(torch.cat(bias).float()[None])
            self.asymmetric = bool(zero_shifted.abs().max() > 0)
            if self.asymmetric:
                corrections.append((scale * zero_shifted).T)
            self.register_buffer("corrections", torch.cat(corrections).contiguous())
            self.register_buffer("bias", None if bias[0] is None else torch.cat(bias).float())
            self._packed: list[torch.Tensor] = []
            if self.backend == "onednn":
                # The packed weights are the codes' only copy (opaque tensors: not buffers, not in state_dict).
                self._packed = [torch.ops.onednn.qlinear_prepack(grouped[:, g].contiguous(), None)
                                for g in range(self.groups)]
                self.register_buffer("weight_codes", None)
            else:
                padded_in = _round_up(self.group_size, INT_MM_MULTIPLE)
                padded_out = _round_up(self.out_features, INT_MM_MULTIPLE)
                weight = torch.zeros(self.groups, padded_out, padded_in, dtype=torch.int8, device=device)
                weight[:, :self.out_features, :self.group_size] = grouped.transpose(0, 1)
                self.register_buffer("weight_codes", weight)  # (groups, out', g'): w'_g row-major
            self.int4 = None
            if self.int4_rows_max > 0:
                try:
                    layout = int4_layout(codes, scale, zero, max(bits))
                    self.int4 = Int4Linear(transform.transform, layout, scale, zero, bias=self.bias)
                    transform.fake_quant_rows_max = self.int4_rows_max
                except Int4LayoutError as error:
                    warnings.warn(f"int4_rows_max={self.int4_rows_max}: {error}; every row stays on the integer path",
                                  stacklevel=2)

    # ------------------------------------------------------------------ math
    def _products(self, acts: ActivationCodes) -> torch.Tensor:
        """``Σ_g s_w ⊙ A_g``: float32 ``(rows, out)``."""
        codes = acts.codes
        midpoint = 2 ** (acts.bits - 1)
        total = None
        for g in range(self.groups):
            part = codes if self.groups == 1 else codes[:, g * self.group_size:(g + 1) * self.group_size]
            if self.backend == "onednn":
                out = torch.ops.onednn.qlinear_pointwise(
                    part.contiguous(), 1.0, midpoint, self._packed[g], self._group_scales[g],
                    self._kernel_zero_points, None, 1.0, 0, torch.float32, "none", [], "")
            else:
                out = self._int_mm(part, g, midpoint).float().mul_(self.scale[:, g])
            total = out if total is None else total.add_(out)
        return total

    def _int_mm(self, part: torch.Tensor, g: int, midpoint: int) -> torch.Tensor:
        """``A_g`` through ``torch._int_mm``: int32 ``(rows, out)``, zero-padded to its shape rules."""
        rows = part.shape[0]
        weight = self.weight_codes[g]
        signed = (part.to(torch.int16) - midpoint).to(torch.int8)
        padded_rows = max(rows, INT_MM_MIN_ROWS) if part.device.type == "cuda" else rows
        if padded_rows != rows or weight.shape[1] != part.shape[1]:
            signed = F.pad(signed, (0, weight.shape[1] - part.shape[1], 0, padded_rows - rows))
        return torch._int_mm(signed, weight.T)[:rows, :self.out_features]

    def forward_transformed(self, acts: ActivationCodes | torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The outputs for the shared input's codes (or, for a decoding step, its fake-quantized rows)."""
        if isinstance(acts, torch.Tensor):
            out = self.int4.forward_transformed(acts)
        else:
            out = self._products(acts).mul_(acts.scale)
            midpoint = 2 ** (acts.bits - 1)
            zero_shifted = acts.zero - midpoint  # z'_x, (rows, 1)
            factors = [-acts.scale * zero_shifted]
            if self.has_bias:
                factors.append(torch.ones_like(acts.scale))
            if self.asymmetric:
                # X_g − K_g z'_x per token and group, from the codes' own sums.
                sums = acts.codes.reshape(acts.rows, self.groups, self.group_size).sum(-1, dtype=torch.int32)
                factors.append(-acts.scale * (sums.float() - self.group_size * (midpoint + zero_shifted)))
            out.addmm_(torch.cat(factors, dim=1), self.corrections)
            out = as_dtype(out, acts.dtype).reshape(*acts.shape[:-1], self.out_features)
        if len(self.split_sizes) == 1:
            return out
        return out.split(self.split_sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.forward_transformed(self.transform(x))

    # ---------------------------------------------------------------- checks
    def codes(self) -> torch.Tensor:
        """The shifted int8 weight codes ``w'`` ``(out, in)``, read back from what the kernel holds."""
        if self.backend == "onednn":
            parts = [packed.to_dense().T for packed in self._packed]  # each (out, g)
        else:
            parts = [self.weight_codes[g, :self.out_features, :self.group_size] for g in range(self.groups)]
        return torch.cat(parts, dim=1)

    def weight_bytes(self) -> int:
        """Bytes of weight codes held (the packed layouts and, with ``int4_rows_max``, the int4 one)."""
        held = self.out_features * self.in_features if self.backend == "onednn" else self.weight_codes.numel()
        if self.int4 is not None:
            held += self.int4.packed.numel() * self.int4.packed.element_size()
        return held

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, split_sizes={self.split_sizes}, groups={self.groups}, "
                f"backend={self.backend}, int4_rows_max={self.int4_rows_max}")


class IntegerSibling(nn.Module):
    """One linear of a stacked ``IntegerLinear`` (q_proj of q/k/v, say), served by the stacked GEMM.

    Holds no weights of its own: ``forward(x)`` runs the stacked product and returns this
    linear's part, so the block's linears stay addressable one by one while one copy is held.
    """

    def __init__(self, stacked: IntegerLinear, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "stacked", stacked)  # not a submodule: the block owns it once
        self.index = index
        self.transform = stacked.transform
        self.out_features = stacked.split_sizes[index]
        self.in_features = stacked.in_features

    def forward_transformed(self, acts: ActivationCodes | torch.Tensor) -> torch.Tensor:
        return self.stacked.forward_transformed(acts)[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_transformed(self.transform(x))


@dataclass
class IntegerReport:
    """What ``use_integer_kernels_`` did, by linear name (``model.layers.i.linears.q_proj``).

    Args:
        integer: linears now served by an ``IntegerLinear``.
        fallback: ``{name: reason}`` of quantized linears left as they were (each warned about).
        stacked: sibling groups served as one GEMM (``model.layers.i.fused_linears.qkv``).
        weight_bytes: bytes of weight codes the integer linears hold.
    """

    integer: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    stacked: list[str] = field(default_factory=list)
    weight_bytes: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"integer": list(self.integer), "fallback": dict(self.fallback), "stacked": list(self.stacked),
                "weight_bytes": self.weight_bytes}


@torch.no_grad()
def use_integer_kernels_(model: nn.Module, config: IntegerKernelConfig | None = None, *,
                         prefix: str = "") -> IntegerReport:
    """Serve every folded block of ``model`` (or ``model``, one ``HHDecoderBlock``) on integer codes, in place.

    The linears that read one input become one ``IntegerLinear`` (q/k/v and gate/up stacked,
    o_proj and down_proj alone), and a block with a quantized KV cache keeps its K/V as packed
    codes (``kv_cache.py``). Linears the path cannot take keep their form, with a warning naming
    the linear and the reason. ``prefix``: prepended to the names in the report. Returns the
    ``IntegerReport``.
    """
    config = config or IntegerKernelConfig()
    config.validate()
    report = IntegerReport()
    blocks = named_blocks(model, prefix)
    for block_prefix, block in blocks:
        if not block.is_folded:
            raise ValueError(f"{block_prefix} is not folded (or already serves other kernels): "
                             "use a model from load_quantized(kernels=None) or call block.fold_() first")
        by_input: dict[str, list[str]] = {}
        for name in block.linears:
            by_input.setdefault(LINEAR_INPUTS[name], []).append(name)
        for group, names in by_input.items():
            folded = [block.linears[name] for name in names]
            keys = [f"{block_prefix}.linears.{name}" for name in names]
            reason = integer_refusal(folded[0].transform, folded)
            if reason is None and len({linear.scale.shape[1] for linear in folded}) != 1:
                reason = "its siblings have different weight group sizes"
            if reason is not None:
                for key, linear in zip(keys, folded):
                    if linear.codes is not None:
                        report.fallback[key] = reason
                        warnings.warn(f"{key}: {reason}; it keeps the {type(linear).__name__}", stacklevel=2)
                continue
            stacked = IntegerLinear(IntegerInputTransform(folded[0].transform), folded, config)
            report.weight_bytes += stacked.weight_bytes()
            report.integer += keys
            if len(names) == 1:
                block.linears[names[0]] = stacked
            else:
                block.fused_linears[group] = stacked
                report.stacked.append(f"{block_prefix}.fused_linears.{group}")
                for index, name in enumerate(names):
                    block.linears[name] = IntegerSibling(stacked, index)
        block.packed_kv_cache = block.k_quantizer.enabled
    return report
