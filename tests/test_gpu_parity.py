"""cuDNN on CuPy arrays against the NumPy reference. Needs a GPU: every test carries the `gpu`
marker and is skipped with the reason where none is present. On the GPU machine, from the
repository root: PYTHONPATH=. python3 -m pytest -m gpu
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import CudnnOverflowError, Mode, reference
from cudnn_bn._core.tolerances import assert_close, to_numpy
from conftest import LAYOUTS, MODES, make_case, shape_for

pytestmark = pytest.mark.gpu

DTYPES = [np.float16, np.float32, np.float64]


def _cupy():
    import cupy

    return cupy


def _to_device(*arrays):
    cupy = _cupy()
    return [None if a is None else cupy.asarray(a) for a in arrays]


def _wide(*arrays):
    return [a.astype(np.float64) for a in arrays]


def _scale(expected) -> float:
    return max(1.0, float(np.max(np.abs(to_numpy(expected)))))


def _check_training(shape, mode, channel_axis, dtype, offset=0.0, scale=1.0, steps=3, momentum=0.2):
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, dtype, offset=offset, scale=scale)
    param_dtype = np.float64 if dtype == np.float64 else np.float32
    running = [np.zeros(layout.param_shape, param_dtype), np.ones(layout.param_shape, param_dtype)]
    running_gpu = _to_device(*running)
    expected_running = [r.astype(np.float64) for r in running]
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma, beta)
    for step in range(steps):
        y, saved = cudnn_bn.forward_training(x_gpu, gamma_gpu, beta_gpu, *running_gpu, mode=mode, momentum=momentum, channel_axis=channel_axis)
        y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), *expected_running, mode=mode, momentum=momentum, channel_axis=channel_axis)
    assert saved.mode is mode and y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, what="y", scale=_scale(y64))
    assert_close(saved.mean, saved64.mean, dtype, what="saved mean", scale=_scale(saved64.mean))
    assert_close(saved.inv_std, saved64.inv_std, dtype, what="saved inv_std", scale=_scale(saved64.inv_std))
    for actual, wanted, name in zip(running_gpu, expected_running, ("running_mean", "running_var")):
        assert_close(actual, wanted, dtype, what=name, scale=_scale(wanted))
    return layout, x, dy, gamma, saved, saved64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_forward_training_and_backward_match_reference(mode, ndim, channel_axis, dtype):
    shape = shape_for(ndim, channel_axis, batch=5, channels=3, spatial=(7, 5, 3))  # odd sizes
    layout, x, dy, gamma, saved, saved64 = _check_training(shape, mode, channel_axis, dtype)
    x_gpu, dy_gpu, gamma_gpu = _to_device(x, dy, gamma)
    expected = reference.backward(*_wide(x, dy, gamma), saved64)
    for actual, wanted, name in zip(cudnn_bn.backward(x_gpu, dy_gpu, gamma_gpu, saved), expected, ("dx", "dgamma", "dbeta")):
        assert_close(actual, wanted, dtype, what=f"{name} with saved", scale=_scale(wanted))
    if mode is not Mode.SPATIAL_PERSISTENT:
        recomputed = cudnn_bn.backward(x_gpu, dy_gpu, gamma_gpu, mode=mode, eps=1e-5, channel_axis=channel_axis)
        for actual, wanted, name in zip(recomputed, expected, ("dx", "dgamma", "dbeta")):
            assert_close(actual, wanted, dtype, what=f"{name} recomputed", scale=_scale(wanted))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_forward_inference_matches_reference(mode, ndim, channel_axis, dtype):
    layout, x, _, gamma, beta = make_case(shape_for(ndim, channel_axis, batch=3, channels=5, spatial=(5, 3, 3)), mode, channel_axis, dtype)
    rng = np.random.default_rng(1)
    mean = rng.standard_normal(layout.param_shape).astype(gamma.dtype)
    var = (0.5 + rng.random(layout.param_shape)).astype(gamma.dtype)
    y = cudnn_bn.forward_inference(*_to_device(x, gamma, beta, mean, var), mode=mode, channel_axis=channel_axis)
    wanted = reference.forward_inference(*_wide(x, gamma, beta, mean, var), mode=mode, channel_axis=channel_axis)
    assert y.dtype == dtype
    assert_close(y, wanted, dtype, what="y", scale=_scale(wanted))


@pytest.mark.parametrize(
    "shape,channel_axis",
    [
        ((2, 1, 9, 9), 1),  # C = 1
        ((2, 7, 3, 3), 1),  # N = 2
        ((2, 9, 9, 1), -1),
        ((2, 4, 96, 96), 1),  # large spatial
        ((2, 96, 96, 4), -1),
        ((32, 64, 56, 56), 1),  # a large tensor
        ((32, 56, 56, 64), -1),
    ],
)
@pytest.mark.parametrize("mode", [Mode.SPATIAL, Mode.SPATIAL_PERSISTENT], ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_special_shapes(shape, channel_axis, mode, dtype):
    layout, x, dy, gamma, saved, saved64 = _check_training(shape, mode, channel_axis, dtype, steps=1)
    expected = reference.backward(*_wide(x, dy, gamma), saved64)
    for actual, wanted, name in zip(cudnn_bn.backward(*_to_device(x, dy, gamma), saved), expected, ("dx", "dgamma", "dbeta")):
        assert_close(actual, wanted, dtype, what=name, scale=_scale(wanted))


def test_ex_fast_path_carries_its_reserve_space():
    from cudnn_bn._cudnn.ops import uses_ex_path

    shape = (8, 6, 6, 16)  # channels-last, C % 4 == 0
    layout, x, dy, gamma, saved, saved64 = _check_training(shape, Mode.SPATIAL_PERSISTENT, -1, np.float16, steps=1)
    assert uses_ex_path(layout, np.float16)
    assert saved.reserve_space is not None
    expected = reference.backward(*_wide(x, dy, gamma), saved64)
    for actual, wanted in zip(cudnn_bn.backward(*_to_device(x, dy, gamma), saved), expected):
        assert_close(actual, wanted, np.float16, scale=_scale(wanted))


@pytest.mark.parametrize("magnitude", [1e-4, 1e-2, 1.0, 1e2, 1e3, 3e4, 6e4])
@pytest.mark.parametrize("shape,channel_axis", [((16, 8, 16, 16), 1), ((16, 16, 16, 8), -1)])
@pytest.mark.parametrize("on_overflow", ["raise", "fallback"])
def test_persistent_overflow_never_reaches_the_caller_silently(magnitude, shape, channel_axis, on_overflow, monkeypatch):
    from cudnn_bn._cudnn import ops as _cupy_ops

    monkeypatch.setattr(_cupy_ops, "_WARNED", set())  # the fallback warning is once per shape
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, channel_axis, np.float16, offset=magnitude, scale=magnitude / 4)
    x = np.clip(x.astype(np.float32), -65000, 65000).astype(np.float16)
    running = _to_device(np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32))
    before = [r.copy() for r in running]
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma, beta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            y, saved = cudnn_bn.forward_training(x_gpu, gamma_gpu, beta_gpu, *running, mode="spatial_persistent", channel_axis=channel_axis, on_overflow=on_overflow)
        except CudnnOverflowError:
            assert on_overflow == "raise"
            for restored, original in zip(running, before):
                np.testing.assert_array_equal(to_numpy(restored), to_numpy(original))
            return
    fell_back = any("re-ran with SPATIAL" in str(w.message) for w in caught)
    assert saved.mode is (Mode.SPATIAL if fell_back else Mode.SPATIAL_PERSISTENT)
    y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), mode="spatial", channel_axis=channel_axis)
    y_host = to_numpy(y)
    assert np.all(np.isfinite(y_host)) == np.all(np.isfinite(y64))
    if np.all(np.isfinite(y64)):
        assert_close(y_host, y64, np.float16, what=f"y at magnitude {magnitude}", scale=_scale(y64))


def test_threads_with_their_own_streams_agree_with_one_thread():
    cupy = _cupy()
    cases = [make_case((8, 6, 9, 9), Mode.SPATIAL, 1, np.float32, seed=seed) for seed in range(8)]
    device_cases = [_to_device(x, dy, gamma, beta) for _, x, dy, gamma, beta in cases]

    def run(x, dy, gamma, beta):
        y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
        return [to_numpy(a) for a in (y, *cudnn_bn.backward(x, dy, gamma, saved))]

    serial = [run(*arrays) for arrays in device_cases]
    results = [None] * len(device_cases)

    def worker(index):
        with cupy.cuda.Stream(non_blocking=True) as stream:
            for _ in range(20):
                results[index] = run(*device_cases[index])
            stream.synchronize()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(device_cases))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for one, many in zip(serial, results):
        for a, b in zip(one, many):
            # identical work; a tolerance only in case cuDNN's reductions are not bitwise deterministic
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_no_descriptor_growth_over_many_calls():
    from cudnn_bn._cudnn.descriptors import CACHE

    _, x, dy, gamma, beta = make_case((4, 8, 5, 5), Mode.SPATIAL, 1, np.float32)
    x, dy, gamma, beta = _to_device(x, dy, gamma, beta)
    y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    created = CACHE.created
    for _ in range(2000):
        y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
        cudnn_bn.backward(x, dy, gamma, saved)
    assert CACHE.created == created


def test_non_contiguous_input_gives_the_contiguous_result():
    cupy = _cupy()
    _, x, dy, gamma, beta = make_case((6, 4, 10, 10), Mode.SPATIAL, 1, np.float32)
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma, beta)
    strided = x_gpu[:, :, ::2, ::2]
    y, _ = cudnn_bn.forward_training(strided, gamma_gpu, beta_gpu, mode="spatial")
    y_contiguous, _ = cudnn_bn.forward_training(cupy.ascontiguousarray(strided), gamma_gpu, beta_gpu, mode="spatial")
    assert y.shape == strided.shape
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_contiguous))


def test_parameters_and_running_statistics_of_other_float_dtypes():
    layout, x, _, gamma, beta = make_case((8, 4, 5, 5), Mode.SPATIAL, 1, np.float32)
    running_mean, running_var = _to_device(np.zeros(4, np.float64), np.ones(4, np.float16))
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma.astype(np.float64), beta.astype(np.float16))
    identity = running_mean
    cudnn_bn.forward_training(x_gpu, gamma_gpu, beta_gpu, running_mean, running_var, mode="spatial", momentum=1.0)
    assert running_mean is identity and running_mean.dtype == np.float64 and running_var.dtype == np.float16
    np.testing.assert_allclose(to_numpy(running_mean), x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(running_var), x.astype(np.float64).var(axis=(0, 2, 3), ddof=1), rtol=2e-3)


def test_per_activation_channels_last_keeps_the_parameter_order():
    layout, x, dy, gamma, beta = make_case((6, 3, 4, 5), Mode.PER_ACTIVATION, -1, np.float32)
    running = _to_device(np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32))
    y, saved = cudnn_bn.forward_training(*_to_device(x, gamma, beta), *running, mode="per_activation", channel_axis=-1)
    expected_running = [np.zeros(layout.param_shape), np.ones(layout.param_shape)]
    y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), *expected_running, mode="per_activation", channel_axis=-1)
    assert saved.mean.shape == (3, 4, 5)
    assert_close(saved.mean, saved64.mean, np.float32)
    assert_close(running[1], expected_running[1], np.float32)
    assert_close(y, y64, np.float32, scale=_scale(y64))


def test_bad_input_on_the_gpu_gives_the_reference_errors():
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma, beta)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\), got \(4,\)"):
        cudnn_bn.forward_training(x_gpu, _cupy().ones(4, np.float32), beta_gpu, mode="spatial")
    with pytest.raises(TypeError, match="arrays of mixed kinds"):
        cudnn_bn.forward_training(x_gpu, gamma, beta_gpu)
    with pytest.raises(ValueError, match="SPATIAL_PERSISTENT backward requires"):
        cudnn_bn.backward(x_gpu, x_gpu, gamma_gpu, mode="spatial_persistent", eps=1e-5)


def test_runs_on_the_current_stream():
    cupy = _cupy()
    _, x, _, gamma, beta = make_case((4, 8, 16, 16), Mode.SPATIAL, 1, np.float32)
    x_gpu, gamma_gpu, beta_gpu = _to_device(x, gamma, beta)
    from cudnn_bn._cudnn.handles import handle_for
    from cudnn_bn._cudnn import raw as _raw
    import ctypes

    with cupy.cuda.Stream() as stream:
        cudnn_bn.forward_training(x_gpu, gamma_gpu, beta_gpu, mode="spatial")
        bound = ctypes.c_void_p()
        _raw.library().cudnnGetStream(handle_for(x_gpu.device.id).pointer, ctypes.byref(bound))
        assert (bound.value or 0) == stream.ptr


def test_arrays_on_different_devices_are_refused():
    cupy = _cupy()
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    x0 = cupy.asarray(x)
    with cupy.cuda.Device(1):
        gamma1 = cupy.asarray(gamma)
    with pytest.raises(ValueError, match="arrays on different devices"):
        cudnn_bn.forward_training(x0, gamma1, cupy.asarray(beta), mode="spatial")
