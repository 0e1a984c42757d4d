"""W4A4 output error of one real linear layer of SmolLM2-135M-Instruct, per rotation method.

What is measured: the input of one linear (default ``model.layers[15].self_attn.q_proj``)
is captured with a forward pre-hook while the FP32 model reads WikiText-2 *validation*
text. For q/k/v that input is the post-RMSNorm hidden state already scaled by the norm's
γ, i.e. exactly what the linear sees; nothing is folded. Calibration windows come from
the first half of the split's tokens, held-out windows from the second half, so the two
never share text. On the held-out tokens we report the output MSE of the W4A4 layer
against the FP output, and the relative MSE ``MSE / mean(y²)``.

Quantizers everywhere: weights 4-bit symmetric per output channel, activations 4-bit
asymmetric per token (dynamic). Methods:

* ``rtn``: no rotation, weight range min-max (plain round-to-nearest);
* ``rtn+search``: no rotation, weight clip ratios by ``initialize(method="search")``;
* ``hadamard``: dense randomized Hadamard-like rotation as ``d`` reflections;
* ``pca k=16`` / ``pca k=64``: Householder PCA init from the calibration ``XᵀX/N``;
* ``trained k=64``: from ``pca k=64``, ``--steps`` AdamW steps (full batch, cosine decay to
  lr·1e-3) on the calibration output MSE, learning the reflection vectors, the weight clip
  ratios and a learnable activation clip (ratios init at the ActivationQuantizer default).

All but ``rtn`` initialize the weight clip ratios by the clip search on the rotated weight.

Run: ``python benchmarks/real_layer_w4a4.py [--layer 15 --module self_attn.q_proj --steps 200]``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _common import machine_info, print_markdown_table, write_json_atomic  # noqa: E402

from hh_lightning.linear import HHLinear, InputTransform  # noqa: E402
from hh_lightning.models import fetch_smollm2_gguf, load_model  # noqa: E402
from hh_lightning.quantizers import ActivationQuantizer, WeightQuantizer  # noqa: E402
from hh_lightning.rotation import HouseholderRotation  # noqa: E402
from hh_lightning.text import calibration_windows, load_wikitext_text, tokenize_text  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "real_layer_w4a4.json"
DEFAULT_DATA_DIR = os.environ.get("HH_DATA_DIR") or str(REPO.parent / "shared" / "data" / "wikitext-2-raw")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, default=None, help="GGUF path (default: fetch SmolLM2-135M)")
    parser.add_argument("--data-dir", type=str, default=DEFAULT_DATA_DIR)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--module", type=str, default="self_attn.q_proj")
    parser.add_argument("--tokens", type=int, default=1024, help="total tokens, half calibration, half held-out")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--pca-ks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--train-k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr-rotation", type=float, default=5e-3)
    parser.add_argument("--lr-clip", type=float, default=5e-2)
    parser.add_argument("--final-lr-ratio", type=float, default=1e-3, help="cosine decay floor, × lr")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--weight-init", type=str, default="search", choices=["minmax", "search", "hqq"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (results do not depend on it)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return parser.parse_args()


@torch.no_grad()
def capture_inputs(args: argparse.Namespace) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The target linear and its captured inputs ``(calibration, held_out)``, each ``(N, d)``."""
    model, tokenizer = load_model(args.model or str(fetch_smollm2_gguf()))
    linear = model.model.layers[args.layer].get_submodule(args.module)
    data_dir = args.data_dir if Path(args.data_dir).is_dir() else None
    ids = tokenize_text(tokenizer, load_wikitext_text("validation", data_dir))
    per_half = max(1, args.tokens // 2 // args.seq_len)
    half = ids.numel() // 2
    captured: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    try:
        for part, seed in ((ids[:half], args.seed), (ids[half:], args.seed + 1)):
            model(calibration_windows(part, per_half, args.seq_len, seed))
    finally:
        hook.remove()
    calib, held_out = (x.reshape(-1, x.shape[-1]).float() for x in captured)
    return linear, calib, held_out


def build(linear: nn.Linear, rotation: HouseholderRotation | None, weight_init: str, bits: int,
          learnable_act_clip: bool = False) -> HHLinear:
    """W4A4 ``HHLinear`` with its weight clip ratios initialized on the rotated weight."""
    act = ActivationQuantizer(bits=bits, symmetric=False, learnable_clip=learnable_act_clip)
    layer = HHLinear(linear, InputTransform(linear.in_features, rotation, act),
                     WeightQuantizer(linear.out_features, linear.in_features, bits=bits, symmetric=True))
    with torch.no_grad():
        layer.weight_quantizer.initialize(layer.transformed_weight(), method=weight_init)
    return layer


def pca_rotation(dim: int, k: int, calib: torch.Tensor, seed: int) -> HouseholderRotation:
    rotation = HouseholderRotation(dim, k, init="pca", seed=seed)
    rotation.init_pca_(calib.double().T @ calib.double() / calib.shape[0], seed=seed)
    return rotation


def train(layer: HHLinear, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Full-batch AdamW on ``MSE(layer(x), y)``; returns the loss every 10% of the steps."""
    rotation = [p for n, p in layer.named_parameters() if p.requires_grad and "vectors" in n]
    clips = [p for n, p in layer.named_parameters() if p.requires_grad and "clip_logit" in n]
    optimizer = torch.optim.AdamW([{"params": rotation, "lr": args.lr_rotation},
                                   {"params": clips, "lr": args.lr_clip}], weight_decay=args.weight_decay)
    floor = args.final_lr_ratio
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    history = []
    for step in range(args.steps):
        loss = torch.mean((layer(x) - y) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            history.append(loss.item())
    return history


@torch.no_grad()
def evaluate(name: str, k: int | None, layer: HHLinear, weight_init: str, data: dict,
             setup_s: float) -> dict:
    """Output MSE on both halves; ``x_absmax/rms``: mean over held-out tokens of the rotated
    input's max |x̃| / rms(x̃) (lower = flatter); ``setup_s``: build (+ train) seconds."""
    (x_cal, y_cal), (x_out, y_out) = data["calibration"], data["held_out"]
    mse_cal = torch.mean((layer(x_cal) - y_cal) ** 2).item()
    mse = torch.mean((layer(x_out) - y_out) ** 2).item()
    rotated = layer.transform.transform_input(x_out)
    flatness = (rotated.abs().amax(-1) / rotated.pow(2).mean(-1).sqrt()).mean().item()
    return {"method": name, "k": k if k is not None else "-", "weight_init": weight_init,
            "calib_mse": mse_cal, "heldout_mse": mse, "heldout_rel_mse": mse / y_out.pow(2).mean().item(),
            "x_absmax/rms": flatness, "setup_s": setup_s}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, min(args.threads, len(os.sched_getaffinity(0)))))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    linear, x_cal, x_out = capture_inputs(args)
    linear.requires_grad_(False)
    dim = linear.in_features
    with torch.no_grad():
        data = {"calibration": (x_cal, linear(x_cal)), "held_out": (x_out, linear(x_out))}
    print(f"layer {args.layer} {args.module} ({linear.out_features}x{dim}): {x_cal.shape[0]} calibration, "
          f"{x_out.shape[0]} held-out tokens of WikiText-2 valid; captured in "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    def timed(name: str, k: int | None, make: Callable[[], HHLinear], weight_init: str = args.weight_init) -> dict:
        tick = time.perf_counter()
        layer = make()
        row = evaluate(name, k, layer, weight_init, data, time.perf_counter() - tick)
        print(f"  {name} k={row['k']}: held-out rel MSE {row['heldout_rel_mse']:.4g}", flush=True)
        return row

    rows = [
        timed("rtn", None, lambda: build(linear, None, "minmax", args.bits), weight_init="minmax"),
        timed("rtn+search", None, lambda: build(linear, None, args.weight_init, args.bits)),
        timed("hadamard", dim, lambda: build(
            linear, HouseholderRotation(dim, dim, init="hadamard", seed=args.seed), args.weight_init, args.bits)),
    ]
    rows += [timed("pca", k, lambda k=k: build(linear, pca_rotation(dim, k, x_cal, args.seed),
                                                args.weight_init, args.bits)) for k in args.pca_ks]
    history: list[float] = []

    def trained() -> HHLinear:
        layer = build(linear, pca_rotation(dim, args.train_k, x_cal, args.seed), args.weight_init, args.bits,
                      learnable_act_clip=True)
        history.extend(train(layer, *data["calibration"], args))
        return layer

    rows.append(timed(f"trained ({args.steps} steps)", args.train_k, trained))
    baseline = rows[0]["heldout_mse"]
    for row in rows:
        row["vs_rtn"] = row["heldout_mse"] / baseline

    print(f"\nW{args.bits}A{args.bits} output error, layer {args.layer} {args.module}, "
          f"held-out WikiText-2 valid tokens (seed {args.seed})\n")
    print_markdown_table(rows)
    print(f"\ntraining loss (calibration MSE, every ~10% of steps): {[f'{v:.4g}' for v in history]}")
    write_json_atomic(args.json, {
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokens": {"calibration": x_cal.shape[0], "held_out": x_out.shape[0]},
        "rows": rows, "train_loss_history": history,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
