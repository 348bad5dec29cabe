"""``orpo-ds config from-trl`` / ``from-axolotl``: an orpo-ds YAML from a config users already have.

Each importer maps the keys the two peers document (TRL's ``ORPOConfig`` with its script's model and
LoRA arguments; axolotl's YAML with ``rl: orpo``) onto orpo-ds's typed config, and reports every key it
did not map with the reason. The result is validated as ``orpo-ds train`` would validate it.

orpo-ds batches by tokens, not sequences: a peer's per-device batch of ``B`` pairs becomes a packed row
of ``B * 2 * max_length`` tokens (``train.micro_batch_tokens``), which holds at least those ``B`` pairs
at full length (more when they are shorter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from orpo_ds.config import SECTIONS, Config, ConfigError, config_from_dict
from orpo_ds.config_text import load_yaml

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
ATTENTION = {"flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager",
             "flex_attention": "flex_attention"}


@dataclass
class Imported:
    """The mapped orpo-ds tree and, for every source key left out, why."""

    tree: dict[str, dict[str, Any]] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # required orpo-ds keys the source does not give

    def set(self, dotted: str, value: Any) -> None:
        node = self.tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value


def read_source(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = load_yaml(path, "config")  # JSON is YAML
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _apply(source: dict[str, Any], out: Imported, rules: dict[str, tuple[str, Callable[[Any], Any]] | str],
           consumed: set[str]) -> None:
    """Copy each source key a rule names (``key -> (dotted, convert)``; a string rule is the reason the key
    is not mapped); keys with neither are reported as having no orpo-ds equivalent."""
    for key, value in source.items():
        if key in consumed:
            continue
        rule = rules.get(key)
        if value is None:  # `key:` with nothing after it (YAML null): the source leaves it to the default
            out.unmapped[key] = "empty in the source; orpo-ds's default applies"
        elif rule is None:
            out.unmapped[key] = "no orpo-ds equivalent"
        elif isinstance(rule, str):
            out.unmapped[key] = rule
        else:
            dotted, convert = rule
            try:
                converted = convert(value)
            except (TypeError, ValueError) as exc:
                out.unmapped[key] = f"{value!r} cannot be mapped to {dotted} ({exc})"
                continue
            if converted is not None:
                out.set(dotted, converted)


def _same(value):
    return value


def _whole_epochs(value):
    if float(value) != int(float(value)):
        raise ValueError("orpo-ds trains whole epochs; use train.max_steps for a part")
    return int(float(value))


def _schedule(value):
    if value not in SCHEDULES:
        raise ValueError(f"orpo-ds schedules are {', '.join(sorted(set(SCHEDULES.values())))}")
    return SCHEDULES[value]


def _positive_or_none(value):
    return int(value) if int(value) > 0 else None


def _precision(out: Imported, source: dict[str, Any], consumed: set[str]) -> None:
    if source.get("fp16") in (True, "true"):
        out.unmapped["fp16"] = "orpo-ds trains in bf16 or fp32; train.precision=auto picks bf16 on a GPU"
    if source.get("bf16") in (True, "true", "auto"):
        out.set("train.precision", "auto")
    consumed.update({"bf16", "fp16"} & source.keys())


def _micro_batch(out: Imported, source: dict[str, Any], batch_key: str, length_key: str, default_length: int,
                 consumed: set[str]) -> None:
    length = int(source.get(length_key) or default_length)
    out.set("data.max_length", length)
    if batch_key in source:
        out.set("train.micro_batch_tokens", int(source[batch_key]) * 2 * length)
    else:  # the peers' default batch of one pair
        out.set("train.micro_batch_tokens", 2 * length)
    consumed.update({batch_key, length_key} & source.keys())


def _lora_targets(value):
    if value in ("all-linear", "all_linear"):
        return ["all-linear"]
    return [value] if isinstance(value, str) else list(value)


TRL_RULES: dict[str, Any] = {
    "model_name_or_path": ("model.name_or_path", str),
    "dataset_name": ("data.train", str),
    "output_dir": ("train.output_dir", str),
    "beta": ("loss.beta", float),
    "learning_rate": ("train.lr", float),
    "lr_scheduler_type": ("train.lr_schedule", _schedule),
    "warmup_steps": ("train.warmup_steps", int),
    "weight_decay": ("train.weight_decay", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "gradient_accumulation_steps": ("train.grad_accum", int),
    "num_train_epochs": ("train.epochs", _whole_epochs),
    "max_steps": ("train.max_steps", _positive_or_none),
    "seed": ("train.seed", int),
    "logging_steps": ("train.log_steps", int),
    "save_steps": ("train.save_steps", int),
    "eval_steps": ("train.eval_steps", int),
    "save_total_limit": ("train.keep_checkpoints", int),
    "deepspeed": ("deepspeed.config", str),
    "gradient_checkpointing": ("model.gradient_checkpointing", bool),
    "attn_implementation": ("model.attn_implementation", lambda v: ATTENTION[v]),
    "trust_remote_code": ("model.trust_remote_code", bool),
    "run_name": ("train.run_name", str),
    "lora_r": ("model.lora.r", int),
    "lora_alpha": ("model.lora.alpha", float),
    "lora_dropout": ("model.lora.dropout", float),
    "lora_target_modules": ("model.lora.target_modules", _lora_targets),
    "load_in_4bit": ("model.lora.load_in_4bit", bool),
    "warmup_ratio": "a share of the run's steps; orpo-ds takes train.warmup_steps (set it from the step count)",
    "max_prompt_length": "orpo-ds truncates the prompt from the left to fit data.max_length (data.truncation)",
    "max_completion_length": "orpo-ds truncates responses from the right to fit data.max_length",
    "per_device_eval_batch_size": "evaluation packs rows of train.micro_batch_tokens",
    "dataset_train_split": "orpo-ds reads the whole file or dataset given as data.train",
    "dataset_test_split": "give the held-out file as data.eval",
    "save_strategy": "orpo-ds saves every train.save_steps steps, at the end and on preemption",
    "eval_strategy": "orpo-ds evaluates every train.eval_steps steps and before/after training",
    "logging_strategy": "orpo-ds logs every train.log_steps steps",
    "disable_dropout": "orpo-ds keeps the model's dropout settings",
    "torch_dtype": "train.precision sets the dtype (auto: bf16 on a GPU)",
    "dtype": "train.precision sets the dtype (auto: bf16 on a GPU)",
}


def from_trl(source: dict[str, Any]) -> Imported:
    """TRL's ``ORPOConfig`` (TrainingArguments names) with ``trl``'s script arguments (model, dataset,
    LoRA: ``use_peft``, ``lora_*``)."""
    out, consumed = Imported(), set()
    _micro_batch(out, source, "per_device_train_batch_size", "max_length", 1024, consumed)
    _precision(out, source, consumed)
    consumed.add("use_peft")
    if source.get("use_peft"):
        out.set("model.lora.r", int(source.get("lora_r", 16)))  # peft's default rank in TRL's scripts is 16
    else:  # TRL reads its lora_* arguments only with use_peft
        _leave_out_lora_keys(source, out, consumed, "use_peft is not true, so TRL trains no adapters either")
    if "report_to" in source:
        consumed.add("report_to")
        _report_to(out, source["report_to"], "report_to")
    _apply(source, out, TRL_RULES, consumed)
    return out


def _leave_out_lora_keys(source: dict[str, Any], out: Imported, consumed: set[str], reason: str) -> None:
    for key in source:
        if key.startswith("lora_") or key == "load_in_4bit":
            out.unmapped[key] = reason
            consumed.add(key)


def _report_to(out: Imported, value: Any, key: str) -> None:
    names = [value] if isinstance(value, str) else list(value or [])
    known = [n for n in names if n in ("tensorboard", "wandb")]
    if known:
        out.set("train.report_to", known)
    others = [n for n in names if n not in known and n not in ("none", "all")]
    if others or "all" in names:
        out.unmapped[key] = f"orpo-ds reports to tensorboard and wandb only (left out: {', '.join(others or ['all'])})"


AXOLOTL_RULES: dict[str, Any] = {
    "base_model": ("model.name_or_path", str),
    "output_dir": ("train.output_dir", str),
    "orpo_alpha": ("loss.beta", float),
    "learning_rate": ("train.lr", float),
    "lr_scheduler": ("train.lr_schedule", _schedule),
    "warmup_steps": ("train.warmup_steps", int),
    "weight_decay": ("train.weight_decay", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "gradient_accumulation_steps": ("train.grad_accum", int),
    "num_epochs": ("train.epochs", _whole_epochs),
    "max_steps": ("train.max_steps", _positive_or_none),
    "seed": ("train.seed", int),
    "logging_steps": ("train.log_steps", int),
    "save_steps": ("train.save_steps", int),
    "eval_steps": ("train.eval_steps", int),
    "save_total_limit": ("train.keep_checkpoints", int),
    "deepspeed": ("deepspeed.config", str),
    "gradient_checkpointing": ("model.gradient_checkpointing", bool),
    "trust_remote_code": ("model.trust_remote_code", bool),
    "wandb_project": ("train.wandb_project", str),
    "wandb_name": ("train.run_name", str),
    "lora_r": ("model.lora.r", int),
    "lora_alpha": ("model.lora.alpha", float),
    "lora_dropout": ("model.lora.dropout", float),
    "lora_target_modules": ("model.lora.target_modules", _lora_targets),
    "rl": "read: it must be orpo",
    "warmup_ratio": "a share of the run's steps; orpo-ds takes train.warmup_steps (set it from the step count)",
    "val_set_size": "orpo-ds does not split data.train; give the held-out file as data.eval",
    "sample_packing": "orpo-ds always packs pairs (padding-free rows)",
    "pad_to_sequence_len": "orpo-ds packs rows without padding to a length",
    "optimizer": "orpo-ds trains with AdamW (fused, or DeepSpeed's CPU Adam when offloading)",
    "dataset_prepared_path": "orpo-ds caches tokenized pairs under data.cache_dir",
    "chat_template": "orpo-ds uses the tokenizer's own chat template",
    "micro_batch_size": "read: train.micro_batch_tokens = micro_batch_size * 2 * sequence_len",
    "load_in_8bit": "orpo-ds has no 8-bit base; QLoRA's 4-bit is model.lora.load_in_4bit",
    "strict": "orpo-ds validates every key (an unknown one is an error)",
    "train_on_inputs": ("loss.nll_on_prompt", bool),
}


def from_axolotl(source: dict[str, Any]) -> Imported:
    """axolotl's YAML for ORPO (``rl: orpo``): model, datasets, ``orpo_alpha``, schedule, batch sizes,
    ``sequence_len``, epochs, DeepSpeed, LoRA/QLoRA (``adapter``, ``lora_*``, ``lora_target_linear``)."""
    if str(source.get("rl", "")).lower() != "orpo":
        raise ConfigError(f"rl: {source.get('rl')!r}; orpo-ds imports axolotl configs with rl: orpo")
    out, consumed = Imported(), {"rl"}
    _micro_batch(out, source, "micro_batch_size", "sequence_len", 2048, consumed)
    _precision(out, source, consumed)
    for key, dotted in (("datasets", "data.train"), ("test_datasets", "data.eval")):
        if key in source:
            consumed.add(key)
            _dataset(out, source[key], key, dotted)
    adapter = source.get("adapter")
    consumed.add("adapter")
    if adapter in ("lora", "qlora"):
        out.set("model.lora.r", int(source.get("lora_r", 16)))
        if adapter == "qlora" or source.get("load_in_4bit"):
            out.set("model.lora.load_in_4bit", True)
        consumed.add("load_in_4bit")
        if source.get("lora_target_linear"):
            out.set("model.lora.target_modules", ["all-linear"])
            consumed.update({"lora_target_modules"} & source.keys())
        consumed.add("lora_target_linear")
    else:
        if adapter:
            out.unmapped["adapter"] = f"{adapter!r}: orpo-ds adapters are lora and qlora"
        _leave_out_lora_keys(source, out, consumed, "adapter is not lora or qlora, so axolotl trains no adapters")
    for key in ("flash_attention", "sdp_attention", "eager_attention"):
        if key in source:
            consumed.add(key)
            if source[key]:
                out.set("model.attn_implementation", {"flash_attention": "flash_attention_2",
                                                      "sdp_attention": "sdpa", "eager_attention": "eager"}[key])
    if "use_tensorboard" in source:
        consumed.add("use_tensorboard")
        if source["use_tensorboard"]:
            out.set("train.report_to", ["tensorboard"] + (["wandb"] if source.get("wandb_project") else []))
    elif source.get("wandb_project"):
        out.set("train.report_to", ["wandb"])
    _apply(source, out, AXOLOTL_RULES, consumed)
    return out


def _dataset(out: Imported, datasets: Any, key: str, dotted: str) -> None:
    entries = datasets if isinstance(datasets, list) else [datasets]
    if not entries or not isinstance(entries[0], dict) or "path" not in entries[0]:
        out.unmapped[key] = "expected a list of {path: ...} entries"
        return
    first = entries[0]
    out.set(dotted, str(first["path"]))
    left = [f"{k}={v}" for k, v in first.items() if k not in ("path", "split")]
    if left:
        out.unmapped[f"{key}[0]"] = (f"{', '.join(left)}: orpo-ds detects the format from the columns "
                                     f"(data.format=auto: prompt/chosen/rejected, conversational, sharegpt)")
    if len(entries) > 1:
        out.unmapped[f"{key}[1:]"] = f"orpo-ds trains on one data.train; {len(entries) - 1} more left out"


IMPORTERS = {"trl": from_trl, "axolotl": from_axolotl}
REQUIRED = ("model.name_or_path", "data.train")


def import_config(kind: str, path: str | Path) -> tuple[Config, Imported]:
    """Read ``path`` as ``kind``'s config; the orpo-ds config (validated) and the import's report."""
    imported = IMPORTERS[kind](read_source(path))
    # TRL takes the model and dataset on its command line as often as in the file: left empty in the
    # YAML (train then names them) and validated here with a stand-in.
    checked = json.loads(json.dumps(imported.tree))
    for dotted in REQUIRED:
        section, key = dotted.split(".")
        if not imported.tree.get(section, {}).get(key):
            imported.missing.append(dotted)
            imported.set(dotted, "")
            checked.setdefault(section, {})[key] = "set-me"
    return config_from_dict(checked), imported


def render(imported: Imported, kind: str, path: str | Path) -> str:
    """The orpo-ds YAML, with a header naming its source."""
    header = (f"# orpo-ds config imported from {kind}: {path}\n"
              f"# `orpo-ds config from-{kind}` listed the keys it could not map\n")
    ordered = {name: imported.tree[name] for name in SECTIONS if name in imported.tree}  # train's order
    return header + yaml.safe_dump(json.loads(json.dumps(ordered)), sort_keys=False)
