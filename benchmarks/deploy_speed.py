"""The saved model in use: prefill time, decode speed, peak memory and bytes on disk.

For each model (``--models``), three served forms, each measured in a fresh Python process
so that one's memory never counts against another's:

* ``fp32``: the FP model through transformers' own ``from_pretrained`` (fp32);
* ``hqq_w4_g64``: HQQ W4, groups of 64, weight-only (``quantize_weights_hqq``), saved with
  ``save_quantized`` and loaded with ``load_quantized(dir, kernels="int4")``;
* ``w4a4_as_w4a16``: a W4A4 export served as W4A16 (``serve_weight_only_``: rotations online,
  activations and KV cache in 16 bits) through the same int4 kernels. For SmolLM2 it is the
  demo's export (``--w4a4-export``, default ``runs/demo/quantized`` when it exists); otherwise,
  and for the random-weight model, an untrained export with ``configs/demo.yaml``'s rotation
  structure and grid (speed depends on the structure, not on trained values).

``hqq_w4_g64`` is also served with its float parts (embeddings, lm_head, norms, attention) in
bf16 (``load_quantized(dtype=torch.bfloat16)``): at a 151936-token vocabulary the fp32 embedding
is most of what a W4 model holds. Both quantized forms are also served with an int8 embedding
and lm_head (``load_quantized(head="int8")``, ``kernels.Int8Linear``), the rest as ``int4``, and
``hqq_w4_g64`` with both the int8 head and the rest in bf16. ``--dequantizing`` adds the same two quantized forms on the dequantizing ``FoldedLinear`` path,
to show what the kernels buy.

Models: ``smollm2`` (SmolLM2-135M-Instruct, the embedded model) and ``qwen2.5-0.5b-shaped``
(Qwen2.5-0.5B's config: hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
vocab 151936, tied embeddings; random weights, seed 0).

Measured in each process, batch 1: ``prefill_s``, the median over ``--repeats`` of one forward
pass over ``--prefill`` tokens (with the KV cache and the last position's logits only, as
``generate`` prefills); ``decode_tok_s``,
``--decode`` new tokens from a 16-token prompt with greedy ``generate`` (``min_new_tokens`` =
``max_new_tokens``), divided by its whole wall time (median over ``--repeats``); ``peak_mib``, the
process's peak resident memory (``ru_maxrss``: load and run, imports included); ``model_mib``,
that peak minus the resident memory after the imports (what loading and running the model
added); ``disk_mib``, every file of the saved directory. ``logits_rel_err``: for the kernel
forms, ‖logits − logits of the dequantizing path‖ / ‖logits of the dequantizing path‖ on 128
tokens (a separate process); for ``fp32``, the FP model run in bf16 against fp32, the scale of
bf16 rounding itself. Ratios are to ``fp32`` of the same round; the table gives their
median over ``--rounds``.

Run: ``python benchmarks/deploy_speed.py [--models smollm2 qwen2.5-0.5b-shaped] [--rounds 1]
[--repeats 3] [--prefill 512] [--decode 128] [--threads N] [--dequantizing]``. Writes
``benchmarks/results/deploy_speed.json``; exports are cached under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

MODELS = ("smollm2", "qwen2.5-0.5b-shaped")
# Qwen2.5-0.5B's own config (its config.json), with random weights.
QWEN05_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
KERNEL_FORMS = ("hqq_w4_g64", "w4a4_as_w4a16")
PROMPT_TOKENS = 16
CHECK_TOKENS = 128
HQQ_BITS, HQQ_GROUP = 4, 64




def _dir_mib(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 2**20


# ----------------------------------------------------------------------------- preparing the models
def _fp_model(name: str):
    """``(model, tokenizer)``; the random-weight shape has no tokenizer (``None``)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if name == "smollm2":
        from hh_lightning.models import embedded_model_dir, load_model

        return load_model(str(embedded_model_dir()))
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN05_SHAPE)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), None


def _demo_quant():
    """configs/demo.yaml's grid and rotation structure, initialized without data (random
    reflections, min-max grid, nearest rounding): the shipped structure, untrained."""
    import dataclasses

    import yaml

    from hh_lightning.block import BlockQuantConfig

    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["quant"]
    return dataclasses.replace(BlockQuantConfig.from_dict(recipe), rotation_init="random", w_init="minmax",
                               w_rounding="nearest")


