"""User errors: their types, the checks every entry point shares, and how the command line refuses them.

Every check raises a one-line error naming the field or argument at fault:
``ValueError`` for a bad value, ``FileNotFoundError`` for a missing file,
``TypeError`` for an argument of the wrong type (Python API only: the
command line parses types itself). The command line turns them into
``error: ...`` on stderr and exit code 2 (``refuse``); the Python API raises
them as they are. Importing this module is cheap: torch and Lightning are
imported only by the checks that need them.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .files import DirectoryLocked, check_text_file

__all__ = ["DirectoryLocked", "INPUT_ERRORS", "REFUSED_ERRORS", "check_accelerator", "check_config_files",
           "check_device", "check_index_list", "check_type", "one_line", "parser_error", "refuse", "refused"]


# Errors of the checks that run before any heavy work: printed as one line, exit code 2.
INPUT_ERRORS = (ValueError, FileNotFoundError)
# What the command line refuses as bad input: the checks' errors, and a directory another run holds.
REFUSED_ERRORS = (*INPUT_ERRORS, DirectoryLocked)


def one_line(text: str) -> str:
    """``text`` with its lines and runs of spaces joined by single spaces."""
    return " ".join(str(text).split())


def refuse(error: BaseException) -> NoReturn:
    """Bad input: one line on stderr, exit code 2, nothing written."""
    print(f"error: {one_line(str(error))}", file=sys.stderr)
    raise SystemExit(2) from None


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """Inside the block, ``REFUSED_ERRORS`` end the program through ``refuse``."""
    try:
        yield
    except REFUSED_ERRORS as error:
        refuse(error)


# --------------------------------------------------------------------------
# Command-line parsing (jsonargparse)
# --------------------------------------------------------------------------
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.S)
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>")
_GIVEN = re.compile(r"(?:Given|Got) value: (.*?)\s*$", re.M)
_NOT_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list": "a list", "dict": "a mapping", "NoneType": "null"}


def parser_error(error: BaseException) -> ValueError:
    """A jsonargparse ``ArgumentError`` as a one-line ``ValueError`` naming the field.

    jsonargparse explains a bad value over several lines (each type of a union
    tried in turn); the user needs the field, the value given and what it takes.
    """
    text = str(error)
    match = _PARSER_KEY.search(text)
    if match is None:
        return ValueError(one_line(text))
    key, detail = match.groups()
    expected = list(dict.fromkeys(_EXPECTED.findall(detail)))
    given = _GIVEN.findall(detail)
    if not expected or not given:
        return ValueError(f"{key}: {one_line(detail)}")
    value = given[-1]
    if "float" in expected and value.strip().lower() in _NOT_FINITE:
        return ValueError(f"{key}={value} must be a finite number")
    wanted = " or ".join(_TYPE_WORDS.get(name, name) for name in expected)
    return ValueError(f"{key}={value!r} is not {wanted}")


def check_config_files(args: Sequence[str], field: str = "config") -> None:
    """Every ``--config FILE`` in ``args`` that exists is a UTF-8 YAML mapping; one-line error otherwise.

    jsonargparse would answer a binary file with a ``UnicodeDecodeError`` traceback and bad YAML with
    its parser's multi-line report. A value that is no file is left to jsonargparse (it may be YAML text).
    """
    import yaml

    args = list(args)
    paths = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for value in paths:
        path = Path(value).expanduser()
        if not path.exists():
            continue
        check_text_file(path, field)
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as problem:
            mark = getattr(problem, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            reason = getattr(problem, "problem", None) or one_line(str(problem))
            raise ValueError(f"{field}: {path} is not valid YAML ({reason}{where})") from None
        if not isinstance(content, dict):
            raise ValueError(f"{field}: {path} holds a {type(content).__name__}, not a mapping of fields")


# --------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------
def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
    """``TypeError`` naming argument ``name`` unless ``value`` is one of ``types`` (``bool`` is no number)."""
    accepted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r:.80}")


def check_device(device: Any, field: str, *, allow_auto: bool = True) -> None:
    """``device`` names a device this machine has: ``cpu``, ``cuda`` or ``cuda:N`` (and ``auto``).

    Checked up front, so that a CPU-only torch refuses ``cuda`` in one line instead of failing with
    torch's ``AssertionError`` once the model is built.
    """
    import torch

    if allow_auto and device == "auto":
        return
    names = "'auto', 'cpu', 'cuda' or 'cuda:N'" if allow_auto else "'cpu', 'cuda' or 'cuda:N'"
    try:
        parsed = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{field}={device!r} must be {names}")
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{field}={device!r}: no CUDA device is available to this torch ({torch.__version__}); "
                         "use 'cpu'" + (" or 'auto'" if allow_auto else ""))
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{field}={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def check_accelerator(accelerator: Any, field: str = "trainer.accelerator") -> None:
    """A Lightning accelerator name this machine can run (``auto``, ``cpu``, ``gpu``, ``cuda``, ...)."""
    if not isinstance(accelerator, str):
        return  # an Accelerator object: Lightning checks its own
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    name = accelerator.lower()
    if name == "auto":
        return
    if name == "gpu":
        available = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    elif name in AcceleratorRegistry:
        available = AcceleratorRegistry[name]["accelerator"].is_available()
    else:
        choices = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        raise ValueError(f"{field}={accelerator!r} is not one of {choices}")
    if not available:
        raise ValueError(f"{field}={accelerator!r}: no such device is available on this machine; use 'cpu' or 'auto'")


def check_index_list(field: str, values: Any, *, upper: int | None = None) -> list[int]:
    """A non-empty list of distinct indices ``>= 0`` (``< upper`` when given); returns it.

    A repeated index would be collapsed silently (``[0, 0]`` quantizes one layer), so it is refused.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{field}={values!r} must be a list of indices")
    values = list(values)
    if not values:
        raise ValueError(f"{field}=[] names nothing; leave it unset for all")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{field} contains {value!r}; every entry must be an integer >= 0")
        if upper is not None and value >= upper:
            raise ValueError(f"{field} contains {value}; the valid range is 0..{upper - 1}")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{field}={values} repeats {', '.join(map(str, repeated))}; list each once")
    return values

