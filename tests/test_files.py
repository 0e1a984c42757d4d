"""files.py: integrity records, atomic writes, and the locks that keep concurrent runs apart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hh_lightning.files import (
    DirectoryLocked,
    FileLock,
    content_sha256,
    directory_lock,
    file_record,
    verify_file_record,
    write_text_atomic,
)


@pytest.mark.parametrize("damage", ["truncate", "grow", "flip", "delete"])
def test_a_file_record_catches_every_kind_of_change(tmp_path, damage) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    record = file_record(path)
    verify_file_record(path, record)
    data = bytearray(path.read_bytes())
    if damage == "delete":
        path.unlink()
        with pytest.raises(FileNotFoundError, match="weights.bin"):
            verify_file_record(path, record)
        return
    if damage == "truncate":
        data = data[:-1]
    elif damage == "grow":
        data += b"\0"
    else:
        data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.bin"):
        verify_file_record(path, record)


def test_content_sha256_covers_every_value_but_its_own_key() -> None:
    values = {"a_bits": 4, "layers": [{"bits": 4}], "content_sha256": "ignored"}
    digest = content_sha256(values, exclude="content_sha256")
    assert digest == content_sha256({**values, "content_sha256": "other"}, exclude="content_sha256")
    assert digest == content_sha256(json.loads(json.dumps(values, indent=2)), exclude="content_sha256")
    for changed in ({**values, "a_bits": 8}, {**values, "layers": [{"bits": 8}]}, {**values, "new": None}):
        assert content_sha256(changed, exclude="content_sha256") != digest


def test_write_text_atomic_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "sub" / "summary.md"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.md"]


def test_an_atomic_write_gets_the_mode_a_plain_write_gets(tmp_path) -> None:
    """Not mkstemp's owner-only 0600: an export must be readable by the user who serves it."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    for name in ("new.txt", "plain.txt"):
        write_text_atomic(tmp_path / name, "y")
        assert (tmp_path / name).stat().st_mode & 0o777 == expected


def _hold_in_child(path, shared: bool) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hh_lightning.files import FileLock; "
         f"lock = FileLock({str(path)!r}); assert lock.acquire(shared={shared}); print('held', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.parametrize("held_shared", [True, False], ids=["reader-holds", "writer-holds"])
def test_file_lock_readers_share_and_a_writer_excludes(tmp_path, held_shared) -> None:
    path = tmp_path / ".cache.readers"
    child = _hold_in_child(path, held_shared)
    try:
        reader, writer = FileLock(path), FileLock(path)
        assert reader.acquire(shared=True, blocking=False) is held_shared  # readers share
        assert writer.acquire(shared=False, blocking=False) is False       # a writer waits for everyone
        reader.release()
    finally:
        child.communicate("", timeout=30)
    assert writer.acquire(shared=False, blocking=False)  # the holder exited: its lock went with it
    assert writer.acquire(shared=True)                    # and a writer's lock converts down to a reader's
    writer.release()


def test_directory_lock_refuses_a_second_holder_naming_the_first(tmp_path) -> None:
    with directory_lock(tmp_path / "run", "pipeline.run_dir"):
        with pytest.raises(DirectoryLocked, match=r"pipeline\.run_dir .*run is in use by another run \(pid \d+"):
            with directory_lock(tmp_path / "run", "pipeline.run_dir"):
                pass
    with directory_lock(tmp_path / "run", "pipeline.run_dir"):  # released on exit
        pass
