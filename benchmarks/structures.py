"""Rotation structures compared on SmolLM2-135M-Instruct: perplexity, export size, calibration time, online cost.

For each structure of ``STRUCTURE_RECIPES`` (``_common.py``: ``dense``, i.e.
Householder k = d from a randomized Hadamard; ``kronecker``, two Hadamard-like
Householder factors and random signs; ``hadamard+householder k=64/128``, a fixed
randomized Hadamard then k PCA-initialized reflections):

* **untrained**: every block folded from its initialization (the structure's
  start, PCA from the recipe's cached calibration windows where it applies,
  clip-searched weights), no training;
* **trained**: the recipe's whole pipeline (``train.py fit``: every layer
  trained, folded, exported), run directory ``--run-root/<structure>``,
  resumed if present. Its perplexity is the *export loaded back*, its size is
  the whole ``model.safetensors`` by kind of tensor, and its calibration time
  per layer is the pipeline's training wall time over the layer count (in
  ``quantized`` input mode that includes each layer's pass over the quantized
  inputs);
* **online cost**: ``inference_overhead.py``'s part (a) for the structure: a
  folded 4-layer SmolLM2-shaped model (random weights), one sequence of
  ``--overhead-tokens`` tokens, the online rotations' time as a share of the
  FP decoder stack's forward, and the folded/FP stack ratio.

Perplexity: WikiText-2 test, GPTQ convention, the first ``--windows`` windows
of 2048 tokens. Calibration: the recipe's windows of WikiText-2 valid.

    python benchmarks/structures.py [--recipe configs/demo.yaml] [--windows 16] [--structures ...]

Writes ``benchmarks/results/structures.json`` after every row (a rerun skips
stored rows of the same settings; ``--fresh`` starts over) and
``structures.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    STRUCTURE_RECIPES,
    machine_info,
    markdown_table,
    stored_rows,
    structure_overrides,
    write_json_atomic,
)
from results import Recipe, untrained_model

from hh_lightning.cli import main as build_cli
from hh_lightning.cli import quantization_run
from hh_lightning.evaluation import perplexity
from hh_lightning.files import write_text_atomic
from hh_lightning.text import tokenize_text

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def score(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    result = perplexity(model, tokens, args.seq_len, args.windows, progress=sys.stderr.isatty())
    return {"ppl": result.ppl, "windows": result.n_windows, "seq_len": result.seq_len}


def untrained_row(recipe: Recipe, name: str, tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    quant = dataclasses.replace(recipe.quant, **STRUCTURE_RECIPES[name])
    started = time.perf_counter()
    model = untrained_model(recipe, quant)
    init_seconds = time.perf_counter() - started
    row = {**score(model, tokens, args), "init_seconds": init_seconds}
    del model
    gc.collect()
    return row


def trained_row(recipe: Recipe, name: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.run_root) / name.replace(" ", "_").replace("+", "_").replace("=", "")
    return pipeline_row(recipe.recipe, [*args.override, *structure_overrides(name)], run_dir, args.windows,
                        args.seq_len)


def pipeline_row(recipe_path: str, overrides: list[str], run_dir: Path, windows: int, seq_len: int
                 ) -> dict[str, Any]:
    """Run (or resume) ``train.py fit`` for the recipe with ``overrides`` into ``run_dir``: every
    layer trained, folded and exported; the export loaded back and scored on ``windows`` test
    windows. Returns its perplexity, whole export size, training time and per-layer MSEs."""
    overrides = [*overrides, "--data.allow_generated_fallback=false",
                 f"--pipeline.run_dir={run_dir}", f"--pipeline.eval_windows={windows}",
                 f"--pipeline.eval_seq_len={seq_len}", "--pipeline.eval_split=test",
                 "--pipeline.eval_fp=false", "--pipeline.export=true", "--pipeline.layers=null"]
    run = quantization_run(build_cli(["--config", recipe_path, *overrides], run=False))
    run.validate()
    summary = run.run()
    sizes = summary["export_size"]
    layers = len(summary["layers"])
    run_dir_bytes = sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file())
    return {"ppl": summary["quantized"]["ppl"], "windows": summary["quantized"]["n_windows"],
            "seq_len": summary["quantized"]["seq_len"], "train_seconds": summary["train_seconds"],
            "seconds_per_layer": summary["train_seconds"] / layers, "export_size": sizes,
            "run_dir_bytes": run_dir_bytes,
            "mse_init": [m["mse_init"] for m in summary["layers"]],
            "mse_final": [m["mse_final"] for m in summary["layers"]],
            "kept_initial": [m["layer"] for m in summary["layers"] if m.get("kept") == "initial"]}


def overhead_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import inference_overhead

    settings = argparse.Namespace(layers=4, vocab_size=49152, seq_len=args.overhead_tokens, calib_len=512,
                                  w_init=None, model_repeats=args.overhead_repeats, warmup=2,
                                  attn_implementation="sdpa", device="cpu", seed=0, structure=name)
    rows, parts, _ = inference_overhead.model_rows(settings)
    stack = rows[0]
    rotations = next(p for p in parts if p["part of a folded forward"].startswith("online rotations"))
    return {"fp_stack_ms": stack["fp ms"], "folded_stack_ms": stack["folded W4A4 ms"],
            "folded_over_fp": stack["ratio"], "rotations_ms": rotations["ms (all layers)"],
            "rotations_share_of_fp_stack": rotations["share of FP stack time"]}


def tables(results: dict[str, Any]) -> str:
    rows = results["rows"]
    dense = rows.get("trained/dense", {}).get("ppl")
    quality, size, cost = [], [], []
    fp = rows.get("fp", {}).get("ppl")
    for name in STRUCTURE_RECIPES:
        untrained, trained = rows.get(f"untrained/{name}", {}), rows.get(f"trained/{name}", {})
        overhead = rows.get(f"overhead/{name}", {})
        quality.append({"structure": name, "untrained ppl": untrained.get("ppl"), "trained ppl": trained.get("ppl"),
                        "trained / dense trained": trained["ppl"] / dense if dense and trained else None,
                        "trained / FP": trained["ppl"] / fp if fp and trained else None,
                        "calibration s/layer": trained.get("seconds_per_layer")})
        if trained:
            sizes = trained["export_size"]
            size.append({"structure": name, "whole file MiB": sizes["file_bytes"] / MIB,
                         "/ FP16 model": sizes["ratio"],
                         **{f"{kind} MiB": value / MIB for kind, value in sizes["by_kind"].items()},
                         "rotations share": sizes["share"]["rotations"],
                         "run_dir / export": trained["run_dir_bytes"] / sizes["file_bytes"]})
        if overhead:
            cost.append({"structure": name, "FP stack ms": overhead["fp_stack_ms"],
                         "folded stack ms": overhead["folded_stack_ms"], "folded / FP": overhead["folded_over_fp"],
                         "online rotations ms": overhead["rotations_ms"],
                         "rotations / FP stack": overhead["rotations_share_of_fp_stack"]})
    windows = next((r["windows"] for r in rows.values() if "windows" in r), "?")
    text = (f"Perplexity: WikiText-2 test, {windows} windows x {results['settings']['seq_len']} tokens "
            f"(FP: {fp if fp is None else f'{fp:.2f}'})\n\n" + markdown_table(quality))
    if size:
        text += "\n\nWhole export file by kind (trained rows)\n\n" + markdown_table(size)
    if cost:
        text += (f"\n\nOnline cost: folded 4-layer SmolLM2-shaped model, {results['settings']['overhead_tokens']} "
                 "tokens, CPU\n\n" + markdown_table(cost))
    return text + "\n"


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe, less the rotation fields every row sets itself: stored rows stay comparable
    while these match (a comment or the recipe's own structure may change)."""
    structure_fields = {key for fields in STRUCTURE_RECIPES.values() for key in fields}
    run = recipe.run
    quant = {k: v for k, v in run.recipe.quant.to_dict().items() if k not in structure_fields}
    data = {k: v for k, v in recipe.datamodule.hparams.items() if k not in ("_class_path", "_instantiator")}
    return json.loads(json.dumps({"quant": quant, "optim": dataclasses.asdict(run.recipe.optim), "data": data,
                                  "trainer": run.trainer_kwargs}, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--override", action="append", default=[],
                        help="a train.py argument applied to the recipe (repeatable)")
    parser.add_argument("--structures", nargs="*", default=list(STRUCTURE_RECIPES), choices=list(STRUCTURE_RECIPES))
    parser.add_argument("--parts", nargs="*", default=["untrained", "trained", "overhead"],
                        choices=["untrained", "trained", "overhead"])
    parser.add_argument("--windows", type=int, default=16, help="test windows scored (the first N)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--overhead-tokens", type=int, default=512)
    parser.add_argument("--overhead-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--run-root", default=str(REPO_ROOT / "runs" / "structures"))
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="structures")
    parser.add_argument("--fresh", action="store_true", help="ignore rows stored by an earlier run")
    parser.add_argument("--skip-fp", action="store_true", help="do not score the FP model")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows={args.windows} must be >= 1")
    if not Path(args.recipe).is_file():
        parser.error(f"--recipe: file not found: {args.recipe}")
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = Recipe(args.recipe, args.override)
    settings = {"recipe": args.recipe, "recipe_settings": recipe_settings(recipe), "override": args.override,
                "windows": args.windows, "seq_len": args.seq_len, "overhead_tokens": args.overhead_tokens}
    out = Path(args.out)
    stored_path = out / f"{args.name}.json"
    results: dict[str, Any] = {"settings": settings, "machine": machine_info(), "rows": {}}
    results["rows"] = stored_rows(stored_path, settings, args.fresh)
    if results["rows"]:
        print(f"resuming: {', '.join(results['rows'])} already in {stored_path}", flush=True)

    tokens = tokenize_text(recipe.datamodule.tokenizer, recipe.test_text)
    plan = [] if args.skip_fp else [("fp", None)]
    plan += [(f"{part}/{name}", (part, name)) for part in args.parts for name in args.structures]
    for key, what in plan:
        if key in results["rows"]:
            continue
        started = time.perf_counter()
        if what is None:
            row = score(copy.deepcopy(recipe.model), tokens, args)
        elif what[0] == "untrained":
            row = untrained_row(recipe, what[1], tokens, args)
        elif what[0] == "trained":
            row = trained_row(recipe, what[1], args)
        else:
            row = overhead_row(what[1], args)
        row["seconds"] = time.perf_counter() - started
        results["rows"][key] = row
        write_json_atomic(stored_path, results)
        write_text_atomic(out / f"{args.name}.md", tables(results))
        summary = f"ppl {row['ppl']:.2f}" if "ppl" in row else f"rotations {row['rotations_share_of_fp_stack']:.3f}"
        print(f"{key}: {summary} ({row['seconds']:.0f} s)", flush=True)
    print()
    print(tables(results))
    print(f"wrote {stored_path}")


if __name__ == "__main__":
    main()
