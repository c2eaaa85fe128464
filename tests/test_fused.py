"""cudnn_bn.fused: the float64 reference against finite differences and against the plain reference
followed by ReLU; numpy and the simulated GPU through the fused Ex and the composed path; the
checks; a GPU parity test (marked gpu)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import DTYPES, LAYOUTS, MODES, make_case, shape_for
from cudnn_bn import Mode, reference
from cudnn_bn._core.modes import Activation, parse_activation
from cudnn_bn._core.tolerances import assert_close, statistics_rtol, to_numpy
from cudnn_bn.fused import (
    PATH_COMPOSED,
    PATH_FUSED_EX,
    PATH_REFERENCE,
    FusedSaved,
    backward,
    forward_inference,
    forward_training,
    reference_backward,
    reference_forward_training,
)
from fake_cudnn import simulated_gpu


def _inputs(shape, mode, channel_axis, dtype, seed=0):
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, dtype, seed=seed)
    residual = np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype)
    return layout, x, dy, gamma, beta, residual


def _pre_activation(x, gamma, beta, residual, mode, channel_axis):
    """BN(x) + residual in float64 (the plain reference on x widened exactly)."""
    pre, _ = reference.forward_training(x.astype(np.float64), gamma, beta, mode=mode, channel_axis=channel_axis)
    return pre if residual is None else pre + residual


# ---- the reference against finite differences, in float64 ----
# Central differences with a step of 1e-6: the truncation (step**2 times the third derivative) and the
# loss's float64 rounding over the step (1e-16 * |loss| / step) are each about 1e-10 of a gradient of
# order one; a one-sided difference is good to step times the second derivative only.
FINITE_DIFFERENCES_RTOL, FINITE_DIFFERENCES_ATOL = 1e-6, 1e-7
ONE_SIDED_DIFFERENCE_ATOL = 1e-6


def _loss(x, gamma, beta, residual, weights, mode, channel_axis):
    y, _ = reference_forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=channel_axis)
    return float(np.sum(weights * y))


def _central_differences(function, array, step=1e-6):
    grad = np.empty(array.shape)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        above = function()
        array[index] = saved - step
        below = function()
        array[index] = saved
        grad[index] = (above - below) / (2 * step)
    return grad


def _assert_matches_differences(gradient, loss, array):
    """``gradient`` of ``loss()`` with respect to ``array``, against central differences."""
    np.testing.assert_allclose(gradient, _central_differences(loss, array), rtol=FINITE_DIFFERENCES_RTOL,
                               atol=FINITE_DIFFERENCES_ATOL)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("mode,ndim,channel_axis", [
    (Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 4, -1), (Mode.PER_ACTIVATION, 3, 1), (Mode.SPATIAL_PERSISTENT, 3, -1),
])
def test_reference_gradients_match_finite_differences(mode, ndim, channel_axis, with_residual):
    shape = shape_for(ndim, channel_axis, batch=3, channels=2, spatial=(2, 2, 2))
    _, x, _, gamma, beta, residual = _inputs(shape, mode, channel_axis, np.float64, seed=3)
    residual = residual if with_residual else None
    pre = _pre_activation(x, gamma, beta, residual, mode, channel_axis)
    # away from ReLU's kink, so that a step of 1e-6 cannot cross it
    assert np.abs(pre).min() > 1e-3
    weights = np.random.default_rng(7).standard_normal(shape)
    y, saved = reference_forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=channel_axis)
    dx, dresidual, dgamma, dbeta = reference_backward(x, y, weights, gamma, saved)
    loss = lambda: _loss(x, gamma, beta, residual, weights, mode, channel_axis)  # noqa: E731
    _assert_matches_differences(dx, loss, x)
    _assert_matches_differences(dgamma, loss, gamma)
    _assert_matches_differences(dbeta, loss, beta)
    if with_residual:
        _assert_matches_differences(dresidual, loss, residual)
    else:
        assert dresidual is None
    assert np.count_nonzero(y == 0) > 0 and np.count_nonzero(y > 0) > 0  # both sides of the kink were exercised


def test_gradient_at_exactly_zero_pre_activation_is_zero_and_the_rest_match_finite_differences():
    """Residual = -BN(x) at some entries makes their pre-activation exactly 0: there ReLU's
    gradient is 0 (the one-sided difference from below), and every other gradient matches central
    differences of a loss that does not weigh the kinks."""
    mode, channel_axis = Mode.SPATIAL, 1
    shape = (3, 2, 2, 2)
    _, x, _, gamma, beta, residual = _inputs(shape, mode, channel_axis, np.float64, seed=5)
    bn = _pre_activation(x, gamma, beta, None, mode, channel_axis)
    kinks = np.zeros(shape, bool)
    kinks[0, 0, 0, :] = kinks[2, 1, 1, 1] = True
    residual[kinks] = -bn[kinks]
    y, saved = reference_forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=channel_axis)
    pre = bn + residual
    assert (pre[kinks] == 0).all() and (y[kinks] == 0).all()
    assert np.abs(pre[~kinks]).min() > 1e-3

    # at the kinks: weight 1, gradient 0
    ones = np.ones(shape)
    dx, dresidual, dgamma, dbeta = reference_backward(x, y, ones, gamma, saved)
    assert (dresidual[kinks] == 0).all()
    step = 1e-6
    for index in zip(*np.nonzero(kinks)):
        below = residual.copy()
        below[index] -= step
        f_below = _loss(x, gamma, beta, below, ones, mode, channel_axis)
        difference = (_loss(x, gamma, beta, residual, ones, mode, channel_axis) - f_below) / step
        assert difference == pytest.approx(0.0, abs=ONE_SIDED_DIFFERENCE_ATOL)

    # elsewhere: central differences of a loss with zero weight at the kinks
    weights = np.random.default_rng(11).standard_normal(shape)
    weights[kinks] = 0.0
    dx, dresidual, dgamma, dbeta = reference_backward(x, y, weights, gamma, saved)
    loss = lambda: _loss(x, gamma, beta, residual, weights, mode, channel_axis)  # noqa: E731
    _assert_matches_differences(dx, loss, x)
    _assert_matches_differences(dgamma, loss, gamma)
    _assert_matches_differences(dbeta, loss, beta)
    _assert_matches_differences(dresidual, loss, residual)


def test_a_channel_whose_pre_activation_is_exactly_zero_gets_no_gradient():
    """A constant channel with beta 0 normalizes to exactly 0: ReLU passes nothing back to it."""
    x = np.random.default_rng(2).standard_normal((4, 3, 2, 2))
    x[:, 1] = 0.75
    gamma, beta = np.ones(3), np.array([0.1, 0.0, -0.2])
    y, saved = reference_forward_training(x, gamma, beta, mode="spatial")
    assert (y[:, 1] == 0).all()
    dx, dresidual, dgamma, dbeta = reference_backward(x, y, np.ones_like(x), gamma, saved)
    assert dresidual is None
    assert dgamma[1] == 0 and dbeta[1] == 0 and (dx[:, 1] == 0).all()
    assert dbeta[0] != 0 and dbeta[2] != 0


# ---- the reference against the plain reference followed by ReLU ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_reference_is_the_plain_reference_then_add_and_relu(mode, ndim, channel_axis, dtype):
    shape = shape_for(ndim, channel_axis)
    layout, x, dy, gamma, beta, residual = _inputs(shape, mode, channel_axis, dtype)
    param_dtype = gamma.dtype
    running = [np.zeros(layout.param_shape, param_dtype), np.ones(layout.param_shape, param_dtype)]
    plain_running = [a.copy() for a in running]
    y, saved = reference_forward_training(x, gamma, beta, *running, residual=residual, mode=mode,
                                          channel_axis=channel_axis)
    plain_y, plain_saved = reference.forward_training(x, gamma, beta, *plain_running, mode=mode,
                                                      channel_axis=channel_axis)
    expected = np.maximum(plain_y.astype(np.float64) + residual, 0)
    assert y.dtype == dtype and y.shape == shape and y.flags.c_contiguous
    assert_close(y, expected, dtype, what="y")
    np.testing.assert_array_equal(saved.mean, plain_saved.mean)
    np.testing.assert_array_equal(saved.inv_std, plain_saved.inv_std)
    for fused_stat, plain_stat in zip(running, plain_running):
        np.testing.assert_array_equal(fused_stat, plain_stat)
    assert saved.path == PATH_REFERENCE and saved.has_residual and saved.mode is Mode(mode)

    dx, dresidual, dgamma, dbeta = reference_backward(x, y, dy, gamma, saved)
    grad = np.where(y > 0, dy, 0).astype(dtype)
    plain_dx, plain_dgamma, plain_dbeta = reference.backward(x, grad, gamma, plain_saved)
    np.testing.assert_array_equal(dresidual, grad)
    assert dx.dtype == dtype and dx.flags.c_contiguous and dresidual.flags.c_contiguous
    assert dgamma.dtype == param_dtype and dgamma.shape == layout.param_shape
    assert_close(dx, plain_dx, dtype, what="dx")
    count = layout.count
    assert_close(dgamma, plain_dgamma, dtype, what="dgamma", scale=count)
    assert_close(dbeta, plain_dbeta, dtype, what="dbeta", scale=count)

    y_eval = forward_inference(x, gamma, beta, *running, residual=residual, mode=mode, channel_axis=channel_axis)
    plain_eval = reference.forward_inference(x, gamma, beta, *running, mode=mode, channel_axis=channel_axis)
    assert y_eval.dtype == dtype and y_eval.flags.c_contiguous
    assert_close(y_eval, np.maximum(plain_eval.astype(np.float64) + residual, 0), dtype, what="inference")


def test_results_are_rounded_once():
    """float16: y is the float64 result rounded once, so it can differ from rounding BN first."""
    mode, channel_axis = Mode.SPATIAL, 1
    _, x, _, gamma, beta, residual = _inputs((8, 4, 3, 3), mode, channel_axis, np.float16, seed=9)
    y, _ = reference_forward_training(x, gamma, beta, residual=residual, mode=mode)
    exact = np.maximum(_pre_activation(x, gamma, beta, residual, mode, channel_axis), 0)
    np.testing.assert_array_equal(y, exact.astype(np.float16))


def test_the_fused_reference_lives_in_reference_and_this_module_only_dispatches():
    """cudnn_bn.fused publishes the reference's fused functions under their documented names and
    holds no NumPy math of its own."""
    from cudnn_bn import fused

    assert fused.reference_forward_training is reference.fused_forward_training
    assert fused.reference_forward_inference is reference.fused_forward_inference
    assert fused.reference_backward is reference.fused_backward
    assert {"fused_forward_training", "fused_forward_inference", "fused_backward", "activation_mask"} <= set(
        reference.__all__
    )
    with open(fused.__file__, encoding="utf-8") as handle:
        source = handle.read()
    assert "import numpy" not in source and "np." not in source


def test_the_fused_reference_refuses_cupy_arrays_in_its_own_terms(gpu):
    cupy = sys.modules["cupy"]
    x = cupy.asarray(np.ones((4, 3), np.float32))
    gamma, beta = cupy.asarray(np.ones(3, np.float32)), cupy.asarray(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"^cudnn_bn\.fused\.reference_\*: expected numpy arrays; use "
                                        r"cudnn_bn\.fused\.forward_training etc\. for cupy arrays$"):
        reference_forward_training(x, gamma, beta)
    with pytest.raises(TypeError, match=r"^cudnn_bn\.reference: expected numpy arrays; use cudnn_bn\.forward_training"):
        reference.forward_training(x, gamma, beta)


# ---- the public calls on numpy ----
def test_public_call_on_numpy_resolves_auto_and_records_the_overflow_policy():
    shape = (4, 3, 3, 8)
    _, x, dy, gamma, beta, residual = _inputs(shape, "spatial", -1, np.float32)
    y, saved = forward_training(x, gamma, beta, residual=residual, channel_axis=-1)
    assert saved.mode is Mode.SPATIAL_PERSISTENT and saved.on_overflow is not None  # "auto" on channels-last training
    assert saved.path == PATH_REFERENCE and saved.activation is Activation.RELU
    result = backward(x, y, dy, gamma, saved)
    assert len(result) == 4 and result[1] is not None
    y2, saved2 = forward_training(x, gamma, beta, channel_axis=-1)
    result2 = backward(x, y2, dy, gamma, saved2)
    assert len(result2) == 4 and result2[1] is None


def test_activation_names():
    assert parse_activation("ReLU") is Activation.RELU and parse_activation(Activation.RELU) is Activation.RELU
    with pytest.raises(ValueError, match="activation: expected one of \\['relu'\\]"):
        parse_activation("gelu")
    from cudnn_bn._cudnn import raw

    assert int(Activation.RELU) == int(raw.ActivationMode.RELU)  # valued as cudnnActivationMode_t


# ---- the checks ----
@pytest.fixture
def small():
    _, x, dy, gamma, beta, residual = _inputs((4, 3, 2, 2), "spatial", 1, np.float32)
    return x, dy, gamma, beta, residual


@pytest.mark.parametrize("bad,error,match", [
    (lambda x, r: r[:2], ValueError, r"residual: expected x's shape \(4, 3, 2, 2\), got \(2, 3, 2, 2\)"),
    (lambda x, r: r.astype(np.float64), TypeError, "residual: expected x's dtype float32, got float64"),
    (lambda x, r: x, ValueError, "residual: expected memory of its own.*overlaps x"),
    (lambda x, r: x[:, :, :, ::-1], ValueError, "residual: expected memory of its own"),
    (lambda x, r: [1.0], TypeError, "residual"),
])
def test_bad_residual_is_refused_before_anything_changes(small, bad, error, match):
    x, dy, gamma, beta, residual = small
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    copies = [a.copy() for a in (x, gamma, beta, running_mean, running_var)]
    with pytest.raises(error, match=match):
        forward_training(x, gamma, beta, running_mean, running_var, residual=bad(x, residual), mode="spatial")
    for before, after in zip(copies, (x, gamma, beta, running_mean, running_var)):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(error, match=match):
        forward_inference(x, gamma, beta, running_mean, running_var, residual=bad(x, residual), mode="spatial")


def test_backward_checks_y_and_saved(small):
    x, dy, gamma, beta, residual = small
    y, saved = forward_training(x, gamma, beta, residual=residual, mode="spatial")
    with pytest.raises(ValueError, match=r"y: expected the forward's output, of x's shape"):
        backward(x, y[:2], dy, gamma, saved)
    with pytest.raises(TypeError, match="y: expected the forward's output, of x's dtype float32, got float64"):
        backward(x, y.astype(np.float64), dy, gamma, saved)
    with pytest.raises(TypeError, match="saved: expected the cudnn_bn.fused.FusedSaved"):
        backward(x, y, dy, gamma, saved.stats)
    with pytest.raises(ValueError, match="eps: saved statistics were computed with eps"):
        backward(x, y, dy, gamma, saved, eps=1e-3)
    with pytest.raises(ValueError, match="activation: expected one of"):
        forward_training(x, gamma, beta, activation="tanh")
    with pytest.raises(ValueError, match="FusedSaved.path"):
        FusedSaved(saved.stats, "relu", False, "somewhere")


def test_the_path_is_a_str_enum_whose_values_are_the_documented_strings(small):
    import json

    from cudnn_bn.fused import FusedPath

    assert [(member.name, member.value) for member in FusedPath] == [
        ("REFERENCE", "reference"), ("FUSED_EX", "fused_ex"), ("COMPOSED", "composed")]
    assert (PATH_REFERENCE, PATH_FUSED_EX, PATH_COMPOSED) == (FusedPath.REFERENCE, FusedPath.FUSED_EX,
                                                              FusedPath.COMPOSED)
    x, _, gamma, beta, residual = small
    _, saved = forward_training(x, gamma, beta, residual=residual, mode="spatial")
    assert saved.path is FusedPath.REFERENCE and saved.path == "reference"
    assert str(saved.path) == "reference" and f"{saved.path:>10}|" == " reference|"
    assert json.dumps(saved.path) == '"reference"'
    rebuilt = FusedSaved(saved.stats, "relu", True, "composed")  # given as the documented string
    assert rebuilt.path is FusedPath.COMPOSED
    for wrong in ("COMPOSED", "somewhere", 1, None):
        with pytest.raises(ValueError,
                           match=r"^FusedSaved\.path: expected one of \['reference', 'fused_ex', 'composed'\], got "):
            FusedSaved(saved.stats, "relu", False, wrong)


# ---- the simulated GPU: the fused Ex path and the composed path ----
@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


EX_CASE = dict(shape=(6, 3, 2, 8), mode="spatial_persistent", channel_axis=-1, dtype=np.float16)
CASES = [
    pytest.param(EX_CASE, PATH_FUSED_EX, id="ex-nhwc-half-persistent"),
    pytest.param(dict(shape=(6, 3, 2, 6), mode="spatial_persistent", channel_axis=-1, dtype=np.float16), PATH_COMPOSED,
                 id="composed-C%4"),
    pytest.param(dict(shape=(4, 8, 3, 3), mode="spatial", channel_axis=1, dtype=np.float32), PATH_COMPOSED,
                 id="composed-nchw-float"),
    pytest.param(dict(shape=(5, 4, 3), mode="per_activation", channel_axis=1, dtype=np.float64), PATH_COMPOSED,
                 id="composed-per-activation"),
]


def _device(cupy, *arrays):
    return [None if a is None else cupy.asarray(a) for a in arrays]


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("case,path", CASES)
def test_simulated_gpu_matches_the_reference(gpu, case, path, with_residual):
    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = case["shape"], case["mode"], case["channel_axis"], case["dtype"]
    layout, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    residual = residual if with_residual else None
    param = gamma.dtype
    host_running = [np.zeros(layout.param_shape, param), np.ones(layout.param_shape, param)]
    y_ref, saved_ref = forward_training(x, gamma, beta, *host_running, residual=residual, mode=mode, channel_axis=axis)
    grads_ref = backward(x, y_ref, dy, gamma, saved_ref)

    d_x, d_dy, d_gamma, d_beta, d_residual = _device(cupy, x, dy, gamma, beta, residual)
    running = [cupy.zeros(layout.param_shape, param), cupy.ones(layout.param_shape, param)]
    y, saved = forward_training(d_x, d_gamma, d_beta, *running, residual=d_residual, mode=mode, channel_axis=axis)
    grads = backward(d_x, y, d_dy, d_gamma, saved)

    assert saved.path == path and saved.has_residual == with_residual and saved.mode is Mode[mode.upper()]
    assert (saved.reserve_space is not None) == (path == PATH_FUSED_EX)
    assert_close(y.get(), y_ref, dtype, what="y")
    rtol = statistics_rtol(dtype)
    np.testing.assert_allclose(saved.mean.get(), saved_ref.mean, rtol=rtol, atol=rtol)
    for device, host in zip(running, host_running):
        np.testing.assert_allclose(device.get(), host, rtol=rtol, atol=rtol)
    assert len(grads) == 4 and (grads[1] is None) == (not with_residual)
    for name, got, want in zip(("dx", "dresidual", "dgamma", "dbeta"), grads, grads_ref):
        if want is None:
            continue
        assert got.shape == want.shape and got.dtype == want.dtype and got.flags.c_contiguous
        assert_close(got.get(), want, dtype, what=name, scale=layout.count if name in ("dgamma", "dbeta") else 1.0)

    ex_calls = [call for call in gpu.calls if call.endswith("Ex")]
    if path == PATH_FUSED_EX:
        assert ex_calls == ["cudnnBatchNormalizationForwardTrainingEx", "cudnnBatchNormalizationBackwardEx"]
    else:
        assert ex_calls == [] and "cudnnBatchNormalizationForwardTraining" in gpu.calls

    y_eval = forward_inference(d_x, d_gamma, d_beta, *running, residual=d_residual, mode=mode, channel_axis=axis)
    host_eval = forward_inference(x, gamma, beta, *[r.get() for r in running], residual=residual, mode=mode,
                                  channel_axis=axis)
    assert_close(y_eval.get(), host_eval, dtype, what="inference")


def test_fused_ex_reserve_space_has_the_size_of_its_bn_ops(gpu):
    """The fused ops reserve more than BN alone (the ReLU's mask); the plan queries per bnOps."""
    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    _, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    d_x, d_gamma, d_beta, d_residual = _device(cupy, x, gamma, beta, residual)
    _, saved = forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode=mode, channel_axis=axis)
    expected = gpu.reserve_size + 4 * -(-x.size // 32)
    assert saved.reserve_space.size == expected > gpu.reserve_size
    assert gpu.refusals == []


def test_fused_ex_backward_refuses_a_foreign_reserve_space(gpu):
    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    _, x, dy, gamma, beta, _ = _inputs(shape, mode, axis, dtype)
    d_x, d_dy, d_gamma, d_beta = _device(cupy, x, dy, gamma, beta)
    y, saved = forward_training(d_x, d_gamma, d_beta, mode=mode, channel_axis=axis)
    small = FusedSaved(
        type(saved.stats)._checked(saved.mean, saved.inv_std, saved.mode, saved.eps, saved.channel_axis,
                                   cupy.empty(8, np.uint8), saved.on_overflow),
        saved.activation, False, PATH_FUSED_EX, bias=saved.bias,
    )
    with pytest.raises(ValueError, match="saved.reserve_space: expected at least"):
        backward(d_x, y, d_dy, d_gamma, small)


def test_the_forward_ex_workspace_query_gets_x_as_z_desc_for_every_bn_ops(gpu, monkeypatch):
    """PyTorch and CuPy 13 pass x's descriptor as zDesc to the forward Ex workspace query; so does
    cudnn_bn, plain BN (cudnn_bn.forward_training), BN_ACTIVATION and BN_ADD_ACTIVATION alike."""
    import cudnn_bn
    from cudnn_bn._cudnn import plans, raw

    plans.PLANS.clear()  # the sizes are queried once per plan: an earlier test's plan would hide the query
    library, name = raw.library(), "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize"
    query, seen = getattr(library, name), []

    def recording(handle, mode, ops, x_desc, z_desc, *rest):
        seen.append((ops, x_desc, z_desc))
        return query(handle, mode, ops, x_desc, z_desc, *rest)

    monkeypatch.setattr(library, name, recording)
    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    _, x, _, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    d_x, d_gamma, d_beta, d_residual = _device(cupy, x, gamma, beta, residual)
    cudnn_bn.forward_training(d_x, d_gamma, d_beta, mode=mode, channel_axis=axis)
    forward_training(d_x, d_gamma, d_beta, mode=mode, channel_axis=axis)
    forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode=mode, channel_axis=axis)
    assert sorted(ops for ops, _, _ in seen) == [0, 1, 2]
    assert all(z_desc == x_desc and x_desc for _, x_desc, z_desc in seen)


