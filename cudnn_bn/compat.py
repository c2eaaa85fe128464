"""CuPy 13's batch-norm functions from ``cupyx.cudnn``, signature for signature.

CuPy 14 removed ``cupyx.cudnn``. Code written against it (Chainer's ``batch_normalization`` and
``group_normalization``, and code like them) moves here by changing one import::

    from cudnn_bn import compat as cudnn        # was: from cupyx import cudnn
    libcudnn = cudnn                            # was: from cupy.cuda import cudnn as libcudnn

Every function here translates its CuPy 13 arguments into a call of the public functions
(:func:`cudnn_bn.forward_training`, :func:`cudnn_bn.forward_inference`,
:func:`cudnn_bn.backward`), so it runs on the same checks, plans and handles as they do: cupy
arrays (and other CUDA arrays) on cuDNN, numpy arrays on the NumPy reference.

How CuPy 13's arguments map:
    decay: the running statistics become ``decay * running + (1 - decay) * batch``; cuDNN's
        ``exponentialAverageFactor`` (``momentum`` here) is ``1 - decay``. With ``decay=1.0``
        the running arrays are neither read nor written, so dummies of any shape work (Chainer's
        group normalization passes one zero array as beta, running_mean and running_var).
    is_for_conv2d: True describes x as it is (channels at axis 1, or last with
        ``d_layout=CUDNN_TENSOR_NHWC``); False treats the last axis as channels and everything
        before it as the batch, as CuPy 13's ``(size / last, last, 1, 1)`` descriptor did.
    d_layout: CUDNN_TENSOR_NHWC selects channels-last (``channel_axis=-1``) for 4-D x.
    gamma, beta and the statistics: any shape holding the parameter count; CuPy 13 handed cuDNN
        their memory, which cuDNN reads in its own order (C first, then the spatial axes for
        PER_ACTIVATION). Results come back in gamma's shape.
    debug: for SPATIAL_PERSISTENT, ``debug=True`` checks cuDNN's overflow flag after the call
        and raises :class:`cudnn_bn.CudnnOverflowError` (the running statistics are restored
        first); ``debug=False`` does not check, as CuPy 13 did not. CuPy 13 warned instead of
        raising. The keyword-only ``on_overflow`` ("raise", "fallback", "deferred", "ignore") overrides it.

Differences that remain are listed in docs/migrating-from-cupy.md.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref

import numpy as np

from . import _api
from ._core.arrays import array_kind, check_no_overlap, check_writable
from ._core.layout import Layout, make_layout
from ._core.modes import Mode, OnOverflow, parse_mode
from ._core.saved import SavedStats, reserve_filled_by, trusted_saved_stats
from ._core.scalars import check_eps, check_momentum
from ._cudnn.enums import TensorFormat

__all__ = [
    "CUDNN_BATCHNORM_PER_ACTIVATION",
    "CUDNN_BATCHNORM_SPATIAL",
    "CUDNN_BATCHNORM_SPATIAL_PERSISTENT",
    "CUDNN_BN_MIN_EPSILON",
    "CUDNN_TENSOR_NCHW",
    "CUDNN_TENSOR_NHWC",
    "batch_normalization_backward",
    "batch_normalization_forward_inference",
    "batch_normalization_forward_training",
    "batch_normalization_forward_training_ex",
    "getVersion",
]

# cudnnBatchNormMode_t, as cudnn_bn.Mode members (which compare equal to CuPy 13's ints)
CUDNN_BATCHNORM_PER_ACTIVATION = Mode.PER_ACTIVATION
CUDNN_BATCHNORM_SPATIAL = Mode.SPATIAL
CUDNN_BATCHNORM_SPATIAL_PERSISTENT = Mode.SPATIAL_PERSISTENT
# cudnnTensorFormat_t, as members of the raw layer's TensorFormat (equal to CuPy 13's ints); its module
# enums.py loads nothing, so importing compat does not load the binding
CUDNN_TENSOR_NCHW = TensorFormat.NCHW
CUDNN_TENSOR_NHWC = TensorFormat.NHWC
# cudnn_ops.h of cuDNN 9 (it was 1e-5 before cuDNN 7.5)
CUDNN_BN_MIN_EPSILON = 0.0

# the training forward's optional arguments, all written in place
_WRITTEN = ("running_mean", "running_var", "mean", "inv_std")
_LAYOUTS = (CUDNN_TENSOR_NCHW, CUDNN_TENSOR_NHWC)  # d_layout's accepted values; NCHW_VECT_C is for int8 data


def getVersion() -> int:  # noqa: N802 (CuPy's name)
    """``cudnnGetVersion()`` of the loaded libcudnn, e.g. 92800 for 9.28.0."""
    from ._cudnn import raw

    return int(raw.library().cudnnGetVersion())


# ---- argument translation ----


def _mode(cudnn_mode) -> Mode:
    try:
        return parse_mode(cudnn_mode)
    except ValueError:
        raise ValueError(
            "cudnn_mode: expected CUDNN_BATCHNORM_PER_ACTIVATION (0), CUDNN_BATCHNORM_SPATIAL (1) or "
            f"CUDNN_BATCHNORM_SPATIAL_PERSISTENT (2), got {cudnn_mode!r}"
        ) from None


def _on_overflow(debug, on_overflow):
    if on_overflow is not None:
        return on_overflow
    return OnOverflow.RAISE if debug else OnOverflow.IGNORE


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """How CuPy 13's ``(is_for_conv2d, d_layout)`` places one call in cudnn_bn's terms."""

    x_shape: tuple[int, ...]  # the caller's shape, restored on x-shaped results
    layout: Layout  # the shape and channel axis cudnn_bn normalizes

    @property
    def channel_axis(self) -> int:
        return self.layout.public_channel_axis

    def data(self, array):
        """An x-shaped argument in the shape cudnn_bn sees."""
        return array.reshape(self.layout.shape)

    def restore(self, array):
        """An x-shaped result back in the caller's shape."""
        return array.reshape(self.x_shape)

    def param(self, name: str, array, *, written: bool = False):
        """A caller's parameter-sized array as cudnn_bn's parameter shape (a view where it is
        ``written``): its memory is read in cuDNN's order, as CuPy 13 passed it to cuDNN."""
        expected = self.layout.param_shape
        if np.dtype(array.dtype).kind != "f":
            raise TypeError(f"{name}: expected a floating dtype, got {np.dtype(array.dtype)}")
        if int(array.size) != math.prod(expected):
            raise ValueError(
                f"{name}: expected {math.prod(expected)} elements (parameter shape {expected} for x of shape "
                f"{self.x_shape} in {self.layout.mode.name}), got shape {tuple(array.shape)}"
            )
        from_cudnn = self.layout.param_axes_from_cudnn
        if from_cudnn is None and tuple(array.shape) == expected:
            return array
        if written and not array.flags.c_contiguous:
            raise ValueError(
                f"{name}: expected a C-contiguous array or one of shape {expected} (it is written in place), "
                f"got a non-contiguous array of shape {tuple(array.shape)}"
            )
        view = array.reshape(self.layout.cudnn_param_shape)
        return view if from_cudnn is None else view.transpose(from_cudnn)

    def param_result(self, array, shape):
        """A parameter-shaped result in cuDNN's memory order, shaped like the caller's ``gamma``."""
        axes = self.layout.param_axes_to_cudnn
        return (array if axes is None else array.transpose(axes)).reshape(shape)


