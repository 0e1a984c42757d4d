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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HASH_CHUNK_BYTES = 1 << 22
LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
    """Another live process holds the lock of a directory."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` for the ``with`` body, or refuse at once.

    Non-blocking: when another process holds it, raises ``DirectoryLocked``
    naming ``what``, the directory and the holder's pid. The kernel drops the
    lock when its holder dies, so a killed run never leaves a stale lock; the
    file itself stays (unlinking it would race with a process opening it).
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked; atomic writes still keep every file whole
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    # No O_TRUNC: opening must not erase the pid the holder wrote.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryLocked(f"{what} {directory} is in use by another run (pid {holder}, lock {path}); "
                                  "wait for it to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