def test_disabled_ex_path_composes(gpu):
    from cudnn_bn._cudnn.plans import set_ex_path_enabled

    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    _, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    previous = set_ex_path_enabled(False)
    try:
        d_x, d_dy, d_gamma, d_beta, d_residual = _device(cupy, x, dy, gamma, beta, residual)
        y, saved = forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode=mode, channel_axis=axis)
        grads = backward(d_x, y, d_dy, d_gamma, saved)
    finally:
        set_ex_path_enabled(previous)
    assert saved.path == PATH_COMPOSED and not any(call.endswith("Ex") for call in gpu.calls)
    y_ref, saved_ref = forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=axis)
    assert_close(y.get(), y_ref, dtype, what="y")
    assert_close(grads[1].get(), backward(x, y_ref, dy, gamma, saved_ref)[1], dtype, what="dresidual")


def test_simulated_gpu_checks_residual_device_and_y(gpu):
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta, residual = _inputs((4, 8, 2, 2), "spatial", 1, np.float32)
    d_x, d_dy, d_gamma, d_beta, d_residual = _device(cupy, x, dy, gamma, beta, residual)
    with pytest.raises(TypeError, match="arrays of mixed kinds"):
        forward_training(d_x, d_gamma, d_beta, residual=residual, mode="spatial")
    with pytest.raises(ValueError, match="residual: expected memory of its own"):
        forward_training(d_x, d_gamma, d_beta, residual=d_x, mode="spatial")
    y, saved = forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode="spatial")
    with pytest.raises(TypeError, match="y: expected the forward's output"):
        backward(d_x, y.astype(np.float64), d_dy, d_gamma, saved)
    with pytest.raises(TypeError, match="mixed kinds"):
        backward(d_x, y.get(), d_dy, d_gamma, saved)


