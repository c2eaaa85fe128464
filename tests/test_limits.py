"""cuDNN's limits (cudnn_bn/_cudnn/limits.py) at their exact boundaries, and the messages that
say what to do; and training past the real batch limits, routed, on the simulated GPU, which
refuses what cuDNN is reported to refuse."""

from __future__ import annotations

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import reference
from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.modes import Mode
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import limits, plans
from cudnn_bn._cudnn.errors import CudnnLimitError
from fake_cudnn import FakeArray

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
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=4, per_activation_training_max_batch=2))
    assert limits.training_route(make_layout((4, 3, 2, 2), 1, Mode.SPATIAL)) is None
    assert limits.training_route(make_layout((4, 3), 1, Mode.SPATIAL_PERSISTENT)) is None
    assert limits.training_route(make_layout((5, 3), 1, Mode.SPATIAL)) == limits.ROUTE_AS_SPATIAL_COLUMNS
    with pytest.raises(CudnnLimitError,
                       match=r"SPATIAL training kernels support a batch of at most 4 \(PyTorch's guard, PR #32763\), "
                                              r"got N=5 .*only 2-D and PER_ACTIVATION input can be routed"):
        limits.training_route(make_layout((5, 3, 2, 2), 1, Mode.SPATIAL))


@pytest.mark.parametrize("shape,channel_axis", [((2, 3), 1), ((2, 3, 2, 2), 1), ((2, 2, 2, 3), -1)])
def test_per_activation_training_has_its_own_batch_limit_and_is_routed_past_it(monkeypatch, shape, channel_axis):
    # pytorch#2917: PER_ACTIVATION training fails past N = 131070, far below SPATIAL's 880801
    assert limits.LIMITS.training_batch_limit(Mode.PER_ACTIVATION) == 131070
    assert limits.LIMITS.training_batch_limit(Mode.SPATIAL) == 880801
    assert limits.LIMITS.training_batch_limit(Mode.SPATIAL_PERSISTENT) == 880801
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=4, per_activation_training_max_batch=2))
    assert limits.training_route(make_layout(shape, channel_axis, Mode.PER_ACTIVATION)) is None
    past = (3,) + shape[1:]
    routed = limits.training_route(make_layout(past, channel_axis, Mode.PER_ACTIVATION))
    assert routed == limits.ROUTE_AS_SPATIAL_COLUMNS
    assert limits.training_route(make_layout(past, channel_axis, Mode.SPATIAL)) is None  # SPATIAL's limit is 4 here


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


# ---- the columns route on the simulated GPU, with the real limits ----
def _device(array):
    return np.array(array, copy=True).view(FakeArray)


def _wide(array):
    return np.asarray(array, dtype=np.float64)


@pytest.mark.parametrize("shape,channel_axis,mode", [
    ((131071, 3), 1, Mode.PER_ACTIVATION),  # pytorch#2917's case: 2-D training one past 131070
    ((131071, 2, 1, 2), -1, Mode.PER_ACTIVATION),  # channels-last: columns in memory order, parameters too
    ((131071, 2, 2), 1, Mode.PER_ACTIVATION),
    ((880802, 2), 1, Mode.SPATIAL),
])
def test_training_past_cudnns_batch_limit_is_routed_and_matches_the_reference(fresh_simulated_gpu, shape, channel_axis,
                                                                              mode):
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, np.float32)
    running = [_device(np.zeros(layout.param_shape, np.float32)), _device(np.ones(layout.param_shape, np.float32))]
    wanted_running = [np.zeros(layout.param_shape), np.ones(layout.param_shape)]
    y, saved = cudnn_bn.forward_training(_device(x), _device(gamma), _device(beta), *running, mode=mode,
                                         channel_axis=channel_axis)
    grads = cudnn_bn.backward(_device(x), _device(dy), _device(gamma), saved)
    y64, saved64 = reference.forward_training(_wide(x), _wide(gamma), _wide(beta), *wanted_running, mode=mode,
                                              channel_axis=channel_axis)
    # the simulator refuses N past the limit in the batch dim: it was moved out of it
    assert not fresh_simulated_gpu.refusals
    assert_close(y, y64, np.float32, scale=4)
    for actual, wanted in zip((saved.mean, saved.inv_std, *running), (saved64.mean, saved64.inv_std, *wanted_running)):
        assert_close(actual, wanted, np.float32)
    for actual, wanted in zip(grads, reference.backward(_wide(x), _wide(dy), _wide(gamma), saved64)):
        assert_close(actual, wanted, np.float32, scale=10)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0)
    columns = int(np.prod(shape[1:]))
    assert plan.route == limits.ROUTE_AS_SPATIAL_COLUMNS and plan.cudnn_mode == int(Mode.SPATIAL)
    assert plan.data_desc.describe()[1:] == ((1, columns, shape[0], 1), (shape[0] * columns, 1, columns, columns))
