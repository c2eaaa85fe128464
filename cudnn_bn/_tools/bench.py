"""`python -m cudnn_bn bench`: time every mode x operation x dtype x layout.

On a GPU: cuDNN through this package, CUDA-event medians after warm-up, effective bandwidth and
its fraction of a device-to-device copy measured in the same run, PyTorch's batch_norm on the
same shapes where it is importable, host overhead per call, the persistent mode's overflow flag
on ordinary data, and the Ex fast path against the plain call. On a CPU: the NumPy reference on
smaller shapes, labelled as such.
"""

from __future__ import annotations

import datetime
import json
import platform
import time

import numpy as np

from .. import _api
from .._cudnn.availability import cudnn_status
from .._cudnn.errors import CudnnOverflowError
from .._core.layout import make_layout, physical_shape
from .._core.modes import Mode
from .timing import median_gpu_seconds, median_host_seconds
from .._core.validate import param_dtype_for

__all__ = ["run_bench", "GPU_SHAPES", "CPU_SHAPES"]

GPU_SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (256, 2048, 7, 7), (4096, 1024)]
CPU_SHAPES = [(8, 16, 28, 28), (16, 64, 7, 7), (512, 256)]
OVERFLOW_PROBE_SHAPE = (32, 64, 56, 56)  # ordinary data: float32, uniform in [-2, 2]
OPERATIONS = ("forward_training", "forward_inference", "backward")
# bytes that must move, in units of one x-sized tensor: read x, write y; backward reads x and dy, writes dx
TRAFFIC = {"forward_training": 2, "forward_inference": 2, "backward": 3}


def _layouts(shape):
    return [(1, "NCHW")] if len(shape) == 2 else [(1, "NCHW"), (-1, "NHWC")]


def _host_inputs(shape, channel_axis, mode, dtype, seed=0):
    physical = physical_shape(shape, channel_axis)
    layout = make_layout(physical, channel_axis, mode)
    rng = np.random.default_rng(seed)
    param_dtype = param_dtype_for(dtype)
    return {
        "x": rng.uniform(-2.0, 2.0, physical).astype(dtype),
        "dy": rng.standard_normal(physical).astype(dtype),
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
            a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], mode=mode, channel_axis=channel_axis, on_overflow=on_overflow
        ),
        "forward_inference": lambda: _api.forward_inference(
            a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], mode=mode, channel_axis=channel_axis
        ),
    }
    try:
        _, saved = _api.forward_training(a["x"], a["gamma"], a["beta"], mode=mode, channel_axis=channel_axis, on_overflow="raise")
    except CudnnOverflowError:
        return operations
    operations["backward"] = lambda: _api.backward(a["x"], a["dy"], a["gamma"], saved, on_overflow=on_overflow)
    return operations


def _row(shape, layout_name, dtype, mode_label, operation, seconds, nbytes, copy_gbps):
    gbps = TRAFFIC[operation] * nbytes / seconds / 1e9
    return {
        "shape": list(shape),
        "layout": layout_name,
        "dtype": np.dtype(dtype).name,
        "mode": mode_label,
        "operation": operation,
        "median_ms": seconds * 1e3,
        "bytes": TRAFFIC[operation] * nbytes,
        "gbps": gbps,
        "fraction_of_copy": gbps / copy_gbps if copy_gbps else None,
    }


# ---------------------------------------------------------------- CPU (reference) ----

def _cpu_bench(quick: bool) -> dict:
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    repeats = 3 if quick else 7
    big = np.ones(int(np.prod(shapes[0])), np.float32)
    out = np.empty_like(big)
    copy_gbps = 2 * big.nbytes / median_host_seconds(lambda: np.copyto(out, big), repeats) / 1e9
    rows = []
    for shape in shapes:
        for dtype in (np.float16, np.float32):
            for channel_axis, layout_name in _layouts(shape):
                for mode in Mode:
                    arrays = _host_inputs(shape, channel_axis, mode, dtype)
                    for operation, run in _operations(arrays, mode, channel_axis).items():
                        seconds = median_host_seconds(run, repeats)
                        rows.append(_row(shape, layout_name, dtype, mode.name, operation, seconds, arrays["x"].nbytes, copy_gbps))
    return {"backend": "CPU: NumPy reference (no GPU; smaller shapes)", "copy_gbps": copy_gbps, "rows": rows}


# ---------------------------------------------------------------- GPU (cuDNN) ----

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


