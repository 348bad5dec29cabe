"""train.share_prompt: the prompt once per pair (SharedPromptLayout) gives the same log-probs, loss, metrics
and gradients as the two separate sequences; its attention segments and masks against brute force."""

import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.attention import Segment, backend_kwargs, segmented_sdpa
from orpo_ds.batch import micro_batch_loss, prepare_micro_batch, row_segments
from orpo_ds.config import ConfigError, config_from_dict
from orpo_ds.data import TokenizedPair
from orpo_ds.logps import IGNORE_INDEX, sequence_mean_logps
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import DEFAULT_LAYOUT, SharedPromptLayout, build_row, layout_for, schedule_epoch
from tests.unit.test_attention_segmented import dense_mask

V = 53
SHARED = SharedPromptLayout()


def _pairs(n, *, prompt=(1, 9), response=(1, 7), seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(pair_id=100 + i, prompt_ids=rand(*prompt), chosen_ids=rand(*response) + (2,),
                          rejected_ids=rand(*response) + (2,)) for i in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="segmented_sdpa")
    return LlamaForCausalLM(cfg).float().eval()


# --------------------------------------------------------------------------------------------- layout


def test_the_docstring_example():
    row = build_row([TokenizedPair(7, (11, 12), (21, 22, 2), (31, 2))], SHARED)
    assert row.input_ids.tolist() == [11, 12, 21, 22, 2, 31, 2]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert row.labels.tolist() == [12, 21, 22, 2, IGNORE_INDEX, 2, IGNORE_INDEX]
    assert row.response_mask.tolist() == [False, True, True, True, False, True, False]
    assert row.seq_id.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert (row.extra_position.tolist(), row.extra_label.tolist(), row.extra_seq.tolist()) == ([1], [31], [1])
    assert row_segments(row) == (Segment(0, 5), Segment(5, 7, 0, 2))
    mb = prepare_micro_batch(row, nll_on_prompt=False)
    # Position 1 is scored twice: the chosen 21 and the rejected 31.
    assert mb.head_positions.tolist() == [1, 2, 3, 5, 1] and mb.head_labels.tolist() == [21, 22, 2, 2, 31]
    assert mb.head_seq_id.tolist() == [0, 0, 0, 1, 1] and mb.head_is_nll.tolist() == [True] * 3 + [False] * 2
    assert mb.cu_seqlens is None and mb.num_tokens == 7 and mb.num_nll_tokens == 3
    with_prompt = prepare_micro_batch(row, nll_on_prompt=True)
    assert with_prompt.num_nll_tokens == 4  # the prompt's own target (t = 0) once, as without sharing


def test_an_empty_prompt_is_laid_out_as_two_sequences():
    pair = TokenizedPair(1, (), (5, 2), (6, 7, 2))
    shared, separate = build_row([pair], SHARED), build_row([pair], DEFAULT_LAYOUT)
    for name in ("input_ids", "position_ids", "labels", "response_mask", "seq_id", "extra_position"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(separate, name), err_msg=name)


def test_sharing_fits_more_pairs_in_a_row():
    pairs = _pairs(40, prompt=(20, 40), response=(5, 10))
    assert SHARED.num_tokens(pairs[0]) == DEFAULT_LAYOUT.num_tokens(pairs[0]) - len(pairs[0].prompt_ids)
    rows = {layout: sum(p.num_filled_rows for p in schedule_epoch(pairs, 256, 1, 1, seed=0, epoch=0, layout=layout))
            for layout in (DEFAULT_LAYOUT, SHARED)}
    assert rows[SHARED] < 0.8 * rows[DEFAULT_LAYOUT]


