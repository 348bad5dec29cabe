"""Test tiers: tests/unit (fast CPU), tests/distributed (gloo, 2 ranks, real DeepSpeed), tests/gpu (CUDA only)."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# The venv's ninja for every JIT build: two ninja versions sharing one build folder rebuild it each time.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU comm op once, before any launched process (a SLURM job, a 2-rank run) would
    have to build it within its own time limit."""
    import torch

    if not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cpu":
        from orpo_ds.distributed import build_cpu_comm_op

        build_cpu_comm_op()


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="GPU tier: no CUDA device on this machine")
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}gpu{os.sep}" in path:
            item.add_marker(pytest.mark.gpu)
            if not has_cuda:
                item.add_marker(skip_gpu)
        elif f"{os.sep}distributed{os.sep}" in path:
            item.add_marker(pytest.mark.dist)


@pytest.fixture
def restore_llama_module():
    """Liger's instance patch also replaces modeling_llama's RMSNorm / MLP classes and its RoPE function
    for the whole process; put them back so later tests build plain Llama models."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield modeling_llama
    for name in set(vars(modeling_llama)) - set(saved):
        delattr(modeling_llama, name)
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def pytest_terminal_summary(terminalreporter):
    """The CPU the suite ran on and the memory estimate's measured ratios, so that a CI log says which
    machine gave which figures (issue 38: this test's figures depend on the CPU's GEMM library)."""
    from tests.helpers.machine import PLAN_MEMORY_RECORD, cpu_description

    records = [(report.nodeid.rsplit("[", 1)[-1].rstrip("]"), value)
               for reports in terminalreporter.stats.values() for report in reports
               if getattr(report, "when", None) == "call"
               for name, value in getattr(report, "user_properties", ()) if name == PLAN_MEMORY_RECORD]
    if not records:
        return
    terminalreporter.section("the machine, and the memory estimate over measured peaks")
    terminalreporter.write_line(cpu_description())
    for case, value in sorted(records):
        terminalreporter.write_line(f"{case}: {value}")
