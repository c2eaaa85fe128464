"""cuDNN handles: one per (thread, device), so no handle is ever used by two threads at once."""

from __future__ import annotations

import ctypes
import threading
import weakref

from . import raw
from .errors import CudnnNotInitializedError

__all__ = ["NO_GPU_MESSAGE", "Handle", "handle_for"]

NO_GPU_MESSAGE = (
    "cuDNN could not start: no usable CUDA GPU or driver on this machine. "
    "The NumPy reference (numpy arrays) still works; cupy arrays need a GPU"
)


def _destroy(pointer: int) -> None:
    try:
        raw.library().cudnnDestroy(pointer)
    except Exception:  # at interpreter exit the driver may already be gone; nothing left to free
        pass


class Handle:
    """Owns one ``cudnnHandle_t``; destroyed when its thread's table lets go or at interpreter exit."""

    def __init__(self, device_id: int):
        pointer = ctypes.c_void_p()
        try:
            raw.library().cudnnCreate(ctypes.byref(pointer))
        except CudnnNotInitializedError as error:
            raise CudnnNotInitializedError(error.status, error.status_name, error.function, f"{NO_GPU_MESSAGE}; {error.detail}") from None
        self.device_id = device_id
        self.pointer = pointer.value
        self._finalizer = weakref.finalize(self, _destroy, self.pointer)

    def bind_stream(self, stream_pointer: int) -> int:
        """Point the handle at the caller's stream; returns the handle pointer."""
        raw.library().cudnnSetStream(self.pointer, stream_pointer)
        return self.pointer

    def close(self) -> None:
        self._finalizer()


_PER_THREAD = threading.local()


def handle_for(device_id: int) -> Handle:
    """This thread's handle for ``device_id`` (the caller makes that device current first)."""
    handles = getattr(_PER_THREAD, "handles", None)
    if handles is None:
        handles = _PER_THREAD.handles = {}
    handle = handles.get(device_id)
    if handle is None:
        handle = handles[device_id] = Handle(device_id)
    return handle
