"""A trained layer's artifact: the folded block on disk, written last and verified before it is trusted.

``layers/layer_NNN.safetensors`` holds the folded block (bit-packed codes,
as in the export); ``layer_NNN.json``, written after it by rename, holds the
layer's metrics and the weights' size and sha256, so a present ``.json``
means a complete artifact. The pipeline treats a layer as done exactly when
``read_layer_artifact`` vouches for it, and assembles the model from them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .block import HHDecoderBlock
from .export_format import pack_codes, unpack_codes
from .files import atomic_write_path, file_record, verify_file_record, write_json_atomic
from .linear import FoldedLinear
from .module import HHBlockModule, block_mse

log = logging.getLogger(__name__)


def artifact_paths(directory: Path, layer_index: int) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths of a layer's folded artifact."""
    stem = directory / f"layer_{layer_index:03d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def pack_block_codes_(block: HHDecoderBlock) -> HHDecoderBlock:
    """Replace every folded linear's codes by their packed 1-D bytes (in place), e.g. before saving."""
    for module in block.linears.values():
        if isinstance(module, FoldedLinear) and module.codes is not None and module.codes.dim() == 2:
            module.codes = pack_codes(module.codes, module.bits)
    return block


def unpack_block_codes_(block: HHDecoderBlock) -> HHDecoderBlock:
    """Inverse of ``pack_block_codes_``: codes back to ``(out, in)`` uint8 (in place)."""
    for module in block.linears.values():
        if isinstance(module, FoldedLinear) and module.codes is not None and module.codes.dim() == 1:
            module.codes = unpack_codes(module.codes, module.bits, (module.out_features, module.in_features))
    return block


def write_layer_artifact(folded_block: HHDecoderBlock, directory: Path, metrics: dict[str, Any]) -> Path:
    """Save a folded block atomically: weights first, then the metadata that vouches for them.

    The metadata (written last, by rename) holds the weights' size and sha256,
    so a present metadata file means a complete, verifiable artifact. Codes
    are stored bit-packed, as in the export.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = artifact_paths(directory, folded_block.layer_idx)
    try:
        with atomic_write_path(weights_path) as temporary:
            save_model(pack_block_codes_(folded_block), str(temporary))
    finally:
        unpack_block_codes_(folded_block)
    meta = {**metrics, "layer": folded_block.layer_idx, "quant": folded_block.quant.to_dict(),
            **file_record(weights_path)}
    write_json_atomic(meta_path, meta)
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
    if verify:
        verify_file_record(weights_path, meta)
    return meta


def load_layer_artifact(block: HHDecoderBlock, directory: Path) -> HHDecoderBlock:
    """Fold ``block`` (fixing buffer shapes) and load its saved artifact into it."""
    weights_path, _ = artifact_paths(directory, block.layer_idx)
    pack_block_codes_(block.fold_(codes_from_file=True))  # the packed shapes the file holds
    load_model(block, str(weights_path))
    return unpack_block_codes_(block)


# The states a trained layer may ship, in order of preference on a tie.
SHIPPABLE_STATES = ("trained", "initial", "fixed")


def export_block(pl_module: HHBlockModule, val_loader: Any, artifact_dir: Path, steps: int,
                 train_dataset: Any = None, batch_size: int = 1) -> Path:
    """Fold, measure and save one trained block; returns the metadata path.

    The block exported is whichever of its trained, initial and fixed states has the lowest error on
    the held-out windows (``keep_best_state_``), so training never ships a layer worse than where it
    started or than the fixed rotation alone. The errors are ``optim.loss`` (MSE by default).
    ``train_dataset`` (``(x, y)`` pairs): the calibration inputs whose statistics GPTQ
    rounding folds with (``quant.w_rounding='gptq'``; unused otherwise), ``batch_size`` windows
    at a time: the PCA init's (``RotationInitCallback``), so a resumed fit folds with the same sums.
    """
    block = pl_module.block
    block.eval()
    statistics = None
    if block.quant.w_rounding == "gptq":
        if train_dataset is None:
            raise ValueError("quant.w_rounding='gptq' needs the calibration inputs (train_dataset)")
        cached = pl_module.calibration_statistics
        statistics = (cached[1] if cached is not None and cached[0] == len(train_dataset)
                      else dataset_statistics(block, train_dataset, device=pl_module.device, batch_size=batch_size))
    pl_module.calibration_statistics = None  # the fold is their last use; free them (d × d float64 each)
    kept, mse = keep_best_state_(pl_module, val_loader)
    if not math.isfinite(mse[kept]):
        raise FloatingPointError(f"layer {pl_module.layer_index}: validation MSE is {mse[kept]}; not exporting")
    if not block.quant.train_weights_quantized:
        # Trained against unquantized weights: they ship quantized, on grids set for the rotations kept.
        pl_module.quantize_weights_in_training_(True)
        block.initialize_weight_quantizers()
    folded = copy.deepcopy(block).fold_(statistics)
    mse_folded = block_mse(folded, val_loader, pl_module.device, pl_module.optim.loss)
    metrics = {"mse_init": float(pl_module.mse_init), "mse_trained": mse["trained"], "mse_final": mse[kept],
               "mse_fixed": mse.get("fixed"), "mse_folded": mse_folded, "kept": kept, "steps": int(steps)}
    return write_layer_artifact(folded.cpu(), artifact_dir, metrics)


def trained_mse(pl_module: HHBlockModule, val_loader: Any) -> float:
    """The held-out MSE of the trained block, unfolded, with its rotations rounded as they ship.

    The last validation epoch measured this state in this form (``pl_module.shipped_val_mse``) unless a
    step came after it or it saw fewer batches (``trainer.limit_val_batches``); then it is measured here.
    """
    block = pl_module.block.round_rotations_()
    measured = pl_module.shipped_val_mse
    if measured is not None and measured[:2] == (pl_module.global_step, len(val_loader)):
        return measured[2]
    return block_mse(block, val_loader, pl_module.device, pl_module.optim.loss)


def _set_state_(pl_module: HHBlockModule, name: str, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` in the block as it would ship, rotations rounded; the fixed start (built with
    unclipped weight grids) gets the weight grids the fit would have given it."""
    pl_module.load_trainable_state_(state)
    pl_module.block.round_rotations_()
    if name == "fixed":
        pl_module.block.initialize_weight_quantizers()


