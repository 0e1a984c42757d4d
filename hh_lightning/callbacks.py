"""Callbacks of a block's fit: PCA rotation init, weight-quantizer init, fold and export."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_model, save_model

from .block import HHDecoderBlock
from .export import pack_block_codes_, unpack_block_codes_
from .files import sha256_file, write_text_atomic
from .module import HHBlockModule, block_mse
from .quantizers import WeightInit


class RotationInitCallback(Callback):
    """PCA-initialize every rotation of the block from its cached inputs (DESIGN.md 2.2).

    Runs before the first step; a no-op when the module is already
    initialized (a resumed fit) or the rotations are not ``pca``.

    Args:
        statistics_samples: how many training windows feed the covariances (``None``: all).
    """

    def __init__(self, statistics_samples: int | None = None) -> None:
        self.statistics_samples = statistics_samples

    def on_train_start(self, trainer: L.Trainer, pl_module: HHBlockModule) -> None:
        if bool(pl_module.initialized) or pl_module.quant.rotation_init != "pca":
            return
        init_rotations_from_dataset_(pl_module.block, trainer.datamodule.train_dataset, self.statistics_samples,
                                     pl_module.device)


def init_rotations_from_dataset_(block: HHDecoderBlock, dataset: Any, count: int | None = None,
                                 device: torch.device | str = "cpu") -> None:
    """PCA-initialize ``block``'s rotations from the inputs ``x`` of the first ``count`` pairs of ``dataset``.

    ``dataset[i]`` is an ``(x, y)`` pair with ``x`` ``(seq_len, hidden)``; ``None`` uses all of it.
    """
    count = len(dataset) if count is None else min(count, len(dataset))
    statistics = None
    for index in range(count):
        x, _ = dataset[index]
        statistics = block.collect_statistics(x[None].to(device), statistics)
    block.init_rotations_pca_(statistics)


class WeightQuantizerInitCallback(Callback):
    """Set the weight quantizers' clip ratios for the (rotated) weights: min-max, clip search or HQQ."""

    def __init__(self, method: WeightInit | None = None) -> None:
        self.method = method

    def on_train_start(self, trainer: L.Trainer, pl_module: HHBlockModule) -> None:
        if not bool(pl_module.initialized):
            pl_module.block.initialize_weight_quantizers(self.method)


def artifact_paths(directory: Path, layer_index: int) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths of a layer's folded artifact."""
    stem = directory / f"layer_{layer_index:03d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def write_layer_artifact(folded_block: HHDecoderBlock, directory: Path, metrics: dict[str, Any]) -> Path:
    """Save a folded block atomically: weights first, then the metadata that vouches for them.

    The metadata (written last, by rename) holds the weights' size and sha256,
    so a present metadata file means a complete, verifiable artifact. Codes
    are stored bit-packed, as in the export.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = artifact_paths(directory, folded_block.layer_idx)
    temporary = weights_path.with_name(f".{weights_path.name}.{os.getpid()}.tmp")
    try:
        save_model(pack_block_codes_(folded_block), str(temporary))
    finally:
        unpack_block_codes_(folded_block)
    os.replace(temporary, weights_path)
    meta = {**metrics, "layer": folded_block.layer_idx, "quant": folded_block.quant.to_dict(),
            "bytes": weights_path.stat().st_size, "sha256": sha256_file(weights_path)}
    write_text_atomic(meta_path, json.dumps(meta, indent=2))
    return meta_path


def read_layer_artifact(directory: Path, layer_index: int, verify: bool = True) -> dict[str, Any] | None:
    """The metadata of a complete artifact, or ``None`` if absent; raises if it is corrupt."""
    weights_path, meta_path = artifact_paths(directory, layer_index)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"layer artifact metadata {meta_path} is corrupt: {error}") from None
    if not weights_path.is_file() or weights_path.stat().st_size != meta["bytes"]:
        raise ValueError(f"layer artifact {weights_path} is missing or has the wrong size")
    if verify and sha256_file(weights_path) != meta["sha256"]:
        raise ValueError(f"layer artifact {weights_path} fails its sha256 check")
    return meta


def load_layer_artifact(block: HHDecoderBlock, directory: Path) -> HHDecoderBlock:
    """Fold ``block`` (fixing buffer shapes) and load its saved artifact into it."""
    weights_path, _ = artifact_paths(directory, block.layer_idx)
    pack_block_codes_(block.fold_())  # the packed shapes the file holds
    load_model(block, str(weights_path))
    return unpack_block_codes_(block)


class FoldExportCallback(Callback):
    """At the end of fit: fold the block, check it against the fake-quant block, export it.

    Refuses to export a block whose validation MSE is not finite, so a
    diverged layer is reported instead of silently shipped.
    """

    def __init__(self, artifact_dir: str | Path) -> None:
        self.artifact_dir = Path(artifact_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: HHBlockModule) -> None:
        export_block(pl_module, trainer.datamodule.val_dataloader(), self.artifact_dir, trainer.global_step)


def export_block(pl_module: HHBlockModule, val_loader: Any, artifact_dir: Path, steps: int) -> Path:
    """Fold, measure and save one trained block; returns the metadata path."""
    block = pl_module.block
    block.eval()
    # Measure the trained block with the rotations it ships (rounded to quant.rotation_dtype), so
    # mse_folded == mse_final checks the fold alone.
    block.round_rotations_()
    mse_final = block_mse(block, val_loader, pl_module.device)
    if not math.isfinite(mse_final):
        raise FloatingPointError(f"layer {pl_module.layer_index}: validation MSE is {mse_final}; not exporting")
    folded = copy.deepcopy(block).fold_()
    mse_folded = block_mse(folded, val_loader, pl_module.device)
    metrics = {"mse_init": float(pl_module.mse_init), "mse_final": mse_final, "mse_folded": mse_folded,
               "steps": int(steps)}
    return write_layer_artifact(folded.cpu(), artifact_dir, metrics)
