"""End-of-run report: the held-out before/after table (runs without per-pair snapshots), the run line,
and a PNG of the training curves with progressive validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orpo_ds.evaluate import HEADLINE
from orpo_ds.metrics import read_metrics

CURVES = ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies")
PROGRESSIVE, PROGRESSIVE_WINDOW = ("rewards/accuracies", "log_odds_chosen"), 10


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): ``[len(values)]``."""
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums - np.concatenate([np.zeros(window), sums[:-window]])[:len(values)]) / counts


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Top row: one panel per curve of ``CURVES``, training steps as a line, eval points (``eval/<name>``)
    as dots. Bottom row, progressive validation: in the first epoch every step's batch is unseen when its
    metrics are taken, so ``PROGRESSIVE`` of those steps, raw and as a moving average, read as held-out
    figures of many more pairs than the held-out set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig = plt.figure(figsize=(4 * len(CURVES), 6.6))
    grid = fig.add_gridspec(2, len(CURVES) * len(PROGRESSIVE))  # top: a panel per curve; bottom: two wide ones
    top = [fig.add_subplot(grid[0, i * len(PROGRESSIVE):(i + 1) * len(PROGRESSIVE)]) for i in range(len(CURVES))]
    bottom = [fig.add_subplot(grid[1, i * len(CURVES):(i + 1) * len(CURVES)]) for i in range(len(PROGRESSIVE))]
    for ax, key in zip(top, CURVES, strict=True):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1.5)
        points = [(r["step"], r[f"eval/{key}"]) for r in evals if r.get(f"eval/{key}") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o", label="held-out", ms=5)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    top[0].legend()
    first_epoch = [r for r in train if r.get("epoch", 0) == 0 and all(r.get(k) is not None for k in PROGRESSIVE)]
    window = max(1, min(PROGRESSIVE_WINDOW, len(first_epoch)))
    for ax, key in zip(bottom, PROGRESSIVE, strict=True):
        steps, values = [r["step"] for r in first_epoch], [r[key] for r in first_epoch]
        ax.plot(steps, values, ".-", alpha=0.35, lw=0.8, label="each step, scored before it trains")
        if values:
            ax.plot(steps, moving_average(values, window), lw=2.5, label=f"moving average, {window} steps")
        ax.set_title(f"progressive validation (first epoch): {key}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def before_after_table(summary: dict) -> str:
    """Markdown table of the held-out headline figures before and after training (a run without the
    per-pair snapshots of :mod:`orpo_ds.compare`: ``train.eval_before=false``, or resumed from an older
    checkpoint)."""
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    lines = ["| held-out | before | after | change |", "|---|---|---|---|"]
    for key, label in HEADLINE.items():
        b, a = before.get(f"eval/{key}"), after.get(f"eval/{key}")
        if b is None or a is None:
            continue
        lines.append(f"| {label} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return "\n".join(lines)


def run_line(summary: dict) -> str:
    return (f"training: {summary.get('train_wall_s', 0):.0f} s wall, {summary.get('tokens_per_s', 0):.0f} tokens/s; "
            f"model: {summary.get('export_dir', 'not exported')}")
