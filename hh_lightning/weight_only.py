"""Weight-only HQQ quantization of a whole model (W4A16, W3A16, W2A16; docs/design.md §3.2).

Every linear of every decoder layer is replaced by a ``FoldedLinear`` holding
HQQ's asymmetric group-wise codes (groups along the input dimension);
activations and the KV cache stay in full precision. With ``rotate=True`` the
HQQ solve runs on the rotated weight ``W̃ = (W · diag(c)) R`` and the online
rotations stay in the model, so a rotation that flattens weight outliers can
help the weight grid too. The result is an ordinary folded model: it saves and
loads through ``export.save_quantized`` / ``loading.load_quantized``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .block import LINEAR_NAMES, BlockQuantConfig, HHDecoderBlock, wrap_model
from .hqq import hqq_quantize
from .linear import FoldedLinear, HHLinear
from .quantizers import OFF_BITS, quantize_codes

__all__ = ["quantize_weights_hqq", "weight_only_config"]

# Without rotations the norm scales γ stay online (as per-channel smoothing scales), see _unfold_norm_scales_.
_ROTATION_COUNTS_OFF = dict(qkv_reflections=0, o_reflections=0, upgate_reflections=0, down_reflections=0,
                            kv_reflections=0, o_rotation="none", smoothing=True)


def weight_only_config(bits: int = 4, group_size: int | None = 64, *, rotate: bool = False,
                       quant: BlockQuantConfig | None = None) -> BlockQuantConfig:
    """The ``BlockQuantConfig`` of a weight-only HQQ model.

    ``quant`` supplies the rotation settings when ``rotate`` (default config
    otherwise); bits, grid and activation settings are overridden:
    ``w_bits=bits``, ``w_group_size=group_size``, asymmetric, ``w_init='hqq'``,
    ``a_bits = kv_bits = 16``. Without ``rotate`` every rotation is off.
    """
    base = quant if quant is not None else BlockQuantConfig()
    overrides = dict(w_bits=bits, w_group_size=group_size, w_symmetric=False, w_init="hqq",
                     a_bits=OFF_BITS, kv_bits=OFF_BITS)
    if not rotate:
        overrides.update(_ROTATION_COUNTS_OFF)
    return dataclasses.replace(base, **overrides)


def _check_block(block: HHDecoderBlock, index: int, rotate: bool) -> None:
    folded = [name for name, linear in block.linears.items() if not isinstance(linear, HHLinear)]
    if folded:
        raise ValueError(f"layer {index}: {', '.join(folded)} already folded; quantize_weights_hqq needs "
                         "unfolded blocks (or a plain transformers model)")
    if block.quant.a_bits != OFF_BITS or block.quant.kv_bits != OFF_BITS:
        raise ValueError(f"layer {index}: the block quantizes activations (a_bits={block.quant.a_bits}, "
                         f"kv_bits={block.quant.kv_bits}); weight-only HQQ needs a_bits=kv_bits=16")
    if not rotate and block.rotations():
        raise ValueError(f"layer {index}: the block has rotations ({', '.join(block.rotations())}) "
                         "but rotate=False; pass rotate=True or an unwrapped model")


def _fp16_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``scale``/``zero`` ``(out, groups)`` to fp16-representable values and re-round the codes.

    The hqq package keeps its scale and zero in fp16 too; here they stay float32
    tensors holding fp16 values, so the model computes exactly what the export
    stores in half the bytes. A relative change of ≤ 2^-11 in the grid is far
    below the quantization error. Scales outside fp16's normal range stay as they are.
    """
    half = torch.finfo(torch.float16)
    scale16 = scale.half().float()
    if bool(((scale.abs() < half.tiny) | (scale.abs() > half.max)).any()):
        scale16 = scale
    zero16 = zero.half().float()
    if not bool(torch.isfinite(zero16).all()):
        zero16 = zero
    grouped = weight.reshape(scale.shape[0], scale.shape[1], -1)
    codes = quantize_codes(grouped, scale16.unsqueeze(-1), zero16.unsqueeze(-1), bits).reshape(weight.shape)
    return codes, scale16, zero16


