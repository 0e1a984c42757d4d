"""The results table: WikiText-2 perplexity of one model under every baseline and our trained W4A4.

Quantizes the recipe's model (default: SmolLM2-135M-Instruct from PyPI, the
demo recipe) in each setting below and scores WikiText-2 test perplexity
(GPTQ convention: non-overlapping windows of ``--seq-len`` tokens, the first
``--windows`` of them, or ``--all``). Calibration uses the recipe's windows of
WikiText-2 valid (its ``data`` section), read back from the activation cache.

    python benchmarks/results.py [--recipe configs/demo.yaml] [--windows 16 | --all] [--rows ...]

Rows (weights per-channel symmetric, activations per-token asymmetric, KV in
full precision, unless the row says otherwise):

* ``fp``: the model in float32.
* weight-only: ``w4a16_pc_rtn``; ``w4a16_g64_rtn`` (asymmetric groups of 64
  along the input dimension); ``w4a16_g64_hqq`` (our HQQ); ``w4a16_g64_hqq_package``
  (the ``hqq`` package's solver, dequantized into the weights); ``w3a16_g64_hqq``.
* W4A4, untrained: ``w4a4_rtn`` (no rotation, min-max weights);
  ``w4a4_hadamard`` (dense randomized Hadamard on every rotation site, applied
  online, clip-searched weights: QuaRot-like); ``w4a4_householder_pca`` (the
  recipe's reflection counts, PCA-initialized, clip-searched weights).
* W4A4, untrained, GPTQ-rounded: ``w4a4_hadamard_gptq`` (the Hadamard row, its
  folded weights rounded by GPTQ against the calibration inputs' Hessians).
* W4A4, trained by the recipe (``train.py fit``'s pipeline, each in its own
  run directory under ``--run-root``, resumed if present): ``w4a4_trained_fp``
  and ``w4a4_trained_quantized`` (``data.input_mode``), the same two with
  a 4-bit KV cache behind a head-dim rotation of Q/K (``w4a4kv4_*``), and
  ``w4a4_trained_quantized_nearest`` (the recipe's weights rounded to nearest
  instead of its rounding). The untrained rows round to nearest unless they say GPTQ;
  the trained rows round as the recipe says (the shipped configs: GPTQ).
* The CPU recipe: ``cpu_recipe`` and ``cpu_recipe_kv4`` train
  ``configs/smollm2-135m_cpu.yaml`` (W4A4, and with the 4-bit KV cache) in that
  recipe's own ``pipeline.run_dir``, so they share (and resume) the run that
  ``train.py fit --config configs/smollm2-135m_cpu.yaml`` makes.

Writes ``<out>/<name>.json`` (after every row: an interrupted run resumes
from it when its settings match), ``<name>.md`` and ``<name>_layer_mse.png``
(per-layer block MSE of the W4A4 rows on the recipe's held-out windows).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import KV4_SETTINGS, machine_info, markdown_table, quant_overrides, stored_rows, write_json_atomic
from hqq_vs_reference import reference_dequantize, reference_quantize

from hh_lightning.block import LINEAR_NAMES, BlockQuantConfig, HHDecoderBlock
from hh_lightning.cache import BoundaryPairDataset
from hh_lightning.artifacts import dataset_statistics
from hh_lightning.callbacks import init_rotations_from_dataset_
from hh_lightning.cli import main as build_cli
from hh_lightning.cli import quantization_run
from hh_lightning.evaluation import perplexity
from hh_lightning.files import write_text_atomic
from hh_lightning.module import block_mse
from hh_lightning.report import plot_layer_mse
from hh_lightning.text import tokenize_text
from hh_lightning.weight_only import quantize_weights_hqq

REPO_ROOT = Path(__file__).resolve().parents[1]
# The recipe is parsed by LightningCLI from a list, while this script has its own argv.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
NO_ROTATION = dict(qkv_reflections=0, upgate_reflections=0, down_reflections=0, kv_reflections=0, o_rotation="none")
# The untrained rotated baselines are plain Householder products whatever the recipe's structure:
# k = d from a dense randomized Hadamard (QuaRot-like), or 64 PCA-initialized reflections.
FULL_ROTATIONS = dict(rotation_structure="householder", qkv_reflections=None, upgate_reflections=None,
                      down_reflections=None)
PCA_ROTATIONS = dict(rotation_structure="householder", qkv_reflections=64, upgate_reflections=64,
                     down_reflections=64)
KV4_OVERRIDES = quant_overrides(KV4_SETTINGS)
CPU_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m_cpu.yaml")
NEAREST = dict(w_rounding="nearest")
GROUP_SIZE = 64
# Targets for the trained rows, in log-perplexity: the share of the RTN→FP gap
# closed, and the largest acceptable ratio of their gap to the untrained Hadamard row's.
GOAL_GAP_CLOSED = 0.85
GOAL_HADAMARD_RATIO = 1 / 3


@dataclass
class Row:
    """One line of the table: how its model is made from the FP model and the recipe."""

    label: str
    kind: str  # fp | untrained | hqq | hqq_package | trained
    settings: Callable[[BlockQuantConfig], dict[str, Any]] = lambda quant: {}
    overrides: list[str] = field(default_factory=list)  # trained rows: CLI overrides of the recipe
    plot: bool = False
    recipe: str | None = None  # trained rows: another recipe, trained in its own pipeline.run_dir


ROWS: dict[str, Row] = {
    "fp": Row("FP (fp32)", "fp"),
    "w4a16_pc_rtn": Row("W4A16 per-channel RTN", "untrained",
                        lambda q: dict(w_bits=4, w_group_size=None, w_symmetric=True, w_init="minmax", a_bits=16,
                                       kv_bits=16, **NO_ROTATION, **NEAREST)),
    "w4a16_g64_rtn": Row("W4A16 g64 RTN (asymmetric)", "untrained",
                         lambda q: dict(w_bits=4, w_group_size=GROUP_SIZE, w_symmetric=False, w_init="minmax",
                                        a_bits=16, kv_bits=16, **NO_ROTATION, **NEAREST)),
    "w4a16_g64_hqq": Row("W4A16 g64 HQQ (ours)", "hqq", lambda q: dict(bits=4)),
    "w4a16_g64_hqq_package": Row("W4A16 g64 HQQ (hqq package)", "hqq_package", lambda q: dict(bits=4)),
    "w3a16_g64_hqq": Row("W3A16 g64 HQQ (ours)", "hqq", lambda q: dict(bits=3)),
    "w4a4_rtn": Row("W4A4 RTN, no rotation", "untrained",
                    lambda q: dict(w_init="minmax", kv_bits=16, **NO_ROTATION, **NEAREST), plot=True),
    "w4a4_hadamard": Row("W4A4 dense Hadamard, online, untrained", "untrained",
                         lambda q: dict(rotation_init="hadamard", kv_bits=16, kv_reflections=0, **FULL_ROTATIONS,
                                        **NEAREST), plot=True),
    "w4a4_hadamard_gptq": Row("W4A4 dense Hadamard, online, untrained, GPTQ", "untrained",
                              lambda q: dict(rotation_init="hadamard", kv_bits=16, kv_reflections=0,
                                             **FULL_ROTATIONS, w_rounding="gptq"), plot=True),
    "w4a4_householder_pca": Row("W4A4 Householder PCA init, untrained", "untrained",
                                lambda q: dict(rotation_init="pca", kv_bits=16, kv_reflections=0, **PCA_ROTATIONS,
                                               **NEAREST), plot=True),
    "w4a4_trained_fp": Row("W4A4 Householder trained, fp inputs", "trained",
                           overrides=["--data.input_mode=fp"], plot=True),
    "w4a4_trained_quantized": Row("W4A4 Householder trained, quantized inputs", "trained",
                                  overrides=["--data.input_mode=quantized"], plot=True),
    "w4a4_trained_quantized_nearest": Row("W4A4 Householder trained, quantized inputs, rounded to nearest",
                                          "trained", overrides=["--data.input_mode=quantized",
                                                                "--model.quant.w_rounding=nearest"]),
    "w4a4kv4_trained_fp": Row("W4A4KV4 Householder trained, fp inputs", "trained",
                              overrides=["--data.input_mode=fp", *KV4_OVERRIDES]),
    "w4a4kv4_trained_quantized": Row("W4A4KV4 Householder trained, quantized inputs", "trained",
                                     overrides=["--data.input_mode=quantized", *KV4_OVERRIDES]),
    "cpu_recipe": Row("W4A4, the CPU recipe (configs/smollm2-135m_cpu.yaml)", "trained", recipe=CPU_RECIPE,
                      plot=True),
    "cpu_recipe_kv4": Row("W4A4KV4, the CPU recipe", "trained", recipe=CPU_RECIPE, overrides=[
        *KV4_OVERRIDES, f"--pipeline.run_dir={REPO_ROOT / 'runs' / 'smollm2-135m_cpu_kv4'}"]),
}


class Recipe:
    """The recipe's FP model, tokenizer, quantization settings and activation cache."""

    def __init__(self, recipe: str, overrides: list[str]) -> None:
        self.recipe, self.overrides = recipe, overrides
        self.run = quantization_run(build_cli(["--config", recipe, *overrides], run=False))
        self.datamodule = self.run.datamodule
        # Scored on WikiText-2 test; text generated by the model would make every number meaningless.
        self.datamodule.hparams.allow_generated_fallback = False
        try:
            self.test_text = self.datamodule.text("test")
        except Exception as error:  # noqa: BLE001 — the hub raises many kinds when offline
            raise SystemExit(f"error: WikiText-2 test is not reachable ({type(error).__name__}); "
                             "set $HH_DATA_DIR or data.data_dir to a wikitext-2-raw directory") from None
        self.run.check_settings()
        self.run.check_model()
        self.datamodule.prepare_data()  # the activation cache: calibration inputs and held-out pairs
        self.quant: BlockQuantConfig = self.run.recipe.quant
        hp = self.datamodule.hparams
        self.train_range = range(hp.n_samples)
        self.val_range = range(hp.n_samples, hp.n_samples + hp.val_samples)

    @property
    def model(self) -> torch.nn.Module:
        return self.datamodule.fp_model

    def pairs(self, layer_index: int, indices: range) -> BoundaryPairDataset:
        return BoundaryPairDataset.for_layer(self.datamodule.manifest, layer_index, indices)

    def layer_mse(self, model: torch.nn.Module) -> list[float]:
        """Each layer's output MSE against the FP layer, on FP inputs of the held-out windows."""
        device = next(model.parameters()).device
        return [block_mse(layer, ((x[None], y[None]) for x, y in self.pairs(i, self.val_range)), device)
                for i, layer in enumerate(model.model.layers)]


