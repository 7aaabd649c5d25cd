"""Timing helpers the benchmarks share: calls timed within a budget, percentiles, the machine's CPU and GPU names."""

from __future__ import annotations

import os
import platform
import time


def timed(fn, budget_s: float, min_iters: int = 10, max_iters: int = 300) -> list[float]:
    """Call ``fn`` (after 3 warm-up calls) until the budget is spent; returns milliseconds per call."""
    time.sleep(0.1)  # let the previous runner's thread pool stop spinning before this one starts
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def gpu_name() -> str:
    # lazy: bench.loadtest imports this module, and its `--help` stays free of torch
    import torch

    return torch.cuda.get_device_name()
