"""``train.py`` and the ``hh-lightning`` console script (``entry``): ``fit``, ``evaluate``, ``generate``.

``fit`` is a LightningCLI whose ``fit`` quantizes a whole model, layer by layer;
``evaluate`` and ``generate`` are ``commands.py``'s.

``python train.py fit --config configs/X.yaml`` reads four groups: ``model``
(the per-block recipe, ``HHBlockModule``), ``data`` (model source, calibration
and cache, ``BlockActivationDataModule``), ``trainer`` (Lightning's Trainer
arguments, applied to every layer's Trainer) and ``pipeline``
(``PipelineConfig``). ``--print_config`` and command-line overrides work as in
any LightningCLI. Bad input, whether jsonargparse or our own checks find it,
is one ``error:`` line naming the field and exit code 2; from Python
(``main(..., run=False)``, as ``hh_lightning.quantize`` calls it) it is a
one-line ``ValueError``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from .commands import COMMANDS, program_name, run as run_command
from .datamodule import BlockActivationDataModule
from .errors import (
    INPUT_ERRORS,
    REFUSED_ERRORS,
    check_config_files,
    one_line,
    parser_error,
    refuse,
)
from .files import DirectoryLocked
from .module import HHBlockModule, LayerRecipe
from .parallel import WorkerInfo, launcher_worker
from .pipeline import PipelineConfig, QuantizationRun, RunInterrupted, check_trainer_devices


class QuantizeCLI(LightningCLI):
    """LightningCLI with a ``pipeline`` group and a ``fit`` that walks the layers."""

    def __init__(self, *args: Any, launched: WorkerInfo | None = None, **kwargs: Any) -> None:
        self.launched = launched
        self.summary: dict[str, Any] | None = None
        # From the command line bad input exits 2; from Python (run=False) it raises.
        self.refuse_input = kwargs.get("run", True)
        # jsonargparse raises instead of printing its usage text; parse_arguments words the error.
        kwargs["parser_kwargs"] = {"exit_on_error": False, **{name: {"exit_on_error": False}
                                                              for name in self.subcommands()}}
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: Lightning's ``validate``/``test``/``predict`` have nothing to run on a layer-wise job."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(PipelineConfig, "pipeline")

    @contextlib.contextmanager
    def _input_checked(self) -> Iterator[None]:
        """Bad input found in the block: refused (exit 2) from the command line, raised from Python."""
        try:
            try:
                yield
            except ArgumentError as error:
                raise parser_error(error) from None
        except INPUT_ERRORS as error:
            if self.refuse_input:
                refuse(error)
            raise

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args``; a bad config file or value is a one-line error naming it."""
        with self._input_checked():
            check_config_files(sys.argv[1:] if args is None else args)
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """Build the recipe, datamodule and Trainer (after checking its accelerator: Lightning would
        refuse an absent one in a multi-line exception); their range checks are one-line errors."""
        with self._input_checked():
            config = self.config[self.subcommand] if self.subcommand is not None else self.config
            check_trainer_devices(config["trainer"].as_dict())
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's Trainer; its own refusals of a setting (a device list on the CPU, ...) are one-line
        ``ValueError``s naming the group."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError, MisconfigurationException) as error:
            raise ValueError(f"trainer: {one_line(str(error))}") from None

    def fit(self, model: HHBlockModule, datamodule: BlockActivationDataModule, **_: Any) -> None:
        config = self.config[self.subcommand]
        pipeline = self.config_init[self.subcommand]["pipeline"]
        run = quantization_run(self, model, datamodule)
        try:
            run.validate()
        except REFUSED_ERRORS as error:
            refuse(error)
        config_yaml = self._parser(self.subcommand).dump(config, skip_none=False)
        try:
            self.summary = run.run(self.launched, config_yaml=config_yaml)
        except DirectoryLocked as error:  # another run holds run_dir or reads the cache: refused like bad input
            refuse(error)
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
    returned CLI only holds the instantiated recipe: ``quantization_run(cli)`` turns it into a run;
    bad input then raises a one-line ``ValueError`` (or ``FileNotFoundError``) instead of exiting.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Each layer builds a Trainer; its device banner and tips would repeat once per layer.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # "Seed set to N" comes before the checks: a refused run would print it above its one error line.
    # The seed is in the run's config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
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


# --------------------------------------------------------------------------
# train.py and the hh-lightning console script
# --------------------------------------------------------------------------
FIT_SUMMARY = "quantize a model layer by layer (LightningCLI: trainer, model, data, pipeline groups)"


def usage() -> str:
    """``--help`` without a command: the three commands."""
    program = program_name()
    lines = [f"usage: {program} {{fit,evaluate,generate}} [--help] ...", "", "commands:", f"  fit        {FIT_SUMMARY}"]
    lines += [f"  {name:<10} {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in COMMANDS.items()]
    lines += ["", f"{program} COMMAND --help lists every field of COMMAND."]
    return "\n".join(lines)


def entry(args: list[str] | None = None) -> Any:
    """``train.py`` / ``hh-lightning``: ``fit`` goes to the LightningCLI (``main``), ``evaluate`` and
    ``generate`` to ``commands.run``; anything else is refused in one line."""
    given = list(sys.argv[1:] if args is None else args)
    if not given or given[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if given else sys.stderr)
        raise SystemExit(0 if given else 2)
    if given[0] in COMMANDS:
        return run_command(given[0], given[1:])
    if given[0] != "fit":
        refuse(ValueError(f"unknown command {given[0]!r}: use fit, evaluate or generate ({program_name()} --help)"))
    return main(args)  # None: LightningCLI reads sys.argv itself (and warns when given both)