def test_persistent_overflow_in_the_fused_ex_call_raises_or_falls_back(gpu):
    from cudnn_bn import CudnnOverflowError

    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    layout, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    d_x, d_gamma, d_beta, d_residual = _device(cupy, x, gamma, beta, residual)
    running = [cupy.zeros(layout.param_shape, np.float32), cupy.ones(layout.param_shape, np.float32)]
    gpu.overflow_modes = {Mode.SPATIAL_PERSISTENT}
    with pytest.raises(CudnnOverflowError):
        forward_training(d_x, d_gamma, d_beta, *running, residual=d_residual, mode=mode, channel_axis=axis)
    np.testing.assert_array_equal(running[0].get(), 0)  # restored
    with pytest.warns(RuntimeWarning, match="re-ran with SPATIAL"):
        y, saved = forward_training(d_x, d_gamma, d_beta, *running, residual=d_residual, mode=mode, channel_axis=axis,
                                    on_overflow="fallback")
    assert saved.path == PATH_COMPOSED and saved.mode is Mode.SPATIAL
    y_ref, _ = forward_training(x, gamma, beta, residual=residual, mode="spatial", channel_axis=axis)
    assert_close(y.get(), y_ref, dtype, what="y after fallback")


def _exact_zero_channel(x, beta, residual, channel_axis):
    """Channel 0 constant, its beta 0 and its residual 0: its pre-activation is exactly 0 on any
    machine (x - mean is exactly 0), so ReLU's convention at 0 decides its gradients."""
    index = (slice(None),) * (channel_axis % x.ndim) + (0,)
    x[index] = 0.75
    beta[0] = 0.0
    if residual is not None:
        residual[index] = 0.0
    return index


