"""The NumPy reference against finite differences, independent derivations and invariants; a block that
ends part-way along the inner axis, its defaults, its result dtypes and its refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import FLOAT64_ROUNDING, LAYOUTS, MODES, make_case, shape_for
from cudnn_bn import Mode, SavedStats, reference
from cudnn_bn._core import arrays

EPS = 1e-5
# Bounds of float64 results against float64 computed another way, besides FLOAT64_ROUNDING (the same
# quantity summed in another order):
# the same terms summed in the same order (2-D input, in every mode): an operation or two apart
SAME_ARITHMETIC = 1e-13
# a gradient derived another way (the chain rule, a compact form, a Jacobian product), inference
# folded into one multiply-add, sums that cancel (dx over a group): longer chains of operations
DERIVATION_TOLERANCE = 1e-10
# inference from the variance recovered from inv_std (1 / inv_std**2 - eps): inv_std's rounding,
# squared, inverted and less eps
RECOVERED_VARIANCE_TOLERANCE = 1e-9
# the float32 reference is its float64 result rounded once: within a float32 ulp (2**-23, 1.2e-7)
ROUNDED_TO_FLOAT32 = 2e-7


def _loss_and_grads(x, gamma, beta, dy, mode, channel_axis):
    """L = sum(y * dy) and its finite-difference gradients w.r.t. x, gamma and beta."""

    def loss(x_, gamma_, beta_):
        y, _ = reference.forward_training(x_, gamma_, beta_, mode=mode, eps=EPS, channel_axis=channel_axis)
        return float(np.sum(y * dy))

    def numeric(array, which):
        grad = np.empty_like(array)
        step = 1e-5
        for index in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[index] += step
            minus[index] -= step
            args_plus = [x, gamma, beta]
            args_minus = [x, gamma, beta]
            args_plus[which], args_minus[which] = plus, minus
            grad[index] = (loss(*args_plus) - loss(*args_minus)) / (2 * step)
        return grad

    return numeric(x, 0), numeric(gamma, 1), numeric(beta, 2)


# central differences with a step of 1e-5 (in _loss_and_grads): truncation (step**2, 1e-10) and the
# loss's rounding over the step (1e-16 / step, 1e-11), relative to the largest gradient
FINITE_DIFFERENCES_RELATIVE_ERROR = 1e-7


def _relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300)


# SPATIAL_PERSISTENT backward without saved statistics is an error (tested in test_validation).
_GRADIENT_CASES = [
    (mode, with_saved)
    for mode in MODES for with_saved in (True, False) if with_saved or mode is not Mode.SPATIAL_PERSISTENT
]


@pytest.mark.parametrize("mode,with_saved", _GRADIENT_CASES,
                         ids=lambda v: getattr(v, "name", "saved" if v else "recomputed"))
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_gradients_match_finite_differences(mode, with_saved, ndim, channel_axis):
    layout, x, dy, gamma, beta = make_case(shape_for(ndim, channel_axis), mode, channel_axis, seed=ndim)
    _, saved = reference.forward_training(x, gamma, beta, mode=mode, eps=EPS, channel_axis=channel_axis)
    if with_saved:
        dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    else:
        dx, dgamma, dbeta = reference.backward(x, dy, gamma, mode=mode, eps=EPS, channel_axis=channel_axis)
    fd_dx, fd_dgamma, fd_dbeta = _loss_and_grads(x, gamma, beta, dy, mode, channel_axis)
    assert _relative_error(dx, fd_dx) < FINITE_DIFFERENCES_RELATIVE_ERROR
    assert _relative_error(dgamma, fd_dgamma) < FINITE_DIFFERENCES_RELATIVE_ERROR
    assert _relative_error(dbeta, fd_dbeta) < FINITE_DIFFERENCES_RELATIVE_ERROR


def _groups(array, layout):
    """Independent of the reference's matrix helpers: (groups, m) via explicit transposes."""
    if layout.mode.is_spatial:
        axes = (layout.channel_axis,) + tuple(a for a in range(layout.ndim) if a != layout.channel_axis)
        return array.transpose(axes).reshape(layout.channels, -1)
    return array.reshape(layout.shape[0], -1).T


