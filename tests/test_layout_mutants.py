"""cudnn_bn/_core/layout.py at its edges: the channels-last shape of a 3-D input, and the axis and
shape refusals with their messages (docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core.layout import make_layout, physical_shape
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
        make_layout((0, 3), 1, Mode.SPATIAL)
    assert str(raised.value) == "x: expected every dimension to be at least 1, got shape (0, 3)"
