"""Rotation structures on a Qwen2.5-7B-shaped decoder block: stored size and one CPU training step.

The block: one ``Qwen2DecoderLayer`` with Qwen2.5-7B's shapes (hidden 3584, intermediate 18944,
28 heads, 4 KV heads, head_dim 128), random weights, built from a ``Qwen2Config`` in code (no
downloads), wrapped as ``HHDecoderBlock`` with ``BlockQuantConfig(**STRUCTURE_RECIPES[name],
w_init="minmax")``: W4 per channel, A4 per token, head-dim ``R_o`` folded into v/o. For each
structure in ``--structures``:

1. Rotation numbers: ``rotation_parameter_count`` (parameters and persistent buffers) summed
   over ``block.rotations()``, each rotation object counted once, as a share of the layer's
   seven linear weights (q, k, v, o, gate, up, down: 233,046,016 entries; biases excluded).
   The layer and the block are built on the meta device, so no weight is allocated. The
   head-dim ``R_o`` (``o_rotation='head'``) is merged into v_proj/o_proj at fold and never
   stored: it is excluded from the sum and reported in its own column. ``dense``
   (``householder`` with ``rotation_init='hadamard'``, i.e. k = d reflections) is counted
   analytically as ``k·d = d²`` per rotation (the module stores its ``(k, d)`` vectors and
   nothing else; the formula is checked against a real build at tiny shapes), because its
   constructor computes a ``d × d`` randomized Hadamard and its QR on the CPU even under
   meta: 2.9 GB of float64 and an O(d³) factorization at d = 18944.
2. One training step at batch 1 × ``--seq-len`` tokens, in a fresh subprocess per structure
   (the script re-invokes itself with ``--child NAME`` and reads one JSON line back): random
   hidden states ``x``, target ``y`` = the FP layer's output, then forward of the wrapped
   block with fake quantization on, MSE loss, backward and an AdamW step over
   ``block.parameter_groups()`` at ``OptimConfig``'s learning rates (transforms 5e-3, clips
   5e-2). Reported: the median step time over ``--repeats`` after one warm-up step, and the
   subprocess's peak RSS (``ru_maxrss``: the whole process, FP layer, block, optimizer
   state and build included; the FP layer stays alive, as in ``HHBlockModule``). Weight
   clip ratios start at min-max (no clip search). ``pca`` structures keep the identity-pair
   reflections they hold before ``init_pca_`` unless ``--pca-init`` is given (which adds the
   statistics pass and a float32 ``eigh`` of 18944 × 18944 to the build, and its memory
   to the peak): the step's cost depends only on k and d, not on the vectors' values.
   ``dense`` skips the step unless ``--run-dense-step``: with k = d = 18944 for ``R_down``
   the WY Gram matrix alone is k²d ≈ 6.8e12 multiply-adds per step, hours on a CPU.

Run: ``python benchmarks/block_7b.py [--structures kronecker ...] [--threads 2] [--repeats 2]
[--seq-len 512] [--pca-init] [--run-dense-step] [--json benchmarks/results/block_7b.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # noqa: E402
    STRUCTURE_RECIPES,
    machine_info,
    median_time,
    print_markdown_table,
    write_json_atomic,
)
from transformers import Qwen2Config  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import (  # noqa: E402
    Qwen2DecoderLayer,
    Qwen2RotaryEmbedding,
)

from hh_lightning.block import LINEAR_NAMES, BlockQuantConfig, HHDecoderBlock  # noqa: E402
from hh_lightning.module import OptimConfig  # noqa: E402
from hh_lightning.structured import rotation_parameter_count  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "block_7b.json"
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 head_dim=128, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096)
# Small shapes on which the analytic dense count is checked against a real build.
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=1, vocab_size=128, max_position_embeddings=256)
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURE_RECIPES), choices=list(STRUCTURE_RECIPES))
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the one training sequence")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per structure (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pca-init", action="store_true",
                        help="PCA-initialize pca structures before timing (slow at d = 18944)")
    parser.add_argument("--run-dense-step", action="store_true", help="try the k = d step anyway")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="memory the 'fits' column compares to")
    parser.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per structure's subprocess")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--child", default=None, choices=list(STRUCTURE_RECIPES), help=argparse.SUPPRESS)
    return parser.parse_args()


def qwen_config(sizes: dict[str, Any], attn_implementation: str) -> Qwen2Config:
    config = Qwen2Config(**sizes)
    config._attn_implementation = attn_implementation
    return config


def quant_config(name: str) -> BlockQuantConfig:
    """The structure's recipe with min-max weight grids (no clip search)."""
    return BlockQuantConfig(**STRUCTURE_RECIPES[name], w_init="minmax")


