"""The planner and sequence parallelism (issue #36, item 4): a GPU holds 1/N of every row, so its
activations are those of a row N times shorter, the largest row grows about N-fold, and the plan says
the smallest N at which a row fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_ds import cli
from orpo_ds.plan import memory
from orpo_ds.plan.shapes import load_model_config, model_shape

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama31_8b_32k_sp8_8xh100.yaml"
CLUSTER = ["--nodes", "1", "--gpus-per-node", "8", "--gpu", "H100"]


def _plan(capsys, *overrides: str) -> dict:
    assert cli.main(["plan", "--config", str(RECIPE), *overrides, *CLUSTER, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_gpu_holds_one_nth_of_the_row(capsys):
    split = _plan(capsys)
    whole = _plan(capsys, "train.sequence_parallel_size=1")
    assert (split["sequence_parallel"], whole["sequence_parallel"]) == (8, 1)
    assert split["model_state_bytes"] == whole["model_state_bytes"]  # ZeRO-3 over all 8 GPUs either way
    # The saved activations of a row of 65536 / 8 tokens, as the estimate gives them for that row.
    assert split["activation_bytes"]["saved"] * 8 == pytest.approx(whole["activation_bytes"]["saved"], rel=0.02)
    assert split["largest_micro_batch_tokens"] > 7 * whole["largest_micro_batch_tokens"]
    assert split["sequence_parallel_needed"] == whole["sequence_parallel_needed"] == 1  # 65536 fits either way


def test_the_plan_names_the_sequence_parallel_size_a_row_needs(capsys):
    at_one = _plan(capsys, "train.sequence_parallel_size=1")["largest_micro_batch_tokens"]
    longer = _plan(capsys, "train.sequence_parallel_size=1", f"train.micro_batch_tokens={2 * at_one}",
                   f"data.max_length={at_one}")
    assert not longer["fits"] and longer["sequence_parallel_needed"] == 2
    split = _plan(capsys, "train.sequence_parallel_size=2", f"train.micro_batch_tokens={2 * at_one}",
                  f"data.max_length={at_one}")
    assert split["fits"]


def test_a_size_the_cluster_cannot_split_into_is_refused(capsys):
    assert cli.main(["plan", "--config", str(RECIPE), "train.sequence_parallel_size=3", *CLUSTER]) == 2
    assert "train.sequence_parallel_size: 3 does not divide the cluster's 8 GPUs" in capsys.readouterr().err


def test_what_a_run_would_refuse_the_plan_refuses_with_the_same_words(capsys, tmp_path):
    six_gpus = ["--nodes", "1", "--gpus-per-node", "6", "--gpu", "H100"]
    assert cli.main(["plan", "--config", str(RECIPE), "train.sequence_parallel_size=3", *six_gpus]) == 2
    assert "3 cannot split the model's 32 attention heads and 8 KV heads" in capsys.readouterr().err
    autoep = tmp_path / "autoep.json"
    autoep.write_text('{"zero_optimization": {"stage": 3}, "expert_parallel": {"enabled": true, "autoep_size": 2}}')
    assert cli.main(["plan", "--config", str(RECIPE), f"deepspeed.config={autoep}", *CLUSTER]) == 2
    assert "expert_parallel (DeepSpeed AutoEP) is not supported" in capsys.readouterr().err


def test_the_activation_estimate_is_linear_in_the_row():
    # What dividing the row by N rests on: no [T, T] term (flash / segmented attention).
    shape = model_shape(load_model_config("llama-3-8b"))
    one, two = (memory.activation_estimate(shape, t, t // 2, 2, checkpointing=True).saved for t in (8192, 16384))
    assert two == pytest.approx(2 * one, rel=0.01)
