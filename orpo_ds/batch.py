"""From a packed row to model inputs, and from head log-probs to the ORPO loss of one micro-batch.

Pure tensor code shared by training, evaluation and the tests' references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orpo_ds.attention import Segment, segments_from_lengths
from orpo_ds.data import TokenizedPair
from orpo_ds.devices import to_device
from orpo_ds.logps import IGNORE_INDEX, sequence_logp_sums, sequence_mean_logps, sequence_means
from orpo_ds.loss import NLL_STAT_KEYS, orpo_loss, orpo_pair_stats
from orpo_ds.packing import DEFAULT_LAYOUT, PackedRow, PairLayout, build_row


@dataclass(frozen=True)
class MicroBatch:
    """One packed row, ready for :class:`orpo_ds.model.PolicyWithChunkedHead`.

    T tokens in the row, S sequences, P pairs, M head targets (a position can be the target of two
    sequences: a shared prompt's last position predicts both responses' first tokens). The counts are
    host integers, computed from the row before it reaches the device, so reading them costs no sync.

    Under sequence parallelism (a :class:`Shard`) the batch holds one rank's slice of the row: its
    ``T / N`` tokens and the head targets among them; ``segments``, S and P stay the whole row's, and the
    counts are this slice's, so that summed over the ranks each token, NLL token and pair counts once.
    """

    input_ids: torch.Tensor  # [1, T] (a shard: [1, T / N])
    position_ids: torch.Tensor  # [1, T] (a shard: [1, T / N])
    head_positions: torch.Tensor  # [M] int64 position of each head target in input_ids (may repeat)
    head_labels: torch.Tensor  # [M] int64 the token each head target scores
    head_seq_id: torch.Tensor  # [M] sequence of each head target
    head_is_response: torch.Tensor  # [M] bool, counts towards the sequence's average log-prob
    head_is_nll: torch.Tensor  # [M] bool, counts towards the SFT (NLL) term
    chosen_seq: torch.Tensor  # [P] sequence index of each pair's chosen response
    rejected_seq: torch.Tensor  # [P] sequence index of each pair's rejected response
    pair_ids: torch.Tensor  # [P] dataset pair ids (for logs)
    # [S + 1] int32 sequence starts and T, from the packer's lengths: flash-attn varlen's boundaries, given
    # explicitly so no layer has to derive them from position_ids (a host sync per layer). None when a
    # sequence attends to a span outside itself (a shared prompt), which one set of boundaries cannot say.
    cu_seqlens: torch.Tensor | None
    max_seqlen: int  # longest sequence of the row
    # the row's attention as host metadata, for orpo_ds.attention.SEGMENTED_SDPA
    segments: tuple[Segment, ...]
    num_sequences: int  # S
    num_tokens: int  # T (0 for a dummy batch: it carries no data); a shard: its real tokens
    num_pairs: int  # P; a shard: P on the row's first shard, 0 on the others
    num_nll_tokens: int  # head_is_nll.sum()
    is_dummy: bool = False

    @property
    def owns_pairs(self) -> bool:
        """Whether this batch's pair statistics count: every shard of a row computes the same pairs."""
        return self.num_pairs > 0

    def model_inputs(self) -> dict[str, torch.Tensor | int | None]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "head_positions": self.head_positions, "head_labels": self.head_labels,
                "segments": self.segments, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen}


def row_segments(row: PackedRow) -> tuple[Segment, ...]:
    """The attention segments of ``row``: each sequence causal over itself, after its context span."""
    ends = np.cumsum(row.seq_lengths).tolist()
    starts = [0, *ends[:-1]]
    return tuple(Segment(start, end, int(c0), int(c1)) for start, end, c0, c1
                 in zip(starts, ends, row.seq_context_start.tolist(), row.seq_context_end.tolist(), strict=True))


