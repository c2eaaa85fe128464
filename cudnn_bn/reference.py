"""The NumPy reference for cuDNN's batch normalization, in all three modes.

x is viewed, without a copy, as an (outer, groups, inner) array: the values that share a statistic
are one group (a channel in the spatial modes, an activation in PER_ACTIVATION) across the outer and
inner axes. NCHW in a spatial mode is (N, C, H*W), channels-last is (N*H*W, C, 1), PER_ACTIVATION is
(N, C*H*W, 1). Every mode and layout then reduces to sums over axes 0 and 2, with no Python loop
over channels or elements and no transposing copy.

The work runs over cache-sized blocks of that view. Each block is widened into a small float64
buffer, and every subtraction, product and sum happens there; only the rounded result is written
out. So the arithmetic is the same float64 arithmetic whatever x's dtype (a float32 result is the
float64 result rounded, bit for bit), the variance is two-pass (exact for large offsets), and no
float64 copy of x is ever made: the float64 temporaries are a few blocks, not x-sized arrays.
Results are new C-contiguous arrays in x's axis order. float16 is widened and rounded through
float32 bit patterns with integer ufuncs (exactly NumPy's casts, at a fraction of their cost).

One exception, for speed: ``forward_inference`` on float32 data computes its elementwise pass in
float32, in place in y, with the mean split into two float32 parts so that ``x - mean`` keeps
float64's accuracy. Its result is within a few float32 ulps of the float64 result (tested), not
bit-equal.

SPATIAL_PERSISTENT computes exactly what SPATIAL computes; its differences on cuDNN (overflow, the
saved-statistics rule) are enforced by the shared checks.

``backward_inference`` is the gradient of ``forward_inference`` with its statistics held fixed
(a frozen batch norm), in float64 like training and backward.

The fused calls' reference is here too (``fused_forward_training``, ``fused_forward_inference``,
``fused_backward``, ``fused_backward_inference``; cudnn_bn.fused publishes them as
``reference_*``): the plain reference's float64 arithmetic, then the residual add and the
activation also in float64, each result rounded once to its dtype. ``activation_mask`` is the one
definition of where an activation passes the gradient.
"""

from __future__ import annotations

import math

import numpy as np

from ._core.arrays import OPTIONAL_ARRAYS, array_kind, kind_module
from ._core.fused_saved import (
    PATH_REFERENCE,
    FusedSaved,
    check_forward_output,
    check_fused_saved,
    check_residual,
)
from ._core.layout import Layout
from ._core.modes import Activation, parse_activation
from ._core.saved import SavedStats, trusted_saved_stats
from ._core.validate import (
    check_backward,
    check_backward_inference,
    check_fold,
    check_forward_inference,
    check_forward_training,
    resolve_backward_settings,
)

__all__ = [
    "activation_mask",
    "backward",
    "backward_inference",
    "fold_inference",
    "forward_inference",
    "forward_training",
    "fused_backward",
    "fused_backward_inference",
    "fused_forward_inference",
    "fused_forward_training",
]

# Elements per block, at most: 1 MiB of float64. NumPy's elementwise passes stream x from memory
# about twice as fast in blocks of this size as in L2-sized ones, and per-call overhead stays small.
_MAX_BLOCK_ELEMENTS = 1 << 17
# Below this (64 KiB of float64) per-block overhead would dominate.
_MIN_BLOCK_ELEMENTS = 1 << 13
# Every float64 temporary (two scratch blocks, block-shaped parameters and running sums, at most
# eight in all) is at most this fraction of x, so that together they stay within one x-sized
# float64 array once x has 8 * _MIN_BLOCK_ELEMENTS elements.
_TEMPORARY_FRACTION_OF_X = 1 / 8


def _require_numpy(*, optional=OPTIONAL_ARRAYS, refused_as="cudnn_bn.reference", calls="cudnn_bn", **named) -> None:
    if array_kind(optional=optional, **named) != "numpy":
        raise TypeError(f"{refused_as}: expected numpy arrays; use {calls}.forward_training etc. for cupy arrays")


