"""`python -m cudnn_bn bench`: time every mode x operation x dtype x layout.

On a GPU: cuDNN through this package, CUDA-event medians after warm-up, effective bandwidth and
its fraction of a device-to-device copy measured in the same run, PyTorch's batch_norm on the
same shapes where it is importable, host overhead per call, the persistent mode's overflow flag
on ordinary data, the Ex fast path against the plain call, and the wall time of a training step
through a stack of BatchNorm layers with the overflow checks and without, beside PyTorch's.

On a CPU: the NumPy reference (which is also the CPU backend) against PyTorch on the CPU in the
same process, one thread each, where torch is importable. Each row gives min/median/max of
interleaved repeats after warm-up, the ratio of medians to PyTorch, and the peak float64
temporaries of one call in units of an x-sized float64 array (traced by tracemalloc). The
machine's copy bandwidth, measured on a buffer larger than the last-level cache, is reported for
scale only: the reference is not a bandwidth-bound kernel, so no traffic model is applied to it.

A row that fails records the exception's type and first line, and the run goes on. With a JSON
path, the results so far are rewritten after every row (a temporary file, then a rename), so a
crash leaves every row measured before it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

from .. import _api
from .._core.layout import make_layout, physical_shape
from .._core.modes import Mode
from .._core.saved import SavedStats
from .._core.validate import param_dtype_for
from .._cudnn.availability import cudnn_status
from .._cudnn.errors import CudnnOverflowError
from .timing import describe_failure, host_samples, median_gpu_seconds, microseconds_per_call, spread_ms

__all__ = ["run_bench", "GPU_SHAPES", "CPU_SHAPES", "CPU_QUICK_SHAPES", "OPERATIONS", "to_markdown"]

GPU_SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (256, 2048, 7, 7), (4096, 1024)]
CPU_SHAPES = [(64, 64, 32, 32), (32, 256, 14, 14)]  # the shapes the reference is held to against torch CPU
CPU_QUICK_SHAPES = [(8, 16, 28, 28)]
BENCH_DTYPES = (np.float16, np.float32)
OVERFLOW_PROBE_SHAPE = (32, 64, 56, 56)  # float32; NDHWC splits H into D = 2 and H / 2
# the probe's data: label -> offset added to values uniform in [-2, 2] (cuDNN documents that large
# finite values make NCHW's persistent reduction overflow more often)
OVERFLOW_PROBE_DATA = {"uniform [-2, 2]": 0.0, "1000 + uniform [-2, 2]": 1000.0}
OPERATIONS = ("forward_training", "forward_inference", "backward")
TRAINING_STEP_LAYERS = 10
# settings of the training-step section: label -> (BatchNorm keywords, check_overflow() after each step)
TRAINING_STEP_SETTINGS = {
    "defaults": ({}, False),
    "SPATIAL_PERSISTENT, raise (a check after every call)": (
        {"mode": "spatial_persistent", "on_overflow": "raise"}, False),
    "SPATIAL_PERSISTENT, deferred + check_overflow() per step": (
        {"mode": "spatial_persistent", "on_overflow": "deferred"}, True),
    "SPATIAL_PERSISTENT, ignore (no check)": ({"mode": "spatial_persistent", "on_overflow": "ignore"}, False),
}
# bytes a GPU kernel must move, in units of one x-sized tensor: read x, write y; backward reads x and dy, writes dx
TRAFFIC = {"forward_training": 2, "forward_inference": 2, "backward": 3}


def _layouts(shape):
    return [(1, "NCHW")] if len(shape) == 2 else [(1, "NCHW"), (-1, "NHWC")]


class _Recorder:
    """The result being built, rewritten to ``json_path`` after every change when one is given."""

    def __init__(self, json_path=None, result=None):
        self.path = json_path
        self.result = {} if result is None else result
        self.result.setdefault("rows", [])
        self.result.setdefault("failed", [])

    def save(self) -> None:
        if not self.path:
            return
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as handle:
            json.dump(self.result, handle, indent=1)
        os.replace(temporary, self.path)  # atomic: a reader or a crash sees the old or the new file

    def set(self, key, value) -> None:
        self.result[key] = value
        self.save()

    def row(self, row: dict) -> None:
        self.result["rows"].append(row)
        self.save()

    def failed(self, where: dict, error: BaseException) -> None:
        self.result["failed"].append({**where, "error": describe_failure(error)})
        self.save()

    def section(self, key, compute) -> None:
        """result[key] = compute(), or {"error": ...} if it raises."""
        try:
            value = compute()
        except Exception as error:
            value = {"error": describe_failure(error)}
        self.set(key, value)


def _where(shape, layout_name, dtype, mode_label, operation) -> dict:
    return {
        "shape": list(shape), "layout": layout_name, "dtype": np.dtype(dtype).name, "mode": mode_label,
        "operation": operation,
    }


def _host_data(shape, channel_axis, dtype, seed=0) -> dict:
    """x (uniform in [-2, 2]) and dy (standard normal) of the (N, C, ...) shape, stored in the
    axis order of ``channel_axis``."""
    physical = physical_shape(shape, channel_axis)
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-2.0, 2.0, physical).astype(dtype), "dy": rng.standard_normal(physical).astype(dtype)}


def _host_inputs(shape, channel_axis, mode, dtype, data=None) -> dict:
    """_host_data (or ``data``) with gamma = 1, beta = 0 and running statistics for ``mode``."""
    data = data or _host_data(shape, channel_axis, dtype)
    layout = make_layout(data["x"].shape, channel_axis, mode)
    param_dtype = param_dtype_for(dtype)
    return {
        **data,
        "gamma": np.ones(layout.param_shape, param_dtype),
        "beta": np.zeros(layout.param_shape, param_dtype),
        "running_mean": np.zeros(layout.param_shape, param_dtype),
        "running_var": np.ones(layout.param_shape, param_dtype),
    }


def _device_inputs(shape, channel_axis, mode, dtype) -> dict:
    """_host_inputs copied to the current GPU."""
    import cupy

    return {name: cupy.asarray(array) for name, array in _host_inputs(shape, channel_axis, mode, dtype).items()}


def _operations(arrays, mode, channel_axis, on_overflow="ignore"):
    """operation -> zero-argument callable running this package on the given arrays.

    "backward" is missing when the persistent forward overflows on this data: there are no valid
    saved statistics to time it with.
    """
    a = arrays
    operations = {
        "forward_training": lambda: _api.forward_training(
            a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"],
            mode=mode, channel_axis=channel_axis, on_overflow=on_overflow,
        ),
        "forward_inference": lambda: _api.forward_inference(
            a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], mode=mode, channel_axis=channel_axis
        ),
    }
    try:
        _, saved = _api.forward_training(
            a["x"], a["gamma"], a["beta"], mode=mode, channel_axis=channel_axis, on_overflow="raise"
        )
    except CudnnOverflowError:
        return operations
    operations["backward"] = lambda: _api.backward(a["x"], a["dy"], a["gamma"], saved, on_overflow=on_overflow)
    return operations


def _torch_operations(torch, arrays, mode, channel_axis):
    """PyTorch's batch_norm on the same data and device: the spatial modes on an NCHW view of
    channels-last memory (torch's channels_last format), PER_ACTIVATION on the features as they
    lie in memory."""
    functional = torch.nn.functional
    x = torch.from_dlpack(arrays["x"])
    dy = torch.from_dlpack(arrays["dy"])
    if mode is Mode.PER_ACTIVATION:
        x, dy = x.reshape(x.shape[0], -1), dy.reshape(dy.shape[0], -1)
    elif x.dim() > 2 and channel_axis == -1:
        order = (0, x.dim() - 1) + tuple(range(1, x.dim() - 1))
        x, dy = x.permute(order), dy.permute(order)
    features = x.shape[1]
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    param = lambda value: torch.full((features,), value, device=x.device, dtype=param_dtype)  # noqa: E731
    weight, bias = param(1.0).requires_grad_(), param(0.0).requires_grad_()
    running_mean, running_var = param(0.0), param(1.0)
    x_grad = x.detach().requires_grad_()
    y = functional.batch_norm(x_grad, None, None, weight, bias, training=True, eps=1e-5)
    return {
        "forward_training": lambda: functional.batch_norm(
            x, running_mean, running_var, weight.detach(), bias.detach(), training=True, momentum=0.1, eps=1e-5
        ),
        "forward_inference": lambda: functional.batch_norm(
            x, running_mean, running_var, weight.detach(), bias.detach(), training=False, eps=1e-5
        ),
        "backward": lambda: torch.autograd.grad(y, (x_grad, weight, bias), dy, retain_graph=True),
    }


# ---------------------------------------------------------------- CPU (reference) ----

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _last_level_cache_bytes() -> int | None:
    """The largest CPU cache that sysfs lists (Linux), or None."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in (entry for entry in os.listdir(root) if entry.startswith("index")):
            with open(os.path.join(root, index, "size")) as handle:
                text = handle.read().strip()
            multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * multiplier)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def _host_copy(quick: bool) -> dict:
    """Memory copy bandwidth (read + write) on a float32 buffer 4x the last-level cache (at least
    64 MiB), so that it measures memory, not cache."""
    cache = _last_level_cache_bytes()
    nbytes = max(4 * (cache or 0), 64 << 20)
    source = np.ones(nbytes // 4, np.float32)
    target = np.zeros_like(source)  # both written once, so no page is first touched while timing
    samples = host_samples(
        {"copy": lambda: np.copyto(target, source)},
        warmup=1, min_repeats=3 if quick else 10, min_seconds=0.0 if quick else 0.5,
    )
    seconds = statistics.median(samples["copy"][CPU_CLOCK])
    return {"copy_gbps": 2 * nbytes / seconds / 1e9, "copy_buffer_bytes": nbytes, "last_level_cache_bytes": cache}


def _torch_cpu():
    """torch on one thread, or None where it is not importable."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def _result_bytes(result) -> int:
    if isinstance(result, np.ndarray):
        return result.nbytes
    if isinstance(result, SavedStats):
        return _result_bytes((result.mean, result.inv_std))
    if isinstance(result, tuple):
        return sum(_result_bytes(item) for item in result)
    return 0


def peak_float64_temporaries(run, x) -> float:
    """Peak memory NumPy allocates during ``run()``, less what it returns, in units of an
    x-sized float64 array (tracemalloc sees NumPy's data buffers)."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    return (peak - before - _result_bytes(result)) / (x.size * 8)


# The clock of the CPU table (see timing.CLOCKS): the reference and torch both run on the calling
# thread, so its CPU time is their time, undisturbed by other processes on a shared machine.
CPU_CLOCK = "cpu"
# Rounds over the whole table: each adds interleaved repeats to every row after its own warm-up,
# so that a burst of background load spreads over all rows instead of owning a few, and the median
# of a row is taken over samples from every round. A round gives each row at least 0.1 s: a
# millisecond row then gets dozens of samples per round, not three, and its median holds still.
CPU_ROUNDS = 7
CPU_REPEATS_PER_ROUND = dict(warmup=2, min_repeats=3, min_seconds=0.1)
CPU_QUICK_ROUNDS = 1
CPU_QUICK_REPEATS_PER_ROUND = dict(warmup=1, min_repeats=3, min_seconds=0.0)


def _cpu_bench(quick: bool, recorder: _Recorder | None = None, with_torch: bool | None = None) -> dict:
    """The reference on CPU_SHAPES (CPU_QUICK_SHAPES when quick), against torch CPU when
    ``with_torch`` is True, or None and torch is importable."""
    recorder = recorder or _Recorder()
    torch = _torch_cpu() if with_torch is not False else None
    if with_torch and torch is None:
        raise RuntimeError("bench --torch: PyTorch is not importable here")
    peer = f"PyTorch {torch.__version__} on the CPU" if torch is not None else "no PyTorch comparison"
    recorder.set("backend", f"CPU: NumPy reference ({peer})")
    rounds, repeats = (CPU_QUICK_ROUNDS, CPU_QUICK_REPEATS_PER_ROUND) if quick else (CPU_ROUNDS, CPU_REPEATS_PER_ROUND)
    recorder.set("timing", {"rounds": rounds, **repeats, "interleaved": torch is not None, "clock": CPU_CLOCK})
    recorder.set("threads", {
        "reference": 1,
        "torch": torch.get_num_threads() if torch is not None else None,
        "cpus_available": _cpus_available(),
    })
    recorder.section("copy", lambda: _host_copy(quick))
    recorder.set("copy_gbps", recorder.result["copy"].get("copy_gbps"))
    cases = [
        (shape, dtype, channel_axis, layout_name, mode)
        for shape in (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
        for dtype in BENCH_DTYPES
        for channel_axis, layout_name in _layouts(shape)
        for mode in Mode
    ]
    rows, failed, data = {}, set(), {}
    for _ in range(rounds):
        for shape, dtype, channel_axis, layout_name, mode in cases:
            where = {operation: _where(shape, layout_name, dtype, mode.name, operation) for operation in OPERATIONS}
            if all(_key(w) in failed for w in where.values()):
                continue
            try:
                if (shape, dtype, channel_axis) not in data:  # made once: the modes and rounds share x and dy
                    data[shape, dtype, channel_axis] = _host_data(shape, channel_axis, dtype)
                arrays = _host_inputs(shape, channel_axis, mode, dtype, data[shape, dtype, channel_axis])
                ours = _operations(arrays, mode, channel_axis)
                theirs = _torch_operations(torch, arrays, mode, channel_axis) if torch is not None else {}
            except Exception as error:
                for operation in OPERATIONS:
                    _cpu_failed(recorder, rows, failed, where[operation], error)
                continue
            for operation in OPERATIONS:
                if _key(where[operation]) not in failed:
                    _cpu_round(
                        recorder, rows, failed, where[operation], arrays["x"], ours[operation], theirs.get(operation),
                        repeats,
                    )
            del arrays, ours, theirs
    return recorder.result


def _key(where: dict) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in where.values())


def _cpu_failed(recorder: _Recorder, rows: dict, failed: set, where: dict, error: BaseException) -> None:
    failed.add(_key(where))
    row = rows.pop(_key(where), None)
    if row is not None:
        recorder.result["rows"].remove(row)
    recorder.failed(where, error)


def _cpu_round(recorder: _Recorder, rows: dict, failed: set, where: dict, x, ours, theirs, repeats: dict) -> None:
    """Add one round of samples to a row (made, with its memory measurement, on the first)."""
    row = rows.get(_key(where))
    functions = {"reference": ours}
    if theirs is not None and not (row and "torch_error" in row):
        try:
            theirs()
            functions["torch"] = theirs
        except Exception as error:  # e.g. a dtype torch does not support on the CPU
            if row is None:
                row = {}
            row["torch_error"] = describe_failure(error)
    try:
        samples = host_samples(functions, **repeats)
        if _key(where) not in rows:
            temporaries = peak_float64_temporaries(ours, x)
    except Exception as error:
        _cpu_failed(recorder, rows, failed, where, error)
        return
    if _key(where) not in rows:
        row = {**where, **(row or {}), "peak_float64_temporaries_x": temporaries, "samples_ms": {}}
        rows[_key(where)] = row
        recorder.result["rows"].append(row)
    for name, clocks in samples.items():
        for clock, seconds in clocks.items():
            row["samples_ms"].setdefault(name, {}).setdefault(clock, []).extend(value * 1e3 for value in seconds)
    spread = lambda name, clock: spread_ms([value / 1e3 for value in row["samples_ms"][name][clock]])  # noqa: E731
    row.update(repeats=len(row["samples_ms"]["reference"][CPU_CLOCK]), **spread("reference", CPU_CLOCK))
    row["wall_median_ms"] = spread("reference", "wall")["median_ms"]
    if "torch" in row["samples_ms"]:
        torch_spread = spread("torch", CPU_CLOCK)
        row.update(
            torch_ms=torch_spread["median_ms"], torch_min_ms=torch_spread["min_ms"], torch_max_ms=torch_spread["max_ms"]
        )
        row["torch_wall_median_ms"] = spread("torch", "wall")["median_ms"]
        row["time_vs_torch"] = row["median_ms"] / row["torch_ms"]
    recorder.save()


# ---------------------------------------------------------------- GPU (cuDNN) ----

def _gpu_row(shape, layout_name, dtype, mode_label, operation, seconds, nbytes, copy_gbps):
    gbps = TRAFFIC[operation] * nbytes / seconds / 1e9
    return {
        **_where(shape, layout_name, dtype, mode_label, operation),
        "median_ms": seconds * 1e3,
        "bytes": TRAFFIC[operation] * nbytes,
        "gbps": gbps,
        "fraction_of_copy": gbps / copy_gbps if copy_gbps else None,
    }


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _median_torch_seconds(torch, function, repeats, warmup=3):
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3)
    return float(np.median(samples))


def _host_overhead(torch, calls=1000) -> dict:
    import cupy

    arrays = _device_inputs((8, 16, 4, 4), 1, Mode.SPATIAL, np.float32)
    ours = _operations(arrays, Mode.SPATIAL, 1)["forward_training"]
    result = {"shape": [8, 16, 4, 4], "calls": calls,
              "cudnn_bn_us_per_call": microseconds_per_call(ours, cupy.cuda.Device().synchronize, calls)}
    if torch is not None:
        theirs = _torch_operations(torch, arrays, Mode.SPATIAL, 1)["forward_training"]
        result["torch_us_per_call"] = microseconds_per_call(theirs, torch.cuda.synchronize, calls)
    return result


def _overflow_probe() -> list[dict]:
    """Does SPATIAL_PERSISTENT raise the overflow flag, and does its output then equal SPATIAL's?
    NCHW, NHWC and NDHWC (the layouts "auto" runs persistent unchecked: docs/modes.md), float32,
    on each of OVERFLOW_PROBE_DATA."""
    import cupy

    from .._core.tolerances import to_numpy

    n, c, h, w = OVERFLOW_PROBE_SHAPE
    layouts = [(OVERFLOW_PROBE_SHAPE, 1, "NCHW"), (OVERFLOW_PROBE_SHAPE, -1, "NHWC"),
               ((n, c, 2, max(h // 2, 1), w), -1, "NDHWC")]
    results = []
    for shape, channel_axis, layout_name in layouts:
        arrays = _device_inputs(shape, channel_axis, Mode.SPATIAL, np.float32)
        for data, offset in OVERFLOW_PROBE_DATA.items():
            x = arrays["x"] + np.float32(offset) if offset else arrays["x"]
            args = (x, arrays["gamma"], arrays["beta"])
            try:
                _api.forward_training(*args, mode="spatial_persistent", channel_axis=channel_axis, on_overflow="raise")
                flagged = False
            except CudnnOverflowError:
                flagged = True
            persistent, _ = _api.forward_training(*args, mode="spatial_persistent", channel_axis=channel_axis,
                                                  on_overflow="ignore")
            spatial, _ = _api.forward_training(*args, mode="spatial", channel_axis=channel_axis)
            difference = float(np.max(np.abs(to_numpy(persistent) - to_numpy(spatial))))
            results.append({
                "layout": layout_name,
                "shape": list(shape),
                "data": data,
                "overflow_flag_raised": flagged,
                "persistent_output_finite": bool(np.all(np.isfinite(to_numpy(persistent)))),
                "max_abs_difference_vs_spatial": difference,
            })
        del arrays
        cupy.get_default_memory_pool().free_all_blocks()
    return results


def _ex_vs_plain(repeats) -> list[dict]:
    """The Ex fast path (float16 NHWC, C % 4 == 0) against the plain persistent call."""
    from .._cudnn import ops as cudnn_ops

    rows = []
    for shape in [s for s in GPU_SHAPES if len(s) == 4 and s[1] % 4 == 0]:
        arrays = _device_inputs(shape, -1, Mode.SPATIAL_PERSISTENT, np.float16)
        timings = {}
        for label, enabled in (("ex", True), ("plain", False)):
            previous = cudnn_ops.set_ex_path_enabled(enabled)
            try:
                operations = _operations(arrays, Mode.SPATIAL_PERSISTENT, -1)
                timings[label] = {
                    op: median_gpu_seconds(operations[op], repeats) * 1e3
                    for op in ("forward_training", "backward")
                    if op in operations
                }
            finally:
                cudnn_ops.set_ex_path_enabled(previous)
        for op in set(timings["ex"]) & set(timings["plain"]):
            rows.append({"shape": list(shape), "operation": op, "ex_ms": timings["ex"][op],
                         "plain_ms": timings["plain"][op], "plain_over_ex": timings["plain"][op] / timings["ex"][op]})
    return rows


def _fused_vs_unfused(repeats) -> list[dict]:
    """relu(BN(x) + residual) and its four gradients in one fused call each, against the unfused
    sequence (batch norm, add, ReLU; the ReLU mask, then the batch-norm backward), forward +
    backward per step, on float16 channels-last data (cuDNN's fused Ex path where it applies)."""
    return [_fused_vs_unfused_row(shape, repeats) for shape in GPU_SHAPES if len(shape) == 4 and shape[1] % 4 == 0]


def _fused_vs_unfused_row(shape, repeats) -> dict:
    """One shape of :func:`_fused_vs_unfused`: its arrays are freed when it returns, before the next
    shape's are made."""
    import cupy

    from .. import fused

    arrays = _device_inputs(shape, -1, Mode.SPATIAL_PERSISTENT, np.float16)
    x, gamma, beta, dy = arrays["x"], arrays["gamma"], arrays["beta"], arrays["dy"]
    residual = cupy.ascontiguousarray(dy[::-1])
    settings = dict(mode="spatial_persistent", channel_axis=-1, on_overflow="fallback")

    def fused_step():
        y, saved = fused.forward_training(x, gamma, beta, residual=residual, **settings)
        fused.backward(x, y, dy, gamma, saved)

    def unfused_step():
        u, saved = _api.forward_training(x, gamma, beta, **settings)
        y = cupy.maximum(u + residual, 0)
        _api.backward(x, dy * (y > 0), gamma, saved)  # the ReLU mask: one more pass

    _, saved = fused.forward_training(x, gamma, beta, residual=residual, **settings)
    fused_ms = median_gpu_seconds(fused_step, repeats) * 1e3
    unfused_ms = median_gpu_seconds(unfused_step, repeats) * 1e3
    return {"shape": list(shape), "path": saved.path, "fused_ms": fused_ms, "unfused_ms": unfused_ms,
            "unfused_over_fused": unfused_ms / fused_ms}


def _backward_inference(torch, repeats) -> list[dict]:
    """The backward through fixed statistics (``backward_inference``: one elementwise pass and the
    channel sums, in CuPy kernels; cuDNN has no such call) against cuDNN's training backward on the
    same data, and PyTorch's eval-mode batch_norm backward (autograd to x, weight and bias) in the
    same run, on the first 4-D shape of GPU_SHAPES, NCHW float32 and NHWC float16."""
    shape = next(s for s in GPU_SHAPES if len(s) == 4)
    rows = []
    for channel_axis, layout_name, dtype in ((1, "NCHW", np.float32), (-1, "NHWC", np.float16)):
        a = _device_inputs(shape, channel_axis, Mode.SPATIAL, dtype)
        row = {"shape": list(shape), "layout": layout_name, "dtype": np.dtype(dtype).name}
        try:
            _, saved = _api.forward_training(a["x"], a["gamma"], a["beta"], channel_axis=channel_axis)
            row["backward_inference_ms"] = median_gpu_seconds(lambda: _api.backward_inference(
                a["x"], a["dy"], a["gamma"], a["running_mean"], a["running_var"], channel_axis=channel_axis,
            ), repeats) * 1e3
            row["backward_ms"] = median_gpu_seconds(
                lambda: _api.backward(a["x"], a["dy"], a["gamma"], saved), repeats) * 1e3
        except Exception as error:
            row["error"] = describe_failure(error)
        if torch is not None and "error" not in row:
            try:
                theirs = _torch_eval_backward(torch, a, channel_axis)
                row["torch_ms"] = _median_torch_seconds(torch, theirs, repeats) * 1e3
                row["time_vs_torch"] = row["backward_inference_ms"] / row["torch_ms"]
            except Exception as error:
                row["torch_error"] = describe_failure(error)
        rows.append(row)
    return rows


def _torch_eval_backward(torch, arrays, channel_axis):
    """The gradients of PyTorch's eval-mode batch_norm to x, weight and bias, on its view of the
    same memory (channels_last for NHWC)."""
    x, dy = torch.from_dlpack(arrays["x"]), torch.from_dlpack(arrays["dy"])
    if channel_axis == -1:
        x, dy = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    x = x.detach().requires_grad_()
    as_tensor = lambda name: torch.from_dlpack(arrays[name])  # noqa: E731
    weight = as_tensor("gamma").detach().clone().requires_grad_()
    bias = as_tensor("beta").detach().clone().requires_grad_()
    y = torch.nn.functional.batch_norm(x, as_tensor("running_mean"), as_tensor("running_var"), weight, bias,
                                       training=False, eps=1e-5)
    return lambda: torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)


def _training_steps(torch, quick: bool) -> list[dict]:
    """Wall time per training step (forward through TRAINING_STEP_LAYERS BatchNorm layers, then
    backward through them) on the first 4-D shape of GPU_SHAPES, NCHW float32 and NHWC float16,
    with each of TRAINING_STEP_SETTINGS, and PyTorch's functional batch_norm in the same run. Wall
    time with one synchronize per block of steps: what the host's waits for the device cost,
    which CUDA events between kernels would not show."""
    import cupy

    from .._api import check_overflow
    from ..layer import BatchNorm

    shape = next(s for s in GPU_SHAPES if len(s) == 4)
    steps, blocks = (2, 1) if quick else (20, 3)
    synchronize = cupy.cuda.Device().synchronize
    rows = []
    for channel_axis, layout_name, dtype in ((1, "NCHW", np.float32), (-1, "NHWC", np.float16)):
        data = _device_inputs(shape, channel_axis, Mode.SPATIAL, dtype)
        where = {"shape": list(shape), "layout": layout_name, "dtype": np.dtype(dtype).name,
                 "layers": TRAINING_STEP_LAYERS}
        torch_ms = None
        if torch is not None:
            try:
                torch_step = _torch_training_step(torch, data, channel_axis)
                torch_ms = _step_ms(torch_step, torch.cuda.synchronize, steps, blocks)
            except Exception as error:
                rows.append({**where, "settings": "PyTorch", "error": describe_failure(error)})
        for label, (options, check) in TRAINING_STEP_SETTINGS.items():
            layers = [BatchNorm(shape[1], channel_axis=channel_axis, dtype=dtype, xp=cupy, **options)
                      for _ in range(TRAINING_STEP_LAYERS)]

            def step(layers=layers, check=check, data=data):
                out = data["x"]
                for layer in layers:
                    out = layer(out)
                grad = data["dy"]
                for layer in reversed(layers):
                    grad = layer.backward(grad)
                if check:
                    check_overflow()

            try:
                ms = _step_ms(step, synchronize, steps, blocks)
            except Exception as error:
                rows.append({**where, "settings": label, "error": describe_failure(error)})
                continue
            row = {**where, "settings": label, "mode": str(layers[0]._kept.saved.mode), "step_ms": ms,
                   "torch_step_ms": torch_ms}
            if torch_ms:
                row["time_vs_torch"] = ms / torch_ms
            rows.append(row)
        del data
    return rows


def _step_ms(step, synchronize, steps: int, blocks: int) -> float:
    """Median over ``blocks`` of the wall time per step of ``steps`` steps and one synchronize."""
    return statistics.median(microseconds_per_call(step, synchronize, steps) / 1e3 for _ in range(blocks))


def _torch_training_step(torch, data, channel_axis):
    """One training step of TRAINING_STEP_LAYERS functional batch norms on torch's view of the
    same memory (channels_last for NHWC): forward, then the gradients of x and every weight and bias."""
    functional = torch.nn.functional
    x, dy = torch.from_dlpack(data["x"]), torch.from_dlpack(data["dy"])
    if channel_axis == -1:
        x, dy = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    x = x.detach().requires_grad_()
    channels = x.shape[1]
    parameters = []
    for _ in range(TRAINING_STEP_LAYERS):
        weight = torch.ones(channels, device=x.device, requires_grad=True)
        bias = torch.zeros(channels, device=x.device, requires_grad=True)
        parameters.append((weight, bias, torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)))
    inputs = [x] + [tensor for weight, bias, _, _ in parameters for tensor in (weight, bias)]

    def step():
        out = x
        for weight, bias, running_mean, running_var in parameters:
            out = functional.batch_norm(out, running_mean, running_var, weight, bias, training=True, momentum=0.1,
                                        eps=1e-5)
        torch.autograd.grad(out, inputs, dy)

    return step


def _device_copy_gbps(elements: int, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write) of a float32 buffer, the peak we compare to."""
    import cupy

    source, target = cupy.ones(elements, cupy.float32), cupy.empty(elements, cupy.float32)
    return 2 * source.nbytes / median_gpu_seconds(lambda: cupy.copyto(target, source), repeats) / 1e9


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _gpu_bench(quick: bool, recorder: _Recorder | None = None, deadline: float | None = None) -> dict:
    """The GPU table and sections. Past ``deadline`` (a time.monotonic() value) no further row or
    section starts: they are listed under "not_timed" instead, and the result stays a valid one."""
    import cupy

    recorder = recorder or _Recorder()
    recorder.set("backend", "GPU: cuDNN through cudnn_bn")
    recorder.set("overflowed", [])
    recorder.set("not_timed", [])
    torch = _torch_cuda()
    shapes = list(dict.fromkeys(GPU_SHAPES[:1] + GPU_SHAPES[-1:])) if quick else GPU_SHAPES  # first and last, once
    repeats = 5 if quick else 25

    def section(key, compute):
        if _past(deadline):
            recorder.result["not_timed"].append({"section": key})
            recorder.save()
        else:
            recorder.section(key, compute)

    section("copy_gbps", lambda: _device_copy_gbps(max(int(np.prod(s)) for s in shapes), repeats))
    copy_gbps = recorder.result.get("copy_gbps") if isinstance(recorder.result.get("copy_gbps"), float) else None
    for shape in shapes:
        for dtype in BENCH_DTYPES:
            for channel_axis, layout_name in _layouts(shape):
                for mode in Mode:
                    checks = [("ignore", mode.name)]
                    if mode is Mode.SPATIAL_PERSISTENT:
                        checks.append(("raise", f"{mode.name} (overflow checked)"))
                    if _past(deadline):
                        recorder.result["not_timed"] += [
                            _where(shape, layout_name, dtype, label, op) for _, label in checks for op in OPERATIONS
                        ]
                        recorder.save()
                        continue
                    try:
                        arrays = _device_inputs(shape, channel_axis, mode, dtype)
                        peer = _torch_operations(torch, arrays, mode, channel_axis) if torch is not None else None
                    except Exception as error:
                        for _, label in checks:
                            for operation in OPERATIONS:
                                recorder.failed(_where(shape, layout_name, dtype, label, operation), error)
                        continue
                    for on_overflow, label in checks:
                        _gpu_rows(
                            recorder, arrays, peer, torch, shape, layout_name, dtype, mode, channel_axis, on_overflow,
                            label, repeats, copy_gbps,
                        )
                    del arrays, peer
                    cupy.get_default_memory_pool().free_all_blocks()
    section("host_overhead", lambda: _host_overhead(torch))
    section("overflow_probe", _overflow_probe)
    section("ex_vs_plain", lambda: _ex_vs_plain(repeats))
    section("fused_vs_unfused", lambda: _fused_vs_unfused(repeats))
    section("training_step", lambda: _training_steps(torch, quick))
    section("backward_inference", lambda: _backward_inference(torch, repeats))
    return recorder.result


def _gpu_rows(recorder, arrays, peer, torch, shape, layout_name, dtype, mode, channel_axis, on_overflow, label, repeats,
              copy_gbps) -> None:
    """Time the three operations of one combination; overflowed and failed ones are recorded."""
    try:
        operations = _operations(arrays, mode, channel_axis, on_overflow)
    except Exception as error:
        for operation in OPERATIONS:
            recorder.failed(_where(shape, layout_name, dtype, label, operation), error)
        return
    for operation in OPERATIONS:
        where = _where(shape, layout_name, dtype, label, operation)
        try:
            seconds = median_gpu_seconds(operations[operation], repeats)
        except (KeyError, CudnnOverflowError):  # KeyError: no valid saved statistics
            recorder.result["overflowed"].append(where)
            recorder.save()
            continue
        except Exception as error:
            recorder.failed(where, error)
            continue
        row = _gpu_row(shape, layout_name, dtype, label, operation, seconds, arrays["x"].nbytes, copy_gbps)
        if peer is not None:
            try:
                row["torch_ms"] = _median_torch_seconds(torch, peer[operation], repeats) * 1e3
                row["time_vs_torch"] = row["median_ms"] / row["torch_ms"]
            except Exception as error:
                row["torch_error"] = describe_failure(error)
        recorder.row(row)


# ---------------------------------------------------------------- output ----

def _torch_version() -> str | None:
    """torch's installed version, read from its metadata (importing torch takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _environment(on_gpu: bool) -> dict:
    from .info import collect_info

    info = collect_info()
    cpu = _cpu_model()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cudnn": info.get("cudnn"),
        "cupy": info.get("cupy"),
        "cuda_driver": info.get("cuda_driver"),
        "device": info.get("gpu") if on_gpu else f"CPU: {cpu}",
        "cpu": cpu,
        "cpus_available": _cpus_available(),
        "torch": _torch_version(),
    }


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def _row_text(row: dict) -> str:
    """Which row: its shape, layout, dtype, mode and operation, as the lists under the tables name it."""
    return f"{_shape_text(row['shape'])} {row['layout']} {row['dtype']} {row['mode']} {row['operation']}"


def _gpu_table(result: dict) -> list[str]:
    lines = [
        "| shape (N, C, ...) | layout | dtype | mode | operation | median ms | GB/s | of copy | torch ms "
        "| time / torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        torch_ms = f"{row['torch_ms']:.3f}" if "torch_ms" in row else "-"
        ratio = f"{row['time_vs_torch']:.2f}" if "time_vs_torch" in row else "-"
        fraction = f"{row['fraction_of_copy']:.0%}" if row.get("fraction_of_copy") is not None else "-"
        lines.append(
            f"| {_shape_text(row['shape'])} | {row['layout']} | {row['dtype']} | {row['mode']} | {row['operation']} "
            f"| {row['median_ms']:.3f} | {row['gbps']:.1f} | {fraction} | {torch_ms} | {ratio} |"
        )
    return lines


def _cpu_table(result: dict) -> list[str]:
    lines = [
        "| shape (N, C, ...) | layout | dtype | mode | operation | min ms | median ms | max ms | torch median ms "
        "| time / torch | float64 temporaries (x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        torch_ms = f"{row['torch_ms']:.3f}" if "torch_ms" in row else ("failed" if "torch_error" in row else "-")
        ratio = f"{row['time_vs_torch']:.2f}" if "time_vs_torch" in row else "-"
        lines.append(
            f"| {_shape_text(row['shape'])} | {row['layout']} | {row['dtype']} | {row['mode']} | {row['operation']} "
            f"| {row['min_ms']:.3f} | {row['median_ms']:.3f} | {row['max_ms']:.3f} | {torch_ms} | {ratio} "
            f"| {row['peak_float64_temporaries_x']:.2f} |"
        )
    return lines


def _same_code_spread(rows) -> float | None:
    """Largest relative difference of median time between SPATIAL and SPATIAL_PERSISTENT rows,
    which run the same reference code: a check that the rows time the code, not the allocator."""
    def same_call(row) -> tuple:
        return tuple(row["shape"]), row["layout"], row["dtype"], row["operation"]

    spatial = {same_call(r): r["median_ms"] for r in rows if r["mode"] == "SPATIAL"}
    differences = [
        abs(r["median_ms"] / spatial[same_call(r)] - 1.0)
        for r in rows
        if r["mode"] == "SPATIAL_PERSISTENT" and same_call(r) in spatial
    ]
    return max(differences) if differences else None


def _wall_over_cpu(rows) -> float | None:
    """Median over rows of wall-clock median / CPU-time median: how busy the machine was."""
    ratios = [
        row["wall_median_ms"] / row["median_ms"] for row in rows if row.get("wall_median_ms") and row.get("median_ms")
    ]
    return statistics.median(ratios) if ratios else None


def _cpu_header(result: dict, env: dict) -> list[str]:
    threads = result.get("threads", {})
    copy = result.get("copy", {})
    timing = result.get("timing", {})
    lines = [
        f"Date {env['date']}; {env['device']}, {env.get('cpus_available')} CPUs available; Python {env['python']}, "
        f"NumPy {env['numpy']}, PyTorch {env['torch']}.",
        f"Threads: the reference 1 (NumPy ufuncs), PyTorch {threads.get('torch') or '-'}.",
    ]
    if "copy_gbps" in copy:
        cache = copy.get("last_level_cache_bytes")
        cache_text = f", last-level cache {cache >> 20} MiB" if cache else ""
        lines.append(
            f"Memory copy bandwidth {copy['copy_gbps']:.1f} GB/s "
            f"(read + write, {copy['copy_buffer_bytes'] >> 20} MiB buffer{cache_text}), "
            "for scale only: no traffic model is applied to the reference."
        )
    elif "error" in copy:
        lines.append(f"Copy bandwidth not measured: {copy['error']}")
    lines.append(
        f"Each row: {timing.get('rounds')} rounds over the whole table, each with {timing.get('warmup')} warm-up calls "
        f"and {timing.get('min_repeats')} or more timed repeats"
        + (f" (as many as fill {timing['min_seconds']:g} s)" if timing.get("min_seconds") else "")
        + (" interleaved with PyTorch's" if timing.get("interleaved") else "")
        + "; min / median / max over all its repeats; time / torch is the ratio of medians; float64 temporaries is "
        "the peak that NumPy allocates during one call, less its results, in units of an x-sized float64 array."
    )
    if timing.get("clock") == "cpu":
        contention = _wall_over_cpu(result["rows"])
        lines.append(
            "Times are CPU time of the calling thread, where both the reference and PyTorch (one thread) run; "
            "wall-clock medians are in the JSON"
            + (f", {contention:.2f}x the CPU time here (1.00 on an idle machine)." if contention else ".")
        )
    spread = _same_code_spread(result["rows"])
    if spread is not None:
        lines.append(
            "SPATIAL and SPATIAL_PERSISTENT run the same reference code; "
            f"their medians differ by at most {spread:.0%} here."
        )
    return lines


def to_markdown(result: dict) -> str:
    env = result["environment"]
    on_cpu = result["backend"].startswith("CPU")
    if on_cpu:
        header = _cpu_header(result, env)
    else:
        copy = result.get("copy_gbps")
        copy_text = f"{copy:.1f} GB/s" if isinstance(copy, float) else f"not measured ({copy})"
        header = [
            f"Date {env['date']}; device {env['device']}; driver {env['cuda_driver']}; cuDNN {env['cudnn']}; "
            f"CuPy {env['cupy']}; PyTorch {env['torch']}. Copy bandwidth in this run: {copy_text}."
        ]
    lines = [f"# cudnn_bn benchmark: {result['backend']}", "", *header, ""]
    lines += _cpu_table(result) if on_cpu else _gpu_table(result)
    if result.get("failed"):
        lines += ["", "Failed (the run went on):", ""]
        lines += [f"- {_row_text(f)}: {f['error']}" for f in result["failed"]]
    torch_errors = [row for row in result["rows"] if "torch_error" in row]
    if torch_errors:
        lines += ["", "PyTorch failed on: " + "; ".join(f"{_row_text(r)} ({r['torch_error']})" for r in torch_errors)]
    if result.get("overflowed"):
        lines += ["", "Not timed because SPATIAL_PERSISTENT overflowed on the benchmark data: "
                  + "; ".join(_row_text(o) for o in result["overflowed"])]
    if result.get("not_timed"):
        first = ", ".join(f.get("section") or _row_text(f) for f in result["not_timed"][:3])
        lines += ["", "Not timed, because the run's deadline had passed: "
                  f"{len(result['not_timed'])} rows and sections; first {first}."]
    lines += _gpu_sections(result)
    return "\n".join(lines) + "\n"


def _gpu_sections(result: dict) -> list[str]:
    lines = []
    for key in ("host_overhead", "overflow_probe", "ex_vs_plain", "fused_vs_unfused", "training_step",
                "backward_inference"):
        value = result.get(key)
        if isinstance(value, dict) and "error" in value:
            lines += ["", f"{key} failed: {value['error']}"]
    overhead = result.get("host_overhead")
    if isinstance(overhead, dict) and "error" not in overhead:
        torch_text = f", PyTorch {overhead['torch_us_per_call']:.1f} us" if "torch_us_per_call" in overhead else ""
        lines += ["", f"Host overhead per call on {overhead['shape']} ({overhead['calls']} calls, one synchronisation)"
                  f": cudnn_bn {overhead['cudnn_bn_us_per_call']:.1f} us{torch_text}"]
    probe = result.get("overflow_probe")
    if isinstance(probe, list):
        lines += ["", "| overflow probe, float32 | data | flag raised | output finite | max abs diff vs SPATIAL |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_shape_text(p['shape'])} {p['layout']} | {p['data']} | {p['overflow_flag_raised']} | "
                  f"{p['persistent_output_finite']} | {p['max_abs_difference_vs_spatial']:.3e} |" for p in probe]
    ex_rows = result.get("ex_vs_plain")
    if isinstance(ex_rows, list) and ex_rows:
        lines += ["", "| Ex path, float16 NHWC | operation | Ex ms | plain ms | plain / Ex |", "|---|---|---|---|---|"]
        lines += [
            f"| {_shape_text(r['shape'])} | {r['operation']} | {r['ex_ms']:.3f} | {r['plain_ms']:.3f} "
            f"| {r['plain_over_ex']:.2f} |"
            for r in ex_rows
        ]
    fused_rows = result.get("fused_vs_unfused")
    if isinstance(fused_rows, list) and fused_rows:
        lines += ["", "| relu(BN(x) + z), float16 NHWC, fwd + bwd | fused path | fused ms | unfused ms "
                  "| unfused / fused |", "|---|---|---|---|---|"]
        lines += [
            f"| {_shape_text(r['shape'])} | {r['path']} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} "
            f"| {r['unfused_over_fused']:.2f} |"
            for r in fused_rows
        ]
    step_rows = result.get("training_step")
    if isinstance(step_rows, list) and step_rows:
        lines += _rows_beside_torch(
            f"| training step, {step_rows[0]['layers']} BatchNorm layers, fwd + bwd | dtype | settings | mode "
            "| ms per step | PyTorch ms | time / PyTorch |",
            step_rows, ("dtype", "settings"), lambda r: f"{r['mode']} | {r['step_ms']:.3f}", "torch_step_ms",
        )
    frozen_rows = result.get("backward_inference")
    if isinstance(frozen_rows, list) and frozen_rows:
        lines += _rows_beside_torch(
            "| backward through fixed statistics | dtype | backward_inference ms | training backward ms "
            "| PyTorch eval backward ms | time / PyTorch |",
            frozen_rows, ("dtype",), lambda r: f"{r['backward_inference_ms']:.3f} | {r['backward_ms']:.3f}", "torch_ms",
        )
    return lines


def _rows_beside_torch(header: str, rows: list, labels: tuple, ours, torch_key: str) -> list[str]:
    """A table of rows timed beside PyTorch: shape and layout, the ``labels`` cells, ``ours(row)``
    (two cells), then PyTorch's milliseconds and ours over them; a row that failed says so."""
    columns = header.count("|") - 1
    lines = ["", header, "|---" * columns + "|"]
    after_failed = " |" * (columns - len(labels) - 2)  # the cells after the one that says it failed
    for r in rows:
        where = f"| {_shape_text(r['shape'])} {r['layout']} | " + " | ".join(str(r[label]) for label in labels) + " |"
        if "error" in r:
            lines.append(f"{where} failed: {r['error']} |{after_failed}")
        else:
            lines.append(f"{where} {ours(r)} | {_torch_cells(r, torch_key)}")
    return lines


def _torch_cells(row: dict, torch_key: str) -> str:
    """The last two cells of a row timed beside PyTorch: its milliseconds, and ours over them."""
    if "torch_error" in row:
        return f"failed: {row['torch_error']} | - |"
    torch_ms = f"{row[torch_key]:.3f}" if row.get(torch_key) else "-"
    ratio = f"{row['time_vs_torch']:.2f}" if "time_vs_torch" in row else "-"
    return f"{torch_ms} | {ratio} |"


def run_bench(json_path=None, markdown_path=None, quick: bool = False, with_torch: bool | None = None,
              deadline: float | None = None) -> int:
    """Run the benchmark on the backend that is present (cuDNN, else the NumPy reference);
    returns the exit status: 1 when any row failed (they are listed in the output), else 0.

    ``with_torch`` (CPU only): None compares with torch CPU where it is importable, False never
    imports it, True requires it. ``deadline`` (GPU only, a time.monotonic() value): no row or
    section starts after it; they are listed as not timed, which is not a failure.
    """
    usable, _ = cudnn_status()
    recorder = _Recorder(json_path, {"backend": "GPU" if usable else "CPU", "environment": _environment(usable)})
    recorder.save()
    if usable:
        _gpu_bench(quick, recorder, deadline)
    else:
        _cpu_bench(quick, recorder, with_torch=with_torch)
    markdown = to_markdown(recorder.result)
    if markdown_path:
        with open(markdown_path, "w") as handle:
            handle.write(markdown)
    print(markdown)
    failed = recorder.result["failed"]
    if failed:
        print(f"bench: {len(failed)} row(s) failed; see 'Failed' above", file=sys.stderr)
        return 1
    return 0
