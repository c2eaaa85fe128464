"""Host time per call of the cuDNN path, measurable on any machine with a C compiler.

The kernels are replaced by C functions that return CUDNN_STATUS_SUCCESS and do nothing, bound
through the same prototype table (so ctypes converts every argument as it would for cuDNN); the
descriptors are the real libcudnn's (host-side calls need no GPU); the arrays come from a minimal
stand-in for CuPy over host memory. What is left is cudnn_bn's own work per call: checks, plan
lookup, handle and stream, argument marshalling, result objects. The stand-in's own cost per call
(its array allocations) is measured and reported beside it.

    python benchmarks/host_overhead.py [--calls 10000] [--json PATH]

Figures are medians over repeated blocks of calls; they are host figures, not GPU timings.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

_NOOP_SOURCE = r"""
#include <stddef.h>
int cudnnCreate(void **handle) { *handle = (void *)0x1000; return 0; }
int cudnnDestroy(void *handle) { return 0; }
int cudnnSetStream(void *handle, void *stream) { return 0; }
int cudnnQueryRuntimeError(void *handle, int *status, int mode, void *tag) { *status = 0; return 0; }
int cudnnBatchNormalizationForwardTraining(void) { return 0; }
int cudnnBatchNormalizationForwardInference(void) { return 0; }
int cudnnBatchNormalizationBackward(void) { return 0; }
int cudnnBatchNormalizationForwardTrainingEx(void) { return 0; }
int cudnnBatchNormalizationBackwardEx(void) { return 0; }
int cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(void *h, int m, int o, void *x, void *z, void *y,
    void *p, void *a, size_t *size) { *size = 256; return 0; }
int cudnnGetBatchNormalizationBackwardExWorkspaceSize(void *h, int m, int o, void *x, void *y, void *dy, void *dz,
    void *dx, void *p, void *a, size_t *size) { *size = 256; return 0; }
int cudnnGetBatchNormalizationTrainingExReserveSpaceSize(void *h, int m, int o, void *a, void *x, size_t *size) {
    *size = 512; return 0; }
"""
_NOOP_NAMES = [
    "cudnnCreate", "cudnnDestroy", "cudnnSetStream", "cudnnQueryRuntimeError",
    "cudnnBatchNormalizationForwardTraining", "cudnnBatchNormalizationForwardInference",
    "cudnnBatchNormalizationBackward", "cudnnBatchNormalizationForwardTrainingEx", "cudnnBatchNormalizationBackwardEx",
    "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize", "cudnnGetBatchNormalizationBackwardExWorkspaceSize",
    "cudnnGetBatchNormalizationTrainingExReserveSpaceSize",
]


def _compile_noops(directory: str) -> ctypes.CDLL:
    source, library = os.path.join(directory, "noops.c"), os.path.join(directory, "libnoops.so")
    with open(source, "w") as handle:
        handle.write(_NOOP_SOURCE)
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    return ctypes.CDLL(library)


# ---- a minimal stand-in for CuPy: host arrays that answer .data.ptr and .device.id ----
class _Pointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class _Device:
    __slots__ = ("id",)

    def __init__(self, id=0):
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEVICE = _Device(0)


class _KeptPointer:
    """``array.data``: computed on first read and then kept in the array's own ``__dict__``, which
    a non-data descriptor lets later reads find directly. CuPy's ``ndarray.data`` is a C-level
    attribute; a Python property here would charge the stand-in's cost to cudnn_bn."""

    def __get__(self, array, owner=None):
        if array is None:
            return self
        pointer = array.__dict__["data"] = _Pointer(array.__array_interface__["data"][0])
        return pointer


class HostArray(np.ndarray):
    data = _KeptPointer()
    device = _DEVICE  # a class attribute: CuPy's ndarray.device is a property in compiled code, not Python


def _empty(shape, dtype=np.float32):
    array = np.empty(shape, dtype).view(HostArray)
    # a fresh array is writable and contiguous: its address is known at once, as CuPy's is
    array.__dict__["data"] = _Pointer(ctypes.addressof(ctypes.c_char.from_buffer(array)) if array.nbytes else 0)
    return array


HostArray.__module__ = "cupy._core.core"  # what cudnn_bn's array-kind check looks at
_STREAM = types.SimpleNamespace(ptr=0x2000)


def _stand_in_cupy() -> types.ModuleType:
    module = types.ModuleType("cupy")
    module.ndarray = HostArray
    module.uint8 = np.uint8
    module.empty = _empty
    module.ascontiguousarray = lambda a: a if a.flags.c_contiguous else np.ascontiguousarray(a).view(HostArray)
    module.isfinite, module.vdot = np.isfinite, np.vdot
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = lambda id=0: _DEVICE
    cuda.get_current_stream = lambda: _STREAM
    cuda.runtime = types.SimpleNamespace(runtimeGetVersion=lambda: 0, getDevice=lambda: 0)
    module.cuda = cuda
    return module


@contextlib.contextmanager
def no_op_gpu():
    """Install the stand-in CuPy and the C no-op kernels on the loaded libcudnn."""
    from cudnn_bn._cudnn import availability, handles, plans, raw

    library = raw.library()
    saved_modules = sys.modules.get("cupy")
    saved = {name: getattr(library, name) for name in _NOOP_NAMES}
    with tempfile.TemporaryDirectory() as directory:
        noops = _compile_noops(directory)
        for name in _NOOP_NAMES:
            restype, argtypes = raw.PROTOTYPES[name]
            function = getattr(noops, name)
            function.restype, function.argtypes = restype, argtypes
            setattr(library, name, raw._checked(name, function))
        sys.modules["cupy"] = _stand_in_cupy()
        build_checked = availability.cuda_build_checked
        availability.cuda_build_checked = True  # the stand-in has no CUDA runtime to compare with
        handles.close_all()
        plans.PLANS.clear()
        try:
            yield
        finally:
            handles.close_all()
            plans.PLANS.clear()
            availability.cuda_build_checked = build_checked
            for name, entry in saved.items():
                setattr(library, name, entry)
            if saved_modules is None:
                sys.modules.pop("cupy", None)
            else:
                sys.modules["cupy"] = saved_modules


