"""cudnn_bn.backward_inference and cudnn_bn.fused.backward_inference: the gradient through fixed
statistics, on numpy (the reference) and on the simulated GPU (the CuPy path of
cudnn_bn/_cudnn/frozen.py, whose kernels run as CuPy ufuncs there; tests/test_frozen.py checks the
kernels themselves).

Always: finite differences of forward_inference and a closed form computed group by group
(independent of the reference's blocks). With torch installed: torch's autograd through
F.batch_norm(training=False) in float64 (skipped without torch).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import DTYPES, FLOAT32_ROUNDING, FLOAT64_ROUNDING, LAYOUTS, MODES, make_case, shape_for
from cudnn_bn import Mode, fused, reference
from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.tolerances import assert_close
from fake_cudnn import FakeArray, simulated_gpu
from test_fused import _central_differences
from test_reference import _groups

EPS = 1e-5
# forward_inference, plain or fused, is affine in x, gamma, beta (and the residual) between ReLU's
# kinks: central differences are exact up to the loss's float64 rounding over the step, about
# 1e-16 * |loss| / step (1e-13 * |loss| with a step of 1e-3, 1e-10 * |loss| with one of 1e-6).
AFFINE_DIFFERENCES_RTOL, AFFINE_DIFFERENCES_ATOL = 1e-8, 1e-9  # a step of 1e-3
FUSED_DIFFERENCES_RTOL, FUSED_DIFFERENCES_ATOL = 1e-6, 1e-8  # a step of 1e-6
# the same products and sums reached through another call: the rounding of an operation or two
SAME_ARITHMETIC_RTOL = 1e-13
# dgamma from the variance recovered from inv_std (1 / inv_std**2 - eps): inv_std's rounding,
# amplified by the cancellation in the sum of dy * x_hat
RECOVERED_VARIANCE_RTOL = 1e-9
# torch's autograd in float64: the same formulas in another order, gradients of order one
TORCH_RTOL, TORCH_ATOL = FLOAT64_ROUNDING, FLOAT64_ROUNDING / 10


def _statistics(layout, dtype, seed=1, offset=0.0):
    """mean and var of the parameter shape and dtype (var away from 0)."""
    rng = np.random.default_rng(seed)
    param_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    mean = (offset + rng.standard_normal(layout.param_shape)).astype(param_dtype)
    var = (0.25 + rng.random(layout.param_shape)).astype(param_dtype)
    return mean, var


def _case(mode, ndim, channel_axis, dtype=np.float64, seed=0, offset=0.0):
    layout, x, dy, gamma, beta = make_case(shape_for(ndim, channel_axis), mode, channel_axis, dtype, seed=seed,
                                           offset=offset)
    mean, var = _statistics(layout, dtype, seed + 1, offset)
    return layout, x, dy, gamma, beta, mean, var


def _closed_form(x, dy, gamma, mean, var, layout, eps=EPS):
    """dx, dgamma, dbeta per group of an (F, m) matrix made by explicit transposes, in float64."""
    xg, dyg = _groups(np.asarray(x, np.float64), layout), _groups(np.asarray(dy, np.float64), layout)
    std = np.sqrt(np.asarray(var, np.float64).reshape(-1, 1) + eps)
    x_hat = (xg - np.asarray(mean, np.float64).reshape(-1, 1)) / std
    return np.asarray(gamma, np.float64).reshape(-1, 1) / std * dyg, (dyg * x_hat).sum(axis=1), dyg.sum(axis=1)


def _check_against_closed_form(results, x, dy, gamma, mean, var, layout, rtol=FLOAT64_ROUNDING, eps=EPS):
    dx, dgamma, dbeta = (np.asarray(host(a), np.float64) for a in results)
    expected_dx, expected_dgamma, expected_dbeta = _closed_form(x, dy, gamma, mean, var, layout, eps)
    np.testing.assert_allclose(_groups(dx, layout), expected_dx, rtol=rtol, atol=rtol)
    # dgamma and dbeta sum a group, and may cancel to near zero: ten times the absolute allowance
    np.testing.assert_allclose(dgamma.reshape(-1), expected_dgamma, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(dbeta.reshape(-1), expected_dbeta, rtol=rtol, atol=rtol * 10)


def host(array):
    return array.get() if isinstance(array, FakeArray) else array


# ---- numpy: the reference against finite differences and the closed form ----

@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_gradients_match_finite_differences_of_forward_inference(mode, ndim, channel_axis):
    layout, x, dy, gamma, beta, mean, var = _case(mode, ndim, channel_axis, seed=ndim)
    loss = lambda: float(np.sum(dy * reference.forward_inference(  # noqa: E731
        x, gamma, beta, mean, var, mode=mode, eps=EPS, channel_axis=channel_axis)))
    dx, dgamma, dbeta = cudnn_bn.backward_inference(x, dy, gamma, mean, var, mode=mode, eps=EPS,
                                                    channel_axis=channel_axis)
    for got, array in ((dx, x), (dgamma, gamma), (dbeta, beta)):
        # forward_inference is affine in each of them: central differences are exact up to rounding
        np.testing.assert_allclose(got, _central_differences(loss, array, step=1e-3), rtol=AFFINE_DIFFERENCES_RTOL,
                                   atol=AFFINE_DIFFERENCES_ATOL)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_reference_matches_the_closed_form_group_by_group(mode, ndim, channel_axis):
    layout, x, dy, gamma, _, mean, var = _case(mode, ndim, channel_axis, seed=2)
    results = reference.backward_inference(x, dy, gamma, mean, var, mode=mode, eps=EPS, channel_axis=channel_axis)
    _check_against_closed_form(results, x, dy, gamma, mean, var, layout)
    assert results[0].dtype == np.float64 and results[1].shape == results[2].shape == layout.param_shape


def test_dx_is_the_folded_scale_times_dy_and_the_sums_are_what_backward_sums():
    """dx = scale * dy with fold_inference's scale (another code path); with the batch's own
    statistics the parameter gradients equal the training backward's (the same sums)."""
    layout, x, dy, gamma, beta, _, _ = _case(Mode.SPATIAL, 4, 1, seed=5)
    _, saved = reference.forward_training(x, gamma, beta, mode="spatial", eps=EPS)
    mean, var = saved.mean, 1.0 / saved.inv_std**2 - EPS
    dx, dgamma, dbeta = cudnn_bn.backward_inference(x, dy, gamma, mean, var, eps=EPS)
    scale, _ = cudnn_bn.fold_inference(gamma, beta, mean, var, eps=EPS)
    np.testing.assert_allclose(dx, scale.reshape(layout.broadcast_shape) * dy, rtol=SAME_ARITHMETIC_RTOL)
    _, train_dgamma, train_dbeta = reference.backward(x, dy, gamma, saved)
    np.testing.assert_allclose(dgamma, train_dgamma, rtol=RECOVERED_VARIANCE_RTOL)
    np.testing.assert_allclose(dbeta, train_dbeta, rtol=SAME_ARITHMETIC_RTOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode,ndim,channel_axis", [(Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 5, -1),
                                                    (Mode.PER_ACTIVATION, 3, -1), (Mode.SPATIAL_PERSISTENT, 2, 1)])
