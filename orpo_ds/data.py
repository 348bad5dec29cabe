"""Preference records -> :class:`~orpo_ds.packing.TokenizedPair` objects, with a drop report and a cache.

    records = load_records("data/pairs.jsonl")                 # file, saved dataset folder or hub name
    pairs, report = tokenize_pairs(records, tokenizer, max_length=1024, cache_dir=".cache/orpo_ds/tokenized")
    print(report.summary())    # kept 287/300 pairs; dropped 13: 8 empty response (rows 3, 17, ...), ...

Formats (detected from the columns by :func:`format_of`, or forced with ``fmt=``):

* ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (an empty prompt is allowed: plain
  continuation; an empty or whitespace-only response is not).
* ``conversational`` (TRL): ``prompt`` is a list of ``{"role", "content"}`` messages; ``chosen`` and
  ``rejected`` are one assistant message (a dict) or a list of messages ending with an assistant message.
* ``sharegpt`` (LLaMA-Factory, e.g. ``dpo_en_demo.json``): ``conversations`` is a list of
  ``{"from": "human" | "gpt" | "system", "value": str}`` turns, ``chosen`` / ``rejected`` are
  ``{"from": "gpt", "value": str}``; an optional ``system`` string column becomes a leading system message.
  ``human`` -> user, ``gpt`` -> assistant, ``system`` -> system (``user`` / ``assistant`` are accepted as
  aliases); any other ``from`` drops the row.

Token layout of one pair (``max_length`` bounds EACH sequence, prompt + one response, as in TRL):

* With a chat template (chat formats always; standard strings too, as one user message and one assistant
  message each, so instruct models see their own template): ``prompt_ids`` is the rendered prompt with the
  generation prompt; a response's ids are the tokens the full conversation adds after ``prompt_ids``, cut
  after the response's last EOS (ChatML's trailing ``"\\n"`` after ``<|im_end|>`` is not trained), with
  EOS appended when the template emits none.
* Without a chat template: ``prompt_ids = tokenizer(prompt)`` (with special tokens: a BOS if the tokenizer
  adds one); a response is ``tokenizer(response, add_special_tokens=False) + [eos]``.
* Every untruncated response ends with the tokenizer's EOS id and holds no prompt token.

Truncation (``truncation="prompt_left"``, the default), only when ``len(prompt) + len(longest response)``
exceeds ``max_length``; see :func:`truncate_pair`:

1. The prompt is cut from the LEFT (its end, where the question and the generation prompt sit, stays),
   only as far as needed for the longest response to fit, but never below ``min(len(prompt),
   max_length // 2)`` tokens (TRL's default ``max_prompt_length`` is half of ``max_length``), so a very
   long response cannot push the whole prompt out. A leading BOS token survives the cut.
2. Then the responses are cut from the RIGHT to the room left. A cut response does NOT keep its EOS (as
   in TRL): appending EOS at an arbitrary cut point would teach the model to stop mid-answer.
3. A pair whose prompt leaves no room for a response (fewer than 1 token after a non-empty prompt, 2
   after an empty one: what :class:`TokenizedPair` needs to score it), or whose two responses become
   identical, is dropped with that reason. With ``max_length >= 2`` the floor in step 1 always leaves
   room, so under ``prompt_left`` only identical responses drop; "prompt leaves no room" comes from
   ``truncation="drop"``.

``truncation="drop"`` drops every over-long pair instead ("too long", or "prompt leaves no room" when the
prompt alone fills ``max_length``).

Special-token strings in the text (``special_tokens_in_content``): a prompt or response that contains
the spelling of a control token (``"<|im_end|>"``, ``"<|im_start|>system"``, ...) would otherwise be
tokenized to the control token itself, so a row could end a turn or open a system turn from inside its
content. Control tokens are the tokenizer's special tokens, plus, with a chat template, the added tokens
the template writes (or those in ``tokenizer.chat_control_tokens``, if set); whitespace tokens such as
Gemma's ``"\\n"`` are ordinary text. Every string of a row (message contents and the other message
fields the template may print) is checked:

* ``"reject"`` (the default): the row is dropped as ``"special token in content: 'chosen' contains
  '<|im_end|>'"``.
* ``"escape"``: the strings are tokenized as plain text, the template's own control tokens stay tokens:
  with a chat template through transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``
  (transformers >= 5.20; older versions raise :class:`DataError`), without one with
  ``tokenizer(text, split_special_tokens=True)``. The text itself is not changed. Only where a template
  renders the prompt differently once a response follows (see :func:`_chat_response_ids`) is a response
  tokenized from rendered text, where its control-token spellings can no longer be told from the
  template's: such a row is dropped under the same reason instead.
* ``"keep"``: tokenized as written, control tokens included (the behaviour before this setting).

Unusable rows never crash the pipeline: each one is counted in the :class:`DropReport` with its row index
and a reason ``"<category>: <detail>"`` (categories: missing field, wrong type, undecodable text, invalid
JSON, malformed row, malformed conversation, unknown role, empty prompt, empty response, special token in
content, chosen == rejected, prompt leaves no room, too long, chat template error, tokenizer error).
``strict=True`` turns any of them into a :class:`DataError` naming the row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo_ds.packing import TokenizedPair

__all__ = [
    "FORMATS", "TRUNCATION_POLICIES", "SPECIAL_TOKEN_POLICIES", "CACHE_VERSION", "LOAD_ERROR_COLUMN", "DataError",
    "DropReport", "load_records", "format_of", "tokenize_pairs", "truncate_pair",
]

logger = logging.getLogger(__name__)

FORMATS = ("standard", "conversational", "sharegpt")
TRUNCATION_POLICIES = ("prompt_left", "drop")
SPECIAL_TOKEN_POLICIES = ("reject", "escape", "keep")
# Part of every cache key: bump it whenever a change here alters the tokens or drop reasons produced.
CACHE_VERSION = "orpo_ds.data/2"
# A row of a JSON/JSONL file that could not even be read (bad JSON, bad UTF-8, not an object) is kept as a
# row holding only this column, so tokenize_pairs reports it under its own row index instead of crashing.
LOAD_ERROR_COLUMN = "_orpo_load_error"

_REQUIRED = {"standard": ("prompt", "chosen", "rejected"), "conversational": ("prompt", "chosen", "rejected"),
             "sharegpt": ("conversations", "chosen", "rejected")}
_CHAT_ROLES = {r: r for r in ("system", "user", "assistant", "tool", "developer", "function", "ipython")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
# A missing source ending in one of these is a mistyped local file: hub dataset names never end like this.
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".arrow",
                  ".gz", ".bz2", ".xz", ".zst", ".zip")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SUMMARY_ROWS = 5


class DataError(ValueError):
    """Unusable data: a bad source or format (dataset level), or, with ``strict=True``, a bad row.

    ``row`` and ``reason`` are set for row-level errors.
    """

    def __init__(self, message: str, *, row: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.row = row
        self.reason = reason


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


class _Drop(Exception):
    """Raised inside the row pipeline: the row is unusable for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------- loading


