"""cuDNN's limits (cudnn_bn/_cudnn/limits.py) at their exact boundaries, and the messages that
say what to do: the cases the simulated-GPU tests pass through without pinning (docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.modes import Mode
from cudnn_bn._cudnn import limits
from cudnn_bn._cudnn.errors import CudnnLimitError

INT32_MAX = 2**31 - 1


def test_a_descriptor_at_exactly_the_int32_limit_fits():
    limits.check_descriptor_fits((1, INT32_MAX), (INT32_MAX, 1), "x")


@pytest.mark.parametrize(
    "dims,strides",
    [
        ((0, INT32_MAX + 1), (1, 1)),  # a dim past the limit even where the element count is 0
        ((2, 1), (INT32_MAX + 1, 1)),  # a stride past the limit with a small element count
        ((2, INT32_MAX), (INT32_MAX, 1)),  # the element count alone past the limit
    ],
)
def test_each_of_dims_strides_and_count_is_checked_on_its_own(dims, strides):
    with pytest.raises(CudnnLimitError, match=r"^x: cuDNN takes dims, strides and element counts as 32-bit ints"):
        limits.check_descriptor_fits(dims, strides, "x")


def test_training_at_exactly_the_element_limit_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(int32_max=24))
    assert limits.training_route(make_layout((2, 3, 2, 2), 1, Mode.SPATIAL)) is None
    with pytest.raises(CudnnLimitError) as raised:
        limits.training_route(make_layout((3, 3, 2, 2), 1, Mode.SPATIAL))
    assert str(raised.value).endswith("; split the batch or run the NumPy reference")


def test_training_at_exactly_the_batch_limit_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=4))
    assert limits.training_route(make_layout((4, 3, 2, 2), 1, Mode.SPATIAL)) is None
    assert limits.training_route(make_layout((5, 3), 1, Mode.PER_ACTIVATION)) == limits.ROUTE_AS_SPATIAL_COLUMNS
    with pytest.raises(CudnnLimitError, match="only 2-D input can be routed"):
        limits.training_route(make_layout((5, 3, 2, 2), 1, Mode.SPATIAL))


def test_inference_chunk_is_the_batch_when_it_fits_and_one_sample_at_exactly_the_limit(monkeypatch):
    assert limits.inference_chunk(make_layout((3, 2), 1, Mode.PER_ACTIVATION)) == 3
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(int32_max=12))
    assert limits.inference_chunk(make_layout((5, 3, 2, 2), 1, Mode.SPATIAL)) == 1
    with pytest.raises(CudnnLimitError, match="one sample has 13 elements"):
        limits.inference_chunk(make_layout((5, 13), 1, Mode.SPATIAL))


def test_the_ex_path_names_every_condition_it_misses():
    layout = make_layout((2, 6, 3, 3), 1, Mode.SPATIAL)
    assert limits.ex_path_unmet(layout, np.float32) == [
        "mode SPATIAL_PERSISTENT (got SPATIAL)",
        "channels-last data",
        "float16 data (got float32)",
        "C % 4 == 0 (got C=6)",
    ]
    assert limits.ex_path_unmet(make_layout((2, 3, 3, 4), -1, Mode.SPATIAL_PERSISTENT), np.float16) == []
