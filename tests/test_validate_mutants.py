"""The checks of cudnn_bn/_core/validate.py called directly, where the public functions reach them
only after the public layer has already refused the same input (docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core import validate
from cudnn_bn._core.modes import Mode

NAMES = ["x", "gamma", "beta", "mean", "var"]


def _inference_args():
    return [np.ones((4, 3, 2, 2)), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]


def _check(args):
    return validate.check_forward_inference(*args, mode=Mode.SPATIAL, eps=0.0, channel_axis=1)


def test_inference_accepts_eps_zero():
    assert _check(_inference_args()).layout.shape == (4, 3, 2, 2)


@pytest.mark.parametrize("position", range(5), ids=NAMES)
def test_inference_refuses_a_non_array_naming_it(position):
    args = _inference_args()
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"\b{NAMES[position]}\b"):
        _check(args)


@pytest.mark.parametrize("position", range(1, 5), ids=NAMES[1:])
def test_inference_refuses_a_parameter_of_the_wrong_shape_naming_it(position):
    args = _inference_args()
    args[position] = np.ones(4)
    with pytest.raises(ValueError, match=rf"^{NAMES[position]}: "):
        _check(args)
