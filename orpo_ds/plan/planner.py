"""``orpo-ds plan``: the per-GPU memory, verdict, limits and times of a config on a cluster shape.

    plan = make_plan(load_config("configs/demo.yaml"), Cluster.of("H100", nodes=4, gpus_per_node=8))
    plan.fits, plan.to_dict()["model_state_bytes"]

Everything is computed from the config the trainer reads; nothing is loaded but a model config (and the
data's tokenized cache, when the data exists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orpo_ds.attention import ulysses_sizes
from orpo_ds.config import Config, ConfigError, require
from orpo_ds.distributed import check_sequence_parallel
from orpo_ds.ds_config import ZeroSetup, build_ds_config, read_ds_config, refuse_expert_parallel
from orpo_ds.flops import BF16_PEAK_FLOPS
from orpo_ds.plan import experts, memory, rows, timing
from orpo_ds.plan.shapes import ModelShape, load_model_config, model_shape

GIB = 2**30
# Memory per GPU by a name the user types (80 GB parts: SXM H100, A100 80GB).
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80}
# CUDA context, NCCL's buffers and the caching allocator's fragmentation: not in any tensor count.
DEFAULT_RESERVE_GIB = 3.0
# Per-GPU bus bandwidth of the data-parallel collectives: NVLink within one node, one 400 Gb/s NIC per
# GPU (about 40 GB/s achieved) across nodes. Assumptions, shown in the plan and overridable.
DEFAULT_BANDWIDTH_GBS = {"one node": 200.0, "several nodes": 40.0}
MAX_PLANNED_GPUS = 4096
MAX_ROW_TOKENS = 2**22


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_name: str
    memory_bytes: int
    peak_flops: float
    bandwidth_bytes_s: float  # the data-parallel collectives'
    node_bandwidth_bytes_s: float  # within one node: a row's GPUs under sequence parallelism

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def sequence_parallel_bandwidth(self, size: int) -> float:
        """Bus bandwidth of Ulysses' all-to-alls: a row's ``size`` GPUs are consecutive ranks, so all within
        one node when ``size`` divides a node's GPUs (else some rows span two nodes)."""
        return self.node_bandwidth_bytes_s if self.gpus_per_node % size == 0 else self.bandwidth_bytes_s

    @classmethod
    def of(cls, gpu: str = "H100", *, nodes: int = 1, gpus_per_node: int = 8, memory_gib: float | None = None,
           bandwidth_gbs: float | None = None) -> Cluster:
        """``gpu`` is a known name (H100, H200, A100) or a bf16 peak in TFLOP/s (then give ``memory_gib``)."""
        require(nodes >= 1, "--nodes", f"must be >= 1, got {nodes}")
        require(gpus_per_node >= 1, "--gpus-per-node", f"must be >= 1, got {gpus_per_node}")
        name = next((n for n in BF16_PEAK_FLOPS if n.lower() == gpu.strip().lower()), None)
        if name is not None:
            peak, memory_gib = BF16_PEAK_FLOPS[name], memory_gib or GPU_MEMORY_GIB[name]
        else:
            try:
                peak = float(gpu) * 1e12
            except ValueError:
                raise ConfigError(f"--gpu: {gpu!r} is neither a known GPU ({', '.join(BF16_PEAK_FLOPS)}) nor a "
                                  f"bf16 peak in TFLOP/s") from None
            require(peak > 0, "--gpu", f"a peak must be > 0 TFLOP/s, got {gpu}")
            require(memory_gib is not None, "--gpu-memory-gb", f"is needed with --gpu {gpu} (no known GPU)")
            name = f"{gpu} TFLOP/s"
        require(memory_gib > 0, "--gpu-memory-gb", f"must be > 0, got {memory_gib}")
        bandwidth = bandwidth_gbs or DEFAULT_BANDWIDTH_GBS["one node" if nodes == 1 else "several nodes"]
        require(bandwidth > 0, "--bandwidth-gbs", f"must be > 0, got {bandwidth}")
        node_bandwidth = bandwidth if nodes == 1 else DEFAULT_BANDWIDTH_GBS["one node"]
        return cls(nodes=nodes, gpus_per_node=gpus_per_node, gpu_name=name, memory_bytes=int(memory_gib * GIB),
                   peak_flops=peak, bandwidth_bytes_s=bandwidth * 1e9, node_bandwidth_bytes_s=node_bandwidth * 1e9)


