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
import dataclasses
import functools
import hashlib
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
    "CallIdentity",
    "CollectiveBytes",
    "Exchange",
    "bind_arguments",
    "call_identity",
    "check_layer_name",
    "collective_bytes",
    "group_call",
    "header",
    "layer_identity",
    "layer_label",
    "note_skipped_call",
]

PROTOCOL_VERSION = 4  # changes whenever the header's layout or the meaning of its values does

# header columns (float64; every value an integer below 2**53 or the exact eps / momentum)
_VERSION, _SEQUENCE, _CALL, _STATUS, _ARGUMENT = range(5)
_COUNT, _FEATURES, _DTYPE_BYTES, _MODE, _CHANNEL_AXIS, _NDIM = range(5, 11)
_PARAM_DIMS = slice(11, 15)  # the parameter shape, padded with zeros (at most 4 dims)
_EPS, _MOMENTUM, _RUNNING, _ACTIVATION = range(15, 19)
_CALLER, _CALLER_ID = 19, 20  # the call's identity (CallIdentity: kind, value)
# layer forwards on this rank that made no group call since the communicator's previous group
# call: how many were training forwards of frozen layers (agreed: every rank freezes the same
# layers at the same step; eval forwards are not counted, ranks need not evaluate in step), and
# the first of any kind, with why (for the message of ranks out of step)
_FROZEN_SKIPS = 21
_SKIPPED_CALLER, _SKIPPED_ID, _SKIPPED_STATE = 22, 23, 24
HEADER_SIZE = 25  # values per rank

FORWARD, BACKWARD = 1, 2  # the call kinds, as _CALL holds them
_CALL_NAMES = {FORWARD: "forward_training", BACKWARD: "backward"}

# _STATUS: ready; refused its input (TypeError, ValueError); failed otherwise; interrupted
# (KeyboardInterrupt, SystemExit)
_READY, _REFUSED_TYPE, _REFUSED_VALUE, _FAILED, _INTERRUPTED = range(5)

# the arguments a refusal can name (its message starts with the name), as _ARGUMENT holds them (index + 1)
_ARGUMENTS = (
    "x", "dy", "gamma", "beta", "running_mean", "running_var", "saved", "residual", "mode", "eps", "momentum",
    "channel_axis", "num_batches_tracked", "arguments", "call_id",
)
_LEADING_NAME = re.compile(r"\s*([A-Za-z_]\w*)")


def header(layout: Layout, data_dtype, eps: float, *, momentum: float = 0.0, running: bool = False,
           activation: Activation | None = None) -> np.ndarray:
    """The header row of a rank whose input passed its checks (the exchange fills in the
    version, sequence number, call, identity and the layer forwards skipped before it)."""
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
# what each communicator object has seen: group calls, layers, skipped calls


@dataclasses.dataclass
class _GroupRecord:
    calls_made: int = 0  # group calls made on the communicator (the next call's sequence number)
    layers_made: int = 0  # unnamed SyncBatchNorm layers made on it
    names: dict = dataclasses.field(default_factory=dict)  # name digest -> name, of the named layers made on it
    # since the last group call: training forwards of frozen layers, and the first layer forward
    # of any kind without a group call, as (kind, value, state)
    frozen_skips: int = 0
    skipped: tuple | None = None


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RECORDS_STRONG: dict = {}  # id -> (communicator, record), for communicators that cannot be weakly keyed
_RECORDS_LOCK = threading.Lock()


def _record(group) -> _GroupRecord:
    """The record of ``group`` (held under _RECORDS_LOCK)."""
    try:
        record = _RECORDS.get(group)
        if record is None:
            record = _RECORDS[group] = _GroupRecord()
        return record
    except TypeError:  # unhashable, or no weak references
        return _RECORDS_STRONG.setdefault(id(group), (group, _GroupRecord()))[1]


def _start_call(group) -> tuple[int, int, tuple | None]:
    """This group call's sequence number (the calls made on ``group`` before it; this one is
    counted), and the frozen training forwards and the first layer forward that made no group
    call since the previous one (then forgotten)."""
    with _RECORDS_LOCK:
        record = _record(group)
        started = record.calls_made, record.frozen_skips, record.skipped
        record.calls_made, record.frozen_skips, record.skipped = record.calls_made + 1, 0, None
    return started