def untrained_model(recipe: Recipe, quant: BlockQuantConfig) -> torch.nn.Module:
    """A folded copy of the FP model: rotations initialized (PCA from the cache), weights initialized, no training.

    With ``quant.w_rounding='gptq'`` the codes are GPTQ-rounded against the Hessians of the recipe's
    calibration windows (the same statistics the pipeline folds with)."""
    model = copy.deepcopy(recipe.model)
    quant.validate(model.config)
    device = next(model.parameters()).device
    for index, layer in enumerate(model.model.layers):
        block = HHDecoderBlock(layer, model.config, model.model.rotary_emb, quant, index).to(device)
        if quant.rotation_init == "pca" and block.rotations():
            init_rotations_from_dataset_(block, recipe.pairs(index, recipe.train_range),
                                         recipe.run.pipeline.statistics_samples, device)
        block.initialize_weight_quantizers()
        statistics = None
        if quant.w_rounding == "gptq":
            block.round_rotations_()  # the statistics are taken with the rotations the fold uses
            statistics = dataset_statistics(block, recipe.pairs(index, recipe.train_range), device=device)
        model.model.layers[index] = block.fold_(statistics)
    return model


@torch.no_grad()
def hqq_package_model(recipe: Recipe, bits: int) -> torch.nn.Module:
    """A copy of the FP model whose decoder linears hold the ``hqq`` package's dequantized g64 weights."""
    model = copy.deepcopy(recipe.model)
    for layer in model.model.layers:
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] in LINEAR_NAMES:
                codes, meta = reference_quantize(module.weight.float(), bits, GROUP_SIZE, axis=1)
                module.weight.copy_(reference_dequantize(codes, meta).reshape(module.weight.shape))
    return model


