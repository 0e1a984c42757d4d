"""Integer W4A4 against bf16 on a GPU, at Qwen2.5-7B's shapes: a prefill of 2048 tokens.

One script for a machine with a GPU (it runs on the CPU too, for a check with ``--shape tiny``):

1. ``kernels``: each of the 7B block's GEMM shapes (q/k/v stacked, o, gate/up stacked, down) at
   ``--tokens`` rows, ``torch._int_mm`` (int8 × int8 → int32) against a bf16 ``matmul``: the
   ceiling of what integer codes can buy on this device.
2. ``prefill``: a Qwen2.5-7B-shaped model cut to ``--layers`` decoder layers (random weights; speed
   does not depend on trained values), FP in bf16 against the same layers quantized W4A4 with the
   demo recipe's structure (a fixed Hadamard and 32 reflections per online rotation, untrained),
   folded and served by ``integer.use_integer_kernels_`` (``int_mm`` backend; float parts bf16).
   One forward over ``--tokens`` tokens as ``generate`` prefills (KV cache on, last position's
   logits); medians over ``--repeats``; the time per decoder layer, with the embedding and the
   head timed alone (``embed_head_s``) and left out of it.
3. ``profile``: the integer model's prefill by operator (torch.profiler, top 12 by device time).

Run: ``python benchmarks/gpu_integer_7b.py [--layers 4] [--tokens 2048] [--repeats 5]``. Writes
``benchmarks/results/gpu_integer_7b.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

# Qwen2.5-7B's config.json; "tiny" keeps its proportions small enough for a CPU check.
SHAPES = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False),
}


def _median_seconds(fn, repeats: int, device: str) -> float:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_rows(shape: dict[str, Any], tokens: int, repeats: int, device: str) -> list[dict[str, Any]]:
    """``_int_mm`` against bf16 ``matmul`` at the block's GEMM shapes ``(tokens, K) × (K, N)``."""
    import torch

    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * head_dim
    rows = []
    for name, (k, n) in {"qkv": (hidden, qkv), "o": (hidden, hidden), "gate_up": (hidden, 2 * inter),
                         "down": (inter, hidden)}.items():
        codes = torch.randint(-8, 8, (tokens, k), dtype=torch.int8, device=device)
        weight = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device)
        x16, w16 = codes.to(torch.bfloat16), weight.to(torch.bfloat16)
        int_s = _median_seconds(lambda: torch._int_mm(codes, weight.T), repeats, device)
        bf16_s = _median_seconds(lambda: x16 @ w16.T, repeats, device)
        rows.append({"gemm": name, "m": tokens, "k": k, "n": n, "int_mm_ms": int_s * 1e3, "bf16_ms": bf16_s * 1e3,
                     "speedup": bf16_s / int_s})
    return rows


def build_models(shape: dict[str, Any], layers: int, device: str):
    """``(fp_bf16, integer_w4a4)``: the same random layers, FP in bf16 and W4A4 on integer codes."""
    import copy

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hh_lightning.block import BlockQuantConfig, wrap_model
    from hh_lightning.integer import IntegerKernelConfig, use_integer_kernels_

    torch.manual_seed(0)
    config = Qwen2Config(**shape, num_hidden_layers=layers)
    fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    fp = copy.deepcopy(fp32).to(torch.bfloat16)
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["quant"]
    quant = dataclasses.replace(BlockQuantConfig.from_dict(recipe), rotation_init="random", w_init="minmax",
                                w_rounding="nearest")
    quantized = wrap_model(fp32, quant)
    with torch.no_grad():
        for block in quantized.model.layers:
            block.initialize_weight_quantizers()
            block.fold_()
    quantized = quantized.to(torch.bfloat16)  # float parts in bf16; codes stay uint8, rotations compute in float32
    report = use_integer_kernels_(quantized, IntegerKernelConfig(int4_rows_max=0))
    if report.fallback:
        raise SystemExit(f"linears left off the integer path: {report.fallback}")
    for block in quantized.model.layers:
        for rotation in block.online_rotations().values():
            rotation.build_inference_cache_(torch.bfloat16)
    return fp.eval(), quantized.eval()


def prefill_rows(fp, integer, tokens: int, repeats: int, device: str) -> dict[str, Any]:
    import torch

    ids = torch.randint(0, fp.config.vocab_size, (1, tokens), device=device)
    layers = fp.config.num_hidden_layers
    result: dict[str, Any] = {"tokens": tokens, "layers": layers}
    with torch.no_grad():
        hidden = fp.model.embed_tokens(ids)
        embed_head = _median_seconds(lambda: fp.lm_head(fp.model.norm(fp.model.embed_tokens(ids))[:, -1:]),
                                     repeats, device)
        for name, model in (("fp_bf16", fp), ("w4a4_integer", integer)):
            total = _median_seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats, device)
            result[f"{name}_s"] = total
            result[f"{name}_per_layer_ms"] = (total - embed_head) / layers * 1e3
        del hidden
    result["embed_head_s"] = embed_head
    result["speedup_vs_bf16"] = result["fp_bf16_per_layer_ms"] / result["w4a4_integer_per_layer_ms"]
    return result


def profile_rows(model, tokens: int, device: str) -> list[dict[str, Any]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
        with profile(activities=activities) as prof:
            model(ids, use_cache=True, logits_to_keep=1)
    key = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:12]
    return [{"op": event.key, "calls": event.count, "ms": getattr(event, key) / 1e3} for event in events]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_integer_7b.json")
    args = parser.parse_args()
    if args.layers < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--layers, --tokens and --repeats take positive integers")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")

    from _common import machine_info, print_markdown_table, write_json_atomic

    shape = SHAPES[args.shape]
    kernels = kernel_rows(shape, args.tokens, args.repeats, args.device)
    print_markdown_table(kernels)
    fp, integer = build_models(shape, args.layers, args.device)
    prefill = prefill_rows(fp, integer, args.tokens, args.repeats, args.device)
    print_markdown_table([prefill])
    ops = profile_rows(integer, args.tokens, args.device)
    print_markdown_table(ops)
    machine = machine_info()
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    write_json_atomic(args.out, {"command": "python benchmarks/gpu_integer_7b.py " + " ".join(sys.argv[1:]),
                                 "machine": machine, "date": date.today().isoformat(), "shape": args.shape,
                                 "kernels": kernels, "prefill": prefill, "profile": ops})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
