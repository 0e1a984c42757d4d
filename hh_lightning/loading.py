"""Loading a saved model (``load_quantized``): the folded model rebuilt from an export, in bounded memory.

The model is built from the saved ``config.json`` on the meta device, wrapped and folded layer by
layer with the saved rotation structures, then filled from ``model.safetensors`` one tensor at a
time (``_TensorReader``), after every check of ``export_format.verify_export``. What is kept in
memory is the quantized model, not the file: the memory map is reopened after each layer, large
tensors are read in row chunks, and freed heap pages are handed back to the OS
(``_return_freed_memory``). ``kernels`` and ``head`` choose how the codes and the embedding table
are served (``kernels.py``, ``integer.py``); the file is the same for all of them.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from .block import BlockQuantConfig, wrap_model
from .errors import check_device, check_type
from .export_format import (
    LOAD_GUARD_KEY,
    QUANT_CONFIG_NAME,
    ROTATION_NAMES,
    WEIGHTS_NAME,
    causal_lm_layers,
    dtype_from_name,
    rebuilt_keys,
    unpack_codes,
    verify_export,
)
from .integer import IntegerKernelConfig, use_integer_kernels_
from .kernels import Int8Embedding, Int8Linear, RowsLinear, int8_rows, use_int4_kernels_
from .linear import FoldedLinear

__all__ = ["LOAD_CHUNK_BYTES", "LOAD_HEADS", "LOAD_KERNELS", "load_quantized"]

LOAD_KERNELS = (None, "int4", "w4a4")
LOAD_HEADS = ("fp", "int8")
# Tensors larger than this are read in row chunks of about this size (_TensorReader.read).
LOAD_CHUNK_BYTES = 32 * 2**20


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
        check_type("integer_config", integer_config, IntegerKernelConfig, "an IntegerKernelConfig (or None)")
        try:
            integer_config.validate()
        except ValueError as error:
            raise ValueError(f"integer_config: {error}") from None


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
        scale = scale.to(dtype_from_name(entry["scale_dtype"]))
        zero = zero.to(dtype_from_name(entry["zero_dtype"]))
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


def _head_from_file_(model: nn.Module, reader: _TensorReader, dtype: torch.dtype, stored: str, served: str
                     ) -> set[str]:
    """Set ``model``'s embedding table and ``lm_head`` from the file when either side is int8; returns the
    state-dict keys now set.

    ``stored``: how the export holds them (``fp`` 16-bit weights, ``int8`` codes and scales). ``served``:
    ``int8`` makes them ``Int8Embedding`` / ``Int8Linear`` (one set of rows when tied): stored codes as
    they are, 16-bit weights quantized chunk by chunk as they are read, so the table is never whole in
    16 bits in memory. ``fp`` from stored int8 rows: the weights ``codes · scale`` in ``dtype``.
    """
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
    dtype = dtype_from_name(meta["dtype"]) if dtype is None else dtype
    # Built on the meta device: no FP weight is ever allocated, so the load's peak memory is the
    # quantized model's, not the FP skeleton's. The rotary embedding is rebuilt for real (its
    # frequencies are not saved), before the blocks copy it.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    layers = causal_lm_layers(model)
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
    rebuilt = set().union(*(rebuilt_keys(entry["prefix"], layers[index])
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
        model.set_output_embeddings(RowsLinear.sharing(head_module))
    if kernels == "w4a4":
        use_integer_kernels_(model, integer_config)
    # Before any forward: built lazily inside the first long prefill, these small caches pinned about
    # 110 MiB of its temporaries in the heap (SmolLM2 W4A4 as W4A16, 512 tokens; README).
    for layer in layers:
        for rotation in layer.online_rotations().values():
            rotation.build_inference_cache_(model.dtype)
    return model
