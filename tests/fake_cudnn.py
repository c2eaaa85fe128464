"""The simulated GPU: host memory posing as CUDA devices behind CuPy's API, and cuDNN's handle,
stream, error-query and batch-norm entry points replaced on the real, loaded libcudnn, so that the
whole cuDNN path runs in CI without a GPU. Tensor descriptors stay real (cuDNN's host calls work
without a GPU); the simulator reads dims, strides and data types back from cuDNN itself.

It is a specification of cuDNN and CuPy, written to be at least as strict as they are:

- **Asynchronous.** A batch-norm kernel is queued on its handle's stream when it is called and runs
  when that stream synchronizes: ``Stream.synchronize()``, ``Device.synchronize()``, a host read of
  an array (``.get()``, ``bool()``, ``float()``, printing) or ``cudnnQueryRuntimeError`` in
  BLOCKING mode. Descriptor contents are read when the call is made, as cuDNN reads them.
  FakeArray operations (copies, ``astype``, ufuncs, reductions, ``__setitem__``) run on the host at
  once, so each first runs the work queued on the calling thread's *current* stream, where CuPy
  would queue it behind that work; work queued on other streams stays pending, so reading another
  stream's output without synchronizing shows stale memory, as a race would on a GPU.
  ``numpy.asarray(fake)`` reads memory without synchronizing (CuPy refuses it): use ``.get()``.
- **Memory.** A registry of live allocations (address ranges, device, allocating stream), modelled
  on CuPy's stream-ordered pool: memory whose arrays are dropped stays valid for the kernels already
  queued on its allocating stream. Freed while a kernel queued on *another* stream still uses it is
  a hazard (the pool may hand it to that stream's next allocation first): the kernel's outputs
  become NaN and the ``simulated_gpu`` block fails. Before any view of memory is made, every
  pointer must lie in one live allocation on the handle's device with the descriptor's whole extent
  (dims and strides) inside it, else BAD_PARAM: a wrong stride fails a test, never the interpreter.
- **Identities.** Every ``cudnnCreate`` gives a distinct handle, bound to the legacy stream 0 and
  to the current device. Every stream has a distinct non-zero pointer, except the legacy default
  stream (``Stream.null``, 0) and the per-thread default stream (``Stream.ptds``, 2, CUDA's
  ``cudaStreamPerThread``): one pointer that names the calling thread's own queue wherever it is
  used (a kernel, a query, an event, a synchronize); each thread's default current stream is its
  own. Arrays carry their device. A handle used by two threads at once, or a kernel call whose
  handle is bound to another stream than the calling thread's current one, is BAD_PARAM.
- **Refusals.** NOT_SUPPORTED or BAD_PARAM wherever cuDNN documents one or PyTorch guards against
  one; each refusal names its reason (``KernelSimulator.refusals``). See ``KernelSimulator``.
- **Overflow flag.** Per handle: a SPATIAL_PERSISTENT kernel whose mode is in ``overflow_modes``
  writes NaN and raises its handle's flag when it runs; the flag stays set until
  ``cudnnQueryRuntimeError`` reads it.
- **Host synchronizations, counted.** ``KernelSimulator.host_syncs`` counts the points where the
  host waits for the device on real CUDA, and only those (``sync_points`` by kind): a BLOCKING
  ``cudnnQueryRuntimeError``; ``.get()``; ``bool()``, ``float()``, ``int()``, ``complex()``,
  ``operator.index()``, ``item()``, ``tolist()``, ``tobytes()``, ``repr()``, ``str()``,
  ``format()``, ``in`` and pickling of an array; ``nonzero()``, ``where(condition)`` and
  indexing by a boolean mask (CuPy reads the count back to size the result); ``Stream``,
  ``Event`` and ``Device`` synchronize and ``runtime.deviceSynchronize``; ``cudnnDestroy``
  (cudaDeviceSynchronize, cudnn_graph.h). ``array_equal``, ``array_equiv`` and ``allclose``
  answer, as CuPy does, with a 0-d device array, read only when asked. The simulator's own
  flushes (the host computing a ufunc, a copy or a reshape in queue order) are not counted: on a
  GPU those are kernels queued behind the work, not waits. Inside
  ``with simulator.capturing():`` every such point raises :class:`StreamCaptureUnsupported`, as
  CUDA stream capture refuses a synchronization.

Entry points: :func:`simulated_gpu` (a context manager yielding the :class:`KernelSimulator`),
:class:`FakeArray`, :func:`make_fake_cupy` and :func:`virtual_array`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import itertools
import math
import random
import sys
import threading
import time
import types
import weakref

import numpy as np
from numpy.lib.array_utils import byte_bounds

from cudnn_bn._core.modes import Mode
from cudnn_bn._cudnn import raw as _raw
from cudnn_bn._cudnn.errors import CudnnError
from cudnn_bn._cudnn.raw import Status

__all__ = [
    "CUDNN_BN_MIN_EPSILON",
    "FakeArray",
    "INFERENCE_MAX_BATCH",
    "INT32_MAX",
    "KernelSimulator",
    "PER_ACTIVATION_TRAINING_MAX_BATCH",
    "Launch",
    "SimulatedCuda",
    "TRAINING_MAX_BATCH",
    "make_fake_cupy",
    "simulated_gpu",
    "virtual_array",
]

# ---- cuDNN's numbers, written out here rather than imported from the package under test ----
INT32_MAX = 2**31 - 1  # dims, strides and element counts are C ints; PyTorch keeps cuDNN off numel >= 2**31
CUDNN_BN_MIN_EPSILON = 0.0  # cudnn_ops.h, cuDNN 9
# the batch sizes past which cuDNN is reported to refuse (NOT_SUPPORTED), by mode and call:
PER_ACTIVATION_TRAINING_MAX_BATCH = 131070  # PER_ACTIVATION training and backward (pytorch#2917)
TRAINING_MAX_BATCH = 880801  # SPATIAL(_PERSISTENT) training and backward: PyTorch's guard (PR #32763)
INFERENCE_MAX_BATCH = 65535  # inference in any mode (pytorch#19911)
PER_ACTIVATION, SPATIAL, SPATIAL_PERSISTENT = 0, 1, 2  # cudnnBatchNormMode_t
OPS_BN, OPS_BN_ACTIVATION, OPS_BN_ADD_ACTIVATION = 0, 1, 2  # cudnnBatchNormOps_t
ACTIVATION_RELU = 1  # cudnnActivationMode_t: the one activation cuDNN's fused batch-norm kernels apply
NOT_PROPAGATE_NAN, PROPAGATE_NAN = 0, 1  # cudnnNanPropagation_t
ERRQUERY_RAWCODE, ERRQUERY_NONBLOCKING, ERRQUERY_BLOCKING = 0, 1, 2  # cudnnErrQueryMode_t
DATA_FLOAT, DATA_DOUBLE, DATA_HALF = 0, 1, 2  # cudnnDataType_t
_NUMPY_TYPES = {DATA_FLOAT: np.dtype(np.float32), DATA_DOUBLE: np.dtype(np.float64), DATA_HALF: np.dtype(np.float16)}
_BAD_PARAM, _NOT_SUPPORTED = int(Status.BAD_PARAM), int(Status.NOT_SUPPORTED)
PER_THREAD_STREAM = 2  # cudaStreamPerThread: each thread's own default stream, whichever thread uses it


def _hex(pointer) -> str:
    return "NULL" if not pointer else f"{pointer:#x}"


# =====================================================================================
# CUDA and CuPy: devices, streams, events, memory
# =====================================================================================


class CUDARuntimeError(RuntimeError):
    """cupy.cuda.runtime.CUDARuntimeError on the simulated GPU."""


class StreamCaptureUnsupported(CUDARuntimeError):
    """cudaErrorStreamCaptureUnsupported: the host tried to wait for the device while a simulator
    was capturing (``KernelSimulator.capturing``)."""


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError: an allocation past ``SimulatedCuda.max_allocation_bytes``
    (which keeps a test that asks for an impossible size from exhausting the host)."""


class _Allocation:
    """One live range of simulated device memory and what it takes to keep it valid."""

    __slots__ = (
        "serial", "start", "stop", "device_id", "stream_key", "owner", "owner_ref", "lease_ref",
        "released", "pending", "hazard", "__weakref__",
    )

    def __init__(self, serial, start, stop, device_id, stream_key, owner, owner_ref):
        self.serial, self.start, self.stop = serial, start, stop
        self.device_id, self.stream_key = device_id, stream_key
        # the object owning the bytes: strong, or weak when it is the array itself
        self.owner, self.owner_ref = owner, owner_ref
        self.lease_ref = None
        self.released = False  # every array on it is gone (CuPy: returned to the pool)
        self.pending = collections.Counter()  # stream key -> queued kernels using it
        self.hazard = False

    def memory_owner(self):
        if self.owner is not None:
            return self.owner
        return None if self.owner_ref is None else self.owner_ref()

    def describe(self) -> str:
        return (f"allocation #{self.serial} [{self.start:#x}, {self.stop:#x}) of {self.stop - self.start} bytes "
                f"on device {self.device_id}")


class _Lease:
    """Held by every FakeArray on an allocation; when the last one goes, the allocation is freed."""

    __slots__ = ("allocation", "__weakref__")


class _MemoryPointer:
    """``ndarray.data`` of CuPy: the device address (``ptr``) and its device."""

    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr, device_id):
        self.ptr, self.device_id = ptr, device_id

    def __int__(self):
        return self.ptr


class _Marker:
    """An event's place in a stream's queue: stamps the time when the stream reaches it."""

    holds = ()

    def __init__(self, stamp):
        self.run = stamp


