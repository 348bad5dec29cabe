"""File operations that never lose a user's data: guarded export targets, atomic folder replacement, and
one run per output folder.

Users on shared clusters point ``--out`` at their home folder and rerun into old output folders. Nothing
here deletes a folder that orpo-ds did not write, and every replacement is a sequence of renames that a
kill at any instant leaves with either the old or the new folder complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

# Written into every folder `orpo-ds export` or the end of training produces; only such a folder may be
# replaced by a later export.
EXPORT_MARKER = ".orpo-ds-export"
# Written into a run's train.output_dir when the run claims it; a run writes only into a folder that is
# new, empty or holds this file.
RUN_MARKER = ".orpo-ds-run"
LOCK_FILE = ".lock"
# What makes a folder a checkpoint (orpo_ds.checkpoint writes it last); nothing may be written inside one,
# since pruning deletes checkpoints whole.
CHECKPOINT_STATE_FILE = "trainer_state.json"


class UnsafeOutputError(ValueError):
    """A command would overwrite or delete something it must not; the message says what and why (exit 2)."""


class DiskFullError(RuntimeError):
    """The filesystem ran out of space (or quota) while writing; the message names the folder and what
    was kept (exit 3)."""


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _checkpoint_holding(target: Path) -> Path | None:
    """The checkpoint folder that ``target`` is or lies inside, if any: a folder holding
    :data:`CHECKPOINT_STATE_FILE`, a run's ``checkpoints/`` folder, or a checkpoint being written."""
    for folder in (target, *target.parents):
        if (folder / CHECKPOINT_STATE_FILE).is_file() or folder.name.startswith(".tmp-step-"):
            return folder
        if folder.name == "checkpoints" and (folder.parent / RUN_MARKER).is_file():
            return folder
    return None


def check_export_target(out: str | Path, *, protected: list[Path], suggest: Path | None = None) -> Path:
    """Refuse an export folder that would destroy data, or that later pruning would; returns the resolved
    target.

    ``out`` may be absent, or an earlier orpo-ds export (it holds :data:`EXPORT_MARKER`). It may not be
    or contain any ``protected`` folder (the checkpoint, the run's output_dir), whatever it holds, nor lie
    inside a checkpoint. ``suggest`` is the folder a refusal proposes instead.
    """
    target = Path(out).expanduser().resolve()
    instead = f"; pick a new folder, e.g. --out {suggest}" if suggest is not None else "; pick a new folder"
    for folder in protected:
        if _is_within(Path(folder).resolve(), target):
            raise UnsafeOutputError(f"--out {str(out)!r} is or contains {str(folder)!r}, which the export reads "
                                    f"from or belongs to the run{instead}")
    inside = _checkpoint_holding(target)
    if inside is not None:
        raise UnsafeOutputError(f"--out {str(out)!r} lies inside the checkpoint folder {str(inside)!r}, which a "
                                f"later run's pruning deletes whole{instead}")
    if target.is_file():
        raise UnsafeOutputError(f"--out {str(out)!r} is a file; pick a folder name")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARKER).is_file():
        raise UnsafeOutputError(f"--out {str(out)!r} is a folder that is not an orpo-ds export; orpo-ds only "
                                f"replaces its own exports (they hold {EXPORT_MARKER}). Pick a new folder, or "
                                f"remove it yourself")
    return target


