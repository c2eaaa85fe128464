"""GPU probes of `.ci/gpu-validate`: facts about cuDNN 9 that decide this package's limits and policy.

    python .ci/gpu_probes.py --out probes.json      # every group; needs a GPU
    python .ci/gpu_probes.py --list                 # the plan, no GPU needed

1. Limits: which of the limits in cudnn_bn/_cudnn/limits.py still hold. cuDNN is called directly
   (the raw layer, not the package, which routes around the limits) at each edge: training with
   N at the limit and one past it (PyTorch's guard, pytorch#19911), inference likewise
   (pytorch#2917), and element counts just under and just over 2**31. Each call's status is
   recorded and every result that came back is checked against a float64 computation.
2. The overflow flag of SPATIAL_PERSISTENT on ordinary data (uniform in [-2, 2]; the benchmark
   shapes, NCHW and NHWC, float16 and float32): how often it is raised, and whether the output
   then equals SPATIAL's.
3. The cost of the blocking cudnnQueryRuntimeError, on its own and per call.

Each group runs in its own process with its own time limit, so that a crash, a sticky CUDA error
or a hang past a limit costs that group only. Records stream to stdout as they are found and
probes.json is rewritten after every group.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

RECORD_PREFIX = "PROBE "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the repository is used from its root without an install step


# ---------------------------------------------------------------- the plan ----

def limit_numbers() -> dict:
    """The limits the package enforces (read from its one place), or PyTorch's where it is missing."""
    try:
        from cudnn_bn._cudnn.limits import LIMITS

        return dict(training_max_batch=LIMITS.training_max_batch, inference_max_batch=LIMITS.inference_max_batch,
                    int32_max=LIMITS.int32_max, source="cudnn_bn/_cudnn/limits.py")
    except Exception as error:  # the package is mid-change: probe PyTorch's numbers and say so
        return dict(training_max_batch=880801, inference_max_batch=65535, int32_max=2**31 - 1,
                    source=f"PyTorch's guards (cudnn_bn._cudnn.limits not importable: {type(error).__name__})")


def plan() -> list[dict]:
    """Every group: name, kind, time limit in seconds, and its cases (within the limit first)."""
    numbers = limit_numbers()
    training, inference = numbers["training_max_batch"], numbers["inference_max_batch"]
    groups = []
    # batch limits: small C, H, W so that only N matters; (N, 1, 1, 1) is PyTorch's reproducer shape
    for mode, dtype, rest in [("PER_ACTIVATION", "float32", (1, 1, 1)), ("SPATIAL", "float32", (1, 1, 1)),
                              ("SPATIAL", "float32", (4, 2, 2)), ("SPATIAL_PERSISTENT", "float32", (4, 2, 2)),
                              ("SPATIAL", "float16", (4, 2, 2))]:
        groups.append(dict(
            name=f"training-batch-{mode.lower()}-{dtype}-{'x'.join(map(str, rest))}", kind="limit",
            limit="training batch", operations=["forward_training", "backward"], mode=mode, dtype=dtype, timeout=40,
            cases=[dict(edge="within", shape=(training,) + rest), dict(edge="past", shape=(training + 1,) + rest)]))
    for mode, dtype, rest in [("PER_ACTIVATION", "float32", (1, 1, 1)), ("SPATIAL", "float32", (1, 1, 1)),
                              ("SPATIAL", "float32", (1, 2, 1)), ("SPATIAL", "float16", (4, 2, 2))]:
        groups.append(dict(
            name=f"inference-batch-{mode.lower()}-{dtype}-{'x'.join(map(str, rest))}", kind="limit",
            limit="inference batch", operations=["forward_inference"], mode=mode, dtype=dtype, timeout=40,
            cases=[dict(edge="within", shape=(inference,) + rest), dict(edge="past", shape=(inference + 1,) + rest)]))
    # element count around 2**31 (float16: 4 GiB a tensor); every dim and stride stays below 2**31
    height = 2**14
    for mode, operations in [("SPATIAL", ["forward_training", "backward"]), ("SPATIAL", ["forward_inference"]),
                             ("SPATIAL_PERSISTENT", ["forward_training"])]:
        groups.append(dict(
            name=f"int32-count-{mode.lower()}-{operations[0]}", kind="limit", limit="int32 element count",
            operations=operations, mode=mode, dtype="float16", timeout=90,
            cases=[dict(edge="within", shape=(2, 4, height, height - 1)), dict(edge="past", shape=(2, 4, height, height + 1))]))
    groups.append(dict(name="overflow-flag", kind="overflow_flag", timeout=120, cases=[]))
    groups.append(dict(name="query-timing", kind="query_timing", timeout=60, cases=[]))
    return groups


