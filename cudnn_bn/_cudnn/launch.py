"""What every native batch-norm call of ops.py and fused_ops.py does around its kernel.

- The device: the arrays' one device (a ValueError names them otherwise), made current only when
  another one is.
- The handle: lent from its device's pool (handles.py) for the length of the native calls, bound
  to CuPy's current stream (:func:`lend`).
- SPATIAL_PERSISTENT's overflow flag: cleared before a checked call when an unchecked one left it
  unread, read right after the kernel, and what follows an overflow: the running statistics
  restored, then CudnnOverflowError, or the fallback warning (once per shape, at the caller's
  line) before the caller re-runs in SPATIAL.
- The Ex calls' scratch: a workspace per (device, stream), and the check of the reserve space a
  backward is given.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

from .._core.modes import OnOverflow
from .._core.policy import BACKWARD, TRAINING
from . import raw
from .errors import CudnnOverflowError
from .handles import pool_for
from .raw import Status

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
#     handle = lend(cupy, plan, checked_overflow)
#     try:
#         <the native calls>
#         overflowed = plan.persistent and after_persistent(handle, checked_overflow)
#     finally:
#         handle.pool.release(handle)
# A context manager (a class with slots) would say it in two lines, but measured with
# benchmarks/host_overhead.py it cost about half a microsecond more per call (4-6 %).
def lend(cupy, plan, checked_overflow: bool):
    """A handle of the plan's device for one launch, bound to CuPy's current stream; on a
    SPATIAL_PERSISTENT plan a checked call (``checked_overflow``: it reads the flag after its
    kernel) first clears a flag an unchecked call left. The caller gives it back with
    ``handle.pool.release(handle)`` in a ``finally``."""
    pool = pool_for(plan.device_id)
    handle = pool.acquire()
    try:
        handle.bind_stream(cupy.cuda.get_current_stream())
        if plan.persistent and checked_overflow and handle.flag_unread:
            handle.clear_flag()  # a checked call must not read a flag an earlier unchecked one left
    except BaseException:
        pool.release(handle)
        raise
    return handle


# ---- the overflow flag of SPATIAL_PERSISTENT ----
def after_persistent(handle, checked: bool) -> bool:
    """Right after a persistent kernel (no cudnnSetStream in between): True when it overflowed.
    A checked call waits for it (blocking cudnnQueryRuntimeError); an unchecked one leaves the
    flag for the handle to clear before its next checked call or stream."""
    if not checked:
        handle.flag_unread = True
        return False
    runtime_status = handle.query_flag()
    if runtime_status == Status.RUNTIME_FP_OVERFLOW:
        return True
    raw.check_status("cudnnQueryRuntimeError (kernel status)", runtime_status)
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
