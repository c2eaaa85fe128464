"""The protocol of a group call: two collectives whose sizes every rank knows in advance.

Each group call (forward or backward) is one :class:`Exchange`:

1. **Guarded preparation.** Everything that can refuse or fail (binding the arguments, their
   checks, the layer's input checks, the local statistics, the payload buffer) runs inside
   :meth:`Exchange.guard`, which keeps the exception, a KeyboardInterrupt included, instead of
   letting it leave the rank alone. Only ``group`` is bound before (:func:`group_call`).
2. **Header collective**, :meth:`Exchange.agree`: a slotted buffer of ``HEADER_SIZE`` values per
   rank, of the same length on every rank whatever its input. Each rank writes its protocol
   version, the call's sequence number on its communicator and its kind, whether it is ready,
   and what it holds (count, feature count, dtype, mode, layout, eps, momentum, ...). Every rank
   reads the same headers and decides the same way: all raise (a refused rank its own error,
   the others :class:`PeerFailedError`; :class:`GroupMismatchError` for ranks that disagree or
   are out of step), or all go on, having agreed the payload size.
3. **Payload collective**, :meth:`Exchange.gather`: one slot of ``2 * features`` values per rank.

Slotted buffers: each rank writes only its own slot and zeros elsewhere, so the sum-allreduce is
an all-gather whose sum is exact in any order (adding zeros), and every rank combines the slots
itself, in rank order: the results are bit-identical on every rank on any engine.

A rank's count may be 0 in the header: an empty shard, which adds nothing to the merge and the
gradient sums and still sends its (zero) slot, so that the sizes stay those every rank expects. A
group whose counts are all 0 is refused on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import threading
import weakref
from typing import NamedTuple

import numpy as np

from .._core.arrays import array_kind, host_array, kind_module
from .._core.layout import Layout
from .._core.modes import Activation, Mode
from .._core.scalars import positive_int
from .communicators import by_value, group_position, lengths_agreed
from .errors import GroupMismatchError, PeerFailedError, on_rank

__all__ = [
    "BACKWARD",
    "FORWARD",
    "HEADER_SIZE",
    "Agreement",
    "CollectiveBytes",
    "Exchange",
    "bind_arguments",
    "collective_bytes",
    "group_call",
    "header",
]

PROTOCOL_VERSION = 3  # changes whenever the header's layout or the meaning of its values does

# header columns (float64; every value a small integer or the exact eps / momentum)
_VERSION, _SEQUENCE, _CALL, _STATUS, _ARGUMENT = range(5)
_COUNT, _FEATURES, _DTYPE_BYTES, _MODE, _CHANNEL_AXIS, _NDIM = range(5, 11)
_PARAM_DIMS = slice(11, 15)  # the parameter shape, padded with zeros (at most 4 dims)
_EPS, _MOMENTUM, _RUNNING, _ACTIVATION = range(15, 19)
HEADER_SIZE = 19  # values per rank

FORWARD, BACKWARD = 1, 2  # the call kinds, as _CALL holds them
_CALL_NAMES = {FORWARD: "forward_training", BACKWARD: "backward"}

# _STATUS: ready; refused its input (TypeError, ValueError); failed otherwise; interrupted
# (KeyboardInterrupt, SystemExit)
_READY, _REFUSED_TYPE, _REFUSED_VALUE, _FAILED, _INTERRUPTED = range(5)

# the arguments a refusal can name (its message starts with the name), as _ARGUMENT holds them (index + 1)
_ARGUMENTS = (
    "x", "dy", "gamma", "beta", "running_mean", "running_var", "saved", "residual", "mode", "eps", "momentum",
    "channel_axis", "num_batches_tracked", "arguments",
)
_LEADING_NAME = re.compile(r"\s*([A-Za-z_]\w*)")


def header(layout: Layout, data_dtype, eps: float, *, momentum: float = 0.0, running: bool = False,
           activation: Activation | None = None) -> np.ndarray:
    """The header row of a rank whose input passed its checks (the exchange fills in the
    version, sequence number and call)."""
    row = np.zeros(HEADER_SIZE)
    row[_COUNT] = layout.count
    row[_FEATURES] = math.prod(layout.param_shape)
    row[_DTYPE_BYTES] = np.dtype(data_dtype).itemsize
    row[_MODE] = int(layout.mode)
    row[_CHANNEL_AXIS] = layout.public_channel_axis
    row[_NDIM] = layout.ndim
    row[_PARAM_DIMS][: len(layout.param_shape)] = layout.param_shape
    row[_EPS], row[_MOMENTUM], row[_RUNNING] = eps, momentum, float(running)
    row[_ACTIVATION] = 0 if activation is None else int(activation) + 1  # 0: none (cuDNN's modes start at 0)
    return row


def _failure_header(error: BaseException) -> np.ndarray:
    row = np.zeros(HEADER_SIZE)
    if not isinstance(error, Exception):
        row[_STATUS] = _INTERRUPTED
        return row
    row[_STATUS] = {TypeError: _REFUSED_TYPE, ValueError: _REFUSED_VALUE}.get(type(error), _FAILED)
    if row[_STATUS] != _FAILED:
        name = _LEADING_NAME.match(str(error))
        row[_ARGUMENT] = _ARGUMENTS.index(name.group(1)) + 1 if name and name.group(1) in _ARGUMENTS else 0
    return row


def _failure(row: np.ndarray) -> str:
    """What a failed rank's header says, e.g. 'its gamma was refused (ValueError)'."""
    status = int(row[_STATUS])
    if status == _FAILED:
        return "failed (an error other than a refused input)"
    if status == _INTERRUPTED:
        return "was interrupted (KeyboardInterrupt or SystemExit)"
    kind = "TypeError" if status == _REFUSED_TYPE else "ValueError"
    argument = int(row[_ARGUMENT])
    return f"refused its {_ARGUMENTS[argument - 1] if argument else 'input'} ({kind})"