# ---------------------------------------------------------------- child: raw cuDNN ----

def emit(record: dict) -> None:
    print(RECORD_PREFIX + json.dumps(record, default=str), flush=True)


def _first_line(error) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:300] if text else ""


class RawBatchNorm:
    """Direct cuDNN calls on CuPy memory with a handle of its own (the package's limits bypassed)."""

    def __init__(self, cupy):
        from cudnn_bn._cudnn import raw

        self.cupy, self.raw, self.library = cupy, raw, raw.library()
        handle = ctypes.c_void_p()
        self.library.cudnnCreate(ctypes.byref(handle))
        self.handle = handle.value
        self.library.cudnnSetStream(self.handle, cupy.cuda.get_current_stream().ptr)
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)  # half and float data read C float
        self.alpha, self.beta = ctypes.addressof(self._one), ctypes.addressof(self._zero)
        self._descriptors: list[int] = []

    def _new_descriptor(self) -> int:
        pointer = ctypes.c_void_p()
        self.library.cudnnCreateTensorDescriptor(ctypes.byref(pointer))
        self._descriptors.append(pointer.value)
        return pointer.value

    def data_descriptor(self, dtype: str, shape) -> int:
        data_type = {"float16": self.raw.DataType.HALF, "float32": self.raw.DataType.FLOAT}[dtype]
        strides = [1] * len(shape)
        for axis in range(len(shape) - 2, -1, -1):
            strides[axis] = strides[axis + 1] * shape[axis + 1]
        descriptor = self._new_descriptor()
        array = ctypes.c_int * len(shape)
        self.library.cudnnSetTensorNdDescriptor(descriptor, int(data_type), len(shape), array(*shape), array(*strides))
        return descriptor

    def param_descriptor(self, data_descriptor: int, mode: str) -> int:
        descriptor = self._new_descriptor()
        self.library.cudnnDeriveBNTensorDescriptor(descriptor, data_descriptor, mode_value(mode))
        return descriptor

    def overflow_flag(self) -> bool:
        status = ctypes.c_int(0)
        self.library.cudnnQueryRuntimeError(self.handle, ctypes.byref(status), int(self.raw.ErrQueryMode.BLOCKING), None)
        return status.value == int(self.raw.Status.RUNTIME_FP_OVERFLOW)

    def close(self) -> None:
        for descriptor in self._descriptors:
            self.library.cudnnDestroyTensorDescriptor(descriptor)
        self.library.cudnnDestroy(self.handle)


def mode_value(name: str) -> int:
    """cudnnBatchNormMode_t of a mode name."""
    from cudnn_bn._core.modes import Mode

    return int(Mode[name])


def _status_of(call) -> str:
    """Run a raw call; its cuDNN status name (the exception is the status for a failed call)."""
    from cudnn_bn._cudnn.errors import CudnnError

    try:
        call()
    except CudnnError as error:
        return error.status_name
    return "CUDNN_STATUS_SUCCESS"


def _synchronize(cupy) -> str | None:
    """None, or the CUDA error a kernel left behind (sticky ones end the group)."""
    try:
        cupy.cuda.get_current_stream().synchronize()
        return None
    except Exception as error:
        return _first_line(error)


TOLERANCE = {"float32": 1e-4, "float16": 1e-2}  # relative to each result's largest expected value


def _verdict(errors: dict, dtype: str) -> str:
    tolerance = TOLERANCE[dtype]
    worst = {name: value for name, value in errors.items() if not value <= tolerance}  # NaN counts as wrong
    detail = ", ".join(f"{name} {value:.1e}" for name, value in errors.items())
    return f"matches ({detail})" if not worst else f"WRONG ({detail}; tolerance {tolerance:g})"


