"""Padding-free packing of preference pairs: a pure data-stage transform with a written contract.

Pipeline (all pure: no torch.distributed, engine, config object or logging in here)::

    pairs ─layout.num_tokens─► pack_pairs ─► bins ─► plan_steps ─► steps[step][rank] = bin or None
                                              └─► build_row(pairs of a bin) ─► PackedRow

* :func:`pack_pairs` puts pairs into bins of at most ``micro_batch_tokens`` tokens (best-fit-decreasing). A
  pair is the unit of packing, so its chosen and rejected sequences always land in the same row.
* :func:`plan_steps` deals the bins of each optimizer step to ranks and micro-batch slots, filling the
  last step's empty slots with ``None`` (``orpo_ds.batch.micro_batches`` runs a dummy micro-batch there:
  ZeRO-3 needs every rank in every pass).
* :func:`build_row` lays the pairs of one bin out in one row (batch dim 1, no padding), and
  ``orpo_ds.batch.prepare_micro_batch`` turns it into tensors. The model runs on it with ``position_ids`` and
  ``use_cache=False`` and *no* attention mask; the row's boundaries reach attention as host segments
  (``segmented_sdpa``) or ``cu_seqlens`` (flash-attn varlen), see :mod:`orpo_ds.attention`. The dense
  backends (sdpa/eager) find them where the position ids stop increasing by 1.

Row contract (``T`` tokens, ``S`` sequences, ``P`` pairs; order: pair by pair, and within a pair its
chosen sequence, then its rejected sequence, so sequence ``2p`` is chosen and ``2p + 1`` rejected with
:class:`SeparateSequencesLayout`):

* ``labels[t]`` is the *next-token target* of position ``t``: ``input_ids[t + 1]`` when ``t + 1`` is in the
  same sequence, else ``IGNORE_INDEX`` (-100; the last token of every sequence). The shift is done here,
  per sequence, so it never crosses a boundary. Do NOT pass these labels to a Hugging Face model's
  ``labels=`` argument: it would shift them a second time.
* Prompt-predicting positions carry labels too (for ``nll_on_prompt``); ``response_mask[t]`` is True where
  ``labels[t]`` is a response token (chosen or rejected, the closing EOS included).
* With an empty prompt the first response token has no context and is not predicted, so that sequence
  scores ``len(response) - 1`` tokens; otherwise all ``len(response)`` tokens are scored.

Worked example. One pair, ``pair_id=7``, prompt ``(11, 12)``, chosen ``(21, 22, 2)``, rejected
``(31, 2)`` (2 is EOS). Sequence 0 = prompt + chosen, sequence 1 = prompt + rejected; ``T = 9``, ``S = 2``::

    t               0    1    2    3    4  |  5    6    7    8
    input_ids      11   12   21   22    2  | 11   12   31    2
    position_ids    0    1    2    3    4  |  0    1    2    3
    labels         12   21   22    2 -100  | 12   31    2 -100
    response_mask   F    T    T    T    F  |  F    T    T    F
    seq_id          0    0    0    0    0  |  1    1    1    1

    seq_pair_index = [0, 0]    seq_pair_id = [7, 7]    seq_is_chosen = [True, False]
    seq_lengths    = [5, 4]    num_pairs   = 1

The chosen response scores 21, 22, 2 (at t = 1, 2, 3); the rejected one 31, 2 (at t = 6, 7). Position 4
would "predict" the first token of the next sequence, so its label is -100.

Layouts. A :class:`PairLayout` decides how a pair's tokens sit in a row: it reports ``num_tokens(pair)``
(what the packer budgets) and emits :class:`Segment` objects (what the row builder concatenates).
:class:`SeparateSequencesLayout` (above) stores the prompt twice; :class:`SharedPromptLayout`
(``train.share_prompt``) stores it once, and its docstring works the same pair through. The callers of
:func:`pack_pairs` and ``prepare_micro_batch`` do not change with the layout.
"""

