"""cudnn_bn/_core/layout.py: the channels-last shape of a 3-D input, the axis and shape refusals
with their messages, and cuDNN's order of the parameters and of a columns descriptor."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core.layout import cudnn_columns_dims_and_strides, make_layout, physical_shape
from cudnn_bn._core.modes import Mode


def test_a_3d_channels_last_shape_moves_its_channels():
    assert physical_shape((2, 3, 5), -1) == (2, 5, 3)
    assert physical_shape((2, 3), -1) == (2, 3)


@pytest.mark.parametrize("axis", [True, np.bool_(True)])
def test_a_bool_channel_axis_is_a_type_error(axis):
    with pytest.raises(TypeError) as raised:
        make_layout((2, 3, 4, 5), axis, Mode.SPATIAL)
    assert str(raised.value) == f"channel_axis: expected an int (1 or -1), got {axis!r}"


@pytest.mark.parametrize("axis,message", [
    (-4, "channel_axis: expected 1 (channels-first) or -1 (channels-last), got -4 for a 4-D input"),
    (-5, "channel_axis: expected 1 or -1 for a 4-D input, got -5 (out of range)"),
    (4, "channel_axis: expected 1 or -1 for a 4-D input, got 4 (out of range)"),
])
def test_an_axis_at_and_past_the_range_is_named_as_such(axis, message):
    with pytest.raises(ValueError) as raised:
        make_layout((2, 3, 4, 5), axis, Mode.SPATIAL)
    assert str(raised.value) == message


def test_an_empty_dimension_is_refused_naming_the_shape():
    with pytest.raises(ValueError) as raised:
        make_layout((2, 0, 3), 1, Mode.SPATIAL)
    assert str(raised.value) == "x: expected every dimension to be at least 1, got shape (2, 0, 3)"


def test_an_empty_batch_is_refused_saying_why_unless_the_caller_takes_an_empty_shard():
    with pytest.raises(ValueError) as raised:
        make_layout((0, 3), 1, Mode.SPATIAL)
    assert str(raised.value) == (
        "x: expected every dimension to be at least 1, got shape (0, 3) (an empty batch: cuDNN describes no empty "
        "tensor and a batch of no samples has no statistics; in synchronized batch norm, cudnn_bn.distributed takes "
        "a rank's empty shard)"
    )
    for shape, axis, mode, param_shape in [((0, 3), 1, Mode.SPATIAL, (3,)), ((0, 4, 5, 3), -1, Mode.SPATIAL, (3,)),
                                           ((0, 3, 4), 1, Mode.PER_ACTIVATION, (3, 4))]:
        layout = make_layout(shape, axis, mode, empty_batch=True)
        assert layout.shape == shape and layout.count == 0 and layout.param_shape == param_shape
        assert layout.public_channel_axis == make_layout((1,) + shape[1:], axis, mode).public_channel_axis
    with pytest.raises(ValueError, match=r"^x: expected every dimension to be at least 1, got shape \(0, 3, 0\)$"):
        make_layout((0, 3, 0), 1, Mode.SPATIAL, empty_batch=True)  # only the batch may be empty
    with pytest.raises(ValueError, match="^channel_axis: expected 1"):
        make_layout((0, 3, 4, 5), 2, Mode.SPATIAL, empty_batch=True)


# ---- cuDNN's order, kept here for plans.py and compat ----
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((4, 3, 5), -1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1),
                                        ((2, 3, 4, 5, 6), -1)])
def test_parameters_move_to_cudnns_order_and_back(mode, shape, axis):
    layout = make_layout(shape, axis, mode)
    to_cudnn, from_cudnn = layout.param_axes_to_cudnn, layout.param_axes_from_cudnn
    parameter = np.arange(np.prod(layout.param_shape)).reshape(layout.param_shape)
    in_cudnn_order = parameter if to_cudnn is None else parameter.transpose(to_cudnn)
    assert in_cudnn_order.shape == layout.cudnn_param_shape
    assert (from_cudnn is None) == (to_cudnn is None)
    back = in_cudnn_order if from_cudnn is None else in_cudnn_order.transpose(from_cudnn)
    np.testing.assert_array_equal(back, parameter)
    if mode is Mode.PER_ACTIVATION and layout.channels_last:
        # cuDNN reads C first: feature (spatial..., c) of x is element (c, spatial...) of its parameter
        assert layout.cudnn_param_shape == (shape[-1],) + shape[1:-1]
        assert in_cudnn_order[(1,) + (0,) * (len(shape) - 2)] == parameter[(0,) * (len(shape) - 2) + (1,)]
    else:
        assert to_cudnn is None and layout.cudnn_param_shape == layout.param_shape


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((4, 3, 2, 2), 1), ((4, 2, 2, 3), -1)])
def test_the_columns_descriptor_puts_each_column_of_x_in_memory_order_over_the_batch(shape, axis):
    layout = make_layout(shape, axis, Mode.PER_ACTIVATION)
    dims, strides = cudnn_columns_dims_and_strides(layout)
    batch, columns = shape[0], int(np.prod(shape[1:]))
    assert dims == (1, columns, batch, 1)
    flat = np.arange(np.prod(shape)).reshape(shape)  # each element holds its C-order offset
    for n in range(batch):
        for column in range(columns):
            offset = column * strides[1] + n * strides[2]
            assert flat.reshape(batch, columns)[n, column] == offset
    assert strides[0] == batch * columns and strides[3] == columns  # the size-1 dims, as packed NCHW has them