def load_records(source: str, split: str = "train"):
    """Load preference records as a :class:`datasets.Dataset`.

    ``source`` is, in this order: a ``.jsonl`` / ``.json`` (JSON lines, a top-level list, or an object
    holding the list under ``split`` or under its only key) / ``.parquet`` file; a folder written by
    ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks the split of a dict); another
    folder of data files (via ``datasets.load_dataset``); else a hub dataset name (``owner/name``).

    Local files are read without the Hugging Face cache, and their dataset fingerprint is a hash of the
    file content, so the tokenization cache is shared by processes and runs that read the same bytes.
    JSON rows that cannot be read (bad JSON line, invalid UTF-8, lone surrogates, not an object) become
    rows holding only :data:`LOAD_ERROR_COLUMN`, which :func:`tokenize_pairs` reports with their index;
    columns whose types differ between rows are stored as ``datasets.Json`` so the rows can be judged
    one by one.

    A ``source`` that is neither an existing file nor an existing folder is taken for a hub name only if
    it looks like one: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``; at most one
    ``/``), not starting with ``.``, and not ending in a data-file or compression extension (``.jsonl``,
    ``.json``, ``.parquet``, ``.pq``, ``.csv``, ``.tsv``, ``.txt``, ``.arrow``, ``.gz``, ``.bz2``,
    ``.xz``, ``.zst``, ``.zip``). Anything else is a local path that does not exist and raises a
    "not found" :class:`DataError` at once: ``data/pairs.jsonl``, ``./foo.json``, ``../x``,
    ``/abs/path.parquet``, ``~/pairs``, ``a/b/c``, a Windows path. Only an extensionless ``owner/name``
    (e.g. a mistyped saved-dataset folder ``data/pairs``) still goes to the hub: it cannot be told from a
    hub name.

    Raises :class:`DataError` for a missing path, an unsupported file type, and a file or saved dataset
    that cannot be read (unreadable, corrupt or truncated), naming the file and the reason.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _load_json_file(path, split)
        if suffix in (".parquet", ".pq"):
            return _load_parquet_file(path)
        raise DataError(f"{source}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():  # save_to_disk output
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - re-raised with the folder named
                raise DataError(f"{source}: not a readable saved dataset (corrupt or incomplete "
                                f"save_to_disk folder?): {type(e).__name__}: {e}") from e
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source}: saved DatasetDict has no split {split!r}; "
                                    f"splits: {', '.join(loaded)}")
                return loaded[split]
            return loaded
        return _load_with_datasets(source, split)
    if (_HUB_NAME.match(source) and source.count("/") <= 1
            and not source.lower().endswith(_DATA_SUFFIXES)):
        return _load_with_datasets(source, split)
    raise DataError(f"{source}: not found: no such file or directory (and not a hub dataset name like "
                    "'owner/name'); point data paths to a .jsonl/.json/.parquet file or a saved dataset folder")


def _load_with_datasets(source: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DataError(f"{source}: could not load split {split!r} with datasets.load_dataset: "
                        f"{type(e).__name__}: {e}") from e


def _content_fingerprint(kind: str, split: str, data: bytes) -> str:
    h = hashlib.sha256(f"orpo_ds.load_records/1\0{kind}\0{split}\0".encode())
    h.update(data)
    return h.hexdigest()[:32]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from e


def _load_parquet_file(path: Path):
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.table import InMemoryTable

    data = _read_bytes(path)
    try:
        table = pq.read_table(path)
        return Dataset(InMemoryTable(table), fingerprint=_content_fingerprint("parquet", "", data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...: re-raised with the file named
        raise DataError(f"{path}: not a readable parquet file (corrupt or truncated?): "
                        f"{type(e).__name__}: {e}") from e


def _check_row(obj: Any) -> dict | str:
    """A parsed JSON value -> the row dict, or a load-error reason."""
    if not isinstance(obj, dict):
        return f"malformed row: a JSON {type(obj).__name__} instead of an object"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return f"undecodable text: {_surrogate_path(obj, '')} is not valid Unicode (lone surrogate)"
    return obj


def _surrogate_path(obj: Any, where: str) -> str:
    """Where in a parsed row the first string that cannot be encoded as UTF-8 sits, e.g. ``'chosen'``."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        sub = f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else repr(k))
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return sub
        elif isinstance(v, (dict, list)):
            found = _surrogate_path(v, sub)
            if found:
                return found
    return where


