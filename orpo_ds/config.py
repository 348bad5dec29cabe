"""One typed, frozen run config: YAML file + dotted ``key=value`` overrides, validated before any work.

Every validation error is a :class:`ConfigError` whose message names the dotted key and the fix; the CLI
prints it and exits with code 2, without a traceback.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-5", "loss.beta=0.2"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo_ds.config_text import ConfigError, TypedOverride, load_yaml, parse_override

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "varlen_attn", "segmented_sdpa", "sdpa", "flex_attention", "eager")
LIGER_KERNELS = ("auto", "on", "off")
REPORT_TO = ("tensorboard", "wandb")


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError ``key: message`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class LoraConfig:
    """``model.lora``: train low-rank adapters through peft instead of the model's weights (orpo_ds.lora)."""

    r: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / r, as in peft
    dropout: float = 0.0
    # peft's names: module-name suffixes such as [q_proj, v_proj], or all-linear (every linear layer but
    # the output head). The head stays frozen under LoRA: a name that matches it is a config error.
    target_modules: tuple[str, ...] = ("all-linear",)
    # QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CUDA only; ZeRO stage 0-2)
    load_in_4bit: bool = False
    # Train the output head's weight itself beside the adapters (and so, in a model that ties them, the
    # input embeddings, which are the same tensor). The adapter folder then carries it (peft's
    # save_embedding_layers), so it is much larger: vocab x hidden weights, often more than the adapters.
    train_head: bool = False

    def __post_init__(self):
        require(self.r >= 1, "model.lora.r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) >= 1 and all(self.target_modules), "model.lora.target_modules",
                 "must name at least one module (e.g. [q_proj, v_proj]) or be all-linear")
        require("all-linear" not in self.target_modules or len(self.target_modules) == 1,
                 "model.lora.target_modules", "all-linear already means every linear layer; give it alone")
        require(not (self.train_head and self.load_in_4bit), "model.lora.train_head",
                 "cannot train a 4-bit quantized head; set model.lora.load_in_4bit=false or train_head=false")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    # auto: on CUDA in bf16/fp16 flash_attention_2, else varlen_attn (torch's own); otherwise segmented_sdpa
    # (orpo_ds.attention.resolve_attn_implementation)
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    trainable_layers: int | None = None  # train only the last N decoder layers (+ final norm); None: all
    # Liger's RMSNorm/SwiGLU/RoPE kernels and fused head (orpo_ds.liger). auto: on where CUDA and liger-kernel
    # exist and Liger patches the architecture, else off | on: an error where it cannot run | off.
    # YAML true/false mean on/off.
    liger_kernels: str = field(default="auto", metadata={"bool_as": {True: "on", False: "off"}})
    lora: LoraConfig | None = None  # null: train the weights themselves (all, or model.trainable_layers)

    def __post_init__(self):
        require(bool(self.name_or_path), "model.name_or_path",
                 "is empty; set it to a local model folder or a hub name, e.g. model.name_or_path=path/to/model")
        require(self.trainable_layers is None or self.trainable_layers >= 1, "model.trainable_layers",
                 f"must be >= 1 or null (train every layer), got {self.trainable_layers}")
        require(self.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
                 f"{self.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        require(self.liger_kernels in LIGER_KERNELS, "model.liger_kernels",
                 f"{self.liger_kernels!r} is not one of {', '.join(LIGER_KERNELS)} (or YAML true/false)")
        require(self.lora is None or self.trainable_layers is None, "model.trainable_layers",
                 "cannot be combined with model.lora (LoRA freezes every weight and trains adapters "
                 "instead); set model.trainable_layers=null, or remove model.lora")


