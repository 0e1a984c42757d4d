"""What a 4-bit KV cache costs on top of W4A4, at the CPU recipe, over several seeds.

    python benchmarks/kv4_gap.py [--seeds 0 1 2] [--run-root runs/kv4_gap]

For each seed (``model.quant.seed``: the rotations' seeds; the calibration windows stay the
same) it trains ``configs/smollm2-135m_cpu.yaml`` three ways with ``train.py fit``, each in its
own run directory ``<run-root>/<variant>_s<seed>`` (about 7 minutes each on 2 cores):

* ``w4a4``: the recipe as shipped (KV cache in full precision);
* ``w4a4kv4``: ``kv_bits=4`` behind a trained head-dim rotation of Q/K (``kv_reflections=null``);
* ``w4a4kv4_clip``: the same, plus a learned clip ratio for the K and the V ranges
  (``kv_learnable_clip``).

A run directory that already holds a ``summary.json`` of the same settings is read, not
retrained. Perplexity is the recipe's own: the first 16 WikiText-2 test windows of 2048 tokens,
the export loaded back. Prints one row per variant (each seed, the mean, the mean's ratio to
W4A4's mean, the layers that kept their initial state) and writes
``benchmarks/results/kv4_gap.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import KV4_SETTINGS, machine_info, print_markdown_table, quant_overrides, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "configs" / "smollm2-135m_cpu.yaml"
# Each variant's KV settings (BlockQuantConfig fields): passed to train.py, and checked against a
# run directory's run.json, so a directory holding another variant is refused, not reported.
VARIANTS = {
    "w4a4": dict(kv_bits=16),
    "w4a4kv4": dict(KV4_SETTINGS, kv_learnable_clip=False),
    "w4a4kv4_clip": dict(KV4_SETTINGS, kv_learnable_clip=True),
}


def run_variant(run_dir: Path, variant: str, seed: int) -> dict:
    """The ``summary.json`` of the variant's run at ``seed``, training it first if it has none."""
    settings = {**VARIANTS[variant], "seed": seed}
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        command = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(RECIPE),
                   "--pipeline.eval_fp=false", f"--pipeline.run_dir={run_dir}",
                   "--trainer.enable_progress_bar=false", *quant_overrides(settings)]
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=REPO_ROOT)
    quant = json.loads((run_dir / "run.json").read_text())["quant"]
    wrong = {key: quant.get(key) for key, value in settings.items() if quant.get(key) != value}
    if wrong:
        raise SystemExit(f"error: {run_dir} holds another run ({wrong}, expected {settings}); "
                         "remove it or pick another --run-root")
    return json.loads(summary_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-root", type=Path, default=REPO_ROOT / "runs" / "kv4_gap")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "kv4_gap.json")
    args = parser.parse_args()

    by_variant: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        for variant in VARIANTS:
            summary = run_variant(args.run_root / f"{variant}_s{seed}", variant, seed)
            scored = summary["quantized"]
            by_variant.setdefault(variant, {})[str(seed)] = {
                "ppl": scored["ppl"], "n_windows": scored["n_windows"], "seq_len": scored["seq_len"],
                "initial_kept": [layer["layer"] for layer in summary["layers"] if layer.get("kept") == "initial"]}
    reference = statistics.mean(entry["ppl"] for entry in by_variant["w4a4"].values())
    results, rows = {}, []
    for variant, by_seed in by_variant.items():
        mean = statistics.mean(entry["ppl"] for entry in by_seed.values())
        results[variant] = {"seeds": by_seed, "mean_ppl": mean, "ratio_to_w4a4_mean": mean / reference}
        rows.append({"variant": variant, **{f"seed {seed}": f"{entry['ppl']:.2f}" for seed, entry in by_seed.items()},
                     "mean": f"{mean:.2f}", "/ W4A4 mean": f"{mean / reference:.3f}",
                     "initial state kept (layers)": "; ".join(
                         f"s{seed}: {','.join(map(str, entry['initial_kept'])) or '-'}"
                         for seed, entry in by_seed.items())})
    windows = sorted({entry["n_windows"] for by_seed in by_variant.values() for entry in by_seed.values()})
    print(f"\nWikiText-2 test, the first {windows} windows of 2048 tokens, recipe {RECIPE.name}\n")
    print_markdown_table(rows)
    write_json_atomic(args.out, {"recipe": str(RECIPE.relative_to(REPO_ROOT)), "seeds": args.seeds,
                                 "machine": machine_info(), "variants": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