def test_dtypes_follow_forward_inference_and_results_are_the_float64_result_rounded(mode, ndim, channel_axis, dtype):
    layout, x, dy, gamma, _, mean, var = _case(mode, ndim, channel_axis, dtype, seed=3)
    dx, dgamma, dbeta = cudnn_bn.backward_inference(x, dy, gamma, mean, var, mode=mode, channel_axis=channel_axis)
    param_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    assert (dx.dtype, dx.shape, dx.flags.c_contiguous) == (np.dtype(dtype), x.shape, True)
    assert dgamma.dtype == dbeta.dtype == param_dtype and dgamma.shape == dbeta.shape == layout.param_shape
    wide = reference.backward_inference(x.astype(np.float64), dy.astype(np.float64), gamma, mean, var, mode=mode,
                                        channel_axis=channel_axis)
    np.testing.assert_array_equal(dx, wide[0].astype(dtype))  # computed in float64, rounded once
    np.testing.assert_array_equal(dgamma, wide[1].astype(param_dtype))
    np.testing.assert_array_equal(dbeta, wide[2].astype(param_dtype))


def test_any_memory_order_and_parameters_of_another_float_dtype_give_the_same_results():
    layout, x, dy, gamma, _, mean, var = _case(Mode.SPATIAL, 4, 1, np.float32, seed=4)
    expected = cudnn_bn.backward_inference(x, dy, gamma, mean, var)
    strided_x = np.asfortranarray(x)
    strided_dy = np.ascontiguousarray(dy[:, :, ::-1])[:, :, ::-1]
    wide = [a.astype(np.float64) for a in (gamma, mean, var)]
    for got in (cudnn_bn.backward_inference(strided_x, strided_dy, gamma, mean, var),
                cudnn_bn.backward_inference(x, dy, *wide)):
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.flags.c_contiguous
            np.testing.assert_allclose(a, b, rtol=FLOAT32_ROUNDING)