def _torch_operations(torch, arrays, mode, channel_axis):
    """PyTorch's batch_norm on the same data: NCHW view of channels-last memory where needed,
    flattened features for PER_ACTIVATION."""
    functional = torch.nn.functional
    x = torch.from_dlpack(arrays["x"])
    dy = torch.from_dlpack(arrays["dy"])
    if x.dim() > 2 and channel_axis == -1:
        order = (0, x.dim() - 1) + tuple(range(1, x.dim() - 1))
        x, dy = x.permute(order), dy.permute(order)
    if mode is Mode.PER_ACTIVATION:
        x, dy = x.reshape(x.shape[0], -1), dy.reshape(dy.shape[0], -1)
    features = x.shape[1]
    param = lambda value: torch.full((features,), value, device=x.device, dtype=torch.float32)  # noqa: E731
    weight, bias = param(1.0).requires_grad_(), param(0.0).requires_grad_()
    running_mean, running_var = param(0.0), param(1.0)
    x_grad = x.detach().requires_grad_()
    y = functional.batch_norm(x_grad, None, None, weight, bias, training=True, eps=1e-5)
    return {
        "forward_training": lambda: functional.batch_norm(x, running_mean, running_var, weight.detach(), bias.detach(), training=True, momentum=0.1, eps=1e-5),
        "forward_inference": lambda: functional.batch_norm(x, running_mean, running_var, weight.detach(), bias.detach(), training=False, eps=1e-5),
        "backward": lambda: torch.autograd.grad(y, (x_grad, weight, bias), dy, retain_graph=True),
    }


def _host_overhead(torch, calls=1000) -> dict:
    import cupy

    arrays = _device_inputs((8, 16, 4, 4), 1, Mode.SPATIAL, np.float32)
    ours = _operations(arrays, Mode.SPATIAL, 1)["forward_training"]
    result = {"shape": [8, 16, 4, 4], "calls": calls,
              "cudnn_bn_us_per_call": _microseconds_per_call(ours, cupy.cuda.Device().synchronize, calls)}
    if torch is not None:
        theirs = _torch_operations(torch, arrays, Mode.SPATIAL, 1)["forward_training"]
        result["torch_us_per_call"] = _microseconds_per_call(theirs, torch.cuda.synchronize, calls)
    return result


def _microseconds_per_call(run, synchronize, calls: int) -> float:
    """Wall time per call of ``calls`` back-to-back calls with one synchronisation (host overhead)."""
    run()
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _overflow_probe() -> list[dict]:
    """Does SPATIAL_PERSISTENT raise the overflow flag on ordinary data, and does its output then
    equal SPATIAL's? (OVERFLOW_PROBE_SHAPE, float32, values uniform in [-2, 2].)"""
    from .._core.tolerances import to_numpy

    results = []
    for channel_axis, layout_name in _layouts(OVERFLOW_PROBE_SHAPE):
        arrays = _device_inputs(OVERFLOW_PROBE_SHAPE, channel_axis, Mode.SPATIAL, np.float32)
        args = (arrays["x"], arrays["gamma"], arrays["beta"])
        try:
            _api.forward_training(*args, mode="spatial_persistent", channel_axis=channel_axis, on_overflow="raise")
            flagged = False
        except CudnnOverflowError:
            flagged = True
        persistent, _ = _api.forward_training(*args, mode="spatial_persistent", channel_axis=channel_axis, on_overflow="ignore")
        spatial, _ = _api.forward_training(*args, mode="spatial", channel_axis=channel_axis)
        difference = float(np.max(np.abs(to_numpy(persistent) - to_numpy(spatial))))
        results.append({
            "layout": layout_name,
            "overflow_flag_raised": flagged,
            "persistent_output_finite": bool(np.all(np.isfinite(to_numpy(persistent)))),
            "max_abs_difference_vs_spatial": difference,
        })
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
                timings[label] = {op: median_gpu_seconds(operations[op], repeats) * 1e3 for op in ("forward_training", "backward") if op in operations}
            finally:
                cudnn_ops.set_ex_path_enabled(previous)
        for op in set(timings["ex"]) & set(timings["plain"]):
            rows.append({"shape": list(shape), "operation": op, "ex_ms": timings["ex"][op], "plain_ms": timings["plain"][op],
                         "plain_over_ex": timings["plain"][op] / timings["ex"][op]})
    return rows


