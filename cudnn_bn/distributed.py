"""Batch normalization whose statistics span a group of processes or GPUs (synchronized batch norm).

Every rank holds one shard of the batch. The results on every rank equal single-process batch
norm over the concatenated batch: y, the saved statistics, the running statistics (unbiased with
the group's count), dx, dgamma and dbeta. See docs/distributed.md for the data flow and the bytes
each step sends.

Layers of this module, bottom up:
- errors (every one names the rank that raises it);
- the :class:`Communicator` protocol (one sum-allreduce of a 1-D float64 buffer) and its two
  implementations: :class:`LocalCommunicator` (ranks as threads of one process, with a timeout;
  for tests and machines without a GPU) and :class:`NcclCommunicator` (NCCL through
  ``cupyx.distributed``);
- the per-rank description sent with every collective, so that ranks which disagree (shapes,
  dtypes, settings) or fail get a typed error on every rank instead of a hang or wrong numbers;
- :func:`forward_training` and :func:`backward` (one collective each);
- :class:`SyncBatchNorm`, the layer.

numpy arrays run on the reference and cupy arrays on cuDNN, through the public cudnn_bn calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from . import _api
from ._core.layout import Layout, make_layout
from ._core.modes import Mode
from ._core.policy import TRAINING, choose_mode
from ._core.saved import SavedStats
from ._core.validate import array_kind, check_forward_training, param_dtype_for, resolve_backward_settings
from .layer import BatchNorm

__all__ = [
    "CollectiveTimeoutError",
    "Communicator",
    "DistributedError",
    "GroupMismatchError",
    "LocalCommunicator",
    "NcclCommunicator",
    "PeerFailedError",
    "SyncBatchNorm",
    "backward",
    "collective_bytes",
    "forward_training",
    "local_group",
    "nccl_group",
]

DEFAULT_LOCAL_TIMEOUT = 60.0  # seconds a LocalCommunicator waits for the other ranks


# ---------------------------------------------------------------------------------------------
# errors


class DistributedError(RuntimeError):
    """Base of the errors of a group call. ``rank``: the rank that raises it; ``detail``: what happened."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank}: {detail}")
        self.rank, self.detail = rank, detail

    def __reduce__(self):
        return type(self), (self.rank, self.detail)


class CollectiveTimeoutError(DistributedError, TimeoutError):
    """A collective did not complete in time (a rank never called it, or the group broke earlier)."""


class GroupMismatchError(DistributedError, ValueError):
    """The ranks called with inputs that do not belong to one batch: different dtypes, feature
    shapes, modes, eps, momentum, or buffer lengths."""


class PeerFailedError(DistributedError):
    """Another rank's call failed before the collective (that rank raised the reason); this call
    changed nothing."""


def _on_rank(rank: int, error: Exception) -> Exception:
    """A TypeError or ValueError from this rank's own checks, with the rank in its message."""
    if type(error) in (TypeError, ValueError):
        return type(error)(f"rank {rank}: {error}")
    return error


# ---------------------------------------------------------------------------------------------
# communicators


@runtime_checkable
class Communicator(Protocol):
    """What the group calls need from a communication library: one collective and two numbers.

    ``rank``: this member's index in ``[0, world_size)``. ``world_size``: the number of members.
    ``allreduce_sum(buffer)``: ``buffer`` is a 1-D float64 array (numpy or cupy, as the
    implementation supports); returns an array of the same kind and length holding the
    elementwise sum of every member's buffer, identical on every member. Every member calls it
    the same number of times in the same order.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def allreduce_sum(self, buffer): ...


def _check_buffer(buffer, rank: int) -> str:
    """The array kind of a 1-D float64 buffer; TypeError naming the rank otherwise."""
    kind = array_kind(buffer=buffer)
    if np.dtype(buffer.dtype) != np.float64 or buffer.ndim != 1:
        raise TypeError(f"rank {rank}: buffer: expected a 1-D float64 array, got a {buffer.ndim}-D {buffer.dtype} array")
    return kind


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def _host(array) -> np.ndarray:
    """A host float64 copy of a numpy or cupy array."""
    if array_kind(array=array) == "cupy":
        return np.asarray(array.get(), dtype=np.float64)
    return np.array(array, dtype=np.float64, copy=True)


def _array_module(kind: str):
    if kind == "numpy":
        return np
    import cupy  # reached only for cupy arrays, so cupy is importable

    return cupy


class _Rendezvous:
    """What the threads of one local group share: a barrier and two sets of deposit slots, used
    by alternate collectives (a rank can be at most one collective ahead of the slowest reader,
    since the next barrier holds it)."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size, self.timeout = world_size, timeout
        self.barrier = threading.Barrier(world_size)
        self.deposits = ([None] * world_size, [None] * world_size)
        self.calls = [0] * world_size  # collectives each rank has entered
        self.lock = threading.Lock()
        self.failure = None  # why the group stopped working, once it has


