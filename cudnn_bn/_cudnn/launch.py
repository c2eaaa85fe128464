"""What every native batch-norm call of ops.py and fused_ops.py does around its kernel.

- The device: the arrays' one device (a ValueError names them otherwise), made current only when
  another one is.
- The handle: lent from its device's pool for the call's lane (handles.py) for the length of the
  native calls, bound to CuPy's current stream (:func:`lend`); a handle holding deferred calls is
  polled first, without waiting (deferred.py).
- SPATIAL_PERSISTENT's overflow flag (:func:`after_persistent`): read right after the kernel by a
  checked call, recorded by a deferred one; and what follows an overflow: the running statistics
  restored, then CudnnOverflowError, or the fallback warning (once per shape, at the caller's
  line) before the caller re-runs in SPATIAL.
- The Ex calls' scratch: a workspace per (device, stream), and the check of the reserve space a
  backward is given.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings

from .._core.modes import OnOverflow
from .._core.policy import BACKWARD, TRAINING
from .._core.validate import check_saved_entries_finite
from . import deferred, raw
from .errors import CudnnOverflowError
from .handles import CHECKED, DEFERRED, pool_for
from .raw import ErrQueryMode, Status

__all__ = [
    "MAX_WORKSPACE_STREAMS",
    "OVERFLOW_ADVICE",
    "PACKAGE_DIR",
    "WORKSPACES",
    "after_overflow",
    "after_persistent",
    "check_reserve",
    "cupy_module",
    "fallback_warnings_shown",
    "give_back",
    "lend",
    "on_device",
    "outside_the_package",
    "overflow_error",
    "pointer",
    "same_device",
    "warn_fallback",
    "workspace",
]


def cupy_module():
    """The cupy module (imported on the first call on cupy arrays)."""
    cupy = sys.modules.get("cupy")  # the import statement's own lookup costs more, on every call
    if cupy is None:
        import cupy
    return cupy


# ---- the device ----
def same_device(**named) -> int:
    """The device of the named arrays (None entries skipped), which must be one; x is named."""
    devices = {name: array.device.id for name, array in named.items() if array is not None}
    if len(set(devices.values())) > 1:
        detail = ", ".join(f"{name} on device {device}" for name, device in devices.items())
        raise ValueError(f"arrays on different devices: expected one device, got {detail}")
    return devices["x"]


_SAME_DEVICE = contextlib.nullcontext()


def on_device(cupy, device_id: int):
    """The device context, entered only when another device is current (it costs a microsecond)."""
    if cupy.cuda.runtime.getDevice() == device_id:
        return _SAME_DEVICE
    return cupy.cuda.Device(device_id)


def pointer(array) -> int | None:
    """The device address of a cupy array; None (NULL) for None."""
    return None if array is None else array.data.ptr


# ---- the handle of one launch ----
# Every native batch-norm call runs as
#     handle = lend(cupy, plan, lane)
#     try:
#         <the native calls>
#         overflowed = plan.persistent and after_persistent(cupy, handle, lane, operation, plan)
#     finally:
#         give_back(handle)
# A context manager (a class with slots) would say it in two lines, but measured with
# benchmarks/host_overhead.py it cost about half a microsecond more per call (4-6 %).
def lend(cupy, plan, lane: str):
    """A handle of the plan's device from the pool of ``lane`` (handles.lane_for) for one launch,
    bound to CuPy's current stream. The caller gives it back with :func:`give_back` in a
    ``finally``."""
    pool = pool_for(plan.device_id, lane)
    handle = pool.acquire()
    try:
        if handle.deferred:  # before rebinding: the non-blocking query reads the stream those calls ran on
            deferred.poll(handle)
        elif handle.flag_unread:  # give_back could not clear it: clear it now (a wait, on this rare path
            handle.query_flag()  # only), so that this call reads only its own flag
            handle.flag_unread = False
        handle.bind_stream(cupy.cuda.get_current_stream())
    except BaseException:
        pool.release(handle)
        raise
    handle.flag_unread = lane is CHECKED  # until after_persistent reads it
    return handle


def give_back(handle) -> None:
    """Return a lent handle to its pool. A CHECKED call that raised before its flag was read
    (between lend and after_persistent) clears the flag here, in the thread whose stream ran the
    kernel (under per-thread default streams another thread's query would wait on another queue),
    and warns when it finds an overflow there: the call that raised restored nothing."""
    try:
        if handle.flag_unread:
            _clear_unread_flag(handle)
    finally:
        handle.pool.release(handle)


def _clear_unread_flag(handle) -> None:
    try:
        status = handle.query_flag()  # a wait, on the path of a call that raised
    except Exception:
        return  # still marked: the next borrower clears it (lend)
    handle.flag_unread = False
    if status == Status.RUNTIME_FP_OVERFLOW:
        warnings.warn(
            "cudnn_bn: a SPATIAL_PERSISTENT call that raised before reading its overflow flag had overflowed; "
            "what it wrote, running statistics included, may hold NaN or Inf",
            RuntimeWarning, stacklevel=outside_the_package(),
        )


# ---- the overflow flag of SPATIAL_PERSISTENT ----
def after_persistent(cupy, handle, lane: str, operation: str, plan, foreign_saved=None) -> bool:
    """Right after a persistent kernel (no cudnnSetStream in between): True when it overflowed
    and the call reads its flag now.

    CHECKED lane: one wait. A BLOCKING cudnnQueryRuntimeError; or, given ``foreign_saved`` (saved
    statistics a backward got from outside this package's forward), the read of their finiteness
    check, queued behind the kernel, which waits for the stream, and then a NONBLOCKING query, which
    has nothing left to wait for. Statistics found not finite raise ValueError naming them (after
    the kernel, which wrote only this call's new outputs). DEFERRED lane: no wait; the call is
    recorded on the handle (deferred.record), with a check of ``foreign_saved`` on the device.
    PLAIN lane ("ignore"): nothing."""
    if lane is CHECKED:
        if foreign_saved is None:
            runtime_status = handle.query_flag()
        else:
            finite = math.isfinite(float(cupy.vdot(foreign_saved.mean, foreign_saved.inv_std)))
            runtime_status = handle.query_flag(ErrQueryMode.NONBLOCKING)
            if runtime_status == Status.RUNTIME_IN_PROGRESS:  # another thread queued work on this stream meanwhile
                runtime_status = handle.query_flag()
        handle.flag_unread = False
        if foreign_saved is not None and not finite:
            check_saved_entries_finite(foreign_saved)  # a NaN or Inf entry, not a product past the range
        if runtime_status == Status.RUNTIME_FP_OVERFLOW:
            return True
        raw.check_status("cudnnQueryRuntimeError (kernel status)", runtime_status)
    elif lane is DEFERRED:
        finite = None
        if foreign_saved is not None:
            mean, inv_std = foreign_saved.mean, foreign_saved.inv_std
            finite = cupy.logical_and(cupy.isfinite(mean).all(), cupy.isfinite(inv_std).all())
        layout = plan.layout
        deferred.record(cupy, handle, (operation, layout.shape, str(plan.data_dtype), layout.mode.name), finite)
    return False


def overflow_error(function: str, advice: str) -> CudnnOverflowError:
    return CudnnOverflowError(
        int(Status.RUNTIME_FP_OVERFLOW), "CUDNN_STATUS_RUNTIME_FP_OVERFLOW", function,
        f"SPATIAL_PERSISTENT overflowed; {advice}",
    )


OVERFLOW_ADVICE = {
    TRAINING: "running statistics were restored. Use mode='spatial' or on_overflow='fallback'",
    BACKWARD: "pass on_overflow='fallback', or mode='spatial' (it accepts these saved statistics), to re-run "
    "this backward in SPATIAL",
}


def after_overflow(function: str, operation: str, label: str, plan, on_overflow, backup=None, running=None) -> None:
    """What follows an overflowed SPATIAL_PERSISTENT call (plain or fused): the running statistics
    ``running`` (cuDNN's in-place pair) restored from ``backup``, then CudnnOverflowError under
    on_overflow="raise", else the once-per-shape fallback warning; the caller then re-runs in SPATIAL."""
    if backup is not None:
        running[0][...], running[1][...] = backup
    if on_overflow is OnOverflow.RAISE:
        raise overflow_error(function, OVERFLOW_ADVICE[operation])
    warn_fallback(label, plan.layout.shape, plan.data_dtype)


# (operation, shape, dtype) whose fallback was warned about: the warning is shown once per shape
fallback_warnings_shown: set = set()
_WARNED_LOCK = threading.Lock()


def warn_fallback(operation: str, shape, dtype) -> None:
    key = (operation, tuple(shape), str(dtype))
    with _WARNED_LOCK:
        if key in fallback_warnings_shown:
            return
        fallback_warnings_shown.add(key)
    warnings.warn(
        f"cudnn_bn: SPATIAL_PERSISTENT {operation} overflowed for shape {tuple(shape)} {dtype}; "
        "re-ran with SPATIAL (this warning is shown once per shape)",
        RuntimeWarning,
        stacklevel=outside_the_package(),
    )


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outside_the_package() -> int:
    """warnings.warn's stacklevel for the first caller outside cudnn_bn (the calls that warn are
    reached through different depths: the public functions, the fused calls, compat)."""
    frame, level = sys._getframe(2), 2  # 1 is the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# ---- the Ex calls' scratch ----
def check_reserve(reserve, size: int, device_id: int) -> None:
    """BackwardEx reads the forward's reserve space: anything smaller, or elsewhere, is refused
    before the native call."""
    if getattr(reserve, "dtype", None) != "uint8" or reserve.ndim != 1 or not reserve.flags.c_contiguous:
        raise TypeError(
            "saved.reserve_space: expected the 1-D uint8 device buffer from forward_training, "
            f"got {type(reserve).__name__}"
        )
    if reserve.size < size or reserve.device.id != device_id:
        raise ValueError(
            f"saved.reserve_space: expected at least {size} bytes on device {device_id} (the forward's reserve space), "
            f"got {reserve.size} bytes on device {reserve.device.id}"
        )


# the Ex workspace, kept per (device, stream): work on one stream runs in order
WORKSPACES: dict = {}
_WORKSPACES_LOCK = threading.Lock()
MAX_WORKSPACE_STREAMS = 16


def workspace(cupy, device_id: int, stream_identity, size: int):
    """Scratch of at least ``size`` bytes for work queued on one stream (its identity, as the
    handle has it: per thread under per-thread default streams)."""
    key = (device_id, stream_identity)
    buffer = WORKSPACES.get(key)
    if buffer is None or buffer.size < size:
        buffer = cupy.empty(max(size, 1), dtype=cupy.uint8)
        with _WORKSPACES_LOCK:
            WORKSPACES.pop(key, None)
            while len(WORKSPACES) >= MAX_WORKSPACE_STREAMS:
                del WORKSPACES[next(iter(WORKSPACES))]
            WORKSPACES[key] = buffer
    return buffer
