"""Sequence parallelism (issue #36) on 2 CPU ranks: DeepSpeed's Ulysses over the segmented attention,
each rank holding half of every packed row, against the same rows on one rank without it.

With one data-parallel replica in both runs the step schedule is the same, so every step's loss, metric
and gradient norm must agree: the attention is exact, the head scores each rank's targets against the
whole row's labels, and the per-sequence log-prob sums are summed over the two ranks before the odds
ratio. Rows straddle the shard boundary in every step (a 256-token budget, pairs of 20-60 tokens).
"""

from __future__ import annotations

import pytest

from orpo_ds.metrics import read_metrics
from tests.distributed.conftest import base_overrides, launch
from tests.helpers.models import save_tiny_llama
from tests.helpers.tokenizers import make_tiny_tokenizer

STEPS = 4
FIGURES = ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "pairs",
           "tokens", "sequence_tokens"]


def _records(tiny_model, synthetic_data, out, ranks, extra):
    overrides = base_overrides(tiny_model, {"train": synthetic_data["train"]}, out, **{
        "train.max_steps": STEPS, "train.lr_schedule": "constant", "train.lr": 2e-3, "train.eval_before": "false",
        "train.export": "false", **extra})  # extra last: it may set max_steps
    proc = launch(["train", *overrides], ranks=ranks, timeout=300)
    assert proc.returncode == 0
    return proc, [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


@pytest.mark.parametrize("extra", [{}, {"train.share_prompt": "true"},
                                   {"model.gradient_checkpointing": "true", "train.grad_accum": 2}],
                         ids=["packed", "shared-prompt", "checkpointed-2-micro-batches"])
def test_two_rank_sequence_parallel_equals_one_rank_on_every_step(tiny_model, synthetic_data, tmp_path, extra):
    proc, sharded = _records(tiny_model, synthetic_data, tmp_path / "sp2", 2,
                             {**extra, "train.sequence_parallel_size": 2})
    assert "[parallel] 2 ranks = data-parallel 1 x sequence-parallel 2" in proc.stdout
    _, whole = _records(tiny_model, synthetic_data, tmp_path / "sp1", 1, extra)
    assert len(sharded) == len(whole) == STEPS
    for got, want in zip(sharded, whole, strict=True):
        for key in FIGURES:  # pairs and tokens: each counted once, not once per rank
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key, got[key], want[key])
    assert sharded[-1]["loss"] != pytest.approx(sharded[0]["loss"], rel=1e-3)  # updates happened


def test_sizes_the_world_or_the_heads_cannot_take_exit_2(tiny_model, synthetic_data, tmp_path):
    three_heads = save_tiny_llama(tmp_path / "three-heads", make_tiny_tokenizer(), hidden_size=24, heads=3,
                                  kv_heads=3)
    cases = [(tiny_model, 4, "4 does not divide the 2 ranks"),
             (three_heads, 2, "2 cannot split the model's 3 attention heads and 3 KV heads (Ulysses gives each "
                              "rank heads/N of them); sizes that work: 3")]
    for i, (model, size, words) in enumerate(cases):
        overrides = base_overrides(model, {"train": synthetic_data["train"]}, tmp_path / f"run{i}",
                                   **{"train.sequence_parallel_size": size})
        proc = launch(["train", *overrides], ranks=2, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_resume_across_sequence_parallel_sizes_follows_the_unsplit_run(tiny_model, synthetic_data, tmp_path):
    """Steps 1-2 at SP=2 on 2 ranks, 3-4 at SP=1 on 1 rank (a universal checkpoint), 5-6 at SP=2 on 2 ranks
    again: one data-parallel replica throughout, so the same rows in the same steps, and the loss curve of
    an uninterrupted 1-rank run."""
    out = tmp_path / "run"
    legs = [(2, 2, 2), (1, 1, 4), (2, 2, 6)]  # ranks, sequence-parallel size, last step
    for ranks, size, last in legs:
        overrides = base_overrides(tiny_model, {"train": synthetic_data["train"]}, out, **{
            "train.max_steps": last, "train.lr_schedule": "constant", "train.lr": 2e-3, "train.eval_before": "false",
            "train.export": "false", "train.sequence_parallel_size": size, "train.resume_world_size_change": "allow"})
        proc = launch(["train", *overrides], ranks=ranks, timeout=300)
        assert proc.returncode == 0
        if last > 2:
            assert f"resuming step {last - 2} of a" in proc.stdout and "through a universal checkpoint" in proc.stdout
    resumed = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    _, whole = _records(tiny_model, synthetic_data, tmp_path / "whole", 1, {"train.max_steps": 6})
    assert [m["step"] for m in resumed] == [m["step"] for m in whole] == list(range(1, 7))
    for got, want in zip(resumed, whole, strict=True):
        for key in ("loss", "grad_norm", "pairs", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key, got[key], want[key])


def test_resume_at_another_sequence_parallel_size_on_the_same_ranks_follows_the_unsplit_layouts(
        tiny_model, synthetic_data, tmp_path):
    """Steps 1-2 at SP=2 on 2 ranks (one replica), then 3-4 at SP=1 on the same 2 ranks (two replicas: the
    rest of the epoch re-dealt, the checkpoint loaded as saved, no universal copy). The same as steps 1-2 on
    one rank and 3-4 on 2 ranks without sequence parallelism, step by step."""
    def legs(out, layout):
        records = []
        for (ranks, size), last in zip(layout, (2, 4), strict=True):
            overrides = base_overrides(tiny_model, {"train": synthetic_data["train"]}, out, **{
                "train.max_steps": last, "train.lr_schedule": "constant", "train.lr": 2e-3,
                "train.eval_before": "false", "train.export": "false", "train.sequence_parallel_size": size,
                "train.resume_world_size_change": "allow"})
            proc = launch(["train", *overrides], ranks=ranks, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            records.append(proc.stdout)
        return records, [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]

    (_, second), split = legs(tmp_path / "sp", [(2, 2), (2, 1)])
    assert ("resuming step 2 of a 2-rank run (1 data-parallel replicas) on 2 ranks (2) from its ZeRO partitions"
            in second and "the rest of its rows dealt to the new replicas" in second), second
    _, unsplit = legs(tmp_path / "ranks", [(1, 1), (2, 1)])
    assert [m["step"] for m in split] == [m["step"] for m in unsplit] == [1, 2, 3, 4]
    for got, want in zip(split, unsplit, strict=True):
        for key in ("loss", "grad_norm", "pairs", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key, got[key], want[key])