# (what the ranks must agree on, its columns, how to print one rank's value)
_AGREED_FIELDS = (
    ("the data dtype", slice(_DTYPE_BYTES, _DTYPE_BYTES + 1), lambda v: f"float{8 * int(v[0])}"),
    ("the mode", slice(_MODE, _MODE + 1), lambda v: Mode(int(v[0])).name),
    ("channel_axis", slice(_CHANNEL_AXIS, _CHANNEL_AXIS + 1), lambda v: str(int(v[0]))),
    ("the number of dims of x", slice(_NDIM, _NDIM + 1), lambda v: str(int(v[0]))),
    ("the parameter shape", _PARAM_DIMS, lambda v: str(tuple(int(d) for d in v if d))),
    ("the number of statistics", slice(_FEATURES, _FEATURES + 1), lambda v: str(int(v[0]))),
    ("eps", slice(_EPS, _EPS + 1), lambda v: repr(float(v[0]))),
    ("momentum", slice(_MOMENTUM, _MOMENTUM + 1), lambda v: repr(float(v[0]))),
    ("whether running statistics are given", slice(_RUNNING, _RUNNING + 1), lambda v: "yes" if v[0] else "no"),
    ("the activation", slice(_ACTIVATION, _ACTIVATION + 1),
     lambda v: str(Activation(int(v[0]) - 1)) if v[0] else "none"),
)


# ---------------------------------------------------------------------------------------------
# sequence numbers: group calls made on each communicator

_CALLS_MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALLS_MADE_STRONG: dict = {}  # id -> [communicator, calls], for communicators that cannot be weakly keyed
_CALLS_LOCK = threading.Lock()


def _count_calls(group, update) -> int:
    """Set the count of group calls made on ``group`` to ``update(count)``; return the count before."""
    with _CALLS_LOCK:
        try:
            number = _CALLS_MADE.get(group, 0)
            _CALLS_MADE[group] = update(number)
        except TypeError:  # unhashable, or no weak references
            entry = _CALLS_MADE_STRONG.setdefault(id(group), [group, 0])
            number = entry[1]
            entry[1] = update(number)
    return number


def _next_sequence_number(group) -> int:
    """The number of group calls made on ``group`` before this one (this one is counted)."""
    return _count_calls(group, lambda number: number + 1)


def _count_on_from(group, calls_made: int) -> None:
    """Every rank of a group found out of step sets its count to the same number (the highest
    count of the call), so that the next call is in step again wherever the counts differed
    because a communicator object was re-created on some ranks."""
    _count_calls(group, lambda number: calls_made)


# ---------------------------------------------------------------------------------------------
# one group call


class Agreement(NamedTuple):
    """What the header collective settled: every rank's header row (rank order), the group's
    count of values per statistic, and the number of statistics (the payload slot is twice it)."""

    headers: np.ndarray
    total: int
    features: int

    @property
    def counts(self) -> np.ndarray:
        return self.headers[:, _COUNT]


