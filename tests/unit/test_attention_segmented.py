"""segmented_sdpa (orpo_ds.attention) against dense masked attention: values and gradients, odd shapes,
grouped-query heads, and context segments (the prefix-sharing shape); and at model level against
transformers' own sdpa on packed rows, with no [T, T] mask built."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers.masking_utils as masking_utils
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds import attention
from orpo_ds.attention import SEGMENTED_SDPA, Segment, segmented_sdpa, segments_from_lengths
from orpo_ds.batch import prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row

V = 53


def dense_mask(segments, T):
    """The full [T, T] boolean mask the segments describe: each causal over itself, after its context."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for s in segments:
        mask[s.start:s.end, s.start:s.end] = torch.ones(s.end - s.start, s.end - s.start, dtype=torch.bool).tril()
        mask[s.start:s.end, s.context_start:s.context_end] = True
    return mask


def dense_reference(query, key, value, segments, scaling):
    """Naive twin: one [T, T] boolean mask from the segments, full softmax attention over the row."""
    mask = dense_mask(segments, query.shape[2])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2)


def _qkv(T, heads, kv_heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, T, dim, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def _prefix_shared_segments(prompt, chosen, rejected):
    """Prompt, then chosen, then rejected; both responses attend to the one prompt."""
    return (Segment(0, prompt), Segment(prompt, prompt + chosen, 0, prompt),
            Segment(prompt + chosen, prompt + chosen + rejected, 0, prompt))


CASES = [
    ("one sequence", segments_from_lengths([13]), 4, 4, 8),
    ("odd lengths, GQA", segments_from_lengths([1, 7, 2, 31, 5]), 6, 2, 5),
    ("length-1 sequences", segments_from_lengths([1, 1, 1]), 2, 1, 3),
    ("prefix sharing", _prefix_shared_segments(9, 4, 6), 4, 2, 8),
    ("two shared prefixes", _prefix_shared_segments(3, 5, 1) + tuple(
        Segment(s.start + 9, s.end + 9, s.context_start + 9 if s.context_length else 0,
                s.context_end + 9 if s.context_length else 0) for s in _prefix_shared_segments(5, 2, 7)), 3, 3, 4),
]


@pytest.mark.parametrize("name, segments, heads, kv_heads, dim", CASES, ids=[c[0] for c in CASES])
def test_segmented_sdpa_matches_dense_masked_attention_values_and_gradients(name, segments, heads, kv_heads, dim):
    T = segments[-1].end
    scaling = dim ** -0.5
    q, k, v = _qkv(T, heads, kv_heads, dim, seed=len(name))
    got, weights = segmented_sdpa(None, q, k, v, None, attention_segments=segments, scaling=scaling)
    assert weights is None and got.shape == (1, T, heads, dim)
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    want = dense_reference(q, k, v, segments, scaling)
    want_grads = torch.autograd.grad((want * upstream).sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_segmented_sdpa_refuses_what_it_cannot_do():
    q, k, v = _qkv(4, 2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="attention_segments"):
        segmented_sdpa(None, q, k, v, None)
    with pytest.raises(ValueError, match="sliding_window"):
        segmented_sdpa(None, q, k, v, None, attention_segments=segments_from_lengths([4]), sliding_window=2)


def test_auto_picks_segmented_sdpa_without_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve_attn_implementation("auto") == SEGMENTED_SDPA
    assert attention.resolve_attn_implementation("sdpa") == "sdpa"


def _pairs(n, seed):
    rng = random.Random(seed)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, ids(1, 12), ids(1, 8) + (2,), ids(1, 8) + (2,)) for i in range(n)]


def _model(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("n_pairs, seed", [(1, 0), (3, 1), (8, 2)])
def test_packed_row_through_segmented_sdpa_equals_dense_sdpa_and_builds_no_mask(monkeypatch, n_pairs, seed):
    mb = prepare_micro_batch(build_row(_pairs(n_pairs, seed)), nll_on_prompt=True)
    dense, segmented = _model("sdpa"), _model(SEGMENTED_SDPA)
    want = PolicyWithChunkedHead(dense)(**mb.model_inputs()).token_logps
    want.sum().backward()

    def no_mask(*args, **kwargs):
        raise AssertionError("segmented_sdpa must not build a mask or search the position ids for sequences")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_mask)
    monkeypatch.setattr(masking_utils, "sdpa_mask", no_mask)
    got = PolicyWithChunkedHead(segmented)(**mb.model_inputs()).token_logps
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(segmented.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_saved_model_config_does_not_name_segmented_sdpa(tmp_path):
    """A trained model must load in plain transformers, where segmented_sdpa is not registered."""
    _model(SEGMENTED_SDPA).save_pretrained(tmp_path)
    assert SEGMENTED_SDPA not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_fused_gqa_equals_repeated_heads():
    """enable_gqa (what segmented_sdpa uses) against heads repeated by hand, in float32 on odd shapes."""
    q, k, v = (t.detach().float() for t in _qkv(11, 6, 3, 7, seed=5))
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_auto_picks_flash_attention_only_for_half_precision(monkeypatch):
    """Issue 34 item 2: with flash-attn and CUDA present, ``auto`` chose flash_attention_2 for fp32 runs too,
    which flash-attn's kernels refuse at the first forward."""
    import importlib.util

    from orpo_ds.config import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real_find_spec(name, *a))
    resolve = attention.resolve_attn_implementation
    assert resolve("auto", dtype=torch.bfloat16) == resolve("auto", dtype=torch.float16) == "flash_attention_2"
    assert resolve("auto", dtype=torch.float32) == SEGMENTED_SDPA
    assert resolve("auto", dtype=torch.bfloat16, share_prompt=True) == SEGMENTED_SDPA
    assert resolve("flash_attention_2", dtype=torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2: it has no torch.float32 kernel"):
        resolve("flash_attention_2", dtype=torch.float32)


def test_masked_attention_with_kv_expanded_equals_grouped_heads():
    """Issue 34 item 4: on CUDA the masked call repeats each KV head over its query group, so that sdpa's
    memory-efficient kernel qualifies; the result must equal the grouped-head call, values and gradients."""
    torch.manual_seed(0)
    q = torch.randn(1, 6, 5, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(2))
    mask = torch.rand(5, 9) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    grouped = attention.masked_attention(q, k, v, mask, dropout=0.0, scale=None, expand_kv=False)
    grads = torch.autograd.grad(grouped.square().sum(), (q, k, v))
    expanded = attention.masked_attention(q, k, v, mask, dropout=0.0, scale=None, expand_kv=True)
    torch.testing.assert_close(expanded, grouped, rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(expanded.square().sum(), (q, k, v)), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
