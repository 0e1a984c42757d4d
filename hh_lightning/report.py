"""Run summaries a person reads: a markdown table, JSON, and a per-layer MSE plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write_path, write_json_atomic, write_text_atomic


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows``: columns are the keys in first-seen order, floats to 4 significant
    digits, a missing or ``None`` value an empty cell."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def export_size_table(sizes: dict[str, Any], where: str) -> str:
    """Markdown: the whole exported file by kind of tensor, and its ratio to the FP16 model."""
    mib = 2**20
    rows = [{"kind": kind, "MiB": size / mib, "share of file": f"{100 * sizes['share'][kind]:.1f}%"}
            for kind, size in sizes["by_kind"].items()]
    rows.append({"kind": "**whole file**", "MiB": sizes["file_bytes"] / mib, "share of file": "100%"})
    return (f"## Export size\n\n{where}/model.safetensors: {sizes['file_bytes'] / mib:.1f} MiB, "
            f"**{sizes['ratio']:.3f}x** the FP16 model ({sizes['fp16_model_bytes'] / mib:.1f} MiB)\n\n"
            + markdown_table(rows))


def plot_layer_mse(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Per-layer MSE curves (log scale), one line per method, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, points in series.items():
        layers, values = zip(*points)
        axes.plot(layers, values, marker="o", markersize=3, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("block output MSE (held-out windows)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_write_path(path, suffix=path.suffix) as temporary:
        figure.savefig(temporary)
    plt.close(figure)


def write_report(run_dir: Path, results: dict[str, Any]) -> str:
    """Write ``summary.json``, ``summary.md`` and ``layer_mse.png`` under ``run_dir``; return the markdown."""
    layers = results.get("layers", [])
    # Artifacts from before the trained-vs-initial comparison hold only the trained state.
    layer_rows = [{"layer": m["layer"], "mse_init": m["mse_init"], "mse_trained": m.get("mse_trained", m["mse_final"]),
                   "mse_fixed": m.get("mse_fixed"), "kept": m.get("kept", "trained"), "mse_final": m["mse_final"],
                   "mse_folded": m["mse_folded"], "steps": m["steps"]} for m in layers]
    ppl_rows = []
    for name in ("fp", "quantized"):
        if name in results:
            r = results[name]
            ppl_rows.append({"model": name, "ppl": r["ppl"], "windows": r["n_windows"], "seq_len": r["seq_len"]})
    text = "## Perplexity\n\n" + markdown_table(ppl_rows) + "\n\n## Per-layer MSE\n\n" + markdown_table(layer_rows)
    for state in ("initial", "fixed"):
        kept = [str(r["layer"]) for r in layer_rows if r["kept"] == state]
        if kept:
            text += (f"\n\nTraining left the held-out MSE of layer(s) {', '.join(kept)} above their {state} "
                     f"state's: their {state} state was exported instead.")
    text += f"\n\nTraining wall time: {results.get('train_seconds', float('nan')):.1f} s\n"
    if "export_size" in results:
        text += "\n" + export_size_table(results["export_size"], results["export_dir"]) + "\n"
    write_json_atomic(run_dir / "summary.json", results)
    write_text_atomic(run_dir / "summary.md", text)
    if layer_rows:
        plot_layer_mse({"initialized (rotation init + clip init)": [(r["layer"], r["mse_init"]) for r in layer_rows],
                        "exported (the best of trained, initial and fixed)": [(r["layer"], r["mse_final"])
                                                                          for r in layer_rows]},
                       run_dir / "layer_mse.png", "Per-layer block MSE")
    return text