@dataclass(frozen=True)
class DataConfig:
    train: str = ""
    eval: str | None = None
    format: str = "auto"  # auto | standard | conversational | sharegpt
    max_length: int = 1024  # tokens per sequence (prompt + one response)
    truncation: str = "prompt_left"  # prompt_left | drop
    # reject | escape | keep: rows whose text spells a control token (e.g. <|im_end|>); see orpo_ds.data
    special_tokens_in_content: str = "reject"
    strict: bool = False  # any unusable row is fatal
    num_proc: int = 1  # tokenization workers
    cache_dir: str = ".cache/orpo_ds/tokenized"

    def __post_init__(self):
        require(bool(self.train), "data.train", "is empty; set it to a jsonl/json/parquet file, a saved "
                 "dataset folder or a hub name, e.g. data.train=data/pairs.jsonl")
        require(self.format in ("auto", "standard", "conversational", "sharegpt"), "data.format",
                 f"{self.format!r} is not one of auto, standard, conversational, sharegpt")
        require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        require(self.truncation in ("prompt_left", "drop"), "data.truncation",
                 f"{self.truncation!r} is not one of prompt_left, drop")
        require(self.special_tokens_in_content in ("reject", "escape", "keep"), "data.special_tokens_in_content",
                 f"{self.special_tokens_in_content!r} is not one of reject, escape, keep")
        require(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")


@dataclass(frozen=True)
class LossConfig:
    beta: float = 0.1  # weight of the odds-ratio term (the paper's lambda)
    nll_on_prompt: bool = False  # True: the SFT term also counts the chosen prompt tokens (TRL's behaviour)
    # tokens per chunk of the log-prob head; null: orpo_ds.logps.auto_chunk_size (1024, fewer for
    # vocabularies above 64k so that the fp32 [chunk, V] buffer stays within 256 MiB)
    chunk_size: int | None = None
    # mixture-of-experts models: weight of the router's load-balancing loss. null: the model config's
    # router_aux_loss_coef when its output_router_logits is true (TRL's rule), else no such loss; a number
    # turns it on with that weight, whatever the model config says
    router_aux_loss_coef: float | None = None

    def __post_init__(self):
        require(self.beta >= 0, "loss.beta", f"must be >= 0, got {self.beta}")
        require(self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0, "loss.router_aux_loss_coef",
                f"must be >= 0 or null (the model config's), got {self.router_aux_loss_coef}")
        require(self.chunk_size is None or self.chunk_size >= 1, "loss.chunk_size",
                 f"must be >= 1 or null (auto), got {self.chunk_size}")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/orpo"
    seed: int = 0
    lr: float = 5e-6
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # adamw | sgd (sgd makes updates linear in the gradient: used by tests)
    max_grad_norm: float = 1.0  # 0 disables clipping
    epochs: int = 1
    max_steps: int = 0  # > 0 caps the number of optimizer steps; 0 runs `epochs` epochs
    micro_batch_tokens: int = 8192  # token budget of one packed micro-batch (one row)
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    # ranks that share each packed row, each holding a contiguous 1/N of it (DeepSpeed Ulysses attention);
    # the world splits into world/N data-parallel replicas of N ranks
    sequence_parallel_size: int = 1
    # Lay each pair out as prompt, chosen, rejected: the prompt is encoded once for both responses
    # (orpo_ds.packing.SharedPromptLayout; same losses and gradients as without). Needs segmented_sdpa.
    share_prompt: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_steps: int = 0  # evaluate data.eval every N steps (0: only before and after training)
    eval_before: bool = True  # evaluate data.eval before the first step
    # Before and after training (with eval_before): also evaluate this many fixed training pairs, and report
    # both sets' changes with bootstrap intervals (orpo_ds.compare); 0: the held-out pairs only.
    compare_train_pairs: int = 40
    sample_prompts: int = 3  # greedy answers to this many held-out prompts before and after (samples.md); 0: none
    sample_new_tokens: int = 64
    log_steps: int = 1
    export: bool = True  # write a transformers folder to <output_dir>/final at the end
    save_steps: int = 0  # DeepSpeed checkpoint every N optimizer steps (0: only at the end and on preemption)
    keep_checkpoints: int = 2  # newest complete checkpoints kept in <output_dir>/checkpoints
    # auto: latest complete checkpoint in output_dir, if any | false | a checkpoint path (YAML true = auto)
    resume: str = field(default="auto", metadata={"bool_as": {True: "auto", False: "false"}})
    overwrite: bool = False  # with resume=false: delete an earlier run's checkpoints and metrics in output_dir
    # refuse | allow: resume a ZeRO-3 checkpoint on another number of ranks (a universal checkpoint,
    # orpo_ds.checkpoint.universal_copy); the epoch's remaining rows are dealt to the new ranks
    resume_world_size_change: str = "refuse"
    max_nonfinite_steps: int = 3  # stop after this many consecutive steps skipped for a non-finite loss
    peak_tflops: float | None = None  # per-device peak for the mfu metric; None: the bf16 table of known GPUs
    # Trackers beside metrics.jsonl (orpo_ds.tracking): tensorboard (<output_dir>/tensorboard), wandb
    report_to: tuple[str, ...] = ()
    run_name: str | None = None  # W&B's run name; None: the output folder's name
    wandb_project: str = "orpo-ds"
    # How long a collective waits for the other ranks before the job fails (a rank that died or hangs).
    collective_timeout_s: float = 1800.0

    def __post_init__(self):
        require(bool(self.output_dir.strip()), "train.output_dir", "is empty; name a folder for this run, "
                 "e.g. train.output_dir=runs/my-run")
        object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))  # as data paths are
        require(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 seconds")
        require(0 <= self.seed < 2**32, "train.seed", f"must be in 0 .. 2**32 - 1 (numpy's range), got {self.seed}")
        require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.lr_schedule in ("cosine", "linear", "constant"), "train.lr_schedule",
                 f"{self.lr_schedule!r} is not one of cosine, linear, constant")
        require(self.optimizer in ("adamw", "sgd"), "train.optimizer",
                 f"{self.optimizer!r} is not one of adamw, sgd")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(self.compare_train_pairs >= 0, "train.compare_train_pairs", "must be >= 0 (0: none)")
        require(self.sample_prompts >= 0, "train.sample_prompts", "must be >= 0 (0: none)")
        require(self.sample_new_tokens >= 1, "train.sample_new_tokens", "must be >= 1")
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(self.max_steps >= 0, "train.max_steps", f"must be >= 0 (0 = run train.epochs), got {self.max_steps}")
        require(self.micro_batch_tokens >= 2, "train.micro_batch_tokens",
                 f"must be >= 2, got {self.micro_batch_tokens}")
        require(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(self.sequence_parallel_size >= 1, "train.sequence_parallel_size",
                f"must be >= 1, got {self.sequence_parallel_size}")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        require(self.precision in ("auto", "bf16", "fp32"), "train.precision",
                 f"{self.precision!r} is not one of auto, bf16, fp32")
        require(self.eval_steps >= 0, "train.eval_steps", "must be >= 0")
        require(self.log_steps >= 1, "train.log_steps", "must be >= 1")
        require(self.save_steps >= 0, "train.save_steps", "must be >= 0 (0: save only at the end)")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        require(bool(self.resume), "train.resume", "must be auto, false or a checkpoint path")
        require(self.resume_world_size_change in ("refuse", "allow"), "train.resume_world_size_change",
                 f"{self.resume_world_size_change!r} is not one of refuse, allow")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        require(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops",
                 f"must be > 0 or null (use the table of known GPUs), got {self.peak_tflops}")
        for tracker in self.report_to:
            require(tracker in REPORT_TO, "train.report_to",
                     f"{tracker!r} is not one of {', '.join(REPORT_TO)} (a list, e.g. [tensorboard, wandb]; "
                     f"[] for none)")
        require(bool(self.wandb_project), "train.wandb_project", "is empty; name a W&B project")
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
                 f"must be two numbers in [0, 1), got {self.adam_betas}")