def _geometry(x, is_for_conv2d, d_layout, mode: Mode) -> _Geometry:
    if isinstance(d_layout, bool) or not isinstance(d_layout, (int, np.integer)) or int(d_layout) not in _LAYOUTS:
        accepted = " or ".join(f"CUDNN_TENSOR_{layout.name} ({int(layout)})" for layout in _LAYOUTS)
        raise ValueError(f"d_layout: expected {accepted}, got {d_layout!r}")
    shape = tuple(int(size) for size in x.shape)
    if not is_for_conv2d:
        channels = shape[-1] if shape else 1
        batch = math.prod(shape) // channels if channels else 0
        return _Geometry(shape, make_layout((batch, channels), 1, mode))
    if d_layout == CUDNN_TENSOR_NHWC and len(shape) != 4:
        raise ValueError(
            f"d_layout: CUDNN_TENSOR_NHWC applies to 4-D x here, got {len(shape)}-D x of shape {shape} "
            "(CuPy 13 ignored it there and normalized axis 1; pass CUDNN_TENSOR_NCHW for that, or call "
            "cudnn_bn.forward_training(..., channel_axis=-1) for channels-last data)"
        )
    channel_axis = -1 if d_layout == CUDNN_TENSOR_NHWC else 1
    return _Geometry(shape, make_layout(shape, channel_axis, mode))


