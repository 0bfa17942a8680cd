"""Host-to-device copies that do not make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from pageable host memory returns only once the copy is done, and
the copy runs after everything already queued on the stream: the host stops launching work until
the GPU has caught up. Index tables built on the host (zigzag orders, RoPE angles) go over through
page-locked memory instead, queued like a kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` (a host tensor) on ``device``; on CUDA the copy is queued, the host goes on."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    # PyTorch's pinned-memory pool keeps the staging block until the queued copy has read it
    return t.pin_memory().to(device, non_blocking=True)
