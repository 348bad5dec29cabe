"""What a model folder (or hub name) says about the model, read before any weight is: its transformers
config, checked for the mistakes users make with paths (a training checkpoint, a run folder, a file), and
the sequence length it allows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orpo_ds.config import ConfigError

ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder: the base model's name is inside
CHECKPOINT_STATE_FILE = "trainer_state.json"  # orpo_ds.checkpoint's, as in orpo_ds.safe_files


def read_model_config(name_or_path: str, key: str = "model.name_or_path", *, trust_remote_code: bool = False):
    """The transformers config of a model folder, a LoRA adapter folder (its base model's config) or a hub
    name. Raises :class:`ConfigError` naming ``key`` for a path that is not a model folder, a model that
    needs ``trust_remote_code``, or a name that does not resolve."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {name_or_path!r} is a file; give a model folder")
        if (path / CHECKPOINT_STATE_FILE).is_file() or (path / "checkpoints").is_dir():
            raise ConfigError(f"{key}: {name_or_path!r} is an orpo-ds training checkpoint or run folder, not a "
                              f"model folder; write one with `orpo-ds export --checkpoint {name_or_path} --out "
                              f"DIR` and give DIR (a finished run's <output_dir>/final is one)")
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base:
                raise ConfigError(f"{key}: the adapter folder {name_or_path!r} does not name its base model")
            return read_model_config(base, f"{key} (the adapter's base model)", trust_remote_code=trust_remote_code)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name_or_path!r} holds no config.json; give a transformers model folder")
    elif name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1:  # a path, not a hub name
        raise ConfigError(f"{key}: the folder {name_or_path!r} is not found")
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(f"{key}: {name_or_path!r} needs its own code to load; if you trust it, set "
                              f"model.trust_remote_code=true") from exc
        raise ConfigError(f"{key}: no usable config in {name_or_path!r} ({str(exc).splitlines()[0]})") from exc
    except OSError as exc:  # a missing folder, or a hub name this machine cannot reach
        raise ConfigError(f"{key}: cannot load {name_or_path!r}: not found, or not a model folder "
                          f"({str(exc).splitlines()[0]})") from exc


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position embeddings cover (``max_position_embeddings``), if it says."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_max_length(max_length: int, model_config, key: str) -> None:
    """Refuse a sequence length beyond the model's positions: it would run (slowly) on positions the model
    never learned."""
    positions = max_positions(model_config)
    if positions is not None and max_length > positions:
        raise ConfigError(f"{key}: {max_length} is above the model's {positions} positions "
                          f"(max_position_embeddings); use at most {positions}")


def load_tokenizer(cfg):
    """The tokenizer of ``cfg.model`` (a :class:`~orpo_ds.config.Config`); ConfigError naming
    ``model.name_or_path`` when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:  # a missing folder, or a hub name this machine cannot reach
        raise ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path!r}: not found, or not a "
                          f"model folder ({str(exc).splitlines()[0]})") from exc


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (many chat models define no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


_SAMPLED_BYTES = 1 << 20  # of each weights file, from its start and its end: headers, shapes and some values


def model_fingerprint(name_or_path: str) -> str:
    """What identifies the model a run starts from, so a resume can tell a replaced folder from the same
    one under another spelling (a trailing ``/``): sha256 of its config.json (without the path it was
    loaded from) and of each weights file's name, size and first and last MiB. A hub name is its own
    fingerprint."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"name:{name_or_path}"
    h = hashlib.sha256()
    config_file = path / ("config.json" if (path / "config.json").is_file() else ADAPTER_CONFIG)
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config.pop("_name_or_path", None)
        h.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        h.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            h.update(f.read(_SAMPLED_BYTES))
            f.seek(max(0, size - _SAMPLED_BYTES))
            h.update(f.read(_SAMPLED_BYTES))
    return h.hexdigest()
