"""hh_lightning: W4A4 quantization with learned Householder rotations and HQQ.

``hh_lightning.quantize(model, recipe, run_dir=...)`` runs the whole pipeline from Python
(``api.py``); ``python train.py fit --config recipe.yaml`` runs it from the shell.

Importing the package also registers the ``hh_lightning`` quantization method with
transformers (``hf_integration.py``), so ``AutoModelForCausalLM.from_pretrained`` loads
a saved model. The import stays cheap: it imports neither torch nor transformers. If
transformers' quantizer registry (``transformers.quantizers.auto``) is loaded already,
the method is registered at once; otherwise an import hook registers it right after
transformers loads that module (which it does before any ``from_pretrained``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "quantize"]

# The transformers module whose registries the quantization method goes into.
_REGISTRY_MODULE = "transformers.quantizers.auto"


def __getattr__(name: str) -> Any:
    # Lazy, so ``import hh_lightning.files`` stays free of torch, Lightning and transformers.
    if name == "quantize":
        from .api import quantize

        return quantize
    raise AttributeError(f"module 'hh_lightning' has no attribute {name!r}")


def _register_with_transformers() -> None:
    try:
        from .hf_integration import register

        register()
    except Exception as error:  # noqa: BLE001 — never break transformers' own import
        warnings.warn(f"hh_lightning could not register with transformers ({type(error).__name__}: {error}); "
                      "AutoModelForCausalLM.from_pretrained will refuse hh_lightning exports", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``_REGISTRY_MODULE`` with the normal finders, runs it, then registers (once; removes itself)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_with_transformers()


if _REGISTRY_MODULE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