@dataclass(frozen=True)
class MemoryBudget:
    """Per-GPU bytes of one configuration (one GPU count, one row size, checkpointing on or off)."""

    states: memory.ModelStates
    gathered_parameters: int
    communication_buffers: int
    optimizer_step_transient: int
    activations: memory.ActivationEstimate
    reserve: int

    @property
    def peak(self) -> int:
        """Model states and buffers, plus the larger of the step's two phases: forward and backward
        (gathered parameters, activations, head) or the optimizer step (its fp32 gradient copy)."""
        step = max(self.gathered_parameters + self.activations.peak, self.optimizer_step_transient)
        return self.states.total + self.communication_buffers + step + self.reserve


@dataclass(frozen=True)
class Planner:
    """Memory of the configured model for any GPU count, row size and checkpointing choice."""

    shape: ModelShape
    zero: ZeroSetup
    dtype_bytes: int
    chunk_size: int | None
    reserve: int
    sequence_parallel: int = 1  # train.sequence_parallel_size: each GPU holds 1/N of every row

    def budget(self, gpus: int, row_tokens: int, head_fraction: float, checkpointing: bool,
               sequence_parallel: int | None = None) -> MemoryBudget:
        """``sequence_parallel``: the size to plan with (default the config's). A GPU then holds
        ``row_tokens / N`` tokens of the row and their head targets; Ulysses' all-to-all buffers are the
        size of one layer's q, k, v and output of those tokens, left out (within the layer's backward)."""
        b, n = self.dtype_bytes, sequence_parallel or self.sequence_parallel
        tokens = -(-row_tokens // n)
        acts = memory.activation_estimate(self.shape, tokens, max(1, int(tokens * head_fraction)), b,
                                          checkpointing=checkpointing, chunk_size=self.chunk_size)
        return MemoryBudget(states=memory.model_states(self.shape, self.zero, gpus, b),
                            gathered_parameters=memory.gathered_parameters(self.shape, self.zero, b),
                            communication_buffers=memory.communication_buffers(self.zero, b),
                            optimizer_step_transient=memory.optimizer_step_transient(self.shape, self.zero, gpus, b),
                            activations=acts, reserve=self.reserve)

    def largest_row(self, gpus: int, memory_bytes: int, head_fraction: float, checkpointing: bool,
                    minimum: int) -> int | None:
        """The most ``micro_batch_tokens`` that fit (None when not even ``minimum`` does)."""
        def fits(tokens: int) -> bool:
            return self.budget(gpus, tokens, head_fraction, checkpointing).peak <= memory_bytes

        if not fits(minimum):
            return None
        low, high = minimum, MAX_ROW_TOKENS
        if fits(high):
            return high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def fewest_gpus(self, gpus_per_node: int, memory_bytes: int, row_tokens: int, head_fraction: float,
                    checkpointing: bool) -> int | None:
        """The smallest GPU count (1, 2, 4, ... up to a node, then whole nodes; a multiple of the
        sequence-parallel size) that fits the row."""
        counts = [n for n in (1, 2, 4, 8, 16) if n < gpus_per_node]
        counts += range(gpus_per_node, MAX_PLANNED_GPUS + 1, gpus_per_node)
        return next((n for n in counts if n % self.sequence_parallel == 0
                     and self.budget(n, row_tokens, head_fraction, checkpointing).peak <= memory_bytes), None)

    def sequence_parallel_needed(self, gpus: int, memory_bytes: int, row_tokens: int, head_fraction: float,
                                 checkpointing: bool) -> int | None:
        """The smallest sequence-parallel size (1, or one Ulysses can split the heads into, dividing
        ``gpus``) at which the row fits on ``gpus`` GPUs; None when none does."""
        config = self.shape.config
        heads = config.num_attention_heads
        sizes = [1] + [n for n in ulysses_sizes(heads, getattr(config, "num_key_value_heads", None) or heads, gpus)
                       if gpus % n == 0]
        return next((n for n in sizes if self.budget(gpus, row_tokens, head_fraction, checkpointing, n).peak
                     <= memory_bytes), None)


@dataclass(frozen=True)
class Plan:
    cfg: Config
    cluster: Cluster
    planner: Planner
    rows: rows.RowStats
    budget: MemoryBudget
    budget_other_checkpointing: MemoryBudget
    largest_row_tokens: int | None
    largest_row_tokens_checkpointed: int | None
    fewest_gpus: int | None
    sequence_parallel_needed: int | None  # the smallest size at which the row fits these GPUs
    step: timing.StepTime
    mfu: float
    mfu_source: str
    traffic_bytes: float
    sequence_parallel_bytes: float  # Ulysses' all-to-alls per GPU and step (0 without sequence parallelism)
    experts: experts.ExpertsPlan | None
    ds_config: dict
    notes: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.budget.peak <= self.cluster.memory_bytes

    @property
    def epoch_s(self) -> float | None:
        return None if self.rows.steps_per_epoch is None else self.rows.steps_per_epoch * self.step.total_s

    def to_dict(self) -> dict:
        """Every figure of the plan, bytes as integers (``model_state_bytes``: parameters + gradients +
        optimizer states per GPU)."""
        b, s = self.budget, self.planner.shape
        return {
            "model": self.cfg.model.name_or_path, "total_params": s.total_params, "active_params": s.active_params,
            "trainable_params": s.trainable_params, "largest_module_params": s.largest_module_params,
            "zero_stage": self.planner.zero.stage, "offload_param": self.planner.zero.offload_param,
            "offload_optimizer": self.planner.zero.offload_optimizer, "dtype_bytes": self.planner.dtype_bytes,
            "nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node, "gpu": self.cluster.gpu_name,
            "gpu_memory_bytes": self.cluster.memory_bytes,
            "model_state_bytes": b.states.total, "parameter_bytes": b.states.parameters,
            "gradient_bytes": b.states.gradients, "optimizer_bytes": b.states.optimizer,
            "host_bytes_per_gpu": b.states.host,
            "gathered_parameter_bytes": b.gathered_parameters, "communication_buffer_bytes": b.communication_buffers,
            "optimizer_step_transient_bytes": b.optimizer_step_transient,
            "row_tokens": self.rows.largest_row_tokens, "head_fraction": self.rows.head_fraction,
            "gradient_checkpointing": self.cfg.model.gradient_checkpointing,
            "activation_bytes": dataclasses.asdict(b.activations) | {"peak": b.activations.peak},
            "activation_bytes_other_checkpointing": dataclasses.asdict(self.budget_other_checkpointing.activations)
            | {"peak": self.budget_other_checkpointing.activations.peak},
            "reserve_bytes": b.reserve, "peak_bytes": b.peak, "fits": self.fits,
            "headroom_bytes": self.cluster.memory_bytes - b.peak,
            "largest_micro_batch_tokens": self.largest_row_tokens,
            "largest_micro_batch_tokens_checkpointed": self.largest_row_tokens_checkpointed,
            "fewest_gpus": self.fewest_gpus, "sequence_parallel": self.planner.sequence_parallel,
            "sequence_parallel_needed": self.sequence_parallel_needed,
            "mfu": self.mfu, "mfu_source": self.mfu_source, "flops_per_step": self.rows.flops_per_step,
            "traffic_bytes_per_step": self.traffic_bytes,
            "bandwidth_bytes_per_s": self.cluster.bandwidth_bytes_s,
            "sequence_parallel_bytes_per_step": self.sequence_parallel_bytes,
            "sequence_parallel_bandwidth_bytes_per_s": self.cluster.sequence_parallel_bandwidth(
                self.planner.sequence_parallel),
            "step_compute_s": self.step.compute_s, "step_communication_s": self.step.communication_s,
            "step_sequence_parallel_s": self.step.sequence_parallel_s,
            "step_s": self.step.total_s, "steps_per_epoch": self.rows.steps_per_epoch, "epoch_s": self.epoch_s,
            "experts": self._experts_dict(),
            "rows_source": self.rows.source, "ds_config": self.ds_config, "notes": list(self.notes),
        }

    def _experts_dict(self) -> dict | None:
        """The mixture-of-experts figures (None for a dense model): bytes per GPU and optimizer step, and
        their seconds at the cluster's bandwidth."""
        e = self.experts
        if e is None:
            return None
        seconds = 1 / self.cluster.bandwidth_bytes_s
        ep = e.expert_parallel
        what_if = None if ep is None else dataclasses.asdict(ep) | {"total_bytes": ep.total_bytes,
                                                                     "s": ep.total_bytes * seconds}
        return {"experts": e.layout.experts, "experts_per_token": e.layout.experts_per_token,
                "moe_layers": len(e.layout.moe_layers), "routed_expert_params": e.routed_expert_params,
                "zero3_gather_bytes_per_step": e.zero3_gather_bytes,
                "zero3_gather_s": e.zero3_gather_bytes * seconds, "expert_parallel_what_if": what_if}


def make_plan(cfg: Config, cluster: Cluster, *, mfu: float | None = None,
              reserve_gib: float = DEFAULT_RESERVE_GIB) -> Plan:
    """The plan of ``cfg`` on ``cluster`` (bf16 unless ``train.precision=fp32``: the GPU default)."""
    require(mfu is None or 0 < mfu <= 1, "--mfu", f"must be in (0, 1], got {mfu}")
    require(reserve_gib >= 0, "--reserve-gb", f"must be >= 0, got {reserve_gib}")
    import torch

    dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    ds_config = build_ds_config(read_ds_config(cfg.deepspeed.config), cfg.train, cluster.gpus, dtype)
    model_config = load_model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    shape = model_shape(model_config, cfg.model.trainable_layers, cfg.model.lora)
    sp = cfg.train.sequence_parallel_size
    require(cluster.gpus % sp == 0, "train.sequence_parallel_size",
            f"{sp} does not divide the cluster's {cluster.gpus} GPUs")
    # What the run would refuse at start-up, the plan refuses too, with the same words.
    check_sequence_parallel(sp, cluster.gpus, model_config)
    refuse_expert_parallel(ds_config)
    planner = Planner(shape=shape, zero=ZeroSetup.from_ds_config(ds_config), dtype_bytes=dtype.itemsize,
                      chunk_size=cfg.loss.chunk_size, reserve=int(reserve_gib * GIB), sequence_parallel=sp)
    stats = rows.row_stats(cfg, model_config, cluster.gpus // sp)  # rows go to the data-parallel replicas
    ckpt = cfg.model.gradient_checkpointing
    budget = planner.budget(cluster.gpus, stats.largest_row_tokens, stats.head_fraction, ckpt)
    minimum = 2 * cfg.data.max_length
    traffic = timing.traffic_bytes_per_step(shape, planner.zero, cluster.gpus, cfg.train.grad_accum, dtype.itemsize)
    moe = experts.experts_plan(shape, planner.zero.stage, cluster.gpus, cluster.gpus_per_node, cfg.train.grad_accum,
                               dtype.itemsize, stats.tokens_per_step, ckpt)
    all_to_all = timing.ulysses_bytes_per_step(shape, sp, stats.tokens_per_step / (cluster.gpus // sp),
                                               dtype.itemsize, checkpointing=ckpt)
    assumed_mfu = mfu or timing.DEFAULT_MFU
    step = timing.step_time(stats.flops_per_step, traffic, ranks=cluster.gpus, peak_flops=cluster.peak_flops,
                            mfu=assumed_mfu, bandwidth_bytes_s=cluster.bandwidth_bytes_s,
                            sequence_parallel_bytes=all_to_all,
                            sequence_parallel_bandwidth_bytes_s=cluster.sequence_parallel_bandwidth(sp))
    return Plan(cfg=cfg, cluster=cluster, planner=planner, rows=stats, budget=budget,
                budget_other_checkpointing=planner.budget(cluster.gpus, stats.largest_row_tokens,
                                                          stats.head_fraction, not ckpt),
                largest_row_tokens=planner.largest_row(cluster.gpus, cluster.memory_bytes, stats.head_fraction,
                                                       ckpt, minimum),
                largest_row_tokens_checkpointed=planner.largest_row(cluster.gpus, cluster.memory_bytes,
                                                                    stats.head_fraction, True, minimum),
                fewest_gpus=planner.fewest_gpus(cluster.gpus_per_node, cluster.memory_bytes,
                                                stats.largest_row_tokens, stats.head_fraction, ckpt),
                sequence_parallel_needed=planner.sequence_parallel_needed(cluster.gpus, cluster.memory_bytes,
                                                                          stats.largest_row_tokens,
                                                                          stats.head_fraction, ckpt),
                step=step, mfu=assumed_mfu, mfu_source="--mfu" if mfu else timing.DEFAULT_MFU_SOURCE,
                traffic_bytes=traffic, sequence_parallel_bytes=all_to_all, experts=moe, ds_config=ds_config,
                notes=_notes(cfg, moe is not None))


def _notes(cfg: Config, mixture_of_experts: bool) -> tuple[str, ...]:
    notes = []
    if mixture_of_experts:
        notes.append("mixture of experts: activations are those of transformers' grouped_mm experts (the "
                     "tokens' copies routed to each expert, the router's probabilities), measured on the CPU "
                     "only; no MoE step has been measured on a GPU")
    if cfg.model.attn_implementation in ("sdpa", "eager", "flex_attention"):
        notes.append(f"model.attn_implementation={cfg.model.attn_implementation}: activations assume a "
                     f"memory-efficient kernel (flash_attention_2, segmented_sdpa); a dense mask costs more")
    if cfg.model.liger_kernels != "off":
        notes.append("figures are the torch path's (norms with an fp32 upcast, the chunked head); Liger's "
                     "kernels, on by default on CUDA, save less there: an upper bound, not measured on a GPU")
    return tuple(notes)