def _grouped_shape(layout: Layout) -> tuple[int, int, int]:
    """(outer, groups, inner): x's C-order reshape whose axis 1 indexes the statistics."""
    shape = layout.shape
    if layout.mode.is_spatial and layout.ndim > 2:
        if layout.channels_last:
            return (math.prod(shape[:-1]), layout.channels, 1)
        return (shape[0], layout.channels, math.prod(shape[2:]))
    return (shape[0], math.prod(shape[1:]), 1)


def _grouped(array: np.ndarray, shape) -> np.ndarray:
    """The (outer, groups, inner) view of an x-shaped array (a copy in its own dtype only when its
    memory order does not allow a view)."""
    return np.ascontiguousarray(array).reshape(shape)


class _Blocks:
    """The blocks that cover an (outer, groups, inner) array, with per-call scratch buffers.

    A block spans whole rows of the outer axis when a row is small, else part of the groups of
    one row, else part of the inner axis of one group. Blocks are indexed by a tuple of three
    slices; ``local(block)`` indexes the same block inside a block-shaped per-group array.

    Per-group arrays (parameters, running sums) are written out at ``block_shaped`` size so that
    every operation runs on whole arrays: NumPy broadcasts a per-group value along a short inner
    axis about 1.6x slower, and reduces over a long outer axis (channels-last) about 3x slower.
    Where x is a single block, or that size would be too large next to x, they stay vectors.

    The arithmetic is elementwise on float64 (float16/float32 blocks are widened exactly first),
    and every sum runs over a block-shaped accumulator or a contiguous float64 block, so the
    float64 result does not depend on x's dtype.
    """

    def __init__(self, shape: tuple[int, int, int], dtype):
        outer, groups, inner = shape
        self.shape = shape
        self._half = np.dtype(dtype) == np.float16
        size = outer * groups * inner
        budget = int(size * _TEMPORARY_FRACTION_OF_X)
        block_elements = min(_MAX_BLOCK_ELEMENTS, max(_MIN_BLOCK_ELEMENTS, budget))
        inner_step = min(inner, block_elements)
        group_step = min(groups, max(1, block_elements // inner_step)) if inner_step == inner else 1
        outer_step = min(outer, max(1, block_elements // (group_step * inner_step))) if group_step == groups else 1
        self.slices = [
            (
                slice(a, min(a + outer_step, outer)),
                slice(g, min(g + group_step, groups)),
                slice(i, min(i + inner_step, inner)),
            )
            for a in range(0, outer, outer_step)
            for g in range(0, groups, group_step)
            for i in range(0, inner, inner_step)
        ]
        self.block_shaped = (outer_step, groups, inner_step)
        # written out only where they are reused by several blocks
        self.write_out = len(self.slices) > 1 and math.prod(self.block_shaped) <= max(block_elements, budget)
        self._block_elements = outer_step * group_step * inner_step
        self._scratch = None  # allocated on first use
        self._bits = None

    def local(self, block) -> tuple[slice, slice, slice]:
        outer, groups, inner = block
        return slice(0, outer.stop - outer.start), groups, slice(0, inner.stop - inner.start)

    def buffers(self, block) -> tuple[np.ndarray, np.ndarray]:
        """Two contiguous float64 scratch arrays with the shape of ``block``."""
        shape = tuple(s.stop - s.start for s in block)
        size = math.prod(shape)
        if self._scratch is None:
            self._scratch = np.empty((2, self._block_elements))
        return self._scratch[0, :size].reshape(shape), self._scratch[1, :size].reshape(shape)

    def bits(self, block) -> tuple[np.ndarray, np.ndarray] | None:
        """Two uint32 scratch arrays with the shape of ``block`` for float16 data (the bit-level
        conversions), else None."""
        if not self._half:
            return None
        shape = tuple(s.stop - s.start for s in block)
        size = math.prod(shape)
        if self._bits is None:
            self._bits = np.empty((2, self._block_elements), np.uint32)
        return tuple(row[:size].reshape(shape) for row in self._bits)

    def param(self, values: np.ndarray) -> "_Param":
        """A per-group vector (groups,) ready to combine with any block."""
        return _Param(values, self)

    def group_sums(self, terms) -> list[np.ndarray]:
        """Per-group float64 sums of the block-shaped arrays that ``terms(block)`` returns."""
        sums = None
        for block in self.slices:
            partials = terms(block)
            if sums is None:
                sums = [np.zeros(self.block_shaped if self.write_out else self.shape[1]) for _ in partials]
            for total, partial in zip(sums, partials):
                if self.write_out:
                    target = total[self.local(block)]
                    np.add(target, partial, out=target)
                else:
                    # contiguous float64, so the order of the sum depends on the block's shape alone
                    total[block[1]] += np.add.reduce(np.ascontiguousarray(partial, dtype=np.float64), axis=(0, 2))
        if self.write_out:
            sums = [np.add.reduce(total, axis=(0, 2)) for total in sums]
        return sums


class _Param:
    """A per-group vector, broadcast against blocks (written out at block shape when that pays)."""

    def __init__(self, values: np.ndarray, blocks: _Blocks):
        self._blocks = blocks
        if blocks.write_out:
            self._array = np.ascontiguousarray(np.broadcast_to(values[None, :, None], blocks.block_shaped))
        else:
            self._array = values[None, :, None]

    def __getitem__(self, block) -> np.ndarray:
        if self._blocks.write_out:
            return self._array[self._blocks.local(block)]
        return self._array[:, block[1], :]


def _widened(source: np.ndarray, scratch: np.ndarray, bits=None) -> np.ndarray:
    """source as float64: itself, or widened into scratch (exact; faster than a mixed-dtype ufunc).
    float16 needs ``bits`` (from ``_Blocks.bits``)."""
    if source.dtype == np.float64:
        return source
    if source.dtype == np.float16:
        _widen_float16(source, scratch, bits[0])
    else:
        np.copyto(scratch, source, casting="safe")
    return scratch


# float16 <-> float64 by NumPy's casts costs 1-2 ns per element here (about ten times a float32 <->
# float64 cast), so float16 data moves through float32 bit patterns instead, with integer ufuncs.
# float32 has float16's 10 mantissa bits plus 13 more, and its exponent bias is 127 - 15 = 112
# larger.
_HALF_DROPPED_BITS = 13
_FLOAT16_BIAS_IN_FLOAT32 = np.float32(2.0**112)
_FLOAT32_OF_SMALLEST_NORMAL_FLOAT16 = 0x38800000  # 2**-14
_FLOAT32_OF_FLOAT16_OVERFLOW = 0x477FF000  # 65520: from here on, float16 rounds to inf
_FLOAT16_MIDPOINT_LOW_BITS = 0x1000  # the dropped bits of a value halfway between two float16s


def _widen_float16(source: np.ndarray, target: np.ndarray, bits: np.ndarray) -> None:
    """target (float64) = source (float16), exactly.

    The sign-extended float16 bits shifted by 13 put sign, exponent and mantissa at float32's
    places (the sign's copies are masked off); as a float32 that is the value times 2**-112, which
    one exact product by 2**112 undoes, subnormals included. Inf and NaN (exponent 31) do not
    survive the product; a block holding one takes NumPy's cast instead.
    """
    np.copyto(bits.view(np.int32), source.view(np.int16), casting="safe")
    np.left_shift(bits, _HALF_DROPPED_BITS, out=bits)
    np.bitwise_and(bits, np.uint32(0x8FFFE000), out=bits)
    single = bits.view(np.float32)
    np.multiply(single, _FLOAT16_BIAS_IN_FLOAT32, out=single)
    np.copyto(target, single)
    if not (single.max() < 65536.0 and single.min() > -65536.0):  # inf or NaN in source
        np.copyto(target, source)


def _round_to_float16(values: np.ndarray, target: np.ndarray, bits) -> None:
    """target (float16) = values (float64) rounded to nearest, ties to even: NumPy's cast, faster.

    values are rounded to float32 first, and float32 to float16 by integer ufuncs (add half a
    float16 ulp less one, plus the kept lowest bit, then truncate). The two roundings give the
    direct rounding except where the float32 lands exactly on a float16 midpoint (the tie may then
    break the wrong way), and the integer path covers float16's normal range only; those elements
    (midpoints, |value| < 2**-14, |value| >= 65520, NaN: rare in practice) take NumPy's cast of
    the float64 value.
    """
    magnitude, rounded = bits
    half = target.view(np.uint16)
    np.copyto(magnitude.view(np.float32), values, casting="same_kind")
    np.right_shift(magnitude, 16, out=rounded)
    np.bitwise_and(rounded, 0x8000, out=rounded)
    np.copyto(half, rounded, casting="unsafe")  # the sign, at float16's place
    np.bitwise_and(magnitude, 0x7FFFFFFF, out=magnitude)
    np.right_shift(magnitude, _HALF_DROPPED_BITS, out=rounded)
    np.bitwise_and(rounded, 1, out=rounded)
    np.add(rounded, magnitude, out=rounded)
    # round, and rebias the exponent (wrapping arithmetic: the sum stays positive in the normal range)
    np.add(rounded, np.uint32((0xFFF - (112 << 23)) % (1 << 32)), out=rounded)
    np.right_shift(rounded, _HALF_DROPPED_BITS, out=rounded)
    np.bitwise_or(half, rounded, out=half, casting="unsafe")
    np.bitwise_and(magnitude, 0x1FFF, out=rounded)
    exceptions = rounded == _FLOAT16_MIDPOINT_LOW_BITS
    np.subtract(magnitude, np.uint32(_FLOAT32_OF_SMALLEST_NORMAL_FLOAT16), out=rounded)
    exceptions |= rounded >= np.uint32(_FLOAT32_OF_FLOAT16_OVERFLOW - _FLOAT32_OF_SMALLEST_NORMAL_FLOAT16)
    if exceptions.any():
        # through flat indices: np.nonzero on a 3-d mask costs more than the whole conversion
        where = np.unravel_index(np.flatnonzero(exceptions), exceptions.shape)
        target[where] = values[where].astype(np.float16)


def _centered(source: np.ndarray, mean_block: np.ndarray, scratch: np.ndarray, bits=None) -> np.ndarray:
    """scratch = source - mean, in float64."""
    return np.subtract(_widened(source, scratch, bits), mean_block, out=scratch)


def _finish(ufunc, first, second, target: np.ndarray, scratch: np.ndarray, bits=None) -> None:
    """target = ufunc(first, second), computed in float64 and rounded once to target's dtype (a
    separate cast is faster than a ufunc writing a narrower dtype). float16 needs ``bits``."""
    if target.dtype == np.float64:
        ufunc(first, second, out=target)
    elif target.dtype == np.float16:
        _round_to_float16(ufunc(first, second, out=scratch), target, bits)
    else:
        np.copyto(target, ufunc(first, second, out=scratch), casting="same_kind")


def _batch_stats(x3: np.ndarray, blocks: _Blocks, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group means and biased variances (two passes over x, so exact for large offsets)."""
    (total,) = blocks.group_sums(lambda block: [_widened(x3[block], blocks.buffers(block)[0], blocks.bits(block))])
    mean = total / count
    mean_param = blocks.param(mean)

    def squares(block):
        centered = _centered(x3[block], mean_param[block], blocks.buffers(block)[0], blocks.bits(block))
        return [np.multiply(centered, centered, out=centered)]

    (squared,) = blocks.group_sums(squares)
    return mean, squared / count


def _row(param) -> np.ndarray:
    """Parameter-shaped array -> float64 vector of length groups (x's own axis order)."""
    return np.asarray(param, dtype=np.float64).reshape(-1)


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode="spatial", momentum=0.1, eps=1e-5,
                     channel_axis=1):
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
        ``(y, saved)``: y in x's dtype and shape, C-contiguous; :class:`~cudnn_bn.SavedStats` in the
        parameter dtype.
    """
    _require_numpy(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    layout = checked.layout
    shape = _grouped_shape(layout)
    blocks = _Blocks(shape, checked.data_dtype)
    x3 = _grouped(x, shape)
    mean, biased_var = _batch_stats(x3, blocks, layout.count)
    inv_std = 1.0 / np.sqrt(biased_var + checked.eps)
    mean_param, scale, shift = blocks.param(mean), blocks.param(inv_std * _row(gamma)), blocks.param(_row(beta))
    y = np.empty(layout.shape, checked.data_dtype)
    y3 = y.reshape(shape)
    for block in blocks.slices:
        bits = blocks.bits(block)
        centered = _centered(x3[block], mean_param[block], blocks.buffers(block)[0], bits)
        np.multiply(centered, scale[block], out=centered)
        _finish(np.add, centered, shift[block], y3[block], centered, bits)
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
    return y, saved


def forward_inference(x, gamma, beta, mean, var, *, mode="spatial", eps=1e-5, channel_axis=1):
    """Batch-norm forward with fixed statistics: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Shapes and dtypes as in :func:`forward_training`; ``mean`` and ``var`` have the parameter shape.
    Returns y in x's dtype and shape, C-contiguous. float16 and float64 data are computed in
    float64 and rounded once; float32 data in float32 with a two-part mean (within a few float32
    ulps of the float64 result).
    """
    _require_numpy(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    layout = checked.layout
    shape = _grouped_shape(layout)
    blocks = _Blocks(shape, checked.data_dtype)
    x3 = _grouped(x, shape)
    mean64 = _row(mean)
    scale64 = _row(gamma) / np.sqrt(_row(var) + checked.eps)
    y = np.empty(layout.shape, checked.data_dtype)
    y3 = y.reshape(shape)
    if checked.data_dtype != np.float32:
        # float64, and float16 (whose conversions to and from float32 cost NumPy more than the
        # float64 arithmetic): computed in float64 and rounded once
        mean_param, scale, shift = blocks.param(mean64), blocks.param(scale64), blocks.param(_row(beta))
        for block in blocks.slices:
            bits = blocks.bits(block)
            centered = _centered(x3[block], mean_param[block], blocks.buffers(block)[0], bits)
            np.multiply(centered, scale[block], out=centered)
            _finish(np.add, centered, shift[block], y3[block], centered, bits)
        return y
    # float32 data is computed in place in y, in float32. x - mean_high is exact wherever x is
    # near the mean (Sterbenz), and mean_low carries the rest of the float64 mean, so
    # cancellation costs no accuracy.
    mean_high = mean64.astype(np.float32)
    mean_low = (mean64 - mean_high).astype(np.float32)
    as_param = lambda values: blocks.param(values.astype(np.float32))  # noqa: E731
    high, scale, shift = as_param(mean_high), as_param(scale64), as_param(_row(beta))
    low = as_param(mean_low) if mean_low.any() else None
    for block in blocks.slices:
        work = np.subtract(x3[block], high[block], out=y3[block])
        if low is not None:
            np.subtract(work, low[block], out=work)
        np.multiply(work, scale[block], out=work)
        np.add(work, shift[block], out=work)
    return y


def backward(x, dy, gamma, saved=None, *, mode=None, eps=None, channel_axis=None):
    """Gradients of batch-norm training forward: ``(dx, dgamma, dbeta)``.

    With ``saved`` (from :func:`forward_training`) its mean, inverse std, mode, eps and channel_axis
    are used; an explicit argument that disagrees is a ValueError. With ``saved=None`` the batch
    statistics are recomputed and ``mode`` and ``eps`` are required (not allowed for
    SPATIAL_PERSISTENT). dx has x's dtype and shape (C-contiguous); dgamma and dbeta the parameter
    dtype and shape.
    """
    _require_numpy(x=x, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved, mode, eps, channel_axis)
    if mode == "auto":
        raise ValueError("mode: the reference needs an explicit mode, got 'auto'")
    checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
    layout = checked.layout
    shape = _grouped_shape(layout)
    blocks = _Blocks(shape, checked.data_dtype)
    x3, dy3 = _grouped(x, shape), _grouped(dy, shape)
    if saved is None:
        mean, biased_var = _batch_stats(x3, blocks, layout.count)
        inv_std = 1.0 / np.sqrt(biased_var + checked.eps)
    else:
        mean, inv_std = _row(saved.mean), _row(saved.inv_std)
    mean_param = blocks.param(mean)
    dbeta, centered_dgamma = _gradient_sums(x3, dy3, blocks, mean_param)
    dgamma = centered_dgamma * inv_std
    # dx = k * (dy - (dbeta + x_hat * dgamma) / m) with k = gamma * inv_std and x_hat = (x - mean) * inv_std,
    # written as k * dy - ((x - mean) * c + d) so that each block costs few passes
    k = _row(gamma) * inv_std
    k_param = blocks.param(k)
    c_param = blocks.param(k * inv_std * dgamma / layout.count)
    d_param = blocks.param(k * dbeta / layout.count)
    dx = np.empty(layout.shape, checked.data_dtype)
    dx3 = dx.reshape(shape)
    for block in blocks.slices:
        centered, scaled_grad = blocks.buffers(block)
        bits = blocks.bits(block)
        _centered(x3[block], mean_param[block], centered, bits)
        np.multiply(centered, c_param[block], out=centered)
        np.add(centered, d_param[block], out=centered)
        np.multiply(_widened(dy3[block], scaled_grad, bits), k_param[block], out=scaled_grad)
        _finish(np.subtract, scaled_grad, centered, dx3[block], centered, bits)
    as_param = lambda row: row.reshape(layout.param_shape).astype(checked.param_dtype)  # noqa: E731
    return dx, as_param(dgamma), as_param(dbeta)


def _gradient_sums(x3, dy3, blocks: _Blocks, mean_param: _Param) -> list[np.ndarray]:
    """Per-group float64 ``[sum(dy), sum(dy * (x - mean))]``: dbeta, and dgamma before its
    factor inv_std."""

    def terms(block):
        centered, grad = blocks.buffers(block)
        bits = blocks.bits(block)
        grad = _widened(dy3[block], grad, bits)
        _centered(x3[block], mean_param[block], centered, bits)
        return [grad, np.multiply(centered, grad, out=centered)]

    return blocks.group_sums(terms)


def backward_inference(x, dy, gamma, mean, var, *, mode="spatial", eps=1e-5, channel_axis=1):
    """Gradients of :func:`forward_inference` with respect to x, gamma and beta: ``(dx, dgamma,
    dbeta)``, the statistics held fixed (a frozen batch norm; docs/math.md).

    ``dx = gamma * inv_std * dy``, ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)`` with
    ``inv_std = 1 / sqrt(var + eps)`` and ``x_hat = (x - mean) * inv_std``, sums over each
    statistic's group. Arguments as :func:`forward_inference`, with dy (x's shape and dtype) in
    place of beta. Computed in float64 and rounded once: dx in x's dtype and shape (C-contiguous),
    dgamma and dbeta in the parameter dtype and shape.
    """
    _require_numpy(x=x, dy=dy, gamma=gamma, mean=mean, var=var)
    checked = check_backward_inference(x, dy, gamma, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    layout = checked.layout
    shape = _grouped_shape(layout)
    blocks = _Blocks(shape, checked.data_dtype)
    x3, dy3 = _grouped(x, shape), _grouped(dy, shape)
    inv_std = 1.0 / np.sqrt(_row(var) + checked.eps)
    dbeta, centered_dgamma = _gradient_sums(x3, dy3, blocks, blocks.param(_row(mean)))
    scale = blocks.param(_row(gamma) * inv_std)
    dx = np.empty(layout.shape, checked.data_dtype)
    dx3 = dx.reshape(shape)
    for block in blocks.slices:
        grad, _ = blocks.buffers(block)
        bits = blocks.bits(block)
        _finish(np.multiply, _widened(dy3[block], grad, bits), scale[block], dx3[block], grad, bits)
    as_param = lambda row: row.reshape(layout.param_shape).astype(checked.param_dtype)  # noqa: E731
    return dx, as_param(centered_dgamma * inv_std), as_param(dbeta)


def fold_inference(gamma, beta, mean, var, eps=1e-5):
    """Fold fixed statistics into one affine map: ``(scale, shift)`` with
    ``forward_inference(x, ...) == scale * x + shift`` once both are broadcast over x's channel layout.

    Args:
        gamma, beta, mean, var: float arrays of one shape (the parameter shape), numpy or cupy.
        eps: added to ``var``, as in :func:`forward_inference` (default 1e-5 like the other calls).

    Returns:
        ``(scale, shift)`` with the parameters' shape and a dtype of at least float32.
    """
    xp = kind_module(array_kind(gamma=gamma, beta=beta, mean=mean, var=var))
    eps = check_fold(gamma, beta, mean, var, eps)
    dtype = np.result_type(gamma.dtype, beta.dtype, mean.dtype, var.dtype, np.float32)
    # asarray: the results are plain arrays of the kind, whatever ndarray subclass (np.memmap) came in
    gamma, beta, mean, var = (xp.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / (var + eps) ** 0.5
    return scale.astype(dtype), (beta - mean * scale).astype(dtype)


# ---- fused: the batch norm, then the residual add and the activation, all in float64 ----
_FUSED_OPTIONAL = OPTIONAL_ARRAYS + ("residual",)
_FUSED_REFUSED_AS = "cudnn_bn.fused.reference_*"  # the names cudnn_bn.fused publishes these under


def _require_numpy_fused(**named) -> None:
    _require_numpy(optional=_FUSED_OPTIONAL, refused_as=_FUSED_REFUSED_AS, calls="cudnn_bn.fused", **named)


def _activate(pre: np.ndarray, activation: Activation) -> np.ndarray:
    """act(pre) in place on a float64 array. ReLU: fmax(pre, 0), so NaN gives 0 as in cuDNN's
    fused kernels (their activation descriptor does not propagate NaN)."""
    if activation is Activation.RELU:
        return np.fmax(pre, 0.0, out=pre)
    raise NotImplementedError(f"activation {activation}")  # parse_activation admits no other


def activation_mask(y, activation: Activation):
    """Where the activation passes the gradient, read from its output: ReLU's derivative is 1
    where y > 0 and 0 elsewhere, including a pre-activation of exactly 0 (docs/math.md). A
    boolean array of y's kind (numpy or cupy); the one definition of it on the host side, used by
    the fused reference and by the synchronized layer."""
    if activation is Activation.RELU:
        return y > 0
    raise NotImplementedError(f"activation {activation}")


def fused_forward_training(x, gamma, beta, running_mean=None, running_var=None, *, residual=None, activation="relu",
                           mode="spatial", momentum=0.1, eps=1e-5, channel_axis=1):
    """Fused forward training on numpy arrays: ``y = act(BN(x) + residual)``
    (``cudnn_bn.fused.reference_forward_training``).

    Args: as :func:`forward_training`, plus ``residual`` (None or an array of x's shape and dtype,
    not overlapping x) and ``activation`` ("relu" or an Activation).

    Returns ``(y, saved)``: y in x's dtype and shape, C-contiguous, computed in float64 and rounded
    once; saved a :class:`~cudnn_bn.fused.FusedSaved` (path PATH_REFERENCE). Running statistics as
    the plain call. The float64 work uses x-sized float64 temporaries.
    """
    _require_numpy_fused(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
                         residual=residual)
    activation = parse_activation(activation)
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    check_residual(x, residual, running_mean, running_var)
    # the plain reference on x widened exactly: its float64 result before any rounding
    pre, stats64 = forward_training(
        x.astype(np.float64), gamma, beta, running_mean, running_var, mode=checked.layout.mode, momentum=momentum,
        eps=checked.eps, channel_axis=channel_axis,
    )
    if residual is not None:
        np.add(pre, residual, out=pre)
    y = _activate(pre, activation).astype(checked.data_dtype, copy=False)
    stats = trusted_saved_stats(
        stats64.mean.astype(checked.param_dtype), stats64.inv_std.astype(checked.param_dtype), stats64.mode,
        stats64.eps, stats64.channel_axis,
    )
    return y, FusedSaved(stats, activation, residual is not None, PATH_REFERENCE)


def fused_forward_inference(x, gamma, beta, mean, var, *, residual=None, activation="relu", mode="spatial",
                            eps=1e-5, channel_axis=1):
    """Fused forward with fixed statistics on numpy arrays: ``act(BN(x) + residual)``, computed in
    float64 and rounded once to x's dtype (C-contiguous, x's shape)
    (``cudnn_bn.fused.reference_forward_inference``)."""
    _require_numpy_fused(x=x, gamma=gamma, beta=beta, mean=mean, var=var, residual=residual)
    activation = parse_activation(activation)
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    check_residual(x, residual)
    pre = forward_inference(
        x.astype(np.float64), gamma, beta, mean, var, mode=checked.layout.mode, eps=checked.eps,
        channel_axis=channel_axis,
    )
    if residual is not None:
        np.add(pre, residual, out=pre)
    return _activate(pre, activation).astype(checked.data_dtype, copy=False)


def fused_backward_inference(x, y, dy, gamma, mean, var, *, activation="relu", mode="spatial", eps=1e-5,
                             channel_axis=1):
    """Gradients of :func:`fused_forward_inference` on numpy arrays, the statistics held fixed:
    ``(dx, dresidual, dgamma, dbeta)`` (``cudnn_bn.fused.reference_backward_inference``).

    ``y`` is the forward's output, whose activation mask gives ``g = dy * act'(y)``; dresidual is
    g (the gradient of a residual the forward added; there is no saved state to say whether it
    did), and :func:`backward_inference` of g gives dx, dgamma, dbeta. In float64, rounded once:
    dx and dresidual in x's dtype (C-contiguous), dgamma and dbeta in the parameter dtype.
    """
    _require_numpy_fused(x=x, y=y, dy=dy, gamma=gamma, mean=mean, var=var)
    activation = parse_activation(activation)
    checked = check_backward_inference(x, dy, gamma, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    check_forward_output(x, y)
    grad = np.ascontiguousarray(np.where(activation_mask(y, activation), dy.astype(np.float64), 0.0))
    dx, dgamma, dbeta = backward_inference(
        x.astype(np.float64), grad, gamma, mean, var, mode=checked.layout.mode, eps=checked.eps,
        channel_axis=channel_axis,
    )
    return (
        dx.astype(checked.data_dtype, copy=False), grad.astype(checked.data_dtype),
        dgamma.astype(checked.param_dtype, copy=False), dbeta.astype(checked.param_dtype, copy=False),
    )


def fused_backward(x, y, dy, gamma, saved, *, mode=None, eps=None, channel_axis=None):
    """Gradients of the fused forward on numpy arrays: ``(dx, dresidual, dgamma, dbeta)``
    (``cudnn_bn.fused.reference_backward``).

    ``y`` is the forward's output; ``saved`` its :class:`~cudnn_bn.fused.FusedSaved`. The
    activation's gradient ``g = dy * act'(y)`` (for ReLU: dy where y > 0, else 0) is dresidual
    (None when the forward had no residual), and the batch-norm backward of g gives dx, dgamma,
    dbeta, all in float64 and rounded once: dx and dresidual in x's dtype (C-contiguous), dgamma
    and dbeta in the parameter dtype. ``mode``, ``eps``, ``channel_axis`` as in :func:`backward`.
    """
    saved = check_fused_saved(saved)
    _require_numpy_fused(x=x, y=y, dy=dy, gamma=gamma)
    mode, eps, channel_axis = resolve_backward_settings(x, saved.stats, mode, eps, channel_axis)
    if mode == "auto":
        mode = saved.mode
    checked = check_backward(x, dy, gamma, saved.stats, mode=mode, eps=eps, channel_axis=channel_axis)
    check_forward_output(x, y)
    grad = np.where(activation_mask(y, saved.activation), dy.astype(np.float64), 0.0)
    grad = np.ascontiguousarray(grad)
    stats64 = trusted_saved_stats(
        saved.mean.astype(np.float64), saved.inv_std.astype(np.float64), saved.mode, saved.eps, saved.channel_axis
    )
    dx, dgamma, dbeta = backward(
        x.astype(np.float64), grad, gamma, stats64, mode=mode, eps=eps, channel_axis=channel_axis
    )
    dresidual = grad.astype(checked.data_dtype) if saved.has_residual else None
    return (
        dx.astype(checked.data_dtype, copy=False), dresidual,
        dgamma.astype(checked.param_dtype, copy=False), dbeta.astype(checked.param_dtype, copy=False),
    )
