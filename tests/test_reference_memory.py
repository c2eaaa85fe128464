"""The reference's float64 temporaries stay below one x-sized float64 array (traced by tracemalloc,
which sees NumPy's data buffers), in every call, mode and layout."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_case
from cudnn_bn import Mode, reference
from cudnn_bn._tools.bench import peak_float64_temporaries  # the bench's own measurement

EPS = 1e-5


# 2**17 elements: large enough that the blocks are a small part of x
_CASES = [((32, 16, 16, 16), 1, Mode.SPATIAL), ((32, 16, 16, 16), -1, Mode.SPATIAL),
          ((32, 16, 16, 16), 1, Mode.PER_ACTIVATION), ((1024, 128), 1, Mode.SPATIAL)]


@pytest.mark.parametrize("shape,channel_axis,mode", _CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_call_holds_less_than_one_float64_copy_of_x(shape, channel_axis, mode, dtype):
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, dtype=dtype, seed=1)
    running_mean, running_var = np.zeros(layout.param_shape, gamma.dtype), np.ones(layout.param_shape, gamma.dtype)
    _, saved = reference.forward_training(x, gamma, beta, mode=mode, channel_axis=channel_axis)
    calls = {
        "forward_training": lambda: reference.forward_training(x, gamma, beta, running_mean, running_var, mode=mode,
                                                               channel_axis=channel_axis),
        "forward_inference": lambda: reference.forward_inference(x, gamma, beta, running_mean, running_var, mode=mode,
                                                                 channel_axis=channel_axis),
        "backward": lambda: reference.backward(x, dy, gamma, saved),
        "backward, statistics recomputed": lambda: reference.backward(x, dy, gamma, mode=mode, eps=EPS,
                                                                      channel_axis=channel_axis),
    }
    for name, run in calls.items():
        units = peak_float64_temporaries(run, x)
        assert 0.0 <= units <= 1.0, f"{name}: {units:.2f} x-sized float64 temporaries"


def test_a_non_contiguous_input_adds_one_copy_in_its_own_dtype():
    _, stored, _, gamma, beta = make_case((32, 16, 16, 16), Mode.SPATIAL, -1, dtype=np.float32)
    x = np.moveaxis(stored, -1, 1)  # channels-first axes, channels-last memory
    units = peak_float64_temporaries(lambda: reference.forward_training(x, gamma, beta), x)
    assert 0.5 <= units <= 1.5  # the float32 copy is half an x-sized float64 array

