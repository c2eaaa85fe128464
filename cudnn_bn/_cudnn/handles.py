"""cuDNN handles: bounded pools per device and flag discipline, borrowed for the length of one call.

A handle is never used by two threads at once (cuDNN's rule), and a pool of threads creates no
new handle after warm-up: cudnnCreate costs, and cudnnDestroy synchronizes the device
(cudnn_graph.h), so a thread that exits must not take a handle down with it. Each handle
remembers the stream it is bound to (cudnnSetStream only when it changes).

cuDNN keeps one runtime-error flag per handle, which SPATIAL_PERSISTENT kernels raise when they
overflow. So that no call ever reads a flag another call left, and no rebinding has to wait to
clear one, the handles of a device come in three pools, by what their calls do with the flag
(``lane_for``):
- CHECKED: persistent calls that read the flag right after their kernel ("raise", "fallback"),
  so a handle there never carries an unread flag (a call that raised before reading it clears it
  as it gives the handle back, launch.give_back; where even that fails, the next borrower does);
- DEFERRED: persistent calls that leave it for later ("deferred"): each handle keeps a record of
  those calls per stream (:class:`DeferredCalls`), read by a poll when a later call borrows it
  and by ``cudnn_bn.check_overflow`` (cudnn_bn/_cudnn/deferred.py);
- PLAIN: everything else; its persistent calls ("ignore") leave a flag nobody reads.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import weakref

from . import raw
from .errors import CudnnNotInitializedError

__all__ = [
    "CHECKED",
    "DEFAULT_POOL_SIZE",
    "DEFERRED",
    "NO_GPU_MESSAGE",
    "PLAIN",
    "DeferredCalls",
    "Handle",
    "HandlePool",
    "borrow",
    "close_all",
    "forget_on_close",
    "lane_for",
    "pool_for",
    "pools",
    "stream_identity",
]

NO_GPU_MESSAGE = (
    "cuDNN could not start: no usable CUDA GPU or driver on this machine. "
    "The NumPy reference (numpy arrays) still works; cupy arrays need a GPU"
)
PER_THREAD_STREAM = 2  # cudaStreamPerThread: CuPy's current stream under per-thread default streams
DEFAULT_POOL_SIZE = 16  # handles per device and lane; more threads than this wait for one to be returned
PLAIN, CHECKED, DEFERRED = "plain", "checked", "deferred"  # the lanes: what a handle's calls do with its flag


def lane_for(persistent: bool, on_overflow) -> str:
    """The pool a call borrows from: CHECKED or DEFERRED for a persistent call that reads its flag
    now or later (``on_overflow`` an OnOverflow or None), PLAIN otherwise."""
    if not persistent or on_overflow is None:
        return PLAIN
    value = on_overflow.value
    if value in ("raise", "fallback"):
        return CHECKED
    return DEFERRED if value == "deferred" else PLAIN


def stream_identity(pointer: int):
    """What tells apart the queue that stream ``pointer`` names in the calling thread: the pointer,
    with the thread under per-thread default streams, whose one pointer (cudaStreamPerThread)
    names each thread's own queue."""
    return (pointer, threading.get_ident()) if pointer == PER_THREAD_STREAM else pointer


def _destroy(pointer: int) -> None:
    try:
        raw.library().cudnnDestroy(pointer)
    except Exception:  # at interpreter exit the driver may already be gone; nothing left to free
        pass


class DeferredCalls:
    """The deferred persistent calls a handle ran on one stream since its flag was last read.

    ``stream``: the CuPy stream (kept, so its pointer is not reused while recorded); ``event``:
    recorded behind each call, so that its being done says every call here has finished;
    ``calls``: how many calls of each (operation, shape, dtype, mode).
    """

    __slots__ = ("stream", "event", "calls")

    def __init__(self, stream, event):
        self.stream, self.event = stream, event
        self.calls: collections.Counter = collections.Counter()


