"""Model loading: local HF directories, errors, the optional real GGUF."""

from __future__ import annotations

import time

import pytest
import tiny_models
import torch

from hh_lightning.models import (
    SMOLLM2_GGUF_NAME,
    SUPPORTED_MODEL_TYPES,
    check_supported,
    config_hash,
    decoder_layers,
    default_cache_dir,
    load_model,
    rotary_embedding,
)

VOCAB_SIZE = 300


def tiny_model(model_type: str, tie: bool = False):
    return tiny_models.tiny_model(model_type, vocab_size=VOCAB_SIZE, tie_word_embeddings=tie)


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_load_local_directory_gives_identical_logits(tmp_path, model_type, tie):
    model, tokenizer = tiny_model(model_type, tie=tie), tiny_models.tiny_tokenizer(VOCAB_SIZE)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    assert loaded.config.model_type == model_type
    ids = torch.tensor([loaded_tokenizer("the European lobster", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert len(decoder_layers(loaded)) == tiny_models.TINY_SIZES["num_hidden_layers"]
    assert rotary_embedding(loaded) is loaded.model.rotary_emb
    assert config_hash(loaded.config) == config_hash(model.config)


@pytest.mark.parametrize("source", ["/no/such/model_dir", "./missing_dir", "~/missing_dir_hh", "missing.gguf"])
def test_missing_local_path_names_it(source):
    with pytest.raises(FileNotFoundError, match="missing|no/such"):
        load_model(source)


def test_unsupported_model_type_names_supported_ones():
    config = tiny_models.tiny_config("llama")
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="'gpt2'.*llama, qwen2"):
        check_supported(config)
    check_supported(tiny_model("qwen2").config)
    assert SUPPORTED_MODEL_TYPES == ("llama", "qwen2")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HH_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HH_CACHE_DIR")
    assert default_cache_dir().name == "hh_lightning"


@pytest.mark.slow
def test_real_smollm2_gguf_loads():
    path = default_cache_dir() / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} not fetched (hh_lightning.models.fetch_smollm2_gguf)")
    started = time.perf_counter()
    model, tokenizer = load_model(str(path))
    print(f"GGUF load: {time.perf_counter() - started:.1f} s")
    assert model.config.model_type == "llama"
    assert len(decoder_layers(model)) == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_id).strip() == "Paris"
