"""From a packed row to model inputs, and from head log-probs to the ORPO loss of one micro-batch.

Pure tensor code shared by training, evaluation and the tests' references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orpo_ds.attention import Segment, segments_from_lengths
from orpo_ds.data import TokenizedPair
from orpo_ds.logps import IGNORE_INDEX, sequence_mean_logps
from orpo_ds.loss import orpo_loss, orpo_pair_stats
from orpo_ds.packing import DEFAULT_LAYOUT, PackedRow, PairLayout, build_row


@dataclass(frozen=True)
class MicroBatch:
    """One packed row, ready for :class:`orpo_ds.model.PolicyWithChunkedHead`.

    T tokens in the row, S sequences, P pairs, M head targets (a position can be the target of two
    sequences: a shared prompt's last position predicts both responses' first tokens). The counts are
    host integers, computed from the row before it reaches the device, so reading them costs no sync.
    """

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    head_positions: torch.Tensor  # [M] int64 row position of each head target (may repeat)
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
    num_tokens: int  # T (0 for a dummy batch: it carries no data)
    num_pairs: int  # P
    num_nll_tokens: int  # head_is_nll.sum()
    is_dummy: bool = False

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


def prepare_micro_batch(row: PackedRow, *, nll_on_prompt: bool, device: torch.device | str = "cpu") -> MicroBatch:
    """Tensors of ``row`` on ``device``, plus the head targets and their masks.

    A position reaches the head when its label is a response token (both responses need their average
    log-prob), or, with ``nll_on_prompt``, when it predicts a prompt token of a chosen sequence; then come
    the row's extra targets (always response tokens). Computed on the host, from the row's arrays, and
    copied once.
    """
    nll_token = row.seq_is_chosen[row.seq_id] & (row.labels != IGNORE_INDEX)  # [T]
    if not nll_on_prompt:
        nll_token &= row.response_mask
    head_mask = row.response_mask | nll_token  # [T]
    extra_nll = row.seq_is_chosen[row.extra_seq]  # [E]

    def put(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        # A copy on the CPU too, so that in-place edits of a batch never reach the (frozen) row.
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype, copy=True)

    has_context = bool((row.seq_context_end > row.seq_context_start).any())
    head_is_nll = np.concatenate([nll_token[head_mask], extra_nll])
    return MicroBatch(
        input_ids=put(row.input_ids)[None], position_ids=put(row.position_ids)[None],
        head_positions=put(np.concatenate([np.flatnonzero(head_mask), row.extra_position])),
        head_labels=put(np.concatenate([row.labels[head_mask], row.extra_label])),
        head_seq_id=put(np.concatenate([row.seq_id[head_mask], row.extra_seq])),
        head_is_response=put(np.concatenate([row.response_mask[head_mask], np.ones(len(extra_nll), dtype=bool)])),
        head_is_nll=put(head_is_nll),
        chosen_seq=put(row.chosen_seq), rejected_seq=put(row.rejected_seq), pair_ids=put(row.pair_ids),
        cu_seqlens=None if has_context else put(np.concatenate([[0], np.cumsum(row.seq_lengths)]), torch.int32),
        max_seqlen=int(row.seq_lengths.max()), segments=row_segments(row),
        num_sequences=int(row.seq_lengths.shape[0]),
        num_tokens=row.num_tokens, num_pairs=row.num_pairs, num_nll_tokens=int(head_is_nll.sum()))


def dummy_micro_batch(pad_token_id: int, device: torch.device | str = "cpu") -> MicroBatch:
    """A one-token stand-in for a rank with no real row in a step.

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
        segments=segments_from_lengths([1]), num_sequences=1,
        num_tokens=0, num_pairs=0, num_nll_tokens=0, is_dummy=True)


def micro_batches(slots: Sequence[Sequence[int] | None], pairs: Sequence[TokenizedPair], *, nll_on_prompt: bool,
                  pad_token_id: int, device: torch.device | str = "cpu",
                  layout: PairLayout = DEFAULT_LAYOUT) -> list[MicroBatch]:
    """One rank's micro-batches of one step, for training and evaluation alike.

    Args:
        slots: the rank's slots of a :class:`orpo_ds.packing.ScheduledStep` (``plan.rows[rank]``): each the
            pair indices of one packed row, or ``None`` where the rank has no row in this step, which runs
            a :func:`dummy_micro_batch` (the one place that rule is applied).
        pairs: the tokenized pairs the indices refer to.
        layout: the pairs' layout in a row, the one the slots were packed with.
    """
    return [dummy_micro_batch(pad_token_id, device) if slot is None else
            prepare_micro_batch(build_row([pairs[i] for i in slot], layout), nll_on_prompt=nll_on_prompt,
                                device=device)
            for slot in slots]


def micro_batch_loss(token_logps: torch.Tensor, mb: MicroBatch, *, beta: float, global_nll_tokens: int,
                     global_pairs: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of one micro-batch from its head log-probs.

    Args:
        token_logps: ``[M]`` fp32 log-probs of the head positions of ``mb``.
    Returns:
        ``(loss, stats)`` as :func:`orpo_ds.loss.orpo_loss`; a dummy batch gives ``0 * sum`` so that
        every parameter still takes part in the backward pass.
    """
    if mb.is_dummy:
        return token_logps.sum() * 0.0, {}
    seq_logps = sequence_mean_logps(token_logps, mb.head_seq_id, mb.num_sequences, mask=mb.head_is_response)
    nll_sum = -(token_logps * mb.head_is_nll).sum()
    return orpo_loss(seq_logps[mb.chosen_seq], seq_logps[mb.rejected_seq], nll_sum, mb.num_nll_tokens,
                     beta=beta, global_nll_tokens=global_nll_tokens, global_pairs=global_pairs)


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