def _distinct_outputs(mean, inv_std) -> None:
    if (mean is None) != (inv_std is None):
        given = "mean" if inv_std is None else "inv_std"
        raise ValueError(f"mean, inv_std: expected both or neither (both None to get them returned), got only {given}")
    if mean is not None and mean is inv_std:
        raise ValueError("mean, inv_std: expected two different arrays, got the same one twice")


# ---- the functions ----


def _forward_training(x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay, is_for_conv2d, cudnn_mode,
                      debug, d_layout, on_overflow):
    """(reserve_space, y, save_mean, save_inv_std) of one training forward; every check runs
    before anything is computed or written."""
    _distinct_outputs(mean, inv_std)
    check_eps(eps, training=True)  # named "eps" here, before the saved statistics are built from it
    mode, momentum = _mode(cudnn_mode), 1.0 - check_momentum(decay, "decay")  # cuDNN's factor for CuPy's decay
    if momentum == 0.0:
        running_mean = running_var = None  # decay=1 keeps them as they are: dummies are never touched
    _, (x, gamma, beta, running_mean, running_var, mean, inv_std) = _api.accept_arrays(
        _WRITTEN, _WRITTEN,
        x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, mean=mean, inv_std=inv_std,
    )
    geometry = _geometry(x, is_for_conv2d, d_layout, mode)
    params = [geometry.param(name, array) for name, array in (("gamma", gamma), ("beta", beta))]
    running = [
        None if array is None else geometry.param(name, array, written=True)
        for name, array in (("running_mean", running_mean), ("running_var", running_var))
    ]
    outputs = None
    if mean is not None:
        outputs = [geometry.param(name, array, written=True) for name, array in (("mean", mean), ("inv_std", inv_std))]
        for name, array in (("mean", mean), ("inv_std", inv_std)):
            check_writable(name, array)
        check_no_overlap(
            {"mean": mean, "inv_std": inv_std},
            {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var},
        )
    y, saved = _api.forward_training(
        geometry.data(x), *params, *running, mode=mode, momentum=momentum, eps=eps,
        channel_axis=geometry.channel_axis, on_overflow=_on_overflow(debug, on_overflow),
    )
    y = geometry.restore(y)
    if outputs is None:
        if saved.reserve_space is not None:
            _remember_ex_forward(saved)
        return (
            saved.reserve_space, y,
            geometry.param_result(saved.mean, gamma.shape), geometry.param_result(saved.inv_std, gamma.shape),
        )
    outputs[0][...] = saved.mean
    outputs[1][...] = saved.inv_std
    return saved.reserve_space, y, mean, inv_std


