"""Checkpoints that survive a crash at any instant, and the state that makes a resume exact.

Layout under ``<train.output_dir>/checkpoints/``::

    step-000005/                 a complete checkpoint (never modified after its rename)
        ds/                      DeepSpeed engine state: ZeRO partitions, optimizer, LR schedule
        trainer_state.json       step, data position, world size, model, resolved config, the held-out
                                 figures before and after training once known
        rng/rank-00000.pt        python / numpy / torch RNG states of each rank
        hf/                      model config + tokenizer (+ adapter_config.json under LoRA), so
                                 `orpo-ds export` needs nothing else
    latest                       the name of the newest complete checkpoint, replaced last

A checkpoint is written under ``.tmp-step-000005`` and renamed once every rank has finished writing;
only then does ``latest`` change (:func:`orpo_ds.safe_files.atomic_write`). A kill at any point leaves the
previous checkpoint and pointer intact; stale ``.tmp-*`` folders are deleted by the next save. A re-save
of a step renames the old folder aside (``.old-step-000005.orpo-ds-<pid>-<random>``) before the new one
is renamed in, and a reader that finds only that twin uses it. Pruning never deletes the checkpoint just
written, nor the one ``latest`` names.

The RNG files hold only tensors, numbers and strings and are read with ``torch.load(weights_only=True)``,
so they cannot run code. DeepSpeed's own engine state (``ds/``) is still read with pickle by DeepSpeed:
resume and export only checkpoints you trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from orpo_ds import lora as lora_lib
from orpo_ds.config import Config, TrainConfig
from orpo_ds.data import TokenizedPair, tokenizer_identity
from orpo_ds.metrics import MetricsLog
from orpo_ds.preemption import EXIT_INTERRUPTED, Preempted, PreemptionSignal
from orpo_ds.safe_files import (
    CHECKPOINT_STATE_FILE,
    DiskFullError,
    aside_paths,
    atomic_write,
    is_disk_full,
    replace_dir,
)

STATE_FILE = CHECKPOINT_STATE_FILE
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
    # What the packing plan is a function of, besides the fields above.
    data_fingerprint: str  # sha256 of the tokenized training pairs, in order
    max_length: int
    truncation: str
    tokenizer_sha256: str  # vocabulary, merges, added tokens and chat template
    # The engine state's shape: the ZeRO stage of its partitions and the model it was trained from
    # (orpo_ds.model_files.model_fingerprint).
    zero_stage: int
    model_fingerprint: str
    # The loop's own progress besides the step: the held-out figures before and after training, and the
    # before/after snapshots of orpo_ds.evaluate.Evaluator.snapshot (per-pair stats and answers), so a
    # requeued job reports them without evaluating (or logging) them twice. None until known.
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    compare_before: dict[str, Any] | None = None
    compare_after: dict[str, Any] | None = None


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    """sha256 of the tokenized training pairs in order: ids and lengths of every prompt and response.
    Equal fingerprints mean the same packing plan for the same budget, seed and world size."""
    h = hashlib.sha256()
    for p in pairs:
        header = [p.pair_id, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
        h.update(np.asarray(header + [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids], dtype=np.int64).tobytes())
    return h.hexdigest()


def run_identity(cfg: Config, world_size: int, pairs: list[TokenizedPair], tokenizer, *, zero_stage: int,
                 model_fingerprint: str) -> TrainerState:
    """What a checkpoint of this run records about it (at step 0): a resume must match it."""
    t = cfg.train
    return TrainerState(step=0, epoch=0, world_size=world_size, grad_accum=t.grad_accum,
                        micro_batch_tokens=t.micro_batch_tokens, seed=t.seed, num_pairs=len(pairs),
                        model=cfg.model.name_or_path, config=cfg.to_dict(), data_fingerprint=pairs_fingerprint(pairs),
                        max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                        tokenizer_sha256=tokenizer_identity(tokenizer)["state_sha256"], zero_stage=zero_stage,
                        model_fingerprint=model_fingerprint)


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


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors, lists, numbers and strings only (no pickled objects),
    so that ``torch.load(weights_only=True)`` reads it back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def read_state(ckpt: Path) -> TrainerState:
    """The checkpoint's :class:`TrainerState`; a torn, empty or foreign file is a :class:`ResumeError`
    naming it."""
    path = ckpt / STATE_FILE
    try:
        fields = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(TrainerState)}
        if not isinstance(fields, dict) or set(fields) - known:
            extra = sorted(set(fields) - known) if isinstance(fields, dict) else []
            raise ValueError(f"unknown fields {extra}" if extra else "not a JSON object")
        return TrainerState(**fields)
    except (OSError, ValueError, TypeError) as exc:
        raise ResumeError(f"{path}: not a readable orpo-ds trainer state ({type(exc).__name__}: {exc}); the "
                          f"checkpoint is damaged. Resume from an earlier one (train.resume=<its folder>) or "
                          f"start fresh (train.resume=false)") from exc


MANIFEST = "files.json"  # every file of the checkpoint and its size, written when it is committed


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


def check_compatible(state: TrainerState, new: TrainerState, ckpt: Path, *, world_size_change: str = "refuse",
                     zero_stage: int = 3) -> None:
    """Refuse a resume whose data position or engine state would not mean the same thing; ``new`` is the
    state this run would save (its step and epoch are ignored). A new world size is accepted with
    ``train.resume_world_size_change=allow`` under ZeRO-3 (the stage DeepSpeed's universal checkpoint
    conversion is tested with here)."""
    problems = []
    if state.world_size != new.world_size and not (world_size_change == "allow" and zero_stage == 3):
        how = (f"resume with {state.world_size} ranks, set train.resume_world_size_change=allow (ZeRO-3), or "
               f"export the checkpoint and start a new run from the exported model")
        if world_size_change == "allow":
            how = (f"a new world size needs ZeRO-3 here (this run is ZeRO-{zero_stage}); resume with "
                   f"{state.world_size} ranks")
        problems.append(f"world size {state.world_size} -> {new.world_size} (ZeRO partitions and the data plan "
                        f"depend on it; {how})")
    for key in ("grad_accum", "micro_batch_tokens", "seed"):
        if getattr(state, key) != getattr(new, key):
            problems.append(f"train.{key} {getattr(state, key)} -> {getattr(new, key)} (it changes which pairs "
                            f"each step holds)")
    # As JSON, the form the checkpoint stores it in (a tuple of target modules reads back as a list).
    adapters = [json.loads(json.dumps(run.config.get("model", {}).get("lora"))) for run in (state, new)]
    if adapters[0] != adapters[1]:
        problems.append(f"model.lora {adapters[0]} -> {adapters[1]} (the checkpoint's trainable parameters are "
                        f"those of its own setting)")
    shared = [run.config.get("train", {}).get("share_prompt", False) for run in (state, new)]
    if shared[0] != shared[1]:
        problems.append(f"train.share_prompt {str(shared[0]).lower()} -> {str(shared[1]).lower()} (a pair's length "
                        f"in a row, and so which pairs each step holds, depends on it)")
    if state.num_pairs != new.num_pairs:
        problems.append(f"training pairs {state.num_pairs} -> {new.num_pairs} (different data)")
    if state.model_fingerprint != new.model_fingerprint:
        problems.append(f"the model at model.name_or_path ({new.model!r}) is not the one the checkpoint was "
                        f"trained from ({state.model!r}): its config or weights differ")
    if state.zero_stage != new.zero_stage:
        problems.append(f"ZeRO stage {state.zero_stage} -> {new.zero_stage} (the checkpoint's partitions are "
                        f"ZeRO-{state.zero_stage}'s; resume with its DeepSpeed config, or export the checkpoint "
                        f"and start a new run from the exported model)")
    for section, key, why in (("train", "optimizer", "the checkpoint holds that optimizer's state"),
                              ("model", "trainable_layers", "the optimizer state covers those layers only")):
        old_value, new_value = (run.config.get(section, {}).get(key) for run in (state, new))
        if old_value != new_value:
            problems.append(f"{section}.{key} {old_value!r} -> {new_value!r} ({why}; restore {section}.{key}="
                            f"{old_value}, or export the checkpoint and start a new run from it)")
    for key in ("max_length", "truncation"):
        if getattr(state, key) != getattr(new, key):
            problems.append(f"data.{key} {getattr(state, key)!r} -> {getattr(new, key)!r} (it changes the "
                            f"tokenized pairs)")
    if state.tokenizer_sha256 != new.tokenizer_sha256:
        problems.append("the tokenizer or its chat template changed")
    if not problems and state.data_fingerprint != new.data_fingerprint:
        problems.append("the training data changed (same number of pairs, different content or order)")
    if problems:
        raise ResumeError(f"cannot resume from {ckpt}: " + "; ".join(problems) +
                          ". Set train.resume=false to start fresh, or restore the old settings.")


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """``{"train.lr": [old, new], ...}``: the dotted keys whose values differ between two resolved configs
    (as :meth:`Config.to_dict` gives them), compared as JSON, the form a checkpoint stores."""
    changes: dict[str, list[Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = json.loads(json.dumps(old.get(key))), json.loads(json.dumps(new.get(key)))
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = [a, b]
    return changes


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
    path = ckpt / "rng" / f"rank-{rank:05d}.pt"
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # pickle's errors are many; all mean "not ours"
        raise ResumeError(f"{path}: refused to load ({type(exc).__name__}: {exc}). orpo-ds RNG files hold "
                          f"only tensors and numbers; this one holds other objects (an older orpo-ds, or not "
                          f"orpo-ds's file). Export the checkpoint instead, or start a new run") from exc
    set_rng_state(state)


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
            eng_lib.barrier()
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
        (failed,) = eng_lib.reduce_to_host(torch.tensor([float(failure is not None)]))
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
        eng_lib.barrier()
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