def _device_copy_gbps(elements: int, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write) of a float32 buffer, the peak we compare to."""
    import cupy

    source, target = cupy.ones(elements, cupy.float32), cupy.empty(elements, cupy.float32)
    return 2 * source.nbytes / median_gpu_seconds(lambda: cupy.copyto(target, source), repeats) / 1e9


def _gpu_bench(quick: bool) -> dict:
    import cupy

    torch = _torch_cuda()
    shapes = list(dict.fromkeys(GPU_SHAPES[:1] + GPU_SHAPES[-1:])) if quick else GPU_SHAPES  # first and last, once
    repeats = 5 if quick else 25
    copy_gbps = _device_copy_gbps(max(int(np.prod(s)) for s in shapes), repeats)
    rows, overflowed = [], []
    for shape in shapes:
        for dtype in (np.float16, np.float32):
            for channel_axis, layout_name in _layouts(shape):
                for mode in Mode:
                    arrays = _device_inputs(shape, channel_axis, mode, dtype)
                    checks = [("ignore", mode.name)]
                    if mode is Mode.SPATIAL_PERSISTENT:
                        checks.append(("raise", f"{mode.name} (overflow checked)"))
                    peer = _torch_operations(torch, arrays, mode, channel_axis) if torch is not None else None
                    for on_overflow, label in checks:
                        operations = _operations(arrays, mode, channel_axis, on_overflow)
                        for operation in OPERATIONS:
                            where = {"shape": list(shape), "layout": layout_name, "dtype": np.dtype(dtype).name, "mode": label, "operation": operation}
                            try:
                                seconds = median_gpu_seconds(operations[operation], repeats)
                            except (KeyError, CudnnOverflowError):  # KeyError: no valid saved statistics
                                overflowed.append(where)
                                continue
                            row = _row(shape, layout_name, dtype, label, operation, seconds, arrays["x"].nbytes, copy_gbps)
                            if peer is not None:
                                row["torch_ms"] = _median_torch_seconds(torch, peer[operation], repeats) * 1e3
                                row["time_vs_torch"] = row["median_ms"] / row["torch_ms"]
                            rows.append(row)
                    del arrays, peer
                    cupy.get_default_memory_pool().free_all_blocks()
    return {
        "backend": "GPU: cuDNN through cudnn_bn",
        "copy_gbps": copy_gbps,
        "rows": rows,
        "overflowed": overflowed,
        "host_overhead": _host_overhead(torch),
        "overflow_probe": _overflow_probe(),
        "ex_vs_plain": _ex_vs_plain(repeats),
    }


# ---------------------------------------------------------------- output ----

def _environment(on_gpu: bool) -> dict:
    from .info import collect_info

    info = collect_info()
    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cudnn": info.get("cudnn"),
        "cupy": info.get("cupy"),
        "cuda_driver": info.get("cuda_driver"),
        "device": info.get("gpu") if on_gpu else f"CPU: {platform.processor() or platform.machine()}",
    }
    try:
        import torch

        environment["torch"] = torch.__version__
    except ImportError:
        environment["torch"] = None
    return environment


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# cudnn_bn benchmark: {result['backend']}",
        "",
        f"Date {env['date']}; device {env['device']}; driver {env['cuda_driver']}; cuDNN {env['cudnn']}; "
        f"CuPy {env['cupy']}; PyTorch {env['torch']}. Copy bandwidth in this run: {result['copy_gbps']:.1f} GB/s.",
        "",
        "| shape (N, C, ...) | layout | dtype | mode | operation | median ms | GB/s | of copy | torch ms | time / torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        torch_ms = f"{row['torch_ms']:.3f}" if "torch_ms" in row else "-"
        ratio = f"{row['time_vs_torch']:.2f}" if "time_vs_torch" in row else "-"
        lines.append(
            f"| {'x'.join(map(str, row['shape']))} | {row['layout']} | {row['dtype']} | {row['mode']} | {row['operation']} "
            f"| {row['median_ms']:.3f} | {row['gbps']:.1f} | {row['fraction_of_copy']:.0%} | {torch_ms} | {ratio} |"
        )
    if result.get("overflowed"):
        lines += ["", "Not timed because SPATIAL_PERSISTENT overflowed on the benchmark data: " + "; ".join(
            f"{'x'.join(map(str, o['shape']))} {o['layout']} {o['dtype']} {o['mode']} {o['operation']}" for o in result["overflowed"])]
    if "host_overhead" in result:
        overhead = result["host_overhead"]
        lines += ["", f"Host overhead per call on {overhead['shape']} ({overhead['calls']} calls, one synchronisation): "
                  f"cudnn_bn {overhead['cudnn_bn_us_per_call']:.1f} us" + (f", PyTorch {overhead['torch_us_per_call']:.1f} us" if "torch_us_per_call" in overhead else "")]
    if "overflow_probe" in result:
        probe = "x".join(map(str, OVERFLOW_PROBE_SHAPE))
        lines += ["", f"| overflow probe {probe} float32 | flag raised | output finite | max abs diff vs SPATIAL |", "|---|---|---|---|"]
        lines += [f"| {p['layout']} | {p['overflow_flag_raised']} | {p['persistent_output_finite']} | {p['max_abs_difference_vs_spatial']:.3e} |" for p in result["overflow_probe"]]
    if result.get("ex_vs_plain"):
        lines += ["", "| Ex path, float16 NHWC | operation | Ex ms | plain ms | plain / Ex |", "|---|---|---|---|---|"]
        lines += [f"| {'x'.join(map(str, r['shape']))} | {r['operation']} | {r['ex_ms']:.3f} | {r['plain_ms']:.3f} | {r['plain_over_ex']:.2f} |" for r in result["ex_vs_plain"]]
    return "\n".join(lines) + "\n"


def run_bench(json_path=None, markdown_path=None, quick: bool = False) -> int:
    usable, _ = cudnn_status()
    result = _gpu_bench(quick) if usable else _cpu_bench(quick)
    result["environment"] = _environment(usable)
    markdown = to_markdown(result)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as handle:
            handle.write(markdown)
    print(markdown)
    return 0