def test_auto_resolves_as_forward_inference_and_eps_zero_is_allowed():
    layout, x, dy, gamma, _, mean, var = _case(Mode.PER_ACTIVATION, 2, 1, seed=6)
    auto = cudnn_bn.backward_inference(x, dy, gamma, mean, var, eps=0.0)  # 2-D: PER_ACTIVATION
    explicit = reference.backward_inference(x, dy, gamma, mean, var, mode="per_activation", eps=0.0)
    for a, b in zip(auto, explicit):
        np.testing.assert_array_equal(a, b)
    _check_against_closed_form(auto, x, dy, gamma, mean, var, layout, eps=0.0)


# ---- the same checks as forward_inference ----

def _bad_cases():
    """(name, change to the good arguments, error type, the start of the message)."""
    return [
        ("x int32", dict(x=lambda a: a.astype(np.int32)), TypeError, "x: expected dtype float16, float32 or float64"),
        ("x 1-D", dict(x=lambda a: a[0, 0, 0]), ValueError, "x: expected 2 to 5 dims"),
        ("an empty batch", dict(x=lambda a: a[:0], dy=lambda a: a[:0]), ValueError,
         "x: expected every dimension to be at least 1, got shape (0, 3, 3, 2) (an empty batch"),
        ("dy float32", dict(dy=lambda a: a.astype(np.float32)), TypeError,
         "dy: expected x's dtype float64, got float32"),
        ("dy shape", dict(dy=lambda a: a[:2]), ValueError, "dy: expected x's shape (4, 3, 3, 2), got (2, 3, 3, 2)"),
        ("gamma shape", dict(gamma=lambda a: a[:2]), ValueError, "gamma: expected shape (3,), got (2,)"),
        ("mean int", dict(mean=lambda a: a.astype(np.int64)), TypeError, "mean: expected a floating dtype, got int64"),
        ("var shape", dict(var=lambda a: a.reshape(3, 1)), ValueError, "var: expected shape (3,), got (3, 1)"),
        ("eps negative", dict(eps=-1.0), ValueError, "eps: expected a finite value >= 0"),
        ("channel_axis 2", dict(channel_axis=2), ValueError, "channel_axis: expected 1 (channels-first) or -1"),
        ("mode", dict(mode="batch"), ValueError, "mode: expected one of"),
        ("gamma a list", dict(gamma=lambda a: list(a)), TypeError, "gamma: expected a numpy.ndarray"),
    ]


def _call(function, arguments, change):
    arguments = dict(arguments)
    for name, value in change.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    positional = [arguments.pop(name) for name in ("x", "dy", "gamma", "mean", "var")]
    return function(*positional, **arguments)


@pytest.mark.parametrize("name,change,error,message", _bad_cases(), ids=[case[0] for case in _bad_cases()])
def test_refusals_name_the_argument_leave_the_arrays_alone_and_match_forward_inference(name, change, error, message):
    _, x, dy, gamma, beta = make_case((4, 3, 3, 2), "spatial", 1, np.float64, seed=7)
    mean, var = np.zeros(3), np.ones(3)
    good = dict(x=x, dy=dy, gamma=gamma, mean=mean, var=var, mode="auto", eps=EPS, channel_axis=1)
    before = [a.copy() for a in (x, dy, gamma, mean, var)]
    with pytest.raises(error) as raised:
        _call(cudnn_bn.backward_inference, good, change)
    assert str(raised.value).startswith(message), str(raised.value)
    for a, b in zip((x, dy, gamma, mean, var), before):
        np.testing.assert_array_equal(a, b)
    if "dy" not in change:  # forward_inference takes beta where this takes dy, and refuses alike
        forward = lambda x, beta, gamma, mean, var, **options: cudnn_bn.forward_inference(  # noqa: E731
            x, gamma, beta, mean, var, **options)
        with pytest.raises(error) as forward_raised:
            _call(forward, dict(good, dy=beta), change)
        assert str(forward_raised.value) == str(raised.value)


