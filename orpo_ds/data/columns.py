"""The tokenized pairs of a data set as columns: :class:`TokenizedPairs`.

A million pairs of ~730 tokens held as :class:`TokenizedPair` tuples of Python ints cost ~19 KB each per
rank; as int32 columns they cost 4 bytes a token, and when the columns are memory-mapped from the
tokenized-pairs cache (:mod:`orpo_ds.data.cache`), the ranks of a node share one copy in the page cache.

Layout, ``N`` pairs, for each field ``f`` of :data:`FIELDS`::

    pair_id                 [N]      int64   source row of each pair
    columns[f].values       [V_f]    int32   every pair's ids of field f, concatenated
    columns[f].offsets      [N + 1]  int64   pair i's ids are values[offsets[i]:offsets[i + 1]]

Worked example: pairs ``(7, (11, 12), (21, 2), (31, 2))`` and ``(9, (), (5, 6, 2), (8, 2))`` give
``pair_id = [7, 9]``, ``prompt_ids: values = [11, 12], offsets = [0, 2, 2]``, ``chosen_ids: values =
[21, 2, 5, 6, 2], offsets = [0, 2, 5]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from orpo_ds.data.pairs import TokenizedPair

__all__ = ["FIELDS", "TokenColumn", "TokenizedPairs", "as_tokenized_pairs", "duplicate_pairs"]

FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class TokenColumn:
    """One field of every pair: ``values`` ``[V]`` int32 and ``offsets`` ``[N + 1]`` int64 (non-decreasing,
    within ``values``). ``offsets[0]`` need not be 0: a column read from a sliced Arrow array keeps its base."""

    values: np.ndarray
    offsets: np.ndarray

    def lengths(self) -> np.ndarray:
        """``[N]`` int64 tokens of each pair."""
        return np.diff(self.offsets)

    def ids(self, i: int) -> np.ndarray:
        """``[L]`` int32 ids of pair ``i`` (a view, no copy)."""
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def used_values(self) -> np.ndarray:
        """``[sum(lengths)]`` int32: the ids of pairs ``0..N-1`` in order (a view)."""
        return self.values[self.offsets[0]:self.offsets[-1]]


def _ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised: ``[sum(lengths)]`` int64."""
    total = int(lengths.sum())
    run_start = np.cumsum(lengths) - lengths  # where each run begins in the output
    return np.repeat(starts - run_start, lengths) + np.arange(total, dtype=np.int64)


