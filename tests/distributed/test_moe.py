"""Mixture-of-experts models trained for real: 2 CPU ranks under ZeRO-3, with the router's balancing loss,
against a naive single-process reference (issue #37, item 1).

The reference: the family's own ForCausalLM on padded batches with an attention mask, the ORPO loss on its
full logits, plus ``router_aux_loss_coef`` times each packed row's ``aux_loss`` weighted by the row's share
of the step's tokens (the rows the trainer's plan made), then torch's AdamW with clipping. A rank that
waited forever on another (experts gathered on one rank and not the other) fails at the launch's timeout.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_ds.config import load_config
from orpo_ds.data import load_records, tokenize_pairs
from orpo_ds.metrics import read_metrics
from orpo_ds.packing import schedule_run
from tests.distributed.conftest import base_overrides, launch
from tests.helpers.models import save_tiny_moe
from tests.helpers.reference import reference_router_aux, reference_step_loss, smallest_routing_margin
from tests.helpers.tokenizers import make_tiny_tokenizer

STEPS, COEF = 4, 0.05
# Router logits here are ~0.1 in size: fp32 round-off (sums in another order, carried over 4 updates of lr
# 2e-3) moves them by a few ulps, ~1e-8 (the same tokens batched two ways gave identical logits). This
# margin is 100x that; the seed's smallest gap is 4e-6 (mixtral).
MIN_ROUTING_MARGIN = 1e-6


def _reference(model, plan, pairs, cfg, pad_id: int) -> list[dict]:
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = []
    for step in plan:
        rows = [[pairs[i] for i in row] for rank_rows in step.rows for row in rank_rows if row is not None]
        optimizer.zero_grad()
        orpo, metrics = reference_step_loss(model, [p for row in rows for p in row], beta=cfg.loss.beta,
                                            nll_on_prompt=False, pad_id=pad_id)
        aux = reference_router_aux(model, rows, pad_id)
        margin = smallest_routing_margin(model, rows, pad_id, top_k=model.config.num_experts_per_tok)
        # Else the two runs' round-off could route a token differently, and the comparison would be luck.
        assert margin > MIN_ROUTING_MARGIN, f"a routing near-tie ({margin:.1e}): choose another seed"
        (orpo + COEF * aux).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        history.append({**metrics, "aux_loss": aux.item(), "grad_norm": float(norm)})
    return history


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_two_rank_zero3_moe_with_the_balancing_loss_matches_the_reference(family, synthetic_data, tmp_path):
    model_dir = save_tiny_moe(tmp_path / family, make_tiny_tokenizer(), family, coef=COEF)
    overrides = base_overrides(model_dir, {"train": synthetic_data["train"]}, tmp_path / "run", **{
        "train.max_steps": STEPS, "train.lr_schedule": "constant", "train.lr": 2e-3, "train.max_grad_norm": 1.0,
        "train.eval_before": "false", "train.export": "false"})
    proc = launch(["train", *overrides], ranks=2, timeout=300)
    assert proc.returncode == 0
    assert f"[model] mixture of experts: 4 experts, top-2; balancing loss x {COEF:g}" in proc.stdout
    got = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]

    cfg = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_pairs(load_records(str(synthetic_data["train"])), tokenizer, max_length=cfg.data.max_length,
                              progress=False)
    t = cfg.train
    plan = schedule_run(pairs, t.micro_batch_tokens, 2, t.grad_accum, seed=t.seed, epochs=t.epochs, max_steps=STEPS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    want = _reference(model, plan, pairs, cfg, tokenizer.pad_token_id)

    assert len(got) == STEPS
    for g, r in zip(got, want, strict=True):
        # 1e-4 as the dense parity test: two ranks sum in another order, and updates carry it forward.
        for key in ("loss", "aux_loss"):
            assert g[key] == pytest.approx(r[key], rel=1e-4), (g["step"], key, g[key], r[key])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3), (g["step"], g["grad_norm"], r["grad_norm"])
        assert 1.0 <= g["moe/load_max_over_mean"] <= g["moe/load_max_over_mean_worst_layer"] <= 4.0
    # Before any update the two agree to fp32 round-off.
    assert got[0]["aux_loss"] == pytest.approx(want[0]["aux_loss"], rel=1e-5)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
