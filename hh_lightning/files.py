"""Small file helpers shared by everything that writes: checksums, atomic writes, locks.

Every file the package writes goes to a temporary name in the same directory
and is renamed into place, so a crash never leaves a half-written file under
the final name (only a temporary, which ``remove_leftovers`` deletes later,
under the lock its writers hold). ``directory_lock`` keeps two runs out of
one run directory.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HASH_CHUNK_BYTES = 1 << 22
LOCK_NAME = ".lock"


# Here rather than in errors.py, which re-exports it: errors.py checks text files with this module, so
# this module imports nothing of the package.
class DirectoryLocked(RuntimeError):
    """Another live process holds the lock of a directory."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """The integrity record of a file: ``{"bytes": size, "sha256": hex digest}``."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def verify_file_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Check a file against its ``file_record``: size first (cheap), then sha256; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ValueError(f"{path} has {size} bytes, expected {record['bytes']}: the file is truncated or changed")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise ValueError(f"{path} sha256 {digest} does not match the recorded {record['sha256']}: "
                         "the file is corrupted or was edited")


def content_sha256(values: dict[str, Any], exclude: str) -> str:
    """sha256 of a JSON object's canonical form without its key ``exclude`` (where that hash is kept),
    so a file can vouch for its own content."""
    canonical = json.dumps({k: v for k, v in values.items() if k != exclude}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_writable_directory(path: str | os.PathLike, field: str) -> None:
    """Raise a one-line ``ValueError`` naming ``field`` unless ``path`` is (or can be made) a writable directory.

    Probes the nearest existing ancestor with a temporary file, removed at
    once, so nothing is left behind; ``os.access`` alone says yes to root on
    a read-only mount.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{field}={path} cannot be created: {existing} is a file, not a directory")
    try:
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".hh-write-probe-")
        probe.close()
    except OSError as error:
        raise ValueError(f"{field}={path} is not writable ({existing}: {error.strerror or error})") from None


def check_text_file(path: str | os.PathLike, field: str) -> None:
    """Raise a one-line error naming ``field`` unless ``path`` is a non-empty UTF-8 text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                if chunk.strip():
                    break
            else:
                raise ValueError(f"{field}: {path} is empty")
            while handle.read(HASH_CHUNK_BYTES):  # the rest must decode too
                pass
    except UnicodeDecodeError as error:
        raise ValueError(f"{field}: {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except PermissionError as error:
        raise ValueError(f"{field}: {path} is not readable ({error.strerror})") from None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a directory entry) to disk; best effort where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, and a write racing another thread must not see 0o022.
_CREATED_FILE_MODE = 0o666 & ~_umask()


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """An open ``(fd, path)`` for a new hidden temporary in ``path``'s directory, with the mode a plain
    ``open(path, "w")`` would give it, not ``mkstemp``'s owner-only 0600: an export must be readable
    by whoever serves it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, _CREATED_FILE_MODE)
    return fd, Path(name)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds.

    The one way the package writes a file: readers of ``path`` see the old
    file or the complete new one, never a partial one, and a reader that has
    the old one open keeps reading it. On an error the temporary is deleted.
    ``suffix`` ends the temporary's name (a writer that infers the format
    from it, such as matplotlib, needs ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = temporary_beside(path, f".tmp{suffix}")
    os.close(fd)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place."""
    with atomic_write_path(path) as temporary:
        temporary.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON (``str`` for what JSON lacks), written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


try:
    import fcntl
except ImportError:  # no flock (Windows): locks are no-ops; atomic writes still keep every file whole
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An ``flock`` on ``path``: shared (many readers) or exclusive (one writer), blocking or not.

    Held until ``release()``, garbage collection or process exit (the kernel
    drops it when its holder dies, so a killed process never leaves a stale
    lock). Calling ``acquire`` again on a held lock converts it, e.g. an
    exclusive writer's lock down to shared once the writing is done.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, *, shared: bool = False, blocking: bool = True) -> bool:
        """Take (or convert) the lock; ``False`` if ``blocking=False`` and another holder conflicts."""
        if fcntl is None:
            return True
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No O_TRUNC: opening must not erase what the holder wrote (directory_lock's pid).
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.fd, flags)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 — at interpreter exit os may already be torn down; the kernel frees it
            pass


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` for the ``with`` body, or refuse at once.

    Non-blocking: when another process holds it, raises ``DirectoryLocked``
    naming ``what``, the directory and the holder's pid. The kernel drops the
    lock when its holder dies, so a killed run never leaves a stale lock; the
    file itself stays (unlinking it would race with a process opening it).
    """
    directory = Path(directory)
    lock = FileLock(directory / LOCK_NAME)
    try:
        if not lock.acquire(blocking=False):
            holder = os.pread(lock.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryLocked(f"{what} {directory} is in use by another run (pid {holder}, lock {lock.path}); "
                                  "wait for it to finish or use another directory")
        if lock.fd is not None:
            os.ftruncate(lock.fd, 0)
            os.pwrite(lock.fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.release()


def remove_leftovers(directory: str | os.PathLike, name: str, *suffixes: str) -> list[Path]:
    """Delete ``directory/.{name}{suffix}*``: temporaries a killed writer of ``name`` left behind.

    Call it only while holding the lock every writer of ``name`` holds, or a
    live writer's temporary could be deleted under it.
    """
    removed = []
    for suffix in suffixes:
        for path in Path(directory).glob(f".{glob.escape(name)}{suffix}*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