@dataclass(frozen=True)
class Shard:
    """One rank's part of every row under sequence parallelism: the ``index``-th of ``count`` equal,
    contiguous slices of the row padded to a multiple of ``count`` with ``pad_token_id``. The padding is a
    segment of its own, attended to by nothing else and scored by nothing, so every slice holds tokens
    and Ulysses' all-to-all gets equal slices."""

    index: int
    count: int
    pad_token_id: int

    def bounds(self, tokens: int) -> tuple[int, int, int]:
        """``(start, end, padded_length)`` of this slice of a row of ``tokens`` tokens."""
        padded = -(-max(tokens, 1) // self.count) * self.count
        width = padded // self.count
        return self.index * width, (self.index + 1) * width, padded


def prepare_micro_batch(row: PackedRow, *, nll_on_prompt: bool, device: torch.device | str = "cpu",
                        shard: Shard | None = None) -> MicroBatch:
    """Tensors of ``row`` on ``device``, plus the head targets and their masks; with ``shard``, this
    rank's slice of them (:class:`Shard`).

    A position reaches the head when its label is a response token (both responses need their average
    log-prob), or, with ``nll_on_prompt``, when it predicts a prompt token of a chosen sequence; then come
    the row's extra targets (always response tokens). Computed on the host, from the row's arrays, and
    copied once. Labels come from the whole row, so a slice's last position is scored against the first
    token of the next slice.
    """
    nll_token = row.seq_is_chosen[row.seq_id] & (row.labels != IGNORE_INDEX)  # [T]
    if not nll_on_prompt:
        nll_token &= row.response_mask
    head_mask = row.response_mask | nll_token  # [T]
    extra_nll = row.seq_is_chosen[row.extra_seq]  # [E]

    def put(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        # A copy on the CPU too, so that in-place edits of a batch never reach the (frozen) row; on a GPU
        # queued behind the device's work rather than waiting for it (orpo_ds.devices).
        return to_device(torch.from_numpy(np.ascontiguousarray(array)).to(dtype=dtype, copy=True), device)

    has_context = bool((row.seq_context_end > row.seq_context_start).any())
    head = {"positions": np.concatenate([np.flatnonzero(head_mask), row.extra_position]),
            "labels": np.concatenate([row.labels[head_mask], row.extra_label]),
            "seq_id": np.concatenate([row.seq_id[head_mask], row.extra_seq]),
            "is_response": np.concatenate([row.response_mask[head_mask], np.ones(len(extra_nll), dtype=bool)]),
            "is_nll": np.concatenate([nll_token[head_mask], extra_nll])}
    input_ids, position_ids, segments = row.input_ids, row.position_ids, row_segments(row)
    num_tokens, num_pairs = row.num_tokens, row.num_pairs
    if shard is not None:
        start, end, padded = shard.bounds(row.num_tokens)
        pad = padded - row.num_tokens
        input_ids = np.concatenate([input_ids, np.full(pad, shard.pad_token_id, dtype=input_ids.dtype)])[start:end]
        position_ids = np.concatenate([position_ids, np.arange(pad, dtype=position_ids.dtype)])[start:end]
        segments += (Segment(row.num_tokens, padded),) if pad else ()
        inside = (head["positions"] >= start) & (head["positions"] < end)
        head = {key: values[inside] for key, values in head.items()}
        head["positions"] = head["positions"] - start
        num_tokens = max(0, min(end, row.num_tokens) - start)
        num_pairs = row.num_pairs if shard.index == 0 else 0
    return MicroBatch(
        input_ids=put(input_ids)[None], position_ids=put(position_ids)[None],
        head_positions=put(head["positions"]), head_labels=put(head["labels"]), head_seq_id=put(head["seq_id"]),
        head_is_response=put(head["is_response"]), head_is_nll=put(head["is_nll"]),
        chosen_seq=put(row.chosen_seq), rejected_seq=put(row.rejected_seq), pair_ids=put(row.pair_ids),
        # a shard runs the segmented backends only (they read the segments, not these boundaries)
        cu_seqlens=None if has_context or shard else put(np.concatenate([[0], np.cumsum(row.seq_lengths)]),
                                                         torch.int32),
        max_seqlen=int(row.seq_lengths.max()), segments=segments, num_sequences=int(row.seq_lengths.shape[0]),
        num_tokens=num_tokens, num_pairs=num_pairs, num_nll_tokens=int(head["is_nll"].sum()))


def dummy_micro_batch(pad_token_id: int, device: torch.device | str = "cpu", shard: Shard | None = None) -> MicroBatch:
    """A one-token stand-in for a rank with no real row in a step (with ``shard``: one token of each rank
    of the replica, which has no row either: a row of ``shard.count`` tokens).

    ZeRO-3 gathers parameters and reduces gradients collectively, so every rank must run the same number
    of forward/backward passes; :func:`micro_batch_loss` multiplies this batch's loss by zero.
    """
    one = torch.ones(1, dtype=torch.bool, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        position_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
        head_positions=torch.zeros(1, dtype=torch.long, device=device),
        head_labels=torch.full((1,), pad_token_id, dtype=torch.long, device=device),
        head_seq_id=torch.zeros(1, dtype=torch.long, device=device), head_is_response=~one, head_is_nll=~one,
        chosen_seq=empty, rejected_seq=empty, pair_ids=empty,
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=device), max_seqlen=1,
        segments=segments_from_lengths([1 if shard is None else shard.count]), num_sequences=1,
        num_tokens=0, num_pairs=0, num_nll_tokens=0, is_dummy=True)


def micro_batches(slots: Sequence[Sequence[int] | None], pairs: Sequence[TokenizedPair], *, nll_on_prompt: bool,
                  pad_token_id: int, device: torch.device | str = "cpu",
                  layout: PairLayout = DEFAULT_LAYOUT, shard: Shard | None = None) -> list[MicroBatch]:
    """One rank's micro-batches of one step, for training and evaluation alike.

    Args:
        slots: the rank's slots of a :class:`orpo_ds.packing.ScheduledStep` (``plan.rows[rank]``): each the
            pair indices of one packed row, or ``None`` where the rank has no row in this step, which runs
            a :func:`dummy_micro_batch` (the one place that rule is applied).
        pairs: the tokenized pairs the indices refer to.
        layout: the pairs' layout in a row, the one the slots were packed with.
        shard: under sequence parallelism, this rank's slice of every row.
    """
    return [dummy_micro_batch(pad_token_id, device, shard) if slot is None else
            prepare_micro_batch(build_row([pairs[i] for i in slot], layout), nll_on_prompt=nll_on_prompt,
                                device=device, shard=shard)
            for slot in slots]


def micro_batch_loss(token_logps: torch.Tensor, mb: MicroBatch, *, beta: float, global_nll_tokens: int,
                     global_pairs: int, sum_sequences: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of one micro-batch from its head log-probs.

    Args:
        token_logps: ``[M]`` fp32 log-probs of the head positions of ``mb``.
        sum_sequences: under sequence parallelism (``mb`` a shard), sums the ``[S]`` per-sequence log-prob
            sums and token counts over the row's ranks
            (:meth:`orpo_ds.distributed.SequenceParallel.sum_sequences`): every rank then forms the same
            average log-probs and odds-ratio term, while its NLL term covers its own tokens only.
    Returns:
        ``(loss, stats)`` as :func:`orpo_ds.loss.orpo_loss`; a dummy batch gives ``0 * sum`` so that
        every parameter still takes part in the backward pass. The pair statistics of a shard other than
        the row's first are zero, so that summed over ranks each pair counts once.
    """
    if mb.is_dummy:
        return token_logps.sum() * 0.0, {}
    sums, counts = sequence_logp_sums(token_logps, mb.head_seq_id, mb.num_sequences, mask=mb.head_is_response)
    if sum_sequences is not None:
        sums, counts = sum_sequences(sums), sum_sequences(counts)
    seq_logps = sequence_means(sums, counts)
    nll_sum = -(token_logps * mb.head_is_nll).sum()
    loss, stats = orpo_loss(seq_logps[mb.chosen_seq], seq_logps[mb.rejected_seq], nll_sum, mb.num_nll_tokens,
                            beta=beta, global_nll_tokens=global_nll_tokens, global_pairs=global_pairs)
    if not mb.owns_pairs:
        stats = {key: value if key in NLL_STAT_KEYS else torch.zeros_like(value) for key, value in stats.items()}
    return loss, stats


def micro_batch_pair_stats(token_logps: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Each pair's additive ORPO statistics (:func:`orpo_ds.loss.orpo_pair_stats`) in a real micro-batch.

    Args:
        token_logps: ``[M]`` fp32 log-probs of the head positions of ``mb``.
    Returns:
        ``[P, len(STAT_KEYS)]`` fp64, rows in ``mb.pair_ids`` order.
    """
    seq_logps = sequence_mean_logps(token_logps, mb.head_seq_id, mb.num_sequences, mask=mb.head_is_response)
    # NLL tokens lie in chosen sequences only (a shared prompt belongs to the chosen one), so a pair's NLL is
    # its chosen sequence's.
    nll = torch.zeros(mb.num_sequences, dtype=torch.float64, device=token_logps.device)
    seq_nll = nll.index_add(0, mb.head_seq_id, -(token_logps.detach().double() * mb.head_is_nll))
    seq_nll_tokens = nll.index_add(0, mb.head_seq_id, mb.head_is_nll.double())
    return orpo_pair_stats(seq_logps[mb.chosen_seq], seq_logps[mb.rejected_seq], seq_nll[mb.chosen_seq],
                           seq_nll_tokens[mb.chosen_seq])
