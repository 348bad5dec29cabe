"""flash-attn varlen on packed rows (issue 11): the boundaries the model path hands to a varlen attention
are the packer's own sequence lengths, and attention restricted to them gives the packed logits.

flash-attn needs CUDA, so on the CPU a stand-in registered through transformers' AttentionInterface
receives exactly the varlen arguments flash_attention_2 would, and runs sdpa causally on each
sequence's slice from them.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.nn import functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from orpo_ds import attention
from orpo_ds.batch import prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row

V = 47
SEEN: list[dict] = []


def _pairs(n, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, ids(1, 9), ids(1, 6) + (2,), ids(1, 6) + (2,)) for i in range(n)]


def varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query ``[1, H, T, D]``, key/value ``[1, H_kv, T, D]`` -> ``[1, T, H, D]``: each sequence of
    ``cu_seq_lens_q`` attends causally to itself only, as flash_attn_varlen_func does."""
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    SEEN.append({"cu": cu.clone(), "max": longest, "cu_k": kwargs["cu_seq_lens_k"], "max_k": kwargs["max_length_k"]})
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                    scale=scaling)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("orpo_varlen_test", varlen_sdpa)
AttentionMaskInterface.register("orpo_varlen_test", sdpa_mask)


@pytest.mark.parametrize("n_pairs, seed", [(1, 0), (4, 1), (7, 2)])
def test_cu_seqlens_equal_the_packers_lengths_and_what_transformers_derives(n_pairs, seed):
    row = build_row(_pairs(n_pairs, seed))
    mb = prepare_micro_batch(row, nll_on_prompt=False)
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens.diff().tolist() == row.seq_lengths.tolist()
    assert mb.max_seqlen == int(row.seq_lengths.max())
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(mb.position_ids)
    assert torch.equal(cu_q, mb.cu_seqlens) and torch.equal(cu_k, mb.cu_seqlens)
    assert int(max_q) == int(max_k) == mb.max_seqlen


def test_varlen_attention_gets_the_packers_boundaries_and_matches_sdpa(monkeypatch):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    sdpa_model = LlamaForCausalLM(cfg).float().eval()
    varlen_model = LlamaForCausalLM(copy.deepcopy(cfg)).float().eval()  # its own config: the backend is per config
    varlen_model.load_state_dict(sdpa_model.state_dict())
    varlen_model.set_attn_implementation("orpo_varlen_test")
    monkeypatch.setattr(attention, "VARLEN_ATTENTION", {"orpo_varlen_test"})
    row = build_row(_pairs(5, 3))
    mb = prepare_micro_batch(row, nll_on_prompt=False)
    SEEN.clear()
    with torch.no_grad():
        want = PolicyWithChunkedHead(sdpa_model)(**mb.model_inputs()).token_logps
        got = PolicyWithChunkedHead(varlen_model)(**mb.model_inputs()).token_logps
    assert sdpa_model.config._attn_implementation == "sdpa" and len(SEEN) == cfg.num_hidden_layers
    for call in SEEN:
        assert torch.equal(call["cu"], mb.cu_seqlens) and torch.equal(call["cu_k"], mb.cu_seqlens)
        assert call["max"] == call["max_k"] == mb.max_seqlen
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_other_backends_never_see_varlen_arguments():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, attn_implementation="orpo_varlen_test")
    model = LlamaForCausalLM(cfg).float().eval()  # registered, but not a varlen backend for the policy
    mb = prepare_micro_batch(build_row(_pairs(2)), nll_on_prompt=False)
    with pytest.raises(KeyError, match="cu_seq_lens_q"), torch.no_grad():
        PolicyWithChunkedHead(model)(**mb.model_inputs())
