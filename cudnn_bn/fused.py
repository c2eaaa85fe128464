"""Fused batch norm + activation, and batch norm + residual add + activation.

``forward_training`` computes ``y = act(BN(x) + residual)`` (the residual is optional), which is
the tail of a ResNet block; ``backward`` returns ``(dx, dresidual, dgamma, dbeta)``. ``act`` is a
:class:`~cudnn_bn.Activation` (ReLU for now).

numpy arrays run the float64 reference in this module (``reference_forward_training`` etc.): the
plain reference's float64 arithmetic, the add and the activation also in float64, each result
rounded once to its dtype. cupy arrays run cuDNN (cudnn_bn/_cudnn/fused_ops.py): the fused Ex call
(bnOps BN_ACTIVATION or BN_ADD_ACTIVATION) where cuDNN's fast path applies, else the plain cuDNN
call followed by one elementwise kernel. ``saved.path`` says which ran; the math is in
docs/math.md ("Fused activation and residual add").

The ReLU gradient at a pre-activation of exactly 0 is 0: the mask is ``y > 0`` on the forward's
output, as cuDNN's fused backward (which is given y) and PyTorch's ReLU backward compute it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import reference
from ._api import accept_arrays
from ._core.arrays import array_kind
from ._core.fused_saved import (
    PATH_COMPOSED,
    PATH_FUSED_EX,
    PATH_REFERENCE,
    FusedSaved,
    check_forward_output,
    check_fused_saved,
    check_residual,
)
from ._core.modes import Activation, parse_activation
from ._core.policy import BACKWARD, INFERENCE, TRAINING, choose_mode
from ._core.saved import trusted_saved_stats
from ._core.validate import check_backward, check_forward_inference, check_forward_training, resolve_backward_settings

__all__ = [
    "FusedSaved",
    "PATH_COMPOSED",
    "PATH_FUSED_EX",
    "PATH_REFERENCE",
    "backward",
    "forward_inference",
    "forward_training",
    "reference_backward",
    "reference_forward_inference",
    "reference_forward_training",
]

_RUNNING = ("running_mean", "running_var")


# ---- the float64 reference ----
def _require_numpy(**named) -> None:
    if array_kind(optional=_RUNNING + ("residual",), **named) != "numpy":
        raise TypeError(
            "cudnn_bn.fused.reference_*: expected numpy arrays; use cudnn_bn.fused.forward_training etc. for "
            "cupy arrays"
        )


def _activate(pre: np.ndarray, activation: Activation) -> np.ndarray:
    """act(pre) in place on a float64 array. ReLU: fmax(pre, 0), so NaN gives 0 as in cuDNN's
    fused kernels (their activation descriptor does not propagate NaN)."""
    if activation is Activation.RELU:
        return np.fmax(pre, 0.0, out=pre)
    raise NotImplementedError(f"activation {activation}")  # parse_activation admits no other


def activation_mask(y, activation: Activation):
    """Where the activation passes the gradient, read from its output: ReLU's derivative is 1
    where y > 0 and 0 elsewhere, including a pre-activation of exactly 0 (docs/math.md). A
    boolean array of y's kind (numpy or cupy); the one definition of it on the host side, used by
    this reference and by the synchronized layer."""
    if activation is Activation.RELU:
        return y > 0
    raise NotImplementedError(f"activation {activation}")


def reference_forward_training(x, gamma, beta, running_mean=None, running_var=None, *, residual=None, activation="relu",
                               mode="spatial", momentum=0.1, eps=1e-5, channel_axis=1):
    """Fused forward training on numpy arrays: ``y = act(BN(x) + residual)``.

    Args: as :func:`cudnn_bn.reference.forward_training`, plus ``residual`` (None or an array of
    x's shape and dtype, not overlapping x) and ``activation`` ("relu" or an Activation).

    Returns ``(y, saved)``: y in x's dtype and shape, C-contiguous, computed in float64 and rounded
    once; saved a :class:`FusedSaved` (path PATH_REFERENCE). Running statistics as the plain call.
    The float64 work uses x-sized float64 temporaries.
    """
    _require_numpy(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, residual=residual)
    activation = parse_activation(activation)
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    check_residual(x, residual, running_mean, running_var)
    # the plain reference on x widened exactly: its float64 result before any rounding
    pre, stats64 = reference.forward_training(
        x.astype(np.float64), gamma, beta, running_mean, running_var, mode=checked.layout.mode, momentum=momentum,
        eps=checked.eps, channel_axis=channel_axis,
    )
    if residual is not None:
        np.add(pre, residual, out=pre)
    y = _activate(pre, activation).astype(checked.data_dtype, copy=False)
    stats = trusted_saved_stats(
        stats64.mean.astype(checked.param_dtype), stats64.inv_std.astype(checked.param_dtype), stats64.mode,
        stats64.eps, stats64.channel_axis,
    )
    return y, FusedSaved(stats, activation, residual is not None, PATH_REFERENCE)


def reference_forward_inference(x, gamma, beta, mean, var, *, residual=None, activation="relu", mode="spatial",
                                eps=1e-5, channel_axis=1):
    """Fused forward with fixed statistics on numpy arrays: ``act(BN(x) + residual)``, computed in
    float64 and rounded once to x's dtype (C-contiguous, x's shape)."""
    _require_numpy(x=x, gamma=gamma, beta=beta, mean=mean, var=var, residual=residual)
    activation = parse_activation(activation)
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    check_residual(x, residual)
    pre = reference.forward_inference(
        x.astype(np.float64), gamma, beta, mean, var, mode=checked.layout.mode, eps=checked.eps,
        channel_axis=channel_axis,
    )
    if residual is not None:
        np.add(pre, residual, out=pre)
    return _activate(pre, activation).astype(checked.data_dtype, copy=False)


def reference_backward(x, y, dy, gamma, saved, *, mode=None, eps=None, channel_axis=None):
    """Gradients of the fused forward on numpy arrays: ``(dx, dresidual, dgamma, dbeta)``.

    ``y`` is the forward's output; ``saved`` its :class:`FusedSaved`. The activation's gradient
    ``g = dy * act'(y)`` (for ReLU: dy where y > 0, else 0) is dresidual (None when the forward had
    no residual), and the batch-norm backward of g gives dx, dgamma, dbeta, all in float64 and
    rounded once: dx and dresidual in x's dtype (C-contiguous), dgamma and dbeta in the parameter
    dtype. ``mode``, ``eps``, ``channel_axis`` as in :func:`cudnn_bn.reference.backward`.
    """
    saved = check_fused_saved(saved)
    _require_numpy(x=x, y=y, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved.stats, mode, eps, channel_axis)
    if mode == "auto":
        mode = saved.mode
    checked = check_backward(x, dy, gamma, saved.stats, mode=mode, eps=eps, channel_axis=channel_axis)
    check_forward_output(x, y)
    grad = np.where(activation_mask(y, saved.activation), dy.astype(np.float64), 0.0)
    grad = np.ascontiguousarray(grad)
    stats64 = trusted_saved_stats(
        saved.mean.astype(np.float64), saved.inv_std.astype(np.float64), saved.mode, saved.eps, saved.channel_axis
    )
    dx, dgamma, dbeta = reference.backward(
        x.astype(np.float64), grad, gamma, stats64, mode=mode, eps=eps, channel_axis=channel_axis
    )
    dresidual = grad.astype(checked.data_dtype) if saved.has_residual else None
    return (
        dx.astype(checked.data_dtype, copy=False), dresidual,
        dgamma.astype(checked.param_dtype, copy=False), dbeta.astype(checked.param_dtype, copy=False),
    )


# ---- the public calls: numpy -> the reference above, cupy -> cuDNN ----
def _fused_ops():
    from ._cudnn import fused_ops  # imported on first cupy call only

    return fused_ops


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, residual=None, activation="relu",
                     mode="auto", momentum=0.1, eps=1e-5, channel_axis=1, on_overflow=None):
    """Fused batch-norm forward in training mode: ``y = act(BN(x) + residual)``.

    Args:
        x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow:
            as :func:`cudnn_bn.forward_training` (numpy, cupy, or other CUDA arrays).
        residual: None, or an array of x's shape and dtype added before the activation (it must not
            overlap x).
        activation: "relu" (or :class:`cudnn_bn.Activation`).

    Returns:
        ``(y, saved)``: y in x's dtype and shape, C-contiguous; saved a :class:`FusedSaved`, whose
        ``path`` says what ran and ``mode`` the batch-norm mode that ran.
    """
    activation = parse_activation(activation)
    kind, (x, gamma, beta, running_mean, running_var, residual) = accept_arrays(
        _RUNNING, _RUNNING + ("residual",), x=x, gamma=gamma, beta=beta, running_mean=running_mean,
        running_var=running_var, residual=residual,
    )
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, TRAINING, on_overflow)
    arguments = dict(residual=residual, activation=activation, mode=mode, momentum=momentum, eps=eps,
                     channel_axis=channel_axis)
    if kind == "numpy":
        y, saved = reference_forward_training(x, gamma, beta, running_mean, running_var, **arguments)
        return y, dataclasses.replace(saved, stats=dataclasses.replace(saved.stats, on_overflow=on_overflow))
    return _fused_ops().forward_training(x, gamma, beta, running_mean, running_var, on_overflow=on_overflow,
                                         **arguments)


def forward_inference(x, gamma, beta, mean, var, *, residual=None, activation="relu", mode="auto", eps=1e-5,
                      channel_axis=1):
    """Fused batch-norm forward with fixed statistics: ``act(BN(x) + residual)``.

    Arguments as :func:`cudnn_bn.forward_inference`, plus ``residual`` and ``activation`` as in
    :func:`forward_training`. Returns y in x's dtype and shape, C-contiguous. cuDNN's inference
    call has no fused ops, so on cupy this is the plain call and one elementwise kernel.
    """
    activation = parse_activation(activation)
    kind, (x, gamma, beta, mean, var, residual) = accept_arrays(
        (), ("residual",), x=x, gamma=gamma, beta=beta, mean=mean, var=var, residual=residual
    )
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    arguments = dict(residual=residual, activation=activation, mode=mode, eps=eps, channel_axis=channel_axis)
    if kind == "numpy":
        return reference_forward_inference(x, gamma, beta, mean, var, **arguments)
    return _fused_ops().forward_inference(x, gamma, beta, mean, var, **arguments)


def backward(x, y, dy, gamma, saved, *, mode=None, eps=None, channel_axis=None, on_overflow=None):
    """Gradients of the fused forward: always ``(dx, dresidual, dgamma, dbeta)``.

    Args:
        x: the forward's input; y: the forward's output (same shape, dtype and device as x);
        dy: the gradient of y; gamma: the forward's gamma; saved: the forward's :class:`FusedSaved`.
        mode, eps, channel_axis, on_overflow: as :func:`cudnn_bn.backward` with saved statistics.

    Returns:
        dx and dresidual in x's dtype and shape (C-contiguous; dresidual is None when the forward
        had no residual), dgamma and dbeta in the parameter dtype and shape.
    """
    saved = check_fused_saved(saved)
    kind, (x, y, dy, gamma) = accept_arrays((), (), x=x, y=y, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved.stats, mode, eps, channel_axis)
    if on_overflow is None:
        on_overflow = saved.on_overflow
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, BACKWARD, on_overflow)
    if kind == "numpy":
        return reference_backward(x, y, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
    return _fused_ops().backward(x, y, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis,
                                 on_overflow=on_overflow)
