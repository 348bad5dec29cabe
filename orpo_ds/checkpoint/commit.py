"""Writing a checkpoint so that a crash at any instant leaves a complete one: the temporary folder,
the commit (rename, then ``latest``), and pruning."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from orpo_ds.checkpoint.layout import (
    _STEP_DIR,
    LATEST,
    STATE_FILE,
    _step_of,
    checkpoints_dir,
    fault_point,
    step_dir_name,
    write_manifest,
)
from orpo_ds.checkpoint.state import TrainerState
from orpo_ds.safe_files import (
    atomic_write,
    replace_dir,
)


def begin_save(output_dir: str | Path, step: int) -> Path:
    """The temporary folder this step's checkpoint is written into (rank 0 creates it, cleaning stale ones)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    tmp.mkdir()
    return tmp

def temp_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-{step_dir_name(step)}"

def commit_save(tmp: Path, state: TrainerState, keep: int, hf_files_from=None) -> Path:
    """Rank 0, after every rank has written into ``tmp``: add the trainer state, rename the folder into
    place, then move the ``latest`` pointer, then prune old checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2, default=str))
    if hf_files_from is not None:
        hf_files_from(tmp / "hf")
    write_manifest(tmp)
    fault_point("kill_before_commit", state.step)
    root = tmp.parent
    final = root / step_dir_name(state.step)
    # A re-save of the same step (e.g. preempted right after a periodic save) keeps the old folder aside
    # until the new one is in place; latest_checkpoint reads that twin meanwhile.
    replace_dir(tmp, final)
    atomic_write(root / LATEST, final.name)
    for old in prunable(root, final, keep):
        shutil.rmtree(old, ignore_errors=True)
    return final

def prunable(root: Path, committed: Path, keep: int) -> list[Path]:
    """The checkpoints to delete after ``committed`` was written, keeping ``keep`` in all.

    Kept first: ``committed`` (which ``latest`` now names), then the highest steps below it. Steps above
    it come from a run this one does not continue (a resume from an older checkpoint), so they go first;
    ranking by step number alone would delete the checkpoint just written.
    """
    current = _step_of(committed)
    others = [p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and p != committed]
    ranked = sorted(others, key=lambda p: (_step_of(p) > current, abs(current - _step_of(p))))
    return ranked[max(keep - 1, 0):]
