"""Fused batch norm + activation, and batch norm + residual add + activation.

``forward_training`` computes ``y = act(BN(x) + residual)`` (the residual is optional), which is
the tail of a ResNet block; ``backward`` returns ``(dx, dresidual, dgamma, dbeta)``. ``act`` is a
:class:`~cudnn_bn.Activation` (ReLU for now).

This module only dispatches, as cudnn_bn/_api.py does for the plain calls. numpy arrays run the
float64 reference (cudnn_bn/reference.py, published here as ``reference_forward_training`` etc.):
the plain reference's float64 arithmetic, the add and the activation also in float64, each result
rounded once to its dtype. cupy arrays run cuDNN (cudnn_bn/_cudnn/fused_ops.py): the fused Ex call
(bnOps BN_ACTIVATION or BN_ADD_ACTIVATION) where cuDNN's fast path applies, else the plain cuDNN
call followed by one elementwise kernel. ``saved.path`` says which ran; the math is in
docs/math.md ("Fused activation and residual add").

The ReLU gradient at a pre-activation of exactly 0 is 0: the mask is ``y > 0`` on the forward's
output, as cuDNN's fused backward (which is given y) and PyTorch's ReLU backward compute it.
"""

from __future__ import annotations

import dataclasses
import functools

from ._api import accept_arrays
from ._core.fused_saved import (
    PATH_COMPOSED,
    PATH_FUSED_EX,
    PATH_REFERENCE,
    FusedPath,
    FusedSaved,
    check_fused_saved,
)
from ._core.modes import parse_activation
from ._core.policy import BACKWARD, INFERENCE, TRAINING, choose_mode
from ._core.validate import resolve_backward_settings
from .reference import fused_backward as reference_backward
from .reference import fused_forward_inference as reference_forward_inference
from .reference import fused_forward_training as reference_forward_training

__all__ = [
    "FusedPath",
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


# ---- numpy -> the reference, cupy -> cuDNN ----
@functools.cache
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
