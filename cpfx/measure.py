"""Measuring helpers shared by the demo and the benchmarks: time and peak memory of a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, in seconds (warm up before calling this)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes allocated by one call of `fn` above what was live before it.

    CPU: the profiler's allocation events, summed in time order (process RSS cannot show this:
    malloc keeps freed pages). CUDA: the caching allocator's peak statistic."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any) -> Any:
    """Run `fn(rank, world, q, *args)` in `world` spawned processes that can
    `init_process_group(..., rank=rank, world_size=world)` over a fresh local port, and return
    the first object any of them puts on the queue `q` (by convention rank 0's results)."""
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # the children inherit it
    q = mp.get_context("spawn").Queue()
    mp.start_processes(fn, args=(world, q, *args), nprocs=world, start_method="spawn")
    return q.get()