class SimulatedCuda:
    """The CUDA runtime and CuPy's memory pool of the simulated GPU; one per process (``_CUDA``).

    Settings: ``device_count`` (set by :func:`simulated_gpu`), ``max_allocation_bytes``.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.device_count = 1
        self.max_allocation_bytes = 1 << 30
        self._serials = itertools.count(1)
        self._stream_pointers = itertools.count(0x7E5700, 0x100)  # never reused, never 0
        self.streams: dict[int, int] = {}  # stream pointer -> device, for every stream ever made
        self._starts: list = []  # sorted (start, serial) of live allocations
        self._live: dict[int, _Allocation] = {}
        self._queues: dict[tuple, collections.deque] = {}  # (device, stream pointer) -> queued work
        self._exec_locks: dict[tuple, threading.RLock] = {}
        self._local = threading.local()
        self.hazard_sinks: list[list] = []  # the active simulators' hazard lists
        self.unclaimed_hazards: list[str] = []
        self.module = None  # the fake cupy module, made once the classes below exist

    # ---- the points where the host waits for the device ----
    @staticmethod
    def host_sync(kind: str) -> None:
        """The host waits for the device here on real CUDA: counted by the active simulator (raises
        while it captures). Call it before the wait."""
        if _ACTIVE:
            _ACTIVE[-1].host_sync(kind)

    # ---- per-thread state: current device, current stream per device ----
    def _thread(self):
        local = self._local
        if not hasattr(local, "device"):
            local.device, local.device_stack = 0, []
            local.current, local.stream_stack = {}, []
            local.sources, local.running = {}, False
        return local

    def current_device(self) -> int:
        return self._thread().device

    def push_device(self, device_id: int) -> None:
        local = self._thread()
        local.device_stack.append(local.device)
        local.device = device_id

    def pop_device(self) -> None:
        local = self._thread()
        local.device = local.device_stack.pop()

    def set_device(self, device_id: int) -> None:
        self._thread().device = device_id

    def current_stream(self) -> "Stream":
        """The calling thread's current stream on the current device; by default a stream of its
        own (distinct, non-zero), so that code binding stream 0 instead of the current one fails."""
        local = self._thread()
        stream = local.current.get(local.device)
        if stream is None:
            stream = local.current[local.device] = Stream()
        return stream

    def push_stream(self, stream: "Stream") -> None:
        local = self._thread()
        device = local.device if stream.device_id is None else stream.device_id
        local.stream_stack.append((device, local.current.get(device)))
        local.current[device] = stream

    def pop_stream(self) -> None:
        local = self._thread()
        device, previous = local.stream_stack.pop()
        if previous is None:
            local.current.pop(device, None)
        else:
            local.current[device] = previous

    def set_current_stream(self, stream: "Stream") -> None:
        local = self._thread()
        local.current[local.device if stream.device_id is None else stream.device_id] = stream

    @staticmethod
    def queue_key(device_id: int, pointer: int) -> tuple:
        """The queue that stream ``pointer`` names when the calling thread uses it: the per-thread
        default stream is each thread's own."""
        if pointer == PER_THREAD_STREAM:
            return (device_id, pointer, threading.get_ident())
        return (device_id, pointer)

    def new_stream_pointer(self, device_id: int) -> int:
        with self.lock:
            pointer = next(self._stream_pointers)
            self.streams[pointer] = device_id
        return pointer

    # ---- pointers the caller took, to see what it meant when a C int truncated it ----
    def note_pointer(self, pointer: int, array) -> None:
        self._thread().sources[pointer] = (tuple(array.shape), tuple(array.strides), array.itemsize)

    def take_pointer_sources(self) -> dict:
        local = self._thread()
        sources, local.sources = local.sources, {}
        return sources

    # ---- memory ----
    def allocate(self, shape, dtype, fill=None) -> "FakeArray":
        """A new C-contiguous FakeArray on the current device, allocated on the current stream."""
        dtype = np.dtype(dtype)
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(size) for size in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.max_allocation_bytes:
            raise OutOfMemoryError(
                f"out of memory allocating {nbytes} bytes for shape {shape} {dtype} "
                f"(the simulated GPU allows {self.max_allocation_bytes} per allocation)"
            )
        raw = np.empty(max(nbytes, 1), np.uint8)
        start = raw.ctypes.data
        with self.lock:
            allocation = self._register(start, start + raw.size, owner=raw, owner_ref=None)
            lease = self._lease_for(allocation)  # noqa: F841 - alive until the array below holds it
        array = raw[:nbytes].view(dtype).reshape(shape).view(FakeArray)
        if fill is not None:
            array.view(np.ndarray).fill(fill)
        return array

    def to_device(self, value) -> "FakeArray":
        """A FakeArray copy of host data (a numpy array or scalar)."""
        host = np.asarray(value)
        array = self.allocate(host.shape, host.dtype)
        np.copyto(array.view(np.ndarray), host)
        return array

    def adopt(self, array) -> _Lease | None:
        """The lease of the allocation holding ``array``'s memory (registered now if it has none):
        numpy arrays viewed as FakeArray, and arrays numpy allocated itself, become device memory."""
        if array.size == 0:
            return None
        owner = array
        while True:
            base = owner.base
            if isinstance(base, np.ndarray):
                owner = base
                continue
            inner = getattr(base, "base", None)  # numpy's as_strided keeps its source array here
            if isinstance(inner, np.ndarray):
                owner = inner
                continue
            break
        low, high = byte_bounds(owner)
        if high <= low:
            return None
        with self.lock:
            allocation = self.find_live(low, high)
            if allocation is None:
                itself = owner is array
                allocation = self._register(
                    low, high, owner=None if itself else owner, owner_ref=weakref.ref(array) if itself else None
                )
            return self._lease_for(allocation)

    def _register(self, start, stop, owner, owner_ref) -> _Allocation:
        allocation = _Allocation(
            next(self._serials), start, stop, self.current_device(), self.current_stream().key, owner, owner_ref
        )
        bisect.insort(self._starts, (start, allocation.serial))
        self._live[allocation.serial] = allocation
        return allocation

    def _lease_for(self, allocation: _Allocation) -> _Lease:
        lease = None if allocation.lease_ref is None else allocation.lease_ref()
        if lease is None:
            lease = _Lease()
            lease.allocation = allocation
            allocation.lease_ref = weakref.ref(lease)
            weakref.finalize(lease, self._release, allocation).atexit = False
        return lease

    def find_live(self, low: int, high: int) -> _Allocation | None:
        """The live allocation holding all of [low, high), or None."""
        with self.lock:
            index = bisect.bisect_right(self._starts, (low, math.inf))
            while index > 0:
                index -= 1
                allocation = self._live[self._starts[index][1]]
                if allocation.stop >= high:
                    return allocation
            return None

    def live_bytes(self) -> int:
        with self.lock:
            return sum(a.stop - a.start for a in self._live.values())

    def _release(self, allocation: _Allocation) -> None:
        """The last array on ``allocation`` is gone: CuPy returns it to its allocating stream's pool."""
        with self.lock:
            if allocation.released:
                return
            allocation.released = True
            index = bisect.bisect_left(self._starts, (allocation.start, allocation.serial))
            if index < len(self._starts) and self._starts[index] == (allocation.start, allocation.serial):
                del self._starts[index]
            self._live.pop(allocation.serial, None)
            if not allocation.pending:
                self._drop(allocation)
                return
            others = sorted(key[1] for key in allocation.pending if key != allocation.stream_key)
            if others:
                allocation.hazard = True
                self._hazard(
                    f"{allocation.describe()}, allocated on stream {allocation.stream_key[1]:#x}, was freed while "
                    f"kernels queued on stream(s) {', '.join(f'{s:#x}' for s in others)} still use it: CuPy's pool "
                    "may give it to the next allocation on its own stream before they run"
                )

    @staticmethod
    def _drop(allocation: _Allocation) -> None:
        allocation.owner = allocation.owner_ref = None

    def _hazard(self, message: str) -> None:
        sink = self.hazard_sinks[-1] if self.hazard_sinks else self.unclaimed_hazards
        sink.append(message)

    # ---- queues ----
    def enqueue(self, key: tuple, launch) -> None:
        with self.lock:
            for allocation, _ in launch.holds:
                allocation.pending[key] += 1
            self._queues.setdefault(key, collections.deque()).append(launch)

    def pending(self, key: tuple) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def flush(self, key: tuple, wait: bool = True) -> None:
        """Run the work queued on stream ``key`` (device, pointer), in order. ``wait=False``: leave it
        to the thread already running that stream (for callers that may hold other locks)."""
        local = self._thread()
        if local.running or not self._queues.get(key):
            return  # nothing queued, or called from inside a kernel (e.g. by a finalizer): never out of order
        with self.lock:
            exec_lock = self._exec_locks.setdefault(key, threading.RLock())
        if not exec_lock.acquire(blocking=wait):
            return
        try:
            local.running = True
            try:
                while True:
                    with self.lock:
                        queue = self._queues.get(key)
                        if not queue:
                            return
                        launch = queue.popleft()
                    try:
                        launch.run()
                    finally:
                        self._finished(key, launch)
            finally:
                local.running = False
        finally:
            exec_lock.release()

    def _finished(self, key: tuple, launch) -> None:
        with self.lock:
            for allocation, _ in launch.holds:
                allocation.pending[key] -= 1
                if allocation.pending[key] <= 0:
                    del allocation.pending[key]
                if allocation.released and not allocation.pending:
                    self._drop(allocation)

    def flush_current(self) -> None:
        local = self._thread()
        stream = local.current.get(local.device)
        if stream is not None:
            self.flush(stream.key)

    def synchronize_device(self, device_id: int, wait: bool = True) -> None:
        for key in [key for key in list(self._queues) if key[0] == device_id]:
            self.flush(key, wait)

    def synchronize_all(self) -> None:
        for key in list(self._queues):
            self.flush(key)


class Stream:
    """``cupy.cuda.Stream`` on the simulated GPU: a queue of work with a distinct, non-zero pointer
    (0 for the legacy default stream ``Stream.null``, 2 for the per-thread default stream
    ``Stream.ptds``, whose queue is the calling thread's own). ``with stream:`` makes it current."""

    null: "Stream"
    ptds: "Stream"

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.non_blocking = bool(non_blocking)
        if null or ptds:  # the default stream of whichever device is current
            self.ptr, self.device_id = (PER_THREAD_STREAM if ptds else 0), None
        else:
            self.device_id = _CUDA.current_device()
            self.ptr = _CUDA.new_stream_pointer(self.device_id)

    @property
    def key(self) -> tuple:
        """The queue this stream names for the calling thread."""
        return _CUDA.queue_key(_CUDA.current_device() if self.device_id is None else self.device_id, self.ptr)

    def __enter__(self):
        _CUDA.push_stream(self)
        return self

    def __exit__(self, *exc_info):
        _CUDA.pop_stream()
        return False

    def use(self):
        _CUDA.set_current_stream(self)
        return self

    def synchronize(self) -> None:
        _CUDA.host_sync("Stream.synchronize")
        _CUDA.flush(self.key)

    @property
    def done(self) -> bool:
        return _CUDA.pending(self.key) == 0


    def __eq__(self, other):
        return isinstance(other, Stream) and (self.ptr, self.device_id) == (other.ptr, other.device_id)

    def __hash__(self):
        return hash((self.ptr, self.device_id))

    def __repr__(self):
        return f"<simulated Stream {self.ptr:#x} (device {self.device_id})>"


class Device:
    """``cupy.cuda.Device``: ``with Device(i):`` makes device i current on this thread."""

    compute_capability = "90"

    def __init__(self, device=None):
        device = _CUDA.current_device() if device is None else int(getattr(device, "id", device))
        if not 0 <= device < _CUDA.device_count:
            raise CUDARuntimeError(
                f"cudaErrorInvalidDevice: invalid device ordinal {device} (the simulated GPU has {_CUDA.device_count})"
            )
        self.id = device

    def __enter__(self):
        _CUDA.push_device(self.id)
        return self

    def __exit__(self, *exc_info):
        _CUDA.pop_device()
        return False

    def use(self) -> None:
        _CUDA.set_device(self.id)

    def synchronize(self) -> None:
        _CUDA.host_sync("Device.synchronize")
        _CUDA.synchronize_device(self.id)

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (simulated)>"


