"""A recipe's trained W4A4 row beside a fixed randomized Hadamard + GPTQ row, same data and config.

    python benchmarks/fair_baseline.py [--config configs/demo.yaml] [--seeds 0 1 2] [--eval-windows 16]
                                       [--runs-dir runs/fair] [--kinds fixed trained ...] [--collect-only]

The fixed row is QuaRot-like: the config with the reflections starting at identity and no learning
(``rotation_init identity``, every learning rate 0, one epoch), so each rotation is the fixed
randomized Hadamard alone and GPTQ rounds the weights at fold. The trained row is the config as it
ships. Both read the same calibration windows (``--data.seed S``) and the Hadamard signs of the same
seed (``--model.quant.seed S``); each fit scores its export, as loaded back, on the first
``--eval-windows`` windows of WikiText-2 test. The FP model scores those windows alike whatever the
seed, so only the fixed fit scores it and every other row takes the same seed's. One fit at a time,
into ``RUNS_DIR/KIND_sS``; a run directory that already holds ``summary.json`` is read, not refit,
so an interrupted run resumes. ``--collect-only`` fits nothing and reads what is there.

``--kinds`` (default: the pair) can also fit the trained row with changes (``VARIANTS``): nothing
learned after the PCA init (what training adds to its start), no smoothing scales or smoothing at
the rotations' lr (what ``quant.smoothing`` and ``optim.lr_smoothing`` add), and, without smoothing,
2 epochs on the block MSE (the recipes before the per-token relative error) and more epochs with
either PCA covariance (``quant.pca_statistics``). A seed enters the file once its fixed row is finished; each
other row's mean averages the seeds it holds and names them when they are fewer.

Per seed, ``gap_closed`` = (log ppl_fixed - log ppl_trained) / (log ppl_fixed - log ppl_fp), the
share of the fixed row's log-perplexity gap to FP that training closes. The mean rows average the
perplexities and ``gap_closed`` over their seeds. Writes
``benchmarks/results/fair_baseline_{config name}.json`` (``seeds``: the seeds with a fixed row;
``seeds_unfinished``: those asked for without every kind asked for) and prints the table.
WikiText-2 comes from ``--data-dir`` or ``$HH_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _common import machine_info, print_markdown_table, write_json_atomic
from report import gap_closed

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/demo.yaml"
FIXED = "fixed Hadamard + GPTQ"
TRAINED = "trained (the recipe)"
# What turns the recipe into the fixed row: reflections at identity, nothing learned.
FIXED_OVERRIDES = ["--model.quant.rotation_init", "identity", "--model.optim.lr_transforms", "0",
                   "--model.optim.lr_clips", "0", "--model.optim.lr_smoothing", "0", "--trainer.max_epochs", "1"]
DEFAULT_RUNS_DIR = "runs/fair"
DEFAULT_KINDS = ["fixed", "trained"]  # the pair
# The FP model scores the same windows whatever the seed; only the fixed fit scores it, and the trained
# row of a seed reads its FP from there (the trained fit is the shipped recipe otherwise).
TRAINED_OVERRIDES = ["--pipeline.eval_fp", "false"]
# The questions beside the pair, each the trained row with the changes listed (every setting it differs in,
# so each command gives its row again): what training adds to its PCA start, what the smoothing scales and
# their own lr add, and the recipes' earlier loss, length and PCA covariance (without smoothing, as they were
# measured). None is part of the pair.
NO_SMOOTHING = ["--model.quant.smoothing", "false"]
VARIANTS = {
    "pca_only": ("PCA init, nothing learned (what training adds)",
                 ["--model.optim.lr_transforms", "0", "--model.optim.lr_clips", "0", "--model.optim.lr_smoothing", "0",
                  "--trainer.max_epochs", "1"]),
    "no_smoothing": ("trained without smoothing scales", NO_SMOOTHING),
    "smoothing_at_rotation_lr": ("smoothing at the rotations' lr (0.005)", ["--model.optim.lr_smoothing", "0.005"]),
    "mse_epochs_2": ("trained 2 epochs on the block MSE, no smoothing",
                     ["--model.optim.loss", "mse", "--trainer.max_epochs", "2", *NO_SMOOTHING]),
    "epochs_8": ("trained 8 epochs, no smoothing", ["--trainer.max_epochs", "8", *NO_SMOOTHING]),
    "epochs_8_pca_token_relative": ("trained 8 epochs, PCA init on each token scaled to unit mean square, "
                                    "no smoothing", ["--trainer.max_epochs", "8", "--model.quant.pca_statistics",
                                                     "token_relative", *NO_SMOOTHING]),
}
KINDS = {"fixed": (FIXED, FIXED_OVERRIDES), "trained": (TRAINED, TRAINED_OVERRIDES),
         **{name: (label, TRAINED_OVERRIDES + overrides) for name, (label, overrides) in VARIANTS.items()}}


def fit_command(kind: str, seed: int | str, eval_windows: int, runs_dir: str, config: str) -> list[str]:
    return ["python", "train.py", "fit", "--config", config, *KINDS[kind][1],
            "--pipeline.eval_windows", str(eval_windows), "--pipeline.run_dir", f"{runs_dir}/{kind}_s{seed}",
            "--seed_everything", str(seed), "--model.quant.seed", str(seed), "--data.seed", str(seed)]


def run_dir(runs_dir: str, kind: str, seed: int) -> Path:
    path = Path(runs_dir) / f"{kind}_s{seed}"
    return path if path.is_absolute() else REPO_ROOT / path


def fit(kind: str, seed: int, args: argparse.Namespace) -> bool:
    """Fit one run unless its summary is already there; False if the fit failed."""
    if (run_dir(args.runs_dir, kind, seed) / "summary.json").is_file():
        print(f"{kind} seed {seed}: summary.json present, read as is", flush=True)
        return True
    cmd = fit_command(kind, seed, args.eval_windows, args.runs_dir, args.config)
    cmd[0] = sys.executable
    env = dict(os.environ, **({"HH_DATA_DIR": args.data_dir} if args.data_dir else {}))
    print(f"{kind} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode == 0
    print(f"{kind} seed {seed}: {'done' if done else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    return done


def read_summary(runs_dir: str, kind: str, seed: int, eval_windows: int) -> dict[str, Any] | None:
    path = run_dir(runs_dir, kind, seed) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    for part in ("fp", "quantized"):
        if part in summary and summary[part]["n_windows"] != eval_windows:
            raise SystemExit(f"error: {path} scored {summary[part]['n_windows']} windows, not --eval-windows "
                             f"{eval_windows}; move that run directory away or pass its count")
    return summary


def model_name(config: str) -> str:
    """The model a config quantizes, and the config: what the table's rows are of."""
    data = yaml.safe_load((REPO_ROOT / config).read_text()).get("data") or {}
    return f"`{data.get('model', 'the default model')}`, `{config}`"


