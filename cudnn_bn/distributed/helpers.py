"""Small array and argument helpers of the distributed package, kept together so that the shared
ones of ``cudnn_bn._core`` (host copies, the array module of a kind, positive ints) can replace
them in one place."""

from __future__ import annotations

import numpy as np

from .._core.validate import array_kind

__all__ = ["array_module", "host_float64", "positive_int"]


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; TypeError for a non-integer (bool included), ValueError below 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def host_float64(array) -> np.ndarray:
    """A host float64 copy of a numpy or cupy array (a cupy array's copy waits for its stream)."""
    if array_kind(array=array) == "cupy":
        return np.asarray(array.get(), dtype=np.float64)
    return np.array(array, dtype=np.float64, copy=True)


def array_module(kind: str):
    """numpy for "numpy", cupy for "cupy" (imported only then: a cupy array exists, or a
    communicator asked for device buffers)."""
    if kind == "numpy":
        return np
    import cupy

    return cupy
