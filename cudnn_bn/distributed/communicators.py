"""Communicators: the one collective the group calls need, over threads, NCCL or MPI.

- :class:`Communicator`, the protocol: ``rank``, ``world_size``, ``allreduce_sum(buffer)``;
- :class:`LocalCommunicator` (:func:`local_group`): ranks as threads of one process, each
  collective under a timeout; for tests and machines without a GPU;
- :class:`NcclCommunicator` (:func:`nccl_group`): NCCL through ``cupyx.distributed``, device
  buffers only, no timeout;
- :class:`MpiCommunicator` (:func:`mpi_group`): MPI through mpi4py (imported on first use), host
  buffers, or device buffers for a CUDA-aware MPI when asked.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from .._core.arrays import array_kind, host_array, kind_module
from .._core.scalars import positive_int
from .errors import (
    CollectiveTimeoutError,
    CommunicatorBusyError,
    DistributedError,
    GroupMismatchError,
    PeerFailedError,
)

__all__ = [
    "DEFAULT_LOCAL_TIMEOUT",
    "Communicator",
    "LocalCommunicator",
    "MpiCommunicator",
    "NcclCommunicator",
    "by_value",
    "group_position",
    "lengths_agreed",
    "local_group",
    "mpi_group",
    "nccl_group",
]

DEFAULT_LOCAL_TIMEOUT = 60.0  # seconds a LocalCommunicator waits for the other ranks
# Thread ranks in one local group, at most. Each rank is a thread of this process, and each of a
# group call's collectives gathers every rank's buffer of one slot per rank: memory grows with
# the square of the group's size (at 1024 ranks, 160 MB of headers per collective). Larger
# groups are processes (mpi_group, nccl_group).
MAX_LOCAL_WORLD_SIZE = 1024


@runtime_checkable
class Communicator(Protocol):
    """What the group calls need from a communication library: one collective and two numbers.

    ``rank``: this member's index in ``[0, world_size)``. ``world_size``: the number of members.
    ``allreduce_sum(buffer)``: ``buffer`` is a 1-D float64 array; returns an array of the same
    kind and length holding the elementwise sum of every member's buffer.

    The group calls guarantee what a collective library needs: every member calls it the same
    number of times, in the same order, with buffers of the same length. They send only slotted
    buffers (each element nonzero on at most one member), whose sum is exact in any order, so
    every member gets the same bits even from a library that does not promise it (MPI).

    Direct calls of ``allreduce_sum`` are collectives like the group calls' own: every member
    makes them at the same point of its sequence of collectives.

    Two optional attributes say which buffers ``allreduce_sum`` takes, and so which the group
    calls pass: ``device_buffers`` (default False), cupy arrays on the current device;
    ``host_buffers`` (default: not ``device_buffers``), numpy arrays. The group calls pass data
    in its own memory where the communicator takes it, else in the other: NCCL (device only)
    gets device buffers, a host engine numpy ones, a CUDA-aware MPI (both) the kind of the
    call's arrays, with the header, made on the host, as a numpy array.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def allreduce_sum(self, buffer): ...


