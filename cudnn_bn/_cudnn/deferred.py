"""on_overflow="deferred": what a deferred SPATIAL_PERSISTENT call leaves behind, the polls that
read it without waiting, and :func:`check_overflow`, which reads all of it.

cuDNN keeps one runtime-error flag per handle, which a persistent kernel raises when it overflows.
A deferred call waits for nothing: right after its kernel it adds itself (operation, shape,
dtype, mode) to its handle's record of the stream it ran on (handles.DeferredCalls) and records
that stream's event behind itself. Handles are pooled and rebound to whichever stream borrows them
next, so one handle's record may span streams, while the flag stays the handle's. It is read

- by the next call that borrows the handle (:func:`poll`): a NONBLOCKING cudnnQueryRuntimeError,
  made only when some stream's event says its calls have finished. It answers
  RUNTIME_IN_PROGRESS while the bound stream is busy, and then nothing is read. A final answer
  settles the calls whose event had finished before it: an overflow is kept for check_overflow,
  naming every call still recorded on the handle (any of them may have raised the flag); success
  drops them. The calls still running stay recorded. A poll never raises.
- by :func:`check_overflow`: each handle with a record is claimed from its pool (waiting while
  another thread holds it), the events of streams other than the one its BLOCKING query waits for
  (the bound stream as the checking thread names it: another thread's per-thread default stream
  is another) are waited for, and that query reads the flag. Everything found since the last
  check is then raised once.

Saved statistics from outside this package, given to a deferred persistent backward, are checked
on the device: a device bool per call signature, folded on the stream that computed it (a fold on
another stream could read an array that CuPy's pool hands out again on its own stream), kept on
the handle and read by check_overflow only.
"""

from __future__ import annotations

import collections
import sys
import threading

from .errors import CudnnOverflowError, error_class_for
from .handles import DeferredCalls, forget_on_close, stream_identity
from .raw import ErrQueryMode, Status, status_name

__all__ = ["check_overflow", "forget", "poll", "record"]

_LOCK = threading.Lock()
_PENDING: set = set()  # the handles holding DeferredCalls or finite checks (kept alive while they do)
# what reads of the flag found, for the next check: (runtime status, device) -> Counter of the calls
# named, folded, so that it does not grow with the number of calls between checks
_FOUND: dict = {}
# (device, call, device bool, how many calls it covers): finite checks that a check took from their
# handles, read by its report (or the next check's, if it was interrupted)
_UNREAD_FINITE: list = []


def record(cupy, handle, call: tuple, finite=None) -> None:
    """Right after a deferred persistent kernel on ``handle`` (still bound to the stream it ran
    on): add ``call`` (operation, shape, dtype, mode) to the stream's record and move the
    stream's event behind it. ``finite``: for saved statistics from outside this package, the
    device bool saying they were finite, folded into the handle's checks of that stream."""
    identity, records = handle.bound_identity, handle.deferred
    calls = records.get(identity)
    if calls is None:
        calls = records[identity] = DeferredCalls(handle.stream, cupy.cuda.Event(disable_timing=True))
        with _LOCK:
            _PENDING.add(handle)
    calls.calls[call] += 1
    if finite is not None:
        checks = handle.finite_checks.setdefault(identity, {})
        earlier = checks.get(call)
        checks[call] = (finite, 1) if earlier is None else (cupy.logical_and(earlier[0], finite), earlier[1] + 1)
    calls.event.record(calls.stream)


def poll(handle) -> None:
    """Read ``handle``'s flag if that can be done without waiting (its holder calls this before
    rebinding it); only records what it finds."""
    finished = [identity for identity, calls in handle.deferred.items() if calls.event.done]
    if not finished:
        return  # no recorded call has finished: the flag could not tell anything yet
    status = handle.query_flag(ErrQueryMode.NONBLOCKING)
    if status != Status.RUNTIME_IN_PROGRESS:
        _settle(handle, status, finished)


def _settle(handle, status: int, finished) -> None:
    """The flag read ``status`` after the calls of the streams ``finished`` had all run: those are
    settled. A status other than success names every call recorded on the handle; those still
    running stay recorded without their names (their flag may come yet), so no call is named twice."""
    records = handle.deferred
    involved = collections.Counter()
    if status != Status.SUCCESS:
        for calls in records.values():
            involved.update(calls.calls)
            calls.calls.clear()
    for identity in finished:
        del records[identity]
    with _LOCK:
        if status != Status.SUCCESS:
            _FOUND.setdefault((status, handle.device_id), collections.Counter()).update(involved)
        if not records and not handle.finite_checks:
            _PENDING.discard(handle)