def keep_best_state_(pl_module: HHBlockModule, val_loader: Any) -> tuple[str, dict[str, float]]:
    """Leave the block in whichever state it may ship has the lowest MSE on ``val_loader``.

    The states (``SHIPPABLE_STATES``): ``trained``; ``initial``, where training started (e.g. the PCA
    init), measured before the first step (``pl_module.mse_init``); and ``fixed``, the block as built
    before any data reached it (for a Hadamard structure, the fixed randomized Hadamard alone, with the
    weight grids the fit sets), so no layer ships worse than the fixed rotation alone. All are measured
    alike, unfolded with the rotations rounded as they ship; a state equal to one already measured is
    not measured again, and ties keep the earlier state. Returns ``(kept, {state: MSE})``; modules
    without a recorded initial or fixed state (checkpoints from older versions) weigh what they hold.
    """
    mse: dict[str, float] = {"trained": trained_mse(pl_module, val_loader)}  # rounds the block as it ships
    states = {"trained": pl_module.trainable_state(), "initial": pl_module.initial_state,
              "fixed": pl_module.fixed_state}
    shipped = [("trained", states["trained"])]  # each state measured, in the form it ships
    for name in ("initial", "fixed"):
        if states[name] is None:
            continue
        _set_state_(pl_module, name, states[name])
        form = pl_module.trainable_state()
        same = next((other for other, other_form in shipped if _same_state(form, other_form)), None)
        if same is not None:
            mse[name] = mse[same]
        else:
            mse[name] = (float(pl_module.mse_init) if name == "initial"
                         else block_mse(pl_module.block, val_loader, pl_module.device, pl_module.optim.loss))
            shipped.append((name, form))
    finite = {name: value if math.isfinite(value) else math.inf for name, value in mse.items()}
    kept = min(finite, key=lambda name: (finite[name], SHIPPABLE_STATES.index(name)))
    _set_state_(pl_module, kept, states[kept])
    if kept != "trained":
        log.warning("layer %d: training raised the held-out block MSE above the %s state's (%.4g > %.4g); "
                    "exporting that state", pl_module.layer_index, kept, mse["trained"], mse[kept])
    return kept, mse


def _same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def dataset_statistics(block: HHDecoderBlock, dataset: Any, count: int | None = None,
                       device: torch.device | str = "cpu", batch_size: int = 1) -> dict[str, list[torch.Tensor]]:
    """``block.collect_statistics`` over the inputs ``x`` of the first ``count`` ``(x, y)`` pairs of ``dataset``
    (``None``: all), each ``x`` of shape ``(seq_len, hidden)``, run ``batch_size`` windows at a time.

    The sums' float rounding depends on ``batch_size``, so every caller that must reproduce
    another's statistics (a resumed fit's GPTQ fold) passes the same one.
    """
    count = len(dataset) if count is None else min(count, len(dataset))
    statistics = None
    for start in range(0, count, batch_size):
        x = torch.stack([dataset[index][0] for index in range(start, min(start + batch_size, count))])
        statistics = block.collect_statistics(x.to(device), statistics)
    return statistics
