"""What a checkpoint records about its run (:class:`TrainerState`), and whether a resume may continue it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo_ds.checkpoint.layout import STATE_FILE, ResumeError
from orpo_ds.config import Config
from orpo_ds.data import TokenizedPair, TokenizedPairs, as_tokenized_pairs, tokenizer_identity


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed; the data position follows from the deterministic step schedule
    epoch: int
    world_size: int
    grad_accum: int
    micro_batch_tokens: int
    seed: int
    num_pairs: int
    model: str
    config: dict[str, Any]
    # What the packing schedule is a function of, besides the fields above.
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

def pairs_fingerprint(pairs: TokenizedPairs | Sequence[TokenizedPair]) -> str:
    """sha256 of the tokenized training pairs in order: ids and lengths of every prompt and response
    (:attr:`orpo_ds.data.TokenizedPairs.fingerprint`: recorded in the tokenized-pairs cache, so a rank that
    read the cache does not hash its pairs again). Equal fingerprints mean the same packing schedule for the
    same budget, seed and world size."""
    return as_tokenized_pairs(pairs).fingerprint

def data_replicas(state: TrainerState) -> int:
    """How many data-parallel replicas the run dealt its rows to: its ranks over
    ``train.sequence_parallel_size`` (a checkpoint from before that key: 1)."""
    return state.world_size // state.config.get("train", {}).get("sequence_parallel_size", 1)


def run_identity(cfg: Config, world_size: int, pairs: TokenizedPairs, tokenizer, *, zero_stage: int,
                 model_fingerprint: str) -> TrainerState:
    """What a checkpoint of this run records about it (at step 0): a resume must match it."""
    t = cfg.train
    return TrainerState(step=0, epoch=0, world_size=world_size, grad_accum=t.grad_accum,
                        micro_batch_tokens=t.micro_batch_tokens, seed=t.seed, num_pairs=len(pairs),
                        model=cfg.model.name_or_path, config=cfg.to_dict(), data_fingerprint=pairs_fingerprint(pairs),
                        max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                        tokenizer_sha256=tokenizer_identity(tokenizer)["state_sha256"], zero_stage=zero_stage,
                        model_fingerprint=model_fingerprint)

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
        problems.append(f"world size {state.world_size} -> {new.world_size} (ZeRO partitions and the data schedule "
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
