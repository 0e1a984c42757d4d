"""datamodule.py: windows, the cache it holds, and the batches a layer trains on."""

from __future__ import annotations

import pytest
import torch
from tiny_models import WIKITEXT_DIR, save_tiny_checkpoint

from hh_lightning.cache import activation_cache_reader
from hh_lightning.datamodule import (
    IN_MEMORY_PREFIX,
    BlockActivationDataModule,
    EpochSeededSampler,
)
from hh_lightning.files import FileLock
from hh_lightning.models import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("datamodule") / "tiny", "qwen2")


def _datamodule(model_dir, tmp_path, **overrides) -> BlockActivationDataModule:
    settings = dict(model=str(model_dir), data_dir=str(WIKITEXT_DIR), n_samples=4, val_samples=2, seq_len=16,
                    batch_size=3, cache_dir=str(tmp_path / "cache"))
    return BlockActivationDataModule(**{**settings, **overrides})


@pytest.mark.parametrize("length", [1, 5, 16])
def test_epoch_seeded_sampler_is_a_permutation_fixed_by_seed_and_epoch(length) -> None:
    sampler = EpochSeededSampler(length, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(length)) and list(sampler) == first
    sampler.set_epoch(1)
    again = EpochSeededSampler(length, seed=3)
    again.set_epoch(1)
    assert list(sampler) == list(again)  # a resumed epoch sees the same order
    if length > 4:
        assert list(sampler) != first


def test_layer_batches_pair_boundaries_and_keep_validation_apart(model_dir, tmp_path) -> None:
    datamodule = _datamodule(model_dir, tmp_path)
    datamodule.select_layer(1)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    hidden = datamodule.fp_model.config.hidden_size
    assert x.shape == (3, 16, hidden) and y.shape == (3, 16, hidden)
    assert len(datamodule.train_dataset) == 4 and len(datamodule.val_dataset) == 2
    assert set(datamodule.train_dataset.indices).isdisjoint(datamodule.val_dataset.indices)
    # Layer 1 reads boundary 1 and is trained towards boundary 2: the FP layer maps one to the other.
    with torch.no_grad():
        windows = datamodule.windows[datamodule.train_dataset.indices[0]][None]
        hidden_states = datamodule.fp_model(windows, output_hidden_states=True).hidden_states
    assert torch.allclose(datamodule.train_dataset[0][0], hidden_states[1][0].bfloat16().float())


def test_the_datamodule_holds_its_cache_readers_lock(model_dir, tmp_path) -> None:
    datamodule = _datamodule(model_dir, tmp_path)
    datamodule.prepare_data()
    writer = FileLock(activation_cache_reader(datamodule.cache_path).path)
    assert not writer.acquire(blocking=False)  # a rebuild would wait for this reader
    del datamodule
    import gc

    gc.collect()
    assert writer.acquire(blocking=False)
    writer.release()


def test_use_model_takes_a_loaded_model_and_names_it(model_dir, tmp_path) -> None:
    model, tokenizer = load_model(str(model_dir))
    datamodule = _datamodule(model_dir, tmp_path, model="unused")
    datamodule.use_model(model, tokenizer)
    assert datamodule.fp_model is model and datamodule.tokenizer is tokenizer
    assert datamodule.hparams.model == f"{IN_MEMORY_PREFIX}{model_dir}"
    datamodule.check_sources()  # no path to check for an in-memory model
    with pytest.raises(ValueError, match="needs its tokenizer"):
        datamodule.use_model(model, None)
