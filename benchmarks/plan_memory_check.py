"""The planner's activation and head estimate against the measured peak of real CPU steps, split into the
step's tensors and the buffers a GEMM library keeps to itself inside one call (tests/helpers/memory.py).

    python benchmarks/plan_memory_check.py            # tiny and small models, ~3 min on 2 cores
    python benchmarks/plan_memory_check.py --shapes small

It prints the CPU it ran on (model name, PyTorch's CPU capability, whether PyTorch sends bf16 GEMMs to
oneDNN), then per case the estimate over the whole peak and over the tensors' peak, and the largest
GEMM-private figure. ``tests/unit/test_plan_memory.py`` asserts the tensors' ratio; this script shows
what the CPU adds on top, so a figure can be quoted with the machine that gave it.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.test_plan_memory import SHAPES, estimates_and_measured_peaks


def cpu_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model}; flags {' '.join(wide)}; torch {torch.__version__} capability "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 GEMMs to oneDNN: "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")


def check(name: str, checkpointing: bool, dtype: torch.dtype) -> str:
    cells = []
    for tokens, (estimate, peak) in estimates_and_measured_peaks(name, checkpointing, dtype).items():
        cells.append(f"{tokens} tok: {estimate / peak.total:.3f} / {estimate / peak.tensors:.3f} "
                     f"({peak.gemm_private / 2**20:.1f} MiB)")
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    print(cpu_description())
    print("case: tokens: estimate/whole peak / estimate/tensors peak (largest GEMM-private buffers)")
    for name in args.shapes.split(","):
        for checkpointing in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                label = f"{name}-{'checkpointed' if checkpointing else 'full'}-{str(dtype)[6:]}"
                print(f"{label}: {check(name, checkpointing, dtype)}", flush=True)


if __name__ == "__main__":
    main()
