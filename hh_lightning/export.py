"""The deployable on-disk format of a folded model, and its loader.

A saved directory holds:

* ``config.json`` (and ``generation_config.json``): the transformers config,
  plus ``quantization_config`` (``quant_method: hh_lightning``) and a load guard,
  so that ``AutoModelForCausalLM.from_pretrained`` loads the export after
  ``import hh_lightning`` and refuses it, naming the package, without
  (``hf_integration.py``). Exports saved before these keys still load with
  ``load_quantized``.
* the tokenizer's files (its chat template included), when one is given.
* ``model.safetensors``: every tensor the folded model needs, named as in its
  ``state_dict``. A quantized linear's ``codes`` are bit-packed (``pack_codes``,
  1-D uint8); its ``scale`` and ``zero`` are stored in the smallest lossless
  form (``zero`` as uint8 when it holds small integers only, as symmetric
  grids do; either as fp16 when every value is fp16-representable, as HQQ's
  are) and cast back to their recorded dtype on load, so a reload is exact.
  Each online rotation stores what its structure needs (``structured.py``):
  reflection vectors, Kronecker factor vectors, int8 signs; fixed Hadamard
  factors are rebuilt from the dimension. ``fold_`` rounds the learned values
  to ``quant.rotation_dtype`` before folding, so they are stored in 16 bits
  with no loss and the folded weights match them exactly. Embeddings,
  lm_head and the final norm are stored in 16 bits (``_sixteen_bit``). Tensors that are one object
  in the model (q/k/v's shared transform, tied embeddings) are stored once;
  the others are listed as ``aliases``. Weightless norms (``γ = 1``) and the
  head-mode ``R_o`` (merged into ``v_proj``/``o_proj`` at fold time) are left
  out: the loader rebuilds them.
* ``quantization_config.json``: format name and version, the package version,
  the ``BlockQuantConfig``, per-layer rotation specs and per-linear bits,
  group size and shape, aliases, the byte size and sha256 of
  ``model.safetensors`` and ``config.json`` (and ``generation_config.json``),
  and of every other file the export holds (the tokenizer's included), and
  the sha256 of its own content (``content_sha256``). All are checked
  before anything is loaded: an edit to any of them, even a valid one such
  as ``a_bits`` 4 → 8 or two token ids swapped, would change the results,
  so it is refused, naming the file.

Packing (``pack_codes``): ``b``-bit codes (``b ≤ 7``) are taken 8 at a time;
8 codes fill exactly ``b`` bytes. Code ``i`` of a group occupies bits
``[i·b, (i+1)·b)`` of a little-endian ``8b``-bit word, so for ``b ∈ {1, 2, 4}``
this is the usual "first code in the low bits of the byte" layout. 8-bit
codes are stored as they are.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .block import BlockQuantConfig, HHDecoderBlock, wrap_model
from .errors import check_device, check_type
from .files import check_writable_directory, content_sha256, file_record, fsync_path, verify_file_record
from .hf_integration import LOAD_GUARD_KEY
from .linear import FoldedLinear

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QUANT_CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_quantized",
    "verify_export",
    "export_size",
    "fp16_model_bytes",
    "pack_codes",
    "packed_numel",
    "save_quantized",
    "unpack_codes",
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


def pack_block_codes_(block: HHDecoderBlock) -> HHDecoderBlock:
    """Replace every folded linear's codes by their packed 1-D bytes (in place), e.g. before saving."""
    for module in block.linears.values():
        if isinstance(module, FoldedLinear) and module.codes is not None and module.codes.dim() == 2:
            module.codes = pack_codes(module.codes, module.bits)
    return block


def unpack_block_codes_(block: HHDecoderBlock) -> HHDecoderBlock:
    """Inverse of ``pack_block_codes_``: codes back to ``(out, in)`` uint8 (in place)."""
    for module in block.linears.values():
        if isinstance(module, FoldedLinear) and module.codes is not None and module.codes.dim() == 1:
            module.codes = unpack_codes(module.codes, module.bits, (module.out_features, module.in_features))
    return block


# --------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: expected a transformers causal LM "
                         "(Qwen2 or Llama)")
    return layers


def _folded_blocks(model: nn.Module) -> dict[str, HHDecoderBlock]:
    """``{state_dict prefix: block}`` for every decoder layer; refuses anything not folded."""
    layers = _decoder_layers(model)
    if len(layers) == 0:
        raise ValueError("the model has no decoder layers to save")
    prefixes = {id(module): name for name, module in model.named_modules()}
    blocks: dict[str, HHDecoderBlock] = {}
    for index, layer in enumerate(layers):
        name = prefixes[id(layer)]
        if not isinstance(layer, HHDecoderBlock):
            raise ValueError(f"layer {index} ({name}) is a {type(layer).__name__}, not an HHDecoderBlock: "
                             "wrap the model with wrap_model() and fold every block before saving")
        if not layer.is_folded:
            unfolded = [linear for linear, module in layer.linears.items() if not isinstance(module, FoldedLinear)]
            raise ValueError(f"layer {index} ({name}) is not folded ({', '.join(unfolded)} still unfolded): "
                             "call block.fold_() on every block before saving")
        blocks[name] = layer
    return blocks


