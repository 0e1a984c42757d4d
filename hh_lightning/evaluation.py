"""Perplexity in the GPTQ/QuaRot/FlatQuant convention.

Non-overlapping windows of `seq_len` tokens from the start of the tokenized
text (the tail shorter than a window is dropped), each scored independently,
and `ppl = exp(mean NLL)` over every predicted token (`seq_len - 1` per window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import SumMetric
from tqdm.auto import tqdm

from hh_lightning.text import evaluation_windows


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float  # nats per predicted token
    n_tokens: int  # predicted tokens: n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on 1-D `token_ids`, on the model's device.

    Windows come from `evaluation_windows(token_ids, seq_len, max_windows)`,
    run in batches of `batch_size`. Log-probabilities are taken in float32
    whatever the model's dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to predict any token, got {seq_len}")
    windows = evaluation_windows(token_ids, seq_len, max_windows)
    device = next(model.parameters()).device
    # torchmetrics.text.Perplexity takes softmax then log of the full-vocab
    # probabilities (an extra (tokens, vocab) copy, and log(0) for very unlikely
    # tokens); summing float32 cross entropy into float64 aggregators avoids both.
    nll_sum = SumMetric().set_dtype(torch.float64)
    token_count = SumMetric().set_dtype(torch.float64)

    was_training = model.training
    model.eval()
    try:
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            input_ids = windows[start : start + batch_size].to(device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits
            # Token t predicts token t + 1; the last position predicts nothing.
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
            )
            nll_sum.update(nll.detach().cpu().double())
            token_count.update(torch.tensor(float(input_ids[:, 1:].numel()), dtype=torch.float64))
            del logits
    finally:
        model.train(was_training)

    n_tokens = int(token_count.compute().item())
    nll_mean = float(nll_sum.compute().item()) / n_tokens
    return PerplexityResult(
        ppl=float(torch.tensor(nll_mean, dtype=torch.float64).exp().item()),
        nll_mean=nll_mean,
        n_tokens=n_tokens,
        n_windows=int(windows.shape[0]),
        seq_len=seq_len,
    )
