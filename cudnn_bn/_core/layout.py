"""The one place that maps an array layout to batch-norm axes, parameter shapes and cuDNN's
order: its dims and strides, and the order in which it reads and writes the parameters.

An input has 2 to 5 dims: the batch axis first, channels at ``channel_axis`` (1, or -1 for
channels-last) and spatial axes elsewhere. cuDNN always describes tensors in N, C, spatial order
and expresses channels-last through strides, so both orders map onto the same descriptor shape.
Its parameters are packed in that order too (C first), which differs from x's own axis order
only for PER_ACTIVATION on channels-last data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .modes import Mode

__all__ = [
    "Layout",
    "MAX_NDIM",
    "MIN_NDIM",
    "cudnn_columns_dims_and_strides",
    "cudnn_dims_and_strides",
    "make_layout",
    "physical_shape",
]

MIN_NDIM = 2
MAX_NDIM = 5
_CUDNN_MIN_DIMS = 4  # cuDNN's batch norm takes 4-D or 5-D descriptors only


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one input shape is normalized in one mode (all derived from shape, axis and mode)."""

    shape: tuple[int, ...]
    channel_axis: int  # normalized: 1, or ndim - 1 for channels-last
    mode: Mode

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def channels_last(self) -> bool:
        return self.ndim > 2 and self.channel_axis == self.ndim - 1

    @property
    def public_channel_axis(self) -> int:
        """The axis as users write it and SavedStats records it: -1 for channels-last, else 1."""
        return -1 if self.channels_last else 1

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """Axes each statistic is computed over."""
        if self.mode.is_spatial:
            return tuple(axis for axis in range(self.ndim) if axis != self.channel_axis)
        return (0,)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of gamma, beta and every statistic, in x's own axis order."""
        if self.mode.is_spatial:
            return (self.channels,)
        return self.shape[1:]

    @property
    def broadcast_shape(self) -> tuple[int, ...]:
        """Shape that makes a parameter array broadcast against x."""
        if self.mode.is_spatial:
            shape = [1] * self.ndim
            shape[self.channel_axis] = self.channels
            return tuple(shape)
        return (1,) + self.shape[1:]

    @property
    def count(self) -> int:
        """Number of values that enter each statistic (m in the unbiased factor m / (m - 1))."""
        return math.prod(self.shape[axis] for axis in self.reduce_axes)

    @property
    def param_axes_to_cudnn(self) -> tuple[int, ...] | None:
        """Transpose taking a parameter from x's axis order to cuDNN's C-first order, or None.

        Only PER_ACTIVATION on channels-last data needs one: its parameters have shape
        (*spatial, C) here while cuDNN's derived descriptor is packed 1 x C x spatial.
        """
        if self.mode.is_spatial or not self.channels_last:
            return None
        last = self.ndim - 2
        return (last,) + tuple(range(last))

    @property
    def param_axes_from_cudnn(self) -> tuple[int, ...] | None:
        """The inverse of :attr:`param_axes_to_cudnn`: a parameter in cuDNN's order back in x's
        axis order, or None."""
        to_cudnn = self.param_axes_to_cudnn
        if to_cudnn is None:
            return None
        return tuple(sorted(range(len(to_cudnn)), key=to_cudnn.__getitem__))

    @property
    def cudnn_param_shape(self) -> tuple[int, ...]:
        """The parameters' shape in cuDNN's order: the order in which cuDNN reads and writes
        their memory."""
        to_cudnn = self.param_axes_to_cudnn
        shape = self.param_shape
        return shape if to_cudnn is None else tuple(shape[axis] for axis in to_cudnn)


def physical_shape(channels_first_shape, channel_axis: int) -> tuple[int, ...]:
    """(N, C, *spatial) written in the axis order of ``channel_axis``: itself, or (N, *spatial, C)."""
    shape = tuple(channels_first_shape)
    if channel_axis == 1 or len(shape) == 2:
        return shape
    return (shape[0],) + shape[2:] + (shape[1],)


def make_layout(shape, channel_axis, mode: Mode) -> Layout:
    """Validate ``shape`` and ``channel_axis`` and return the :class:`Layout` they describe."""
    shape = tuple(int(size) for size in shape)
    ndim = len(shape)
    if not MIN_NDIM <= ndim <= MAX_NDIM:
        raise ValueError(f"x: expected {MIN_NDIM} to {MAX_NDIM} dims, got {ndim} (shape {shape})")
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis: expected an int (1 or -1), got {channel_axis!r}")
    channel_axis = int(channel_axis)
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis: expected 1 or -1 for a {ndim}-D input, got {channel_axis} (out of range)")
    normalized = channel_axis % ndim
    if normalized not in (1, ndim - 1):
        raise ValueError(
            f"channel_axis: expected 1 (channels-first) or -1 (channels-last), got {channel_axis} for a {ndim}-D input"
        )
    if any(size < 1 for size in shape):
        raise ValueError(f"x: expected every dimension to be at least 1, got shape {shape}")
    return Layout(shape, normalized, mode)


def cudnn_dims_and_strides(layout: Layout, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Map x's shape and element strides to cuDNN's N, C, spatial dims and strides (4-D or 5-D).

    2-D and 3-D inputs are padded with trailing size-1 dims. A padded dim takes the stride of the
    innermost dim before it, which is what a packed NCHW or NHWC tensor would have there, so that
    cuDNN recognises the layout.
    """
    shape, strides = layout.shape, tuple(int(s) for s in strides)
    order = [0, layout.channel_axis] + [a for a in range(1, layout.ndim) if a != layout.channel_axis]
    dims = [shape[a] for a in order]
    dim_strides = [strides[a] for a in order]
    while len(dims) < _CUDNN_MIN_DIMS:
        dims.append(1)
        dim_strides.append(dim_strides[-1])
    return tuple(dims), tuple(dim_strides)


def cudnn_columns_dims_and_strides(layout: Layout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """C-contiguous x described to cuDNN as columns for a SPATIAL call: every axis but the batch
    flattened in x's memory order into C, the batch as H, N = W = 1.

    Each column then gets its own statistic over the batch, which is PER_ACTIVATION's math (and
    SPATIAL's on 2-D input), without cuDNN's limits on N. The parameters of the columns lie in x's
    own axis order, so on this route they need no transpose, whatever the layout.
    """
    batch, columns = layout.shape[0], math.prod(layout.shape[1:])
    return (1, columns, batch, 1), (batch * columns, 1, columns, columns)