def test_the_reference_refuses_auto_and_cupy_arrays_in_its_own_terms(fresh_simulated_gpu):
    _, x, dy, gamma, _, mean, var = _case(Mode.SPATIAL, 4, 1)
    with pytest.raises(ValueError, match="mode: expected one of"):
        reference.backward_inference(x, dy, gamma, mean, var, mode="auto")
    with pytest.raises(TypeError, match="cudnn_bn.reference: expected numpy arrays"):
        reference.backward_inference(*(a.view(FakeArray) for a in (x, dy, gamma, mean, var)))


# ---- the fused variant ----

def _fused_case(mode, ndim, channel_axis, dtype=np.float64, seed=0, with_residual=True):
    layout, x, dy, gamma, beta, mean, var = _case(mode, ndim, channel_axis, dtype, seed)
    rng = np.random.default_rng(seed + 10)
    residual = rng.standard_normal(x.shape).astype(dtype) if with_residual else None
    y = fused.forward_inference(x, gamma, beta, mean, var, residual=residual, mode=mode, channel_axis=channel_axis)
    return layout, x, y, dy, gamma, beta, mean, var, residual


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("mode,ndim,channel_axis", [(Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 4, -1),
                                                    (Mode.PER_ACTIVATION, 3, 1), (Mode.SPATIAL, 2, 1)])
