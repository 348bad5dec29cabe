"""Loading preference records: local JSON / JSONL / parquet files, saved dataset folders, hub datasets.

Unreadable rows of a JSON file do not fail the file: each becomes a row holding only
:data:`LOAD_ERROR_COLUMN`, which the row pipeline (:func:`orpo_ds.data.formats.parse_row`) reports as a
dropped row under its own index.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from orpo_ds.data.errors import DataError

__all__ = ["LOAD_ERROR_COLUMN", "load_records"]

# A row of a JSON/JSONL file that could not even be read (bad JSON, bad UTF-8, not an object) is kept as a
# row holding only this column, so tokenize_pairs reports it under its own row index instead of crashing.
LOAD_ERROR_COLUMN = "_orpo_load_error"

# A missing source ending in one of these is a mistyped local file: hub dataset names never end like this.
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".arrow",
                  ".gz", ".bz2", ".xz", ".zst", ".zip")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_records(source: str, split: str = "train"):
    """Load preference records as a :class:`datasets.Dataset`.

    ``source`` is, in this order: a ``.jsonl`` / ``.json`` (JSON lines, a top-level list, or an object
    holding the list under ``split`` or under its only key) / ``.parquet`` file; a folder written by
    ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks the split of a dict); another
    folder of data files (via ``datasets.load_dataset``); else a hub dataset name (``owner/name``).

    Local files are read without the Hugging Face cache, and their dataset fingerprint is a hash of the
    file content, so the tokenization cache is shared by processes and runs that read the same bytes.
    JSON rows that cannot be read (bad JSON line, invalid UTF-8, lone surrogates, not an object) become
    rows holding only :data:`LOAD_ERROR_COLUMN`, which :func:`~orpo_ds.data.tokenize_pairs` reports with their index;
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
            except Exception as e:  # re-raised with the folder named
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
    except Exception as e:  # re-raised with the source named
        raise DataError(f"{source}: could not load split {split!r} with datasets.load_dataset: "
                        f"{type(e).__name__}: {e}") from e


def _fingerprint_hash(kind: str, split: str):
    return hashlib.sha256(f"orpo_ds.load_records/1\0{kind}\0{split}\0".encode())


def _content_fingerprint(kind: str, split: str, data: bytes) -> str:
    h = _fingerprint_hash(kind, split)
    h.update(data)
    return h.hexdigest()[:32]


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def file_fingerprint(source: str, split: str = "train") -> str | None:
    """The dataset fingerprint :func:`load_records` gives the local data file ``source``, from its bytes
    streamed through sha256: no parse, constant memory, so a cache hit need not load the records. None for
    any other source (a folder, a hub name), which only loading can fingerprint."""
    path = Path(source).expanduser()
    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return None
    h = _fingerprint_hash(kind, split if kind == "json" else "")  # as _load_json_file / _load_parquet_file
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None  # load_records names the problem
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
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: re-raised with the file named
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
    # A byte-order mark (editors on Windows write one) is not part of the first record.
    body = data.removeprefix(codecs.BOM_UTF8)
    rows: list[dict | str] = []  # a dict per good row, a load-error reason per unreadable one
    parsed = None
    if path.suffix.lower() == ".json":
        try:
            # surrogateescape: invalid UTF-8 bytes become lone surrogates that _check_row reports per row.
            parsed = json.loads(body.decode("utf-8", errors="surrogateescape"))
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
        for line in body.split(b"\n"):
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
        except Exception as e:
            raise DataError(f"{path}: a column holds values of different types ({type(e).__name__}: {e}); "
                            "upgrade datasets (>= 5 stores such columns as Json) or fix the rows") from e
    except Exception as e:  # valid JSON that Arrow cannot hold fails the whole column
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
