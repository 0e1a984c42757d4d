"""The whole-model driver: walk the layers, train each block, assemble, export, evaluate.

Each decoder layer gets its own single-device ``Trainer`` and ``HHBlockModule``.
A layer is done when its folded artifact (``layers/layer_NNN.safetensors`` plus
the ``.json`` that vouches for it) exists; a layer in progress resumes from its
``last.ckpt``. In ``fp`` input mode the layers are independent, so
``layer_parallel`` runs disjoint shares of them in separate processes (one per
device), then assembles.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .artifacts import export_block, load_layer_artifact, read_layer_artifact
from .block import HHDecoderBlock
from .cache import windows_sha256, write_boundary_file
from .callbacks import (
    FoldExportCallback,
    RotationInitCallback,
    WeightQuantizerInitCallback,
)
from .datamodule import BlockActivationDataModule
from .evaluation import perplexity
from .export_format import STORED_HEADS
from .files import (
    check_writable_directory,
    directory_lock,
    remove_leftovers,
    write_text_atomic,
)
from .errors import check_accelerator, check_index_list
from .models import check_context, config_hash
from .module import SPEED_ONLY_OPTIM_FIELDS, LayerRecipe
from .parallel import WorkerInfo, named_device_count, run_in_processes
from .text import WIKITEXT_SPLITS, tokenize_text

log = logging.getLogger(__name__)

# Trainer arguments the driver sets itself for every layer, with the values that agree with it.
DRIVER_TRAINER_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "callbacks": (None, []), "logger": (None, True), "default_root_dir": (None,), "enable_checkpointing": (None, True)}
DRIVER_TRAINER_KEYS = tuple(DRIVER_TRAINER_DEFAULTS)
DRIVER_TRAINER_REASONS = {
    "callbacks": "each layer's Trainer gets the pipeline's own callbacks (PCA init, checkpoints, fold and export)",
    "logger": "every layer logs to pipeline.run_dir/logs (CSV and TensorBoard)",
    "default_root_dir": "every file goes under pipeline.run_dir",
    "enable_checkpointing": "checkpoints are what lets a layer resume",
}
# Trainer arguments that change what a layer learns: part of a run directory's identity, so a rerun
# with, say, another max_epochs is refused instead of skipping every layer trained the old way.
RESULT_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "precision", "gradient_clip_val",
                       "gradient_clip_algorithm", "accumulate_grad_batches", "limit_train_batches",
                       "limit_val_batches", "deterministic")


def check_trainer_devices(trainer_kwargs: dict[str, Any]) -> None:
    """``trainer.accelerator`` is present on this machine and a ``trainer.devices`` list names distinct
    devices; checked before Lightning builds a Trainer, which would refuse them in a traceback."""
    check_accelerator(trainer_kwargs.get("accelerator"))
    if isinstance(trainer_kwargs.get("devices"), (list, tuple)):
        check_index_list("trainer.devices", trainer_kwargs["devices"])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run while it trained ``layer``; finished layers are kept, a rerun resumes."""

    def __init__(self, layer: int, position: int, total: int) -> None:
        super().__init__(f"layer {layer} ({position} of {total})")
        self.layer = layer