from __future__ import annotations

import abc
import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orpo_ds.data.pairs import TokenizedPair  # the input, made by the data pipeline
from orpo_ds.logps import IGNORE_INDEX  # the label the log-prob head skips

__all__ = [
    "Segment", "PairLayout", "SeparateSequencesLayout", "SharedPromptLayout", "DEFAULT_LAYOUT", "layout_for",
    "PackedRow", "pack_pairs",
    "packing_efficiency", "plan_steps", "StepPlan", "plan_epoch", "plan_run", "build_row",
]

_FIX = "raise train.micro_batch_tokens to >= {n} or lower data.max_length"


# -------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Segment:
    """One sequence of a row (one ``seq_id``), as a layout places it. Arrays are ``[L]``.

    With :class:`SeparateSequencesLayout` it is prompt + response with positions from 0. With
    :class:`SharedPromptLayout` the chosen sequence is prompt + chosen, and the rejected one holds only its
    response and *borrows* the prompt: it attends to the first ``context_tokens`` tokens of the segment
    before it, and the last of those tokens predicts its first token, ``context_label``.

    Attributes:
        input_ids: ``[L]`` int64.
        position_ids: ``[L]`` int64.
        labels: ``[L]`` int64, next-token target of each position, ``IGNORE_INDEX`` where none.
        response_mask: ``[L]`` bool, True where ``labels`` is a response token.
        is_chosen: whether the sequence is the pair's chosen (else rejected) one.
        context_tokens: tokens at the start of the previous segment that this one attends to before its
            own (0: none).
        context_label: the response token the last context token predicts for this sequence (a second
            target of that position), ``IGNORE_INDEX`` when ``context_tokens`` is 0.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    response_mask: np.ndarray
    is_chosen: bool
    context_tokens: int = 0
    context_label: int = IGNORE_INDEX


class PairLayout(abc.ABC):
    """How a pair's tokens are laid out in a row. Stateless; subclasses must keep
    ``num_tokens(pair) == sum(len(s.input_ids) for s in segments(pair))`` (build_row checks it), since the
    packer budgets with the former and the row is built from the latter."""

    @abc.abstractmethod
    def num_tokens(self, pair: TokenizedPair) -> int:
        """Tokens the pair occupies in a row."""

    @abc.abstractmethod
    def segments(self, pair: TokenizedPair) -> list[Segment]:
        """The pair's segments, in row order."""


def _sequence_segment(prompt: tuple[int, ...], response: tuple[int, ...], is_chosen: bool) -> Segment:
    """One sequence ``prompt + response``, positions from 0, labels shifted within the sequence."""
    input_ids = np.asarray(prompt + response, dtype=np.int64)
    length = input_ids.shape[0]
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = input_ids[1:]
    # Position t predicts token t + 1, a response token iff t + 1 >= len(prompt); the last position
    # predicts nothing.
    response_mask = np.zeros(length, dtype=bool)
    response_mask[max(len(prompt) - 1, 0):length - 1] = True
    return Segment(input_ids, np.arange(length, dtype=np.int64), labels, response_mask, is_chosen)


class SeparateSequencesLayout(PairLayout):
    """Two independent sequences, ``[prompt + chosen]`` then ``[prompt + rejected]``, each with position
    ids from 0. The prompt is stored twice: ``2*len(prompt) + len(chosen) + len(rejected)`` tokens."""

    def num_tokens(self, pair: TokenizedPair) -> int:
        return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)

    def segments(self, pair: TokenizedPair) -> list[Segment]:
        return [_sequence_segment(pair.prompt_ids, pair.chosen_ids, is_chosen=True),
                _sequence_segment(pair.prompt_ids, pair.rejected_ids, is_chosen=False)]


