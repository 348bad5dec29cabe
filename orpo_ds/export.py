"""``orpo-ds export``: a DeepSpeed checkpoint -> a transformers folder that ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

import torch

from orpo_ds import engine as eng_lib
from orpo_ds.checkpoint import find_checkpoint, output_dir_of
from orpo_ds.safe_files import check_export_target, mark_export, replace_dir, staging_dir

# The policy wraps the causal LM as `causal_lm`; checkpoint keys carry that prefix.
_PREFIX = "causal_lm."


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
    state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v
             for k, v in eng_lib.consolidate_zero_checkpoint(ckpt / "ds").items()}
    config = AutoConfig.from_pretrained(ckpt / "hf")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
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