def _check_exact_zero_channel(index, y, grads):
    """Where the reference computes (numpy, the simulated GPU): channel 0 normalizes to exactly 0
    and ReLU's gradient there is 0, so all of the channel's results are exactly 0."""
    y = to_numpy(y)
    assert (y[index] == 0).all()
    dx, dresidual, dgamma, dbeta = (None if g is None else to_numpy(g) for g in grads)
    assert dgamma[0] == 0 and dbeta[0] == 0 and (dx[index] == 0).all()
    if dresidual is not None:
        assert (dresidual[index] == 0).all()


SPATIAL_CASES = [case for case in CASES if case.values[0]["mode"] != "per_activation"]


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("case,path", SPATIAL_CASES)
def test_exactly_zero_pre_activation_on_the_simulated_gpu(gpu, case, path, with_residual):
    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = case["shape"], case["mode"], case["channel_axis"], case["dtype"]
    _, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    residual = residual if with_residual else None
    index = _exact_zero_channel(x, beta, residual, axis)
    for arrays in ((x, dy, gamma, beta, residual), _device(cupy, x, dy, gamma, beta, residual)):
        y, saved = forward_training(arrays[0], arrays[2], arrays[3], residual=arrays[4], mode=mode, channel_axis=axis)
        _check_exact_zero_channel(index, y, backward(arrays[0], y, arrays[1], arrays[2], saved))


