"""The cuDNN path end to end, on a simulated GPU: host arrays that look like cupy arrays, real
cuDNN descriptors, and kernels computed by the reference (tests/fake_cudnn.py). What this proves
without a GPU: every argument reaches the kernel with the right count, kind, scalar width, layout
and pointer; parameters come back in the caller's axis order and dtype; running statistics are
updated in place; the overflow policy and the Ex path behave as documented. What it cannot prove:
cuDNN's own numerics (the GPU suite in test_gpu_parity.py does)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT32_ROUNDING, LAYOUTS, MODES, make_case, shape_for
from cudnn_bn import CudnnOverflowError, Mode, reference
from cudnn_bn._core.tolerances import STATISTICS_RTOL, assert_close, tolerance
from fake_cudnn import FakeArray, simulated_gpu


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    from cudnn_bn._cudnn import launch

    monkeypatch.setattr(launch, "fallback_warnings_shown", set())  # each test sees its own once-per-shape warnings
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


def _device(*arrays):
    return [None if a is None else np.array(a, copy=True).view(FakeArray) for a in arrays]


def _wide(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_every_mode_layout_and_dtype_reaches_the_kernel_correctly(gpu, mode, ndim, channel_axis, dtype):
    layout, x, dy, gamma, beta = make_case(shape_for(ndim, channel_axis, batch=4, channels=3), mode, channel_axis,
                                           dtype)
    param_dtype = gamma.dtype
    running = _device(np.zeros(layout.param_shape, param_dtype), np.ones(layout.param_shape, param_dtype))
    expected_running = [np.zeros(layout.param_shape), np.ones(layout.param_shape)]
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    y, saved = cudnn_bn.forward_training(xd, gd, bd, *running, mode=mode, channel_axis=channel_axis, momentum=0.3)
    y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), *expected_running, mode=mode,
                                              channel_axis=channel_axis, momentum=0.3)
    assert isinstance(y, FakeArray) and y.dtype == dtype and y.shape == x.shape
    assert saved.mode is mode and saved.mean.shape == layout.param_shape and saved.mean.dtype == param_dtype
    assert_close(y, y64, dtype, scale=4)
    assert_close(saved.mean, saved64.mean, dtype)
    assert_close(saved.inv_std, saved64.inv_std, dtype)
    for actual, wanted in zip(running, expected_running):
        assert_close(actual, wanted, dtype)
    grads = cudnn_bn.backward(xd, dyd, gd, saved)
    wanted = reference.backward(*_wide(x, dy, gamma), saved64)
    for actual, expected in zip(grads, wanted):
        assert_close(actual, expected, dtype, scale=10)
    assert grads[0].dtype == dtype and grads[1].dtype == param_dtype and grads[1].shape == layout.param_shape
    if mode is not Mode.SPATIAL_PERSISTENT:
        for actual, expected in zip(cudnn_bn.backward(xd, dyd, gd, mode=mode, eps=1e-5, channel_axis=channel_axis),
                                    wanted):
            assert_close(actual, expected, dtype, scale=10)
    mean, var = _device(saved64.mean.astype(param_dtype), (1.0 / saved64.inv_std**2).astype(param_dtype))
    y_inference = cudnn_bn.forward_inference(xd, gd, bd, mean, var, mode=mode, channel_axis=channel_axis, eps=0.0)
    assert_close(y_inference, y64, dtype, scale=4)


def test_persistent_inference_runs_spatial(gpu):
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    stats = _device(np.zeros(3, np.float32), np.ones(3, np.float32))
    cudnn_bn.forward_inference(*_device(x, gamma, beta), *stats, mode="spatial_persistent")
    assert gpu.calls[-1] == "cudnnBatchNormalizationForwardInference"


def test_stream_is_bound_once_and_the_query_follows_the_kernel(gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 5), Mode.SPATIAL, -1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    y, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    cudnn_bn.backward(xd, dyd, gd, saved)
    kernels = [name for name in gpu.calls if name.startswith("cudnnBatchNormalization")]
    assert len(kernels) == 2
    first = gpu.calls.index(kernels[0])
    assert "cudnnSetStream" in gpu.calls[:first]  # the first call binds the stream ...
    assert gpu.calls.count("cudnnSetStream") == 1  # ... and the same stream is not bound again
    for kernel in kernels:
        index = gpu.calls.index(kernel)
        assert gpu.calls[index + 1] == "cudnnQueryRuntimeError"  # no cudnnSetStream in between


def test_overflow_raise_restores_running_statistics(gpu):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _, x, _, gamma, beta = make_case((8, 3, 4, 4), Mode.SPATIAL, 1, np.float16)
    running = _device(np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32))
    with pytest.raises(CudnnOverflowError, match="running statistics were restored"):
        cudnn_bn.forward_training(*_device(x, gamma, beta), *running, mode="spatial_persistent")
    np.testing.assert_array_equal(running[0], 0.5)
    np.testing.assert_array_equal(running[1], 2.0)


def test_overflow_raise_restores_running_statistics_updated_through_temporaries(gpu):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _, x, _, gamma, beta = make_case((8, 3, 4, 4), Mode.SPATIAL, 1, np.float32)
    running = _device(np.full(3, 0.5, np.float64), np.full(3, 2.0, np.float16))
    with pytest.raises(CudnnOverflowError):
        cudnn_bn.forward_training(*_device(x, gamma, beta), *running, mode="spatial_persistent")
    np.testing.assert_array_equal(running[0], 0.5)
    np.testing.assert_array_equal(running[1], 2.0)


def test_overflow_fallback_reruns_spatial_and_warns_once_per_shape(gpu):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    layout, x, dy, gamma, beta = make_case((8, 5, 5, 3), Mode.SPATIAL, -1, np.float32)
    running = _device(np.zeros(3, np.float32), np.ones(3, np.float32))
    expected_running = [np.zeros(3), np.ones(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            y, saved = cudnn_bn.forward_training(  # auto: persistent, here with the fallback asked for
                *_device(x, gamma, beta), *running, channel_axis=-1, on_overflow="fallback"
            )
            reference.forward_training(*_wide(x, gamma, beta), *expected_running, mode="spatial", channel_axis=-1)
    assert len([w for w in caught if "re-ran with SPATIAL" in str(w.message)]) == 1
    assert saved.mode is Mode.SPATIAL and np.all(np.isfinite(y))
    for actual, wanted in zip(running, expected_running):
        assert_close(actual, wanted, np.float32)  # updated exactly twice: the overflowed runs left no trace
    y64, _ = reference.forward_training(*_wide(x, gamma, beta), mode="spatial", channel_axis=-1)
    assert_close(y, y64, np.float32, scale=4)


def test_overflow_in_backward(gpu):
    _, x, dy, gamma, beta = make_case((8, 5, 5, 3), Mode.SPATIAL, -1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with pytest.raises(CudnnOverflowError, match="cudnnBatchNormalizationBackward"):
        cudnn_bn.backward(xd, dyd, gd, saved)
    with pytest.warns(RuntimeWarning, match="backward overflowed"):
        dx, dgamma, dbeta = cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="fallback")
    wanted = reference.backward(*_wide(x, dy, gamma), mode="spatial", eps=1e-5, channel_axis=-1)
    assert_close(dx, wanted[0], np.float32, scale=10)


def test_ignore_skips_the_query_and_lets_nan_through(gpu):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _, x, _, gamma, beta = make_case((8, 3, 4, 4), Mode.SPATIAL, 1, np.float32)
    y, saved = cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial_persistent", on_overflow="ignore")
    assert "cudnnQueryRuntimeError" not in gpu.calls
    assert np.all(np.isnan(y)) and saved.mode is Mode.SPATIAL_PERSISTENT


def test_other_modes_are_not_queried(gpu):
    _, x, _, gamma, beta = make_case((8, 3, 4, 4), Mode.SPATIAL, 1, np.float32)
    cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial")
    assert "cudnnQueryRuntimeError" not in gpu.calls


def test_ex_fast_path_carries_the_reserve_space_to_backward(gpu):
    layout, x, dy, gamma, beta = make_case((6, 3, 3, 8), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    y, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert "cudnnBatchNormalizationForwardTrainingEx" in gpu.calls
    assert saved.reserve_space is not None and saved.reserve_space.size == gpu.reserve_size
    grads = cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" in gpu.calls
    y64, saved64 = reference.forward_training(*_wide(x, gamma, beta), mode="spatial", channel_axis=-1)
    assert_close(y, y64, np.float16, scale=4)
    for actual, wanted in zip(grads, reference.backward(*_wide(x, dy, gamma), saved64)):
        assert_close(actual, wanted, np.float16, scale=10)


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((6, 3, 3, 6), -1, np.float16), ((6, 8, 3, 3), 1, np.float16), ((6, 3, 3, 8), -1, np.float32)],
)
def test_ex_path_only_where_it_applies(gpu, shape, axis, dtype):
    _, x, _, gamma, beta = make_case(shape, Mode.SPATIAL, axis, dtype)
    cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial_persistent", channel_axis=axis)
    assert "cudnnBatchNormalizationForwardTrainingEx" not in gpu.calls
    assert "cudnnBatchNormalizationForwardTraining" in gpu.calls


def test_bad_input_never_reaches_a_native_call(gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    for call, error in [
        (lambda: cudnn_bn.forward_training(xd, _device(np.ones(4, np.float32))[0], bd, mode="spatial"), ValueError),
        (lambda: cudnn_bn.forward_training(xd, gamma, bd), TypeError),  # numpy gamma with cupy x
        (lambda: cudnn_bn.backward(xd, dyd, gd, mode="spatial_persistent", eps=1e-5), ValueError),
        (lambda: cudnn_bn.forward_training(xd.astype(np.int32), gd, bd), TypeError),
        (lambda: cudnn_bn.forward_training(xd, gd, bd, momentum=3.0), ValueError),
    ]:
        with pytest.raises(error):
            call()
    assert gpu.calls == []
    np.testing.assert_array_equal(xd, x)


def test_non_finite_saved_statistics_from_elsewhere_are_refused_within_the_calls_one_wait(gpu):
    import dataclasses

    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())  # not the forward's arrays: checked
    syncs, queries = gpu.host_syncs, gpu.runtime_queries["BLOCKING"]
    cudnn_bn.backward(xd, dyd, gd, foreign)
    # the check's read waits for the stream, kernel included; the flag is then read without waiting
    assert (gpu.host_syncs - syncs, gpu.runtime_queries["BLOCKING"] - queries) == (1, 0)
    assert gpu.runtime_queries["NONBLOCKING"] == 1
    poisoned = saved.inv_std.copy()
    poisoned[0] = np.inf
    kept = poisoned.get()
    with pytest.raises(ValueError, match="saved.inv_std: expected finite values"):
        cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, inv_std=poisoned))
    np.testing.assert_array_equal(poisoned.get(), kept)  # the caller's arrays as they were


def test_non_contiguous_input_gives_the_contiguous_result(gpu):
    _, x, _, gamma, beta = make_case((6, 4, 10, 10), Mode.SPATIAL, 1, np.float32)
    xd, gd, bd = _device(x, gamma, beta)
    strided = xd[:, :, ::2, ::3]
    y, _ = cudnn_bn.forward_training(strided, gd, bd, mode="spatial")
    y_contiguous, _ = cudnn_bn.forward_training(_device(np.ascontiguousarray(strided))[0], gd, bd, mode="spatial")
    assert y.shape == strided.shape and y.flags.c_contiguous
    np.testing.assert_array_equal(y, y_contiguous)


def test_running_statistics_keep_identity_dtype_and_order(gpu):
    layout, x, _, gamma, beta = make_case((6, 3, 4, 5), Mode.PER_ACTIVATION, -1, np.float32)
    running = _device(np.zeros(layout.param_shape, np.float64), np.ones(layout.param_shape, np.float16))
    identities = [id(r) for r in running]
    cudnn_bn.forward_training(*_device(x, gamma, beta), *running, mode="per_activation", channel_axis=-1, momentum=1.0)
    assert [id(r) for r in running] == identities and running[0].dtype == np.float64 and running[1].dtype == np.float16
    np.testing.assert_allclose(running[0], x.astype(np.float64).mean(axis=0), rtol=FLOAT32_ROUNDING)
    # float16 storage rounds to 2**-11 (5e-4) relative, within the statistics' tolerance
    np.testing.assert_allclose(running[1], x.astype(np.float64).var(axis=0, ddof=1), rtol=STATISTICS_RTOL)


def test_plans_and_descriptors_are_reused_across_calls(gpu):
    from cudnn_bn._cudnn.descriptors import descriptors_created
    from cudnn_bn._cudnn.plans import PLANS

    _, x, dy, gamma, beta = make_case((4, 8, 5, 5), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
    cudnn_bn.backward(xd, dyd, gd, saved)
    created, plans = descriptors_created(), PLANS.created
    for _ in range(200):
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
        cudnn_bn.backward(xd, dyd, gd, saved)
    assert descriptors_created() == created and PLANS.created == plans


def test_layer_on_the_device(gpu):
    from fake_cudnn import make_fake_cupy

    layer = cudnn_bn.BatchNorm(4, channel_axis=-1, xp=make_fake_cupy())
    _, x, dy, _, _ = make_case((6, 3, 3, 4), Mode.SPATIAL, -1, np.float32)
    xd, dyd = _device(x, dy)
    y = layer(xd)
    dx = layer.backward(dyd)
    assert layer._kept[1].mode is Mode.SPATIAL_PERSISTENT and isinstance(dx, FakeArray)
    y64, saved64 = reference.forward_training(x.astype(np.float64), np.ones(4), np.zeros(4), mode="spatial",
                                              channel_axis=-1)
    assert_close(y, y64, np.float32, scale=4)
    assert_close(layer.grad_beta, dy.astype(np.float64).sum(axis=(0, 1, 2)), np.float32, scale=10)
    state = layer.state_dict()
    assert type(state["running_mean"]) is np.ndarray


def test_compare_runs_its_cudnn_branch(gpu):
    from cudnn_bn._tools.compare import run_compare

    backend, rows = run_compare(np.float32)
    assert backend == "cuDNN on CuPy arrays" and len(rows) == 18
    _, atol = tolerance(np.float32)
    assert all(row["max_abs_error"] < atol and row["median_ms"] > 0 for row in rows)
    assert "cudnnBatchNormalizationForwardInference" in gpu.calls


def test_gpu_benchmark_runs_end_to_end(gpu, monkeypatch, tmp_path):
    import json

    from cudnn_bn._tools import bench as _bench

    monkeypatch.setattr(_bench, "GPU_SHAPES", [(4, 8, 6, 6), (16, 8)])
    monkeypatch.setattr(_bench, "OVERFLOW_PROBE_SHAPE", (4, 8, 6, 6))
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: None)
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)  # the probe must see the flag and the NaN output
    # the fused-against-unfused rows run with on_overflow="fallback": each overflow re-runs in SPATIAL and says so
    with pytest.warns(RuntimeWarning, match=r"SPATIAL_PERSISTENT .*forward_training overflowed .* re-ran with SPATIAL"):
        assert _bench.run_bench(json_path=str(tmp_path / "b.json"), markdown_path=str(tmp_path / "b.md"),
                                quick=True) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["backend"].startswith("GPU") and result["environment"]["device"] == "simulated GPU (host memory)"
    # every persistent call overflows here: its checked forward and its backward are reported, not timed
    combinations = 2 * (2 + 1)  # dtypes x (two layouts of the 4-D shape + the 2-D shape)
    assert len(result["rows"]) == combinations * (3 + 3 + 2 + 1)
    assert len(result["overflowed"]) == combinations * 3
    assert not [r for r in result["rows"] if "PERSISTENT" in r["mode"] and r["operation"] == "backward"]
    assert {o["operation"] for o in result["overflowed"]} == {"forward_training", "backward"}
    assert all(row["fraction_of_copy"] > 0 for row in result["rows"])
    probe = result["overflow_probe"]  # NCHW, NHWC and NDHWC, each on ordinary data and with a large offset
    assert [(p["layout"], p["data"]) for p in probe] == [
        (layout, data) for layout in ("NCHW", "NHWC", "NDHWC") for data in _bench.OVERFLOW_PROBE_DATA
    ]
    assert probe[4]["shape"] == [4, 8, 2, 3, 6]
    assert all(p["overflow_flag_raised"] and not p["persistent_output_finite"] for p in probe)
    assert {r["operation"] for r in result["ex_vs_plain"]} == {"forward_training"}
    assert "cudnn_bn_us_per_call" in result["host_overhead"]
    assert len(result["fused_vs_unfused"]) == 1  # overflowing persistent calls fall back, and still time
    markdown = (tmp_path / "b.md").read_text()
    assert "| 4x8x2x3x6 NDHWC | 1000 + uniform [-2, 2] | True | False |" in markdown
    assert "Not timed because SPATIAL_PERSISTENT overflowed" in markdown


def test_gpu_benchmark_times_everything_when_nothing_overflows(gpu, monkeypatch, tmp_path):
    import json

    from cudnn_bn._tools import bench as _bench

    monkeypatch.setattr(_bench, "GPU_SHAPES", [(4, 8, 6, 6)])
    monkeypatch.setattr(_bench, "OVERFLOW_PROBE_SHAPE", (4, 8, 6, 6))
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: None)
    _bench.run_bench(json_path=str(tmp_path / "b.json"), quick=True)
    result = json.loads((tmp_path / "b.json").read_text())
    assert len(result["rows"]) == 2 * 2 * 4 * 3 and result["overflowed"] == []
    assert len(result["overflow_probe"]) == 6 and not any(p["overflow_flag_raised"] for p in result["overflow_probe"])
    assert all(p["max_abs_difference_vs_spatial"] < 1e-3 for p in result["overflow_probe"])  # float32 around 1000
    assert {r["operation"] for r in result["ex_vs_plain"]} == {"forward_training", "backward"}
    assert [r["path"] for r in result["fused_vs_unfused"]] == ["fused_ex"]  # C = 8: cuDNN's fused kernel
    assert result["fused_vs_unfused"][0]["fused_ms"] > 0 and result["fused_vs_unfused"][0]["unfused_ms"] > 0
    frozen = result["backward_inference"]  # the backward through fixed statistics, beside the training backward
    assert [(r["layout"], r["dtype"]) for r in frozen] == [("NCHW", "float32"), ("NHWC", "float16")]
    assert all(r["backward_inference_ms"] > 0 and r["backward_ms"] > 0 and "torch_ms" not in r for r in frozen)
    table = _bench.to_markdown(result)
    assert "| backward through fixed statistics | dtype | backward_inference ms |" in table
    nhwc = frozen[1]
    assert f"| 4x8x6x6 NHWC | float16 | {nhwc['backward_inference_ms']:.3f} | {nhwc['backward_ms']:.3f} | - |" in table
