"""The packed, chunked micro-batch path against the naive padded TRL-style reference: values and grads."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.batch import dummy_micro_batch, micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row
from tests.helpers.reference import reference_step_loss

V = 61


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(1, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(pair_id=100 + i, prompt_ids=rand(1, 9), chosen_ids=rand(1, 7) + (2,),
                          rejected_ids=rand(1, 7) + (2,)) for i in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("attn", ["segmented_sdpa", "sdpa", "eager"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_packed_chunked_loss_equals_naive_padded_reference(nll_on_prompt, chunk_size, attn):
    pairs = _pairs(5)
    beta = 0.3
    model = _model()
    ref_loss, ref_metrics = reference_step_loss(model, pairs, beta=beta, nll_on_prompt=nll_on_prompt, pad_id=0)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation(attn)  # the packed rows through each backend; the padded reference is sdpa

    # Same pairs split over two packed rows, losses normalised by the global counts.
    policy = PolicyWithChunkedHead(model, chunk_size=chunk_size)
    mbs = [prepare_micro_batch(build_row(pairs[:2]), nll_on_prompt=nll_on_prompt),
           prepare_micro_batch(build_row(pairs[2:]), nll_on_prompt=nll_on_prompt)]
    g_pairs = sum(mb.num_pairs for mb in mbs)
    g_tokens = sum(mb.num_nll_tokens for mb in mbs)
    total = 0.0
    for mb in mbs:
        loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=beta, global_nll_tokens=g_tokens,
                                   global_pairs=g_pairs)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batch_pair_bookkeeping():
    pairs = _pairs(3, seed=3)
    mb = prepare_micro_batch(build_row(pairs), nll_on_prompt=False)
    assert mb.num_pairs == 3
    assert mb.pair_ids.tolist() == [100, 101, 102]
    # Responses only: NLL tokens are the chosen response tokens (EOS included).
    assert mb.num_nll_tokens == sum(len(p.chosen_ids) for p in pairs)
    assert mb.head_positions.numel() == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    with_prompt = prepare_micro_batch(build_row(pairs), nll_on_prompt=True)
    # Each chosen sequence predicts all its tokens but the first.
    assert with_prompt.num_nll_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) - 1 for p in pairs)


def test_dummy_micro_batch_contributes_zero_loss_but_touches_all_parameters():
    model = _model()
    policy = PolicyWithChunkedHead(model)
    mb = dummy_micro_batch(pad_token_id=0)
    loss, stats = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=1,
                                   global_pairs=1)
    loss.backward()
    assert loss.item() == 0.0 and stats == {}
    assert all(p.grad is not None and not p.grad.abs().any() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    pairs = _pairs(4, seed=7)
    mb = prepare_micro_batch(build_row(pairs), nll_on_prompt=False)
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        token_logps = PolicyWithChunkedHead(model, chunk_size=5)(**mb.model_inputs()).token_logps
        loss, _ = micro_batch_loss(token_logps, mb, beta=0.1, global_nll_tokens=mb.num_nll_tokens,
                                   global_pairs=mb.num_pairs)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
