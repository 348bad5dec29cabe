"""What training changed: fixed pair sets evaluated pair by pair before and after, with paired bootstrap
intervals, and greedy answers to a few held-out prompts.

Two sets are compared: the held-out pairs (``data.eval``) and a fixed, seeded sample of the training
pairs (``train.compare_train_pairs``), on which the objective's own effect shows. Each figure is a ratio
of per-pair sums (:data:`FIGURES`), so it can be recomputed on any resample of the pairs; resampling the
same pairs before and after (a paired bootstrap) gives the change an interval that the pair-to-pair
spread of 40 pairs cannot hide behind.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orpo_ds.data import TokenizedPair
from orpo_ds.loss import STAT_KEYS

SEEN, HELD_OUT = "seen", "held-out"
# figure -> (numerator, denominator) columns of orpo_ds.loss.orpo_pair_stats; the same ratios as the
# rewards/accuracies, log_odds_chosen and nll_loss metrics.
FIGURES = {"preference accuracy": ("accurate_pairs", "pairs"), "mean log-odds": ("log_odds_sum", "pairs"),
           "chosen NLL": ("nll_sum", "nll_tokens")}
RESAMPLES, LEVEL, BOOTSTRAP_SEED = 2000, 0.95, 0


@dataclass(frozen=True)
class Change:
    """A figure before and after, and its change with a paired bootstrap interval ``[low, high]``."""

    before: float
    after: float
    low: float
    high: float

    @property
    def change(self) -> float:
        return self.after - self.before

    @property
    def reading(self) -> str:
        """Where the interval lies: what the pairs support saying about the change, and no more."""
        if self.low > 0:
            return "up (interval above 0)"
        if self.high < 0:
            return "down (interval below 0)"
        return "no clear change (interval includes 0)"


def figure_of(stats: np.ndarray, figure: str) -> np.ndarray:
    """``figure`` of the pairs whose stats are ``stats`` ``[..., N, K]``; returns ``[...]``."""
    numerator, denominator = (STAT_KEYS.index(key) for key in FIGURES[figure])
    return stats[..., numerator].sum(axis=-1) / np.maximum(stats[..., denominator].sum(axis=-1), 1.0)


def paired_bootstrap(before: np.ndarray, after: np.ndarray, figure: str, *, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = BOOTSTRAP_SEED) -> Change:
    """The change of ``figure`` from ``before`` to ``after``, with a percentile interval from resampling
    the pairs with replacement, the same pairs on both sides.

    Args:
        before, after: ``[N, K]`` :func:`orpo_ds.loss.orpo_pair_stats` rows of the same N pairs, same order.
    """
    if before.shape != after.shape or before.ndim != 2 or not len(before):
        raise ValueError(f"before {before.shape} and after {after.shape} must be the same [N > 0, K] pairs")
    picks = np.random.default_rng(seed).integers(0, len(before), size=(resamples, len(before)))  # [B, N]
    changes = figure_of(after[picks], figure) - figure_of(before[picks], figure)  # [B]
    tail = (1.0 - level) / 2
    low, high = np.quantile(changes, [tail, 1.0 - tail])
    return Change(float(figure_of(before, figure)), float(figure_of(after, figure)), float(low), float(high))


def seen_sample(train_pairs: Sequence[TokenizedPair], count: int, seed: int = 0) -> list[TokenizedPair]:
    """A fixed sample of ``count`` training pairs (all of them when there are fewer), in file order; it
    depends on the seed and the data only, not on the run's packing."""
    chosen = sorted(random.Random(seed).sample(range(len(train_pairs)), min(count, len(train_pairs))))
    return [train_pairs[i] for i in chosen]


def compare_snapshots(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Change]]:
    """``{set: {figure: Change}}`` for every set both snapshots hold (a snapshot's ``pairs`` maps a set's
    name to its ``[N, K]`` stats as nested lists)."""
    tables = {}
    for name, rows in before.get("pairs", {}).items():
        if name in after.get("pairs", {}):
            b, a = np.asarray(rows, dtype=np.float64), np.asarray(after["pairs"][name], dtype=np.float64)
            tables[name] = {figure: paired_bootstrap(b, a, figure) for figure in FIGURES}
    return tables


def changes_table(name: str, pairs: int, changes: dict[str, Change]) -> str:
    """One set's before/after table in markdown."""
    titles = {SEEN: f"seen: {pairs} training pairs (a fixed sample)", HELD_OUT: f"held-out: {pairs} pairs"}
    lines = [titles.get(name, name), "", f"| figure | before | after | change | {LEVEL:.0%} interval | reading |",
             "|---|---:|---:|---:|---|---|"]
    for figure, c in changes.items():
        lines.append(f"| {figure} | {c.before:.4f} | {c.after:.4f} | {c.change:+.4f} | "
                     f"[{c.low:+.4f}, {c.high:+.4f}] | {c.reading} |")
    return "\n".join(lines)


def comparison_report(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The seen and held-out tables, with how their intervals were made."""
    tables = compare_snapshots(before, after)
    if not tables:
        return ""
    parts = [changes_table(name, len(before["pairs"][name]), tables[name]) for name in (SEEN, HELD_OUT)
             if name in tables]
    parts.append(f"Intervals: paired bootstrap over pairs, {RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, percentile "
                 f"{LEVEL:.0%}. Chosen NLL: lower is better.")
    return "\n\n".join(parts)