def trained_model(recipe: Recipe, row_name: str, row: Row, args: argparse.Namespace
                  ) -> tuple[torch.nn.Module, dict[str, Any], BlockQuantConfig]:
    """Run (or resume) the recipe's pipeline for this row; returns the assembled model, summary and settings."""
    eval_windows = "null" if args.all else str(args.windows)
    # A row with its own recipe trains in that recipe's run_dir (unless its overrides name one).
    run_dir = [] if row.recipe else [f"--pipeline.run_dir={Path(args.run_root) / row_name}"]
    overrides = [*args.override, *run_dir, *row.overrides, "--data.allow_generated_fallback=false",
                 f"--pipeline.eval_windows={eval_windows}", f"--pipeline.eval_seq_len={args.seq_len}",
                 "--pipeline.eval_split=test", "--pipeline.eval_fp=false", "--pipeline.export=false",
                 "--pipeline.layers=null"]
    run = quantization_run(build_cli(["--config", row.recipe or recipe.recipe, *overrides], run=False))
    run.validate()
    summary = run.run()
    return run.datamodule.fp_model, summary, run.recipe.quant


def build_row(recipe: Recipe, name: str, row: Row, args: argparse.Namespace
              ) -> tuple[torch.nn.Module, dict[str, Any] | None, BlockQuantConfig | None]:
    """The row's model, the pipeline summary of a trained row, and the block settings of a rotated one."""
    settings = row.settings(recipe.quant)
    if row.kind == "fp":
        return recipe.model, None, None
    if row.kind == "untrained":
        quant = dataclasses.replace(recipe.quant, **settings)
        return untrained_model(recipe, quant), None, quant
    if row.kind == "hqq":
        return quantize_weights_hqq(copy.deepcopy(recipe.model), settings["bits"], GROUP_SIZE), None, None
    if row.kind == "hqq_package":
        return hqq_package_model(recipe, settings["bits"]), None, None
    return trained_model(recipe, name, row, args)


