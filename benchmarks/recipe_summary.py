"""One recipe's headline file: a finished run's ``summary.json`` with the command, machine and date that made it.

    python benchmarks/recipe_summary.py --run-dir runs/demo --command "make demo" --threads 2 \
        --note "a fresh clone's make demo, nothing else running" --out benchmarks/results/demo_summary.json

``train.py fit`` writes ``RUN_DIR/summary.json`` (the export's perplexity, the FP model's when it scored
it, each layer's block errors, the training time). This adds ``command`` (what was run), ``machine``
(this machine's CPU count and torch version, with ``--threads`` as the fit's thread count: the fit ran
in another process), ``date`` and ``note``, and writes ``--out`` for ``benchmarks/report.py``'s
headline. ``--fp-from OTHER_RUN`` takes the FP row from another run that scored the same windows
(a fit run with ``--pipeline.eval_fp false``, such as ``benchmarks/fair_baseline.py``'s trained rows,
whose FP the same seed's fixed fit scored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import machine_info, write_json_atomic


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (has the fit finished?)")
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished fit's run directory")
    parser.add_argument("--command", required=True, help="the command that made the run, as a reader runs it")
    parser.add_argument("--threads", type=int, required=True, help="the torch threads the fit ran with")
    parser.add_argument("--note", default="", help="the conditions of the run (what else was running)")
    parser.add_argument("--fp-from", type=Path, default=None, help="a run whose FP row scored the same windows")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = read_summary(args.run_dir)
    if args.fp_from is not None:
        other = read_summary(args.fp_from)
        if "fp" not in other:
            raise SystemExit(f"error: {args.fp_from}/summary.json holds no FP row")
        if other["fp"]["n_windows"] != summary["quantized"]["n_windows"]:
            raise SystemExit(f"error: {args.fp_from} scored {other['fp']['n_windows']} windows, "
                             f"{args.run_dir} {summary['quantized']['n_windows']}")
        summary["fp"] = other["fp"]
    if "fp" not in summary:
        raise SystemExit(f"error: {args.run_dir}/summary.json holds no FP row; pass --fp-from")
    summary.pop("export_dir", None)  # this machine's path, meaningless elsewhere
    write_json_atomic(args.out, {**summary, "command": args.command,
                                 "machine": {**machine_info(), "torch_threads": args.threads},
                                 "date": time.strftime("%Y-%m-%d"), "note": args.note})
    print(f"wrote {args.out}: W4A4 {summary['quantized']['ppl']:.2f} against FP {summary['fp']['ppl']:.2f} "
          f"on {summary['quantized']['n_windows']} windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
