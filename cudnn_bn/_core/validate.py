"""Input checks shared by the NumPy reference and the cuDNN path.

Everything here runs before any computation or native call, raises a typed error naming the
argument with the expected and actual value, and never modifies an argument.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .layout import Layout, make_layout
from .modes import Mode, parse_mode
from .saved import SavedStats

__all__ = [
    "Checked",
    "DATA_DTYPES",
    "array_kind",
    "check_backward",
    "check_forward_inference",
    "check_forward_training",
    "check_fold",
    "param_dtype_for",
]

DATA_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclasses.dataclass(frozen=True)
class Checked:
    """The validated description of one call."""

    layout: Layout
    data_dtype: np.dtype
    param_dtype: np.dtype
    eps: float


def param_dtype_for(data_dtype) -> np.dtype:
    """cuDNN's rule: float64 parameters for float64 data, float32 for float16 and float32 data."""
    return np.dtype(np.float64) if np.dtype(data_dtype) == np.float64 else np.dtype(np.float32)


def array_kind(**named) -> str:
    """Return "numpy" or "cupy" for the given arrays (None entries skipped); TypeError if mixed."""
    kinds = {}
    for name, array in named.items():
        if array is None:
            continue
        if type(array).__module__.split(".")[0] == "cupy":
            kinds[name] = "cupy"
        elif isinstance(array, np.ndarray):
            kinds[name] = "numpy"
        else:
            raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got {type(array).__name__}")
    found = set(kinds.values())
    if len(found) > 1:
        detail = ", ".join(f"{name}={kind}" for name, kind in kinds.items())
        raise TypeError(f"arrays of mixed kinds: expected all numpy or all cupy, got {detail}")
    return found.pop() if found else "numpy"


def _check_data(name: str, array) -> np.dtype:
    dtype = np.dtype(array.dtype)
    if dtype not in DATA_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {dtype}")
    return dtype


def _check_float(name: str, array, expected_shape) -> None:
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating dtype, got {dtype}")
    if tuple(array.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: expected shape {tuple(expected_shape)}, got {tuple(array.shape)}")


def _check_running(name: str, array, layout: Layout) -> None:
    _check_float(name, array, layout.param_shape)
    if not getattr(array.flags, "writeable", True):
        raise ValueError(f"{name}: expected a writable array (it is updated in place), got a read-only one")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps: expected a float, got {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    return eps


def check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum: expected a float in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    if not math.isfinite(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a finite value in [0, 1], got {momentum}")
    return momentum


def _check_trainable(layout: Layout) -> None:
    if layout.count < 2:
        raise ValueError(
            f"x: training needs at least 2 values per statistic (the variance is undefined otherwise), "
            f"got {layout.count} for shape {layout.shape} in mode {layout.mode.name}"
        )


def _checked(x, mode, channel_axis, eps, params: dict) -> Checked:
    data_dtype = _check_data("x", x)
    layout = make_layout(x.shape, channel_axis, parse_mode(mode))
    for name, array in params.items():
        _check_float(name, array, layout.param_shape)
    return Checked(layout, data_dtype, param_dtype_for(data_dtype), check_eps(eps))


def check_forward_training(x, gamma, beta, running_mean, running_var, *, mode, momentum, eps, channel_axis) -> tuple[Checked, float]:
    """Validate a forward-training call; return the description and the momentum as a float."""
    checked = _checked(x, mode, channel_axis, eps, {"gamma": gamma, "beta": beta})
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither, got only one")
    if running_mean is not None:
        _check_running("running_mean", running_mean, checked.layout)
        _check_running("running_var", running_var, checked.layout)
        if running_mean is running_var:
            raise ValueError("running_mean, running_var: expected two different arrays, got the same one twice")
    momentum = check_momentum(momentum)
    _check_trainable(checked.layout)
    return checked, momentum


def check_forward_inference(x, gamma, beta, mean, var, *, mode, eps, channel_axis) -> Checked:
    """Validate a forward-inference call."""
    return _checked(x, mode, channel_axis, eps, {"gamma": gamma, "beta": beta, "mean": mean, "var": var})


def resolve_backward_settings(x, saved, mode, eps, channel_axis):
    """Settle mode, eps and channel_axis for backward from ``saved`` and the explicit arguments.

    ``mode`` may be a Mode, a name, "auto" or None; "auto" and None defer to ``saved``.
    Returns ``(mode_or_auto, eps, channel_axis)`` where mode_or_auto is "auto" only when there
    is no ``saved`` and the caller left the choice to the policy.
    """
    explicit_mode = None if mode is None else parse_mode(mode, allow_auto=True)
    if saved is None:
        if explicit_mode is None:
            raise ValueError("mode: required when saved is None (backward recomputes the batch statistics)")
        if eps is None:
            raise ValueError("eps: required when saved is None (it must equal the forward call's eps)")
        return explicit_mode, eps, 1 if channel_axis is None else channel_axis
    if not isinstance(saved, SavedStats):
        raise TypeError(f"saved: expected cudnn_bn.SavedStats or None, got {type(saved).__name__}")
    if explicit_mode not in (None, "auto") and explicit_mode is not saved.mode:
        raise ValueError(f"mode: saved statistics were computed in {saved.mode.name}, got mode={explicit_mode.name}")
    if eps is not None and float(eps) != saved.eps:
        raise ValueError(f"eps: saved statistics were computed with eps={saved.eps}, got eps={eps}")
    if channel_axis is not None:
        explicit = make_layout(x.shape, channel_axis, saved.mode).public_channel_axis
        if explicit != make_layout(x.shape, saved.channel_axis, saved.mode).public_channel_axis:
            raise ValueError(
                f"channel_axis: saved statistics were computed with channel_axis={saved.channel_axis}, got {channel_axis}"
            )
    return saved.mode, saved.eps, saved.channel_axis


def check_backward(x, dy, gamma, saved, *, mode: Mode, eps, channel_axis) -> Checked:
    """Validate a backward call whose mode, eps and axis were settled by resolve_backward_settings."""
    checked = _checked(x, mode, channel_axis, eps, {"gamma": gamma})
    dy_dtype = np.dtype(dy.dtype)
    if dy_dtype != checked.data_dtype:
        raise TypeError(f"dy: expected x's dtype {checked.data_dtype}, got {dy_dtype}")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    _check_trainable(checked.layout)
    if saved is None:
        if checked.layout.mode is Mode.SPATIAL_PERSISTENT:
            raise ValueError(
                "saved: SPATIAL_PERSISTENT backward requires the saved mean and inverse std from "
                "forward_training (cuDNN does not recompute them on that path), got None"
            )
        return checked
    for name in ("mean", "inv_std"):
        array = getattr(saved, name)
        _check_float(f"saved.{name}", array, checked.layout.param_shape)
        # only the persistent path is checked: on a GPU the check costs a synchronisation, and
        # that path already synchronises for its overflow query
        if checked.layout.mode is Mode.SPATIAL_PERSISTENT and not bool(_array_module(array).isfinite(array).all()):
            raise ValueError(f"saved.{name}: expected finite values (NaN or Inf would poison the gradient), got non-finite entries")
    return checked


def check_fold(gamma, beta, mean, var, eps) -> float:
    """Validate fold_inference's arguments: four float arrays of one shape and an eps."""
    shape = tuple(gamma.shape)
    for name, array in {"gamma": gamma, "beta": beta, "mean": mean, "var": var}.items():
        _check_float(name, array, shape)
    return check_eps(eps)


def _array_module(array):
    if isinstance(array, np.ndarray):
        return np
    import cupy  # only reached for cupy arrays, so cupy is importable

    return cupy
