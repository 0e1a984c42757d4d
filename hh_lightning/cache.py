"""The on-disk activation cache: every block boundary of the FP model over the calibration windows.

The cache holds one raw file per block boundary: boundary ``i``
(``i < n_layers``) is the hidden-state input of decoder layer ``i``, boundary
``n_layers`` the output of the last decoder layer, before the final norm.
Each file is a C-order array of shape ``(n_samples, seq_len, hidden)`` in
bfloat16 (stored as its uint16 bit pattern, since numpy has no bfloat16) or
float16, native byte order. ``manifest.json`` describes the files.

Nothing here keeps more than one batch of activations in RAM: the build
writes each batch into the memory-mapped boundary files as the model
produces it, and readers map the files and convert only what they return.
A cache is built beside its final name and renamed into place; a run reading
it holds a shared lock, and a rebuild for other settings is refused while
anyone does (``ensure_activation_cache``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hh_lightning.files import (
    DirectoryLocked,
    FileLock,
    fsync_path,
    remove_leftovers,
    sha256_file,
    temporary_beside,
)
from hh_lightning.models import decoder_layers

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Raw activation files
# --------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WINDOWS_FILE = "windows.bin"
STORAGE_DTYPES = ("bfloat16", "float16")
# numpy dtype of the bytes on disk; bfloat16 travels as its bit pattern.
_NUMPY_STORAGE = {"bfloat16": np.uint16, "float16": np.float16}
_TORCH_STORAGE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def boundary_file_name(index: int) -> str:
    return f"boundary_{index:03d}.bin"


def _storage_dtype(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype!r}; supported: {', '.join(STORAGE_DTYPES)}")
    return name


def _to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor -> numpy array of the on-disk dtype (bf16 as uint16 bits), on CPU."""
    converted = tensor.detach().to(_TORCH_STORAGE[dtype]).cpu().contiguous()
    if dtype == "bfloat16":
        converted = converted.view(torch.uint16)
    return converted.numpy()


def _from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """On-disk numpy array (a copy, not the map) -> float32 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def _expected_bytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape)) * np.dtype(_NUMPY_STORAGE[dtype]).itemsize


def _open_map(path: Path, shape: Sequence[int], dtype: str) -> np.memmap:
    expected = _expected_bytes(shape, dtype)
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} has {actual} bytes, expected {expected} for shape {tuple(shape)} {dtype}"
        )
    return np.memmap(path, dtype=_NUMPY_STORAGE[dtype], mode="r", shape=tuple(shape))


def write_boundary_file(
    path: str | Path,
    tensor_iterable: Iterable[torch.Tensor],
    shape: Sequence[int],
    dtype: str | torch.dtype = "bfloat16",
    durable: bool = True,
) -> dict[str, Any]:
    """Write a boundary file of `shape = (n_samples, seq_len, hidden)` atomically.

    `tensor_iterable` yields consecutive chunks of samples, each
    `(batch, seq_len, hidden)` or a single `(seq_len, hidden)`, in sample
    order; together they must hold exactly `n_samples`. The file is written
    under a temporary name in the same directory and renamed at the end.
    `durable` flushes it to disk before the rename, so it also survives a
    power loss; a file that every rerun recomputes can skip that wait.
    Returns `{"bytes": ..., "sha256": ...}` for a manifest.
    """
    path = Path(path)
    dtype = _storage_dtype(dtype)
    n_samples, *sample_shape = (int(s) for s in shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    fd, tmp_name = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in tensor_iterable:
                if chunk.dim() == len(sample_shape):
                    chunk = chunk.unsqueeze(0)
                if list(chunk.shape[1:]) != sample_shape:
                    raise ValueError(
                        f"{path.name}: chunk shape {tuple(chunk.shape)} does not match sample shape {tuple(sample_shape)}"
                    )
                if written + chunk.shape[0] > n_samples:
                    raise ValueError(f"{path.name}: more than n_samples={n_samples} samples given")
                data = _to_storage(chunk, dtype).tobytes()
                out.write(data)
                digest.update(data)
                written += chunk.shape[0]
            out.flush()
            if durable:
                os.fsync(out.fileno())
        if written != n_samples:
            raise ValueError(f"{path.name}: got {written} samples, shape says n_samples={n_samples}")
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------
# The activation cache
# --------------------------------------------------------------------------


@dataclass
class CacheManifest:
    """What `manifest.json` of an activation cache says, plus where it lives.

    `files` maps each file name to `{"bytes": int, "sha256": str}`.
    """

    cache_dir: Path
    fingerprint: dict[str, Any]
    n_samples: int
    seq_len: int
    hidden_size: int
    n_layers: int
    dtype: str
    files: dict[str, dict[str, Any]]
    windows_sha256: str
    build_id: str = ""
    build_seconds: float = 0.0
    format_version: int = CACHE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of every boundary file: `(n_samples, seq_len, hidden_size)`."""
        return (self.n_samples, self.seq_len, self.hidden_size)

    @property
    def n_boundaries(self) -> int:
        return self.n_layers + 1

    def boundary_path(self, index: int) -> Path:
        if not 0 <= index <= self.n_layers:
            raise IndexError(f"boundary index {index} out of range 0..{self.n_layers}")
        return self.cache_dir / boundary_file_name(index)

    @property
    def windows_path(self) -> Path:
        return self.cache_dir / WINDOWS_FILE

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["cache_dir"]
        return data

    @classmethod
    def from_json(cls, cache_dir: Path, data: dict[str, Any]) -> CacheManifest:
        return cls(cache_dir=Path(cache_dir), **data)


