"""The whole export file against the bf16 model, with the embedding table and lm_head in 16 bits and in int8.

For each W4A4 export given (``--exports NAME=DIR``; by default SmolLM2's demo export and the
Qwen2.5-0.5B-shaped untrained export that ``benchmarks/deploy_integer.py`` prepares), the export is
loaded and saved again with ``save_quantized(head=...)`` for each head storage, and
``export.export_size`` reports the whole ``model.safetensors`` by kind against the model's bf16
size (2 bytes a parameter, tied tables once).

Run: ``python benchmarks/export_size.py [--exports NAME=DIR ...]``. Writes
``benchmarks/results/export_size.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

WORK = Path.home() / ".cache" / "hh_lightning" / "deploy_speed"
DEFAULT_EXPORTS = {"smollm2 (demo export)": ROOT / "runs" / "demo" / "quantized",
                   "qwen2.5-0.5b-shaped (untrained, demo structure)": WORK / "qwen2.5-0.5b-shaped" / "w4a4_untrained"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exports", nargs="+", metavar="NAME=DIR", help="the W4A4 exports to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_size.json")
    args = parser.parse_args()
    exports = DEFAULT_EXPORTS if not args.exports else dict(item.split("=", 1) for item in args.exports)
    missing = [f"{name}: {path}" for name, path in exports.items() if not (Path(path) / "model.safetensors").is_file()]
    if missing:
        parser.error("no export at " + "; ".join(missing))

    from _common import machine_info, print_markdown_table, write_json_atomic

    from hh_lightning.export import STORED_HEADS, export_size, save_quantized
    from hh_lightning.loading import load_quantized

    rows = []
    for name, directory in exports.items():
        model = load_quantized(directory)
        for head in STORED_HEADS:
            with tempfile.TemporaryDirectory() as scratch:
                sizes = export_size(save_quantized(model, Path(scratch) / "export", head=head))
            rows.append({"model": name, "head": head, "file_mib": sizes["file_bytes"] / 2**20,
                         "bf16_model_mib": sizes["fp16_model_bytes"] / 2**20, "file / bf16 model": sizes["ratio"],
                         "embeddings share": sizes["share"]["embeddings"], "codes share": sizes["share"]["codes"]})
        del model
    print_markdown_table(rows)
    write_json_atomic(args.out, {"command": "python benchmarks/export_size.py " + " ".join(sys.argv[1:]),
                                 "machine": machine_info(), "date": date.today().isoformat(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
