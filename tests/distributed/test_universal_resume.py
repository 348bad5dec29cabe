"""A ZeRO-3 run killed on 2 ranks resumes on 1 (``train.resume_world_size_change=allow``) through
DeepSpeed's universal checkpoint: refused without the option, then the steps continue where the
checkpoint left them, every pair of the epoch is trained exactly once, and the first resumed step's loss
is that of the checkpoint's weights on that step's pairs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_ds.config import load_config
from orpo_ds.data import load_records, tokenize_pairs
from orpo_ds.engine import consolidate_zero_checkpoint
from orpo_ds.metrics import read_metrics
from orpo_ds.packing import layout_for, reschedule_run
from tests.distributed.conftest import base_overrides, launch
from tests.helpers.reference import reference_step_loss

SAVED_STEP = 4


def test_two_rank_zero3_checkpoint_resumes_on_one_rank(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "run"
    overrides = base_overrides(tiny_model, synthetic_data, out, **{
        "train.save_steps": SAVED_STEP, "train.eval_before": False, "train.lr": 2e-3})
    killed = launch(["train", *overrides], ranks=2, env={"ORPO_DS_FAULT": f"kill_after_step:{SAVED_STEP + 1}"})
    assert killed.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{SAVED_STEP:06d}"
    checkpoint = out / "checkpoints" / f"step-{SAVED_STEP:06d}"
    saved_weights = consolidate_zero_checkpoint(checkpoint / "ds")  # read now: the resumed run prunes it later

    refused = launch(["train", *overrides], ranks=1)
    assert refused.returncode == 3
    assert "world size 2 -> 1" in refused.stderr and "train.resume_world_size_change=allow" in refused.stderr

    resumed = launch(["train", *overrides, "train.resume_world_size_change=allow"], ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "through a universal checkpoint" in resumed.stdout
    assert not list((out / "checkpoints").glob(".universal-*"))  # the converted copy is removed once loaded

    cfg = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs, _ = tokenize_pairs(load_records(str(synthetic_data["train"])), tokenizer, max_length=cfg.data.max_length,
                              progress=False)
    t = cfg.train
    plan = reschedule_run(pairs, t.micro_batch_tokens, 2, 1, t.grad_accum, done_steps=SAVED_STEP, seed=t.seed,
                      epochs=t.epochs, layout=layout_for(False))
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, len(plan) + 1))  # continuous: step 5 once, from the resume
    assert [m["pairs"] for m in steps] == [sum(len(r) for r in p.filled_rows()) for p in plan]
    assert sum(m["pairs"] for m in steps) == len(pairs)  # one epoch: each pair once, none skipped
    assert all(len(p.rows) == 1 for p in plan[SAVED_STEP:]) and all(len(p.rows) == 2 for p in plan[:SAVED_STEP])

    # The weights carried over: step 5's loss (computed before its update) is the checkpoint's model on
    # step 5's pairs, evaluated the naive way.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    prefix = "causal_lm."
    model.load_state_dict({k[len(prefix):]: v for k, v in saved_weights.items()})
    step_pairs = [pairs[i] for row in plan[SAVED_STEP].filled_rows() for i in row]
    with torch.no_grad():
        loss, _ = reference_step_loss(model, step_pairs, beta=cfg.loss.beta, nll_on_prompt=False,
                                      pad_id=tokenizer.pad_token_id)
    assert steps[SAVED_STEP]["loss"] == pytest.approx(float(loss), rel=1e-4)
    # The LR schedule and the AdamW step count came along: a fresh engine would log step 1's rate.
    assert steps[SAVED_STEP]["lr"] != pytest.approx(steps[0]["lr"], rel=1e-9)