@dataclass(frozen=True)
class DeepSpeedSection:
    config: str = "ds_configs/zero3.json"  # DeepSpeed JSON: engine settings only (ZeRO stage, offload, ...)

    def __post_init__(self):
        require(bool(self.config), "deepspeed.config", "is empty; name a file in ds_configs/, e.g. "
                 "deepspeed.config=ds_configs/zero3.json")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def __post_init__(self):
        require(not self.train.share_prompt or self.model.attn_implementation in ("auto", "segmented_sdpa"),
                 "model.attn_implementation",
                 f"{self.model.attn_implementation!r} cannot attend to a shared prompt; with train.share_prompt=true "
                 f"use auto or segmented_sdpa (or set train.share_prompt=false)")
        require(2 * self.data.max_length <= self.train.micro_batch_tokens,
                 "train.micro_batch_tokens",
                 f"{self.train.micro_batch_tokens} cannot hold one pair of two sequences of up to "
                 f"data.max_length={self.data.max_length} tokens; set train.micro_batch_tokens >= "
                 f"{2 * self.data.max_length} or lower data.max_length")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig,
            "deepspeed": DeepSpeedSection}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (as a string under ``from __future__``), coercing ints
    to floats and lists to tuples; raise ConfigError naming ``key`` otherwise."""
    # eval of our own dataclasses' annotations only, never of user input
    hint = eval(annotation, {"tuple": tuple, "LoraConfig": LoraConfig}) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(hint)
    if isinstance(value, TypedOverride):
        optional = origin in (typing.Union, types.UnionType)
        wants_text = (next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint) is str
        # YAML turned the text into a number, bool or date: a string key takes what was typed instead.
        keep_text = wants_text and value.parsed is not None and not isinstance(value.parsed, str)
        value = value.text if keep_text else value.parsed
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build_section(key, hint, value)
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):  # tuple[str, ...]: a list, or one item
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(key, v, typing.get_args(hint)[0]) for v in items)
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)}, got {value!r}")
        return tuple(_coerce(key, v, t) for v, t in zip(value, items, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``section.name`` (or ``section.group.name`` inside a nested group such as ``model.lora``)."""
    parts = key.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"{key}: keys have the form section.name, e.g. train.lr, or section.group.name, e.g. "
                          f"model.lora.r (sections: {', '.join(SECTIONS)})")
    node = tree
    for i, part in enumerate(parts[:-1]):
        current = node.get(part)
        if (current.parsed if isinstance(current, TypedOverride) else current) is None:
            node[part] = {}  # absent, or a group set to null (model.lora: null in the YAML, or model.lora=null)
        if not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping of keys")
        node = node[part]
    node[parts[-1]] = value


def _build_section(name: str, cls: type, values: Any):
    """One section (or nested group) from its mapping: unknown keys are errors that list the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys (e.g. {name}:\n  {next(iter(fields))}: ...), "
                          f"got {type(values).__name__} {values!r}")
    kwargs = {}
    for key, value in (values or {}).items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key; valid keys in {name}: {', '.join(fields)}")
        bool_as = fields[key].metadata.get("bool_as")
        plain = value.parsed if isinstance(value, TypedOverride) else value
        if bool_as and isinstance(plain, bool):
            value = bool_as[plain]
        kwargs[key] = _coerce(dotted, value, fields[key].type)
    return cls(**kwargs)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict; unknown keys are errors that list the valid ones."""
    for name in tree or {}:
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; valid sections: {', '.join(SECTIONS)}")
    built = {name: _build_section(name, cls, (tree or {}).get(name)) for name, cls in SECTIONS.items()}
    return Config(**built)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        tree = load_yaml(path, "--config") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def dump_config(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
