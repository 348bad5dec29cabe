"""The record formats: detection from the columns, parsing a row, rendering chat templates.

Formats (detected from the columns by :func:`format_of`, or forced with ``fmt=``):

* ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (an empty prompt is allowed: plain
  continuation; an empty or whitespace-only response is not).
* ``conversational`` (TRL): ``prompt`` is a list of ``{"role", "content"}`` messages; ``chosen`` and
  ``rejected`` are one assistant message (a dict) or a list of assistant messages. A response holding any
  other turn (user, tool, system) drops the row ("multi-turn response"): its tokens would be scored as
  the model's answer, with the turn markers lost.
* ``sharegpt`` (LLaMA-Factory, e.g. ``dpo_en_demo.json``): ``conversations`` is a list of
  ``{"from": "human" | "gpt" | "system", "value": str}`` turns, ``chosen`` / ``rejected`` are
  ``{"from": "gpt", "value": str}``; an optional ``system`` string column becomes a leading system message.
  ``human`` -> user, ``gpt`` -> assistant, ``system`` -> system (``user`` / ``assistant`` are accepted as
  aliases); any other ``from`` drops the row.

:func:`parse_row` turns one row into ``(prompt, chosen, rejected)``: strings (standard) or
``[{"role", "content", ...}]`` message lists, or raises :class:`~orpo_ds.data.validate.Drop` with the
reason; :func:`render_chat` runs the tokenizer's chat template on messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orpo_ds.data.errors import DataError
from orpo_ds.data.io import LOAD_ERROR_COLUMN
from orpo_ds.data.validate import Drop

__all__ = ["FORMATS", "format_of", "resolve_format", "parse_row", "render_chat", "token_ids"]

FORMATS = ("standard", "conversational", "sharegpt")

_REQUIRED = {"standard": ("prompt", "chosen", "rejected"), "conversational": ("prompt", "chosen", "rejected"),
             "sharegpt": ("conversations", "chosen", "rejected")}
_CHAT_ROLES = {r: r for r in ("system", "user", "assistant", "tool", "developer", "function", "ipython")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


# ------------------------------------------------------------------------------------------ detection


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return "other"


def _column_kinds(dataset, columns) -> dict[str, str | None]:
    """``"str" | "list" | "dict" | "other" | None`` per column, from the features, else from sample rows."""
    import datasets
    from datasets import Value

    # datasets >= 4 has List/LargeList; older versions only Sequence
    list_types = tuple(getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if hasattr(datasets, n))
    kinds: dict[str, str | None] = {}
    undecided = []
    for col in columns:
        feat = dataset.features.get(col)
        if isinstance(feat, Value) and feat.dtype in ("string", "large_string"):
            kinds[col] = "str"
        elif isinstance(feat, (*list_types, list)):
            kinds[col] = "list"
        elif isinstance(feat, dict):
            kinds[col] = "dict"
        elif isinstance(feat, Value) and feat.dtype != "null":
            kinds[col] = "other"
        else:  # Json (mixed types) or all-null: look at the values
            undecided.append(col)
    if undecided:
        sample = dataset[: min(len(dataset), 200)]
        for col in undecided:
            seen = [k for k in map(_kind, sample[col]) if k is not None]
            kinds[col] = max(set(seen), key=seen.count) if seen else None
    return kinds


def format_of(dataset) -> str:
    """Detect the record format from the columns: ``"sharegpt"`` (has ``conversations``),
    ``"conversational"`` (``prompt`` holds message lists, or ``chosen`` message dicts/lists) or
    ``"standard"`` (``prompt``/``chosen``/``rejected`` strings). Raises :class:`DataError` otherwise."""
    cols = set(dataset.column_names) - {LOAD_ERROR_COLUMN}
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= cols:
        kinds = _column_kinds(dataset, ("prompt", "chosen", "rejected"))
        if kinds["prompt"] == "list" or (kinds["prompt"] != "str" and kinds["chosen"] in ("list", "dict")):
            return "conversational"
        return "standard"
    if {"chosen", "rejected"} <= cols:
        raise DataError(f"columns {sorted(cols)}: 'chosen'/'rejected' without 'prompt' (implicit-prompt data) "
                        "is not supported; move the shared prompt into a 'prompt' column")
    if not cols and LOAD_ERROR_COLUMN in dataset.column_names:
        return "standard"  # nothing readable at all: every row is reported with its load error
    raise DataError(f"cannot detect the preference format from columns {sorted(cols)}; expected "
                    "prompt/chosen/rejected (standard or conversational) or conversations/chosen/rejected "
                    "(sharegpt)")


def resolve_format(dataset, fmt: str) -> str:
    """``fmt`` as given to :func:`~orpo_ds.data.tokenize_pairs` -> the format to use: ``"auto"`` is
    :func:`format_of`; a forced format must name one of :data:`FORMATS` and find its columns (a dataset of
    unreadable rows only, :data:`~orpo_ds.data.io.LOAD_ERROR_COLUMN`, passes: its rows are reported).
    Raises :class:`DataError` otherwise."""
    if fmt == "auto":
        return format_of(dataset)
    if fmt not in FORMATS:
        raise DataError(f"fmt={fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    missing = [c for c in _REQUIRED[fmt] if c not in dataset.column_names]
    if missing and set(dataset.column_names) != {LOAD_ERROR_COLUMN}:
        raise DataError(f"fmt={fmt!r} needs columns {list(_REQUIRED[fmt])}; missing {missing} "
                        f"(columns: {dataset.column_names})")
    return fmt


# ------------------------------------------------------------------------------------------- parsing


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an int",
            float: "a float"}.get(type(value), type(value).__name__)


def _field(row: Mapping, key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise Drop(f"missing field: {key!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Drop(f"wrong type: {where} is {_type_name(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Drop(f"undecodable text: {where} is not valid Unicode (lone surrogate)") from None
    return value


def _messages(value: Any, where: str, roles: Mapping[str, str], role_key: str, content_key: str,
              keep_extra: bool) -> list[dict]:
    """A list of message objects -> ``[{"role", "content", ...}]`` with mapped roles, or Drop."""
    if not isinstance(value, list):
        raise Drop(f"malformed conversation: {where} is {_type_name(value)}, expected a list of messages")
    out = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise Drop(f"malformed conversation: {at} is {_type_name(m)}, expected a message object")
        for key in (role_key, content_key):
            if m.get(key) is None:
                raise Drop(f"malformed conversation: {at} has no {key!r}")
        role = m[role_key]
        if not isinstance(role, str):
            raise Drop(f"malformed conversation: {at}.{role_key} is {_type_name(role)}, expected a string")
        if role not in roles:
            raise Drop(f"unknown role: {role!r} in {at}")
        msg = {"role": roles[role], "content": _text(m[content_key], f"{at}.{content_key}")}
        if keep_extra:
            # Arrow gives every message every key seen in the column (None where absent): drop those,
            # a template would otherwise see e.g. tool_calls=None on every message.
            msg.update({k: v for k, v in m.items() if k not in (role_key, content_key) and v is not None})
        out.append(msg)
    return out


def _response(value: Any, where: str, roles: Mapping[str, str], role_key: str, content_key: str,
              keep_extra: bool) -> list[dict]:
    msgs = _messages([value] if isinstance(value, dict) else value, where, roles, role_key, content_key,
                     keep_extra)
    if not msgs:
        raise Drop(f"empty response: {where!r} has no messages")
    # Only assistant turns: the response's tokens are concatenated and every one is scored, so a user or
    # tool turn here would be pasted into the answer without its turn markers and trained on as the model's.
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise Drop(f"multi-turn response: {where}[{i}] is a {m['role']!r} message; a response holds "
                       f"assistant messages only (earlier turns belong in the prompt)")
    if not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise Drop(f"empty response: {where!r}")
    return msgs


def parse_row(row: Mapping, fmt: str) -> tuple[Any, Any, Any]:
    """Validate a row: ``(prompt, chosen, rejected)`` as strings (standard) or message lists, or Drop."""
    if row.get(LOAD_ERROR_COLUMN):
        raise Drop(row[LOAD_ERROR_COLUMN])
    if fmt == "standard":
        prompt, chosen, rejected = (_text(_field(row, k), repr(k)) for k in ("prompt", "chosen", "rejected"))
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise Drop(f"empty response: {name!r}")
        return prompt, chosen, rejected
    if fmt == "conversational":
        args = (_CHAT_ROLES, "role", "content", True)
        prompt = _messages(_field(row, "prompt"), "prompt", *args)
        where = "prompt"
    else:
        args = (_SHAREGPT_ROLES, "from", "value", False)
        prompt = _messages(_field(row, "conversations"), "conversations", *args)
        system = row.get("system")
        if system is not None and _text(system, "'system'").strip() and not (prompt and prompt[0]["role"] == "system"):
            prompt.insert(0, {"role": "system", "content": system})
        where = "conversations"
    if not prompt:
        raise Drop(f"empty prompt: {where!r} has no messages")
    chosen = _response(_field(row, "chosen"), "chosen", *args)
    rejected = _response(_field(row, "rejected"), "rejected", *args)
    return prompt, chosen, rejected


# ----------------------------------------------------------------------------------- chat templates


def token_ids(out: Any) -> list[int]:
    """apply_chat_template / tokenizer output -> a flat list of ints (a dict/BatchEncoding in transformers 5)."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, tokenize: bool,
                escape: bool = False):
    """Run the chat template on ``messages``: their token ids (``tokenize``) or their text. A template
    that fails on them (jinja ``raise_exception``, ...) drops the row."""
    # escape: control-token strings inside the messages are encoded as text (only with tokenize=True); the
    # argument is passed only when set, so keep/reject also work with transformers < 5.20.
    extra = {"sanitize_control_tokens": True} if escape else {}
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                            tokenize=tokenize, return_dict=False, **extra)
    except Exception as e:  # noqa: BLE001 - jinja raise_exception(...) etc.: a property of this row
        raise Drop(f"chat template error: {type(e).__name__}: {e}") from None
    return token_ids(out) if tokenize else out
