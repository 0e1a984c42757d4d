"""``AutoModelForCausalLM.from_pretrained`` on a saved hh_lightning model, through transformers' quantizer registry.

``save_quantized`` writes two keys into the export's ``config.json``:

* ``quantization_config``: ``{"quant_method": "hh_lightning", ...}`` with the
  format version, the model dtype and a summary of the recipe (bits, group
  size, rotation structure). The full description stays in
  ``quantization_config.json``, which is what the loader reads.
* ``transformers_weights``: ``LOAD_GUARD``, a sentence naming this package.
  transformers reads this key as the name of the weights file, and refuses a
  value that is not a ``.safetensors`` name with a ``ValueError`` quoting it.

A registered quantization method is what makes the load work, and the guard is
what makes a load without it fail: transformers 5 meets an unregistered
``quant_method`` with a warning only, then loads the model as if it were
unquantized, with every quantized linear randomly initialized. With this module
registered (``register``: ``import hh_lightning`` does it as soon as transformers
loads its quantizers), ``HHLightningHfQuantizer``:

1. clears the guard and fixes the dtype to the export's (``update_attn_implementation``, ``update_dtype``),
2. takes every module with weights out of the skeleton transformers builds, so
   transformers reads only the safetensors header and initializes nothing
   (``_process_model_before_weight_loading``),
3. then loads the export with ``loading.load_quantized`` (every integrity check
   included) and moves its modules, config and generation config into the
   model transformers returns (``_process_model_after_weight_loading``).

So ``from_pretrained(dir)`` computes exactly what ``load_quantized(dir)`` does;
``generate()``, pipelines and tools built on ``from_pretrained`` work on it.
This module imports only transformers' quantizer and config modules, and the
format's names (``export_format``: torch and the standard library), at import
time, so the registration can run while transformers is still importing
``modeling_utils``; the loader, which builds transformers models, is imported
when a model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers import auto as auto_quantizers
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .export_format import (
    LOAD_GUARD,
    LOAD_GUARD_KEY,
    QUANT_CONFIG_NAME,
    QUANT_METHOD,
    transformers_config_entries,
)

__all__ = ["LOAD_GUARD", "LOAD_GUARD_KEY", "QUANT_METHOD", "HHLightningConfig", "HHLightningHfQuantizer",
           "register", "transformers_config_entries"]


class HHLightningConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of an hh_lightning export, as transformers holds it.

    Args:
        dtype: the dtype the model was saved in and is loaded in (``float32``, ``bfloat16``, ``float16``).
        format_version: version of the on-disk format (``export_format.FORMAT_VERSION`` when saved).
        hh_lightning_version: the package version that saved it.
        metadata_file: the file holding the full description (per-layer bits, rotations, integrity records).
        kernels: how the linears run, as ``load_quantized``'s ``kernels`` (``None``, ``int4`` or ``w4a4``).
            A loading choice: ``from_pretrained(dir, quantization_config=HHLightningConfig(kernels="w4a4"))``
            takes it (and ``head``) over the saved config's.
        head: the embedding table and lm_head, as ``load_quantized``'s ``head`` (``fp`` or ``int8``).
        kwargs: the recipe summary (``export_format.SUMMARY_FIELDS``), kept as attributes for display.
    """

    def __init__(self, dtype: str = "float32", format_version: int | None = None,
                 hh_lightning_version: str | None = None, metadata_file: str = "quantization_config.json",
                 kernels: str | None = None, head: str = "fp", **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.dtype = dtype
        self.format_version = format_version
        self.hh_lightning_version = hh_lightning_version
        self.metadata_file = metadata_file
        self.kernels = kernels
        self.head = head
        for name, value in kwargs.items():
            setattr(self, name, value)

    def get_loading_attributes(self) -> dict[str, Any]:
        """The settings a ``quantization_config`` passed to ``from_pretrained`` overrides: how to serve, not what was saved."""
        return {"kernels": self.kernels, "head": self.head}


def _single_device(device_map: Any) -> str:
    """The one device a ``from_pretrained(device_map=...)`` names (``cpu`` when none); several are refused."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devices = {str(device) for device in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r}: an hh_lightning model loads on one device; "
                             "pass device_map='cpu', 'cuda' or 'cuda:N'")
        device = devices.pop()
    else:
        device = str(device_map)
    if device in ("auto", "balanced", "balanced_low_0", "sequential"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.isdigit():  # accelerate's way of naming a GPU
        return f"cuda:{device}"
    if device in ("disk", "meta"):
        raise ValueError(f"device_map={device_map!r}: an hh_lightning model cannot be offloaded to {device}")
    return device


class _Empty(nn.Module):
    """Stands in for a submodule with weights while transformers runs its loader; replaced afterwards."""


class HHLightningHfQuantizer(HfQuantizer):
    """Loads an hh_lightning export inside ``from_pretrained`` (see the module docstring for the steps)."""

    requires_calibration = True  # the weights are quantized already; from_pretrained cannot quantize a plain model

    def __init__(self, quantization_config: HHLightningConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.device = "cpu"

    def validate_environment(self, device_map: Any = None, **_: Any) -> None:
        self.device = _single_device(device_map)

    def update_dtype(self, dtype: Any) -> Any:
        """The export's dtype whatever was asked: the logits must be those of ``load_quantized``."""
        import torch

        return getattr(torch, self.quantization_config.dtype)

    def update_attn_implementation(self, config: Any) -> Any:
        # The only hook that sees the config before transformers resolves the weights file: drop the guard there.
        if getattr(config, LOAD_GUARD_KEY, None) == LOAD_GUARD:
            delattr(config, LOAD_GUARD_KEY)
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **_: Any) -> nn.Module:
        self.directory = _export_directory(model, checkpoint_files)
        # No weights left for transformers to load, materialize or initialize: its loader only lists the file's
        # keys (ignored below), and the model is filled in after it, from load_quantized.
        for name, child in list(model.named_children()):
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                setattr(model, name, _Empty())
        model.all_tied_weights_keys = {}
        model._keys_to_ignore_on_load_unexpected = {r".*"}
        # transformers >= 5.25 kernelizes (hub kernels) before the quantizer's post-processing, and finds the
        # device from the first parameter, which this emptied model no longer has: name it.
        model._kernels_device = self.device
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **_: Any) -> nn.Module:
        from .loading import load_quantized

        config = self.quantization_config
        loaded = load_quantized(self.directory, device=self.device, kernels=getattr(config, "kernels", None),
                                head=getattr(config, "head", "fp"))
        for name, child in loaded.named_children():
            setattr(model, name, child)
        # One config object for the model and its layers (each HHDecoderBlock reads it), as in load_quantized.
        loaded.config.name_or_path = model.config.name_or_path
        loaded.config._attn_implementation = model.config._attn_implementation
        loaded.config.quantization_config = self.quantization_config
        model.config = loaded.config
        model.generation_config = loaded.generation_config
        model.all_tied_weights_keys = loaded.all_tied_weights_keys
        del model._keys_to_ignore_on_load_unexpected  # back to the class's
        if getattr(model, "use_kernels", False):
            # Hub kernels would swap the forwards of the norms inside the blocks, and the logits would then
            # differ from load_quantized's: back to torch's own (set_use_kernels(True) opts in again).
            model.use_kernels = False
        return model.eval()

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return False  # save_pretrained cannot write the format: export.save_quantized does

    @property
    def is_trainable(self) -> bool:
        return False


def _export_directory(model: nn.Module, checkpoint_files: list[str] | None) -> Path:
    """The directory of the export being loaded: the one holding its weights (a hub repo's snapshot directory)."""
    if not checkpoint_files:
        raise ValueError("hh_lightning: from_pretrained found no weights file for this model")
    directory = Path(checkpoint_files[0]).parent
    if not (directory / QUANT_CONFIG_NAME).is_file() and not os.path.isdir(str(model.config.name_or_path)):
        from transformers.utils import cached_file

        # A hub repo: its metadata file is fetched into the same snapshot directory as the weights.
        cached_file(str(model.config.name_or_path), QUANT_CONFIG_NAME)
    return directory


def register() -> None:
    """Register the ``hh_lightning`` quantization method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HHLightningConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HHLightningHfQuantizer)
    # transformers merges a passed config's loading attributes only for the config types it lists.
    if HHLightningConfig not in auto_quantizers.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto_quantizers.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto_quantizers.LOADING_ATTRIBUTES_CONFIG_TYPES,
                                                           HHLightningConfig)
