"""Mixture-of-experts models in process (orpo_ds/router.py): when the router's balancing loss is added,
its value and gradients over packed rows against the model family's own ForCausalLM on padded batches,
and the expert-load metrics against counts made by hand. The 2-rank ZeRO-3 runs are in
tests/distributed/test_moe.py."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from orpo_ds.batch import dummy_micro_batch, prepare_micro_batch
from orpo_ds.config import ConfigError
from orpo_ds.data import TokenizedPair
from orpo_ds.ds_config import refuse_expert_parallel
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row, layout_for
from orpo_ds.router import expert_load_figures, expert_token_counts, resolve_router_loss
from orpo_ds.step import train_step
from tests.helpers.engines import PlainEngine
from tests.helpers.reference import reference_router_aux, reference_step_loss

V = 61
E, TOP_K = 4, 2
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": E}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"num_experts": E, "moe_intermediate_size": 16}),
}


def tiny_moe(family: str, *, coef: float = 0.05, output_router_logits: bool = True, seed: int = 0):
    config_cls, model_cls, experts = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_experts_per_tok=TOP_K, output_router_logits=output_router_logits,
                        router_aux_loss_coef=coef, attn_implementation="sdpa", **experts)
    return model_cls(config).float()


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, rand(1, 9), rand(1, 7) + (2,), rand(1, 7) + (2,)) for i in range(n)]


def test_the_router_loss_follows_trls_rule_and_the_override():
    mixtral = tiny_moe("mixtral", coef=0.02)
    router = resolve_router_loss(mixtral, None)
    assert (router.num_experts, router.top_k, router.coef) == (E, TOP_K, 0.02)
    assert router.balancing_loss.__module__ == "transformers.models.mixtral.modeling_mixtral"
    assert resolve_router_loss(mixtral, 0.5).coef == 0.5
    off = resolve_router_loss(tiny_moe("qwen3_moe", output_router_logits=False), None)
    assert off.coef == 0.0 and "output_router_logits is false" in off.describe()  # load still measured
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert resolve_router_loss(dense, None) is None
    with pytest.raises(ConfigError, match="loss.router_aux_loss_coef: LlamaForCausalLM has no router"):
        resolve_router_loss(dense, 0.01)


@pytest.mark.parametrize("family, checkpointing", [("mixtral", False), ("qwen3_moe", False), ("mixtral", True)],
                         ids=["mixtral", "qwen3_moe", "mixtral-checkpointed"])
def test_step_loss_and_gradients_equal_the_familys_own_forward_on_padded_batches(family, checkpointing):
    """Two packed rows of one step through the loop against the naive reference: the ORPO loss on padded
    full logits, plus coef times each row's aux_loss from the family's ForCausalLM (attention mask over
    the padding), weighted by the row's tokens. Values and every gradient, router weights included. With
    activation checkpointing the recomputed layers must not record their router logits a second time."""
    pairs, beta, coef = _pairs(5), 0.3, 0.05
    rows = [pairs[:2], pairs[2:]]
    model = tiny_moe(family, coef=coef)
    orpo, _ = reference_step_loss(model, pairs, beta=beta, nll_on_prompt=False, pad_id=0)
    aux = reference_router_aux(model, rows, pad_id=0)
    (orpo + coef * aux).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.set_attn_implementation("segmented_sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyWithChunkedHead(model, router=resolve_router_loss(model, None))
    mbs = [prepare_micro_batch(build_row(row), nll_on_prompt=False) for row in rows]
    stats = train_step(PlainEngine(policy), mbs, beta=beta, router=policy.router).read()

    assert stats.router["aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    assert stats.sums["pairs"] == 5
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any("gate" in n and want[n].abs().sum() > 0 for n in want)  # the router weights get gradient


def test_a_shared_prompt_routes_its_tokens_once():
    model = tiny_moe("mixtral").eval()
    model.set_attn_implementation("segmented_sdpa")
    policy = PolicyWithChunkedHead(model, router=resolve_router_loss(model, None))
    pairs = _pairs(3, seed=1)
    for layout_share, extra in ((False, 0), (True, -sum(len(p.prompt_ids) for p in pairs))):
        mb = prepare_micro_batch(build_row(pairs, layout_for(layout_share)), nll_on_prompt=False)
        with torch.no_grad():
            out = policy(**mb.model_inputs())
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) + extra
        assert mb.num_tokens == tokens
        assert out.expert_tokens.shape == (2, E) and out.expert_tokens.sum(1).tolist() == [tokens * TOP_K] * 2


def test_expert_counts_and_load_figures_against_counts_made_by_hand():
    logits = (torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 5.0, 4.0, 0.0], [5.0, 0.0, 0.0, 4.0]]),
              torch.tensor([[9.0, 8.0, 0.0, 0.0]] * 3))
    counts = expert_token_counts(logits, num_experts=4, top_k=2)
    assert counts.tolist() == [[2, 2, 1, 1], [3, 3, 0, 0]]
    figures = expert_load_figures(counts)
    # Layer 0: max 2 over mean 1.5; layer 1: 3 over 1.5. A collapsed router (one expert) would give E.
    assert figures == {"moe/load_max_over_mean": pytest.approx((2 / 1.5 + 3 / 1.5) / 2),
                       "moe/load_max_over_mean_worst_layer": pytest.approx(2.0)}
    assert expert_load_figures([[6, 0, 0, 0]])["moe/load_max_over_mean"] == 4.0
    assert expert_load_figures([[3, 3, 3, 3]])["moe/load_max_over_mean"] == 1.0


def test_a_dummy_row_adds_nothing_but_joins_the_backward():
    model = tiny_moe("qwen3_moe")
    model.set_attn_implementation("segmented_sdpa")
    policy = PolicyWithChunkedHead(model, router=resolve_router_loss(model, None))
    real = prepare_micro_batch(build_row(_pairs(2)), nll_on_prompt=False)
    stats_with_dummy = train_step(PlainEngine(policy), [real, dummy_micro_batch(0)], beta=0.1,
                                  router=policy.router).read()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    stats_alone = train_step(PlainEngine(policy), [real], beta=0.1, router=policy.router).read()
    assert stats_with_dummy.router == pytest.approx(stats_alone.router)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_deepspeed_autoep_is_refused_naming_why():
    # Tried on 2 CPU ranks with a tiny Mixtral: deepspeed.initialize fails in AutoEP's recorder patch on
    # transformers 5 (docs/configuration.md). Off, or absent, is fine.
    refuse_expert_parallel({"expert_parallel": {"enabled": False}})
    refuse_expert_parallel({})
    with pytest.raises(ConfigError, match=r"expert_parallel \(DeepSpeed AutoEP\) is not supported: DeepSpeed's "
                                          r"AutoEP cannot install its router-logit recorders"):
        refuse_expert_parallel({"expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}})
