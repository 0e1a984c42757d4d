"""Packed-int4 weight kernels for folded models: run the saved codes without a dense weight.

A ``FoldedLinear`` dequantizes ``Ŵ = (codes − zero) · scale`` at every call.
``Int4Linear`` keeps the codes packed two to a byte and multiplies through
torch's own int4 weight-only matmul (``torch.ops.aten._weight_int4pack_mm_for_cpu``
on the CPU; tinygemm's ``_weight_int4pack_mm`` on CUDA, the kernel torchao's int4
configs call; untested here). Rotations and smoothing stay online in the
``InputTransform``; the activations are not quantized (W4A16).

The kernels' grid is ``w = (q − 8) · s_k + z_k`` per group of ``g`` input
channels (``g`` ∈ ``KERNEL_GROUP_SIZES``), with ``s_k``/``z_k`` in the
activations' dtype. Our grid ``Ŵ = (q − z) · s`` maps onto it exactly in real
arithmetic with ``s_k = s`` and ``z_k = (8 − z) · s`` (HQQ's real-valued zeros
included). A per-channel grid is a group grid whose scale repeats over every
group; here its scale is applied after the kernel instead (``s_k = 1``,
``z_k = 8 − z``, ``y ← y · s`` in float32), so a symmetric per-channel grid
(``z = 8``: ``z_k = 0``) reaches the kernel with no rounding at all, even in bf16.

The CPU kernel is fast only with bf16 activations (fp32 and fp16 run a scalar
path, ~300-500× slower on an AVX-512 CPU, ``benchmarks/deploy_speed.py`` notes):
``compute_dtype`` defaults to bf16, so each output carries bf16 rounding
(relative ~2⁻⁹) against the float32 dequantizing path; ``torch.float32`` computes
``(q − 8)·s + z`` in float32 (≤ a few ulp from ``Ŵ``) for checks.

``Int8Embedding`` and ``Int8Linear`` serve the embedding table and ``lm_head`` from per-row
symmetric int8 codes (one set shared when the two are tied): a quarter of their fp32 bytes,
and the lm_head's product through torch's int8 weight-only matmul
(``torch._weight_int8pack_mm``, bf16 on the CPU; elsewhere the rows are dequantized per call).
At a small model's vocabulary the fp32 head is the largest tensor and the largest matmul of a
decoding step. This rounding is not in the export: it is a serving choice, like the bf16 compute.

Each ``Int4Linear`` also keeps the exact grid (``scale``, ``zero`` in their
smallest lossless dtype, as the export stores them), so ``dequantized_weight()``
reproduces the ``FoldedLinear``'s weight bit for bit and ``to_folded()`` gives
it back.

``FusedInt4Linear`` serves the linears that read one input (q/k/v, gate/up) as
one kernel call on their stacked rows; the block calls it where
``use_int4_kernels_`` installed it (``HHDecoderBlock.fused_linears``). At batch 1
a decoding step is many small products, and each call's casts and dispatch cost
about as much as the product.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block import SIBLINGS, HHDecoderBlock, named_blocks
from .export_format import compact_grid
from .linear import FoldedLinear, InputTransform
from .quantizers import OFF_BITS, ActivationQuantizer, dequantize_codes
from .rotation import as_dtype

__all__ = ["KERNEL_BITS", "KERNEL_GROUP_SIZES", "FusedInt4Linear", "Int4Layout", "Int4LayoutError", "Int4Linear",
           "Int8Embedding", "Int8Linear", "KernelReport", "fuse_refusal", "int4_layout", "int8_rows",
           "kernel_group_size", "layout_codes", "serve_weight_only_", "use_int4_kernels_"]

KERNEL_BITS = 4
# What _weight_int4pack_mm_for_cpu accepts (torch 2.13); tinygemm on CUDA takes the same.
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# The kernels' fixed integer midpoint: w = (q - KERNEL_MIDPOINT) · s + z.
KERNEL_MIDPOINT = 8
# _convert_weight_to_int4pack_for_cpu packs rows in blocks: out_features must be a multiple of this.
CPU_ROW_MULTIPLE = 16
# tinygemm's packing (CUDA): innerKTiles ∈ {8, 4, 2}, in_features a multiple of 16 · innerKTiles.
CUDA_INNER_K_TILES = (8, 4, 2)
CUDA_K_TILE = 16
DEFAULT_COMPUTE_DTYPE = torch.bfloat16
# Symmetric int8 rows: codes in [-INT8_LEVELS, INT8_LEVELS] (−128 unused, so the grid is symmetric).
INT8_LEVELS = 127
INT8_BLOCK_ELEMENTS = 2**20  # int8_rows works on about this many entries at a time


class Int4LayoutError(ValueError):
    """A grid the int4 kernels cannot take (bits, group size, shape); the message says which."""


def kernel_group_size(in_features: int, group_size: int | None) -> int:
    """The kernel group size for a grid with ``group_size`` (``None``: per output channel).

    A per-channel grid takes the largest ``KERNEL_GROUP_SIZES`` entry dividing
    ``in_features`` (its scale, repeated over the groups, is the same grid).
    """
    if group_size is None:
        for size in sorted(KERNEL_GROUP_SIZES, reverse=True):
            if in_features % size == 0:
                return size
        raise Int4LayoutError(f"per-channel grid with in_features={in_features}: the int4 kernel needs "
                              f"in_features divisible by one of {KERNEL_GROUP_SIZES}")
    if group_size not in KERNEL_GROUP_SIZES:
        raise Int4LayoutError(f"group_size={group_size}: the int4 kernel takes group sizes {KERNEL_GROUP_SIZES} "
                              "or per-channel grids")
    return group_size


def _cuda_inner_k_tiles(in_features: int) -> int:
    for tiles in CUDA_INNER_K_TILES:
        if in_features % (CUDA_K_TILE * tiles) == 0:
            return tiles
    raise Int4LayoutError(f"in_features={in_features}: tinygemm needs a multiple of "
                          f"{CUDA_K_TILE * min(CUDA_INNER_K_TILES)}")


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's packed weight from uint8 codes ``(out, in)`` (on their device)."""
    if codes.device.type == "cuda":  # pragma: no cover - no GPU on the test machines
        # tinygemm takes (out, in/2) uint8 with the even column in the high nibble.
        pairs = (codes[:, ::2] << 4) | codes[:, 1::2]
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _cuda_inner_k_tiles(codes.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x (M, in)`` times the packed weight: ``(M, out)`` in ``x``'s dtype."""
    # The CPU kernel reads its scales as if packed, whatever their strides, and a fused sibling's are a
    # strided view (FusedInt4Linear): a no-op for every other caller.
    scale_and_zero = scale_and_zero.contiguous()
    if x.device.type == "cuda":  # pragma: no cover - no GPU on the test machines
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zero)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


