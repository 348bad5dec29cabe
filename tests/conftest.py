"""Test tiers: tests/unit (fast CPU), tests/dist (gloo, 2 ranks, real DeepSpeed), tests/gpu (CUDA only)."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
        elif f"{os.sep}dist{os.sep}" in path:
            item.add_marker(pytest.mark.dist)