class Exchange:
    """One group call on ``group``: guarded preparation, header collective, payload collective.

    ``call``: FORWARD or BACKWARD. The constructor checks ``group`` (a rank without a valid
    communicator cannot take part, and raises at once). Use::

        exchange = Exchange(group, FORWARD)
        with exchange.guard():
            ...checks and local work...
            exchange.offer(header_row, slot_values)
        agreement = exchange.agree()        # raises on every rank, or on none
        slots = exchange.gather(agreement)  # (world_size, 2 * features), host float64
    """

    def __init__(self, group, call: int):
        self.rank, self.world_size = group_position(group)
        self.group, self.call = group, call
        self._device_buffers = bool(getattr(group, "device_buffers", False))
        self._host_buffers = bool(getattr(group, "host_buffers", not self._device_buffers))
        self.error: BaseException | None = None
        self._header: np.ndarray | None = None
        self._payload = None  # this rank's payload buffer (its slot filled), once offered

    @contextlib.contextmanager
    def guard(self):
        """Run the rank's checks and local work; an exception is kept (not raised) so that the
        rank still enters the header collective, which raises it on every rank."""
        try:
            yield self
        # Every rank must still enter the header collective, or the others wait in it for ever
        # (NCCL, MPI). That holds for KeyboardInterrupt and SystemExit too (Ctrl-C, sys.exit() in
        # a signal handler): kept like any error and re-raised unchanged on this rank after the
        # header collective, so the interruption still happens, one small collective later, and
        # the peers raise PeerFailedError instead of waiting for a rank that has left.
        except BaseException as error:
            self.error = error

    def offer(self, header_row: np.ndarray, slot) -> None:
        """This rank's header and its payload slot (a 1-D float64 array, numpy or cupy, of
        2 * features values): the payload buffer is allocated and filled here, inside the guard."""
        xp = self._buffer_module(array_kind(slot=slot))
        slot = host_array(slot, np.float64) if xp is np else slot
        payload = xp.zeros(self.world_size * slot.size, dtype=np.float64)
        payload[self.rank * slot.size : (self.rank + 1) * slot.size] = xp.asarray(slot)
        self._header, self._payload = header_row, payload

    def _buffer_module(self, kind: str):
        """The array module of the buffer that carries data of ``kind`` ("numpy" or "cupy"): its
        own memory where the communicator takes it (``host_buffers``, ``device_buffers``), else
        the other one. A CUDA-aware MPI takes both: numpy data never touches a GPU there."""
        if kind == "cupy":
            return kind_module("cupy") if self._device_buffers else np
        return np if self._host_buffers else kind_module("cupy")

    def agree(self) -> Agreement:
        """The header collective. Raises on every rank when any rank failed, when the ranks are
        out of step or disagree, when every shard is empty, or when a forward's group holds fewer
        than 2 values per statistic."""
        if self.error is None and self._header is None:
            self.error = RuntimeError("the group call offered nothing before its header collective")
        row = self._header.copy() if self.error is None else _failure_header(self.error)
        row[_VERSION], row[_SEQUENCE], row[_CALL] = PROTOCOL_VERSION, _next_sequence_number(self.group), self.call
        buffer = np.zeros(self.world_size * HEADER_SIZE)
        buffer[self.rank * HEADER_SIZE : (self.rank + 1) * HEADER_SIZE] = row
        # made on the host
        gathered = host_array(self._allreduce(self._buffer_module("numpy").asarray(buffer)), np.float64)
        headers = gathered.reshape(self.world_size, HEADER_SIZE)
        self._check(headers)
        counts = headers[:, _COUNT]
        return Agreement(headers, int(counts.sum()), int(headers[0, _FEATURES]))

    def _allreduce(self, buffer):
        with lengths_agreed():  # the header's length follows from the world size, the payload's from the headers
            return self.group.allreduce_sum(buffer)

    def gather(self, agreement: Agreement) -> np.ndarray:
        """The payload collective: every rank's slot, as a host (world_size, 2 * features) array."""
        gathered = host_array(self._allreduce(self._payload), np.float64)
        return gathered.reshape(self.world_size, 2 * agreement.features)

    def _check(self, headers: np.ndarray) -> None:
        rank = self.rank
        versions = [int(v) for v in headers[:, _VERSION]]
        if len(set(versions)) > 1:
            raise GroupMismatchError(
                rank, f"the ranks speak different versions of the group protocol: {by_value(versions)}"
            )
        calls_made = int(headers[:, _SEQUENCE].max()) + 1
        if calls_made != int(headers[rank, _SEQUENCE]) + 1:  # on every rank, whatever else it raises
            _count_on_from(self.group, calls_made)
        if self.error is not None:
            ranked = on_rank(rank, self.error)
            if ranked is self.error:
                raise self.error
            raise ranked from self.error
        steps = [f"group call #{int(s) + 1} ({_CALL_NAMES.get(int(c), 'unknown')})"
                 for s, c in headers[:, [_SEQUENCE, _CALL]]]
        if len(set(steps)) > 1:
            raise GroupMismatchError(
                rank,
                f"the ranks are out of step (each rank counts the group calls made on its communicator object): "
                f"{by_value(steps)}; every rank must make the same group calls in the same order; this call changed "
                f"nothing, and the next group call is #{calls_made + 1} on every rank",
            )
        failed = [r for r in range(self.world_size) if headers[r, _STATUS] != _READY]
        if failed:
            reasons = "; ".join(f"rank {r} {_failure(headers[r])}" for r in failed)
            raise PeerFailedError(
                rank, f"{reasons} before the collective (each raised its reason); nothing changed on any rank"
            )
        for name, columns, printable in _AGREED_FIELDS:
            values = [printable(row[columns]) for row in headers]
            if len(set(values)) > 1:
                raise GroupMismatchError(rank, f"the ranks disagree on {name}: {by_value(values)}")
        counts = headers[:, _COUNT]
        if counts.sum() == 0:
            raise ValueError(
                f"rank {rank}: x: every rank's shard is empty, a total of 0 samples in the group (values per "
                f"statistic: {by_value([int(c) for c in counts])}); {_CALL_NAMES[self.call]} needs samples on at "
                f"least one rank"
            )
        if self.call == FORWARD and counts.sum() < 2:
            raise ValueError(
                f"rank {rank}: x: training needs at least 2 values per statistic across the group (the variance is "
                f"undefined otherwise), got {int(counts.sum())} (values per statistic: "
                f"{by_value([int(c) for c in counts])})"
            )


