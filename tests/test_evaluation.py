"""Perplexity against the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hh_lightning.evaluation import perplexity

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
VOCAB_SIZE, SEQ_LEN = 300, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **TINY_SIZES)).eval()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_model_loss(model, batch_size):
    token_ids = torch.randint(0, VOCAB_SIZE, (2 * SEQ_LEN + 7,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, token_ids, seq_len=SEQ_LEN, batch_size=batch_size, progress=False)

    with torch.no_grad():  # the model's own loss: mean CE over the seq_len - 1 predicted tokens
        losses = [model(w[None], labels=w[None]).loss for w in token_ids[: 2 * SEQ_LEN].view(2, SEQ_LEN)]
    expected_nll = torch.stack(losses).double().mean().item()
    assert result.n_windows == 2 and result.seq_len == SEQ_LEN
    assert result.n_tokens == 2 * (SEQ_LEN - 1)  # the 7-token tail is dropped
    assert result.nll_mean == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)


def test_perplexity_scores_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, attention_dropout=0.5, **TINY_SIZES)).train()
    token_ids = torch.randint(0, VOCAB_SIZE, (2 * SEQ_LEN,), generator=torch.Generator().manual_seed(3))
    # With dropout active two scores would differ; in eval mode they are equal and match eval-mode loss.
    first, second = (perplexity(model, token_ids, seq_len=SEQ_LEN, progress=False) for _ in range(2))
    assert model.training is True
    with torch.no_grad():
        expected_nll = torch.stack([model.eval()(w[None], labels=w[None]).loss
                                    for w in token_ids.view(2, SEQ_LEN)]).double().mean().item()
    assert first.nll_mean == second.nll_mean == pytest.approx(expected_nll, rel=1e-5)


def test_perplexity_max_windows_and_short_text(model):
    token_ids = torch.randint(0, VOCAB_SIZE, (5 * SEQ_LEN,), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, token_ids, seq_len=SEQ_LEN, max_windows=3, progress=False).n_windows == 3
    with pytest.raises(ValueError, match="seq_len 1000"):
        perplexity(model, token_ids, seq_len=1000, progress=False)
