"""Every RNG the run draws from, saved per rank without pickle."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orpo_ds.checkpoint.layout import ResumeError


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
