"""Where training beats a fixed rotation: a trained W4A4 run read beside a fixed-rotation run, layer by layer.

Two finished runs of the same model and calibration data: one with a fixed randomized Hadamard
and GPTQ (no training, ``benchmarks/fair_baseline.py``'s fixed fit) and one trained. For each,
``benchmarks/loss_breakdown.py``'s switchboard keeps that run's own rotations everywhere and
switches its quantizers on one unit at a time, on the same WikiText-2 test windows:

* ``whole``: every quantizer on (the export itself), ``Δ log-ppl`` against all off;
* ``layers``: one layer quantized alone (its W, A and, if the run has one, KV);
* ``linears``: one linear quantized alone (its 4-bit weight and its input's 4-bit quantizer).

Each ``Δ`` is against the same run's all-off model (the FP model up to its rotations' rounding),
so the two runs' rows are comparable: ``difference = trained − fixed``; negative means training
removed loss there, positive (``trained_worse``) means the trained run loses more than the fixed one.

    python benchmarks/learning_gap.py --fixed-run runs/fair/fixed_s0 --trained-run runs/fair/trained_s0 \\
        [--scan-windows 1] [--threads 1] [--data-dir DIR] [--name learning_gap_demo]

Writes, under ``--out`` (default ``benchmarks/results``):

* ``<name>.json``: ``command``, ``machine``, ``date``, ``settings`` (both run dirs and their
  exports' hashes), ``rows`` (each run's raw scans, what a rerun with the same settings resumes
  from), ``whole``, ``layers`` and ``linears`` (fixed, trained, difference, trained_worse per row)
  and ``kinds`` (the linears summed over layers, per kind);
* ``<name>.md``: the whole-model row, the per-layer table, the per-kind sums, and the ten linears
  where training gains most and the ten where it loses or gains least;
* ``<name>.png``: per-layer paired bars (fixed, trained) over a layer × linear heat map of
  trained − fixed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from _common import machine_info, markdown_table, write_json_atomic
from loss_breakdown import (ErrorSources, checked_sources, layer_units, linear_heat_map, linear_units, load_run,
                            run_config, save_figure, scan, write_outputs)

from hh_lightning.block import LINEAR_NAMES
from hh_lightning.files import sha256_file
from hh_lightning.text import evaluation_windows

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = ("fixed", "trained")
SCANS = ("whole", "layers", "linears")


def whole_units(_sources: ErrorSources) -> list[tuple[str, int, dict]]:
    # kv=True is what loss_breakdown's switchboard check calls "the export": a run without a KV
    # quantizer ignores it.
    return [("all", 0, {"weights": True, "inputs": True, "kv": True})]


def reusable_rows(path: Path, settings: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
    """The runs' rows stored in ``path`` that still hold: same windows and, per run, the same export.

    Per run rather than all or nothing (``_common.stored_rows``): a retrained run then costs its
    own scans again, not the other run's too.
    """
    if fresh or not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    old = stored.get("settings", {})
    if any(old.get(key) != settings[key] for key in ("scan_windows", "seq_len")):
        return {}
    return {name: rows for name, rows in stored.get("rows", {}).items()
            if all(old.get(f"{name}_{key}") == settings[f"{name}_{key}"] for key in ("run", "export_sha256"))}


def measure_run(run_dir: Path, stored: dict[str, Any], scan_windows: int, seq_len: int,
                data_dir: str | None, store: Callable[[], None]) -> None:
    """Fill ``stored`` with ``run_dir``'s all-off log-ppl and its whole/layers/linears scans."""
    fp_model, quantized, tokens = load_run(run_dir, run_dir / "quantized", data_dir=data_dir)
    windows = evaluation_windows(tokens, seq_len, scan_windows)
    # Both runs must be scored on the same tokens; a hash compares them without keeping the tokens.
    stored["windows_sha256"] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    sources = checked_sources(quantized, fp_model, run_dir, windows[:1], seq_len)
    stored["code_error_max"] = max(sources.code_errors.values())
    del fp_model
    if "baseline_log_ppl" not in stored:
        # Kept so a reader can see the two all-off baselines agree (both are the FP model, rotated).
        with torch.no_grad():
            nll = sources.nll_from(0, quantized.model.embed_tokens(windows), windows)
        stored["baseline_log_ppl"] = nll / windows[:, 1:].numel()
    for part, units in zip(SCANS, (whole_units, layer_units, linear_units)):
        print(f"{part}:", flush=True)
        started = time.perf_counter()
        scan(sources, windows, units(sources), stored.setdefault(part, {}), store)
        seconds = stored.setdefault("seconds", {})
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started  # summed over resumes
        store()
    stored["complete"] = True
    store()


