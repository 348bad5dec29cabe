"""The engine: ZeRO-3 model loading, the optimizer and its schedule, the :class:`Engine` facade over
DeepSpeed's engine, consolidation of ZeRO shards, and the universal-checkpoint conversion.

With :mod:`orpo_ds.distributed` (the process group) and :mod:`orpo_ds.ds_config` (the DeepSpeed JSON), the
only modules that import deepspeed (an import-linter contract in pyproject.toml holds the package to it).
The rest of orpo-ds sees plain ``nn.Module`` objects, tensors and the small :class:`Engine` facade.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from orpo_ds.config import TrainConfig
from orpo_ds.distributed import DistInfo
from orpo_ds.ds_config import ZeroSetup, zero_stage


def resolve_dtype(t: TrainConfig, info: DistInfo) -> torch.dtype:
    """``train.precision``: auto is bf16 on a GPU (DeepSpeed keeps fp32 master weights), fp32 elsewhere."""
    if t.precision == "auto":
        return torch.bfloat16 if info.on_gpu else torch.float32
    return torch.bfloat16 if t.precision == "bf16" else torch.float32

def load_pretrained(loader: Callable[[], torch.nn.Module], ds_config: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """Run ``loader`` (a ``from_pretrained`` call) so that ZeRO-3 partitions the weights while loading.

    transformers' ``from_pretrained`` enters ``deepspeed.zero.Init`` only while an ``HfDeepSpeedConfig``
    object is alive, so it is returned too and the caller must keep a reference for the run.
    """
    keepalive = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    return loader(), keepalive

def register_external_parameter(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Tell ZeRO-3 that ``module``'s forward reads ``param`` although another module owns it, so the
    engine gathers it for that forward and its backward (the chunked head reads ``lm_head.weight``)."""
    import deepspeed

    if hasattr(param, "ds_id"):
        deepspeed.zero.register_external_parameter(module, param)

def make_optimizer(module: torch.nn.Module, t: TrainConfig, ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (fused), DeepSpeedCPUAdam when the JSON offloads the optimizer, or SGD, over the trainable
    parameters of ``module``, from the ``train`` section."""
    params = [p for p in module.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    if ZeroSetup.from_ds_config(ds_config).offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    # The fused kernel (CPU and CUDA): on the CPU the default loop is ~5x slower, ~0.4 s of each 2-rank
    # ZeRO-3 step for SmolLM2-135M (benchmarks/bench_optimizer.py).
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=True)

def make_lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig,
                     total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``train.warmup_steps``, then cosine / linear decay to 0 or constant.

    The factor at scheduler step ``s`` is ``(s + 1) / (warmup + 1)`` during warmup, so the first update
    already moves; after warmup the decay reaches 0 at ``total_steps``."""
    warmup, kind = t.warmup_steps, t.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def adopt_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, t: TrainConfig) -> None:
    """After a checkpoint's optimizer and schedule states were loaded into ``schedule``'s optimizer: run
    this run's ``train`` settings from the loaded step on.

    The loaded states carry the old run's base rate, weight decay and betas, and the old run's last rate
    (0 at the end of a finished run), which the next update would use. The schedule's factor function is
    this run's own (a LambdaLR saves no function), so the rate at step ``s`` becomes
    ``t.lr * factor(s)`` of this run's schedule: a changed ``train.lr`` applies from the next update, and
    a run extended past its old end continues on the schedule of its new length.
    """
    groups = schedule.optimizer.param_groups
    for group in groups:
        group.update(initial_lr=t.lr, weight_decay=t.weight_decay)
        if "betas" in group:
            group["betas"] = tuple(t.adam_betas)
    schedule.base_lrs = [t.lr] * len(groups)
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas,
                                                                        strict=True)]
    for group, rate in zip(groups, rates, strict=True):
        group["lr"] = rate
    schedule._last_lr = rates

def mark_expert_blocks_as_leaves(module: torch.nn.Module) -> list[str]:
    """Make each block that holds its experts as separate modules (an ``experts`` ModuleList) a ZeRO-3 leaf
    module, so that ZeRO-3 gathers the whole block on entering it; returns the blocks' names.

    Otherwise each rank gathers only the experts its tokens were routed to: ranks that route differently
    call different gathers and wait on each other until the collective timeout. transformers 5 keeps most
    families' experts in fused 3-D parameters (nothing to mark here), and DeepSpeed marks Mixtral's and
    Qwen-MoE's blocks by class itself; this covers the rest, remote-code models among them.
    """
    from deepspeed.utils import set_z3_leaf_module

    marked = []
    for name, block in module.named_modules():
        experts = getattr(block, "experts", None)
        if isinstance(experts, torch.nn.ModuleList) and len(experts) > 1:
            set_z3_leaf_module(block, True)
            marked.append(name)
    return marked