def test_fused_gradients_match_finite_differences_away_from_the_kink(mode, ndim, channel_axis, with_residual):
    layout, x, y, dy, gamma, beta, mean, var, residual = _fused_case(mode, ndim, channel_axis, seed=ndim,
                                                                     with_residual=with_residual)
    pre = reference.forward_inference(x, gamma, beta, mean, var, mode=mode, channel_axis=channel_axis)
    pre = pre if residual is None else pre + residual
    step = 1e-6
    assert np.abs(pre).min() > 1e3 * step and (pre > 0).any() and (pre < 0).any()  # differences never cross 0

    def loss():
        out = fused.forward_inference(x, gamma, beta, mean, var, residual=residual, mode=mode,
                                      channel_axis=channel_axis)
        return float(np.sum(dy * out))

    dx, dresidual, dgamma, dbeta = fused.backward_inference(x, y, dy, gamma, mean, var, mode=mode,
                                                            channel_axis=channel_axis)
    arrays = [(dx, x), (dgamma, gamma), (dbeta, beta)] + ([(dresidual, residual)] if residual is not None else [])
    for got, array in arrays:
        np.testing.assert_allclose(got, _central_differences(loss, array, step), rtol=FUSED_DIFFERENCES_RTOL,
                                   atol=FUSED_DIFFERENCES_ATOL)
    np.testing.assert_array_equal(dresidual, np.where(y > 0, dy, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_is_the_mask_then_the_plain_backward_rounded_once(dtype):
    layout, x, y, dy, gamma, _, mean, var, _ = _fused_case(Mode.SPATIAL, 4, -1, dtype, seed=8)
    dx, dresidual, dgamma, dbeta = fused.backward_inference(x, y, dy, gamma, mean, var, channel_axis=-1)
    mask = np.where(y > 0, dy.astype(np.float64), 0.0)
    wide = reference.backward_inference(x.astype(np.float64), mask, gamma, mean, var, channel_axis=-1)
    np.testing.assert_array_equal(dresidual, mask.astype(dtype))
    np.testing.assert_array_equal(dx, wide[0].astype(dtype))
    for got, want in zip((dgamma, dbeta), wide[1:]):
        np.testing.assert_array_equal(got, want.astype(gamma.dtype))
    assert fused.reference_backward_inference is reference.fused_backward_inference


def test_fused_refuses_a_y_that_is_not_the_forwards_output_and_an_unknown_activation():
    _, x, y, dy, gamma, _, mean, var, _ = _fused_case(Mode.SPATIAL, 4, 1)
    with pytest.raises(ValueError, match=r"^y: expected the forward's output, of x's shape"):
        fused.backward_inference(x, y[:2], dy, gamma, mean, var)
    with pytest.raises(TypeError, match=r"^y: expected the forward's output, of x's dtype float64, got float32"):
        fused.backward_inference(x, y.astype(np.float32), dy, gamma, mean, var)
    with pytest.raises(ValueError, match="^activation: expected one of"):
        fused.backward_inference(x, y, dy, gamma, mean, var, activation="gelu")
    with pytest.raises(ValueError, match="^dy: expected x's shape"):
        fused.backward_inference(x, y, dy[:1], gamma, mean, var)


# ---- torch's autograd through F.batch_norm(training=False), float64 ----

def _torch_gradients(x, dy, gamma, mean, var, layout, *, residual=None, relu=False):
    """dx, dgamma, dbeta (and dresidual) from torch's autograd, in x's layout; PER_ACTIVATION as
    (N, features) 2-D batch norm, channels-last moved to channels-first for torch."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    if not layout.mode.is_spatial:
        to_torch = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
        back = lambda a: a.reshape(layout.shape)  # noqa: E731
    elif layout.channels_last:
        to_torch = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731
        back = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731
    else:
        to_torch = back = lambda a: a  # noqa: E731
    def tensor(array, grad=True):
        return torch.tensor(np.ascontiguousarray(array), dtype=torch.float64, requires_grad=grad)

    xt, gt, bt = tensor(to_torch(x)), tensor(gamma.reshape(-1)), tensor(np.zeros(gamma.size))
    out = functional.batch_norm(xt, tensor(mean.reshape(-1), False), tensor(var.reshape(-1), False), gt, bt,
                                training=False, eps=EPS)
    rt = None
    if residual is not None:
        rt = tensor(to_torch(residual))
        out = out + rt
    if relu:
        out = functional.relu(out)
    out.backward(tensor(to_torch(dy), False))
    as_param = lambda t: t.grad.numpy().reshape(layout.param_shape)  # noqa: E731
    grads = [back(xt.grad.numpy()), as_param(gt), as_param(bt)]
    return grads + ([back(rt.grad.numpy())] if rt is not None else [])


TORCH_CASES = [(mode, ndim, axis) for mode in (Mode.SPATIAL, Mode.PER_ACTIVATION) for ndim, axis in LAYOUTS]


@pytest.fixture(params=["numpy", "simulated GPU"])
def where(request):
    """numpy arrays, or arrays on the simulated GPU."""
    if request.param == "numpy":
        yield lambda a: a
        return
    request.getfixturevalue("cudnn_library")
    monkeypatch = request.getfixturevalue("monkeypatch")
    with simulated_gpu(monkeypatch):
        yield lambda a: np.array(a, copy=True).view(FakeArray)


@pytest.mark.parametrize("mode,ndim,channel_axis", TORCH_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_matches_torch_autograd_through_eval_mode_batch_norm(where, mode, ndim, channel_axis):
    layout, x, dy, gamma, _, mean, var = _case(mode, ndim, channel_axis, seed=ndim + channel_axis)
    expected = _torch_gradients(x, dy, gamma, mean, var, layout)
    got = cudnn_bn.backward_inference(*(where(a) for a in (x, dy, gamma, mean, var)), mode=mode, eps=EPS,
                                      channel_axis=channel_axis)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, expected):
        np.testing.assert_allclose(host(a), b, rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=name)


@pytest.mark.parametrize("mode,ndim,channel_axis",
                         [(Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 5, -1), (Mode.PER_ACTIVATION, 2, 1)])
def test_fused_matches_torch_autograd_through_batch_norm_add_relu(where, mode, ndim, channel_axis):
    layout, x, y, dy, gamma, beta, mean, var, residual = _fused_case(mode, ndim, channel_axis, seed=9)
    if beta.any():  # torch's reference here runs with beta = 0
        beta = np.zeros_like(beta)
        y = fused.forward_inference(x, gamma, beta, mean, var, residual=residual, mode=mode, channel_axis=channel_axis)
    expected = _torch_gradients(x, dy, gamma, mean, var, layout, residual=residual, relu=True)
    dx, dresidual, dgamma, dbeta = fused.backward_inference(*(where(a) for a in (x, y, dy, gamma, mean, var)),
                                                            mode=mode, eps=EPS, channel_axis=channel_axis)
    for name, a, b in zip(("dx", "dgamma", "dbeta", "dresidual"), (dx, dgamma, dbeta, dresidual), expected):
        np.testing.assert_allclose(host(a), b, rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=name)


# ---- the simulated GPU: the CuPy path ----

def _device(*arrays):
    return [np.array(a, copy=True).view(FakeArray) for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
def test_simulated_gpu_matches_the_reference(fresh_simulated_gpu, mode, ndim, channel_axis, dtype):
    layout, x, dy, gamma, _, mean, var = _case(mode, ndim, channel_axis, dtype, seed=11)
    got = cudnn_bn.backward_inference(*_device(x, dy, gamma, mean, var), mode=mode, channel_axis=channel_axis)
    expected = reference.backward_inference(x, dy, gamma, mean, var, mode=mode, channel_axis=channel_axis)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, expected):
        assert isinstance(a, FakeArray) and a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, what=name, scale=1.0 if name == "dx" else layout.count)
    assert got[0].flags.c_contiguous
    assert not any(call.startswith("cudnnBatchNormalization") for call in fresh_simulated_gpu.calls)  # no cuDNN call


# dgamma's error relative to its largest value, between what float32 keeps with x - mean in two parts
# and what it loses with the mean rounded to float32 alone (2**-12 at x near 3000)
FLOAT32_DGAMMA_ERROR = 1e-5


def test_simulated_gpu_keeps_float32_accuracy_with_a_large_offset(fresh_simulated_gpu):
    """float32 data far from 0 with a float64 mean: x - mean in two float32 parts keeps dgamma at
    float32's accuracy, where the mean rounded to float32 alone would not."""
    layout, x, dy, gamma, _, _, var = _case(Mode.SPATIAL, 4, 1, np.float32, seed=12, offset=3000.0)
    mean = x.astype(np.float64).mean(axis=(0, 2, 3)) + 1e-4 / 3  # between float32 values (their spacing is 2**-12)
    got = cudnn_bn.backward_inference(*_device(x, dy, gamma, mean, var))[1].get()
    expected = reference.backward_inference(x.astype(np.float64), dy.astype(np.float64), gamma, mean, var)[1]
    inv_std = 1.0 / np.sqrt(var.astype(np.float64) + EPS)
    rounded_mean = mean.astype(np.float32).astype(np.float64)
    centered = x - rounded_mean.reshape(layout.broadcast_shape)
    one_part = (dy.astype(np.float64) * centered).sum(axis=(0, 2, 3)) * inv_std
    bar = FLOAT32_DGAMMA_ERROR * np.abs(expected).max()
    assert np.abs(got - expected).max() < bar < np.abs(one_part - expected).max()


def test_simulated_gpu_fused_matches_the_reference(fresh_simulated_gpu):
    for dtype in DTYPES:
        layout, x, y, dy, gamma, _, mean, var, _ = _fused_case(Mode.SPATIAL, 4, -1, dtype, seed=13)
        got = fused.backward_inference(*_device(x, y, dy, gamma, mean, var), channel_axis=-1)
        expected = fused.backward_inference(x, y, dy, gamma, mean, var, channel_axis=-1)
        np.testing.assert_array_equal(got[1].get(), expected[1])  # the mask: exact
        for name, a, b in zip(("dx", "dgamma", "dbeta"), (got[0], got[2], got[3]), (expected[0], *expected[2:])):
            assert isinstance(a, FakeArray) and a.dtype == b.dtype
            assert_close(a, b, dtype, what=name, scale=1.0 if name == "dx" else layout.count)


def test_simulated_gpu_refuses_like_the_reference(fresh_simulated_gpu):
    _, x, dy, gamma, _, mean, var = _case(Mode.SPATIAL, 4, 1)
    d = _device(x, dy, gamma, mean, var)
    for index, bad in ((1, d[1][:1]), (2, d[2][:1]), (4, d[4].astype(np.int32))):
        arguments = list(d)
        arguments[index] = bad
        with pytest.raises((TypeError, ValueError)) as on_gpu:
            cudnn_bn.backward_inference(*arguments)
        host_arguments = [a.get() for a in arguments]
        with pytest.raises(type(on_gpu.value)) as on_host:
            cudnn_bn.backward_inference(*host_arguments)
        assert str(on_gpu.value) == str(on_host.value)
    with pytest.raises(TypeError, match="arrays of mixed kinds"):
        cudnn_bn.backward_inference(d[0], dy, *d[2:])


def test_simulated_gpu_refuses_arrays_on_two_devices(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch, devices=2):
        cupy = sys.modules["cupy"]
        _, x, dy, gamma, _, mean, var = _case(Mode.SPATIAL, 4, 1)
        on_zero = _device(x, dy, gamma, mean)
        with cupy.cuda.Device(1):
            (var_on_one,) = _device(var)
        assert var_on_one.device.id == 1
        with pytest.raises(ValueError, match="^arrays on different devices: .*var on device 1"):
            cudnn_bn.backward_inference(*on_zero, var_on_one)


# ---- no host synchronization ----

@pytest.mark.parametrize("fused_call", [False, True], ids=["plain", "fused"])
def test_the_cupy_path_never_waits_for_the_device(fresh_simulated_gpu, fused_call):
    """No host synchronization (the simulator's count of them) on the first call of a signature,
    which settles it, nor on the next; inside a stream capture, where any wait would raise."""
    layout, x, y, dy, gamma, _, mean, var, _ = _fused_case(Mode.SPATIAL, 4, -1, np.float32, seed=14)
    d_x, d_y, d_dy, d_gamma, d_mean, d_var = _device(x, y, dy, gamma, mean, var)

    def call():
        if fused_call:
            return fused.backward_inference(d_x, d_y, d_dy, d_gamma, d_mean, d_var, channel_axis=-1)
        return cudnn_bn.backward_inference(d_x, d_dy, d_gamma, d_mean, d_var, channel_axis=-1)

    before = fresh_simulated_gpu.host_syncs
    results = call()
    with fresh_simulated_gpu.capturing():
        captured = call()
    assert fresh_simulated_gpu.host_syncs == before
    for a, b in zip(results, captured):
        np.testing.assert_array_equal(a.get(), b.get())
    assert fresh_simulated_gpu.host_syncs > before  # the count sees the reads to the host


# ---- a GPU machine ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode,ndim,channel_axis", [(Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 4, -1), (Mode.SPATIAL, 5, -1),
                                                    (Mode.PER_ACTIVATION, 4, -1), (Mode.PER_ACTIVATION, 2, 1)])
