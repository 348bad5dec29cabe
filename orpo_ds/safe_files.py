"""File operations that never lose a user's data: guarded export targets, atomic folder replacement, and
one run per output folder.

Users on shared clusters point ``--out`` at their home folder and rerun into old output folders. Nothing
here deletes a folder that orpo-ds did not write, and every replacement is a sequence of renames that a
kill at any instant leaves with either the old or the new folder complete.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

# Written into every folder `orpo-ds export` or the end of training produces; only such a folder may be
# replaced by a later export.
EXPORT_MARKER = ".orpo-ds-export"
LOCK_FILE = ".lock"


class UnsafeOutputError(ValueError):
    """A command would overwrite or delete something it must not; the message says what and why (exit 2)."""


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: str | Path, *, protected: list[Path]) -> Path:
    """Refuse an export folder that would destroy data; returns the resolved target.

    ``out`` may be absent, or an earlier orpo-ds export (it holds :data:`EXPORT_MARKER`). It may not be
    or contain any ``protected`` folder (the checkpoint, the run's output_dir), whatever it holds.
    """
    target = Path(out).expanduser().resolve()
    for folder in protected:
        if _is_within(Path(folder).resolve(), target):
            raise UnsafeOutputError(f"--out {str(out)!r} is or contains {str(folder)!r}, which the export reads "
                                    f"from or belongs to the run; pick a new folder, e.g. --out {folder}/export")
    if target.is_file():
        raise UnsafeOutputError(f"--out {str(out)!r} is a file; pick a folder name")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARKER).is_file():
        raise UnsafeOutputError(f"--out {str(out)!r} is a folder that is not an orpo-ds export; orpo-ds only "
                                f"replaces its own exports (they hold {EXPORT_MARKER}). Pick a new folder, or "
                                f"remove it yourself")
    return target


def staging_dir(target: Path) -> Path:
    """A fresh, empty sibling of ``target`` to write the new folder into (same filesystem: renames are
    atomic). A stale one from a killed export is removed: it was never renamed into place."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def aside_path(target: Path) -> Path:
    """Where :func:`replace_dir` keeps the old ``target`` while the new one moves in."""
    return target.with_name(f".old-{target.name}")


def replace_dir(new: Path, target: Path) -> Path:
    """Put the complete folder ``new`` at ``target``: the old one is renamed aside, the new one renamed
    in, then the old one is deleted. A kill in between leaves ``target`` or its :func:`aside_path` whole."""
    aside = aside_path(target)
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that a reader (or a kill at any instant) sees the old content or the new, never a
    mix: write a hidden sibling, flush it to disk, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def mark_export(folder: Path) -> None:
    (folder / EXPORT_MARKER).write_text("written by orpo-ds; a later export may replace this folder\n")


class OutputDirLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock`` for the life of the process (rank 0 only).

    The kernel drops the lock when the process dies, SIGKILL included, so a requeued job never finds a
    stale lock. The holder writes its pid and host into the file so a second run can name it.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UnsafeOutputError(f"train.output_dir {str(self.path.parent)!r} is in use by another run "
                                    f"({holder}); wait for it, or give this run its own train.output_dir") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
