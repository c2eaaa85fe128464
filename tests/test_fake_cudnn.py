"""The simulated GPU itself (tests/fake_cudnn.py): it must stay as strict as cuDNN, so each misuse
it refuses has a test here, driven through the raw entry points of the real, loaded library with
real descriptors. Status values are cuDNN's literals: 2000 CUDNN_STATUS_BAD_PARAM, 3000
CUDNN_STATUS_NOT_SUPPORTED, 1006 CUDNN_STATUS_RUNTIME_IN_PROGRESS, 1007
CUDNN_STATUS_RUNTIME_FP_OVERFLOW; modes 0 PER_ACTIVATION, 1 SPATIAL, 2 SPATIAL_PERSISTENT; data
types 0 FLOAT, 1 DOUBLE, 2 HALF; error-query modes 0 RAWCODE, 1 NONBLOCKING, 2 BLOCKING."""

from __future__ import annotations

import ctypes
import gc
import re
import sys
import threading
import warnings

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import Mode, reference
from cudnn_bn._cudnn.errors import CudnnError
from fake_cudnn import CUDNN_BN_MIN_EPSILON, FakeArray, OutOfMemoryError, simulated_gpu, virtual_array

BAD_PARAM, NOT_SUPPORTED, IN_PROGRESS, OVERFLOW = 2000, 3000, 1006, 1007
PER_ACTIVATION, SPATIAL, PERSISTENT = 0, 1, 2
FLOAT, DOUBLE, HALF = 0, 1, 2
RAWCODE, NONBLOCKING, BLOCKING = 0, 1, 2

TRAINING = "cudnnBatchNormalizationForwardTraining"
INFERENCE = "cudnnBatchNormalizationForwardInference"
BACKWARD = "cudnnBatchNormalizationBackward"
TRAINING_EX = "cudnnBatchNormalizationForwardTrainingEx"
BACKWARD_EX = "cudnnBatchNormalizationBackwardEx"

# parameter names in C order (as in cudnn_ops.h), so a test overrides one argument by name
PARAMETERS = {
    TRAINING: ("handle", "mode", "alpha", "beta", "xDesc", "x", "yDesc", "y", "pDesc", "scale", "bias", "factor",
               "runningMean", "runningVar", "epsilon", "saveMean", "saveInvVar"),
    INFERENCE: ("handle", "mode", "alpha", "beta", "xDesc", "x", "yDesc", "y", "pDesc", "scale", "bias",
                "estimatedMean", "estimatedVariance", "epsilon"),
    BACKWARD: ("handle", "mode", "alphaDataDiff", "betaDataDiff", "alphaParamDiff", "betaParamDiff", "xDesc", "x",
               "dyDesc", "dy", "dxDesc", "dx", "pDesc", "scale", "dscale", "dbias", "epsilon", "saveMean",
               "saveInvVar"),
    TRAINING_EX: ("handle", "mode", "bnOps", "alpha", "beta", "xDesc", "x", "zDesc", "z", "yDesc", "y", "pDesc",
                  "scale", "bias", "factor", "runningMean", "runningVar", "epsilon", "saveMean", "saveInvVar",
                  "activationDesc", "workspace", "workspaceSize", "reserve", "reserveSize"),
    BACKWARD_EX: ("handle", "mode", "bnOps", "alphaDataDiff", "betaDataDiff", "alphaParamDiff", "betaParamDiff",
                  "xDesc", "x", "yDesc", "y", "dyDesc", "dy", "dzDesc", "dz", "dxDesc", "dx", "pDesc", "scale",
                  "bias", "dscale", "dbias", "epsilon", "saveMean", "saveInvVar", "activationDesc", "workspace",
                  "workspaceSize", "reserve", "reserveSize"),
}


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


@pytest.fixture
def library(gpu):
    from cudnn_bn._cudnn import raw

    return raw.library()


@pytest.fixture
def cupy(gpu):
    return sys.modules["cupy"]


def _descriptor_maker(library, made: list):
    """make(data_type, dims, strides) -> a real tensor descriptor, its pointer also put in ``made``."""

    def make(data_type, dims, strides):
        pointer = ctypes.c_void_p()
        library.cudnnCreateTensorDescriptor(ctypes.byref(pointer))
        made.append(pointer.value)
        array = ctypes.c_int * len(dims)
        library.cudnnSetTensorNdDescriptor(pointer.value, data_type, len(dims), array(*dims), array(*strides))
        return pointer.value

    return make


@pytest.fixture
def descriptors(library):
    """make(data_type, dims, strides) -> a real tensor descriptor, destroyed after the test."""
    made = []
    yield _descriptor_maker(library, made)
    for pointer in made:
        try:
            library.cudnnDestroyTensorDescriptor(pointer)
        except CudnnError:
            pass  # a test destroyed it itself


def _packed(dims, order):
    """Strides of dims (N, C, spatial...) packed in the memory order ``order`` (outermost first)."""
    strides, step = [0] * len(dims), 1
    for axis in reversed(order):
        strides[axis] = step
        step *= dims[axis]
    return tuple(strides)