class Event:
    """``cupy.cuda.Event``: a marker in a stream's queue, stamped when the stream reaches it."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.seconds, self._key = None, None

    def record(self, stream=None) -> None:
        stream = _CUDA.current_stream() if stream is None else stream
        self._key, self.seconds = stream.key, None
        _CUDA.enqueue(self._key, _Marker(self._stamp))

    def _stamp(self) -> None:
        self.seconds = time.perf_counter()

    def synchronize(self) -> None:
        _CUDA.host_sync("Event.synchronize")
        if self._key is not None:
            _CUDA.flush(self._key)

    @property
    def done(self) -> bool:
        return self.seconds is not None


def _elapsed_ms(start: Event, stop: Event) -> float:
    if start.seconds is None or stop.seconds is None:
        raise CUDARuntimeError("cudaErrorNotReady: an event has not completed; synchronize it first")
    return (stop.seconds - start.seconds) * 1e3


class _MemoryPool:
    """``cupy.get_default_memory_pool()``: the registry answers how much is in use."""

    def free_all_blocks(self, stream=None) -> None:
        pass  # freed memory already left the registry; numpy owns the bytes

    def used_bytes(self) -> int:
        return _CUDA.live_bytes()

    total_bytes = used_bytes


# =====================================================================================
# FakeArray: a numpy array in simulated device memory that answers like a cupy array
# =====================================================================================


def _host_view(value):
    return value.view(np.ndarray) if isinstance(value, FakeArray) else value


class FakeArray(np.ndarray):
    """A numpy array in simulated device memory that answers like a cupy array.

    ``.data.ptr`` is its address, ``.device`` its device, ``.get()`` a synchronized host copy. Any
    numpy array viewed as FakeArray (``np.array(a).view(FakeArray)``) joins the registry of device
    memory on the current device and stream. Operations that touch the data first run the work
    queued on the current stream; see the module docstring.
    """

    _lease = None

    def __array_finalize__(self, obj):
        lease = getattr(obj, "_lease", None)
        if lease is not None and self.base is not None:
            self._lease = lease  # a view: same memory
        elif self.size:
            self._lease = _CUDA.adopt(self)

    def _device_id(self) -> int:
        lease = self._lease
        return _CUDA.current_device() if lease is None else lease.allocation.device_id

    @property
    def data(self) -> _MemoryPointer:
        pointer = self.__array_interface__["data"][0]
        _CUDA.note_pointer(pointer, self)
        return _MemoryPointer(pointer, self._device_id())

    @property
    def device(self) -> Device:
        device = object.__new__(Device)
        device.id = self._device_id()
        return device

    def _own_device_stream(self) -> "Stream":
        """The current stream of this array's device (CuPy's get and set enter the array's device)."""
        _CUDA.push_device(self._device_id())
        try:
            return _CUDA.current_stream()
        finally:
            _CUDA.pop_device()

    def get(self, stream=None, order="C", out=None):
        """A host (numpy) copy, after the work queued on ``stream`` (default: the current stream of
        the array's device)."""
        _CUDA.host_sync("ndarray.get")
        _CUDA.flush((stream if stream is not None else self._own_device_stream()).key)
        if out is not None:
            np.copyto(out, self.view(np.ndarray))
            return out
        return np.array(self.view(np.ndarray), copy=True, order=order)

    def set(self, array, stream=None) -> None:
        _CUDA.flush((stream if stream is not None else self._own_device_stream()).key)
        np.copyto(self.view(np.ndarray), array)

    def copy(self, order="C"):
        _CUDA.flush_current()
        return _CUDA.to_device(self.view(np.ndarray))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        _CUDA.flush_current()
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _CUDA.to_device(self.view(np.ndarray).astype(dtype, casting=casting))

    def __setstate__(self, state):
        super().__setstate__(state)  # unpickling: the array got its memory only now
        self._lease = _CUDA.adopt(self)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _CUDA.flush_current()
        inputs = tuple(_host_view(value) for value in inputs)
        if out is not None:
            kwargs["out"] = tuple(_host_view(value) for value in out)
        if "where" in kwargs:
            kwargs["where"] = _host_view(kwargs["where"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if method == "at":
            return None
        if isinstance(result, tuple):
            return tuple(_CUDA.to_device(value) for value in result)
        return _CUDA.to_device(result)  # CuPy returns 0-d arrays, not scalars, from reductions

    def __array_function__(self, func, types, args, kwargs):
        _CUDA.flush_current()
        if func in _DEVICE_BOOL_FUNCTIONS:  # CuPy answers with a 0-d device array, read only if asked
            return _CUDA.to_device(np.bool_(func(*(_host_view(value) for value in args), **kwargs)))
        if func is np.where and len(args) + len(kwargs) == 1:
            _CUDA.host_sync("where(condition)")  # CuPy's nonzero: the count is read back to size the result
        result = super().__array_function__(func, types, args, kwargs)
        if isinstance(result, np.generic) or (type(result) is np.ndarray):
            return _CUDA.to_device(result)  # CuPy's functions return device arrays (0-d for a scalar), not host values
        return result


# numpy functions whose answer CuPy gives as a 0-d device array (numpy's is a host bool)
_DEVICE_BOOL_FUNCTIONS = (np.array_equal, np.array_equiv, np.allclose)


def _nonzero(self):
    """CuPy's nonzero (and boolean-mask indexing, which uses it) reads the count of nonzero entries
    back to the host to size its result."""
    _CUDA.host_sync("ndarray.nonzero")
    _CUDA.flush_current()
    return tuple(_CUDA.to_device(indices) for indices in self.view(np.ndarray).nonzero())


def _is_boolean_mask(key) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(part, np.ndarray) and part.dtype == np.bool_ for part in parts)


def _synchronizing(name: str, host_read: bool):
    method = getattr(np.ndarray, name)

    # a host read reads the values once, on a host view (numpy's repr would otherwise index element by
    # element, each a 0-d device array); pickling keeps the array's own type
    on_host = host_read and name not in ("__reduce__", "__reduce_ex__")

    def call(self, *args, **kwargs):
        if host_read:
            _CUDA.host_sync(f"ndarray.{name}")
        _CUDA.flush_current()
        return method(self.view(np.ndarray) if on_host else self, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _element_view(method):
    def getitem(self, key):
        if _is_boolean_mask(key):
            _CUDA.host_sync("ndarray.__getitem__(boolean mask)")  # the result's size is the mask's count
        result = method(self, key)
        if isinstance(result, np.generic):  # CuPy gives a 0-d device array for one element, never a host value
            return method(self, (key if isinstance(key, tuple) else (key,)) + (Ellipsis,))
        return result

    getitem.__name__ = getitem.__qualname__ = "__getitem__"
    return getitem


# what brings values to the host, where CuPy waits for the device (counted as host syncs)
_HOST_READS = (
    "__bool__", "__float__", "__int__", "__complex__", "__index__", "__repr__", "__str__", "__format__", "__reduce__",
    "__reduce_ex__", "__contains__", "item", "tolist", "tobytes",
)
# everything else that touches the data, which CuPy queues as kernels or views (the host runs it in
# queue order, without a wait)
_DEVICE_WORK = ("__iter__", "__getitem__", "__setitem__", "__deepcopy__", "__copy__", "fill", "reshape",
                "ravel", "flatten")
for _name in _HOST_READS + _DEVICE_WORK:
    setattr(FakeArray, _name, _synchronizing(_name, _name in _HOST_READS))
del _name
FakeArray.__getitem__ = _element_view(FakeArray.__getitem__)
FakeArray.nonzero = _nonzero

FakeArray.__module__ = "cupy._core.core"  # what cudnn_bn's kind check looks at


def virtual_array(shape, dtype=np.float32, value=0.0) -> FakeArray:
    """A FakeArray of any shape over a single element (every stride 0): describes sizes no test could
    allocate (past 2**31 elements), and is safe to read anywhere."""
    base = np.full(1, value, dtype).view(FakeArray)
    return np.lib.stride_tricks.as_strided(base, tuple(shape), (0,) * len(shape)).view(FakeArray)


def _make_cupy_module(cuda: SimulatedCuda) -> types.ModuleType:
    module = types.ModuleType("cupy")
    module.__version__ = "simulated"
    module.ndarray = FakeArray

    def asarray(a, dtype=None, order=None):
        if isinstance(a, FakeArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        return cuda.to_device(np.asarray(a, dtype=dtype))

    def array(obj, dtype=None, copy=True, order="K", ndmin=0):
        if isinstance(obj, FakeArray) and not copy:
            return asarray(obj, dtype)
        if isinstance(obj, FakeArray):
            return obj.astype(obj.dtype if dtype is None else dtype)
        return cuda.to_device(np.array(obj, dtype=dtype, ndmin=ndmin))

    def ascontiguousarray(a, dtype=None):
        if isinstance(a, FakeArray):
            if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
                return a
            cuda.flush_current()
            return cuda.to_device(np.ascontiguousarray(a.view(np.ndarray), dtype=dtype))
        return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))

    def empty(shape, dtype=np.float64, order="C"):
        dtype = np.dtype(dtype)
        return cuda.allocate(shape, dtype, np.nan if dtype.kind == "f" else None)  # unwritten output shows as NaN

    def like(make):
        def made_like(a, dtype=None, order="K", shape=None):
            return make(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)

        return made_like

    module.asarray, module.array, module.ascontiguousarray, module.empty = asarray, array, ascontiguousarray, empty
    module.zeros = lambda shape, dtype=np.float64, order="C": cuda.allocate(shape, dtype, 0)
    module.ones = lambda shape, dtype=np.float64, order="C": cuda.allocate(shape, dtype, 1)
    module.full = lambda shape, fill_value, dtype=None, order="C": cuda.allocate(
        shape, np.asarray(fill_value).dtype if dtype is None else dtype, fill_value
    )
    module.empty_like, module.zeros_like, module.ones_like = like(empty), like(module.zeros), like(module.ones)
    module.asnumpy = lambda a, stream=None: a.get(stream) if isinstance(a, FakeArray) else np.asarray(a)
    for name in ("isfinite", "isnan", "isinf", "abs", "sqrt", "all", "any", "sum", "max", "min", "mean", "vdot",
                 "maximum", "minimum", "copyto", "array_equal", "array_equiv", "allclose", "add", "fmax", "logical_and",
                 "where", "nonzero"):
        setattr(module, name, getattr(np, name))
    for name in ("uint8", "int32", "int64", "float16", "float32", "float64", "bool_", "dtype"):
        setattr(module, name, getattr(np, name))
    pool = _MemoryPool()
    module.get_default_memory_pool = lambda: pool

    def runtime_version() -> int:
        try:  # the simulated GPU runs whichever CUDA the loaded cuDNN was built for
            return int(_raw.library().cudnnGetCudartVersion())
        except Exception:
            return 12080

    def device_properties(index):
        Device(index)
        return {"name": b"simulated GPU (host memory)", "totalGlobalMem": 80 << 30, "major": 9, "minor": 0,
                "multiProcessorCount": 132}

    def synchronize_current_device():
        cuda.host_sync("runtime.deviceSynchronize")
        cuda.synchronize_device(cuda.current_device())

    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.CUDARuntimeError = CUDARuntimeError
    runtime.getDeviceCount = lambda: cuda.device_count
    runtime.getDevice = cuda.current_device
    runtime.setDevice = lambda device: Device(device).use()
    runtime.deviceSynchronize = synchronize_current_device
    runtime.driverGetVersion = lambda: 13000
    runtime.runtimeGetVersion = runtime_version
    runtime.getDeviceProperties = device_properties
    memory = types.ModuleType("cupy.cuda.memory")
    memory.OutOfMemoryError = OutOfMemoryError
    cuda_module = types.ModuleType("cupy.cuda")
    cuda_module.Device, cuda_module.Stream, cuda_module.Event = Device, Stream, Event
    cuda_module.get_current_stream = lambda device_id=None: cuda.current_stream()
    cuda_module.get_elapsed_time = _elapsed_ms
    cuda_module.runtime, cuda_module.memory = runtime, memory
    module.cuda = cuda_module
    return module


_CUDA = SimulatedCuda()
Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)
_CUDA.module = _make_cupy_module(_CUDA)