class LocalCommunicator:
    """One rank of an in-process group (ranks are threads); make them with :func:`local_group`.

    ``allreduce_sum`` takes numpy or cupy buffers; the sum is computed on the host, in rank
    order, so every rank gets bit-identical results. Every collective waits at most the group's
    timeout for the other ranks; after a timeout the group is unusable and every later call on
    any rank raises :class:`CollectiveTimeoutError` at once.
    """

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
        """Elementwise sum of every rank's 1-D float64 ``buffer``, as an array of its kind."""
        kind = _check_buffer(buffer, self._rank)
        shared = self._shared
        with shared.lock:
            if shared.failure is not None:
                raise CollectiveTimeoutError(self._rank, f"the group stopped working earlier: {shared.failure}")
            index = shared.calls[self._rank]
            shared.calls[self._rank] += 1
        deposits = shared.deposits[index % 2]
        deposits[self._rank] = _host(buffer)
        try:
            shared.barrier.wait(shared.timeout)
        except threading.BrokenBarrierError:
            with shared.lock:
                if shared.failure is None:
                    absent = [rank for rank, calls in enumerate(shared.calls) if calls <= index]
                    shared.failure = (
                        f"collective #{index + 1} timed out after {shared.timeout:g} s waiting for rank(s) {absent}"
                    )
                failure = shared.failure
            raise CollectiveTimeoutError(self._rank, failure) from None
        parts = list(deposits)
        lengths = [part.size for part in parts]
        if len(set(lengths)) > 1:
            raise GroupMismatchError(
                self._rank,
                f"allreduce buffers differ in length ({_by_value(lengths)}): every rank must pass parameters "
                "of the same size",
            )
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total if kind == "numpy" else _array_module(kind).asarray(total)

    def __repr__(self) -> str:
        return f"LocalCommunicator(rank={self._rank}, world_size={self.world_size}, timeout={self.timeout:g})"


def local_group(world_size: int, *, timeout: float = DEFAULT_LOCAL_TIMEOUT) -> list[LocalCommunicator]:
    """Communicators for ``world_size`` ranks that run as threads of this process.

    The thread of rank i passes the i-th communicator as ``group=``. ``timeout``: seconds each
    collective waits for the other ranks before raising :class:`CollectiveTimeoutError`.
    """
    world_size = _positive_int("world_size", world_size)
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout: expected a positive finite number of seconds, got {timeout}")
    rendezvous = _Rendezvous(world_size, float(timeout))
    return [LocalCommunicator(rendezvous, rank) for rank in range(world_size)]