class Case:
    """Arrays and descriptors for one batch-norm call on an (N, C, spatial...) tensor."""

    def __init__(self, cupy, library, descriptors, dims=(4, 8, 3, 3), dtype=np.float32, channels_last=False,
                 mode=SPATIAL, seed=0):
        self.library, self.mode, self.dims = library, mode, dims
        code = {np.float32: FLOAT, np.float64: DOUBLE, np.float16: HALF}[dtype]
        order = (0,) + tuple(range(2, len(dims))) + (1,) if channels_last else tuple(range(len(dims)))
        self.strides = _packed(dims, order)
        memory_shape = tuple(dims[axis] for axis in order)
        rng = np.random.default_rng(seed)
        self.host_x = rng.standard_normal(memory_shape).astype(dtype)
        self.host_dy = rng.standard_normal(memory_shape).astype(dtype)
        self.x, self.dy = cupy.asarray(self.host_x), cupy.asarray(self.host_dy)
        self.y, self.dx = cupy.empty(memory_shape, dtype), cupy.empty(memory_shape, dtype)
        self.x_desc = descriptors(code, dims, self.strides)
        param_dims = (1, dims[1]) + (dims[2:] if mode == PER_ACTIVATION else (1,) * (len(dims) - 2))
        param_dtype = np.float64 if dtype == np.float64 else np.float32
        self.p_desc = descriptors(
            DOUBLE if dtype == np.float64 else FLOAT, param_dims, _packed(param_dims, range(len(dims)))
        )
        self.host_gamma = (0.5 + rng.random(param_dims)).astype(param_dtype)
        self.host_beta = rng.standard_normal(param_dims).astype(param_dtype)
        self.gamma, self.beta = cupy.asarray(self.host_gamma), cupy.asarray(self.host_beta)
        self.running_mean, self.running_var = cupy.zeros(param_dims, param_dtype), cupy.ones(param_dims, param_dtype)
        self.save_mean, self.save_inv = cupy.empty(param_dims, param_dtype), cupy.empty(param_dims, param_dtype)
        self.dgamma, self.dbeta = cupy.empty(param_dims, param_dtype), cupy.empty(param_dims, param_dtype)
        scalar = ctypes.c_double if dtype == np.float64 else ctypes.c_float
        self.one, self.zero = scalar(1.0), scalar(0.0)
        self.workspace, self.reserve = cupy.empty(256, np.uint8), cupy.empty(512, np.uint8)
        self.handle = new_handle(cupy, library)

    def args(self, function, **overrides):
        one, zero = ctypes.addressof(self.one), ctypes.addressof(self.zero)
        values = {
            "handle": self.handle, "mode": self.mode, "bnOps": 0, "alpha": one, "beta": zero, "alphaDataDiff": one,
            "betaDataDiff": zero, "alphaParamDiff": one, "betaParamDiff": zero, "xDesc": self.x_desc,
            "x": self.x.data.ptr, "yDesc": self.x_desc, "y": self.y.data.ptr, "dyDesc": self.x_desc,
            "dy": self.dy.data.ptr, "dxDesc": self.x_desc, "dx": self.dx.data.ptr, "zDesc": None, "z": None,
            "dzDesc": None, "dz": None, "pDesc": self.p_desc, "scale": self.gamma.data.ptr,
            "bias": self.beta.data.ptr, "dscale": self.dgamma.data.ptr, "dbias": self.dbeta.data.ptr,
            "factor": 0.25, "runningMean": self.running_mean.data.ptr, "runningVar": self.running_var.data.ptr,
            "estimatedMean": self.running_mean.data.ptr, "estimatedVariance": self.running_var.data.ptr,
            "epsilon": 1e-5, "saveMean": self.save_mean.data.ptr, "saveInvVar": self.save_inv.data.ptr,
            "activationDesc": None, "workspace": self.workspace.data.ptr, "workspaceSize": 256,
            "reserve": self.reserve.data.ptr, "reserveSize": 512,
        }
        unknown = set(overrides) - set(PARAMETERS[function])
        assert not unknown, f"{function} has no parameter {unknown}"
        values.update(overrides)
        return [values[name] for name in PARAMETERS[function]]

    def call(self, function, **overrides):
        getattr(self.library, function)(*self.args(function, **overrides))


def new_handle(cupy, library, stream=None):
    """A handle bound to the current stream (or ``stream``)."""
    handle = ctypes.c_void_p()
    library.cudnnCreate(ctypes.byref(handle))
    library.cudnnSetStream(handle.value, cupy.cuda.get_current_stream().ptr if stream is None else stream)
    return handle.value


