"""Writing a folded model in the deployable format (``save_quantized``), and what its file holds (``export_size``).

The format itself (file names, bit packing, grid storage, the integrity records and their checks)
is ``export_format.py``; reading it back is ``loading.py``. The names users import from here
(``load_quantized``, ``pack_codes``, the file names, ...) are re-exported from those modules, so
``from hh_lightning.export import load_quantized, save_quantized`` keeps working.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .block import HHDecoderBlock
from .errors import check_type
from .export_format import (
    CONTENT_HASH_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    QUANT_CONFIG_NAME,
    STORED_HEADS,
    WEIGHTS_NAME,
    causal_lm_layers,
    compact_grid,
    dtype_name,
    pack_codes,
    packed_numel,
    read_quant_config,
    rebuilt_keys,
    transformers_config_entries,
    unpack_codes,
    verify_export,
)
from .files import check_writable_directory, content_sha256, file_record, fsync_path
from .kernels import int8_rows
from .linear import FoldedLinear
from .loading import load_quantized

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


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------
def _folded_blocks(model: nn.Module) -> dict[str, HHDecoderBlock]:
    """``{state_dict prefix: block}`` for every decoder layer; refuses anything not folded."""
    layers = causal_lm_layers(model)
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


def _is_all_ones(tensor: torch.Tensor) -> bool:
    return bool(torch.all(tensor == 1))


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
        entry["scale_dtype"] = dtype_name(module.scale.dtype)
        entry["zero_dtype"] = dtype_name(module.zero.dtype)
    return entry


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


def _head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{state-dict prefix: module}`` of the embedding table and (when present) the lm_head."""
    names = {module: name for name, module in model.named_modules()}
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {names[module]: module for module in modules if module is not None}


def _int8_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{prefix.codes, prefix.scale}`` of the embedding table and lm_head as per-row int8 (``kernels.int8_rows``);
    a tied pair shares one set (the same tensors under both names)."""
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
        rebuilt |= rebuilt_keys(prefix, block)

    state = model.state_dict()
    # head='int8': the tables' int8 rows replace their weights, stored as they are (scales exact).
    int8_head = _int8_head_state(model) if head == "int8" else {}
    if int8_head:
        head_weights = {f"{prefix}.weight" for prefix in _head_modules(model)}
        state = {**{key: value for key, value in state.items() if key not in head_weights}, **int8_head}
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
            value = compact_grid(value)
        elif key in int8_head:
            pass
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
    values = json.loads(config_path.read_text(encoding="utf-8"))
    values.update(transformers_config_entries({"block_quant_config": quant, "format_version": FORMAT_VERSION,
                                               "hh_lightning_version": __version__, "dtype": dtype_name(dtype)}))
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
            "dtype": dtype_name(embedding.dtype),
            "storage_dtype": dtype_name(storage_dtype),
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
    meta = read_quant_config(directory)
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
