"""The launch machinery of the cuDNN path (cudnn_bn/_cudnn/launch.py) on the simulated GPU: the
overflow error and its messages, the fallback warning's key and where it points, the overflow flag
read right after a persistent kernel, the reserve-space checks before BackwardEx, the Ex workspace
cache, the cupy module and the handle loan."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import CudnnOverflowError, Mode, compat, fused
from cudnn_bn._cudnn import handles, launch, raw
from cudnn_calls import ex_case, inference_args, on_device
from fake_cudnn import FakeArray


# ---- the overflow error and the fallback warning ----
def test_the_overflow_error_carries_cudnns_status():
    error = launch.overflow_error("cudnnBatchNormalizationForwardTraining", "advice")
    assert (error.status, error.status_name) == (1007, "CUDNN_STATUS_RUNTIME_FP_OVERFLOW")  # cudnn_graph.h
    assert str(error) == ("cudnnBatchNormalizationForwardTraining: CUDNN_STATUS_RUNTIME_FP_OVERFLOW "
                          "(SPATIAL_PERSISTENT overflowed; advice)")


def _fallbacks(x, gamma, beta):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cudnn_bn.forward_training(*on_device(x, gamma, beta), mode="spatial_persistent", on_overflow="fallback")
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_fallback_warning_is_once_per_shape_and_dtype(unsettled_gpu):
    unsettled_gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
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


def _fallback_warnings(simulator, entry: str):
    """The RuntimeWarnings of one persistent call through ``entry`` that overflows and falls back."""
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
    running = on_device(np.zeros(3, np.float32), np.ones(3, np.float32))
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    simulator.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
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
def test_the_fallback_warning_points_at_the_caller(unsettled_gpu, entry):
    # exact frames: deselected in mutation runs, whose trampolines put frames of their own (outside
    # the package) between the package's (pyproject.toml)
    (warning,) = _fallback_warnings(unsettled_gpu, entry)
    assert warning.filename == __file__
    probe = _package_frames()
    assert probe["warner"](launch.outside_the_package) == 2  # warnings.warn's level of the warner's caller
    assert probe["middle"](launch.outside_the_package) == 3  # each package frame in between counts once


@pytest.mark.parametrize("entry", _ENTRIES)
def test_the_fallback_warning_never_points_into_the_package(unsettled_gpu, entry):
    # weaker than the exact caller (the test above), and true also where test tools add frames of their own
    (warning,) = _fallback_warnings(unsettled_gpu, entry)
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
def ex_call(unsettled_gpu):
    xd, dyd, gd, bd = ex_case()
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
def test_the_last_reserve_check_before_backward_ex_refuses_the_wrong_kind(unsettled_gpu, make_bad):
    # SavedStats refuses these first; this check stands between them and the native call regardless
    bad = make_bad()
    with pytest.raises(TypeError,
                       match=r"^saved\.reserve_space: expected the 1-D uint8 device buffer from forward_training, "
                             rf"got {type(bad).__name__}$"):
        launch.check_reserve(bad, 4, 0)


def test_a_reserve_space_too_small_is_a_value_error_with_the_sizes(ex_call):
    size = ex_call[3].reserve_space.size
    small = np.zeros(size - 1, np.uint8).view(FakeArray)
    with pytest.raises(ValueError,
                       match=rf"^saved\.reserve_space: expected at least {size} bytes on device 0 "
                             rf"\(the forward's reserve space\), got {size - 1} bytes on device 0$"):
        _backward_with_reserve(ex_call, small)


# ---- the Ex workspace, one per (device, stream) ----
def test_the_workspace_is_kept_per_device_and_stream_and_grows_only_when_asked(unsettled_gpu):
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


def test_the_workspaces_are_bounded_oldest_first(unsettled_gpu):
    cupy = sys.modules["cupy"]
    for stream in range(launch.MAX_WORKSPACE_STREAMS + 3):
        launch.workspace(cupy, 0, stream, 4)
    assert len(launch.WORKSPACES) == launch.MAX_WORKSPACE_STREAMS
    assert (0, 0) not in launch.WORKSPACES and (0, launch.MAX_WORKSPACE_STREAMS + 2) in launch.WORKSPACES


def test_growing_one_streams_workspace_evicts_nothing_when_the_table_is_full(unsettled_gpu):
    cupy = sys.modules["cupy"]
    for stream in range(launch.MAX_WORKSPACE_STREAMS):
        launch.workspace(cupy, 0, stream, 4)
    launch.workspace(cupy, 0, 5, 64)  # a stream already in the table asks for more
    assert len(launch.WORKSPACES) == launch.MAX_WORKSPACE_STREAMS and (0, 0) in launch.WORKSPACES
    assert launch.WORKSPACES[(0, 5)].size == 64


def test_the_ex_calls_keep_their_workspace_under_this_device_and_stream(unsettled_gpu):
    cupy = sys.modules["cupy"]
    xd, dyd, gd, bd = ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    stream = cupy.cuda.get_current_stream().ptr
    assert set(launch.WORKSPACES) == {(0, stream)}
    launch.WORKSPACES.clear()  # backward allocates its own
    cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" in unsettled_gpu.calls and set(launch.WORKSPACES) == {(0, stream)}


# ---- the overflow flag, read right after a persistent kernel ----
def test_a_checked_call_reads_the_flag_once_and_leaves_nothing_to_clear(unsettled_gpu):
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    for _ in range(2):
        cudnn_bn.forward_training(*on_device(x, gamma, beta), mode="spatial_persistent", on_overflow="raise")
    assert unsettled_gpu.calls.count("cudnnQueryRuntimeError") == 2  # one per call: the first left no unread flag


def test_a_kernel_status_other_than_overflow_is_raised_naming_the_query(unsettled_gpu, monkeypatch):
    def query(handle, status, mode, tag):
        status._obj.value = 4000  # CUDNN_STATUS_INTERNAL_ERROR
        return 0

    monkeypatch.setattr(raw.library(), "cudnnQueryRuntimeError", query)
    _, x, _, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    with pytest.raises(cudnn_bn.CudnnError) as raised:
        cudnn_bn.forward_training(*on_device(x, gamma, beta), mode="spatial_persistent", on_overflow="raise")
    assert (raised.value.status, raised.value.function) == (4000, "cudnnQueryRuntimeError (kernel status)")


def test_the_overflow_errors_say_what_was_done_and_what_to_do(unsettled_gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    unsettled_gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
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


def test_a_stale_flag_does_not_fail_the_next_checked_backward(unsettled_gpu):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
    unsettled_gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="ignore")  # leaves the flag set
    unsettled_gpu.overflow_modes.discard(Mode.SPATIAL_PERSISTENT)
    dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="raise")
    assert np.all(np.isfinite(dx))


def _interrupted_checked_backward(simulator, monkeypatch):
    """A checked backward whose kernel overflows and which raises before its flag is read (here from
    the finiteness read of statistics from elsewhere, as a KeyboardInterrupt could); returns the
    arrays, the warnings it gave and the CHECKED pool."""
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="raise")
    foreign = dataclasses.replace(saved, mean=saved.mean.copy())  # read back after the kernel
    simulator.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with monkeypatch.context() as patched, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched.setattr(cupy, "vdot", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            cudnn_bn.backward(xd, dyd, gd, foreign, on_overflow="raise")
    simulator.overflow_modes.discard(Mode.SPATIAL_PERSISTENT)
    return (xd, gd, bd), [w for w in caught if issubclass(w.category, RuntimeWarning)], handles.pool_for(
        0, handles.CHECKED)


def test_a_call_that_raised_before_reading_its_flag_clears_it_itself_and_warns_of_an_overflow(unsettled_gpu,
                                                                                             monkeypatch):
    """The thread that ran the kernel clears its flag as it gives the handle back (another thread's
    query could wait on another queue under per-thread default streams), and says that what the
    interrupted call wrote may hold NaN; the next checked call reads only its own flag."""
    queries = unsettled_gpu.calls.count("cudnnQueryRuntimeError")
    (xd, gd, bd), caught, pool = _interrupted_checked_backward(unsettled_gpu, monkeypatch)
    assert unsettled_gpu.calls.count("cudnnQueryRuntimeError") == queries + 2  # the forward's, then the clearing
    assert [str(w.message) for w in caught] == [
        "cudnn_bn: a SPATIAL_PERSISTENT call that raised before reading its overflow flag had overflowed; "
        "what it wrote, running statistics included, may hold NaN or Inf"
    ]
    (handle,) = pool._idle
    assert not handle.flag_unread
    y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="raise")
    assert np.all(np.isfinite(y.get()))
    assert unsettled_gpu.calls.count("cudnnQueryRuntimeError") == queries + 3  # its own only


def test_a_flag_that_could_not_be_cleared_is_cleared_by_the_next_borrower(unsettled_gpu, monkeypatch):
    real, blocking = handles.Handle.query_flag, []

    def query(self, mode=raw.ErrQueryMode.BLOCKING):
        if mode == raw.ErrQueryMode.BLOCKING:
            blocking.append(mode)
        if len(blocking) == 2:  # the forward's read, then the clearing as the interrupted backward gives back
            raise cudnn_bn.CudnnError(4000, "CUDNN_STATUS_INTERNAL_ERROR", "cudnnQueryRuntimeError", "")
        return real(self, mode)

    with monkeypatch.context() as patched:
        patched.setattr(handles.Handle, "query_flag", query)
        (xd, gd, bd), caught, pool = _interrupted_checked_backward(unsettled_gpu, monkeypatch)
    assert len(blocking) == 2 and caught == []
    (handle,) = pool._idle
    assert handle.flag_unread  # still marked
    queries = unsettled_gpu.calls.count("cudnnQueryRuntimeError")
    y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="raise")
    assert np.all(np.isfinite(y.get())) and not handle.flag_unread
    assert unsettled_gpu.calls.count("cudnnQueryRuntimeError") == queries + 2  # the clearing, then its own


# ---- the cupy module and the handle loan ----
def test_the_cupy_path_imports_cupy_when_it_is_not_loaded_yet(monkeypatch, tmp_path):
    (tmp_path / "cupy.py").write_text("STAND_IN = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "cupy", None)  # undone afterwards: the stand-in does not outlive the test
    del sys.modules["cupy"]
    cupy = launch.cupy_module()
    assert getattr(cupy, "STAND_IN", False) and sys.modules["cupy"] is cupy


def test_a_handle_whose_stream_cannot_be_bound_goes_back_to_its_pool(unsettled_gpu, monkeypatch):
    args = on_device(*inference_args())
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
