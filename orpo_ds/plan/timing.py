"""Step time from model FLOPs at an assumed MFU plus ZeRO's traffic at a given bus bandwidth.

Compute is :func:`orpo_ds.flops.step_flops` (what the trainer's ``mfu`` metric counts) divided by
``ranks * mfu * peak``. Traffic per GPU and micro-batch, ring collectives moving ``(n - 1) / n`` of each
volume through every GPU:

    ZeRO-3    all-gather the parameters in forward and again in backward (2 x b*P), reduce-scatter the
              trained gradients (b*Pt), every micro-batch
    ZeRO-1/2  reduce-scatter the gradients and all-gather the updated parameters, once per step
    ZeRO-0    all-reduce the gradients (2 x b*Pt), once per step

The two are added, not overlapped, so the step time is an upper bound for the traffic DeepSpeed hides
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


def traffic_bytes_per_step(shape: ModelShape, zero: ZeroSetup, ranks: int, grad_accum: int, dtype_bytes: int) -> float:
    """Bytes each GPU sends (and receives) per optimizer step over the data-parallel group."""
    if ranks == 1:
        return 0.0
    b, p, pt = dtype_bytes, shape.total_params, shape.trainable_params
    ring = (ranks - 1) / ranks
    if zero.stage == 3:
        volume = grad_accum * (2 * b * p + b * pt)
    elif zero.stage in (1, 2):
        volume = b * pt + b * p
    else:
        volume = 2 * b * pt
    return ring * volume


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s


def step_time(flops_per_step: float, traffic_bytes: float, *, ranks: int, peak_flops: float, mfu: float,
              bandwidth_bytes_s: float) -> StepTime:
    """Seconds of one optimizer step whose model FLOPs (all ranks together) are ``flops_per_step``."""
    return StepTime(compute_s=flops_per_step / (ranks * mfu * peak_flops),
                    communication_s=traffic_bytes / bandwidth_bytes_s)
