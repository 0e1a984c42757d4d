"""The on-disk format of a folded model: file names, bit packing, grid storage, and its checks.

A saved directory holds:

* ``config.json`` (and ``generation_config.json``): the transformers config,
  plus ``quantization_config`` (``quant_method: hh_lightning``) and a load guard
  (``transformers_config_entries``), so that ``AutoModelForCausalLM.from_pretrained``
  loads the export after ``import hh_lightning`` and refuses it, naming the package,
  without (``hf_integration.py``). Exports saved before these keys still load with
  ``load_quantized``.
* the tokenizer's files (its chat template included), when one is given.
* ``model.safetensors``: every tensor the folded model needs, named as in its
  ``state_dict``. A quantized linear's ``codes`` are bit-packed (``pack_codes``,
  1-D uint8); its ``scale`` and ``zero`` are stored in the smallest lossless
  form (``compact_grid``: ``zero`` as uint8 when it holds small integers only, as
  symmetric grids do; either as fp16 when every value is fp16-representable, as
  HQQ's are) and cast back to their recorded dtype on load, so a reload is exact.
  Each online rotation stores what its structure needs (``structured.py``):
  reflection vectors, Kronecker factor vectors, int8 signs; fixed Hadamard
  factors are rebuilt from the dimension. ``fold_`` rounds the learned values
  to ``quant.rotation_dtype`` before folding, so they are stored in 16 bits
  with no loss and the folded weights match them exactly. Embeddings,
  lm_head and the final norm are stored in 16 bits, or (``head: int8``) the
  embedding table and lm_head as per-row int8 codes and float32 scales. Tensors
  that are one object in the model (q/k/v's shared transform, tied embeddings)
  are stored once; the others are listed as ``aliases``. Weightless norms
  (``γ = 1``) and the head-mode ``R_o`` (merged into ``v_proj``/``o_proj`` at
  fold time) are left out (``rebuilt_keys``): the loader rebuilds them.
* ``quantization_config.json``: format name and version, the package version,
  the ``BlockQuantConfig``, per-layer rotation specs and per-linear bits,
  group size and shape, aliases, the byte size and sha256 of
  ``model.safetensors`` and ``config.json`` (and ``generation_config.json``),
  and of every other file the export holds (the tokenizer's included), and
  the sha256 of its own content (``content_sha256``). All are checked
  (``verify_export``) before anything is loaded: an edit to any of them, even a
  valid one such as ``a_bits`` 4 → 8 or two token ids swapped, would change the
  results, so it is refused, naming the file.

Packing (``pack_codes``): ``b``-bit codes (``b ≤ 7``) are taken 8 at a time;
8 codes fill exactly ``b`` bytes. Code ``i`` of a group occupies bits
``[i·b, (i+1)·b)`` of a little-endian ``8b``-bit word, so for ``b ∈ {1, 2, 4}``
this is the usual "first code in the low bits of the byte" layout. 8-bit
codes are stored as they are.

Writing is ``export.py`` (``save_quantized``), reading ``loading.py`` (``load_quantized``). This
module sits below both, and below ``kernels.py`` and ``hf_integration.py``, which share its
names and its grid storage: it imports none of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__
from .files import content_sha256, verify_file_record

if TYPE_CHECKING:  # block.py imports models.py, which reads QUANT_CONFIG_NAME from here
    from .block import HHDecoderBlock

__all__ = [
    "CONTENT_HASH_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOAD_GUARD",
    "LOAD_GUARD_KEY",
    "QUANT_CONFIG_NAME",
    "QUANT_METHOD",
    "RECORDED_FILES",
    "ROTATION_NAMES",
    "STORED_HEADS",
    "SUMMARY_FIELDS",
    "WEIGHTS_NAME",
    "causal_lm_layers",
    "compact_grid",
    "dtype_from_name",
    "dtype_name",
    "pack_codes",
    "packed_numel",
    "read_quant_config",
    "rebuilt_keys",
    "transformers_config_entries",
    "unpack_codes",
    "verify_export",
]

FORMAT_NAME = "hh_lightning"
# 2: rotation structures (``rotation_structure``, per-rotation ``spec``); embeddings and norms in a
# storage dtype. 3: the ``files`` record also covers config.json (and generation_config.json), and
# ``quantization_config.json`` carries the sha256 of its own content. 4: the ``files`` record covers
# every file the export holds, the tokenizer's and its chat template included. 5: ``head`` says how the
# embedding table and lm_head are stored (``fp``: 16-bit weights; ``int8``: per-row int8 ``codes`` and
# float32 ``scale``). Versions 1-4 still load.
FORMAT_VERSION = 5
WEIGHTS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "quantization_config.json"
# Files whose size and sha256 every export of format 3 and later records; format 4 records every other
# file it holds as well (the tokenizer's, generation_config.json), format 1 and 2 only the weights.
RECORDED_FILES = (WEIGHTS_NAME, "config.json")
CONTENT_HASH_KEY = "content_sha256"
ROTATION_NAMES = ("qkv", "o", "upgate", "down", "kv")
# How save_quantized stores the embedding table and lm_head.
STORED_HEADS = ("fp", "int8")

# config.json's keys for transformers (hf_integration.py registers the method that reads them).
QUANT_METHOD = "hh_lightning"
# The config.json key transformers takes as the weights file name; a value that is not a ``*.safetensors`` name makes
# it raise a ValueError quoting the value, before it reads any weight.
LOAD_GUARD_KEY = "transformers_weights"
LOAD_GUARD = ("saved by hh_lightning: run `import hh_lightning` before from_pretrained (pip install hh_lightning); "
              "without it transformers would load random weights")
# BlockQuantConfig fields copied into config.json's quantization_config, for people and tools reading it.
SUMMARY_FIELDS = ("w_bits", "w_group_size", "w_symmetric", "a_bits", "kv_bits", "rotation_structure")


# 8 codes of b bits fill exactly b bytes, for every b.
_CODES_PER_WORD = 8


# --------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------
def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed: use an integer in 1..8")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    _check_pack_bits(bits)
    if bits == 8:
        return numel
    words = -(-numel // _CODES_PER_WORD)
    return words * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values in ``[0, 2**bits)``) densely into 1-D uint8.

    Returns ``packed_numel(codes.numel(), bits)`` bytes; the shape is not
    stored (``unpack_codes`` takes it). The tail is zero-padded to a multiple
    of 8 codes.
    """
    _check_pack_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes hold {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    padding = (-flat.numel()) % _CODES_PER_WORD
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    groups = flat.reshape(-1, _CODES_PER_WORD)
    # Accumulate one int64 word per group (8·bits ≤ 56 bits); the loops run over
    # the 8 code slots and the ≤ 7 bytes of a word, never over elements.
    words = torch.zeros(groups.shape[0], dtype=torch.int64, device=flat.device)
    for slot in range(_CODES_PER_WORD):
        words |= groups[:, slot].to(torch.int64) << (slot * bits)
    packed = torch.empty(groups.shape[0], bits, dtype=torch.uint8, device=flat.device)
    for byte in range(bits):
        packed[:, byte] = ((words >> (8 * byte)) & 0xFF).to(torch.uint8)
    return packed.reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 codes of ``shape`` from 1-D packed bytes."""
    _check_pack_bits(bits)
    shape = tuple(int(size) for size in shape)
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be 1-D uint8, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_numel(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits "
                         f"(expected {expected} bytes)")
    if bits == 8:
        return packed.reshape(shape).clone()
    if bits == 4:
        # Slot 2b of a word sits in byte b's low nibble, slot 2b + 1 in its high one: no wide temporaries.
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1)
        return codes.reshape(-1)[:numel].reshape(shape)
    groups = packed.reshape(-1, bits)
    words = torch.zeros(groups.shape[0], dtype=torch.int64, device=packed.device)
    for byte in range(bits):
        words |= groups[:, byte].to(torch.int64) << (8 * byte)
    mask = 2**bits - 1
    codes = torch.empty(groups.shape[0], _CODES_PER_WORD, dtype=torch.uint8, device=packed.device)
    for slot in range(_CODES_PER_WORD):
        codes[:, slot] = ((words >> (slot * bits)) & mask).to(torch.uint8)
    return codes.reshape(-1)[:numel].reshape(shape)


# --------------------------------------------------------------------------
# Grids, dtypes and the tensors the file leaves out
# --------------------------------------------------------------------------
def compact_grid(tensor: torch.Tensor) -> torch.Tensor:
    """The smallest lossless stored form of a grid's ``scale`` or ``zero``: uint8, fp16, or itself.

    ``tensor``: ``(out, 1)`` per channel or ``(out, in / group_size)`` per group, any dtype; the
    result has the same shape, on the CPU. Symmetric grids have integer zeros (``2^(bits-1)``):
    one byte each. HQQ's scales and zeros are fp16-representable (``weight_only``): two bytes.
    The reader casts back to the dtype recorded beside it (the export's metadata, an
    ``Int4Linear``'s ``grid_dtypes``), which gives the original values exactly.
    """
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    if bool(torch.all((tensor == tensor.round()) & (tensor >= 0) & (tensor <= 255))):
        return tensor.to(torch.uint8)
    if tensor.dtype in (torch.float32, torch.float64) and torch.equal(tensor.half().to(tensor.dtype), tensor):
        return tensor.half()
    return tensor


def dtype_name(dtype: torch.dtype) -> str:
    """How ``quantization_config.json`` names a dtype: ``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``dtype_name``; a ``ValueError`` for a name torch has no dtype for."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def causal_lm_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``, the decoder layers an export holds one entry each for; a ``ValueError``
    for a model without them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: expected a transformers causal LM "
                         "(Qwen2 or Llama)")
    return layers


def rebuilt_keys(prefix: str, block: HHDecoderBlock) -> set[str]:
    """Keys of ``block`` the loader rebuilds itself, so the file need not hold them."""
    keys = {f"{prefix}.input_norm.weight", f"{prefix}.post_attention_norm.weight"}
    if block.quant.o_rotation == "head" and block.o_rotation is not None:
        # Merged into v_proj/o_proj by fold(): nothing of it runs online.
        keys |= {f"{prefix}.o_rotation.{key}" for key in block.o_rotation.state_dict()}
    return keys


# --------------------------------------------------------------------------
# Metadata and integrity records
# --------------------------------------------------------------------------
def transformers_config_entries(meta: dict[str, Any]) -> dict[str, Any]:
    """The keys ``save_quantized`` adds to ``config.json``, from the ``quantization_config.json`` content ``meta``."""
    quant = meta["block_quant_config"]
    summary = {name: quant[name] for name in SUMMARY_FIELDS if name in quant}
    return {
        "quantization_config": {"quant_method": QUANT_METHOD, "format_version": meta["format_version"],
                                "hh_lightning_version": meta["hh_lightning_version"], "dtype": meta["dtype"],
                                "metadata_file": "quantization_config.json", **summary},
        LOAD_GUARD_KEY: LOAD_GUARD,
    }


def read_quant_config(directory: Path) -> dict[str, Any]:
    """``directory``'s ``quantization_config.json``, checked against its format and its ``content_sha256``
    (not the files it records: ``verify_export`` checks those)."""
    path = directory / QUANT_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a saved hh_lightning model")
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupted") from error
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: format={meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta.get('format_version')!r} is newer than this "
                         f"hh_lightning ({__version__}) reads (≤ {FORMAT_VERSION})")
    if meta["format_version"] >= 3 and meta.get(CONTENT_HASH_KEY) != content_sha256(meta, exclude=CONTENT_HASH_KEY):
        raise ValueError(f"{path} does not match its {CONTENT_HASH_KEY}: it was edited or damaged after saving, "
                         "and its settings decide how the weights are read; export the model again")
    return meta


def verify_export(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a saved model before anything reads it; returns its ``quantization_config.json``.

    That file must match its ``content_sha256``, and every file it records (``RECORDED_FILES``
    at least) its size and sha256: a ``ValueError`` (``FileNotFoundError`` for a missing
    file) naming the file otherwise.
    """
    directory = Path(directory)
    meta = read_quant_config(directory)
    records = meta.get("files", {})
    required = RECORDED_FILES if meta["format_version"] >= 3 else (WEIGHTS_NAME,)
    for name in dict.fromkeys([*required, *records]):
        record = records.get(name)
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
            raise ValueError(f"{directory / QUANT_CONFIG_NAME} has no size/sha256 record for {name}")
        verify_file_record(directory / name, record)
    return meta