# ---------------------------------------------------------------------------------------------
# the public form of a group call: only ``group`` is bound before the guard


def bind_arguments(signature: inspect.Signature, name: str, arguments: tuple, options: dict) -> inspect.BoundArguments:
    """``arguments`` and ``options`` bound to ``signature``, defaults applied. Arguments that do
    not bind raise a TypeError naming ``arguments`` and the call ``name``; bound inside the
    guard, they make every rank raise like any other refusal."""
    try:
        bound = signature.bind(*arguments, **options)
    except TypeError as error:
        raise TypeError(f"arguments: {name}() {error}") from None
    bound.apply_defaults()
    return bound


def group_call(call: int, finish):
    """Decorate ``prepare(exchange, <parameters>)`` into the public group call
    ``(<parameters>, *, group, ...)``: it binds ``group`` (a rank without a communicator cannot
    take part, and raises at once), then, inside the exchange's guard, every other argument and
    ``prepare``; then ``finish(exchange, step)`` runs the collectives. ``inspect.signature`` and
    help() show ``prepare``'s parameters with ``group`` first among the keywords."""

    def decorate(prepare):
        parameters = list(inspect.signature(prepare).parameters.values())[1:]  # after the exchange
        bindable = inspect.Signature(parameters)
        keywords_start = next((i for i, p in enumerate(parameters) if p.kind is p.KEYWORD_ONLY), len(parameters))
        group = inspect.Parameter("group", inspect.Parameter.KEYWORD_ONLY)

        @functools.wraps(prepare)
        def group_function(*arguments, group, **options):
            exchange, step = Exchange(group, call), None
            with exchange.guard():
                bound = bind_arguments(bindable, prepare.__name__, arguments, options)
                step = prepare(exchange, *bound.args, **bound.kwargs)
            return finish(exchange, step)

        group_function.__signature__ = inspect.Signature(
            parameters[:keywords_start] + [group] + parameters[keywords_start:])
        return group_function

    return decorate


# ---------------------------------------------------------------------------------------------
# message sizes


class CollectiveBytes(NamedTuple):
    """Bytes of the buffers one group call allreduces, per rank: ``forward`` and ``backward`` are
    each a header collective of ``header`` bytes followed by a payload collective of the rest."""

    forward: int
    backward: int
    header: int


def collective_bytes(world_size: int, features: int) -> CollectiveBytes:
    """Buffer sizes of :func:`forward_training` and :func:`backward` for ``features`` statistics
    (C in the spatial modes, the product of ``x.shape[1:]`` in PER_ACTIVATION).

    Each call: one header slot per rank, then one payload slot of ``2 * features`` per rank
    (forward: mean and M2; backward: sum dy and sum dy * x_hat).
    """
    world_size, features = positive_int("world_size", world_size), positive_int("features", features)
    item = np.dtype(np.float64).itemsize
    header_bytes = world_size * HEADER_SIZE * item
    payload_bytes = world_size * 2 * features * item
    return CollectiveBytes(header_bytes + payload_bytes, header_bytes + payload_bytes, header_bytes)