# ---- NaN before the ReLU gives 0 on every path (CUDNN_NOT_PROPAGATE_NAN on the Ex path) ----
def _nan_pre_activations(x, residual, channel_axis):
    """x and residual with NaN placed so that some pre-activations BN(x) + residual are NaN: two
    residual elements, or (without a residual) one x element, which makes channel 0's statistics,
    hence all its pre-activations, NaN. Returns (x, residual, where y must be 0)."""
    x, where = x.copy(), np.zeros(x.shape, bool)
    if residual is not None:
        residual = residual.copy()
        for place in ((0,) * x.ndim, (1,) + (0,) * (x.ndim - 1)):
            residual[place], where[place] = np.nan, True
        return x, residual, where
    x[(0,) * x.ndim] = np.nan
    channel = [slice(None)] * x.ndim
    channel[channel_axis % x.ndim] = 0
    where[tuple(channel)] = True
    return x, residual, where


def _y_with_nan_pre_activations(cupy, case, with_residual):
    shape, mode, axis, dtype = case["shape"], case["mode"], case["channel_axis"], case["dtype"]
    _, x, _, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    x, residual, where = _nan_pre_activations(x, residual if with_residual else None, axis)
    arrays = (x, gamma, beta, residual) if cupy is None else _device(cupy, x, gamma, beta, residual)
    y, saved = forward_training(*arrays[:3], residual=arrays[3], mode=mode, channel_axis=axis)
    return to_numpy(y), where, saved.path


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("case,path", [pytest.param(EX_CASE, PATH_REFERENCE, id="reference")] + SPATIAL_CASES)
def test_a_nan_pre_activation_gives_0_on_every_fused_path(gpu, case, path, with_residual):
    y, where, ran = _y_with_nan_pre_activations(None if path == PATH_REFERENCE else sys.modules["cupy"], case,
                                                with_residual)
    assert ran == path
    np.testing.assert_array_equal(y[where], 0)
    assert np.isfinite(y).all()


