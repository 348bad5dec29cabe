"""The run's step schedule: each epoch's rows dealt to optimizer steps, ranks and micro-batch slots, and
the re-dealing of an epoch's remaining rows on another world size."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orpo_ds.data.columns import TokenizedPairs, as_tokenized_pairs  # the input, made by the data pipeline
from orpo_ds.data.pairs import TokenizedPair
from orpo_ds.packing.bins import _check_int_at_least, pack_pairs
from orpo_ds.packing.layout import DEFAULT_LAYOUT, PairLayout


def _assign_step(bin_indices: Sequence[int], tokens: Sequence[int], world_size: int,
                 grad_accum: int) -> list[list[int | None]]:
    """Longest-processing-time greedy: the biggest bin first, to the rank with the fewest tokens that still
    has a free slot (ties to the lowest rank). Returns ``[world_size][grad_accum]``, ``None`` for a slot
    with no bin. Each rank's bins keep the global bin order."""
    by_size = sorted(bin_indices, key=lambda b: (-tokens[b], b))
    open_ranks = [(0, rank) for rank in range(world_size)]  # (tokens so far, rank): a min-heap
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for b in by_size:
        load, rank = heapq.heappop(open_ranks)
        assigned[rank].append(b)
        if len(assigned[rank]) < grad_accum:
            heapq.heappush(open_ranks, (load + tokens[b], rank))
    return [sorted(bins) + [None] * (grad_accum - len(bins)) for bins in assigned]


def schedule_steps(bin_num_tokens: Sequence[int], world_size: int,
               grad_accum: int) -> list[list[list[int | None]]]:
    """Deal bins to optimizer steps, ranks and micro-batch slots.

    A step consumes ``world_size * grad_accum`` consecutive bins; within it, bins go to ranks so that
    their token counts balance (max - min <= the largest bin of the step).

    Args:
        bin_num_tokens: ``[B]`` tokens of each bin, in the order the bins are consumed.
        world_size, grad_accum: ranks, and micro-batches per rank per step.
    Returns:
        ``steps[step][rank]`` = exactly ``grad_accum`` bin indices. ``None`` (only in the last step, after
        the rank's real bins) marks a slot with no bin: ``orpo_ds.batch.micro_batches`` runs a dummy
        micro-batch there, since every rank must make ``grad_accum`` forward/backward passes for ZeRO-3's
        collectives. Every bin is used once.
    """
    _check_int_at_least("world_size", world_size, 1)
    _check_int_at_least("grad_accum", grad_accum, 1)
    tokens = [int(t) for t in bin_num_tokens]
    if any(t < 0 for t in tokens):
        raise ValueError("bin_num_tokens must be >= 0")
    slots = world_size * grad_accum
    return [_assign_step(range(start, min(start + slots, len(tokens))), tokens, world_size, grad_accum)
            for start in range(0, len(tokens), slots)]


@dataclass(frozen=True)
class ScheduledStep:
    """The rows of one optimizer step: ``rows[rank]`` lists ``grad_accum`` slots, each the pair indices of
    one packed row, or ``None`` where that rank has no row (it runs a dummy micro-batch)."""

    epoch: int
    rows: list[list[list[int] | None]]

    def filled_rows(self) -> list[list[int]]:
        """The real rows of the step, every rank's, in rank order."""
        return [row for rank_rows in self.rows for row in rank_rows if row is not None]

    @property
    def num_filled_rows(self) -> int:
        return len(self.filled_rows())


Pairs = TokenizedPairs | Sequence[TokenizedPair]  # columns, or a list of pairs (turned into columns)


