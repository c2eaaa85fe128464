"""GPU probes of `.ci/gpu-validate`: facts about cuDNN 9 that decide this package's limits and policy.

    python .ci/gpu_probes.py --records checks.jsonl --set limits        # the smoke tier's limit probes
    python .ci/gpu_probes.py --records checks.jsonl --set query-timing  # the bench tier's
    python .ci/gpu_probes.py --records checks.jsonl --set int32         # by hand: 4 GiB tensors, minutes
    python .ci/gpu_probes.py --list [--set SET]                         # the plan, no GPU needed

1. limits: which of the batch limits in cudnn_bn/_cudnn/limits.py cuDNN 9 still has. cuDNN is
   called directly (the raw layer, bypassing the package, which routes around the limits) at each
   edge: PER_ACTIVATION training and backward at N = 131070, 131071 and 262136 (pytorch#2917; PR
   #32763 measured 131070 and 262136 on cuDNN 7.6.5), SPATIAL training and backward at 880801 and
   880802 (PyTorch's guard, PR #32763), SPATIAL inference at 65535 and 65536 (pytorch#19911). Each
   call's status is recorded and every result that came back is checked against float64.
2. query-timing: the cost of the blocking cudnnQueryRuntimeError, on its own and per call.
3. int32: element counts just under and just over 2**31 (float16 tensors of 4 GiB); in no tier.

Each group runs in its own process with its own time limit, so that a crash, a sticky CUDA error
or a hang past a limit costs that group only; the groups of a set run at the same time (their
tensors are small), except the int32 ones (8 GiB and more each), one after the other. Every
record is appended to the records file as it comes (.ci/gpu_evidence.py), and a verdict per
limit case once its group has ended. On the
simulated GPU (CUDNN_BN_SIMULATED_GPU=1) the groups run against tests/fake_cudnn.py, which
refuses what cuDNN is reported to refuse: the verdicts then show the simulator's rules.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)

RECORD_PREFIX = "PROBE "
ROOT = evidence.ROOT
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the repository is used from its root without an install step
SETS = ("limits", "query-timing", "int32")
SEQUENTIAL_SETS = ("int32",)  # groups whose tensors would not fit the GPU side by side


# ---------------------------------------------------------------- the plan ----

def limit_numbers() -> dict:
    """The limits the package enforces, read from its one place."""
    from cudnn_bn._cudnn.limits import LIMITS

    return dict(per_activation_training_max_batch=LIMITS.per_activation_training_max_batch,
                training_max_batch=LIMITS.training_max_batch, inference_max_batch=LIMITS.inference_max_batch,
                int32_max=LIMITS.int32_max, source="cudnn_bn/_cudnn/limits.py")


# PyTorch PR #32763 measured 262136 for PER_ACTIVATION training on cuDNN 7.6.5 next to 131070
PER_ACTIVATION_MEASURED_BATCH = 262136
# each group of the limits set, in its own process: Python, CuPy, a CUDA context, libcudnn and a
# handle, and the first compilation of CuPy's fill kernel on a fresh machine, then a few small calls
LIMIT_GROUP_TIMEOUT_S = 20


def plan() -> list[dict]:
    """Every group: name, set, kind, time limit in seconds, and its cases (within the limit first)."""
    numbers = limit_numbers()
    per_activation, spatial = numbers["per_activation_training_max_batch"], numbers["training_max_batch"]
    inference = numbers["inference_max_batch"]
    rest = (1, 1, 1)  # (N, 1, 1, 1): only N matters; pytorch#2917 and pytorch#19911 reproduce with it
    groups = [
        dict(name="training-batch-per_activation-float32", set="limits", kind="limit",
             limit="PER_ACTIVATION training batch", operations=["forward_training", "backward"], mode="PER_ACTIVATION",
             dtype="float32", timeout=LIMIT_GROUP_TIMEOUT_S,
             cases=[dict(edge="within", shape=(per_activation,) + rest),
                    dict(edge="past", shape=(per_activation + 1,) + rest),
                    dict(edge="past", shape=(PER_ACTIVATION_MEASURED_BATCH,) + rest)]),
        dict(name="training-batch-spatial-float32", set="limits", kind="limit", limit="SPATIAL training batch",
             operations=["forward_training", "backward"], mode="SPATIAL", dtype="float32",
             timeout=LIMIT_GROUP_TIMEOUT_S,
             cases=[dict(edge="within", shape=(spatial,) + rest), dict(edge="past", shape=(spatial + 1,) + rest)]),
        dict(name="inference-batch-spatial-float32", set="limits", kind="limit", limit="inference batch",
             operations=["forward_inference"], mode="SPATIAL", dtype="float32", timeout=LIMIT_GROUP_TIMEOUT_S,
             cases=[dict(edge="within", shape=(inference,) + rest), dict(edge="past", shape=(inference + 1,) + rest)]),
        dict(name="query-timing", set="query-timing", kind="query_timing", timeout=12, cases=[]),
    ]
    # element count around 2**31 (float16: 4 GiB a tensor); every dim and stride stays below 2**31
    height = 2**14
    for mode, operations in [("SPATIAL", ["forward_training", "backward"]), ("SPATIAL", ["forward_inference"]),
                             ("SPATIAL_PERSISTENT", ["forward_training"])]:
        groups.append(dict(
            name=f"int32-count-{mode.lower()}-{operations[0]}", set="int32", kind="limit", limit="int32 element count",
            operations=operations, mode=mode, dtype="float16", timeout=90,
            cases=[dict(edge="within", shape=(2, 4, height, height - 1)),
                   dict(edge="past", shape=(2, 4, height, height + 1))]))
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
        self.library.cudnnQueryRuntimeError(
            self.handle, ctypes.byref(status), int(self.raw.ErrQueryMode.BLOCKING), None
        )
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


def _verdict(errors: dict, dtype: str) -> str:
    from cudnn_bn._core.tolerances import tolerance as tolerances

    tolerance = tolerances(dtype)[0]  # relative to each result's largest expected value
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
        block_shape = (self.shape[1], block_height, self.shape[3])
        block = numpy.random.default_rng(seed).standard_normal(block_shape).astype(self.dtype)
        device_block = cupy.asarray(block)
        data = cupy.empty(self.shape, dtype=self.dtype)
        for n in range(self.shape[0]):  # each sample < 2**31 elements: plain CuPy kernels suffice
            tiles = data[n].reshape(self.shape[1], self.shape[2] // block_height, block_height, self.shape[3])
            tiles[...] = device_block[:, None]
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
        return [
            device_array[n].reshape(-1)[self.cupy.asarray(index)].get().astype(self.numpy.float64)
            for n in range(self.shape[0])
        ]

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
        save_mean, save_inv_std = self._params(
            numpy.full(self.param_shape, numpy.nan), numpy.full(self.param_shape, numpy.nan)
        )
        y = self._output()
        status, cuda_error, seconds = self._call(
            "forward_training", bn.library.cudnnBatchNormalizationForwardTraining, bn.handle, mode_value(self.mode),
            bn.alpha, bn.beta, x_desc, x.data.ptr, x_desc, y.data.ptr, p_desc, gamma.data.ptr, beta.data.ptr,
            self.FACTOR, running_mean.data.ptr, running_var.data.ptr, self.EPS, save_mean.data.ptr,
            save_inv_std.data.ptr)
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
            if "backward" in self.group["operations"]:
                # the backward has a limit of its own: probe it with exact statistics
                save_mean, save_inv_std = self._params(mean, inv_std)
                return self._backward(
                    x_desc, p_desc, x, host, gamma, gamma_host, save_mean, save_inv_std, mean, inv_std
                )
            return True
        errors = {
            "saved mean": _relative(save_mean.get(), mean.reshape(self.param_shape), numpy),
            "saved inv_std": _relative(save_inv_std.get(), inv_std.reshape(self.param_shape), numpy),
            "running var": _relative(
                running_var.get(), (variance * self.count / (self.count - 1)).reshape(self.param_shape), numpy
            ),
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
            samples = zip(self._samples(x, index), self._samples(dy, index), self._samples(dx, index))
            for x_values, dy_values, dx_values in samples:
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


# ---------------------------------------------------------------- child: query timing ----

QUERY_TIMING_SHAPES = [(8, 16, 4, 4), (32, 64, 56, 56)]  # kernel time next to nothing, and a benchmark shape
QUERY_TIMING_CALLS = 300
# the simulated GPU computes each kernel with the float64 reference on the host: the small shape only
SIMULATED_QUERY_TIMING_SHAPES, SIMULATED_QUERY_TIMING_CALLS = [(8, 16, 4, 4)], 20


def child_query_timing(group: dict) -> None:
    import cupy
    import numpy

    import cudnn_bn
    from cudnn_bn import CudnnOverflowError
    from cudnn_bn._tools.timing import microseconds_per_call

    simulated = evidence.simulated()
    if simulated:
        shapes, calls = SIMULATED_QUERY_TIMING_SHAPES, SIMULATED_QUERY_TIMING_CALLS
    else:
        shapes, calls = QUERY_TIMING_SHAPES, QUERY_TIMING_CALLS
    bn = RawBatchNorm(cupy)
    idle = microseconds_per_call(bn.overflow_flag, lambda: None, 2000)
    bn.close()
    emit(dict(kind="query_timing", measure="cudnnQueryRuntimeError (blocking) on an idle handle, us per call",
              value=f"{idle:.2f}"))
    synchronize = cupy.cuda.get_current_stream().synchronize
    for shape in shapes:
        x = cupy.asarray(numpy.random.default_rng(0).uniform(-2, 2, shape).astype(numpy.float32))
        gamma, beta = cupy.ones(shape[1], cupy.float32), cupy.zeros(shape[1], cupy.float32)
        label = "x".join(map(str, shape)) + " float32 NCHW forward_training, us per call"
        timings = {
            "SPATIAL": lambda: cudnn_bn.forward_training(x, gamma, beta, mode="spatial"),
            "SPATIAL + stream synchronize": lambda: (
                cudnn_bn.forward_training(x, gamma, beta, mode="spatial"), synchronize()
            ),
            "SPATIAL_PERSISTENT on_overflow=ignore": lambda: cudnn_bn.forward_training(
                x, gamma, beta, mode="spatial_persistent", on_overflow="ignore"
            ),
            "SPATIAL_PERSISTENT on_overflow=raise (checked)": lambda: cudnn_bn.forward_training(
                x, gamma, beta, mode="spatial_persistent", on_overflow="raise"
            ),
        }
        for name, function in timings.items():
            flagged = []

            def call(function=function, flagged=flagged):
                try:
                    function()
                except CudnnOverflowError:  # a flag on this ordinary data is itself worth recording
                    flagged.append(1)

            value = f"{microseconds_per_call(call, synchronize, calls):.1f}"
            if flagged:
                value += f" ({len(flagged)} calls flagged)"
            emit(dict(kind="query_timing", measure=f"{label}: {name}", value=value))


CHILDREN = {"limit": child_limit, "query_timing": child_query_timing}


# ---------------------------------------------------------------- parent ----

def _run_group(group: dict, python: str, records: evidence.RecordWriter) -> tuple[list[dict], dict | None]:
    """Run one group in its own process, appending its records as they come; its records, and a
    problem record when it did not end well. Safe to run for several groups at once (the record
    writer takes a lock; each output line is printed whole, with its group's name)."""
    found, command = [], [python, "-u", os.path.abspath(__file__), "--child", group["name"]]
    print(f"[probes] group {group['name']} (limit {group['timeout']} s)", flush=True)
    start = time.perf_counter()
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    python_path = os.pathsep.join([ROOT] + inherited)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path})
    timer = threading.Timer(group["timeout"], process.kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(RECORD_PREFIX):
                try:
                    record = json.loads(line[len(RECORD_PREFIX):])
                except json.JSONDecodeError:
                    continue
                found.append(records.write(**record))
            else:
                print(f"  [{group['name']}] {line}", flush=True)
                tail = (tail + [line])[-8:]
        returncode = process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    if returncode == 0:
        return found, None
    why = "killed at its time limit" if seconds >= group["timeout"] else f"exit status {returncode}"
    problem = records.write(kind="problem", group=group["name"], problem=f"{why} after {seconds:.1f} s",
                            last_output=" | ".join(tail))
    return found, problem


def _run_groups(groups: list[dict], records: evidence.RecordWriter,
                at_once: bool) -> list[tuple[list[dict], dict | None]]:
    """_run_group for each group, all at the same time or one after the other; results in the
    groups' order."""
    if not at_once:
        return [_run_group(group, sys.executable, records) for group in groups]
    results: list = [None] * len(groups)

    def run(index: int) -> None:
        try:
            results[index] = _run_group(groups[index], sys.executable, records)
        except Exception as error:  # recorded, so that the verdicts say "unclear" for this group
            problem = records.write(kind="problem", group=groups[index]["name"],
                                    problem=f"could not run: {type(error).__name__}: {error}", last_output="")
            results[index] = ([], problem)

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


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
            r["status"] == "CUDNN_STATUS_SUCCESS" and not r.get("cuda_error") and r["check"].startswith("matches")
            for r in records
        )

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


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def verdicts(groups: list[dict], records: list[dict]) -> list[dict]:
    """One row per limit case past the limit: the calls within it and past it, and whether the
    limit holds there."""
    rows = []
    for group in groups:
        if group["kind"] != "limit":
            continue
        mine = [r for r in records if r.get("kind") == "limit" and r["group"] == group["name"]]
        within_case = next(case for case in group["cases"] if case["edge"] == "within")
        within = [r for r in mine if r["edge"] == "within"]
        for case in (case for case in group["cases"] if case["edge"] == "past"):
            past = [r for r in mine if r["edge"] == "past" and tuple(r["shape"]) == tuple(case["shape"])]
            compared = f"{_shape_text(within_case['shape'])} vs {_shape_text(case['shape'])}"
            rows.append(dict(kind="limit-verdict", group=group["name"], limit=group["limit"],
                             case=f"{group['mode']} {group['dtype']} {compared}", within=_describe_edge(within),
                             past=_describe_edge(past), holds=_holds(within, past, group["operations"])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="checks.jsonl", help="the JSON-lines file the records are appended to")
    parser.add_argument("--set", choices=SETS, default="limits", help="which groups to run")
    parser.add_argument("--only", nargs="*", help="run only these groups of the set (see --list)")
    parser.add_argument("--list", action="store_true", help="print the groups and their cases, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    groups = plan()
    if args.child:
        group = next(g for g in groups if g["name"] == args.child)
        with evidence.gpu_of_this_run():
            CHILDREN[group["kind"]](group)
        return 0
    groups = [g for g in groups if g["set"] == args.set]
    if args.only:
        unknown = set(args.only) - {g["name"] for g in groups}
        if unknown:
            parser.error(f"--only: unknown groups {sorted(unknown)} in set {args.set}")
        groups = [g for g in groups if g["name"] in args.only]
    if args.list:
        for group in groups:
            cases = ", ".join(f"{c['edge']} {_shape_text(c['shape'])}" for c in group["cases"])
            print(f"{group['name']}: {group['kind']}, limit {group['timeout']} s{'; ' + cases if cases else ''}")
        return 0
    step = {"limits": "limit-probes", "query-timing": "query-timing"}.get(args.set, f"probes-{args.set}")
    tier = {"limits": "smoke", "query-timing": "bench"}.get(args.set, "-")
    records = evidence.RecordWriter(args.records, tier=tier, step=step, simulated=evidence.simulated())
    found, problems = [], []
    try:
        for group_records, problem in _run_groups(groups, records, at_once=args.set not in SEQUENTIAL_SETS):
            found += group_records
            if problem:
                problems.append(problem)
        rows = [records.write(**row) for row in verdicts(groups, found)]
    finally:
        records.close()
    for row in rows:
        print(f"[probes] {row['limit']}, {row['case']}: {row['holds']}", flush=True)
    for problem in problems:
        print(f"[probes] problem: {problem['group']}: {problem['problem']}", flush=True)
    # a call within a limit that fails means the package's limits are not safe: that fails the step
    unclear = [row for row in rows if row["holds"].startswith("unclear")]
    return 1 if problems or unclear else 0


if __name__ == "__main__":
    sys.exit(main())
