"""The group calls: :func:`forward_training` and :func:`backward` over the batch that all ranks
of a group hold together.

Each is one :class:`~cudnn_bn.distributed.protocol.Exchange`, split in two halves that the layer
also uses: ``prepare_*`` (inside the exchange's guard: every check and the local work) and
``finish_*`` (the two collectives, then the group's result). numpy arrays run on the reference
and cupy arrays on cuDNN, through the public cudnn_bn calls.

A rank's shard may be empty (a batch axis of 0, the last batch of an epoch): it takes part with
count 0, its moments and gradient sums are zeros (nothing to add), it gets an empty y and dx and
the group's statistics and parameter gradients like every rank, and it makes no native call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import numpy as np

from .. import _api, fused
from .._core.arrays import array_kind, kind_module
from .._core.fused_saved import (
    PATH_COMPOSED,
    PATH_REFERENCE,
    FusedSaved,
    check_residual,
)
from .._core.layout import Layout, make_layout, policy_shape
from .._core.modes import Activation, Mode, parse_activation
from .._core.policy import TRAINING, choose_mode
from .._core.saved import SavedStats
from .._core.validate import (
    check_backward,
    check_forward_training,
    check_gradient,
    param_dtype_for,
    resolve_backward_settings,
)
from .protocol import BACKWARD, FORWARD, Agreement, Exchange, call_identity, group_call, header

__all__ = [
    "backward", "finish_backward", "finish_forward", "forward_training", "is_empty_shard", "prepare_backward",
    "prepare_forward",
]


# ---------------------------------------------------------------------------------------------
# local pieces


def _group_mode(mode, shape, channel_axis) -> Mode:
    """The mode a group call runs: "auto" by the package policy, and SPATIAL for
    SPATIAL_PERSISTENT (the same statistics; the persistent kernels are forward-training and
    backward kernels of a whole batch, which these calls do not run)."""
    mode, _ = choose_mode(mode, policy_shape(shape), channel_axis, TRAINING)
    return Mode.SPATIAL if mode is Mode.SPATIAL_PERSISTENT else mode


def is_empty_shard(x) -> bool:
    """Whether x is an array whose batch axis has size 0 (anything else: False, and the checks
    say what is wrong with it)."""
    shape = getattr(x, "shape", None)
    return isinstance(shape, tuple) and len(shape) >= 1 and shape[0] == 0


def _check_parameters_match_x(layout: Layout, **parameters) -> None:
    """A parameter whose shape is not x's parameter shape on this rank, named as such (the
    package's checks would say only the expected shape)."""
    for name, array in parameters.items():
        if tuple(array.shape) != layout.param_shape:
            raise ValueError(
                f"{name}: does not match x on this rank: expected shape {layout.param_shape} for x of shape "
                f"{layout.shape} in mode {layout.mode.name}, got {tuple(array.shape)}"
            )


def _with_second_sample(array, xp, fill=None):
    """A batch of two with ``array``'s dtype and parameter shape, for the single-process checks
    and cuDNN's backward, which refuse fewer than 2 values per statistic. A batch of one is
    extended by a copy of its sample (or ``fill``): a second sample with dy = 0 adds nothing to
    sum(dy) or sum(dy * x_hat). An empty batch gives two samples of zeros, for the checks only."""
    if array.shape[0] == 0:
        return xp.zeros((2,) + tuple(array.shape[1:]), dtype=array.dtype)
    doubled = xp.empty((2,) + tuple(array.shape[1:]), dtype=array.dtype)
    doubled[0:1] = array
    doubled[1:2] = array if fill is None else fill
    return doubled


def _local_moments(x, layout: Layout, xp):
    """Per-statistic mean and M2 = sum((x - mean)^2) of this shard, float64, parameter shape.

    Two passes over one float64 copy of x: exact for data with a large offset, where a
    sum-of-squares formula would cancel. (CuPy's own var subtracts a mean computed in x's dtype.)
    An empty shard's are zeros (a mean of no values would be NaN, and 0 * NaN poisons the merge).
    """
    if layout.count == 0:
        return xp.zeros(layout.param_shape, xp.float64), xp.zeros(layout.param_shape, xp.float64)
    wide = x.astype(xp.float64)
    mean = wide.mean(axis=layout.reduce_axes)
    wide -= mean.reshape(layout.broadcast_shape)
    wide *= wide
    return mean, wide.sum(axis=layout.reduce_axes)


