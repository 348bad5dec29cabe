"""Read the history and config of an offline W&B run file (``run-<id>.wandb``) without a network.

wandb 0.31 ships no reader, so this follows its documented layout: a 7-byte header (``:W&B``, magic
0xBEE1, version) then LevelDB-log records in 32 KiB blocks (4-byte CRC, 2-byte length, 1-byte type:
1 full, 2 first, 3 middle, 4 last), each payload a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> list[dict]:
    """One dict per logged row: ``{"_step": ..., "loss": ..., "eval/loss": ...}``."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's config as logged (W&B wraps each top-level value as ``{"value": ...}``)."""
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def run_info(path: Path) -> dict:
    """The run record's project, display name and id."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return {"project": r.run.project, "name": r.run.display_name, "id": r.run.run_id}
    return {}