def group_position(group) -> tuple[int, int]:
    """(rank, world_size) of a communicator, checked."""
    if not isinstance(group, Communicator):
        raise TypeError(
            "group: expected a communicator (an element of cudnn_bn.distributed.local_group(n), or what "
            f"nccl_group or mpi_group returned), got {type(group).__name__}"
        )
    rank, world_size = group.rank, group.world_size
    if not (isinstance(world_size, (int, np.integer)) and world_size >= 1
            and isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
        raise ValueError(f"group: expected 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return int(rank), int(world_size)


def check_buffer(buffer, rank: int) -> str:
    """The array kind of a 1-D float64 buffer; TypeError naming the rank otherwise."""
    kind = array_kind(buffer=buffer)
    if np.dtype(buffer.dtype) != np.float64 or buffer.ndim != 1:
        raise TypeError(
            f"rank {rank}: buffer: expected a 1-D float64 array, got a {buffer.ndim}-D {buffer.dtype} array"
        )
    return kind


_LENGTHS_AGREED = threading.local()


@contextlib.contextmanager
def lengths_agreed():
    """Within it, this thread's ``allreduce_sum`` calls on NCCL and MPI communicators skip their
    agreement of lengths: the caller guarantees that every rank passes buffers of one length.
    The group calls do (the header's length follows from the world size, the payload's is
    agreed by the headers); a thread-local switch rather than another method, so that a wrapper
    around a communicator on some ranks only cannot make the ranks disagree on the collectives."""
    before = getattr(_LENGTHS_AGREED, "on", False)
    _LENGTHS_AGREED.on = True
    try:
        yield
    finally:
        _LENGTHS_AGREED.on = before


def _lengths_differ(rank: int, lengths: list[int]) -> GroupMismatchError:
    return GroupMismatchError(
        rank,
        f"allreduce buffers differ in length ({by_value(lengths)}): every rank must pass buffers of the same length",
    )


def _peers_refused(rank: int, refused: list[int]) -> PeerFailedError:
    return PeerFailedError(
        rank, f"rank(s) {refused} refused the buffer they passed to allreduce_sum (each raised its reason); nothing "
        "was summed"
    )


def by_value(values) -> str:
    """'a on ranks [0, 2]; b on rank [1]' for a per-rank list of printable values."""
    ranks: dict = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    return "; ".join(f"{value} on rank{'s' if len(members) > 1 else ''} {members}" for value, members in ranks.items())


def _refuse_copy(communicator, protocol=None):
    """What pickling or copying a communicator raises: it is this process's connection to the
    other ranks, which no copy can share or carry elsewhere (a copy's close, say, would free what
    the original still uses)."""
    raise TypeError(
        f"{type(communicator).__name__} cannot be pickled or copied: it is this process's connection to the other "
        f"ranks ({communicator!r}). Pass the communicator itself; each process (or thread rank) makes its own"
    )


# ---------------------------------------------------------------------------------------------
# ranks as threads


class _Rendezvous:
    """What the threads of one local group share: a barrier and two sets of deposit slots, used
    by alternate collectives (a rank can be at most one collective ahead of the slowest reader,
    since the next barrier holds it)."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size, self.timeout = world_size, timeout
        self.barrier = threading.Barrier(world_size)
        self.deposits = ([None] * world_size, [None] * world_size)
        self.calls = [0] * world_size  # collectives each rank has entered
        self.inside = [False] * world_size  # whether a thread is in a collective as that rank
        self.lock = threading.Lock()
        self.failure = None  # (error class, why the group stopped working), once it has

    def stop(self, error_class, reason: str) -> None:
        """Break the group for good: every waiting and later collective raises ``error_class``."""
        with self.lock:
            if self.failure is None:
                self.failure = (error_class, reason)
        self.barrier.abort()


class LocalCommunicator:
    """One rank of an in-process group (ranks are threads); make them with :func:`local_group`.

    ``allreduce_sum`` takes numpy or cupy buffers; the sum is computed on the host, in rank
    order, so every rank gets bit-identical results, and buffers of different lengths raise
    :class:`GroupMismatchError` on every rank. Every collective waits at most the group's
    timeout for the other ranks; after a timeout the group is unusable and every later call on
    any rank raises :class:`CollectiveTimeoutError` at once. A communicator entered by two
    threads at once raises :class:`CommunicatorBusyError` and stops the group the same way.
    """

    device_buffers = False

    def __init__(self, rendezvous: _Rendezvous, rank: int):
        self._shared, self._rank = rendezvous, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._shared.world_size

    @property
    def timeout(self) -> float:
        """Seconds each collective waits for the other ranks."""
        return self._shared.timeout

    def allreduce_sum(self, buffer):
        """Elementwise sum of every rank's 1-D float64 ``buffer``, as an array of its kind. A
        buffer refused on one rank (its TypeError there) makes the others raise
        :class:`PeerFailedError`, at once."""
        try:
            kind, refusal = check_buffer(buffer, self._rank), None
        except TypeError as error:
            kind, refusal = None, error
        shared = self._shared
        index = self._enter()
        try:
            deposits = shared.deposits[index % 2]
            deposits[self._rank] = refusal if refusal is not None else host_array(buffer, np.float64)
            try:
                shared.barrier.wait(shared.timeout)
            except threading.BrokenBarrierError:
                absent = [rank for rank, calls in enumerate(shared.calls) if calls <= index]
                shared.stop(
                    CollectiveTimeoutError,
                    f"collective #{index + 1} timed out after {shared.timeout:g} s waiting for rank(s) {absent}",
                )
                error_class, reason = shared.failure
                raise error_class(self._rank, reason) from None
            parts = list(deposits)
        finally:
            with shared.lock:
                shared.inside[self._rank] = False
        if refusal is not None:
            raise refusal
        refused = [rank for rank, part in enumerate(parts) if isinstance(part, BaseException)]
        if refused:
            raise _peers_refused(self._rank, refused)
        lengths = [part.size for part in parts]
        if len(set(lengths)) > 1:
            raise _lengths_differ(self._rank, lengths)
        total = parts[0].copy()
        for part in parts[1:]:  # rank order: the same bits on every rank
            total += part
        return total if kind == "numpy" else kind_module(kind).asarray(total)

    def _enter(self) -> int:
        """Mark this rank as inside a collective; return the collective's index."""
        shared = self._shared
        with shared.lock:
            if shared.failure is not None:
                error_class, reason = shared.failure
                raise error_class(self._rank, f"the group stopped working earlier: {reason}")
            if not shared.inside[self._rank]:
                shared.inside[self._rank] = True
                index = shared.calls[self._rank]
                shared.calls[self._rank] += 1
                return index
        reason = (
            f"the communicator of rank {self._rank} was entered by a second thread during a collective; each thread "
            "(rank) needs its own element of local_group(n)"
        )
        shared.stop(CommunicatorBusyError, reason)
        raise CommunicatorBusyError(self._rank, reason)

    def __repr__(self) -> str:
        return f"LocalCommunicator(rank={self._rank}, world_size={self.world_size}, timeout={self.timeout:g})"

    __reduce_ex__ = _refuse_copy  # pickle, copy and deepcopy all come here


def _printable_number(number) -> str:
    """A refused timeout or world size as it was given: every digit of a float (so that a value
    just over a limit does not print as the limit), the size of an int too long to print."""
    if isinstance(number, (int, np.integer)):
        number = int(number)
        return repr(number) if number.bit_length() <= 64 else f"an int of {number.bit_length()} bits"
    return repr(float(number))


def local_group(world_size: int, *, timeout: float = DEFAULT_LOCAL_TIMEOUT) -> list[LocalCommunicator]:
    """Communicators for ``world_size`` ranks that run as threads of this process.

    The thread of rank i passes the i-th communicator as ``group=``; at most
    ``MAX_LOCAL_WORLD_SIZE`` (1024) ranks. ``timeout``: seconds each
    collective waits for the other ranks before raising :class:`CollectiveTimeoutError`; at most
    ``threading.TIMEOUT_MAX`` (about 292 years), the longest wait Python's threads allow.
    """
    world_size = positive_int("world_size", world_size)
    if world_size > MAX_LOCAL_WORLD_SIZE:
        raise ValueError(
            f"world_size: expected at most {MAX_LOCAL_WORLD_SIZE} thread ranks (each is a thread of this process, and "
            f"each collective holds a slot per rank from every rank), got {_printable_number(world_size)}; a larger "
            "group runs as processes: mpi_group or nccl_group"
        )
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    try:
        usable = math.isfinite(timeout) and 0 < timeout <= threading.TIMEOUT_MAX
    except OverflowError:  # an int too large for a float
        usable = False
    if not usable:
        raise ValueError(
            f"timeout: expected a positive finite number of seconds, at most threading.TIMEOUT_MAX "
            f"({threading.TIMEOUT_MAX!r}), got {_printable_number(timeout)}"
        )
    rendezvous = _Rendezvous(world_size, float(timeout))
    return [LocalCommunicator(rendezvous, rank) for rank in range(world_size)]


# ---------------------------------------------------------------------------------------------
# processes: NCCL and MPI


class _ProcessMember:
    """A communicator of one process, whose rank and world size are fixed when it is made, over
    an engine that neither checks lengths nor times out (NCCL, MPI).

    Its ``allreduce_sum`` agrees the lengths first: a collective of one value per rank, the same
    on every rank whatever it was given, gathers every rank's buffer length (or that it refused
    its buffer), so that a mismatch raises on every rank before the engine sees a buffer. The
    engines' own reactions are worse: MPICH aborts the whole job ("Message truncated"), after
    another rank may have returned a wrong sum; NCCL reads past the shorter buffer or hangs. The
    group calls skip that collective (:func:`lengths_agreed`).
    """

    _rank: int
    _world_size: int

    __reduce_ex__ = _refuse_copy  # pickle, copy and deepcopy all come here

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def allreduce_sum(self, buffer):
        """Elementwise sum of every rank's 1-D float64 ``buffer``, after a collective that agrees
        the lengths: buffers of different lengths raise :class:`GroupMismatchError` on every
        rank, a buffer refused on one rank its TypeError or ValueError there and
        :class:`PeerFailedError` on the others."""
        if getattr(_LENGTHS_AGREED, "on", False):
            return self._allreduce_sum(buffer)
        try:
            self._check_buffer(buffer)
            length, refusal = buffer.size, None
        except (TypeError, ValueError) as error:
            length, refusal = -1, error
        slots = np.zeros(self._world_size)
        slots[self._rank] = length
        lengths = [int(n) for n in host_array(self._allreduce_sum(self._engine_buffer(slots)), np.float64)]
        if refusal is not None:
            raise refusal
        refused = [rank for rank, n in enumerate(lengths) if n < 0]
        if refused:
            raise _peers_refused(self._rank, refused)
        if len(set(lengths)) > 1:
            raise _lengths_differ(self._rank, lengths)
        return self._allreduce_sum(buffer)

    def _allreduce_sum(self, buffer):
        """The engine's sum, lengths taken as agreed."""
        raise NotImplementedError

    def _check_buffer(self, buffer) -> None:
        """TypeError or ValueError, naming the rank, for a buffer this engine cannot sum."""
        raise NotImplementedError

    def _engine_buffer(self, host_values: np.ndarray):
        """``host_values`` where the engine reads them."""
        raise NotImplementedError


class NcclCommunicator(_ProcessMember):
    """One rank of an NCCL group, over a ``cupyx.distributed`` process group (CuPy 14's
    ``NCCLBackend``, which also spans machines).

    Args:
        backend: what ``cupyx.distributed.init_process_group(world_size, rank)`` returned, on
            the device that is current now (NCCL binds a communicator to one device).
        world_size: the ``n_devices`` the process group was created with.

    In the group calls ``allreduce_sum`` enqueues ``ncclAllReduce`` on the current CuPy stream
    and returns at once; reading the result (as they do) waits for it. Called directly, it first
    agrees the lengths, in a small collective whose result it reads. NCCL has no timeout: a rank
    that never calls hangs the others (docs/distributed.md says what the group calls do so that
    none of their own refusals can cause that).
    """

    device_buffers = True

    def __init__(self, backend, world_size: int):
        import cupy

        rank = getattr(backend, "rank", None)
        if not callable(getattr(backend, "all_reduce", None)) or not isinstance(rank, (int, np.integer)):
            raise TypeError(
                "backend: expected a cupyx.distributed backend (with .rank and .all_reduce), got "
                f"{type(backend).__name__}"
            )
        world_size = positive_int("world_size", world_size)
        recorded = getattr(backend, "_n_devices", world_size)  # CuPy 14 keeps n_devices privately
        if recorded != world_size:
            raise ValueError(f"world_size: the process group was created for {recorded} devices, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"backend: rank {rank} is outside [0, {world_size})")
        self._backend, self._rank, self._world_size = backend, int(rank), int(world_size)
        self._device_id = cupy.cuda.Device().id

    def _check_buffer(self, buffer) -> None:
        if check_buffer(buffer, self._rank) != "cupy":
            raise TypeError(f"rank {self._rank}: buffer: expected a cupy array (NCCL reads device memory), got numpy")
        if buffer.device.id != self._device_id:
            raise ValueError(
                f"rank {self._rank}: buffer: expected an array on device {self._device_id} (the communicator's), "
                f"got one on device {buffer.device.id}"
            )

    def _engine_buffer(self, host_values: np.ndarray):
        import cupy

        return cupy.asarray(host_values)

    def _allreduce_sum(self, buffer):
        import cupy

        self._check_buffer(buffer)
        buffer = cupy.ascontiguousarray(buffer)
        total = cupy.empty(buffer.shape, dtype=buffer.dtype)
        self._backend.all_reduce(buffer, total, op="sum")
        return total

    def close(self) -> None:
        """Stop the process group's TCP store (held by rank 0)."""
        stop = getattr(self._backend, "stop", None)
        if stop is not None:
            stop()

    def __repr__(self) -> str:
        return f"NcclCommunicator(rank={self._rank}, world_size={self._world_size}, device={self._device_id})"


def nccl_group(world_size: int, rank: int, *, host: str | None = None, port: int | None = None) -> NcclCommunicator:
    """Join an NCCL group through ``cupyx.distributed.init_process_group`` and wrap it.

    Call it once in every process, after selecting the process's GPU
    (``cupy.cuda.Device(local_rank).use()``). Rank 0 serves the rendezvous on ``host:port``
    (default: ``CUPYX_DISTRIBUTED_HOST`` / ``CUPYX_DISTRIBUTED_PORT``, else 127.0.0.1:13333).
    """
    import cupyx.distributed

    backend = cupyx.distributed.init_process_group(world_size, rank, host=host, port=port)
    return NcclCommunicator(backend, world_size)


def _mpi():
    """mpi4py's MPI module (importing it initializes MPI); ImportError with the install hint."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            "cudnn_bn.distributed.mpi_group needs mpi4py and an MPI library: pip install 'cudnn_bn[mpi]' "
            f"(mpi4py and the mpich wheel), or build mpi4py against your system's MPI ({error})"
        ) from error
    return MPI


class MpiCommunicator(_ProcessMember):
    """One rank of an MPI group: a duplicate of an mpi4py intracommunicator, so that the group
    calls' collectives never pair with the program's own; make it with :func:`mpi_group`.

    Args:
        comm: an ``mpi4py.MPI.Intracomm`` (``MPI.COMM_WORLD``, or a split of it). Duplicating it
            is a collective: construct the communicator on every rank of ``comm``, in the same
            order as its other collectives.
        cuda_aware: False (the default): cupy buffers are copied to the host, summed by
            ``MPI_Allreduce`` there, and copied back. True: cupy buffers go to MPI directly
            (after this thread's current stream has finished writing them), for an MPI built
            with CUDA support. The pip ``mpich`` wheel is not; this path has not yet run on a
            GPU. Either way numpy buffers go to MPI directly, and the group calls on numpy
            arrays touch no GPU.

    Every rank must pass a usable ``comm``: a rank whose ``comm`` is refused raises at once, and
    the others wait in the collective Dup (for the launcher's timeout). A ``cuda_aware`` refused
    on some ranks makes every rank raise, after the Dup, with nothing made.

    Each MpiCommunicator holds its duplicate until :meth:`close` (or the end of a ``with``
    block): MPI allows a limited number at once (MPICH about 2000), and when they run out the
    constructor raises :class:`DistributedError` saying so. They are not freed when garbage
    collected: ``MPI_Comm_free`` is collective, and garbage collection runs at different times on
    different ranks.

    MPI waits without a timeout and, for a rank that dies, the launcher ends the job
    (docs/distributed.md). An error that MPI returns from the collective is raised as
    :class:`DistributedError` naming the rank; MPICH treats some errors as fatal and aborts the
    whole job instead, such as buffers of different lengths, which ``allreduce_sum`` refuses before
    MPI sees them. :meth:`close` frees the duplicate.
    """

    def __init__(self, comm, *, cuda_aware: bool = False):
        MPI = _mpi()
        # A rank without a usable comm cannot join the collective Dup: it raises at once, and the
        # others wait in the Dup, as they would for a rank that never calls (documented).
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(
                f"comm: expected an mpi4py.MPI.Intracomm (such as MPI.COMM_WORLD), got {type(comm).__name__}"
            )
        if comm == MPI.COMM_NULL:
            raise ValueError("comm: expected a usable communicator, got MPI.COMM_NULL")
        rank = comm.Get_rank()
        # Any other argument is checked, then every rank joins the Dup whatever the outcome, and
        # the outcomes are agreed on the duplicate: a refusal on one rank raises on every rank.
        refusal = None
        if not isinstance(cuda_aware, (bool, np.bool_)):
            refusal = TypeError(f"rank {rank}: cuda_aware: expected True or False, got {cuda_aware!r}")
        try:
            duplicate = comm.Dup()
        except MPI.Exception as error:  # MPICH's context ids run out; it raises on every rank
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DistributedError(
                rank,
                f"MPI could not duplicate the communicator ({first_line}): each MpiCommunicator holds a duplicate "
                "until its close(), and MPI allows a limited number at once (MPICH about 2000); close() those you "
                "no longer use, or make one for the whole program",
            ) from error
        refused = [r for r, flag in enumerate(duplicate.allgather(refusal is not None)) if flag]
        if refused:
            duplicate.Free()  # on every rank, in the same order: freeing is collective
            if refusal is not None:
                raise refusal
            raise PeerFailedError(
                rank, f"rank(s) {refused} refused their arguments to mpi_group (each raised its reason); no "
                "communicator was made"
            )
        self._comm = duplicate
        self._rank, self._world_size = rank, duplicate.Get_size()
        self._cuda_aware = bool(cuda_aware)

    host_buffers = True  # numpy buffers go to MPI directly, whatever cuda_aware is

    @property
    def device_buffers(self) -> bool:
        """Whether cupy buffers go to MPI directly (``cuda_aware=True``) rather than through host memory."""
        return self._cuda_aware

    @property
    def comm(self):
        """The duplicated mpi4py communicator the collectives run on (None once closed)."""
        return self._comm

    def _check_buffer(self, buffer) -> None:
        check_buffer(buffer, self._rank)

    def _engine_buffer(self, host_values: np.ndarray):
        return host_values

    def _allreduce_sum(self, buffer):
        kind = check_buffer(buffer, self._rank)
        if kind == "numpy":
            send = np.ascontiguousarray(buffer)
            total = np.empty_like(send)
            self._allreduce(send, total)
            return total
        cupy = kind_module(kind)
        if not self._cuda_aware:  # staged through host memory
            send = buffer.get()
            total = np.empty_like(send)
            self._allreduce(send, total)
            return cupy.asarray(total)
        send = cupy.ascontiguousarray(buffer)
        total = cupy.empty(send.shape, dtype=send.dtype)
        cupy.cuda.get_current_stream().synchronize()  # MPI reads device memory outside CuPy's streams
        self._allreduce(send, total)
        return total

    def _allreduce(self, send, total) -> None:
        MPI = _mpi()
        if self._comm is None:
            raise DistributedError(self._rank, "the MPI communicator was closed")
        try:
            self._comm.Allreduce(send, total, op=MPI.SUM)
        except MPI.Exception as error:
            detail = f"MPI_Allreduce of {send.size} float64 values failed: {error}"
            raise DistributedError(self._rank, detail) from error

    def close(self) -> None:
        """Free the duplicated communicator (idempotent; a no-op after MPI has finalized)."""
        comm, self._comm = self._comm, None
        if comm is not None and not _mpi().Is_finalized():
            comm.Free()

    def __enter__(self) -> "MpiCommunicator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MpiCommunicator(rank={self._rank}, world_size={self._world_size}, cuda_aware={self._cuda_aware})"


def mpi_group(comm=None, *, cuda_aware: bool = False) -> MpiCommunicator:
    """This process's communicator in an MPI group: ``comm`` (default ``MPI.COMM_WORLD``),
    duplicated. Call it once on every rank; run the program with ``mpiexec -n <ranks>``.

    Needs mpi4py (``pip install 'cudnn_bn[mpi]'`` installs it with the mpich wheel); ImportError
    with that hint otherwise. ``cuda_aware``: see :class:`MpiCommunicator`.
    """
    MPI = _mpi()
    return MpiCommunicator(MPI.COMM_WORLD if comm is None else comm, cuda_aware=cuda_aware)
