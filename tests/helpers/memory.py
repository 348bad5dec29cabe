"""Peak CPU memory of a piece of work, measured by the torch profiler's allocator events."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def peak_allocated_bytes(work) -> int:
    """The most bytes the CPU allocator held above what it held when ``work()`` started.

    The profiler's ``[memory]`` events carry ``Total Allocated``, counted from the start of profiling,
    so tensors that exist before (weights, pre-allocated gradients) are not in the figure.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler recorded no allocation"
    return max(totals)