@dataclass
class Int4Layout:
    """A grid in the int4 kernels' layout.

    Args:
        packed: the kernel's packed codes (CPU: uint8 ``(out, in/2)``, torch's blocked order).
        scale_and_zero: ``(in/g, out, 2)`` in the compute dtype: ``s_k`` and ``z_k`` of
            ``w = (q − 8)·s_k + z_k``.
        out_scale: float32 ``(out,)`` applied to the kernel's output (per-channel grids), or ``None``.
        group_size: the kernel's ``g``.
        shape: ``(out, in)``.
    """

    packed: torch.Tensor
    scale_and_zero: torch.Tensor
    out_scale: torch.Tensor | None
    group_size: int
    shape: tuple[int, int]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale_and_zero.dtype


def int4_layout(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> Int4Layout:
    """Our grid ``Ŵ = (codes − zero) · scale`` (codes uint8 ``(out, in)``, scale/zero
    ``(out, groups)``) in the kernels' layout; raises ``Int4LayoutError`` where it cannot."""
    if bits != KERNEL_BITS:
        raise Int4LayoutError(f"bits={bits}: the int4 kernel takes {KERNEL_BITS}-bit codes only")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise Int4LayoutError(f"codes must be uint8 (out, in), got {codes.dtype} of shape {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    if in_features % groups:
        raise Int4LayoutError(f"{groups} groups do not divide in_features={in_features}")
    per_channel = groups == 1
    group_size = kernel_group_size(in_features, None if per_channel else in_features // groups)
    if codes.device.type == "cuda":  # pragma: no cover
        _cuda_inner_k_tiles(in_features)
    elif out_features % CPU_ROW_MULTIPLE:
        raise Int4LayoutError(f"out_features={out_features}: the CPU int4 kernel needs a multiple of "
                              f"{CPU_ROW_MULTIPLE}")
    scale, zero = scale.float(), zero.float()
    if per_channel:
        # The scale moves after the kernel (exact in float32); the kernel sees unit steps.
        kernel_scale, kernel_zero = torch.ones_like(scale), KERNEL_MIDPOINT - zero
        out_scale = scale[:, 0].contiguous()
        kernel_groups = in_features // group_size
        kernel_scale, kernel_zero = kernel_scale.expand(-1, kernel_groups), kernel_zero.expand(-1, kernel_groups)
    else:
        kernel_scale, kernel_zero, out_scale = scale, (KERNEL_MIDPOINT - zero) * scale, None
    scale_and_zero = torch.stack([kernel_scale.T, kernel_zero.T], dim=-1).to(compute_dtype).contiguous()
    return Int4Layout(packed=_pack(codes), scale_and_zero=scale_and_zero, out_scale=out_scale,
                      group_size=group_size, shape=(out_features, in_features))


def layout_codes(layout: Int4Layout) -> torch.Tensor:
    """The uint8 codes ``(out, in)`` read back through the kernel itself.

    Multiplies the identity by the packed weight with ``s_k = 1``, ``z_k = 8``:
    the output is ``q`` exactly (small integers), so this checks the packing
    and the kernel's reading of it together.
    """
    out_features, in_features = layout.shape
    dtype = layout.compute_dtype
    unit = torch.stack([torch.ones(in_features // layout.group_size, out_features),
                        torch.full((in_features // layout.group_size, out_features), float(KERNEL_MIDPOINT))],
                       dim=-1).to(dtype=dtype, device=layout.packed.device)
    eye = torch.eye(in_features, dtype=dtype, device=layout.packed.device)
    return _int4_mm(eye, layout.packed, layout.group_size, unit).T.round().to(torch.uint8)


def _kernel_forward(linear: nn.Module, x_transformed: torch.Tensor) -> torch.Tensor:
    """``K(x̃) (· s) + b`` of an ``Int4Linear`` or ``FusedInt4Linear`` (their ``in_features``, ``packed``,
    ``scale_and_zero``, ``out_scale``, ``bias``, ``kernel_group_size``): ``x̃ (..., in)`` to
    ``(..., out)`` in ``x̃``'s dtype, the kernel run in the compute dtype."""
    leading = x_transformed.shape[:-1]
    rows = as_dtype(x_transformed.reshape(-1, linear.in_features), linear.scale_and_zero.dtype)
    out = as_dtype(_int4_mm(rows, linear.packed, linear.kernel_group_size, linear.scale_and_zero),
                   x_transformed.dtype)
    if linear.out_scale is not None:
        out = out * as_dtype(linear.out_scale, out.dtype)
    if linear.bias is not None:
        out = out + as_dtype(linear.bias, out.dtype)
    return out.reshape(*leading, out.shape[-1])


class Int4Linear(nn.Module):
    """A ``FoldedLinear`` served through the packed-int4 kernel: ``y = K(x̃) (· s) + b``.

    ``transform`` is the (shared) online input transform, applied as in
    ``FoldedLinear``; ``scale``/``zero`` hold the exact grid (``dequantized_weight``).
    Inputs of any float dtype and shape ``(..., in)``; the kernel runs in
    ``layout.compute_dtype`` and the output returns in the input's dtype.
    """

    def __init__(self, transform: InputTransform, layout: Int4Layout, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.transform = transform
        self.out_features, self.in_features = layout.shape
        self.bits = KERNEL_BITS
        self.kernel_group_size = layout.group_size
        self.register_buffer("packed", layout.packed)
        self.register_buffer("scale_and_zero", layout.scale_and_zero)
        self.register_buffer("out_scale", layout.out_scale)
        self.register_buffer("bias", bias)
        # The exact grid in its smallest lossless dtype (as the export stores it), cast back on use.
        self.grid_dtypes = (scale.dtype, zero.dtype)
        self.register_buffer("scale", compact_grid(scale).to(scale.device))
        self.register_buffer("zero", compact_grid(zero).to(zero.device))

    @classmethod
    def from_folded(cls, folded: FoldedLinear,
                    compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> "Int4Linear":
        """The kernel form of a quantized ``folded``; ``Int4LayoutError`` where the grid does not fit."""
        if folded.codes is None:
            raise Int4LayoutError("the linear holds a float weight, not codes")
        layout = int4_layout(folded.codes, folded.scale, folded.zero, folded.bits, compute_dtype)
        return cls(folded.transform, layout, folded.scale, folded.zero, bias=folded.bias)

    @property
    def layout(self) -> Int4Layout:
        return Int4Layout(self.packed, self.scale_and_zero, self.out_scale, self.kernel_group_size,
                          (self.out_features, self.in_features))

    @property
    def group_size(self) -> int | None:
        return None if self.scale.shape[1] == 1 else self.in_features // self.scale.shape[1]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact ``(scale, zero)``, ``(out, groups)``, in their original dtypes."""
        return self.scale.to(self.grid_dtypes[0]), self.zero.to(self.grid_dtypes[1])

    def dequantized_weight(self) -> torch.Tensor:
        """``(codes − zero) · scale`` from the packed codes and the exact grid: ``FoldedLinear``'s weight."""
        scale, zero = self.grid()
        codes = layout_codes(self.layout).reshape(self.out_features, scale.shape[1], -1)
        weight = dequantize_codes(codes, scale.unsqueeze(-1), zero.unsqueeze(-1))
        return weight.reshape(self.out_features, self.in_features)

    def to_folded(self) -> FoldedLinear:
        """The dequantizing ``FoldedLinear`` this was made from (same transform, codes, grid)."""
        scale, zero = self.grid()
        return FoldedLinear(self.transform, bias=self.bias, codes=layout_codes(self.layout), scale=scale,
                            zero=zero, bits=self.bits)

    def forward_transformed(self, x_transformed: torch.Tensor) -> torch.Tensor:
        """The output for an input already passed through the shared transform."""
        return _kernel_forward(self, x_transformed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_transformed(self.transform(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel_group_size={self.kernel_group_size}, compute_dtype={self.scale_and_zero.dtype}")


class FusedInt4Linear(nn.Module):
    """Sibling ``Int4Linear``s that read one transformed input (q/k/v, gate/up) as one kernel call.

    Their packed rows, kernel scales and zeros, output scales and biases are stacked here, and
    each sibling's own buffers become views of its rows (no second copy), so the siblings still
    work alone. At decoding's one row per call, each kernel call and its casts cost more than the
    product itself. The kernel computes every output from its own row of the packed weight, so
    the stacked call gives each sibling's output exactly (``tests/test_kernels.py``).

    Args:
        linears: the siblings, in output order; the same kernel group size, compute dtype and
            device, and all or none with an output scale, and with a bias (``fuse_refusal``).
    """

    def __init__(self, linears: list["Int4Linear"]) -> None:
        super().__init__()
        reason = fuse_refusal(linears)
        if reason is not None:
            raise ValueError(f"cannot fuse these linears: {reason}")
        first = linears[0]
        self.in_features = first.in_features
        self.kernel_group_size = first.kernel_group_size
        self.split_sizes = [linear.out_features for linear in linears]
        stacked = {"packed": torch.cat([linear.packed for linear in linears]),
                   "scale_and_zero": torch.cat([linear.scale_and_zero for linear in linears], dim=1),
                   "out_scale": None if first.out_scale is None else torch.cat([linear.out_scale for linear in linears]),
                   "bias": None if first.bias is None else torch.cat([linear.bias for linear in linears])}
        for name, tensor in stacked.items():
            self.register_buffer(name, tensor)
        start = 0
        for linear, size in zip(linears, self.split_sizes):
            for name, tensor in stacked.items():
                if tensor is not None:
                    rows = tensor.narrow(1 if name == "scale_and_zero" else 0, start, size)
                    linear.register_buffer(name, rows)
            start += size

    def forward_transformed(self, x_transformed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each sibling's output, in order, for an input already passed through their shared transform."""
        return _kernel_forward(self, x_transformed).split(self.split_sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, split_sizes={self.split_sizes}"


def fuse_refusal(linears: list[nn.Module]) -> str | None:
    """Why ``linears`` cannot be one ``FusedInt4Linear`` (``None``: they can)."""
    if len(linears) < 2 or not all(isinstance(linear, Int4Linear) for linear in linears):
        return "fewer than two linears, or not all of them Int4Linears"
    first = linears[0]
    if first.packed.device.type != "cpu":
        # Only the CPU layout is verified to stack row blocks (tinygemm's tiles are untested here).
        return f"the packed weight is on {first.packed.device.type}, not the CPU"
    for linear in linears[1:]:
        if linear.transform is not first.transform:
            return "they do not share one input transform"
        if (linear.in_features, linear.kernel_group_size, linear.scale_and_zero.dtype) != (
                first.in_features, first.kernel_group_size, first.scale_and_zero.dtype):
            return "their kernel group sizes or compute dtypes differ"
        if (linear.out_scale is None) != (first.out_scale is None) or (linear.bias is None) != (first.bias is None):
            return "some have an output scale or a bias and others do not"
    return None


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``weight`` ``(rows, cols)``: ``(codes, scale)``, int8 ``(rows, cols)`` and
    float32 ``(rows,)``, with ``weight ≈ codes · scale[:, None]`` to within ``scale / 2`` per entry
    (``scale = max|row| / 127``; an all-zero row gets scale 1 and zero codes)."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], device=weight.device)
    # In blocks of rows, so the float32 temporaries stay small next to a vocabulary-sized table.
    step = max(1, INT8_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        block = weight[start:start + step].to(torch.float32, copy=True)  # divided in place below
        absmax = block.abs().amax(dim=1)
        block_scale = torch.where(absmax > 0, absmax / INT8_LEVELS, torch.ones_like(absmax))
        codes[start:start + step] = block.div_(block_scale[:, None]).round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
        scale[start:start + step] = block_scale
    return codes, scale


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows: ``forward(ids)`` is ``codes[ids] · scale[ids]`` in ``dtype``.

    Args:
        codes: int8 ``(vocab, hidden)`` (``int8_rows``); shared with an ``Int8Linear`` when tied.
        scale: float32 ``(vocab,)``.
        dtype: the dtype of the embeddings returned (the model's float dtype).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.out_dtype = dtype
        self.num_embeddings, self.embedding_dim = codes.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[input_ids].float() * self.scale[input_ids].unsqueeze(-1)).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies its input as a 2-D ``(rows, in)`` matrix.

    For a 3-D bf16 input and a weight that needs no gradient (every loaded model's), torch's
    ``F.linear`` takes a batched-matmul path that copies the whole weight at every call: 170 ms
    instead of 7 ms for SmolLM2's lm_head on one CPU thread, at every decoding step. The 2-D
    product is the same numbers without the copy.
    """

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "RowsLinear":
        """A ``RowsLinear`` holding ``linear``'s own parameters (tied weights stay tied)."""
        rows = cls.__new__(cls)
        nn.Module.__init__(rows)
        rows.in_features, rows.out_features = linear.in_features, linear.out_features
        rows.weight, rows.bias = linear.weight, linear.bias
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """A bias-free linear (the ``lm_head``) from int8 rows: ``y = (x Qᵀ) · scale``, ``(..., in) → (..., out)``.

    On the CPU, ``x Qᵀ`` runs in ``compute_dtype`` through ``torch._weight_int8pack_mm`` (fast for bf16)
    with unit kernel scales, and the exact float32 ``scale`` multiplies its output; elsewhere the
    weight is dequantized per call. The output returns in the input's dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor,
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("unit_scale", torch.ones(codes.shape[0], dtype=compute_dtype), persistent=False)
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = codes.shape

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.device.type == "cpu":
            out = torch._weight_int8pack_mm(rows.to(self.compute_dtype), self.codes, self.unit_scale).float()
            out = out * self.scale
        else:  # pragma: no cover - no GPU on the test machines
            out = rows.float() @ self.dequantized_weight().T
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, " \
               f"compute_dtype={self.compute_dtype}"


@dataclass
class KernelReport:
    """What ``use_int4_kernels_`` did, by linear name (``model.layers.i.linears.q_proj``).

    Args:
        int4: linears now served by ``Int4Linear``.
        fallback: ``{name: reason}`` of quantized linears left dequantizing (each warned about).
        dense: linears holding a float weight (nothing to pack).
        fused: sibling groups served as one ``FusedInt4Linear`` (``model.layers.i.fused_linears.qkv``).
    """

    int4: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"int4": list(self.int4), "fallback": dict(self.fallback), "dense": list(self.dense),
                "fused": list(self.fused)}


@torch.no_grad()
def use_int4_kernels_(model: nn.Module, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, *,
                      prefix: str = "") -> KernelReport:
    """Replace every quantized ``FoldedLinear`` of ``model``'s folded blocks (or of ``model``, one
    ``HHDecoderBlock``) by an ``Int4Linear`` (in place), and serve siblings that read one input
    (q/k/v, gate/up) as one ``FusedInt4Linear`` where ``fuse_refusal`` allows. Grids the kernel
    cannot take stay dequantizing, with a warning naming the linear and the reason. ``prefix``:
    prepended to the names in the report and warnings. Returns the ``KernelReport``."""
    report = KernelReport()
    blocks = named_blocks(model, prefix)
    for prefix, block in blocks:
        if not block.is_folded and not any(isinstance(linear, Int4Linear) for linear in block.linears.values()):
            raise ValueError(f"{prefix} is not folded: call block.fold_() before using the int4 kernels")
        for name, linear in block.linears.items():
            key = f"{prefix}.linears.{name}"
            if isinstance(linear, Int4Linear):
                report.int4.append(key)
                continue
            if linear.codes is None:
                report.dense.append(key)
                continue
            try:
                block.linears[name] = Int4Linear.from_folded(linear, compute_dtype)
                report.int4.append(key)
            except Int4LayoutError as error:
                report.fallback[key] = str(error)
                warnings.warn(f"{key}: {error}; it keeps the dequantizing FoldedLinear", stacklevel=2)
        for group, names in SIBLINGS.items():
            siblings = [block.linears[name] for name in names]
            if group not in block.fused_linears and fuse_refusal(siblings) is None:
                block.fused_linears[group] = FusedInt4Linear(siblings)
            if group in block.fused_linears:
                report.fused.append(f"{prefix}.fused_linears.{group}")
    return report


def serve_weight_only_(model: nn.Module) -> nn.Module:
    """Serve a W4A4 (or WxAyKVz) folded model as W·A16: every activation and KV-cache quantizer
    off, rotations and smoothing kept online; in place, returns the model."""
    for module in model.modules():
        if isinstance(module, InputTransform):
            module.act_quantizer = ActivationQuantizer(bits=OFF_BITS)
        elif isinstance(module, HHDecoderBlock):
            module.k_quantizer = ActivationQuantizer(bits=OFF_BITS)
            module.v_quantizer = ActivationQuantizer(bits=OFF_BITS)
            module.quant = dataclasses.replace(module.quant, a_bits=OFF_BITS, kv_bits=OFF_BITS)
    return model