class SharedPromptLayout(PairLayout):
    """Prompt once: ``[prompt + chosen]`` then ``[rejected]``, ``len(prompt) + len(chosen) + len(rejected)``
    tokens. The rejected response attends to the prompt's keys and values, never to the chosen ones, and
    its position ids continue from the prompt's end, so every token sees exactly what it sees in
    :class:`SeparateSequencesLayout` and gets the same hidden state.

    The first chosen token and the first rejected token are both predicted from the prompt's last
    position: that position carries the chosen token as its label, and the rejected segment names the
    rejected token as its ``context_label``, which ``build_row`` turns into a second head target of the
    same position (``PackedRow.extra_*``).

    Worked example: the pair of the module docstring, prompt ``(11, 12)``, chosen ``(21, 22, 2)``, rejected
    ``(31, 2)``; ``T = 7`` instead of 9::

        t               0    1    2    3    4  |  5    6
        input_ids      11   12   21   22    2  | 31    2
        position_ids    0    1    2    3    4  |  2    3
        labels         12   21   22    2 -100  |  2 -100
        response_mask   F    T    T    T    F  |  T    F
        seq_id          0    0    0    0    0  |  1    1
        attends to      causal over 0..t       |  0, 1, then causal over 5..t

        extra target: position 1 (token 12) -> label 31, sequence 1, a response token

    The chosen response scores 21, 22, 2 at t = 1, 2, 3; the rejected one 31 at t = 1 (the extra target)
    and 2 at t = 5: the same five log-probs as the separate layout. The prompt-predicting target (t = 0)
    belongs to the chosen sequence, so ``nll_on_prompt`` counts the prompt once, as without sharing. An
    empty prompt leaves nothing to share: the two responses are then laid out as separate sequences.
    """

    def num_tokens(self, pair: TokenizedPair) -> int:
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)

    def segments(self, pair: TokenizedPair) -> list[Segment]:
        prompt = pair.prompt_ids
        chosen = _sequence_segment(prompt, pair.chosen_ids, is_chosen=True)
        if not prompt:
            return [chosen, _sequence_segment((), pair.rejected_ids, is_chosen=False)]
        rejected = np.asarray(pair.rejected_ids, dtype=np.int64)
        labels = np.full(rejected.shape[0], IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = rejected[1:]
        response_mask = np.zeros(rejected.shape[0], dtype=bool)
        response_mask[:-1] = True
        positions = np.arange(len(prompt), len(prompt) + rejected.shape[0], dtype=np.int64)
        return [chosen, Segment(rejected, positions, labels, response_mask, is_chosen=False,
                                context_tokens=len(prompt), context_label=int(rejected[0]))]


DEFAULT_LAYOUT: PairLayout = SeparateSequencesLayout()


def layout_for(share_prompt: bool) -> PairLayout:
    """The layout of ``train.share_prompt``."""
    return SharedPromptLayout() if share_prompt else DEFAULT_LAYOUT


# ------------------------------------------------------------------------------------------ the packer


def _check_int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _pair_sizes(pair_num_tokens: Sequence[int], micro_batch_tokens: int,
                pair_ids: Sequence[int] | None) -> np.ndarray:
    """Validated ``[N]`` int64 sizes. Every pair must fit: a pair is never silently dropped."""
    _check_int_at_least("micro_batch_tokens", micro_batch_tokens, 1)
    sizes = np.asarray(pair_num_tokens)
    if sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu":
        raise ValueError(f"pair_num_tokens must be a 1-D sequence of ints, got dtype {sizes.dtype} "
                         f"shape {sizes.shape}")
    sizes = sizes.astype(np.int64)
    if pair_ids is not None and len(pair_ids) != len(sizes):
        raise ValueError(f"pair_ids has {len(pair_ids)} entries for {len(sizes)} pairs")

    def pid(i: int) -> int:
        return int(pair_ids[i]) if pair_ids is not None else i

    if sizes.min() < 1:
        i = int(np.argmin(sizes))
        raise ValueError(f"pair {pid(i)} has {int(sizes[i])} tokens; every pair needs >= 1")
    too_long = np.flatnonzero(sizes > micro_batch_tokens)
    if too_long.size:
        # Name the longest so that one change of the budget fixes every offender.
        i = int(too_long[np.argmax(sizes[too_long])])
        n = int(sizes[i])
        raise ValueError(
            f"pair {pid(i)} has {n} tokens, more than train.micro_batch_tokens={micro_batch_tokens} "
            f"({too_long.size} pair(s) too long, this is the longest): {_FIX.format(n=n)}")
    return sizes


def _best_fit(order: np.ndarray, sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Best fit: each item goes to the open bin with the least free space that still holds it.

    ``free_caps`` is the sorted list of distinct free capacities of open bins and ``bins_with_free`` maps
    each to a stack of bin ids, so a lookup is one bisect: O(N log B) plus list shifts of at most
    ``min(B, capacity)`` ints, instead of O(N*B) scans.
    """
    size_list = sizes.tolist()
    bins: list[list[int]] = []
    bins_with_free: dict[int, list[int]] = {}
    free_caps: list[int] = []
    for i in order.tolist():
        size = size_list[i]
        k = bisect_left(free_caps, size)
        if k == len(free_caps):  # no open bin holds it
            b = len(bins)
            bins.append([i])
            free = capacity - size
        else:
            old_free = free_caps[k]
            stack = bins_with_free[old_free]
            b = stack.pop()
            if not stack:
                del bins_with_free[old_free]
                free_caps.pop(k)
            bins[b].append(i)
            free = old_free - size
        if free > 0:  # a full bin is closed for good
            stack = bins_with_free.get(free)
            if stack is None:
                bins_with_free[free] = [b]
                insort(free_caps, free)
            else:
                stack.append(b)
    return bins


def pack_pairs(pair_num_tokens: Sequence[int], micro_batch_tokens: int, *, seed: int, epoch: int,
               pair_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Pack pairs into bins of at most ``micro_batch_tokens`` tokens (best-fit-decreasing).

    Args:
        pair_num_tokens: ``[N]`` tokens of each pair in a row (``layout.num_tokens(pair)``).
        micro_batch_tokens: token budget of one row.
        seed, epoch: non-negative; the result is a deterministic function of them (and the sizes).
            Pairs are shuffled before the stable size sort, so equal-size pairs are ordered differently
            each epoch, and the bins are shuffled so rows of all sizes mix through the epoch.
        pair_ids: ``[N]`` ids used in error messages (default: the positions ``0..N-1``).
    Returns:
        Bins: lists of indices into ``pair_num_tokens``; every index appears in exactly one bin.
    Raises:
        ValueError: a pair longer than the budget (named, with its length and the fix), or bad arguments.
    """
    sizes = _pair_sizes(pair_num_tokens, micro_batch_tokens, pair_ids)
    _check_int_at_least("seed", seed, 0)
    _check_int_at_least("epoch", epoch, 0)
    rng = np.random.default_rng([int(seed), int(epoch)])
    shuffled = rng.permutation(sizes.shape[0])
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    bins = _best_fit(order, sizes, int(micro_batch_tokens))
    return [bins[b] for b in rng.permutation(len(bins)).tolist()]


def packing_efficiency(bins: Sequence[Sequence[int]], pair_num_tokens: Sequence[int],
                       micro_batch_tokens: int) -> float:
    """Real tokens over the capacity of the bins: ``sum(tokens) / (len(bins) * micro_batch_tokens)``.
    0.0 for no bins."""
    _check_int_at_least("micro_batch_tokens", micro_batch_tokens, 1)
    if not bins:
        return 0.0
    sizes = np.asarray(pair_num_tokens, dtype=np.int64)
    used = sum(int(sizes[list(b)].sum()) for b in bins)
    return used / (len(bins) * micro_batch_tokens)


# ------------------------------------------------------------------------------------- step planning


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


def plan_steps(bin_num_tokens: Sequence[int], world_size: int,
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
class StepPlan:
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


def epoch_rows(pairs: Sequence[TokenizedPair], micro_batch_tokens: int, *, seed: int, epoch: int,
               layout: PairLayout = DEFAULT_LAYOUT) -> tuple[list[list[int]], list[int]]:
    """One epoch's packed rows (pair indices) in the order steps consume them, and their token counts.
    They do not depend on the world size: only how they are dealt to steps and ranks does."""
    lengths = [layout.num_tokens(p) for p in pairs]
    bins = pack_pairs(lengths, micro_batch_tokens, seed=seed, epoch=epoch, pair_ids=[p.pair_id for p in pairs])
    return bins, [sum(lengths[i] for i in b) for b in bins]


def deal_rows(bins: list[list[int]], bin_tokens: list[int], world_size: int, grad_accum: int,
              epoch: int) -> list[StepPlan]:
    """Rows to optimizer steps, ranks and micro-batch slots (:func:`plan_steps`)."""
    return [StepPlan(epoch, [[bins[b] if b is not None else None for b in rank_slots] for rank_slots in step])
            for step in plan_steps(bin_tokens, world_size, grad_accum)]


def plan_epoch(pairs: Sequence[TokenizedPair], micro_batch_tokens: int, world_size: int, grad_accum: int, *,
               seed: int, epoch: int, layout: PairLayout = DEFAULT_LAYOUT) -> list[StepPlan]:
    """Pack one epoch's pairs into rows and deal the rows to steps and ranks: a deterministic function of
    its arguments, so every rank computes the same plan with no communication."""
    bins, bin_tokens = epoch_rows(pairs, micro_batch_tokens, seed=seed, epoch=epoch, layout=layout)
    return deal_rows(bins, bin_tokens, world_size, grad_accum, epoch)


def plan_run(pairs: Sequence[TokenizedPair], micro_batch_tokens: int, world_size: int, grad_accum: int, *,
             seed: int, epochs: int, max_steps: int = 0, layout: PairLayout = DEFAULT_LAYOUT) -> list[StepPlan]:
    """The whole run's steps: ``epochs`` epochs (each packed afresh), cut at ``max_steps`` when > 0."""
    steps: list[StepPlan] = []
    for epoch in range(epochs):
        steps += plan_epoch(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epoch=epoch,
                            layout=layout)
        if max_steps and len(steps) >= max_steps:
            break
    return steps[:max_steps] if max_steps else steps


def replan_run(pairs: Sequence[TokenizedPair], micro_batch_tokens: int, old_world_size: int, world_size: int,
               grad_accum: int, *, done_steps: int, seed: int, epochs: int, max_steps: int = 0,
               layout: PairLayout = DEFAULT_LAYOUT) -> list[StepPlan]:
    """The step plan of a run resumed on ``world_size`` ranks after ``done_steps`` steps on
    ``old_world_size``: those steps as they ran, then the rest of their epoch's rows dealt to the new world
    size, then the later epochs planned for it. An epoch's rows do not depend on the world size, and steps
    consume them in order, so no pair of the epoch is trained twice and none is skipped. ``max_steps``
    still caps the total number of optimizer steps.
    """
    old = plan_run(pairs, micro_batch_tokens, old_world_size, grad_accum, seed=seed, epochs=epochs,
                   max_steps=max_steps, layout=layout)
    done = old[:done_steps]
    if not done:
        return plan_run(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epochs=epochs,
                        max_steps=max_steps, layout=layout)
    epoch = done[-1].epoch
    consumed = sum(step.num_filled_rows for step in done if step.epoch == epoch)
    bins, bin_tokens = epoch_rows(pairs, micro_batch_tokens, seed=seed, epoch=epoch, layout=layout)
    steps = done + deal_rows(bins[consumed:], bin_tokens[consumed:], world_size, grad_accum, epoch)
    for later in range(epoch + 1, epochs):
        if max_steps and len(steps) >= max_steps:
            break
        steps += plan_epoch(pairs, micro_batch_tokens, world_size, grad_accum, seed=seed, epoch=later, layout=layout)
    return steps[:max_steps] if max_steps else steps


# ------------------------------------------------------------------------------- row building


@dataclass(frozen=True)
class PackedRow:
    """One packed row (numpy). ``T`` tokens, ``S`` sequences, ``P = num_pairs`` pairs.

    Attributes:
        input_ids: ``[T]`` int64.
        position_ids: ``[T]`` int64, restarting at 0 for each sequence.
        labels: ``[T]`` int64, ``input_ids[t + 1]`` when ``t + 1`` is in the same sequence, else ``IGNORE_INDEX``.
        response_mask: ``[T]`` bool, True where ``labels[t]`` is a response token (EOS included).
        seq_id: ``[T]`` int64 in ``[0, S)``, non-decreasing.
        seq_pair_index: ``[S]`` int64, index of the sequence's pair within the row (``0..P-1``).
        seq_pair_id: ``[S]`` int64, ``TokenizedPair.pair_id``.
        seq_is_chosen: ``[S]`` bool.
        seq_lengths: ``[S]`` int64, sums to ``T``.
        chosen_seq, rejected_seq: ``[P]`` int64, the sequence index of each pair's chosen / rejected
            response, in pair order.
        pair_ids: ``[P]`` int64, ``TokenizedPair.pair_id`` in pair order.
        seq_context_start, seq_context_end: ``[S]`` int64, the span of the row each sequence attends to
            before its own tokens (equal: none; see :class:`SharedPromptLayout`).
        extra_position, extra_label, extra_seq: ``[E]`` int64, head targets beyond ``labels``: position
            ``extra_position[e]`` also predicts response token ``extra_label[e]`` of sequence
            ``extra_seq[e]`` (a shared prompt's last position predicting the rejected response's first
            token). ``E = 0`` without a shared prompt.
        num_pairs: ``P >= 1``.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    response_mask: np.ndarray
    seq_id: np.ndarray
    seq_pair_index: np.ndarray
    seq_pair_id: np.ndarray
    seq_is_chosen: np.ndarray
    seq_lengths: np.ndarray
    chosen_seq: np.ndarray
    rejected_seq: np.ndarray
    pair_ids: np.ndarray
    seq_context_start: np.ndarray
    seq_context_end: np.ndarray
    extra_position: np.ndarray
    extra_label: np.ndarray
    extra_seq: np.ndarray
    num_pairs: int

    def __post_init__(self) -> None:
        # Cheap shape checks: a malformed row fails here, not as a cryptic index error in the loss.
        t = self.input_ids.shape
        s = self.seq_lengths.shape
        for name in ("position_ids", "labels", "response_mask", "seq_id"):
            if getattr(self, name).shape != t:
                raise ValueError(f"PackedRow.{name} has shape {getattr(self, name).shape}, expected {t}")
        for name in ("seq_pair_index", "seq_pair_id", "seq_is_chosen", "seq_context_start", "seq_context_end"):
            if getattr(self, name).shape != s:
                raise ValueError(f"PackedRow.{name} has shape {getattr(self, name).shape}, expected {s}")
        for name in ("chosen_seq", "rejected_seq", "pair_ids"):
            if getattr(self, name).shape != (self.num_pairs,):
                raise ValueError(f"PackedRow.{name} has shape {getattr(self, name).shape}, expected "
                                 f"({self.num_pairs},)")
        e = self.extra_position.shape
        for name in ("extra_label", "extra_seq"):
            if getattr(self, name).shape != e:
                raise ValueError(f"PackedRow.{name} has shape {getattr(self, name).shape}, expected {e}")
        if int(self.seq_lengths.sum()) != t[0]:
            raise ValueError(f"PackedRow.seq_lengths sum to {int(self.seq_lengths.sum())}, not T={t[0]}")

    @property
    def num_tokens(self) -> int:
        """``T``."""
        return int(self.input_ids.shape[0])



def build_row(pairs: Sequence[TokenizedPair], layout: PairLayout = DEFAULT_LAYOUT) -> PackedRow:
    """Lay the pairs of one bin out in one row: pair by pair, each pair's segments in the layout's order
    (chosen, then rejected). See the module docstring's example, and :class:`SharedPromptLayout`'s.

    Args:
        pairs: ``P >= 1`` pairs (an empty slot runs ``orpo_ds.batch.dummy_micro_batch`` instead).
        layout: how each pair is laid out.
    Returns:
        A :class:`PackedRow` with ``T = sum(layout.num_tokens(p))`` tokens.
    """
    if not pairs:
        raise ValueError("build_row needs at least one pair; an empty slot runs orpo_ds.batch.dummy_micro_batch")
    segments: list[Segment] = []
    seq_pair_index: list[int] = []
    seq_pair_id: list[int] = []
    chosen_seq: list[int] = []
    rejected_seq: list[int] = []
    context: list[tuple[int, int]] = []  # per sequence: the attended span before its own tokens
    extras: list[tuple[int, int, int]] = []  # (position, label, sequence)
    start = 0
    for index, pair in enumerate(pairs):
        pair_segments = layout.segments(pair)
        laid_out = sum(len(s.input_ids) for s in pair_segments)
        if laid_out != layout.num_tokens(pair):
            raise ValueError(f"{type(layout).__name__} laid out {laid_out} tokens for pair {pair.pair_id} "
                             f"but num_tokens says {layout.num_tokens(pair)}: the packer's budget is wrong")
        previous_start = start
        for segment in pair_segments:
            seq = len(segments)
            (chosen_seq if segment.is_chosen else rejected_seq).append(seq)
            if segment.context_tokens:
                span = (previous_start, previous_start + segment.context_tokens)
                context.append(span)
                extras.append((span[1] - 1, segment.context_label, seq))
            else:
                context.append((start, start))
            segments.append(segment)
            previous_start, start = start, start + len(segment.input_ids)
        seq_pair_index.extend([index] * len(pair_segments))
        seq_pair_id.extend([pair.pair_id] * len(pair_segments))

    seq_lengths = np.array([len(s.input_ids) for s in segments], dtype=np.int64)
    spans = np.array(context, dtype=np.int64).reshape(-1, 2)
    extra = np.array(extras, dtype=np.int64).reshape(-1, 3)
    return PackedRow(
        input_ids=np.concatenate([s.input_ids for s in segments]),
        position_ids=np.concatenate([s.position_ids for s in segments]),
        labels=np.concatenate([s.labels for s in segments]),
        response_mask=np.concatenate([s.response_mask for s in segments]),
        seq_id=np.repeat(np.arange(len(segments), dtype=np.int64), seq_lengths),
        seq_pair_index=np.array(seq_pair_index, dtype=np.int64),
        seq_pair_id=np.array(seq_pair_id, dtype=np.int64),
        seq_is_chosen=np.array([s.is_chosen for s in segments], dtype=bool),
        seq_lengths=seq_lengths,
        chosen_seq=np.array(chosen_seq, dtype=np.int64),
        rejected_seq=np.array(rejected_seq, dtype=np.int64),
        pair_ids=np.array([p.pair_id for p in pairs], dtype=np.int64),
        seq_context_start=spans[:, 0].copy(), seq_context_end=spans[:, 1].copy(),
        extra_position=extra[:, 0].copy(), extra_label=extra[:, 1].copy(), extra_seq=extra[:, 2].copy(),
        num_pairs=len(pairs),
    )
