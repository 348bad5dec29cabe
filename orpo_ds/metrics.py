"""Metrics output: one JSON line per logged step in metrics.jsonl, and a progress bar on rank 0."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from orpo_ds.safe_files import atomic_write


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses no logged step; each record also
    goes to the attached trackers (:class:`orpo_ds.tracking.Trackers`, ``train.report_to``)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = None

    def write(self, record: dict) -> dict:
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
            if self.trackers is not None:
                self.trackers.log(clean)
        return record

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint; those steps run again. A torn last line
        (a write cut by a full disk or a kill) is dropped too, with a warning. Atomic: a kill mid-way leaves
        the old log whole."""
        if self.enabled and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def start_fresh(self) -> None:
        """A run that resumes nothing: an earlier log here (a run that never saved a checkpoint, or one
        replaced by ``train.resume=false``) is kept as ``metrics.prev.jsonl`` rather than appended to."""
        if self.enabled and self.path.is_file() and self.path.stat().st_size:
            self.path.replace(self.path.with_name("metrics.prev.jsonl"))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not JSON is what a kill or a full disk leaves
    mid-write (the last line, normally): it is skipped with a warning, so a requeued job gets past it."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[metrics] {path}: skipping torn line {number} ({len(line)} characters)", file=sys.stderr,
                  flush=True)
    return records


def progress_bar(total: int, enabled: bool = True, desc: str = "train", initial: int = 0, unit: str = "step") -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, unit=unit)
