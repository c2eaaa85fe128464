"""The one place that says how close a result must be to the float64 reference, per dtype."""

from __future__ import annotations

import numpy as np

from .arrays import host_array

__all__ = ["STATISTICS_RTOL", "assert_close", "statistics_rtol", "to_numpy", "tolerance"]

# (rtol, atol) per data dtype, for values of order one (normalized outputs, gradients of
# unit-scale inputs). float16 stores 11 significant bits; float32 kernels reduce in float32.
_TOLERANCES = {
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(np.float32): (1e-4, 1e-4),
    np.dtype(np.float64): (1e-9, 1e-9),
}


# Saved and running statistics are float32 (float64 for float64 data) whatever the data dtype, so
# they are held to about 1e-3 relative even for float16 data: a slip between the biased and the
# unbiased variance (a factor N / (N - 1)) is 0.35% at a count of 288 and must not pass.
STATISTICS_RTOL = 1e-3


def statistics_rtol(data_dtype) -> float:
    """Relative tolerance for saved and running statistics of data of ``data_dtype``."""
    return min(tolerance(data_dtype)[0], STATISTICS_RTOL)


def tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for results computed from data of ``dtype``."""
    return _TOLERANCES[np.dtype(dtype)]


def to_numpy(array) -> np.ndarray:
    """A host float64 copy of a numpy or cupy array (a numpy float64 array itself)."""
    return host_array(array, np.float64, copy=False)


def assert_close(actual, expected, dtype, *, what: str = "", scale: float = 1.0) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype``; ``scale`` widens
    the absolute part for quantities that grow with the data (sums over a batch)."""
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(
        to_numpy(actual), to_numpy(expected), rtol=rtol, atol=atol * scale, err_msg=what
    )
