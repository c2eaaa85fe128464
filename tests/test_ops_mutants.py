"""The cuDNN path (cudnn_bn/_cudnn/ops.py) on the simulated GPU, where the end-to-end tests pass
through without pinning: the CUDA build check, the fallback warning's key and where it points, the
overflow error's status, the reserve-space checks before BackwardEx and the Ex workspace cache
(docs/testing.md)."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import warnings

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import CudnnOverflowError, Mode, reference
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import availability, launch, ops, raw, signatures
from cudnn_bn._cudnn.errors import CudnnBuildMismatchError
from conftest import make_case
from fake_cudnn import FakeArray, simulated_gpu


def _forget_signatures():
    """Each test settles its own signatures (mutation runs pick, for each mutant, the tests that
    reached the mutated code: a signature settled by an earlier test would hide the settling)."""
    signatures.SETTLED.clear()


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    monkeypatch.setattr(launch, "fallback_warnings_shown", set())
    monkeypatch.setattr(launch, "WORKSPACES", {})
    _forget_signatures()
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


def _device(*arrays):
    return [np.array(a, copy=True).view(FakeArray) for a in arrays]


# ---- the CUDA build check ----
def _fake_cupy(runtime_version=None):
    runtime = types.SimpleNamespace()
    if runtime_version is not None:
        runtime.runtimeGetVersion = lambda: runtime_version
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.fixture
def cudart_12_0(monkeypatch):
    library = types.SimpleNamespace(cudnnGetCudartVersion=lambda: 12000, path="/lib/libcudnn.so.9")
    monkeypatch.setattr(raw, "library", lambda: library)


def test_cuda_12_0_matches_cuda_12(cudart_12_0):
    assert availability.cuda_build_mismatch(_fake_cupy(12000)) is None
    assert availability.cuda_build_mismatch(_fake_cupy(12090)) is None


def test_a_cupy_without_the_runtime_query_is_not_a_mismatch(cudart_12_0):
    assert availability.cuda_build_mismatch(_fake_cupy()) is None


def test_the_mismatch_names_the_loaded_library(cudart_12_0):
    error = availability.cuda_build_mismatch(_fake_cupy(13000))
    assert isinstance(error, CudnnBuildMismatchError)
    assert (error.cudnn_cuda_major, error.cupy_cuda_major, error.path) == (12, 13, "/lib/libcudnn.so.9")


# ---- overflow: the error's status and the fallback warning ----
def test_the_overflow_error_carries_cudnns_status():
    error = launch.overflow_error("cudnnBatchNormalizationForwardTraining", "advice")
    assert (error.status, error.status_name) == (1007, "CUDNN_STATUS_RUNTIME_FP_OVERFLOW")  # cudnn_graph.h
    assert str(error) == "cudnnBatchNormalizationForwardTraining: CUDNN_STATUS_RUNTIME_FP_OVERFLOW (SPATIAL_PERSISTENT overflowed; advice)"


def _fallbacks(x, gamma, beta):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial_persistent", on_overflow="fallback")
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_fallback_warning_is_once_per_shape_and_dtype(gpu):
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    (first,) = _fallbacks(x, gamma, beta)
    assert str(first.message) == (
        "cudnn_bn: SPATIAL_PERSISTENT forward_training overflowed for shape (4, 3, 2, 2) float32; "
        "re-ran with SPATIAL (this warning is shown once per shape)"
    )
    assert _fallbacks(x, gamma, beta) == []
    assert len(_fallbacks(x.astype(np.float16), gamma, beta)) == 1  # another dtype warns again
    _, x5, _, gamma5, beta5 = make_case((5, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    assert len(_fallbacks(x5, gamma5, beta5)) == 1  # and another shape


def _fallback_warnings(gpu, entry: str):
    """The RuntimeWarnings of one persistent call through ``entry`` that overflows and falls back."""
    from cudnn_bn import compat, fused

    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    running = _device(np.zeros(3, np.float32), np.ones(3, np.float32))
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "forward_training":
            cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="fallback")
        elif entry == "backward":
            cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="fallback")
        elif entry == "fused":
            fused.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="fallback")
        else:
            compat.batch_normalization_forward_training(
                xd, gd, bd, *running, None, None, 2e-5, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, False,
                on_overflow="fallback",
            )
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


_ENTRIES = ["forward_training", "backward", "fused", "compat"]


@pytest.mark.parametrize("entry", _ENTRIES)
def test_the_fallback_warning_points_at_the_caller(gpu, entry):
    # exact frames: deselected in mutation runs, whose trampolines put frames of their own (outside
    # the package) between the package's (pyproject.toml)
    (warning,) = _fallback_warnings(gpu, entry)
    assert warning.filename == __file__
    probe = _package_frames()
    assert probe["warner"](launch.outside_the_package) == 2  # warnings.warn's level of the warner's caller
    assert probe["middle"](launch.outside_the_package) == 3  # each package frame in between counts once


@pytest.mark.parametrize("entry", _ENTRIES)
def test_the_fallback_warning_never_points_into_the_package(gpu, entry):
    # weaker than the exact caller (the test above), and true also where test tools add frames of their own
    (warning,) = _fallback_warnings(gpu, entry)
    assert not os.path.abspath(warning.filename).startswith(launch.PACKAGE_DIR + os.sep)


_PROBE = """
def warner(probe):
    return probe()


def middle(probe):
    return warner(probe)