def _chain_rule_backward(x, dy, gamma, layout):
    """Seed 002's three steps: dL/dxhat, then dL/dvar, then dL/dmean, then dL/dx."""
    xg, dyg = _groups(x, layout), _groups(dy, layout)
    g = gamma.reshape(-1, 1)
    m = xg.shape[1]
    mu = xg.sum(axis=1, keepdims=True) / m
    var = ((xg - mu) ** 2).sum(axis=1, keepdims=True) / m
    dxhat = dyg * g
    dvar = np.sum(dxhat * (xg - mu), axis=1, keepdims=True) * -0.5 * (var + EPS) ** -1.5
    dmean = (np.sum(-dxhat / np.sqrt(var + EPS), axis=1, keepdims=True)
             + dvar * np.sum(-2 * (xg - mu), axis=1, keepdims=True) / m)
    dx = dxhat / np.sqrt(var + EPS) + dvar * 2 * (xg - mu) / m + dmean / m
    xhat = (xg - mu) / np.sqrt(var + EPS)
    return dx, (dyg * xhat).sum(axis=1), dyg.sum(axis=1)


def _compact_backward(x, dy, gamma, layout):
    """Seeds 000/003: dx = gamma / sqrt(var + eps) * (dy - (dbeta + xhat * dgamma) / m)."""
    xg, dyg = _groups(x, layout), _groups(dy, layout)
    m = xg.shape[1]
    mu = xg.mean(axis=1, keepdims=True)
    std = np.sqrt(xg.var(axis=1, keepdims=True) + EPS)
    xhat = (xg - mu) / std
    dbeta = dyg.sum(axis=1, keepdims=True)
    dgamma = (dyg * xhat).sum(axis=1, keepdims=True)
    dx = gamma.reshape(-1, 1) / std * (dyg - (dbeta + xhat * dgamma) / m)
    return dx, dgamma.ravel(), dbeta.ravel()


def _jacobian_backward(x, dy, gamma, layout):
    """Explicit Jacobian dy_i/dx_j = gamma/std * (delta_ij - 1/m - xhat_i xhat_j / m), per group."""
    xg, dyg = _groups(x, layout), _groups(dy, layout)
    m = xg.shape[1]
    std = np.sqrt(xg.var(axis=1) + EPS)
    xhat = (xg - xg.mean(axis=1, keepdims=True)) / std[:, None]
    eye = np.eye(m)[None]
    jacobian = (gamma.reshape(-1) / std)[:, None, None] * (eye - 1.0 / m - xhat[:, :, None] * xhat[:, None, :] / m)
    dx = np.einsum("gij,gi->gj", jacobian, dyg)
    return dx, (dyg * xhat).sum(axis=1), dyg.sum(axis=1)


