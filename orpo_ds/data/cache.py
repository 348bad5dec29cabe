"""The tokenized-pairs cache: one folder ``<cache_dir>/<key>`` per input, published whole.

A folder holds ``pairs.arrow`` (the kept pairs, one Arrow record batch of ``pair_id`` and
``large_list<int32>`` id columns), ``report.json`` (the :class:`DropReport`) and ``meta.json`` (the key,
:data:`CACHE_VERSION`, the sha256 of the two data files, the pairs' :attr:`TokenizedPairs.fingerprint` and
:attr:`TokenizedPairs.duplicates`, and the inputs the key hashes, for people). A hit is memory-mapped
(:meth:`TokenizedPairs.from_arrow`): the ranks of a node that read the same folder share its pages, and the
fingerprint and the duplicates are read, not recomputed (either would read the whole file).

The key (:func:`cache_key` of :func:`cache_inputs`) covers everything that decides
the result; an unreadable, mismatched or altered folder (a file whose sha256 differs from the one
recorded) is a miss, tokenized again and replaced, with a warning.

Loaded pairs map ``pairs.arrow``: a cache file must never be rewritten in place while a run may read it.
This module never does (it publishes a new folder by rename, and a mapped file that is renamed or deleted
stays intact for its readers).

A cache folder that cannot be written (a read-only shared cache) is still read; a miss there is
tokenized and not saved, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orpo_ds.data.columns import TokenizedPairs
from orpo_ds.data.validate import DropReport
from orpo_ds.safe_files import replace_dir, staging_dir

__all__ = ["CACHE_VERSION", "tokenizer_identity", "cache_inputs", "cache_key", "load_cache", "save_cache"]

logger = logging.getLogger(__name__)

# Part of every cache key: bump it whenever a change in orpo_ds.data alters the tokens or drop reasons produced.
CACHE_VERSION = "orpo_ds.data/4"  # 3: checksums; responses of assistant turns only. 4: columns, fingerprint


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


def cache_inputs(fingerprint: str | None, tokenizer, *, max_length: int, truncation: str, fmt: str,
                 special_tokens: str, control_tokens: tuple[str, ...]) -> dict[str, Any] | None:
    """Everything that decides what tokenizing a dataset gives, as a JSON-able dict (what :func:`cache_key`
    hashes); None when the dataset has no ``fingerprint``: then nothing is cached.

    ``fingerprint`` is the dataset's (for local files a hash of their bytes, :func:`orpo_ds.data.io.file_fingerprint`),
    and ``fmt`` the format asked for (``"auto"`` included): what it resolves to is a function of the data,
    so none of the inputs needs the records loaded, and a hit can skip loading them.
    """
    if not fingerprint:
        return None
    # control_tokens too: tokenizer.chat_control_tokens changes them without changing the tokenizer's state.
    return {"version": CACHE_VERSION, "dataset": fingerprint, "tokenizer": tokenizer_identity(tokenizer),
            "max_length": max_length, "truncation": truncation, "fmt": fmt,
            "special_tokens_in_content": special_tokens, "control_tokens": list(control_tokens)}


def cache_key(inputs: Mapping[str, Any]) -> str:
    """The name of the cache folder of ``inputs``: 32 hex digits of their hash."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


_DATA_FILES = ("pairs.arrow", "report.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cache(path: Path, key: str) -> tuple[TokenizedPairs, DropReport] | None:
    """``(pairs, report)`` from the cache folder ``path`` if it holds the complete result of ``key``; None
    (a miss) if it is absent, or unreadable or of another key or version (logged)."""
    import pyarrow as pa

    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            raise ValueError("key or version mismatch")
        for name, recorded in meta["sha256"].items():
            if name not in _DATA_FILES or file_sha256(path / name) != recorded:
                raise ValueError(f"{name} is not the file that was written (its sha256 differs)")
        report = DropReport.from_json(json.loads((path / "report.json").read_text()))
        # The table's buffers keep the mapping alive after the file is closed: the pairs stay memory-mapped.
        with pa.memory_map(str(path / "pairs.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        pairs = TokenizedPairs.from_arrow(table, fingerprint=meta["fingerprint"], duplicates=meta.get("duplicates"))
        if len(pairs) != report.kept:
            raise ValueError(f"{len(pairs)} pairs but the report says {report.kept}")
        return pairs, report
    except Exception as e:  # noqa: BLE001 - an unreadable cache is a miss, rebuilt below
        logger.warning("tokenization cache %s is unreadable (%s: %s); tokenizing again", path, type(e).__name__, e)
        return None


def save_cache(path: Path, key: str, inputs: Mapping[str, Any], pairs: TokenizedPairs,
               report: DropReport) -> bool:
    """Write the cache into a staging folder next to ``path``, then publish it with
    :func:`~orpo_ds.safe_files.replace_dir`: a reader sees either no cache or a complete one, never a
    half-written one (a crash leaves at most a hidden ``.tmp-`` or ``.old-`` folder behind).

    Returns whether ``path`` now holds the result (written here or, the same, by another process)."""
    import pyarrow as pa

    # A staging folder of this writer's own: several processes may write the same key at once (ranks
    # without a shared cache folder, two jobs).
    try:
        tmp = staging_dir(path)
    except OSError as exc:  # a read-only shared cache: reading it still works, this result is not kept
        logger.warning("tokenization cache %s cannot be written (%s); the tokenized pairs are not cached",
                       path.parent, exc.strerror or exc)
        return False
    try:
        table = pairs.to_arrow()
        with pa.OSFile(str(tmp / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            # One record batch, so a reader maps each column as one array (no chunks to combine, no copy).
            writer.write_table(table, max_chunksize=max(table.num_rows, 1))
        (tmp / "report.json").write_text(json.dumps(report.to_json()))
        sums = {name: file_sha256(tmp / name) for name in _DATA_FILES}
        (tmp / "meta.json").write_text(json.dumps({"key": key, "version": CACHE_VERSION, "sha256": sums,
                                                   "fingerprint": pairs.fingerprint,
                                                   "duplicates": pairs.duplicates, "inputs": inputs},
                                                  indent=1, sort_keys=True))
        try:
            # An existing path is an unreadable cache (we only save after a miss), or the same key another
            # process has just published: replace_dir moves it aside.
            replace_dir(tmp, path)
        except OSError:
            # Another process published the same key meanwhile (a rename found its folder, or its aside, in
            # the way); same inputs, same content: keep theirs.
            logger.info("tokenization cache %s was written by another process", path)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
