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

from orpo_ds.checkpoint.commit import begin_save, commit_save, prunable, temp_dir
from orpo_ds.checkpoint.layout import (
    LATEST,
    MANIFEST,
    STATE_FILE,
    ResumeError,
    checkpoints_dir,
    clear_run_state,
    fault_point,
    find_checkpoint,
    latest_checkpoint,
    output_dir_of,
    resolve_resume,
    step_dir_name,
    verify_files,
    write_manifest,
)
from orpo_ds.checkpoint.resume import RUN_CONFIG, RunStart, resolve_run_start
from orpo_ds.checkpoint.rng import load_rank_state, rng_state, set_rng_state, write_rank_state
from orpo_ds.checkpoint.saver import CheckpointSaver, universal_copy
from orpo_ds.checkpoint.state import (
    TrainerState,
    check_compatible,
    config_changes,
    pairs_fingerprint,
    read_state,
    run_identity,
)

__all__ = [
    "RUN_CONFIG", "RunStart", "resolve_run_start",
    "STATE_FILE", "LATEST", "MANIFEST", "ResumeError", "checkpoints_dir", "output_dir_of", "step_dir_name",
    "fault_point", "latest_checkpoint", "find_checkpoint", "resolve_resume", "clear_run_state", "write_manifest",
    "verify_files", "TrainerState", "pairs_fingerprint", "run_identity", "read_state", "check_compatible",
    "config_changes", "rng_state", "set_rng_state", "write_rank_state", "load_rank_state", "begin_save",
    "temp_dir", "commit_save", "prunable", "universal_copy", "CheckpointSaver",
]
