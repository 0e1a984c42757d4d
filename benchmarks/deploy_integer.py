"""W4A4 served on integer codes against FP32 and FP bf16: prefill, decode, KV-cache bytes, a per-part profile.

For each model (``--models``: ``smollm2``, the demo export when ``runs/demo/quantized`` exists; and
``qwen2.5-0.5b-shaped``, Qwen2.5-0.5B's config with random weights and an untrained export of the
demo's structure; both prepared by ``deploy_speed.prepare``), these served forms, each measured
in a fresh process:

* ``fp32`` and ``fp_bf16``: the FP model through transformers' ``from_pretrained``;
* ``w4a4_int4``: the W4A4 export as it was served before the integer path existed: activations
  fake-quantized, weights through the int4 weight-only kernel, bf16 float parts, int8 head;
* ``w4a4_integer``: ``load_quantized(kernels="w4a4")``, float parts in float32;
* ``w4a4_integer_bf16``: the same with the float parts (norms, attention, embedding) in bf16;
* ``w4a4_integer_bf16_int8head``: and the embedding and lm_head as int8 rows (the serving default
  otherwise: a decoding step's single row through the int4 weight-only kernel);
* ``w4a4_integer_bf16_int8head_one_layout``: the same with every row on the integer GEMM
  (``int4_rows_max=0``), which holds the weights once.

Figures, batch 1 unless named: ``prefill_<n>_s``, the median of one forward over ``n`` tokens as
``generate`` prefills (KV cache on, last position's logits), for each ``--prefill`` length;
``decode_b1_tok_s`` and ``decode_b16_tok_s``, new tokens a second (all rows) of greedy ``generate``
from a 16-token prompt; ``model_mib``, the process's peak resident memory less its resident memory
after the imports; ``logits_rel_err``, the integer forms' logits on 128 tokens against the same
export's fake-quant (dequantizing, float32) path, beside ``noise_floor``, what a 1e-7 relative
perturbation of the input does to that path's own logits (``logits_error``). Ratios are to ``fp32`` and ``fp_bf16`` of the
same round, medians over ``--rounds``.

Also measured: ``kv_cache``, the bytes a 4096-token prefill leaves in the KV cache, for a W4A4KV4
export served on integer codes (packed 4-bit K/V, ``kv_cache.PackedKVLayer``) against the FP
model's bf16 cache; and ``profile``, where the prefill of the longest ``--prefill`` goes in the
``w4a4_integer_bf16_int8head`` and ``fp_bf16`` forms (wall time of each part, from timers around each call).

Run: ``python benchmarks/deploy_integer.py [--models smollm2 qwen2.5-0.5b-shaped] [--rounds 1]
[--prefill 512 2048] [--decode 32] [--threads N]``. Writes ``benchmarks/results/deploy_integer.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

MODELS = ("smollm2", "qwen2.5-0.5b-shaped")
# form: (source, load_quantized kwargs); source "fp" is the FP model, "w4a4" the W4A4 export.
FORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": ("fp", {"dtype": "float32"}),
    "fp_bf16": ("fp", {"dtype": "bfloat16"}),
    "w4a4_int4": ("w4a4", {"kernels": "int4", "dtype": "bfloat16", "head": "int8"}),
    "w4a4_integer": ("w4a4", {"kernels": "w4a4"}),
    "w4a4_integer_bf16": ("w4a4", {"kernels": "w4a4", "dtype": "bfloat16"}),
    "w4a4_integer_bf16_int8head": ("w4a4", {"kernels": "w4a4", "dtype": "bfloat16", "head": "int8"}),
    "w4a4_integer_bf16_int8head_one_layout": ("w4a4", {"kernels": "w4a4", "dtype": "bfloat16", "head": "int8",
                                                       "int4_rows_max": 0}),
}
INTEGER_FORMS = tuple(form for form, (_, kwargs) in FORMS.items() if kwargs.get("kernels") == "w4a4")
PROMPT_TOKENS = 16
CHECK_TOKENS = 128
NOISE = 1e-7  # relative, on the input embeddings: the fake-quant path's own sensitivity to float rounding
KV_TOKENS = 4096
DECODE_BATCHES = (1, 16)
PROFILE_FORMS = ("fp_bf16", "w4a4_integer_bf16_int8head")


def _load(form: str, paths: dict[str, Path]):
    import torch

    source, kwargs = FORMS[form]
    kwargs = {key: getattr(torch, value) if key == "dtype" else value for key, value in kwargs.items()}
    if "int4_rows_max" in kwargs:
        from hh_lightning.integer import IntegerKernelConfig

        kwargs["integer_config"] = IntegerKernelConfig(int4_rows_max=kwargs.pop("int4_rows_max"))
    if source == "fp":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(paths["fp32"], dtype=kwargs["dtype"]).eval()
    from hh_lightning.export import load_quantized

    return load_quantized(paths[source], **kwargs)




# ----------------------------------------------------------------------------- in a child process
def measure(form: str, paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Load ``form`` in this fresh process and time prefill and decode; returns the figures."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import hh_lightning.export  # noqa: F401
    import hh_lightning.integer  # noqa: F401

    torch.set_num_threads(args.threads)
    from _common import median_time, peak_rss_mib, rss_mib

    baseline = rss_mib()
    model = _load(form, paths)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, Any] = {}
    with torch.no_grad():
        for length in args.prefill:
            ids = torch.randint(0, vocab, (1, length), generator=generator)
            figures[f"prefill_{length}_s"] = median_time(lambda: model(ids, use_cache=True, logits_to_keep=1),
                                                         repeats=args.repeats)
        for batch in DECODE_BATCHES:
            prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=generator)

            def decode() -> None:
                out = model.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode,
                                     do_sample=False, pad_token_id=0)
                assert out.shape == (batch, PROMPT_TOKENS + args.decode)
            seconds = median_time(decode, repeats=args.repeats)
            figures[f"decode_b{batch}_tok_s"] = batch * args.decode / seconds
    peak = peak_rss_mib()
    figures.update(peak_mib=peak, model_mib=peak - baseline)
    return figures


def logits_error(form: str, paths: dict[str, Path], threads: int) -> dict[str, float]:
    """The integer form's logits against the same export's fake-quant float32 path, relative
    (``logits_rel_err``), and the fake-quant path's own against itself with its input embeddings
    perturbed by ``NOISE`` relative (``noise_floor``): any change of float rounding flips some
    activation codes, and a deep W4A4 model carries the flips to its logits, so the integer path
    matches its oracle to float rounding per linear (``tests/test_integer.py``) but only to this
    floor over the whole model (its perplexity matches: ``serving_ppl.json``)."""
    import torch
    from _common import relative_error

    from hh_lightning.export import load_quantized

    torch.set_num_threads(threads)
    exact = load_quantized(paths["w4a4"])
    approx = _load(form, paths)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, exact.config.vocab_size, (1, CHECK_TOKENS), generator=generator)
    with torch.no_grad():
        reference = exact(tokens).logits
        embeddings = exact.get_input_embeddings()(tokens)
        noise = 1 + NOISE * torch.randn(embeddings.shape, generator=generator)
        return {"logits_rel_err": relative_error(approx(tokens).logits, reference),
                "noise_floor": relative_error(exact(inputs_embeds=embeddings * noise).logits, reference)}


def kv_cache_bytes(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    """Bytes in the KV cache after a ``KV_TOKENS`` prefill: packed codes (a W4A4KV4 export served on
    integer codes) against the FP model's bf16 cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from hh_lightning.export import load_quantized
    from hh_lightning.kv_cache import PackedKVLayer

    torch.set_num_threads(threads)
    ids = torch.randint(0, 1000, (1, KV_TOKENS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(paths["fp32"], dtype=torch.bfloat16).eval()
        cache = fp(ids, use_cache=True, logits_to_keep=1).past_key_values
        bf16_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        del fp, cache
        model = load_quantized(paths["w4a4kv4"], kernels="w4a4", dtype=torch.bfloat16)
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        assert all(isinstance(layer, PackedKVLayer) for layer in cache.layers)
        packed = sum(layer.nbytes() for layer in cache.layers)
    return {"tokens": KV_TOKENS, "bf16_cache_bytes": bf16_bytes, "packed_kv4_bytes": packed,
            "ratio": packed / bf16_bytes}


def profile(form: str, paths: dict[str, Path], length: int, threads: int) -> dict[str, float]:
    """Seconds of one ``length``-token prefill by part: ``linears`` (integer GEMMs and their scaling,
    or the FP linears), ``rotations``, ``activation quantization``, ``attention``, ``head``, ``rest``
    (embedding, norms, RoPE, residuals, the KV cache), ``total``; median of three passes."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from hh_lightning.integer import IntegerInputTransform, IntegerLinear

    torch.set_num_threads(threads)
    model = _load(form, paths)
    spent: dict[str, float] = defaultdict(float)

    def timed(part: str, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start
        return call

    for name, module in model.named_modules():
        if isinstance(module, IntegerInputTransform):
            module.transform.transform_input = timed("rotations", module.transform.transform_input)
            quantizer = module.transform.act_quantizer
            quantizer.quantize = timed("activation quantization", quantizer.quantize)
        elif isinstance(module, IntegerLinear):
            module.forward_transformed = timed("linears", module.forward_transformed)
        elif isinstance(module, nn.Linear) and ".layers." in f".{name}":
            module.forward = timed("linears", module.forward)
    head = model.get_output_embeddings()
    head.forward = timed("head", head.forward)
    attention = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = timed("attention", attention)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))
    runs = []
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
        for _ in range(3):
            spent.clear()
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            total = time.perf_counter() - start
            parts = dict(spent)
            parts["rest"] = total - sum(parts.values())
            parts["total"] = total
            runs.append(parts)
    F.scaled_dot_product_attention = attention
    return {part: statistics.median(run.get(part, 0.0) for run in runs) for part in runs[0]}


class Children:
    """Runs this script's measurements in fresh processes, keeping each result in ``partial`` (keyed by
    the model, the measurement and the settings), so a rerun after an interruption redoes only what
    is missing; the file is removed once the tables are written."""

    def __init__(self, partial: Path, settings: dict[str, Any]) -> None:
        from _common import stored_rows

        self.partial, self.settings = partial, settings
        self.done: dict[str, Any] = stored_rows(partial, settings)

    def run(self, key: str, command: list[str]) -> Any:
        from _common import write_json_atomic

        if key not in self.done:
            result = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            self.done[key] = json.loads(result.stdout.strip().splitlines()[-1])
            write_json_atomic(self.partial, {"settings": self.settings, "rows": self.done})
        return self.done[key]


# ----------------------------------------------------------------------------- preparing
def prepare(name: str, work_dir: Path, w4a4_export: Path | None) -> dict[str, Path]:
    """``deploy_speed.prepare``'s FP and W4A4 directories, plus an untrained W4A4KV4 export (the
    demo's structure with ``kv_bits=4``) for the KV-cache bytes."""
    import torch
    from deploy_speed import _demo_quant, _load as load_saved
    from deploy_speed import prepare as prepare_saved

    from hh_lightning.block import wrap_model
    from hh_lightning.export import save_quantized

    saved = prepare_saved(name, work_dir, w4a4_export)
    paths = {"fp32": saved["fp32"], "w4a4": saved["w4a4_as_w4a16"], "w4a4kv4": work_dir / name / "w4a4kv4_untrained"}
    if not (paths["w4a4kv4"] / "quantization_config.json").is_file():
        print(f"{name}: untrained W4A4KV4 with the demo's structure ...", flush=True)
        model = wrap_model(load_saved("fp32", saved["fp32"], "none"), dataclasses.replace(_demo_quant(), kv_bits=4))
        with torch.no_grad():
            for block in model.model.layers:
                block.initialize_weight_quantizers()
                block.fold_()
        save_quantized(model, paths["w4a4kv4"])
    return paths


# ----------------------------------------------------------------------------- the tables
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--w4a4-export", type=Path, default=ROOT / "runs" / "demo" / "quantized",
                        help="SmolLM2's W4A4 export (an untrained stand-in when absent)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "hh_lightning" / "deploy_speed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy_integer.json")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FORM", "PATHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.prefill) < 1 or args.decode < 1 or args.rounds < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--prefill, --decode, --rounds, --repeats and --threads take positive integers")

    if args.child:
        kind, form, encoded = args.child
        paths = {key: Path(value) for key, value in json.loads(encoded).items()}
        if kind == "measure":
            result: Any = measure(form, paths, args)
        elif kind == "error":
            result = logits_error(form, paths, args.threads)
        elif kind == "kv":
            result = kv_cache_bytes(paths, args.threads)
        else:
            result = profile(form, paths, max(args.prefill), args.threads)
        print(json.dumps(result))
        return

    from _common import machine_info, print_markdown_table, write_json_atomic

    passed = ["--repeats", str(args.repeats), "--decode", str(args.decode), "--threads", str(args.threads),
              "--prefill", *map(str, args.prefill)]
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if key != "child"}
    children = Children(args.out.with_suffix(".partial.json"), settings)
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    for name in args.models:
        demo = name == "smollm2" and (args.w4a4_export / "quantization_config.json").is_file()
        paths = prepare(name, args.work_dir, args.w4a4_export if demo else None)
        encoded = json.dumps({key: str(value) for key, value in paths.items()})
        errors = {form: children.run(f"{name} error {form}", ["--child", "error", form, encoded, "--threads",
                                                              str(args.threads)])
                  for form in args.forms if form in INTEGER_FORMS}
        rounds: dict[str, list[dict[str, Any]]] = {form: [] for form in args.forms}
        for index in range(args.rounds):
            for form in args.forms:  # one round: every form back to back, so ratios share the load
                figures = children.run(f"{name} measure {form} {index}", ["--child", "measure", form, encoded, *passed])
                print(f"{name} round {index + 1} {form}: {figures}", flush=True)
                rounds[form].append(figures)

        def ratio(runs: list[dict[str, Any]], base: str, key: str, faster_is_lower: bool) -> float | None:
            if base not in rounds:
                return None
            pairs = zip(runs, rounds[base])
            return statistics.median(b[key] / r[key] if faster_is_lower else r[key] / b[key] for r, b in pairs)

        for form, runs in rounds.items():
            row: dict[str, Any] = {"model": name, "form": form,
                                   "export": ("demo export" if demo else "untrained, demo structure")
                                   if FORMS[form][0] == "w4a4" else "FP"}
            for length in args.prefill:
                key = f"prefill_{length}_s"
                row[key] = statistics.median(run[key] for run in runs)
                row[f"prefill_{length}_vs_fp32"] = ratio(runs, "fp32", key, True)
                row[f"prefill_{length}_vs_fp_bf16"] = ratio(runs, "fp_bf16", key, True)
            for batch in DECODE_BATCHES:
                key = f"decode_b{batch}_tok_s"
                row[key] = statistics.median(run[key] for run in runs)
                row[f"decode_b{batch}_vs_fp32"] = ratio(runs, "fp32", key, False)
            row["model_mib"] = statistics.median(run["model_mib"] for run in runs)
            row.update(errors.get(form, {}))
            rows.append(row)
        extras[name] = {
            "kv_cache": children.run(f"{name} kv", ["--child", "kv", "-", encoded, "--threads", str(args.threads)]),
            "profile": {form: children.run(f"{name} profile {form}",
                                           ["--child", "profile", form, encoded, "--threads", str(args.threads),
                                            "--prefill", str(max(args.prefill))])
                        for form in PROFILE_FORMS if form in args.forms},
        }
        print(json.dumps(extras[name], indent=1), flush=True)
    print_markdown_table(rows)
    command = "python benchmarks/deploy_integer.py " + " ".join(sys.argv[1:])
    write_json_atomic(args.out, {"command": command.strip(), "machine": machine_info(),
                                 "date": date.today().isoformat(), "settings": settings, "rows": rows,
                                 "models": extras})
    children.partial.unlink(missing_ok=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
