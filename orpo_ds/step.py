"""One optimizer step of the loop: its micro-batches through the engine, its statistics summed on the
device and read when the loop logs them, the guard against non-finite losses, and the metrics record.

The loss is normalised by the step's global NLL-token and pair counts, all-reduced before the first
forward pass of the step (docs/objective.md).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from orpo_ds import distributed as dist_lib
from orpo_ds.batch import MicroBatch, micro_batch_loss
from orpo_ds.data import TokenizedPair
from orpo_ds.flops import step_flops, step_shape
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.packing import ScheduledStep, fill_ratio
from orpo_ds.router import RouterLoss, expert_load_figures


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
    # a mixture of experts: aux_loss (the router's balancing loss, token-weighted over the step's rows) and
    # the moe/ expert-load figures; empty for a dense model
    router: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def troubled(self) -> bool:
        return not self.applied or self.nonfinite_losses > 0


@dataclass
class StepOutcome:
    """An optimizer step done: its statistics summed over ranks but still on the device, and what the host
    knows without reading it. :meth:`read` is the one host read of the step's figures."""

    totals: torch.Tensor  # [len(STAT_KEYS) + 2 (+ 1 + L * E)] float64, all ranks: stats, tokens, non-finite, router
    applied: bool  # the engine's answer: whether the update went in (DeepSpeed reports it on the host)
    tokens: int  # real tokens of the step, all ranks, from the counts read before it
    mbs: list[MicroBatch]
    finite_flags: list[torch.Tensor]  # per micro-batch, on the device: was its loss finite
    router: RouterLoss | None

    def read(self) -> StepStats:
        totals = dist_lib.host_values(self.totals)
        stats_end = len(STAT_KEYS) + 2
        router_figures = {}
        if self.router is not None:
            aux, *expert_counts = totals[stats_end:]
            layers = torch.tensor(expert_counts).reshape(-1, self.router.num_experts)
            router_figures = {"aux_loss": aux, **expert_load_figures(layers)}
        bad_pairs = []
        if totals[stats_end - 1]:  # rare: a host read per micro-batch only to name the pairs
            flags = dist_lib.host_values(torch.stack(self.finite_flags))
            bad_pairs = [i for mb, ok in zip(self.mbs, flags, strict=True) if not ok for i in mb.pair_ids.tolist()]
        return StepStats(sums=dict(zip(STAT_KEYS, totals[: len(STAT_KEYS)], strict=True)),
                         tokens=totals[stats_end - 2], nonfinite_losses=int(totals[stats_end - 1]),
                         applied=self.applied, nonfinite_pair_ids=bad_pairs, router=router_figures)


