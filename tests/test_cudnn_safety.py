"""The cuDNN path's safety on the simulated GPU: descriptor ownership under eviction and threads,
cuDNN's 32-bit and batch-size limits, the overflow flag left by an unchecked call, the handle
pool, the stream binding, the Ex path's arguments, and a libcudnn built for another CUDA."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT64_ROUNDING, make_case
from cudnn_bn import CudnnBuildMismatchError, CudnnLimitError, Mode, reference
from cudnn_bn._core.tolerances import assert_close, statistics_rtol, tolerance
from cudnn_bn._cudnn import availability, launch, limits, plans
from fake_cudnn import FakeArray, simulated_gpu

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    monkeypatch.setattr(launch, "fallback_warnings_shown", set())
    monkeypatch.setattr(availability, "cuda_build_checked", False)
    plans.PLANS.clear()
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator
    plans.PLANS.clear()


def _device(*arrays):
    return [None if a is None else np.array(a, copy=True).view(FakeArray) for a in arrays]


def _wide(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def _kernels(simulator):
    return [name for name in simulator.calls if name.startswith("cudnnBatchNormalization")]


# ---- A1: every call owns the descriptors it passes ----
def test_a_plan_evicted_during_its_call_keeps_its_descriptors(gpu, monkeypatch):
    monkeypatch.setattr(plans.PLANS, "capacity", 1)  # every new signature evicts the previous plan
    for shape in [(4, 3, 2, 2), (5, 2, 3), (4, 3, 2, 2), (6, 4)]:
        _, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, 1, np.float32)
        xd, dyd, gd, bd = _device(x, dy, gamma, beta)
        y, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
        dx, dgamma, _ = cudnn_bn.backward(xd, dyd, gd, saved)
        y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), mode="spatial")
        assert_close(y, y64, np.float32, scale=4)
        assert_close(dx, reference.backward(*_wide(x, dy, gamma), saved64)[0], np.float32, scale=10)


def test_a_plan_outlives_the_cache_with_its_descriptors(gpu):
    layout = cudnn_bn._core.layout.make_layout((4, 3, 2, 2), 1, Mode.SPATIAL)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0)
    plans.PLANS.clear()
    gc.collect()
    assert not plan.data_desc.closed and not plan.param_desc.closed
    assert plan.data_desc.describe()[1] == (4, 3, 2, 2)


def test_thread_stress_in_a_subprocess_ends_without_a_crash_or_a_wrong_result(cudnn_library):
    # issue 9's repro 2: 16 threads, 3000 calls on random shapes, a sleep in 5% of kernel entries
    script = textwrap.dedent(
        """
        import random, sys, threading, time
        import numpy as np
        import pytest
        sys.path.insert(0, %r)
        import cudnn_bn
        from cudnn_bn import reference
        from cudnn_bn._core.tolerances import tolerance
        from fake_cudnn import FakeArray, simulated_gpu

        RTOL, ATOL = tolerance(np.float32)

        KERNELS = ("cudnnBatchNormalizationForwardTraining", "cudnnBatchNormalizationBackward",
                   "cudnnBatchNormalizationForwardInference")
        wrong, done, lock = [], [0], threading.Lock()

        def worker(seed, calls):
            rng = np.random.default_rng(seed)
            for _ in range(calls):
                shape = tuple(int(s) for s in rng.integers(2, 9, size=int(rng.integers(2, 6))))
                x = rng.standard_normal(shape).astype(np.float32)
                dy = rng.standard_normal(shape).astype(np.float32)
                gamma = (0.5 + rng.random(shape[1])).astype(np.float32)
                beta = rng.standard_normal(shape[1]).astype(np.float32)
                device = [a.copy().view(FakeArray) for a in (x, dy, gamma, beta)]
                y, saved = cudnn_bn.forward_training(device[0], device[2], device[3], mode="spatial")
                dx, _, _ = cudnn_bn.backward(device[0], device[1], device[2], saved)
                y64, saved64 = reference.forward_training(*(a.astype(np.float64) for a in (x, gamma, beta)),
                                                          mode="spatial")
                dx64 = reference.backward(*(a.astype(np.float64) for a in (x, dy, gamma)), saved64)[0]
                # dx of random shapes sums up to 8**4 terms per channel: ten times the tolerance
                if not (np.allclose(y.get(), y64, rtol=RTOL, atol=ATOL)
                        and np.allclose(dx.get(), dx64, rtol=10 * RTOL, atol=10 * ATOL)):
                    wrong.append(shape)
                with lock:
                    done[0] += 1

        with pytest.MonkeyPatch.context() as monkeypatch:
            with simulated_gpu(monkeypatch) as simulator:
                library = cudnn_bn._cudnn.raw.library()
                rng, rng_lock = random.Random(0), threading.Lock()
                for name in KERNELS:
                    entry = getattr(library, name)
                    def slow(*args, _entry=entry):
                        with rng_lock:
                            pause = rng.random() < 0.05
                        if pause:
                            time.sleep(%r)
                        return _entry(*args)
                    monkeypatch.setattr(library, name, slow)
                threads = [threading.Thread(target=worker, args=(seed, %d)) for seed in range(16)]
                [t.start() for t in threads]
                [t.join() for t in threads]
        print("done", done[0], "wrong", len(wrong))
        sys.exit(1 if wrong or done[0] != 16 * %d else 0)
        """
    ) % (str(TESTS), 0.01, 94, 94)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "done 1504 wrong 0" in result.stdout


# ---- A2, A3: cuDNN's limits, in one place, checked before any native call ----
def _huge_fake(shape, dtype=np.float32):
    """A FakeArray of any shape over one element (stride 0): enough for checks that must fire
    before any memory is touched."""
    base = np.zeros(1, dtype).view(FakeArray)
    return np.lib.stride_tricks.as_strided(base, shape, (0,) * len(shape)).view(FakeArray)


def test_a_dim_past_int32_is_refused_before_any_native_call(gpu):
    x = _huge_fake((5, 2**32 + 6))  # a C int array would turn this into (5, 6, 1, 1)
    gamma = _huge_fake((2**32 + 6,))
    with pytest.raises(CudnnLimitError, match="32-bit"):
        cudnn_bn.forward_training(x, gamma, gamma, mode="spatial")
    with pytest.raises(CudnnLimitError, match="32-bit"):
        cudnn_bn.forward_inference(x, gamma, gamma, gamma, gamma, mode="spatial")
    assert _kernels(gpu) == [] and "cudnnSetTensorNdDescriptor" not in gpu.calls


def test_a_descriptor_past_int32_is_refused_by_the_descriptor_layer(cudnn_library):
    from cudnn_bn._cudnn.descriptors import TensorDescriptor
    from cudnn_bn._cudnn.raw import DataType

    with pytest.raises(CudnnLimitError, match="2147483647"):
        TensorDescriptor.from_dims(DataType.FLOAT, (5, 2**32 + 6, 1, 1), (2**32 + 6, 1, 1, 1))
    with pytest.raises(CudnnLimitError):
        TensorDescriptor.from_dims(DataType.FLOAT, (2**16, 2**16, 1, 1), (2**16, 1, 1, 1))  # 2**32 elements


def test_training_past_the_element_limit_is_a_typed_error(gpu, monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(int32_max=100))
    _, x, _, gamma, beta = make_case((4, 3, 3, 3), Mode.SPATIAL, 1, np.float32)  # 108 elements
    with pytest.raises(CudnnLimitError, match="108 elements"):
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial")
    assert _kernels(gpu) == []


@pytest.mark.parametrize("mode", [Mode.PER_ACTIVATION, Mode.SPATIAL])
def test_inference_past_the_batch_limit_runs_in_pieces(gpu, monkeypatch, mode):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(inference_max_batch=4))
    layout, x, _, gamma, beta = make_case((11, 3, 2, 2), mode, 1, np.float32)
    rng = np.random.default_rng(1)
    mean, var = rng.standard_normal(layout.param_shape), 0.5 + rng.random(layout.param_shape)
    y = cudnn_bn.forward_inference(*_device(x, gamma, beta, mean.astype(np.float32), var.astype(np.float32)), mode=mode)
    assert _kernels(gpu) == ["cudnnBatchNormalizationForwardInference"] * 3  # 4 + 4 + 3 samples
    assert_close(y, reference.forward_inference(*_wide(x, gamma, beta), mean, var, mode=mode), np.float32, scale=4)


def test_inference_past_the_element_limit_runs_in_pieces(gpu, monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(int32_max=40))
    _, x, _, gamma, beta = make_case((7, 3, 2, 2), Mode.SPATIAL, -1, np.float16)  # 12 per sample: 3 per piece
    mean, var = np.zeros(2, np.float32), np.ones(2, np.float32)
    gamma, beta = gamma[:2], beta[:2]
    x = x[..., :2].copy()
    y = cudnn_bn.forward_inference(*_device(x, gamma, beta, mean, var), mode="spatial", channel_axis=-1)
    assert len(_kernels(gpu)) == 3
    assert_close(y, reference.forward_inference(*_wide(x, gamma, beta, mean, var), mode="spatial", channel_axis=-1),
                 np.float16)


@pytest.mark.parametrize("mode", [Mode.PER_ACTIVATION, Mode.SPATIAL, Mode.SPATIAL_PERSISTENT])
def test_2d_training_past_the_batch_limit_is_routed_as_spatial_columns(gpu, monkeypatch, mode):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=8, per_activation_training_max_batch=8))
    _, x, dy, gamma, beta = make_case((13, 5), mode, 1, np.float32)
    running = _device(np.full(5, 0.25, np.float32), np.full(5, 2.0, np.float32))
    wanted_running = [np.full(5, 0.25), np.full(5, 2.0)]
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    y, saved = cudnn_bn.forward_training(xd, gd, bd, *running, mode=mode, momentum=0.3)
    grads = cudnn_bn.backward(xd, dyd, gd, saved)
    y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), *wanted_running, mode=mode, momentum=0.3)
    assert saved.mode is mode
    assert_close(y, y64, np.float32, scale=4)
    for actual, wanted in zip(running, wanted_running):
        assert_close(actual, wanted, np.float32)
    for actual, wanted in zip(grads, reference.backward(*_wide(x, dy, gamma), saved64)):
        assert_close(actual, wanted, np.float32, scale=10)
    plan = plans.plan_for(plans.TRAINING, cudnn_bn._core.layout.make_layout((13, 5), 1, mode), np.dtype(np.float32), 0)
    assert plan.data_desc.describe()[1:] == ((1, 5, 13, 1), (65, 1, 5, 5))  # a 1 x C x N x 1 NHWC tensor
    assert plan.cudnn_mode == (2 if mode is Mode.SPATIAL_PERSISTENT else 1)


def test_4d_training_past_the_batch_limit_is_a_typed_error(gpu, monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=8))
    _, x, dy, gamma, beta = make_case((9, 2, 2, 2), Mode.SPATIAL, 1, np.float32)
    with pytest.raises(CudnnLimitError, match="at most 8"):
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial")
    with pytest.raises(CudnnLimitError, match="at most 8"):
        cudnn_bn.backward(*_device(x, dy, gamma), mode="spatial", eps=1e-5)
    assert _kernels(gpu) == []


def test_the_real_limits_are_pytorchs():
    assert limits.LIMITS == limits.Limits(int32_max=2147483647, training_max_batch=880801, inference_max_batch=65535)


# ---- A4: a flag left by an unchecked persistent call is not blamed on the next checked one ----
def test_a_stale_overflow_flag_does_not_raise_on_the_next_checked_call(gpu):
    _, x, _, gamma, beta = make_case((4, 8, 3, 3), Mode.SPATIAL, -1, np.float32)
    xd, gd, bd = _device(x, gamma, beta)
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1, on_overflow="ignore")
    gpu.overflow_modes.clear()  # the next call does not overflow; the flag of the last one is unread
    y, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1, on_overflow="raise")
    assert saved.mode is Mode.SPATIAL_PERSISTENT and np.all(np.isfinite(y.get()))
    cudnn_bn.backward(xd, xd, gd, saved)  # and backward's check starts clean as well


def test_a_checked_call_after_an_unchecked_one_still_sees_its_own_overflow(gpu):
    _, x, _, gamma, beta = make_case((4, 8, 3, 3), Mode.SPATIAL, -1, np.float32)
    xd, gd, bd = _device(x, gamma, beta)
    cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1, on_overflow="ignore")
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with pytest.raises(cudnn_bn.CudnnOverflowError):
        cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1, on_overflow="raise")


# ---- A6: the BackwardEx workspace query gets yDesc ----
def test_backward_ex_workspace_query_gets_the_data_descriptor_as_y(gpu, monkeypatch):
    library = cudnn_bn._cudnn.raw.library()
    seen = []
    original = library.cudnnGetBatchNormalizationBackwardExWorkspaceSize

    def record(*args):
        seen.append(args)
        return original(*args)

    monkeypatch.setattr(library, "cudnnGetBatchNormalizationBackwardExWorkspaceSize", record)
    _, x, dy, gamma, beta = make_case((4, 8, 3, 4), Mode.SPATIAL, -1, np.float16)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    cudnn_bn.backward(xd, dyd, gd, saved)
    (handle, mode, ops_value, x_desc, y_desc, dy_desc, dz_desc, dx_desc, p_desc, activation, _) = seen[-1]
    assert (mode, ops_value) == (2, 0)  # CUDNN_BATCHNORM_SPATIAL_PERSISTENT, CUDNN_BATCHNORM_OPS_BN
    assert y_desc == x_desc == dy_desc == dx_desc and y_desc is not None
    assert dz_desc is None and activation is None


# ---- A7: a bounded pool of handles; threads borrow, a thread pool makes none after warm-up ----
def test_a_thread_pool_creates_no_handle_after_warm_up_and_destroys_none(gpu):
    from cudnn_bn._cudnn import handles

    handles.close_all()
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, gd, bd = _device(x, gamma, beta)
    cupy = sys.modules["cupy"]
    together = threading.Barrier(4)

    def call(warm_up):
        if warm_up:
            together.wait(5)  # four calls at once, each holding a handle for a while: four handles
        cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
        cupy.cuda.get_current_stream().synchronize()  # xd is the main thread's: done with it before it goes

    with ThreadPoolExecutor(4) as pool:
        gpu.delay = (1.0, 0.05)
        list(pool.map(call, [True] * 4))
        gpu.delay = None
        created = gpu.calls.count("cudnnCreate")
        list(pool.map(call, [False] * 200))
    assert created == 4
    assert gpu.calls.count("cudnnCreate") == created
    for _ in range(8):  # short-lived threads borrow pooled handles too
        thread = threading.Thread(target=call, args=(False,))
        thread.start()
        thread.join()
    assert gpu.calls.count("cudnnCreate") == created and "cudnnDestroy" not in gpu.calls


def test_a_flag_left_on_one_stream_is_never_read_by_checked_calls_on_another(gpu):
    from cudnn_bn._cudnn import handles

    cupy = sys.modules["cupy"]
    handles.close_all()
    for lane in (handles.PLAIN, handles.CHECKED):
        handles.pool_for(0, lane).size = 1  # one handle per lane: the unchecked call's and the checked calls'
    _, x, _, gamma, beta = make_case((4, 8, 3, 3), Mode.SPATIAL, 1, np.float32)
    other = cupy.cuda.Stream(non_blocking=True)
    with other:  # an unchecked persistent call that overflows, queued on another stream
        xa, ga, ba = _device(x, gamma, beta)
        gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        cudnn_bn.forward_training(xa, ga, ba, mode="spatial_persistent", on_overflow="ignore")
        gpu.overflow_modes.clear()
    xb, gb, bb = _device(x, gamma, beta)
    for _ in range(2):  # checked calls on this stream: neither may report the other stream's flag
        cudnn_bn.forward_training(xb, gb, bb, mode="spatial_persistent", on_overflow="raise")
        other.synchronize()
    # nor did they wait for it: the unchecked call's handle was never rebound, and no query cleared its flag
    assert gpu.runtime_queries == {"BLOCKING": 2}
    handles.close_all()


def test_the_pool_lends_each_handle_to_one_borrower_at_a_time(gpu):
    from cudnn_bn._cudnn import handles

    pool = handles.HandlePool(0, size=2)
    first, second = pool.acquire(), pool.acquire()
    assert first is not second
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # the pool is bounded: a third borrower waits
    pool.release(first)
    waiter.join(5)
    assert got == [first]
    pool.release(second)
    pool.release(first)
    pool.close()
    assert first.closed and second.closed


# ---- issue 13: the handle is bound to CuPy's current stream, not to stream 0 ----
def test_the_handle_is_bound_to_cupys_current_stream(gpu, monkeypatch):
    cupy = sys.modules["cupy"]
    bound = []
    library = cudnn_bn._cudnn.raw.library()
    original = library.cudnnSetStream
    monkeypatch.setattr(library, "cudnnSetStream",
                        lambda handle, stream: (bound.append(stream), original(handle, stream))[1])
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, gd, bd = _device(x, gamma, beta)
    first, second = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    assert 0 not in (first.ptr, second.ptr) and first.ptr != second.ptr
    for stream in (first, first, second):
        with stream:
            y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
            y.get()
    assert bound == [first.ptr, second.ptr]  # bound on change only, and never to stream 0


# ---- issue 13: the Ex path with running statistics, and its C % 4 condition ----
@pytest.mark.parametrize("channels,ex", [(4, True), (12, True), (6, False), (8, True)])
def test_ex_path_updates_running_statistics_like_the_plain_call(gpu, channels, ex):
    _, x, dy, gamma, beta = make_case((6, 3, 2, channels), Mode.SPATIAL, -1, np.float16)
    initial_mean, initial_var = np.linspace(-1, 1, channels), np.linspace(0.5, 3, channels)
    running = _device(initial_mean.astype(np.float32), initial_var.astype(np.float32))
    wanted = [initial_mean.copy(), initial_var.copy()]
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, *running, mode="spatial_persistent", channel_axis=-1, momentum=0.3)
    reference.forward_training(*_wide(x, gamma, beta), *wanted, mode="spatial", channel_axis=-1, momentum=0.3)
    assert ("cudnnBatchNormalizationForwardTrainingEx" in gpu.calls) is ex
    assert (saved.reserve_space is not None) is ex
    rtol = statistics_rtol(np.float16)
    for actual, expected in zip(running, wanted):
        np.testing.assert_allclose(actual.get(), expected, rtol=rtol, atol=rtol)


def test_ex_path_gets_momentum_not_one_minus_momentum(gpu, monkeypatch):
    library = cudnn_bn._cudnn.raw.library()
    factors = []
    original = library.cudnnBatchNormalizationForwardTrainingEx
    monkeypatch.setattr(library, "cudnnBatchNormalizationForwardTrainingEx",
                        lambda *a: (factors.append(a[14]), original(*a))[1])
    _, x, _, gamma, beta = make_case((6, 3, 2, 4), Mode.SPATIAL, -1, np.float16)
    running = _device(np.zeros(4, np.float32), np.ones(4, np.float32))
    cudnn_bn.forward_training(*_device(x, gamma, beta), *running, mode="spatial_persistent", channel_axis=-1,
                              momentum=0.2)
    assert factors == [0.2]  # cuDNN's exponentialAverageFactor is the weight of the new batch


# ---- issue 13: eps reaches the kernel when backward recomputes the statistics ----
@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_backward_without_saved_statistics_uses_its_eps(gpu, eps):
    _, x, dy, gamma, _ = make_case((5, 3, 2, 2), Mode.SPATIAL, 1, np.float64)
    dx, dgamma, _ = cudnn_bn.backward(*_device(x, dy, gamma), mode="spatial", eps=eps)
    # independent float64 math, not the reference under test
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    x_hat = (x - mean) * inv_std
    count = x.size // x.shape[1]
    dgamma_wanted = (dy * x_hat).sum(axis=axes)
    dbeta_wanted = dy.sum(axis=axes)
    dx_wanted = gamma.reshape(1, -1, 1, 1) * inv_std * (
        dy - (dbeta_wanted.reshape(1, -1, 1, 1) + x_hat * dgamma_wanted.reshape(1, -1, 1, 1)) / count
    )
    # float64's tolerance, and no absolute allowance beyond rounding for a wrong eps to hide in
    rtol = tolerance(np.float64)[0]
    np.testing.assert_allclose(dx.get(), dx_wanted, rtol=rtol, atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(dgamma.get(), dgamma_wanted, rtol=rtol, atol=FLOAT64_ROUNDING)


# ---- A8: a libcudnn built for another CUDA than CuPy's ----
def test_a_cudnn_built_for_another_cuda_is_named_with_the_fix(gpu, monkeypatch, cudnn_library):
    cupy = sys.modules["cupy"]
    built_for = int(cudnn_library.cudnnGetCudartVersion()) // 1000
    other = 13 if built_for == 12 else 12
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: other * 1000, raising=False)
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    with pytest.raises(CudnnBuildMismatchError) as caught:
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial")
    message = str(caught.value)
    assert f"built for CUDA {built_for}" in message and f"CuPy runs CUDA {other}" in message
    assert f"nvidia-cudnn-cu{other}" in message
    assert _kernels(gpu) == [] and "cudnnCreate" not in gpu.calls


def test_a_matching_cuda_build_passes(gpu, monkeypatch, cudnn_library):
    cupy = sys.modules["cupy"]
    built_for = int(cudnn_library.cudnnGetCudartVersion()) // 1000
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: built_for * 1000 + 80, raising=False)
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial")
    assert _kernels(gpu) == ["cudnnBatchNormalizationForwardTraining"]


def test_cudart_version_is_read_through_the_prototype_table(cudnn_library):
    version = int(cudnn_library.cudnnGetCudartVersion())
    assert 12000 <= version < 14000


def test_pointer_arguments_are_plain_ints(gpu):
    # a ctypes object where an int is expected would be a use-after-free waiting to happen
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    layout = cudnn_bn._core.layout.make_layout(x.shape, 1, Mode.SPATIAL)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0)
    assert isinstance(plan.alpha, int) and ctypes.c_float.from_address(plan.alpha).value == 1.0
    assert ctypes.c_float.from_address(plan.beta).value == 0.0


# ---- A5: on_overflow="ignore" keeps its promise of no synchronisation ----
def test_ignore_never_synchronizes_in_backward(gpu):
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta = make_case((4, 8, 3, 3), Mode.SPATIAL, -1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1, on_overflow="ignore")

    def no_host_read(*args, **kwargs):
        raise AssertionError("a finite check (a device-to-host read) ran")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cupy, "isfinite", no_host_read)
        patch.setattr(cupy, "vdot", no_host_read)
        for _ in range(2):  # the first call builds the plan, the second takes the cached path
            cudnn_bn.backward(xd, dyd, gd, saved)
        assert "cudnnQueryRuntimeError" not in gpu.calls
        cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="raise")  # nor a checked one of the forward's own statistics
        with pytest.raises(AssertionError, match="finite check"):  # statistics from elsewhere are read
            cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, mean=saved.mean.copy()), on_overflow="raise")


# ---- a review's findings: per-thread default streams, the reserve under the signature cache ----
def test_per_thread_default_streams_are_told_apart_by_thread(gpu, monkeypatch):
    import types

    from cudnn_bn._cudnn import handles

    library = cudnn_bn._cudnn.raw.library()
    bound = []
    monkeypatch.setattr(library, "cudnnSetStream", lambda handle, stream: bound.append((threading.get_ident(), stream)))
    per_thread = types.SimpleNamespace(ptr=handles.PER_THREAD_STREAM)  # cudaStreamPerThread in every thread
    pool = handles.HandlePool(0, size=1)
    identities = []

    def bind():
        with pool.borrow() as handle:
            handle.bind_stream(per_thread)
            identities.append(handle.bound_identity)

    bind()
    bind()  # same thread, same stream: no rebind
    worker = threading.Thread(target=bind)
    worker.start()
    worker.join()
    assert len(bound) == 2 and bound[0][0] != bound[1][0]  # the other thread's queue is another stream
    assert identities[0] == identities[1] != identities[2]
    cupy = sys.modules["cupy"]
    assert launch.workspace(cupy, 0, identities[0], 64) is not launch.workspace(cupy, 0, identities[2], 64)
    pool.close()


def test_a_strided_reserve_space_is_refused_on_a_warm_signature(gpu):
    import dataclasses

    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta = make_case((4, 2, 3, 4), Mode.SPATIAL, -1, np.float16)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    cudnn_bn.backward(xd, dyd, gd, saved)  # the signature is now cached
    size = saved.reserve_space.size
    strided = cupy.zeros(2 * size, dtype=cupy.uint8)[::2]
    assert strided.shape == saved.reserve_space.shape and not strided.flags.c_contiguous
    with pytest.raises(TypeError, match="saved.reserve_space"):
        cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, reserve_space=strided))
