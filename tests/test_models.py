"""Model loading: local HF directories, errors, the optional real GGUF."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
CORPUS = [
    "The quick brown fox jumps over the lazy dog .",
    " = Homarus gammarus = \n",
    "Homarus gammarus , known as the European lobster , is a species of clawed lobster .",
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls on a shared 2-core box: extra OpenMP threads only spin and wait."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_model(model_type: str, vocab_size: int = 300, tie: bool = False):
    torch.manual_seed(0)
    if model_type == "llama":
        config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie, **TINY_SIZES)
        return LlamaForCausalLM(config).eval()
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=tie, **TINY_SIZES)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_load_local_directory_gives_identical_logits(tmp_path, model_type, tie):
    model, tokenizer = tiny_model(model_type, tie=tie), tiny_tokenizer()
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
    assert len(decoder_layers(loaded)) == TINY_SIZES["num_hidden_layers"]
    assert rotary_embedding(loaded) is loaded.model.rotary_emb
    assert config_hash(loaded.config) == config_hash(model.config)


@pytest.mark.parametrize("source", ["/no/such/model_dir", "./missing_dir", "~/missing_dir_hh", "missing.gguf"])
def test_missing_local_path_names_it(source):
    with pytest.raises(FileNotFoundError, match="missing|no/such"):
        load_model(source)


def test_unsupported_model_type_names_supported_ones():
    config = LlamaConfig(**TINY_SIZES)
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