def prepare(name: str, work_dir: Path, w4a4_export: Path | None) -> dict[str, Path]:
    """The saved directories of ``name``'s three forms (built once into ``work_dir/name``)."""
    import torch

    from hh_lightning.block import wrap_model
    from hh_lightning.export import save_quantized
    from hh_lightning.weight_only import quantize_weights_hqq

    base = work_dir / name
    paths = {"fp32": base / "fp32", "hqq_w4_g64": base / "hqq_w4_g64",
             "w4a4_as_w4a16": w4a4_export if w4a4_export is not None else base / "w4a4_untrained"}
    if not (paths["fp32"] / "config.json").is_file():
        staging = base / ".fp32-staging"
        shutil.rmtree(staging, ignore_errors=True)
        model, tokenizer = _fp_model(name)
        model.save_pretrained(staging)
        if tokenizer is not None:  # so train.py evaluate can score the saved forms
            tokenizer.save_pretrained(staging)
        os.replace(staging, paths["fp32"])
    tokenizer = _saved_tokenizer(paths["fp32"])

    def saved_fp():  # every quantized form starts from the FP32 model the fp32 row loads
        return _load("fp32", paths["fp32"], "none")
    if not (paths["hqq_w4_g64"] / "quantization_config.json").is_file():
        print(f"{name}: HQQ W{HQQ_BITS} g{HQQ_GROUP} ...", flush=True)
        save_quantized(quantize_weights_hqq(saved_fp(), bits=HQQ_BITS, group_size=HQQ_GROUP),
                       paths["hqq_w4_g64"], tokenizer=tokenizer)
    if not (paths["w4a4_as_w4a16"] / "quantization_config.json").is_file():
        print(f"{name}: untrained W4A4 with the demo's structure ...", flush=True)
        model = wrap_model(saved_fp(), _demo_quant())
        with torch.no_grad():
            for block in model.model.layers:
                block.initialize_weight_quantizers()
                block.fold_()
        save_quantized(model, paths["w4a4_as_w4a16"], tokenizer=tokenizer)
    return paths


def _saved_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or ``None`` where there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- one measurement
# How a quantized form is served: load_quantized's kernels and the dtype of its float parts.
SERVINGS = {"none": (None, None, "fp"), "int4": ("int4", None, "fp"), "int4-bf16": ("int4", "bfloat16", "fp"),
            "int4-int8head": ("int4", None, "int8"), "int4-bf16-int8head": ("int4", "bfloat16", "int8")}
SERVING_LABELS = {"none": "dequantizing", "int4": "int4 kernels",
                  "int4-bf16": "int4 kernels, embeddings and attention in bf16",
                  "int4-int8head": "int4 kernels, int8 embedding and lm_head",
                  "int4-bf16-int8head": "int4 kernels, int8 embedding and lm_head, the rest in bf16"}


def _load(form: str, directory: Path, serving: str):
    import torch

    if form == "fp32":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    from hh_lightning.export import load_quantized
    from hh_lightning.kernels import serve_weight_only_

    kernels, dtype, head = SERVINGS[serving]
    model = load_quantized(directory, kernels=kernels, dtype=None if dtype is None else getattr(torch, dtype),
                           head=head)
    return serve_weight_only_(model) if form == "w4a4_as_w4a16" else model


