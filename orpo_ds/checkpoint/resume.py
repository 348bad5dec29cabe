"""How a run begins, decided in one place at start-up: a fresh start, a resume, or a resume on another
world size, with every check that decision needs; the loop receives the result (:class:`RunStart`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo_ds import distributed as dist_lib
from orpo_ds.checkpoint.layout import ResumeError, clear_run_state, resolve_resume, verify_files
from orpo_ds.checkpoint.saver import universal_copy
from orpo_ds.checkpoint.state import TrainerState, check_compatible, data_replicas, read_state
from orpo_ds.config import Config, dump_config
from orpo_ds.data import TokenizedPairs
from orpo_ds.metrics import MetricsLog
from orpo_ds.packing import ScheduledStep, layout_for, reschedule_run
from orpo_ds.safe_files import atomic_write

# The resolved config of the run, in its output_dir. Not config.json: that name is a model's.
RUN_CONFIG = "orpo-ds-config.json"


@dataclass(frozen=True)
class RunStart:
    """How this run begins.

    Attributes:
        checkpoint: the checkpoint it resumes from; None for a fresh start.
        saved: that checkpoint's :class:`TrainerState`.
        steps: the step schedule the run follows (on another world size, the rest of the epoch re-dealt).
        universal: the universal copy of ``checkpoint`` the engine loads on another world size, else None.
    """

    checkpoint: Path | None
    saved: TrainerState | None
    steps: list[ScheduledStep]
    universal: Path | None = None

    @property
    def done_steps(self) -> int:
        return self.saved.step if self.saved else 0

    def engine_config(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """``ds_config``, told to load the universal copy when there is one."""
        if self.universal is None:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def resolve_run_start(cfg: Config, info, identity: TrainerState, log: MetricsLog, zero_stage: int,
                      steps: list[ScheduledStep], train_pairs: TokenizedPairs) -> RunStart:
    """Collective: fresh start, resume, or resume on another world size, decided once.

    ``steps`` is this run's own schedule and ``identity`` what its checkpoints will record (step 0). A
    resume is checked against the checkpoint (:func:`check_compatible`, :func:`verify_files`) before the
    run's config is written; on another world size the rest of the epoch is re-dealt and the universal
    copy made here, before the engine is built."""
    checkpoint = _accept_output_dir(cfg, info, identity, log, zero_stage)
    if checkpoint is None:
        return RunStart(checkpoint=None, saved=None, steps=steps)
    saved = read_state(checkpoint)
    if saved.world_size == info.world_size and data_replicas(saved) == data_replicas(identity):
        return RunStart(checkpoint=checkpoint, saved=saved, steps=steps)
    return _resume_on_new_layout(cfg, info, saved, identity, checkpoint, train_pairs)


def _accept_output_dir(cfg: Config, info, identity: TrainerState, log: MetricsLog,
                        zero_stage: int) -> Path | None:
    """Decide fresh start or resume, refusing what would mix two runs, then record the config.

    Returns the checkpoint to resume from (None: a fresh start). The run's config (:data:`RUN_CONFIG`) is
    written only once the resume is accepted, so a refused rerun leaves the folder as it was.
    """
    out_dir = Path(cfg.train.output_dir)
    resume_from = resolve_resume(cfg.train.resume, out_dir, overwrite=cfg.train.overwrite)
    if resume_from is not None:
        check_compatible(read_state(resume_from), identity, resume_from,
                                  world_size_change=cfg.train.resume_world_size_change, zero_stage=zero_stage)
        verify_files(resume_from)
    if info.is_main:
        if resume_from is None:
            if cfg.train.overwrite:
                clear_run_state(out_dir)
            log.start_fresh()
        atomic_write(out_dir / RUN_CONFIG, dump_config(cfg))
    dist_lib.barrier()
    return resume_from


def _resume_on_new_layout(cfg: Config, info, saved: TrainerState, identity: TrainerState, ckpt: Path,
                          train_pairs: TokenizedPairs) -> RunStart:
    """Collective: a run resumed on another world size or another ``train.sequence_parallel_size``.

    The rows go to data-parallel replicas (ranks / sequence-parallel size): with as many replicas as the
    checkpoint's run, its schedule goes on unchanged; otherwise the rest of the epoch is re-dealt
    (:func:`orpo_ds.packing.reschedule_run`). On another world size the engine loads the universal copy
    of ``ckpt`` instead of its ZeRO-3 partitions (which do not depend on the sequence-parallel size)."""
    t = cfg.train
    old, new = data_replicas(saved), data_replicas(identity)
    steps = reschedule_run(train_pairs, t.micro_batch_tokens, old, new, t.grad_accum, done_steps=saved.step,
                           seed=t.seed, epochs=t.epochs, max_steps=t.max_steps, layout=layout_for(t.share_prompt))
    universal = _convert_to_universal(ckpt, info) if saved.world_size != info.world_size else None
    if info.is_main:
        epoch = steps[saved.step - 1].epoch if saved.step else 0
        how = "through a universal checkpoint" if universal else "from its ZeRO partitions"
        rows = "the rest of its rows dealt to the new replicas" if old != new else "its rows as they were dealt"
        print(f"[checkpoint] resuming step {saved.step} of a {saved.world_size}-rank run ({old} data-parallel "
              f"replicas) on {info.world_size} ranks ({new}) {how}: {len(steps) - saved.step} steps left, epoch "
              f"{epoch} with {rows}", flush=True)
    return RunStart(checkpoint=ckpt, saved=saved, steps=steps, universal=universal)


def _convert_to_universal(ckpt: Path, info) -> Path:
    """Collective: rank 0 writes the universal copy of ``ckpt`` (:func:`orpo_ds.checkpoint.universal_copy`);
    a failure there ends every rank."""
    path, error = ckpt.parent / f".universal-{ckpt.name}", None
    if info.is_main:
        try:
            path = universal_copy(ckpt)
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
    dist_lib.raise_if_any_rank_failed(error, ResumeError(f"{ckpt}: converting to a universal checkpoint failed "
                                                         f"on rank 0 (see its error)"))
    return path