def _normalize(value: Any) -> Any:
    """JSON round trip, so a fingerprint compares equal to its stored form."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def windows_sha256(windows: torch.Tensor) -> str:
    """sha256 of the windows' int64 bytes: identifies the exact calibration tokens."""
    return hashlib.sha256(windows.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_fingerprint(
    *,
    model_source: str,
    model: nn.Module,
    tokenizer: Any,
    data_source: str,
    split: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    dtype: str,
    **extra: Any,
) -> dict[str, Any]:
    """A fingerprint dict for `build_activation_cache`, from what a caller knows."""
    from hh_lightning.models import config_hash

    return {
        "model": str(model_source),
        "config_sha256": config_hash(model.config),
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "vocab_size": len(tokenizer),
        "data": str(data_source),
        "split": split,
        "n_samples": int(n_samples),
        "seq_len": int(seq_len),
        "seed": int(seed),
        "dtype": _storage_dtype(dtype),
        **extra,
    }


# What a full disk (or an exhausted quota) raises.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _preallocate(handle: Any, size: int) -> None:
    """Give a new file its final size and reserve its blocks, before any write.

    The writes go through memory maps: into a sparse file, a full disk would
    surface as SIGBUS mid-build, killing the process without a message.
    Reserved blocks make it fail here with ENOSPC instead. Filesystems that
    cannot reserve keep the sparse file.
    """
    handle.truncate(size)
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


class _BoundaryWriter:
    """Streams batches into pre-sized boundary files through short-lived memory maps.

    Each batch is written through a map of just its rows, dropped right after,
    so written pages leave this process's resident set and RSS stays at about
    one batch no matter how many layers the cache has. A running sha256 per
    file works because every file is filled strictly in sample order.
    """

    def __init__(
        self, directory: Path, n_boundaries: int, shape: tuple[int, int, int], dtype: str, batch_size: int
    ):
        self.directory = directory
        self.shape = shape
        self.dtype = dtype
        self.sample_bytes = _expected_bytes(shape[1:], dtype)
        # One reusable CPU buffer for the dtype conversion, so a write
        # allocates nothing that could stay in the heap after the build.
        self.staging = torch.empty((batch_size, *shape[1:]), dtype=_TORCH_STORAGE[dtype])
        self.staging_view = self.staging.view(torch.uint16) if dtype == "bfloat16" else self.staging
        self.digests = [hashlib.sha256() for _ in range(n_boundaries)]
        self.rows_written = [0] * n_boundaries
        for index in range(n_boundaries):
            with open(self.path(index), "wb") as f:
                _preallocate(f, _expected_bytes(shape, dtype))

    def path(self, index: int) -> Path:
        return self.directory / boundary_file_name(index)

    def write(self, index: int, start: int, hidden: torch.Tensor) -> None:
        if start != self.rows_written[index]:
            raise RuntimeError(
                f"{boundary_file_name(index)}: batch starts at sample {start}, "
                f"but {self.rows_written[index]} were written (a layer ran twice or was skipped)"
            )
        if tuple(hidden.shape[1:]) != self.shape[1:] or hidden.shape[0] > self.staging.shape[0]:
            raise RuntimeError(
                f"{boundary_file_name(index)}: hidden state shape {tuple(hidden.shape)} does not fit "
                f"cache shape {self.shape} with batch size {self.staging.shape[0]}"
            )
        rows = hidden.shape[0]
        self.staging[:rows].copy_(hidden.detach())
        array = self.staging_view[:rows].numpy()
        window = np.memmap(
            self.path(index),
            dtype=_NUMPY_STORAGE[self.dtype],
            mode="r+",
            offset=start * self.sample_bytes,
            shape=array.shape,
        )
        window[...] = array
        del window  # unmap now: see the class docstring
        self.digests[index].update(memoryview(array).cast("B"))  # no bytes copy
        self.rows_written[index] = start + rows


def build_activation_cache(
    model: nn.Module,
    windows: torch.Tensor,
    cache_dir: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 1,
    fingerprint: dict[str, Any],
    progress: bool = True,
) -> CacheManifest:
    """Run the FP model once over `windows` `(n_samples, seq_len)` and store every block boundary.

    Boundary `i` is the input of decoder layer `i`; boundary `n_layers` is
    the last layer's output before the final norm. Files are built in a
    temporary directory next to `cache_dir` and renamed into place, replacing
    any old cache there. Runs on the model's device, `torch.no_grad`, in
    batches of `batch_size` windows.
    """
    cache_dir = Path(cache_dir).expanduser()
    dtype = _storage_dtype(dtype)
    if windows.dim() != 2:
        raise ValueError(f"windows must be (n_samples, seq_len), got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_samples, seq_len = (int(s) for s in windows.shape)
    for key, actual in (("n_samples", n_samples), ("seq_len", seq_len), ("dtype", dtype)):
        if key in fingerprint and fingerprint[key] != actual:
            raise ValueError(f"fingerprint[{key!r}]={fingerprint[key]!r} but the build uses {actual!r}")

    layers = decoder_layers(model)
    n_layers = len(layers)
    hidden_size = int(model.config.hidden_size)
    shape = (n_samples, seq_len, hidden_size)
    device = next(model.parameters()).device

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}.build-"))
    started = time.perf_counter()
    try:
        window_record = _write_windows_file(build_dir / WINDOWS_FILE, windows)
        writer = _BoundaryWriter(build_dir, n_layers + 1, shape, dtype, batch_size)
        batch_start = 0

        def input_hook(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                writer.write(index, batch_start, hidden)

            return hook

        def output_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            # Older transformers return (hidden_states, ...) from a decoder
            # layer; recent ones return the tensor itself.
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            writer.write(n_layers, batch_start, hidden)

        handles = [
            layer.register_forward_pre_hook(input_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        handles.append(layers[-1].register_forward_hook(output_hook, with_kwargs=True))
        base_model = model.model  # the decoder stack without lm_head: its logits are not needed
        was_training = model.training
        model.eval()  # dropout off: the targets must be the deterministic FP outputs
        try:
            batches = range(0, n_samples, batch_size)
            for batch_start in tqdm(batches, desc="activation cache", unit="batch", disable=not progress):
                input_ids = windows[batch_start : batch_start + batch_size].to(device)
                with torch.no_grad():
                    base_model(input_ids=input_ids, use_cache=False, output_hidden_states=False)
                expected = batch_start + input_ids.shape[0]
                missing = [boundary_file_name(i) for i, r in enumerate(writer.rows_written) if r != expected]
                if missing:
                    raise RuntimeError(
                        f"decoder layers did not all run (config.num_hidden_layers={model.config.num_hidden_layers}, "
                        f"{n_layers} layers); not written: {', '.join(missing)}"
                    )
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

        files = {WINDOWS_FILE: window_record}
        for index in range(n_layers + 1):
            fsync_path(writer.path(index))
            files[boundary_file_name(index)] = {
                "bytes": writer.path(index).stat().st_size,
                "sha256": writer.digests[index].hexdigest(),
            }
        manifest = CacheManifest(
            cache_dir=cache_dir,
            fingerprint=_normalize(fingerprint),
            n_samples=n_samples,
            seq_len=seq_len,
            hidden_size=hidden_size,
            n_layers=n_layers,
            dtype=dtype,
            files=files,
            windows_sha256=windows_sha256(windows),
            build_id=uuid.uuid4().hex,
            build_seconds=round(time.perf_counter() - started, 3),
        )
        manifest_path = build_dir / MANIFEST_NAME
        manifest_path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        fsync_path(manifest_path)
        _move_into_place(build_dir, cache_dir)
    except BaseException as error:
        shutil.rmtree(build_dir, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            needed = _expected_bytes(shape, dtype) * (n_layers + 1) + windows.numel() * 8
            raise OSError(error.errno, f"disk full while building the activation cache {cache_dir}: it needs "
                                       f"{needed / 2**30:.2f} GiB in {cache_dir.parent} ({error.strerror}); "
                                       "free space there or set data.cache_dir elsewhere") from error
        raise
    log.info("activation cache built at %s (%d boundaries, %.1f s)", cache_dir, n_layers + 1, manifest.build_seconds)
    return manifest


def _write_windows_file(path: Path, windows: torch.Tensor) -> dict[str, Any]:
    """Write the windows' token ids as raw int64 `(n_samples, seq_len)`; returns its file record."""
    data = windows.to(torch.int64).cpu().contiguous().numpy().tobytes()
    path.write_bytes(data)
    fsync_path(path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _move_into_place(build_dir: Path, cache_dir: Path) -> None:
    """Rename a finished build onto `cache_dir`; an old cache there is moved aside, then deleted."""
    stale = None
    if cache_dir.exists():
        stale = cache_dir.with_name(f".{cache_dir.name}.stale-{uuid.uuid4().hex[:8]}")
        os.replace(cache_dir, stale)
    os.replace(build_dir, cache_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _fingerprint_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [k for k in keys if stored.get(k) != wanted.get(k)]


def open_activation_cache(
    cache_dir: str | Path,
    fingerprint: dict[str, Any],
    *,
    verify: bool = False,
    windows: torch.Tensor | None = None,
) -> CacheManifest | None:
    """The manifest of a complete cache at `cache_dir` built for `fingerprint`, else None.

    None when there is no manifest, the fingerprint (or the `windows`, when
    given) differs, or a file is missing or has the wrong size; with
    `verify=True` also when a file's sha256 differs. Every reason except
    absence is logged as a warning naming the key or file.
    """
    cache_dir = Path(cache_dir).expanduser()
    manifest_path = cache_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        log.debug("no activation cache at %s", cache_dir)
        return None
    try:
        data = json.loads(manifest_path.read_text())
        manifest = CacheManifest.from_json(cache_dir, data)
    except (json.JSONDecodeError, TypeError) as error:
        log.warning("unreadable activation cache manifest %s: %s", manifest_path, error)
        return None
    if manifest.format_version != CACHE_FORMAT_VERSION:
        log.warning("activation cache %s has format version %s, expected %s",
                    cache_dir, manifest.format_version, CACHE_FORMAT_VERSION)
        return None
    differing = _fingerprint_diff(manifest.fingerprint, _normalize(fingerprint))
    if differing:
        log.warning("activation cache %s was built for a different fingerprint (keys: %s)",
                    cache_dir, ", ".join(differing))
        return None
    if windows is not None and windows_sha256(windows) != manifest.windows_sha256:
        log.warning("activation cache %s was built from different calibration windows", cache_dir)
        return None
    expected_names = [WINDOWS_FILE] + [boundary_file_name(i) for i in range(manifest.n_boundaries)]
    for name in expected_names:
        path = cache_dir / name
        record = manifest.files.get(name)
        if record is None or not path.is_file():
            log.warning("activation cache file missing: %s", path)
            return None
        size = path.stat().st_size
        if size != record["bytes"]:
            log.warning("activation cache file %s has %d bytes, manifest says %d", path, size, record["bytes"])
            return None
    if verify:
        for name in tqdm(expected_names, desc="verify cache", unit="file", disable=len(expected_names) < 8):
            if sha256_file(cache_dir / name) != manifest.files[name]["sha256"]:
                log.warning("activation cache file %s fails its sha256 check", cache_dir / name)
                return None
    return manifest


def _lock_paths(cache_dir: Path) -> tuple[Path, Path]:
    """The build lock (one builder at a time) and the readers' lock of ``cache_dir``, beside it:
    the directory itself is replaced by a rebuild."""
    return cache_dir.parent / f".{cache_dir.name}.lock", cache_dir.parent / f".{cache_dir.name}.readers"


def _build_lock(cache_dir: Path) -> FileLock:
    """Exclusive (``with``) lock so concurrent processes (one per device) build a cache once."""
    return FileLock(_lock_paths(cache_dir)[0])


def activation_cache_reader(cache_dir: str | Path) -> FileLock:
    """The lock a run holds (shared) on ``cache_dir`` while it reads it; pass it to ``ensure_activation_cache``."""
    return FileLock(_lock_paths(Path(cache_dir).expanduser())[1])


def ensure_activation_cache(
    model: nn.Module,
    windows: torch.Tensor,
    cache_dir: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 1,
    fingerprint: dict[str, Any],
    verify: bool = False,
    progress: bool = True,
    reader: FileLock | None = None,
) -> CacheManifest:
    """Open the cache at `cache_dir` if it matches `fingerprint` and `windows`, else (re)build it.

    Holds the build lock throughout, so concurrent callers build once and the
    others reuse; it also deletes what killed builds left next to `cache_dir`.
    `reader` (``activation_cache_reader``) is left holding a shared lock on
    the cache, which the caller keeps while it reads the files. A cache that
    another holder of such a lock reads is never replaced: a caller that
    needs it rebuilt for other settings gets ``DirectoryLocked`` naming
    ``data.cache_dir`` and the differing keys, and the cache stays as it is.
    A full disk raises `OSError(ENOSPC)` naming `cache_dir` and leaves no cache.
    """
    cache_dir = Path(cache_dir).expanduser()
    own_reader = reader is None
    reader = activation_cache_reader(cache_dir) if own_reader else reader
    try:
        with _build_lock(cache_dir):
            # Under the lock no build is live: any build or stale directory is a killed build's.
            for path in remove_leftovers(cache_dir.parent, cache_dir.name, ".build-", ".stale-"):
                log.warning("removed %s, left by an interrupted cache build", path)
            manifest = open_activation_cache(cache_dir, fingerprint, verify=verify, windows=windows)
            if manifest is not None and manifest.dtype == _storage_dtype(dtype):
                reader.acquire(shared=True)
                return manifest
            if not reader.acquire(shared=False, blocking=False):
                raise _cache_in_use(cache_dir, fingerprint, dtype)
            manifest = build_activation_cache(model, windows, cache_dir, dtype=dtype, batch_size=batch_size,
                                              fingerprint=fingerprint, progress=progress)
            reader.acquire(shared=True)  # down to a reader's lock: other runs of these settings may share it
            return manifest
    finally:
        if own_reader:
            reader.release()


def check_cache_replaceable(cache_dir: str | Path, fingerprint: dict[str, Any], dtype: str | torch.dtype) -> None:
    """Raise ``DirectoryLocked`` (as ``ensure_activation_cache`` would) when the cache at ``cache_dir`` was
    built for other settings and another run reads it; writes nothing, so a run can check before it
    claims its directory."""
    cache_dir = Path(cache_dir).expanduser()
    readers = activation_cache_reader(cache_dir)
    if not (cache_dir / MANIFEST_NAME).is_file() or not readers.path.is_file():
        return
    if _cache_difference(cache_dir, fingerprint, dtype) is None:
        return  # the same settings: shared, not replaced
    try:
        if not readers.acquire(shared=False, blocking=False):
            raise _cache_in_use(cache_dir, fingerprint, dtype)
    finally:
        readers.release()


def _cache_in_use(cache_dir: Path, fingerprint: dict[str, Any], dtype: str | torch.dtype) -> DirectoryLocked:
    return DirectoryLocked(f"data.cache_dir={cache_dir} is being read by another run built for other settings "
                           f"({_cache_difference(cache_dir, fingerprint, dtype) or 'differs in: its files'}); "
                           "use another data.cache_dir, or leave it unset for one per recipe")


def _cache_difference(cache_dir: Path, fingerprint: dict[str, Any], dtype: str | torch.dtype) -> str | None:
    """Which settings the cache at ``cache_dir`` was built for differently, for an error message;
    ``None`` when its fingerprint and dtype are these."""
    try:
        data = json.loads((cache_dir / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return "its manifest is unreadable"
    keys = _fingerprint_diff(data.get("fingerprint", {}), _normalize(fingerprint))
    if data.get("dtype") != _storage_dtype(dtype):
        keys.append("cache_dtype")
    return "differs in: " + ", ".join(keys) if keys else None


def read_windows(manifest: CacheManifest) -> torch.LongTensor:
    """The calibration token windows the cache was built from, `(n_samples, seq_len)` int64."""
    array = np.fromfile(manifest.windows_path, dtype=np.int64)
    return torch.from_numpy(array).reshape(manifest.n_samples, manifest.seq_len)


SampleIndex = int | slice | Sequence[int] | np.ndarray | torch.Tensor | None


def read_boundary(manifest: CacheManifest, index: int, sample_indices: SampleIndex = None) -> torch.Tensor:
    """Boundary `index` as float32: `(n, seq_len, hidden)`, or `(seq_len, hidden)` for an int sample.

    The file is memory-mapped; only the selected samples are read and
    converted. `sample_indices=None` reads every sample.
    """
    mapped = _open_map(manifest.boundary_path(index), manifest.shape, manifest.dtype)
    if sample_indices is None:
        selected = mapped[:]
    elif isinstance(sample_indices, torch.Tensor):
        selected = mapped[sample_indices.cpu().numpy()]
    else:
        selected = mapped[sample_indices]
    return _from_storage(np.array(selected), manifest.dtype)


class BoundaryPairDataset(torch.utils.data.Dataset):
    """`(x, y)` float32 pairs, each `(seq_len, hidden)`, for training one block.

    `x` is sample `indices[k]` of `input_path`, `y` the same sample of
    `target_path`. The paths are arbitrary boundary files of `shape =
    (n_samples, seq_len, hidden)` and storage `dtype`, so `x` can come from
    the FP cache or from a file of quantized-block outputs. Files are mapped
    lazily, per process, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(
        self,
        input_path: str | Path,
        target_path: str | Path,
        shape: Sequence[int],
        dtype: str | torch.dtype = "bfloat16",
        indices: Sequence[int] | None = None,
    ):
        self.input_path = Path(input_path)
        self.target_path = Path(target_path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _storage_dtype(dtype)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be (n_samples, seq_len, hidden), got {self.shape}")
        self.indices = list(range(self.shape[0])) if indices is None else [int(i) for i in indices]
        for i in self.indices:
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"sample index {i} out of range 0..{self.shape[0] - 1}")
        expected = _expected_bytes(self.shape, self.dtype)
        for path in (self.input_path, self.target_path):
            if not path.is_file():
                raise FileNotFoundError(f"boundary file not found: {path}")
            if path.stat().st_size != expected:
                raise ValueError(
                    f"{path} has {path.stat().st_size} bytes, expected {expected} for shape {self.shape} {self.dtype}"
                )
        self._maps: tuple[np.memmap, np.memmap] | None = None

    @classmethod
    def for_layer(
        cls,
        manifest: CacheManifest,
        layer: int,
        indices: Sequence[int] | None = None,
        input_path: str | Path | None = None,
    ) -> BoundaryPairDataset:
        """Pairs for decoder layer `layer`: x = boundary `layer` (or `input_path`), y = boundary `layer + 1`."""
        x_path = manifest.boundary_path(layer) if input_path is None else input_path
        return cls(x_path, manifest.boundary_path(layer + 1), manifest.shape, manifest.dtype, indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._maps is None:
            self._maps = (
                _open_map(self.input_path, self.shape, self.dtype),
                _open_map(self.target_path, self.shape, self.dtype),
            )
        sample = self.indices[k]
        x_map, y_map = self._maps
        return _from_storage(np.array(x_map[sample]), self.dtype), _from_storage(np.array(y_map[sample]), self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # maps are per process
        return state
