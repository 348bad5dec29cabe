"""The packer: pair sizes into bins of at most ``micro_batch_tokens`` (best-fit decreasing, seeded),
and how full the bins are."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

_FIX = "raise train.micro_batch_tokens to >= {n} or lower data.max_length"


def _check_int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _pair_sizes(pair_num_tokens: Sequence[int], micro_batch_tokens: int,
                pair_ids: Sequence[int] | None) -> np.ndarray:
    """Validated ``[N]`` int64 sizes. Every pair must fit: a pair is never silently dropped."""
    _check_int_at_least("micro_batch_tokens", micro_batch_tokens, 1)
    sizes = np.asarray(pair_num_tokens)
    if sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu":
        raise ValueError(f"pair_num_tokens must be a 1-D sequence of ints, got dtype {sizes.dtype} "
                         f"shape {sizes.shape}")
    sizes = sizes.astype(np.int64)
    if pair_ids is not None and len(pair_ids) != len(sizes):
        raise ValueError(f"pair_ids has {len(pair_ids)} entries for {len(sizes)} pairs")

    def pid(i: int) -> int:
        return int(pair_ids[i]) if pair_ids is not None else i

    if sizes.min() < 1:
        i = int(np.argmin(sizes))
        raise ValueError(f"pair {pid(i)} has {int(sizes[i])} tokens; every pair needs >= 1")
    too_long = np.flatnonzero(sizes > micro_batch_tokens)
    if too_long.size:
        # Name the longest so that one change of the budget fixes every offender.
        i = int(too_long[np.argmax(sizes[too_long])])
        n = int(sizes[i])
        raise ValueError(
            f"pair {pid(i)} has {n} tokens, more than train.micro_batch_tokens={micro_batch_tokens} "
            f"({too_long.size} pair(s) too long, this is the longest): {_FIX.format(n=n)}")
    return sizes


def _best_fit(order: np.ndarray, sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Best fit: each item goes to the open bin with the least free space that still holds it.

    ``free_caps`` is the sorted list of distinct free capacities of open bins and ``bins_with_free`` maps
    each to a stack of bin ids, so a lookup is one bisect: O(N log B) plus list shifts of at most
    ``min(B, capacity)`` ints, instead of O(N*B) scans.
    """
    size_list = sizes.tolist()
    bins: list[list[int]] = []
    bins_with_free: dict[int, list[int]] = {}
    free_caps: list[int] = []
    for i in order.tolist():
        size = size_list[i]
        k = bisect_left(free_caps, size)
        if k == len(free_caps):  # no open bin holds it
            b = len(bins)
            bins.append([i])
            free = capacity - size
        else:
            old_free = free_caps[k]
            stack = bins_with_free[old_free]
            b = stack.pop()
            if not stack:
                del bins_with_free[old_free]
                free_caps.pop(k)
            bins[b].append(i)
            free = old_free - size
        if free > 0:  # a full bin is closed for good
            stack = bins_with_free.get(free)
            if stack is None:
                bins_with_free[free] = [b]
                insort(free_caps, free)
            else:
                stack.append(b)
    return bins


def pack_pairs(pair_num_tokens: Sequence[int], micro_batch_tokens: int, *, seed: int, epoch: int,
               pair_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Pack pairs into bins of at most ``micro_batch_tokens`` tokens (best-fit-decreasing).

    Args:
        pair_num_tokens: ``[N]`` tokens of each pair in a row (``layout.num_tokens(pair)``).
        micro_batch_tokens: token budget of one row.
        seed, epoch: non-negative; the result is a deterministic function of them (and the sizes).
            Pairs are shuffled before the stable size sort, so equal-size pairs are ordered differently
            each epoch, and the bins are shuffled so rows of all sizes mix through the epoch.
        pair_ids: ``[N]`` ids used in error messages (default: the positions ``0..N-1``).
    Returns:
        Bins: lists of indices into ``pair_num_tokens``; every index appears in exactly one bin.
    Raises:
        ValueError: a pair longer than the budget (named, with its length and the fix), or bad arguments.
    """
    sizes = _pair_sizes(pair_num_tokens, micro_batch_tokens, pair_ids)
    _check_int_at_least("seed", seed, 0)
    _check_int_at_least("epoch", epoch, 0)
    rng = np.random.default_rng([int(seed), int(epoch)])
    shuffled = rng.permutation(sizes.shape[0])
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    bins = _best_fit(order, sizes, int(micro_batch_tokens))
    return [bins[b] for b in rng.permutation(len(bins)).tolist()]


def fill_ratio(tokens: int, rows: int, micro_batch_tokens: int) -> float:
    """``tokens`` over the capacity of ``rows`` rows of ``micro_batch_tokens``: the packing efficiency.
    0.0 for no rows."""
    return tokens / (rows * micro_batch_tokens) if rows else 0.0


def packing_efficiency(bins: Sequence[Sequence[int]], pair_num_tokens: Sequence[int],
                       micro_batch_tokens: int) -> float:
    """Real tokens over the capacity of the bins (:func:`fill_ratio`). 0.0 for no bins."""
    _check_int_at_least("micro_batch_tokens", micro_batch_tokens, 1)
    sizes = np.asarray(pair_num_tokens, dtype=np.int64)
    return fill_ratio(sum(int(sizes[list(b)].sum()) for b in bins), len(bins), micro_batch_tokens)