def is_dense(quant: BlockQuantConfig, config: Qwen2Config) -> bool:
    """Householder rotations with k = d reflections on the intermediate size."""
    dim = config.intermediate_size
    return quant.rotation_structure == "householder" and quant.reflections("down", dim) == dim


def linear_weight_count(layer: nn.Module) -> int:
    """Entries of the layer's seven linear weights (biases excluded)."""
    linears = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return sum(linears[name].weight.numel() for name in LINEAR_NAMES)


def stored_counts(block: HHDecoderBlock) -> dict[str, int]:
    """``rotation_parameter_count`` of each rotation by name; an object shared under two names counts once."""
    counts, seen = {}, set()
    for name, rotation in block.rotations().items():
        if id(rotation) not in seen:
            seen.add(id(rotation))
            counts[name] = rotation_parameter_count(rotation)
    return counts


def householder_counts(quant: BlockQuantConfig, config: Qwen2Config) -> dict[str, int]:
    """``k·d`` per enabled rotation: a ``householder`` rotation stores only its ``(k, d)`` vectors."""
    counts = {name: quant.reflections(name, dim) * dim for name, dim in quant.rotation_dims(config).items()}
    return {name: count for name, count in counts.items() if count}


def check_householder_counts(quant: BlockQuantConfig, attn_implementation: str) -> None:
    """``householder_counts`` must equal what a real CPU build at tiny shapes stores."""
    config = qwen_config(TINY, attn_implementation)
    block = HHDecoderBlock(Qwen2DecoderLayer(config, 0), config, Qwen2RotaryEmbedding(config), quant, 0)
    expected, built = householder_counts(quant, config), stored_counts(block)
    if expected != built:
        raise AssertionError(f"analytic rotation counts {expected} != built {built} at shapes {TINY}")


def count_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Stored rotation numbers and their share of the block's linear weights, built on meta."""
    config = qwen_config(QWEN25_7B, args.attn_implementation)
    quant = quant_config(name)
    with torch.device("meta"):
        layer, rotary = Qwen2DecoderLayer(config, 0), Qwen2RotaryEmbedding(config)
    if is_dense(quant, config):
        check_householder_counts(quant, args.attn_implementation)
        counts, method = householder_counts(quant, config), "analytic k·d (checked at tiny shapes)"
    else:
        with torch.device("meta"):
            block = HHDecoderBlock(layer, config, rotary, quant, 0)
        counts, method = stored_counts(block), "meta-device build"
    folded = {"o"} if quant.o_rotation == "head" else set()
    stored = sum(count for key, count in counts.items() if key not in folded)
    weights = linear_weight_count(layer)
    return {"structure": name, "quant": quant.to_dict(), "count_method": method, "rotation_counts": counts,
            "stored_rotation_numbers": stored, "folded_r_o_numbers": sum(counts[key] for key in folded if key in counts),
            "linear_weight_entries": weights, "share": stored / weights}


# ------------------------------------------------------------------ child: one training step
def build_source(config: Qwen2Config, seed: int) -> tuple[nn.Module, nn.Module]:
    """A random FP32 ``Qwen2DecoderLayer`` (non-trivial norms and biases) and its rotary embedding."""
    torch.manual_seed(seed)
    layer, rotary = Qwen2DecoderLayer(config, 0).float().eval(), Qwen2RotaryEmbedding(config)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    return layer, rotary