def compare(fixed: dict[str, float], trained: dict[str, float]) -> list[dict[str, Any]]:
    """One row per unit both runs hold, in ``fixed``'s order: both ``Δ``s and trained − fixed."""
    return [{"unit": label, "fixed": fixed[label], "trained": trained[label],
             "difference": trained[label] - fixed[label], "trained_worse": trained[label] > fixed[label]}
            for label in fixed if label in trained]


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    """The comparison tables of the JSON, from both runs' raw scans."""
    fixed, trained = rows["fixed"], rows["trained"]
    layers = [{"layer": int(row.pop("unit").split()[1]), **row} for row in compare(fixed["layers"], trained["layers"])]
    linears = []
    for row in compare(fixed["linears"], trained["linears"]):
        layer, kind = row["unit"].split(".")
        linears.append({"linear": row.pop("unit"), "layer": int(layer), "kind": kind, **row})
    kinds = []
    for kind in LINEAR_NAMES:
        chosen = [row for row in linears if row["kind"] == kind]
        kinds.append({"kind": kind, "fixed": sum(r["fixed"] for r in chosen),
                      "trained": sum(r["trained"] for r in chosen),
                      "difference": sum(r["difference"] for r in chosen),
                      "layers_trained_worse": sum(r["trained_worse"] for r in chosen)})
    whole = {name: {"all_on": rows[name]["whole"]["all"], "sum_of_layers": sum(rows[name]["layers"].values()),
                    "sum_of_linears": sum(rows[name]["linears"].values()),
                    "baseline_log_ppl": rows[name]["baseline_log_ppl"]} for name in RUNS}
    whole["difference"] = {key: whole["trained"][key] - whole["fixed"][key] for key in whole["fixed"]}
    return {"whole": whole, "layers": layers, "linears": linears, "kinds": kinds}


