"""on_overflow="deferred" (cudnn_bn/_cudnn/deferred.py) on the simulated GPU: its calls wait for
nothing; cudnn_bn.check_overflow() reads the flags and raises what it found once, naming the calls
that may have overflowed; no flag is lost by a handle's rebinding to another stream or by a
later call's poll, across streams, threads and devices; checked calls never see a deferred flag."""

from __future__ import annotations

import dataclasses
import re
import sys
import threading

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import BatchNorm, CudnnOverflowError, Mode, compat, fused
from cudnn_bn._cudnn import deferred, handles
from fake_cudnn import FakeArray, simulated_gpu

SHAPE = (8, 4, 3, 3)


@pytest.fixture
def gpu(fresh_simulated_gpu):
    yield fresh_simulated_gpu
    handles.close_all()  # forgets what a failed test left


@pytest.fixture
def cupy(gpu):
    return sys.modules["cupy"]


def _device(*arrays):
    return [None if a is None else np.array(a, copy=True).view(FakeArray) for a in arrays]


def _arrays(shape=SHAPE, axis=1, dtype=np.float32, seed=0):
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, axis, dtype, seed=seed)
    running = (np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32))
    return _device(x, dy, gamma, beta, *running)


def _forward(x, gamma, beta, running_mean=None, running_var=None, axis=1):
    return cudnn_bn.forward_training(x, gamma, beta, running_mean, running_var, mode="spatial_persistent",
                                     channel_axis=axis, on_overflow="deferred")


def _called(shape, operation="forward_training", dtype="float32", count=1) -> str:
    return f"{count} x {operation} of {shape} {dtype} in SPATIAL_PERSISTENT"


def test_deferred_calls_wait_for_nothing_and_the_check_raises_once_naming_them(gpu):
    x, dy, gamma, beta, mean, var = _arrays()
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    y, saved = _forward(x, gamma, beta, mean, var)  # overflows when it runs; nothing raises here
    cudnn_bn.backward(x, dy, gamma, saved)
    assert saved.on_overflow == "deferred" and gpu.host_syncs == 0
    assert gpu.runtime_queries == {}  # not even a poll: nothing had finished
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    message = str(raised.value)
    assert raised.value.function == "cudnn_bn.check_overflow" and raised.value.status == 1007
    # forward and backward shared the handle, whose one flag cannot tell which of them overflowed
    assert _called(SHAPE) in message and _called(SHAPE, "backward") in message
    assert "cannot be restored" in message
    assert gpu.host_syncs == 1 and gpu.runtime_queries == {"BLOCKING": 1}
    assert np.isnan(y.get()).all() and np.isnan(mean.get()).all()  # deferral gives these up
    assert cudnn_bn.check_overflow() is None  # raised once


def test_the_check_names_only_the_calls_since_the_last_check(gpu):
    x, _, gamma, beta, mean, var = _arrays()
    _forward(x, gamma, beta, mean, var)
    assert cudnn_bn.check_overflow() is None
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _forward(x, gamma, beta, mean, var)
    _forward(x, gamma, beta, mean, var)
    with pytest.raises(CudnnOverflowError, match=re.escape(_called(SHAPE, count=2) + ".")):
        cudnn_bn.check_overflow()


def test_a_check_with_nothing_deferred_waits_for_nothing(gpu):
    x, _, gamma, beta, mean, var = _arrays()
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial_persistent", on_overflow="ignore")
    assert cudnn_bn.check_overflow() is None and gpu.host_syncs == 0 and gpu.runtime_queries == {}