"""


def _package_frames() -> dict:
    """Two functions whose frames count as the package's: ``warner`` (the function that warns) and
    ``middle``, which calls it."""
    namespace: dict = {}
    exec(compile(_PROBE, os.path.join(launch.PACKAGE_DIR, "_frames_probe.py"), "exec"), namespace)
    return namespace



# ---- the reserve space BackwardEx reads ----
@pytest.fixture
def ex_call(gpu):
    _, x, dy, gamma, beta = make_case((2, 2, 2, 4), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert saved.reserve_space is not None
    return xd, dyd, gd, saved


def _backward_with_reserve(ex_call, reserve):
    xd, dyd, gd, saved = ex_call
    cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, reserve_space=reserve))


@pytest.mark.parametrize("make_bad", [
    lambda: np.zeros((2, 8), np.uint8).view(FakeArray),  # 2-D
    lambda: np.zeros(16, np.uint8).view(FakeArray)[::2],  # 1-D but strided
    lambda: np.zeros(8, np.float32).view(FakeArray),  # not uint8
    lambda: 7,  # not an array at all
], ids=["2d", "strided", "float32", "int"])
def test_the_last_reserve_check_before_backward_ex_refuses_the_wrong_kind(gpu, make_bad):
    # SavedStats refuses these first; this check stands between them and the native call regardless
    bad = make_bad()
    with pytest.raises(TypeError, match=rf"^saved\.reserve_space: expected the 1-D uint8 device buffer from forward_training, got {type(bad).__name__}$"):
        launch.check_reserve(bad, 4, 0)


def test_a_reserve_space_too_small_is_a_value_error_with_the_sizes(ex_call):
    size = ex_call[3].reserve_space.size
    small = np.zeros(size - 1, np.uint8).view(FakeArray)
    with pytest.raises(ValueError, match=rf"^saved\.reserve_space: expected at least {size} bytes on device 0 \(the forward's reserve space\), got {size - 1} bytes on device 0$"):
        _backward_with_reserve(ex_call, small)


# ---- the Ex workspace, one per (device, stream) ----
def test_the_workspace_is_kept_per_device_and_stream_and_grows_only_when_asked(gpu):
    cupy = sys.modules["cupy"]
    empty = launch.workspace(cupy, 0, 0, 0)
    assert empty.dtype == np.uint8 and empty.size == 1  # never a zero-byte buffer
    first = launch.workspace(cupy, 0, 11, 64)
    assert first.dtype == np.uint8 and first.size == 64
    assert launch.workspace(cupy, 0, 11, 64) is first and launch.workspace(cupy, 0, 11, 8) is first
    other_stream = launch.workspace(cupy, 0, 12, 64)
    assert other_stream is not first and launch.workspace(cupy, 0, 11, 64) is first
    grown = launch.workspace(cupy, 0, 11, 65)
    assert grown.size == 65 and launch.workspace(cupy, 0, 11, 1) is grown
    assert launch.WORKSPACES[(0, 11)] is grown and launch.WORKSPACES[(0, 12)] is other_stream


def test_the_workspaces_are_bounded_oldest_first(gpu):
    cupy = sys.modules["cupy"]
    for stream in range(launch.MAX_WORKSPACE_STREAMS + 3):
        launch.workspace(cupy, 0, stream, 4)
    assert len(launch.WORKSPACES) == launch.MAX_WORKSPACE_STREAMS
    assert (0, 0) not in launch.WORKSPACES and (0, launch.MAX_WORKSPACE_STREAMS + 2) in launch.WORKSPACES


# ---- the overflow query ----
def test_a_checked_call_reads_the_flag_once_and_leaves_nothing_to_clear(gpu):
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    for _ in range(2):
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial_persistent", on_overflow="raise")
    assert gpu.calls.count("cudnnQueryRuntimeError") == 2  # one per call: the first left no unread flag


def test_a_kernel_status_other_than_overflow_is_raised_naming_the_query(gpu, monkeypatch):
    def query(handle, status, mode, tag):
        status._obj.value = 4000  # CUDNN_STATUS_INTERNAL_ERROR
        return 0

    monkeypatch.setattr(raw.library(), "cudnnQueryRuntimeError", query)
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    with pytest.raises(cudnn_bn.CudnnError) as raised:
        cudnn_bn.forward_training(*_device(x, gamma, beta), mode="spatial_persistent", on_overflow="raise")
    assert (raised.value.status, raised.value.function) == (4000, "cudnnQueryRuntimeError (kernel status)")


# ---- inference: the per-signature cache and the device ----
def _inference_args(shape=(4, 3, 2, 2)):
    layout, x, _, gamma, beta = make_case(shape, Mode.SPATIAL, 1, np.float32)
    mean, var = np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32)
    return x, gamma, beta, mean, var


def _refused_after_a_shape_change(call, args, position) -> None:
    """``call`` settles its signature on ``args``, then refuses them with the one at ``position``
    reshaped (x loses a channel; a parameter gains one): the changed signature is checked again."""
    call(*_device(*args), mode="spatial")
    changed = list(args)
    changed[position] = args[0][:, :2] if position == 0 else np.concatenate([args[position], args[position][:1]])
    with pytest.raises(ValueError):
        call(*_device(*changed), mode="spatial")


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "mean", "var"])
def test_inference_checks_again_when_any_argument_changes_shape(gpu, position):
    _refused_after_a_shape_change(cudnn_bn.forward_inference, _inference_args(), position)


@pytest.mark.parametrize("keyword,first,second", [("eps", 1, True), ("channel_axis", 1, True)])
def test_inference_checks_again_when_an_equal_value_comes_as_a_bool(gpu, keyword, first, second):
    args = _device(*_inference_args())
    cudnn_bn.forward_inference(*args, mode="spatial", **{keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.forward_inference(*args, mode="spatial", **{keyword: second})


@pytest.fixture
def two_gpus(monkeypatch, cudnn_library):
    monkeypatch.setattr(launch, "fallback_warnings_shown", set())
    monkeypatch.setattr(launch, "WORKSPACES", {})
    _forget_signatures()
    with simulated_gpu(monkeypatch, devices=2) as simulator:
        yield simulator


@pytest.mark.parametrize("position", range(1, 5), ids=["gamma", "beta", "mean", "var"])
def test_inference_refuses_an_argument_on_another_device_naming_it(two_gpus, position):
    cupy = sys.modules["cupy"]
    args = _inference_args()
    arrays = _device(*args)
    with cupy.cuda.Device(1):
        arrays[position] = _device(args[position])[0]
    names = ["x", "gamma", "beta", "mean", "var"]
    devices = ", ".join(f"{name} on device {int(index == position)}" for index, name in enumerate(names))
    with pytest.raises(ValueError) as raised:
        cudnn_bn.forward_inference(*arrays, mode="spatial")
    assert str(raised.value) == f"arrays on different devices: expected one device, got {devices}"


def test_inference_runs_on_the_device_of_its_arrays(two_gpus):
    cupy = sys.modules["cupy"]
    args = _inference_args()
    with cupy.cuda.Device(1):
        arrays = _device(*args)
    y = cudnn_bn.forward_inference(*arrays, mode="spatial")
    assert y.device.id == 1


def test_each_call_signature_is_remembered_with_its_plan_and_the_memory_is_bounded(gpu, monkeypatch):
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()
    args = _inference_args()
    cudnn_bn.forward_inference(*_device(*args), mode="spatial")
    (settled,) = signatures.SETTLED.values()
    assert settled.plan is plans.plan_for(plans.INFERENCE, settled.checked.layout, settled.checked.data_dtype, 0)
    monkeypatch.setattr(signatures, "MAX_SIGNATURES", 2)
    for batch in (5, 6, 7):
        cudnn_bn.forward_inference(*_device(*_inference_args((batch, 3, 2, 2))), mode="spatial")
        assert 1 <= len(signatures.SETTLED) <= 2


# ---- the Ex path's workspace, reserve and messages ----
def _ex_case():
    _, x, dy, gamma, beta = make_case((2, 2, 2, 4), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    return _device(x, dy, gamma, beta)


def test_the_ex_calls_keep_their_workspace_under_this_device_and_stream(gpu):
    cupy = sys.modules["cupy"]
    xd, dyd, gd, bd = _ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    stream = cupy.cuda.get_current_stream().ptr
    assert set(launch.WORKSPACES) == {(0, stream)}
    launch.WORKSPACES.clear()  # backward allocates its own
    cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" in gpu.calls and set(launch.WORKSPACES) == {(0, stream)}


def test_saved_statistics_without_a_reserve_take_the_plain_backward_on_an_ex_layout(gpu):
    from cudnn_bn._cudnn import plans

    xd, dyd, gd, bd = _ex_case()
    previous = plans.set_ex_path_enabled(False)
    try:
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    finally:
        plans.set_ex_path_enabled(previous)
    assert saved.reserve_space is None
    cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" not in gpu.calls and "cudnnBatchNormalizationBackward" in gpu.calls


def test_the_overflow_errors_say_what_was_done_and_what_to_do(gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with pytest.raises(CudnnOverflowError) as forward:
        cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="raise")
    assert str(forward.value) == (
        "cudnnBatchNormalizationForwardTraining: CUDNN_STATUS_RUNTIME_FP_OVERFLOW (SPATIAL_PERSISTENT overflowed; "
        "running statistics were restored. Use mode='spatial' or on_overflow='fallback')"
    )
    with pytest.raises(CudnnOverflowError) as backward:
        cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="raise")
    assert str(backward.value) == (
        "cudnnBatchNormalizationBackward: CUDNN_STATUS_RUNTIME_FP_OVERFLOW (SPATIAL_PERSISTENT overflowed; "
        "pass on_overflow='fallback', or mode='spatial' (it accepts these saved statistics), to re-run "
        "this backward in SPATIAL)"
    )


def test_a_stale_flag_does_not_fail_the_next_checked_backward(gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="ignore")  # leaves the flag set
    gpu.overflow_modes.discard(Mode.SPATIAL_PERSISTENT)
    dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="raise")
    assert np.all(np.isfinite(dx))


# ---- backward's fallback keeps the statistics it was given ----
def test_backward_fallback_uses_the_saved_statistics_it_was_given(gpu):
    # statistics of another batch: a fallback that recomputed them from x would give other gradients
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    _, other, _, _, _ = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32, seed=5, offset=0.5, scale=2.0)
    xd, dyd, gd, bd, od = _device(x, dy, gamma, beta, other)
    _, saved = cudnn_bn.forward_training(od, gd, bd, mode="spatial_persistent")
    gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = cudnn_bn.backward(xd, dyd, gd, saved, mode="spatial_persistent", on_overflow="fallback")
    wide = [np.asarray(a, np.float64) for a in (x, dy, gamma)]
    given = reference.SavedStats(np.asarray(saved.mean, np.float64), np.asarray(saved.inv_std, np.float64), "spatial", 1e-5, 1)
    for actual, expected in zip(grads, reference.backward(*wide, given)):
        assert_close(actual, expected, np.float32, scale=10)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "cudnn_bn: SPATIAL_PERSISTENT backward overflowed for shape (4, 3, 2, 2) float32; "
        "re-ran with SPATIAL (this warning is shown once per shape)"
    ]


# ---- training and backward: the per-signature cache, the written arrays and the device ----
def _training_args(shape=(4, 3, 2, 2)):
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, 1, np.float32)
    return x, gamma, beta, np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32)


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "running_mean", "running_var"])
def test_training_checks_again_when_any_argument_changes_shape(gpu, position):
    _refused_after_a_shape_change(cudnn_bn.forward_training, _training_args(), position)


@pytest.mark.parametrize("position", [3, 4], ids=["running_mean", "running_var"])
def test_training_checks_again_when_a_running_statistic_becomes_read_only(gpu, position):
    cudnn_bn.forward_training(*_device(*_training_args()), mode="spatial")
    arrays = _device(*_training_args())
    arrays[position].flags.writeable = False
    with pytest.raises((TypeError, ValueError), match=["running_mean", "running_var"][position - 3]):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("written,other", [(3, 0), (4, 1), (3, 2)])
def test_a_cached_training_call_still_refuses_a_running_statistic_overlapping_an_input(gpu, written, other):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    cudnn_bn.forward_training(*_device(*_training_args()), mode="spatial")  # the signature is now cached
    arrays = _device(*_training_args())
    arrays[written] = arrays[other].reshape(-1)[:3]  # a view into the other argument's memory
    with pytest.raises(ValueError, match=rf"^{names[written]}: expected memory of its own .* overlaps {names[other]}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("keyword,first,second", [("eps", 1, True), ("channel_axis", 1, True)])
def test_training_and_backward_check_again_when_an_equal_value_comes_as_a_bool(gpu, keyword, first, second):
    x, gamma, beta, _, _ = _device(*_training_args())
    cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{keyword: second})
    dy = _device(np.ones(x.shape, np.float32))[0]
    cudnn_bn.backward(x, dy, gamma, mode="spatial", **{"eps": 1e-5, "channel_axis": 1, keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.backward(x, dy, gamma, mode="spatial", **{"eps": 1e-5, "channel_axis": 1, keyword: second})


def _backward_args():
    layout, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    return x, dy, gamma, beta


@pytest.mark.parametrize("position", range(3), ids=["x", "dy", "gamma"])
def test_backward_checks_again_when_any_argument_changes_shape(gpu, position):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    args = [x, dy, gamma]
    args[position] = args[position][:, :2] if position < 2 else _device(np.ones(4, np.float32))[0]
    with pytest.raises(ValueError):
        cudnn_bn.backward(*args, saved)


@pytest.mark.parametrize("field", ["mean", "inv_std"])
def test_backward_checks_again_when_the_saved_statistics_change_shape(gpu, field):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    wrong = dataclasses.replace(saved, **{field: _device(np.ones(4, np.float32))[0]})
    with pytest.raises(ValueError, match="saved"):
        cudnn_bn.backward(x, dy, gamma, wrong)


def test_backward_checks_again_when_the_saved_statistics_gain_a_reserve(gpu):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    with pytest.raises((TypeError, ValueError), match="reserve_space"):
        cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, reserve_space=_device(np.ones((2, 2), np.uint8))[0]))


@pytest.mark.parametrize("operation", ["training", "backward"])
def test_training_and_backward_remember_their_signature_with_their_plan(gpu, operation):
    from cudnn_bn._cudnn import plans

    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    signatures.SETTLED.clear()
    if operation == "training":
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    else:
        cudnn_bn.backward(x, dy, gamma, saved)
    (settled,) = signatures.SETTLED.values()
    kind = plans.TRAINING if operation == "training" else plans.BACKWARD
    assert settled.plan is plans.plan_for(kind, settled.checked.layout, settled.checked.data_dtype, 0)


@pytest.mark.parametrize("position", range(1, 5), ids=["gamma", "beta", "running_mean", "running_var"])
def test_training_refuses_an_argument_on_another_device_naming_it(two_gpus, position):
    cupy = sys.modules["cupy"]
    args = _training_args()
    arrays = _device(*args)
    with cupy.cuda.Device(1):
        arrays[position] = _device(args[position])[0]
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    with pytest.raises(ValueError, match=rf"^arrays on different devices: expected one device, got .*{names[position]} on device 1"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("name", ["dy", "gamma", "saved_mean", "saved_inv_std"])
def test_backward_refuses_an_argument_on_another_device_naming_it(two_gpus, name):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta = _backward_args()
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
    with cupy.cuda.Device(1):
        if name == "dy":
            dyd = _device(dy)[0]
        elif name == "gamma":
            gd = _device(gamma)[0]
        else:
            field = name.removeprefix("saved_")
            saved = dataclasses.replace(saved, **{field: _device(getattr(saved, field))[0]})
    with pytest.raises(ValueError, match=rf"^arrays on different devices: expected one device, got .*{name} on device 1"):
        cudnn_bn.backward(xd, dyd, gd, saved)


def test_training_and_backward_run_on_the_device_of_their_arrays(two_gpus):
    cupy = sys.modules["cupy"]
    with cupy.cuda.Device(1):
        x, dy, gamma, beta = _device(*_backward_args())
    y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    dx, _, _ = cudnn_bn.backward(x, dy, gamma, saved)
    assert y.device.id == 1 and dx.device.id == 1


# ---- the handle of the arrays' device, also when another device ran first ----
def test_inference_then_training_fallbacks_on_two_devices_each_use_their_own_handle(two_gpus):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta = _backward_args()
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    for device in (0, 1):
        with cupy.cuda.Device(device):
            xd, dyd, gd, bd, md, vd = _device(x, dy, gamma, beta, mean, var)
        assert cudnn_bn.forward_inference(xd, gd, bd, md, vd, mode="spatial").device.id == device
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
        two_gpus.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="fallback")
            dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="fallback")
        two_gpus.overflow_modes.discard(Mode.SPATIAL_PERSISTENT)
        assert y.device.id == device and dx.device.id == device


def test_backward_refuses_a_reserve_space_on_another_device_naming_it(two_gpus):
    cupy = sys.modules["cupy"]
    xd, dyd, gd, bd = _ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    with cupy.cuda.Device(1):
        elsewhere = _device(np.asarray(saved.reserve_space))[0]
    with pytest.raises(ValueError, match=r"^arrays on different devices: expected one device, got .*saved_reserve_space on device 1"):
        cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, reserve_space=elsewhere))


def test_an_empty_reserve_request_still_gets_a_one_byte_buffer(gpu):
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()  # plans keep the sizes they queried
    gpu.reserve_size = 0
    xd, _, gd, bd = _ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert saved.reserve_space.size == 1


def test_growing_one_streams_workspace_evicts_nothing_when_the_table_is_full(gpu):
    cupy = sys.modules["cupy"]
    for stream in range(launch.MAX_WORKSPACE_STREAMS):
        launch.workspace(cupy, 0, stream, 4)
    launch.workspace(cupy, 0, 5, 64)  # a stream already in the table asks for more
    assert len(launch.WORKSPACES) == launch.MAX_WORKSPACE_STREAMS and (0, 0) in launch.WORKSPACES
    assert launch.WORKSPACES[(0, 5)].size == 64


def test_a_persistent_backward_from_another_device_checks_its_statistics_once_on_theirs(two_gpus, monkeypatch):
    import dataclasses

    cupy = sys.modules["cupy"]
    _, x, _, gamma, beta = make_case((4, 2, 2, 8), Mode.SPATIAL, -1, np.float16)
    with cupy.cuda.Device(1):
        xd, gd, bd = _device(x, gamma, beta)
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
        foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())  # statistics the forward did not hand over
    checks, vdot = [], cupy.vdot
    monkeypatch.setattr(cupy, "vdot", lambda a, b: checks.append((a.device.id, cupy.cuda.runtime.getDevice())) or vdot(a, b))
    for statistics, expected in ((saved, []), (foreign, [(1, 1)])):  # the forward's own are not read back
        for _ in range(2):  # the call that settles the signature, then the cached one, both from device 0
            checks.clear()
            dx, _, _ = cudnn_bn.backward(xd, xd, gd, statistics)
            assert checks == expected and dx.device.id == 1


class _MisbehavingArray:
    """Looks like an array until its shape is read."""

    dtype = np.dtype(np.uint8)

    @property
    def shape(self):
        raise RuntimeError("no shape here")


class _UnhashableMode(str):
    def __hash__(self):
        raise ValueError("no hash here")


def test_arguments_that_break_the_signature_get_the_typed_errors_of_the_full_checks(gpu):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    with pytest.raises(TypeError, match="saved.reserve_space"):
        cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, reserve_space=_MisbehavingArray()))
    with pytest.raises(ValueError, match="^mode: expected one of"):
        cudnn_bn.backward(x, dy, gamma, mode=_UnhashableMode("sideways"), eps=1e-5)
    with pytest.raises(ValueError, match="^mode: expected one of"):
        cudnn_bn.forward_training(x, gamma, beta, mode=_UnhashableMode("sideways"))


# ---- the cached path: what each call still checks once its signature is settled ----
def _settled_training(momentum=0.3):
    """Device arrays of a training call whose signature is now settled (one call made)."""
    arrays = _device(*_training_args())
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=momentum)
    return arrays


def _host(array):
    """A synchronized float64 host copy (the simulated GPU runs queued work first)."""
    return np.asarray(array.get() if hasattr(array, "get") else array, np.float64)


def _reference_running(x, gamma, beta, mean, var, momentum):
    mean, var = _host(mean).copy(), _host(var).copy()
    reference.forward_training(_host(x), _host(gamma), _host(beta), mean, var, mode="spatial", momentum=float(momentum))
    return mean, var


@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), -0.1, 1.5, True, "0.1"], ids=["nan", "inf", "negative", "above_one", "bool", "str"])
def test_a_cached_training_call_refuses_a_bad_momentum_before_writing(gpu, momentum):
    x, gamma, beta, mean, var = _settled_training()
    before = (mean.get(), var.get())
    with pytest.raises((TypeError, ValueError), match="^momentum: expected"):
        cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=momentum)
    assert np.array_equal(mean.get(), before[0]) and np.array_equal(var.get(), before[1])


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.1, np.float32(0.5), np.float64(0.25), 1], ids=["zero", "one", "float", "float32", "float64", "int"])
def test_a_cached_training_call_updates_with_any_valid_momentum_and_checks_only_non_floats(gpu, monkeypatch, momentum):
    x, gamma, beta, mean, var = _settled_training()
    expected = _reference_running(x, gamma, beta, mean, var, momentum)
    full_checks = []
    check_momentum = ops.check_momentum
    monkeypatch.setattr(ops, "check_momentum", lambda value: full_checks.append(value) or check_momentum(value))
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=momentum)
    assert_close(mean, expected[0], np.float32)
    assert_close(var, expected[1], np.float32)
    # a float in [0, 1] is the common case, checked inline; anything else takes the full check
    assert len(full_checks) == (0 if type(momentum) is float else 1)


def _carve(buffer, order, shapes):
    """Views of one flat device buffer laid end to end in ``order``: {name: view}."""
    views, offset = {}, 0
    for name in order:
        size = int(np.prod(shapes[name]))
        views[name] = buffer[offset:offset + size].reshape(shapes[name])
        offset += size
    return views


# every ordered pair of (running statistic, other argument) ends up exactly adjacent in one of these
_ADJACENT_LAYOUTS = [
    ("x", "running_mean", "gamma", "running_var", "beta"),
    ("beta", "running_var", "gamma", "running_mean", "x"),
    ("x", "running_var", "running_mean", "beta", "gamma"),
    ("beta", "running_mean", "running_var", "x", "gamma"),
]


@pytest.mark.parametrize("order", _ADJACENT_LAYOUTS, ids=["-".join(n.removeprefix("running_") for n in o) for o in _ADJACENT_LAYOUTS])
def test_a_cached_training_call_accepts_adjacent_arrays_without_the_exact_overlap_check(gpu, monkeypatch, order):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    args = _training_args()
    x, gamma, beta, mean, var = _settled_training()
    exact_checks = []
    check_no_overlap = signatures.check_no_overlap
    monkeypatch.setattr(signatures, "check_no_overlap", lambda *a: exact_checks.append(a) or check_no_overlap(*a))
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=0.3)  # disjoint arrays
    assert exact_checks == []
    shapes = {name: np.shape(array) for name, array in zip(names, args)}
    buffer = _device(np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32))[0]
    views = _carve(buffer, order, shapes)
    for name, array in zip(names, args):
        views[name][...] = array
    expected = _reference_running(*args, 0.3)
    cudnn_bn.forward_training(*(views[name] for name in names), mode="spatial", momentum=0.3)
    assert exact_checks == []  # touching is not overlapping: the cached path decides alone
    assert_close(views["running_mean"], expected[0], np.float32)
    assert_close(views["running_var"], expected[1], np.float32)


@pytest.mark.parametrize("written,other", [(3, 1), (4, 0), (4, 2), (3, 4), (4, 3)])
def test_a_cached_training_call_refuses_every_other_overlapping_pair(gpu, written, other):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    arrays = _settled_training()
    # one buffer holding the other argument, then the written one sharing the other's last element
    size = arrays[other].size
    buffer = _device(np.zeros(size + 2, np.float32))[0]
    arrays[other], arrays[written] = buffer[:size].reshape(arrays[other].shape), buffer[size - 1:]
    first, second = _culprits(names[written], names[other])
    with pytest.raises(ValueError, match=rf"^{first}: expected memory of its own .* overlaps {second}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


def _culprits(written: str, other: str) -> tuple[str, str]:
    """The names the overlap error gives: running_mean is checked first, so it is the one named
    when the two running statistics overlap."""
    return ("running_mean", "running_var") if {written, other} == {"running_mean", "running_var"} else (written, other)


def _reversed(array, axis=0):
    """A device view of ``array`` running backwards along ``axis`` (its lowest address is not its first element)."""
    device = _device(np.flip(array, axis))[0]
    return np.flip(device, axis)


@pytest.mark.parametrize("reversed_name,written", [("x", 3), ("gamma", 4), ("beta", 3), ("running_mean", 4), ("running_var", 3)])
def test_a_cached_training_call_sees_an_overlap_below_a_reversed_arrays_first_element(gpu, reversed_name, written):
    # a reversed view's first element is its highest address: the overlap sits below it
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    position = names.index(reversed_name)
    args = list(_training_args())
    settle = _device(*args)
    settle[position] = _reversed(args[position])
    cudnn_bn.forward_training(*settle, mode="spatial")  # this signature (with its strides) is now cached
    arrays = _device(*args)
    arrays[position] = _reversed(args[position])
    lowest = arrays[position].base if arrays[position].base is not None else arrays[position]
    arrays[written] = lowest.reshape(-1)[:3]
    first, second = _culprits(names[written], reversed_name)
    with pytest.raises(ValueError, match=rf"^{first}: expected memory of its own .* overlaps {second}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_alone_is_refused_naming_both(gpu, given):
    x, gamma, beta, mean, var = _settled_training()
    statistic = {"running_mean": mean, "running_var": var}[given]
    with pytest.raises(ValueError, match=r"^running_mean, running_var: expected both or neither, got only one$"):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{given: statistic})


# ---- the signature keys the types of what it is given ----
@pytest.mark.parametrize("operation", ["training", "inference", "backward"])
def test_a_mode_equal_to_a_valid_one_but_a_bool_is_refused_after_the_valid_one_ran(gpu, operation):
    x, dy, gamma, beta = _device(*_backward_args())
    mean, var = _device(np.zeros(3, np.float32), np.ones(3, np.float32))
    calls = {
        "training": lambda mode: cudnn_bn.forward_training(x, gamma, beta, mode=mode),
        "inference": lambda mode: cudnn_bn.forward_inference(x, gamma, beta, mean, var, mode=mode),
        "backward": lambda mode: cudnn_bn.backward(x, dy, gamma, mode=mode, eps=1e-5),
    }
    calls[operation](1)  # Mode.SPATIAL's value: accepted
    with pytest.raises((TypeError, ValueError), match="^mode: expected"):
        calls[operation](True)  # == 1, but a bool is not a mode


class _Renamed(str):
    """A string equal to a valid name that reads as another one when lowered."""

    def lower(self):
        return "sideways"


@pytest.mark.parametrize("operation", ["training", "backward"])
def test_an_on_overflow_of_another_type_is_checked_again_though_equal(gpu, operation):
    x, dy, gamma, beta = _device(*_backward_args())
    calls = {
        "training": lambda value: cudnn_bn.forward_training(x, gamma, beta, mode="spatial", on_overflow=value),
        "backward": lambda value: cudnn_bn.backward(x, dy, gamma, mode="spatial", eps=1e-5, on_overflow=value),
    }
    calls[operation]("raise")
    with pytest.raises(ValueError, match="^on_overflow: expected one of"):
        calls[operation](_Renamed("raise"))


class _Posing(FakeArray):
    """Device memory like the simulator's arrays, but of a type the package does not take for cupy's."""


def _posing(array):
    return np.array(array, copy=True).view(FakeArray).view(_Posing)


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "running_mean", "running_var"])
def test_training_checks_again_when_an_argument_changes_type(gpu, position):
    args = _training_args()
    ops.forward_training(*_device(*args), "spatial", 0.1, 1e-5, 1, None)
    arrays = _device(*args)
    arrays[position] = _posing(args[position])
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.forward_training(*arrays, "spatial", 0.1, 1e-5, 1, None)


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "mean", "var"])
def test_inference_checks_again_when_an_argument_changes_type(gpu, position):
    args = _inference_args()
    ops.forward_inference(*_device(*args), "spatial", 1e-5, 1)
    arrays = _device(*args)
    arrays[position] = _posing(args[position])
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.forward_inference(*arrays, "spatial", 1e-5, 1)


@pytest.mark.parametrize("name", ["x", "dy", "gamma", "saved_mean"])
def test_backward_checks_again_when_an_argument_changes_type(gpu, name):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    ops.backward(x, dy, gamma, saved, None, None, None, None)
    arrays = {"x": x, "dy": dy, "gamma": gamma}
    if name == "saved_mean":
        saved = dataclasses.replace(saved, mean=_posing(saved.mean.get()))
    else:
        arrays[name] = _posing(arrays[name].get())
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, None, None, None, None)


# ---- the memory of settled signatures ----
def test_a_settled_signature_skips_the_full_checks_on_its_next_call(gpu, monkeypatch):
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()  # signatures settled by earlier tests go with the plans
    full_checks = []
    for name in ("check_forward_inference", "check_forward_training", "check_backward"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _original=original, _name=name, **k: full_checks.append(_name) or _original(*a, **k))
    x, dy, gamma, beta = _device(*_backward_args())
    mean, var = _device(np.zeros(3, np.float32), np.ones(3, np.float32))
    for _ in range(3):
        cudnn_bn.forward_inference(x, gamma, beta, mean, var, mode="spatial")
        _, saved = cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial")
        cudnn_bn.backward(x, dy, gamma, saved)
    assert sorted(full_checks) == ["check_backward", "check_forward_inference", "check_forward_training"]


def test_settled_signatures_are_kept_up_to_twice_the_plan_capacity(gpu, monkeypatch):
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()
    monkeypatch.setattr(plans.PLANS, "capacity", 3)
    counts = []
    for batch in range(2, 10):
        cudnn_bn.forward_inference(*_device(*_inference_args((batch, 3, 2, 2))), mode="spatial")
        counts.append(len(signatures.SETTLED))
    # six kept (twice the three plans), then emptied for the seventh
    assert counts == [1, 2, 3, 4, 5, 6, 1, 2]


# ---- calls from another device keep every argument ----
def test_training_from_another_device_updates_the_running_statistics(two_gpus):
    cupy = sys.modules["cupy"]
    args = _training_args()
    with cupy.cuda.Device(1):
        x, gamma, beta, mean, var = _device(*args)
    expected = _reference_running(*args, 0.1)
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=0.1)
    assert_close(mean, expected[0], np.float32)
    assert_close(var, expected[1], np.float32)


@pytest.mark.parametrize("mode", ["per_activation", "spatial"])
def test_backward_from_another_device_keeps_its_mode_eps_and_channel_axis(two_gpus, mode):
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, _ = make_case((4, 2, 2, 3), Mode[mode.upper()], -1, np.float32)
    with cupy.cuda.Device(1):
        xd, dyd, gd = _device(x, dy, gamma)
    grads = cudnn_bn.backward(xd, dyd, gd, mode=mode, eps=0.5, channel_axis=-1)
    expected = reference.backward(*(np.asarray(a, np.float64) for a in (x, dy, gamma)), mode=mode, eps=0.5, channel_axis=-1)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, np.float32, scale=10)


# ---- arrays that do not reach cuDNN as they are ----
def test_inference_of_a_non_contiguous_x_matches_the_reference_also_once_settled(gpu):
    x, gamma, beta, mean, var = _inference_args()
    wide = np.concatenate([x, x + 1.0], axis=3)[..., ::2]  # every other element of a wider array
    expected = reference.forward_inference(*(np.asarray(a, np.float64) for a in (wide, gamma, beta, mean, var)), mode="spatial")
    for _ in range(2):
        arrays = _device(np.concatenate([x, x + 1.0], axis=3), gamma, beta, mean, var)
        arrays[0] = arrays[0][..., ::2]
        assert_close(cudnn_bn.forward_inference(*arrays, mode="spatial"), expected, np.float32)


def test_backward_of_non_contiguous_x_and_dy_matches_the_reference(gpu):
    x, dy, gamma, _ = _backward_args()
    expected = reference.backward(*(np.asarray(a, np.float64) for a in (x, dy, gamma)), mode="spatial", eps=1e-5)
    strided = [_device(np.repeat(a, 2, axis=0))[0][::2] for a in (x, dy)]  # every other row: the values of a
    grads = cudnn_bn.backward(*strided, _device(gamma)[0], mode="spatial", eps=1e-5)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, np.float32, scale=10)


def test_backward_reads_non_contiguous_saved_statistics_as_their_values(gpu):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    expected = cudnn_bn.backward(x, dy, gamma, saved)
    spread = {name: _device(np.repeat(getattr(saved, name).get(), 2))[0][::2] for name in ("mean", "inv_std")}
    for actual, wanted in zip(cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, **spread)), expected):
        assert_close(actual, wanted.get(), np.float32)


@pytest.mark.parametrize("shape,channel_axis,mode", [((6, 3), 1, "per_activation"), ((4, 2, 2, 3), -1, "spatial")])
def test_inference_auto_runs_the_policys_mode(gpu, shape, channel_axis, mode):
    layout, x, _, gamma, beta = make_case(shape, Mode[mode.upper()], channel_axis, np.float32)
    mean, var = np.full(layout.param_shape, 0.25, np.float32), np.full(layout.param_shape, 2.0, np.float32)
    expected = reference.forward_inference(*(np.asarray(a, np.float64) for a in (x, gamma, beta, mean, var)), mode=mode, channel_axis=channel_axis)
    y = cudnn_bn.forward_inference(*_device(x, gamma, beta, mean, var), mode="auto", channel_axis=channel_axis)
    assert_close(y, expected, np.float32)


# ---- BackwardEx's workspace ----
def test_backward_ex_gets_the_workspace_it_asked_for_not_the_reserve_size(gpu):
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()  # plans keep the sizes they queried
    gpu.workspace_size, gpu.reserve_size = 1024, 16
    xd, dyd, gd, bd = _ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    launch.WORKSPACES.clear()  # backward allocates its own
    dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" in gpu.calls and np.all(np.isfinite(dx.get()))
    assert [buffer.size for buffer in launch.WORKSPACES.values()] == [1024]
    plans.PLANS.clear()  # their sizes are this test's


# ---- saved statistics the signature cannot describe ----
class _SavedSubclass(cudnn_bn.SavedStats):
    """Saved statistics of a subclass: accepted, but not keyed (the full checks run every time)."""


def test_saved_statistics_of_a_subclass_are_checked_on_every_call(gpu):
    x, dy, gamma, beta = _device(*_backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    fields = {field.name: getattr(saved, field.name) for field in dataclasses.fields(saved)}
    cudnn_bn.backward(x, dy, gamma, _SavedSubclass(**fields))
    wrong = dict(fields, mean=_device(np.zeros(4, np.float32))[0])
    with pytest.raises(ValueError, match="saved"):
        cudnn_bn.backward(x, dy, gamma, _SavedSubclass(**wrong))


# ---- the cupy module ----
def test_the_cupy_path_imports_cupy_when_it_is_not_loaded_yet(monkeypatch, tmp_path):
    (tmp_path / "cupy.py").write_text("STAND_IN = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "cupy", None)  # undone afterwards: the stand-in does not outlive the test
    del sys.modules["cupy"]
    cupy = launch.cupy_module()
    assert getattr(cupy, "STAND_IN", False) and sys.modules["cupy"] is cupy


class _CupyFlags:
    """Flags as CuPy's arrays have them: no ``writeable`` (device memory is always writable)."""

    def __init__(self, flags):
        self.c_contiguous, self.f_contiguous, self.owndata = flags.c_contiguous, flags.f_contiguous, flags.owndata


