"""The public functions: tell the arrays' kind, then send numpy arrays to the reference and cupy
arrays to cuDNN. Both sides resolve the mode by the same policy (cudnn_bn._core.policy; the cuDNN
side once per call signature) and validate with the same checks. The backward through fixed
statistics, for which cuDNN has no call, sends cupy arrays to CuPy kernels (_cudnn/frozen.py).

CUDA arrays of other libraries (objects exposing ``__cuda_array_interface__``, or ``__dlpack__``
on a CUDA device) are wrapped as cupy arrays without a copy (cudnn_bn/_cudnn/interop.py, imported
only when such an argument arrives) and then take the cuDNN path; results are cupy arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import numpy as np

from . import reference
from ._core.arrays import array_kind, uniform_kind
from ._core.policy import INFERENCE, TRAINING, backward_settings, choose_mode
from ._core.saved import SavedStats

__all__ = [
    "backward", "backward_inference", "check_overflow", "cudnn_available", "forward_inference", "forward_training",
]

_RUNNING = ("running_mean", "running_var")  # optional, and updated in place


@functools.cache
def _cudnn_ops():
    from ._cudnn import ops  # imported on first cupy call only, so numpy users never load cupy

    return ops


@functools.cache
def _frozen_ops():
    from ._cudnn import frozen  # CuPy kernels: cuDNN has no backward through fixed statistics

    return frozen


def accept_arrays(written, optional, /, **named) -> tuple[str, tuple]:
    """Return ``(kind, arrays)``: "numpy" or "cupy", and the arguments in the order given, with
    CUDA arrays of other libraries replaced by zero-copy cupy views.

    ``written`` names the arguments the call updates in place, ``optional`` those that may be
    None. Anything else that is not an accepted array is a TypeError naming the argument and what
    is accepted; mixed kinds are a TypeError.
    """
    required = tuple(value for name, value in named.items() if name not in optional)
    kind = uniform_kind(required, tuple(named[name] for name in optional if name in named))
    if kind is not None:  # all of one kind already seen to pass every check: nothing to convert
        return kind, tuple(named.values())
    given = {name: value for name, value in named.items() if not (value is None and name in optional)}
    try:
        kind = array_kind(**given)
    except TypeError:  # a foreign array, something unsupported, or mixed kinds: sorted out below
        if any(isinstance(value, (np.ma.MaskedArray, np.matrix)) for value in given.values()):
            raise  # numpy's own kinds that are refused: array_kind's message says why
        from ._cudnn import interop

        given = {
            name: interop.as_supported_array(name, value, written=name in written) for name, value in given.items()
        }
        kind = array_kind(**given)
    return kind, tuple(given.get(name) for name in named)


def _accept_saved(saved):
    """``saved`` with foreign CUDA arrays in its mean and inv_std wrapped like the other arguments."""
    if not isinstance(saved, SavedStats):
        return saved  # None, or a wrong type that resolve_backward_settings reports
    if uniform_kind((saved.mean, saved.inv_std)) is not None:
        return saved
    _, (mean, inv_std) = accept_arrays((), (), saved_mean=saved.mean, saved_inv_std=saved.inv_std)
    if mean is saved.mean and inv_std is saved.inv_std:
        return saved
    return dataclasses.replace(saved, mean=mean, inv_std=inv_std)


def cudnn_available() -> tuple[bool, str]:
    """``(usable, reason)``: whether cupy arrays can run through cuDNN on this machine.

    ``reason`` says what was found ("1 GPU(s)") or what is missing (CuPy, a GPU or driver, a
    usable libcudnn). numpy arrays always run on the reference, whatever this returns.
    """
    from ._cudnn.availability import cudnn_status

    return cudnn_status()


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode="auto", momentum=0.1, eps=1e-5,
                     channel_axis=1, on_overflow=None):
    """Batch-norm forward in training mode on numpy (reference) or cupy (cuDNN) arrays.

    Same arguments and results as :func:`cudnn_bn.reference.forward_training`, plus:
        mode: a Mode, its name, or "auto" (see docs/modes.md for the policy).
        on_overflow: "raise", "fallback", "deferred" or "ignore" for SPATIAL_PERSISTENT on cuDNN;
            None means "raise" when persistent was asked for by name and "ignore" when "auto"
            chose it (docs/modes.md).

    Arrays may also be CUDA arrays of other libraries (see docs/migrating-from-cupy.md): they run
    on cuDNN, running statistics are updated in place in the caller's objects, and ``y`` and the
    saved statistics are cupy arrays.

    Returns ``(y, saved)``; ``saved.mode`` is the mode that actually ran.
    """
    kind = uniform_kind((x, gamma, beta), (running_mean, running_var))
    if kind is None:
        kind, (x, gamma, beta, running_mean, running_var) = accept_arrays(
            _RUNNING, _RUNNING, x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var
        )
    if kind == "cupy":  # the cuDNN path resolves the mode by the same policy, once per call signature
        return _cudnn_ops().forward_training(
            x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow
        )
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, TRAINING, on_overflow)
    y, saved = reference.forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    return y, dataclasses.replace(saved, on_overflow=on_overflow)


def forward_inference(x, gamma, beta, mean, var, *, mode="auto", eps=1e-5, channel_axis=1):
    """Batch-norm forward with fixed statistics on numpy or cupy arrays (or other CUDA arrays,
    as in :func:`forward_training`).

    Same arguments and result as :func:`cudnn_bn.reference.forward_inference`; ``mode`` may be "auto".
    """
    kind = uniform_kind((x, gamma, beta, mean, var))
    if kind is None:
        kind, (x, gamma, beta, mean, var) = accept_arrays((), (), x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    if kind == "cupy":
        return _cudnn_ops().forward_inference(x, gamma, beta, mean, var, mode, eps, channel_axis)
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    return reference.forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)


def backward(x, dy, gamma, saved=None, *, mode=None, eps=None, channel_axis=None, on_overflow=None):
    """Gradients ``(dx, dgamma, dbeta)`` on numpy or cupy arrays (or other CUDA arrays, as in
    :func:`forward_training`).

    Same arguments and results as :func:`cudnn_bn.reference.backward`. With ``saved`` the mode that
    forward ran is used; without it ``mode`` (which may be "auto") and ``eps`` are required.
    """
    kind = uniform_kind((x, dy, gamma))
    if kind is None:
        kind, (x, dy, gamma) = accept_arrays((), (), x=x, dy=dy, gamma=gamma)
    saved = _accept_saved(saved)
    if kind == "cupy":
        return _cudnn_ops().backward(x, dy, gamma, saved, mode, eps, channel_axis, on_overflow)
    # checks saved's kind too
    mode, _, eps, channel_axis = backward_settings(x, saved, mode, eps, channel_axis, on_overflow)
    return reference.backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)


def backward_inference(x, dy, gamma, mean, var, *, mode="auto", eps=1e-5, channel_axis=1):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`forward_inference`, the statistics held fixed
    (a frozen batch norm), on numpy or cupy arrays (or other CUDA arrays, as in
    :func:`forward_training`).

    ``dx = gamma * inv_std * dy``, ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)`` with
    ``inv_std = 1 / sqrt(var + eps)`` and ``x_hat = (x - mean) * inv_std``, each sum over one
    statistic's group. Arguments, modes, layouts, dtypes and checks as :func:`forward_inference`,
    with dy (x's shape and dtype) in place of beta. dx: x's dtype and shape (C-contiguous);
    dgamma, dbeta: the parameter dtype and shape. On cupy arrays: CuPy kernels (cuDNN has no call
    for it), queued without waiting for the device.
    """
    kind = uniform_kind((x, dy, gamma, mean, var))
    if kind is None:
        kind, (x, dy, gamma, mean, var) = accept_arrays((), (), x=x, dy=dy, gamma=gamma, mean=mean, var=var)
    if kind == "cupy":
        return _frozen_ops().backward_inference(x, dy, gamma, mean, var, mode, eps, channel_axis)
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    return reference.backward_inference(x, dy, gamma, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)


def check_overflow() -> None:
    """Read the overflow flag of every SPATIAL_PERSISTENT call made with ``on_overflow="deferred"``
    since the last check (all devices and streams), waiting for their work; raise what was found,
    once: :class:`~cudnn_bn.CudnnOverflowError` naming the calls that may have overflowed
    (operation, shape, dtype, mode), another :class:`~cudnn_bn.CudnnError` for another kernel
    status, ValueError for non-finite saved statistics given to a deferred backward. Returns None
    when nothing was found, at once and without waiting when nothing was deferred (docs/modes.md).
    """
    deferred = sys.modules.get("cudnn_bn._cudnn.deferred")
    if deferred is not None:  # not imported: no cuDNN call ran, so none was deferred
        deferred.check_overflow()