def _count_on_from(group, calls_made: int) -> None:
    """Every rank of a group found out of step sets its count to the same number (the highest
    count of the call), so that the next call is in step again wherever the counts differed
    because a communicator object was re-created on some ranks."""
    with _RECORDS_LOCK:
        _record(group).calls_made = calls_made


# ---------------------------------------------------------------------------------------------
# identities: which call of the program a group call is, the same on every rank

# CallIdentity.kind; 0 in a header: a call not identified (it failed before)
_FUNCTION_CALL, _NUMBERED_LAYER, _NAMED_LAYER = 1, 2, 3
_IDENTITY_LIMIT = 2**53  # identities travel as float64 header values, exact below this
# _SKIPPED_STATE: why a layer forward made no group call (bits)
_IN_EVAL, _FROZEN = 1, 2
_SKIPPED_STATES = {_IN_EVAL: "in eval mode", _FROZEN: "frozen", _IN_EVAL | _FROZEN: "frozen, in eval mode"}


class CallIdentity(NamedTuple):
    """Which call of the program a group call is, carried in its header so that two different
    calls that meet in one collective raise instead of being merged.

    kind: a functional call (value: its ``call_id``), a SyncBatchNorm without a name (value: its
    number among the unnamed layers made on its communicator, from 0) or one with a name (value:
    53 bits of the name's BLAKE2b digest, the same in every process)."""

    kind: int
    value: int


def call_identity(call_id) -> CallIdentity:
    """The identity of a functional group call; ``call_id`` checked (an int in [0, 2**53))."""
    if isinstance(call_id, (bool, np.bool_)) or not isinstance(call_id, (int, np.integer)):
        raise TypeError(f"call_id: expected an int, the same on every rank, got {call_id!r}")
    if not 0 <= call_id < _IDENTITY_LIMIT:
        raise ValueError(f"call_id: expected an int in [0, 2**53), got {call_id}")
    return CallIdentity(_FUNCTION_CALL, int(call_id))