@pytest.mark.parametrize("derivation", [_chain_rule_backward, _compact_backward, _jacobian_backward])
@pytest.mark.parametrize("mode", [Mode.PER_ACTIVATION, Mode.SPATIAL])
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_backward_matches_independent_derivations(derivation, mode, ndim, channel_axis):
    layout, x, dy, gamma, beta = make_case(shape_for(ndim, channel_axis), mode, channel_axis, seed=7)
    _, saved = reference.forward_training(x, gamma, beta, mode=mode, eps=EPS, channel_axis=channel_axis)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    expected_dx, expected_dgamma, expected_dbeta = derivation(x, dy, gamma, layout)
    np.testing.assert_allclose(_groups(dx, layout), expected_dx, rtol=DERIVATION_TOLERANCE, atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(dgamma.reshape(-1), expected_dgamma, rtol=DERIVATION_TOLERANCE, atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(dbeta.reshape(-1), expected_dbeta, rtol=DERIVATION_TOLERANCE, atol=FLOAT64_ROUNDING)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_forward_invariants(mode, ndim, channel_axis):
    layout, x, dy, _, _ = make_case(shape_for(ndim, channel_axis, batch=5), mode, channel_axis, seed=3, offset=3.0,
                                    scale=2.0)
    ones, zeros = np.ones(layout.param_shape), np.zeros(layout.param_shape)
    y, saved = reference.forward_training(x, ones, zeros, mode=mode, eps=EPS, channel_axis=channel_axis)
    biased_var = x.var(axis=layout.reduce_axes).reshape(layout.param_shape)
    np.testing.assert_allclose(y.mean(axis=layout.reduce_axes), 0.0, atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(y.var(axis=layout.reduce_axes).reshape(layout.param_shape),
                               biased_var / (biased_var + EPS), rtol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(saved.inv_std, 1.0 / np.sqrt(biased_var + EPS), rtol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(saved.mean, x.mean(axis=layout.reduce_axes).reshape(layout.param_shape),
                               rtol=FLOAT64_ROUNDING)
    assert saved.mode is mode and saved.eps == EPS and saved.channel_axis == (-1 if layout.channels_last else 1)
    dx, dgamma, dbeta = reference.backward(x, dy, ones, saved)
    np.testing.assert_allclose(dx.sum(axis=layout.reduce_axes), 0.0, atol=DERIVATION_TOLERANCE)
    np.testing.assert_allclose(dbeta, dy.sum(axis=layout.reduce_axes).reshape(layout.param_shape),
                               rtol=FLOAT64_ROUNDING)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", [(2, 1), (4, 1), (4, -1)])
@pytest.mark.parametrize("running_dtype", [np.float16, np.float32, np.float64])
def test_running_statistics_follow_the_recurrence(mode, ndim, channel_axis, running_dtype):
    shape = shape_for(ndim, channel_axis, batch=4)
    layout, *_ = make_case(shape, mode, channel_axis)
    running_mean = np.zeros(layout.param_shape, dtype=running_dtype)
    running_var = np.ones(layout.param_shape, dtype=running_dtype)
    expected_mean, expected_var = running_mean.astype(np.float64), running_var.astype(np.float64)
    momentum = 0.3
    for step in range(4):
        _, x, _, gamma, beta = make_case(shape, mode, channel_axis, seed=100 + step, offset=step)
        reference.forward_training(x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum,
                                   channel_axis=channel_axis)
        batch_mean = x.mean(axis=layout.reduce_axes).reshape(layout.param_shape)
        unbiased = x.var(axis=layout.reduce_axes, ddof=1).reshape(layout.param_shape)
        # each step rounds to the running statistics' dtype, as the reference stores them
        expected_mean = ((1 - momentum) * expected_mean + momentum * batch_mean).astype(running_dtype)
        expected_var = ((1 - momentum) * expected_var + momentum * unbiased).astype(running_dtype)
        expected_mean, expected_var = expected_mean.astype(np.float64), expected_var.astype(np.float64)
    assert running_mean.dtype == running_dtype
    np.testing.assert_allclose(running_mean, expected_mean, rtol=FLOAT64_ROUNDING, atol=0)
    np.testing.assert_allclose(running_var, expected_var, rtol=FLOAT64_ROUNDING, atol=0)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_inference_with_batch_statistics_equals_training(mode, ndim, channel_axis):
    layout, x, _, gamma, beta = make_case(shape_for(ndim, channel_axis), mode, channel_axis, seed=11)
    y_train, saved = reference.forward_training(x, gamma, beta, mode=mode, eps=EPS, channel_axis=channel_axis)
    biased_var = x.var(axis=layout.reduce_axes).reshape(layout.param_shape)
    y_infer = reference.forward_inference(x, gamma, beta, saved.mean, biased_var, mode=mode, eps=EPS,
                                          channel_axis=channel_axis)
    np.testing.assert_allclose(y_infer, y_train, rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)
    scale, shift = reference.fold_inference(gamma, beta, saved.mean, biased_var, EPS)
    folded = x * scale.reshape(layout.broadcast_shape) + shift.reshape(layout.broadcast_shape)
    np.testing.assert_allclose(folded, y_infer, rtol=DERIVATION_TOLERANCE, atol=DERIVATION_TOLERANCE)


def test_two_dim_input_is_the_same_in_every_mode():
    _, x, dy, gamma, beta = make_case((6, 4), Mode.SPATIAL)
    results = []
    for mode in MODES:
        y, saved = reference.forward_training(x, gamma, beta, mode=mode)
        results.append((y, saved.mean, saved.inv_std) + reference.backward(x, dy, gamma, saved))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=SAME_ARITHMETIC, atol=SAME_ARITHMETIC)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_dtypes_follow_cudnn(dtype):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, dtype=dtype)
    param_dtype = np.float64 if dtype == np.float64 else np.float32
    y, saved = reference.forward_training(x, gamma, beta)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    assert y.dtype == dtype and dx.dtype == dtype
    assert saved.mean.dtype == param_dtype and saved.inv_std.dtype == param_dtype
    assert dgamma.dtype == param_dtype and dbeta.dtype == param_dtype
    assert isinstance(saved, SavedStats)


def test_low_precision_matches_float64_reference_within_rounding():
    _, x, dy, gamma, beta = make_case((8, 3, 5, 5), Mode.SPATIAL, dtype=np.float32, offset=100.0)
    y32, _ = reference.forward_training(x, gamma, beta)
    y64, _ = reference.forward_training(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_allclose(y32, y64, rtol=ROUNDED_TO_FLOAT32, atol=ROUNDED_TO_FLOAT32)


# the variance at an offset of 1e8, and y's std there: sqrt(var / (var + eps)), 1 - 5e-6 for var 1
LARGE_OFFSET_RTOL, LARGE_OFFSET_STD_RTOL = 1e-6, 1e-4


def test_large_offset_is_exact_two_pass():
    """A large common offset must not destroy the variance (the one-pass formula would)."""
    rng = np.random.default_rng(0)
    x = 1e8 + rng.standard_normal((64, 2))
    y, saved = reference.forward_training(x, np.ones(2), np.zeros(2), mode="per_activation")
    # x**2 is 1e16, whose float64 spacing is 2: a variance from sums of squares would be off by order
    # one; two passes agree with numpy's to far better than these bounds
    np.testing.assert_allclose(1.0 / saved.inv_std**2 - 1e-5, x.var(axis=0), rtol=LARGE_OFFSET_RTOL)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=LARGE_OFFSET_STD_RTOL)


# ---------------------------------------------------------------- memory order and blocking ----

def _results(x, dy, gamma, beta, mode, channel_axis, saved_for_backward=None):
    """Every array the reference returns for one forward, inference and backward (the backward
    from ``saved_for_backward`` where given, else from this forward's statistics)."""
    y, saved = reference.forward_training(x, gamma, beta, mode=mode, eps=EPS, channel_axis=channel_axis)
    y_infer = reference.forward_inference(x, gamma, beta, saved.mean, 1.0 / saved.inv_std**2, mode=mode, eps=0.0,
                                          channel_axis=channel_axis)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved_for_backward or saved)
    return {"y": y, "mean": saved.mean, "inv_std": saved.inv_std, "y_infer": y_infer, "dx": dx, "dgamma": dgamma,
            "dbeta": dbeta}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_are_c_contiguous_in_x_axis_order(mode, ndim, channel_axis, dtype):
    layout, x, dy, gamma, beta = make_case(shape_for(ndim, channel_axis), mode, channel_axis, dtype=dtype, seed=5)
    for name, array in _results(x, dy, gamma, beta, mode, channel_axis).items():
        assert array.flags.c_contiguous, name
        assert array.shape == (x.shape if name in ("y", "y_infer", "dx") else layout.param_shape), name


@pytest.mark.parametrize("mode", [Mode.SPATIAL, Mode.PER_ACTIVATION], ids=lambda m: m.name)
def test_inputs_in_any_memory_order_give_the_same_results(mode):
    """A channels-first array stored channels-last (a transposed view) and a strided slice."""
    _, stored, dy_stored, gamma, beta = make_case((4, 5, 6, 3), mode, -1, dtype=np.float32, seed=9)
    x, dy = np.moveaxis(stored, -1, 1), np.moveaxis(dy_stored, -1, 1)  # logical (4, 3, 5, 6)
    if mode is Mode.PER_ACTIVATION:
        gamma, beta = (np.ascontiguousarray(np.moveaxis(p, -1, 0)) for p in (gamma, beta))
    assert not x.flags.c_contiguous
    expected = _results(np.ascontiguousarray(x), np.ascontiguousarray(dy), gamma, beta, mode, 1)
    for name, array in _results(x, dy, gamma, beta, mode, 1).items():
        assert array.flags.c_contiguous, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    strided = np.repeat(np.ascontiguousarray(x), 2, axis=0)[::2]
    for name, array in _results(strided, np.ascontiguousarray(dy), gamma, beta, mode, 1).items():
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert not np.shares_memory(expected["y"], x)


# Block sizes that cut the (outer, groups, inner) view of these shapes into whole rows, parts of
# the groups of one row, and parts of the inner axis of one group; with and without block-shaped
# parameters and running sums.
_BLOCKINGS = [(1, 1 / 8), (5, 1 / 8), (7, 0.0), (40, 1 / 8), (40, 0.0), (130, 1 / 8), (130, 0.0), (1 << 13, 1 / 8)]


@pytest.mark.parametrize("block_elements,fraction", _BLOCKINGS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("shape,channel_axis", [((6, 3, 5, 6), 1), ((6, 5, 6, 3), -1), ((7, 4), 1)])
# float16 also takes the bit-pattern conversions, in every block shape
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_blocking_keeps_float64_exactness_and_dtype_independence(monkeypatch, block_elements, fraction, mode, shape,
                                                                 channel_axis, dtype):
    monkeypatch.setattr(reference, "_MAX_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(reference, "_MIN_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(reference, "_TEMPORARY_FRACTION_OF_X", fraction)
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, dtype=dtype, seed=13, offset=20.0)
    narrow = _results(x, dy, gamma, beta, mode, channel_axis)
    _, narrow_saved = reference.forward_training(x, gamma, beta, mode=mode, eps=EPS, channel_axis=channel_axis)
    # the float64 backward gets the same (rounded) saved statistics as the float32 one
    rounded = dataclasses.replace(narrow_saved, mean=narrow_saved.mean.astype(np.float64),
                                  inv_std=narrow_saved.inv_std.astype(np.float64))
    wide = _results(*(a.astype(np.float64) for a in (x, dy, gamma, beta)), mode, channel_axis, rounded)
    # float32 results are the float64 results rounded, whatever the blocks
    for name in ("y", "mean", "inv_std", "dgamma", "dbeta", "dx"):
        np.testing.assert_array_equal(narrow[name], wide[name].astype(narrow[name].dtype), err_msg=name)
    # and the float64 results, from float64 statistics, agree with the unblocked derivation
    x64, dy64, gamma64 = x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64)
    exact = _results(x64, dy64, gamma64, beta.astype(np.float64), mode, channel_axis)
    expected_dx, expected_dgamma, expected_dbeta = _compact_backward(x64, dy64, gamma64, layout)
    np.testing.assert_allclose(_groups(exact["dx"], layout), expected_dx, rtol=DERIVATION_TOLERANCE,
                               atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(exact["dgamma"].reshape(-1), expected_dgamma, rtol=DERIVATION_TOLERANCE,
                               atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(exact["dbeta"].reshape(-1), expected_dbeta, rtol=DERIVATION_TOLERANCE,
                               atol=FLOAT64_ROUNDING)
    np.testing.assert_allclose(exact["mean"], x64.mean(axis=layout.reduce_axes).reshape(layout.param_shape),
                               rtol=SAME_ARITHMETIC)
    biased_var = x64.var(axis=layout.reduce_axes).reshape(layout.param_shape)
    np.testing.assert_allclose(exact["inv_std"], 1.0 / np.sqrt(biased_var + EPS), rtol=FLOAT64_ROUNDING)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (300.0, 1e-2), (-7.0, 30.0)])
def test_low_precision_inference_is_the_float64_result_rounded_or_within_a_few_ulps(dtype, offset, scale):
    """float16 inference is the float64 result rounded; float32 runs in float32 with a two-part
    mean: within 4 ulps of the float64 result even when x sits far from zero and close to its mean
    (where a folded scale * x + shift loses thousands of ulps)."""
    layout, x, _, gamma, beta = make_case((8, 6, 5, 5), Mode.SPATIAL, 1, dtype=dtype, seed=21, offset=offset,
                                          scale=scale)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=layout.reduce_axes) + 1e-3 * scale  # float64 statistics that float32 cannot hold
    var = x64.var(axis=layout.reduce_axes)
    y = reference.forward_inference(x, gamma, beta, mean, var, eps=EPS)
    exact = reference.forward_inference(x64, gamma.astype(np.float64), beta.astype(np.float64), mean, var, eps=EPS)
    assert y.dtype == dtype and y.flags.c_contiguous
    if dtype == np.float16:
        np.testing.assert_array_equal(y, exact.astype(dtype))
        return
    # ulps of float32 at the size of the terms that are added
    shift = beta.reshape(layout.broadcast_shape).astype(np.float64)
    magnitude = (np.abs(exact - shift) + np.abs(shift)).astype(dtype)
    np.testing.assert_array_less(np.abs(y.astype(np.float64) - exact),
                                 4 * np.spacing(magnitude).astype(np.float64) + 1e-30)


def test_fold_inference_defaults_to_the_same_eps_as_the_other_calls():
    _, _, _, gamma, beta = make_case((4, 3), Mode.SPATIAL)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1e-6, 0.0, 3.0])
    default = reference.fold_inference(gamma, beta, mean, var)
    explicit = reference.fold_inference(gamma, beta, mean, var, 1e-5)
    for a, b in zip(default, explicit):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(default[0], reference.fold_inference(gamma, beta, mean, var, 1e-3)[0])