def epoch_rows(pairs: Pairs, micro_batch_tokens: int, *, seed: int, epoch: int,
               layout: PairLayout = DEFAULT_LAYOUT) -> tuple[list[list[int]], list[int]]:
    """One epoch's packed rows (pair indices) in the order steps consume them, and their token counts.
    They do not depend on the world size: only how they are dealt to steps and ranks does. Only the
    pairs' length columns are read: token ids are gathered when a row is built."""
    pairs = as_tokenized_pairs(pairs)
    lengths = layout.pair_num_tokens(pairs)  # [N] int64
    bins = pack_pairs(lengths, micro_batch_tokens, seed=seed, epoch=epoch, pair_ids=pairs.pair_id)
    if not bins:
        return bins, []
    bin_sizes = np.fromiter(map(len, bins), dtype=np.int64, count=len(bins))
    members = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(bin_sizes.sum()))
    bin_tokens = np.add.reduceat(lengths[members], np.cumsum(bin_sizes) - bin_sizes)
    return bins, bin_tokens.tolist()


def deal_rows(bins: list[list[int]], bin_tokens: list[int], world_size: int, grad_accum: int,
              epoch: int) -> list[ScheduledStep]:
    """Rows to optimizer steps, ranks and micro-batch slots (:func:`schedule_steps`)."""
    return [ScheduledStep(epoch, [[bins[b] if b is not None else None for b in rank_slots] for rank_slots in step])
            for step in schedule_steps(bin_tokens, world_size, grad_accum)]


def schedule_epoch(pairs: Pairs, micro_batch_tokens: int, world_size: int, grad_accum: int, *,
               seed: int, epoch: int, layout: PairLayout = DEFAULT_LAYOUT) -> list[ScheduledStep]:
    """Pack one epoch's pairs into rows and deal the rows to steps and ranks: a deterministic function of
    its arguments, so every rank computes the same plan with no communication."""
    bins, bin_tokens = epoch_rows(pairs, micro_batch_tokens, seed=seed, epoch=epoch, layout=layout)
    return deal_rows(bins, bin_tokens, world_size, grad_accum, epoch)


def schedule_run(pairs: Pairs, micro_batch_tokens: int, world_size: int, grad_accum: int, *,
             seed: int, epochs: int, max_steps: int = 0, layout: PairLayout = DEFAULT_LAYOUT) -> list[ScheduledStep]:
    """The whole run's steps: ``epochs`` epochs (each packed afresh), cut at ``max_steps`` when > 0."""
    steps: list[ScheduledStep] = []
    for epoch in range(epochs):
        steps += schedule_epoch(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epoch=epoch,
                            layout=layout)
        if max_steps and len(steps) >= max_steps:
            break
    return steps[:max_steps] if max_steps else steps


def reschedule_run(pairs: Pairs, micro_batch_tokens: int, old_world_size: int, world_size: int,
               grad_accum: int, *, done_steps: int, seed: int, epochs: int, max_steps: int = 0,
               layout: PairLayout = DEFAULT_LAYOUT) -> list[ScheduledStep]:
    """The step schedule of a run resumed on ``world_size`` ranks after ``done_steps`` steps on
    ``old_world_size``: those steps as they ran, then the rest of their epoch's rows dealt to the new world
    size, then the later epochs planned for it. An epoch's rows do not depend on the world size, and steps
    consume them in order, so no pair of the epoch is trained twice and none is skipped. ``max_steps``
    still caps the total number of optimizer steps.
    """
    old = schedule_run(pairs, micro_batch_tokens, old_world_size, grad_accum, seed=seed, epochs=epochs,
                   max_steps=max_steps, layout=layout)
    done = old[:done_steps]
    if not done:
        return schedule_run(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epochs=epochs,
                        max_steps=max_steps, layout=layout)
    epoch = done[-1].epoch
    consumed = sum(step.num_filled_rows for step in done if step.epoch == epoch)
    bins, bin_tokens = epoch_rows(pairs, micro_batch_tokens, seed=seed, epoch=epoch, layout=layout)
    steps = done + deal_rows(bins[consumed:], bin_tokens[consumed:], world_size, grad_accum, epoch)
    for later in range(epoch + 1, epochs):
        if max_steps and len(steps) >= max_steps:
            break
        steps += schedule_epoch(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epoch=later,
                                layout=layout)
    return steps[:max_steps] if max_steps else steps
