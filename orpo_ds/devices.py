"""Host-to-device copies that do not wait for the device.

A plain ``tensor.to("cuda")`` from pageable host memory returns only once the copy is done, and the copy
runs on the device's stream behind everything queued before it: the host stalls until the device has
caught up. A copy from pinned (page-locked) memory with ``non_blocking=True`` is queued on the stream like
a kernel and the host goes on. PyTorch's pinned-memory allocator keeps the host buffer alive until the
copy has run, so the source may be dropped at once.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, queued without waiting where ``device`` is CUDA; on the CPU
    ``host`` itself. Callers that need a private copy on the CPU make it first."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
