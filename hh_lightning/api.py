"""``quantize``: the whole pipeline of ``train.py fit`` as one Python call.

    from hh_lightning import quantize
    model = quantize("path/to/Qwen2.5-0.5B", "configs/qwen2.5-0.5b_w4a4.yaml", run_dir="runs/q05")

The recipe is a ``train.py`` YAML file; ``overrides`` are its command-line
options (``"--trainer.max_epochs=2"``). The same checks run first (one
``ValueError`` naming the field, nothing written), the same run directory is
written, and a rerun resumes. Returns the quantized model: the export loaded back when the
recipe exports, else the assembled model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import check_config_files, check_type


def quantize(model: str | os.PathLike | nn.Module, recipe: str | os.PathLike, *, tokenizer: Any = None,
             run_dir: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> nn.Module:
    """Quantize ``model`` (a path, hub id or loaded causal LM with its ``tokenizer``) with ``recipe``.

    The model is quantized layer by layer exactly as ``train.py fit --config recipe`` would; a
    loaded model is calibrated in place (its layers are replaced), so pass a copy to keep it.

    Bad input raises before anything is written, in one line naming the argument or field:
    ``TypeError`` for an argument of the wrong type, ``FileNotFoundError`` for a missing recipe
    or model path, ``ValueError`` for any other bad value (never ``SystemExit``).
    """
    from .cli import main, quantization_run
    from .loading import load_quantized

    check_type("model", model, (str, os.PathLike, nn.Module), "a model path, a hub id or a loaded causal LM")
    loaded = isinstance(model, nn.Module)
    args = ["--config", str(_checked_recipe(recipe)), *_checked_overrides(overrides)]
    if loaded and tokenizer is None:
        raise ValueError("tokenizer: a loaded model needs its tokenizer (quantize(model, recipe, tokenizer=...))")
    if not loaded and tokenizer is not None:
        raise ValueError("tokenizer: given with a model path, which loads its own; pass it only with a loaded model")
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerBase

        check_type("tokenizer", tokenizer, PreTrainedTokenizerBase, "a transformers tokenizer")
    if run_dir is not None:
        check_type("run_dir", run_dir, (str, os.PathLike), "a directory path")
        args.append(f"--pipeline.run_dir={run_dir}")
    if not loaded:
        if not str(model):
            raise ValueError("model is empty: give a model path, a hub id or a loaded causal LM")
        args.append(f"--data.model={model}")
    cli = main(args, run=False)
    run = quantization_run(cli)
    if loaded:
        run.datamodule.use_model(model, tokenizer)
    run.validate()
    summary = run.run()
    export_dir = summary.get("export_dir")
    return load_quantized(Path(export_dir)) if export_dir else run.assemble()


def _checked_recipe(recipe: Any) -> Path:
    check_type("recipe", recipe, (str, os.PathLike), "the path of a train.py YAML file")
    path = Path(recipe).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recipe: file not found: {path}")
    check_config_files(["--config", str(path)], "recipe")
    return path


def _checked_overrides(overrides: Any) -> list[str]:
    if isinstance(overrides, (str, bytes)):  # a string is a sequence too: it would be split into characters
        raise TypeError(f"overrides: expected a list of options such as ['--trainer.max_epochs=2'], "
                        f"got the string {overrides!r:.80}")
    check_type("overrides", overrides, Sequence, "a list of options such as ['--trainer.max_epochs=2']")
    overrides = list(overrides)
    for index, option in enumerate(overrides):
        check_type(f"overrides[{index}]", option, str, "an option string such as '--trainer.max_epochs=2'")
        follows_option = index > 0 and overrides[index - 1].startswith("--") and "=" not in overrides[index - 1]
        if not option.startswith("--") and not follows_option:
            raise ValueError(f"overrides[{index}]={option!r} is not an option: write '--section.field=value'")
    return overrides