@dataclass
class PipelineConfig:
    """How the whole-model run is organized.

    Args:
        run_dir: where checkpoints, layer artifacts, logs and the result go.
        layers: decoder layers to quantize (default: all); others stay full precision.
        layer_parallel: split the layers over ``trainer.devices`` worker processes
            (or over a torchrun/SLURM launch), ``fp`` input mode only.
        statistics_samples: training windows used for the PCA covariances (``None``: all).
        eval_split: WikiText-2 split for perplexity.
        eval_seq_len: perplexity window length.
        eval_windows: number of windows scored (``None``: the whole split).
        eval_fp: also score the full-precision model.
        export: save the packed quantized model (needs every layer quantized).
        export_dir: where it is saved (default ``run_dir/quantized``).
        export_head: how the export stores the embedding table and lm_head: ``int8`` (per-row int8
            codes and a float32 scale a row, what ``load_quantized(head="int8")`` serves) or ``fp``
            (16-bit weights). At a large vocabulary these tables are most of the file. On SmolLM2's
            demo export the int8 rows scored 32.90 perplexity against 32.92 for 16-bit tables (16
            WikiText-2 test windows, ``benchmarks/results/serving_ppl.json``): hence the default.
        keep_checkpoints: keep each layer's Lightning checkpoints after its
            artifact is written and verified (for debugging); by default they
            are deleted then, since the artifact is all a rerun needs.
    """

    run_dir: str = "runs/default"
    layers: list[int] | None = None
    layer_parallel: bool = False
    statistics_samples: int | None = None
    eval_split: str = "test"
    eval_seq_len: int = 2048
    eval_windows: int | None = 16
    eval_fp: bool = True
    export: bool = True
    export_dir: str | None = None
    export_head: str = "int8"
    keep_checkpoints: bool = False


class LayerProgress:
    """A text bar over a run's layers with an ETA, logged after each layer.

    The line goes through the logger (the terminal) and is appended to ``log_path`` (the run's own
    log), so a long run can be followed from either. A layer's time runs from the previous update,
    so work between layers (the next layer's quantized inputs) counts. The ETA averages only the
    layers trained in this process: a skipped layer (artifact present) takes no time and would make
    it optimistic.
    """

    def __init__(self, total: int, log_path: Path | None = None, width: int = 20,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.log_path, self.width, self.clock = total, log_path, width, clock
        self.done = 0
        self.trained_seconds: list[float] = []
        self.last = clock()

    def update(self, layer_index: int, trained: bool) -> str:
        now = self.clock()
        seconds, self.last = now - self.last, now
        self.done += 1
        if trained:
            self.trained_seconds.append(seconds)
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"layers [{bar}] {self.done}/{self.total} (layer {layer_index} done)"
        if self.trained_seconds:
            per_layer = sum(self.trained_seconds) / len(self.trained_seconds)
            line += f", {per_layer:.1f} s/layer, ETA {format_duration(per_layer * (self.total - self.done))}"
        else:
            line += ", ETA unknown (no layer trained yet)"
        log.info(line)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as file:
                file.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + line + "\n")
        return line


