"""Experiment tracking (``train.report_to``): TensorBoard and Weights & Biases, on rank 0, beside
metrics.jsonl.

Every record metrics.jsonl gets is sent to each tracker under the same names (``loss``, ``eval/loss``,
``rewards/margins``, ...) at its ``step``; only numbers are sent (a list of skipped pair ids stays in
metrics.jsonl). The resolved config is logged as the run's hyperparameters. A requeued run continues
the same records: TensorBoard drops its events after the resumed step (``purge_step``), and W&B resumes
the run whose id ``<output_dir>/wandb/run_id`` holds. ``WANDB_MODE=offline`` works without a network, as
wandb itself documents.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any

from orpo_ds.config import Config, ConfigError

EXTRA = "pip install 'orpo-ds[tracking]'"


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers (bools as 0/1), without ``step``."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, (list, dict, str)) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": 1e-5}``; lists and None as text (TensorBoard's
    hyperparameters take numbers, strings and bools only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


class TensorBoardTracker:
    def __init__(self, cfg: Config, resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError(f"train.report_to: tensorboard needs the tensorboard package; {EXTRA}") from exc
        self.logdir = Path(cfg.train.output_dir) / "tensorboard"
        if not resume_step and self.logdir.is_dir():  # a fresh start keeps an earlier run's events apart
            self.logdir.replace(_unused(self.logdir.with_name("tensorboard.prev")))
        # purge_step: a resumed run's events after its checkpoint are dropped, as metrics.jsonl drops them.
        self.writer = SummaryWriter(str(self.logdir), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            self.writer.add_hparams(flat_hparams(cfg.to_dict()), {}, run_name=".")
            self.writer.add_text("config", f"```\n{json.dumps(cfg.to_dict(), indent=2)}\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed job keeps every logged step, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: Config, resume_step: int):
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"train.report_to: wandb needs the wandb package; {EXTRA}") from exc
        out = Path(cfg.train.output_dir)
        id_file = out / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.train.wandb_project, name=run_name(cfg), id=run_id, resume="allow",
                              dir=str(out), config=cfg.to_dict())
        self.last_step = -1

    def log(self, step: int, values: dict[str, float]) -> None:
        # W&B wants steps that never decrease: a resumed run re-logs nothing it already holds.
        if step >= self.last_step:
            self.run.log(values, step=step)
            self.last_step = step

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(cfg: Config) -> None:
    """On every rank, before any work: each tracker's package is importable (ConfigError naming the
    extra otherwise), so a missing one ends the job at start-up rather than on rank 0 alone."""
    import importlib.util

    for name in cfg.train.report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"train.report_to: {name} needs the {PACKAGES[name]} package; {EXTRA}")


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first name not taken (nothing is replaced)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run_name(cfg: Config) -> str:
    """``train.run_name``, or the output folder's name."""
    return cfg.train.run_name or Path(cfg.train.output_dir).resolve().name


class Trackers:
    """The trackers ``train.report_to`` names, fed every metrics record (rank 0 only: elsewhere none)."""

    def __init__(self, cfg: Config, *, resume_step: int, enabled: bool):
        self.trackers = [TRACKERS[name](cfg, resume_step) for name in cfg.train.report_to] if enabled else []

    def log(self, record: dict[str, Any]) -> None:
        values = numeric(record)
        for tracker in self.trackers:
            tracker.log(int(record.get("step", 0)), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
