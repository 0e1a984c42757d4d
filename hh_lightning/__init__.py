"""hh_lightning: W4A4 quantization with learned Householder rotations and HQQ.

``hh_lightning.quantize(model, recipe, run_dir=...)`` runs the whole pipeline from Python
(``api.py``); ``python train.py fit --config recipe.yaml`` runs it from the shell.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "quantize"]


def __getattr__(name: str) -> Any:
    # Lazy, so ``import hh_lightning.files`` stays free of torch, Lightning and transformers.
    if name == "quantize":
        from .api import quantize

        return quantize
    raise AttributeError(f"module 'hh_lightning' has no attribute {name!r}")
