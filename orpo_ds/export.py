"""``orpo-ds export``: a DeepSpeed checkpoint -> a transformers folder that ``from_pretrained`` loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from orpo_ds import engine as eng_lib
from orpo_ds.checkpoint import find_checkpoint

# The policy wraps the causal LM as `causal_lm`; checkpoint keys carry that prefix.
_PREFIX = "causal_lm."


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, max_shard_size: str = "5GB",
                      dtype: torch.dtype | None = None) -> Path:
    """Consolidate the ZeRO shards of ``checkpoint`` on the CPU and write safetensors (sharded above
    ``max_shard_size``), config, tokenizer and chat template to ``out_dir`` (atomically: a temp folder
    renamed into place).

    ``checkpoint`` is a ``checkpoints/step-N`` folder, or an output_dir / checkpoints folder (the latest
    complete checkpoint in it is used).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = find_checkpoint(checkpoint)
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
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