def _relative(actual, expected, numpy) -> float:
    actual, expected = numpy.asarray(actual, dtype=numpy.float64), numpy.asarray(expected, dtype=numpy.float64)
    return float(numpy.max(numpy.abs(actual - expected)) / max(1.0, float(numpy.max(numpy.abs(expected)))))


class LimitCase:
    """One shape at one edge: the arrays, the raw calls, and their float64 checks.

    Small tensors are checked whole on the device. The 2**31-element tensors are tiled from a small
    host block along H, so their exact statistics are the block's, and are checked at sampled
    elements (the first, the last and random ones of every sample) plus a NaN scan per sample,
    since the outputs start as NaN.
    """

    EPS, FACTOR = 1e-5, 1.0  # factor 1: the running variance is the unbiased batch variance
    TILE_THRESHOLD = 2**28  # elements past which a tensor is tiled and checked at samples

    def __init__(self, bn: RawBatchNorm, group: dict, case: dict):
        import numpy

        self.bn, self.cupy, self.numpy = bn, bn.cupy, numpy
        self.group, self.shape, self.edge = group, tuple(case["shape"]), case["edge"]
        self.mode, self.dtype = group["mode"], group["dtype"]
        self.tiled = int(numpy.prod(self.shape, dtype=numpy.int64)) > self.TILE_THRESHOLD
        self.axes = (0,) if self.mode == "PER_ACTIVATION" else (0, 2, 3)
        self.param_shape = tuple(1 if axis in self.axes else size for axis, size in enumerate(self.shape))
        self.count = int(numpy.prod([self.shape[axis] for axis in self.axes], dtype=numpy.int64))
        self.rng = numpy.random.default_rng(0)

    def record(self, operation: str, status: str, check: str, seconds: float, **extra) -> dict:
        record = dict(kind="limit", group=self.group["name"], limit=self.group["limit"], edge=self.edge,
                      mode=self.mode, dtype=self.dtype, shape=list(self.shape), operation=operation,
                      status=status, check=check, seconds=round(seconds, 4), **extra)
        emit(record)
        return record

    # ---- data ----
    def _device_data(self, seed: int):
        cupy, numpy = self.cupy, self.numpy
        if not self.tiled:
            host = numpy.random.default_rng(seed).standard_normal(self.shape).astype(self.dtype)
            return cupy.asarray(host), host.astype(numpy.float64)
        block_height = 64
        block = numpy.random.default_rng(seed).standard_normal((self.shape[1], block_height, self.shape[3])).astype(self.dtype)
        device_block = cupy.asarray(block)
        data = cupy.empty(self.shape, dtype=self.dtype)
        for n in range(self.shape[0]):  # each sample < 2**31 elements: plain CuPy kernels suffice
            data[n].reshape(self.shape[1], self.shape[2] // block_height, block_height, self.shape[3])[...] = device_block[:, None]
        return data, block.astype(numpy.float64)

    def _output(self):
        """An output buffer of NaN, which marks every element a kernel did not write."""
        if not self.tiled:
            return self.cupy.full(self.shape, self.numpy.nan, dtype=self.dtype)
        output = self.cupy.empty(self.shape, dtype=self.dtype)
        for n in range(self.shape[0]):  # per sample: each below 2**31 elements
            output[n].fill(self.numpy.nan)
        return output

    def _params(self, *values):
        return [self.cupy.asarray(value.reshape(self.param_shape).astype(self.numpy.float32)) for value in values]

    def _host_stats(self, host):
        """Per-parameter mean and biased variance of the data (exact for the tiled tensors)."""
        axes = self.axes if not self.tiled else (1, 2)
        mean = host.mean(axis=axes, keepdims=True)
        variance = ((host - mean) ** 2).mean(axis=axes, keepdims=True)
        if self.tiled:
            mean, variance = mean[None], variance[None]  # block (C, h, W) -> (1, C, 1, 1)
        return mean, variance

    def _samples(self, device_array, index):
        """Values at flat indices of every sample (each sample indexed on its own, below 2**31)."""
        return [device_array[n].reshape(-1)[self.cupy.asarray(index)].get().astype(self.numpy.float64) for n in range(self.shape[0])]

    def _sample_index(self):
        per_sample = int(self.numpy.prod(self.shape[1:], dtype=self.numpy.int64))
        edges = self.numpy.r_[0:4096, per_sample - 4096:per_sample]
        return self.numpy.unique(self.numpy.concatenate([edges, self.rng.integers(0, per_sample, 65536)]))

    def _nan_count(self, device_array) -> int:
        return int(sum(int(self.cupy.isnan(device_array[n]).sum()) for n in range(self.shape[0])))

    def _channel_of(self, index):
        return index // (self.shape[2] * self.shape[3])

    # ---- the probes ----
    def run(self) -> bool:
        """Every operation of the group at this edge; False when the CUDA context is no longer usable."""
        bn = self.bn
        try:
            x_desc = bn.data_descriptor(self.dtype, self.shape)
            p_desc = bn.param_descriptor(x_desc, self.mode)
        except Exception as error:
            for operation in self.group["operations"]:
                self.record(operation, f"descriptor refused: {_first_line(error)}", "-", 0.0)
            return True
        if "forward_inference" in self.group["operations"]:
            return self._inference(x_desc, p_desc)
        return self._training(x_desc, p_desc)

    def _call(self, operation: str, function, *args):
        start = time.perf_counter()
        status = _status_of(lambda: function(*args))
        cuda_error = _synchronize(self.cupy)
        return status, cuda_error, time.perf_counter() - start

    def _training(self, x_desc, p_desc) -> bool:
        bn, numpy = self.bn, self.numpy
        x, host = self._device_data(seed=1)
        gamma_host, beta_host = (0.5 + self.rng.random(self.param_shape)), self.rng.standard_normal(self.param_shape)
        gamma, beta = self._params(gamma_host, beta_host)
        running_mean, running_var = self._params(numpy.zeros(self.param_shape), numpy.ones(self.param_shape))
        save_mean, save_inv_std = self._params(numpy.full(self.param_shape, numpy.nan), numpy.full(self.param_shape, numpy.nan))
        y = self._output()
        status, cuda_error, seconds = self._call(
            "forward_training", bn.library.cudnnBatchNormalizationForwardTraining, bn.handle, mode_value(self.mode),
            bn.alpha, bn.beta, x_desc, x.data.ptr, x_desc, y.data.ptr, p_desc, gamma.data.ptr, beta.data.ptr, self.FACTOR,
            running_mean.data.ptr, running_var.data.ptr, self.EPS, save_mean.data.ptr, save_inv_std.data.ptr)
        extra = {}
        if status == "CUDNN_STATUS_SUCCESS" and cuda_error is None and self.mode == "SPATIAL_PERSISTENT":
            extra["overflow_flag"] = bn.overflow_flag()
        mean, variance = self._host_stats(host)
        inv_std = 1.0 / numpy.sqrt(variance + self.EPS)
        if cuda_error:
            self.record("forward_training", status, "-", seconds, cuda_error=cuda_error, **extra)
            return False
        if status != "CUDNN_STATUS_SUCCESS":
            self.record("forward_training", status, "-", seconds, **extra)
            if "backward" in self.group["operations"]:  # the backward has a limit of its own: probe it with exact statistics
                save_mean, save_inv_std = self._params(mean, inv_std)
                return self._backward(x_desc, p_desc, x, host, gamma, gamma_host, save_mean, save_inv_std, mean, inv_std)
            return True
        errors = {
            "saved mean": _relative(save_mean.get(), mean.reshape(self.param_shape), numpy),
            "saved inv_std": _relative(save_inv_std.get(), inv_std.reshape(self.param_shape), numpy),
            "running var": _relative(running_var.get(), (variance * self.count / (self.count - 1)).reshape(self.param_shape), numpy),
        }
        errors.update(self._y_errors(x, y, host, mean, inv_std, gamma_host, beta_host))
        self.record("forward_training", status, _verdict(errors, self.dtype), seconds, **extra)
        if "backward" in self.group["operations"]:
            return self._backward(x_desc, p_desc, x, host, gamma, gamma_host, save_mean, save_inv_std, mean, inv_std)
        return True

    def _y_errors(self, x, y, host, mean, inv_std, gamma_host, beta_host) -> dict:
        numpy = self.numpy
        scale, shift = gamma_host.reshape(self.param_shape), beta_host.reshape(self.param_shape)
        if not self.tiled:
            wanted = (host - mean) * inv_std * scale + shift
            return {"y": _relative(y.get(), wanted, numpy)}
        index = self._sample_index()
        channel = self._channel_of(index)
        per_channel = lambda array: array.reshape(-1)[channel]  # noqa: E731  (1, C, 1, 1) -> per sampled element
        worst = 0.0
        for x_values, y_values in zip(self._samples(x, index), self._samples(y, index)):
            wanted = (x_values - per_channel(mean)) * per_channel(inv_std) * per_channel(scale) + per_channel(shift)
            worst = max(worst, _relative(y_values, wanted, numpy))
        return {"y (sampled)": worst, "y NaN left": float(self._nan_count(y))}

    def _backward(self, x_desc, p_desc, x, host, gamma, gamma_host, save_mean, save_inv_std, mean, inv_std) -> bool:
        bn, numpy = self.bn, self.numpy
        dy, dy_host = self._device_data(seed=2)
        dx = self._output()
        dgamma, dbeta = self._params(numpy.full(self.param_shape, numpy.nan), numpy.full(self.param_shape, numpy.nan))
        status, cuda_error, seconds = self._call(
            "backward", bn.library.cudnnBatchNormalizationBackward, bn.handle, mode_value(self.mode),
            bn.alpha, bn.beta, bn.alpha, bn.beta, x_desc, x.data.ptr, x_desc, dy.data.ptr, x_desc, dx.data.ptr, p_desc,
            gamma.data.ptr, dgamma.data.ptr, dbeta.data.ptr, self.EPS, save_mean.data.ptr, save_inv_std.data.ptr)
        if status != "CUDNN_STATUS_SUCCESS" or cuda_error:
            self.record("backward", status, "-", seconds, cuda_error=cuda_error)
            return cuda_error is None
        axes = self.axes if not self.tiled else (1, 2)
        x_hat = (host - mean[0] if self.tiled else host - mean) * (inv_std[0] if self.tiled else inv_std)
        repeats = 1 if not self.tiled else self.count // (host.shape[1] * host.shape[2])
        wanted_dbeta = repeats * dy_host.sum(axis=axes, keepdims=True)
        wanted_dgamma = repeats * (dy_host * x_hat).sum(axis=axes, keepdims=True)
        if self.tiled:
            wanted_dbeta, wanted_dgamma = wanted_dbeta[None], wanted_dgamma[None]
        errors = {"dgamma": _relative(dgamma.get(), wanted_dgamma.reshape(self.param_shape), numpy),
                  "dbeta": _relative(dbeta.get(), wanted_dbeta.reshape(self.param_shape), numpy)}
        factor = gamma_host.reshape(self.param_shape) * inv_std
        if not self.tiled:
            wanted_dx = factor * (dy_host - wanted_dbeta / self.count - x_hat * wanted_dgamma / self.count)
            errors["dx"] = _relative(dx.get(), wanted_dx, numpy)
        else:
            index = self._sample_index()
            channel = self._channel_of(index)
            per_channel = lambda array: array.reshape(-1)[channel]  # noqa: E731
            worst = 0.0
            for x_values, dy_values, dx_values in zip(self._samples(x, index), self._samples(dy, index), self._samples(dx, index)):
                x_hat_values = (x_values - per_channel(mean)) * per_channel(inv_std)
                wanted = per_channel(factor) * (dy_values - per_channel(wanted_dbeta) / self.count
                                                - x_hat_values * per_channel(wanted_dgamma) / self.count)
                worst = max(worst, _relative(dx_values, wanted, numpy))
            errors.update({"dx (sampled)": worst, "dx NaN left": float(self._nan_count(dx))})
        self.record("backward", status, _verdict(errors, self.dtype), seconds)
        return True

    def _inference(self, x_desc, p_desc) -> bool:
        bn, numpy = self.bn, self.numpy
        x, host = self._device_data(seed=3)
        mean_host, var_host = self.rng.standard_normal(self.param_shape), 0.5 + self.rng.random(self.param_shape)
        gamma_host, beta_host = 0.5 + self.rng.random(self.param_shape), self.rng.standard_normal(self.param_shape)
        gamma, beta, mean, var = self._params(gamma_host, beta_host, mean_host, var_host)
        y = self._output()
        status, cuda_error, seconds = self._call(
            "forward_inference", bn.library.cudnnBatchNormalizationForwardInference, bn.handle,
            mode_value(self.mode), bn.alpha, bn.beta, x_desc, x.data.ptr, x_desc, y.data.ptr, p_desc,
            gamma.data.ptr, beta.data.ptr, mean.data.ptr, var.data.ptr, self.EPS)
        if status != "CUDNN_STATUS_SUCCESS" or cuda_error:
            self.record("forward_inference", status, "-", seconds, cuda_error=cuda_error)
            return cuda_error is None
        errors = self._y_errors(x, y, host, mean_host.reshape(self.param_shape), 1.0 / numpy.sqrt(var_host + self.EPS),
                                gamma_host, beta_host)
        self.record("forward_inference", status, _verdict(errors, self.dtype), seconds)
        return True


def child_limit(group: dict) -> None:
    import cupy

    bn = RawBatchNorm(cupy)
    for case in group["cases"]:
        usable = LimitCase(bn, group, case).run()
        cupy.get_default_memory_pool().free_all_blocks()
        if not usable:
            emit(dict(kind="note", group=group["name"], note="CUDA context unusable after this case; the group stops"))
            return
    bn.close()


# ---------------------------------------------------------------- child: overflow flag ----

def _benchmark_shapes() -> tuple[list, str]:
    try:
        from cudnn_bn._tools.bench import GPU_SHAPES

        return [tuple(shape) for shape in GPU_SHAPES], "cudnn_bn/_tools/bench.py GPU_SHAPES"
    except Exception as error:
        return [(32, 64, 56, 56), (64, 256, 14, 14), (256, 2048, 7, 7), (4096, 1024)], f"fixed list (bench not importable: {type(error).__name__})"


def child_overflow_flag(group: dict, seeds: int = 6) -> None:
    """For each shape x layout x dtype: `seeds` inputs; the flag of a checked persistent call on
    each, then the unchecked persistent output against SPATIAL's on the same inputs."""
    import cupy
    import numpy

    import cudnn_bn
    from cudnn_bn import CudnnOverflowError

    shapes, source = _benchmark_shapes()
    emit(dict(kind="note", group=group["name"], note=f"shapes from {source}"))
    tiny = cupy.asarray(numpy.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(numpy.float32))
    tiny_params = cupy.ones(4, cupy.float32), cupy.zeros(4, cupy.float32)

    def absorb_stale_flag():
        # a checked call on benign data, so that a flag left pending by the unchecked calls of the
        # previous phase cannot be counted against the next input
        try:
            cudnn_bn.forward_training(tiny, *tiny_params, mode="spatial_persistent", on_overflow="raise")
        except CudnnOverflowError:
            pass

    for shape in shapes:
        layouts = [(1, "NCHW")] if len(shape) == 2 else [(1, "NCHW"), (-1, "NHWC")]
        for dtype in ("float16", "float32"):
            for channel_axis, layout in layouts:
                physical = shape if channel_axis == 1 else (shape[0],) + tuple(shape[2:]) + (shape[1],)
                params = cupy.ones(shape[1], cupy.float32), cupy.zeros(shape[1], cupy.float32)

                def data(seed):
                    return cupy.random.RandomState(seed).uniform(-2.0, 2.0, size=physical, dtype=cupy.float32).astype(dtype)

                start = time.perf_counter()
                absorb_stale_flag()
                flagged = 0
                for seed in range(seeds):
                    try:
                        cudnn_bn.forward_training(data(seed), *params, mode="spatial_persistent", channel_axis=channel_axis, on_overflow="raise")
                    except CudnnOverflowError:
                        flagged += 1
                difference, finite = 0.0, True
                for seed in range(seeds):
                    x = data(seed)
                    persistent, _ = cudnn_bn.forward_training(x, *params, mode="spatial_persistent", channel_axis=channel_axis, on_overflow="ignore")
                    spatial, _ = cudnn_bn.forward_training(x, *params, mode="spatial", channel_axis=channel_axis)
                    finite = finite and bool(cupy.isfinite(persistent).all())
                    difference = max(difference, float(cupy.abs(persistent.astype(cupy.float32) - spatial.astype(cupy.float32)).max()))
                absorb_stale_flag()
                emit(dict(kind="overflow_flag", shape="x".join(map(str, physical)), layout=layout, dtype=dtype, calls=seeds,
                          flagged=flagged, finite=finite, max_abs_difference_vs_spatial=f"{difference:.3e}",
                          seconds=round(time.perf_counter() - start, 3)))
                cupy.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------- child: query timing ----

QUERY_TIMING_SHAPES = [(8, 16, 4, 4), (32, 64, 56, 56)]  # kernel time next to nothing, and a benchmark shape


def child_query_timing(group: dict) -> None:
    import cupy
    import numpy

    import cudnn_bn

    from cudnn_bn import CudnnOverflowError
    from cudnn_bn._tools.timing import microseconds_per_call

    bn = RawBatchNorm(cupy)
    idle = microseconds_per_call(bn.overflow_flag, lambda: None, 2000)
    bn.close()
    emit(dict(kind="query_timing", measure="cudnnQueryRuntimeError (blocking) on an idle handle, us per call", value=f"{idle:.2f}"))
    synchronize = cupy.cuda.get_current_stream().synchronize
    for shape in QUERY_TIMING_SHAPES:
        x = cupy.asarray(numpy.random.default_rng(0).uniform(-2, 2, shape).astype(numpy.float32))
        gamma, beta = cupy.ones(shape[1], cupy.float32), cupy.zeros(shape[1], cupy.float32)
        label = "x".join(map(str, shape)) + " float32 NCHW forward_training, us per call"
        timings = {
            "SPATIAL": lambda: cudnn_bn.forward_training(x, gamma, beta, mode="spatial"),
            "SPATIAL + stream synchronize": lambda: (cudnn_bn.forward_training(x, gamma, beta, mode="spatial"), synchronize()),
            "SPATIAL_PERSISTENT on_overflow=ignore": lambda: cudnn_bn.forward_training(x, gamma, beta, mode="spatial_persistent", on_overflow="ignore"),
            "SPATIAL_PERSISTENT on_overflow=raise (checked)": lambda: cudnn_bn.forward_training(x, gamma, beta, mode="spatial_persistent", on_overflow="raise"),
        }
        for name, function in timings.items():
            flagged = []

            def call(function=function, flagged=flagged):
                try:
                    function()
                except CudnnOverflowError:  # a flag on this ordinary data is itself worth recording
                    flagged.append(1)

            value = f"{microseconds_per_call(call, synchronize, 300):.1f}"
            emit(dict(kind="query_timing", measure=f"{label}: {name}", value=value + (f" ({len(flagged)} calls flagged)" if flagged else "")))


CHILDREN = {"limit": child_limit, "overflow_flag": child_overflow_flag, "query_timing": child_query_timing}


# ---------------------------------------------------------------- parent ----

def _run_group(group: dict, python: str) -> tuple[list[dict], dict | None]:
    """Run one group in its own process; its records, and a problem record when it did not end well."""
    records, command = [], [python, "-u", os.path.abspath(__file__), "--child", group["name"]]
    print(f"[probes] group {group['name']} (limit {group['timeout']} s)", flush=True)
    start = time.perf_counter()
    python_path = os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path})
    timer = threading.Timer(group["timeout"], process.kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            print(f"  {line}", flush=True)
            if line.startswith(RECORD_PREFIX):
                try:
                    records.append(json.loads(line[len(RECORD_PREFIX):]))
                except json.JSONDecodeError:
                    pass
            else:
                tail = (tail + [line])[-8:]
        returncode = process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    if returncode == 0:
        return records, None
    why = "killed at its time limit" if seconds >= group["timeout"] else f"exit status {returncode}"
    return records, dict(group=group["name"], problem=f"{why} after {seconds:.1f} s", last_output=" | ".join(tail))


def _describe_edge(records: list[dict]) -> str:
    if not records:
        return "not reached"
    parts = []
    for record in records:
        text = record["status"].replace("CUDNN_STATUS_", "")
        if record.get("cuda_error"):
            text += f", then CUDA error {record['cuda_error']}"
        if record["check"] != "-":
            text += f", {record['check']}"
        parts.append(f"{record['operation']}: {text}")
    return "; ".join(parts)


def _holds(within: list[dict], past: list[dict], operations: list[str]) -> str:
    def clean(records):
        return len(records) == len(operations) and all(
            r["status"] == "CUDNN_STATUS_SUCCESS" and not r.get("cuda_error") and r["check"].startswith("matches") for r in records)

    if not within:
        return "unclear: no result within the limit (the group crashed or timed out first)"
    if not clean(within):
        return "unclear: the call within the limit failed"
    if clean(past):
        return "no: cuDNN ran past the limit and the results match"
    if any(r["status"] != "CUDNN_STATUS_SUCCESS" for r in past):
        return "yes: refused with a status"
    if past:
        return "yes, and worse: no refusal but a wrong result or a CUDA error"
    return "unclear: the call past the limit did not report (crash or timeout)"


def verdicts(groups: list[dict], records: list[dict]) -> list[dict]:
    rows = []
    for group in groups:
        if group["kind"] != "limit":
            continue
        mine = [r for r in records if r.get("kind") == "limit" and r["group"] == group["name"]]
        within = [r for r in mine if r["edge"] == "within"]
        past = [r for r in mine if r["edge"] == "past"]
        shapes = " vs ".join("x".join(map(str, case["shape"])) for case in group["cases"])
        rows.append(dict(limit=group["limit"], case=f"{group['mode']} {group['dtype']} {shapes}",
                         within=_describe_edge(within), past=_describe_edge(past),
                         holds=_holds(within, past, group["operations"])))
    return rows


def write(path: str, groups: list[dict], records: list[dict], problems: list[dict]) -> None:
    result = {
        "limits_probed": limit_numbers(),
        "verdicts": verdicts(groups, records),
        "overflow_flag": [r for r in records if r.get("kind") == "overflow_flag"],
        "query_timing": {r["measure"]: r["value"] for r in records if r.get("kind") == "query_timing"},
        "notes": [r for r in records if r.get("kind") == "note"],
        "records": [r for r in records if r.get("kind") == "limit"],
        "problems": [f"{p['group']}: {p['problem']} (last output: {p['last_output']})" for p in problems],
    }
    temporary = path + ".partial"
    with open(temporary, "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="probes.json", help="where to write the JSON results")
    parser.add_argument("--only", nargs="*", help="run only these groups (see --list)")
    parser.add_argument("--list", action="store_true", help="print the groups and their cases, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    groups = plan()
    if args.child:
        group = next(g for g in groups if g["name"] == args.child)
        CHILDREN[group["kind"]](group)
        return 0
    if args.only:
        unknown = set(args.only) - {g["name"] for g in groups}
        if unknown:
            parser.error(f"--only: unknown groups {sorted(unknown)}")
        groups = [g for g in groups if g["name"] in args.only]
    if args.list:
        for group in groups:
            cases = ", ".join(f"{c['edge']} {'x'.join(map(str, c['shape']))}" for c in group["cases"])
            print(f"{group['name']}: {group['kind']}, limit {group['timeout']} s{'; ' + cases if cases else ''}")
        return 0
    records, problems = [], []
    for group in groups:
        found, problem = _run_group(group, sys.executable)
        records += found
        if problem:
            problems.append(problem)
        write(args.out, groups, records, problems)
    for row in verdicts(groups, records):
        print(f"[probes] {row['limit']}, {row['case']}: {row['holds']}", flush=True)
    for problem in problems:
        print(f"[probes] problem: {problem['group']}: {problem['problem']}", flush=True)
    # a call within a limit that fails means the package's limits are not safe: that fails the step
    unclear = [row for row in verdicts(groups, records) if row["holds"].startswith("unclear")]
    return 1 if problems or unclear else 0


if __name__ == "__main__":
    sys.exit(main())
