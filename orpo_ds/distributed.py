"""The process group: joining it under every launcher (the deepspeed launcher, torchrun, srun, one plain
process), the rank's device, and the few collectives the loop runs, each on that device (NCCL has no CPU
backend). Runtime layer: with :mod:`orpo_ds.engine` and :mod:`orpo_ds.ds_config`, the only modules that
import deepspeed or torch.distributed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orpo_ds.attention import ulysses_sizes
from orpo_ds.config import ConfigError
from orpo_ds.flops import expert_layout


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _adopt_slurm_environment() -> None:
    """``srun python -m orpo_ds ...`` without a launcher: map SLURM's task ids onto torch's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("srun without a launcher: set MASTER_ADDR and MASTER_PORT (launch/orpo.sbatch "
                           "derives them from the allocation)")

def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA. Works under the deepspeed launcher,
    torchrun, srun (SLURM_PROCID -> RANK) and as a plain single process. ``timeout_s``
    (``train.collective_timeout_s``) bounds how long a collective waits for a rank that died or hangs."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _adopt_slurm_environment()
    if "RANK" not in os.environ:  # plain `python -m orpo_ds train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    on_gpu = accelerator.device_name() == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
        if not on_gpu:
            release_cpu_comm_buffer_name()
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                    device=device)

def cpu_comm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory collectives keep ``rank``'s 69 MB buffer (its naming, in
    ``csrc/cpu/comm/shm.cpp``: uid, MASTER_ADDR, MASTER_PORT, rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")

def release_cpu_comm_buffer_name() -> None:
    """Unlink this rank's shared-memory buffer name once every rank has mapped every buffer.

    DeepSpeed 0.19.8 never unlinks them, so each CPU run on a new port leaves 69 MB per rank in
    /dev/shm (RAM) for good; a few hundred runs filled 15 GB of this machine's 24 and the kernel OOM-killed
    the next training. The mappings outlive the name, so the run itself is unaffected, and a run killed
    later (SIGKILL, OOM) leaves nothing behind either.
    """
    barrier()  # every rank's init has opened all the others' buffers by now
    try:
        cpu_comm_buffer_path(dist.get_rank()).unlink()
    except FileNotFoundError:
        pass  # no shm op (not built, or ranks on several hosts): nothing was created

def build_cpu_comm_op() -> None:
    """JIT-build DeepSpeed's CPU shared-memory collectives op into TORCH_EXTENSIONS_DIR (about 100 s the
    first time, then loaded from there). Doing it once up front keeps every later multi-process launch
    from spending that time, or racing to build it, inside its own time limit."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()

def comm_device() -> torch.device:
    """Where this rank's collectives run: the accelerator's current device. NCCL has no backend for CPU
    tensors, so a collective on a CPU tensor fails on the first multi-GPU step."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())

