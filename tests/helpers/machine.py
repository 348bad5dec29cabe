"""The CPU a measurement ran on, so that a figure is quoted with the machine that gave it (issue 38)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

WIDE_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# The name under which tests/unit/test_plan_memory.py records each case's ratios for the suite's summary.
PLAN_MEMORY_RECORD = "plan_memory_ratios"


def cpu_description() -> str:
    """One line: the CPU's model name, its wide-vector flags, PyTorch's CPU capability, and whether
    PyTorch sends bf16 GEMMs to oneDNN (the path whose private buffers differ between CPUs)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wide = [f for f in WIDE_ISA_FLAGS if f in flags]
    return (f"{model}; flags {' '.join(wide)}; torch {torch.__version__} capability "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 GEMMs to oneDNN: "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
