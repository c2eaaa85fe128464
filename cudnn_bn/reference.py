"""The NumPy reference for cuDNN's batch normalization, in all three modes.

Everything is computed in float64 on a matrix view of the data: the values that share a statistic
form one column of an (m, F) matrix, so every mode and layout reduces to column sums (no Python
loops over channels or elements). SPATIAL_PERSISTENT computes exactly what SPATIAL computes; its
differences on cuDNN (overflow, the saved-statistics rule) are enforced by the shared checks.
"""

from __future__ import annotations

import numpy as np

from ._core.layout import Layout
from ._core.saved import SavedStats
from ._core.validate import (
    array_kind,
    check_backward,
    check_fold,
    check_forward_inference,
    check_forward_training,
    resolve_backward_settings,
)

__all__ = ["backward", "fold_inference", "forward_inference", "forward_training"]


def _require_numpy(**named) -> None:
    if array_kind(**named) != "numpy":
        raise TypeError("cudnn_bn.reference: expected numpy arrays; use cudnn_bn.forward_training etc. for cupy arrays")


def _as_matrix(array: np.ndarray, layout: Layout) -> np.ndarray:
    """x-shaped array -> float64 (m, F) matrix whose columns are the groups of one statistic."""
    array = np.asarray(array, dtype=np.float64)
    if layout.mode.is_spatial:
        return np.moveaxis(array, layout.channel_axis, -1).reshape(-1, layout.channels)
    return array.reshape(layout.shape[0], -1)


def _from_matrix(matrix: np.ndarray, layout: Layout) -> np.ndarray:
    """Inverse of _as_matrix."""
    if layout.mode.is_spatial:
        moved = [size for axis, size in enumerate(layout.shape) if axis != layout.channel_axis] + [layout.channels]
        return np.moveaxis(matrix.reshape(moved), -1, layout.channel_axis)
    return matrix.reshape(layout.shape)


def _row(param) -> np.ndarray:
    """Parameter-shaped array -> float64 row vector of length F."""
    return np.asarray(param, dtype=np.float64).reshape(-1)


def _column_mean(matrix: np.ndarray) -> np.ndarray:
    ones = np.full(matrix.shape[0], 1.0 / matrix.shape[0])
    return ones @ matrix


def _batch_stats(x_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and biased column variances (two-pass, so exact for large offsets)."""
    mean = _column_mean(x_matrix)
    return mean, _column_mean((x_matrix - mean) ** 2)


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode="spatial", momentum=0.1, eps=1e-5, channel_axis=1):
    """Batch-norm forward in training mode.

    Args:
        x: (N, C, *spatial) or (N, *spatial, C) with ``channel_axis=-1``; 2 to 5 dims; float16/32/64.
        gamma, beta: parameter shape: (C,) for the spatial modes, ``x.shape[1:]`` for PER_ACTIVATION.
        running_mean, running_var: optional writable float arrays of the parameter shape, updated in
            place as ``(1 - momentum) * running + momentum * batch_stat`` (the unbiased variance).
        mode: a :class:`~cudnn_bn.Mode` or its name.
        momentum: cuDNN's ``exponentialAverageFactor``, in [0, 1].
        eps: added to the variance, >= 0.

    Returns:
        ``(y, saved)``: y in x's dtype and shape; :class:`~cudnn_bn.SavedStats` in the parameter dtype.
    """
    _require_numpy(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    layout = checked.layout
    x_matrix = _as_matrix(x, layout)
    mean, biased_var = _batch_stats(x_matrix)
    inv_std = 1.0 / np.sqrt(biased_var + checked.eps)
    y_matrix = (x_matrix - mean) * (inv_std * _row(gamma)) + _row(beta)
    if running_mean is not None:
        unbiased_var = biased_var * (layout.count / (layout.count - 1))
        for running, batch_stat in ((running_mean, mean), (running_var, unbiased_var)):
            updated = (1.0 - momentum) * _row(running) + momentum * batch_stat
            np.copyto(running, updated.reshape(layout.param_shape), casting="unsafe")
    saved = SavedStats(
        mean=mean.reshape(layout.param_shape).astype(checked.param_dtype),
        inv_std=inv_std.reshape(layout.param_shape).astype(checked.param_dtype),
        mode=layout.mode,
        eps=checked.eps,
        channel_axis=layout.public_channel_axis,
    )
    return _from_matrix(y_matrix, layout).astype(checked.data_dtype), saved


def forward_inference(x, gamma, beta, mean, var, *, mode="spatial", eps=1e-5, channel_axis=1):
    """Batch-norm forward with fixed statistics: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Shapes and dtypes as in :func:`forward_training`; ``mean`` and ``var`` have the parameter shape.
    Returns y in x's dtype and shape.
    """
    _require_numpy(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    layout = checked.layout
    inv_std = 1.0 / np.sqrt(_row(var) + checked.eps)
    y_matrix = (_as_matrix(x, layout) - _row(mean)) * (inv_std * _row(gamma)) + _row(beta)
    return _from_matrix(y_matrix, layout).astype(checked.data_dtype)


def backward(x, dy, gamma, saved=None, *, mode=None, eps=None, channel_axis=None):
    """Gradients of batch-norm training forward: ``(dx, dgamma, dbeta)``.

    With ``saved`` (from :func:`forward_training`) its mean, inverse std, mode, eps and channel_axis
    are used; an explicit argument that disagrees is a ValueError. With ``saved=None`` the batch
    statistics are recomputed and ``mode`` and ``eps`` are required (not allowed for
    SPATIAL_PERSISTENT). dx has x's dtype; dgamma and dbeta the parameter dtype and shape.
    """
    _require_numpy(x=x, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved, mode, eps, channel_axis)
    if mode == "auto":
        raise ValueError("mode: the reference needs an explicit mode, got 'auto'")
    checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
    layout = checked.layout
    x_matrix = _as_matrix(x, layout)
    if saved is None:
        mean, biased_var = _batch_stats(x_matrix)
        inv_std = 1.0 / np.sqrt(biased_var + checked.eps)
    else:
        mean, inv_std = _row(saved.mean), _row(saved.inv_std)
    dy_matrix = _as_matrix(dy, layout)
    x_hat = (x_matrix - mean) * inv_std
    dbeta = dy_matrix.sum(axis=0)
    dgamma = (dy_matrix * x_hat).sum(axis=0)
    dx_matrix = (_row(gamma) * inv_std) * (dy_matrix - (dbeta + x_hat * dgamma) / layout.count)
    as_param = lambda row: row.reshape(layout.param_shape).astype(checked.param_dtype)  # noqa: E731
    return _from_matrix(dx_matrix, layout).astype(checked.data_dtype), as_param(dgamma), as_param(dbeta)


def fold_inference(gamma, beta, mean, var, eps):
    """Fold fixed statistics into one affine map: ``(scale, shift)`` with
    ``forward_inference(x, ...) == scale * x + shift`` once both are broadcast over x's channel layout.

    Works on numpy and cupy arrays alike; results have the parameters' shape and a dtype of at
    least float32.
    """
    array_kind(gamma=gamma, beta=beta, mean=mean, var=var)
    eps = check_fold(gamma, beta, mean, var, eps)
    dtype = np.result_type(gamma.dtype, beta.dtype, mean.dtype, var.dtype, np.float32)
    gamma, beta, mean, var = (a.astype(np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / (var + eps) ** 0.5
    return scale.astype(dtype), (beta - mean * scale).astype(dtype)


