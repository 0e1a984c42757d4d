"""Tiny saved hh_lightning exports with a tokenizer: W4A4KV4 (rotations, Qwen2) and HQQ W3 g16 (Llama)."""

from __future__ import annotations

from pathlib import Path

from test_export import _w4a4_model
from tiny_models import tiny_model, tiny_tokenizer

from hh_lightning.export import save_quantized
from hh_lightning.weight_only import quantize_weights_hqq

EXPORT_KINDS = ("w4a4kv4", "hqq-w3-g16")


def save_tiny_export(kind: str, directory: Path, chat_template: str | None = None) -> Path:
    """Save the ``kind`` export (one of ``EXPORT_KINDS``) and its tokenizer (with ``chat_template``,
    when given) to ``directory``."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = chat_template
    if kind == "w4a4kv4":
        model = _w4a4_model("qwen2", vocab_size=len(tokenizer))
    elif kind == "hqq-w3-g16":
        model = quantize_weights_hqq(tiny_model("llama", vocab_size=len(tokenizer)), bits=3, group_size=16)
    else:
        raise ValueError(kind)
    return save_quantized(model, directory, tokenizer=tokenizer)
