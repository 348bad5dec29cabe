"""Config text as users write it: YAML files (aliases refused, duplicate keys warned) and ``key=value``
overrides (parsed as YAML, kept as typed for string keys), and the error both raise."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key and how to fix it."""


@dataclass(frozen=True)
class TypedOverride:
    """A ``key=value`` override: ``parsed`` as YAML reads it, and the ``text`` as typed, which a key that
    expects a string takes instead (``train.output_dir=0755`` is the folder "0755", not 493)."""

    parsed: Any
    text: str


def parse_override(text: str) -> tuple[str, TypedOverride]:
    """``"train.lr=1e-5"`` -> ``("train.lr", TypedOverride(1e-5, "1e-5"))``; the value is parsed as YAML
    (numbers, bools, lists), and kept as typed for string keys."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string (it wants 1.0e-5); accept the form people type.
    if isinstance(value, str):
        try:
            value = float(value) if any(ch in value for ch in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    return key.strip(), TypedOverride(value, raw)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (a kilobyte of nested aliases expands to gigabytes: a config
    has no use for them) and with a warning for a key given twice (YAML keeps the last silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.name}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are "
                              f"not accepted in configs; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                print(f"orpo-ds: warning: {self.name}: line {key_node.start_mark.line + 1}: key {key!r} is given "
                      f"twice; the last value is used", file=sys.stderr)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path, what: str) -> Any:
    """The YAML (or JSON) document in ``path``, read with :class:`_ConfigLoader`; ConfigError naming
    ``what`` and the file for text that is not UTF-8 or not YAML."""
    try:
        loader = _ConfigLoader(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {path} is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