def test_a_deferred_flag_survives_the_handles_rebinding_to_another_stream(gpu, cupy):
    handles.pool_for(0, handles.DEFERRED).size = 1  # every deferred call borrows the same handle
    first, second = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with first:
        x, _, gamma, beta, _, _ = _arrays()
        gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        _forward(x, gamma, beta)  # queued on the first stream, not run
        gpu.overflow_modes.clear()
    with second:
        x2, _, gamma2, beta2, _, _ = _arrays(shape=(6, 4, 2, 2))
        _forward(x2, gamma2, beta2)  # the handle moves to the second stream; nothing waits
    assert gpu.host_syncs == 0 and gpu.calls.count("cudnnSetStream") == 2
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    assert _called(SHAPE) in str(raised.value) and _called((6, 4, 2, 2)) in str(raised.value)
    # the first stream's event, then the blocking query on the second
    assert gpu.sync_points == {"Event.synchronize": 1, "cudnnQueryRuntimeError(BLOCKING)": 1}


def test_a_poll_by_a_later_call_only_records_what_it_reads(gpu, cupy):
    x, _, gamma, beta, _, _ = _arrays()
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _forward(x, gamma, beta)
    gpu.overflow_modes.clear()
    cupy.cuda.get_current_stream().synchronize()  # the kernel has run: the next borrower can read the flag
    x2, _, gamma2, beta2, _, _ = _arrays(shape=(6, 4, 2, 2))
    _forward(x2, gamma2, beta2)  # polls the flag, finds the overflow, records it and goes on
    assert gpu.runtime_queries == {"NONBLOCKING": 1}
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    assert _called(SHAPE) in str(raised.value) and "(6, 4, 2, 2)" not in str(raised.value)
    assert cudnn_bn.check_overflow() is None


def test_a_poll_that_finds_the_stream_busy_reads_nothing(gpu, cupy):
    handles.pool_for(0, handles.DEFERRED).size = 1
    first, second, third = (cupy.cuda.Stream(non_blocking=True) for _ in range(3))
    with first:
        x, _, gamma, beta, _, _ = _arrays()
        _forward(x, gamma, beta)
    with second:
        x2, _, gamma2, beta2, _, _ = _arrays(shape=(6, 4, 2, 2))
        gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        _forward(x2, gamma2, beta2)  # no poll: nothing had finished
        gpu.overflow_modes.clear()
    first.synchronize()  # the first stream's call has finished, the second's has not
    with third:
        x3, _, gamma3, beta3, _, _ = _arrays(shape=(5, 4, 2, 2))
        _forward(x3, gamma3, beta3)  # polls on the handle's stream, the second: RUNTIME_IN_PROGRESS
    assert gpu.runtime_queries == {"NONBLOCKING": 1} and deferred._FOUND == {}
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    message = str(raised.value)
    for shape in (SHAPE, (6, 4, 2, 2), (5, 4, 2, 2)):  # all three on the flagged handle, none settled before
        assert _called(shape) in message


def test_checked_calls_never_see_a_deferred_flag_and_deferred_ones_never_raise(gpu, cupy):
    x, dy, gamma, beta, _, _ = _arrays()
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _forward(x, gamma, beta)
    gpu.overflow_modes.clear()
    for _ in range(2):
        y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial_persistent", on_overflow="raise")
        cudnn_bn.backward(x, dy, gamma, saved)
    assert np.isfinite(y.get()).all()
    with pytest.raises(CudnnOverflowError, match=re.escape(_called(SHAPE) + ".")):
        cudnn_bn.check_overflow()


def test_threads_on_their_own_streams_each_get_their_calls_named(gpu, cupy):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    errors, barrier = [], threading.Barrier(4)

    def worker(rank):
        try:
            with cupy.cuda.Stream(non_blocking=True) as stream:
                x, dy, gamma, beta, _, _ = _arrays(shape=(4 + rank, 4, 2, 2), seed=rank)
                barrier.wait(5)
                for _ in range(3):
                    _, saved = _forward(x, gamma, beta)
                    cudnn_bn.backward(x, dy, gamma, saved)
                stream.synchronize()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []  # no call raised
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    for rank in range(4):
        shape = (4 + rank, 4, 2, 2)
        assert _called(shape, count=3) in str(raised.value) and _called(shape, "backward", count=3) in str(raised.value)
    assert cudnn_bn.check_overflow() is None


