"""What makes a row unusable and how that is reported: :class:`DropReport`, :class:`Drop`, control tokens.

Unusable rows never crash the pipeline: each one is counted in the :class:`DropReport` with its row index
and a reason ``"<category>: <detail>"`` (categories: missing field, wrong type, undecodable text, invalid
JSON, malformed row, malformed conversation, unknown role, empty prompt, empty response, special token in
content, chosen == rejected, prompt leaves no room, too long, chat template error, tokenizer error).
``strict=True`` turns any of them into a :class:`~orpo_ds.data.errors.DataError` naming the row.

Control tokens (:func:`control_tokens`) are the strings a row's text must not spell under
``special_tokens_in_content="reject"`` (see :mod:`orpo_ds.data.tokenize`); :func:`find_control` finds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DropReport", "Drop", "control_tokens", "control_pattern", "find_control"]

_SUMMARY_ROWS = 5


@dataclass
class DropReport:
    """What happened to every row: ``total`` rows read, ``kept`` pairs produced, and one
    ``(row_index, reason)`` entry per dropped row, in row order. ``kept + len(dropped) == total``."""

    total: int = 0
    kept: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)

    @staticmethod
    def category(reason: str) -> str:
        """The part of a reason before ``": "``, e.g. ``"empty response"`` for ``"empty response: 'chosen'"``."""
        return reason.split(": ", 1)[0]

    def by_category(self) -> dict[str, list[int]]:
        """Row indices per reason category, most frequent category first (ties: earliest row first)."""
        groups: dict[str, list[int]] = {}
        for row, reason in self.dropped:
            groups.setdefault(self.category(reason), []).append(row)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0])))

    def summary(self) -> str:
        """One line: ``kept 287/300 pairs; dropped 13: 8 empty response (rows 3, 17, ...), 5 chosen ==
        rejected (rows 1, 2, 4, 9, 12)``; at most five row indices per category are listed."""
        head = f"kept {self.kept}/{self.total} pairs"
        if not self.dropped:
            return head + "; dropped 0"
        parts = []
        for cat, rows in self.by_category().items():
            shown = ", ".join(map(str, rows[:_SUMMARY_ROWS])) + (", ..." if len(rows) > _SUMMARY_ROWS else "")
            parts.append(f"{len(rows)} {cat} ({'row' if len(rows) == 1 else 'rows'} {shown})")
        return f"{head}; dropped {len(self.dropped)}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": [[r, s] for r, s in self.dropped]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DropReport:
        return cls(int(obj["total"]), int(obj["kept"]), [(int(r), str(s)) for r, s in obj["dropped"]])


class Drop(Exception):
    """Raised inside the row pipeline: the row is unusable for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def control_tokens(tokenizer, use_template: bool) -> tuple[str, ...]:
    """The strings that tokenize to a control token, sorted: the tokenizer's special tokens, plus, with a chat
    template, the added tokens listed in ``tokenizer.chat_control_tokens`` or else those the template text
    contains. Close to transformers' rule for ``sanitize_control_tokens``, so ``escape`` sanitizes what
    ``reject`` looks for. Whitespace tokens (Gemma's ``"\\n"``) are how such tokenizers write ordinary text,
    never control tokens."""
    added = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
    tokens = {t.content for t in added if t.special} | set(getattr(tokenizer, "all_special_tokens", ()))
    if use_template:
        listed = getattr(tokenizer, "chat_control_tokens", None)
        template = tokenizer.chat_template
        template = "\0".join(template.values()) if isinstance(template, dict) else str(template)
        tokens |= {t.content for t in added
                   if (t.content in listed if listed is not None else t.content in template)}
    return tuple(sorted(t for t in tokens if t and not t.isspace()))


def control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    # Longest first: "<|im_start|>system" style tokens win over a shorter token they contain.
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def find_control(value: Any, control_re: re.Pattern) -> str | None:
    """The first control-token string in ``value``: a string, or messages whose string values (at any depth;
    the template may print any of them) are searched in order."""
    if isinstance(value, str):
        found = control_re.search(value)
        return found.group(0) if found else None
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found = find_control(item, control_re)
        if found is not None:
            return found
    return None
