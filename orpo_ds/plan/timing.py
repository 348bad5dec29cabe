"""Step time from model FLOPs at an assumed MFU plus ZeRO's traffic at a given bus bandwidth.

Compute is :func:`orpo_ds.flops.step_flops` (what the trainer's ``mfu`` metric counts) divided by
``ranks * mfu * peak``. Traffic per GPU and micro-batch, ring collectives moving ``(n - 1) / n`` of each
volume through every GPU:

    ZeRO-3    all-gather the parameters in forward and again in backward (2 x b*P), reduce-scatter the
              trained gradients (b*Pt), every micro-batch
    ZeRO-1/2  reduce-scatter the gradients and all-gather the updated parameters, once per step
    ZeRO-0    all-reduce the gradients (2 x b*Pt), once per step

With sequence parallelism (``train.sequence_parallel_size`` N), each layer's attention also runs
Ulysses' all-to-alls within the N GPUs of a row: the GPU's q, k and v in, the output back, in forward, in
backward, and in a checkpointed layer's recomputation (:func:`ulysses_bytes_per_step`).

The terms are added, not overlapped, so the step time is an upper bound for the traffic DeepSpeed hides
behind compute (``overlap_comm``). CPU offload's host transfers are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from orpo_ds.ds_config import ZeroSetup
from orpo_ds.plan.shapes import ModelShape

# No GPU step of orpo-ds has been measured yet (benchmarks/RESULTS.md): until one is, the default MFU is
# an assumption, and the plan says so. Replace it with the measured figure when there is one.
DEFAULT_MFU = 0.40
DEFAULT_MFU_SOURCE = "assumed: no orpo-ds GPU step has been measured yet (benchmarks/RESULTS.md)"


def ring_share(ranks: int) -> float:
    """The share of a ring collective's volume that passes through each of ``ranks`` GPUs."""
    return (ranks - 1) / ranks


def zero3_gather_bytes_per_step(params: float, ranks: int, grad_accum: int, dtype_bytes: int) -> float:
    """Bytes each GPU receives per optimizer step as ZeRO-3 gathers ``params`` parameters, partitioned
    over ``ranks`` GPUs, in forward and again in backward, every micro-batch, in the training dtype."""
    return ring_share(ranks) * grad_accum * 2 * dtype_bytes * params


def traffic_bytes_per_step(shape: ModelShape, zero: ZeroSetup, ranks: int, grad_accum: int, dtype_bytes: int) -> float:
    """Bytes each GPU sends (and receives) per optimizer step over the data-parallel group."""
    if ranks == 1:
        return 0.0
    b, p, pt = dtype_bytes, shape.total_params, shape.trainable_params
    ring = ring_share(ranks)
    if zero.stage == 3:
        return zero3_gather_bytes_per_step(p, ranks, grad_accum, b) + ring * grad_accum * b * pt
    if zero.stage in (1, 2):
        return ring * (b * pt + b * p)
    return ring * 2 * b * pt


def ulysses_bytes_per_step(shape: ModelShape, size: int, tokens_per_replica: float, dtype_bytes: int, *,
                           checkpointing: bool) -> float:
    """Bytes each GPU sends (and receives) per optimizer step in DeepSpeed Ulysses' all-to-alls, when
    ``size`` GPUs share each row and a data-parallel replica's rows hold ``tokens_per_replica`` tokens.

    Per layer and pass a GPU's ``T/N`` tokens go out as q, k and v and come back as the attention output,
    ``(N - 1) / N`` of each to the other GPUs. KV heads fewer than N are replicated to N first, as
    ``UlyssesSPAttentionHF`` does. The passes: forward through every layer, backward (the gradients of the
    same tensors) through the trained layers, and with checkpointing their forward once more."""
    if size == 1:
        return 0.0
    kv_width = max(shape.kv_width, size * shape.head_dim)
    per_token = dtype_bytes * (2 * shape.heads * shape.head_dim + 2 * kv_width)  # q and output, k and v
    passes = shape.layers + shape.trainable_layers * (2 if checkpointing else 1)
    return ring_share(size) * passes * per_token * tokens_per_replica / size


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float  # ZeRO's collectives over the data-parallel GPUs
    sequence_parallel_s: float = 0.0  # Ulysses' all-to-alls within a row's GPUs

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.sequence_parallel_s


def step_time(flops_per_step: float, traffic_bytes: float, *, ranks: int, peak_flops: float, mfu: float,
              bandwidth_bytes_s: float, sequence_parallel_bytes: float = 0.0,
              sequence_parallel_bandwidth_bytes_s: float | None = None) -> StepTime:
    """Seconds of one optimizer step whose model FLOPs (all ranks together) are ``flops_per_step``."""
    return StepTime(compute_s=flops_per_step / (ranks * mfu * peak_flops),
                    communication_s=traffic_bytes / bandwidth_bytes_s,
                    sequence_parallel_s=sequence_parallel_bytes / (sequence_parallel_bandwidth_bytes_s
                                                                   or bandwidth_bytes_s))