def test_each_device_reads_the_flags_of_its_own_handles(monkeypatch, cudnn_library):
    handles.close_all()
    with simulated_gpu(monkeypatch, devices=2) as gpu:
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(1):
            x1, _, gamma1, beta1, _, _ = _arrays(shape=(6, 4, 2, 2))
            gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
            _forward(x1, gamma1, beta1)
            gpu.overflow_modes.clear()
        x0, _, gamma0, beta0, _, _ = _arrays()
        _forward(x0, gamma0, beta0)
        with pytest.raises(CudnnOverflowError) as raised:
            cudnn_bn.check_overflow()
        assert _called((6, 4, 2, 2)) in str(raised.value) and str(SHAPE) not in str(raised.value)
        assert gpu.runtime_queries == {"BLOCKING": 2}  # one per device's handle
    handles.close_all()


def test_saved_statistics_from_elsewhere_are_checked_on_the_device_and_read_by_the_check(gpu):
    x, dy, gamma, beta, _, _ = _arrays()
    _, saved = _forward(x, gamma, beta)
    foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())
    cudnn_bn.backward(x, dy, gamma, foreign)
    assert gpu.host_syncs == 0
    assert cudnn_bn.check_overflow() is None  # finite: the check read it (one wait more) and found nothing
    assert gpu.host_syncs == 2
    poisoned = saved.inv_std.copy()
    poisoned[0] = np.nan
    cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, inv_std=poisoned))
    with pytest.raises(ValueError, match=r"were not finite.*1 x backward of \(8, 4, 3, 3\) float32"):
        cudnn_bn.check_overflow()
    assert cudnn_bn.check_overflow() is None


def test_the_layer_defers_and_the_step_check_reads_every_layers_calls(gpu, cupy):
    layers = [BatchNorm(4, mode="spatial_persistent", on_overflow="deferred", xp=cupy) for _ in range(3)]
    assert "on_overflow='deferred'" in repr(layers[0])
    x, dy, _, _, _, _ = _arrays()
    for step in range(3):
        if step == 2:
            gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        before = gpu.host_syncs
        out = x
        for layer in layers:
            out = layer(out)
        grad = dy
        for layer in reversed(layers):
            grad = layer.backward(grad)
        assert gpu.host_syncs == before  # the step itself waits for nothing
        if step < 2:
            assert cudnn_bn.check_overflow() is None
        else:
            with pytest.raises(CudnnOverflowError, match=re.escape(_called(SHAPE, count=3))):
                cudnn_bn.check_overflow()
        assert gpu.host_syncs == before + 1  # one wait per step for all the layers: they share a handle


@pytest.mark.parametrize("axis,dtype,path", [(-1, np.float16, fused.PATH_FUSED_EX),
                                             (1, np.float32, fused.PATH_COMPOSED)])
def test_fused_calls_defer_too(gpu, axis, dtype, path):
    shape = (8, 3, 3, 8) if axis == -1 else (8, 8, 3, 3)
    x, dy, gamma, beta, _, _ = _arrays(shape=shape, axis=axis, dtype=dtype)
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    y, saved = fused.forward_training(x, gamma, beta, residual=dy, mode="spatial_persistent", channel_axis=axis,
                                      on_overflow="deferred")
    fused.backward(x, y, dy, gamma, saved)
    assert saved.path == path and gpu.host_syncs == 0
    operation = "fused forward_training" if path == fused.PATH_FUSED_EX else "forward_training"
    with pytest.raises(CudnnOverflowError, match=re.escape(_called(shape, operation, np.dtype(dtype).name))):
        cudnn_bn.check_overflow()


def test_compat_passes_deferred_through(gpu):
    persistent, nchw = compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, compat.CUDNN_TENSOR_NCHW
    x, _, gamma, beta, _, _ = _arrays()
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    compat.batch_normalization_forward_training(x, gamma, beta, None, None, None, None, 1e-5, 0.9, True, persistent,
                                                True, nchw, on_overflow="deferred")
    assert gpu.host_syncs == 0
    with pytest.raises(CudnnOverflowError):
        cudnn_bn.check_overflow()