class Handle:
    """Owns one ``cudnnHandle_t`` on one device."""

    __slots__ = (
        "device_id", "pointer", "pool", "bound_identity", "stream", "deferred", "finite_checks", "flag_unread",
        "_runtime_status", "_runtime_status_ref", "_finalizer", "__weakref__",
    )

    def __init__(self, device_id: int):
        pointer = ctypes.c_void_p()
        try:
            raw.library().cudnnCreate(ctypes.byref(pointer))
        except CudnnNotInitializedError as error:
            raise CudnnNotInitializedError(
                error.status, error.status_name, error.function, f"{NO_GPU_MESSAGE}; {error.detail}"
            ) from None
        self.device_id = device_id
        self.pointer = pointer.value
        self.pool = None  # the HandlePool that lends it, which sets this
        self.bound_identity = None  # the stream pointer, with the thread under per-thread streams
        self.stream = None  # the CuPy stream bound (cuDNN's default is the legacy stream; never relied on)
        # DEFERRED lane: stream identity -> DeferredCalls not yet settled by a read of the flag; and
        # stream identity -> {call: (device bool, calls)}, False where saved statistics from outside
        # this package were not finite in some call, folded on that stream, read by check_overflow
        self.deferred: dict = {}
        self.finite_checks: dict = {}
        # CHECKED lane: lent to a call that has not read its flag yet (launch.lend sets it,
        # after_persistent clears it; give_back reads the flag of a call that raised in between)
        self.flag_unread = False
        # where cudnnQueryRuntimeError writes: one per handle, as a handle serves one thread at a time
        self._runtime_status = ctypes.c_int(0)
        self._runtime_status_ref = ctypes.byref(self._runtime_status)
        self._finalizer = weakref.finalize(self, _destroy, self.pointer)

    def bind_stream(self, stream) -> None:
        """Point the handle at CuPy stream ``stream`` unless it already is; keeps the stream object
        while bound, so the pointer cuDNN holds never outlives its stream.

        Under per-thread default streams every thread's current stream has the same pointer
        (cudaStreamPerThread) but runs its own queue: there the thread is part of the identity.
        Nothing waits here: a handle of the CHECKED lane has read its flag after each call, and a
        DEFERRED one keeps its record per stream across the rebind."""
        pointer = stream.ptr
        # stream_identity(pointer), written out: this runs on every call
        identity = (pointer, threading.get_ident()) if pointer == PER_THREAD_STREAM else pointer
        if identity != self.bound_identity:
            raw.library().cudnnSetStream(self.pointer, pointer)
            self.bound_identity, self.stream = identity, stream

    def query_flag(self, mode: raw.ErrQueryMode = raw.ErrQueryMode.BLOCKING) -> int:
        """cudnnQueryRuntimeError in ``mode``: BLOCKING waits for the bound stream's work and
        returns the runtime status it left (reading it clears cuDNN's flag); NONBLOCKING returns
        RUNTIME_IN_PROGRESS instead of waiting while that work is unfinished."""
        self._runtime_status.value = 0
        raw.library().cudnnQueryRuntimeError(self.pointer, self._runtime_status_ref, int(mode), None)
        return self._runtime_status.value

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Destroy the handle now (synchronizes the device); later calls do nothing."""
        self._finalizer()


class HandlePool:
    """At most ``size`` handles for one device; :meth:`borrow` lends one to one caller at a time."""

    def __init__(self, device_id: int, size: int = DEFAULT_POOL_SIZE, lane: str = PLAIN):
        self.device_id, self.size, self.lane = device_id, size, lane
        self._idle: list[Handle] = []
        self._count = 0  # handles created and not closed
        self._waiting = 0  # borrowers waiting for a handle to come back
        self._claims: dict[Handle, int] = {}  # lent handles that claim() waits for -> how many claimers
        self._handed: list[Handle] = []  # handles returned to their claimers, never seen by borrowers
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
        if self._claims and handle in self._claims:  # claim() waits for it: handed over, not lent again first
            with self._available:
                self._handed.append(handle)
                self._available.notify_all()
            return
        # append first, then look for waiters: a borrower that starts waiting later sees the handle
        # (it checks the idle list under the lock after counting itself as waiting); every waiter
        # is woken, since one of them may be waiting for this handle itself (claim)
        self._idle.append(handle)
        if self._waiting:
            with self._available:
                self._available.notify_all()

    def claim(self, handle: Handle) -> None:
        """Take ``handle`` itself out of the idle list, waiting while it is lent (its flag may be
        read only by its holder); give it back with :meth:`release`. While a claim waits, the
        holder hands the handle to it when returning it: a thread that keeps borrowing would
        otherwise take it back first, every time."""
        claimed = False
        with self._available:
            self._waiting += 1
            try:
                while True:
                    if handle in self._handed:
                        self._handed.remove(handle)
                        return
                    try:
                        self._idle.remove(handle)
                        return
                    except ValueError:
                        pass
                    if not claimed:
                        self._claims[handle] = self._claims.get(handle, 0) + 1
                        claimed = True
                    self._available.wait()
            finally:
                self._waiting -= 1
                if claimed:
                    count = self._claims.pop(handle) - 1
                    if count:
                        self._claims[handle] = count
                    elif handle in self._handed:  # this claim was interrupted after the handle came back
                        self._handed.remove(handle)
                        self._idle.append(handle)

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


_POOLS: dict[tuple[int, str], HandlePool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(device_id: int, lane: str = PLAIN) -> HandlePool:
    """The pool of ``device_id`` and ``lane`` (the caller makes that device current before borrowing)."""
    pool = _POOLS.get((device_id, lane))
    if pool is None:
        with _POOLS_LOCK:
            pool = _POOLS.setdefault((device_id, lane), HandlePool(device_id, lane=lane))
    return pool


def pools() -> list[HandlePool]:
    """Every pool made so far."""
    with _POOLS_LOCK:
        return list(_POOLS.values())


def borrow(device_id: int):
    """Context manager lending a PLAIN handle of ``device_id`` for one call."""
    return pool_for(device_id).borrow()


# what the layers above keep about handles, dropped by close_all with the handles (deferred.py
# registers its records here when it is imported: before that it has recorded nothing)
_FORGET_ON_CLOSE: list = []


def forget_on_close(forget) -> None:
    """Have :func:`close_all` call ``forget()`` before it destroys the handles: the records a higher
    layer keeps of them (this module imports none of its callers)."""
    _FORGET_ON_CLOSE.append(forget)


def close_all() -> None:
    """Destroy every idle handle and forget the pools (tests; a process that is done with cuDNN).
    Deferred calls not yet checked are forgotten with their handles: call
    cudnn_bn.check_overflow() first to read them."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for forget in _FORGET_ON_CLOSE:
        forget()
    for pool in pools:
        pool.close()
