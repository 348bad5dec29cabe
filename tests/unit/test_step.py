"""One optimizer step's bookkeeping (orpo_ds/step.py): the non-finite guard and the step's metrics
record, against figures computed by hand. The step itself runs in tests/unit/test_collectives.py and
tests/unit/test_batch_parity.py."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from orpo_ds.data import TokenizedPair
from orpo_ds.flops import step_flops
from orpo_ds.loss import STAT_KEYS
from orpo_ds.packing import schedule_run
from orpo_ds.step import NonFiniteGuard, NonFiniteLossError, StepMetrics, StepStats


def _stats(*, applied=True, nonfinite=0, bad=()):
    sums = dict.fromkeys(STAT_KEYS, 0.0) | {"pairs": 2.0}
    return StepStats(sums=sums, tokens=30.0, nonfinite_losses=nonfinite, applied=applied, nonfinite_pair_ids=list(bad))


def test_the_guard_counts_consecutive_troubled_steps_and_resets_on_a_clean_one():
    guard = NonFiniteGuard(max_steps=2, rank=0)
    assert guard.observe(1, _stats(applied=False, nonfinite=1, bad=[7])) == {"skipped": True,
                                                                              "nonfinite_pair_ids": [7]}
    guard.raise_if_exhausted()
    assert guard.observe(2, _stats()) == {} and guard.streak == 0  # a clean step resets the count
    guard.observe(3, _stats(applied=False))
    guard.observe(4, _stats(nonfinite=1, bad=[3]))  # a non-finite loss whose gradients were finite
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps \\(up to step 4\\)"):
        guard.raise_if_exhausted()


def test_the_step_record_holds_the_hand_computed_throughput_efficiency_and_mfu():
    pairs = [TokenizedPair(0, (5, 6, 7), (8, 2), (9, 9, 2)), TokenizedPair(1, (5,), (8, 8, 2), (9, 2))]
    (step,) = schedule_run(pairs, 32, 1, 1, seed=0, epochs=1, max_steps=0)
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    metrics = StepMetrics(beta=0.1, micro_batch_tokens=32, pairs=pairs, nll_on_prompt=False, model_config=config,
                          peak_flops=1e9, world_size=1)
    record = metrics(1, step, _stats(), lr=1e-3, grad_norm=0.5, interval=[(step, 30)], seconds=2.0)
    lengths = [3 + 2, 3 + 3, 1 + 3, 1 + 2]  # each sequence: its prompt and its response
    assert record["sequence_tokens"] == sum(lengths) and record["tokens"] == 30
    assert record["tokens_per_s"] == 15.0 and record["packing_efficiency"] == 30 / 32
    assert record["mfu"] == pytest.approx(step_flops(config, lengths, 2 + 3 + 3 + 2) / 2.0 / 1e9)
    assert (record["lr"], record["grad_norm"], record["pairs"], record["step"]) == (1e-3, 0.5, 2, 1)


def test_throughput_is_measured_over_the_steps_since_the_last_record():
    # train.log_steps 3: the host reads the device every third step, so only those 3 steps' time is known.
    pairs = [TokenizedPair(i, (5, 6, 7), (8, 2), (9, 9, 2)) for i in range(6)]
    steps = schedule_run(pairs, 11, 1, 1, seed=0, epochs=1, max_steps=0)
    assert len(steps) == 6  # one 11-token pair a row, one row a step
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    metrics = StepMetrics(beta=0.1, micro_batch_tokens=11, pairs=pairs, nll_on_prompt=False, model_config=config,
                          peak_flops=1e9, world_size=1)
    interval = [(s, 11) for s in steps[:3]]
    record = metrics(3, steps[2], _stats(), lr=1e-3, grad_norm=0.5, interval=interval, seconds=6.0)
    assert record["step_s"] == 2.0 and record["tokens_per_s"] == 33 / 6.0
    one_step = step_flops(config, [3 + 2, 3 + 3], 2 + 3)
    assert record["mfu"] == pytest.approx(3 * one_step / 6.0 / 1e9)
    assert record["tokens"] == 30  # the logged step's own figures stay its own