def describe(quant: BlockQuantConfig | None, config: Any) -> str:
    """A block setting's rotations in words (reflection counts as applied)."""
    if quant is None:
        return ""
    dims = quant.rotation_dims(config)
    counts = {name: quant.reflections(name, dim) for name, dim in dims.items() if name != "o"}
    active = {name: k for name, k in counts.items() if k}
    if not active:
        return "none"
    return f"{quant.rotation_init}: " + ", ".join(f"{name} k={k}" for name, k in active.items())


def log_gap(ppl: float, fp_ppl: float) -> float:
    return math.log(ppl) - math.log(fp_ppl)


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Share of the RTN→FP log-perplexity gap each trained row closes, and its gap over Hadamard's."""
    if not {"fp", "w4a4_rtn", "w4a4_hadamard"} <= set(rows):
        return []
    fp = rows["fp"]["ppl"]
    rtn_gap, hadamard_gap = log_gap(rows["w4a4_rtn"]["ppl"], fp), log_gap(rows["w4a4_hadamard"]["ppl"], fp)
    out = []
    for name in ("w4a4_trained_fp", "w4a4_trained_quantized"):
        if name in rows:
            gap = log_gap(rows[name]["ppl"], fp)
            closed, ratio = 1 - gap / rtn_gap, gap / hadamard_gap
            out.append({"row": name, "gap_closed_vs_rtn": closed, "goal_closed": GOAL_GAP_CLOSED,
                        "gap_over_hadamard_gap": ratio, "goal_ratio": GOAL_HADAMARD_RATIO,
                        "met": closed >= GOAL_GAP_CLOSED and ratio <= GOAL_HADAMARD_RATIO})
    return out


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, row in results["rows"].items():
        rows.append({"setting": ROWS[name].label, "rotation": row["rotation"], "rounding": row.get("rounding", ""),
                     "ppl": row["ppl"],
                     "windows": f"{row['windows']}×{row['seq_len']}", "minutes": row["seconds"] / 60})
    return rows


