"""The demo model: SmolLM2-135M-Instruct's GGUF file converted into a transformers folder, exactly (every
tensor equal to the GGUF-loaded model's), and the check that a converted folder is complete."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from orpo_ds.safe_files import atomic_write, replace_dir, staging_dir
from orpo_ds.tools.asset_pins import (
    MANIFEST,
    fsync_dir,
    remove_path,
    sha256_file,
)


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str, *, provenance: dict[str, Any] | None = None,
                       extra_files: dict[str, bytes] | None = None) -> Path:
    """Turn a GGUF checkpoint into an ordinary transformers folder at ``out_dir`` (atomically).

    transformers dequantizes the GGUF tensors into float32 and undoes llama.cpp's q/k rotary row
    permutation while loading; transformers 5 refuses ``save_pretrained`` on such a model, so a plain
    model of the same class is built from the config without ``quantization_config`` and given the
    loaded state dict (strict). Tied input/output embeddings stay tied (saved once). Writes config.json,
    model.safetensors (float32), generation_config.json, the tokenizer with its chat template,
    ``extra_files`` and, last, ``assets_manifest.json`` (file sizes and sha256), then renames the folder
    into place. An existing ``out_dir`` is replaced.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    t0 = time.perf_counter()
    src_kw = dict(gguf_file=gguf_path.name)
    gg = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **src_kw)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **src_kw)
    if getattr(gg.config, "max_position_embeddings", None):  # GGUF carries no tokenizer length limit
        tok.model_max_length = int(gg.config.max_position_embeddings)

    cfg_dict = gg.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for k in ("_name_or_path", "_model_name_or_path"):  # the latter is GGUF's general.name
        cfg_dict.pop(k, None)
    cfg_dict.pop("transformers_version", None)
    cfg = type(gg.config).from_dict(cfg_dict)
    cfg.dtype = torch.float32
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in gg.state_dict().items()}
    plain = type(gg)(cfg)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = copy.deepcopy(gg.generation_config)
    plain.eval()
    if getattr(cfg, "tie_word_embeddings", False):
        emb, head = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr():
            raise RuntimeError("tie_word_embeddings is set but the converted model's embeddings are not tied")
    del gg

    tmp = staging_dir(out_dir)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                os.chmod(p, 0o666 & ~umask)  # safetensors writes 0600
                files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "source": {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path), **(provenance or {})},
            "model_class": type(plain).__name__,
            "num_parameters": sum(p.numel() for p in plain.parameters()),
            "dtype": "float32",
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
            "convert_seconds": round(time.perf_counter() - t0, 2),
            "files": files,
        }
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        remove_path(tmp)
    return out_dir


def model_complete(model_dir: Path, gguf_sha256: str) -> bool:
    """The converted folder exists, was made from the pinned GGUF, and holds every file it listed."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        if manifest["source"]["sha256"] != gguf_sha256:
            return False
        return all((model_dir / n).is_file() and (model_dir / n).stat().st_size == f["size"]
                   for n, f in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- data


