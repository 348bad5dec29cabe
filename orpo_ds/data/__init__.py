"""Preference records -> :class:`TokenizedPairs` (token id columns), with a drop report and a cache.

    records = load_records("data/pairs.jsonl")                 # file, saved dataset folder or hub name
    pairs, report = tokenize_pairs(records, tokenizer, max_length=1024, cache_dir=".cache/orpo_ds/tokenized")
    print(report.summary())    # kept 287/300 pairs; dropped 13: 8 empty response (rows 3, 17, ...), ...

This module only re-exports the public names; each job has a module of its own:

* :mod:`orpo_ds.data.io`: :func:`load_records` (JSON / JSONL / parquet files, saved dataset folders, hub
  datasets); unreadable JSON rows become rows holding :data:`LOAD_ERROR_COLUMN`.
* :mod:`orpo_ds.data.formats`: the record formats (:data:`FORMATS`: standard, conversational, sharegpt),
  their detection (:func:`format_of`), parsing a row, rendering chat templates.
* :mod:`orpo_ds.data.validate`: :class:`DropReport` (which rows were dropped and why), the control-token
  checks.
* :mod:`orpo_ds.data.tokenize`: :func:`tokenize_pairs`, the token layout of a pair, :func:`truncate_pair`
  and the ``special_tokens_in_content`` policies.
* :mod:`orpo_ds.data.cache`: the tokenized-pairs cache (key, load, publish) and :func:`tokenizer_identity`.
* :mod:`orpo_ds.data.columns`: :class:`TokenizedPairs`, what the pipeline produces for :mod:`orpo_ds.packing`:
  int32 token ids and int64 offsets per field, memory-mapped from the cache; :func:`duplicate_pairs`.
* :mod:`orpo_ds.data.pairs`: :class:`TokenizedPair`, one pair (what ``pairs[i]`` gives).
* :mod:`orpo_ds.data.errors`: :class:`DataError`.

Inside the package: ``io -> errors``; ``formats -> errors, io, validate``; ``columns -> pairs``;
``cache -> columns, validate`` (and :mod:`orpo_ds.safe_files`); ``tokenize -> cache, columns, errors, formats,
validate``. ``errors``,
``pairs`` and ``validate`` import nothing of the package, and nothing here imports :mod:`orpo_ds.packing`.
"""

from __future__ import annotations

from orpo_ds.data.cache import CACHE_VERSION, tokenizer_identity
from orpo_ds.data.columns import FIELDS, TokenizedPairs, as_tokenized_pairs, duplicate_pairs
from orpo_ds.data.errors import DataError
from orpo_ds.data.formats import FORMATS, format_of
from orpo_ds.data.io import LOAD_ERROR_COLUMN, load_records
from orpo_ds.data.pairs import TokenizedPair
from orpo_ds.data.tokenize import (
    SPECIAL_TOKEN_POLICIES,
    TRUNCATION_POLICIES,
    tokenize_data_section,
    tokenize_pairs,
    truncate_pair,
)
from orpo_ds.data.validate import DropReport

__all__ = [
    "FORMATS", "TRUNCATION_POLICIES", "SPECIAL_TOKEN_POLICIES", "CACHE_VERSION", "LOAD_ERROR_COLUMN", "DataError",
    "DropReport", "FIELDS", "TokenizedPair", "TokenizedPairs", "as_tokenized_pairs",
    "load_records", "format_of", "tokenize_pairs", "truncate_pair",
    "tokenizer_identity", "duplicate_pairs", "tokenize_data_section",
]