def batch_normalization_forward_training(x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay,
                                         is_for_conv2d, cudnn_mode, debug, d_layout=CUDNN_TENSOR_NCHW, *,
                                         on_overflow=None):
    """Batch-norm training forward, as CuPy 13's ``cupyx.cudnn`` function of this name.

    Args:
        x: float16/32/64 data, numpy or cupy (or another CUDA array); see the module docstring
            for ``is_for_conv2d`` and ``d_layout``.
        gamma, beta: the parameters, any shape holding the parameter count.
        running_mean, running_var: updated in place to ``decay * running + (1 - decay) * batch``
            (unbiased variance); not touched when ``decay == 1``; both None skips the update.
        mean, inv_std: None, or two writable float arrays receiving the batch mean and
            ``1 / sqrt(var + eps)``; passing only one is a ValueError.
        eps: >= CUDNN_BN_MIN_EPSILON (0.0); the same value must go to backward.
        decay: in [0, 1].
        cudnn_mode: CUDNN_BATCHNORM_PER_ACTIVATION, _SPATIAL or _SPATIAL_PERSISTENT.
        debug: for SPATIAL_PERSISTENT, check for overflow and raise CudnnOverflowError.
        on_overflow: keyword only, not in CuPy 13: overrides ``debug`` ("raise", "fallback", "deferred", "ignore").

    Returns:
        ``(y, save_mean, save_inv_std)`` when ``mean`` is None, else ``y``. y has x's shape and
        dtype; the saved statistics gamma's shape and the parameter dtype (float64 for float64
        x, else float32). Results are numpy arrays for numpy input, cupy arrays otherwise.
    """
    _, y, save_mean, save_inv_std = _forward_training(
        x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay, is_for_conv2d, cudnn_mode, debug,
        d_layout, on_overflow,
    )
    return (y, save_mean, save_inv_std) if mean is None else y


def batch_normalization_forward_training_ex(x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay,
                                            is_for_conv2d, cudnn_mode, debug, d_layout=CUDNN_TENSOR_NCHW, *,
                                            on_overflow=None):
    """:func:`batch_normalization_forward_training` that also returns cuDNN's reserve space.

    Returns ``(reserve_space, y, save_mean, save_inv_std)`` when ``mean`` is None, else
    ``(reserve_space, y)``. ``reserve_space`` is a cupy uint8 array where the Ex path ran
    (SPATIAL_PERSISTENT, channels-last, float16, C % 4 == 0, on cuDNN) and None everywhere else
    (always None on numpy). Pass it to :func:`batch_normalization_backward` as ``reserve_space=``.
    """
    reserve_space, y, save_mean, save_inv_std = _forward_training(
        x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay, is_for_conv2d, cudnn_mode, debug,
        d_layout, on_overflow,
    )
    return (reserve_space, y, save_mean, save_inv_std) if mean is None else (reserve_space, y)


def batch_normalization_forward_inference(x, gamma, beta, mean, var, eps, is_for_conv2d, cudnn_mode,
                                          d_layout=CUDNN_TENSOR_NCHW):
    """Batch-norm forward with fixed statistics, as CuPy 13's function of this name.

    ``gamma, beta, mean, var`` hold the parameter count in any shape; returns y with x's shape
    and dtype. SPATIAL_PERSISTENT runs SPATIAL (the same math; cuDNN documents only the other two
    modes for inference).
    """
    mode = _mode(cudnn_mode)
    _, (x, gamma, beta, mean, var) = _api.accept_arrays((), (), x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    geometry = _geometry(x, is_for_conv2d, d_layout, mode)
    params = [
        geometry.param(name, array) for name, array in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))
    ]
    y = _api.forward_inference(geometry.data(x), *params, mode=mode, eps=eps, channel_axis=geometry.channel_axis)
    return geometry.restore(y)


