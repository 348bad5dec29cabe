"""Transformers folders that ``from_pretrained`` loads: from a live run's engine at the end of training,
and from a saved DeepSpeed checkpoint (``orpo-ds export``)."""

from __future__ import annotations

from pathlib import Path

import torch

from orpo_ds import engine as eng_lib
from orpo_ds.checkpoint import find_checkpoint, output_dir_of
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.safe_files import check_export_target, mark_export, replace_dir, staging_dir


def export_trained(engine, policy: PolicyWithChunkedHead, tokenizer, out_dir: Path, info) -> Path:
    """Collective: write a transformers folder (safetensors, config, tokenizer, chat template) from rank
    0, into a staging folder that replaces ``out_dir`` only once complete (:func:`replace_dir`)."""
    state = engine.full_state_dict(policy.causal_lm)
    if info.is_main:
        tmp = staging_dir(out_dir)
        policy.causal_lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mark_export(tmp)
        replace_dir(tmp, out_dir)
    eng_lib.barrier()
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, max_shard_size: str = "5GB",
                      dtype: torch.dtype | None = None) -> Path:
    """Consolidate the ZeRO shards of ``checkpoint`` on the CPU and write safetensors (sharded above
    ``max_shard_size``), config, tokenizer and chat template to ``out_dir``.

    ``checkpoint`` is a ``checkpoints/step-N`` folder, or an output_dir / checkpoints folder (the latest
    complete checkpoint in it is used). ``out_dir`` must be new, empty or an earlier export, and must not
    be or contain the checkpoint or its run's output_dir (:func:`check_export_target`); an earlier export
    is replaced atomically (:func:`replace_dir`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = find_checkpoint(checkpoint)
    target = check_export_target(out_dir, protected=[ckpt, output_dir_of(ckpt)])
    prefix = PolicyWithChunkedHead.STATE_PREFIX
    state = {k[len(prefix):] if k.startswith(prefix) else k: v
             for k, v in eng_lib.consolidate_zero_checkpoint(ckpt / "ds").items()}
    config = AutoConfig.from_pretrained(ckpt / "hf")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    tmp = staging_dir(target)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    mark_export(tmp)
    return replace_dir(tmp, target)