def format_duration(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``4000`` -> ``1 h 6 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Exempt the objects alive now (the FP model, the data, imported modules) from garbage collection.

    Each layer ends with a ``gc.collect`` that frees its Trainer's reference cycles; with the
    objects that outlive every layer frozen, it scans only that layer's (on SmolLM2 the layer's
    untimed remainder fell from 0.65 to 0.13 s, ``benchmarks/calibration_speed.py
    --per-layer-overhead``). They are handed back to the collector afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class QuantizationRun:
    """One quantization job: a layer recipe, a datamodule, Trainer arguments and a layout.

    Reads top to bottom as what a run does: ``validate`` (every check, before any heavy
    work), then ``run``: claim ``run_dir``, ``prepare`` the activation cache, ``train_layer``
    for each layer (sequentially, or in worker processes), then ``finish`` (assemble,
    export, evaluate, report).
    """

    def __init__(self, recipe: LayerRecipe, datamodule: BlockActivationDataModule,
                 trainer_kwargs: dict[str, Any], pipeline: PipelineConfig) -> None:
        self.recipe = recipe
        self.datamodule = datamodule
        # Set by the user but owned by the driver: refused by name in check_settings, never dropped silently.
        self.driver_trainer_settings = {k: trainer_kwargs[k] for k in DRIVER_TRAINER_KEYS
                                        if trainer_kwargs.get(k) not in DRIVER_TRAINER_DEFAULTS[k]}
        self.trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if k not in DRIVER_TRAINER_KEYS}
        self.pipeline = pipeline
        self.run_dir = Path(pipeline.run_dir).expanduser()
        self.artifact_dir = self.run_dir / "layers"

    def to_state(self) -> dict[str, Any]:
        """Picklable constructor arguments, to rebuild this run in a worker process."""
        accepted = inspect.signature(BlockActivationDataModule.__init__).parameters
        data = {k: v for k, v in self.datamodule.hparams.items() if k in accepted}  # drops the CLI's extras
        return {"quant": self.recipe.quant, "optim": self.recipe.optim, "data": data,
                "trainer": self.trainer_kwargs, "pipeline": self.pipeline}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "QuantizationRun":
        return cls(LayerRecipe(quant=state["quant"], optim=state["optim"]),
                   BlockActivationDataModule(**state["data"]), state["trainer"], state["pipeline"])

    # ----------------------------------------------------------- validation
    def check_settings(self) -> None:
        """Checks that need no model: one-line errors naming the field."""
        pipeline, input_mode = self.pipeline, self.datamodule.hparams.input_mode
        if pipeline.layer_parallel and input_mode == "quantized":
            raise ValueError("pipeline.layer_parallel=true needs data.input_mode='fp': "
                             "'quantized' input mode trains layers in sequence")
        if pipeline.layers is not None:
            layers = sorted(check_index_list("pipeline.layers", pipeline.layers))
            if input_mode == "quantized" and layers != list(range(layers[0], layers[-1] + 1)):
                # Layer i trains on the quantized output of the layer before it, so a gap would feed it
                # the output of a layer that is not its predecessor.
                raise ValueError(f"pipeline.layers={pipeline.layers} has gaps, which data.input_mode='quantized' "
                                 "cannot fill; list consecutive layers or use data.input_mode='fp'")
        if pipeline.eval_seq_len < 2:
            raise ValueError(f"pipeline.eval_seq_len={pipeline.eval_seq_len} must be >= 2")
        for name in ("eval_windows", "statistics_samples"):
            value = getattr(pipeline, name)
            if value is not None and value < 1:
                raise ValueError(f"pipeline.{name}={value} must be >= 1 (or null for all)")
        if pipeline.eval_split not in WIKITEXT_SPLITS:
            raise ValueError(f"pipeline.eval_split={pipeline.eval_split!r} is not one of {sorted(WIKITEXT_SPLITS)}")
        if pipeline.export_head not in STORED_HEADS:
            raise ValueError(f"pipeline.export_head={pipeline.export_head!r} is not one of {STORED_HEADS}")
        self.check_trainer()
        self.recipe.optim.validate()
        self.datamodule.check_sources(eval_splits=[pipeline.eval_split])
        check_writable_directory(self.run_dir, "pipeline.run_dir")
        if pipeline.export_dir is not None:
            check_writable_directory(pipeline.export_dir, "pipeline.export_dir")

    def check_trainer(self) -> None:
        """Trainer settings the pipeline cannot honor, or that would train nothing."""
        for key, value in self.driver_trainer_settings.items():
            raise ValueError(f"trainer.{key}={value!r} is not supported: {DRIVER_TRAINER_REASONS[key]}; remove it")
        check_trainer_devices(self.trainer_kwargs)
        count = named_device_count(self.trainer_kwargs)
        if count is not None and count > 1 and not self.pipeline.layer_parallel:
            raise ValueError(f"trainer.devices={self.trainer_kwargs['devices']!r} names {count} devices, but each "
                             "layer trains on one; set pipeline.layer_parallel=true to spread the layers over "
                             "them, or name one device")
        epochs, steps = self.trainer_kwargs.get("max_epochs"), self.trainer_kwargs.get("max_steps")
        if steps is not None and (steps == 0 or steps < -1):
            raise ValueError(f"trainer.max_steps={steps} must be >= 1 (or -1 for no limit)")
        if epochs is not None and epochs < 1 and (steps is None or steps < 1):
            raise ValueError(f"trainer.max_epochs={epochs} trains nothing; set it >= 1 (or set trainer.max_steps)")

    def check_model(self) -> None:
        """Checks against the loaded model's config, still before any heavy work."""
        model = self.datamodule.fp_model
        config = model.config
        self.recipe.quant.validate(config)
        if self.pipeline.layers is not None:
            check_index_list("pipeline.layers", self.pipeline.layers, upper=config.num_hidden_layers)
        context = getattr(config, "max_position_embeddings", None)
        for field_name, length in (("data.seq_len", self.datamodule.hparams.seq_len),
                                   ("pipeline.eval_seq_len", self.pipeline.eval_seq_len)):
            check_context(field_name, length, context)
        vocabulary, rows = len(self.datamodule.tokenizer), model.get_input_embeddings().num_embeddings
        if vocabulary > rows:  # its ids would index past the embedding table inside layer 0's cache build
            raise ValueError(f"data.model: the tokenizer has {vocabulary} tokens but the model's embedding only "
                             f"{rows} rows; the tokenizer is not this model's")
        _ = self.datamodule.windows  # drawn now, so a text too short for them fails before any work
        self.datamodule.check_cache()

    def identity(self) -> dict[str, Any]:
        """What makes a run directory this run's: model, recipe, calibration data and the trainer
        settings that change the result (``RESULT_TRAINER_KEYS``)."""
        hp = self.datamodule.hparams
        data = {k: hp[k] for k in ("calibration", "calibration_split", "n_samples", "val_samples", "seq_len",
                                   "seed", "input_mode")}
        # The windows' hash tells WikiText from a generated-text fallback or another text file.
        return {"model": hp.model, "gguf_file": hp.gguf_file,
                "config_sha256": config_hash(self.datamodule.fp_model.config),
                "weights_sha256": self.datamodule.weights_sha256,
                "windows_sha256": windows_sha256(self.datamodule.windows),
                "quant": self.recipe.quant.to_dict(), "data": data,
                "optim": {k: v for k, v in asdict(self.recipe.optim).items() if k not in SPEED_ONLY_OPTIM_FIELDS},
                "trainer": {k: self.trainer_kwargs.get(k) for k in RESULT_TRAINER_KEYS}, "layers": self.layers}

    def check_run_dir(self) -> bool:
        """Whether ``run_dir`` already holds this run; raises if it holds another one."""
        path = self.run_dir / "run.json"
        if not path.is_file():
            return False
        stored = json.loads(path.read_text())
        wanted = json.loads(json.dumps(self.identity(), default=str))
        differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if differing:
            raise ValueError(f"pipeline.run_dir={self.run_dir} holds another run (differs in: "
                             f"{', '.join(differing)}); choose another run_dir or delete it")
        return True

    def claim_run_dir(self) -> None:
        """Record this run's identity in ``run_dir/run.json`` (after ``check_run_dir``)."""
        if not self.check_run_dir():
            write_text_atomic(self.run_dir / "run.json", json.dumps(self.identity(), indent=2, default=str))

    @property
    def layers(self) -> list[int]:
        count = self.datamodule.fp_model.config.num_hidden_layers
        return list(range(count)) if self.pipeline.layers is None else sorted(set(self.pipeline.layers))

    # ------------------------------------------------------------- training
    def prepare(self) -> None:
        """Open (or build) the activation cache, holding its readers' lock for this run."""
        self.datamodule.prepare_data()

    def _checkpoint_dir(self, layer_index: int) -> Path:
        return self.run_dir / "checkpoints" / f"layer_{layer_index:03d}"

    def _trainer(self, layer_index: int, worker: WorkerInfo) -> L.Trainer:
        layer_dir = self._checkpoint_dir(layer_index)
        name = f"layer_{layer_index:03d}"
        kwargs = dict(self.trainer_kwargs)
        kwargs.update(worker.trainer_overrides())
        if kwargs.get("num_sanity_val_steps") is None:
            # Unset: no sanity pass. on_train_start's initial validation MSE runs the same batches a step later.
            kwargs["num_sanity_val_steps"] = 0
        return L.Trainer(
            **kwargs,
            default_root_dir=str(layer_dir),
            callbacks=[
                RotationInitCallback(self.pipeline.statistics_samples),
                WeightQuantizerInitCallback(),
                # A "link" last.ckpt is repointed only after the new epoch file is fully
                # written, so a kill mid-save leaves it on the previous complete one.
                ModelCheckpoint(dirpath=str(layer_dir), filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                save_last="link", save_top_k=1, every_n_epochs=1, enable_version_counter=False),
                FoldExportCallback(self.artifact_dir),
            ],
            logger=[CSVLogger(str(self.run_dir / "logs"), name=name, version=""),
                    TensorBoardLogger(str(self.run_dir / "logs"), name=name, version="tensorboard")],
        )

    def _last_checkpoint(self, layer_index: int) -> Path | None:
        path = self._checkpoint_dir(layer_index) / "last.ckpt"
        if not path.is_file():
            return None
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 — any unreadable checkpoint is restarted
            log.warning("checkpoint %s is unreadable (%s); layer %d restarts", path, error, layer_index)
            path.unlink()
            return None
        return path

    def layer_done(self, layer_index: int) -> bool:
        try:
            return read_layer_artifact(self.artifact_dir, layer_index) is not None
        except ValueError as error:
            log.warning("%s; layer %d is trained again", error, layer_index)
            return False

    def train_layer(self, layer_index: int, worker: WorkerInfo, input_path: Path | None = None) -> bool:
        """Train, fold and export one layer (resuming it if a checkpoint exists); False if it was already done."""
        if self.layer_done(layer_index):
            log.info("layer %d: artifact present, skipped", layer_index)
            self._drop_checkpoints(layer_index)
            return False
        model = self.datamodule.fp_model
        L.seed_everything(self.datamodule.hparams.seed + layer_index, verbose=False)
        module = self.recipe.module(layer_index)
        module.attach_source(model.model.layers[layer_index], model.config, model.model.rotary_emb)
        self.datamodule.select_layer(layer_index, input_path)
        trainer = self._trainer(layer_index, worker)
        checkpoint = self._last_checkpoint(layer_index)
        total = len(self.layers)
        log.info("layer %d (%d of %d): %s", layer_index, self.layers.index(layer_index) + 1, total,
                 f"resuming from {checkpoint}" if checkpoint else "training")
        started = time.perf_counter()
        try:
            trainer.fit(module, datamodule=self.datamodule, ckpt_path=checkpoint)
        except SystemExit:
            if not trainer.interrupted:
                raise
            # Lightning turned Ctrl-C into a graceful stop and exit(1), and ignores Ctrl-C from then on.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise RunInterrupted(layer_index, self.layers.index(layer_index) + 1, total) from None
        if not self.layer_done(layer_index):  # a fit resumed after its last epoch skips on_train_end
            export_block(module, self.datamodule.val_dataloader(), self.artifact_dir, trainer.global_step,
                         self.datamodule.train_dataset, self.datamodule.hparams.batch_size)
        del trainer, module
        gc.collect()  # Trainer, optimizer and module form reference cycles; free this layer now
        meta = read_layer_artifact(self.artifact_dir, layer_index)  # verified before its checkpoints go
        self._drop_checkpoints(layer_index)
        log.info("layer %d: block MSE %.4g -> %.4g in %d steps (%s state exported), %.1f s, resident memory "
                 "%.0f MiB", layer_index, meta["mse_init"], meta["mse_final"], meta["steps"],
                 meta.get("kept", "trained"), time.perf_counter() - started,
                 psutil.Process().memory_info().rss / 2**20)
        return True

    def _progress(self, total: int) -> LayerProgress:
        return LayerProgress(total, self.run_dir / "logs" / "progress.log")

    def _drop_checkpoints(self, layer_index: int) -> None:
        """Delete a finished layer's checkpoints unless ``pipeline.keep_checkpoints``: its artifact replaces them."""
        directory = self._checkpoint_dir(layer_index)
        if not self.pipeline.keep_checkpoints and directory.exists():
            shutil.rmtree(directory)

    def train_layers(self, layer_indices: list[int], worker: WorkerInfo) -> None:
        progress = self._progress(len(layer_indices))
        with _long_lived_objects_frozen():
            for layer_index in layer_indices:
                progress.update(layer_index, self.train_layer(layer_index, worker))

    def train_sequential_quantized(self, worker: WorkerInfo) -> None:
        """``quantized`` input mode: layer ``i`` reads the outputs of folded layers ``< i``."""
        with _long_lived_objects_frozen():
            self._train_sequential_quantized(worker)

    def _train_sequential_quantized(self, worker: WorkerInfo) -> None:
        manifest = self.datamodule.manifest
        input_path: Path | None = None
        progress = self._progress(len(self.layers))
        for position, layer_index in enumerate(self.layers):
            trained = self.train_layer(layer_index, worker, input_path)
            if position == len(self.layers) - 1:
                progress.update(layer_index, trained)
                break  # the last layer's quantized output feeds no layer
            block = self._folded_block(layer_index).to(worker.device)
            next_path = self.run_dir / "quantized_inputs" / f"boundary_{layer_index + 1:03d}.bin"
            source = manifest.boundary_path(layer_index) if input_path is None else input_path
            # Not fsynced: a rerun never trusts it, it recomputes it from the artifacts.
            write_boundary_file(next_path, self._run_block(block, source, worker.device), manifest.shape,
                                manifest.dtype, durable=False)
            if input_path is not None:
                # Every rerun recomputes these inputs from the artifacts, so only the newest is needed.
                input_path.unlink(missing_ok=True)
            input_path = next_path
            progress.update(layer_index, trained)

    def _run_block(self, block: HHDecoderBlock, source: Path, device: torch.device):
        """``block``'s outputs on the samples of boundary file ``source``, a training batch at a time
        (a folded block dequantizes its weights once per call)."""
        from .cache import BoundaryPairDataset

        manifest = self.datamodule.manifest
        dataset = BoundaryPairDataset(source, source, manifest.shape, manifest.dtype)
        batch_size = self.datamodule.hparams.batch_size
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
                yield block(x.to(device)).float().cpu()

    # ------------------------------------------------------------- assembly
    def _folded_block(self, layer_index: int) -> HHDecoderBlock:
        model = self.datamodule.fp_model
        block = HHDecoderBlock(model.model.layers[layer_index], model.config, model.model.rotary_emb,
                               self.recipe.quant, layer_index)
        return load_layer_artifact(block, self.artifact_dir)

    def assemble(self) -> torch.nn.Module:
        """The quantized model: the FP model with every trained layer replaced by its folded block.

        Works in place on the loaded FP model, so only one copy of the model is ever in memory.
        """
        model = self.datamodule.fp_model
        for layer_index in self.layers:
            if isinstance(model.model.layers[layer_index], HHDecoderBlock):
                continue
            model.model.layers[layer_index] = self._folded_block(layer_index)
        return model.eval()

    def layer_metrics(self) -> list[dict[str, Any]]:
        return [read_layer_artifact(self.artifact_dir, i, verify=False) for i in self.layers]

    # ------------------------------------------------------------------ run
    def validate(self) -> None:
        """Every check that can fail on bad input, before any heavy work or any write (one-line errors;
        ``DirectoryLocked`` for a cache another run reads)."""
        self.check_settings()
        self.check_model()
        self.check_run_dir()

    def run(self, launched: WorkerInfo | None = None, config_yaml: str | None = None) -> dict[str, Any] | None:
        """Everything after ``validate``; returns the summary (``None`` on a worker that does not assemble).

        Rank 0 holds ``run_dir``'s lock throughout: a second run on the same
        directory raises ``DirectoryLocked`` before writing anything.

        ``launched``: this process's rank under torchrun/SLURM (``launcher_worker()``);
        ``config_yaml``: the resolved configuration, saved as ``run_dir/config.yaml``.
        """
        if launched is not None and not self.pipeline.layer_parallel:
            raise ValueError("launched by torchrun/SLURM with several processes but pipeline.layer_parallel=false")
        worker = launched or WorkerInfo.single(self.trainer_kwargs)
        # Only rank 0 locks run_dir: the workers run_in_processes spawns and the other ranks of
        # a torchrun/SLURM launch are part of the holder's job and write disjoint layers.
        lock = directory_lock(self.run_dir, "pipeline.run_dir") if worker.rank == 0 else contextlib.nullcontext()
        with lock:
            return self._run(worker, launched, config_yaml)

    def _run(self, worker: WorkerInfo, launched: WorkerInfo | None, config_yaml: str | None
             ) -> dict[str, Any] | None:
        # The cache first: a run refused there (another run reads it for other settings) has claimed nothing.
        self.prepare()
        if worker.rank == 0:
            self.claim_run_dir()
            if config_yaml is not None:
                write_text_atomic(self.run_dir / "config.yaml", config_yaml)
        started = time.perf_counter()
        if self.datamodule.hparams.input_mode == "quantized":
            self.train_sequential_quantized(worker)
        elif self.pipeline.layer_parallel and launched is None:
            run_in_processes(functools.partial(QuantizationRun.from_state, self.to_state()),
                             worker.world_size_for(self.trainer_kwargs))
        else:
            self.train_layers(worker.share(self.layers), worker)
        if worker.rank != 0:
            return None
        if launched is not None:
            worker.wait_for(lambda: all(self.layer_done(i) for i in self.layers), "layer artifacts")
        return self.finish(time.perf_counter() - started)

    def finish(self, train_seconds: float) -> dict[str, Any]:
        """Assemble, export and evaluate; writes ``summary.json`` and the per-layer plot."""
        from .report import write_report

        pipeline = self.pipeline
        tokens = tokenize_text(self.datamodule.tokenizer, self.datamodule.text(pipeline.eval_split))
        results: dict[str, Any] = {"train_seconds": train_seconds}
        if pipeline.eval_fp:
            results["fp"] = asdict(perplexity(self.datamodule.fp_model, tokens, pipeline.eval_seq_len,
                                              pipeline.eval_windows))
        quantized = self.assemble()
        all_layers = len(self.layers) == self.datamodule.fp_model.config.num_hidden_layers
        if pipeline.export and not all_layers:
            log.warning("not exporting: pipeline.layers quantizes only %d layers", len(self.layers))
        elif pipeline.export:
            from .export import export_size
            from .loading import load_quantized

            export_dir = Path(pipeline.export_dir) if pipeline.export_dir else self.run_dir / "quantized"
            results["export_dir"] = str(self._export(quantized, export_dir))
            results["export_size"] = export_size(export_dir)
            # Score what ships: the export as loaded back (its embeddings are stored in 16 bits).
            quantized = load_quantized(export_dir, device=next(quantized.parameters()).device)
        results["quantized"] = asdict(perplexity(quantized, tokens, pipeline.eval_seq_len, pipeline.eval_windows))
        results["layers"] = self.layer_metrics()
        write_report(self.run_dir, results)
        return results

    def _export(self, model: torch.nn.Module, directory: Path) -> Path:
        from .export import save_quantized

        saved = save_quantized(model, directory, tokenizer=self.datamodule.tokenizer, head=self.pipeline.export_head)
        # Only now, with a complete export in place, drop what a killed export left (its staging
        # directory, or the previous export renamed aside); the run_dir lock keeps other exports out.
        for path in remove_leftovers(saved.parent, saved.name, ".tmp-", ".old-"):
            log.warning("removed %s, left by an interrupted export", path)
        return saved