def visible_by_rule(pairs) -> np.ndarray:
    """Brute force from the definition: which token of the shared row may attend to which. Tokens are
    tagged (pair, part, index); a chosen token sees its prompt and the earlier chosen tokens, a rejected
    token its prompt and the earlier rejected tokens, a prompt token the earlier prompt tokens."""
    tags = [(p, part, i) for p, pair in enumerate(pairs)
            for part, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids))
            for i in range(len(ids))]
    t = len(tags)
    mask = np.zeros((t, t), dtype=bool)
    for q, (qp, qpart, qi) in enumerate(tags):
        for k, (kp, kpart, ki) in enumerate(tags):
            if qp != kp:
                continue
            if kpart == "prompt":
                mask[q, k] = qpart != "prompt" or ki <= qi
            else:
                mask[q, k] = kpart == qpart and ki <= qi
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_the_segments_give_exactly_the_mask_of_the_rules(seed):
    rng = random.Random(seed)
    pairs = _pairs(rng.randint(1, 4), prompt=(1, 5), response=(0, 4), seed=seed)
    row = build_row(pairs, SHARED)
    segments = row_segments(row)
    mask = dense_mask(segments, row.num_tokens)
    np.testing.assert_array_equal(mask.numpy(), visible_by_rule(pairs))
    # Sparsity: segmented attention evaluates each segment's [L, C + L] block, never the [T, T] of the row.
    evaluated = sum((s.end - s.start) * (s.context_length + s.end - s.start) for s in segments)
    assert evaluated < row.num_tokens ** 2 or len(pairs) == 1
    assert int(mask.sum()) <= evaluated


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_segmented_sdpa_equals_sdpa_with_the_full_mask(heads, kv_heads):
    pairs = [TokenizedPair(1, (3, 4, 5), (6, 2), (7, 8, 9, 2)), TokenizedPair(2, (3,), (2,), (2,)),
             TokenizedPair(3, (), (5, 2), (6, 2)), TokenizedPair(4, (3, 4, 5, 6, 7), (8, 9, 2), (2,))]
    row = build_row(pairs, SHARED)
    segments, t = row_segments(row), row.num_tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(1, t, heads, 8, generator=g, dtype=torch.float64)

    got, _ = segmented_sdpa(None, q, k, v, None, attention_segments=segments)
    got_grads = torch.autograd.grad((got * up).sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments, t), enable_gqa=kv_heads != heads)
    want = want.transpose(1, 2)
    want_grads = torch.autograd.grad((want * up).sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def flash_varlen_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale,
                          causal):
    """flash_attn_varlen_func's contract in torch: q ``[Tq, H, D]``, k and v ``[Tk, H_kv, D]``, sequence i
    = rows ``cu[i]:cu[i + 1]``; with ``causal`` the mask is aligned to the bottom right (query a of Lq sees
    key b of Lk when ``b <= a + Lk - Lq``), as flash-attn >= 2.1 documents."""
    assert causal and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    q_len, k_len = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    assert (max_seqlen_q, max_seqlen_k) == (int(q_len.max()), int(k_len.max()))
    outs = []
    for i in range(len(q_len)):
        qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
        ki = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
        vi = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
        lq, lk = qi.shape[1], ki.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                                   enable_gqa=qi.shape[0] != ki.shape[0]).transpose(0, 1))
    return torch.cat(outs)


