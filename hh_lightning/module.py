"""The LightningModule that trains one decoder block against its full-precision output."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from .block import BlockQuantConfig, HHDecoderBlock
from .quantizers import WeightQuantizer


CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BlockLoss = Literal["mse", "token_relative"]
BLOCK_LOSSES: tuple[str, ...] = ("mse", "token_relative")
# OptimConfig fields that change speed, not what a layer learns: left out of a run directory's identity.
SPEED_ONLY_OPTIM_FIELDS = ("compile",)
# How many values of each tensor copied from the FP layer a checkpoint keeps to recognize that layer.
SOURCE_FINGERPRINT_VALUES = 1024


def source_fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """``SOURCE_FINGERPRINT_VALUES`` evenly strided values of ``tensor``, flattened, on the CPU.

    Values, not a sum: no arithmetic, so no rounding that depends on the thread count, and another
    model or layer differs in them.
    """
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SOURCE_FINGERPRINT_VALUES)
    return flat[::step][:SOURCE_FINGERPRINT_VALUES].cpu().clone()


@dataclass
class OptimConfig:
    """AdamW with three parameter groups, an optional linear warm-up, and a cosine decay to ``lr · min_lr_ratio``.

    Defaults follow FlatQuant's recipe: reflections at ``lr_transforms``, clip ratios at
    ``lr_clips``, smoothing scales at ``lr_smoothing`` (by default the reflections' lr). The reflection vectors are kept at
    norm ``√d`` (``rotation.normalize_vectors``), so an AdamW step of size ``lr`` turns a
    reflection by about ``lr`` radians whatever the rotation's dimension, and AdamW's
    update does not depend on the loss's scale: one lr serves blocks of any width and
    activation scale.

    Args:
        loss: what each step minimizes, and what validation and the keep-the-best rule at export
            measure: ``mse``, the mean squared error of the block's output against the FP
            model's, or ``token_relative``, each token's squared error divided by the FP output
            token's mean square, so the few tokens with massive activations do not outweigh
            the rest (the next block reads each token through its RMSNorm).
        lr_transforms: peak learning rate of the rotations' reflections (>= 0), and of the
            smoothing scales while ``lr_smoothing`` is ``null``.
        lr_clips: peak learning rate of the weight and activation clip ratios (>= 0).
        lr_smoothing: peak learning rate of the smoothing log-scales (``quant.smoothing``), >= 0;
            ``null`` takes ``lr_transforms``. A log-scale is not an angle: an AdamW step of size
            ``lr`` changes the scale by about a factor ``e^lr``, so at the rotations' 0.005 a
            48-step fit moves no scale by more than about 12%.
        weight_decay: AdamW weight decay (>= 0).
        min_lr_ratio: the cosine schedule ends at ``lr · min_lr_ratio``, in (0, 1].
        betas: AdamW's two moment decays, each in [0, 1).
        compile: run the training step's block forward (and its backward) through
            ``torch.compile`` with this mode (``none``: eager; ``default``,
            ``reduce-overhead`` (CUDA graphs on a GPU), ``max-autotune``,
            ``max-autotune-no-cudagraphs``), static shapes. A speed setting: results
            agree with eager to float rounding, so it is not part of a run
            directory's identity. ``none`` by default: on the CPU, inductor took
            about 50 s to compile a tiny block's step (tests/test_module.py),
            far more than the demo's four steps take; GPU speed-ups are unmeasured.
        warmup_ratio: the share of each layer's steps over which the lr rises linearly
            from 0 to its peak before the cosine decay, in [0, 1). AdamW's first steps are
            full-size whatever the gradient, so a warm-up keeps them from knocking a good
            PCA or Hadamard start off course.
    """

    lr_transforms: float = 5e-3
    lr_clips: float = 5e-2
    lr_smoothing: float | None = None
    weight_decay: float = 0.0
    min_lr_ratio: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    compile: CompileMode = "none"
    warmup_ratio: float = 0.0
    loss: BlockLoss = "mse"

    def learning_rates(self) -> dict[str, float]:
        """Each parameter group's peak learning rate, by ``HHDecoderBlock.parameter_groups`` name."""
        smoothing = self.lr_transforms if self.lr_smoothing is None else self.lr_smoothing
        return {"transforms": self.lr_transforms, "smoothing": smoothing, "clips": self.lr_clips}

    def optimizer(self, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.AdamW:
        """AdamW over ``groups`` (``HHDecoderBlock.parameter_groups()``), each at its peak lr, named."""
        rates = self.learning_rates()
        return torch.optim.AdamW([{"params": params, "lr": rates[name], "name": name}
                                  for name, params in groups.items()],
                                 weight_decay=self.weight_decay, betas=self.betas)

    def validate(self) -> None:
        """One-line errors naming the field: a negative lr would train the error upward."""
        if self.loss not in BLOCK_LOSSES:
            raise ValueError(f"model.optim.loss={self.loss!r} is not one of {BLOCK_LOSSES}")
        for name in ("lr_transforms", "lr_clips", "lr_smoothing", "weight_decay"):
            value = getattr(self, name)
            if name == "lr_smoothing" and value is None:
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"model.optim.{name}={value} must be a finite number >= 0")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"model.optim.min_lr_ratio={self.min_lr_ratio} must be in (0, 1]")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"model.optim.betas={tuple(self.betas)} must be two numbers in [0, 1)")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"model.optim.compile={self.compile!r} is not one of {COMPILE_MODES}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"model.optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class LayerRecipe:
    """What every layer of a run is trained with: the block's quantization and the optimizer.

    Args:
        quant: rotations, quantizers and their inits (``BlockQuantConfig``).
        optim: optimizer and schedule (``OptimConfig``).
    """

    quant: BlockQuantConfig = field(default_factory=BlockQuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def module(self, layer_index: int) -> "HHBlockModule":
        """The LightningModule that trains layer ``layer_index`` with this recipe."""
        return HHBlockModule(quant=self.quant, optim=self.optim, layer_index=layer_index)


def cosine_factor(step: int, total_steps: int, min_ratio: float, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr at ``step``: ``(step + 1) / (warmup_steps + 1)`` during the warm-up,
    then a cosine from 1 (at ``warmup_steps``) to ``min_ratio`` (at ``total_steps``)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_errors(prediction: torch.Tensor, target: torch.Tensor, loss: BlockLoss = "mse") -> torch.Tensor:
    """Each token's squared error, ``(...,)`` from ``(..., hidden)``: its mean over the hidden size
    (``mse``), or that divided by the target token's mean square (``token_relative``)."""
    error = (prediction - target).pow(2).mean(-1)
    if loss == "token_relative":
        error = error / target.pow(2).mean(-1).clamp_min(torch.finfo(target.dtype).tiny)
    return error


def block_loss(prediction: torch.Tensor, target: torch.Tensor, loss: BlockLoss = "mse") -> torch.Tensor:
    """The mean of ``token_errors`` over every token: the training loss, a scalar."""
    return token_errors(prediction, target, loss).mean()


@torch.no_grad()
def block_mse(block: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device | str, loss: BlockLoss = "mse") -> float:
    """Mean over all tokens of ``token_errors(block(x), y, loss)`` over ``batches``."""
    metric = MeanMetric().to(device)
    for x, y in batches:
        metric.update(token_errors(block(x.to(device)).float(), y.to(device).float(), loss).reshape(-1))
    return float(metric.compute())


class HHBlockModule(L.LightningModule):
    """Trains one ``HHDecoderBlock``: ``loss = block_loss(block_q(x), y, optim.loss)``, ``y`` the FP model's output.

    The block is built in ``configure_model`` from a source layer handed over
    with ``attach_source`` (so the module holds one layer, never the model),
    with identity rotations; callbacks then fill PCA rotations and clip ratios
    before the first step. The ``initialized`` buffer makes that a no-op on resume.

    Args:
        quant: the block's rotations and quantizers.
        optim: optimizer and schedule.
        layer_index: which decoder layer this module trains.
    """

    # Plain (not Optional) dataclass types: the CLI then names an unknown key under model.quant in
    # one line instead of reporting a failed Union. The defaults are copied, never shared.
    def __init__(self, quant: BlockQuantConfig = BlockQuantConfig(), optim: OptimConfig = OptimConfig(),
                 layer_index: int = 0) -> None:
        super().__init__()
        # Dicts from a checkpoint's hyperparameters are accepted too (load_from_checkpoint).
        quant = BlockQuantConfig() if quant is None else quant
        optim = OptimConfig() if optim is None else optim
        self.quant = BlockQuantConfig.from_dict(quant if isinstance(quant, dict) else quant.to_dict())
        self.optim = OptimConfig(**(optim if isinstance(optim, dict) else asdict(optim)))
        # Plain values only, so checkpoints load with torch.load(weights_only=True). Not sent to the loggers:
        # run.json holds the run's settings once, and each logger's per-layer YAML copy cost ~20 ms a layer.
        self.save_hyperparameters({"quant": self.quant.to_dict(), "optim": asdict(self.optim),
                                   "layer_index": layer_index}, logger=False)
        self.layer_index = layer_index
        self.block: HHDecoderBlock | None = None
        self._source: tuple[nn.Module, object, nn.Module] | None = None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mse_init", torch.full((), float("nan")))
        # The trainable values the fit starts from, so export can keep them if training made the
        # block worse; carried in the checkpoint, since a resumed fit never sees the start.
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.fixed_state: dict[str, torch.Tensor] | None = None
        self.val_mse = MeanMetric()
        # (global_step, batches, MSE) of the last validation epoch, which measures the block as it ships;
        # export reuses it when no step came after and it saw every batch (artifacts.trained_mse). Not saved:
        # a resumed fit measures again.
        self.shipped_val_mse: tuple[int, int, float] | None = None
        self._unrounded_state: dict[str, torch.Tensor] | None = None
        self._val_batches = 0
        # (windows, collect_statistics sums) of the first training windows, kept from the PCA init for the
        # GPTQ fold (RotationInitCallback); never saved: a resumed fit recomputes them, to the same bits.
        self.calibration_statistics: tuple[int, dict[str, list[torch.Tensor]]] | None = None
        self._compiled_forward = None

    def attach_source(self, layer: nn.Module, config: object, rotary_emb: nn.Module) -> None:
        """Hand over the full-precision decoder layer this module wraps."""
        self._source = (layer, config, rotary_emb)

    def configure_model(self) -> None:
        if self.block is not None:
            return
        if self._source is None:
            raise RuntimeError(f"layer {self.layer_index}: attach_source() must be called before fit")
        layer, config, rotary_emb = self._source
        self.block = HHDecoderBlock(layer, config, rotary_emb, self.quant, self.layer_index)
        # The block as built, before any data reaches it: the fixed start (for a Hadamard structure, the
        # fixed randomized Hadamard alone) that export weighs the trained block against. Rebuilt the
        # same way on resume, so never saved.
        self.fixed_state = self.trainable_state()
        self.block.train()  # copies of an eval-mode model; nothing here behaves differently in train mode

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block(hidden_states)

    def training_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block's forward as the training step runs it: compiled with ``optim.compile`` (built on first
        use, held as a function, so the module's state dict is unchanged), eager otherwise."""
        if self.optim.compile == "none":
            return self.block(hidden_states)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.block.forward, mode=self.optim.compile, dynamic=False)
        return self._compiled_forward(hidden_states)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = block_loss(self.training_forward(x).float(), y.float(), self.optim.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"layer {self.layer_index}: loss is {loss.item()} at step {self.global_step}")
        self.log("train/mse", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Validate the block as it ships (rotations rounded to quant.rotation_dtype), then put the unrounded
        # values back before anything else sees them (the checkpoint, the next step).
        self._unrounded_state = self.trainable_state()
        self.block.round_rotations_()
        self._val_batches = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_mse.update(token_errors(self.block(x).float(), y.float(), self.optim.loss).reshape(-1))
        self.log("val/mse", self.val_mse, prog_bar=True, on_epoch=True)
        self._val_batches += 1

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.shipped_val_mse = (self.global_step, self._val_batches, float(self.val_mse.compute()))
        self.load_trainable_state_(self._unrounded_state)
        self._unrounded_state = None

    def quantize_weights_in_training_(self, enabled: bool) -> None:
        """Fake-quantize the block's weights in its forward (``enabled``) or pass them through."""
        for module in self.block.modules():
            if isinstance(module, WeightQuantizer):
                module.bypass = not enabled

    def on_train_start(self) -> None:
        self.quantize_weights_in_training_(self.quant.train_weights_quantized)
        # Runs after the init callbacks' on_train_start: record where training starts from.
        # mse_init is measured as the initial state would ship (rotations rounded to quant.rotation_dtype,
        # then put back), so export compares it with the trained state without measuring it again.
        if not bool(self.initialized):
            loader = self.trainer.datamodule.val_dataloader()
            self.initial_state = self.trainable_state()
            self.mse_init.fill_(block_mse(self.block.round_rotations_(), loader, self.device, self.optim.loss))
            self.load_trainable_state_(self.initial_state)
            self.initialized.fill_(True)
            self.log("val/mse_init", self.mse_init.item())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the block's trainable values (reflections, smoothing, clip ratios), by name, and of
        the clip ratios a weight-grid init sets without training them (a symmetric grid's lower clip)."""
        return {name: parameter.detach().clone() for name, parameter in self.block.named_parameters()
                if parameter.requires_grad or ".clip_logit_" in name}

    @torch.no_grad()
    def load_trainable_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Set the block's trainable values to ``state`` (from ``trainable_state``), in place."""
        parameters = dict(self.block.named_parameters())
        for name, value in state.items():
            parameters[name].copy_(value)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.initial_state is not None:
            checkpoint["initial_trainable_state"] = self.initial_state
        state = checkpoint.get("state_dict")
        if state is not None and self.block is not None:
            # The frozen copies of the FP layer are most of a block's bytes (a 7B layer's are ~0.9 GB in fp32)
            # and configure_model builds them again from the layer: keep only a fingerprint of each.
            checkpoint["source_fingerprints"] = {name: source_fingerprint(state.pop(f"block.{name}"))
                                                 for name in self.block.source_state_names()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Absent in checkpoints written before the trained-vs-initial comparison: export then keeps the trained.
        self.initial_state = checkpoint.get("initial_trainable_state")
        fingerprints = checkpoint.get("source_fingerprints")
        if fingerprints is None or self.block is None:
            return  # older checkpoints hold the source tensors themselves
        # Called after configure_model, before the state dict loads: fill in the rebuilt tensors, once each
        # is shown to be the layer the checkpoint was trained on.
        own = self.block.state_dict()
        for name, stored in fingerprints.items():
            if name not in own or not torch.equal(source_fingerprint(own[name]), stored.cpu()):
                raise ValueError(f"layer {self.layer_index}: its checkpoint was trained on other weights "
                                 f"(block.{name} differs from the model's); resume with the model it was "
                                 f"trained on, or delete the layer's checkpoints")
            checkpoint["state_dict"][f"block.{name}"] = own[name]

    def configure_optimizers(self):
        optimizer = self.optim.optimizer(self.block.parameter_groups())
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = int(self.optim.warmup_ratio * total_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_factor(step, total_steps, self.optim.min_lr_ratio, warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