def train_step(engine, mbs: list[MicroBatch], *, beta: float, router: RouterLoss | None = None,
               sum_sequences: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepOutcome:
    """Forward, backward and step over this rank's micro-batches of one optimizer step.

    The host reads the device once here, never per micro-batch (Liger's head kernel, when on, reads its
    token count inside each forward and backward): the global pair, NLL-token and token counts before
    the first forward (the loss divides by them). The step's stats are stacked on the device and
    all-reduced after the update; the host reads them only through :meth:`StepOutcome.read`, which the
    loop calls on the steps it logs. A non-finite loss does not stop the step: its gradients are kept out
    of the update by the engine's guard (:meth:`orpo_ds.engine.Engine.step` returns False).

    With a mixture of experts (``router``), each row adds ``router.coef`` times its balancing loss weighted
    by its share of the step's tokens (:func:`router_loss_share`). Under sequence parallelism the batches
    are this rank's shards and ``sum_sequences`` sums their sequences' log-probs over the row's ranks
    (:func:`orpo_ds.batch.micro_batch_loss`).
    """
    counts = torch.tensor([sum(mb.num_pairs for mb in mbs), sum(mb.num_nll_tokens for mb in mbs),
                           sum(mb.num_tokens for mb in mbs)], dtype=torch.float64)
    step_pairs, step_nll_tokens, step_tokens = (int(v) for v in dist_lib.reduce_to_host(counts))
    # at least 1: a step of dummy rows only (a rank's data ran out) divides 0 by it
    global_pairs, global_nll_tokens, global_tokens = max(step_pairs, 1), max(step_nll_tokens, 1), max(step_tokens, 1)
    device = mbs[0].input_ids.device
    sums = torch.zeros(len(STAT_KEYS) + 2, dtype=torch.float64, device=device)  # stats, tokens, non-finite
    router_sums = None  # [1 + L * E]: the aux-loss shares, then every layer's expert counts
    finite_flags, applied = [], False
    for mb in mbs:
        output = engine(**mb.model_inputs())
        loss, stats = micro_batch_loss(output.token_logps, mb, beta=beta, global_pairs=global_pairs,
                                       global_nll_tokens=global_nll_tokens, sum_sequences=sum_sequences)
        if router is not None:
            share = router_loss_share(output.router_aux_loss, mb, global_tokens)
            loss = loss + router.coef * share
            # A dummy row's one token was routed too, but it is not data.
            row = torch.cat([share.detach().double().reshape(1),
                             output.expert_tokens.double().reshape(-1) * float(not mb.is_dummy)])
            router_sums = row if router_sums is None else router_sums + row
        finite = torch.isfinite(loss.detach())
        finite_flags.append(finite)
        engine.backward(loss)
        applied = engine.step()
        if stats:
            sums[: len(STAT_KEYS)] += torch.stack([stats[k] for k in STAT_KEYS]).double()
        sums[-2] += mb.num_tokens
        sums[-1] += (~finite).double()
    totals = dist_lib.all_reduce_sum(sums if router_sums is None else torch.cat([sums, router_sums]))
    return StepOutcome(totals=totals, applied=applied, tokens=step_tokens, mbs=mbs, finite_flags=finite_flags,
                       router=router)


def router_loss_share(aux_loss: torch.Tensor, mb: MicroBatch, global_tokens: int) -> torch.Tensor:
    """This row's part of the step's balancing loss: its loss times its share of the step's tokens (all
    ranks). Summed over the step, that is the token-weighted mean of the rows' losses, so it does not grow
    with the number of rows. Each row's own loss follows the family's definition over one forward pass,
    as in TRL, where one forward holds the batch. A dummy row's share is 0 (it still joins the backward)."""
    return aux_loss * (mb.num_tokens / global_tokens)


class NonFiniteGuard:
    """Counts consecutive troubled steps (a skipped update or a non-finite loss) and ends the run after
    ``train.max_nonfinite_steps`` of them, naming the pairs involved."""

    def __init__(self, max_steps: int, rank: int):
        self.max_steps, self.rank = max_steps, rank
        self.streak, self.last_step = 0, 0

    def clean(self, step: int) -> None:
        """Record ``step`` as untroubled without reading its figures: its update was applied. A non-finite
        loss whose gradients stayed finite (so the update went in) is seen only on the steps the loop
        reads, every ``train.log_steps``."""
        self.streak, self.last_step = 0, step

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
                 interval: list[tuple[ScheduledStep, int]], seconds: float) -> dict[str, Any]:
        """The record of ``step`` (its plan and figures). Throughput is measured over ``interval``, the steps
        since the last record (each plan with its real tokens, all ranks; ``step`` last), which took
        ``seconds``: on a GPU the host runs ahead of the device, so only a span that ends in a read of the
        device can be timed. With ``train.log_steps`` 1 that span is the step itself."""
        lengths, _ = step_shape(plan, self.pairs, self.nll_on_prompt)
        # tokens: what the rows held; sequence_tokens: both sequences of every pair, the prompt in each, as
        # a trainer without a shared prompt (TRL) counts them. They differ only with train.share_prompt.
        record = {"step": step, "epoch": plan.epoch, **orpo_metrics(stats.sums, self.beta), "grad_norm": grad_norm,
                  "lr": lr, "pairs": int(stats.sums["pairs"]), "tokens": int(stats.tokens),
                  "sequence_tokens": sum(lengths), "tokens_per_s": sum(n for _, n in interval) / seconds,
                  "packing_efficiency": fill_ratio(stats.tokens, plan.num_filled_rows, self.micro_batch_tokens),
                  "step_s": seconds / len(interval), **stats.router}
        if self.peak_flops:
            flops = sum(step_flops(self.model_config, *step_shape(p, self.pairs, self.nll_on_prompt))
                        for p, _ in interval)
            record["mfu"] = flops / seconds / (self.peak_flops * self.world_size)
        return record