def test_the_nan_check_fails_on_the_ex_path_when_the_descriptor_propagates_nan(gpu, monkeypatch):
    from cudnn_bn._cudnn import plans, raw

    library = raw.library()
    create = library.cudnnSetActivationDescriptor
    propagate = int(raw.NanPropagation.PROPAGATE_NAN)
    monkeypatch.setattr(library, "cudnnSetActivationDescriptor",
                        lambda descriptor, mode, nan, coef: create(descriptor, mode, propagate, coef))
    plans.PLANS.clear()  # plans own the activation descriptors they made
    try:
        y, where, ran = _y_with_nan_pre_activations(sys.modules["cupy"], EX_CASE, True)
    finally:
        plans.PLANS.clear()
    assert ran == PATH_FUSED_EX and np.isnan(y[where]).all()  # what the test above would catch


def _gradients_at_the_constant_channel(grads, blocked, passing):
    """Which reference gradients cuDNN's fused backward gave for the constant channel 0, and those
    gradients whole.

    cuDNN's mean of a constant need not be exact, so channel 0's pre-activation is 0 only up to
    that rounding (y there is 0 within the tolerance, which the caller checks), and ReLU's gradient
    there may read as 0 (``blocked``, the reference's convention at exactly 0) or 1 (``passing``).
    The channel's elements are one value normalized by one mean and inverse std, so the choice is
    the same for the whole channel, and every gradient must match one of the two alternatives.
    dbeta[0] tells them apart: 0 when blocked, the channel's sum of dy when passing."""
    dbeta = to_numpy(grads[3]).reshape(-1)[0]
    distances = {name: abs(dbeta - float(np.asarray(alternative[3], np.float64).reshape(-1)[0]))
                 for name, alternative in (("blocked", blocked), ("passing", passing))}
    chosen = min(distances, key=distances.get)
    return chosen, (blocked if chosen == "blocked" else passing)


