"""Property-based checks of the reference over shapes, layouts, modes and dtypes."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FLOAT64_ROUNDING, make_case
from cudnn_bn import Mode, reference

# float64 identities over drawn groups: with offsets up to 30 and, for a nearly constant group,
# inv_std up to 1 / sqrt(eps) = 316, the rounding of x - mean (1e-16 * 30) grows by that much
DRAWN_GROUP_TOLERANCE = 1e-9
# dx sums to zero over each group: the cancellation grows with the largest |dx| and the count
DX_SUM_TOLERANCE_PER_TERM = 1e-8


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    channel_axis = draw(st.sampled_from([1, -1]))
    mode = draw(st.sampled_from(list(Mode)))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    shape = (max(shape[0], 2),) + shape[1:]  # two values per statistic in every mode
    offset = draw(st.sampled_from([0.0, 5.0, -30.0]))
    scale = draw(st.sampled_from([0.5, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**16))
    return make_case(shape, mode, channel_axis, dtype, seed=seed, offset=offset, scale=scale), mode, channel_axis, dtype


@settings(max_examples=150, deadline=None)
@given(cases())
def test_low_precision_reference_is_the_float64_result_rounded(case):
    (layout, x, dy, gamma, beta), mode, channel_axis, dtype = case
    y, saved = reference.forward_training(x, gamma, beta, mode=mode, channel_axis=channel_axis)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    wide = [a.astype(np.float64) for a in (x, dy, gamma, beta)]
    y64, saved64 = reference.forward_training(wide[0], wide[2], wide[3], mode=mode, channel_axis=channel_axis)
    # backward in float64 from the same (rounded) saved statistics that the low-precision call got
    rounded = dataclasses.replace(saved, mean=saved.mean.astype(np.float64), inv_std=saved.inv_std.astype(np.float64))
    dx64, dgamma64, dbeta64 = reference.backward(wide[0], wide[1], wide[2], rounded)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape and dgamma.shape == layout.param_shape
    # the only difference is the final rounding of each output
    np.testing.assert_array_equal(y, y64.astype(dtype))
    np.testing.assert_array_equal(saved.mean, saved64.mean.astype(saved.mean.dtype))
    np.testing.assert_array_equal(saved.inv_std, saved64.inv_std.astype(saved.inv_std.dtype))
    np.testing.assert_array_equal(dx, dx64.astype(dtype))
    np.testing.assert_array_equal(dgamma, dgamma64.astype(dgamma.dtype))
    np.testing.assert_array_equal(dbeta, dbeta64.astype(dbeta.dtype))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_invariants_hold_for_any_layout(case):
    (layout, x, dy, gamma, beta), mode, channel_axis, dtype = case
    wide = x.astype(np.float64)
    y, saved = reference.forward_training(wide, np.ones(layout.param_shape), np.zeros(layout.param_shape), mode=mode,
                                          channel_axis=channel_axis)
    var = wide.var(axis=layout.reduce_axes)
    np.testing.assert_allclose(y.mean(axis=layout.reduce_axes), 0.0, atol=DRAWN_GROUP_TOLERANCE)
    np.testing.assert_allclose(y.var(axis=layout.reduce_axes), var / (var + 1e-5), rtol=DRAWN_GROUP_TOLERANCE,
                               atol=FLOAT64_ROUNDING)
    dx, _, dbeta = reference.backward(wide, dy.astype(np.float64), np.ones(layout.param_shape), saved)
    dx_scale = max(1.0, float(np.abs(dx).max())) * layout.count
    np.testing.assert_allclose(dx.sum(axis=layout.reduce_axes), 0.0, atol=DX_SUM_TOLERANCE_PER_TERM * dx_scale)
    np.testing.assert_allclose(dbeta.reshape(-1), dy.astype(np.float64).sum(axis=layout.reduce_axes).reshape(-1),
                               rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)