def refused(status, call, *args, match=None, **kwargs):
    """Assert that ``call(*args, **kwargs)`` raises the CudnnError of ``status``; returns the error."""
    with pytest.raises(CudnnError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == status, str(caught.value)
    if match is not None:
        assert re.search(match, str(caught.value)), str(caught.value)
    return caught.value


def query(library, handle, mode=BLOCKING):
    status = ctypes.c_int(-1)
    library.cudnnQueryRuntimeError(handle, ctypes.byref(status), mode, None)
    return status.value


def expected_forward(case, eps=1e-5):
    """float64 batch-norm forward of the case's x, in cuDNN's (N, C, ...) order."""
    x = np.lib.stride_tricks.as_strided(case.host_x.astype(np.float64), case.dims, [s * 8 for s in case.strides])
    axes = (0,) if case.mode == PER_ACTIVATION else (0,) + tuple(range(2, x.ndim))
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * case.host_gamma + case.host_beta


def in_cudnn_order(case, array):
    host = array.get()
    return np.lib.stride_tricks.as_strided(host, case.dims, [s * host.itemsize for s in case.strides])


@pytest.fixture
def case(cupy, library, descriptors):
    return Case(cupy, library, descriptors)


# ---- asynchrony: kernels are queued on the handle's stream ----
def test_a_kernel_is_queued_and_runs_when_its_stream_synchronizes(gpu, cupy, case):
    case.call(TRAINING)
    stream = cupy.cuda.get_current_stream()
    assert not stream.done
    assert np.isnan(np.asarray(case.y)).all()  # numpy reads memory directly: the kernel has not run
    stream.synchronize()
    assert stream.done
    np.testing.assert_allclose(in_cudnn_order(case, case.y), expected_forward(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read", [
    lambda y: y.get(),
    lambda y: bool((y == y).all()),
    lambda y: float(y.sum()),
    lambda y: y.copy(),
    lambda y: y[0, 0, 0, 0],
    lambda y: repr(y),
], ids=["get", "bool", "float", "copy", "getitem", "repr"])
def test_a_host_read_runs_the_current_streams_queue_first(gpu, cupy, case, read):
    case.call(TRAINING)
    read(case.y)
    assert cupy.cuda.get_current_stream().done
    assert np.isfinite(np.asarray(case.y)).all()


def test_another_stream_sees_stale_data_until_the_writing_stream_synchronizes(gpu, cupy, case):
    writer = cupy.cuda.get_current_stream()
    case.call(TRAINING)
    with cupy.cuda.Stream(non_blocking=True):
        assert np.isnan(case.y.get()).all()  # synchronizes the reader's stream only
        assert bool(np.isnan(case.y).all()) and np.isnan(case.y.copy().get()).all()  # so do ufuncs and copies
    assert not writer.done
    writer.synchronize()
    assert np.isfinite(case.y.get()).all()


def test_device_synchronize_runs_every_stream_of_the_device(gpu, cupy, case):
    case.call(TRAINING)
    with cupy.cuda.Stream():
        cupy.cuda.Device(0).synchronize()
        assert np.isfinite(case.y.get()).all()


def test_descriptor_contents_are_read_when_the_call_is_made(gpu, cupy, library, case):
    case.call(TRAINING)
    array = ctypes.c_int * 4
    library.cudnnSetTensorNdDescriptor(case.x_desc, FLOAT, 4, array(1, 8, 1, 1), array(8, 1, 1, 1))
    library.cudnnDestroyTensorDescriptor(case.p_desc)
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_allclose(in_cudnn_order(case, case.y), expected_forward(case), rtol=1e-5, atol=1e-5)


def test_a_destroyed_descriptor_is_bad_param_not_a_read_of_freed_memory(gpu, library, case):
    library.cudnnDestroyTensorDescriptor(case.x_desc)
    refused(BAD_PARAM, case.call, TRAINING, match="destroyed")
    refused(BAD_PARAM, library.cudnnDestroyTensorDescriptor, case.x_desc, match="twice")


def test_the_simulated_kernels_agree_with_the_reference(gpu, cupy, library, descriptors):
    for mode, channels_last, dtype in [(PER_ACTIVATION, False, np.float64), (SPATIAL, True, np.float32),
                                       (PERSISTENT, False, np.float64)]:
        case = Case(cupy, library, descriptors, dims=(5, 3, 2, 4), dtype=dtype, channels_last=channels_last, mode=mode)
        case.call(TRAINING)
        case.call(BACKWARD)
        axis = -1 if channels_last else 1
        gamma = case.host_gamma.reshape(-1) if mode != PER_ACTIVATION else case.host_gamma[0]
        beta = case.host_beta.reshape(-1) if mode != PER_ACTIVATION else case.host_beta[0]
        x, dy = case.host_x.astype(np.float64), case.host_dy.astype(np.float64)
        y, saved = reference.forward_training(
            x, gamma.astype(np.float64), beta.astype(np.float64), mode=mode, channel_axis=axis
        )
        dx, dgamma, dbeta = reference.backward(x, dy, gamma.astype(np.float64), saved)
        tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(case.y.get(), y, **tolerance)
        np.testing.assert_allclose(case.dx.get(), dx, **tolerance)
        np.testing.assert_allclose(case.dgamma.get().reshape(dgamma.shape), dgamma, **tolerance)
        np.testing.assert_allclose(case.dbeta.get().reshape(dbeta.shape), dbeta, **tolerance)


def test_a_kernel_warns_of_nothing_and_lets_nan_and_inf_through(gpu, cupy, case):
    """A GPU kernel raises no floating-point warning: non-finite inputs give non-finite outputs."""
    shape = case.save_inv.shape
    case.save_mean = cupy.asarray(np.zeros(shape, np.float32))
    case.save_inv = cupy.asarray(np.full(shape, np.inf, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        case.call(BACKWARD)
        cupy.cuda.get_current_stream().synchronize()
    assert not np.isfinite(case.dx.get()).any()
    assert np.isfinite(case.dbeta.get()).all()  # the sum of dy alone: the kernel ran


# ---- memory: the registry, bounds, CuPy's stream-ordered pool ----
def test_an_extent_past_the_buffer_is_bad_param_not_a_crash(gpu, cupy, library, descriptors):
    case = Case(cupy, library, descriptors, dims=(2, 5, 3, 4), channels_last=True)
    unpermuted = descriptors(FLOAT, (2, 5, 3, 4), (60, 20, 5, 1))  # (N, H, W, C) strides on (N, C, H, W) dims
    error = refused(
        BAD_PARAM, case.call, TRAINING, xDesc=unpermuted, yDesc=unpermuted, match="outside any one live allocation"
    )
    assert "holds the pointer" in str(error)
    assert gpu.calls[-1] == TRAINING and gpu.refusals[-1][:2] == (TRAINING, BAD_PARAM)


def test_a_pointer_outside_every_allocation_is_bad_param(gpu, case):
    host_only = np.zeros(case.dims, np.float32)  # never viewed as FakeArray: not device memory
    refused(BAD_PARAM, case.call, TRAINING, y=host_only.ctypes.data, match="no live allocation")
    refused(BAD_PARAM, case.call, TRAINING, x=case.x.data.ptr + 8, match="outside")  # shifted past its end


def test_memory_dropped_after_queueing_stays_valid_for_its_stream(gpu, cupy, case):
    expected = expected_forward(case)
    scratch = cupy.asarray(case.host_x)  # allocated on the current stream, the kernel's stream
    case.call(TRAINING, x=scratch.data.ptr)
    del scratch
    gc.collect()
    np.testing.assert_allclose(in_cudnn_order(case, case.y), expected, rtol=1e-5, atol=1e-5)
    assert gpu.hazards == []


def test_memory_freed_while_another_streams_kernel_uses_it_is_a_hazard(gpu, cupy, case):
    with cupy.cuda.Stream():
        scratch = cupy.asarray(case.host_x)  # allocated on another stream than the kernel's
    case.call(TRAINING, x=scratch.data.ptr)
    del scratch
    gc.collect()
    assert len(gpu.hazards) == 1 and "was freed while kernels queued on stream" in gpu.hazards[0]
    assert np.isnan(case.y.get()).all()  # the kernel's outputs are poisoned
    gpu.hazards.clear()  # seen; the block would fail otherwise


def test_a_hazard_fails_the_simulated_gpu_block(cudnn_library):
    with pytest.raises(AssertionError, match="memory freed while queued kernels still used it"):
        with simulated_gpu() as simulator:
            simulator.hazards.append("a hazard")


def test_an_allocation_past_the_cap_is_out_of_memory(gpu, cupy):
    with pytest.raises(OutOfMemoryError, match="out of memory"):
        cupy.empty((5, 2**32 + 6), np.float32)


def test_arrays_carry_their_device_and_a_kernel_refuses_another_devices_memory(monkeypatch, cudnn_library,
                                                                               descriptors_2):
    cupy, library, make = descriptors_2
    case = Case(cupy, library, make)
    with cupy.cuda.Device(1):
        elsewhere = cupy.asarray(case.host_x)
        assert cupy.cuda.Device().id == 1
    assert elsewhere.device.id == 1 and case.x.device.id == 0 and cupy.cuda.Device().id == 0
    refused(BAD_PARAM, case.call, TRAINING, x=elsewhere.data.ptr, match="device 1")
    with cupy.cuda.Device(1):
        refused(BAD_PARAM, case.call, TRAINING, match="created on device 0 but device 1 is current")


@pytest.fixture
def descriptors_2(monkeypatch, cudnn_library):
    from cudnn_bn._cudnn import raw

    with simulated_gpu(monkeypatch, devices=2):
        library = raw.library()
        made = []
        yield sys.modules["cupy"], library, _descriptor_maker(library, made)
        for pointer in made:
            library.cudnnDestroyTensorDescriptor(pointer)


# ---- identities: handles, streams, threads ----
def test_every_create_gives_a_distinct_handle_and_destroy_refuses_a_stranger(gpu, cupy, library):
    handles = [new_handle(cupy, library) for _ in range(3)]
    assert len(set(handles)) == 3 and all(handles)
    library.cudnnDestroy(handles[0])
    refused(BAD_PARAM, library.cudnnDestroy, handles[0], match="was destroyed")
    refused(BAD_PARAM, library.cudnnDestroy, 0x1234, match="not a handle from cudnnCreate")
    refused(BAD_PARAM, library.cudnnSetStream, handles[0], 0)


def test_streams_have_distinct_nonzero_pointers_and_a_context_makes_one_current(gpu, cupy):
    main_default = cupy.cuda.get_current_stream()
    made = [cupy.cuda.Stream(), cupy.cuda.Stream(non_blocking=True)]
    other_thread = []
    worker = threading.Thread(target=lambda: other_thread.append(cupy.cuda.get_current_stream().ptr))
    worker.start()
    worker.join()
    pointers = [main_default.ptr, *(s.ptr for s in made), *other_thread]
    assert 0 not in pointers and len(set(pointers)) == 4
    assert cupy.cuda.Stream.null.ptr == 0
    with made[1]:
        assert cupy.cuda.get_current_stream() is made[1]
        with cupy.cuda.Stream.null:
            assert cupy.cuda.get_current_stream().ptr == 0
        assert cupy.cuda.get_current_stream() is made[1]
    assert cupy.cuda.get_current_stream() is main_default


def test_a_new_handle_is_bound_to_stream_0_and_a_kernel_on_another_stream_is_refused(gpu, cupy, library, case):
    unbound = ctypes.c_void_p()
    library.cudnnCreate(ctypes.byref(unbound))
    stream = ctypes.c_void_p(-1)
    library.cudnnGetStream(unbound.value, ctypes.byref(stream))
    assert stream.value is None  # the legacy default stream
    refused(BAD_PARAM, case.call, TRAINING, handle=unbound.value, match="current stream")
    case.call(TRAINING)  # bound to the current stream: accepted
    with cupy.cuda.Stream():
        refused(BAD_PARAM, case.call, TRAINING, match="bound to stream")


def test_set_stream_refuses_a_pointer_that_is_not_a_stream(gpu, library, case):
    refused(BAD_PARAM, library.cudnnSetStream, case.handle, 0x7A000, match="not a stream")


def test_a_handle_used_by_two_threads_at_once_is_bad_param(gpu, library, case):
    inside, leave = threading.Event(), threading.Event()

    def hold(name):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            leave.wait(10)

    gpu.delay = hold  # the worker stays inside the entry, holding the handle
    worker = threading.Thread(target=query, args=(library, case.handle))
    worker.start()
    try:
        assert inside.wait(10)
        refused(BAD_PARAM, case.call, TRAINING, match="two threads")
    finally:
        leave.set()
        worker.join()
    case.call(TRAINING)  # free again


def test_a_random_delay_setting_keeps_calls_correct(gpu, cupy, case):
    gpu.delay = (1.0, 0.001)  # probability, seconds
    case.call(TRAINING)
    np.testing.assert_allclose(in_cudnn_order(case, case.y), expected_forward(case), rtol=1e-5, atol=1e-5)


# ---- cuDNN's refusals ----
def test_the_descriptor_layer_refuses_element_counts_past_int32(library, descriptors):
    refused(NOT_SUPPORTED, descriptors, FLOAT, (2, 2**30, 1, 1), (2**30, 1, 1, 1))  # 2**31 elements
    refused(NOT_SUPPORTED, descriptors, FLOAT, (3, 1, 1, 1), (2**30, 1, 1, 1))  # extent past 2**31


def test_a_dim_truncated_by_a_c_int_is_not_supported(gpu, cupy, library, descriptors, case):
    huge = virtual_array((5, 2**32 + 6), np.float32)  # what c_int arrays would pass as (5, 6, 1, 1)
    truncated = descriptors(FLOAT, (5, 6, 1, 1), (6, 1, 1, 1))
    params = descriptors(FLOAT, (1, 6, 1, 1), (6, 1, 1, 1))
    gamma = cupy.ones(6, np.float32)
    args = dict(xDesc=truncated, yDesc=truncated, pDesc=params, scale=gamma.data.ptr, bias=gamma.data.ptr,
                runningMean=None, runningVar=None, saveMean=None, saveInvVar=None)
    refused(NOT_SUPPORTED, case.call, TRAINING, x=huge.data.ptr, y=huge.data.ptr, **args, match="truncated")


@pytest.mark.parametrize("function,mode,batch,status,source", [
    (TRAINING, PER_ACTIVATION, 131070, None, None), (TRAINING, PER_ACTIVATION, 131071, NOT_SUPPORTED, "pytorch#2917"),
    (BACKWARD, PER_ACTIVATION, 131070, None, None), (BACKWARD, PER_ACTIVATION, 131071, NOT_SUPPORTED, "pytorch#2917"),
    (TRAINING, SPATIAL, 880801, None, None), (TRAINING, SPATIAL, 880802, NOT_SUPPORTED, "PR #32763"),
    (BACKWARD, SPATIAL, 880802, NOT_SUPPORTED, "PR #32763"), (TRAINING, PERSISTENT, 880802, NOT_SUPPORTED, "PR #32763"),
    (INFERENCE, SPATIAL, 65535, None, None), (INFERENCE, SPATIAL, 65536, NOT_SUPPORTED, "pytorch#19911"),
    (INFERENCE, PER_ACTIVATION, 65536, NOT_SUPPORTED, "pytorch#19911"),
])
def test_the_batch_size_limits_are_refused_per_mode_with_the_reason(gpu, cupy, library, descriptors, function, mode,
                                                                    batch, status, source):
    case = Case(cupy, library, descriptors, dims=(batch, 1, 1, 1), mode=mode)
    if status is None:
        if function == BACKWARD:
            case.call(TRAINING)  # the saved statistics it reads
        case.call(function)
        assert np.isfinite((case.dx if function == BACKWARD else case.y).get()).all()
        assert not gpu.refusals
    else:
        refused(status, case.call, function, match=f"{Mode(mode).name} with N={batch}: cuDNN fails past")
        function_refused, status_refused, reason = gpu.refusals[-1]
        assert (function_refused, status_refused) == (function, status) and source in reason


def test_inference_in_spatial_persistent_is_not_supported(gpu, cupy, library, descriptors):
    case = Case(cupy, library, descriptors, mode=PERSISTENT)
    refused(NOT_SUPPORTED, case.call, INFERENCE, match="SPATIAL_PERSISTENT")


@pytest.mark.parametrize("function,name", [
    *((TRAINING, name) for name in ("alpha", "beta", "x", "y", "scale", "bias")),
    *((INFERENCE, name) for name in ("x", "y", "estimatedMean", "estimatedVariance")),
    *((BACKWARD, name) for name in ("alphaParamDiff", "betaDataDiff", "x", "dy", "dx", "scale", "dscale", "dbias")),
    (TRAINING, "xDesc"), (BACKWARD, "pDesc"),
])
def test_null_where_the_header_needs_a_pointer_is_bad_param(gpu, case, function, name):
    refused(BAD_PARAM, case.call, function, **{name: None})


@pytest.mark.parametrize("function,null", [
    (TRAINING, "runningMean"), (TRAINING, "runningVar"), (TRAINING, "saveMean"), (BACKWARD, "saveInvVar"),
])
def test_one_of_a_pair_of_statistics_is_bad_param(gpu, case, function, null):
    refused(BAD_PARAM, case.call, function, **{null: None}, match="both be NULL or both be set")


def test_statistics_that_may_be_null_are_accepted_as_pairs(gpu, cupy, case):
    case.call(TRAINING, runningMean=None, runningVar=None, saveMean=None, saveInvVar=None)
    case.call(BACKWARD, saveMean=None, saveInvVar=None)
    cupy.cuda.get_current_stream().synchronize()
    assert np.isfinite(case.dx.get()).all() and np.isnan(case.save_mean.get()).all()


def test_scalars_of_the_wrong_width_are_bad_param(gpu, cupy, library, descriptors, case):
    wide_one, wide_zero = ctypes.c_double(1.0), ctypes.c_double(0.0)  # read as C float: 0.0 and 0.0
    refused(BAD_PARAM, case.call, TRAINING, alpha=ctypes.addressof(wide_one), beta=ctypes.addressof(wide_zero),
            match="wrong width")
    double = Case(cupy, library, descriptors, dtype=np.float64)
    narrow_one, narrow_zero = (ctypes.c_float * 2)(1.0, 0.0), (ctypes.c_float * 2)(0.0, 0.0)
    refused(BAD_PARAM, double.call, BACKWARD, alphaDataDiff=ctypes.addressof(narrow_one),
            betaDataDiff=ctypes.addressof(narrow_zero), match="wrong width")
    refused(BAD_PARAM, case.call, TRAINING, alpha=case.gamma.data.ptr, match="device memory")


def test_epsilon_below_cudnn_bn_min_epsilon_is_bad_param(gpu, cupy, case, cudnn_headers):
    header = re.search(r"#define\s+CUDNN_BN_MIN_EPSILON\s+([0-9.eE+-]+)", "\n".join(cudnn_headers))
    assert header and float(header.group(1)) == CUDNN_BN_MIN_EPSILON == 0.0
    refused(BAD_PARAM, case.call, TRAINING, epsilon=-1e-12, match="CUDNN_BN_MIN_EPSILON")
    refused(BAD_PARAM, case.call, BACKWARD, epsilon=float("nan"))
    case.call(TRAINING, epsilon=0.0)  # the minimum itself is allowed


def test_descriptors_that_do_not_fit_the_call_are_bad_param(gpu, cupy, library, descriptors, case):
    other_dims = descriptors(FLOAT, (4, 8, 3, 2), (48, 6, 2, 1))
    other_type = descriptors(DOUBLE, (4, 8, 3, 3), (72, 9, 3, 1))
    three_dims = descriptors(FLOAT, (4, 8, 9), (72, 9, 1))
    per_activation_params = descriptors(FLOAT, (1, 8, 3, 3), (72, 9, 3, 1))
    double_params = descriptors(DOUBLE, (1, 8, 1, 1), (8, 1, 1, 1))
    refused(BAD_PARAM, case.call, TRAINING, yDesc=other_dims, match="does not match xDesc")
    refused(BAD_PARAM, case.call, BACKWARD, dxDesc=other_type, match="does not match xDesc")
    refused(BAD_PARAM, case.call, TRAINING, xDesc=three_dims, yDesc=three_dims, match="4-D or 5-D")
    refused(BAD_PARAM, case.call, TRAINING, pDesc=per_activation_params, match=r"dims \(1, 8, 1, 1\)")
    refused(BAD_PARAM, case.call, INFERENCE, pDesc=double_params)
    refused(BAD_PARAM, case.call, TRAINING, mode=3, match="cudnnBatchNormMode_t")


def test_persistent_backward_without_saved_statistics_is_bad_param(gpu, cupy, library, descriptors):
    case = Case(cupy, library, descriptors, mode=PERSISTENT)
    refused(BAD_PARAM, case.call, BACKWARD, saveMean=None, saveInvVar=None, match="saved")


@pytest.fixture
def ex_case(cupy, library, descriptors):
    # C = 12: a multiple of 4 that is not one of 8, so that a C % 8 condition would refuse it
    return Case(cupy, library, descriptors, dims=(6, 12, 3, 2), dtype=np.float16, channels_last=True, mode=PERSISTENT)


def test_the_ex_fast_path_is_accepted_and_carries_its_reserve_space(gpu, cupy, ex_case):
    ex_case.call(TRAINING_EX)
    ex_case.call(BACKWARD_EX)
    assert gpu.reserves[ex_case.reserve.data.ptr] == (512, ex_case.save_mean.data.ptr)
    assert np.isfinite(ex_case.dx.get()).all()


@pytest.mark.parametrize("override,status,match", [
    (dict(bnOps=1), NOT_SUPPORTED, "OPS_BN"),
    (dict(bnOps=7), BAD_PARAM, "cudnnBatchNormOps_t"),
    (dict(mode=SPATIAL), NOT_SUPPORTED, "mode SPATIAL_PERSISTENT"),
    (dict(workspace=None), BAD_PARAM, "NULL workspace"),
    (dict(workspaceSize=255), BAD_PARAM, "size query returned 256"),
    (dict(reserve=None), BAD_PARAM, "NULL reserveSpace"),
    (dict(reserveSize=511), BAD_PARAM, "size query returned 512"),
])
def test_the_ex_conditions_on_ops_mode_and_buffers(gpu, ex_case, override, status, match):
    refused(status, ex_case.call, TRAINING_EX, **override, match=match)


@pytest.mark.parametrize("dims,dtype,channels_last,match", [
    ((6, 8, 3, 2), np.float16, False, "fully packed NHWC"),
    ((6, 8, 3, 2), np.float32, True, "CUDNN_DATA_HALF"),
    ((6, 6, 3, 2), np.float16, True, r"C % 4 == 0 \(got C=6\)"),
])
def test_the_ex_conditions_on_layout_dtype_and_channels(gpu, cupy, library, descriptors, dims, dtype, channels_last,
                                                        match):
    case = Case(cupy, library, descriptors, dims=dims, dtype=dtype, channels_last=channels_last, mode=PERSISTENT)
    refused(NOT_SUPPORTED, case.call, TRAINING_EX, match=match)
    size = ctypes.c_size_t()
    refused(NOT_SUPPORTED, library.cudnnGetBatchNormalizationTrainingExReserveSpaceSize, case.handle, PERSISTENT, 0,
            None, case.x_desc, ctypes.byref(size))


def test_backward_ex_needs_the_reserve_space_of_the_forward_that_saved_the_statistics(gpu, cupy, ex_case):
    ex_case.call(TRAINING_EX)
    other = cupy.empty(512, np.uint8)
    refused(BAD_PARAM, ex_case.call, BACKWARD_EX, reserve=other.data.ptr, match="reserve space filled by")
    other_statistics = cupy.empty(8, np.float32)
    refused(BAD_PARAM, ex_case.call, BACKWARD_EX, saveMean=other_statistics.data.ptr, match="reserve space filled by")
    ex_case.call(BACKWARD_EX)


def test_the_backward_ex_workspace_query_needs_y_desc(gpu, library, ex_case):
    size = ctypes.c_size_t()

    def query_args(y_desc):
        return (ex_case.handle, PERSISTENT, 0, ex_case.x_desc, y_desc, ex_case.x_desc, None, ex_case.x_desc,
                ex_case.p_desc, None, ctypes.byref(size))

    refused(BAD_PARAM, library.cudnnGetBatchNormalizationBackwardExWorkspaceSize, *query_args(None),
            match="yDesc is NULL")
    library.cudnnGetBatchNormalizationBackwardExWorkspaceSize(*query_args(ex_case.x_desc))
    assert size.value == gpu.workspace_size == 256


def test_the_forward_ex_workspace_query_takes_x_or_nothing_as_z_desc(gpu, library, descriptors, ex_case, relu):
    size = ctypes.c_size_t()
    query = library.cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize
    args = lambda ops, z_desc, activation=None: (ex_case.handle, PERSISTENT, ops, ex_case.x_desc, z_desc,  # noqa: E731
                                                 ex_case.x_desc, ex_case.p_desc, activation, ctypes.byref(size))
    other = descriptors(HALF, (6, 12, 3, 4), _packed((6, 12, 3, 4), (0, 2, 3, 1)))
    for ops, activation in ((0, None), (1, relu), (2, relu)):
        query(*args(ops, ex_case.x_desc, activation))  # x's descriptor, as PyTorch and CuPy 13 pass it
        assert size.value == gpu.workspace_size
        refused(BAD_PARAM, query, *args(ops, other, activation), match="zDesc .* does not match xDesc")
    query(*args(0, None))  # bnOps BN and BN_ACTIVATION read no z: NULL is what MXNet and Caffe2 pass
    query(*args(1, None, relu))
    refused(BAD_PARAM, query, *args(2, None, relu), match="zDesc: NULL")


# ---- the overflow flag ----
def test_the_overflow_flag_is_per_handle_and_stays_set_until_read(gpu, cupy, library, descriptors):
    gpu.overflow_modes.add(PERSISTENT)
    case = Case(cupy, library, descriptors, mode=PERSISTENT)
    bystander = new_handle(cupy, library)
    case.call(TRAINING)
    assert query(library, case.handle, RAWCODE) == 0  # raised when the kernel runs, not when it is called
    assert query(library, case.handle, NONBLOCKING) == IN_PROGRESS
    cupy.cuda.get_current_stream().synchronize()
    assert np.isnan(case.y.get()).all() and np.isnan(case.running_mean.get()).all()
    assert query(library, bystander) == 0
    assert query(library, case.handle, RAWCODE) == OVERFLOW  # a raw read leaves it set
    assert query(library, case.handle, BLOCKING) == OVERFLOW
    assert query(library, case.handle, BLOCKING) == 0  # read once, then clear


def test_a_blocking_query_waits_for_the_handles_stream(gpu, cupy, library, descriptors):
    gpu.overflow_modes.add(PERSISTENT)
    case = Case(cupy, library, descriptors, mode=PERSISTENT)
    case.call(TRAINING)
    assert query(library, case.handle, BLOCKING) == OVERFLOW
    assert cupy.cuda.get_current_stream().done
    refused(BAD_PARAM, library.cudnnQueryRuntimeError, case.handle, ctypes.byref(ctypes.c_int()), 5, None)


def test_overflow_is_settled_at_the_call_and_shows_when_the_kernel_runs(gpu, cupy, library, descriptors):
    case = Case(cupy, library, descriptors, mode=PERSISTENT)
    gpu.overflow_modes.add(PERSISTENT)
    case.call(TRAINING)
    gpu.overflow_modes.clear()  # too late for the queued kernel
    case.call(TRAINING)  # this one does not overflow
    assert query(library, case.handle) == OVERFLOW and query(library, case.handle) == 0
    assert np.isfinite(case.y.get()).all()  # the second kernel overwrote the first one's NaN


def test_only_persistent_kernels_overflow(gpu, cupy, case, library):
    gpu.overflow_modes.add(SPATIAL)
    case.call(TRAINING)
    assert query(library, case.handle) == 0 and np.isfinite(case.y.get()).all()


# ---- the entry points themselves ----
def test_replacing_a_kernel_leaves_the_checks_in_place(gpu, cupy, case):
    gpu.kernels[TRAINING] = lambda launch: None  # e.g. a benchmark of the host side alone
    case.call(TRAINING)
    cupy.cuda.get_current_stream().synchronize()
    assert np.isnan(case.y.get()).all()
    refused(BAD_PARAM, case.call, TRAINING, x=None)


def test_simulated_gpu_works_outside_pytest_and_undoes_itself(cudnn_library):
    from cudnn_bn._cudnn import raw

    before_cupy, before_entry = sys.modules.get("cupy"), raw.library().cudnnBatchNormalizationForwardTraining
    with simulated_gpu() as simulator:
        assert sys.modules["cupy"].ndarray is FakeArray
        assert raw.library().cudnnBatchNormalizationForwardTraining is not before_entry
        assert simulator.calls == []
    assert sys.modules.get("cupy") is before_cupy
    assert raw.library().cudnnBatchNormalizationForwardTraining is before_entry


def test_every_entry_is_recorded_and_every_refusal_named(gpu, case):
    refused(BAD_PARAM, case.call, TRAINING, scale=None)
    assert gpu.calls[-1] == TRAINING
    function, status, reason = gpu.refusals[-1]
    assert (function, status) == (TRAINING, BAD_PARAM) and "bnScale" in reason


# ---- the fused Ex ops: bnOps BN_ACTIVATION (1) and BN_ADD_ACTIVATION (2) with a ReLU descriptor ----
FUSED_RESERVE = 512 + 4 * -(-(6 * 12 * 3 * 2) // 32)  # the BN reserve plus one bit per element of x


@pytest.fixture
def relu(library):
    from cudnn_bn._cudnn import raw
    from cudnn_bn._cudnn.descriptors import ActivationDescriptor

    with ActivationDescriptor.of(raw.ActivationMode.RELU) as descriptor:
        yield descriptor.pointer


@pytest.fixture
def fused_case(cupy, ex_case):
    rng = np.random.default_rng(4)
    ex_case.host_z = rng.standard_normal(ex_case.host_x.shape).astype(np.float16)
    ex_case.z, ex_case.dz = cupy.asarray(ex_case.host_z), cupy.empty(ex_case.host_x.shape, np.float16)
    ex_case.reserve = cupy.empty(FUSED_RESERVE, np.uint8)
    return ex_case


def _fused_arguments(case, ops, relu, **overrides):
    values = dict(bnOps=ops, activationDesc=relu, reserve=case.reserve.data.ptr, reserveSize=FUSED_RESERVE)
    if ops == 2:
        values.update(zDesc=case.x_desc, z=case.z.data.ptr)
    return {**values, **overrides}


def _fused_backward_arguments(case, ops, relu, **overrides):
    values = dict(bnOps=ops, activationDesc=relu, reserve=case.reserve.data.ptr, reserveSize=FUSED_RESERVE)
    if ops == 2:
        values.update(dzDesc=case.x_desc, dz=case.dz.data.ptr)
    return {**values, **overrides}


@pytest.mark.parametrize("ops", [1, 2])
def test_the_fused_ex_ops_compute_relu_of_batch_norm_plus_z_and_its_gradients(gpu, library, fused_case, relu, ops):
    case = fused_case
    size = ctypes.c_size_t()
    library.cudnnGetBatchNormalizationTrainingExReserveSpaceSize(case.handle, PERSISTENT, ops, relu, case.x_desc,
                                                                 ctypes.byref(size))
    assert size.value == FUSED_RESERVE
    case.call(TRAINING_EX, **_fused_arguments(case, ops, relu))
    x = case.host_x.astype(np.float64)  # memory order N, H, W, C
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    pre = (x - mean) / np.sqrt(var + 1e-5) * case.host_gamma.reshape(-1) + case.host_beta.reshape(-1)
    if ops == 2:
        pre = pre + case.host_z
    y = case.y.get()
    np.testing.assert_array_equal(y, np.maximum(pre, 0).astype(np.float16))
    case.call(BACKWARD_EX, **_fused_backward_arguments(case, ops, relu))
    grad = np.where(y > 0, case.host_dy.astype(np.float64), 0.0)
    if ops == 2:
        np.testing.assert_array_equal(case.dz.get(), grad.astype(np.float16))
    assert (case.dbeta.get().reshape(-1) == pytest.approx(grad.sum(axis=(0, 1, 2)), rel=1e-6, abs=1e-6))


@pytest.mark.parametrize("override,status,match", [
    (dict(activationDesc=None), NOT_SUPPORTED, "activationDesc is NULL"),
    (dict(z=None), BAD_PARAM, "NULL z"),
    (dict(zDesc=None), BAD_PARAM, "zDesc: NULL"),
    (dict(reserveSize=512), BAD_PARAM, f"size query returned {FUSED_RESERVE}"),
])
def test_the_fused_ex_forward_refuses(gpu, fused_case, relu, override, status, match):
    refused(status, fused_case.call, TRAINING_EX, **_fused_arguments(fused_case, 2, relu, **override), match=match)


def test_the_fused_ex_ops_apply_relu_only(gpu, library, fused_case):
    from cudnn_bn._cudnn import raw
    from cudnn_bn._cudnn.descriptors import ActivationDescriptor

    with ActivationDescriptor.of(raw.ActivationMode.SIGMOID) as sigmoid:
        refused(NOT_SUPPORTED, fused_case.call, TRAINING_EX, **_fused_arguments(fused_case, 1, sigmoid.pointer),
                match="CUDNN_ACTIVATION_RELU")
        size = ctypes.c_size_t()
        refused(NOT_SUPPORTED, library.cudnnGetBatchNormalizationTrainingExReserveSpaceSize, fused_case.handle,
                PERSISTENT, 1, sigmoid.pointer, fused_case.x_desc, ctypes.byref(size))


@pytest.mark.parametrize("override,status,match", [
    (dict(y=None), BAD_PARAM, "NULL yData"),
    (dict(bias=None), BAD_PARAM, "NULL bnBias"),
    (dict(dz=None), BAD_PARAM, "NULL dzData"),
    (dict(bnOps=1, dzDesc=None, dz=None), BAD_PARAM,
     "bnOps 1 got the reserve space of a ForwardTrainingEx with bnOps 2"),
])
def test_the_fused_ex_backward_refuses(gpu, fused_case, relu, override, status, match):
    fused_case.call(TRAINING_EX, **_fused_arguments(fused_case, 2, relu))
    refused(status, fused_case.call, BACKWARD_EX, **_fused_backward_arguments(fused_case, 2, relu, **override),
            match=match)
    fused_case.call(BACKWARD_EX, **_fused_backward_arguments(fused_case, 2, relu))  # the right call still runs


def test_get_waits_for_the_arrays_own_device_as_cupy_does(cudnn_library):
    # CuPy's get() enters the array's device: the work to wait for is on that device's stream,
    # whatever device is current when the result is read
    _, x, _, gamma, beta = make_case((4, 2, 2, 8), Mode.SPATIAL, -1, np.float32)
    with simulated_gpu(devices=2):
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(1):
            xd, gd, bd = (np.array(a, copy=True).view(FakeArray) for a in (x, gamma, beta))
            y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial", channel_axis=-1)
        expected, _ = reference.forward_training(x, gamma, beta, mode="spatial", channel_axis=-1)
        np.testing.assert_allclose(y.get(), expected, rtol=1e-5, atol=1e-6)  # read with device 0 current


# ---- the fused ReLU treats NaN as its descriptor says ----
@pytest.fixture
def relu_propagating_nan(library):
    """A ReLU activation descriptor created with CUDNN_PROPAGATE_NAN (cudnn_bn never makes one)."""
    from cudnn_bn._cudnn import raw

    pointer = ctypes.c_void_p()
    library.cudnnCreateActivationDescriptor(ctypes.byref(pointer))
    library.cudnnSetActivationDescriptor(pointer.value, int(raw.ActivationMode.RELU),
                                         int(raw.NanPropagation.PROPAGATE_NAN), 0.0)
    yield pointer.value
    library.cudnnDestroyActivationDescriptor(pointer.value)


def test_the_fused_relu_gives_0_for_nan_unless_its_descriptor_propagates_nan(gpu, cupy, fused_case, relu,
                                                                             relu_propagating_nan):
    case = fused_case
    host_z = case.host_z.copy()
    host_z[0, 0, 0, :2] = np.nan  # two pre-activations BN(x) + z of NaN
    case.z = cupy.asarray(host_z)
    outputs = {}
    for name, descriptor in (("not propagated", relu), ("propagated", relu_propagating_nan)):
        case.call(TRAINING_EX, **_fused_arguments(case, 2, descriptor))
        y = case.y.get()
        outputs[name] = y
        case.call(BACKWARD_EX, **_fused_backward_arguments(case, 2, descriptor))
        outputs[name + " dz"] = case.dz.get()
    np.testing.assert_array_equal(outputs["not propagated"][0, 0, 0, :2], 0.0)
    np.testing.assert_array_equal(outputs["not propagated dz"][0, 0, 0, :2], 0.0)
    assert np.isnan(outputs["propagated"][0, 0, 0, :2]).all() and np.isnan(outputs["propagated dz"][0, 0, 0, :2]).all()
    finite = np.isfinite(host_z)  # elsewhere the two agree
    np.testing.assert_array_equal(outputs["propagated"][finite], outputs["not propagated"][finite])


# ---- host synchronizations: counted where CUDA waits, refused while capturing ----
def _blocking_query(gpu, cupy, library, case):
    query(library, case.handle, BLOCKING)


def _destroy_a_handle(gpu, cupy, library, case):
    library.cudnnDestroy(new_handle(cupy, library))


COUNTED = {  # kind -> what makes one such wait (after one kernel queued on the current stream)
    "ndarray.get": lambda gpu, cupy, library, case: case.y.get(),
    "ndarray.__bool__": lambda gpu, cupy, library, case: bool(case.y[0, 0, 0, 0] > 0),
    "ndarray.__float__": lambda gpu, cupy, library, case: float(case.y.sum()),
    "ndarray.__int__": lambda gpu, cupy, library, case: int(case.y[0, 0, 0, 0]),
    "ndarray.item": lambda gpu, cupy, library, case: case.y[0, 0, 0, 0].item(),
    "ndarray.tolist": lambda gpu, cupy, library, case: case.y.tolist(),
    "ndarray.__repr__": lambda gpu, cupy, library, case: repr(case.y),
    "Stream.synchronize": lambda gpu, cupy, library, case: cupy.cuda.get_current_stream().synchronize(),
    "Event.synchronize": lambda gpu, cupy, library, case: _recorded_event(cupy).synchronize(),
    "Device.synchronize": lambda gpu, cupy, library, case: cupy.cuda.Device(0).synchronize(),
    "runtime.deviceSynchronize": lambda gpu, cupy, library, case: cupy.cuda.runtime.deviceSynchronize(),
    "cudnnQueryRuntimeError(BLOCKING)": _blocking_query,
    "cudnnDestroy": _destroy_a_handle,
    "ndarray.__format__": lambda gpu, cupy, library, case: format(case.y[0, 0, 0, 0], ".3f"),
    "ndarray.__index__": lambda gpu, cupy, library, case: [0, 1][cupy.zeros((), np.int64)],
    "ndarray.__contains__": lambda gpu, cupy, library, case: 0.5 in case.y,
    "ndarray.nonzero": lambda gpu, cupy, library, case: case.y.nonzero(),
    "ndarray.__getitem__(boolean mask)": lambda gpu, cupy, library, case: case.y[case.dx == case.dx],
    "where(condition)": lambda gpu, cupy, library, case: cupy.where(case.dx == case.dx),
}


def _recorded_event(cupy):
    event = cupy.cuda.Event()
    event.record()
    return event


@pytest.mark.parametrize("kind", sorted(COUNTED))
def test_each_kind_of_host_wait_counts_once_and_is_refused_while_capturing(gpu, cupy, library, case, kind):
    from fake_cudnn import StreamCaptureUnsupported

    case.call(TRAINING)
    before = gpu.host_syncs
    refusal = f"cudaErrorStreamCaptureUnsupported: {re.escape(kind)}"
    with gpu.capturing(), pytest.raises(StreamCaptureUnsupported, match=refusal):
        COUNTED[kind](gpu, cupy, library, case)
    assert gpu.host_syncs == before and not gpu.sync_points  # refused, not counted
    COUNTED[kind](gpu, cupy, library, case)
    assert gpu.host_syncs == before + 1 and gpu.sync_points == {kind: 1}
    assert cupy.cuda.get_current_stream().done  # and it did wait for the queued kernel


UNCOUNTED = {  # device work that the host runs in queue order, and calls that never wait
    "copy": lambda cupy, library, case: case.y.copy(),
    "ufunc": lambda cupy, library, case: case.y + 1,
    "reduction": lambda cupy, library, case: case.y.sum(),
    "vdot": lambda cupy, library, case: cupy.vdot(case.y, case.y),
    "reshape": lambda cupy, library, case: case.y.reshape(-1),
    "getitem": lambda cupy, library, case: case.y[0],
    "setitem": lambda cupy, library, case: case.dx.__setitem__((0, 0, 0, 0), 1.0),
    "astype": lambda cupy, library, case: case.y.astype(np.float64),
    "asarray of host data": lambda cupy, library, case: cupy.asarray(np.ones(3)),
    "set from the host": lambda cupy, library, case: case.dx.set(np.zeros(case.dx.shape, case.dx.dtype)),
    "NONBLOCKING query": lambda cupy, library, case: query(library, case.handle, NONBLOCKING),
    "RAWCODE query": lambda cupy, library, case: query(library, case.handle, RAWCODE),
    "event done": lambda cupy, library, case: _recorded_event(cupy).done,
    "stream done": lambda cupy, library, case: cupy.cuda.get_current_stream().done,
}


@pytest.mark.parametrize("name", sorted(UNCOUNTED))
def test_device_work_and_non_blocking_queries_are_not_host_waits(gpu, cupy, library, case, name):
    case.call(TRAINING)
    with gpu.capturing():
        UNCOUNTED[name](cupy, library, case)
    assert gpu.host_syncs == 0 and not gpu.sync_points


@pytest.mark.parametrize("function", ["array_equal", "array_equiv", "allclose"])
def test_comparisons_answer_with_a_device_array_read_only_when_asked(gpu, cupy, library, case, function):
    # CuPy returns a 0-d device array here: an `if` on it is the host read, counted there
    case.call(TRAINING)
    with gpu.capturing():
        answer = getattr(np, function)(case.y, case.y + 1)
    assert isinstance(answer, type(case.y)) and answer.shape == () and gpu.host_syncs == 0
    assert not bool(answer)
    assert gpu.sync_points == {"ndarray.__bool__": 1}


def test_queries_are_counted_by_mode(gpu, cupy, library, case):
    for mode in (RAWCODE, NONBLOCKING, NONBLOCKING, BLOCKING):
        query(library, case.handle, mode)
    assert gpu.runtime_queries == {"RAWCODE": 1, "NONBLOCKING": 2, "BLOCKING": 1}
    assert gpu.host_syncs == 1


def test_capture_refuses_waits_from_any_thread_and_ends_with_its_block(gpu, cupy, case):
    from fake_cudnn import StreamCaptureUnsupported

    case.call(TRAINING)
    refusals = []

    def wait():
        try:
            cupy.cuda.Device(0).synchronize()
        except StreamCaptureUnsupported as error:
            refusals.append(error)

    with gpu.capturing():
        thread = threading.Thread(target=wait)
        thread.start()
        thread.join(5)
    assert len(refusals) == 1
    wait()
    assert len(refusals) == 1 and gpu.host_syncs == 1


def test_the_per_thread_default_stream_is_each_threads_own_queue(gpu):
    # cudaStreamPerThread: one pointer, a queue per thread; work queued on it by one thread is not
    # waited for by another thread's synchronize of "the same" stream, only by its own event
    cupy = sys.modules["cupy"]
    assert cupy.cuda.Stream.ptds.ptr == 2
    queued = []

    def worker():
        with cupy.cuda.Stream.ptds:
            event = cupy.cuda.Event()  # queued on this thread's queue, where nothing runs it
            event.record()
            queued.append(event)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    (event,) = queued
    cupy.cuda.Stream.ptds.synchronize()  # this thread's own queue: empty
    assert not event.done
    event.synchronize()
    assert event.done
