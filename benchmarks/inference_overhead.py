"""Inference overhead of the folded W4A4 model and of the online Householder rotations.

(a) Whole model: a SmolLM2-135M-shaped Llama (hidden 576, intermediate 1536, 9 heads, 3 KV
heads, head_dim 64, vocab 49152; ``--layers`` decoder layers, random weights built from a
config in code, no downloads). The quantized copy is ``wrap_model(copy, quant)``: W4
per-channel, A4 per-token, head-dim R_o folded, and the rotations of ``--structure`` (one of
``_common.STRUCTURE_RECIPES``; by default 64 PCA-initialized plain Householder reflections for
R_qkv / R_upgate / R_down); each block is initialized on random hidden states as calibration does
(``block.init_rotations_pca_(block.collect_statistics(x))``,
``block.initialize_weight_quantizers()``) and then ``fold_()``-ed. Timed: forward latency
(``torch.no_grad``, eval, ``use_cache=False``) of one ``--seq-len`` sequence, folded vs FP,
both for the decoder stack alone (``model.model``, no lm_head) and for the whole causal LM
(logits over the vocabulary). A breakdown times, for the same shapes, the parts a folded
forward adds: dequantizing every ``FoldedLinear``'s codes (done on every forward), the online
rotations (R_qkv, R_upgate on (tokens, hidden), R_down on (tokens, intermediate)) and the
activation fake quantizers, summed over the layers.

(b) Rotations alone: ``householder_apply(x, vectors)`` (compact WY, ``method='auto'``) on
``x`` of shape (``--tokens``, d) against a dense ``x @ R`` with ``R`` precomputed, for each
d in ``--dims`` and k in ``--ks`` (``d`` means k = d), forward only, no grad.

Times are medians (``median_time``); FP and folded timings are interleaved (fp, folded, fp)
so they see the same background load. Compare ratios, not absolute times.

Run: ``python benchmarks/inference_overhead.py [--layers 4] [--seq-len 512] [--threads 2]
[--dims 576 1536] [--ks 16 64 d] [--tokens 512] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # noqa: E402
    STRUCTURE_RECIPES,
    machine_info,
    median_time,
    print_markdown_table,
    synchronized,
    write_json_atomic,
)
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from hh_lightning.block import BlockQuantConfig, wrap_model  # noqa: E402
from hh_lightning.linear import FoldedLinear  # noqa: E402
from hh_lightning.rotation import (  # noqa: E402
    _apply_costs,
    householder_apply,
    householder_matrix,
    normalize_vectors,
)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "inference_overhead.json"
DEFAULT_ROTATIONS = dict(rotation_structure="householder", rotation_init="pca", qkv_reflections=64,
                         upgate_reflections=64, down_reflections=64)
SMOLLM2_SIZES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model")
    parser.add_argument("--vocab-size", type=int, default=49152, help="SmolLM2's vocabulary")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the one timed sequence")
    parser.add_argument("--calib-len", type=int, default=512, help="random hidden states per block init")
    parser.add_argument("--structure", default=None, choices=list(STRUCTURE_RECIPES),
                        help="rotation structure of the folded model (default: 64 PCA-initialized "
                             "plain Householder reflections)")
    parser.add_argument("--w-init", default=None, choices=[None, "minmax", "search", "hqq"],
                        help="weight-quantizer init (default: BlockQuantConfig's, i.e. search)")
    parser.add_argument("--model-repeats", type=int, default=5, help="timed forwards per model variant")
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--ks", nargs="+", default=["16", "64", "d"], help="reflection counts; 'd' = k = d")
    parser.add_argument("--tokens", type=int, default=512, help="rows rotated in part (b)")
    parser.add_argument("--rotation-repeats", type=int, default=20, help="timed calls per rotation case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true", help="only part (b)")
    parser.add_argument("--skip-rotations", action="store_true", help="only part (a)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return parser.parse_args()


def build_models(args: argparse.Namespace):
    """The FP model and its folded W4A4 copy; returns (fp, folded, init seconds)."""
    config = LlamaConfig(**SMOLLM2_SIZES, num_hidden_layers=args.layers, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_len, 2048))
    config._attn_implementation = args.attn_implementation
    torch.manual_seed(args.seed)
    fp = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # non-trivial norms, as in tests/tiny_models.py
        for name, parameter in fp.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
    fp.to(args.device)
    quant = BlockQuantConfig(**STRUCTURE_RECIPES.get(args.structure, DEFAULT_ROTATIONS))
    folded = wrap_model(copy.deepcopy(fp), quant).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for block in folded.model.layers:
        x = torch.randn(1, args.calib_len, config.hidden_size, generator=generator).to(args.device)
        if quant.rotation_init == "pca":
            block.init_rotations_pca_(block.collect_statistics(x))
        block.initialize_weight_quantizers(args.w_init)
        block.fold_()
    return fp, folded, quant, time.perf_counter() - start


def model_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict]:
    fp, folded, quant, init_s = build_models(args)
    assert all(block.is_folded for block in folded.model.layers)
    ids = torch.randint(0, args.vocab_size, (1, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed + 2)).to(args.device)
    rows = []
    with torch.no_grad():
        for label, pick in (("decoder stack (model.model)", lambda m: lambda: m.model(ids, use_cache=False)),
                            ("causal LM with lm_head", lambda m: lambda: m(ids, use_cache=False))):
            run_fp, run_q = synchronized(pick(fp), args.device), synchronized(pick(folded), args.device)
            fp_a = median_time(run_fp, repeats=args.model_repeats, warmup=args.warmup)
            q_s = median_time(run_q, repeats=args.model_repeats, warmup=args.warmup)
            fp_b = median_time(run_fp, repeats=args.model_repeats, warmup=0)
            fp_s = (fp_a + fp_b) / 2
            rows.append({"what": label, "layers": args.layers, "tokens": args.seq_len, "fp ms": 1e3 * fp_s,
                         "folded W4A4 ms": 1e3 * q_s, "ratio": q_s / fp_s, "extra ms/layer":
                         1e3 * (q_s - fp_s) / args.layers})

        # Breakdown: the parts a folded forward adds, at the timed shapes, summed over layers.
        hidden, inter = folded.config.hidden_size, folded.config.intermediate_size
        g = torch.Generator().manual_seed(args.seed + 3)
        x_hidden = torch.randn(args.seq_len, hidden, generator=g).to(args.device)
        x_inter = torch.randn(args.seq_len, inter, generator=g).to(args.device)
        x_o = torch.randn(args.seq_len, folded.config.num_attention_heads * 64, generator=g).to(args.device)
        folded_linears = [m for m in folded.modules() if isinstance(m, FoldedLinear)]

        def dequantize_all():
            for linear in folded_linears:
                linear.dequantized_weight()

        def rotations_all():
            for block in folded.model.layers:
                for name, x in (("q_proj", x_hidden), ("gate_proj", x_hidden), ("down_proj", x_inter)):
                    rotation = block.linears[name].transform.rotation
                    if rotation is not None:
                        rotation.rotate(x)

        def act_quant_all():
            for block in folded.model.layers:
                for name, x in (("q_proj", x_hidden), ("o_proj", x_o), ("gate_proj", x_hidden),
                                ("down_proj", x_inter)):
                    block.linears[name].transform.act_quantizer(x)

        fp_stack = rows[0]["fp ms"]
        parts = []
        for label, fn in (("dequantize all FoldedLinear codes", dequantize_all),
                          ("online rotations (qkv, upgate, down)", rotations_all),
                          ("activation fake quantizers (4/layer)", act_quant_all)):
            t = median_time(synchronized(fn, args.device), repeats=args.model_repeats, warmup=args.warmup)
            parts.append({"part of a folded forward": label, "ms (all layers)": 1e3 * t,
                          "share of FP stack time": 1e3 * t / fp_stack})
    info = {"init_s": init_s, "quant": quant.to_dict(), "structure": args.structure or "householder k=64 (pca)",
            "params_fp": sum(p.numel() for p in fp.parameters())}
    return rows, parts, info


def rotation_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(args.seed + 4)
    with torch.no_grad():
        for dim in args.dims:
            x = torch.randn(args.tokens, dim, generator=g).to(args.device)
            for k_text in args.ks:
                k = dim if k_text == "d" else int(k_text)
                vectors = normalize_vectors(torch.randn(k, dim, generator=g)).to(args.device)
                dense = householder_matrix(vectors)
                costs = _apply_costs(args.tokens, k, dim)
                method = min(costs, key=costs.__getitem__)
                hh = synchronized(lambda: householder_apply(x, vectors), args.device)
                mm = synchronized(lambda: x @ dense, args.device)
                mm_a = median_time(mm, repeats=args.rotation_repeats, warmup=args.warmup)
                hh_s = median_time(hh, repeats=args.rotation_repeats, warmup=args.warmup)
                mm_b = median_time(mm, repeats=args.rotation_repeats, warmup=0)
                mm_s = (mm_a + mm_b) / 2
                err = (householder_apply(x, vectors) - x @ dense).abs().max().item()
                rows.append({"d": dim, "k": k, "tokens": args.tokens, "auto method": method,
                             "householder_apply ms": 1e3 * hh_s, "dense x@R ms": 1e3 * mm_s,
                             "ratio": hh_s / mm_s, "max |diff|": err})
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = {"args": vars(args), "machine": machine_info()}
    if not args.skip_model:
        rows, parts, info = model_rows(args)
        print(f"\n(a) Forward latency, SmolLM2-135M-shaped model, {args.layers} layers, one sequence of "
              f"{args.seq_len} tokens, fp32, no grad, device {args.device}, threads {args.threads} "
              f"(median of {args.model_repeats}; init of the blocks took {info['init_s']:.1f} s)\n")
        print_markdown_table(rows)
        print()
        print_markdown_table(parts)
        out.update(model=rows, folded_breakdown=parts, model_info=info)
    if not args.skip_rotations:
        rows = rotation_rows(args)
        print(f"\n(b) Online rotation alone, forward, no grad, {args.tokens} tokens, fp32, device {args.device} "
              f"(median of {args.rotation_repeats})\n")
        print_markdown_table(rows)
        out.update(rotations=rows)
    write_json_atomic(args.json, out)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