def _rebuilt_keys(prefix: str, block: HHDecoderBlock) -> set[str]:
    """Keys of ``block`` the loader rebuilds itself, so the file need not hold them."""
    keys = {f"{prefix}.input_norm.weight", f"{prefix}.post_attention_norm.weight"}
    if block.quant.o_rotation == "head" and block.o_rotation is not None:
        # Merged into v_proj/o_proj by fold(): nothing of it runs online.
        keys |= {f"{prefix}.o_rotation.{key}" for key in block.o_rotation.state_dict()}
    return keys


def _is_all_ones(tensor: torch.Tensor) -> bool:
    return bool(torch.all(tensor == 1))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _identity(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """Key equal for two tensors exactly when they are the same view of the same memory."""
    if tensor.numel() == 0:
        return None
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _linear_entry(module: FoldedLinear) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": [module.out_features, module.in_features], "bits": module.bits,
                             "quantized": module.codes is not None}
    if module.codes is not None:
        entry["group_size"] = module.group_size
        entry["scale_dtype"] = _dtype_name(module.scale.dtype)
        entry["zero_dtype"] = _dtype_name(module.zero.dtype)
    return entry


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """The smallest lossless stored form of a scale or zero: uint8, fp16, or itself.

    Symmetric grids have integer zeros (``2^(bits-1)``): one byte each.
    HQQ's scales and zeros are fp16-representable (``weight_only``): two bytes.
    The loader casts back to the dtype recorded in the metadata.
    """
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    if bool(torch.all((tensor == tensor.round()) & (tensor >= 0) & (tensor <= 255))):
        return tensor.to(torch.uint8)
    if tensor.dtype in (torch.float32, torch.float64) and torch.equal(tensor.half().to(tensor.dtype), tensor):
        return tensor.half()
    return tensor


