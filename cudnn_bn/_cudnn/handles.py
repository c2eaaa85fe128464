"""cuDNN handles: a bounded pool per device, borrowed for the length of one call.

A handle is never used by two threads at once (cuDNN's rule), and a pool of threads creates no
new handle after warm-up: cudnnCreate costs, and cudnnDestroy synchronizes the device
(cudnn_graph.h), so a thread that exits must not take a handle down with it. Each handle
remembers the stream it is bound to (cudnnSetStream only when it changes) and whether a
SPATIAL_PERSISTENT call on it left the runtime-error flag unread.
"""

from __future__ import annotations

import ctypes
import threading
import weakref

from . import raw
from .errors import CudnnNotInitializedError

__all__ = ["DEFAULT_POOL_SIZE", "NO_GPU_MESSAGE", "Handle", "HandlePool", "borrow", "close_all", "pool_for"]

NO_GPU_MESSAGE = (
    "cuDNN could not start: no usable CUDA GPU or driver on this machine. "
    "The NumPy reference (numpy arrays) still works; cupy arrays need a GPU"
)
PER_THREAD_STREAM = 2  # cudaStreamPerThread: CuPy's current stream under per-thread default streams
DEFAULT_POOL_SIZE = 16  # handles per device; more threads than this wait for one to be returned
_BLOCKING = int(raw.ErrQueryMode.BLOCKING)


def _destroy(pointer: int) -> None:
    try:
        raw.library().cudnnDestroy(pointer)
    except Exception:  # at interpreter exit the driver may already be gone; nothing left to free
        pass


class Handle:
    """Owns one ``cudnnHandle_t`` on one device."""

    __slots__ = (
        "device_id", "pointer", "pool", "bound_stream", "bound_identity", "flag_unread", "_stream_object",
        "_runtime_status", "_runtime_status_ref", "_finalizer", "__weakref__",
    )

    def __init__(self, device_id: int):
        pointer = ctypes.c_void_p()
        try:
            raw.library().cudnnCreate(ctypes.byref(pointer))
        except CudnnNotInitializedError as error:
            raise CudnnNotInitializedError(error.status, error.status_name, error.function, f"{NO_GPU_MESSAGE}; {error.detail}") from None
        self.device_id = device_id
        self.pointer = pointer.value
        self.pool = None  # the HandlePool that lends it, which sets this
        self.bound_stream = None  # cuDNN's default is the legacy stream, but we never rely on it
        self.bound_identity = None  # the stream pointer, with the thread under per-thread streams
        self._stream_object = None
        self.flag_unread = False  # a persistent call ran without cudnnQueryRuntimeError after it
        # where cudnnQueryRuntimeError writes: one per handle, as a handle serves one thread at a time
        self._runtime_status = ctypes.c_int(0)
        self._runtime_status_ref = ctypes.byref(self._runtime_status)
        self._finalizer = weakref.finalize(self, _destroy, self.pointer)

    def bind_stream(self, stream) -> None:
        """Point the handle at CuPy stream ``stream`` unless it already is; keeps the stream object
        while bound, so the pointer cuDNN holds never outlives its stream.

        Under per-thread default streams every thread's current stream has the same pointer
        (cudaStreamPerThread) but runs its own queue: there the thread is part of the identity.
        A flag left unread by an unchecked persistent call is cleared first: the blocking query
        waits on the bound stream only, so after a rebind it could no longer reach that call's
        kernel, whose flag would then be blamed on a later checked call on the new stream."""
        pointer = stream.ptr
        identity = (pointer, threading.get_ident()) if pointer == PER_THREAD_STREAM else pointer
        if identity != self.bound_identity:
            if self.flag_unread:
                self.clear_flag()
            raw.library().cudnnSetStream(self.pointer, pointer)
            self.bound_stream, self.bound_identity, self._stream_object = pointer, identity, stream

    def query_flag(self) -> int:
        """Blocking cudnnQueryRuntimeError: waits for the bound stream's work and returns the
        runtime status it left (reading it clears cuDNN's flag)."""
        self._runtime_status.value = 0
        raw.library().cudnnQueryRuntimeError(self.pointer, self._runtime_status_ref, _BLOCKING, None)
        self.flag_unread = False
        return self._runtime_status.value

    def clear_flag(self) -> None:
        """Wait for the bound stream's work and discard the runtime-error flag it may have left."""
        self.query_flag()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Destroy the handle now (synchronizes the device); later calls do nothing."""
        self._finalizer()


class HandlePool:
    """At most ``size`` handles for one device; :meth:`borrow` lends one to one caller at a time."""

    def __init__(self, device_id: int, size: int = DEFAULT_POOL_SIZE):
        self.device_id, self.size = device_id, size
        self._idle: list[Handle] = []
        self._count = 0  # handles created and not closed
        self._waiting = 0  # borrowers waiting for a handle to come back
        self._available = threading.Condition(threading.Lock())

    def acquire(self) -> Handle:
        try:
            return self._idle.pop()  # the common case, without the lock: list.pop is atomic
        except IndexError:
            pass
        with self._available:
            self._waiting += 1
            try:
                while not self._idle and self._count >= self.size:
                    self._available.wait()
            finally:
                self._waiting -= 1
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            handle = Handle(self.device_id)  # created outside the lock: it may take a while
            handle.pool = self
            return handle
        except BaseException:
            with self._available:
                self._count -= 1
                self._available.notify()
            raise

    def release(self, handle: Handle) -> None:
        # append first, then look for waiters: a borrower that starts waiting later sees the handle
        # (it checks the idle list under the lock after counting itself as waiting)
        self._idle.append(handle)
        if self._waiting:
            with self._available:
                self._available.notify()

    def borrow(self) -> "_Loan":
        """``with pool.borrow() as handle:`` lends a handle for the block."""
        return _Loan(self)

    @property
    def created(self) -> int:
        """Handles this pool holds (idle or lent)."""
        return self._count

    def close(self) -> None:
        """Destroy the idle handles (lent ones are destroyed when collected)."""
        with self._available:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for handle in idle:
            handle.close()


class _Loan:
    """The context manager of one borrow (a class: a generator-based one costs microseconds)."""

    __slots__ = ("pool", "handle")

    def __init__(self, pool: HandlePool):
        self.pool, self.handle = pool, None

    def __enter__(self) -> Handle:
        self.handle = self.pool.acquire()
        return self.handle

    def __exit__(self, *exc_info) -> None:
        self.pool.release(self.handle)


_POOLS: dict[int, HandlePool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(device_id: int) -> HandlePool:
    """The pool of ``device_id`` (the caller makes that device current before borrowing)."""
    pool = _POOLS.get(device_id)
    if pool is None:
        with _POOLS_LOCK:
            pool = _POOLS.setdefault(device_id, HandlePool(device_id))
    return pool


def borrow(device_id: int):
    """Context manager lending a handle of ``device_id`` for one call."""
    return pool_for(device_id).borrow()


def close_all() -> None:
    """Destroy every idle handle and forget the pools (tests; a process that is done with cuDNN)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()