def test_the_flash_varlen_branch_gathers_each_segments_keys(monkeypatch):
    """The CUDA branch of segmented_sdpa (one flash-attn varlen call) on the CPU, with a stand-in that keeps
    flash-attn's contract: the key gather and the two cu_seqlens give the full mask's attention."""
    from orpo_ds import attention

    monkeypatch.setattr(attention, "_flash_varlen", lambda: flash_varlen_stand_in)
    pairs = [TokenizedPair(1, (3, 4, 5), (6, 2), (7, 8, 9, 2)), TokenizedPair(2, (), (5, 2), (6, 2)),
             TokenizedPair(3, (3,), (2,), (2,))]
    row = build_row(pairs, SHARED)
    segments, t = row_segments(row), row.num_tokens
    plan = attention.varlen_args(segments, torch.device("cpu"))
    assert plan.cu_seqlens_q.tolist() == [0, 5, 9, 11, 13, 15, 16]
    assert plan.cu_seqlens_k.tolist() == [0, 5, 12, 14, 16, 18, 20]  # a rejected response: prompt keys, then its own
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = attention._flash_segments(q, k, v, segments, None)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments, t), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want)
    up = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * up).sum(), (q, k, v)), torch.autograd.grad((want * up).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ same numbers as without sharing


def _run(model, rows, *, beta, nll_on_prompt):
    """Per-sequence average log-probs, the summed loss, the summed stats and the gradients over ``rows``."""
    policy = PolicyWithChunkedHead(model, chunk_size=5)
    mbs = [prepare_micro_batch(row, nll_on_prompt=nll_on_prompt) for row in rows]
    g_pairs, g_nll = sum(mb.num_pairs for mb in mbs), sum(mb.num_nll_tokens for mb in mbs)
    model.zero_grad()
    seq_logps, total, stats = [], 0.0, {}
    for mb in mbs:
        token_logps = policy(**mb.model_inputs()).token_logps
        avg = sequence_mean_logps(token_logps, mb.head_seq_id, mb.num_sequences, mask=mb.head_is_response)
        seq_logps += [avg[mb.chosen_seq].detach(), avg[mb.rejected_seq].detach()]
        loss, mb_stats = micro_batch_loss(token_logps, mb, beta=beta, global_nll_tokens=g_nll, global_pairs=g_pairs)
        loss.backward()
        total += loss.item()
        for key, value in mb_stats.items():
            stats[key] = stats.get(key, 0.0) + float(value)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.cat(seq_logps), total, stats, grads, g_nll


CASES = {
    "multi-token prompts, many pairs per row": dict(n=6, prompt=(2, 9), response=(1, 7), per_row=3),
    "one-token responses": dict(n=4, prompt=(2, 6), response=(0, 0), per_row=2),
    "one-token prompts": dict(n=4, prompt=(1, 1), response=(1, 5), per_row=4),
    "one pair per row": dict(n=3, prompt=(1, 9), response=(1, 7), per_row=1),
}


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_sharing_gives_the_same_logps_loss_metrics_and_gradients(case, nll_on_prompt):
    spec = CASES[case]
    pairs = _pairs(spec["n"], prompt=spec["prompt"], response=spec["response"], seed=len(case))
    model = _model()
    results = {}
    for layout in (DEFAULT_LAYOUT, SHARED):
        rows = [build_row(pairs[i:i + spec["per_row"]], layout) for i in range(0, len(pairs), spec["per_row"])]
        results[layout] = _run(model, rows, beta=0.25, nll_on_prompt=nll_on_prompt)
    (ref_logps, ref_loss, ref_stats, ref_grads, ref_nll), (logps, loss, stats, grads, nll) = results.values()
    assert nll == ref_nll  # the prompt counted once either way
    torch.testing.assert_close(logps, ref_logps, rtol=0, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert stats.keys() == ref_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-5), key
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_longest_pair_that_fits_the_budget():
    # max_length 24, budget 48: a pair of two 24-token sequences fills it without sharing (48 tokens) and
    # takes 24 + 24 - 12 = 36 with a 12-token prompt.
    pair = TokenizedPair(9, tuple(range(3, 15)), tuple(range(20, 31)) + (2,), tuple(range(31, 42)) + (2,))
    assert DEFAULT_LAYOUT.num_tokens(pair) == 48 and SHARED.num_tokens(pair) == 36
    for layout in (DEFAULT_LAYOUT, SHARED):
        assert schedule_epoch([pair], 48, 1, 1, seed=0, epoch=0, layout=layout)[0].rows == [[[0]]]
    model = _model(seed=1)
    ref = _run(model, [build_row([pair], DEFAULT_LAYOUT)], beta=0.1, nll_on_prompt=False)
    got = _run(model, [build_row([pair], SHARED)], beta=0.1, nll_on_prompt=False)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    for name in got[3]:
        torch.testing.assert_close(got[3][name], ref[3][name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------- guard rails


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
def test_a_dense_or_varlen_backend_is_refused(attn):
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        config_from_dict({"model": {"name_or_path": "m", "attn_implementation": attn}, "data": {"train": "d.jsonl"},
                          "train": {"share_prompt": True}})
    row = build_row(_pairs(2), SHARED)
    with pytest.raises(ValueError, match="shared prompt"):
        backend_kwargs(attn, row_segments(row), None, 8)


def test_torch_varlen_is_refused_for_a_shared_prompt_until_its_alignment_is_checked_on_a_gpu():
    with pytest.raises(ConfigError, match="'varlen_attn' cannot attend to a shared prompt"):
        config_from_dict({"model": {"name_or_path": "m", "attn_implementation": "varlen_attn"},
                          "data": {"train": "d.jsonl"}, "train": {"share_prompt": True}})


def test_layout_for():
    assert layout_for(False) is DEFAULT_LAYOUT and isinstance(layout_for(True), SharedPromptLayout)


def test_evaluation_gives_the_same_metrics_with_a_shared_prompt():
    from orpo_ds.evaluate import evaluate_pairs

    pairs = _pairs(7, prompt=(1, 9), response=(0, 6), seed=4)
    policy = PolicyWithChunkedHead(_model(seed=2))
    metrics = {layout: evaluate_pairs(policy, pairs, micro_batch_tokens=64, beta=0.5, nll_on_prompt=True,
                                      pad_token_id=0, layout=layout) for layout in (DEFAULT_LAYOUT, SHARED)}
    ref, got = metrics.values()
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


def test_the_loss_curve_over_20_steps_is_unchanged_to_1e_4():
    """Issue 15's bar: 20 AdamW steps on the same pairs, prompts shared or not, give the same losses."""
    steps = [_pairs(4, prompt=(1, 12), response=(0, 8), seed=100 + s % 5) for s in range(20)]  # 5 batches, 4 times
    curves = {}
    for layout in (DEFAULT_LAYOUT, SHARED):
        policy = PolicyWithChunkedHead(_model(seed=7))
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        curve = []
        for pairs in steps:
            mb = prepare_micro_batch(build_row(pairs, layout), nll_on_prompt=False)
            loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.5,
                                       global_nll_tokens=mb.num_nll_tokens, global_pairs=mb.num_pairs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[layout.__class__.__name__] = curve
    separate, shared = curves.values()
    assert shared == pytest.approx(separate, rel=1e-4, abs=1e-4)
    assert sum(separate[-5:]) < sum(separate[:5]) - 0.5  # the curve moved: the updates were real


# ------------------------------------------------------------ PyTorch's own varlen (issue 34 item 1)


def _torch_varlen_stand_in(signature: str, calls: list):
    """``torch.nn.attention.varlen.varlen_attn`` of one torch version, on the CPU: the flash contract above
    (bottom-right causal: an assumption to check on a GPU, see tests/gpu), with that version's keywords."""

    def v2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):  # 2.10's docs: no scale
        calls.append({"is_causal": is_causal, "kv_heads": k.shape[1]})
        return flash_varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=is_causal)

    def v2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append({"window_size": window_size, "kv_heads": k.shape[1]})
        return flash_varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                     causal=window_size == (-1, 0))

    def v2_12(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert enable_gqa or q.shape[1] == k.shape[1]
        calls.append({"window_size": window_size, "enable_gqa": enable_gqa, "kv_heads": k.shape[1]})
        return flash_varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                     causal=window_size == (-1, 0))

    return {"2.10": v2_10, "2.11": v2_11, "2.12": v2_12}[signature]