class Engine:
    """A thin facade over ``deepspeed.DeepSpeedEngine``: forward, backward, step, and what we read back."""

    def __init__(self, module: torch.nn.Module, t: TrainConfig, ds_config: dict[str, Any], total_steps: int):
        import deepspeed

        self.expert_leaves = mark_expert_blocks_as_leaves(module) if zero_stage(ds_config) == 3 else []
        optimizer = make_optimizer(module, t, ds_config)
        schedule = make_lr_schedule(optimizer, t, total_steps)
        self.ds_config, self.train_config = ds_config, t
        self.ds_engine, self.optimizer, _, self.lr_schedule = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        self.module = self.ds_engine.module
        self._undo_averaging = self.ds_engine.gradient_accumulation_steps() * self.ds_engine.dp_world_size
        # DeepSpeed's fp32 ZeRO-0 path clips with a norm it does not keep, so we measure that one ourselves.
        self._measure_grad_norm = zero_stage(ds_config) == 0 and not ds_config["bf16"]["enabled"]
        self._measured_grad_norm: float | None = None
        self._gradient_bytes: int | None = None  # read at the first step boundary, where gradients exist

    def __call__(self, *args, **kwargs):
        return self.ds_engine(*args, **kwargs)

    def describe(self) -> str:
        """One start-up line: the ZeRO stage, the optimizer that runs, and what is offloaded to the CPU."""
        zero = ZeroSetup.from_ds_config(self.ds_config)
        offloaded = [name for name, on in (("optimizer", zero.offload_optimizer), ("param", zero.offload_param)) if on]
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the optimizer we built
        leaves = f"; {len(self.expert_leaves)} expert blocks gathered whole (ZeRO-3 leaf modules)" \
            if self.expert_leaves else ""
        return (f"ZeRO-{zero.stage}, optimizer {type(inner).__name__}, offloaded to the CPU: "
                f"{', '.join(offloaded) or 'nothing'}{leaves}")

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss``, this micro-batch's share of the step's loss: after the
        step's last backward the gradients are exactly those of the step's (globally normalised) loss.

        DeepSpeed divides each backward by ``gradient_accumulation_steps`` and averages the gradients over
        the data-parallel ranks; the loss normalises by the step's global counts itself, so both are
        undone here.
        """
        self.ds_engine.backward(loss * self._undo_averaging)

    def step(self) -> bool:
        """Call after each micro-batch's backward; the update happens at the step's last micro-batch.

        Returns whether that update was applied. A non-finite global gradient norm keeps the update out
        (the non-finite guard): DeepSpeed's ZeRO-1/2/3 and bf16 optimizers skip such a step and clear its
        gradients themselves (bf16 ZeRO-1/2 once :func:`build_ds_config` turns ``check_grad_overflow``
        on); fp32 ZeRO-0 runs a plain torch optimizer, so here its gradients are zeroed and its learning
        rate set to 0 for that step.
        """
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        if boundary and self._gradient_bytes is None:
            self._gradient_bytes = self._held_gradient_bytes()
        dropped = False
        if self._measure_grad_norm and boundary:
            # After backward ZeRO-0 holds the rank-averaged gradients, the ones clipping sees.
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            self._measured_grad_norm = float(norm)
            if not math.isfinite(self._measured_grad_norm):
                # Zeroed gradients and a learning rate of 0 leave the weights as they are (the schedule sets
                # the next step's rate afresh); Adam's moments decay once. Gradients set to None instead
                # would crash DeepSpeed's clipping, which indexes the first parameter with a gradient.
                for p in params:
                    p.grad.zero_()
                for group in self.ds_engine.optimizer.param_groups:
                    group["lr"] = 0.0
                dropped = True
        self.ds_engine.step()
        return boundary and not dropped and self.ds_engine.was_step_applied()

    def _held_gradient_bytes(self) -> int:
        # ZeRO-3 reduces each gradient into this rank's slice of one flat buffer; the other stages keep
        # .grad tensors (ZeRO-1/2 flat partitions on the optimizer's parameters, ZeRO-0 whole ones).
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            return _tensor_bytes([flat])
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        owners = {id(p): p for p in self.module.parameters()}
        owners.update({id(p): p for group in inner.param_groups for p in group["params"]})
        return _tensor_bytes([p.grad for p in owners.values() if p.grad is not None])

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds, read from the engine's tensors (not computed from the model's size):
        ``parameters`` (ZeRO-3: this rank's partitions; the rest: whole tensors), ``gradients`` (as held
        at the first step boundary; 0 before the first step) and ``optimizer`` (the optimizer's own
        parameters when they are separate flat partitions or fp32 masters, plus its state)."""
        params = [getattr(p, "ds_tensor", p) for p in self.module.parameters()]
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        # ZeRO-3 hands its fp32 partitions to the inner optimizer only while it steps them (param_groups
        # are emptied in between), so they are read from the ZeRO optimizer itself; an fp32 model's
        # partitions there are its parameters' own storage, not a copy.
        candidates = [p for group in inner.param_groups for p in group["params"]]
        candidates += list(getattr(self.optimizer, "fp32_partitioned_groups_flat", []))
        held = {t.untyped_storage().data_ptr() for t in params}
        masters = list({t.untyped_storage().data_ptr(): t for t in candidates
                        if t.untyped_storage().data_ptr() not in held}.values())
        state = [v for entry in inner.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
        return {"parameters": _tensor_bytes(params), "gradients": self._gradient_bytes or 0,
                "optimizer": _tensor_bytes(masters) + _tensor_bytes(state)}

    def train(self) -> None:
        self.ds_engine.train()

    def eval(self) -> None:
        self.ds_engine.eval()

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its ZeRO partitions, optimizer and schedule state."""
        self.ds_engine.save_checkpoint(str(directory), tag="state")

    def load(self, directory: Path) -> None:
        path, _ = self.ds_engine.load_checkpoint(str(directory), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
        adopt_schedule(self.lr_schedule, self.train_config)

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers while the process group still exists (its destructor
        would run after :func:`shutdown`, where ZeRO-3's cleanup fails silently)."""
        self.ds_engine.destroy()

    def release_gathered(self) -> None:
        """Re-partition parameters that ZeRO-3 left gathered or in flight: a forward pass without a
        backward (evaluation) leaves prefetched parameters behind, and a later explicit gather of them
        then fails with "Cannot partition a param in flight"."""
        self.ds_engine.empty_partition_cache()

    @property
    def lr(self) -> float:
        return float(self.lr_schedule.get_last_lr()[0])

    def grad_norm(self) -> float:
        """L2 norm of the last step's gradients over all ranks, before clipping."""
        norm = self._measured_grad_norm if self._measure_grad_norm else self.ds_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def gather_params(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 partitioned ``params`` hold their full values (read-only)."""
        if zero_stage(self.ds_config) != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full fp32/bf16 state dict on rank 0's CPU, gathered one parameter at a time so no device
        ever holds the whole model; ``None`` on other ranks."""
        self.release_gathered()
        state: dict[str, torch.Tensor] = {}
        rank0 = dist.get_rank() == 0
        for name, tensor in model.state_dict(keep_vars=True).items():
            with self.gather_params([tensor] if isinstance(tensor, torch.nn.Parameter) else []):
                if rank0:
                    state[name] = tensor.detach().to("cpu", copy=True)
        return state if rank0 else None

def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

def consolidate_zero_checkpoint(ds_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a saved DeepSpeed checkpoint of any ZeRO stage, on the CPU: shards are
    merged in host memory, so no GPU ever needs to hold the whole model.

    ZeRO-0 saves no partitions (DeepSpeed's ``zero_to_fp32`` cannot read it): its model file holds the
    whole module, in the dtype it trained in (the weights the live export writes too).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dir = ds_dir / "state"
    if not any(state_dir.glob("*optim_states.pt")) and (state_dir / "mp_rank_00_model_states.pt").is_file():
        # DeepSpeed's own pickle (it stores more than tensors): read only checkpoints you trust.
        module = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")

def convert_to_universal(zero_folder: Path, out_folder: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` on a ZeRO-3 checkpoint folder (its ``state`` tag): every
    parameter's fp32 value and AdamW moments whole, one folder per parameter, in ``out_folder``."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(input_folder=str(zero_folder), output_folder=str(out_folder),
                                       num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                       strict=True, inject_missing_state=False))