@torch.no_grad()
def _unfold_norm_scales_(block: HHDecoderBlock) -> None:
    """Make the solver see ``W`` instead of ``W · diag(γ)`` for the linears that read a norm.

    A block folds each RMSNorm's ``γ`` into the weights that read it, which a
    rotation needs. Without one, the fold only hurts a grouped grid: a few
    large ``γ_j`` set every group's range and crush the other columns. Setting
    the shared input transform's smoothing scales to ``c = 1/|γ|`` turns the
    weight back into ``W · diag(sign γ)`` and moves ``|γ|`` onto the
    activations, an online per-channel multiply; the function is unchanged.
    """
    floor = torch.finfo(torch.float32).tiny
    for first, gamma in (("q_proj", block.input_gamma), ("gate_proj", block.post_attention_gamma)):
        transform = block.linears[first].transform
        transform.log_smoothing.copy_(-gamma.abs().clamp_min(floor).log())


@torch.no_grad()
def _fold_block_hqq(block: HHDecoderBlock, bits: int, group_size: int | None) -> None:
    """Replace each ``HHLinear`` of ``block`` by a ``FoldedLinear`` with HQQ codes of its ``W̃``."""
    for name in LINEAR_NAMES:
        linear = block.linears[name]
        weight = linear.transformed_weight().float()
        solved = hqq_quantize(weight, bits=bits, group_size=group_size, axis=1, **dataclasses.asdict(block.quant.w_hqq))
        # HQQResult's axis=1 scale/zero are (out, groups): FoldedLinear's convention.
        codes, scale, zero = _fp16_grid(weight, solved.scale, solved.zero, bits)
        bias = linear.transformed_bias()
        block.linears[name] = FoldedLinear(linear.transform, bias=None if bias is None else bias.detach().clone(),
                                           codes=codes, scale=scale, zero=zero, bits=bits)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    block.quant = dataclasses.replace(block.quant, w_bits=bits, w_group_size=group_size, w_symmetric=False,
                                      w_init="hqq")


@torch.no_grad()
def quantize_weights_hqq(model: nn.Module, bits: int = 4, group_size: int | None = 64, *, rotate: bool = False,
                         quant: BlockQuantConfig | None = None) -> nn.Module:
    """Quantize every decoder-layer linear of ``model`` with HQQ, in place; returns the model.

    Args:
        model: a transformers causal LM (Qwen2/Llama). Plain decoder layers are
            wrapped here; layers that are already (unfolded) ``HHDecoderBlock``s
            are used as they are, with their current rotations.
        bits: 2..8 (W4/W3/W2 being the usual ones).
        group_size: entries per group along the input dimension; ``None`` =
            one group per output channel.
        rotate: solve HQQ on the rotated weights and keep the online
            rotations. Rotations must already be initialized: either the
            layers are ``HHDecoderBlock``s initialized beforehand (e.g. with
            ``init_rotations_pca_``), or ``quant.rotation_init`` is a
            data-free one (``random``/``hadamard``).
        quant: rotation settings used when wrapping plain layers (see
            ``weight_only_config``).

    The result is folded (``FoldedLinear``s with ``Ŵ = (codes − zero) ·
    scale``, scale/zero ``(out, groups)`` float32 holding fp16-representable
    values, see ``_fp16_grid``) with activations in full precision.
    """
    config = weight_only_config(bits, group_size, rotate=rotate, quant=quant)
    layers = model.model.layers
    plain = [index for index, layer in enumerate(layers) if not isinstance(layer, HHDecoderBlock)]
    if plain and rotate and config.rotation_init == "pca":
        raise ValueError("rotate=True with rotation_init='pca' needs calibrated rotations: wrap the model, "
                         "run init_rotations_pca_ on each block first, or use rotation_init='hadamard'/'random'")
    if plain:
        wrap_model(model, config, layer_indices=plain)
        if not rotate:
            for index in plain:
                _unfold_norm_scales_(layers[index])
    # Check every layer before folding any, so a refusal leaves the model as it was (wrapping aside).
    for index, block in enumerate(layers):
        _check_block(block, index, rotate)
        if block.quant.w_group_size != group_size or block.quant.w_bits != bits:
            # An already-wrapped block's own quantizer settings are replaced; check the grid fits.
            dataclasses.replace(block.quant, w_bits=bits, w_group_size=group_size).validate(model.config)
    for block in layers:
        _fold_block_hqq(block, bits, group_size)
    return model