def measure(form: str, directory: Path, serving: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``form`` from ``directory`` in this (fresh) process and time it; returns the figures."""
    import torch
    # Everything any form imports, before the baseline: model_mib counts the model, not the modules.
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: F401

    import hh_lightning.export  # noqa: F401
    import hh_lightning.kernels  # noqa: F401

    torch.set_num_threads(args.threads)
    from _common import peak_rss_mib, rss_mib

    baseline = rss_mib()
    start = time.perf_counter()
    model = _load(form, directory, serving)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, args.prefill), generator=generator)
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=generator)

    def prefill() -> None:
        model(prefill_ids, use_cache=True, logits_to_keep=1)  # as generate() prefills

    def decode() -> None:
        out = model.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False,
                             pad_token_id=0)
        assert out.shape[1] == PROMPT_TOKENS + args.decode

    with torch.no_grad():
        prefill()  # warm-up
        prefill_s = statistics.median(_timed(prefill) for _ in range(args.repeats))
        decode_s = statistics.median(_timed(decode) for _ in range(args.repeats))
    peak = peak_rss_mib()
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": args.decode / decode_s,
            "peak_mib": peak, "model_mib": peak - baseline, "baseline_mib": baseline}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernel_error(form: str, directory: Path, serving: str, threads: int) -> float:
    """Relative error of the logits on 128 tokens: for a quantized ``form`` served as ``serving``,
    against its dequantizing path in fp32; for ``fp32``, the FP model run in bf16 against fp32
    (the scale of bf16 rounding over the whole model)."""
    import torch
    from _common import relative_error

    torch.set_num_threads(threads)
    exact = _load(form, directory, "none")
    if form == "fp32":
        approx = _load(form, directory, "none").to(torch.bfloat16)
    else:
        approx = _load(form, directory, serving)
    tokens = torch.randint(0, exact.config.vocab_size, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return relative_error(approx(tokens).logits, exact(tokens).logits)


def _child(command: list[str]) -> dict[str, Any]:
    """Run this script with ``command`` in a fresh process; its last stdout line is JSON."""
    result = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dequantizing", action="store_true", help="add the dequantizing-path rows")
    parser.add_argument("--w4a4-export", type=Path, default=ROOT / "runs" / "demo" / "quantized",
                        help="SmolLM2's W4A4 export (untrained stand-in when absent)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "hh_lightning" / "deploy_speed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy_speed.json")
    parser.add_argument("--measure", nargs=3, metavar=("FORM", "DIR", "SERVING"), help=argparse.SUPPRESS)
    parser.add_argument("--kernel-error", nargs=3, metavar=("FORM", "DIR", "SERVING"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        form, directory, serving = args.measure
        print(json.dumps(measure(form, Path(directory), serving, args)))
        return
    if args.kernel_error:
        form, directory, serving = args.kernel_error
        print(json.dumps({"logits_rel_err": kernel_error(form, Path(directory), serving, args.threads)}))
        return

    from _common import machine_info, print_markdown_table, write_json_atomic

    forms = [("fp32", "none"), *((form, "int4") for form in KERNEL_FORMS), ("hqq_w4_g64", "int4-bf16"),
             *((form, "int4-int8head") for form in KERNEL_FORMS), ("hqq_w4_g64", "int4-bf16-int8head")]
    if args.dequantizing:
        forms += [(form, "none") for form in KERNEL_FORMS]
    passed = ["--repeats", str(args.repeats), "--prefill", str(args.prefill), "--decode", str(args.decode),
              "--threads", str(args.threads)]
    rows: list[dict[str, Any]] = []
    for name in args.models:
        demo_export = args.w4a4_export if name == "smollm2" and (args.w4a4_export / "quantization_config.json"
                                                                   ).is_file() else None
        paths = prepare(name, args.work_dir, demo_export)
        errors = {form: _child(["--kernel-error", form[0], str(paths[form[0]]), form[1], "--threads",
                                str(args.threads)])["logits_rel_err"]
                  for form in forms if form[1] != "none" or form[0] == "fp32"}
        rounds: dict[tuple[str, str], list[dict[str, Any]]] = {form: [] for form in forms}
        for round_index in range(args.rounds):
            for form in forms:  # one round: every form back to back, so ratios share the load
                figures = _child(["--measure", form[0], str(paths[form[0]]), form[1], *passed])
                print(f"{name} round {round_index + 1} {form[0]} ({form[1]}): {figures}", flush=True)
                rounds[form].append(figures)
        fp = rounds[("fp32", "none")]
        for form in forms:
            runs = rounds[form]

            def ratio(key: str) -> float:
                return statistics.median(run[key] / base[key] for run, base in zip(runs, fp))

            label = form[0] + ("" if form[0] == "fp32" else f" ({SERVING_LABELS[form[1]]})")
            if form[0] == "w4a4_as_w4a16":
                label += " [demo export]" if demo_export is not None else " [untrained, demo structure]"
            rows.append({
                "model": name, "form": label,
                "prefill_512_s": statistics.median(run["prefill_s"] for run in runs),
                "prefill_vs_fp32": ratio("prefill_s"),
                "decode_tok_s": statistics.median(run["decode_tok_s"] for run in runs),
                "decode_vs_fp32": ratio("decode_tok_s"),
                "peak_mib": statistics.median(run["peak_mib"] for run in runs),
                "model_mib": statistics.median(run["model_mib"] for run in runs),
                "model_mib_vs_fp32": ratio("model_mib"),
                "disk_mib": _dir_mib(paths[form[0]]),
                "disk_vs_fp32": _dir_mib(paths[form[0]]) / _dir_mib(paths["fp32"]),
                "logits_rel_err": errors.get(form),
            })
    print_markdown_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"settings": {key: value for key, value in vars(args).items()
                                              if key not in ("measure", "kernel_error")},
                                 "machine": machine_info(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
