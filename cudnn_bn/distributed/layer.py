""":class:`SyncBatchNorm`: the BatchNorm layer whose training statistics and gradients span a group."""

from __future__ import annotations

import inspect

from .. import reference
from .._core.arrays import array_kind, kind_module
from .._core.fused_saved import FusedSaved, check_residual
from .._core.layout import policy_shape
from .._core.policy import INFERENCE, TRAINING, choose_mode
from .._core.validate import check_gradient, param_dtype_for
from ..layer import BatchNorm, FixedStatistics, KeptForBackward
from .calls import finish_backward, finish_forward, is_empty_shard, prepare_backward, prepare_forward
from .communicators import group_position
from .protocol import (
    BACKWARD,
    FORWARD,
    Exchange,
    bind_arguments,
    check_layer_name,
    layer_identity,
    layer_label,
    note_skipped_call,
)

__all__ = ["SyncBatchNorm"]

# the parameters of BatchNorm's forward and backward, which the layer's take too; bound inside the
# guard in training mode, so that arguments that do not bind on one rank make every rank raise
_FORWARD, _BACKWARD = inspect.signature(BatchNorm.forward), inspect.signature(BatchNorm.backward)


def _bound(signature: inspect.Signature, method: str, layer, arguments: tuple, options: dict) -> tuple:
    """The method's arguments after ``self``, bound to ``signature``, defaults applied."""
    return bind_arguments(signature, f"SyncBatchNorm.{method}", (layer, *arguments), options).args[1:]


def _activation_gradient(kept: KeptForBackward, dy):
    """dy where the forward's activation passed its input, else 0: the gradient of the batch
    norm's output, and of the residual."""
    kind, y = array_kind(dy=dy, y=kept.y), kept.y
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy: expected the shape of the forward's output {tuple(y.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != y.dtype:
        raise TypeError(f"dy: expected the dtype of the forward's output {y.dtype}, got {dy.dtype}")
    xp = kind_module(kind)
    grad = xp.zeros_like(dy)
    xp.copyto(grad, dy, where=reference.activation_mask(y, kept.saved.activation))
    return grad


