"""End-of-run report: the before/after table of held-out figures and a PNG of the training curves."""

from __future__ import annotations

from pathlib import Path

from orpo_ds.evaluate import HEADLINE
from orpo_ds.metrics import read_metrics

CURVES = ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies")


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """One panel per curve of ``CURVES``: training steps as a line, eval points (``eval/<name>``) as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, key in zip(axes, CURVES, strict=True):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1.5)
        points = [(r["step"], r[f"eval/{key}"]) for r in evals if r.get(f"eval/{key}") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o", label="held-out", ms=5)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def before_after_table(summary: dict) -> str:
    """Markdown table of the held-out headline figures before and after training, plus throughput."""
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    lines = ["| held-out | before | after | change |", "|---|---|---|---|"]
    for key, label in HEADLINE.items():
        b, a = before.get(f"eval/{key}"), after.get(f"eval/{key}")
        if b is None or a is None:
            continue
        lines.append(f"| {label} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    lines.append(f"\ntraining: {summary.get('train_wall_s', 0):.0f} s wall, "
                 f"{summary.get('tokens_per_s', 0):.0f} tokens/s; model: {summary.get('export_dir', 'not exported')}")
    return "\n".join(lines)
