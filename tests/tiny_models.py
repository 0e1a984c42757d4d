"""Tiny random Qwen2 and Llama models built from configs in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TINY_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(model_type: str, attn_implementation: str = "sdpa", **overrides):
    sizes = {**TINY_SIZES, "tie_word_embeddings": True, **overrides}
    if model_type == "qwen2":
        config = Qwen2Config(**sizes)
    elif model_type == "llama":
        config = LlamaConfig(**sizes)
    else:
        raise ValueError(model_type)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A random fp32 model whose norms and biases are not trivial (so folding is exercised).

    Its embeddings, lm_head and final norm hold bf16 values, as a bf16 checkpoint
    loaded in fp32 does, so the export stores them in 16 bits without loss.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, attn_implementation, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
            if not name.startswith("model.layers."):
                parameter.copy_(parameter.bfloat16().float())
    return model.eval()


SHARED_WIKITEXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
WIKITEXT_WORDS = ("the lobster species coast sea river city war army king church music song film album game "
                  "season team player record year century island ship station road bridge school village "
                  "was is had were became played released built named known found described moved won "
                  "in of and to a on at with by from for as after during its their first second new large "
                  "small north south east west early late famous several many , . @-@ ( )").split()


def _generated_wikitext(directory: Path) -> Path:
    """A small text in WikiText-2 raw's layout (titles, blank lines, paragraphs), for clones without it.

    Deterministic: the same words in the same order on every machine.
    """
    import random

    generator = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, articles in (("valid", 24), ("test", 24)):
        lines = [" \n"]
        for article in range(articles):
            title = " ".join(generator.choice(WIKITEXT_WORDS[:40]).title() for _ in range(2))
            lines += [f" = {title} {split} {article} = \n", " \n"]
            for _ in range(3):
                words = [generator.choice(WIKITEXT_WORDS) for _ in range(generator.randint(40, 90))]
                lines += [" " + " ".join(words) + " . \n", " \n"]
        (directory / f"wiki.{split}.raw").write_text("".join(lines), encoding="utf-8")
    return directory


def _wikitext_dir() -> Path:
    """The real WikiText-2 raw beside the checkout, else a generated stand-in (built once per process)."""
    if all((SHARED_WIKITEXT_DIR / f"wiki.{split}.raw").is_file() for split in ("valid", "test")):
        return SHARED_WIKITEXT_DIR
    import atexit
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="hh_lightning_wikitext_"))
    atexit.register(shutil.rmtree, directory, True)
    return _generated_wikitext(directory / "wikitext-2-raw")


# Tests that need a WikiText-2 directory always get one: the pipeline tests run on any clone.
WIKITEXT_DIR = _wikitext_dir()
TOKENIZER_CORPUS = [
    " = Homarus gammarus = \n",
    " Homarus gammarus , known as the European lobster or common lobster , is a species of clawed lobster "
    "from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . \n",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in code (no download); WikiText valid lines when present."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = TOKENIZER_CORPUS
    valid = WIKITEXT_DIR / "wiki.valid.raw"
    if valid.is_file():
        corpus = valid.read_text(encoding="utf-8").splitlines()[:400]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def save_tiny_checkpoint(directory: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random model and its tokenizer saved as a local Hugging Face directory."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(model_type, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