def table_rows(summaries: dict[tuple[str, int], dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        for kind in KINDS:
            if (kind, seed) not in summaries:
                continue
            s = summaries[kind, seed]
            fp = s.get("fp", summaries["fixed", seed]["fp"])  # the trained fit leaves FP to the fixed one
            row = {"row": KINDS[kind][0], "seed": seed, "fp_ppl": fp["ppl"], "w4a4_ppl": s["quantized"]["ppl"],
                   "w4a4 / FP": s["quantized"]["ppl"] / fp["ppl"]}
            if kind != "fixed":
                row["gap_closed"] = gap_closed(summaries["fixed", seed]["quantized"]["ppl"], row["w4a4_ppl"],
                                               row["fp_ppl"])
            rows.append(row)
    for kind in KINDS:
        own = [r for r in rows if r["row"] == KINDS[kind][0]]
        if not own:
            continue
        mean = {"row": KINDS[kind][0], "seed": "mean" if len(own) == len(seeds) else
                "mean of " + " ".join(str(r["seed"]) for r in own)}
        for key in ("fp_ppl", "w4a4_ppl", "w4a4 / FP", "gap_closed"):
            if key in own[0]:
                mean[key] = statistics.fmean(r[key] for r in own)
        if kind != "fixed" and len(own) > 1:
            mean["gap_closed sd"] = statistics.stdev(r["gap_closed"] for r in own)
        rows.append(mean)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="the recipe both rows start from, relative to the repository (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows each fit scores")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="where the fits go, relative to the repository")
    parser.add_argument("--data-dir", default=None, help="WikiText-2 raw directory (default: $HH_DATA_DIR)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=DEFAULT_KINDS,
                        help="which rows to fit (default: the pair; every row of a seed needs its fixed one)")
    parser.add_argument("--collect-only", action="store_true", help="fit nothing; read the summaries there")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/fair_baseline_{the config's name}.json")
    args = parser.parse_args()
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds takes distinct non-negative integers, got {' '.join(map(str, args.seeds))}")
    if not (REPO_ROOT / args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.out is None:
        args.out = REPO_ROOT / "benchmarks" / "results" / f"fair_baseline_{Path(args.config).stem}.json"
    if args.eval_windows < 1:
        parser.error(f"--eval-windows must be at least 1, got {args.eval_windows}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: no such directory")

    if not args.collect_only:
        for seed in args.seeds:
            for kind in [k for k in KINDS if k in args.kinds]:  # a seed's rows complete before the next seed
                if not fit(kind, seed, args):
                    print(f"error: the {kind} fit of seed {seed} failed; writing the seeds that finished",
                          file=sys.stderr)
                    break
            else:
                continue
            break

    summaries = {(kind, seed): s for seed in args.seeds for kind in KINDS
                 if (s := read_summary(args.runs_dir, kind, seed, args.eval_windows)) is not None}
    # Every other row of a seed is measured against its fixed row, so a seed counts once that one is there.
    seeds = [s for s in args.seeds if ("fixed", s) in summaries]
    missing = [s for s in args.seeds if any((kind, s) not in summaries for kind in args.kinds)]
    if not seeds:
        print("error: no seed has a fixed summary; nothing written", file=sys.stderr)
        return 1
    rows = table_rows(summaries, seeds)
    first = summaries["fixed", seeds[0]]["quantized"]
    # The command that gives this file's rows of every seed again (their runs resume from summary.json); a row
    # of fewer seeds is its kind's fit, under "fits", for the seeds its mean row names.
    kinds = [kind for kind in KINDS if any((kind, seed) in summaries for seed in seeds)]
    every_seed = [kind for kind in kinds if all((kind, seed) in summaries for seed in seeds)]
    command = shlex.join(["python", "benchmarks/fair_baseline.py", "--seeds", *map(str, seeds),
                          "--eval-windows", str(args.eval_windows),
                          *(["--config", args.config] if args.config != DEFAULT_CONFIG else []),
                          *(["--runs-dir", args.runs_dir] if args.runs_dir != DEFAULT_RUNS_DIR else []),
                          *(["--kinds", *every_seed] if every_seed != DEFAULT_KINDS else [])])
    data = {"command": command, "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
            "model": model_name(args.config), "config": args.config,
            "windows": f"WikiText-2 test, the first {first['n_windows']} windows of {first['seq_len']} tokens",
            "eval_windows": first["n_windows"],
            "seeds": seeds, "seeds_unfinished": missing,
            "fits": {kind: " ".join(fit_command(kind, "{S}", args.eval_windows, args.runs_dir, args.config))
                     for kind in kinds},
            "train_seconds": {f"{kind}_s{seed}": summaries[kind, seed].get("train_seconds")
                              for seed in seeds for kind in KINDS if (kind, seed) in summaries},
            "rows": rows}
    write_json_atomic(args.out, data)
    print_markdown_table(rows)
    print(f"wrote {args.out} (seeds {' '.join(map(str, seeds))})", flush=True)
    if missing:
        print(f"error: seeds {' '.join(map(str, missing))} lack a finished fit of the kinds asked for "
              f"({' '.join(args.kinds)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
