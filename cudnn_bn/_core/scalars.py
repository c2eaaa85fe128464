"""Checks of the scalar arguments: eps, momentum, channel_axis, positive counts.

Each returns the value as a plain Python number, or raises a typed error naming the argument with
the expected and the actual value (bool, strings and arrays are TypeErrors, never numbers).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MIN_TRAINING_EPS", "check_channel_axis", "check_eps", "check_momentum", "positive_int", "real_number"]

# Training and backward refuse an eps below this. cuDNN itself accepts any eps >= 0
# (CUDNN_BN_MIN_EPSILON is 0.0), but a constant channel has variance 0, so its inverse std
# 1 / sqrt(0 + eps) is infinite for eps = 0 and overflows float32 parameters for an eps that is
# nearly 0. float32's smallest normal number (2**-126, about 1.2e-38) keeps it finite (below 1e19).
MIN_TRAINING_EPS = float(np.finfo(np.float32).tiny)


def real_number(name: str, value, expected: str) -> float:
    """A Python or numpy real scalar as a float (bool, strings and arrays are TypeErrors)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int past float range, e.g. 10**400
        raise ValueError(f"{name}: expected {expected}, got an integer of {len(str(abs(int(value))))} digits") from None


def check_eps(eps, *, training: bool = False) -> float:
    """eps as a float: finite and >= 0 for inference, >= MIN_TRAINING_EPS for training and backward."""
    if training:
        eps = real_number("eps", eps, f"a float >= {MIN_TRAINING_EPS:.3g}")
        if not math.isfinite(eps) or eps < MIN_TRAINING_EPS:
            raise ValueError(
                f"eps: expected a finite value >= {MIN_TRAINING_EPS:.3g} (2**-126) in training and backward, "
                f"got {eps}: a constant channel has variance 0, so its inverse std 1/sqrt(var + eps) would be "
                f"infinite or past float32's range (cuDNN allows eps = 0; this package refuses it so that no "
                f"inf or NaN appears silently)"
            )
        return eps
    eps = real_number("eps", eps, "a float >= 0")
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    return eps


def check_momentum(momentum, name: str = "momentum") -> float:
    """momentum (cuDNN's exponentialAverageFactor) as a float in [0, 1]; ``name`` is what the
    caller calls it (compat's ``decay`` is checked alike)."""
    momentum = real_number(name, momentum, "a float in [0, 1]")
    if not math.isfinite(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: expected a finite value in [0, 1], got {momentum}")
    return momentum


def check_channel_axis(channel_axis) -> int:
    """channel_axis as a Python int (numpy integers accepted); the range is checked by make_layout."""
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis: expected an int (1 or -1), got {channel_axis!r}")
    return int(channel_axis)


def positive_int(name: str, value) -> int:
    """A Python or numpy integer >= 1 as an int (bool is a TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)