class TokenizedPairs(Sequence[TokenizedPair]):
    """The kept pairs of a data set, in row order, as int32 columns (module docstring).

    ``pairs[i]`` is pair ``i`` as a :class:`TokenizedPair` (its ids copied out of the columns then, for the
    code that wants one pair); :meth:`lengths` gives a field's lengths without building any. Equality is
    pair by pair, with another :class:`TokenizedPairs` or any sequence of :class:`TokenizedPair`.
    """

    __hash__ = None  # type: ignore[assignment]  # equal by value, like a list

    def __init__(self, pair_id: np.ndarray, columns: dict[str, TokenColumn], *, fingerprint: str | None = None,
                 duplicates: list[int] | None = None):
        """
        Args:
            pair_id: ``[N]`` integers.
            columns: a :class:`TokenColumn` for each of :data:`FIELDS`.
            fingerprint: :meth:`fingerprint` when already known (recorded in the cache), else computed on use.
            duplicates: :meth:`duplicates` when already known (recorded in the cache), else found on use.
        Raises:
            ValueError: a missing field, mismatched shapes, offsets that decrease or leave ``values``, or a
                response with no token to score (the rule of :class:`TokenizedPair`).
        """
        self.pair_id = np.asarray(pair_id, dtype=np.int64)
        if self.pair_id.ndim != 1:
            raise ValueError(f"pair_id must be 1-D, got shape {self.pair_id.shape}")
        missing = set(FIELDS) - set(columns)
        if missing:
            raise ValueError(f"TokenizedPairs needs the columns {FIELDS}; missing {sorted(missing)}")
        n = self.pair_id.shape[0]
        self.columns = {}
        for name in FIELDS:
            column = columns[name]
            values, offsets = np.asarray(column.values), np.asarray(column.offsets, dtype=np.int64)
            if values.ndim != 1 or values.dtype != np.int32:
                raise ValueError(f"{name}: values must be 1-D int32, got {values.dtype} shape {values.shape}")
            if offsets.shape != (n + 1,):
                raise ValueError(f"{name}: offsets have shape {offsets.shape}, expected ({n + 1},) for {n} pairs")
            if offsets[0] < 0 or offsets[-1] > values.shape[0] or (np.diff(offsets) < 0).any():
                raise ValueError(f"{name}: offsets must be non-decreasing within the {values.shape[0]} values")
            self.columns[name] = TokenColumn(values, offsets)
        self._check_responses_are_scorable()
        self._fingerprint = fingerprint
        self._duplicates = duplicates

    def _check_responses_are_scorable(self) -> None:
        # The rule of TokenizedPair.__post_init__, over all pairs at once.
        no_prompt = self.lengths("prompt_ids") == 0
        for name in ("chosen_ids", "rejected_ids"):
            bad = np.flatnonzero(self.lengths(name) - no_prompt < 1)
            if bad.size:
                self[int(bad[0])]  # raises TokenizedPair's own error, naming the pair

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pairs(cls, pairs: Sequence[TokenizedPair]) -> TokenizedPairs:
        """Columns of a list of pairs (tests, small data)."""
        columns = {}
        for name in FIELDS:
            seqs = [getattr(p, name) for p in pairs]
            lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
            columns[name] = TokenColumn(values, offsets)
        return cls(np.fromiter((p.pair_id for p in pairs), dtype=np.int64, count=len(pairs)), columns)

    @classmethod
    def from_arrow(cls, table, *, fingerprint: str | None = None, duplicates: list[int] | None = None
                   ) -> TokenizedPairs:
        """Zero-copy columns of an Arrow table with ``pair_id`` (int64) and the :data:`FIELDS` (lists of int32):
        a memory-mapped table stays memory-mapped. A table of several chunks is combined (a copy)."""
        import pyarrow as pa

        def single(name: str):
            column = table.column(name)
            return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()

        columns = {}
        for name in FIELDS:
            array = single(name)
            if not pa.types.is_large_list(array.type):
                array = array.cast(pa.large_list(pa.int32()))  # int64 offsets: > 2**31 tokens fit
            if array.null_count:
                raise ValueError(f"{name} has {array.null_count} null entries")
            columns[name] = TokenColumn(array.values.to_numpy(zero_copy_only=True),
                                        array.offsets.to_numpy(zero_copy_only=True))
        pair_id = single("pair_id").to_numpy(zero_copy_only=False)
        return cls(pair_id, columns, fingerprint=fingerprint, duplicates=duplicates)

    def to_arrow(self):
        """The pairs as an Arrow table of one chunk: ``pair_id`` int64 and the :data:`FIELDS` as
        ``large_list<int32>`` (what :meth:`from_arrow` reads back without copying)."""
        import pyarrow as pa

        data = {"pair_id": pa.array(self.pair_id, pa.int64())}
        for name, column in self.columns.items():
            data[name] = pa.LargeListArray.from_arrays(pa.array(column.offsets, pa.int64()),
                                                       pa.array(column.values, pa.int32()))
        return pa.table(data)

    # ------------------------------------------------------------------------------ access

    def __len__(self) -> int:
        return int(self.pair_id.shape[0])

    def __getitem__(self, i: int) -> TokenizedPair:  # type: ignore[override]  # pairs by index, no slices
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"TokenizedPairs index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair index {i} out of range for {n} pairs")
        i = int(i) % n
        return TokenizedPair(int(self.pair_id[i]), *(tuple(self.columns[f].ids(i).tolist()) for f in FIELDS))

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def lengths(self, field: str) -> np.ndarray:
        """``[N]`` int64 tokens of ``field`` (one of :data:`FIELDS`) in each pair."""
        return self.columns[field].lengths()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenizedPairs):
            return (np.array_equal(self.pair_id, other.pair_id)
                    and all(np.array_equal(self.lengths(f), other.lengths(f))
                            and np.array_equal(self.columns[f].used_values(), other.columns[f].used_values())
                            for f in FIELDS))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __repr__(self) -> str:
        tokens = sum(int(self.lengths(f).sum()) for f in FIELDS)
        return f"TokenizedPairs({len(self)} pairs, {tokens} tokens)"

    # ------------------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        """sha256 of the pairs in order, the value ``orpo_ds.checkpoint`` records as ``data_fingerprint``.

        It hashes, pair by pair, the int64 array ``[pair_id, len(prompt), len(chosen), len(rejected),
        *prompt, *chosen, *rejected]``: the definition checkpoints written from lists of pairs used, so
        they still resume. Built a chunk of pairs at a time with numpy (a million pairs: seconds, once; the
        cache records it so that ranks reading the cache do not recompute it).
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    @property
    def duplicates(self) -> list[int]:
        """The ``pair_id`` of every pair whose prompt and responses repeat an earlier pair's, in order
        (:func:`duplicate_pairs`). Found once, when the cache is written, and recorded there: finding them
        reads every candidate pair's ids, which on a memory-mapped cache of a million pairs brings most of
        the file into the reading rank's resident pages."""
        if self._duplicates is None:
            self._duplicates = _find_duplicates(self)
        return self._duplicates

    def _compute_fingerprint(self, chunk_pairs: int = 8192) -> str:
        h = hashlib.sha256()
        lengths = np.stack([self.lengths(f) for f in FIELDS])  # [3, N]
        for a in range(0, len(self), chunk_pairs):
            b = min(a + chunk_pairs, len(self))
            part = lengths[:, a:b]
            record = 4 + part.sum(axis=0)  # [n] int64 entries of each pair's record
            start = np.cumsum(record) - record
            out = np.empty(int(record.sum()), dtype=np.int64)
            out[start] = self.pair_id[a:b]
            out[start + 1], out[start + 2], out[start + 3] = part
            field_start = start + 4
            for k, name in enumerate(FIELDS):
                column = self.columns[name]
                out[_ragged_positions(field_start, part[k])] = column.values[
                    _ragged_positions(column.offsets[a:b], part[k])]
                field_start = field_start + part[k]
            h.update(out.tobytes())
        return h.hexdigest()