class _LikeCupy(FakeArray):
    """The simulator's array with CuPy's flags."""

    @property
    def flags(self):
        return _CupyFlags(np.ndarray.flags.__get__(self))


_LikeCupy.__module__ = FakeArray.__module__


def test_running_statistics_without_a_writeable_flag_are_updated_like_cupys(gpu):
    args = _training_args()
    expected = _reference_running(*args, 0.1)
    arrays = _device(*args)
    arrays[3], arrays[4] = arrays[3].view(_LikeCupy), arrays[4].view(_LikeCupy)
    assert not hasattr(arrays[3].flags, "writeable")
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=0.1)  # settles the signature
    expected = _reference_running(*args[:3], *expected, 0.1)
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=0.1)  # the cached path
    assert_close(arrays[3], expected[0], np.float32)
    assert_close(arrays[4], expected[1], np.float32)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_with_cupys_flags_alone_is_refused_naming_both(gpu, given):
    x, gamma, beta, mean, var = _device(*_training_args())
    statistic = {"running_mean": mean, "running_var": var}[given].view(_LikeCupy)
    with pytest.raises(ValueError, match=r"^running_mean, running_var: expected both or neither, got only one$"):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{given: statistic})


# ---- the device and the handle ----
def test_the_fused_call_from_another_device_runs_on_its_arrays_device(two_gpus):
    from cudnn_bn import fused

    cupy = sys.modules["cupy"]
    _, x, _, gamma, beta = make_case((2, 2, 2, 8), Mode.SPATIAL, -1, np.float16)
    expected, _ = fused.reference_forward_training(*(np.asarray(a, np.float64) for a in (x, gamma, beta)), mode="spatial", channel_axis=-1)
    with cupy.cuda.Device(1):
        xd, gd, bd = _device(x, gamma, beta)
    y, _ = fused.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert y.device.id == 1
    assert_close(y, expected, np.float16)