def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks, on :func:`comm_device`; returns a new tensor there.

    Whenever a process group exists the sum goes through it, a world of one included, so that a one-GPU
    check exercises the same backend and device placement as a cluster run.
    """
    out = values.detach().to(comm_device(), copy=True)
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out

def host_values(values: torch.Tensor) -> list[float]:
    """One device-to-host read of a small tensor (a host synchronisation on an accelerator)."""
    return values.tolist()

def reduce_to_host(values: torch.Tensor) -> list[float]:
    """:func:`all_reduce_sum`, then one host read: the numbers every rank agrees on."""
    return host_values(all_reduce_sum(values))

@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in a world of ``world / size`` data-parallel replicas of ``size`` consecutive ranks
    that share every packed row (``train.sequence_parallel_size``)."""

    size: int
    index: int  # this rank's shard of each row, 0..size-1
    replica: int  # the data-parallel replica (the rows it trains), 0..replicas-1
    replicas: int
    group: Any  # the replica's process group (None in a world without sequence parallelism)

    def sum_sequences(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (per-sequence log-prob sums or token counts) over the replica's ranks; see
        :class:`_SumForAReplicatedLoss` for the gradient."""
        return _SumForAReplicatedLoss.apply(tensor, self.group) if self.size > 1 else tensor


class _SumForAReplicatedLoss(torch.autograd.Function):
    """All-reduce (sum) in forward; the upstream gradient unchanged in backward.

    Right when every rank of the group computes the same loss from the sum and backpropagates it, as the
    ranks sharing a row do with its sequences' log-prob sums: the loss depends on this rank's tensor
    through the sum with weight 1, and each rank's part of the gradient reaches its own tokens only; the
    engine's sum over ranks then adds the parts up. An all-reduce in backward would count them N times.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def check_sequence_parallel(size: int, world_size: int, model_config) -> None:
    """Refuse a ``train.sequence_parallel_size`` the world or the model cannot split, before any work:
    the ranks must divide into replicas of ``size``, the model must not be a mixture of experts (its
    router's figures are per row), and Ulysses splits the attention heads over the ranks (the query heads
    evenly; the KV heads evenly, or replicated when ``size`` is a multiple of their count)."""
    if size == 1:
        return
    key = "train.sequence_parallel_size"
    if world_size % size:
        raise ConfigError(f"{key}: {size} does not divide the {world_size} ranks into replicas; use a divisor of "
                          f"{world_size}")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    experts = expert_layout(text)
    if experts is not None:  # refused from the declared config, before the model loads
        refuse_experts(size, experts.experts, experts.experts_per_token)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if size not in ulysses_sizes(heads, kv_heads, size):
        working = ulysses_sizes(heads, kv_heads, heads)
        raise ConfigError(f"{key}: {size} cannot split the model's {heads} attention heads and {kv_heads} KV heads "
                          f"(Ulysses gives each rank heads/N of them); sizes that work: "
                          f"{', '.join(map(str, working)) or 'none'}")


def refuse_experts(size: int, experts: int, top_k: int) -> None:
    """Sequence parallelism of ``size`` > 1 with a mixture of ``experts`` experts (top-``top_k``): refused."""
    if size > 1:
        raise ConfigError(f"train.sequence_parallel_size: {size} with a mixture of experts ({experts} experts, "
                          f"top-{top_k}): its router's balancing loss and expert load are statistics of a whole "
                          f"row, and sequence parallelism splits a row's routing over its ranks; not supported "
                          f"yet: use train.sequence_parallel_size=1")


def enable_sequence_parallel(size: int, model) -> SequenceParallel:
    """Split the world into replicas of ``size`` ranks and route the model's attention through DeepSpeed's
    Ulysses (``UlyssesSPAttentionHF``): each rank's ``[T/N]`` tokens of all heads become, by one all-to-all,
    ``[T]`` tokens of its ``heads/N`` heads, the row's own attention runs on those, and an all-to-all brings
    the output back. The core attention is :data:`orpo_ds.attention.SEGMENTED_SDPA`: Ulysses passes the
    row's segments through to it, so packed pairs and shared prompts keep their exact attention. In eval
    mode Ulysses steps aside (``disable_in_eval``): evaluation and sampling run whole rows per rank.
    ``size`` 1: every rank is a replica of its own.

    Of DeepSpeed's Ulysses kit only the attention and its groups are used. The engine is not told (no
    ``sequence_parallel_size`` key, no ``mpu``): ZeRO-3 partitions over the whole world either way, and the
    loss is normalised by the step's global counts, so the gradient wanted is the plain sum over every
    rank, which :mod:`orpo_ds.engine` makes from DeepSpeed's world average. ``UlyssesSPDataLoaderAdapter``
    is not used: it splits collated tensors along the sequence, while a packed row is split on the host
    (:class:`orpo_ds.batch.Shard`), where the whole row's labels and segments are known."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if size == 1:
        return SequenceParallel(size=1, index=0, replica=rank, replicas=world_size, group=None)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=size, micro_batch_size=1, seq_length_is_variable=True, disable_in_eval=True)
    return SequenceParallel(size=size, index=rank % size, replica=rank // size, replicas=world_size // size,
                            group=mpu.get_sequence_parallel_group())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def raise_if_any_rank_failed(error: Exception | None, elsewhere: Exception) -> None:
    """Collective: re-raise ``error`` on the rank that hit it and ``elsewhere`` on every other rank, so a
    failure on one rank ends the job with its message instead of leaving the others blocked."""
    (failed,) = reduce_to_host(torch.tensor([float(error is not None)]))
    if failed:
        raise error or elsewhere