@pytest.mark.parametrize("version, expected", [
    ("2.10", {"is_causal": True, "kv_heads": 4}),  # no enable_gqa: the KV heads are repeated here
    ("2.11", {"window_size": (-1, 0), "kv_heads": 4}),
    ("2.12", {"window_size": (-1, 0), "enable_gqa": True, "kv_heads": 2}),
])
def test_torch_varlen_gets_each_versions_arguments_and_matches_the_full_mask(monkeypatch, version, expected):
    from orpo_ds import attention

    calls = []
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: _torch_varlen_stand_in(version, calls))
    pairs = [TokenizedPair(1, (3, 4, 5), (6, 2), (7, 8, 9, 2)), TokenizedPair(2, (3,), (5, 2), (6, 2))]
    row = build_row(pairs, SHARED)
    segments, t = row_segments(row), row.num_tokens
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = 0.3  # not sdpa's default 1/sqrt(8), so that a version without a scale argument must fold it in
    got = attention.torch_varlen_segments(q, k, v, segments, scale)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments, t), enable_gqa=True,
                                          scale=scale).transpose(1, 2)
    assert calls == [expected]
    torch.testing.assert_close(got, want)
    up = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * up).sum(), (q, k, v)), torch.autograd.grad((want * up).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_auto_prefers_torch_varlen_on_cuda_without_flash_attn_and_refuses_it_where_it_cannot_run(monkeypatch):
    import importlib.util

    from orpo_ds import attention
    from orpo_ds.config import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    resolve = attention.resolve_attn_implementation
    with pytest.raises(ConfigError, match="varlen_attn: there is no CUDA device"):
        resolve("varlen_attn", dtype=torch.bfloat16)  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: _torch_varlen_stand_in("2.12", []))
    assert resolve("auto", dtype=torch.bfloat16) == attention.VARLEN_ATTN
    assert resolve("auto", dtype=torch.bfloat16, share_prompt=True) == attention.SEGMENTED_SDPA
    assert resolve("auto", dtype=torch.float32) == attention.SEGMENTED_SDPA
    with pytest.raises(ConfigError, match="varlen_attn: it has no torch.float32 kernel"):
        resolve("varlen_attn", dtype=torch.float32)
    monkeypatch.setattr(attention, "torch_varlen_attn", lambda: None)  # a torch before 2.10
    assert resolve("auto", dtype=torch.bfloat16) == attention.SEGMENTED_SDPA
    with pytest.raises(ConfigError, match=r"has no torch.nn.attention.varlen \(it needs torch >= 2.10\)"):
        resolve("varlen_attn", dtype=torch.bfloat16)