def _median_seconds_per_call(function, calls: int, blocks: int = 7) -> tuple[float, float, float]:
    """(min, median, max) over blocks of the mean time per call within a block."""
    per_block = max(calls // blocks, 1)
    for _ in range(min(per_block, 500)):
        function()
    samples = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            function()
        samples.append((time.perf_counter() - start) / per_block)
    return min(samples), statistics.median(samples), max(samples)


def _row(case: str, operation: str, seconds: tuple[float, float, float]) -> dict:
    """A row of the table from _median_seconds_per_call's (min, median, max), in microseconds."""
    low, median, high = seconds
    return {"case": case, "operation": operation, "min_us": low * 1e6, "median_us": median * 1e6, "max_us": high * 1e6}


def _inputs(shape, channel_axis, dtype):
    rng = np.random.default_rng(0)
    channels = shape[channel_axis]
    x = rng.standard_normal(shape).astype(dtype).view(HostArray)
    param = np.float64 if dtype == np.float64 else np.float32
    gamma = np.ones(channels, param).view(HostArray)
    beta = np.zeros(channels, param).view(HostArray)
    running = (np.zeros(channels, param).view(HostArray), np.ones(channels, param).view(HostArray))
    return x, x.copy().view(HostArray), gamma, beta, running


def measure(calls: int) -> dict:
    import cudnn_bn
    from cudnn_bn._tools.bench import _cpu_model as cpu_model  # the one place that reads the CPU's name

    rows = []
    with no_op_gpu():
        cases = [
            ("NCHW float32, SPATIAL", (8, 16, 4, 4), 1, np.float32, "spatial"),
            ("NHWC float16, SPATIAL_PERSISTENT (Ex)", (8, 4, 4, 16), -1, np.float16, "spatial_persistent"),
        ]
        for label, shape, axis, dtype, mode in cases:
            x, dy, gamma, beta, running = _inputs(shape, axis, dtype)
            _, saved = cudnn_bn.forward_training(x, gamma, beta, *running, mode=mode, channel_axis=axis)
            timings = {
                "forward_training": lambda: cudnn_bn.forward_training(
                    x, gamma, beta, *running, mode=mode, channel_axis=axis
                ),
                "backward": lambda: cudnn_bn.backward(x, dy, gamma, saved),
                "forward_inference": lambda: cudnn_bn.forward_inference(
                    x, gamma, beta, *running, mode=mode, channel_axis=axis
                ),
                "forward_training + backward": lambda: cudnn_bn.backward(
                    x, dy, gamma, cudnn_bn.forward_training(x, gamma, beta, *running, mode=mode, channel_axis=axis)[1]
                ),
            }
            for operation, function in timings.items():
                rows.append(_row(label, operation, _median_seconds_per_call(function, calls)))
        cupy = sys.modules["cupy"]

        param = cupy.empty(16, np.float32)

        def plain():  # what a forward or backward asks of the stand-in: 3 allocations and their addresses
            arrays = (cupy.empty((8, 16, 4, 4), np.float32), cupy.empty(16, np.float32), cupy.empty(16, np.float32))
            return [a.data.ptr for a in arrays]

        def persistent_forward():  # and on the persistent path: the reserve space, the running statistics' backup
            return plain(), cupy.empty(512, np.uint8).data.ptr, param.copy(), param.copy()

        for operation, function in (  # the persistent backward asks for no more than plain(): its saved
            # statistics are its forward's own, which it does not read back
            ("3 empty() and their .data.ptr (included above)", plain),
            ("the persistent forward's: 4 empty(), 2 copy() (included above)", persistent_forward),
        ):
            rows.append(_row("stand-in CuPy", operation, _median_seconds_per_call(function, calls)))
    return {
        "calls": calls,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "rows": rows,
    }


def _torch_cpu_row(calls: int) -> dict | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(1)
    x = torch.randn(8, 16, 4, 4)
    weight, bias = torch.ones(16), torch.zeros(16)
    mean, var = torch.zeros(16), torch.ones(16)
    seconds = _median_seconds_per_call(lambda: F.batch_norm(x, mean, var, weight, bias, training=True), calls)
    return _row("torch CPU F.batch_norm, compute included", "forward_training", seconds)


def to_markdown(result: dict) -> str:
    lines = [
        "Host time per call, no-op C kernels, real libcudnn descriptors, stand-in CuPy; "
        f"{result['calls']} calls per row, median of 7 blocks; Python {result['python']}, numpy {result['numpy']}, "
        f"{result['cpu']}.",
        "",
        "| case | operation | median µs | min µs | max µs |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['case']} | {row['operation']} | {row['median_us']:.1f} | {row['min_us']:.1f} "
            f"| {row['max_us']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--json", help="also write the result as JSON here")
    parser.add_argument("--torch", action="store_true",
                        help="add a torch CPU row (F.batch_norm on the same tiny tensor)")
    args = parser.parse_args(argv)
    result = measure(args.calls)
    if args.torch:
        row = _torch_cpu_row(args.calls)
        if row is not None:
            result["rows"].append(row)
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
