"""Where checkpoints live and how they are found: the folder layout, ``latest``, resume resolution,
the files manifest, and fault injection for the crash tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from orpo_ds.safe_files import (
    CHECKPOINT_STATE_FILE,
    aside_paths,
)

STATE_FILE = CHECKPOINT_STATE_FILE

LATEST = "latest"

_STEP_DIR = re.compile(r"^step-(\d+)$")

MANIFEST = "files.json"  # every file of the checkpoint and its size, written when it is committed

class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with this config; the message says why and what to do."""

def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"

def output_dir_of(ckpt: Path) -> Path:
    """The run folder a ``checkpoints/step-N`` folder belongs to (its own parent when it stands alone)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent

def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"

def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))

def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash-safety tests: with ``ORPO_DS_FAULT=<name>:<step>`` in the environment,
    SIGKILL this process's whole group here (the launcher and every rank die, like a node loss)."""
    if os.environ.get("ORPO_DS_FAULT") == f"{name}:{step}":
        os.killpg(os.getpgid(0), signal.SIGKILL)

def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the highest complete step folder."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        for candidate in (root / name, *aside_paths(root / name)):  # the twin: a re-save killed mid-swap
            if (candidate / STATE_FILE).is_file():
                return candidate
    complete = sorted((p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()),
                      key=_step_of)
    return complete[-1] if complete else None

def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder named by the user: a ``step-N`` folder itself, a run's output_dir, or its
    ``checkpoints/`` folder (the latest complete checkpoint in them). Raises ResumeError if none."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path.parent if path.name == "checkpoints" else path)
    if found is None:
        raise ResumeError(f"{str(path)!r}: no complete orpo-ds checkpoint there (a folder holding {STATE_FILE}, "
                          f"or an output_dir with checkpoints/)")
    return found

def resolve_resume(resume: str, output_dir: str | Path, overwrite: bool = False) -> Path | None:
    """``train.resume``: ``auto`` -> latest complete checkpoint in output_dir (or None: a fresh start),
    ``false`` -> None, anything else -> that checkpoint folder, which must exist.

    A fresh start (``false``) into an output_dir that holds checkpoints is refused unless ``overwrite``
    (``train.overwrite``): its pruning and ``latest`` pointer would otherwise mix two runs.
    """
    if resume == "false":
        existing = sorted(p.name for p in checkpoints_dir(output_dir).glob("step-*"))
        if existing and not overwrite:
            raise ResumeError(f"train.resume=false, but {output_dir} already holds checkpoints of another run "
                              f"({', '.join(existing[-3:])}). Set train.overwrite=true to delete them and start "
                              f"fresh, train.resume=auto to continue that run, or choose a new train.output_dir")
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    return find_checkpoint(resume)

def clear_run_state(output_dir: str | Path) -> None:
    """``train.overwrite=true``: delete an earlier run's checkpoints and step log (never anything else)."""
    out = Path(output_dir)
    shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        (out / name).unlink(missing_ok=True)

def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))

def verify_files(ckpt: Path) -> None:
    """Every file the checkpoint held when it was committed is there, with its size; a
    :class:`ResumeError` naming the first that is not. Checkpoints without a manifest are not checked."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text())
    except ValueError as exc:
        raise ResumeError(f"{manifest}: damaged ({exc}); the checkpoint cannot be checked") from exc
    for name, size in files.items():
        path = ckpt / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"holds {found} bytes, not the {size} written"
            raise ResumeError(f"{ckpt}: {name} {what}; the checkpoint is incomplete or damaged. Use an earlier "
                              f"one (train.resume=<its folder>, or orpo-ds export --checkpoint <its folder>)")