def check_layer_name(name) -> str | None:
    """A layer's ``name``: None, or a non-empty str."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a str, the same on every rank, or None, got {name!r}")
    if name == "":
        raise ValueError("name: expected a non-empty str or None, got ''")
    return name


def _name_digest(name: str) -> int:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _IDENTITY_LIMIT


def layer_identity(group, name=None) -> CallIdentity:
    """The identity of a SyncBatchNorm made now on ``group``: its name's, or, without a name, the
    next number among the unnamed layers made on that communicator object (the same on every
    rank that builds the same layers in the same order)."""
    name = check_layer_name(name)
    with _RECORDS_LOCK:
        record = _record(group)
        if name is not None:
            identity = CallIdentity(_NAMED_LAYER, _name_digest(name))
            record.names[identity.value] = name
        else:
            identity = CallIdentity(_NUMBERED_LAYER, record.layers_made)
            record.layers_made += 1
    return identity


def note_skipped_call(group, identity: CallIdentity, *, in_eval: bool, frozen: bool) -> None:
    """A layer forward on ``group`` made no group call (eval mode, frozen). A training forward of
    a frozen layer is counted: the next group call's ranks must have skipped as many (a rank
    frozen alone would otherwise meet the others' call of that layer with its next step's). The
    first skipped forward since the previous group call is kept for the message."""
    state = (_IN_EVAL if in_eval else 0) | (_FROZEN if frozen else 0)
    with _RECORDS_LOCK:
        record = _record(group)
        if state == _FROZEN:  # a training forward (an eval forward of a frozen layer is an eval forward)
            record.frozen_skips += 1
        if record.skipped is None:
            record.skipped = (*identity, state)


def _layer_label(kind: int, value: int, names: dict) -> str:
    """How messages name a layer: 'SyncBatchNorm #2' (numbered from #1 in the order made), or
    "SyncBatchNorm 'layer1.bn'" (a name this rank knows, else its digest)."""
    if kind == _NUMBERED_LAYER:
        return f"SyncBatchNorm #{value + 1}"
    name = names.get(value)
    return f"SyncBatchNorm {name!r}" if name is not None else f"a SyncBatchNorm whose name hashes to {value:#x}"


def _call_label(kind: int, value: int, names: dict) -> str:
    """What follows a call's kind in messages: '' (the default call_id, or an unidentified
    call), ', call_id=3', ' of SyncBatchNorm #2'."""
    if kind == _FUNCTION_CALL:
        return f", call_id={value}" if value else ""
    if kind in (_NUMBERED_LAYER, _NAMED_LAYER):
        return f" of {_layer_label(kind, value, names)}"
    return ""


def _frozen_skips_label(row: np.ndarray) -> str:
    count = int(row[_FROZEN_SKIPS])
    return f", after {count} frozen layer forward{'s' if count > 1 else ''} without a group call" if count else ""


def layer_label(group, identity: CallIdentity) -> str:
    """How messages name the layer of ``identity``, made on ``group``."""
    with _RECORDS_LOCK:
        names = dict(_record(group).names)
    return _layer_label(*identity, names)


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

    ``call``: FORWARD or BACKWARD. ``identity``: which call of the program this is
    (:class:`CallIdentity`), known before the guard (a layer's) or set inside it (a functional
    call's ``call_id``, an argument); identities are compared among the ranks whose calls are
    ready. The constructor checks ``group`` (a rank without a valid
    communicator cannot take part, and raises at once). Use::

        exchange = Exchange(group, FORWARD, identity)
        with exchange.guard():
            ...checks and local work...
            exchange.offer(header_row, slot_values)
        agreement = exchange.agree()        # raises on every rank, or on none
        slots = exchange.gather(agreement)  # (world_size, 2 * features), host float64
    """

    def __init__(self, group, call: int, identity: CallIdentity | None = None):
        self.rank, self.world_size = group_position(group)
        self.group, self.call, self.identity = group, call, identity
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
        sequence, row[_FROZEN_SKIPS], skipped = _start_call(self.group)
        row[_VERSION], row[_SEQUENCE], row[_CALL] = PROTOCOL_VERSION, sequence, self.call
        if self.identity is not None:
            row[_CALLER], row[_CALLER_ID] = self.identity
        if skipped is not None:
            row[_SKIPPED_CALLER], row[_SKIPPED_ID], row[_SKIPPED_STATE] = skipped
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

    def _check_in_step(self, headers: np.ndarray, calls_made: int) -> None:
        """Every rank at the same group call: the same sequence number, kind and count of frozen
        layer forwards skipped before it, and the same identity on every rank whose call is ready
        (a rank that failed raises its reason, the others PeerFailedError, whichever calls they
        were)."""
        with _RECORDS_LOCK:
            names = dict(_record(self.group).names)
        positions = {(int(row[_SEQUENCE]), int(row[_CALL]), int(row[_FROZEN_SKIPS])) for row in headers}
        identities = {(int(row[_CALLER]), int(row[_CALLER_ID])) for row in headers if row[_STATUS] == _READY}
        if len(positions) == 1 and len(identities) <= 1:
            return
        steps = [f"group call #{int(row[_SEQUENCE]) + 1} ({_CALL_NAMES.get(int(row[_CALL]), 'unknown')}"
                 f"{_call_label(int(row[_CALLER]), int(row[_CALLER_ID]), names)}{_frozen_skips_label(row)})"
                 for row in headers]
        skipped: dict = {}  # what a rank skipped -> the ranks that did
        for r, row in enumerate(headers):
            if row[_SKIPPED_CALLER]:
                layer = _layer_label(int(row[_SKIPPED_CALLER]), int(row[_SKIPPED_ID]), names)
                skipped.setdefault(f"{layer} ({_SKIPPED_STATES[int(row[_SKIPPED_STATE])]})", []).append(r)
        hint = "".join(  # what every rank skipped alike (an eval pass of the whole group) explains nothing
            f"; before this call, the forward of {layer} made no group call on rank{'s' if len(ranks) > 1 else ''} "
            f"{ranks}" for layer, ranks in skipped.items() if len(ranks) < self.world_size)
        if hint:
            hint += " (a layer frozen or in eval mode on some ranks only puts the ranks out of step)"
        raise GroupMismatchError(
            self.rank,
            f"the ranks are out of step (each rank counts the group calls made on its communicator object): "
            f"{by_value(steps)}; every rank must make the same group calls in the same order; this call changed "
            f"nothing, and the next group call is #{calls_made + 1} on every rank{hint}",
        )

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
        self._check_in_step(headers, calls_made)
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
