"""Small helpers shared by the benchmark scripts (timing, JSON, markdown tables).

Scripts run as ``python benchmarks/<name>.py``, so they import this module as
``from _common import ...``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hh_lightning.files import write_json_atomic  # noqa: E402  (re-exported: one JSON writer, one table)
from hh_lightning.report import markdown_table  # noqa: E402

__all__ = ["KV4_SETTINGS", "peak_rss_mib", "rss_mib", "STRUCTURE_RECIPES", "machine_info", "markdown_table", "median_time",
           "print_markdown_table", "quant_overrides", "relative_error", "stored_rows", "structure_overrides",
           "synchronized", "write_json_atomic"]


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory, in MiB (``VmHWM``)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit its parent's peak.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx − exact‖ / ‖exact‖`` (norms over all elements), computed in float64."""
    exact = exact.double()
    return float((approx.double() - exact).norm() / exact.norm())


def synchronized(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a CUDA synchronize on GPU, so timings include the kernels it launched."""
    if not device.startswith("cuda"):
        return fn

    def run() -> Any:
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def stored_rows(path: Path, settings: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
    """The rows a benchmark stored in ``path`` under the same ``settings`` (``{}`` if none, other
    settings, or ``fresh``), so an interrupted run resumes without mixing incomparable numbers."""
    if fresh or not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return stored["rows"] if stored.get("settings") == settings else {}


def print_markdown_table(rows: list[dict[str, Any]]) -> None:
    print(markdown_table(rows), flush=True)


def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: CPU count, threads, torch version, device."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


# The rotation structures the benchmarks compare (docs/design.md §2.3), as BlockQuantConfig fields.
STRUCTURE_RECIPES: dict[str, dict[str, Any]] = {
    "dense": dict(rotation_structure="householder", rotation_init="hadamard"),
    "kronecker": dict(rotation_structure="kronecker", rotation_init="hadamard"),
    "hadamard+householder k=16": dict(rotation_structure="hadamard_householder", rotation_init="pca",
                                      qkv_reflections=16, upgate_reflections=16, down_reflections=16),
    "hadamard+householder k=32": dict(rotation_structure="hadamard_householder", rotation_init="pca",
                                      qkv_reflections=32, upgate_reflections=32, down_reflections=32),
    "hadamard+householder k=64": dict(rotation_structure="hadamard_householder", rotation_init="pca",
                                      qkv_reflections=64, upgate_reflections=64, down_reflections=64),
    "hadamard+householder k=128": dict(rotation_structure="hadamard_householder", rotation_init="pca",
                                       qkv_reflections=128, upgate_reflections=128, down_reflections=128),
}


# A 4-bit KV cache behind a trained head-dim rotation of Q/K (k = head_dim), as BlockQuantConfig fields.
KV4_SETTINGS: dict[str, Any] = dict(kv_bits=4, kv_reflections=None)


def quant_overrides(settings: dict[str, Any]) -> list[str]:
    """BlockQuantConfig ``settings`` as train.py command-line overrides (YAML spelling: null, true)."""
    def spelled(value: Any) -> str:
        return json.dumps(value) if value is None or isinstance(value, bool) else str(value)

    return [f"--model.quant.{key}={spelled(value)}" for key, value in settings.items()]


def structure_overrides(name: str) -> list[str]:
    """``STRUCTURE_RECIPES[name]`` as train.py command-line overrides."""
    return quant_overrides(STRUCTURE_RECIPES[name])
