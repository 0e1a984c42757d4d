"""Speed of applying a Householder rotation ``x ↦ x R``, forward + backward, fp32.

Four ways to compute ``x R`` for ``x`` of shape ``(tokens, d)`` and ``k`` reflections:

* ``wy``: ``householder_apply`` (compact WY form: two thin GEMMs + a k×k triangular solve);
* ``loop``: ``householder_apply_loop`` (k sequential rank-1 updates);
* ``materialized``: ``R = householder_matrix(vectors)`` then ``x @ R``;
* ``dense``: ``x @ R`` with ``R`` a precomputed dense leaf tensor (the lower bound).

Each timing is one forward and one backward (``torch.autograd.grad`` w.r.t. ``x`` and the
vectors; for ``dense`` w.r.t. ``x`` and ``R``), median over repeats. The machine may be
shared, so the methods of one (d, k) case are timed round-robin (same background load,
fair ratios). Each method's first call is a warm-up; its timed repeats are ``--repeats``
or fewer, about ``--case-budget`` seconds' worth (at least one). A method whose first call
alone exceeds ``--case-budget`` is reported from that single call (repeats = 0): at
several seconds per call, warm-up effects are negligible. ``repeats`` in the table is
wy/materialized/dense.

The loop keeps k activations of ``tokens × d`` for backward and runs k sequential ops, so it
is skipped (printed "skipped") where ``k·d > --loop-max-kd``.

Run: ``python benchmarks/rotation_speed.py [--tokens 2048] [--dims 576 896 1536 4864]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine_info, print_markdown_table, write_json_atomic  # noqa: E402

from hh_lightning.rotation import (  # noqa: E402
    householder_apply,
    householder_apply_loop,
    householder_matrix,
)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "rotation_speed.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 896, 1536, 4864])
    parser.add_argument("--ks", type=str, nargs="+", default=["16", "64", "d"],
                        help="numbers of reflections; 'd' means k = d")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (upper bound)")
    parser.add_argument("--case-budget", type=float, default=4.0,
                        help="seconds of timed calls per case; repeats shrink to fit (min 1)")
    parser.add_argument("--loop-max-kd", type=int, default=2**19,
                        help="skip the reflection loop where k·d exceeds this")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return parser.parse_args()


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
            grad_out: torch.Tensor) -> Callable[[], None]:
    """A closure running ``forward()`` and the gradients w.r.t. ``inputs``."""
    def step() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)
    return step


def time_interleaved(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """Median seconds and timed repeats per method, timing the methods round-robin.

    Each method's first call is its warm-up (and its measurement when it alone exceeds
    ``--case-budget``: repeats = 0); then rounds run every method still due, so all
    methods of a case see the same background load.
    """
    def call(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    first = {name: call(step) for name, step in steps.items()}
    repeats = {name: 0 if t > args.case_budget else max(1, min(args.repeats, int(args.case_budget / t)))
               for name, t in first.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(max(repeats.values())):
        for name, step in steps.items():
            if round_index < repeats[name]:
                times[name].append(call(step))
    return {name: (statistics.median(times[name]) if times[name] else first[name], repeats[name])
            for name in steps}


def bench_dim(dim: int, ks: list[int], args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, dim, generator=generator).requires_grad_()
    grad_out = torch.randn(args.tokens, dim, generator=generator)
    rows = []
    for k in ks:
        vectors = torch.randn(k, dim, generator=generator).requires_grad_()
        dense = householder_matrix(vectors.detach()).requires_grad_()
        steps = {
            "wy": fwd_bwd(lambda: householder_apply(x, vectors), [x, vectors], grad_out),
            "materialized": fwd_bwd(lambda: x @ householder_matrix(vectors), [x, vectors], grad_out),
            "dense": fwd_bwd(lambda: x @ dense, [x, dense], grad_out),
        }
        if k * dim <= args.loop_max_kd:
            steps["loop"] = fwd_bwd(lambda: householder_apply_loop(x, vectors), [x, vectors], grad_out)
        timed = time_interleaved(steps, args)
        ms = {name: 1e3 * seconds for name, (seconds, _) in timed.items()}
        loop_ms = ms.get("loop")
        best = min(("wy", "materialized"), key=ms.__getitem__)
        row = {
            "d": dim, "k": k, "repeats": "/".join(str(timed[n][1]) for n in ("wy", "materialized", "dense")),
            "wy_ms": ms["wy"], "loop_ms": loop_ms if loop_ms is not None else "skipped",
            "materialized_ms": ms["materialized"], "dense_ms": ms["dense"],
            "loop/wy": loop_ms / ms["wy"] if loop_ms is not None else "skipped",
            "wy/dense": ms["wy"] / ms["dense"], "materialized/dense": ms["materialized"] / ms["dense"],
            "cheaper": best, "cheaper/dense": ms[best] / ms["dense"],
        }
        print(f"d={dim} k={k}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items()), flush=True)
        rows.append(row)
    return rows


def check_goals(rows: list[dict]) -> dict:
    """Targets: loop/WY ≥ 5 at k = 64; at k = d, WY (or the cheaper path) ≤ 3.5× dense."""
    k64 = [r for r in rows if r["k"] == 64 != r["d"] and isinstance(r["loop/wy"], float)]
    full = [r for r in rows if r["k"] == r["d"]]
    return {
        "wy_5x_faster_than_loop_at_k64": all(r["loop/wy"] >= 5 for r in k64) if k64 else None,
        "wy_within_3.5x_dense_at_k_eq_d": all(r["wy/dense"] <= 3.5 for r in full) if full else None,
        "cheaper_path_within_3.5x_dense_at_k_eq_d":
            all(r["cheaper/dense"] <= 3.5 for r in full) if full else None,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, min(args.threads, len(os.sched_getaffinity(0)))))
    torch.manual_seed(args.seed)
    info = machine_info()
    print(f"machine: {info}\ntokens={args.tokens} fp32, forward+backward, times in ms (median)", flush=True)
    rows = []
    for dim in args.dims:
        ks = sorted({dim if k == "d" else min(int(k), dim) for k in args.ks})
        rows += bench_dim(dim, ks, args)
    print("\n## Summary\n")
    print_markdown_table(rows)
    goals = check_goals(rows)
    print(f"\ngoals: {goals}")
    write_json_atomic(args.json, {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
                                  "rows": rows, "goals": goals})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