def check_overflow() -> None:
    """Read the overflow flag of every deferred SPATIAL_PERSISTENT call made since the last check,
    on every device and stream; raise what was found, once.

    Raises :class:`~cudnn_bn.CudnnOverflowError` naming the calls that may have overflowed (their
    operation, shape, dtype and mode: the flag is per cuDNN handle, and handles are shared by the
    calls of a device, so every call recorded on a flagged handle is named); another CudnnError
    for another kernel status; ValueError when saved statistics from outside this package, given
    to a deferred backward, were not finite. Returns None when nothing was found.

    Waits for the work of the recorded calls: one host synchronization per handle holding
    deferred calls, one more per other stream they ran on, and one per device whose saved
    statistics are to be read. Nothing recorded: no synchronization, and nothing is loaded.
    """
    with _LOCK:
        waiting = list(_PENDING)
    if waiting:
        cupy = sys.modules["cupy"]  # loaded: a deferred call recorded something through it
        for handle in waiting:
            _read(cupy, handle)
    _report(sys.modules.get("cupy"))


def _read(cupy, handle) -> None:
    """Read ``handle``'s flag (if its holder has not settled its calls meanwhile) and take its
    finite checks, whose streams have then finished."""
    pool = handle.pool
    pool.claim(handle)
    try:
        if handle.deferred:
            _wait_and_query(cupy, handle)
        taken, handle.finite_checks = handle.finite_checks, {}
        with _LOCK:
            _PENDING.discard(handle)
            _UNREAD_FINITE.extend(
                (handle.device_id, call, finite, count)
                for checks in taken.values() for call, (finite, count) in checks.items()
            )
    finally:
        pool.release(handle)


def _wait_and_query(cupy, handle) -> None:
    """Wait for every recorded call of the claimed ``handle``, read its flag and settle them all."""
    # the BLOCKING query waits for the bound stream as this thread names it: another thread's
    # per-thread default stream is another queue, waited for by its event like any other stream
    waited_by_query = stream_identity(handle.stream.ptr)
    with cupy.cuda.Device(handle.device_id):
        for identity, calls in handle.deferred.items():
            if identity != waited_by_query and not calls.event.done:
                calls.event.synchronize()
        status = handle.query_flag(ErrQueryMode.BLOCKING)
        _settle(handle, status, list(handle.deferred))


def _report(cupy) -> None:
    with _LOCK:
        found, unread = dict(_FOUND), list(_UNREAD_FINITE)
        _FOUND.clear()
        _UNREAD_FINITE.clear()
    not_finite = _not_finite(cupy, unread) if unread else None
    if not found and not not_finite:
        return
    overflowed, failed = None, []
    for (status, device_id), calls in found.items():
        if status == Status.RUNTIME_FP_OVERFLOW:
            overflowed = (overflowed or collections.Counter()) + calls
        else:
            failed.append((status, calls, device_id))
    parts = []
    if overflowed is not None:
        parts.append(
            f"SPATIAL_PERSISTENT overflowed in deferred calls since the last check; the calls that may have: "
            f"{_listed(overflowed)}. Their outputs hold NaN or Inf, and running statistics they updated cannot be "
            "restored: redo the step with mode='spatial' or on_overflow='fallback'"
        )
    for status, calls, device_id in failed:
        parts.append(f"a deferred kernel on device {device_id} reported {status_name(status)} ({_listed(calls)})")
    if not_finite:
        parts.append(
            "saved statistics given to deferred SPATIAL_PERSISTENT backward calls were not finite (NaN or Inf, which "
            f"that kernel does not take; their gradients are not valid) in some of: {_listed(not_finite)}"
        )
    detail = "; ".join(parts)
    if overflowed is not None:
        status = int(Status.RUNTIME_FP_OVERFLOW)
        raise CudnnOverflowError(status, status_name(status), "cudnn_bn.check_overflow", detail)
    if failed:
        status = failed[0][0]
        raise error_class_for(status)(status, status_name(status), "cudnn_bn.check_overflow", detail)
    raise ValueError(f"cudnn_bn.check_overflow: {detail}")


def _not_finite(cupy, unread: list) -> collections.Counter:
    """The calls (and how many of each were checked) whose saved statistics were not finite in some
    of them: one host read per device, then one per call only when something was found."""
    by_device = collections.defaultdict(list)
    for device_id, call, finite, count in unread:
        by_device[device_id].append((call, finite, count))
    found = collections.Counter()
    for device_id, checks in by_device.items():
        with cupy.cuda.Device(device_id):
            every = checks[0][1]
            for _, finite, _ in checks[1:]:
                every = cupy.logical_and(every, finite)
            if not bool(every):
                found.update({call: count for call, finite, count in checks if not bool(finite)})
    return found


def _listed(calls: collections.Counter) -> str:
    if not calls:  # a flag raised by calls that an earlier finding of this check or report named
        return "calls named before"
    return ", ".join(
        f"{count} x {operation} of {tuple(shape)} {dtype} in {mode}"
        for (operation, shape, dtype, mode), count in calls.items()
    )


def forget() -> None:
    """Drop every record and finding (the handles are being destroyed: handles.close_all
    calls this)."""
    with _LOCK:
        for handle in _PENDING:
            handle.deferred.clear()
            handle.finite_checks.clear()
        _PENDING.clear()
        _FOUND.clear()
        _UNREAD_FINITE.clear()


forget_on_close(forget)
