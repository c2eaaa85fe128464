"""What a fused forward hands to the fused backward, and the checks the fused calls add to the
plain ones: shared by the NumPy reference (cudnn_bn/reference.py) and the cuDNN path
(cudnn_bn/_cudnn/fused_ops.py)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from .arrays import array_kind, check_no_overlap
from .modes import Activation, parse_activation
from .saved import SavedStats

__all__ = [
    "FusedPath",
    "FusedSaved",
    "PATH_COMPOSED",
    "PATH_FUSED_EX",
    "PATH_REFERENCE",
    "check_forward_output",
    "check_fused_saved",
    "check_residual",
    "check_residual_apart",
]

class FusedPath(str, enum.Enum):
    """What ran a fused forward, as ``FusedSaved.path`` records it. A member equals, prints and
    formats as its value, the string docs/api.md documents."""

    REFERENCE = "reference"  # numpy: the float64 fused reference (cudnn_bn/reference.py)
    FUSED_EX = "fused_ex"  # cupy: cudnnBatchNormalizationForwardTrainingEx with a fused bnOps
    COMPOSED = "composed"  # cupy: the plain cuDNN call, then one elementwise kernel

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# the members under the names cudnn_bn.fused documents
PATH_REFERENCE, PATH_FUSED_EX, PATH_COMPOSED = FusedPath.REFERENCE, FusedPath.FUSED_EX, FusedPath.COMPOSED


@dataclasses.dataclass(frozen=True, eq=False)
class FusedSaved:
    """What a fused ``forward_training`` hands to the fused ``backward``.

    Attributes:
        stats: the :class:`~cudnn_bn.SavedStats` of the batch norm (mean and inverse std in the
            parameter dtype, the mode that ran, eps, channel_axis, on_overflow; on the fused Ex
            path its ``reserve_space`` is the Ex reserve space that the backward needs).
        activation: the :class:`~cudnn_bn.Activation` applied.
        has_residual: whether a residual was added (backward then returns dresidual).
        path: which computation ran, a :class:`FusedPath` (its value as a string is accepted at
            construction).
        bias: on the fused Ex path, a copy of beta in cuDNN's parameter order (BackwardEx reads
            it to undo the activation); None elsewhere.

    ``mean``, ``inv_std``, ``mode``, ``eps``, ``channel_axis``, ``reserve_space`` and
    ``on_overflow`` read through to ``stats``. Equality is by identity, like SavedStats.
    """

    stats: SavedStats
    activation: Activation
    has_residual: bool
    path: FusedPath
    bias: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.stats, SavedStats):
            raise TypeError(f"FusedSaved.stats: expected cudnn_bn.SavedStats, got {type(self.stats).__name__}")
        object.__setattr__(self, "activation", parse_activation(self.activation))
        object.__setattr__(self, "path", _fused_path(self.path))
        object.__setattr__(self, "has_residual", bool(self.has_residual))

    mean = property(lambda self: self.stats.mean)
    inv_std = property(lambda self: self.stats.inv_std)
    mode = property(lambda self: self.stats.mode)
    eps = property(lambda self: self.stats.eps)
    channel_axis = property(lambda self: self.stats.channel_axis)
    reserve_space = property(lambda self: self.stats.reserve_space)
    on_overflow = property(lambda self: self.stats.on_overflow)


def _fused_path(path) -> FusedPath:
    if type(path) is FusedPath:  # what the package passes: no lookup on the per-call path
        return path
    if isinstance(path, str):
        try:
            return FusedPath(path)
        except ValueError:
            pass
    raise ValueError(f"FusedSaved.path: expected one of {[member.value for member in FusedPath]}, got {path!r}")


# ---- checks shared by the reference and the cuDNN path ----
def check_residual(x, residual, running_mean=None, running_var=None) -> None:
    """``residual`` (None, or an array of x's shape and dtype with memory of its own: it must not
    overlap x, nor the running statistics the call writes)."""
    if residual is None:
        return
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if np.dtype(residual.dtype) != np.dtype(x.dtype):
        raise TypeError(f"residual: expected x's dtype {np.dtype(x.dtype)}, got {np.dtype(residual.dtype)}")
    check_residual_apart(x, residual, running_mean, running_var)


def check_residual_apart(x, residual, running_mean=None, running_var=None) -> None:
    """What check_residual reads of addresses (a call with a settled signature checks only this):
    ``residual`` (not None) apart from x, and the running statistics the call writes apart from it."""
    _check_separate("residual", residual, x=x)
    written = {
        name: array
        for name, array in (("running_mean", running_mean), ("running_var", running_var))
        if array is not None
    }
    if written:
        check_no_overlap(written, {"residual": residual})


def _check_separate(name: str, array, **others) -> None:
    try:
        check_no_overlap({name: array}, others)
    except ValueError:
        detail = " or ".join(others)
        raise ValueError(
            f"{name}: expected memory of its own, got an array whose memory overlaps {detail}; pass a copy"
        ) from None


def check_forward_output(x, y) -> None:
    """``y`` must be the fused forward's output for ``x``: same kind, shape and dtype (the device
    is checked by the cuDNN path)."""
    array_kind(x=x, y=y)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y: expected the forward's output, of x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if np.dtype(y.dtype) != np.dtype(x.dtype):
        raise TypeError(f"y: expected the forward's output, of x's dtype {np.dtype(x.dtype)}, got {np.dtype(y.dtype)}")


def check_fused_saved(saved) -> FusedSaved:
    if not isinstance(saved, FusedSaved):
        raise TypeError(
            "saved: expected the cudnn_bn.fused.FusedSaved that cudnn_bn.fused.forward_training returned, "
            f"got {type(saved).__name__}"
        )
    return saved
