"""The run's checkpoint policy and its saves and loads (:class:`CheckpointSaver`), and the universal
copy a resume on another world size loads."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from orpo_ds import distributed as dist_lib
from orpo_ds import engine as eng_lib
from orpo_ds import lora as lora_lib
from orpo_ds.checkpoint.commit import begin_save, commit_save, temp_dir
from orpo_ds.checkpoint.layout import checkpoints_dir, fault_point, latest_checkpoint
from orpo_ds.checkpoint.rng import load_rank_state, write_rank_state
from orpo_ds.checkpoint.state import TrainerState, config_changes, read_state
from orpo_ds.config import TrainConfig
from orpo_ds.metrics import MetricsLog
from orpo_ds.preemption import EXIT_INTERRUPTED, Preempted, PreemptionSignal
from orpo_ds.safe_files import (
    DiskFullError,
    is_disk_full,
)


def universal_copy(ckpt: Path) -> Path:
    """Rank 0, for a resume on another world size: DeepSpeed's universal form of ``ckpt``'s ZeRO-3 state
    (``ds_to_universal``: every parameter's fp32 value and AdamW moments whole, one folder per parameter),
    which the engine loads on any number of ranks with ``checkpoint.load_universal``. Written next to the
    checkpoint as ``.universal-step-N`` (the checkpoint itself is never modified) and deleted by
    :meth:`CheckpointSaver.resume` once loaded."""
    final = ckpt.parent / f".universal-{ckpt.name}"
    tmp = ckpt.parent / f".universal-{ckpt.name}.tmp"
    for stale in (final, tmp):
        shutil.rmtree(stale, ignore_errors=True)
    eng_lib.convert_to_universal(ckpt / "ds" / "state", tmp / "state")
    tmp.rename(final)
    return final

class CheckpointSaver:
    """Saves and restores the run's state through :mod:`orpo_ds.checkpoint` (see its layout), and decides
    when to save (:meth:`maybe_save`)."""

    def __init__(self, engine, policy, tokenizer, t: TrainConfig, info):
        self.engine, self.policy, self.tokenizer, self.info = engine, policy, tokenizer, info
        self.out_dir, self.save_steps, self.keep = Path(t.output_dir), t.save_steps, t.keep_checkpoints

    def _write_hf_files(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.policy.causal_lm.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if lora_lib.is_lora(self.policy.causal_lm):  # what `orpo-ds export` rebuilds the adapters from
            self.policy.causal_lm.peft_config["default"].save_pretrained(directory)

    def save(self, state: TrainerState) -> None:
        """Collective: every rank writes its part, then rank 0 commits the checkpoint of ``state.step``.

        A full disk (on any rank) removes this save's temporary folder and raises :class:`DiskFullError`
        on every rank; the previous checkpoint and ``latest`` are untouched, so a rerun resumes from them."""
        tmp = temp_dir(self.out_dir, state.step)
        failure = None
        try:
            if self.info.is_main:
                begin_save(self.out_dir, state.step)
            dist_lib.barrier()
            self.engine.save(tmp / "ds")
            write_rank_state(tmp, self.info.rank)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            failure = exc
        self._raise_if_disk_full_anywhere(failure, tmp, state.step)
        if self.info.is_main:
            try:
                final = commit_save(tmp, state, self.keep, hf_files_from=self._write_hf_files)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                failure = exc
            else:
                print(f"[checkpoint] step {state.step} -> {final}", flush=True)
        self._raise_if_disk_full_anywhere(failure, tmp, state.step)

    def _raise_if_disk_full_anywhere(self, failure: Exception | None, tmp: Path, step: int) -> None:
        """Collective: if any rank ran out of space, rank 0 removes ``tmp`` and every rank raises."""
        (failed,) = dist_lib.reduce_to_host(torch.tensor([float(failure is not None)]))
        if not failed:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(self.out_dir)
        raise DiskFullError(f"no space left on device in {checkpoints_dir(self.out_dir)} while saving the checkpoint "
                            f"of step {step} ({failure or 'on another rank'}); its partial files were removed, and "
                            f"{f'the checkpoint {kept.name} is intact' if kept else 'no earlier checkpoint exists'}. "
                            f"Free space, then rerun the same command to resume")

    def maybe_save(self, state: TrainerState, *, last_step: int, preemption: PreemptionSignal) -> None:
        """The checkpoint policy, after each step: on a stop request (preemption, Ctrl-C; a collective
        read of ``preemption``) save and raise :class:`Preempted` with its exit code; else every
        ``train.save_steps`` steps, except the last one (the end of the run saves after its final eval)."""
        fault_point("kill_after_step", state.step)
        stop_code = preemption.requested()
        if stop_code is not None:
            self.save(state)
            why = "interrupted" if stop_code == EXIT_INTERRUPTED else "preempted"
            raise Preempted(f"{why}: checkpoint saved at step {state.step}; rerun the same command to resume",
                            exit_code=stop_code)
        if self.save_steps and state.step % self.save_steps == 0 and state.step < last_step:
            self.save(state)

    def resume(self, ckpt: Path, log: MetricsLog, identity: TrainerState,
               universal: Path | None = None) -> TrainerState:
        """Load a checkpoint that :func:`check_compatible` accepted against ``identity`` (this run's
        :func:`run_identity`); returns this run's state at the checkpoint's progress.

        On another world size the engine state comes from ``universal`` (:func:`universal_copy`, made by
        rank 0 before the engine was built with ``checkpoint.load_universal``): weights, AdamW moments,
        LR schedule and step count carry over. A rank that existed before restores its RNG states; a new
        rank keeps the run's seeded ones.
        """
        saved = read_state(ckpt)
        self.engine.load(universal if universal is not None else ckpt / "ds")
        if self.info.rank < saved.world_size:
            load_rank_state(ckpt, self.info.rank)
        dist_lib.barrier()
        if universal is not None and self.info.is_main:
            shutil.rmtree(universal, ignore_errors=True)
        log.truncate_after(saved.step)
        if self.info.is_main:
            print(f"[checkpoint] resumed from {ckpt} at step {saved.step}", flush=True)
        changes = config_changes(saved.config, identity.config)
        if changes:  # they run from the next step on (the schedule too: Engine.load adopts it)
            if self.info.is_main:
                shown = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
                print(f"[checkpoint] settings changed since the checkpoint, applied from step {saved.step + 1}: "
                      f"{shown}", flush=True)
            log.write({"step": saved.step, "resumed_with_changes": changes})
        return dataclasses.replace(identity, step=saved.step, epoch=saved.epoch, eval_before=saved.eval_before,
                                   eval_after=saved.eval_after, compare_before=saved.compare_before,
                                   compare_after=saved.compare_after)
