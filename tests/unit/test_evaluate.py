"""Held-out evaluation (orpo_ds/evaluate.py) against the slow, obvious reference: padded batches, full
logits, TRL's formulas. Rows of many pairs, several rows, both layouts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.data import TokenizedPair
from orpo_ds.evaluate import evaluate_pairs, pair_stats
from orpo_ds.loss import STAT_KEYS
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import layout_for
from tests.helpers.reference import reference_step_loss

V = 61


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        attn_implementation="segmented_sdpa")).eval()


def _pairs(n, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, ids(1, 9), ids(1, 7) + (2,), ids(1, 7) + (2,)) for i in range(n)]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_metrics_equal_the_padded_full_logits_reference(share_prompt, nll_on_prompt):
    model, pairs = _model(), _pairs(11)
    got = evaluate_pairs(PolicyWithChunkedHead(model), pairs, beta=0.25, micro_batch_tokens=64,
                         nll_on_prompt=nll_on_prompt, pad_token_id=0, layout=layout_for(share_prompt))
    model.config._attn_implementation = "sdpa"  # the reference pads, with an attention mask
    with torch.no_grad():
        _, want = reference_step_loss(model, pairs, beta=0.25, nll_on_prompt=nll_on_prompt, pad_id=0)
    assert got.keys() >= want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_each_pairs_row_is_its_own_whatever_the_packing():
    """Rows of different budgets pack the pairs differently; each pair's statistics must not change."""
    policy, pairs = PolicyWithChunkedHead(_model()), _pairs(9, seed=3)
    small = pair_stats(policy, pairs, micro_batch_tokens=40, nll_on_prompt=False, pad_token_id=0)
    large = pair_stats(policy, pairs, micro_batch_tokens=400, nll_on_prompt=False, pad_token_id=0)
    assert small.shape == (9, len(STAT_KEYS))
    assert small == pytest.approx(large, rel=1e-5, abs=1e-6)
