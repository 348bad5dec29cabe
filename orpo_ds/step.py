"""One optimizer step of the loop: its micro-batches through the engine, its statistics read once, the
guard against non-finite losses, and the metrics record the step logs.

The loss is normalised by the step's global NLL-token and pair counts, all-reduced before the first
forward pass of the step (docs/objective.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from orpo_ds import distributed as dist_lib
from orpo_ds.batch import MicroBatch, micro_batch_loss
from orpo_ds.data import TokenizedPair
from orpo_ds.flops import step_flops, step_shape
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.packing import ScheduledStep, fill_ratio


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did, the same on every rank except ``nonfinite_pair_ids``."""

    sums: dict[str, float]  # STAT_KEYS summed over the step's micro-batches on all ranks
    tokens: float  # real tokens of the step, all ranks
    nonfinite_losses: int  # micro-batches, all ranks, whose loss was not finite
    applied: bool  # whether the optimizer applied the update (the engine's non-finite guard)
    nonfinite_pair_ids: list[int]  # this rank's pairs in micro-batches with a non-finite loss

    @property
    def troubled(self) -> bool:
        return not self.applied or self.nonfinite_losses > 0


def train_step(engine, mbs: list[MicroBatch], *, beta: float) -> StepStats:
    """Forward, backward and step over this rank's micro-batches of one optimizer step.

    The loop reads the host twice per step, never per micro-batch (Liger's head kernel, when on, reads
    its token count inside each forward and backward): the global pair and NLL-token counts before
    the first forward (the loss divides by them), and the step's stats, stacked on the device and
    reduced once, after the update. A non-finite loss therefore does not stop the step: its gradients
    are kept out of the update by the engine's guard (:meth:`orpo_ds.engine.Engine.step` returns False).
    """
    counts = torch.tensor([sum(mb.num_pairs for mb in mbs), sum(mb.num_nll_tokens for mb in mbs)], dtype=torch.float64)
    global_pairs, global_nll_tokens = (max(int(v), 1) for v in dist_lib.reduce_to_host(counts))
    device = mbs[0].input_ids.device
    sums = torch.zeros(len(STAT_KEYS) + 2, dtype=torch.float64, device=device)  # stats, tokens, non-finite
    finite_flags, applied = [], False
    for mb in mbs:
        loss, stats = micro_batch_loss(engine(**mb.model_inputs()), mb, beta=beta, global_pairs=global_pairs,
                                       global_nll_tokens=global_nll_tokens)
        finite = torch.isfinite(loss.detach())
        finite_flags.append(finite)
        engine.backward(loss)
        applied = engine.step()
        if stats:
            sums[: len(STAT_KEYS)] += torch.stack([stats[k] for k in STAT_KEYS]).double()
        sums[-2] += mb.num_tokens
        sums[-1] += (~finite).double()
    totals = dist_lib.reduce_to_host(sums)
    bad_pairs = []
    if totals[-1]:  # rare: a host read per micro-batch only to name the pairs
        bad_pairs = [i for mb, ok in zip(mbs, dist_lib.host_values(torch.stack(finite_flags)), strict=True) if not ok
                     for i in mb.pair_ids.tolist()]
    return StepStats(sums=dict(zip(STAT_KEYS, totals[: len(STAT_KEYS)], strict=True)), tokens=totals[-2],
                     nonfinite_losses=int(totals[-1]), applied=applied, nonfinite_pair_ids=bad_pairs)


class NonFiniteGuard:
    """Counts consecutive troubled steps (a skipped update or a non-finite loss) and ends the run after
    ``train.max_nonfinite_steps`` of them, naming the pairs involved."""

    def __init__(self, max_steps: int, rank: int):
        self.max_steps, self.rank = max_steps, rank
        self.streak, self.last_step = 0, 0

    def observe(self, step: int, stats: StepStats) -> dict[str, Any]:
        """Record ``step``; returns the fields a troubled step adds to its metrics record (else none)."""
        self.streak = self.streak + 1 if stats.troubled else 0
        self.last_step = step
        if not stats.troubled:
            return {}
        if stats.nonfinite_pair_ids:
            outcome = "its gradients were finite: update applied" if stats.applied else "update skipped"
            print(f"[rank {self.rank}] step {step}: non-finite loss, {outcome}; pair ids "
                  f"{stats.nonfinite_pair_ids}", file=sys.stderr, flush=True)
        return {"skipped": not stats.applied, "nonfinite_pair_ids": stats.nonfinite_pair_ids}

    def raise_if_exhausted(self) -> None:
        """Called once the step's record is logged, so the log names the last troubled step too."""
        if self.streak >= self.max_steps:
            raise NonFiniteLossError(f"{self.streak} consecutive steps (up to step {self.last_step}) had a "
                                     f"non-finite loss; see the pair ids in metrics.jsonl. Check the data and "
                                     f"the learning rate, or raise train.max_nonfinite_steps")


class StepMetrics:
    """Builds the metrics record of a step: the ORPO figures (TRL names), the optimizer's, throughput,
    packing efficiency and, where the device's peak is known, MFU."""

    def __init__(self, *, beta: float, micro_batch_tokens: int, pairs: list[TokenizedPair], nll_on_prompt: bool,
                 model_config, peak_flops: float | None, world_size: int):
        self.beta, self.micro_batch_tokens = beta, micro_batch_tokens
        self.pairs, self.nll_on_prompt = pairs, nll_on_prompt
        self.model_config, self.peak_flops, self.world_size = model_config, peak_flops, world_size

    def __call__(self, step: int, plan: ScheduledStep, stats: StepStats, *, lr: float, grad_norm: float,
                 seconds: float) -> dict[str, Any]:
        lengths, head_positions = step_shape(plan, self.pairs, self.nll_on_prompt)
        # tokens: what the rows held; sequence_tokens: both sequences of every pair, the prompt in each, as
        # a trainer without a shared prompt (TRL) counts them. They differ only with train.share_prompt.
        record = {"step": step, "epoch": plan.epoch, **orpo_metrics(stats.sums, self.beta), "grad_norm": grad_norm,
                  "lr": lr, "pairs": int(stats.sums["pairs"]), "tokens": int(stats.tokens),
                  "sequence_tokens": sum(lengths), "tokens_per_s": stats.tokens / seconds,
                  "packing_efficiency": fill_ratio(stats.tokens, plan.num_filled_rows, self.micro_batch_tokens),
                  "step_s": seconds}
        if self.peak_flops:
            flops = step_flops(self.model_config, lengths, head_positions)
            record["mfu"] = flops / seconds / (self.peak_flops * self.world_size)
        return record