def make_fake_cupy() -> types.ModuleType:
    """The fake ``cupy`` module of the simulated GPU (the one :func:`simulated_gpu` installs)."""
    return _CUDA.module


# =====================================================================================
# cuDNN: handles, tensor descriptors (tracked), the queued kernels and the entry points
# =====================================================================================


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = int(status), reason


_HANDLE_POINTERS = itertools.count(0xC0D0000, 0x100)
_ISSUED_HANDLES: set[int] = set()  # every handle a simulator made; the real cudnnDestroy never sees one


class _HandleState:
    __slots__ = ("pointer", "device_id", "stream", "flag", "lock")

    def __init__(self, pointer: int, device_id: int):
        self.pointer, self.device_id = pointer, device_id
        self.stream = 0  # cuDNN binds a new handle to the legacy default stream
        self.flag = 0  # the runtime-error flag, written by the kernels of this handle when they run
        self.lock = threading.Lock()  # held for the length of each entry: detects two threads at once


class _Described:
    """What cudnnGetTensorNdDescriptor says about a descriptor, read when the call is made."""

    __slots__ = ("code", "dtype", "dims", "strides")

    def __init__(self, code, dims, strides):
        self.code, self.dtype = code, _NUMPY_TYPES.get(code)
        self.dims, self.strides = dims, strides

    def __repr__(self):
        return f"dims {self.dims} strides {self.strides} type {self.code}"


class _DescriptorTracker:
    """Wraps the library's tensor-descriptor calls for the rest of the process (they still run the
    real cuDNN): records which descriptors were destroyed, so a call given one is BAD_PARAM instead of
    reading freed memory, and notes create/set/derive in the active simulator's ``calls``. Also keeps
    a handle that a simulator made, and that outlived it, from reaching the real cudnnDestroy."""

    def __init__(self, lock):
        self.lock = lock
        self.destroyed: set[int] = set()
        self._library = None

    def install(self, library) -> None:
        """Wrap what the library holds now, unless it is already wrapped (a monkeypatch undone since
        may have put the bare function back)."""
        self._library = library
        wrappers = {
            "cudnnCreateTensorDescriptor": self._create,
            "cudnnSetTensorNdDescriptor": lambda real: self._noted("cudnnSetTensorNdDescriptor", real),
            "cudnnDeriveBNTensorDescriptor": lambda real: self._noted("cudnnDeriveBNTensorDescriptor", real),
            "cudnnDestroyTensorDescriptor": self._destroy,
            "cudnnDestroy": self._destroy_handle,
        }
        for name, wrap in wrappers.items():
            current = getattr(library, name)
            if not getattr(current, "_simulated_gpu_tracking", False):
                function = wrap(current)
                function.__name__ = function.__qualname__ = name
                function._simulated_gpu_tracking = True
                setattr(library, name, function)

    @staticmethod
    def _noted(name, real):
        def call(*args):
            _note_call(name)
            return real(*args)

        return call

    def _create(self, real):
        def create(out):
            _note_call("cudnnCreateTensorDescriptor")
            real(out)
            with self.lock:
                self.destroyed.discard(ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0])

        return create

    def _destroy(self, real):
        def destroy(descriptor):
            with self.lock:
                if descriptor and descriptor in self.destroyed:
                    _raw.check_status("cudnnDestroyTensorDescriptor", _BAD_PARAM,
                                      f"simulated GPU: descriptor {_hex(descriptor)} destroyed twice")
                real(descriptor)
                if descriptor:
                    self.destroyed.add(descriptor)

        return destroy

    @staticmethod
    def _destroy_handle(real):
        def destroy_handle(handle):
            if handle in _ISSUED_HANDLES:
                return  # a simulated handle that outlived its simulator: nothing real to free
            real(handle)

        return destroy_handle

    def read(self, descriptor: int, role: str) -> _Described:
        with self.lock:  # no destroy can run between the check and the read
            if descriptor in self.destroyed:
                raise _Refused(_BAD_PARAM, f"{role}: tensor descriptor {_hex(descriptor)} was destroyed before this "
                                           "call (cuDNN would read freed memory)")
            data_type, count = ctypes.c_int(), ctypes.c_int()
            dims, strides = (ctypes.c_int * 8)(), (ctypes.c_int * 8)()
            try:
                self._library.cudnnGetTensorNdDescriptor(
                    descriptor, 8, ctypes.byref(data_type), ctypes.byref(count), dims, strides
                )
            except CudnnError as error:
                raise _Refused(
                    _BAD_PARAM, f"{role}: {_hex(descriptor)} is not a readable tensor descriptor ({error})"
                ) from None
        return _Described(data_type.value, tuple(dims[: count.value]), tuple(strides[: count.value]))


_DESCRIPTORS = _DescriptorTracker(_CUDA.lock)
_ACTIVE: list["KernelSimulator"] = []


def _note_call(name: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1]._note_call(name)


class _TensorRef:
    """A tensor argument as the call described it: pointer, dtype, dims, strides, and its byte extent."""

    __slots__ = ("pointer", "dtype", "dims", "strides", "low", "high")

    def __init__(self, pointer, described: _Described):
        itemsize = described.dtype.itemsize
        self.pointer, self.dtype, self.dims, self.strides = pointer, described.dtype, described.dims, described.strides
        self.low, self.high = _extent(described.dims, described.strides, itemsize)

    def view(self) -> np.ndarray:
        buffer = (ctypes.c_char * (self.high - self.low)).from_address(self.pointer + self.low)
        itemsize = self.dtype.itemsize
        return np.ndarray(self.dims, self.dtype, buffer=buffer, offset=-self.low,
                          strides=[s * itemsize for s in self.strides])


def _extent(dims, strides, itemsize: int) -> tuple[int, int]:
    """Byte offsets [low, high) from the pointer that a tensor of ``dims`` and ``strides`` touches."""
    low = sum(min(0, (d - 1) * s) for d, s in zip(dims, strides))
    high = sum(max(0, (d - 1) * s) for d, s in zip(dims, strides)) + 1
    return low * itemsize, high * itemsize


class Launch:
    """One queued cuDNN kernel: the arguments as cuDNN read them when the call was made.

    A kernel function (``KernelSimulator.kernels[function]``) receives it when its stream runs it:
    ``launch.view(role)`` is the tensor ``role`` as a numpy array (None when NULL was passed), with
    roles x, y, dy, dx, scale, bias, dscale, dbias, mean, var (inference), running_mean,
    running_var, save_mean, save_inv_std, z and dz (the Ex calls' residual and its gradient);
    ``ops`` the Ex calls' bnOps (OPS_BN elsewhere); ``relu_nan`` the reluNanOpt of a fused bnOps'
    activation descriptor (NOT_PROPAGATE_NAN elsewhere); ``mode`` (a Mode), ``eps`` and ``factor`` are the scalars;
    ``overflows``: whether its mode was in ``overflow_modes`` at the call.
    """

    __slots__ = ("function", "handle", "mode", "tensors", "outputs", "eps", "factor", "overflows", "holds", "_run",
                 "ops", "relu_nan")

    def __init__(self, function, handle, mode, tensors, outputs, eps, factor, overflows, holds, run, ops=OPS_BN,
                 relu_nan=NOT_PROPAGATE_NAN):
        self.function, self.handle, self.mode, self.tensors = function, handle, mode, tensors
        self.outputs, self.eps, self.factor, self.overflows = outputs, eps, factor, overflows
        self.holds, self._run, self.ops, self.relu_nan = holds, run, ops, relu_nan

    def has(self, role: str) -> bool:
        return self.tensors.get(role) is not None

    def view(self, role: str):
        ref = self.tensors.get(role)
        return None if ref is None else ref.view()

    def run(self) -> None:
        self._run(self)


# ---- the kernels: float64 math written out here, independent of cudnn_bn.reference ----
def _statistics(launch, x):
    axes = (0,) if launch.mode is Mode.PER_ACTIVATION else (0,) + tuple(range(2, x.ndim))
    return axes, math.prod(x.shape[a] for a in axes)


def training_kernel(launch: Launch) -> None:
    """cudnnBatchNormalizationForwardTraining(Ex): batch statistics, y, running and saved statistics."""
    x = launch.view("x").astype(np.float64)
    axes, count = _statistics(launch, x)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    biased_var = np.square(centered).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(biased_var + launch.eps)
    gamma, beta = launch.view("scale").astype(np.float64), launch.view("bias").astype(np.float64)
    y = centered * inv_std * gamma + beta
    if launch.ops != OPS_BN:  # BN_ACTIVATION, BN_ADD_ACTIVATION: ReLU(y (+ z)), rounded once
        if launch.ops == OPS_BN_ADD_ACTIVATION:
            y = y + launch.view("z").astype(np.float64)
        # NaN gives 0 under CUDNN_NOT_PROPAGATE_NAN and stays NaN under CUDNN_PROPAGATE_NAN
        y = np.where((y > 0) | (np.isnan(y) & (launch.relu_nan == PROPAGATE_NAN)), y, 0.0)
    launch.view("y")[...] = y
    if launch.has("running_mean"):
        unbiased_var = biased_var * (np.float64(count) / (count - 1))
        factor = launch.factor
        for role, batch_value in (("running_mean", mean), ("running_var", unbiased_var)):
            running = launch.view(role)
            running[...] = (1.0 - factor) * running.astype(np.float64) + factor * batch_value
    if launch.has("save_mean"):
        launch.view("save_mean")[...] = mean
        launch.view("save_inv_std")[...] = inv_std


