"""``quantize``: the whole pipeline of ``train.py fit`` as one Python call.

    from hh_lightning import quantize
    model = quantize("path/to/Qwen2.5-0.5B", "configs/qwen2.5-0.5b_w4a4.yaml", run_dir="runs/q05")

The recipe is a ``train.py`` YAML file; ``overrides`` are its command-line
options (``"--trainer.max_epochs=2"``). The same checks run first (one
``ValueError`` naming the field), the same run directory is written, and a
rerun resumes. Returns the quantized model: the export loaded back when the
recipe exports, else the assembled model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn


def quantize(model: str | os.PathLike | nn.Module, recipe: str | os.PathLike, *, tokenizer: Any = None,
             run_dir: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> nn.Module:
    """Quantize ``model`` (a path, hub id or loaded causal LM with its ``tokenizer``) with ``recipe``.

    The model is quantized layer by layer exactly as ``train.py fit --config recipe`` would; a
    loaded model is calibrated in place (its layers are replaced), so pass a copy to keep it.
    """
    from .cli import main, quantization_run
    from .export import load_quantized

    args = ["--config", str(recipe), *overrides]
    if run_dir is not None:
        args.append(f"--pipeline.run_dir={run_dir}")
    if isinstance(model, (str, os.PathLike)):
        args.append(f"--data.model={model}")
    cli = main(args, run=False)
    run = quantization_run(cli)
    if not isinstance(model, (str, os.PathLike)):
        run.datamodule.use_model(model, tokenizer)
    run.validate()
    summary = run.run()
    export_dir = summary.get("export_dir")
    return load_quantized(Path(export_dir)) if export_dir else run.assemble()