def _relu_open_at(y, index):
    """y with channel 0 made positive: the reference backward then lets that channel's dy through."""
    opened = np.array(y, copy=True)
    opened[index] = 1
    return opened


# ---- a GPU machine ----
@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("case,path", CASES)
def test_gpu_parity_with_the_reference(case, path, with_residual, request):
    import cupy

    shape, mode, axis, dtype = case["shape"], case["mode"], case["channel_axis"], case["dtype"]
    layout, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    residual = residual if with_residual else None
    index = _exact_zero_channel(x, beta, residual, axis) if mode != "per_activation" else None
    y_ref, saved_ref = forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=axis)
    grads_ref = backward(x, y_ref, dy, gamma, saved_ref)
    d = [None if a is None else cupy.asarray(a) for a in (x, dy, gamma, beta, residual)]
    y, saved = forward_training(d[0], d[2], d[3], residual=d[4], mode=mode, channel_axis=axis)
    grads = backward(d[0], y, d[1], d[2], saved)
    assert saved.path == path
    assert_close(y, y_ref, dtype, what="y")  # channel 0 included: 0 within the tolerance
    if index is not None:
        passing = backward(x, _relu_open_at(y_ref, index), dy, gamma, saved_ref)
        relu, grads_ref = _gradients_at_the_constant_channel(grads, grads_ref, passing)
        request.node.user_properties.append(("relu_gradient_at_the_constant_channel", relu))
    _assert_gradients_close(grads, grads_ref, dtype, layout.count)


def _assert_gradients_close(grads, expected, dtype, count):
    for name, got, want in zip(("dx", "dresidual", "dgamma", "dbeta"), grads, expected):
        if want is not None:
            assert_close(got, want, dtype, what=name, scale=count if name in ("dgamma", "dbeta") else 1.0)


@pytest.mark.parametrize("with_residual", [False, True])
def test_the_constant_channel_check_takes_either_reading_of_relu_at_zero_and_no_mixture(with_residual):
    shape, mode, axis, dtype = (6, 4, 3, 3), "spatial", 1, np.float32
    layout, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    residual = residual if with_residual else None
    index = _exact_zero_channel(x, beta, residual, axis)
    y, saved = forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=axis)
    blocked = backward(x, y, dy, gamma, saved)
    passing = backward(x, _relu_open_at(y, index), dy, gamma, saved)
    assert abs(float(passing[3][0])) > 0.1 and float(blocked[3][0]) == 0  # dbeta[0] tells them apart
    assert np.abs(passing[0][index]).max() > 1  # dx through a channel of variance 0: scaled by 1/sqrt(eps)
    for reading, grads in (("blocked", blocked), ("passing", passing)):
        chosen, expected = _gradients_at_the_constant_channel(grads, blocked, passing)
        assert chosen == reading
        _assert_gradients_close(grads, expected, dtype, layout.count)
    mixed = (passing[0], blocked[1], blocked[2], blocked[3])  # dx let through, dbeta blocked: no reading of ReLU
    _, expected = _gradients_at_the_constant_channel(mixed, blocked, passing)
    with pytest.raises(AssertionError, match="dx"):
        _assert_gradients_close(mixed, expected, dtype, layout.count)


