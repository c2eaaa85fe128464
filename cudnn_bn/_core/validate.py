"""The checks of each call's argument set, shared by the NumPy reference and the cuDNN path.

Everything here runs before any computation or native call, raises a typed error naming the
argument with the expected and actual value, and never modifies an argument. The checks of one
array (cudnn_bn._core.arrays) and of one scalar (cudnn_bn._core.scalars) are their building blocks.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .arrays import array_kind, array_module, check_no_overlap, check_writable, elements_may_share_memory
from .layout import Layout, make_layout
from .modes import AUTO, Mode, parse_mode
from .saved import SavedStats
from .scalars import check_channel_axis, check_eps, check_momentum

__all__ = [
    "Checked",
    "DATA_DTYPES",
    "check_backward",
    "check_backward_inference",
    "check_fold",
    "check_forward_inference",
    "check_forward_training",
    "check_gradient",
    "check_saved",
    "check_saved_entries_finite",
    "check_saved_finite",
    "param_dtype_for",
    "resolve_backward_settings",
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
    check_writable(name, array, "updated")
    if elements_may_share_memory(array):
        raise ValueError(
            f"{name}: expected an array whose elements have memory of their own (it is updated in place), "
            f"got strides {tuple(array.strides)} for shape {tuple(array.shape)} (a broadcast view?); pass {name}.copy()"
        )


def _check_trainable(layout: Layout) -> None:
    if layout.count < 2:
        raise ValueError(
            f"x: training needs at least 2 values per statistic (the variance is undefined otherwise), "
            f"got {layout.count} for shape {layout.shape} in mode {layout.mode.name}"
        )


def _checked(x, mode, channel_axis, eps, params: dict, *, training: bool) -> Checked:
    data_dtype = _check_data("x", x)
    layout = make_layout(x.shape, check_channel_axis(channel_axis), parse_mode(mode))
    for name, array in params.items():
        _check_float(name, array, layout.param_shape)
    return Checked(layout, data_dtype, param_dtype_for(data_dtype), check_eps(eps, training=training))


def check_forward_training(x, gamma, beta, running_mean, running_var, *, mode, momentum, eps,
                           channel_axis) -> tuple[Checked, float]:
    """Validate a forward-training call; return the description and the momentum as a float.

    The running statistics are written in place, so each must have memory of its own: one that
    overlaps x, gamma, beta or the other statistic is refused.
    """
    array_kind(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    checked = _checked(x, mode, channel_axis, eps, {"gamma": gamma, "beta": beta}, training=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither, got only one")
    if running_mean is not None:
        _check_running("running_mean", running_mean, checked.layout)
        _check_running("running_var", running_var, checked.layout)
        check_no_overlap(
            {"running_mean": running_mean, "running_var": running_var}, {"x": x, "gamma": gamma, "beta": beta}
        )
    momentum = check_momentum(momentum)
    _check_trainable(checked.layout)
    return checked, momentum


def check_forward_inference(x, gamma, beta, mean, var, *, mode, eps, channel_axis) -> Checked:
    """Validate a forward-inference call (eps = 0 is allowed here: the statistics are given)."""
    array_kind(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    return _checked(
        x, mode, channel_axis, eps, {"gamma": gamma, "beta": beta, "mean": mean, "var": var}, training=False
    )


def check_backward_inference(x, dy, gamma, mean, var, *, mode, eps, channel_axis) -> Checked:
    """Validate a backward through fixed statistics: forward_inference's checks (eps = 0
    allowed, one value per statistic too: the statistics are given), with dy in place of beta."""
    array_kind(x=x, dy=dy, gamma=gamma, mean=mean, var=var)
    checked = _checked(x, mode, channel_axis, eps, {"gamma": gamma, "mean": mean, "var": var}, training=False)
    check_gradient(x, dy, checked.data_dtype)
    return checked


def check_gradient(x, dy, data_dtype) -> None:
    """dy: x's dtype (``data_dtype``) and shape."""
    dy_dtype = np.dtype(dy.dtype)
    if dy_dtype != data_dtype:
        raise TypeError(f"dy: expected x's dtype {data_dtype}, got {dy_dtype}")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")


def check_saved(x, saved) -> None:
    """``saved`` is a SavedStats whose arrays are arrays of x's kind (shapes and dtypes are
    checked by check_backward, once the layout is known)."""
    if not isinstance(saved, SavedStats):
        raise TypeError(f"saved: expected cudnn_bn.SavedStats or None, got {type(saved).__name__}")
    array_kind(x=x, **{"saved.mean": saved.mean, "saved.inv_std": saved.inv_std})
    if saved.reserve_space is not None:
        array_kind(x=x, **{"saved.reserve_space": saved.reserve_space})


