"""Which recipe wins on the CPU: whole-model runs that change one thing at a time.

Each variant is the base recipe (default ``configs/demo.yaml``: 8 windows of 256
tokens, 4 steps per layer, ``quantized`` input mode, GPTQ rounding) with a few
``train.py`` overrides: more steps per layer, more calibration tokens (at the same
steps: they then feed only the PCA covariances and the GPTQ Hessians), both, the
learning rates halved and doubled, and ``fp`` input mode. Every variant is a whole
``train.py fit`` run in its own directory under ``--run-root`` (resumed if present);
its perplexity is the export loaded back, on the first ``--windows`` WikiText-2 test
windows.

    python benchmarks/recipe_sweep.py [--variants ...] [--windows 4]

Writes ``benchmarks/results/<name>.json`` after every variant (a rerun skips stored
variants of the same settings) and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from pathlib import Path
from typing import Any

from _common import machine_info, markdown_table, stored_rows, write_json_atomic
from structures import pipeline_row

from hh_lightning.files import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
MORE_TOKENS = ["--data.n_samples=32"]  # 4x the demo's 8 windows
LR_HALF = ["--model.optim.lr_transforms=0.0025", "--model.optim.lr_clips=0.025"]
LR_DOUBLE = ["--model.optim.lr_transforms=0.01", "--model.optim.lr_clips=0.1"]
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "steps x4": ["--trainer.max_epochs=8"],
    "tokens x4": [*MORE_TOKENS, "--trainer.max_steps=4"],
    "tokens x4, steps x4": MORE_TOKENS,
    "tokens x4, steps x4, lr x0.5": [*MORE_TOKENS, *LR_HALF],
    "tokens x4, steps x4, lr x2": [*MORE_TOKENS, *LR_DOUBLE],
    "tokens x4, steps x4, fp inputs": [*MORE_TOKENS, "--data.input_mode=fp"],
}


def run_name(variant: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=4, help="test windows scored (the first N)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--run-root", default=str(REPO_ROOT / "runs" / "sweep"))
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="recipe_sweep")
    parser.add_argument("--fresh", action="store_true", help="ignore variants stored by an earlier run")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows={args.windows} must be >= 1")
    if not Path(args.recipe).is_file():
        parser.error(f"--recipe: file not found: {args.recipe}")

    settings = {"recipe": args.recipe, "recipe_sha256": hashlib.sha256(Path(args.recipe).read_bytes()).hexdigest(),
                "windows": args.windows, "seq_len": args.seq_len}
    out = Path(args.out)
    stored_path = out / f"{args.name}.json"
    results: dict[str, Any] = {"settings": settings, "machine": machine_info(),
                               "rows": stored_rows(stored_path, settings, args.fresh)}
    for variant in args.variants:
        if variant in results["rows"]:
            continue
        started = time.perf_counter()
        row = pipeline_row(args.recipe, VARIANTS[variant], Path(args.run_root) / run_name(variant), args.windows,
                           args.seq_len)
        row["overrides"] = VARIANTS[variant]
        row["seconds"] = time.perf_counter() - started
        results["rows"][variant] = row
        write_json_atomic(stored_path, results)
        print(f"{variant}: ppl {row['ppl']:.2f} ({row['seconds']:.0f} s)", flush=True)
    base = results["rows"].get("base", {}).get("ppl")
    table = [{"variant": name, "overrides": " ".join(row["overrides"]) or "(the recipe)", "ppl": row["ppl"],
              "/ base": row["ppl"] / base if base else None, "train s/layer": row["seconds_per_layer"],
              "layers that kept their initial state": len(row.get("kept_initial", []))}
             for name, row in results["rows"].items()]
    windows = next(iter(results["rows"].values()), {}).get("windows", args.windows)
    text = (f"Recipe sweep on {args.recipe}: WikiText-2 test, {windows} windows x {args.seq_len} tokens\n\n"
            + markdown_table(table) + "\n")
    write_text_atomic(out / f"{args.name}.md", text)
    print()
    print(text)


if __name__ == "__main__":
    main()