def _load_json_file(path: Path, split: str):
    from datasets import Dataset

    data = _read_bytes(path)
    rows: list[dict | str] = []  # a dict per good row, a load-error reason per unreadable one
    parsed = None
    if path.suffix.lower() == ".json":
        try:
            # surrogateescape: invalid UTF-8 bytes become lone surrogates that _check_row reports per row.
            parsed = json.loads(data.decode("utf-8", errors="surrogateescape"))
        except (ValueError, RecursionError):  # JSONDecodeError, or one of the limits below
            parsed = None  # not one readable JSON document: read it as JSON lines below
        if isinstance(parsed, dict):
            lists = [v for v in parsed.values() if isinstance(v, list)]
            if isinstance(parsed.get(split), list):
                parsed = parsed[split]
            elif len(parsed) == 1 and len(lists) == 1:
                parsed = lists[0]
            else:
                raise DataError(f"{path}: a JSON object with keys {sorted(parsed)[:10]}; expected a list of "
                                f"records, or an object holding the list under {split!r}")
        elif parsed is not None and not isinstance(parsed, list):
            raise DataError(f"{path}: top-level JSON {type(parsed).__name__}; expected a list of records")
    if parsed is not None:
        rows = [_check_row(obj) for obj in parsed]
    else:
        for line in data.split(b"\n"):
            if not line.strip():
                continue  # blank lines are not rows (row indices count the non-blank lines)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append(f"undecodable text: the line is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                rows.append(_check_row(json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append(f"invalid JSON: {e.msg} (line column {e.colno})")
            except (ValueError, RecursionError) as e:  # valid syntax past Python's limits: an integer of more
                # than 4300 digits, nesting deeper than the recursion limit
                rows.append(f"invalid JSON: {type(e).__name__}: {e}")
    columns: dict[str, list] = {}
    for row in rows:  # union of the keys, in order of first appearance; a missing key reads as None
        for k in (row if isinstance(row, dict) else (LOAD_ERROR_COLUMN,)):
            columns.setdefault(k, [])
    for row in rows:
        for k, col in columns.items():
            if isinstance(row, dict):
                col.append(row.get(k))
            else:
                col.append(row if k == LOAD_ERROR_COLUMN else None)
    if not rows:
        raise DataError(f"{path}: no records")
    # use_json: a column whose values have different types in different rows (a wrong-typed field) is
    # stored as datasets.Json instead of failing the whole file; the row pipeline judges each value.
    try:
        ds = Dataset.from_dict(columns, on_mixed_types="use_json")
    except TypeError:  # datasets < 5 has no Json columns: a wrong-typed field then fails the whole file
        try:
            ds = Dataset.from_dict(columns)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: a column holds values of different types ({type(e).__name__}: {e}); "
                            "upgrade datasets (>= 5 stores such columns as Json) or fix the rows") from e
    except Exception as e:  # noqa: BLE001 - valid JSON that Arrow cannot hold fails the whole column
        raise DataError(f"{path}: the records cannot be stored as a dataset: column(s) "
                        f"{_unstorable_columns(columns)} hold values Arrow cannot represent (an integer beyond "
                        f"64 bits, nesting too deep, ...): {type(e).__name__}: {e}; fix or remove those values") from e
    ds._fingerprint = _content_fingerprint("json", split, data)
    return ds