def claim_output_dir(output_dir: str | Path) -> Path:
    """Make ``output_dir`` this run's folder, or refuse before any work; returns it.

    A run writes only into a folder that is new, empty (an output_dir lock file aside), or an earlier
    orpo-ds run's (it holds :data:`RUN_MARKER`): never into a model's folder, a home folder, or a folder
    of the user's files, whose ``config.json`` or ``summary.json`` a run's files would replace.
    """
    out = Path(output_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise UnsafeOutputError(f"train.output_dir {str(out)!r}: {str(folder)!r} is a file, not a folder")
    if out.is_dir() and not (out / RUN_MARKER).is_file():
        theirs = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if theirs:
            shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
            raise UnsafeOutputError(f"train.output_dir {str(out)!r} holds files that are not an orpo-ds run's "
                                    f"({shown}); a run writes only into a new or empty folder or an earlier "
                                    f"run's (it holds {RUN_MARKER}). Pick a new train.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():
            atomic_write(out / RUN_MARKER, "an orpo-ds run folder: later runs may resume here and replace the "
                                           "run's own files\n")
    except OSError as exc:
        raise UnsafeOutputError(f"train.output_dir {str(out)!r}: cannot write there ({_reason(exc)})") from exc
    return out


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def is_disk_full(exc: BaseException) -> bool:
    """An error that means the filesystem ran out of space or quota (torch wraps the OSError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or (
        exc.__cause__ is not None and is_disk_full(exc.__cause__))


def _private_name(target: Path, kind: str) -> Path:
    """A sibling name for ``target`` that no other process, and no user, has: pid and a random suffix."""
    return target.with_name(f".{kind}-{target.name}.orpo-ds-{os.getpid()}-{secrets.token_hex(4)}")


def staging_dir(target: Path) -> Path:
    """A new, empty sibling of ``target`` to write the new folder into (same filesystem: renames are
    atomic). Its name is this process's own, so no other folder is ever cleared to make room for it; a
    killed export leaves it behind, named ``.tmp-<target>.orpo-ds-<pid>-<random>``."""
    tmp = _private_name(target, "tmp")
    tmp.mkdir(parents=True)
    return tmp


def aside_paths(target: Path) -> list[Path]:
    """The old copies of ``target`` that :func:`replace_dir` set aside and a kill left behind."""
    return sorted(target.parent.glob(f".old-{target.name}.orpo-ds-*"))


def replace_dir(new: Path, target: Path) -> Path:
    """Put the complete folder ``new`` at ``target``: the old one is renamed aside (under a name of this
    process's own), the new one renamed in, then the old one is deleted. A kill in between leaves
    ``target`` or its aside copy (:func:`aside_paths`) whole."""
    aside = _private_name(target, "old")
    if target.exists():
        os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that a reader (or a kill at any instant) sees the old content or the new, never a
    mix: write a sibling of this process's own, flush it to disk, then ``os.replace`` it onto ``path``.
    A failure (a full disk) removes the sibling and raises."""
    path = Path(path)
    tmp = _private_name(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def refuse_existing_file(path: str | Path, flag: str) -> None:
    """A file a command would write must be new, in a folder that exists: checked before the work."""
    path = Path(path)
    if path.exists():
        raise UnsafeOutputError(f"{flag}: {str(path)!r} exists; name a new file")
    if not path.parent.is_dir():
        raise UnsafeOutputError(f"{flag}: the folder {str(path.parent)!r} does not exist")


def mark_export(folder: Path) -> None:
    (folder / EXPORT_MARKER).write_text("written by orpo-ds; a later export may replace this folder\n")


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``: a run's output_dir for the life of the run (rank 0
    only), or the demo's assets folder while it is being filled.

    The kernel drops the lock when the process dies, SIGKILL included, so a requeued job never finds a
    stale lock. The holder writes its pid and host into the file so a second process can name it.
    ``what`` names the folder in messages (the config key, for an output_dir).
    """

    def __init__(self, folder: str | Path, what: str = "train.output_dir"):
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock; with ``wait``, block until the holder releases it, else refuse at once."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only folder or mount
            raise UnsafeOutputError(f"{self.what} {str(self.path.parent)!r}: cannot write there "
                                    f"({_reason(exc)})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UnsafeOutputError(f"{self.what} {str(self.path.parent)!r} is in use by another run "
                                    f"({holder}); wait for it, or give this run its own {self.what}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self, wait: bool = False) -> Iterator[None]:
        self.acquire(wait=wait)
        try:
            yield
        finally:
            self.release()
