"""The public functions: resolve the mode, then send numpy arrays to the reference and cupy
arrays to cuDNN. Both sides validate with the same checks."""

from __future__ import annotations

import dataclasses

from . import reference
from ._core.policy import BACKWARD, INFERENCE, TRAINING, choose_mode
from ._core.validate import array_kind, resolve_backward_settings

__all__ = ["backward", "forward_inference", "forward_training"]


def _cudnn_ops():
    from ._cudnn import ops  # imported on first cupy call only, so numpy users never load cupy

    return ops


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode="auto", momentum=0.1, eps=1e-5, channel_axis=1, on_overflow=None):
    """Batch-norm forward in training mode on numpy (reference) or cupy (cuDNN) arrays.

    Same arguments and results as :func:`cudnn_bn.reference.forward_training`, plus:
        mode: a Mode, its name, or "auto" (see docs/modes.md for the policy).
        on_overflow: "raise", "fallback" or "ignore" for SPATIAL_PERSISTENT on cuDNN; None means
            "raise" when persistent was asked for by name and "fallback" when "auto" chose it.

    Returns ``(y, saved)``; ``saved.mode`` is the mode that actually ran.
    """
    kind = array_kind(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, TRAINING, on_overflow)
    arguments = dict(mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis)
    if kind == "numpy":
        y, saved = reference.forward_training(x, gamma, beta, running_mean, running_var, **arguments)
    else:
        y, saved = _cudnn_ops().forward_training(
            x, gamma, beta, running_mean, running_var, on_overflow=on_overflow, **arguments
        )
    return y, dataclasses.replace(saved, on_overflow=on_overflow)


def forward_inference(x, gamma, beta, mean, var, *, mode="auto", eps=1e-5, channel_axis=1):
    """Batch-norm forward with fixed statistics on numpy or cupy arrays.

    Same arguments and result as :func:`cudnn_bn.reference.forward_inference`; ``mode`` may be "auto".
    """
    kind = array_kind(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    if kind == "numpy":
        return reference.forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    return _cudnn_ops().forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)


def backward(x, dy, gamma, saved=None, *, mode=None, eps=None, channel_axis=None, on_overflow=None):
    """Gradients ``(dx, dgamma, dbeta)`` on numpy or cupy arrays.

    Same arguments and results as :func:`cudnn_bn.reference.backward`. With ``saved`` the mode that
    forward ran is used; without it ``mode`` (which may be "auto") and ``eps`` are required.
    """
    kind = array_kind(x=x, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved, mode, eps, channel_axis)
    if saved is not None:
        array_kind(x=x, saved_mean=saved.mean, saved_inv_std=saved.inv_std)
    if on_overflow is None and saved is not None:
        on_overflow = saved.on_overflow
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, BACKWARD, on_overflow)
    if kind == "numpy":
        return reference.backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
    return _cudnn_ops().backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis, on_overflow=on_overflow)
