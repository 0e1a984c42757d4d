"""Perplexity of SmolLM2-135M under untrained quantization settings: where the W4A4 loss comes from.

Every decoder layer is wrapped, its rotations PCA-initialized (or Hadamard)
from the layer's inputs on calibration windows of WikiText-2 valid, its weight
quantizers initialized, and the model folded; no training. Perplexity on the
first ``--windows`` windows of ``--seq-len`` tokens of WikiText-2 test.

    python benchmarks/untrained_baselines.py [--rows fp w4a16_rtn ...] [--windows 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from _common import markdown_table, write_json_atomic

from hh_lightning.block import BlockQuantConfig, HHDecoderBlock
from hh_lightning.evaluation import perplexity
from hh_lightning.models import embedded_model_dir, load_model
from hh_lightning.text import calibration_windows, load_wikitext_text, tokenize_text

NO_ROTATION = dict(qkv_reflections=0, upgate_reflections=0, down_reflections=0, o_rotation="none")
# Plain Householder products: 64 PCA reflections, or k = d from a dense randomized Hadamard.
HOUSEHOLDER = dict(rotation_structure="householder", qkv_reflections=64, upgate_reflections=64,
                   down_reflections=64)
ROWS: dict[str, BlockQuantConfig | None] = {
    "fp": None,
    "w16a16_pca_rotations": BlockQuantConfig(w_bits=16, a_bits=16, **HOUSEHOLDER),
    "w4a16_rtn": BlockQuantConfig(a_bits=16, w_init="minmax", **NO_ROTATION),
    "w4a16_pca": BlockQuantConfig(a_bits=16, **HOUSEHOLDER),
    "w16a4_rtn": BlockQuantConfig(w_bits=16, **NO_ROTATION),
    "w16a4_pca": BlockQuantConfig(w_bits=16, **HOUSEHOLDER),
    "w16a4_hadamard": BlockQuantConfig(w_bits=16, rotation_init="hadamard", **HOUSEHOLDER),
    "w4a4_rtn": BlockQuantConfig(**NO_ROTATION),
    "w4a4_pca": BlockQuantConfig(**HOUSEHOLDER),
    "w4a4_hadamard": BlockQuantConfig(rotation_init="hadamard", **HOUSEHOLDER),
}


def layer_inputs(model: torch.nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each decoder layer's input hidden states on ``windows``."""
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def capture(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return capture

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    return captured


def quantized_copy(model: torch.nn.Module, quant: BlockQuantConfig, inputs: dict[int, torch.Tensor]) -> torch.nn.Module:
    quantized = copy.deepcopy(model)
    for index, layer in enumerate(quantized.model.layers):
        block = HHDecoderBlock(layer, quantized.config, quantized.model.rotary_emb, quant, index)
        if quant.rotation_init == "pca":
            block.init_rotations_pca_(block.collect_statistics(inputs[index]))
        block.initialize_weight_quantizers()
        quantized.model.layers[index] = block.fold_()
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--data-dir", default=None, help="WikiText-2 raw directory (default: $HH_DATA_DIR)")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--calibration-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "untrained_baselines.json"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(str(embedded_model_dir()))
    calibration = calibration_windows(tokenize_text(tokenizer, load_wikitext_text("validation", args.data_dir)),
                                      args.calibration_windows, args.calibration_len, args.seed)
    test_tokens = tokenize_text(tokenizer, load_wikitext_text("test", args.data_dir))
    inputs = layer_inputs(model, calibration)
    rows = []
    for name in args.rows:
        started = time.perf_counter()
        quant = ROWS[name]
        evaluated = model if quant is None else quantized_copy(model, quant, inputs)
        result = perplexity(evaluated, test_tokens, args.seq_len, args.windows, progress=False)
        rows.append({"row": name, "ppl": result.ppl, "windows": result.n_windows, "seq_len": result.seq_len,
                     "seconds": time.perf_counter() - started})
        print(markdown_table(rows[-1:]) if len(rows) == 1 else markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    write_json_atomic(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
