"""Building one packed row: ids, positions, labels and segment metadata of its pairs (the row contract)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orpo_ds.data.pairs import TokenizedPair  # the input, made by the data pipeline
from orpo_ds.packing.layout import DEFAULT_LAYOUT, LaidOutSequence, PairLayout


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
    segments: list[LaidOutSequence] = []
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
