"""Transformers folders that ``from_pretrained`` loads: from a live run's engine at the end of training,
and from a saved DeepSpeed checkpoint (``orpo-ds export``)."""

from __future__ import annotations

from pathlib import Path

import torch

from orpo_ds import distributed as dist_lib
from orpo_ds import engine as eng_lib
from orpo_ds import lora as lora_lib
from orpo_ds.checkpoint import ResumeError, find_checkpoint, output_dir_of, read_state, verify_files
from orpo_ds.config import ConfigError
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.safe_files import check_export_target, mark_export, replace_dir, staging_dir


def export_trained(engine, policy: PolicyWithChunkedHead, tokenizer, out_dir: Path, info) -> Path:
    """Collective: write a transformers folder (safetensors, config, tokenizer, chat template) from rank
    0, into a staging folder that replaces ``out_dir`` only once complete (:func:`replace_dir`). A LoRA
    run writes its adapter folder (peft's format, with the tokenizer) instead; ``orpo-ds export --merge``
    writes the merged model from the checkpoint."""
    state = engine.full_state_dict(policy.causal_lm)
    if info.is_main:
        tmp = staging_dir(out_dir)
        if lora_lib.is_lora(policy.causal_lm):
            lora_lib.save_adapter(policy.causal_lm, state, tmp)
        else:
            policy.causal_lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mark_export(tmp)
        replace_dir(tmp, out_dir)
    dist_lib.barrier()
    return out_dir


def parse_shard_size(text: str) -> int:
    """``--max-shard-size`` as transformers reads it (``5GB``, ``500MB``, ``2GiB``, or bytes); a
    :class:`ConfigError` before any work for anything else."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB") from exc
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: must be above 0")
    return size


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, max_shard_size: str = "5GB",
                      dtype: torch.dtype | None = None, merge: bool = False) -> Path:
    """Consolidate the ZeRO shards of ``checkpoint`` on the CPU and write safetensors (sharded above
    ``max_shard_size``), config, tokenizer and chat template to ``out_dir``.

    A LoRA checkpoint (its ``hf/`` folder holds ``adapter_config.json``) is written as the adapter folder,
    which ``peft.PeftModel.from_pretrained(base, out_dir)`` loads; with ``merge`` as the model with the
    adapters merged into its weights (peft's ``merge_and_unload``), a plain transformers folder.

    ``checkpoint`` is a ``checkpoints/step-N`` folder, or an output_dir / checkpoints folder (the latest
    complete checkpoint in it is used). ``out_dir`` must be new, empty or an earlier export, and must not
    be or contain the checkpoint or its run's output_dir (:func:`check_export_target`); an earlier export
    is replaced atomically (:func:`replace_dir`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = find_checkpoint(checkpoint)
    verify_files(ckpt)
    max_shard_bytes = parse_shard_size(max_shard_size)
    run_dir = output_dir_of(ckpt)
    target = check_export_target(out_dir, protected=[ckpt, run_dir], suggest=run_dir.parent / f"{run_dir.name}-export")
    prefix = PolicyWithChunkedHead.STATE_PREFIX
    adapter = (ckpt / "hf" / lora_lib.ADAPTER_CONFIG).is_file()
    if merge and not adapter:
        raise ConfigError(f"--merge: {ckpt} trained the model's weights, not LoRA adapters; export it "
                                 f"without --merge")
    try:
        consolidated = eng_lib.consolidate_zero_checkpoint(ckpt / "ds")
    except Exception as exc:  # torch.load and DeepSpeed's readers raise many kinds on bad files
        raise ResumeError(f"{ckpt}: its engine state cannot be read ({type(exc).__name__}: {exc}); the checkpoint "
                          f"is damaged. Export an earlier one") from exc
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in consolidated.items()}
    config = AutoConfig.from_pretrained(ckpt / "hf")
    if adapter:
        lora = read_state(ckpt).config["model"]["lora"]
        model = lora_lib.rebuild_from_state(config, ckpt / "hf", state, dtype or torch.float32,
                                            train_head=bool(lora.get("train_head")))
        model = model.merge_and_unload() if merge else model
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=True)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    tmp = staging_dir(target)
    if lora_lib.is_lora(model):  # the adapter folder (with the head's weight where it was trained)
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=lora_lib.trains_head(model))
    else:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    mark_export(tmp)
    return replace_dir(tmp, target)