class NcclCommunicator:
    """One rank of an NCCL group, over a ``cupyx.distributed`` process group (CuPy 14's
    ``NCCLBackend``, which also spans machines).

    Args:
        backend: what ``cupyx.distributed.init_process_group(world_size, rank)`` returned, on
            the device that is current now (NCCL binds a communicator to one device).
        world_size: the ``n_devices`` the process group was created with.

    ``allreduce_sum`` enqueues ``ncclAllReduce`` on the current CuPy stream and returns at once;
    reading the result (as the group calls do) waits for it. NCCL has no timeout: a rank that
    never calls hangs the others (see docs/distributed.md for what the group calls do about it).
    """

    def __init__(self, backend, world_size: int):
        import cupy

        rank = getattr(backend, "rank", None)
        if not callable(getattr(backend, "all_reduce", None)) or not isinstance(rank, (int, np.integer)):
            raise TypeError(
                f"backend: expected a cupyx.distributed backend (with .rank and .all_reduce), got {type(backend).__name__}"
            )
        world_size = _positive_int("world_size", world_size)
        recorded = getattr(backend, "_n_devices", world_size)  # CuPy 14 keeps n_devices privately
        if recorded != world_size:
            raise ValueError(f"world_size: the process group was created for {recorded} devices, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"backend: rank {rank} is outside [0, {world_size})")
        self._backend, self._rank, self._world_size = backend, int(rank), int(world_size)
        self._device_id = cupy.cuda.Device().id

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def allreduce_sum(self, buffer):
        """Sum of every rank's 1-D float64 cupy ``buffer`` (on this communicator's device)."""
        import cupy

        if _check_buffer(buffer, self._rank) != "cupy":
            raise TypeError(f"rank {self._rank}: buffer: expected a cupy array (NCCL reads device memory), got numpy")
        if buffer.device.id != self._device_id:
            raise ValueError(
                f"rank {self._rank}: buffer: expected an array on device {self._device_id} (the communicator's), "
                f"got one on device {buffer.device.id}"
            )
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


def _group_position(group) -> tuple[int, int]:
    """(rank, world_size) of a communicator, checked."""
    if not isinstance(group, Communicator):
        raise TypeError(
            "group: expected a communicator (an element of cudnn_bn.distributed.local_group(n), or an "
            f"NcclCommunicator), got {type(group).__name__}"
        )
    rank, world_size = group.rank, group.world_size
    if not (isinstance(world_size, (int, np.integer)) and world_size >= 1 and isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
        raise ValueError(f"group: expected 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return int(rank), int(world_size)


# ---------------------------------------------------------------------------------------------
# what each rank says about its shard (sent inside every collective)

_STATUS, _COUNT, _DTYPE_BYTES, _MODE, _CHANNEL_AXIS, _NDIM = range(6)
_PARAM_DIMS = slice(6, 10)  # the parameter shape, padded with zeros (at most 4 dims)
_EPS, _MOMENTUM, _RUNNING = 10, 11, 12
HEADER_SIZE = 13  # float64 values per rank; all are small integers or the exact eps/momentum

_OK, _REFUSED, _FAILED = 0, 1, 2  # status: checked and sent; refused its input; failed otherwise


def _header(layout: Layout, data_dtype, eps: float, momentum: float = 0.0, running: bool = False) -> np.ndarray:
    row = np.zeros(HEADER_SIZE)
    row[_COUNT] = layout.count
    row[_DTYPE_BYTES] = np.dtype(data_dtype).itemsize
    row[_MODE] = int(layout.mode)
    row[_CHANNEL_AXIS] = layout.public_channel_axis
    row[_NDIM] = layout.ndim
    row[_PARAM_DIMS][: len(layout.param_shape)] = layout.param_shape
    row[_EPS], row[_MOMENTUM], row[_RUNNING] = eps, momentum, float(running)
    return row


def _failure_header(error: Exception) -> np.ndarray:
    row = np.zeros(HEADER_SIZE)
    row[_STATUS] = _REFUSED if isinstance(error, (TypeError, ValueError)) else _FAILED
    return row


# (what the ranks must agree on, its columns, how to print one rank's value)
_AGREED_FIELDS = (
    ("the data dtype", slice(_DTYPE_BYTES, _DTYPE_BYTES + 1), lambda v: f"float{8 * int(v[0])}"),
    ("the mode", slice(_MODE, _MODE + 1), lambda v: Mode(int(v[0])).name),
    ("channel_axis", slice(_CHANNEL_AXIS, _CHANNEL_AXIS + 1), lambda v: str(int(v[0]))),
    ("the number of dims of x", slice(_NDIM, _NDIM + 1), lambda v: str(int(v[0]))),
    ("the parameter shape", _PARAM_DIMS, lambda v: str(tuple(int(d) for d in v if d))),
    ("eps", slice(_EPS, _EPS + 1), lambda v: repr(float(v[0]))),
    ("momentum", slice(_MOMENTUM, _MOMENTUM + 1), lambda v: repr(float(v[0]))),
    ("whether running statistics are given", slice(_RUNNING, _RUNNING + 1), lambda v: "yes" if v[0] else "no"),
)


def _by_value(values) -> str:
    """'a on ranks [0, 2]; b on ranks [1]' for a per-rank list of printable values."""
    ranks: dict = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    return "; ".join(f"{value} on rank{'s' if len(members) > 1 else ''} {members}" for value, members in ranks.items())


def _check_agreement(rank: int, headers: np.ndarray, own_error: Exception | None) -> int:
    """Raise the same error on every rank when any rank failed or the ranks disagree; else
    return the group's count of values per statistic. Every rank sees the same headers, so
    every rank decides the same way."""
    failed = [r for r in range(len(headers)) if headers[r, _STATUS] != _OK]
    if own_error is not None:
        ranked = _on_rank(rank, own_error)
        if ranked is own_error:
            raise own_error
        raise ranked from own_error
    if failed:
        raise PeerFailedError(
            rank, f"rank(s) {failed} failed before the collective (each raised its reason); nothing changed on any rank"
        )
    for name, columns, printable in _AGREED_FIELDS:
        values = [printable(row[columns]) for row in headers]
        if len(set(values)) > 1:
            raise GroupMismatchError(rank, f"the ranks disagree on {name}: {_by_value(values)}")
    counts = headers[:, _COUNT]
    total = int(counts.sum())
    if total < 2:
        raise ValueError(
            f"rank {rank}: x: training needs at least 2 values per statistic across the group (the variance is "
            f"undefined otherwise), got {total} (values per statistic: {_by_value([int(c) for c in counts])})"
        )
    return total


# ---------------------------------------------------------------------------------------------
# message sizes


class CollectiveBytes(NamedTuple):
    """Bytes of the one buffer each group call allreduces (per rank, before NCCL's own traffic)."""

    forward: int
    backward: int


def collective_bytes(world_size: int, features: int) -> CollectiveBytes:
    """Buffer sizes of :func:`forward_training` and :func:`backward` for ``features`` statistics
    (C in the spatial modes, the product of ``x.shape[1:]`` in PER_ACTIVATION).

    forward: one slot per rank of (header, mean, M2); backward: (sum dy, sum dy * x_hat) summed,
    plus one header slot per rank.
    """
    world_size, features = _positive_int("world_size", world_size), _positive_int("features", features)
    item = np.dtype(np.float64).itemsize
    forward = world_size * (HEADER_SIZE + 2 * features) * item
    backward = (2 * features + world_size * HEADER_SIZE) * item
    return CollectiveBytes(forward, backward)


# ---------------------------------------------------------------------------------------------
# the group calls


def _group_mode(mode, shape, channel_axis) -> Mode:
    """The mode a group call runs: "auto" by the package policy, and SPATIAL for
    SPATIAL_PERSISTENT (the same statistics; the persistent kernels are forward-training and
    backward kernels of a whole batch, which these calls do not run)."""
    mode, _ = choose_mode(mode, shape, channel_axis, TRAINING)
    return Mode.SPATIAL if mode is Mode.SPATIAL_PERSISTENT else mode


def _features_and_module(gamma):
    """The number of statistics (gamma.size) and the array module of the buffers. These size the
    collective, so they must be known even when the rest of the input is refused."""
    kind = array_kind(gamma=gamma)
    return int(gamma.size), _array_module(kind)


def _with_second_sample(array, xp, fill=None):
    """A batch-of-one array extended to a batch of two: the sample, then a copy of it (or
    ``fill``). A shard may hold one value per statistic, which the single-process checks and
    cuDNN's backward refuse; its double has the same dtype and parameter shape, and a second
    sample with dy = 0 adds nothing to sum(dy) or sum(dy * x_hat)."""
    doubled = xp.empty((2,) + tuple(array.shape[1:]), dtype=array.dtype)
    doubled[0:1] = array
    doubled[1:2] = array if fill is None else fill
    return doubled


def _local_moments(x, layout: Layout, xp):
    """Per-statistic mean and M2 = sum((x - mean)^2) of this shard, float64, parameter shape.

    Two passes over one float64 copy of x: exact for data with a large offset, where a
    sum-of-squares formula would cancel. (CuPy's own var subtracts a mean computed in x's dtype.)
    """
    wide = x.astype(xp.float64)
    mean = wide.mean(axis=layout.reduce_axes)
    wide -= mean.reshape(layout.broadcast_shape)
    wide *= wide
    return mean, wide.sum(axis=layout.reduce_axes)


def _merge(headers: np.ndarray, means: np.ndarray, m2s: np.ndarray, total: int):
    """Group mean and biased variance from per-rank (count, mean, M2), rows in rank order.

    Chan et al.'s pairwise update generalized to k parts: mean = sum(n_i mean_i) / N,
    M2 = sum(M2_i + n_i (mean_i - mean)^2). Each term is non-negative and the deviations
    mean_i - mean are small, so nothing cancels whatever the data's offset.
    """
    counts = headers[:, _COUNT][:, None]
    mean = (counts * means).sum(axis=0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(axis=0)
    return mean, m2 / total


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, group, mode="auto", momentum=0.1, eps=1e-5, channel_axis=1):
    """Batch-norm training forward over the batch that all ranks of ``group`` hold together.

    Arguments as :func:`cudnn_bn.forward_training` (this rank's shard ``x``; gamma, beta and the
    running statistics replicated on every rank), plus ``group``: this rank's
    :class:`Communicator`. Shards may differ in batch size, down to one sample; in SPATIAL mode
    they may also differ in spatial size. mode: "auto", SPATIAL or PER_ACTIVATION
    (SPATIAL_PERSISTENT runs as SPATIAL).

    Returns ``(y, saved)`` equal on this shard to single-process batch norm over the
    concatenation of all shards: ``saved`` holds the group's mean and inverse std (parameter
    shape and dtype, identical on every rank) and the running statistics are updated with the
    group's statistics, the variance unbiased with the group's count.

    One collective, of ``collective_bytes(world_size, features).forward`` bytes. Raises on every
    rank, with nothing changed, when any rank's input is refused or the ranks disagree.
    """
    rank, world_size = _group_position(group)
    features, xp = _features_and_module(gamma)
    slot = HEADER_SIZE + 2 * features
    buffer = xp.zeros(world_size * slot, dtype=xp.float64)
    own = buffer[rank * slot : (rank + 1) * slot]
    own_error = None
    try:
        array_kind(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
        run_mode = _group_mode(mode, x.shape, channel_axis)
        layout = make_layout(x.shape, channel_axis, run_mode)
        checked_x = x if layout.count >= 2 else _with_second_sample(x, xp)
        checked, momentum = check_forward_training(
            checked_x, gamma, beta, running_mean, running_var, mode=run_mode, momentum=momentum, eps=eps, channel_axis=channel_axis
        )
        mean, m2 = _local_moments(x, layout, xp)
        own[:HEADER_SIZE] = xp.asarray(_header(layout, checked.data_dtype, checked.eps, momentum, running_mean is not None))
        own[HEADER_SIZE : HEADER_SIZE + features] = mean.reshape(-1)
        own[HEADER_SIZE + features :] = m2.reshape(-1)
    except Exception as error:  # every rank must still enter the collective, or the others hang
        own_error = error
        own[...] = xp.asarray(np.concatenate([_failure_header(error), np.zeros(2 * features)]))
    gathered = _host(group.allreduce_sum(buffer)).reshape(world_size, slot)
    headers = gathered[:, :HEADER_SIZE]
    total = _check_agreement(rank, headers, own_error)
    mean, biased_var = _merge(headers, gathered[:, HEADER_SIZE : HEADER_SIZE + features], gathered[:, HEADER_SIZE + features :], total)

    param_shape, param_dtype = layout.param_shape, checked.param_dtype
    mean, biased_var = mean.reshape(param_shape), biased_var.reshape(param_shape)
    y = _api.forward_inference(
        x, gamma, beta, xp.asarray(mean), xp.asarray(biased_var), mode=run_mode, eps=checked.eps, channel_axis=channel_axis
    )
    if running_mean is not None:
        unbiased_var = biased_var * (total / (total - 1))
        for running, batch_stat in ((running_mean, mean), (running_var, unbiased_var)):
            updated = (1.0 - momentum) * running.astype(xp.float64) + momentum * xp.asarray(batch_stat)
            running[...] = updated.astype(running.dtype)
    saved = SavedStats(
        mean=xp.asarray(mean.astype(param_dtype)),
        inv_std=xp.asarray((1.0 / np.sqrt(biased_var + checked.eps)).astype(param_dtype)),
        mode=run_mode,
        eps=checked.eps,
        channel_axis=layout.public_channel_axis,
    )
    return y, saved


def _dx_elementwise(out_dtype):
    """dx from the group's sums, as one elementwise function of x, dy and parameter-shaped
    arrays broadcast against x (the backward formula of docs/math.md with the group's count)."""

    def dx(x, dy, gamma, mean, inv_std, sum_dy, sum_dy_x_hat, count):
        x_hat = (x - mean) * inv_std
        return ((gamma * inv_std) * (dy - (sum_dy + x_hat * sum_dy_x_hat) / count)).astype(out_dtype)

    return dx


@functools.lru_cache(maxsize=None)
def _fused_dx(cupy_module, out_dtype):
    """The elementwise dx compiled by ``cupy.fuse`` into one kernel (one per output dtype;
    CuPy caches the compiled kernel per input types)."""
    return cupy_module.fuse(kernel_name="cudnn_bn_group_dx")(_dx_elementwise(out_dtype))


def backward(x, dy, gamma, saved, *, group, mode=None, eps=None, channel_axis=None):
    """Gradients over the group's batch: ``(dx, dgamma, dbeta)``.

    Arguments as :func:`cudnn_bn.backward`, with ``saved`` required: the statistics that
    :func:`forward_training` returned for this step (the group's). ``group``: this rank's
    :class:`Communicator`.

    dx (this shard's, x's shape and dtype) and dgamma, dbeta (parameter shape and dtype,
    identical on every rank) equal single-process backward over the concatenated batch: dgamma
    and dbeta are sums over the whole group's batch, so a training loop that averages gradients
    over ranks must leave them out of that average (docs/distributed.md).

    One collective, of ``collective_bytes(world_size, features).backward`` bytes.
    """
    rank, world_size = _group_position(group)
    features, xp = _features_and_module(gamma)
    buffer = xp.zeros(2 * features + world_size * HEADER_SIZE, dtype=xp.float64)
    own_header = buffer[2 * features + rank * HEADER_SIZE : 2 * features + (rank + 1) * HEADER_SIZE]
    own_error = None
    try:
        array_kind(x=x, dy=dy, gamma=gamma)
        if saved is None:
            raise ValueError("saved: expected the SavedStats of this step's distributed forward_training, got None")
        run_mode, eps, channel_axis = resolve_backward_settings(x, saved, mode, eps, channel_axis)
        run_mode = Mode.SPATIAL if run_mode is Mode.SPATIAL_PERSISTENT else run_mode
        if run_mode is not saved.mode or saved.reserve_space is not None:
            saved = dataclasses.replace(saved, mode=run_mode, reserve_space=None)
        layout = make_layout(x.shape, channel_axis, run_mode)
        x_call, dy_call = x, dy
        if layout.count < 2 and tuple(dy.shape) == tuple(x.shape):
            x_call, dy_call = _with_second_sample(x, xp), _with_second_sample(dy, xp, fill=0)
        # cuDNN (or the reference) with the group's statistics: its dgamma and dbeta are this
        # shard's sum(dy * x_hat) and sum(dy); its dx uses the shard's count and is discarded
        _, local_dgamma, local_dbeta = _api.backward(x_call, dy_call, gamma, saved)
        buffer[:features] = local_dbeta.reshape(-1)
        buffer[features : 2 * features] = local_dgamma.reshape(-1)
        own_header[...] = xp.asarray(_header(layout, x.dtype, eps))
    except Exception as error:  # every rank must still enter the collective, or the others hang
        own_error = error
        buffer[: 2 * features] = 0.0
        own_header[...] = xp.asarray(_failure_header(error))
    reduced = _host(group.allreduce_sum(buffer))
    total = _check_agreement(rank, reduced[2 * features :].reshape(world_size, HEADER_SIZE), own_error)

    param_shape, param_dtype = layout.param_shape, param_dtype_for(x.dtype)
    sum_dy, sum_dy_x_hat = reduced[:features].reshape(param_shape), reduced[features : 2 * features].reshape(param_shape)
    if xp is np:
        compute_dtype, dx_function = np.float64, _dx_elementwise(np.dtype(x.dtype))
    else:
        compute_dtype, dx_function = param_dtype, _fused_dx(xp, np.dtype(x.dtype))

    def broadcast(array):
        return array.astype(compute_dtype).reshape(layout.broadcast_shape)

    device_sums = [xp.asarray(broadcast(s)) for s in (sum_dy, sum_dy_x_hat)]
    dx = dx_function(x, dy, broadcast(gamma), broadcast(saved.mean), broadcast(saved.inv_std), *device_sums, float(total))
    return dx, xp.asarray(sum_dy_x_hat.astype(param_dtype)), xp.asarray(sum_dy.astype(param_dtype))


# ---------------------------------------------------------------------------------------------
# the layer


class SyncBatchNorm(BatchNorm):
    """:class:`~cudnn_bn.BatchNorm` whose training-mode statistics and gradients span ``group``.

    Args:
        num_features, and every keyword of BatchNorm (mode, eps, momentum, affine,
        track_running_stats, channel_axis, dtype, xp).
        group: this rank's :class:`Communicator`; every rank builds its layer with the same
            settings and calls forward and backward in the same order.

    Training mode communicates (one collective in forward, one in backward). Eval mode does
    not: it normalizes with the running statistics, or with this rank's own batch when
    ``track_running_stats=False`` (as torch.nn.SyncBatchNorm does), so ranks need not evaluate
    in step. ``grad_gamma`` and ``grad_beta`` are the group's sums, identical on every rank.
    """

    def __init__(self, num_features, *, group, **options):
        _group_position(group)
        super().__init__(num_features, **options)
        self.group = group
        self._kept_is_group = False  # whether _kept came from a group forward

    def forward(self, x):
        """Normalize this rank's shard ``x`` (shapes and dtypes as BatchNorm.forward)."""
        if not self.training:
            self._kept_is_group = False
            return super().forward(x)
        self._check_input(x, TRAINING)
        counting = self.track_running_stats
        momentum = self._momentum_for_next_batch() if counting else 0.0
        y, saved = forward_training(
            x, self.gamma, self.beta, self.running_mean, self.running_var, group=self.group,
            mode=self.mode, momentum=momentum, eps=self.eps, channel_axis=self.channel_axis,
        )
        if counting:  # only a batch that ran is counted
            self.num_batches_tracked += 1
        self._kept, self._kept_is_group = (x, saved), True
        return y

    __call__ = forward

    def backward(self, dy):
        """dx for this rank's last forward input; sets ``grad_gamma`` and ``grad_beta`` (when affine)."""
        if self._kept is None or not self._kept_is_group:
            return super().backward(dy)
        x, saved = self._kept
        dx, dgamma, dbeta = backward(x, dy, self.gamma, saved, group=self.group)
        if self.affine:
            self.grad_gamma, self.grad_beta = dgamma, dbeta
        return dx

    def __repr__(self) -> str:
        return f"Sync{super().__repr__()[:-1]}, group={self.group!r})"