def test_a_handle_whose_stream_cannot_be_bound_goes_back_to_its_pool(gpu, monkeypatch):
    from cudnn_bn._cudnn import handles

    args = _device(*_inference_args())
    cudnn_bn.forward_inference(*args, mode="spatial")
    pool = handles.pool_for(0)
    created = pool.created

    def refuse(self, stream):
        raise RuntimeError("no stream here")

    with monkeypatch.context() as patched:
        patched.setattr(handles.Handle, "bind_stream", refuse)
        with pytest.raises(RuntimeError, match="no stream here"):
            cudnn_bn.forward_inference(*args, mode="spatial")
    cudnn_bn.forward_inference(*args, mode="spatial")  # the same handle again, not a new one
    assert pool.created == created


def test_backward_ex_on_two_devices_queries_its_sizes_with_each_devices_handle(two_gpus):
    from cudnn_bn._cudnn import handles, plans

    plans.PLANS.clear()  # plans keep the sizes they queried
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta = make_case((2, 2, 2, 4), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    for device in (1, 0):
        with cupy.cuda.Device(device):
            xd, dyd, gd, bd = _device(x, dy, gamma, beta)
            _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
        dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved)
        assert dx.device.id == device
    # one pool per device: a pool under any other key would lend a handle made on whichever device
    # was current when it was made to the calls of every device
    assert {device for device, _ in handles._POOLS} <= {0, 1}
    assert all(pool.device_id == device for (device, _), pool in handles._POOLS.items())