def test_gpu_parity_with_the_reference(mode, ndim, channel_axis, dtype):
    """The CuPy kernels (compiled by CuPy on the GPU) against the float64 reference."""
    import cupy

    layout = make_layout(shape_for(ndim, channel_axis, batch=64, channels=8, spatial=(7, 5, 3)), channel_axis, mode)
    _, x, dy, gamma, _ = make_case(layout.shape, mode, channel_axis, dtype, seed=15, offset=2.0)
    mean, var = _statistics(layout, dtype, seed=16, offset=2.0)
    got = cudnn_bn.backward_inference(*(cupy.asarray(a) for a in (x, dy, gamma, mean, var)), mode=mode,
                                      channel_axis=channel_axis)
    expected = reference.backward_inference(x, dy, gamma, mean, var, mode=mode, channel_axis=channel_axis)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, expected):
        assert isinstance(a, cupy.ndarray) and a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, what=name, scale=1.0 if name == "dx" else layout.count)
    y = fused.forward_inference(x, gamma, np.zeros_like(gamma), mean, var, mode=mode, channel_axis=channel_axis)
    fused_got = fused.backward_inference(*(cupy.asarray(a) for a in (x, y, dy, gamma, mean, var)), mode=mode,
                                         channel_axis=channel_axis)
    fused_expected = fused.backward_inference(x, y, dy, gamma, mean, var, mode=mode, channel_axis=channel_axis)
    for name, a, b in zip(("dx", "dresidual", "dgamma", "dbeta"), fused_got, fused_expected):
        assert_close(a, b, dtype, what=name, scale=1.0 if name in ("dx", "dresidual") else layout.count)
