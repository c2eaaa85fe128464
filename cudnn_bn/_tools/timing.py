"""Measurement helpers shared by `compare` and `bench`: repeated runs after warm-up, summarised by
their median (and spread), and the one-line description of a measurement that failed."""

from __future__ import annotations

import gc
import statistics
import time

__all__ = [
    "CLOCKS", "describe_failure", "host_samples", "median_gpu_seconds", "median_host_seconds", "microseconds_per_call",
    "spread_ms",
]


def describe_failure(error: BaseException) -> str:
    """The exception's type and the first line of its message, for a failed row."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


CLOCKS = {
    # wall time: what a user waits, and what other processes on a busy machine inflate
    "wall": time.perf_counter,
    # CPU time of the calling thread (user + system, page faults included): for single-threaded
    # work the same as wall time on an idle machine, and much less disturbed on a busy one
    "cpu": time.thread_time,
}


def median_host_seconds(function, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``function()`` on the host (CPU backends)."""
    samples = host_samples({"f": function}, warmup=warmup, min_repeats=repeats, min_seconds=0.0, max_repeats=repeats)
    return statistics.median(samples["f"]["wall"])


def host_samples(functions: dict, *, warmup: int = 3, min_repeats: int = 15, min_seconds: float = 0.5,
                 max_repeats: int = 500) -> dict:
    """Times in seconds of each of ``functions`` (name -> zero-argument callable), on every clock
    of CLOCKS: ``{name: {"wall": [...], "cpu": [...]}}``.

    Each runs ``warmup`` times first (caches, and the allocator's steady state: glibc adapts its
    mmap threshold to the sizes it has seen freed). Then rounds call every function once, in turn,
    so that background load falls on all of them alike, until there are at least ``min_repeats``
    rounds and ``min_seconds`` of wall time in all, or ``max_repeats`` rounds. The garbage
    collector is paused while timing, as timeit does.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples = {name: {clock: [] for clock in CLOCKS} for name in functions}
    wall, cpu = CLOCKS["wall"], CLOCKS["cpu"]
    collecting = gc.isenabled()
    gc.disable()
    try:
        started = wall()
        rounds = 0
        while rounds < max_repeats and (rounds < min_repeats or wall() - started < min_seconds):
            for name, function in functions.items():
                start_wall, start_cpu = wall(), cpu()
                function()
                stop_cpu, stop_wall = cpu(), wall()
                samples[name]["wall"].append(stop_wall - start_wall)
                samples[name]["cpu"].append(stop_cpu - start_cpu)
            rounds += 1
    finally:
        if collecting:
            gc.enable()
    return samples


def spread_ms(samples) -> dict:
    """min, median and max of samples in seconds, as milliseconds."""
    return {"min_ms": min(samples) * 1e3, "median_ms": statistics.median(samples) * 1e3, "max_ms": max(samples) * 1e3}


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


def microseconds_per_call(function, synchronize, calls: int) -> float:
    """Wall time per call of ``calls`` back-to-back calls of ``function()`` with one ``synchronize()``
    at the end, after one warm-up call: the host's cost per call when the device keeps up."""
    function()
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize()
    return (time.perf_counter() - start) / calls * 1e6
