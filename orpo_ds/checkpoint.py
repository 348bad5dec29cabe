"""Checkpoints that survive a crash at any instant, and the state that makes a resume exact.

Layout under ``<train.output_dir>/checkpoints/``::

    step-000005/                 a complete checkpoint (never modified after its rename)
        ds/                      DeepSpeed engine state: ZeRO partitions, optimizer, LR schedule
        trainer_state.json       step, data position, world size, model, resolved config
        rng/rank-00000.pt        python / numpy / torch RNG states of each rank
        hf/                      model config + tokenizer, so `orpo-ds export` needs nothing else
    latest                       the name of the newest complete checkpoint, replaced last

A checkpoint is written under ``.tmp-step-000005`` and renamed once every rank has finished writing;
only then does ``latest`` change (write a temp file, ``os.replace``). A kill at any point leaves the
previous checkpoint and pointer intact; stale ``.tmp-*`` folders are deleted by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orpo_ds import engine as eng_lib
from orpo_ds.config import Config
from orpo_ds.metrics import MetricsLog

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with this config; the message says why and what to do."""


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed; the data position follows from the deterministic step plan
    epoch: int
    world_size: int
    grad_accum: int
    micro_batch_tokens: int
    seed: int
    num_pairs: int
    model: str
    config: dict[str, Any]


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash-safety tests: with ``ORPO_DS_FAULT=<name>:<step>`` in the environment,
    SIGKILL this process's whole group here (the launcher and every rank die, like a node loss)."""
    if os.environ.get("ORPO_DS_FAULT") == f"{name}:{step}":
        os.killpg(os.getpgid(0), signal.SIGKILL)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the highest complete step folder."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted((p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()),
                      key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
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


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``train.resume``: ``auto`` -> latest complete checkpoint in output_dir (or None: a fresh start),
    ``false`` -> None, anything else -> that checkpoint folder, which must exist."""
    if resume == "false":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    return find_checkpoint(resume)


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))


def check_compatible(state: TrainerState, *, world_size: int, grad_accum: int, micro_batch_tokens: int, seed: int,
                     num_pairs: int, model: str, ckpt: Path) -> None:
    """Refuse a resume whose data position or engine state would not mean the same thing."""
    problems = []
    if state.world_size != world_size:
        problems.append(f"world size {state.world_size} -> {world_size} (ZeRO partitions and the data plan depend "
                        f"on it; resume with {state.world_size} ranks, or export the checkpoint and start a new "
                        f"run from the exported model)")
    for key, old, new in (("train.grad_accum", state.grad_accum, grad_accum),
                          ("train.micro_batch_tokens", state.micro_batch_tokens, micro_batch_tokens),
                          ("train.seed", state.seed, seed)):
        if old != new:
            problems.append(f"{key} {old} -> {new} (it changes which pairs each step holds)")
    if state.num_pairs != num_pairs:
        problems.append(f"training pairs {state.num_pairs} -> {num_pairs} (different data)")
    if state.model != model:
        problems.append(f"model.name_or_path {state.model!r} -> {model!r}")
    if problems:
        raise ResumeError(f"cannot resume from {ckpt}: " + "; ".join(problems) +
                          ". Set train.resume=false to start fresh, or restore the old settings.")


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


def write_rank_state(tmp: Path, rank: int) -> None:
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")


def load_rank_state(ckpt: Path, rank: int) -> None:
    set_rng_state(torch.load(ckpt / "rng" / f"rank-{rank:05d}.pt", weights_only=False))


def commit_save(tmp: Path, state: TrainerState, keep: int, hf_files_from=None) -> Path:
    """Rank 0, after every rank has written into ``tmp``: add the trainer state, rename the folder into
    place, then move the ``latest`` pointer, then prune old checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2, default=str))
    if hf_files_from is not None:
        hf_files_from(tmp / "hf")
    fault_point("kill_before_commit", state.step)
    root = tmp.parent
    final = root / step_dir_name(state.step)
    if final.exists():  # a re-save of the same step (e.g. preempted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / LATEST)
    steps = sorted((p for p in root.glob("step-*") if _STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointSaver:
    """Saves and restores the run's state through :mod:`orpo_ds.checkpoint` (see its layout)."""

    def __init__(self, engine, policy, tokenizer, cfg: Config, info, num_pairs: int):
        self.engine, self.policy, self.tokenizer = engine, policy, tokenizer
        self.cfg, self.info, self.num_pairs = cfg, info, num_pairs
        self.out_dir = Path(cfg.train.output_dir)

    def _state(self, step: int, epoch: int) -> TrainerState:
        t = self.cfg.train
        return TrainerState(step=step, epoch=epoch, world_size=self.info.world_size,
                                     grad_accum=t.grad_accum, micro_batch_tokens=t.micro_batch_tokens, seed=t.seed,
                                     num_pairs=self.num_pairs, model=self.cfg.model.name_or_path,
                                     config=self.cfg.to_dict())

    def _write_hf_files(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.policy.causal_lm.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save(self, step: int, epoch: int) -> None:
        if self.info.is_main:
            begin_save(self.out_dir, step)
        eng_lib.barrier()
        tmp = temp_dir(self.out_dir, step)
        self.engine.save(tmp / "ds")
        write_rank_state(tmp, self.info.rank)
        eng_lib.barrier()
        if self.info.is_main:
            final = commit_save(tmp, self._state(step, epoch), self.cfg.train.keep_checkpoints,
                                         hf_files_from=self._write_hf_files)
            print(f"[checkpoint] step {step} -> {final}", flush=True)
        eng_lib.barrier()

    def resume(self, ckpt: Path, log: MetricsLog) -> int:
        state = read_state(ckpt)
        t = self.cfg.train
        check_compatible(state, world_size=self.info.world_size, grad_accum=t.grad_accum,
                                  micro_batch_tokens=t.micro_batch_tokens, seed=t.seed, num_pairs=self.num_pairs,
                                  model=self.cfg.model.name_or_path, ckpt=ckpt)
        self.engine.load(ckpt / "ds")
        load_rank_state(ckpt, self.info.rank)
        log.truncate_after(state.step)
        if self.info.is_main:
            print(f"[checkpoint] resumed from {ckpt} at step {state.step}", flush=True)
        return state.step
