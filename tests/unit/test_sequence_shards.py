"""A packed row split for sequence parallelism (orpo_ds.batch.Shard), on the host: the shards put back
together are the row, each head target lands on exactly one shard, scored against the whole row's
labels, and every count adds up to the row's once. The training itself: tests/distributed/
test_sequence_parallel.py."""

from __future__ import annotations

import random

import pytest
import torch

from orpo_ds.batch import Shard, dummy_micro_batch, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.packing import build_row, layout_for

PAD = 0


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(3, 60) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, rand(1, 9), rand(1, 7) + (2,), rand(1, 7) + (2,)) for i in range(n)]


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["separate", "shared-prompt"])
def test_shards_put_back_together_are_the_row(count, share_prompt):
    row = build_row(_pairs(5), layout_for(share_prompt))
    whole = prepare_micro_batch(row, nll_on_prompt=True)
    shards = [prepare_micro_batch(row, nll_on_prompt=True, shard=Shard(i, count, PAD)) for i in range(count)]
    width = shards[0].input_ids.shape[1]
    assert all(s.input_ids.shape == (1, width) for s in shards)
    assert width * count >= row.num_tokens > width * (count - 1)  # padded by less than a shard: none is empty
    ids = torch.cat([s.input_ids for s in shards], dim=1)[0]
    assert torch.equal(ids[: row.num_tokens], whole.input_ids[0]) and bool((ids[row.num_tokens:] == PAD).all())
    # The padding is a segment of its own after the row's.
    assert shards[0].segments[: len(whole.segments)] == whole.segments
    assert all(s.segments == shards[0].segments for s in shards)
    # Each head target on one shard, at its position there, with the whole row's label. (A shared prompt's
    # extra targets come after a batch's others, so the order differs; the loss sums by sequence.)
    def targets(mb, offset=0):
        columns = (mb.head_positions + offset, mb.head_labels, mb.head_seq_id, mb.head_is_response, mb.head_is_nll)
        return sorted(zip(*(c.tolist() for c in columns), strict=True))

    assert sorted(t for i, s in enumerate(shards) for t in targets(s, i * width)) == targets(whole)
    # A target at a shard's last position scores the first token of the next shard.
    boundary = [(i, p) for i, s in enumerate(shards[:-1]) for p in s.head_positions.tolist() if p == width - 1]
    for i, p in boundary:
        label = shards[i].head_labels[shards[i].head_positions.tolist().index(p)]
        assert label == shards[i + 1].input_ids[0, 0]
    assert sum(s.num_tokens for s in shards) == row.num_tokens
    assert sum(s.num_nll_tokens for s in shards) == whole.num_nll_tokens
    assert [s.num_pairs for s in shards] == [row.num_pairs] + [0] * (count - 1)
    assert [s.owns_pairs for s in shards] == [True] + [False] * (count - 1)


def test_a_target_straddling_the_boundary_exists_in_the_cases_above():
    row = build_row(_pairs(5), layout_for(False))
    shards = [prepare_micro_batch(row, nll_on_prompt=True, shard=Shard(i, 2, PAD)) for i in range(2)]
    assert (shards[0].head_positions == shards[0].input_ids.shape[1] - 1).any()


def test_a_replica_without_a_row_runs_one_token_per_rank():
    dummies = [dummy_micro_batch(PAD, shard=Shard(i, 2, PAD)) for i in range(2)]
    assert all(d.is_dummy and d.input_ids.shape == (1, 1) and d.segments[-1].end == 2 for d in dummies)