def tables(results: dict[str, Any]) -> str:
    settings, whole = results["settings"], results["whole"]
    scanned = f"{settings['scan_windows']} WikiText-2 test window(s) x {settings['seq_len']} tokens"
    text = (f"Trained `{settings['trained_run']}` against fixed `{settings['fixed_run']}`, {scanned}. "
            "Every number is a Δ log-ppl against the same run's all-off model; trained − fixed < 0 is "
            "where training gains.\n\n")
    labels = {"all_on": "whole model, all quantizers on", "sum_of_layers": "sum of the layers, each alone",
              "sum_of_linears": "sum of the linears, each alone"}
    text += markdown_table([{"measure": label, "fixed": whole["fixed"][key], "trained": whole["trained"][key],
                             "trained − fixed": whole["difference"][key]} for key, label in labels.items()])
    text += (f"\n\nAll-off log-ppl (the baseline of each Δ): fixed {whole['fixed']['baseline_log_ppl']:.5f}, "
             f"trained {whole['trained']['baseline_log_ppl']:.5f}.\n\n")

    def row(r: dict[str, Any], key: str) -> dict[str, Any]:
        return {key: r[key], "fixed Δ": r["fixed"], "trained Δ": r["trained"], "trained − fixed": r["difference"],
                "trained worse": "yes" if r["trained_worse"] else ""}

    layers = results["layers"]
    worse = [str(r["layer"]) for r in layers if r["trained_worse"]]
    text += (f"Layers quantized alone; trained worse in {len(worse)} of {len(layers)}"
             + (f" (layers {', '.join(worse)})" if worse else "") + "\n\n"
             + markdown_table([row(r, "layer") for r in layers]) + "\n\n")
    text += ("Linears quantized alone, summed over layers by kind\n\n"
             + markdown_table([{"kind": r["kind"], "fixed Δ": r["fixed"], "trained Δ": r["trained"],
                                "trained − fixed": r["difference"], "layers trained worse": r["layers_trained_worse"]}
                               for r in results["kinds"]]) + "\n\n")
    ranked = sorted(results["linears"], key=lambda r: r["difference"])
    text += ("The ten linears where training gains most\n\n"
             + markdown_table([row(r, "linear") for r in ranked[:10]]) + "\n\n"
             "The ten linears where training loses or gains least\n\n"
             + markdown_table([row(r, "linear") for r in ranked[::-1][:10]]) + "\n")
    return text


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    layers = results["layers"]
    count = len(layers)
    figure, (bars, heat) = plt.subplots(2, 1, figsize=(12, 8.5), gridspec_kw={"height_ratios": [1, 1.1]})
    position = torch.arange(count).numpy()
    bars.bar(position - 0.2, [r["fixed"] for r in layers], 0.4, label="fixed Hadamard + GPTQ", color="tab:gray")
    bars.bar(position + 0.2, [r["trained"] for r in layers], 0.4, label="trained", color="tab:blue")
    bars.set_ylabel("Δ log-ppl, this layer alone")
    bars.set_xlim(-0.6, count - 0.4)
    bars.set_xticks(position)
    bars.set_title("W4A4 loss by layer, each layer quantized alone")
    bars.legend()
    bars.grid(True, axis="y", alpha=0.3)
    difference = {row["linear"]: row["difference"] for row in results["linears"]}
    # Centred on zero so the colour alone says which run wins: blue, training gains; red, it loses.
    bound = max((abs(value) for value in difference.values() if math.isfinite(value)), default=0.0) or 1e-9
    linear_heat_map(figure, heat, difference, count, "one linear quantized alone: trained − fixed Δ log-ppl "
                    "(red: trained worse)", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound))
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed-run", required=True, help="a finished fixed-rotation run (with an export)")
    parser.add_argument("--trained-run", required=True, help="a finished trained run of the same model")
    parser.add_argument("--data-dir", default=None,
                        help="wikitext-2-raw directory (default: the runs', or $HH_DATA_DIR)")
    parser.add_argument("--scan-windows", type=int, default=1, help="test windows for every scan")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="learning_gap")
    parser.add_argument("--fresh", action="store_true", help="ignore rows stored under the same settings")
    args = parser.parse_args()
    if args.scan_windows < 1 or args.seq_len < 2:
        parser.error("--scan-windows must be at least 1 and --seq-len at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dirs = {"fixed": Path(args.fixed_run), "trained": Path(args.trained_run)}
    for name, run_dir in run_dirs.items():
        run_config(run_dir)
        if not (run_dir / "quantized" / "quantization_config.json").is_file():
            parser.error(f"--{name}-run: {run_dir / 'quantized'} holds no export (quantization_config.json)")
    settings = {"fixed_run": str(run_dirs["fixed"]), "trained_run": str(run_dirs["trained"]),
                "scan_windows": args.scan_windows, "seq_len": args.seq_len,
                **{f"{name}_export_sha256": sha256_file(run_dir / "quantized" / "model.safetensors")
                   for name, run_dir in run_dirs.items()}}
    out = Path(args.out)
    stored_path = out / f"{args.name}.json"
    results: dict[str, Any] = {
        "command": "python " + shlex.join(["benchmarks/learning_gap.py", *sys.argv[1:]]),
        "machine": machine_info(), "date": date.today().isoformat(), "settings": settings,
        "fixed_run": settings["fixed_run"], "trained_run": settings["trained_run"],
        "rows": reusable_rows(stored_path, settings, args.fresh)}

    def store() -> None:
        write_json_atomic(stored_path, results)

    for name, run_dir in run_dirs.items():
        stored = results["rows"].setdefault(name, {})
        if stored.get("complete"):
            print(f"{name}: stored rows reused", flush=True)
            continue
        print(f"{name} run, {run_dir}:", flush=True)
        measure_run(run_dir, stored, args.scan_windows, args.seq_len, args.data_dir, store)
    if results["rows"]["fixed"]["windows_sha256"] != results["rows"]["trained"]["windows_sha256"]:
        raise SystemExit("error: the two runs tokenize WikiText-2 differently; their rows are not comparable "
                         "(are they runs of the same model?)")
    results.update(summarize(results["rows"]))
    store()
    write_outputs(results, tables(results), plot, out, args.name, stored_path)


if __name__ == "__main__":
    main()
