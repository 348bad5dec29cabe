"""From a packed row to model inputs, and from head log-probs to the ORPO loss of one micro-batch.

Pure tensor code shared by training, evaluation and the tests' references.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orpo_ds.logps import sequence_mean_logps
from orpo_ds.loss import orpo_loss
from orpo_ds.packing import PackedRow, collate


@dataclass(frozen=True)
class MicroBatch:
    """One packed row, ready for :class:`orpo_ds.model.PolicyWithChunkedHead`.

    T tokens in the row, S sequences, P pairs, M positions that reach the head.
    """

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [T] next-token targets, -100 where none
    head_mask: torch.Tensor  # [T] bool, positions whose log-prob is computed
    head_seq_id: torch.Tensor  # [M] sequence of each head position
    head_is_response: torch.Tensor  # [M] bool, counts towards the sequence's average log-prob
    head_is_nll: torch.Tensor  # [M] bool, counts towards the SFT (NLL) term
    chosen_seq: torch.Tensor  # [P] sequence index of each pair's chosen response
    rejected_seq: torch.Tensor  # [P] sequence index of each pair's rejected response
    pair_ids: torch.Tensor  # [P] dataset pair ids (for logs)
    # [S + 1] int32 sequence starts and T, from the packer's lengths: flash-attn varlen's boundaries, given
    # explicitly so no layer has to derive them from position_ids (a host sync per layer)
    cu_seqlens: torch.Tensor
    max_seqlen: int  # longest sequence of the row
    num_sequences: int
    num_tokens: int
    is_dummy: bool = False

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_seq.numel())

    @property
    def num_nll_tokens(self) -> int:
        return int(self.head_is_nll.sum())

    def model_inputs(self) -> dict[str, torch.Tensor | int]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels,
                "head_mask": self.head_mask, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen}


def prepare_micro_batch(row: PackedRow, *, nll_on_prompt: bool, device: torch.device | str = "cpu") -> MicroBatch:
    """Tensors of ``row`` plus the masks that decide which positions reach the head.

    A position reaches the head when its label is a response token (both responses need their average
    log-prob), or, with ``nll_on_prompt``, when it predicts a prompt token of a chosen sequence.
    """
    t = collate(row, device=device)
    labels, seq_id = t["labels"], t["seq_id"]
    response = t["response_mask"]
    is_chosen_token = t["seq_is_chosen"][seq_id]
    nll_token = is_chosen_token & (labels != -100)
    if not nll_on_prompt:
        nll_token = nll_token & response
    head_mask = response | nll_token
    pair_index, is_chosen = t["seq_pair_index"], t["seq_is_chosen"]
    num_pairs = int(row.num_pairs)
    # Sequence index of each pair's chosen / rejected response, in pair order.
    chosen_seq = torch.empty(num_pairs, dtype=torch.long, device=device)
    rejected_seq = torch.empty(num_pairs, dtype=torch.long, device=device)
    seq_index = torch.arange(pair_index.numel(), device=device)
    chosen_seq[pair_index[is_chosen]] = seq_index[is_chosen]
    rejected_seq[pair_index[~is_chosen]] = seq_index[~is_chosen]
    pair_ids = torch.empty(num_pairs, dtype=torch.long, device=device)
    pair_ids[pair_index] = t["seq_pair_id"]
    return MicroBatch(
        input_ids=t["input_ids"], position_ids=t["position_ids"], labels=labels, head_mask=head_mask,
        head_seq_id=seq_id[head_mask], head_is_response=response[head_mask], head_is_nll=nll_token[head_mask],
        chosen_seq=chosen_seq, rejected_seq=rejected_seq, pair_ids=pair_ids,
        cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(row.seq_lengths)]), dtype=torch.int32, device=device),
        max_seqlen=int(row.seq_lengths.max()), num_sequences=int(pair_index.numel()), num_tokens=int(labels.numel()))


def dummy_micro_batch(pad_token_id: int, device: torch.device | str = "cpu") -> MicroBatch:
    """A one-token stand-in for a rank with no real row in a step.

    ZeRO-3 gathers parameters and reduces gradients collectively, so every rank must run the same number
    of forward/backward passes; the caller multiplies this batch's loss by zero.
    """
    one = torch.ones(1, dtype=torch.bool, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        position_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
        labels=torch.full((1,), pad_token_id, dtype=torch.long, device=device), head_mask=one,
        head_seq_id=torch.zeros(1, dtype=torch.long, device=device), head_is_response=~one, head_is_nll=~one,
        chosen_seq=empty, rejected_seq=empty, pair_ids=empty,
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=device), max_seqlen=1, num_sequences=1,
        num_tokens=0, is_dummy=True)


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