# ---- a block that ends part-way, defaults, result dtypes and refusals ----
def _float64_batch_norm(x, gamma, beta, eps):
    """Spatial NCL batch norm straight from its definition, in float64."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    var = x64.var(axis=(0, 2), keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps) * gamma[None, :, None] + beta[None, :, None]


@pytest.mark.parametrize("shape", [(1, 1, 8193), (1, 2, 8193)])
def test_blocks_that_end_part_way_along_the_inner_axis(shape):
    # 8193 values in a row: one block of 8192 and one of 1, with per-group arrays written out
    x = np.random.default_rng(0).standard_normal(shape) * 3 + 5
    gamma, beta = np.linspace(0.5, 1.5, shape[1]), np.linspace(-1, 1, shape[1])
    y, saved = reference.forward_training(x, gamma, beta, eps=1e-3)
    np.testing.assert_allclose(y, _float64_batch_norm(x, gamma, beta, 1e-3), rtol=FLOAT64_ROUNDING,
                               atol=FLOAT64_ROUNDING)
    y = reference.forward_inference(x, gamma, beta, saved.mean, 1 / saved.inv_std**2 - 1e-3, eps=1e-3)
    np.testing.assert_allclose(y, _float64_batch_norm(x, gamma, beta, 1e-3), rtol=RECOVERED_VARIANCE_TOLERANCE,
                               atol=RECOVERED_VARIANCE_TOLERANCE)
    dy = np.random.default_rng(1).standard_normal(shape)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2)), rtol=FLOAT64_ROUNDING)
    x_hat = (x - saved.mean[None, :, None]) * saved.inv_std[None, :, None]
    np.testing.assert_allclose(dgamma, (dy * x_hat).sum(axis=(0, 2)), rtol=DERIVATION_TOLERANCE,
                               atol=DERIVATION_TOLERANCE)
    assert dx.shape == shape and np.isfinite(dx).all()


def test_forward_inference_defaults_eps_to_1e_minus_5():
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    mean, var = np.zeros(3, np.float32), np.full(3, 1e-3, np.float32)
    np.testing.assert_array_equal(
        reference.forward_inference(x, gamma, beta, mean, var),
        reference.forward_inference(x, gamma, beta, mean, var, eps=1e-5),
    )


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("low, high", [(np.float16, np.float32), (np.float32, np.float64)])
def test_fold_inference_returns_the_widest_dtype_of_its_inputs_at_least_float32(position, low, high):
    inputs = [np.full(3, 0.5, low) for _ in range(4)]
    scale, shift = reference.fold_inference(*inputs)
    assert scale.dtype == shift.dtype == np.promote_types(low, np.float32)
    inputs[position] = inputs[position].astype(high)
    scale, shift = reference.fold_inference(*inputs)
    assert scale.dtype == shift.dtype == high


class _Tagged(np.ndarray):
    """A user's ndarray subclass."""