def write_outputs(results: dict[str, Any], out: Path, name: str) -> None:
    write_json_atomic(out / f"{name}.json", results)
    text = markdown_table(table_rows(results))
    if results.get("goals"):
        text += "\n\n" + markdown_table(results["goals"])
    write_text_atomic(out / f"{name}.md", text + "\n")
    series = {ROWS[n].label: list(enumerate(r["layer_mse"])) for n, r in results["rows"].items() if r.get("layer_mse")}
    if series:
        plot_layer_mse(series, out / f"{name}_layer_mse.png",
                       f"Per-layer block MSE, {results['settings']['model']}")


def settings_of(args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    """What makes two runs' numbers comparable (a stored JSON with other settings is not resumed)."""
    return {"recipe": args.recipe, "recipe_sha256": hashlib.sha256(Path(args.recipe).read_bytes()).hexdigest(),
            "override": args.override, "windows": None if args.all else args.windows, "seq_len": args.seq_len,
            "model": recipe.datamodule.hparams.model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO_ROOT / "configs" / "demo.yaml"),
                        help="train.py config: model, calibration data and the trained rows' recipe")
    parser.add_argument("--override", action="append", default=[],
                        help="a train.py argument applied to the recipe (repeatable), "
                             "e.g. --override=--trainer.max_epochs=5")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--windows", type=int, default=16, help="test windows scored (the first N)")
    parser.add_argument("--all", action="store_true", help="score the whole test split")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--run-root", default=str(REPO_ROOT / "runs" / "results"),
                        help="run directories of the trained rows (resumed when present)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="results", help="file stem of the outputs")
    parser.add_argument("--fresh", action="store_true", help="ignore rows stored by an earlier run")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows={args.windows} must be >= 1")
    if not Path(args.recipe).is_file():
        parser.error(f"--recipe: file not found: {args.recipe}")

    recipe = Recipe(args.recipe, args.override)
    out = Path(args.out)
    settings = settings_of(args, recipe)
    stored_path = out / f"{args.name}.json"
    results: dict[str, Any] = {"settings": settings, "machine": machine_info(), "rows": {}}
    results["rows"] = {n: r for n, r in stored_rows(stored_path, settings, args.fresh).items() if n in args.rows}
    if results["rows"]:
        print(f"resuming: {', '.join(results['rows'])} already in {stored_path}", flush=True)
    tokens = tokenize_text(recipe.datamodule.tokenizer, recipe.test_text)
    windows = None if args.all else args.windows
    for name in args.rows:
        if name in results["rows"]:
            continue
        row = ROWS[name]
        started = time.perf_counter()
        model, summary, quant = build_row(recipe, name, row, args)
        if summary is not None:  # the pipeline scored it already, with the same windows
            score = summary["quantized"]
        else:
            score = dataclasses.asdict(perplexity(model, tokens, args.seq_len, windows, progress=sys.stderr.isatty()))
        record = {"rotation": describe(quant, recipe.model.config), "rounding": quant.w_rounding if quant else "",
                  "ppl": score["ppl"], "nll_mean": score["nll_mean"],
                  "windows": score["n_windows"], "seq_len": score["seq_len"],
                  "seconds": time.perf_counter() - started}
        if row.plot:
            record["layer_mse"] = recipe.layer_mse(model)
        if summary is not None:
            record["train_seconds"] = summary["train_seconds"]
        results["rows"][name] = record
        results["rows"] = {n: results["rows"][n] for n in ROWS if n in results["rows"]}  # table order
        results["goals"] = goals(results["rows"])
        write_outputs(results, out, args.name)
        print(f"{row.label}: ppl {record['ppl']:.2f} ({record['windows']}×{record['seq_len']} tokens, "
              f"{record['seconds']:.0f} s)", flush=True)
        if model is not recipe.model:
            del model
            gc.collect()
    print()
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