def _unstorable_columns(columns: dict[str, list]) -> list[str]:
    """The columns that ``Dataset.from_dict`` fails on one by one, to name them in the error."""
    from datasets import Dataset

    bad = []
    for name, values in columns.items():
        try:
            Dataset.from_dict({name: values}, on_mixed_types="use_json")
        except Exception:  # noqa: BLE001 - any failure marks the column
            bad.append(name)
    return bad


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


# -------------------------------------------------------------------------------------- row pipeline


@dataclass(frozen=True)
class _Ctx:
    """Everything the row function needs; pickled to the map workers."""

    tokenizer: Any
    fmt: str
    use_template: bool
    eos_id: int
    bos_id: int | None
    max_length: int
    truncation: str
    special_tokens: str  # one of SPECIAL_TOKEN_POLICIES
    control_re: re.Pattern | None  # matches any control-token string; None when the tokenizer has none


def _control_tokens(tokenizer, use_template: bool) -> tuple[str, ...]:
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


def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    # Longest first: "<|im_start|>system" style tokens win over a shorter token they contain.
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def _find_control(value: Any, control_re: re.Pattern) -> str | None:
    """The first control-token string in ``value``: a string, or messages whose string values (at any depth;
    the template may print any of them) are searched in order."""
    if isinstance(value, str):
        found = control_re.search(value)
        return found.group(0) if found else None
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found = _find_control(item, control_re)
        if found is not None:
            return found
    return None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an int",
            float: "a float"}.get(type(value), type(value).__name__)


