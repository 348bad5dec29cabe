"""The demo data: the 300 ShareGPT pairs of LLaMA-Factory's ``dpo_en_demo.json`` split into training and
held-out files by prompt, with a seed, and the check that a split on disk is the one asked for."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Sequence

from orpo_ds.safe_files import atomic_write
from orpo_ds.tools.asset_pins import (
    DPO_JSON,
    EVAL_NAME,
    SHAREGPT_KEYS,
    SPLIT_MARKER,
    TRAIN_NAME,
    fsync_dir,
    remove_path,
    sha256_file,
)


def _check_records(records: Any) -> list[dict]:
    if not isinstance(records, list):
        raise ValueError("expected a JSON list of preference pairs")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and all(k in r for k in SHAREGPT_KEYS)):
            raise ValueError(f"record {i} lacks the ShareGPT keys {SHAREGPT_KEYS}")
    return records


def _prompt_key(r: dict) -> str:
    return json.dumps(r["conversations"], sort_keys=True, ensure_ascii=False)


def split_pairs(records: Sequence[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out split; both keep the source order and the records untouched.

    Held-out pairs are drawn only among records whose prompt occurs exactly once, so no held-out
    prompt is also a training prompt (dpo_en_demo.json holds 5 exact duplicate pairs; they stay in
    train). Raises if fewer than ``heldout`` such records exist.
    """
    counts: dict[str, int] = {}
    for r in records:
        counts[_prompt_key(r)] = counts.get(_prompt_key(r), 0) + 1
    unique = [i for i, r in enumerate(records) if counts[_prompt_key(r)] == 1]
    if not 0 <= heldout <= len(unique):
        raise ValueError(f"heldout={heldout}: need 0..{len(unique)} (records with a unique prompt)")
    held = set(random.Random(seed).sample(unique, heldout))
    train = [r for i, r in enumerate(records) if i not in held]
    ev = [r for i, r in enumerate(records) if i in held]
    return train, ev


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _split_marker(source_sha: str, heldout: int, seed: int) -> dict:
    return {"source": DPO_JSON.member, "source_package": DPO_JSON.archive.spec, "source_sha256": source_sha,
            "heldout": heldout, "seed": seed, "rule": "random.Random(seed).sample over unique-prompt records"}


def split_complete(data_dir: Path, source_sha: str, heldout: int, seed: int) -> bool:
    try:
        marker = json.loads((data_dir / SPLIT_MARKER).read_text())
        if {k: marker.get(k) for k in _split_marker(source_sha, heldout, seed)} != _split_marker(
                source_sha, heldout, seed):
            return False
        return all(sha256_file(data_dir / marker[k]["file"]) == marker[k]["sha256"] for k in ("train", "eval"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_split(source_json: Path, data_dir: Path, heldout: int, seed: int) -> tuple[Path, Path, int, int]:
    records = _check_records(json.loads(source_json.read_text(encoding="utf-8")))
    train, ev = split_pairs(records, heldout, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker_path = data_dir / SPLIT_MARKER
    remove_path(marker_path)  # the files below are about to change: the marker goes first, comes back last
    out = {}
    for key, name, recs in (("train", TRAIN_NAME, train), ("eval", EVAL_NAME, ev)):
        data = _jsonl(recs).encode("utf-8")
        atomic_write(data_dir / name, data)
        out[key] = {"file": name, "n": len(recs), "sha256": hashlib.sha256(data).hexdigest()}
    fsync_dir(data_dir)  # both files are in place on disk before the marker that vouches for them
    marker = {**_split_marker(sha256_file(source_json), heldout, seed), **out}
    atomic_write(marker_path, json.dumps(marker, indent=2) + "\n")
    fsync_dir(data_dir)
    return data_dir / TRAIN_NAME, data_dir / EVAL_NAME, len(train), len(ev)


# ---------------------------------------------------------------------------------------------- driver


