"""``orpo-ds plan``: the per-GPU memory, verdict, limits and times of a config on a cluster shape.

    plan = make_plan(load_config("configs/demo.yaml"), Cluster.of("H100", nodes=4, gpus_per_node=8))
    plan.fits, plan.to_dict()["model_state_bytes"]

Everything is computed from the config the trainer reads; nothing is loaded but a model config (and the
data's tokenized cache, when the data exists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orpo_ds.config import Config, ConfigError, require
from orpo_ds.ds_config import ZeroSetup, build_ds_config, read_ds_config
from orpo_ds.flops import BF16_PEAK_FLOPS
from orpo_ds.plan import memory, rows, timing
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
    bandwidth_bytes_s: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

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
        return cls(nodes=nodes, gpus_per_node=gpus_per_node, gpu_name=name, memory_bytes=int(memory_gib * GIB),
                   peak_flops=peak, bandwidth_bytes_s=bandwidth * 1e9)


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

    def budget(self, gpus: int, row_tokens: int, head_fraction: float, checkpointing: bool) -> MemoryBudget:
        b = self.dtype_bytes
        acts = memory.activation_estimate(self.shape, row_tokens, max(1, int(row_tokens * head_fraction)), b,
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
        """The smallest GPU count (1, 2, 4, ... up to a node, then whole nodes) that fits the row."""
        counts = [n for n in (1, 2, 4, 8, 16) if n < gpus_per_node]
        counts += range(gpus_per_node, MAX_PLANNED_GPUS + 1, gpus_per_node)
        return next((n for n in counts if self.budget(n, row_tokens, head_fraction, checkpointing).peak
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
    step: timing.StepTime
    mfu: float
    mfu_source: str
    traffic_bytes: float
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
            "model": self.cfg.model.name_or_path, "total_params": s.total_params,
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
            "fewest_gpus": self.fewest_gpus,
            "mfu": self.mfu, "mfu_source": self.mfu_source, "flops_per_step": self.rows.flops_per_step,
            "traffic_bytes_per_step": self.traffic_bytes,
            "bandwidth_bytes_per_s": self.cluster.bandwidth_bytes_s,
            "step_compute_s": self.step.compute_s, "step_communication_s": self.step.communication_s,
            "step_s": self.step.total_s, "steps_per_epoch": self.rows.steps_per_epoch, "epoch_s": self.epoch_s,
            "rows_source": self.rows.source, "ds_config": self.ds_config, "notes": list(self.notes),
        }


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
    planner = Planner(shape=shape, zero=ZeroSetup.from_ds_config(ds_config),
                      dtype_bytes=dtype.itemsize, chunk_size=cfg.loss.chunk_size, reserve=int(reserve_gib * GIB))
    stats = rows.row_stats(cfg, model_config, cluster.gpus)
    ckpt = cfg.model.gradient_checkpointing
    budget = planner.budget(cluster.gpus, stats.largest_row_tokens, stats.head_fraction, ckpt)
    minimum = 2 * cfg.data.max_length
    traffic = timing.traffic_bytes_per_step(shape, planner.zero, cluster.gpus, cfg.train.grad_accum, dtype.itemsize)
    assumed_mfu = mfu or timing.DEFAULT_MFU
    step = timing.step_time(stats.flops_per_step, traffic, ranks=cluster.gpus, peak_flops=cluster.peak_flops,
                            mfu=assumed_mfu, bandwidth_bytes_s=cluster.bandwidth_bytes_s)
    return Plan(cfg=cfg, cluster=cluster, planner=planner, rows=stats, budget=budget,
                budget_other_checkpointing=planner.budget(cluster.gpus, stats.largest_row_tokens,
                                                          stats.head_fraction, not ckpt),
                largest_row_tokens=planner.largest_row(cluster.gpus, cluster.memory_bytes, stats.head_fraction,
                                                       ckpt, minimum),
                largest_row_tokens_checkpointed=planner.largest_row(cluster.gpus, cluster.memory_bytes,
                                                                    stats.head_fraction, True, minimum),
                fewest_gpus=planner.fewest_gpus(cluster.gpus_per_node, cluster.memory_bytes,
                                                stats.largest_row_tokens, stats.head_fraction, ckpt),
                step=step, mfu=assumed_mfu, mfu_source="--mfu" if mfu else timing.DEFAULT_MFU_SOURCE,
                traffic_bytes=traffic, ds_config=ds_config, notes=_notes(cfg))


def _notes(cfg: Config) -> tuple[str, ...]:
    notes = []
    if cfg.model.attn_implementation in ("sdpa", "eager", "flex_attention"):
        notes.append(f"model.attn_implementation={cfg.model.attn_implementation}: activations assume a "
                     f"memory-efficient kernel (flash_attention_2, segmented_sdpa); a dense mask costs more")
    if cfg.model.liger_kernels != "off":
        notes.append("figures are the torch path's (norms with an fp32 upcast, the chunked head); Liger's "
                     "kernels, on by default on CUDA, save less there: an upper bound, not measured on a GPU")
    return tuple(notes)