def _exact_sixteen_bit(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` as bf16 or fp16 where that cast is exact, else ``None``."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.element_size() <= 2:
        return None
    for dtype in (torch.bfloat16, torch.float16):
        cast = tensor.to(dtype)
        if torch.equal(cast.to(tensor.dtype), tensor):
            return cast
    return None


def _sixteen_bit(tensor: torch.Tensor, fallback: torch.dtype) -> torch.Tensor:
    """``tensor`` in a 16-bit float: bf16 or fp16 where that is exact (a bf16 model loaded in fp32),
    else ``fallback`` (rounded)."""
    exact = _exact_sixteen_bit(tensor)
    return exact if exact is not None else tensor.detach().cpu().to(fallback)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------
def _write_json(path: Path, values: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(values, handle, indent=2, sort_keys=False)
        handle.write("\n")


def _replace_directory(staging: Path, directory: Path) -> None:
    """Move the complete ``staging`` to ``directory``; an old ``directory`` is renamed aside first.

    At every instant the final name holds either the complete old or the
    complete new content (or, between two renames, nothing).
    """
    if not (directory.exists() or directory.is_symlink()):
        os.replace(staging, directory)
        return
    if not directory.is_dir() or directory.is_symlink():
        raise FileExistsError(f"{directory} exists and is not a directory; not replacing it")
    aside = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(directory, aside)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(aside, directory)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _read_quant_config(directory: Path) -> dict[str, Any]:
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


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes and byte offsets)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupted safetensors header ({error})") from error


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------
def _head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{state-dict prefix: module}`` of the embedding table and (when present) the lm_head."""
    names = {module: name for name, module in model.named_modules()}
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {names[module]: module for module in modules if module is not None}


def _int8_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{prefix.codes, prefix.scale}`` of the embedding table and lm_head as per-row int8 (``kernels.int8_rows``);
    a tied pair shares one set (the same tensors under both names)."""
    from .kernels import int8_rows

    state: dict[str, torch.Tensor] = {}
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, module in _head_modules(model).items():
        if getattr(module, "bias", None) is not None:
            raise ValueError(f"head='int8' takes a bias-free lm_head; {prefix} has a bias")
        weight = module.weight
        key = id(weight)
        if key not in done:
            done[key] = int8_rows(weight.detach())
        state[f"{prefix}.codes"], state[f"{prefix}.scale"] = done[key]
    return state


def _collect_tensors(model: nn.Module, blocks: dict[str, HHDecoderBlock], storage_dtype: torch.dtype,
                     head: str = "fp") -> tuple[dict[str, torch.Tensor], dict[str, str], list[dict[str, Any]]]:
    """The tensors to write, the aliases, and per-layer metadata.

    Float tensors outside the decoder blocks (embeddings, lm_head, the final
    norm) are stored in ``storage_dtype``; the blocks' own tensors keep theirs.
    ``head='int8'``: the embedding table and lm_head as per-row int8 codes and
    float32 scales instead (``_int8_head_state``).
    """
    folded = {f"{prefix}.linears.{name}": module for prefix, block in blocks.items()
              for name, module in block.linears.items()}
    rebuilt: set[str] = set()
    for prefix, block in blocks.items():
        rebuilt |= _rebuilt_keys(prefix, block)

    state = model.state_dict()
    if head == "int8":
        head_weights = {f"{prefix}.weight" for prefix in _head_modules(model)}
        state = {**{key: value for key, value in state.items() if key not in head_weights},
                 **_int8_head_state(model)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        if key in rebuilt and (not key.endswith("norm.weight") or _is_all_ones(value)):
            continue
        identity = _identity(value)
        if identity is not None and identity in first_of:
            aliases[key] = first_of[identity]
            continue
        if identity is not None:
            first_of[identity] = key
        owner, _, leaf = key.rpartition(".")
        module = folded.get(owner)
        if module is not None and leaf == "codes":
            value = pack_codes(value.cpu(), module.bits)
        elif module is not None and leaf in ("scale", "zero"):
            value = _compact(value)
        elif key.endswith(".scale") and head == "int8" and key.rpartition(".")[0] in _head_modules(model):
            pass  # the int8 rows' float32 scales: kept exact
        elif value.is_floating_point() and not any(key.startswith(f"{prefix}.") for prefix in blocks):
            value = _sixteen_bit(value, storage_dtype)
        elif _ROTATION_KEY.search(key) and (exact := _exact_sixteen_bit(value)) is not None:
            value = exact  # fold_ rounded the rotations to quant.rotation_dtype: 16 bits lose nothing
        tensors[key] = value.detach().cpu().contiguous()

    # safetensors refuses distinct entries over one storage (e.g. views); give those their own copy.
    owners: dict[int, str] = {}
    for key, value in tensors.items():
        if value.numel() == 0:
            continue
        pointer = value.untyped_storage().data_ptr()
        if pointer in owners:
            tensors[key] = value.clone()
        else:
            owners[pointer] = key

    layers_meta = []
    for prefix, block in blocks.items():
        entry: dict[str, Any] = {
            "prefix": prefix,
            "rotations": {name: rotation.spec() for name, rotation in block.rotations().items()},
            "linears": {name: _linear_entry(module) for name, module in block.linears.items()},
        }
        layers_meta.append(entry)
    return tensors, aliases, layers_meta


def model_storage_dtype(config: Any) -> torch.dtype:
    """The 16-bit dtype for tensors that are not exactly bf16 or fp16: ``config.dtype`` if it is one, else fp16.

    A bf16 or fp16 checkpoint loaded in fp32 casts back without loss (the
    exact cast is found per tensor). Weights that fit neither exactly, as a
    GGUF dequantized to fp32, are rounded to this dtype.
    """
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _add_transformers_entries(config_path: Path, quant: dict[str, Any], dtype: torch.dtype) -> None:
    """Write ``quantization_config`` and the load guard into a saved ``config.json`` (``hf_integration``).

    ``PretrainedConfig.save_pretrained`` drops ``transformers_weights``, so both
    keys are added to the written file; the model's own config is left as it is.
    """
    from .hf_integration import transformers_config_entries

    values = json.loads(config_path.read_text(encoding="utf-8"))
    values.update(transformers_config_entries({"block_quant_config": quant, "format_version": FORMAT_VERSION,
                                               "hh_lightning_version": __version__, "dtype": _dtype_name(dtype)}))
    _write_json(config_path, values)


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                   extra_metadata: dict[str, Any] | None = None,
                   storage_dtype: torch.dtype | None = None, head: str = "fp") -> Path:
    """Write a folded model to ``directory`` (replacing it atomically); returns its path.

    ``model``: a transformers causal LM (Qwen2/Llama) whose every decoder
    layer is an ``HHDecoderBlock`` after ``fold_()``. ``tokenizer``: saved
    alongside when given. ``extra_metadata``: JSON-serializable, stored
    under ``"extra"`` in ``quantization_config.json``. ``storage_dtype``: the
    16-bit dtype of the embeddings, lm_head and final norm where neither bf16
    nor fp16 holds them exactly (default ``model_storage_dtype(model.config)``);
    the loader casts them back to the model's dtype. ``head``: ``fp`` stores the
    embedding table and lm_head as 16-bit weights; ``int8`` as per-row int8 codes
    with a float32 scale a row (a bias-free lm_head; tied tables stored once), so
    the file holds what ``load_quantized(head="int8")`` serves.

    Everything is written to a hidden sibling directory first and renamed
    into place at the end, so a crash never leaves a partial directory
    under the final name. Bad arguments raise before anything is written:
    ``TypeError`` for a wrong type, ``FileExistsError`` when ``directory`` is
    a file, ``ValueError`` otherwise, each one line naming the argument.
    """
    check_type("model", model, nn.Module, "a transformers causal LM with folded HHDecoderBlocks")
    check_type("directory", directory, (str, os.PathLike), "a directory path")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer: expected a transformers tokenizer (with save_pretrained), "
                        f"got {type(tokenizer).__name__}")
    if extra_metadata is not None:
        check_type("extra_metadata", extra_metadata, dict, "a dict of JSON values")
    if head not in STORED_HEADS:
        raise ValueError(f"head={head!r} is not one of {STORED_HEADS}")
    if storage_dtype is not None and storage_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"storage_dtype={storage_dtype!r} must be torch.float16 or torch.bfloat16 (or None)")
    # abspath, not resolve: "." gets a real name, and a symlink is refused rather than followed.
    directory = Path(os.path.abspath(os.fspath(directory)))
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise FileExistsError(f"directory: {directory} exists and is not a directory; not replacing it")
    check_writable_directory(directory.parent, "directory")
    blocks = _folded_blocks(model)
    extra = dict(extra_metadata or {})
    try:
        json.dumps(extra)
    except TypeError as error:
        raise ValueError(f"extra_metadata must be JSON-serializable: {error}") from None

    storage_dtype = storage_dtype or model_storage_dtype(model.config)
    tensors, aliases, layers_meta = _collect_tensors(model, blocks, storage_dtype, head)
    first_block = next(iter(blocks.values()))
    global_quant = first_block.quant.to_dict()
    for entry, block in zip(layers_meta, blocks.values()):
        if block.quant.to_dict() != global_quant:
            entry["block_quant_config"] = block.quant.to_dict()
    embedding = model.get_input_embeddings().weight

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        model.config.save_pretrained(staging)
        _add_transformers_entries(staging / "config.json", global_quant, embedding.dtype)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        weights = staging / WEIGHTS_NAME
        save_file(tensors, weights, metadata={"format": "pt"})
        fsync_path(weights)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "hh_lightning_version": __version__,
            "model_type": model.config.model_type,
            "dtype": _dtype_name(embedding.dtype),
            "storage_dtype": _dtype_name(storage_dtype),
            "head": head,
            "block_quant_config": global_quant,
            "layers": layers_meta,
            "aliases": aliases,
            # Every file the export holds; this one vouches for itself through content_sha256.
            "files": {name: file_record(staging / name) for name in _export_files(staging)},
            "extra": extra,
        }
        meta[CONTENT_HASH_KEY] = content_sha256(meta, exclude=CONTENT_HASH_KEY)
        _write_json(staging / QUANT_CONFIG_NAME, meta)
        fsync_path(staging / QUANT_CONFIG_NAME)
        fsync_path(staging)
        _replace_directory(staging, directory)
        fsync_path(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _export_files(directory: Path) -> list[str]:
    """The files of an export as ``files`` records them: relative paths, all but ``QUANT_CONFIG_NAME``."""
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                  if path.is_file() and path.name != QUANT_CONFIG_NAME)


def verify_export(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a saved model before anything reads it; returns its ``quantization_config.json``.

    That file must match its ``content_sha256``, and every file it records (``RECORDED_FILES``
    at least) its size and sha256: a ``ValueError`` (``FileNotFoundError`` for a missing
    file) naming the file otherwise.
    """
    directory = Path(directory)
    meta = _read_quant_config(directory)
    records = meta.get("files", {})
    required = RECORDED_FILES if meta["format_version"] >= 3 else (WEIGHTS_NAME,)
    for name in dict.fromkeys([*required, *records]):
        record = records.get(name)
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
            raise ValueError(f"{directory / QUANT_CONFIG_NAME} has no size/sha256 record for {name}")
        verify_file_record(directory / name, record)
    return meta


def _check_load_arguments(directory: Any, device: Any, dtype: Any, integer_config: Any) -> None:
    """``load_quantized``'s arguments, before anything is read: one-line errors naming the argument."""
    check_type("directory", directory, (str, os.PathLike), "the path of a saved hh_lightning model")
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"directory: {path} not found")
    if not path.is_dir():
        raise ValueError(f"directory: {path} is a file, not a saved hh_lightning model's directory")
    check_device(device, "device", allow_auto=False)
    if dtype is not None:
        check_type("dtype", dtype, torch.dtype, "a torch dtype such as torch.bfloat16 (or None)")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point dtype")
    if integer_config is not None:
        from .integer import IntegerKernelConfig

        check_type("integer_config", integer_config, IntegerKernelConfig, "an IntegerKernelConfig (or None)")
        try:
            integer_config.validate()
        except ValueError as error:
            raise ValueError(f"integer_config: {error}") from None


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------
def _saved_quant(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``BlockQuantConfig`` dict; version 1 files predate structures: theirs are ``householder``."""
    return {"rotation_structure": "householder", **saved}


def _loading_config(saved: dict[str, Any], rotations: dict[str, dict[str, Any]]) -> BlockQuantConfig:
    """A config that builds a block with the saved rotation structures and no costly init.

    The learned values are read from the file, so the rotations start as
    identity (``hadamard``'s QR or a PCA would be wasted work) with the
    recorded sizes.
    """
    values = _saved_quant(saved)
    values["rotation_init"] = "identity"
    for name in ROTATION_NAMES:
        spec = rotations.get(name)
        values[f"{name}_reflections"] = 0 if spec is None else spec.get("reflections", spec["dim"])
    return BlockQuantConfig.from_dict(values)


def _set_linear_buffers(module: FoldedLinear, entry: dict[str, Any], key: str,
                        read: Callable[[str], torch.Tensor | None], path: Path) -> None:
    """Give ``module`` the file's tensors (shapes and bits may differ from what fold() built).

    ``read(name)``: the file's tensor ``name`` (a fresh tensor, not a view of the file), or ``None``.
    """
    out_features, in_features = entry["shape"]
    if (out_features, in_features) != (module.out_features, module.in_features):
        raise ValueError(f"{path}: {key} is {out_features}x{in_features} in the file but "
                         f"{module.out_features}x{module.in_features} in the model built from config.json")
    bits = int(entry["bits"])
    module.bits = bits
    module.bias = read(f"{key}.bias")
    if entry["quantized"]:
        packed, scale, zero = (read(f"{key}.{leaf}") for leaf in ("codes", "scale", "zero"))
        if packed is None or scale is None or zero is None:
            raise ValueError(f"{path}: codes, scale or zero of {key} are missing")
        codes = unpack_codes(packed, bits, (out_features, in_features))
        scale = scale.to(_dtype_from_name(entry["scale_dtype"]))
        zero = zero.to(_dtype_from_name(entry["zero_dtype"]))
        module.weight, module.codes, module.scale, module.zero = None, codes, scale, zero
    else:
        weight = read(f"{key}.weight")
        if weight is None:
            raise ValueError(f"{path}: the weight of {key} is missing")
        module.weight, module.codes, module.scale, module.zero = weight, None, None, None


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``key`` of ``model`` (a frozen parameter stays one)."""
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(
            tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


# Tensors of a loaded block that neither the file nor the block's constructor fills: the weightless
# norms (γ = 1 after the fold; the file holds γ only where it is not all ones) and the γ copies
# weight_only keeps to undo a fold (ones, as a model built from its config has them).
_ONES_LEAVES = ("input_norm.weight", "post_attention_norm.weight", "input_gamma", "post_attention_gamma")


class _TensorReader:
    """A saved ``model.safetensors`` read one tensor at a time, each a fresh copy.

    The loader's memory is what it keeps, not the file: pages read through a memory map stay
    resident until it is unmapped, so ``unmap()`` reopens the map (after each layer), and a tensor
    over ``LOAD_CHUNK_BYTES`` (an embedding) is read in row chunks, the map reopened after each, so
    that its file pages and its (cast) copy are never resident together. ``aliases`` map a tied
    name onto the stored one.
    """

    def __init__(self, path: Path, aliases: dict[str, str]) -> None:
        self.path, self.aliases = path, aliases
        try:
            self._file = safe_open(str(path), framework="pt")
            self.stored = set(self._file.keys())
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} could not be read: {error}") from error
        for alias, canonical in aliases.items():
            if canonical not in self.stored:
                raise ValueError(f"{path}: alias {alias} points at missing tensor {canonical}")
        self._consumed: set[str] = set()

    def canonical(self, key: str) -> str:
        return self.aliases.get(key, key)

    def unmap(self) -> None:
        """Drop the memory map (and the pages read through it); later reads open a new one."""
        self._file = safe_open(str(self.path), framework="pt")

    def unread(self) -> list[str]:
        """The stored tensors nothing has read, sorted."""
        return sorted(self.stored - self._consumed)

    @staticmethod
    def _copy(chunk: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        # Always a copy: the tensor safetensors hands out may be a view of the memory map.
        if dtype is not None and chunk.is_floating_point() and chunk.dtype != dtype:
            return chunk.to(dtype)
        return chunk.clone()

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The tensor ``key`` (through its alias), cast to ``dtype`` if given and it is a float;
        ``None`` if the file does not hold it."""
        canonical = self.canonical(key)
        if canonical not in self.stored:
            return None
        chunks = self.read_rows(canonical, dtype)
        start, first = next(chunks)
        shape = self._file.get_slice(canonical).get_shape()
        if first.shape[:1] == tuple(shape[:1]):  # one chunk: the whole tensor
            return first
        out = torch.empty(shape, dtype=first.dtype)
        out[:first.shape[0]] = first
        for start, chunk in chunks:
            out[start:start + chunk.shape[0]] = chunk
        return out

    def read_rows(self, key: str, dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` copies of the stored tensor ``key`` (through its alias), in order, each of
        at most ``LOAD_CHUNK_BYTES`` once cast to ``dtype`` (one chunk when the whole tensor fits), the
        map reopened after each; a 0-d or empty tensor is one chunk."""
        canonical = self.canonical(key)
        self._consumed.add(canonical)
        shape = self._file.get_slice(canonical).get_shape()
        # The first row gives the stored (or cast) element size without reading the whole tensor.
        first = self._copy(self._file.get_slice(canonical)[0:1], dtype) if shape and shape[0] > 0 else None
        if first is None or math.prod(shape) * first.element_size() <= LOAD_CHUNK_BYTES:
            yield 0, self._copy(self._file.get_tensor(canonical), dtype)
            return
        step = max(1, LOAD_CHUNK_BYTES // max(1, first.numel() * first.element_size()))
        for start in range(0, shape[0], step):
            yield start, self._copy(self._file.get_slice(canonical)[start:start + step], dtype)
            self.unmap()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library is another."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Each layer's unpacking and packing frees temporaries several times the size of what it keeps.
    glibc keeps such blocks in its heap once its mmap threshold has grown, and the kept tensors
    allocated after them pin the holes: without this the load's peak resident memory grew by
    about three times the quantized model's size.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


LOAD_KERNELS = (None, "int4", "w4a4")
LOAD_HEADS = ("fp", "int8")
# How save_quantized stores the embedding table and lm_head.
STORED_HEADS = ("fp", "int8")
# Tensors larger than this are read in row chunks of about this size (_TensorReader.read).
LOAD_CHUNK_BYTES = 32 * 2**20


def _head_from_file_(model: nn.Module, reader: _TensorReader, dtype: torch.dtype, stored: str, served: str
                     ) -> set[str]:
    """Set ``model``'s embedding table and ``lm_head`` from the file when either side is int8; returns the
    state-dict keys now set.

    ``stored``: how the export holds them (``fp`` 16-bit weights, ``int8`` codes and scales). ``served``:
    ``int8`` makes them ``Int8Embedding`` / ``Int8Linear`` (one set of rows when tied): stored codes as
    they are, 16-bit weights quantized chunk by chunk as they are read, so the table is never whole in
    16 bits in memory. ``fp`` from stored int8 rows: the weights ``codes · scale`` in ``dtype``.
    """
    from .kernels import Int8Embedding, Int8Linear, RowsLinear, int8_rows

    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def int8_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = "codes" if stored == "int8" else "weight"
        key = reader.canonical(f"{names[module]}.{leaf}")
        if key not in rows:
            if key not in reader.stored:
                raise ValueError(f"{reader.path}: {key} is not in the file")
            if stored == "int8":
                rows[key] = reader.read(key), reader.read(reader.canonical(f"{names[module]}.scale"))
            else:
                codes = torch.empty(module.weight.shape, dtype=torch.int8)
                scale = torch.empty(module.weight.shape[0])
                for start, chunk in reader.read_rows(key):
                    codes[start:start + chunk.shape[0]], scale[start:start + chunk.shape[0]] = int8_rows(chunk)
                rows[key] = codes, scale
        return rows[key]

    if head is not None and getattr(head, "bias", None) is not None:
        raise ValueError(f"head='int8' takes a bias-free lm_head; {names[head]} has a bias")
    prefixes = (names[embedding], *(() if head is None else (names[head],)))
    if served == "int8":
        model.set_input_embeddings(Int8Embedding(*int8_of(embedding), dtype=dtype))
        if head is not None:
            model.set_output_embeddings(Int8Linear(*int8_of(head)))
        return {key for key in model.state_dict() if key.rsplit(".", 1)[0] in prefixes}
    weights: dict[int, nn.Parameter] = {}
    for module in (embedding, *(() if head is None else (head,))):
        codes, scale = int8_of(module)
        if id(codes) not in weights:  # tied: one parameter for both
            weights[id(codes)] = nn.Parameter((codes.float() * scale[:, None]).to(dtype), requires_grad=False)
        module.weight = weights[id(codes)]
    if head is not None and type(head) is nn.Linear:
        model.set_output_embeddings(RowsLinear.sharing(head))
    return {f"{prefix}.weight" for prefix in prefixes}


def load_quantized(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                   kernels: str | None = None, dtype: torch.dtype | None = None, head: str = "fp",
                   integer_config: Any = None) -> nn.Module:
    """Rebuild a runnable folded model saved by ``save_quantized``.

    ``kernels``: ``None`` (default) keeps the dequantizing ``FoldedLinear``s;
    ``"int4"`` serves every 4-bit linear through the packed-int4 matmul
    (``kernels.use_int4_kernels_``: grids it cannot take stay dequantizing, with a warning);
    ``"w4a4"`` multiplies the activation codes by the weight codes in integers and keeps a
    quantized KV cache as packed codes (``integer.use_integer_kernels_``, set by ``integer_config``, an
    ``IntegerKernelConfig``; linears it cannot take stay dequantizing, with a warning).
    ``dtype``: the dtype of the float parts outside the linears' grids (embeddings, lm_head,
    norms, attention); default the saved model's (``quantization_config.json``'s ``dtype``).
    ``head``: ``fp`` keeps the embedding table and lm_head as saved (16-bit, cast to ``dtype``);
    ``int8`` serves them from per-row int8 codes (``kernels.Int8Embedding``/``Int8Linear``: a
    quarter of their fp32 memory, the lm_head through the int8 matmul), an extra rounding the
    export does not hold.

    Checks its arguments (a one-line ``TypeError``, ``ValueError`` or ``FileNotFoundError`` naming
    the argument), then the files (``verify_export``: a ``ValueError`` naming the file), builds the transformers
    model from the saved config on the meta device (no download, no FP weight allocated), wraps
    and folds every layer, then reads the tensors one by one. Returns the model in eval mode on
    ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    _check_load_arguments(directory, device, dtype, integer_config)
    if kernels not in LOAD_KERNELS:
        raise ValueError(f"kernels={kernels!r}: use one of {LOAD_KERNELS}")
    if head not in LOAD_HEADS:
        raise ValueError(f"head={head!r}: use one of {LOAD_HEADS}")
    directory = Path(directory).expanduser()
    meta = verify_export(directory)
    weights_path = directory / WEIGHTS_NAME

    config = AutoConfig.from_pretrained(directory)
    # The entries that route from_pretrained through hf_integration; a model built here needs neither.
    for key in ("quantization_config", LOAD_GUARD_KEY):
        config.__dict__.pop(key, None)
    dtype = _dtype_from_name(meta["dtype"]) if dtype is None else dtype
    # Built on the meta device: no FP weight is ever allocated, so the load's peak memory is the
    # quantized model's, not the FP skeleton's. The rotary embedding is rebuilt for real (its
    # frequencies are not saved), before the blocks copy it.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    layers = _decoder_layers(model)
    if len(layers) != len(meta["layers"]):
        raise ValueError(f"{directory / QUANT_CONFIG_NAME} describes {len(meta['layers'])} layers, "
                         f"the config has {len(layers)}")
    saved_configs = []
    for index, entry in enumerate(meta["layers"]):
        saved = entry.get("block_quant_config", meta["block_quant_config"])
        wrap_model(model, _loading_config(saved, entry["rotations"]), layer_indices=[index], own_device="cpu")
        block = layers[index]
        block.fold_(codes_from_file=True)
        saved_configs.append(BlockQuantConfig.from_dict(_saved_quant(saved)))
        built = {name: rotation.spec() for name, rotation in block.rotations().items()}
        for name, spec in entry["rotations"].items():
            if built.get(name, {}).get("structure", "householder") != spec.get("structure", "householder"):
                raise ValueError(f"{directory / QUANT_CONFIG_NAME}: layer {index} rotation {name} is "
                                 f"{spec}, but the rebuilt block has {built.get(name)}")

    reader = _TensorReader(weights_path, meta.get("aliases", {}))
    read = reader.read
    from .kernels import use_int4_kernels_

    # The kernels' packing is the device's own: on the CPU it happens layer by layer, elsewhere
    # once the model is there.
    pack_while_reading = torch.device(device).type == "cpu"
    placed: set[str] = set()
    for index, entry in enumerate(meta["layers"]):
        block, prefix = layers[index], entry["prefix"]
        block.quant = saved_configs[index]
        for name, linear_entry in entry["linears"].items():
            _set_linear_buffers(block.linears[name], linear_entry, f"{prefix}.linears.{name}", read,
                                weights_path)
        if kernels == "int4" and pack_while_reading:
            # Packed as each layer is read, so the 1-byte codes of only one layer are ever held.
            use_int4_kernels_(block, prefix=prefix)
        reader.unmap()
        _return_freed_memory()
        # The linears' own tensors are set; their (shared) transforms still come from the file below.
        placed |= {f"{prefix}.linears.{name}.{leaf}" for name, linear in block.linears.items()
                   for leaf in (*linear._parameters, *linear._buffers)}
        placed |= {f"{prefix}.fused_linears.{group}.{leaf}" for group, fused in block.fused_linears.items()
                   for leaf in fused._buffers}

    stored_head = meta.get("head", "fp")
    if "int8" in (head, stored_head):
        placed |= _head_from_file_(model, reader, dtype, stored_head, head)
        _return_freed_memory()
    # Every other tensor: from the file (cast once to the model's dtype; tied names share one
    # tensor), else rebuilt by the block itself, else (the norms' γ = 1) ones.
    rebuilt = set().union(*(_rebuilt_keys(entry["prefix"], layers[index])
                            for index, entry in enumerate(meta["layers"])))
    loaded: dict[str, torch.Tensor] = {}
    missing = []
    for key, current in model.state_dict(keep_vars=True).items():
        if key in placed:
            continue
        canonical = reader.canonical(key)
        if canonical in reader.stored:
            if canonical not in loaded:
                tensor = read(canonical, current.dtype if current.is_floating_point() else None)
                if tuple(tensor.shape) != tuple(current.shape):
                    raise ValueError(f"{weights_path}: {key} is {tuple(tensor.shape)} in the file but "
                                     f"{tuple(current.shape)} in the model built from config.json")
                loaded[canonical] = (nn.Parameter(tensor, requires_grad=False)
                                     if isinstance(current, nn.Parameter) else tensor)
            _set_tensor(model, key, loaded[canonical])
        elif current.device.type == "meta" and key.endswith(_ONES_LEAVES):
            _set_tensor(model, key, torch.ones(current.shape, dtype=current.dtype))
        elif key not in rebuilt:
            missing.append(key)
    for name, buffer in model.named_buffers():
        if buffer.device.type == "meta" and name.endswith(_ONES_LEAVES):  # non-persistent: not in state_dict
            _set_tensor(model, name, torch.ones(buffer.shape, dtype=buffer.dtype))
    unexpected = reader.unread()
    del loaded, read, reader  # closes the file's memory map
    _return_freed_memory()
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {unexpected[:5]}")
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
               if tensor.device.type == "meta"]
    if on_meta:  # a bug here, not in the file: say so rather than fail later with a meta-tensor error
        raise RuntimeError(f"load_quantized left {on_meta[:5]} unset")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model = model.to(device).eval()
    if kernels == "int4" and not pack_while_reading:
        use_int4_kernels_(model)
    head_module = model.get_output_embeddings()
    if type(head_module) is nn.Linear:
        from .kernels import RowsLinear

        model.set_output_embeddings(RowsLinear.sharing(head_module))
    if kernels == "w4a4":
        from .integer import use_integer_kernels_

        use_integer_kernels_(model, integer_config)
    # Before any forward: built lazily inside the first long prefill, these small caches pinned about
    # 110 MiB of its temporaries in the heap (SmolLM2 W4A4 as W4A16, 512 tokens; README).
    for layer in layers:
        for rotation in layer.online_rotations().values():
            rotation.build_inference_cache_(model.dtype)
    return model


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------
SIZE_KINDS = ("codes", "scales", "rotations", "embeddings", "other")
_ROTATION_KEY = re.compile(r"(^|\.)(rotation|o_rotation|kv_rotation)\.")