def _slot(first, second, xp):
    """One rank's payload slot: two parameter-shaped arrays, flattened, in one float64 array."""
    features = first.size
    slot = xp.empty(2 * features, dtype=xp.float64)
    slot[:features] = first.reshape(-1)
    slot[features:] = second.reshape(-1)
    return slot


def _merge(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray, total: int):
    """Group mean and biased variance from per-rank (count, mean, M2), rows in rank order.

    Chan et al.'s pairwise update generalized to k parts: mean = sum(n_i mean_i) / N,
    M2 = sum(M2_i + n_i (mean_i - mean)^2). Each term is non-negative and the deviations
    mean_i - mean are small, so nothing cancels whatever the data's offset. A rank with n_i = 0
    adds nothing.
    """
    counts = counts[:, None]
    mean = (counts * means).sum(axis=0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(axis=0)
    return mean, m2 / total


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


# ---------------------------------------------------------------------------------------------
# forward


class ForwardStep(NamedTuple):
    """What the guarded half of a forward hands to the collective half."""

    x: Any
    gamma: Any
    beta: Any
    running_mean: Any
    running_var: Any
    residual: Any
    activation: Activation | None
    layout: Layout
    data_dtype: np.dtype
    eps: float
    momentum: float
    xp: Any


def prepare_forward(exchange: Exchange, x, gamma, beta, running_mean=None, running_var=None, *, mode, momentum, eps,
                    channel_axis, residual=None, activation=None) -> ForwardStep:
    """The checks and local work of a forward, run inside ``exchange.guard()``: this shard's
    count, mean and M2 go into the exchange."""
    kind = array_kind(optional=("running_mean", "running_var", "residual"), x=x, gamma=gamma, beta=beta,
                      running_mean=running_mean, running_var=running_var, residual=residual)
    xp = kind_module(kind)
    run_mode = _group_mode(mode, x.shape, channel_axis)
    layout = make_layout(x.shape, channel_axis, run_mode, empty_batch=True)
    _check_parameters_match_x(layout, gamma=gamma, beta=beta)
    checked_x = x if layout.count >= 2 else _with_second_sample(x, xp)
    checked, momentum = check_forward_training(
        checked_x, gamma, beta, running_mean, running_var, mode=run_mode, momentum=momentum, eps=eps,
        channel_axis=channel_axis,
    )
    if activation is not None:
        activation = parse_activation(activation)
        check_residual(x, residual, running_mean, running_var)
    elif residual is not None:
        raise ValueError("residual: there is no activation, so there is no fused add; add the residual yourself")
    mean, m2 = _local_moments(x, layout, xp)
    running = running_mean is not None
    row = header(layout, checked.data_dtype, checked.eps, momentum=momentum, running=running, activation=activation)
    exchange.offer(row, _slot(mean, m2, xp))
    return ForwardStep(x, gamma, beta, running_mean, running_var, residual, activation, layout, checked.data_dtype,
                       checked.eps, momentum, xp)


def finish_forward(exchange: Exchange, step: ForwardStep | None):
    """The collectives of a forward and its result ``(y, saved)``; raises on every rank when
    any rank's preparation failed (``step`` is then None)."""
    agreement = exchange.agree()
    slots = exchange.gather(agreement)
    features = agreement.features
    mean, biased_var = _merge(agreement.counts, slots[:, :features], slots[:, features:], agreement.total)

    xp, layout = step.xp, step.layout
    param_shape, param_dtype = layout.param_shape, param_dtype_for(step.data_dtype)
    mean, biased_var = mean.reshape(param_shape), biased_var.reshape(param_shape)
    statistics = dict(mode=layout.mode, eps=step.eps, channel_axis=layout.public_channel_axis)
    group_statistics = (xp.asarray(mean), xp.asarray(biased_var))
    if layout.count == 0:  # an empty shard: nothing to normalize (and no native call for it)
        y = xp.empty(layout.shape, step.data_dtype)
    elif step.activation is None:
        y = _api.forward_inference(step.x, step.gamma, step.beta, *group_statistics, **statistics)
    else:
        y = fused.forward_inference(step.x, step.gamma, step.beta, *group_statistics, residual=step.residual,
                                    activation=step.activation, **statistics)
    if step.running_mean is not None:
        unbiased_var = biased_var * (agreement.total / (agreement.total - 1))
        for running, batch_stat in ((step.running_mean, mean), (step.running_var, unbiased_var)):
            updated = (1.0 - step.momentum) * running.astype(xp.float64) + step.momentum * xp.asarray(batch_stat)
            running[...] = updated.astype(running.dtype)
    saved = SavedStats(
        mean=xp.asarray(mean.astype(param_dtype)),
        inv_std=xp.asarray((1.0 / np.sqrt(biased_var + step.eps)).astype(param_dtype)),
        **statistics,
    )
    if step.activation is not None:  # fused.forward_inference ran the reference (numpy) or the composed path (cupy)
        path = PATH_REFERENCE if xp is np else PATH_COMPOSED
        saved = FusedSaved(saved, step.activation, step.residual is not None, path)
    return y, saved


@group_call(FORWARD, finish_forward)
def forward_training(exchange: Exchange, x, gamma, beta, running_mean=None, running_var=None, *, mode="auto",
                     momentum=0.1, eps=1e-5, channel_axis=1, call_id=0):
    """Batch-norm training forward over the batch that all ranks of ``group`` hold together.

    Arguments as :func:`cudnn_bn.forward_training` (this rank's shard ``x``; gamma, beta and the
    running statistics replicated on every rank), plus ``group``: this rank's
    :class:`Communicator`. Shards may differ in batch size, down to one sample; in SPATIAL mode
    they may also differ in spatial size. mode: "auto", SPATIAL or PER_ACTIVATION
    (SPATIAL_PERSISTENT runs as SPATIAL).

    A shard may be empty (``x.shape[0] == 0``): its rank takes part with count 0 and gets an empty
    y; a group whose every shard is empty is refused on every rank.

    Returns ``(y, saved)`` equal on this shard to single-process batch norm over the
    concatenation of all shards: ``saved`` holds the group's mean and inverse std (parameter
    shape and dtype, identical on every rank) and the running statistics are updated with the
    group's statistics, the variance unbiased with the group's count.

    Two collectives, of ``collective_bytes(world_size, features).forward`` bytes in all. Raises on
    every rank, with nothing changed, when any rank's input or arguments are refused, the ranks
    disagree or they are out of step.

    ``call_id``: an int in [0, 2**53) that names this call in the program, the same on every
    rank (default 0). The header carries it: ranks at different calls (one rank skipped a call)
    raise :class:`GroupMismatchError` instead of merging two calls' batches, also when the
    calls agree on everything else. Give different calls of one step different ids (a layer
    index, say); :class:`SyncBatchNorm` identifies its calls itself. (The body is the guarded
    preparation; :func:`group_call` makes the public call, whose ``group`` is keyword-only.)
    """
    exchange.identity = call_identity(call_id)
    return prepare_forward(exchange, x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps,
                           channel_axis=channel_axis)


# ---------------------------------------------------------------------------------------------
# backward


class BackwardStep(NamedTuple):
    """What the guarded half of a backward hands to the collective half."""

    x: Any
    dy: Any
    gamma: Any
    saved: SavedStats
    layout: Layout
    xp: Any


def prepare_backward(exchange: Exchange, x, dy, gamma, saved, *, mode=None, eps=None,
                     channel_axis=None) -> BackwardStep:
    """The checks and local work of a backward, run inside ``exchange.guard()``: this shard's
    sum(dy) and sum(dy * x_hat) go into the exchange."""
    xp = kind_module(array_kind(x=x, dy=dy, gamma=gamma))
    if saved is None:
        raise ValueError("saved: expected the SavedStats of this step's distributed forward_training, got None")
    empty = is_empty_shard(x)
    if empty:  # dy is checked against x itself, then both stand in as two samples of zeros
        check_gradient(x, dy, x.dtype)
    x_call, dy_call = (_with_second_sample(x, xp), _with_second_sample(dy, xp)) if empty else (x, dy)
    run_mode, eps, channel_axis = resolve_backward_settings(x_call, saved, mode, eps, channel_axis)
    run_mode = Mode.SPATIAL if run_mode is Mode.SPATIAL_PERSISTENT else run_mode
    if run_mode is not saved.mode or saved.reserve_space is not None:
        saved = dataclasses.replace(saved, mode=run_mode, reserve_space=None)
    layout = make_layout(x.shape, channel_axis, run_mode, empty_batch=True)
    _check_parameters_match_x(layout, gamma=gamma)
    if empty:  # no values: the sums are zeros, after the checks a backward would run
        check_backward(x_call, dy_call, gamma, saved, mode=run_mode, eps=eps, channel_axis=channel_axis,
                       check_finite=False)
        local_dgamma = local_dbeta = xp.zeros(layout.param_shape, param_dtype_for(x.dtype))
    else:
        if layout.count < 2 and tuple(dy.shape) == tuple(x.shape):
            x_call, dy_call = _with_second_sample(x, xp), _with_second_sample(dy, xp, fill=0)
        # cuDNN (or the reference) with the group's statistics: its dgamma and dbeta are this
        # shard's sum(dy * x_hat) and sum(dy); its dx uses the shard's count and is discarded
        _, local_dgamma, local_dbeta = _api.backward(x_call, dy_call, gamma, saved)
    exchange.offer(header(layout, x.dtype, eps), _slot(local_dbeta, local_dgamma, xp))
    return BackwardStep(x, dy, gamma, saved, layout, xp)


def finish_backward(exchange: Exchange, step: BackwardStep | None):
    """The collectives of a backward and its result ``(dx, dgamma, dbeta)``; raises on every
    rank when any rank's preparation failed."""
    agreement: Agreement = exchange.agree()
    slots = exchange.gather(agreement)
    sums = slots[0].copy()
    for slot in slots[1:]:  # rank order, the same on every rank
        sums += slot

    xp, layout, features = step.xp, step.layout, agreement.features
    param_shape, param_dtype = layout.param_shape, param_dtype_for(step.x.dtype)
    sum_dy, sum_dy_x_hat = sums[:features].reshape(param_shape), sums[features:].reshape(param_shape)
    if xp is np:
        compute_dtype, dx_function = np.float64, _dx_elementwise(np.dtype(step.x.dtype))
    else:
        compute_dtype, dx_function = param_dtype, _fused_dx(xp, np.dtype(step.x.dtype))

    def broadcast(array):
        return array.astype(compute_dtype).reshape(layout.broadcast_shape)

    if layout.count == 0:  # an empty shard
        dx = xp.empty(layout.shape, step.x.dtype)
    else:
        device_sums = [xp.asarray(broadcast(s)) for s in (sum_dy, sum_dy_x_hat)]
        saved = step.saved
        parameters = (broadcast(step.gamma), broadcast(saved.mean), broadcast(saved.inv_std))
        dx = dx_function(step.x, step.dy, *parameters, *device_sums, float(agreement.total))
    return dx, xp.asarray(sum_dy_x_hat.astype(param_dtype)), xp.asarray(sum_dy.astype(param_dtype))


@group_call(BACKWARD, finish_backward)
def backward(exchange: Exchange, x, dy, gamma, saved, *, mode=None, eps=None, channel_axis=None, call_id=0):
    """Gradients over the group's batch: ``(dx, dgamma, dbeta)``.

    Arguments as :func:`cudnn_bn.backward`, with ``saved`` required: the statistics that
    :func:`forward_training` returned for this step (the group's). ``group``: this rank's
    :class:`Communicator`.

    dx (this shard's, x's shape and dtype; empty for an empty shard) and dgamma, dbeta (parameter
    shape and dtype, identical on every rank) equal single-process backward over the concatenated
    batch: dgamma and dbeta are sums over the whole group's batch, so a training loop that
    averages gradients over ranks must leave them out of that average (docs/distributed.md).

    Two collectives, of ``collective_bytes(world_size, features).backward`` bytes in all; the
    per-rank sums are added in rank order on every rank. ``call_id``: as in
    :func:`forward_training` (the forward's id is a natural choice).
    """
    exchange.identity = call_identity(call_id)
    return prepare_backward(exchange, x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
