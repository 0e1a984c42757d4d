"""Calibration and evaluation text and the token windows cut from it.

Text follows GPTQ/QuaRot: ``"\\n\\n".join(rows)`` of a WikiText-2 split's
Hugging Face rows, tokenized without special tokens. Calibration windows are
drawn at random offsets (GPTQ); evaluation windows tile the text from its
start without overlap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------

WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT_HUB_CONFIG = "wikitext-2-raw-v1"
# Split name accepted from the user -> (Hugging Face split, file stem in wiki.<stem>.raw).
WIKITEXT_SPLITS = {
    "train": ("train", "train"),
    "validation": ("validation", "valid"),
    "valid": ("validation", "valid"),
    "test": ("test", "test"),
}


def _wikitext_split(split: str) -> tuple[str, str]:
    try:
        return WIKITEXT_SPLITS[split]
    except KeyError:
        raise ValueError(f"unknown WikiText split {split!r}; expected one of {sorted(WIKITEXT_SPLITS)}") from None


def wikitext_file(split: str, data_dir: str | Path | None = None) -> Path | None:
    """The local ``wiki.<split>.raw`` a split is read from (``data_dir``, else ``$HH_DATA_DIR``), or
    ``None`` when it comes from the hub."""
    _, stem = _wikitext_split(split)
    data_dir = data_dir if data_dir is not None else os.environ.get("HH_DATA_DIR") or None
    return None if data_dir is None else Path(data_dir).expanduser() / f"wiki.{stem}.raw"


def wikitext_rows(split: str, data_dir: str | Path | None = None) -> list[str]:
    """The split's rows exactly as the Hugging Face `wikitext-2-raw-v1` loader gives them.

    Source order: `data_dir`, else `$HH_DATA_DIR`, else the hub. A local
    `wiki.<split>.raw` has one row per line: each keeps its trailing newline,
    and whitespace-only lines become `""` (what the HF loader does).
    """
    hf_split, _ = _wikitext_split(split)
    path = wikitext_file(split, data_dir)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"WikiText split file not found: {path}")
        # newline="\n": split only at LF, as the original files do; no
        # translation of other line separators that may occur inside rows.
        with open(path, encoding="utf-8", newline="\n") as f:
            return [line if line.strip() else "" for line in f]
    import datasets  # heavy import, only for the hub path

    dataset = datasets.load_dataset(WIKITEXT_HUB_ID, WIKITEXT_HUB_CONFIG, split=hf_split)
    return list(dataset["text"])


def load_wikitext_text(split: str, data_dir: str | Path | None = None) -> str:
    """GPTQ-convention text of a WikiText-2 raw split: `"\\n\\n".join(rows)`.

    `split` is `"train"`, `"validation"` (or `"valid"`), or `"test"`. See
    `wikitext_rows` for where the rows come from.
    """
    return "\n\n".join(wikitext_rows(split, data_dir))


def load_text_file(path: str | Path) -> str:
    """The whole content of a local UTF-8 text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# Tokens and windows
# --------------------------------------------------------------------------


def tokenize_text(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids of `text`, 1-D int64, without special tokens (no BOS/EOS)."""
    # The whole split is far longer than model_max_length; that warning is
    # irrelevant because the ids are cut into windows afterwards.
    with _quiet_length_warning(tokenizer):
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def _quiet_length_warning(tokenizer: Any) -> Iterator[None]:
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        if saved is not None:
            tokenizer.model_max_length = int(1e30)
        yield
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


def _check_ids(token_ids: torch.Tensor, seq_len: int) -> None:
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if token_ids.numel() < seq_len:
        raise ValueError(f"text too short: {token_ids.numel()} tokens < seq_len {seq_len}")


def calibration_windows(
    token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, held_out: int = 0
) -> torch.LongTensor:
    """`n_samples` random windows of `seq_len` tokens, then `held_out` that overlap none of them.

    Returns shape `(n_samples + held_out, seq_len)`. Training start offsets are
    drawn uniformly (with replacement, as GPTQ does) from a `torch.Generator`
    seeded with `seed`, so the same inputs give the same windows. The held-out
    (validation) windows are drawn next, from the starts whose window shares
    no token with any training window, so validation measures unseen text;
    when no such start exists, a `ValueError` says which settings to change.
    """
    _check_ids(token_ids, seq_len)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    n_starts = token_ids.numel() - seq_len + 1
    starts = torch.randint(0, n_starts, (n_samples,), generator=generator)
    if held_out:
        # Start s overlaps training start t iff |s - t| < seq_len: mark those ranges with a difference array.
        marks = torch.zeros(n_starts + 1, dtype=torch.long)
        marks.index_add_(0, (starts - seq_len + 1).clamp_min(0), torch.ones_like(starts))
        marks.index_add_(0, (starts + seq_len).clamp_max(n_starts), -torch.ones_like(starts))
        free = (marks.cumsum(0)[:n_starts] == 0).nonzero().squeeze(1)
        if free.numel() == 0:
            raise ValueError(f"the calibration text ({token_ids.numel()} tokens) leaves no window of seq_len="
                             f"{seq_len} tokens outside the n_samples={n_samples} training windows, so validation "
                             "would score training text; use a longer text, or fewer or shorter windows")
        starts = torch.cat([starts, free[torch.randint(0, free.numel(), (held_out,), generator=generator)]])
    offsets = torch.arange(seq_len)
    return token_ids[starts[:, None] + offsets[None, :]].long()


def evaluation_windows(
    token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None
) -> torch.LongTensor:
    """Non-overlapping windows from the start, shape `(n, seq_len)` (GPTQ convention).

    `n = len(token_ids) // seq_len`, capped at `max_windows`; the tail shorter
    than a window is dropped.
    """
    _check_ids(token_ids, seq_len)
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    return token_ids[: n_windows * seq_len].reshape(n_windows, seq_len).long()
