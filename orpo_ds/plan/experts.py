"""Mixture of experts in the plan: active against held parameters, ZeRO-3's gathers of every expert, and
what expert parallelism would change. Estimates from the model's shape, none measured.

ZeRO-3 partitions every parameter over the ``n`` data-parallel GPUs and gathers each one whole, in
forward and again in backward, every micro-batch: a token runs ``k`` of a layer's ``E`` experts, but the
GPU receives all ``E`` (:func:`orpo_ds.plan.timing.zero3_gather_bytes_per_step`).

With expert parallelism of size ``N`` (``N`` divides ``E`` and the GPUs of a node), each GPU holds ``E/N``
of a layer's experts, partitioned by ZeRO-3 over the ``n/N`` GPUs holding the same ones; the other
parameters are partitioned over all ``n`` as before. Per GPU and micro-batch it then gathers, twice,

    P_other * (n - 1)/n + (P_experts / N) * (n/N - 1)/(n/N)

and in each pass over a MoE layer sends each of its tokens' hidden states to their ``k`` experts and
back (an all-to-all: ``2 * k * d * b`` bytes per token, ``(N - 1)/N`` of them to other GPUs, with
routing assumed uniform). Passes: forward and backward, plus the recomputed forward with activation
checkpointing. Model states per GPU stay the same: ``P_experts / N`` over ``n/N`` GPUs is ``P_experts / n``.
orpo-ds does not run expert parallelism yet: that figure is a what-if.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orpo_ds.flops import ExpertLayout, gated_mlp_params
from orpo_ds.plan.shapes import ModelShape
from orpo_ds.plan.timing import ring_share, zero3_gather_bytes_per_step


@dataclass(frozen=True)
class ExpertParallelWhatIf:
    """Per-GPU traffic of one optimizer step with expert parallelism of ``size`` under ZeRO-3.

    Attributes:
        size: ``N``, the GPUs one layer's experts are spread over (within a node).
        experts_per_gpu: ``E / N``, the experts of a layer each GPU holds and gathers.
        gather_bytes: ZeRO-3's gathers: the non-expert parameters over all GPUs, a GPU's own experts over
            the ``n / N`` GPUs that hold the same ones.
        all_to_all_bytes: tokens' hidden states sent to their experts and back (uniform routing).
    """

    size: int
    experts_per_gpu: int
    gather_bytes: float
    all_to_all_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.gather_bytes + self.all_to_all_bytes


@dataclass(frozen=True)
class ExpertsPlan:
    """The plan's mixture-of-experts figures, bytes per GPU and optimizer step in the training dtype.

    Attributes:
        layout: the experts (``E``, ``k``, widths, which layers).
        active_params: parameters one token runs (what the FLOPs count).
        total_params: every parameter (what memory holds).
        routed_expert_params: the parameters of every routed expert, all layers.
        zero3_gather_bytes: ZeRO-3's gathers of every parameter (0 below stage 3 or on one GPU).
        expert_parallel: the what-if of :class:`ExpertParallelWhatIf` (None below stage 3, on one GPU,
            or where ``E`` and the GPUs of a node share no factor above 1).
    """

    layout: ExpertLayout
    active_params: int
    total_params: int
    routed_expert_params: int
    zero3_gather_bytes: float
    expert_parallel: ExpertParallelWhatIf | None


def routed_expert_params(shape: ModelShape) -> int:
    """Parameters of every routed expert of every MoE layer: ``layers * E * 3 * d * w``."""
    layout = shape.experts
    return len(layout.moe_layers) * layout.experts * gated_mlp_params(shape.hidden, layout.expert_width)


def expert_parallel_size(experts: int, gpus_per_node: int) -> int:
    """The largest expert-parallel size that divides both ``E`` and a node's GPUs (its all-to-all then
    stays on the node's links)."""
    return math.gcd(experts, gpus_per_node)


def all_to_all_bytes_per_step(layout: ExpertLayout, hidden: int, tokens_per_gpu: float, size: int,
                              dtype_bytes: int, checkpointing: bool) -> float:
    """Bytes each GPU sends per step dispatching its ``tokens_per_gpu`` tokens to their ``k`` experts and
    combining the results, in every pass over every MoE layer (see the module docstring)."""
    passes = 3 if checkpointing else 2
    per_token_pass = 2 * layout.experts_per_token * hidden * dtype_bytes
    return tokens_per_gpu * len(layout.moe_layers) * passes * per_token_pass * ring_share(size)


def expert_parallel_what_if(shape: ModelShape, size: int, ranks: int, grad_accum: int, dtype_bytes: int,
                            tokens_per_gpu: float, checkpointing: bool) -> ExpertParallelWhatIf:
    """Per-GPU traffic of a step with experts spread over ``size`` GPUs (module docstring)."""
    experts = routed_expert_params(shape)
    copies = ranks // size  # GPUs holding the same experts, among which ZeRO-3 partitions them
    gather = (zero3_gather_bytes_per_step(shape.total_params - experts, ranks, grad_accum, dtype_bytes)
              + zero3_gather_bytes_per_step(experts / size, copies, grad_accum, dtype_bytes))
    return ExpertParallelWhatIf(size=size, experts_per_gpu=shape.experts.experts // size, gather_bytes=gather,
                                all_to_all_bytes=all_to_all_bytes_per_step(shape.experts, shape.hidden,
                                                                           tokens_per_gpu, size, dtype_bytes,
                                                                           checkpointing))


def experts_plan(shape: ModelShape, zero_stage: int, ranks: int, gpus_per_node: int, grad_accum: int,
                 dtype_bytes: int, tokens_per_step: float, checkpointing: bool) -> ExpertsPlan | None:
    """The mixture-of-experts figures of a plan, None for a dense model. ``tokens_per_step`` counts all
    ranks' rows together."""
    layout = shape.experts
    if layout is None:
        return None
    gathers = zero_stage == 3 and ranks > 1
    size = expert_parallel_size(layout.experts, gpus_per_node)
    what_if = None
    if gathers and size > 1:
        what_if = expert_parallel_what_if(shape, size, ranks, grad_accum, dtype_bytes, tokens_per_step / ranks,
                                          checkpointing)
    return ExpertsPlan(layout=layout, active_params=shape.active_params, total_params=shape.total_params,
                       routed_expert_params=routed_expert_params(shape),
                       zero3_gather_bytes=zero3_gather_bytes_per_step(shape.total_params, ranks, grad_accum,
                                                                      dtype_bytes) if gathers else 0.0,
                       expert_parallel=what_if)