# ---- the CUDA bodies the composed path runs on a GPU, read as elementwise math ----
class _InterpretedKernel:
    """Stands in for cupy.ElementwiseKernel on the simulated GPU: runs the body's statements
    (``T name = expr;`` / ``name = expr;`` with ``c ? a : b`` and ``(T)0``) with NumPy, so the
    kernels' math is checked here, though not their compilation."""

    made: list = []

    def __init__(self, in_params, out_params, body, name):
        self.inputs = [p.split()[-1] for p in in_params.split(",") if p.strip()]
        self.outputs = [p.split()[-1] for p in out_params.split(",") if p.strip()]
        self.body, self.name = body, name
        _InterpretedKernel.made.append(name)

    @staticmethod
    def _expression(text):
        import re

        text = text.replace("(T)0", "0").strip()
        ternary = re.fullmatch(r"(.+?)\?(.+):(.+)", text)
        if ternary:
            return "np.where({}, {}, {})".format(*(part.strip() for part in ternary.groups()))
        return text

    def __call__(self, *arrays):
        cupy = sys.modules["cupy"]
        names = dict(zip(self.inputs, (a.get() for a in arrays[: len(self.inputs)])))
        outputs = list(arrays[len(self.inputs):]) or [cupy.empty(arrays[0].shape, arrays[0].dtype)]
        dtype = outputs[0].dtype
        for statement in filter(str.strip, self.body.split(";")):
            target, expression = statement.split("=", 1)
            value = eval(self._expression(expression), {"np": np}, dict(names))  # noqa: S307
            names[target.split()[-1]] = np.asarray(value).astype(dtype)
        for name, out in zip(self.outputs, outputs):
            out[...] = names[name]
        return outputs[0]


@pytest.mark.parametrize("with_residual", [False, True])
def test_the_gpu_kernels_of_the_composed_path_compute_the_reference(gpu, monkeypatch, with_residual):
    cupy = sys.modules["cupy"]
    monkeypatch.setattr(cupy, "ElementwiseKernel", _InterpretedKernel, raising=False)
    from cudnn_bn._cudnn import fused_ops

    monkeypatch.setattr(fused_ops, "_KERNELS", {})
    _InterpretedKernel.made = []
    shape, mode, axis = (4, 8, 3, 3), "spatial", 1
    _, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, np.float32)
    residual = residual if with_residual else None
    index = _exact_zero_channel(x, beta, residual, axis)
    d_x, d_dy, d_gamma, d_beta, d_residual = _device(cupy, x, dy, gamma, beta, residual)
    y, saved = forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode=mode, channel_axis=axis)
    grads = backward(d_x, y, d_dy, d_gamma, saved)
    assert saved.path == PATH_COMPOSED
    assert _InterpretedKernel.made == ["cudnn_bn_relu" + ("_add" if with_residual else ""), "cudnn_bn_relu_grad"]
    y_ref, saved_ref = forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=axis)
    assert_close(y.get(), y_ref, np.float32, what="y")
    for name, got, want in zip(("dx", "dresidual", "dgamma", "dbeta"), grads, backward(x, y_ref, dy, gamma, saved_ref)):
        if want is not None:
            assert_close(got.get(), want, np.float32, what=name, scale=36.0)
    _check_exact_zero_channel(index, y, grads)


def test_persistent_overflow_in_the_fused_ex_backward_raises_or_falls_back(gpu):
    from cudnn_bn import CudnnOverflowError

    cupy = sys.modules["cupy"]
    shape, mode, axis, dtype = EX_CASE.values()
    _, x, dy, gamma, beta, residual = _inputs(shape, mode, axis, dtype)
    d_x, d_dy, d_gamma, d_beta, d_residual = _device(cupy, x, dy, gamma, beta, residual)
    y, saved = forward_training(d_x, d_gamma, d_beta, residual=d_residual, mode=mode, channel_axis=axis)
    assert saved.path == PATH_FUSED_EX
    gpu.overflow_modes = {Mode.SPATIAL_PERSISTENT}
    with pytest.raises(CudnnOverflowError):
        backward(d_x, y, d_dy, d_gamma, saved)
    with pytest.warns(RuntimeWarning, match="re-ran with SPATIAL"):
        grads = backward(d_x, y, d_dy, d_gamma, saved, on_overflow="fallback")
    assert gpu.calls[-1] == "cudnnBatchNormalizationBackward"  # the plain SPATIAL backward after the mask
    y_ref, saved_ref = forward_training(x, gamma, beta, residual=residual, mode=mode, channel_axis=axis)
    for name, got, want in zip(("dx", "dresidual", "dgamma", "dbeta"), grads, backward(x, y_ref, dy, gamma, saved_ref)):
        assert_close(got.get(), want, dtype, what=name, scale=36.0)


def test_a_residual_that_overlaps_a_running_statistic_is_refused():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    memory = np.zeros((5, 3), np.float32)
    running_mean, residual = memory[3], memory[:4]
    with pytest.raises(ValueError, match="running_mean: expected memory of its own.*overlaps residual"):
        forward_training(x, gamma, beta, running_mean, np.ones(3, np.float32), residual=residual, mode="spatial")
    assert (memory == 0).all()