def _size_kind(key: str) -> str:
    """Which of ``SIZE_KINDS`` a stored tensor counts under."""
    if _ROTATION_KEY.search(key):
        return "rotations"
    if ".linears." in key and key.endswith((".codes", ".scale", ".zero")):
        return "codes" if key.endswith(".codes") else "scales"
    if "embed_tokens" in key or key.startswith("lm_head."):
        return "embeddings"
    return "other"


def fp16_model_bytes(config: Any) -> int:
    """Bytes of the model ``config`` describes in fp16: 2 per parameter (tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 2 * sum(parameter.numel() for parameter in model.parameters())


def export_size(directory: str | os.PathLike) -> dict[str, Any]:
    """The whole ``model.safetensors`` of a saved model by kind of tensor, against the FP16 model.

    Returns ``{"file_bytes", "fp16_model_bytes", "ratio"`` (file / FP16 model),
    ``"by_kind": {kind: bytes}`` over ``SIZE_KINDS`` (``other`` holds the
    header, norms, biases and activation clip ratios; the kinds add up to the
    file), ``"share": {kind: bytes / file}``, and ``"linears"``: the quantized
    linears alone, ``{"quantized_bytes", "fp16_bytes", "ratio", "by_bits"}``
    (codes + scales + zeros against ``2 · out · in`` bytes)}``.
    """
    from transformers import AutoConfig

    directory = Path(directory)
    meta = _read_quant_config(directory)
    path = directory / WEIGHTS_NAME
    header = _read_safetensors_header(path)
    aliases = meta.get("aliases", {})
    file_bytes = path.stat().st_size

    def nbytes(key: str) -> int:
        start, end = header[aliases.get(key, key)]["data_offsets"]
        return end - start

    by_kind = dict.fromkeys(SIZE_KINDS, 0)
    for key in header:
        if key != "__metadata__":
            by_kind[_size_kind(key)] += nbytes(key)
    by_kind["other"] += file_bytes - sum(by_kind.values())  # the header

    by_bits: dict[int, dict[str, Any]] = {}
    for entry in meta["layers"]:
        for name, linear in entry["linears"].items():
            if not linear["quantized"]:
                continue
            key = f"{entry['prefix']}.linears.{name}"
            totals = by_bits.setdefault(int(linear["bits"]), {"quantized_bytes": 0, "fp16_bytes": 0})
            totals["quantized_bytes"] += sum(nbytes(f"{key}.{leaf}") for leaf in ("codes", "scale", "zero"))
            totals["fp16_bytes"] += 2 * linear["shape"][0] * linear["shape"][1]
    for totals in by_bits.values():
        totals["ratio"] = totals["quantized_bytes"] / totals["fp16_bytes"]
    quantized = sum(totals["quantized_bytes"] for totals in by_bits.values())
    fp16 = sum(totals["fp16_bytes"] for totals in by_bits.values())
    reference = fp16_model_bytes(AutoConfig.from_pretrained(directory))
    return {"file_bytes": file_bytes, "fp16_model_bytes": reference, "ratio": file_bytes / reference,
            "by_kind": by_kind, "share": {kind: size / file_bytes for kind, size in by_kind.items()},
            "linears": {"quantized_bytes": quantized, "fp16_bytes": fp16, "ratio": quantized / fp16 if fp16 else 0.0,
                        "by_bits": dict(sorted(by_bits.items()))}}