@torch.no_grad()
def fp_output(layer: nn.Module, config: Qwen2Config, rotary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transformers layer's own output on ``x`` (causal, positions 0..n-1)."""
    position_ids = torch.arange(x.shape[1])[None]
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                              position_ids=position_ids)
    out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary(x, position_ids))
    return out[0] if isinstance(out, tuple) else out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def run_step(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the block, then time forward + MSE + backward + AdamW step; runs in its own process."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = qwen_config(QWEN25_7B, args.attn_implementation)
    quant = quant_config(name)
    layer, rotary = build_source(config, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, args.seq_len, config.hidden_size, generator=generator)
    y = fp_output(layer, config, rotary, x)
    block = HHDecoderBlock(layer, config, rotary, quant, 0).train()
    pca = args.pca_init and quant.rotation_init == "pca"
    if pca:
        block.init_rotations_pca_(block.collect_statistics(x))
    block.initialize_weight_quantizers()
    optim = OptimConfig()
    optimizer = optim.optimizer(block.parameter_groups())
    build_s, build_rss = time.perf_counter() - start, peak_rss_gib()
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(block(x).float(), y.float())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    step_s = median_time(step, repeats=args.repeats, warmup=1)
    if not all(math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"{name}: non-finite loss {losses}")
    return {"step_s": step_s, "peak_rss_gib": peak_rss_gib(), "build_s": build_s, "peak_rss_after_build_gib": build_rss,
            "losses": losses, "pca_init": pca, "threads": torch.get_num_threads(),
            "trainable": {key: sum(p.numel() for p in params) for key, params in groups.items()}}


def child_result(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``run_step`` for ``name`` in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--seq-len", str(args.seq_len),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed),
               "--attn-implementation", args.attn_implementation] + (["--pca-init"] if args.pca_init else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"step subprocess timed out after {args.child_timeout:.0f} s"}
    wall_s = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"step subprocess exited with code {done.returncode}", "subprocess_s": wall_s}
    return {**json.loads(lines[-1]), "subprocess_s": wall_s}


# ------------------------------------------------------------------------------------ report
def table_row(row: dict[str, Any], budget_gib: float) -> dict[str, Any]:
    """The printed columns of one structure."""
    step = row["step"]
    measured = "step_s" in step
    return {
        "structure": row["structure"],
        "rotation numbers": f"{row['stored_rotation_numbers']:,}",
        "share of block weights": f"{100 * row['share']:.3g} %",
        "folded R_o (not stored)": f"{row['folded_r_o_numbers']:,}",
        "step time s": step.get("step_s"),
        "peak RSS GiB": step.get("peak_rss_gib"),
        f"fits in {budget_gib:g} GiB": ("yes" if step["peak_rss_gib"] < budget_gib else "no") if measured else "n/a",
        "note": "; ".join(row["notes"]),
    }


def notes_for(row: dict[str, Any]) -> list[str]:
    """How the row's numbers were obtained, and why a step is missing."""
    notes = []
    if row["count_method"].startswith("analytic"):
        notes.append("numbers analytic (k·d per rotation)")
    step = row["step"]
    if "skipped" in step:
        notes.append(f"step not run: {step['skipped']}")
    elif "error" in step:
        notes.append(f"step failed: {step['error']}")
    elif row["quant"]["rotation_init"] == "pca":
        notes.append("PCA-initialized" if step["pca_init"] else "identity-pair reflections (no PCA init)")
    return notes


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(run_step(args.child, args)), flush=True)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in args.structures:
        row = count_row(name, args)
        if is_dense(quant_config(name), qwen_config(QWEN25_7B, args.attn_implementation)) and not args.run_dense_step:
            row["step"] = {"skipped": "k = d = 18944 reflections for R_down, WY Gram k²d ≈ 6.8e12 "
                                      "multiply-adds per step (--run-dense-step to try)"}
        else:
            print(f"[block_7b] {name}: training step in a subprocess ...", file=sys.stderr, flush=True)
            row["step"] = child_result(name, args)
            print(f"[block_7b] {name}: {row['step']}", file=sys.stderr, flush=True)
        row["notes"] = notes_for(row)
        rows.append(row)
    total_s = time.perf_counter() - start
    print(f"\nQwen2.5-7B-shaped block (hidden 3584, intermediate 18944, 28/4 heads, head_dim 128), W4A4 fake "
          f"quantization, one training step at 1 x {args.seq_len} tokens on CPU, {args.threads} threads "
          f"(median of {args.repeats} after 1 warm-up; peak RSS of a fresh subprocess per structure). "
          f"Share = stored rotation numbers / {rows[0]['linear_weight_entries']:,} linear weight entries; "
          f"the head-dim R_o is folded into v/o and not stored.\n")
    print_markdown_table([table_row(row, args.budget_gib) for row in rows])
    write_json_atomic(args.json, {"args": vars(args), "machine": machine_info(), "total_s": total_s, "rows": rows})
    print(f"\ntotal {total_s:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
