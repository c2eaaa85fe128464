"""Timing helpers shared by `compare` and `bench`: medians of repeated runs."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_host_seconds", "median_gpu_seconds"]


def median_host_seconds(function, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``function()`` on the host (CPU backends)."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def median_gpu_seconds(function, repeats: int = 20, warmup: int = 3) -> float:
    """Median time of ``function()`` between CUDA events on the current stream, after warm-up."""
    import cupy

    for _ in range(warmup):
        function()
    stream = cupy.cuda.get_current_stream()
    samples = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        function()
        stop.record(stream)
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(samples)