def resolve_backward_settings(x, saved, mode, eps, channel_axis):
    """Settle mode, eps and channel_axis for backward from ``saved`` and the explicit arguments.

    ``mode`` may be a Mode, a name, "auto" or None; "auto" and None defer to ``saved``. An
    explicit mode must match ``saved.mode``, with one exception: SPATIAL may run the backward of
    SPATIAL_PERSISTENT statistics (the same math on the same statistics; it is what a persistent
    backward that overflowed is re-run with). Returns ``(mode_or_auto, eps, channel_axis)``
    where mode_or_auto is "auto" only when there is no ``saved`` and the caller left the choice
    to the policy; eps is a float and channel_axis an int.
    """
    array_kind(x=x)
    explicit_mode = None if mode is None else parse_mode(mode, allow_auto=True)
    eps = None if eps is None else check_eps(eps, training=True)
    channel_axis = None if channel_axis is None else check_channel_axis(channel_axis)
    if saved is None:
        if explicit_mode is None:
            raise ValueError("mode: required when saved is None (backward recomputes the batch statistics)")
        if eps is None:
            raise ValueError("eps: required when saved is None (it must equal the forward call's eps)")
        return explicit_mode, eps, 1 if channel_axis is None else channel_axis
    check_saved(x, saved)
    run_mode = saved.mode
    if explicit_mode not in (None, AUTO) and explicit_mode is not saved.mode:
        if not (explicit_mode is Mode.SPATIAL and saved.mode is Mode.SPATIAL_PERSISTENT):
            raise ValueError(
                f"mode: saved statistics were computed in {saved.mode.name}, got mode={explicit_mode.name}"
            )
        run_mode = Mode.SPATIAL
    if eps is not None and eps != saved.eps:
        raise ValueError(f"eps: saved statistics were computed with eps={saved.eps}, got eps={eps}")
    if channel_axis is not None:
        explicit = make_layout(x.shape, channel_axis, saved.mode).public_channel_axis
        if explicit != make_layout(x.shape, saved.channel_axis, saved.mode).public_channel_axis:
            raise ValueError(
                "channel_axis: saved statistics were computed with "
                f"channel_axis={saved.channel_axis}, got {channel_axis}"
            )
    return run_mode, saved.eps, saved.channel_axis


def _check_saved_arrays(saved: SavedStats, checked: Checked) -> None:
    param_dtype = checked.param_dtype
    for name in ("mean", "inv_std"):
        array = getattr(saved, name)
        dtype = np.dtype(array.dtype)
        if dtype.kind != "f" or dtype.itemsize < param_dtype.itemsize:
            raise TypeError(
                f"saved.{name}: expected {param_dtype} (the parameter dtype for {checked.data_dtype} data; "
                f"a narrower float loses the statistics' precision), got {dtype}"
            )
        layout = checked.layout
        if tuple(array.shape) != layout.param_shape:
            raise ValueError(
                f"saved.{name}: expected shape {layout.param_shape} (x of shape {layout.shape}, channel_axis="
                f"{layout.public_channel_axis}, {layout.mode.name}), got {tuple(array.shape)}"
            )
    reserve = saved.reserve_space
    if reserve is not None:
        dtype = np.dtype(reserve.dtype)
        if dtype != np.uint8 or reserve.ndim != 1 or reserve.size == 0 or not reserve.flags.c_contiguous:
            raise TypeError(
                "saved.reserve_space: expected None or the non-empty 1-D contiguous uint8 buffer that "
                f"forward_training returned, got a {reserve.ndim}-D {dtype} array of {reserve.size} elements"
            )


def check_backward(x, dy, gamma, saved, *, mode: Mode, eps, channel_axis, check_finite: bool = True) -> Checked:
    """Validate a backward call whose mode, eps and axis were settled by resolve_backward_settings.

    ``check_finite=False`` leaves out the check that persistent saved statistics are finite: the
    cuDNN path runs it per call (it depends on values), folded into the call's overflow check, and
    only where the statistics did not come from its own forward and the call checks overflow."""
    array_kind(x=x, dy=dy, gamma=gamma)
    checked = _checked(x, mode, channel_axis, eps, {}, training=True)
    if saved is not None:
        # before gamma: statistics that do not fit x are the more likely mistake (another axis
        # or mode), and their message says which layout x was read with
        check_saved(x, saved)
        _check_saved_arrays(saved, checked)
    _check_float("gamma", gamma, checked.layout.param_shape)
    check_gradient(x, dy, checked.data_dtype)
    _check_trainable(checked.layout)
    if checked.layout.mode is not Mode.SPATIAL_PERSISTENT:
        return checked
    if saved is None:
        raise ValueError(
            "saved: SPATIAL_PERSISTENT backward requires the saved mean and inverse std from "
            "forward_training (cuDNN does not recompute them on that path), got None"
        )
    if check_finite:
        check_saved_finite(saved)
    return checked


def check_saved_finite(saved) -> None:
    """SPATIAL_PERSISTENT's backward must get finite saved statistics (NaN is not allowed there).

    Last, and on the persistent path only. The NumPy reference runs it; the cuDNN path folds the
    same test into the one wait of a checked call, and skips it for the statistics its own forward
    made (cudnn_bn/_cudnn/launch.py)."""
    xp = array_module(saved.mean)
    # one reduction and one device-to-host read for both: a NaN or Inf entry in either makes the
    # sum of products NaN or Inf, so a finite sum clears them all. A non-finite one may also be an
    # overflow of finite entries: the exact check tells which.
    if not math.isfinite(float(xp.vdot(saved.mean, saved.inv_std))):
        check_saved_entries_finite(saved)


def check_saved_entries_finite(saved) -> None:
    """The exact check behind check_saved_finite's sum: a ValueError naming the saved array with a
    NaN or Inf entry (finite entries whose products overflowed pass)."""
    xp = array_module(saved.mean)
    for name in ("mean", "inv_std"):
        if not bool(xp.isfinite(getattr(saved, name)).all()):
            raise ValueError(
                f"saved.{name}: expected finite values (NaN or Inf would poison the gradient), got non-finite entries"
            )


def check_fold(gamma, beta, mean, var, eps) -> float:
    """Validate fold_inference's arguments: four float arrays of one shape and an eps >= 0."""
    named = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    array_kind(**named)
    shapes = {name: tuple(array.shape) for name, array in named.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"gamma, beta, mean, var: expected one shape (the parameter shape), got {detail}")
    for name, array in named.items():
        _check_float(name, array, shapes[name])
    return check_eps(eps)

