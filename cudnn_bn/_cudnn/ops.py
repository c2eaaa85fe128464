"""Batch normalization on CuPy arrays through cuDNN: the three modes, the overflow check,
the Ex fast path. Arguments are validated by the same checks as the NumPy reference before any
native call; ``mode`` and ``on_overflow`` arrive as the public call takes them and are resolved
by the policy (cudnn_bn._core.policy), once per call signature.

Each call runs with its arrays' device current, looks up what its signature settled (the checks,
the mode, the plan of plans.py), checks what depends on values, lends a handle from its device's
pool (handles.py) for the length of its native calls, and binds it to CuPy's current stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import warnings

from .._core.arrays import byte_range as _byte_range, check_no_overlap
from .._core.layout import Layout
from .._core.modes import Mode, OnOverflow
from .._core.policy import backward_settings, choose_mode
from .._core.saved import SavedStats
from .._core.scalars import check_momentum
from .._core.validate import check_backward, check_forward_inference, check_forward_training, check_saved_finite
from . import raw
from .errors import CudnnBuildMismatchError, CudnnOverflowError
from .handles import borrow, pool_for
from .plans import BACKWARD, INFERENCE, PLANS, TRAINING, plan_for, set_ex_path_enabled, uses_ex_path
from .raw import BatchNormOps, Status

_BN = int(BatchNormOps.BN)  # bnOps of the plain Ex calls
_saved_stats = SavedStats._checked  # bound once: every forward makes one

__all__ = ["backward", "forward_inference", "forward_training", "set_ex_path_enabled", "uses_ex_path"]


def _cupy():
    cupy = sys.modules.get("cupy")  # the import statement's own lookup costs more, on every call
    if cupy is None:
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
# A signature is everything the full checks and the policy read except values: the types, shapes,
# strides, dtypes and devices of the arrays (the written ones' writability too, the saved
# statistics' settings), and mode, eps, channel_axis and on_overflow as given, with their types
# (True == 1 as a key). Strides are part of it, so whether an array reaches cuDNN as it is
# (contiguous, in cuDNN's dtype and axis order) is settled once too. What depends on values
# (momentum, memory overlap, finite saved statistics) is checked per call.
_MAX_SIGNATURES = 4096


def _signature(array):
    return None if array is None else (type(array), array.shape, array.strides, array.dtype, array.device.id)


def _running_signature(mean, var):
    """The running statistics, updated in place: their writability too (an array posing as cupy
    may be read-only). One flat tuple for the common pair."""
    if mean is None or var is None:
        return tuple(None if a is None else (_signature(a), getattr(a.flags, "writeable", True)) for a in (mean, var))
    return (
        type(mean), mean.shape, mean.strides, mean.dtype, mean.device.id, getattr(mean.flags, "writeable", True),
        type(var), var.shape, var.strides, var.dtype, var.device.id, getattr(var.flags, "writeable", True),
    )


def _saved_signature(saved):
    if saved is None:
        return None
    if type(saved) is not SavedStats:
        raise TypeError("saved: not a SavedStats")  # no signature: the full checks name the problem
    return (
        _signature(saved.mean), _signature(saved.inv_std), saved.mode, saved.eps, saved.channel_axis, saved.on_overflow,
        _signature(saved.reserve_space),
    )


class _Settled:
    """What one call signature settled: the validated description, its plan, the overflow policy
    (``on_overflow``; ``checked_overflow``: a persistent call that reads the flag), and which
    arguments reach cuDNN as they are. ``extents``: for forward training with running statistics, each of
    x, gamma, beta, running_mean, running_var as (first, last + 1) byte offsets from its address,
    so that the per-call overlap check is arithmetic on five addresses."""

    __slots__ = ("checked", "plan", "on_overflow", "checked_overflow", "x_as_is", "params_as_is", "extents")

    def __init__(self, checked, plan, on_overflow, x, params, extents=None):
        self.checked, self.plan, self.on_overflow, self.extents = checked, plan, on_overflow, extents
        self.checked_overflow = plan.persistent and on_overflow is not OnOverflow.IGNORE
        self.x_as_is = all(array.flags.c_contiguous for array in x)
        self.params_as_is = all(plan.param_as_is(array) for array in params if array is not None)


def _extents(*arrays):
    """(first, last + 1) byte offsets of each array from its address, one flat tuple; None if any
    is empty."""
    extents = []
    for array in arrays:
        bounds = _byte_range(array)
        if bounds is None:
            return None
        extents += (bounds[0] - array.data.ptr, bounds[1] - array.data.ptr)
    return tuple(extents)  # flat: (first, last + 1) of the first array, then of the second, ...


_SETTLED = PLANS.signatures  # the same dict for the life of the process (PLANS.clear empties it in place)


def _remember(key, settled: _Settled) -> _Settled:
    if key is not None:
        signatures = _SETTLED
        # each entry holds its plan: bounded like the plans, so evicted plans do not live on here
        if len(signatures) >= min(_MAX_SIGNATURES, 2 * PLANS.capacity):
            signatures.clear()
        signatures[key] = settled
    return settled


def _lookup(key):
    try:
        return key, _SETTLED.get(key)
    except Exception:  # an unhashable or misbehaving argument: the full checks name it
        return None, None


def _check_running_apart(settled, x, gamma, beta, running_mean, running_var) -> None:
    """check_no_overlap for the running statistics, from five addresses and the settled extents
    (straight-line: it runs on every call); the general check runs, and names the culprit, only
    when two ranges meet."""
    extents = settled.extents
    if extents is not None:  # None: an empty argument, which the general check handles
        x_low, x_high, gamma_low, gamma_high, beta_low, beta_high, mean_low, mean_high, var_low, var_high = extents
        start = x.data.ptr
        x_low, x_high = start + x_low, start + x_high
        start = gamma.data.ptr
        gamma_low, gamma_high = start + gamma_low, start + gamma_high
        start = beta.data.ptr
        beta_low, beta_high = start + beta_low, start + beta_high
        start = running_mean.data.ptr
        mean_low, mean_high = start + mean_low, start + mean_high
        start = running_var.data.ptr
        var_low, var_high = start + var_low, start + var_high
        if not (
            (mean_low < var_high and var_low < mean_high)
            or (x_low < mean_high and mean_low < x_high) or (x_low < var_high and var_low < x_high)
            or (gamma_low < mean_high and mean_low < gamma_high) or (gamma_low < var_high and var_low < gamma_high)
            or (beta_low < mean_high and mean_low < beta_high) or (beta_low < var_high and var_low < beta_high)
        ):
            return
    check_no_overlap({"running_mean": running_mean, "running_var": running_var}, {"x": x, "gamma": gamma, "beta": beta})


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


# ---- one launch: the handle, the stream, the flag ----
# Every native batch-norm call runs as
#     handle = _lend(cupy, plan, checked_overflow)
#     try:
#         <the call>
#         overflowed = plan.persistent and _after_persistent(handle, checked_overflow)
#     finally:
#         handle.pool.release(handle)
# (a context manager would say it in two lines, at twice the cost of the handle loan itself)
def _lend(cupy, plan, checked_overflow: bool):
    """A handle of the plan's device for one launch, bound to CuPy's current stream; on a
    SPATIAL_PERSISTENT plan a checked call first clears a flag an unchecked one left."""
    pool = pool_for(plan.device_id)
    handle = pool.acquire()
    try:
        handle.bind_stream(cupy.cuda.get_current_stream())
        if plan.persistent:
            _before_persistent(handle, checked_overflow)
    except BaseException:
        pool.release(handle)
        raise
    return handle


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
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _overflow_error(function: str, advice: str) -> CudnnOverflowError:
    return CudnnOverflowError(
        int(Status.RUNTIME_FP_OVERFLOW), "CUDNN_STATUS_RUNTIME_FP_OVERFLOW", function, f"SPATIAL_PERSISTENT overflowed; {advice}"
    )


_OVERFLOW_ADVICE = {
    TRAINING: "running statistics were restored. Use mode='spatial' or on_overflow='fallback'",
    BACKWARD: "pass on_overflow='fallback', or mode='spatial' (it accepts these saved statistics), to re-run "
    "this backward in SPATIAL",
}


def _overflowed(function: str, operation: str, label: str, plan, on_overflow, backup=None, running=None) -> None:
    """What follows an overflowed SPATIAL_PERSISTENT call (plain or fused): the running statistics
    ``running`` (cuDNN's in-place pair) restored from ``backup``, then CudnnOverflowError under
    on_overflow="raise", else the once-per-shape fallback warning; the caller then re-runs in SPATIAL."""
    if backup is not None:
        running[0][...], running[1][...] = backup
    if on_overflow is OnOverflow.RAISE:
        raise _overflow_error(function, _OVERFLOW_ADVICE[operation])
    _warn_fallback(label, plan.layout.shape, plan.data_dtype)


def _spatial(checked):
    """The same description in SPATIAL mode."""
    layout = checked.layout
    return dataclasses.replace(checked, layout=Layout(layout.shape, layout.channel_axis, Mode.SPATIAL))


# ---- forward training ----
def forward_training(x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow):
    """cuDNN forward training on cupy arrays; same contract as :func:`cudnn_bn.forward_training`
    (every argument given; ``mode`` and ``on_overflow`` as the public call takes them: the policy
    resolves them once per call signature)."""
    cupy, device_id = _cupy(), x.device.id
    if cupy.cuda.runtime.getDevice() != device_id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(device_id):
            return forward_training(x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow)
    key = (
        TRAINING, type(mode), mode, type(on_overflow), on_overflow, type(channel_axis), channel_axis, type(eps), eps,
        type(x), x.shape, x.strides, x.dtype, device_id,  # _signature(x), flat: this runs on every call
        type(gamma), gamma.shape, gamma.strides, gamma.dtype, gamma.device.id,
        type(beta), beta.shape, beta.strides, beta.dtype, beta.device.id,
        _running_signature(running_mean, running_var),
    )
    try:  # _lookup written out: this runs on every call
        settled = _SETTLED.get(key)
    except Exception:
        key = settled = None
    if settled is None:
        mode, on_overflow = choose_mode(mode, x.shape, channel_axis, TRAINING, on_overflow)
        checked, momentum = check_forward_training(
            x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
        )
        device_id = _same_device(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
        _check_build_once(cupy)
        plan = plan_for(TRAINING, checked.layout, checked.data_dtype, device_id)  # limits are checked here
        extents = None if running_mean is None else _extents(x, gamma, beta, running_mean, running_var)
        settled = _remember(key, _Settled(checked, plan, on_overflow, (x,), (gamma, beta, running_mean, running_var), extents))
    else:
        if type(momentum) is not float or not 0.0 <= momentum <= 1.0:  # the common case inline: it runs on every call
            momentum = check_momentum(momentum)
        if running_mean is not None:
            _check_running_apart(settled, x, gamma, beta, running_mean, running_var)
    plan, checked = settled.plan, settled.checked
    on_overflow, checked_overflow = settled.on_overflow, settled.checked_overflow
    x_in = x if settled.x_as_is else cupy.ascontiguousarray(x)
    if settled.params_as_is:
        gamma_in, beta_in, mean_in, var_in = gamma, beta, running_mean, running_var
    else:
        gamma_in, beta_in = plan.param_in(cupy, gamma), plan.param_in(cupy, beta)
        mean_in, var_in = plan.running_in(cupy, running_mean), plan.running_in(cupy, running_var)
    backup = (mean_in.copy(), var_in.copy()) if checked_overflow and mean_in is not None else None
    y = cupy.empty(x_in.shape, plan.data_dtype)
    save_mean, save_inv_std = plan.new_params(cupy)
    library, reserve = raw.library(), None
    x_desc, p_desc = plan.data_desc_pointer, plan.param_desc_pointer
    handle = _lend(cupy, plan, checked_overflow)
    try:
        if plan.uses_ex:
            workspace_size, _, reserve_size = plan.ex_workspace_sizes(handle.pointer)
            workspace = _workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            reserve = cupy.empty(max(reserve_size, 1), cupy.uint8)
            library.cudnnBatchNormalizationForwardTrainingEx(
                handle.pointer, plan.cudnn_mode, _BN, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr, None, None, x_desc, y.data.ptr,
                p_desc, gamma_in.data.ptr, beta_in.data.ptr, momentum, _pointer(mean_in),
                _pointer(var_in), checked.eps, save_mean.data.ptr, save_inv_std.data.ptr, None,
                workspace.data.ptr, workspace.size, reserve.data.ptr, reserve.size,
            )
        else:
            library.cudnnBatchNormalizationForwardTraining(
                handle.pointer, plan.cudnn_mode, plan.alpha, plan.beta, x_desc, x_in.data.ptr,
                x_desc, y.data.ptr, p_desc, gamma_in.data.ptr, beta_in.data.ptr,
                momentum, None if mean_in is None else mean_in.data.ptr, None if var_in is None else var_in.data.ptr,  # _pointer, inline
                checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
            )
        overflowed = plan.persistent and _after_persistent(handle, checked_overflow)
    finally:
        handle.pool.release(handle)
    if overflowed:
        _overflowed("cudnnBatchNormalizationForwardTraining", TRAINING, "forward_training", plan, on_overflow, backup, (mean_in, var_in))
        return forward_training(x, gamma, beta, running_mean, running_var, Mode.SPATIAL, momentum, checked.eps, channel_axis, OnOverflow.IGNORE)
    if not settled.params_as_is:
        plan.running_back(cupy, mean_in, running_mean)
        plan.running_back(cupy, var_in, running_var)
    if plan.param_from_cudnn is not None:
        save_mean, save_inv_std = plan.param_out(cupy, save_mean), plan.param_out(cupy, save_inv_std)
    layout = plan.layout
    return y, _saved_stats(save_mean, save_inv_std, layout.mode, checked.eps, layout.public_channel_axis, reserve, on_overflow)


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
def forward_inference(x, gamma, beta, mean, var, mode, eps, channel_axis):
    """cuDNN forward inference on cupy arrays; same contract as :func:`cudnn_bn.forward_inference`."""
    cupy = _cupy()
    if cupy.cuda.runtime.getDevice() != x.device.id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(x.device.id):
            return forward_inference(x, gamma, beta, mean, var, mode, eps, channel_axis)
    key, settled = _lookup((
        INFERENCE, type(mode), mode, type(channel_axis), channel_axis, type(eps), eps, _signature(x), _signature(gamma),
        _signature(beta), _signature(mean), _signature(var),
    ))
    if settled is None:
        mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
        checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
        if checked.layout.mode is Mode.SPATIAL_PERSISTENT:
            # persistent is a training-kernel choice with the same math; inference runs SPATIAL, as
            # PyTorch does, since cuDNN documents only PER_ACTIVATION and SPATIAL for this call
            checked = _spatial(checked)
        device_id = _same_device(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
        _check_build_once(cupy)
        plan = plan_for(INFERENCE, checked.layout, checked.data_dtype, device_id)
        settled = _remember(key, _Settled(checked, plan, None, (x,), (gamma, beta, mean, var)))
    plan = settled.plan
    x_in = x if settled.x_as_is else cupy.ascontiguousarray(x)
    params = (gamma, beta, mean, var) if settled.params_as_is else [plan.param_in(cupy, a) for a in (gamma, beta, mean, var)]
    y = cupy.empty(x_in.shape, plan.data_dtype)
    gamma_ptr, beta_ptr, mean_ptr, var_ptr = [p.data.ptr for p in params]
    # one call, or pieces along N past cuDNN's limits (a slice costs a view: only then)
    pieces = ((plan, x_in, y),) if plan.pieces is None else [(piece, x_in[start:stop], y[start:stop]) for start, stop, piece in plan.pieces]
    library, eps = raw.library(), settled.checked.eps
    handle = _lend(cupy, plan, False)
    try:
        for piece, x_piece, y_piece in pieces:
            x_desc = piece.data_desc_pointer
            library.cudnnBatchNormalizationForwardInference(
                handle.pointer, piece.cudnn_mode, piece.alpha, piece.beta, x_desc, x_piece.data.ptr, x_desc,
                y_piece.data.ptr, piece.param_desc_pointer, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
            )
    finally:
        handle.pool.release(handle)
    return y


# ---- backward ----
def backward(x, dy, gamma, saved, mode, eps, channel_axis, on_overflow):
    """cuDNN backward on cupy arrays; same contract as :func:`cudnn_bn.backward` (the settings
    are resolved against ``saved`` once per call signature)."""
    cupy = _cupy()
    if cupy.cuda.runtime.getDevice() != x.device.id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(x.device.id):
            return backward(x, dy, gamma, saved, mode, eps, channel_axis, on_overflow)
    try:
        key = (
            BACKWARD, type(mode), mode, type(eps), eps, type(channel_axis), channel_axis, type(on_overflow), on_overflow,
            _signature(x), _signature(dy), _signature(gamma), _saved_signature(saved),
        )
    except Exception:  # saved is not a SavedStats, or holds something other than arrays: the full checks name it
        key = None
    key, settled = _lookup(key)
    if settled is None:
        settled = _remember(key, _settle_backward(cupy, x, dy, gamma, saved, mode, eps, channel_axis, on_overflow))
    elif settled.checked_overflow:
        check_saved_finite(saved)  # synchronizes; "ignore" promised no synchronisation
    plan, checked = settled.plan, settled.checked
    on_overflow, checked_overflow = settled.on_overflow, settled.checked_overflow
    if settled.x_as_is:
        x_in, dy_in = x, dy
    else:
        x_in, dy_in = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy)
    saved_mean = saved_inv_std = reserve = None
    if saved is not None:
        saved_mean, saved_inv_std, reserve = saved.mean, saved.inv_std, saved.reserve_space
    gamma_in = gamma
    if not settled.params_as_is:
        gamma_in = plan.param_in(cupy, gamma)
        if saved is not None:
            saved_mean, saved_inv_std = plan.param_in(cupy, saved_mean), plan.param_in(cupy, saved_inv_std)
    dx = cupy.empty(x_in.shape, plan.data_dtype)
    dgamma, dbeta = plan.new_params(cupy)
    library = raw.library()
    x_desc, p_desc = plan.data_desc_pointer, plan.param_desc_pointer
    handle = _lend(cupy, plan, checked_overflow)
    try:
        if reserve is not None and plan.uses_ex:  # its size was checked when the signature was settled
            workspace_size = plan.ex_workspace_sizes(handle.pointer)[1]
            workspace = _workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            library.cudnnBatchNormalizationBackwardEx(
                handle.pointer, plan.cudnn_mode, _BN, plan.alpha, plan.beta, plan.alpha, plan.beta,
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
        overflowed = plan.persistent and _after_persistent(handle, checked_overflow)
    finally:
        handle.pool.release(handle)
    if overflowed:
        _overflowed("cudnnBatchNormalizationBackward", BACKWARD, "backward", plan, on_overflow)
        plain_saved = None if saved is None else SavedStats._checked(saved.mean, saved.inv_std, Mode.SPATIAL, saved.eps, saved.channel_axis)
        return backward(x, dy, gamma, plain_saved, Mode.SPATIAL, checked.eps, channel_axis, OnOverflow.IGNORE)
    if plan.param_from_cudnn is not None:
        dgamma, dbeta = plan.param_out(cupy, dgamma), plan.param_out(cupy, dbeta)
    return dx, dgamma, dbeta


def _settle_backward(cupy, x, dy, gamma, saved, mode, eps, channel_axis, on_overflow) -> _Settled:
    """The full checks of a backward signature (and of this call's values), then its plan."""
    mode, on_overflow, eps, channel_axis = backward_settings(x, saved, mode, eps, channel_axis, on_overflow)
    checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis, check_finite=False)
    named = {"x": x, "dy": dy, "gamma": gamma}
    if saved is not None:
        named.update(saved_mean=saved.mean, saved_inv_std=saved.inv_std, saved_reserve_space=saved.reserve_space)
    device_id = _same_device(**named)
    _check_build_once(cupy)
    if checked.layout.mode is Mode.SPATIAL_PERSISTENT and on_overflow is not OnOverflow.IGNORE:
        check_saved_finite(saved)  # before the plan's native calls; "ignore" promised no synchronisation
    plan = plan_for(BACKWARD, checked.layout, checked.data_dtype, device_id)
    reserve = None if saved is None else saved.reserve_space
    if reserve is not None and plan.uses_ex:  # BackwardEx reads the forward's reserve space
        with borrow(device_id) as handle:
            _check_reserve(reserve, plan.ex_workspace_sizes(handle.pointer)[2], device_id)
    saved_arrays = () if saved is None else (saved.mean, saved.inv_std)
    return _Settled(checked, plan, on_overflow, (x, dy), (gamma,) + saved_arrays)
