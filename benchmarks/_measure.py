"""How the benchmarks measure a step: wall time, peak memory above the start, matmul FLOPs."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["matmul_flops", "measure_step", "peak_memory", "sync", "timed"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def matmul_flops(step: Callable, device: torch.device) -> float:
    """The FLOPs of one step's matrix multiplies as counted by torch.profiler."""
    with quiet_stderr(), torch.profiler.profile(record_shapes=True, with_flops=True) as prof:
        step()
        sync(device)
    return sum(e.flops for e in prof.events() if e.flops)


def peak_memory(step: Callable, device: torch.device) -> int:
    """Peak memory of one step: bytes above what was allocated before it (CUDA:
    max_memory_allocated; CPU: the allocator events torch.profiler records)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: replay the allocator's alloc/free events that the profiler records, in time order
    # (frees of blocks allocated before the step are not recorded, so they do not count).
    with (
        quiet_stderr(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof,
    ):
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measure_step(step: Callable, device: torch.device) -> tuple[int, float]:
    """(peak memory, matmul FLOPs) of one step, from two separate steps: recording shapes for
    the FLOPs makes the profiler hold on to memory."""
    flops = matmul_flops(step, device)
    return peak_memory(step, device), flops


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
