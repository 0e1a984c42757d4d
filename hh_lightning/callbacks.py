"""Callbacks of a block's fit: PCA rotation init, weight-quantizer init, fold and export.

What a finished layer leaves on disk (its folded artifact) lives in ``artifacts.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .artifacts import dataset_statistics, export_block
from .block import HHDecoderBlock
from .module import HHBlockModule
from .quantizers import WeightInit


class RotationInitCallback(Callback):
    """PCA-initialize every rotation of the block from its cached inputs (docs/design.md §2.2).

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
        dataset = trainer.datamodule.train_dataset
        count = len(dataset) if self.statistics_samples is None else min(self.statistics_samples, len(dataset))
        statistics = dataset_statistics(pl_module.block, dataset, count, pl_module.device,
                                        trainer.datamodule.hparams.batch_size)
        # Rotation-independent (collect_statistics), so the GPTQ fold at the end reuses them.
        pl_module.calibration_statistics = (count, statistics)
        pl_module.block.init_rotations_pca_(statistics)


def init_rotations_from_dataset_(block: HHDecoderBlock, dataset: Any, count: int | None = None,
                                 device: torch.device | str = "cpu") -> None:
    """PCA-initialize ``block``'s rotations from the inputs ``x`` of the first ``count`` pairs of ``dataset``.

    ``dataset[i]`` is an ``(x, y)`` pair with ``x`` ``(seq_len, hidden)``; ``None`` uses all of it.
    """
    block.init_rotations_pca_(dataset_statistics(block, dataset, count, device))


class WeightQuantizerInitCallback(Callback):
    """Set the weight quantizers' clip ratios for the (rotated) weights: min-max, clip search or HQQ."""

    def __init__(self, method: WeightInit | None = None) -> None:
        self.method = method

    def on_train_start(self, trainer: L.Trainer, pl_module: HHBlockModule) -> None:
        if not bool(pl_module.initialized):
            pl_module.block.initialize_weight_quantizers(self.method)


class FoldExportCallback(Callback):
    """At the end of fit: fold the block, check it against the fake-quant block, export it.

    Refuses to export a block whose validation MSE is not finite, so a
    diverged layer is reported instead of silently shipped.
    """

    def __init__(self, artifact_dir: str | Path) -> None:
        self.artifact_dir = Path(artifact_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: HHBlockModule) -> None:
        export_block(pl_module, trainer.datamodule.val_dataloader(), self.artifact_dir, trainer.global_step,
                     trainer.datamodule.train_dataset, trainer.datamodule.hparams.batch_size)