def test_closing_the_handles_forgets_what_was_deferred(gpu):
    x, _, gamma, beta, _, _ = _arrays()
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _forward(x, gamma, beta)
    handles.close_all()
    assert deferred._PENDING == set() and cudnn_bn.check_overflow() is None


def test_a_check_from_another_thread_waits_for_a_per_thread_default_stream(gpu, cupy):
    # cudaStreamPerThread names the calling thread's own stream: the checking thread's blocking
    # query waits for its own, so the worker's calls must be waited for by their event
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    called, checked, errors = threading.Event(), threading.Event(), []

    def worker():
        try:
            with cupy.cuda.Stream.ptds:
                x, _, gamma, beta, _, _ = _arrays()
                _forward(x, gamma, beta)  # queued on this thread's default stream, not run
                called.set()
                checked.wait(10)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            called.set()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert called.wait(10) and errors == []
        with pytest.raises(CudnnOverflowError, match=re.escape(_called(SHAPE) + ".")):
            cudnn_bn.check_overflow()
    finally:
        checked.set()
        thread.join(10)
    assert gpu.sync_points == {"Event.synchronize": 1, "cudnnQueryRuntimeError(BLOCKING)": 1}
    assert cudnn_bn.check_overflow() is None


def test_what_polls_find_between_checks_does_not_grow_with_the_calls(gpu, cupy):
    # a run that defers and checks rarely: the polls' findings and the device bools of the finite
    # checks they settle are folded per call, not kept per poll
    x, dy, gamma, beta, _, _ = _arrays()
    _, saved = _forward(x, gamma, beta)
    foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())  # checked on the device, read by the check
    stream = cupy.cuda.get_current_stream()

    def steps(count):
        for _ in range(count):
            _forward(x, gamma, beta)
            cudnn_bn.backward(x, dy, gamma, foreign)
            stream.synchronize()  # the calls have run: the next call's poll reads the flag and settles them

    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    steps(20)
    held = gpu.cuda.live_bytes(), len(deferred._FOUND)
    steps(200)
    assert (gpu.cuda.live_bytes(), len(deferred._FOUND)) == held
    with pytest.raises(CudnnOverflowError) as raised:
        cudnn_bn.check_overflow()
    assert _called(SHAPE, count=220) in str(raised.value) and _called(SHAPE, "backward", count=220) in str(raised.value)
    poisoned = saved.inv_std.copy()
    poisoned[0] = np.nan
    gpu.overflow_modes.clear()
    for statistics in (foreign, dataclasses.replace(saved, inv_std=poisoned), foreign):
        cudnn_bn.backward(x, dy, gamma, statistics)
        stream.synchronize()
    _forward(x, gamma, beta)  # its poll settles the backward calls before it
    with pytest.raises(ValueError, match=re.escape("were not finite") + r".*: 3 x backward of \(8, 4, 3, 3\)"):
        cudnn_bn.check_overflow()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the kernel given Inf
def test_finite_checks_on_two_streams_are_each_read_by_the_check(gpu, cupy):
    # each stream's checks are folded on that stream (another stream could be handed the memory
    # of an array still read there), and the check reads them all
    handles.pool_for(0, handles.DEFERRED).size = 1  # one handle across both streams
    x, dy, gamma, beta, _, _ = _arrays()
    _, saved = _forward(x, gamma, beta)
    poisoned = saved.inv_std.copy()
    poisoned[1] = np.inf
    for statistics in (saved.inv_std.copy(), poisoned):
        with cupy.cuda.Stream(non_blocking=True):
            for _ in range(2):
                cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, inv_std=statistics))
    assert gpu.host_syncs == 0 and len(handles.pool_for(0, handles.DEFERRED)._idle[0].finite_checks) == 2
    with pytest.raises(ValueError, match=r"in some of: 2 x backward of \(8, 4, 3, 3\) float32") as raised:
        cudnn_bn.check_overflow()
    assert "4 x" not in str(raised.value)
    assert cudnn_bn.check_overflow() is None