def batch_normalization_backward(x, gamma, gy, mean, inv_std, eps, is_for_conv2d, cudnn_mode, debug,
                                 d_layout=CUDNN_TENSOR_NCHW, *, reserve_space=None, on_overflow=None):
    """Gradients of the training forward, as CuPy 13's function of this name.

    Args:
        x, gamma, gy: as given to (and received from) the forward call.
        mean, inv_std: ``save_mean`` and ``save_inv_std`` of the forward call (required).
        eps, is_for_conv2d, cudnn_mode, d_layout: the forward call's values.
        debug: for SPATIAL_PERSISTENT, check for overflow and raise CudnnOverflowError.
        reserve_space: the first result of :func:`batch_normalization_forward_training_ex`
            (None where it returned None); it lets cuDNN run the matching BackwardEx call.
        on_overflow: keyword only, not in CuPy 13: overrides ``debug``.

    Returns:
        ``(gx, ggamma, gbeta)``: gx with x's shape and dtype; ggamma and gbeta with gamma's shape,
        in the parameter dtype, or x's dtype where gamma's dtype is not the parameter dtype (as
        CuPy 13 converted them).
    """
    mode, eps = _mode(cudnn_mode), check_eps(eps, training=True)
    for name, array in (("mean", mean), ("inv_std", inv_std)):
        if array is None:
            raise TypeError(f"{name}: expected the saved statistic returned by the forward call, got None")
    kind, (x, gamma, gy, mean, inv_std) = _api.accept_arrays(
        (), (), x=x, gamma=gamma, gy=gy, mean=mean, inv_std=inv_std
    )
    _check_reserve_space(kind, reserve_space)
    geometry = _geometry(x, is_for_conv2d, d_layout, mode)
    saved = SavedStats(
        mean=geometry.param("mean", mean),
        inv_std=geometry.param("inv_std", inv_std),
        mode=mode,
        eps=eps,
        channel_axis=geometry.channel_axis,
        reserve_space=reserve_space,
    )
    reserve_ops = None if reserve_space is None else _ex_forward_ops(saved)
    if reserve_ops is not None:
        # the statistics the forward returned with this reserve space, where it wrote them: what
        # the package's own SavedStats of that forward holds (cudnn_bn/_cudnn/ops.py, BackwardEx)
        saved = trusted_saved_stats(saved.mean, saved.inv_std, saved.mode, saved.eps, saved.channel_axis,
                                    saved.reserve_space, saved.on_overflow, from_forward=True, reserve_ops=reserve_ops)
    gx, ggamma, gbeta = _api.backward(
        geometry.data(x), geometry.data(gy), geometry.param("gamma", gamma), saved,
        on_overflow=_on_overflow(debug, on_overflow),
    )
    ggamma, gbeta = (geometry.param_result(array, gamma.shape) for array in (ggamma, gbeta))
    if np.dtype(gamma.dtype) != np.dtype(ggamma.dtype):
        ggamma, gbeta = ggamma.astype(x.dtype), gbeta.astype(x.dtype)
    return geometry.restore(gx), ggamma, gbeta


# reserve space address -> (the addresses of the saved mean and inv_std its forward returned, the
# bnOps that filled it, a token of the entry). CuPy 13's API hands the three arrays back
# separately; the entry lives as long as the reserve space, whose address no other array can have
# meanwhile.
_EX_FORWARDS: dict = {}
_EX_FORWARDS_LOCK = threading.Lock()


def _remember_ex_forward(saved: SavedStats) -> None:
    address = saved.reserve_space.data.ptr
    entry = (saved.mean.data.ptr, saved.inv_std.data.ptr, reserve_filled_by(saved), object())
    with _EX_FORWARDS_LOCK:
        _EX_FORWARDS[address] = entry
    weakref.finalize(saved.reserve_space, _forget_ex_forward, address, entry)


def _forget_ex_forward(address: int, entry) -> None:
    with _EX_FORWARDS_LOCK:
        if _EX_FORWARDS.get(address) is entry:
            del _EX_FORWARDS[address]


def _ex_forward_ops(saved: SavedStats):
    """The bnOps of the forward that filled ``saved``'s reserve space, when it returned these very
    arrays as its statistics; None otherwise (for a copy of any of them, or statistics written into
    the caller's arrays: the backward then runs without the reserve space)."""
    entry = _EX_FORWARDS.get(saved.reserve_space.data.ptr)
    if entry is None or entry[:2] != (saved.mean.data.ptr, saved.inv_std.data.ptr):
        return None
    return entry[2]


def _check_reserve_space(kind: str, reserve_space) -> None:
    if reserve_space is None:
        return
    if kind == "numpy":
        raise TypeError(
            f"reserve_space: the NumPy reference has none; expected None, got {type(reserve_space).__name__}"
        )
    try:
        reserve_kind = array_kind(reserve_space=reserve_space)
    except TypeError:
        reserve_kind = None
    if reserve_kind != "cupy":
        raise TypeError(
            "reserve_space: expected None or the reserve_space returned by batch_normalization_forward_training_ex "
            f"(a cupy array), got {type(reserve_space).__name__}"
        )
