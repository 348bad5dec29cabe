"""The DeepSpeed JSON: read it, inject what orpo-ds owns (batch sizes, clipping, precision), validate it
with DeepSpeed's own parser, and read back the ZeRO settings that memory and the engine depend on.

The runtime layer with :mod:`orpo_ds.engine`: only these two modules import deepspeed (the import-linter
contracts in pyproject.toml hold them to it). The planner reads this module, never the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orpo_ds.config import ConfigError, TrainConfig

# Keys of the DeepSpeed JSON that orpo-ds owns: they come from our config, and a JSON that sets one of
# them to something else is an error rather than a silent override.
_INJECTED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                  "gradient_clipping")


def build_ds_config(ds_json: dict[str, Any], t: TrainConfig, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """Inject batch sizes, clipping and precision from our config into the engine-only DeepSpeed JSON.

    One packed row is one micro-batch, so ``train_micro_batch_size_per_gpu`` is 1. A JSON value that
    disagrees with ours raises ConfigError; ``"auto"`` or an absent key is filled in.
    """
    ds = json.loads(json.dumps(ds_json))  # deep copy
    zero_stage(ds)  # validates zero_optimization
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"deepspeed.config: remove the {section!r} section; orpo-ds builds the optimizer "
                              f"and schedule from train.lr, train.lr_schedule, train.warmup_steps, ...")
    wanted = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": world_size * t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
    }
    for key in _INJECTED_KEYS:
        have = ds.get(key, "auto")
        if have != "auto" and have != wanted[key]:
            raise ConfigError(f"deepspeed.config sets {key}={have!r} but orpo-ds derives {wanted[key]!r} from "
                              f"train.* (one packed row per micro-batch); remove the key or set it to \"auto\"")
        ds[key] = wanted[key]
    bf16 = dtype == torch.bfloat16
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        if not isinstance(ds.get(section, {}), dict):
            raise ConfigError(f"deepspeed.config: {section!r} must be a section like {{\"enabled\": \"auto\"}}, "
                              f"got {ds[section]!r}; precision comes from train.precision")
        have = ds.get(section, {}).get("enabled", "auto")
        if have != "auto" and bool(have) != enabled:
            raise ConfigError(f"deepspeed.config sets {section}.enabled={have} but train.precision resolves to "
                              f"{'bf16' if bf16 else 'fp32'}; remove it or set train.precision accordingly")
        ds.setdefault(section, {})["enabled"] = enabled
    if bf16:  # ZeRO-1/2 in bf16 apply a non-finite gradient unless told to check (the non-finite guard)
        ds["bf16"].setdefault("check_grad_overflow", True)
    if t.optimizer == "sgd":
        ds["zero_allow_untested_optimizer"] = True
    return ds


def read_ds_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: file {path!r} does not exist; pick one of ds_configs/*.json")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {exc}") from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object of engine settings, got a "
                          f"{type(ds).__name__}")
    return ds


def validate_ds_config(ds_config: dict[str, Any]) -> None:
    """DeepSpeed's own validation of the engine settings, run at start-up (after the process group
    exists, which it reads the world size from): a value of the wrong type is a ConfigError naming its
    key, before any data or model is loaded, not a traceback from ``deepspeed.initialize``."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    refuse_expert_parallel(ds_config)
    try:
        DeepSpeedConfig(ds_config)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise ConfigError(f"deepspeed.config: {exc.title}: {problems}") from exc


def refuse_expert_parallel(ds_config: dict[str, Any]) -> None:
    """Refuse DeepSpeed's AutoEP (``expert_parallel.enabled``), with what was found when it was tried on 2
    CPU ranks with a tiny Mixtral (DeepSpeed 0.19.8, transformers 5.17): its presets look for
    ``model.layers.N.mlp`` and the policy holds the model as ``causal_lm``; it reads ``top_k`` from the
    wrapped module's ``config``; and with both given by hand, ``deepspeed.initialize`` fails installing its
    router-logit recorders (``_CanRecordRegistry.get`` takes one argument in transformers 5, AutoEP passes
    two), the logits the balancing loss needs. The check is on that last signature, so a release that fixes
    it gets the plain refusal of the untested path instead of this diagnosis."""
    expert_parallel = ds_config.get("expert_parallel") or {}
    if not (isinstance(expert_parallel, dict) and expert_parallel.get("enabled")):
        return
    import inspect

    from transformers.utils.output_capturing import _CanRecordRegistry

    takes_default = len(inspect.signature(_CanRecordRegistry.get).parameters) > 2
    why = ("orpo-ds has not been made to work with it yet: the policy wraps the model as causal_lm, which AutoEP's "
           "presets do not match" if takes_default else
           "DeepSpeed's AutoEP cannot install its router-logit recorders on this transformers "
           "(_CanRecordRegistry.get takes one argument; AutoEP passes two), and the router's balancing loss needs "
           "those logits")
    raise ConfigError(f"deepspeed.config: expert_parallel (DeepSpeed AutoEP) is not supported: {why}. Remove the "
                      f"expert_parallel block: ZeRO-3 then gathers every expert each step (docs/configuration.md, "
                      f"Mixture of experts)")


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage (0 when absent); ConfigError for anything but a mapping with a stage of 0-3."""
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed.config: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage



@dataclass(frozen=True)
class ZeroSetup:
    """The ZeRO settings memory depends on, from a DeepSpeed JSON with DeepSpeed's own defaults."""

    stage: int
    offload_param: bool
    offload_optimizer: bool
    sub_group_size: int
    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> ZeroSetup:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))

        def offloaded(section) -> bool:
            return section is not None and str(section.device) not in ("none", "OffloadDeviceEnum.none")

        return cls(stage=int(z.stage), offload_param=offloaded(z.offload_param),
                   offload_optimizer=offloaded(z.offload_optimizer), sub_group_size=int(z.sub_group_size),
                   reduce_bucket_size=int(z.reduce_bucket_size), allgather_bucket_size=int(z.allgather_bucket_size),
                   prefetch_bucket_size=int(z.prefetch_bucket_size),
                   persistence_threshold=int(z.param_persistence_threshold))
