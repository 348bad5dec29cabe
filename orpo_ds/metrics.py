"""Metrics output: one JSON line per logged step in metrics.jsonl, and a progress bar on rank 0."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses no logged step."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> dict:
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        return record


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(total: int, enabled: bool = True, desc: str = "train") -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, unit="step")