def _field(row: Mapping, key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise _Drop(f"missing field: {key!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Drop(f"wrong type: {where} is {_type_name(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Drop(f"undecodable text: {where} is not valid Unicode (lone surrogate)") from None
    return value


def _messages(value: Any, where: str, roles: Mapping[str, str], role_key: str, content_key: str,
              keep_extra: bool) -> list[dict]:
    """A list of message objects -> ``[{"role", "content", ...}]`` with mapped roles, or _Drop."""
    if not isinstance(value, list):
        raise _Drop(f"malformed conversation: {where} is {_type_name(value)}, expected a list of messages")
    out = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _Drop(f"malformed conversation: {at} is {_type_name(m)}, expected a message object")
        for key in (role_key, content_key):
            if m.get(key) is None:
                raise _Drop(f"malformed conversation: {at} has no {key!r}")
        role = m[role_key]
        if not isinstance(role, str):
            raise _Drop(f"malformed conversation: {at}.{role_key} is {_type_name(role)}, expected a string")
        if role not in roles:
            raise _Drop(f"unknown role: {role!r} in {at}")
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
        raise _Drop(f"empty response: {where!r} has no messages")
    if msgs[-1]["role"] != "assistant":
        raise _Drop(f"malformed conversation: {where!r} must end with an assistant message, "
                    f"not {msgs[-1]['role']!r}")
    if not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise _Drop(f"empty response: {where!r}")
    return msgs


def _parse(row: Mapping, fmt: str) -> tuple[Any, Any, Any]:
    """Validate a row: ``(prompt, chosen, rejected)`` as strings (standard) or message lists, or _Drop."""
    if row.get(LOAD_ERROR_COLUMN):
        raise _Drop(row[LOAD_ERROR_COLUMN])
    if fmt == "standard":
        prompt, chosen, rejected = (_text(_field(row, k), repr(k)) for k in ("prompt", "chosen", "rejected"))
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise _Drop(f"empty response: {name!r}")
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
        raise _Drop(f"empty prompt: {where!r} has no messages")
    chosen = _response(_field(row, "chosen"), "chosen", *args)
    rejected = _response(_field(row, "rejected"), "rejected", *args)
    return prompt, chosen, rejected


def _ids(out: Any) -> list[int]:
    """apply_chat_template / tokenizer output -> a flat list of ints (a dict/BatchEncoding in transformers 5)."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tokenize: bool, escape: bool = False):
    # escape: control-token strings inside the messages are encoded as text (only with tokenize=True); the
    # argument is passed only when set, so keep/reject also work with transformers < 5.20.
    extra = {"sanitize_control_tokens": True} if escape else {}
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                            tokenize=tokenize, return_dict=False, **extra)
    except Exception as e:  # noqa: BLE001 - jinja raise_exception(...) etc.: a property of this row
        raise _Drop(f"chat template error: {type(e).__name__}: {e}") from None
    return _ids(out) if tokenize else out


def _end_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Cut what a template puts after the response's last EOS (ChatML: "\\n"); append EOS if there is none."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos_id:
            return ids[: i + 1]
    return ids + [eos_id]


def _chat_response_ids(ctx: _Ctx, prompt: list[dict], prompt_ids: list[int], response: list[dict],
                       name: str) -> list[int]:
    tok = ctx.tokenizer
    escape = ctx.special_tokens == "escape"
    full = _render(tok, prompt + response, False, True, escape)
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids):]
    else:
        # The prompt's ids are not a prefix of the full conversation's: the template renders the history
        # differently once an assistant turn follows (e.g. it drops <think> blocks or the generation
        # prompt differs from the rendered assistant header), or the tokenizer merges across the
        # boundary. Fall back to tokenizing the response text on its own: what the full rendering adds
        # after the prompt rendering, or, when even the texts disagree, the bare response contents.
        # In rendered text a control-token string from the content cannot be told from the template's own
        # tokens any more, so escape cannot be kept here: such a response is dropped instead.
        found = _find_control(response, ctx.control_re) if escape and ctx.control_re is not None else None
        if found is not None:
            raise _Drop(f"special token in content: {name!r} contains {found!r}, which cannot be escaped with "
                        "this chat template (it renders the prompt differently once a response follows)")
        prompt_text = _render(tok, prompt, True, False)
        full_text = _render(tok, prompt + response, False, False)
        if full_text.startswith(prompt_text):
            text = full_text[len(prompt_text):]
        else:
            text = "".join(m["content"] for m in response)
        ids = _ids(tok(text, add_special_tokens=False)["input_ids"])
    return _end_at_eos(ids, ctx.eos_id)


def _tokenize_row(row: Mapping, ctx: _Ctx) -> tuple[list[int], list[int], list[int]]:
    """One record -> ``(prompt_ids, chosen_ids, rejected_ids)`` within ``max_length``, or raises _Drop."""
    prompt, chosen, rejected = _parse(row, ctx.fmt)
    if ctx.special_tokens == "reject" and ctx.control_re is not None:
        for name, value in (("conversations" if ctx.fmt == "sharegpt" else "prompt", prompt), ("chosen", chosen),
                            ("rejected", rejected)):
            found = _find_control(value, ctx.control_re)
            if found is not None:
                raise _Drop(f"special token in content: {name!r} contains {found!r}")
    tok = ctx.tokenizer
    escape = ctx.special_tokens == "escape"
    if ctx.fmt == "standard" and ctx.use_template:
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    if isinstance(prompt, list):
        prompt_ids = _render(tok, prompt, True, True, escape)
        responses = [_chat_response_ids(ctx, prompt, prompt_ids, r, name)
                     for name, r in (("chosen", chosen), ("rejected", rejected))]
    else:
        # escape: special-token strings are split into ordinary tokens; the BOS/EOS the tokenizer adds stay.
        split = {"split_special_tokens": True} if escape else {}
        prompt_ids = _ids(tok(prompt, **split)["input_ids"])
        if prompt_ids and prompt_ids[-1] == ctx.eos_id and (escape or not prompt.endswith(str(tok.eos_token))):
            prompt_ids.pop()  # a tokenizer that appends EOS to every text: EOS must not end the prompt
        responses = [_ids(tok(r, add_special_tokens=False, **split)["input_ids"]) + [ctx.eos_id]
                     for r in (chosen, rejected)]
    for name, ids in zip(("chosen", "rejected"), responses):
        if len(ids) <= 1:  # EOS alone: the text rendered to nothing
            raise _Drop(f"empty response: {name!r} has no tokens")
    if responses[0] == responses[1]:
        raise _Drop("chosen == rejected")
    fitted = truncate_pair(prompt_ids, responses[0], responses[1], max_length=ctx.max_length,
                           policy=ctx.truncation, bos_id=ctx.bos_id)
    if isinstance(fitted, str):
        raise _Drop(fitted)
    if fitted[1] == fitted[2]:
        raise _Drop(f"chosen == rejected: identical after truncation to max_length {ctx.max_length}")
    return fitted


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
                  policy: str = "prompt_left", bos_id: int | None = None
                  ) -> tuple[list[int], list[int], list[int]] | str:
    """Fit ``prompt + chosen`` and ``prompt + rejected`` into ``max_length`` tokens each.

    Returns the (possibly cut) lists, or a drop reason string. Pairs that fit are returned unchanged.
    ``"prompt_left"``: keep the last ``max(max_length - L, min(P, max_length // 2))`` prompt tokens
    (``P`` = prompt length, ``L`` = longest response; a leading ``bos_id`` is kept in front of them and
    counts toward them), then cut both responses from the right to the room left (a cut response loses
    its EOS). ``"drop"``: every over-long pair is a drop. Either way a pair with no room for a scorable
    response (>= 1 token after a non-empty prompt, >= 2 after an empty one) is a drop.
    """
    if policy not in TRUNCATION_POLICIES:
        raise DataError(f"truncation={policy!r}; expected one of {', '.join(TRUNCATION_POLICIES)}")
    n_prompt, longest = len(prompt), max(len(chosen), len(rejected))
    if n_prompt + longest <= max_length:
        return list(prompt), list(chosen), list(rejected)
    if policy == "drop":
        if n_prompt + (1 if prompt else 2) > max_length:
            return f"prompt leaves no room: prompt has {n_prompt} tokens, max_length is {max_length}"
        return f"too long: prompt {n_prompt} + response {longest} tokens > max_length {max_length}"
    keep = max(max_length - longest, min(n_prompt, max_length // 2))
    if keep < n_prompt:
        head = 1 if (bos_id is not None and prompt and prompt[0] == bos_id) else 0
        prompt = list(prompt[:head]) + list(prompt[n_prompt - max(keep - head, 0):])
    room = max_length - len(prompt)
    if room < (1 if prompt else 2):
        return f"prompt leaves no room: {len(prompt)} prompt tokens after truncation, max_length {max_length}"
    return list(prompt), list(chosen[:room]), list(rejected[:room])


def _map_batch(batch: dict[str, list], ctx: _Ctx) -> dict[str, list]:
    """``datasets.map`` function: each row yields its ids, or empty ids and a drop reason (never raises)."""
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "drop": []}
    n = len(next(iter(batch.values()))) if batch else 0
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        try:
            # Looked up at call time (not bound earlier) so tests can count or replace the row function.
            p, c, r = _tokenize_row(row, ctx)
            reason = ""
        except _Drop as d:
            p, c, r, reason = [], [], [], d.reason or "unusable row"
        except Exception as e:  # noqa: BLE001 - a row must never crash the pipeline
            p, c, r, reason = [], [], [], f"tokenizer error: {type(e).__name__}: {e}"
        out["prompt_ids"].append(p)
        out["chosen_ids"].append(c)
        out["rejected_ids"].append(r)
        out["drop"].append(reason)
    return out


def _run_map(dataset, ctx: _Ctx, num_proc: int, progress: bool, fingerprint: str
             ) -> tuple[list[TokenizedPair], DropReport]:
    import datasets
    from datasets import Features, Value

    List = getattr(datasets, "List", datasets.Sequence)  # noqa: N806 - datasets < 4 has only Sequence
    total = len(dataset)
    if total == 0:
        return [], DropReport(0, 0, [])
    ids = List(Value("int32"))
    features = Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "drop": Value("string")})
    workers = min(num_proc, total)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress and bars_were_on:
        datasets.disable_progress_bars()
    try:
        out = dataset.map(
            _map_batch, fn_kwargs={"ctx": ctx}, batched=True, batch_size=64,
            num_proc=workers if workers > 1 else None, remove_columns=dataset.column_names,
            features=features,  # explicit: a batch of dropped rows would otherwise infer a null type
            # In memory, no datasets cache files: our own cache is the cache, and a dataset read from a
            # saved folder must not get cache-*.arrow files written next to it.
            keep_in_memory=True, load_from_cache_file=False,
            new_fingerprint=fingerprint,  # given, so datasets does not try to hash the tokenizer
            desc="Tokenizing preference pairs")
    finally:
        if not progress and bars_were_on:
            datasets.enable_progress_bars()
    cols = out.to_dict()
    pairs, dropped = [], []
    for i, reason in enumerate(cols["drop"]):
        if reason:
            dropped.append((i, reason))  # map is 1:1 and keeps order: position i is source row i
        else:
            pairs.append(TokenizedPair(i, tuple(cols["prompt_ids"][i]), tuple(cols["chosen_ids"][i]),
                                       tuple(cols["rejected_ids"][i])))
    return pairs, DropReport(total, len(pairs), dropped)


# --------------------------------------------------------------------------------------------- cache


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What decides the ids a tokenizer gives: its full serialized state, vocab and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full tokenizer.json (vocab, merges, normalizer, pre-tokenizer, post-processor, added tokens);
        # `tokenizers` writes vocabularies ordered by id, so this string is the same in every process.
        h.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: its full vocab, added tokens included
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id,
            "specials": specials, "state_sha256": h.hexdigest()}


def _cache_inputs(dataset, tokenizer, *, max_length: int, truncation: str, fmt: str, special_tokens: str,
                  control_tokens: tuple[str, ...]) -> dict[str, Any] | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        return None
    # control_tokens too: tokenizer.chat_control_tokens changes them without changing the tokenizer's state.
    return {"version": CACHE_VERSION, "dataset": fingerprint, "num_rows": len(dataset),
            "tokenizer": tokenizer_identity(tokenizer), "max_length": max_length, "truncation": truncation,
            "fmt": fmt, "special_tokens_in_content": special_tokens, "control_tokens": list(control_tokens)}


def _cache_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _load_cache(path: Path, key: str) -> tuple[list[TokenizedPair], DropReport] | None:
    import pyarrow as pa

    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            raise ValueError("key or version mismatch")
        report = DropReport.from_json(json.loads((path / "report.json").read_text()))
        with pa.memory_map(str(path / "pairs.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        pairs = [TokenizedPair(pid, tuple(p), tuple(c), tuple(r)) for pid, p, c, r in
                 zip(cols["pair_id"], cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
        if len(pairs) != report.kept:
            raise ValueError(f"{len(pairs)} pairs but the report says {report.kept}")
        return pairs, report
    except Exception as e:  # noqa: BLE001 - an unreadable cache is a miss, rebuilt below
        logger.warning("tokenization cache %s is unreadable (%s: %s); tokenizing again", path, type(e).__name__, e)
        return None


def _save_cache(path: Path, key: str, inputs: Mapping[str, Any], pairs: list[TokenizedPair],
                report: DropReport) -> None:
    """Write into a temporary folder next to ``path``, then rename it into place: a reader sees either no
    cache or a complete one, never a half-written one (a crash leaves only a ``.tmp-`` folder behind)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        ids = pa.list_(pa.int32())
        table = pa.table({
            "pair_id": pa.array([p.pair_id for p in pairs], pa.int64()),
            "prompt_ids": pa.array([p.prompt_ids for p in pairs], ids),
            "chosen_ids": pa.array([p.chosen_ids for p in pairs], ids),
            "rejected_ids": pa.array([p.rejected_ids for p in pairs], ids)})
        with pa.OSFile(str(tmp / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        (tmp / "report.json").write_text(json.dumps(report.to_json()))
        (tmp / "meta.json").write_text(json.dumps({"key": key, "version": CACHE_VERSION, "inputs": inputs},
                                                  indent=1, sort_keys=True))
        if path.exists():  # an unreadable cache (we only save after a miss): move it aside first
            stale = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process published the same key meanwhile; same inputs, same content: keep theirs.
            logger.info("tokenization cache %s was written by another process", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ frontend


def tokenize_pairs(dataset, tokenizer, *, max_length: int, fmt: str = "auto", truncation: str = "prompt_left",
                   special_tokens_in_content: str = "reject", num_proc: int = 1,
                   cache_dir: str | os.PathLike | None = None, strict: bool = False,
                   progress: bool = True) -> tuple[list[TokenizedPair], DropReport]:
    """Tokenize every row of ``dataset`` into a :class:`TokenizedPair` (``pair_id`` = row index).

    Args:
        dataset: a ``datasets.Dataset`` (see :func:`load_records`).
        tokenizer: a Hugging Face tokenizer with an EOS token; chat formats need a chat template.
        max_length: token budget of EACH sequence (prompt + one response), >= 2.
        fmt: ``"auto"`` (:func:`format_of`), ``"standard"``, ``"conversational"`` or ``"sharegpt"``.
        truncation: ``"prompt_left"`` or ``"drop"`` (module docstring; :func:`truncate_pair`).
        special_tokens_in_content: what to do with a row whose strings contain a control token's spelling
            (``"<|im_end|>"``): ``"reject"`` drops it ("special token in content"), ``"escape"`` tokenizes
            those strings as plain text, ``"keep"`` lets them become control tokens (module docstring).
        num_proc: ``datasets.map`` workers; the result does not depend on it.
        cache_dir: if set, results live in ``cache_dir/<key>``, the key hashing the dataset fingerprint
            (file content hash for :func:`load_records` files), the tokenizer's identity (name, size,
            full serialized state incl. vocab, chat template), ``max_length``, ``truncation``, the
            resolved format, ``special_tokens_in_content`` with the control tokens it looks for, and
            :data:`CACHE_VERSION`. A hit skips tokenization entirely.
        strict: raise :class:`DataError` (naming the first bad row) if any row is unusable.
        progress: show the ``datasets`` progress bar.

    Returns:
        ``(pairs, report)``: the kept pairs in row order, and the :class:`DropReport` of all rows.

    Raises:
        DataError: bad arguments, undetectable format, a tokenizer without EOS (or without chat template
            for a chat format, or, for ``escape`` with a chat template, a transformers without
            ``sanitize_control_tokens``), or any bad row when ``strict``. Bad rows are otherwise only reported.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an int >= 2, got {max_length!r}")
    if truncation not in TRUNCATION_POLICIES:
        raise DataError(f"truncation={truncation!r}; expected one of {', '.join(TRUNCATION_POLICIES)}")
    if special_tokens_in_content not in SPECIAL_TOKEN_POLICIES:
        raise DataError(f"special_tokens_in_content={special_tokens_in_content!r}; expected one of "
                        f"{', '.join(SPECIAL_TOKEN_POLICIES)}")
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    if fmt == "auto":
        fmt = format_of(dataset)
    elif fmt not in FORMATS:
        raise DataError(f"fmt={fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    else:
        missing = [c for c in _REQUIRED[fmt] if c not in dataset.column_names]
        if missing and set(dataset.column_names) != {LOAD_ERROR_COLUMN}:
            raise DataError(f"fmt={fmt!r} needs columns {list(_REQUIRED[fmt])}; missing {missing} "
                            f"(columns: {dataset.column_names})")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; set one")
    use_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt != "standard" and not use_template:
        raise DataError(f"{fmt} records need a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has none")
    if (special_tokens_in_content == "escape" and use_template
            and "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters):
        raise DataError("special_tokens_in_content='escape' with a chat template needs transformers >= 5.20 "
                        "(apply_chat_template(..., sanitize_control_tokens=True)); upgrade transformers, or "
                        "use 'reject' to drop such rows")
    control = _control_tokens(tokenizer, use_template)
    ctx = _Ctx(tokenizer, fmt, use_template, int(eos_id), tokenizer.bos_token_id, max_length, truncation,
               special_tokens_in_content, _control_pattern(control))

    inputs = _cache_inputs(dataset, tokenizer, max_length=max_length, truncation=truncation, fmt=fmt,
                           special_tokens=special_tokens_in_content, control_tokens=control)
    key = _cache_key(inputs) if inputs is not None else uuid.uuid4().hex
    cached = None
    if cache_dir is not None and inputs is not None:
        cached = _load_cache(Path(cache_dir) / key, key)
        if cached is not None:
            logger.info("tokenized pairs loaded from cache %s", Path(cache_dir) / key)
    if cached is not None:
        pairs, report = cached
    else:
        pairs, report = _run_map(dataset, ctx, num_proc, progress, fingerprint=key)
        if cache_dir is not None and inputs is not None:
            _save_cache(Path(cache_dir) / key, key, inputs, pairs, report)
    if strict and report.dropped:
        row, reason = report.dropped[0]
        more = len(report.dropped) - 1
        raise DataError(f"row {row}: {reason}" + (f" (and {more} more unusable rows: {report.summary()})"
                                                   if more else "") + "; strict mode stops on any unusable row",
                        row=row, reason=reason)
    return pairs, report
