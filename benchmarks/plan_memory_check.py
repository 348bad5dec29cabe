"""The planner's activation and head estimate against the measured peak of real CPU steps, split into the
step's tensors and the buffers a GEMM library keeps to itself inside one call (tests/helpers/memory.py).

    python benchmarks/plan_memory_check.py            # tiny and small models, ~3 min on 2 cores
    python benchmarks/plan_memory_check.py --shapes small
    python benchmarks/plan_memory_check.py --onednn   # PyTorch's default GEMM path, as on an Intel Xeon

It prints the CPU it ran on (model name, PyTorch's CPU capability, whether PyTorch sends bf16 GEMMs to
oneDNN), then per case the estimate over the whole peak and over the tensors' peak, and the largest
GEMM-private figure. ``tests/unit/test_plan_memory.py`` asserts the tensors' ratio; this script shows
what the CPU adds on top, so a figure can be quoted with the machine that gave it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.machine import cpu_description
from tests.unit.test_plan_memory import MOE_SHAPES, SHAPES, estimates_and_measured_peaks


def check(name: str, checkpointing: bool, dtype: torch.dtype, onednn: bool) -> str:
    cells = []
    for tokens, (estimate, peak) in estimates_and_measured_peaks(name, checkpointing, dtype, onednn=onednn).items():
        cells.append(f"{tokens} tok: {estimate / peak.total:.3f} / {estimate / peak.tensors:.3f} "
                     f"({peak.gemm_private / 2**20:.1f} MiB)")
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join([*SHAPES, *MOE_SHAPES]))
    parser.add_argument("--onednn", action="store_true",
                        help="PyTorch's default GEMM path (bf16 GEMMs to oneDNN where the CPU supports it); "
                             "the test measures with it off")
    args = parser.parse_args()
    print(cpu_description())
    print(f"oneDNN GEMMs: {'on (PyTorch default)' if args.onednn else 'off (as the test measures)'}")
    print("case: tokens: estimate/whole peak / estimate/tensors peak (largest GEMM-private buffers)")
    for name in args.shapes.split(","):
        for checkpointing in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                label = f"{name}-{'checkpointed' if checkpointing else 'full'}-{str(dtype)[6:]}"
                print(f"{label}: {check(name, checkpointing, dtype, args.onednn)}", flush=True)


if __name__ == "__main__":
    main()
