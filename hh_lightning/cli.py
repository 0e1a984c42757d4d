"""``train.py``: LightningCLI whose ``fit`` quantizes a whole model, layer by layer.

``python train.py fit --config configs/X.yaml`` reads four groups: ``model``
(the per-block recipe, ``HHBlockModule``), ``data`` (model source, calibration
and cache, ``BlockActivationDataModule``), ``trainer`` (Lightning's Trainer
arguments, applied to every layer's Trainer) and ``pipeline``
(``PipelineConfig``). ``--print_config`` and command-line overrides work as in
any LightningCLI.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from .commands import INPUT_ERRORS
from .commands import refuse as _refuse
from .datamodule import BlockActivationDataModule
from .files import DirectoryLocked
from .module import HHBlockModule, LayerRecipe
from .parallel import WorkerInfo, launcher_worker
from .pipeline import PipelineConfig, QuantizationRun, RunInterrupted


class QuantizeCLI(LightningCLI):
    """LightningCLI with a ``pipeline`` group and a ``fit`` that walks the layers."""

    def __init__(self, *args: Any, launched: WorkerInfo | None = None, **kwargs: Any) -> None:
        self.launched = launched
        self.summary: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: Lightning's ``validate``/``test``/``predict`` have nothing to run on a layer-wise job."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(PipelineConfig, "pipeline")

    def instantiate_classes(self) -> None:
        """Build the recipe, datamodule and Trainer; their own range checks become one-line errors."""
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as error:
            _refuse(error)

    def fit(self, model: HHBlockModule, datamodule: BlockActivationDataModule, **_: Any) -> None:
        config = self.config[self.subcommand]
        pipeline = self.config_init[self.subcommand]["pipeline"]
        run = quantization_run(self, model, datamodule)
        try:
            run.validate()
        except INPUT_ERRORS as error:
            _refuse(error)
        config_yaml = self._parser(self.subcommand).dump(config, skip_none=False)
        try:
            self.summary = run.run(self.launched, config_yaml=config_yaml)
        except DirectoryLocked as error:  # another run holds run_dir or reads the cache: refused like bad input
            _refuse(error)
        except KeyboardInterrupt as stop:
            where = f" during {stop}" if isinstance(stop, RunInterrupted) else ""
            print(f"interrupted{where}; rerun the same command to resume: finished layers in {run.run_dir} are "
                  "kept and an unfinished one restarts from its last checkpoint", file=sys.stderr)
            raise SystemExit(130) from None
        if self.summary is not None:
            print((Path(pipeline.run_dir).expanduser() / "summary.md").read_text())


def main(args: list[str] | None = None, run: bool = True) -> QuantizeCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand.

    With ``run=False`` the arguments carry no subcommand (``["--config", path, ...]``) and the
    returned CLI only holds the instantiated recipe: ``quantization_run(cli)`` turns it into a run.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Each layer builds a Trainer; its device banner and tips would repeat once per layer.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # Before Lightning builds a Trainer: a torchrun/SLURM worker must not look like a DDP rank.
    launched = launcher_worker()
    return QuantizeCLI(HHBlockModule, BlockActivationDataModule, launched=launched, args=args, run=run,
                       save_config_callback=None, subclass_mode_model=False, subclass_mode_data=False,
                       auto_configure_optimizers=False, trainer_defaults={"enable_model_summary": False})


def quantization_run(cli: QuantizeCLI, model: HHBlockModule | None = None,
                     datamodule: BlockActivationDataModule | None = None) -> QuantizationRun:
    """The ``QuantizationRun`` a parsed CLI describes (default: its own model and datamodule).

    Reads the ``fit`` subcommand's sections when the CLI ran one, the top level otherwise
    (a CLI built with ``run=False``).
    """
    config, config_init = cli.config, cli.config_init
    if cli.subcommand is not None:
        config, config_init = config[cli.subcommand], config_init[cli.subcommand]
    module = model if model is not None else cli.model  # LightningCLI's parsed model group: the recipe
    return QuantizationRun(LayerRecipe(quant=module.quant, optim=module.optim),
                           datamodule if datamodule is not None else cli.datamodule,
                           config["trainer"].as_dict(), config_init["pipeline"])
