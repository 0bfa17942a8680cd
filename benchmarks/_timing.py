"""GPU timing shared by the benchmarks: CUDA events around each call, warm-up first, median.

Device work is asynchronous, so host clocks would time the launch, not the kernel. Each repeat is
bracketed by its own pair of events; the warm-up keeps compilation (Triton JIT, autotuning,
cuBLAS handles) out of the numbers. Optionally the L2 cache is overwritten before every repeat so
that small inputs are not timed from cache.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds over ``repeats`` timed calls."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buf = _L2_FLUSH.get(device)
    if buf is None:
        # twice the largest L2 of current GPUs (H100 50 MB, H200 60 MB, B200 126 MB)
        buf = _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    buf.zero_()


def cuda_time(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
              flush_l2: bool = False, device: torch.device | str | None = None) -> Timing:
    """Time ``fn()`` on the current (or given) CUDA device; returns the median of ``repeats``.

    Args:
        fn: the work to time; its return value is kept alive until the repeat ends.
        warmup: untimed calls first (compilation, caches, allocator).
        repeats: timed calls, each between its own CUDA events.
        flush_l2: overwrite the L2 cache before each timed call (not counted).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    device = torch.device(device) if device is not None else torch.device("cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if flush_l2:
            _flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), min(times), max(times), repeats)


def host_ms(fn: Callable[[], object], *, calls: int = 20,
            device: torch.device | str | None = None) -> float:
    """Host time of one ``fn()`` in ms: ``calls`` calls launched back to back, the clock stopped
    before the GPU is waited for. While a call's GPU work outlasts its launch work the host stays
    ahead (the launch queue holds over a thousand kernels), so this is the launch work alone: what
    a lone call's wall time adds to its GPU time, and what a model can hide behind other work."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return elapsed / calls * 1e3
