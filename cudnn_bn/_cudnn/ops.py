"""Batch normalization on CuPy arrays through cuDNN: the three modes, the overflow check,
the Ex fast path. Arguments are validated by the same checks as the NumPy reference before any
native call; ``mode`` arrives here already concrete (the "auto" policy lives in the API layer).

Each call looks up its plan (plans.py), borrows a handle from its device's pool (handles.py) for
the length of its native calls, and binds it to CuPy's current stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import warnings

from .._core.layout import Layout
from .._core.modes import Mode, OnOverflow
from .._core.saved import SavedStats
from .._core.validate import (
    byte_range as _byte_range,
    check_backward,
    check_forward_inference,
    check_forward_training,
    check_momentum,
    check_no_overlap,
    check_saved_finite,
)
from . import raw
from .errors import CudnnBuildMismatchError, CudnnOverflowError
from .handles import borrow
from .plans import BACKWARD, INFERENCE, PLANS, TRAINING, plan_for, set_ex_path_enabled, uses_ex_path
from .raw import BatchNormOps, Status

__all__ = ["backward", "forward_inference", "forward_training", "set_ex_path_enabled", "uses_ex_path"]


def _cupy():
    import cupy

    return cupy


def _same_device(**named) -> int:
    devices = {name: array.device.id for name, array in named.items() if array is not None}
    if len(set(devices.values())) > 1:
        detail = ", ".join(f"{name} on device {device}" for name, device in devices.items())
        raise ValueError(f"arrays on different devices: expected one device, got {detail}")
    return devices["x"]


def _pointer(array) -> int | None:
    return None if array is None else array.data.ptr


# ---- the CUDA build of libcudnn against CuPy's runtime, checked once per process ----
_BUILD_CHECKED = []


def cuda_build_mismatch(cupy) -> CudnnBuildMismatchError | None:
    """The error to raise when libcudnn was built for another CUDA major than CuPy runs, else None.

    ``pip install torch`` brings nvidia-cudnn-cu13, which overwrites nvidia-cudnn-cu12's
    libcudnn.so.9 in the same folder; nothing else notices.
    """
    library = raw.library()
    cudnn_major = int(library.cudnnGetCudartVersion()) // 1000
    runtime_version = getattr(cupy.cuda.runtime, "runtimeGetVersion", None)
    if runtime_version is None:
        return None
    cupy_major = int(runtime_version()) // 1000
    if cudnn_major == cupy_major:
        return None
    fix = (
        f"reinstall the cuDNN wheel for CUDA {cupy_major}: pip uninstall -y nvidia-cudnn-cu{cudnn_major} && "
        f"pip install --force-reinstall nvidia-cudnn-cu{cupy_major} (both wheels write nvidia/cudnn/lib/libcudnn.so.9; "
        f"the last one installed wins), or install cupy-cuda{cudnn_major}x, or point CUDNN_BN_LIBRARY at a "
        f"libcudnn.so.9 built for CUDA {cupy_major}"
    )
    return CudnnBuildMismatchError(cudnn_major, cupy_major, library.path, fix)


def _check_build_once(cupy) -> None:
    if not _BUILD_CHECKED:
        error = cuda_build_mismatch(cupy)
        if error is not None:
            raise error
        _BUILD_CHECKED.append(True)


_SAME_DEVICE = contextlib.nullcontext()


def _on_device(cupy, device_id: int):
    """The device context, entered only when another device is current (it costs a microsecond)."""
    if cupy.cuda.runtime.getDevice() == device_id:
        return _SAME_DEVICE
    return cupy.cuda.Device(device_id)


# ---- the checks that depend on a call's signature, done once per signature ----
# A signature is everything the full checks read except values: the types, shapes, dtypes and
# devices of the arrays, and mode, channel_axis and eps with their types (True == 1 as a key).
# What depends on values (momentum, memory overlap, finite saved statistics) is checked per call.
_MAX_SIGNATURES = 4096


def _signature(array):
    return None if array is None else (type(array), array.shape, array.dtype, array.device.id)


def _written_signature(array):
    """An array updated in place: its strides too (elements sharing memory are refused) and its
    writability (an array posing as cupy may be read-only)."""
    return None if array is None else (_signature(array), array.strides, getattr(array.flags, "writeable", True))


def _reserve_signature(reserve):
    return None if reserve is None else (_signature(reserve), reserve.flags.c_contiguous)


def _remember(key, entry) -> None:
    if key is not None:
        signatures = PLANS.signatures
        # each entry holds its plan: bounded like the plans, so evicted plans do not live on here
        if len(signatures) >= min(_MAX_SIGNATURES, 2 * PLANS.capacity):
            signatures.clear()
        signatures[key] = entry


def _check_running_apart(x, gamma, beta, running_mean, running_var) -> None:
    """check_no_overlap for the running statistics, with the common answer (no overlap) found
    from five address ranges; the general check runs, and names the culprit, only on a hit."""
    mean_low, mean_high = _byte_range(running_mean)
    var_low, var_high = _byte_range(running_var)
    clash = mean_low < var_high and var_low < mean_high
    for array in (x, gamma, beta):
        low, high = _byte_range(array)
        clash = clash or (low < mean_high and mean_low < high) or (low < var_high and var_low < high)
    if clash:
        check_no_overlap({"running_mean": running_mean, "running_var": running_var}, {"x": x, "gamma": gamma, "beta": beta})


def _lookup(key):
    try:
        return key, PLANS.signatures.get(key)
    except TypeError:  # an unhashable argument: the full checks say what is wrong with it
        return None, None


# ---- the overflow flag of SPATIAL_PERSISTENT ----
def _query_flag(handle) -> bool:
    """Blocking cudnnQueryRuntimeError on ``handle`` (waits for its stream); True on overflow."""
    runtime_status = handle.query_flag()
    if runtime_status == Status.RUNTIME_FP_OVERFLOW:
        return True
    raw.check_status("cudnnQueryRuntimeError (kernel status)", runtime_status)
    return False


def _before_persistent(handle, checked: bool) -> None:
    """A checked call must not read a flag an earlier unchecked call left on this handle."""
    if checked and handle.flag_unread:
        handle.clear_flag()


def _after_persistent(handle, checked: bool) -> bool:
    """Right after the kernel (no cudnnSetStream in between): True when it overflowed."""
    if checked:
        return _query_flag(handle)
    handle.flag_unread = True
    return False


_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_fallback(operation: str, shape, dtype) -> None:
    key = (operation, tuple(shape), str(dtype))
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(
        f"cudnn_bn: SPATIAL_PERSISTENT {operation} overflowed for shape {tuple(shape)} {dtype}; "
        "re-ran with SPATIAL (this warning is shown once per shape)",
        RuntimeWarning,
        stacklevel=_outside_the_package(),
    )


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside_the_package() -> int:
    """warnings.warn's stacklevel for the first caller outside cudnn_bn (the calls that warn are
    reached through different depths: the public functions, the fused calls, compat)."""
    frame, level = sys._getframe(2), 2  # 1 is the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _overflow_error(function: str, advice: str) -> CudnnOverflowError:
    return CudnnOverflowError(
        int(Status.RUNTIME_FP_OVERFLOW), "CUDNN_STATUS_RUNTIME_FP_OVERFLOW", function, f"SPATIAL_PERSISTENT overflowed; {advice}"
    )


def _as_spatial(checked):
    """The same call in SPATIAL mode: what an overflowing SPATIAL_PERSISTENT call falls back to."""
    layout = checked.layout
    return dataclasses.replace(checked, layout=Layout(layout.shape, layout.channel_axis, Mode.SPATIAL))


# ---- forward training ----
def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode: Mode, momentum, eps, channel_axis, on_overflow: OnOverflow):
    """cuDNN forward training on cupy arrays; same contract as :func:`cudnn_bn.reference.forward_training`."""
    key, entry = _lookup((
        TRAINING, mode, type(channel_axis), channel_axis, type(eps), eps, _signature(x), _signature(gamma),
        _signature(beta), _written_signature(running_mean), _written_signature(running_var),
    ))
    cupy = _cupy()
    if entry is None:
        checked, momentum = check_forward_training(
            x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
        )
        device_id = _same_device(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
        _check_build_once(cupy)
        plan = plan_for(TRAINING, checked.layout, checked.data_dtype, device_id)  # limits are checked here
        _remember(key, (checked, plan))
    else:
        checked, plan = entry
        momentum = check_momentum(momentum)
        if running_mean is not None:
            _check_running_apart(x, gamma, beta, running_mean, running_var)
    with _on_device(cupy, plan.device_id):
        return _forward_training(cupy, plan, checked, x, gamma, beta, running_mean, running_var, momentum, on_overflow)


def _forward_training(cupy, plan, checked, x, gamma, beta, running_mean, running_var, momentum, on_overflow):
    layout = plan.layout
    x_in = cupy.ascontiguousarray(x)
    gamma_in, beta_in = plan.param_in(cupy, gamma), plan.param_in(cupy, beta)
    mean_in, var_in = plan.running_in(cupy, running_mean), plan.running_in(cupy, running_var)
    persistent = layout.mode is Mode.SPATIAL_PERSISTENT
    checked_overflow = persistent and on_overflow is not OnOverflow.IGNORE
    backup = (mean_in.copy(), var_in.copy()) if checked_overflow and mean_in is not None else None
    y = cupy.empty(x_in.shape, dtype=plan.data_dtype)
    save_mean, save_inv_std = plan.new_param(cupy), plan.new_param(cupy)
    library, reserve, overflowed = raw.library(), None, False
    x_desc, p_desc = plan.data_desc.pointer, plan.param_desc.pointer
    stream = cupy.cuda.get_current_stream()
    with borrow(plan.device_id) as handle:
        handle.bind_stream(stream)
        if persistent:
            _before_persistent(handle, checked_overflow)
        if plan.uses_ex:
            workspace_size, _, reserve_size = plan.ex_workspace_sizes(handle.pointer)
            workspace = _workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            reserve = cupy.empty(max(reserve_size, 1), dtype=cupy.uint8)
            library.cudnnBatchNormalizationForwardTrainingEx(
                handle.pointer, plan.cudnn_mode, int(BatchNormOps.BN), plan.alpha, plan.beta,
                x_desc, x_in.data.ptr, None, None, x_desc, y.data.ptr,
                p_desc, gamma_in.data.ptr, beta_in.data.ptr, momentum, _pointer(mean_in),
                _pointer(var_in), checked.eps, save_mean.data.ptr, save_inv_std.data.ptr, None,
                workspace.data.ptr, workspace.size, reserve.data.ptr, reserve.size,
            )
        else:
            library.cudnnBatchNormalizationForwardTraining(
                handle.pointer, plan.cudnn_mode, plan.alpha, plan.beta, x_desc, x_in.data.ptr,
                x_desc, y.data.ptr, p_desc, gamma_in.data.ptr, beta_in.data.ptr,
                momentum, _pointer(mean_in), _pointer(var_in), checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
            )
        if persistent:
            overflowed = _after_persistent(handle, checked_overflow)
    if overflowed:
        if backup is not None:
            mean_in[...], var_in[...] = backup
        if on_overflow is OnOverflow.RAISE:
            raise _overflow_error(
                "cudnnBatchNormalizationForwardTraining",
                "running statistics were restored. Use mode='spatial' or on_overflow='fallback'",
            )
        _warn_fallback("forward_training", layout.shape, plan.data_dtype)
        fallback = _as_spatial(checked)
        spatial_plan = plan_for(TRAINING, fallback.layout, plan.data_dtype, plan.device_id)
        return _forward_training(cupy, spatial_plan, fallback, x, gamma, beta, running_mean, running_var, momentum, OnOverflow.IGNORE)
    plan.running_back(cupy, mean_in, running_mean)
    plan.running_back(cupy, var_in, running_var)
    saved = SavedStats._checked(
        plan.param_out(cupy, save_mean), plan.param_out(cupy, save_inv_std), layout.mode, checked.eps,
        layout.public_channel_axis, reserve, on_overflow,
    )
    return y, saved


def _check_reserve(reserve, size: int, device_id: int) -> None:
    """BackwardEx reads the forward's reserve space: anything smaller, or elsewhere, is refused
    before the native call."""
    if getattr(reserve, "dtype", None) != "uint8" or reserve.ndim != 1 or not reserve.flags.c_contiguous:
        raise TypeError(f"saved.reserve_space: expected the 1-D uint8 device buffer from forward_training, got {type(reserve).__name__}")
    if reserve.size < size or reserve.device.id != device_id:
        raise ValueError(
            f"saved.reserve_space: expected at least {size} bytes on device {device_id} (the forward's reserve space), "
            f"got {reserve.size} bytes on device {reserve.device.id}"
        )


# ---- the Ex workspace, kept per (device, stream): work on one stream runs in order ----
_WORKSPACES: dict = {}
_WORKSPACES_LOCK = threading.Lock()
_MAX_WORKSPACE_STREAMS = 16


def _workspace(cupy, device_id: int, stream_identity, size: int):
    """Scratch of at least ``size`` bytes for work queued on one stream (its identity, as the
    handle has it: per thread under per-thread default streams)."""
    key = (device_id, stream_identity)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.size < size:
        buffer = cupy.empty(max(size, 1), dtype=cupy.uint8)
        with _WORKSPACES_LOCK:
            _WORKSPACES.pop(key, None)
            while len(_WORKSPACES) >= _MAX_WORKSPACE_STREAMS:
                del _WORKSPACES[next(iter(_WORKSPACES))]
            _WORKSPACES[key] = buffer
    return buffer


# ---- forward inference ----
def forward_inference(x, gamma, beta, mean, var, *, mode: Mode, eps, channel_axis):
    """cuDNN forward inference on cupy arrays; same contract as :func:`cudnn_bn.reference.forward_inference`."""
    key, entry = _lookup((
        INFERENCE, mode, type(channel_axis), channel_axis, type(eps), eps, _signature(x), _signature(gamma),
        _signature(beta), _signature(mean), _signature(var),
    ))
    cupy = _cupy()
    if entry is None:
        checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
        if checked.layout.mode is Mode.SPATIAL_PERSISTENT:
            # persistent is a training-kernel choice with the same math; inference runs SPATIAL, as
            # PyTorch does, since cuDNN documents only PER_ACTIVATION and SPATIAL for this call
            checked = _as_spatial(checked)
        device_id = _same_device(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
        _check_build_once(cupy)
        plan = plan_for(INFERENCE, checked.layout, checked.data_dtype, device_id)
        _remember(key, (checked, plan))
    else:
        checked, plan = entry
    device_id = plan.device_id
    with _on_device(cupy, device_id):
        x_in = cupy.ascontiguousarray(x)
        params = [plan.param_in(cupy, array) for array in (gamma, beta, mean, var)]
        y = cupy.empty(x_in.shape, dtype=plan.data_dtype)
        param_pointers = [p.data.ptr for p in params]
        # one call, or pieces along N past cuDNN's limits (a slice costs a view: only then)
        pieces = ((plan, x_in, y),) if plan.pieces is None else [(piece, x_in[start:stop], y[start:stop]) for start, stop, piece in plan.pieces]
        library = raw.library()
        with borrow(device_id) as handle:
            handle.bind_stream(cupy.cuda.get_current_stream())
            for piece, x_piece, y_piece in pieces:
                x_desc = piece.data_desc.pointer
                library.cudnnBatchNormalizationForwardInference(
                    handle.pointer, piece.cudnn_mode, piece.alpha, piece.beta, x_desc, x_piece.data.ptr, x_desc,
                    y_piece.data.ptr, piece.param_desc.pointer, *param_pointers, checked.eps,
                )
        return y


# ---- backward ----
def backward(x, dy, gamma, saved, *, mode: Mode, eps, channel_axis, on_overflow: OnOverflow):
    """cuDNN backward on cupy arrays; same contract as :func:`cudnn_bn.reference.backward`
    (``mode``, ``eps`` and ``channel_axis`` already settled against ``saved``)."""
    saved_signature = None if saved is None else (
        _signature(saved.mean), _signature(saved.inv_std), saved.mode, saved.eps, saved.channel_axis,
        _reserve_signature(saved.reserve_space),
    )
    key, entry = _lookup((
        BACKWARD, mode, type(channel_axis), channel_axis, type(eps), eps, _signature(x), _signature(dy),
        _signature(gamma), saved_signature,
    ))
    cupy = _cupy()
    if entry is None:
        checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis, check_finite=False)
        named = {"x": x, "dy": dy, "gamma": gamma}
        if saved is not None:
            named.update(saved_mean=saved.mean, saved_inv_std=saved.inv_std, saved_reserve_space=saved.reserve_space)
        device_id = _same_device(**named)
        _check_build_once(cupy)
    else:
        checked, plan = entry
    if checked.layout.mode is Mode.SPATIAL_PERSISTENT and on_overflow is not OnOverflow.IGNORE:
        check_saved_finite(saved)  # synchronizes; "ignore" promised no synchronisation
    if entry is None:
        plan = plan_for(BACKWARD, checked.layout, checked.data_dtype, device_id)
        _remember(key, (checked, plan))
    with _on_device(cupy, plan.device_id):
        return _backward(cupy, plan, checked, x, dy, gamma, saved, on_overflow)


def _backward(cupy, plan, checked, x, dy, gamma, saved, on_overflow):
    layout = plan.layout
    x_in, dy_in = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy)
    gamma_in = plan.param_in(cupy, gamma)
    saved_mean = None if saved is None else plan.param_in(cupy, saved.mean)
    saved_inv_std = None if saved is None else plan.param_in(cupy, saved.inv_std)
    dx = cupy.empty(x_in.shape, dtype=plan.data_dtype)
    dgamma, dbeta = plan.new_param(cupy), plan.new_param(cupy)
    reserve = None if saved is None else saved.reserve_space
    persistent = layout.mode is Mode.SPATIAL_PERSISTENT
    checked_overflow = persistent and on_overflow is not OnOverflow.IGNORE
    library, overflowed = raw.library(), False
    x_desc, p_desc = plan.data_desc.pointer, plan.param_desc.pointer
    stream = cupy.cuda.get_current_stream()
    with borrow(plan.device_id) as handle:
        handle.bind_stream(stream)
        if persistent:
            _before_persistent(handle, checked_overflow)
        if reserve is not None and plan.uses_ex:
            _, workspace_size, reserve_size = plan.ex_workspace_sizes(handle.pointer)
            _check_reserve(reserve, reserve_size, plan.device_id)
            workspace = _workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            library.cudnnBatchNormalizationBackwardEx(
                handle.pointer, plan.cudnn_mode, int(BatchNormOps.BN), plan.alpha, plan.beta, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr, None, None, x_desc, dy_in.data.ptr, None, None,
                x_desc, dx.data.ptr, p_desc, gamma_in.data.ptr, None,
                dgamma.data.ptr, dbeta.data.ptr, checked.eps, _pointer(saved_mean), _pointer(saved_inv_std), None,
                workspace.data.ptr, workspace.size, reserve.data.ptr, reserve.size,
            )
        else:
            library.cudnnBatchNormalizationBackward(
                handle.pointer, plan.cudnn_mode, plan.alpha, plan.beta, plan.alpha, plan.beta, x_desc,
                x_in.data.ptr, x_desc, dy_in.data.ptr, x_desc, dx.data.ptr,
                p_desc, gamma_in.data.ptr, dgamma.data.ptr, dbeta.data.ptr, checked.eps,
                _pointer(saved_mean), _pointer(saved_inv_std),
            )
        if persistent:
            overflowed = _after_persistent(handle, checked_overflow)
    if overflowed:
        if on_overflow is OnOverflow.RAISE:
            raise _overflow_error(
                "cudnnBatchNormalizationBackward",
                "pass on_overflow='fallback', or mode='spatial' (it accepts these saved statistics), to re-run "
                "this backward in SPATIAL",
            )
        _warn_fallback("backward", layout.shape, plan.data_dtype)
        fallback = _as_spatial(checked)
        spatial_plan = plan_for(BACKWARD, fallback.layout, plan.data_dtype, plan.device_id)
        plain_saved = None if saved is None else SavedStats._checked(saved.mean, saved.inv_std, Mode.SPATIAL, saved.eps, saved.channel_axis)
        return _backward(cupy, spatial_plan, fallback, x, dy, gamma, plain_saved, OnOverflow.IGNORE)
    return dx, plan.param_out(cupy, dgamma), plan.param_out(cupy, dbeta)