class SyncBatchNorm(BatchNorm):
    """:class:`~cudnn_bn.BatchNorm` whose training-mode statistics and gradients span ``group``.

    Args:
        num_features, and every keyword of BatchNorm (mode, eps, momentum, affine,
        track_running_stats, channel_axis, dtype, xp, activation, frozen).
        group: this rank's :class:`Communicator`; every rank builds its layer with the same
            settings and calls forward and backward in the same order.
        name: None, or a str that names this layer in its group calls, the same on every rank
            (a module path such as ``"layer1.0.bn1"``). Without a name, the layer is numbered
            among the unnamed SyncBatchNorm layers made on ``group`` (the communicator object),
            in the order they are made: the same on every rank that builds the same layers in
            the same order, as sync BN requires anyway.

    Every group call carries the layer's identity (its name, or its number) in its header, and
    the count of training forwards of frozen layers that made no group call before it: when one
    rank's call of this layer meets another layer's call on another rank (a layer frozen or in
    eval mode on one rank only makes no group call, so that rank's next layer comes early), or
    its own call of the next step (frozen on one rank for a step), or ranks built their layers in
    different orders, every rank raises :class:`GroupMismatchError` naming the layers, instead of
    merging two calls' batches. The identity is not part of :meth:`state_dict`; ``identity``
    reads it.

    Training mode communicates (two collectives in forward, two in backward); with an
    activation, forward returns ``act(BN(x) + residual)`` with the group's statistics and
    backward runs through the activation, as BatchNorm does. Every check of forward and backward
    runs before the collectives on every rank, so a refused input raises on every rank
    (:class:`PeerFailedError` on the others) and leaves every layer as it was. Eval mode does
    not communicate: it normalizes with the running statistics, or with this rank's own batch
    when ``track_running_stats=False`` (as torch.nn.SyncBatchNorm does), so ranks need not
    evaluate in step. A frozen layer (``frozen=True``, :meth:`freeze`) does not communicate
    either: in every mode it normalizes with its running statistics and backpropagates through
    them on this rank alone; every rank must freeze the same layers at the same step: a rank
    frozen alone makes every rank raise at its next group call, or, if it makes none, leaves the
    others waiting for it (docs/distributed.md). ``grad_gamma`` and ``grad_beta`` are
    the group's sums, identical on every rank, after a training step, and this rank's own after a
    step that did not communicate.

    A rank's shard may be empty (``x.shape[0] == 0``, the last batch of an epoch): it takes part
    in a training step with count 0 and gets an empty y and dx, the group's statistics and
    gradients; where the layer does not communicate it gets an empty y and dx and zero
    gradients. A group whose every shard is empty is refused on every rank.

    The layer cannot be pickled or copied (its group is a connection held by this process): save
    :meth:`state_dict` and load it into a layer made with a group.
    """

    def __init__(self, num_features, *, group, name=None, **options):
        group_position(group)
        check_layer_name(name)
        super().__init__(num_features, **options)
        self.group, self.name = group, name
        self._identity = layer_identity(group, name)  # once the layer is made: a refused one takes no number

    @property
    def identity(self) -> str:
        """How group calls and their errors name this layer: ``"SyncBatchNorm #2"`` (the second
        unnamed one made on its group) or ``"SyncBatchNorm 'layer1.0.bn1'"``."""
        return layer_label(self.group, self._identity)

    def forward(self, *arguments, **options):
        """Normalize this rank's shard ``x`` (shapes, dtypes and ``residual`` as BatchNorm.forward)."""
        if not self.training or self.frozen:  # no collective: this rank's own normalization
            x, residual = _bound(_FORWARD, "forward", self, arguments, options)
            y = self._forward_empty_shard(x, residual) if is_empty_shard(x) else super().forward(x, residual)
            # noted once it ran: a forward refused here (on this rank alone) is no skipped call
            note_skipped_call(self.group, self._identity, in_eval=not self.training, frozen=self.frozen)
            return y
        counting = self.track_running_stats
        exchange, step = Exchange(self.group, FORWARD, self._identity), None
        with exchange.guard():
            x, residual = _bound(_FORWARD, "forward", self, arguments, options)
            self._check_forward_arguments(x, residual, TRAINING, empty_batch=True)
            next_count = self._next_batch_count() if counting else None
            momentum = self._momentum_for(next_count) if counting else 0.0
            step = prepare_forward(
                exchange, x, self.gamma, self.beta, self.running_mean, self.running_var, mode=self.mode,
                momentum=momentum, eps=self.eps, channel_axis=self.channel_axis, residual=residual,
                activation=self.activation,
            )
        y, saved = finish_forward(exchange, step)
        if counting:  # only a batch that ran is counted
            self.num_batches_tracked = next_count
        self._kept = KeptForBackward(x, saved, None if self.activation is None else y, self.group)
        return y

    forward.__signature__ = _FORWARD
    __call__ = forward

    def backward(self, *arguments, **options):
        """dx for this rank's last forward input; sets ``grad_gamma`` and ``grad_beta`` (when
        affine) and, with an activation, ``grad_residual``."""
        kept = self._kept
        if (kept is None and (self.frozen or not self.training)) or (kept is not None and kept.group is None):
            # a forward that did not communicate (or none, where no forward would)
            (dy,) = _bound(_BACKWARD, "backward", self, arguments, options)
            if kept is not None and is_empty_shard(kept.x):
                return self._backward_empty_shard(dy)
            return super().backward(dy)
        group = self.group if kept is None else kept.group
        exchange, step, grad = Exchange(group, BACKWARD, self._identity), None, None
        with exchange.guard():
            (dy,) = _bound(_BACKWARD, "backward", self, arguments, options)
            if kept is None:
                raise RuntimeError(
                    "SyncBatchNorm.backward: needs the statistics of a forward() in training mode; call it first"
                )
            fused_forward = isinstance(kept.saved, FusedSaved)
            grad = _activation_gradient(kept, dy) if fused_forward else dy
            statistics = kept.saved.stats if fused_forward else kept.saved
            step = prepare_backward(exchange, kept.x, grad, self.gamma, statistics)
        dx, dgamma, dbeta = finish_backward(exchange, step)
        self._set_parameter_gradients(dgamma, dbeta)
        self.grad_residual = grad if isinstance(kept.saved, FusedSaved) and kept.saved.has_residual else None
        return dx

    backward.__signature__ = _BACKWARD

    def _forward_empty_shard(self, x, residual):
        """A forward that does not communicate, on a shard of no samples: an empty y, after the
        checks a forward of samples would pass."""
        operation = INFERENCE if self.track_running_stats else TRAINING
        self._check_forward_arguments(x, residual, operation, empty_batch=True)
        if self.activation is not None:
            check_residual(x, residual)
        y = self._xp.empty(x.shape, self.dtype)
        mode, _ = choose_mode(self.mode, policy_shape(x.shape), self.channel_axis, operation)
        fixed = FixedStatistics(self.running_mean, self.running_var, mode, self.eps, self.channel_axis,
                                self.activation, residual is not None)
        self._kept = KeptForBackward(x, fixed, None if self.activation is None else y)
        return y

    def _backward_empty_shard(self, dy):
        """The backward of :meth:`_forward_empty_shard`: an empty dx, zero parameter gradients."""
        kept = self._kept
        self._kind_of("dy", dy)
        check_gradient(kept.x, dy, self.dtype)
        dx = self._xp.empty(kept.x.shape, self.dtype)
        zeros = self._xp.zeros(self.param_shape, param_dtype_for(self.dtype))
        self._set_parameter_gradients(zeros, zeros.copy())
        self.grad_residual = self._xp.empty(kept.x.shape, self.dtype) if kept.saved.has_residual else None
        return dx

    def __reduce_ex__(self, protocol):
        # pickle, copy and deepcopy all come here; a communicator is a connection to the other
        # ranks, held by this process, that no copy can share or carry elsewhere
        raise TypeError(
            f"SyncBatchNorm cannot be pickled or copied: its group ({self.group!r}) is a connection to the other "
            "ranks that belongs to this process. Save layer.state_dict() instead, and load it with load_state_dict() "
            "into a SyncBatchNorm made with a group (this one, for a copy in this process)"
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_identity" not in self.__dict__:  # the state of a layer made before layers had an identity
            self.name, self._identity = None, layer_identity(self.group)

    def __repr__(self) -> str:
        named = "" if self.name is None else f", name={self.name!r}"
        return self._repr_with("SyncBatchNorm", f", group={self.group!r}{named}")