def inference_kernel(launch: Launch) -> None:
    """cudnnBatchNormalizationForwardInference: y from the given statistics."""
    x = launch.view("x").astype(np.float64)
    mean, var = launch.view("mean").astype(np.float64), launch.view("var").astype(np.float64)
    gamma, beta = launch.view("scale").astype(np.float64), launch.view("bias").astype(np.float64)
    launch.view("y")[...] = (x - mean) / np.sqrt(var + launch.eps) * gamma + beta


def backward_kernel(launch: Launch) -> None:
    """cudnnBatchNormalizationBackward(Ex): dx, dscale, dbias (statistics saved or recomputed with eps)."""
    x, dy = launch.view("x").astype(np.float64), launch.view("dy").astype(np.float64)
    axes, count = _statistics(launch, x)
    if launch.ops != OPS_BN:  # the ReLU's gradient first: dy where the forward's y > 0 (NaN where a NaN y propagated)
        y = launch.view("y")
        dy = np.where(y > 0, dy, np.where(np.isnan(y) & (launch.relu_nan == PROPAGATE_NAN), np.nan, 0.0))
        if launch.ops == OPS_BN_ADD_ACTIVATION:
            launch.view("dz")[...] = dy
    if launch.has("save_mean"):
        mean, inv_std = launch.view("save_mean").astype(np.float64), launch.view("save_inv_std").astype(np.float64)
    else:
        mean = x.mean(axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt(np.square(x - mean).mean(axis=axes, keepdims=True) + launch.eps)
    x_hat = (x - mean) * inv_std
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
    gamma = launch.view("scale").astype(np.float64)
    launch.view("dx")[...] = gamma * inv_std * (dy - (dbeta + x_hat * dgamma) / count)
    launch.view("dscale")[...] = dgamma
    launch.view("dbias")[...] = dbeta


# ---- argument checks shared by the entry points ----
def _required(**pointers) -> None:
    missing = [name for name, pointer in pointers.items() if not pointer]
    if missing:
        raise _Refused(_BAD_PARAM, f"NULL {', '.join(missing)}: the header requires a pointer there")


def _both_or_neither(first: str, first_pointer, second: str, second_pointer) -> None:
    if bool(first_pointer) != bool(second_pointer):
        given = first if first_pointer else second
        raise _Refused(_BAD_PARAM, f"{first} and {second} must both be NULL or both be set; only {given} is set")


def _epsilon(eps: float) -> None:
    if not eps >= CUDNN_BN_MIN_EPSILON:
        raise _Refused(_BAD_PARAM, f"epsilon {eps!r} is not >= CUDNN_BN_MIN_EPSILON ({CUDNN_BN_MIN_EPSILON})")


def _nhwc_fully_packed(tensor: _Described) -> bool:
    """Strides of a packed N, spatial..., C memory order (size-1 dims may carry any stride)."""
    order = [1] + list(range(len(tensor.dims) - 1, 1, -1)) + [0]  # innermost first: C, W, H, (D), N
    step = 1
    for axis in order:
        if tensor.dims[axis] > 1 and tensor.strides[axis] != step:
            return False
        step *= tensor.dims[axis]
    return True


class KernelSimulator:
    """cuDNN's handle, stream, error-query and batch-norm entry points of the simulated GPU, as
    :func:`simulated_gpu` installs them on the real, loaded library (see :meth:`entries`).

    Every entry converts its arguments as ctypes would, records its name in ``calls``, checks them
    and either queues the kernel or refuses: ``CudnnError`` with the status, the reason recorded in
    ``refusals`` as (function, status, reason). It refuses, as cuDNN documents or PyTorch guards:

    - BAD_PARAM: a NULL pointer where the header needs one (alpha, beta, x, y, dy, dx, scale, bias,
      the parameter gradients, inference's mean and variance); exactly one of the running (or saved)
      mean and variance; a mode or bnOps outside its enum; descriptors that are not 4-D or 5-D, x and
      y (dy, dx) that differ in dims or type, a parameter descriptor that is not 1xCx1x1 (spatial) or
      1xCxHxW (per activation) in float (double for double data); alpha/beta that do not read as 1 and
      0 at cuDNN's width (C float for half and float data, C double for double), which is what a
      scalar of the wrong width does; epsilon below CUDNN_BN_MIN_EPSILON (0.0); an unknown, destroyed
      or busy handle; a destroyed descriptor; memory outside one live allocation of the handle's
      device; a kernel call on a handle bound to another stream than the current one;
      SPATIAL_PERSISTENT backward without saved statistics; BackwardEx without the reserve space of
      the ForwardTrainingEx that saved its statistics; a BackwardEx workspace query with NULL yDesc;
      a ForwardTrainingEx workspace query whose zDesc does not describe x, or is NULL with
      BN_ADD_ACTIVATION. cuDNN's header describes zDesc as the z descriptor "for add operations",
      and MXNet, Caffe2 and OneFlow pass NULL there with bnOps BN, so NULL is accepted otherwise;
      cudnn_bn passes x's descriptor for every bnOps, as PyTorch, TensorFlow and CuPy 13 do.
    - NOT_SUPPORTED: any dim, stride, element count or extent past int32 (including an array whose
      pointer was taken with a dim past int32 and a descriptor that a C int truncated); training or
      backward with N > 131070 in PER_ACTIVATION and N > 880801 in SPATIAL and SPATIAL_PERSISTENT,
      inference with N > 65535 in any mode (N of the descriptor; see the constants above);
      ForwardInference in SPATIAL_PERSISTENT.
    - The Ex calls and their size queries, while ``ex_fast_path_only`` (default): bnOps other than
      BN, and anything off NVIDIA's NHWC fast path (SPATIAL_PERSISTENT, fully packed NHWC half x,
      y, dy, dx, C % 4 == 0) is NOT_SUPPORTED; a NULL workspace or reserve space, or one smaller
      than the size queries return (``workspace_size``, ``reserve_size``), is BAD_PARAM. This is
      stricter than cuDNN, which runs its generic kernel off the fast path; cudnn_bn's contract is
      to call the Ex functions only on it.

    Settings: ``overflow_modes`` (Modes whose persistent kernels overflow), ``workspace_size``,
    ``reserve_size``, ``delay`` (None, ``(probability, seconds)`` slept inside entries while the
    handle is held, or a callable given the entry name), ``ex_fast_path_only``, ``fail_on_hazard``,
    ``kernels`` (C name -> function of a :class:`Launch`; replace one with a no-op to time the host
    side alone). State: ``calls``, ``refusals``, ``handles`` (pointer -> state), ``stream`` (the
    stream last bound by cudnnSetStream), ``reserves`` (reserve pointer -> (size, saved-mean
    pointer) of the ForwardTrainingEx that filled it), ``hazards``, ``host_syncs`` and
    ``sync_points`` (the host's waits for the device, in all and by kind; see the module
    docstring), ``runtime_queries`` (cudnnQueryRuntimeError calls by mode name).
    """

    def __init__(self, library, cuda: SimulatedCuda | None = None):
        self.library = library
        self.cuda = _CUDA if cuda is None else cuda
        self.calls: list[str] = []
        self.refusals: list[tuple[str, int, str]] = []
        self.hazards: list[str] = []
        self.overflow_modes: set = set()
        self.reserves: dict[int, tuple[int, int]] = {}
        self._reserve_serials: dict[int, int] = {}
        self.reserve_ops: dict[int, int] = {}  # reserve pointer -> bnOps of the ForwardTrainingEx that filled it
        self.workspace_size, self.reserve_size = 256, 512
        self.stream = None
        self.delay = None
        self.random = random.Random(0)
        self.ex_fast_path_only = True
        self.fail_on_hazard = True
        self.handles: dict[int, _HandleState] = {}
        self.host_syncs = 0
        self.sync_points: collections.Counter = collections.Counter()
        self.runtime_queries: collections.Counter = collections.Counter()
        self._capturing = 0
        self._destroyed_handles: set[int] = set()
        # one lock for the registry, the descriptors and this state: finalizers run at any allocation,
        # and two locks taken in either order by them could deadlock
        self._lock = self.cuda.lock
        self._local = threading.local()
        self.kernels = {
            "cudnnBatchNormalizationForwardTraining": training_kernel,
            "cudnnBatchNormalizationForwardTrainingEx": training_kernel,
            "cudnnBatchNormalizationForwardInference": inference_kernel,
            "cudnnBatchNormalizationBackward": backward_kernel,
            "cudnnBatchNormalizationBackwardEx": backward_kernel,
        }

    def _note_call(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)

    # ---- the host's waits for the device ----
    def host_sync(self, kind: str) -> None:
        """Count one wait of the host for the device (``kind`` names it); refused while capturing."""
        with self._lock:
            if self._capturing:
                raise StreamCaptureUnsupported(
                    f"cudaErrorStreamCaptureUnsupported: {kind} waits for the device, which stream capture refuses"
                )
            self.host_syncs += 1
            self.sync_points[kind] += 1

    @contextlib.contextmanager
    def capturing(self):
        """``with simulator.capturing():`` every host wait for the device raises, as it would while
        CUDA captures a stream into a graph. Zero waits is necessary for a capture, not sufficient:
        a capture also refuses other calls (an allocation outside the pool, a stream it does not
        follow), which the simulator does not model."""
        with self._lock:
            self._capturing += 1
        try:
            yield self
        finally:
            with self._lock:
                self._capturing -= 1

    # ---- the entry points, C name -> callable with the C arguments ----
    def entries(self) -> dict:
        """C name -> entry point taking the C function's arguments (what simulated_gpu installs)."""
        bodies = {
            "cudnnCreate": self._create,
            "cudnnDestroy": self._destroy,
            "cudnnSetStream": self._set_stream,
            "cudnnGetStream": self._get_stream,
            "cudnnQueryRuntimeError": self._query,
            "cudnnBatchNormalizationForwardTraining": self._forward_training,
            "cudnnBatchNormalizationForwardInference": self._forward_inference,
            "cudnnBatchNormalizationBackward": self._backward,
            "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize": self._training_ex_workspace,
            "cudnnGetBatchNormalizationBackwardExWorkspaceSize": self._backward_ex_workspace,
            "cudnnGetBatchNormalizationTrainingExReserveSpaceSize": self._reserve_space_size,
            "cudnnBatchNormalizationForwardTrainingEx": self._forward_training_ex,
            "cudnnBatchNormalizationBackwardEx": self._backward_ex,
        }
        return {name: self._entry(name, body) for name, body in bodies.items()}

    def _entry(self, name: str, body):
        restype, argtypes = _raw.PROTOTYPES[name]

        def entry(*args):
            if len(args) != len(argtypes):
                raise TypeError(f"{name}() takes {len(argtypes)} arguments ({len(args)} given)")
            for ctype, arg in zip(argtypes, args):
                ctype.from_param(arg)  # the check ctypes makes; raises on a wrong kind
            values = [_as_c(ctype, arg) for ctype, arg in zip(argtypes, args)]
            self._note_call(name)
            self._local.sources = self.cuda.take_pointer_sources()
            try:
                body(*values)
                return
            except _Refused as refusal:
                status, reason = refusal.status, refusal.reason
            with self._lock:
                self.refusals.append((name, status, reason))
            _raw.check_status(name, status, f"simulated GPU: {reason}")

        entry.__name__ = entry.__qualname__ = name
        return entry

    @contextlib.contextmanager
    def _using(self, name: str, handle, kernel: bool = False):
        state = self.handles.get(handle)
        if state is None:
            why = "was destroyed" if handle in self._destroyed_handles else "is not a handle from cudnnCreate"
            raise _Refused(_BAD_PARAM, f"handle {_hex(handle)} {why}")
        if not state.lock.acquire(blocking=False):
            raise _Refused(_BAD_PARAM, f"handle {_hex(handle)} is in use by another thread at the same time "
                                       "(a cuDNN handle must not be used by two threads at once)")
        try:
            self._pause(name)
            if kernel:
                self._check_device_and_stream(state)
            yield state
        finally:
            state.lock.release()

    def _pause(self, name: str) -> None:
        delay = self.delay
        if delay is None:
            return
        if callable(delay):
            delay(name)
            return
        probability, seconds = delay
        with self._lock:
            hit = self.random.random() < probability
        if hit:
            time.sleep(seconds)

    def _check_device_and_stream(self, state: _HandleState) -> None:
        device = self.cuda.current_device()
        if device != state.device_id:
            raise _Refused(
                _BAD_PARAM, f"the handle was created on device {state.device_id} but device {device} is current"
            )
        current = self.cuda.current_stream().ptr
        if current != state.stream:
            raise _Refused(_BAD_PARAM, f"the handle is bound to stream {_hex(state.stream)} but the calling thread's "
                                       f"current stream is {_hex(current)}: cudnnSetStream(handle, current stream) "
                                       "first")

    # ---- handles, streams, the error flag ----
    def _create(self, handle_out) -> None:
        if not handle_out:
            raise _Refused(_BAD_PARAM, "NULL handle output pointer")
        state = _HandleState(next(_HANDLE_POINTERS), self.cuda.current_device())
        with self._lock:
            self.handles[state.pointer] = state
            _ISSUED_HANDLES.add(state.pointer)
        ctypes.cast(handle_out, ctypes.POINTER(ctypes.c_void_p))[0] = state.pointer

    def _destroy(self, handle) -> None:
        self.host_sync("cudnnDestroy")  # it calls cudaDeviceSynchronize (cudnn_graph.h)
        with self._using("cudnnDestroy", handle) as state:
            # cudnnDestroy synchronizes the device; it may run from a finalizer in a thread that holds
            # the registry lock, so streams another thread is running are left to that thread
            self.cuda.synchronize_device(state.device_id, wait=False)
            with self._lock:
                del self.handles[handle]
                self._destroyed_handles.add(handle)

    def _set_stream(self, handle, stream) -> None:
        with self._using("cudnnSetStream", handle) as state:
            stream = stream or 0
            if stream and stream != PER_THREAD_STREAM:  # the default streams belong to every device
                device = self.cuda.streams.get(stream)
                if device is None:
                    raise _Refused(_BAD_PARAM, f"stream {_hex(stream)} is not a stream of this process")
                if device != state.device_id:
                    raise _Refused(_BAD_PARAM, f"stream {_hex(stream)} belongs to device {device}, "
                                               f"the handle to device {state.device_id}")
            state.stream = self.stream = stream

    def _get_stream(self, handle, stream_out) -> None:
        with self._using("cudnnGetStream", handle) as state:
            if not stream_out:
                raise _Refused(_BAD_PARAM, "NULL stream output pointer")
            ctypes.cast(stream_out, ctypes.POINTER(ctypes.c_void_p))[0] = state.stream or None

    def _query(self, handle, status_out, mode, tag) -> None:
        with self._using("cudnnQueryRuntimeError", handle) as state:
            if not status_out:
                raise _Refused(_BAD_PARAM, "NULL rstatus")
            if tag:
                raise _Refused(_BAD_PARAM, "tag must be NULL (cudnnRuntimeTag_t is only declared)")
            key = self.cuda.queue_key(state.device_id, state.stream)  # the calling thread's, for cudaStreamPerThread
            names = {ERRQUERY_BLOCKING: "BLOCKING", ERRQUERY_NONBLOCKING: "NONBLOCKING", ERRQUERY_RAWCODE: "RAWCODE"}
            with self._lock:
                self.runtime_queries[names.get(mode, str(mode))] += 1
            if mode == ERRQUERY_BLOCKING:
                self.host_sync("cudnnQueryRuntimeError(BLOCKING)")
                self.cuda.flush(key)  # waits for the handle's stream
                value, state.flag = state.flag, 0
            elif mode == ERRQUERY_NONBLOCKING:
                if self.cuda.pending(key):
                    value = int(Status.RUNTIME_IN_PROGRESS)
                else:
                    value, state.flag = state.flag, 0
            elif mode == ERRQUERY_RAWCODE:
                value = state.flag
            else:
                raise _Refused(_BAD_PARAM, f"mode {mode} is not a cudnnErrQueryMode_t")
            ctypes.cast(status_out, ctypes.POINTER(ctypes.c_int))[0] = value

    # ---- checks on one batch-norm call ----
    @staticmethod
    def _mode(mode) -> Mode:
        if mode not in (PER_ACTIVATION, SPATIAL, SPATIAL_PERSISTENT):
            raise _Refused(_BAD_PARAM, f"mode {mode} is not a cudnnBatchNormMode_t")
        return Mode(mode)

    def _data(self, role: str, descriptor, like: _Described | None = None) -> _Described:
        if not descriptor:
            raise _Refused(_BAD_PARAM, f"{role}: NULL tensor descriptor")
        described = _DESCRIPTORS.read(descriptor, role)
        if len(described.dims) not in (4, 5):
            raise _Refused(
                _BAD_PARAM, f"{role}: {len(described.dims)} dims; batch normalization takes 4-D or 5-D tensors"
            )
        if described.dtype is None:
            raise _Refused(_NOT_SUPPORTED, f"{role}: data type {described.code} "
                                           "(the simulated GPU computes half, float and double)")
        if like is not None and (like.dims != described.dims or like.code != described.code):
            raise _Refused(_BAD_PARAM, f"{role} ({described}) does not match xDesc ({like}) in dims or type")
        return described

    def _param(self, role: str, descriptor, data: _Described, mode: Mode) -> _Described:
        if not descriptor:
            raise _Refused(_BAD_PARAM, f"{role}: NULL tensor descriptor")
        described = _DESCRIPTORS.read(descriptor, role)
        rest = data.dims[2:] if mode is Mode.PER_ACTIVATION else (1,) * (len(data.dims) - 2)
        wanted_dims = (1, data.dims[1]) + rest
        wanted_code = DATA_DOUBLE if data.code == DATA_DOUBLE else DATA_FLOAT
        if described.dims != wanted_dims or described.code != wanted_code:
            raise _Refused(_BAD_PARAM, f"{role} ({described}) must have dims {wanted_dims} and type {wanted_code} "
                                       f"for {mode.name} on data of type {data.code}")
        return described

    def _scalars(self, data: _Described, **pointers) -> None:
        ctype = ctypes.c_double if data.code == DATA_DOUBLE else ctypes.c_float
        values = {}
        for name, pointer in pointers.items():
            if self.cuda.find_live(pointer, pointer + ctypes.sizeof(ctype)) is not None:
                raise _Refused(
                    _BAD_PARAM, f"{name} points into device memory; cuDNN reads alpha and beta from the host"
                )
            values[name] = ctype.from_address(pointer).value
        wanted = {name: 1.0 if name.startswith("alpha") else 0.0 for name in pointers}
        if values != wanted:
            raise _Refused(_BAD_PARAM, f"alpha/beta read as {values} at cuDNN's width for this data "
                                       f"({ctype.__name__}); the simulated GPU runs alpha=1, beta=0 only, and a "
                                       "scalar of the wrong width reads as another value")

    def _limits(self, data: _Described, operation: str, mode: Mode) -> None:
        count = math.prod(data.dims)
        reach = sum((d - 1) * abs(s) for d, s in zip(data.dims, data.strides))
        if max(count, reach, *data.dims, *(abs(s) for s in data.strides)) > INT32_MAX:
            raise _Refused(
                _NOT_SUPPORTED, f"x ({data}, {count} elements) is past cuDNN's 32-bit indexing (at most {INT32_MAX})"
            )
        batch = data.dims[0]
        if operation == "inference":
            limit, source = INFERENCE_MAX_BATCH, "pytorch#19911"
        elif mode is Mode.PER_ACTIVATION:
            limit, source = PER_ACTIVATION_TRAINING_MAX_BATCH, "pytorch#2917"
        else:
            limit, source = TRAINING_MAX_BATCH, "PyTorch's guard, PR #32763"
        if batch > limit:
            raise _Refused(
                _NOT_SUPPORTED, f"{operation} in {mode.name} with N={batch}: cuDNN fails past N={limit} ({source})"
            )

    def _check_sources(self, tensors: dict) -> None:
        """An array whose pointer was taken, sized past int32: its descriptor cannot be right."""
        sources = getattr(self._local, "sources", {})
        for role, (pointer, described) in tensors.items():
            source = sources.get(pointer) if pointer else None
            if source is None:
                continue
            shape, strides, itemsize = source
            count = math.prod(shape)
            if max(count, *shape, *(abs(s) // itemsize for s in strides)) > INT32_MAX:
                raise _Refused(_NOT_SUPPORTED, f"{role}: the array at {_hex(pointer)} has shape {shape} "
                                               f"({count} elements), past cuDNN's 32-bit sizes, but its descriptor "
                                               f"says {described.dims}: a C int truncated it")

    def _ex_conditions(self, mode: Mode, ops, tensors: dict, activation=None) -> None:
        if ops not in (OPS_BN, OPS_BN_ACTIVATION, OPS_BN_ADD_ACTIVATION):
            raise _Refused(_BAD_PARAM, f"bnOps {ops} is not a cudnnBatchNormOps_t")
        if ops != OPS_BN:
            self._fused_activation(ops, activation)
        if not self.ex_fast_path_only:
            return
        unmet = [] if mode is Mode.SPATIAL_PERSISTENT else [f"mode SPATIAL_PERSISTENT (got {mode.name})"]
        for role, described in tensors.items():
            if described.code != DATA_HALF:
                unmet.append(f"{role} of type CUDNN_DATA_HALF (got {described.code})")
            if not _nhwc_fully_packed(described):
                unmet.append(f"{role} fully packed NHWC (got {described})")
        channels = next(iter(tensors.values())).dims[1]
        if channels % 4:
            unmet.append(f"C % 4 == 0 (got C={channels})")
        if unmet:
            raise _Refused(_NOT_SUPPORTED, "the Ex calls run only on NVIDIA's NHWC fast path here (cuDNN would fall "
                                           "back to its generic kernel, which cudnn_bn never asks for); unmet: "
                                           f"{'; '.join(unmet)}")

    def _fused_activation(self, ops, activation) -> None:
        """A fused bnOps needs an activation descriptor, and cuDNN's fused kernels apply ReLU only."""
        if not activation:  # no fused kernel applies without one (cuDNN's status here is not documented)
            fused_name = f"CUDNN_BATCHNORM_OPS_BN_{'ADD_' if ops == OPS_BN_ADD_ACTIVATION else ''}ACTIVATION"
            raise _Refused(
                _NOT_SUPPORTED, f"bnOps {ops} ({fused_name}) applies an activation, but activationDesc is NULL"
            )
        try:
            mode, _ = _activation_settings(activation)
        except CudnnError as error:
            raise _Refused(
                _BAD_PARAM, f"activationDesc {_hex(activation)} is not a readable activation descriptor ({error})"
            ) from None
        if mode != ACTIVATION_RELU:
            raise _Refused(_NOT_SUPPORTED, f"bnOps {ops} with activation mode {mode}: the fused batch-norm kernels "
                                           f"apply CUDNN_ACTIVATION_RELU ({ACTIVATION_RELU}) only")

    def reserve_bytes(self, ops, x: _Described) -> int:
        """What the reserve-space query returns: ``reserve_size``, plus for a fused bnOps one bit per
        element of x (the ReLU's mask, which BackwardEx reads), rounded up to 4 bytes."""
        if ops == OPS_BN:
            return self.reserve_size
        return self.reserve_size + 4 * math.ceil(math.prod(x.dims) / 32)

    def _buffer_size(self, role: str, pointer, size: int, needed: int) -> None:
        if not pointer:
            raise _Refused(_BAD_PARAM, f"NULL {role}")
        if size < needed:
            raise _Refused(_BAD_PARAM, f"{role} of {size} bytes; the size query returned {needed}")

    # ---- memory, then the queue ----
    def _locate(self, state, role, pointer, size=None, described=None):
        if described is not None:
            low, high = _extent(described.dims, described.strides, described.dtype.itemsize)
            what = f"{described} ({described.dtype})"
        else:
            low, high, what = 0, size, f"{size} bytes"
        allocation = self.cuda.find_live(pointer + low, pointer + high)
        if allocation is None:
            around = self.cuda.find_live(pointer, pointer + 1)
            holder = f"{around.describe()} holds the pointer" if around else "no live allocation holds the pointer"
            raise _Refused(_BAD_PARAM, f"{role}: {what} reaches bytes [{low}, {high}) from {_hex(pointer)}, outside "
                                       f"any one live allocation ({holder})")
        if allocation.device_id != state.device_id:
            raise _Refused(_BAD_PARAM, f"{role}: memory on device {allocation.device_id}, "
                                       f"the handle's device is {state.device_id}")
        return allocation

    def _launch(self, state, function, mode, tensors, outputs, buffers=(), eps=None, factor=None, ops=OPS_BN,
                activation=None) -> dict:
        """Check every pointer against the registry, then queue the kernel on the handle's stream.
        Returns role -> allocation of the raw buffers (workspace, reserve space)."""
        self._check_sources(tensors)
        with self.cuda.lock:  # nothing may be freed between the checks and the queueing
            refs, holds, located = {}, {}, {}
            for role, (pointer, described) in tensors.items():
                if not pointer:
                    refs[role] = None
                    continue
                allocation = self._locate(state, role, pointer, described=described)
                refs[role], holds[allocation.serial] = _TensorRef(pointer, described), allocation
            for role, pointer, size in buffers:
                allocation = located[role] = self._locate(state, role, pointer, size=size)
                holds[allocation.serial] = allocation
            owners = [(allocation, allocation.memory_owner()) for allocation in holds.values()]
            # whether it overflows is settled by overflow_modes at the call, though it shows when it runs
            overflows = mode is Mode.SPATIAL_PERSISTENT and mode in self.overflow_modes
            # a fused bnOps' ReLU treats NaN as its descriptor says (checked by _ex_conditions before)
            relu_nan = NOT_PROPAGATE_NAN if ops == OPS_BN else _activation_settings(activation)[1]
            launch = Launch(function, state, mode, refs, outputs, eps, factor, overflows, owners, self._run, ops,
                            relu_nan)
            self.cuda.enqueue(self.cuda.queue_key(state.device_id, state.stream), launch)
        return located

    def _run(self, launch: Launch) -> None:
        """What the stream does when it reaches the launch."""
        if any(allocation.hazard for allocation, _ in launch.holds):
            self._poison(launch)  # it read memory the pool may already have given away
            return
        # a kernel warns of nothing: NaN and Inf propagate silently on a GPU (count == 1 divides by zero too)
        with np.errstate(all="ignore"):
            self.kernels[launch.function](launch)
        if launch.overflows:
            self._poison(launch)  # an overflowing persistent kernel writes NaN and raises the flag
            launch.handle.flag = int(Status.RUNTIME_FP_OVERFLOW)

    @staticmethod
    def _poison(launch: Launch) -> None:
        for role in launch.outputs:
            view = launch.view(role)
            if view is not None:
                view[...] = np.nan

    # ---- the batch-norm entry points ----
    def _training_call(self, name, state, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, factor,
                       running_mean, running_var, eps, save_mean, save_inv_var, ex=None, ops=OPS_BN, z=None,
                       z_desc=None, activation=None):
        mode = self._mode(mode)
        _required(alpha=alpha, beta=beta, x=x, y=y, bnScale=scale, bnBias=bias)
        _both_or_neither("resultRunningMean", running_mean, "resultRunningVariance", running_var)
        _both_or_neither("resultSaveMean", save_mean, "resultSaveInvVariance", save_inv_var)
        x_t = self._data("xDesc", x_desc)
        y_t = self._data("yDesc", y_desc, like=x_t)
        p_t = self._param("bnScaleBiasMeanVarDesc", p_desc, x_t, mode)
        self._scalars(x_t, alpha=alpha, beta=beta)
        _epsilon(eps)
        data = {"xDesc": x_t, "yDesc": y_t}
        z_t = None
        if ops == OPS_BN_ADD_ACTIVATION:  # the residual z: required, and described like x
            _required(z=z)
            z_t = data["zDesc"] = self._data("zDesc", z_desc, like=x_t)
        buffers = ex(mode, data) if ex is not None else ()
        self._limits(x_t, "training", mode)
        tensors = {"x": (x, x_t), "y": (y, y_t), "scale": (scale, p_t), "bias": (bias, p_t),
                   "running_mean": (running_mean, p_t), "running_var": (running_var, p_t),
                   "save_mean": (save_mean, p_t), "save_inv_std": (save_inv_var, p_t)}
        if z_t is not None:
            tensors["z"] = (z, z_t)
        outputs = ("y", "save_mean", "save_inv_std", "running_mean", "running_var")
        return self._launch(state, name, mode, tensors, outputs, buffers, eps=eps, factor=factor, ops=ops,
                            activation=activation)

    def _forward_training(self, handle, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, factor,
                          running_mean, running_var, eps, save_mean, save_inv_var):
        name = "cudnnBatchNormalizationForwardTraining"
        with self._using(name, handle, kernel=True) as state:
            self._training_call(name, state, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, factor,
                                running_mean, running_var, eps, save_mean, save_inv_var)

    def _forward_training_ex(self, handle, mode, ops, alpha, beta, x_desc, x, z_desc, z, y_desc, y, p_desc, scale,
                             bias, factor, running_mean, running_var, eps, save_mean, save_inv_var, activation,
                             workspace, workspace_size, reserve, reserve_size):
        name = "cudnnBatchNormalizationForwardTrainingEx"

        def ex(mode, tensors):
            self._ex_conditions(mode, ops, tensors, activation)
            if self.ex_fast_path_only:
                self._buffer_size("workspace", workspace, workspace_size, self.workspace_size)
                self._buffer_size("reserveSpace", reserve, reserve_size, self.reserve_bytes(ops, tensors["xDesc"]))
            return [(role, pointer, size) for role, pointer, size in
                    (("workspace", workspace, workspace_size), ("reserveSpace", reserve, reserve_size)) if pointer]

        with self._using(name, handle, kernel=True) as state:
            located = self._training_call(name, state, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias,
                                          factor, running_mean, running_var, eps, save_mean, save_inv_var, ex=ex,
                                          ops=ops, z=z, z_desc=z_desc, activation=activation)
            if reserve:
                with self._lock:
                    self.reserves[reserve] = (reserve_size, save_mean)
                    self._reserve_serials[reserve] = located["reserveSpace"].serial
                    self.reserve_ops[reserve] = ops

    def _forward_inference(self, handle, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, mean, var, eps):
        name = "cudnnBatchNormalizationForwardInference"
        with self._using(name, handle, kernel=True) as state:
            mode = self._mode(mode)
            _required(alpha=alpha, beta=beta, x=x, y=y, bnScale=scale, bnBias=bias, estimatedMean=mean,
                      estimatedVariance=var)
            x_t = self._data("xDesc", x_desc)
            y_t = self._data("yDesc", y_desc, like=x_t)
            p_t = self._param("bnScaleBiasMeanVarDesc", p_desc, x_t, mode)
            self._scalars(x_t, alpha=alpha, beta=beta)
            _epsilon(eps)
            if mode is Mode.SPATIAL_PERSISTENT:
                raise _Refused(
                    _NOT_SUPPORTED, "ForwardInference takes PER_ACTIVATION or SPATIAL, not SPATIAL_PERSISTENT"
                )
            self._limits(x_t, "inference", mode)
            tensors = {"x": (x, x_t), "y": (y, y_t), "scale": (scale, p_t), "bias": (bias, p_t),
                       "mean": (mean, p_t), "var": (var, p_t)}
            self._launch(state, name, mode, tensors, ("y",), eps=eps)

    def _backward_call(self, name, state, mode, alpha_data, beta_data, alpha_param, beta_param, x_desc, x, dy_desc,
                       dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, saved_mean, saved_inv_var, ex=None,
                       fused=None):
        mode = self._mode(mode)
        _required(alphaDataDiff=alpha_data, betaDataDiff=beta_data, alphaParamDiff=alpha_param,
                  betaParamDiff=beta_param, x=x, dy=dy, dx=dx, bnScale=scale, dBnScaleResult=dscale,
                  dBnBiasResult=dbias)
        _both_or_neither("savedMean", saved_mean, "savedInvVariance", saved_inv_var)
        x_t = self._data("xDesc", x_desc)
        dy_t = self._data("dyDesc", dy_desc, like=x_t)
        dx_t = self._data("dxDesc", dx_desc, like=x_t)
        p_t = self._param("dBnScaleBiasDesc", p_desc, x_t, mode)
        self._scalars(x_t, alphaDataDiff=alpha_data, betaDataDiff=beta_data, alphaParamDiff=alpha_param,
                      betaParamDiff=beta_param)
        _epsilon(eps)
        if mode is Mode.SPATIAL_PERSISTENT and not saved_mean:
            raise _Refused(_BAD_PARAM, "SPATIAL_PERSISTENT backward needs the saved mean and inverse variance")
        data = {"xDesc": x_t, "dyDesc": dy_t, "dxDesc": dx_t}
        extra, outputs, ops = {}, ("dx", "dscale", "dbias"), OPS_BN
        if fused is not None and fused["ops"] != OPS_BN:  # the activation's backward reads y, bias; ADD writes dz
            ops = fused["ops"]
            _required(yData=fused["y"], bnBias=fused["bias"])
            data["yDesc"] = self._data("yDesc", fused["y_desc"], like=x_t)
            extra["y"], extra["bias"] = (fused["y"], data["yDesc"]), (fused["bias"], p_t)
            if ops == OPS_BN_ADD_ACTIVATION:
                _required(dzData=fused["dz"])
                data["dzDesc"] = self._data("dzDesc", fused["dz_desc"], like=x_t)
                extra["dz"] = (fused["dz"], data["dzDesc"])
                outputs += ("dz",)
        buffers = ex(mode, data) if ex is not None else ()
        self._limits(x_t, "backward", mode)
        tensors = {"x": (x, x_t), "dy": (dy, dy_t), "dx": (dx, dx_t), "scale": (scale, p_t), "dscale": (dscale, p_t),
                   "dbias": (dbias, p_t), "save_mean": (saved_mean, p_t), "save_inv_std": (saved_inv_var, p_t), **extra}
        return self._launch(state, name, mode, tensors, outputs, buffers, eps=eps, ops=ops,
                            activation=None if fused is None else fused["activation"])

    def _backward(self, handle, mode, alpha_data, beta_data, alpha_param, beta_param, x_desc, x, dy_desc, dy, dx_desc,
                  dx, p_desc, scale, dscale, dbias, eps, saved_mean, saved_inv_var):
        name = "cudnnBatchNormalizationBackward"
        with self._using(name, handle, kernel=True) as state:
            self._backward_call(name, state, mode, alpha_data, beta_data, alpha_param, beta_param, x_desc, x, dy_desc,
                                dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, saved_mean, saved_inv_var)

    def _backward_ex(self, handle, mode, ops, alpha_data, beta_data, alpha_param, beta_param, x_desc, x, y_desc, y,
                     dy_desc, dy, dz_desc, dz, dx_desc, dx, p_desc, scale, bias, dscale, dbias, eps, saved_mean,
                     saved_inv_var, activation, workspace, workspace_size, reserve, reserve_size):
        name = "cudnnBatchNormalizationBackwardEx"

        def ex(mode, tensors):
            self._ex_conditions(mode, ops, tensors, activation)
            if y_desc:  # y is read only with an activation; when given it must still describe x's shape
                self._data("yDesc", y_desc, like=tensors["xDesc"])
            if self.ex_fast_path_only:
                self._buffer_size("workSpace", workspace, workspace_size, self.workspace_size)
                self._buffer_size("reserveSpace", reserve, reserve_size, self.reserve_bytes(ops, tensors["xDesc"]))
            return [(role, pointer, size) for role, pointer, size in
                    (("workSpace", workspace, workspace_size), ("reserveSpace", reserve, reserve_size)) if pointer]

        with self._using(name, handle, kernel=True) as state:
            if reserve:
                with self._lock:
                    filled = self.reserves.get(reserve)
                    serial = self._reserve_serials.get(reserve)
                allocation = self.cuda.find_live(reserve, reserve + 1)
                if filled is None or filled[1] != saved_mean or allocation is None or allocation.serial != serial:
                    raise _Refused(_BAD_PARAM, "BackwardEx must get the reserve space filled by the ForwardTrainingEx "
                                               "that produced these saved statistics")
                filled_ops = self.reserve_ops.get(reserve, OPS_BN)
                if filled_ops != ops:
                    raise _Refused(_BAD_PARAM, f"BackwardEx with bnOps {ops} got the reserve space of a "
                                               f"ForwardTrainingEx with bnOps {filled_ops}")
            elif ops != OPS_BN:
                raise _Refused(
                    _BAD_PARAM, f"bnOps {ops}: BackwardEx needs the forward's reserve space (the activation's mask)"
                )
            fused = {"ops": ops, "y": y, "y_desc": y_desc, "bias": bias, "dz": dz, "dz_desc": dz_desc,
                     "activation": activation}
            self._backward_call(name, state, mode, alpha_data, beta_data, alpha_param, beta_param, x_desc, x, dy_desc,
                                dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, saved_mean, saved_inv_var, ex=ex,
                                fused=fused)

    # ---- the Ex size queries ----
    @staticmethod
    def _write_size(size_out, value: int) -> None:
        if not size_out:
            raise _Refused(_BAD_PARAM, "NULL sizeInBytes")
        ctypes.cast(size_out, ctypes.POINTER(ctypes.c_size_t))[0] = value

    def _training_ex_workspace(self, handle, mode, ops, x_desc, z_desc, y_desc, p_desc, activation, size_out):
        with self._using("cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize", handle):
            mode = self._mode(mode)
            x_t = self._data("xDesc", x_desc)
            y_t = self._data("yDesc", y_desc, like=x_t)
            self._param("bnScaleBiasMeanVarDesc", p_desc, x_t, mode)
            data = {"xDesc": x_t, "yDesc": y_t}
            if ops == OPS_BN_ADD_ACTIVATION or z_desc:  # z is read with ADD only; a zDesc given must describe x
                data["zDesc"] = self._data("zDesc", z_desc, like=x_t)
            self._ex_conditions(mode, ops, data, activation)
            self._write_size(size_out, self.workspace_size)

    def _backward_ex_workspace(self, handle, mode, ops, x_desc, y_desc, dy_desc, dz_desc, dx_desc, p_desc, activation,
                               size_out):
        with self._using("cudnnGetBatchNormalizationBackwardExWorkspaceSize", handle):
            mode = self._mode(mode)
            if not y_desc:
                raise _Refused(_BAD_PARAM, "yDesc is NULL; PyTorch and CuPy 13 pass the data descriptor there")
            x_t = self._data("xDesc", x_desc)
            self._data("yDesc", y_desc, like=x_t)
            dy_t = self._data("dyDesc", dy_desc, like=x_t)
            dx_t = self._data("dxDesc", dx_desc, like=x_t)
            self._param("dBnScaleBiasDesc", p_desc, x_t, mode)
            data = {"xDesc": x_t, "dyDesc": dy_t, "dxDesc": dx_t}
            if ops == OPS_BN_ADD_ACTIVATION:
                data["dzDesc"] = self._data("dzDesc", dz_desc, like=x_t)
            self._ex_conditions(mode, ops, data, activation)
            self._write_size(size_out, self.workspace_size)

    def _reserve_space_size(self, handle, mode, ops, activation, x_desc, size_out):
        with self._using("cudnnGetBatchNormalizationTrainingExReserveSpaceSize", handle):
            mode = self._mode(mode)
            x_t = self._data("xDesc", x_desc)
            self._ex_conditions(mode, ops, {"xDesc": x_t}, activation)
            self._write_size(size_out, self.reserve_bytes(ops, x_t))


def _activation_settings(descriptor: int) -> tuple[int, int]:
    """(cudnnActivationMode_t, cudnnNanPropagation_t reluNanOpt) of an activation descriptor, read
    by the real libcudnn (cudnnGetActivationDescriptor: a host call cudnn_bn never makes, so not in
    its prototype table)."""
    function = _GET_ACTIVATION.get("function")
    if function is None:
        function = ctypes.CDLL(_raw.library().path).cudnnGetActivationDescriptor
        function.restype = ctypes.c_int
        function.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                             ctypes.POINTER(ctypes.c_double))
        _GET_ACTIVATION["function"] = function
    mode, nan, coef = ctypes.c_int(), ctypes.c_int(), ctypes.c_double()
    _raw.check_status(
        "cudnnGetActivationDescriptor",
        function(descriptor, ctypes.byref(mode), ctypes.byref(nan), ctypes.byref(coef)),
    )
    return mode.value, nan.value


_GET_ACTIVATION: dict = {}


def _as_c(ctype, value):
    """The value the C function receives: what a C int, size_t or double holds; pointers as ints."""
    if value is None:
        return None
    if ctype is ctypes.c_int:
        return ctypes.c_int(value).value
    if ctype is ctypes.c_size_t:
        return ctypes.c_size_t(value).value
    if ctype is ctypes.c_double:
        return float(value)
    if ctype is ctypes.c_void_p:
        return value if isinstance(value, int) else ctypes.cast(value, ctypes.c_void_p).value
    return value  # POINTER(...) output arguments as passed


def _close_pooled_handles() -> None:
    """Destroy the handles cudnn_bn keeps (with whichever cudnnDestroy is installed now)."""
    from cudnn_bn._cudnn import handles

    close_all = getattr(handles, "close_all", None)
    if close_all is not None:
        close_all()
        return
    per_thread = getattr(getattr(handles, "_PER_THREAD", None), "handles", {})  # the per-thread layout of old
    for handle in per_thread.values():
        handle.close()
    per_thread.clear()


@contextlib.contextmanager
def simulated_gpu(monkeypatch=None, *, devices: int = 1, entries: dict | None = None):
    """Install the simulated GPU: the fake ``cupy`` in ``sys.modules`` and the simulator's entry
    points on the loaded libcudnn; yields the :class:`KernelSimulator`.

    ``monkeypatch``: pytest's fixture, whose teardown undoes the installation; None (outside
    pytest) makes and undoes its own. ``devices``: how many GPUs it has. ``entries``: C name ->
    callable replacing an entry point outright. On exit the queued work runs, cudnn_bn's pooled
    handles are destroyed, and a memory hazard seen meanwhile fails the block (``fail_on_hazard``).
    """
    own = monkeypatch is None
    if own:
        import pytest

        monkeypatch = pytest.MonkeyPatch()
    try:
        library = _raw.library()
        _DESCRIPTORS.install(library)
        _close_pooled_handles()  # handles of an earlier run go with the library that made them
        simulator = KernelSimulator(library)
        previous_devices = _CUDA.device_count
        _CUDA.device_count = int(devices)
        monkeypatch.setitem(sys.modules, "cupy", _CUDA.module)
        for name, entry in {**simulator.entries(), **(entries or {})}.items():
            monkeypatch.setattr(library, name, entry)
        _ACTIVE.append(simulator)
        _CUDA.hazard_sinks.append(simulator.hazards)
        try:
            yield simulator
        finally:
            try:
                _CUDA.synchronize_all()  # the work still queued runs on this simulator
                _close_pooled_handles()  # while the simulated cudnnDestroy is installed
            finally:
                _ACTIVE.remove(simulator)
                _CUDA.hazard_sinks.remove(simulator.hazards)
                _CUDA.device_count = previous_devices
        if simulator.hazards and simulator.fail_on_hazard:
            raise AssertionError(
                "simulated GPU: memory freed while queued kernels still used it:\n" + "\n".join(simulator.hazards)
            )
    finally:
        if own:
            monkeypatch.undo()