def as_tokenized_pairs(pairs: TokenizedPairs | Sequence[TokenizedPair]) -> TokenizedPairs:
    """``pairs`` as columns: itself when it is already, else :meth:`TokenizedPairs.from_pairs`."""
    return pairs if isinstance(pairs, TokenizedPairs) else TokenizedPairs.from_pairs(pairs)


def _pair_digest(pairs: TokenizedPairs, i: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in FIELDS:
        h.update(pairs.columns[name].ids(i).tobytes())
        h.update(b"|")  # the lengths are equal within a group, but a separator keeps the key honest alone
    return h.digest()


def _same_pair(pairs: TokenizedPairs, i: int, j: int) -> bool:
    return all(np.array_equal(pairs.columns[f].ids(i), pairs.columns[f].ids(j)) for f in FIELDS)


def duplicate_pairs(pairs: TokenizedPairs | Sequence[TokenizedPair]) -> list[int]:
    """The ``pair_id`` of every pair whose prompt and responses repeat an earlier pair's, in order
    (:attr:`TokenizedPairs.duplicates`: recorded in the cache)."""
    return as_tokenized_pairs(pairs).duplicates


def _find_duplicates(pairs: TokenizedPairs) -> list[int]:
    """Only pairs whose three lengths all occur more than once can repeat, so only those are hashed, and a
    digest that matches is confirmed on the ids themselves: no Python object per pair, and 16 bytes per
    candidate."""
    if not len(pairs):
        return []
    lengths = np.stack([pairs.lengths(f) for f in FIELDS], axis=1)  # [N, 3]
    _, group, count = np.unique(lengths, axis=0, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(count[group.reshape(-1)] > 1)
    first_with: dict[bytes, int] = {}
    repeats = []
    for i in candidates.tolist():
        first = first_with.setdefault(_pair_digest(pairs, i), i)
        if first != i and _same_pair(pairs, first, i):
            repeats.append(int(pairs.pair_id[i]))
    return repeats
