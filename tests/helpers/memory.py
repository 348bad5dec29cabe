"""Peak CPU memory of a piece of work, measured by the torch profiler's allocator events.

The planner estimates the tensors a step holds: weights, saved activations, gradients and the head's
chunk buffers. A CPU matmul library can add private buffers of its own inside one GEMM call, and how much
depends on the CPU: on a CPU with AVX-512, PyTorch sends bf16 GEMMs to oneDNN, which may keep such
buffers; on an AVX2-only CPU PyTorch runs them itself, with none. ``measure_peak`` therefore reports both
the whole peak and the peak of what outlives the GEMM calls, so a test can compare an estimate with the
second and still print the first.
"""

from __future__ import annotations

import bisect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# The matrix-multiply kernels: their calls are leaves of the op tree on the CPU (the GEMM library calls no
# aten op), so an allocation made and freed inside one call is that library's own buffer.
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"})


@dataclass(frozen=True)
class PeakMemory:
    """Bytes above what the allocator held when the work started.

    ``total``: the most held at any moment. ``gemm_private``: the most held at any moment by buffers that
    a GEMM call allocated and freed before it returned. ``tensors``: the most held at any moment by
    everything else, which is what a memory estimate of the step's tensors should match.
    """

    total: int
    gemm_private: int
    tensors: int


def measure_peak(work, gemm_ops: frozenset[str] = GEMM_OPS) -> PeakMemory:
    """Run ``work()`` under the profiler and split its peak memory as ``PeakMemory`` describes.

    The profiler's ``[memory]`` events carry the bytes and address of each allocation and free, counted
    from the start of profiling, so tensors that exist before (weights, pre-allocated gradients) are not in
    the figures. A buffer is GEMM-private when its allocation and its free fall inside the same call of an
    op named in ``gemm_ops``, on the same thread.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    assert memory, "the profiler recorded no allocation"
    calls = _calls_by_thread(events, gemm_ops)

    private: set[int] = set()  # indices into ``memory`` of the allocations and frees of GEMM-private buffers
    open_allocations: dict[int, int] = {}  # address -> index of its allocation event
    for i, event in enumerate(memory):
        args = event["args"]
        if args["Bytes"] > 0:
            open_allocations[args["Addr"]] = i
            continue
        start = open_allocations.pop(args["Addr"], None)
        if start is None:
            continue
        made, freed = _enclosing_call(calls, memory[start]), _enclosing_call(calls, event)
        if made is not None and made == freed:
            private.update((start, i))

    total = gemm_private = tensors = 0
    peak = PeakMemory(0, 0, 0)
    for i, event in enumerate(memory):
        delta = event["args"]["Bytes"]
        total += delta
        if i in private:
            gemm_private += delta
        else:
            tensors += delta
        peak = PeakMemory(max(peak.total, total), max(peak.gemm_private, gemm_private), max(peak.tensors, tensors))
    return peak


def _calls_by_thread(events, names) -> dict[int, list[tuple[float, float]]]:
    """Per thread, the ``(start, end)`` microseconds of each outermost call of an op in ``names``, sorted by
    start: a call made inside another (an ``aten::mm`` inside a kernel named in ``names``) belongs to it."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            spans.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    outermost: dict[int, list[tuple[float, float]]] = {}
    for tid, thread_spans in spans.items():
        kept = outermost.setdefault(tid, [])
        for start, end in sorted(thread_spans, key=lambda s: (s[0], -s[1])):
            if not kept or start > kept[-1][1]:
                kept.append((start, end))
    return outermost


def _enclosing_call(calls, event) -> tuple[int, float] | None:
    """The outermost GEMM call (thread, start) whose span holds ``event``, or None."""
    spans = calls.get(event["tid"], [])
    k = bisect.bisect_right(spans, (event["ts"], float("inf"))) - 1
    if k >= 0 and spans[k][0] <= event["ts"] <= spans[k][1]:
        return event["tid"], spans[k][0]
    return None