def test_fold_inference_returns_plain_arrays_for_subclasses_and_memory_maps(tmp_path):
    gamma, beta = np.full(3, 2.0, np.float32), np.full(3, 0.5, np.float32)
    mean, var = np.zeros(3, np.float32), np.full(3, 4.0, np.float32)
    mapped = np.memmap(tmp_path / "var.bin", dtype=np.float32, mode="w+", shape=(3,))
    mapped[...] = var
    expected = reference.fold_inference(gamma, beta, mean, var)
    for arguments in ((gamma.view(_Tagged), beta, mean, var), (gamma, beta, mean, mapped),
                      tuple(a.view(_Tagged) for a in (gamma, beta, mean, var))):
        for got, want in zip(reference.fold_inference(*arguments), expected):
            assert type(got) is np.ndarray
            np.testing.assert_array_equal(got, want)


class _PosingAsCupy(np.ndarray):
    """A NumPy array that the kind check takes for a CuPy one."""


def test_cupy_arrays_are_refused_with_the_references_message(monkeypatch):
    monkeypatch.setitem(arrays._KIND_OF_TYPE, _PosingAsCupy, "cupy")
    device = lambda a: np.asarray(a, np.float32).view(_PosingAsCupy)  # noqa: E731
    x, ones, zeros = device(np.ones((2, 3))), device(np.ones(3)), device(np.zeros(3))
    with pytest.raises(TypeError,
                       match=r"^cudnn_bn\.reference: expected numpy arrays; "
                             r"use cudnn_bn\.forward_training etc\. for cupy arrays$"):
        reference.forward_inference(x, ones, zeros, zeros, ones)


def test_backward_without_saved_statistics_refuses_mode_auto_with_its_message():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"^mode: the reference needs an explicit mode, got 'auto'$"):
        reference.backward(x, x, np.ones(3, np.float32), mode="auto", eps=1e-5)
