"""cudnn_bn.compat against the float64 reference, on numpy, on the simulated GPU and (marker gpu)
on a GPU: every function, CuPy 13's argument conventions, its errors, and a training step written
the way Chainer's batch_normalization.py calls cupyx.cudnn."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import CudnnOverflowError, Mode, compat, reference
from cudnn_bn._core.tolerances import assert_close, to_numpy
from cudnn_bn._core.validate import param_dtype_for
from fake_cudnn import FakeArray, simulated_gpu

NCHW, NHWC = compat.CUDNN_TENSOR_NCHW, compat.CUDNN_TENSOR_NHWC
PER_ACTIVATION, SPATIAL, PERSISTENT = (
    compat.CUDNN_BATCHNORM_PER_ACTIVATION,
    compat.CUDNN_BATCHNORM_SPATIAL,
    compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT,
)
EPS = 2e-5  # Chainer's default


# ---- where the arrays live ----


@dataclasses.dataclass
class Backend:
    name: str
    put: object  # numpy array -> array of this backend
    simulator: object = None  # the kernel simulator on the simulated GPU


def _fresh_fallback_warnings(monkeypatch):
    from cudnn_bn._cudnn import launch

    # the once-per-shape fallback warning: each test sees its own
    monkeypatch.setattr(launch, "fallback_warnings_shown", set())


def _numpy_backend():
    return Backend("numpy", lambda array: np.array(array, copy=True))


@pytest.fixture(params=["numpy", "simulated_gpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    if request.param == "numpy":
        yield _numpy_backend()
    elif request.param == "simulated_gpu":
        request.getfixturevalue("cudnn_library")
        _fresh_fallback_warnings(monkeypatch)
        with simulated_gpu(monkeypatch) as simulator:
            yield Backend("simulated_gpu", lambda array: np.array(array, copy=True).view(FakeArray), simulator)
    else:
        import cupy

        yield Backend("gpu", cupy.asarray)


# ---- one case = one CuPy 13 call geometry ----


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    shape: tuple
    is_for_conv2d: bool
    d_layout: int
    mode: Mode
    dtype: type

    @property
    def param_dtype(self):
        return param_dtype_for(self.dtype)

    def reference_frame(self, x):
        """(x for the reference, channel_axis, cuDNN-order parameter shape, transpose taking a
        cuDNN-order parameter to the reference's order or None), written out per convention."""
        x = np.asarray(x, dtype=np.float64)
        if not self.is_for_conv2d:  # CuPy 13: (size / last, last, 1, 1)
            flat = x.reshape(-1, x.shape[-1])
            return flat, 1, (x.shape[-1],), None
        if self.d_layout == NHWC:
            channels, spatial = x.shape[-1], x.shape[1:-1]
            if self.mode is PER_ACTIVATION:  # cuDNN reads the parameters as C x H x W
                return x, -1, (channels, *spatial), (1, 2, 0)
            return x, -1, (channels,), None
        return x, 1, (x.shape[1],) if self.mode is not PER_ACTIVATION else x.shape[1:], None


CASES = [
    Case("conv2d-nchw-spatial-f32", (4, 3, 2, 2), True, NCHW, SPATIAL, np.float32),
    Case("conv2d-nhwc-spatial-f32", (4, 2, 2, 3), True, NHWC, SPATIAL, np.float32),
    Case("conv2d-nhwc-persistent-f16-ex", (4, 2, 2, 4), True, NHWC, PERSISTENT, np.float16),
    Case("conv2d-nchw-persistent-f32", (4, 3, 2, 2), True, NCHW, PERSISTENT, np.float32),
    Case("conv2d-nchw-per-activation-f64", (4, 3, 2, 2), True, NCHW, PER_ACTIVATION, np.float64),
    Case("conv2d-nhwc-per-activation-f32", (4, 2, 3, 2), True, NHWC, PER_ACTIVATION, np.float32),
    Case("conv3d-ncdhw-spatial-f32", (3, 2, 2, 2, 2), True, NCHW, SPATIAL, np.float32),
    Case("linear-2d-per-activation-f32", (5, 3), False, NCHW, PER_ACTIVATION, np.float32),
    Case("linear-3d-per-activation-f16", (2, 3, 4), False, NCHW, PER_ACTIVATION, np.float16),
    Case("linear-2d-spatial-f64", (6, 3), False, NCHW, SPATIAL, np.float64),
]


def _inputs(case: Case, seed=0):
    """x, gy and CuPy-13-shaped parameters: gamma, beta in cuDNN's memory order (flat for the
    per-activation cases, as CuPy 13 callers could pass them)."""
    rng = np.random.default_rng(seed)
    x = (0.5 + rng.standard_normal(case.shape)).astype(case.dtype)
    gy = rng.standard_normal(case.shape).astype(case.dtype)
    _, _, cudnn_shape, _ = case.reference_frame(x)
    count = int(np.prod(cudnn_shape))
    gamma_shape = (count,) if case.mode is PER_ACTIVATION else cudnn_shape
    gamma = (0.5 + rng.random(gamma_shape)).astype(case.param_dtype)
    beta = rng.standard_normal(gamma_shape).astype(case.param_dtype)
    return x, gy, gamma, beta


def _to_reference(case, x, param):
    """A CuPy-13 parameter (cuDNN memory order, any shape) in the reference's parameter shape."""
    _, _, cudnn_shape, transpose = case.reference_frame(x)
    param = np.asarray(param, dtype=np.float64).reshape(cudnn_shape)
    return param if transpose is None else param.transpose(transpose)


def _from_reference(case, x, param, shape):
    """The reference's parameter-shaped result in cuDNN memory order, reshaped to ``shape``."""
    _, _, _, transpose = case.reference_frame(x)
    param = np.asarray(param)
    return (param if transpose is None else param.transpose(np.argsort(transpose))).reshape(shape)


def _reference_training(case, x, gamma, beta, running_mean, running_var, decay):
    x_ref, channel_axis, _, _ = case.reference_frame(x)
    running = [_to_reference(case, x, r).copy() for r in (running_mean, running_var)]
    y, saved = reference.forward_training(
        x_ref, _to_reference(case, x, gamma), _to_reference(case, x, beta), *running,
        mode=case.mode, momentum=1.0 - decay, eps=EPS, channel_axis=channel_axis,
    )
    return y.reshape(case.shape), saved, running


def _ids(case):
    return case.id


# ---- constants and version ----


def test_constants_have_cudnn_values():
    assert (PER_ACTIVATION, SPATIAL, PERSISTENT) == (0, 1, 2)
    assert (NCHW, NHWC) == (0, 1)
    assert compat.CUDNN_BN_MIN_EPSILON == 0.0


def test_layout_constants_are_the_prototype_tables_tensor_formats():
    from cudnn_bn._cudnn.raw import TensorFormat

    assert compat.CUDNN_TENSOR_NCHW is TensorFormat.NCHW and compat.CUDNN_TENSOR_NHWC is TensorFormat.NHWC
    x = np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)  # channels-last: C = 3
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"^d_layout: expected CUDNN_TENSOR_NCHW \(0\) or CUDNN_TENSOR_NHWC \(1\), "
                                         r"got <TensorFormat.NCHW_VECT_C: 2>$"):
        compat.batch_normalization_forward_inference(x, gamma, beta, beta, gamma, 1e-5, True, SPATIAL,
                                                     TensorFormat.NCHW_VECT_C)
    by_value = compat.batch_normalization_forward_inference(x, gamma, beta, beta, gamma, 1e-5, True, SPATIAL, 1)
    by_member = compat.batch_normalization_forward_inference(x, gamma, beta, beta, gamma, 1e-5, True, SPATIAL,
                                                             TensorFormat.NHWC)
    np.testing.assert_array_equal(by_value, by_member)
    channels_last = cudnn_bn.forward_inference(x, gamma, beta, beta, gamma, mode="spatial", eps=1e-5, channel_axis=-1)
    np.testing.assert_array_equal(by_member, channels_last)


def test_constants_match_the_installed_headers(cudnn_headers):
    text = "\n".join(cudnn_headers)
    for name in ("CUDNN_BATCHNORM_PER_ACTIVATION", "CUDNN_BATCHNORM_SPATIAL", "CUDNN_BATCHNORM_SPATIAL_PERSISTENT",
                 "CUDNN_TENSOR_NCHW", "CUDNN_TENSOR_NHWC"):
        declared = re.search(rf"\b{name}\s*=\s*(\d+)", text)
        assert declared is not None, f"{name} not found in the headers"
        assert int(getattr(compat, name)) == int(declared.group(1)), name
    minimum = re.search(r"#define\s+CUDNN_BN_MIN_EPSILON\s+([0-9.eE+-]+)", text)
    assert minimum is not None and float(minimum.group(1)) == compat.CUDNN_BN_MIN_EPSILON


def test_get_version_is_cudnn_get_version(cudnn_library):
    version = compat.getVersion()
    assert isinstance(version, int) and version == cudnn_library.version and version >= 90000


# ---- every function against the reference ----


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_training_matches_reference(backend, case):
    x, _, gamma, beta = _inputs(case)
    running_mean = np.linspace(-1, 1, gamma.size).reshape(gamma.shape).astype(case.param_dtype)
    running_var = np.linspace(0.5, 2, gamma.size).reshape(gamma.shape).astype(case.param_dtype)
    device_mean, device_var = backend.put(running_mean), backend.put(running_var)
    y, save_mean, save_inv_std = compat.batch_normalization_forward_training(
        backend.put(x), backend.put(gamma), backend.put(beta), device_mean, device_var,
        None, None, EPS, 0.8, case.is_for_conv2d, case.mode, False, d_layout=case.d_layout,
    )
    expected_y, saved, expected_running = _reference_training(case, x, gamma, beta, running_mean, running_var, 0.8)
    assert y.shape == case.shape and y.dtype == case.dtype
    assert save_mean.shape == gamma.shape and save_mean.dtype == case.param_dtype
    assert save_inv_std.shape == gamma.shape and save_inv_std.dtype == case.param_dtype
    assert_close(y, expected_y, case.dtype, scale=4)
    assert_close(save_mean, _from_reference(case, x, saved.mean, gamma.shape), case.dtype)
    assert_close(save_inv_std, _from_reference(case, x, saved.inv_std, gamma.shape), case.dtype)
    # decay is CuPy's: the running statistics keep 0.8 of themselves, in the caller's arrays
    assert_close(device_mean, _from_reference(case, x, expected_running[0], gamma.shape), case.dtype)
    assert_close(device_var, _from_reference(case, x, expected_running[1], gamma.shape), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_inference_matches_reference(backend, case):
    x, _, gamma, beta = _inputs(case)
    mean = np.linspace(-0.5, 0.5, gamma.size).reshape(gamma.shape).astype(case.param_dtype)
    var = np.linspace(0.5, 1.5, gamma.size).reshape(gamma.shape).astype(case.param_dtype)
    y = compat.batch_normalization_forward_inference(
        *(backend.put(a) for a in (x, gamma, beta, mean, var)), EPS, case.is_for_conv2d, case.mode,
        d_layout=case.d_layout
    )
    x_ref, channel_axis, _, _ = case.reference_frame(x)
    expected = reference.forward_inference(
        x_ref, *(_to_reference(case, x, a) for a in (gamma, beta, mean, var)),
        mode=case.mode, eps=EPS, channel_axis=channel_axis,
    )
    assert y.shape == case.shape and y.dtype == case.dtype
    assert_close(y, expected.reshape(case.shape), case.dtype, scale=4)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_matches_reference(backend, case):
    x, gy, gamma, beta = _inputs(case)
    device = [backend.put(a) for a in (x, gamma, beta)]
    reserve_space, _, save_mean, save_inv_std = compat.batch_normalization_forward_training_ex(
        *device, None, None, None, None, EPS, 0.9, case.is_for_conv2d, case.mode, False, d_layout=case.d_layout
    )
    gx, ggamma, gbeta = compat.batch_normalization_backward(
        device[0], device[1], backend.put(gy), save_mean, save_inv_std, EPS, case.is_for_conv2d, case.mode, False,
        d_layout=case.d_layout, reserve_space=reserve_space,
    )
    _, saved, _ = _reference_training(case, x, gamma, beta, np.zeros(gamma.shape), np.ones(gamma.shape), 0.9)
    x_ref, _, _, _ = case.reference_frame(x)
    gy_ref = case.reference_frame(gy)[0]
    expected = reference.backward(x_ref, gy_ref, _to_reference(case, x, gamma), saved)
    assert gx.shape == case.shape and gx.dtype == case.dtype
    assert ggamma.shape == gamma.shape and ggamma.dtype == case.param_dtype and gbeta.dtype == case.param_dtype
    assert_close(gx, expected[0].reshape(case.shape), case.dtype, scale=10)
    assert_close(ggamma, _from_reference(case, x, expected[1], gamma.shape), case.dtype, scale=10)
    assert_close(gbeta, _from_reference(case, x, expected[2], gamma.shape), case.dtype, scale=10)


def test_backward_with_the_reserve_space_and_statistics_written_into_given_arrays(simulated):
    """CuPy 13's usage: the forward writes its statistics into the caller's mean and inv_std,
    which are copies of what the Ex kernel wrote beside its reserve space. BackwardEx takes only
    the statistics its reserve space was filled for, so this backward runs the plain call."""
    case = CASES[2]  # the Ex path: NHWC persistent float16, C = 4
    x, gy, gamma, beta = _inputs(case)
    device = [simulated.put(a) for a in (x, gamma, beta)]
    mean, inv_std = (simulated.put(np.zeros(gamma.shape, np.float32)) for _ in range(2))
    reserve_space, _ = compat.batch_normalization_forward_training_ex(
        *device, None, None, mean, inv_std, EPS, 0.9, case.is_for_conv2d, case.mode, False, d_layout=case.d_layout
    )
    assert reserve_space is not None
    gx, ggamma, gbeta = compat.batch_normalization_backward(
        device[0], device[1], simulated.put(gy), mean, inv_std, EPS, case.is_for_conv2d, case.mode, False,
        d_layout=case.d_layout, reserve_space=reserve_space,
    )
    assert "cudnnBatchNormalizationBackward" in simulated.simulator.calls
    assert "cudnnBatchNormalizationBackwardEx" not in simulated.simulator.calls
    _, saved, _ = _reference_training(case, x, gamma, beta, np.zeros(gamma.shape), np.ones(gamma.shape), 0.9)
    expected = reference.backward(case.reference_frame(x)[0], case.reference_frame(gy)[0],
                                  _to_reference(case, x, gamma), saved)
    assert_close(gx, expected[0].reshape(case.shape), case.dtype, scale=10)
    assert_close(ggamma, _from_reference(case, x, expected[1], gamma.shape), case.dtype, scale=10)
    assert_close(gbeta, _from_reference(case, x, expected[2], gamma.shape), case.dtype, scale=10)


def test_ex_returns_the_reserve_space_only_where_the_ex_path_ran(backend):
    ex_case, plain_case = CASES[2], CASES[1]  # NHWC persistent float16 C=4, NHWC spatial float32
    for case in (ex_case, plain_case):
        x, _, gamma, beta = _inputs(case)
        result = compat.batch_normalization_forward_training_ex(
            *(backend.put(a) for a in (x, gamma, beta)), None, None, None, None, EPS, 0.9, True, case.mode, False,
            d_layout=NHWC
        )
        assert len(result) == 4
        runs_ex = backend.name != "numpy" and case is ex_case
        assert (result[0] is not None) == runs_ex, (backend.name, case.id)
        mean, inv_std = backend.put(np.zeros(gamma.shape, np.float32)), backend.put(np.zeros(gamma.shape, np.float32))
        result = compat.batch_normalization_forward_training_ex(
            *(backend.put(a) for a in (x, gamma, beta)), None, None, mean, inv_std, EPS, 0.9, True, case.mode, False,
            d_layout=NHWC
        )
        assert len(result) == 2 and (result[0] is not None) == runs_ex


def test_given_mean_and_inv_std_are_filled_in_place_and_only_y_is_returned(backend):
    case = CASES[0]
    x, _, gamma, beta = _inputs(case)
    device = [backend.put(a) for a in (x, gamma, beta)]
    y, save_mean, save_inv_std = compat.batch_normalization_forward_training(
        *device, None, None, None, None, EPS, 0.9, True, SPATIAL, False
    )
    mean, inv_std = backend.put(np.full(3, np.nan, np.float32)), backend.put(np.full(3, np.nan, np.float32))
    result = compat.batch_normalization_forward_training(*device, None, None, mean, inv_std, EPS, 0.9, True, SPATIAL,
                                                         False)
    assert not isinstance(result, tuple) and result.shape == case.shape
    assert_close(result, y, case.dtype)
    assert_close(mean, save_mean, case.dtype)
    assert_close(inv_std, save_inv_std, case.dtype)


def test_decay_one_never_touches_the_dummy_running_arrays_as_group_normalization_passes_them(backend):
    # chainer/functions/normalization/group_normalization.py: x as (1, batch * groups, -1, 1), one
    # zero array as beta, running_mean and running_var, decay 1.0, SPATIAL
    batch, groups, channels, length = 2, 2, 4, 3
    x = np.random.default_rng(1).standard_normal((batch, channels, length)).astype(np.float32)
    x_groups = x.reshape(1, batch * groups, -1, 1)
    dummy_beta, dummy_gamma = np.zeros(batch * groups, np.float32), np.ones(batch * groups, np.float32)
    device_dummy = backend.put(dummy_beta)
    x_hat, mean, inv_std = compat.batch_normalization_forward_training(
        backend.put(x_groups), backend.put(dummy_gamma), device_dummy, device_dummy, device_dummy,
        None, None, 1e-5, 1.0, True, SPATIAL, False,
    )
    np.testing.assert_array_equal(to_numpy(device_dummy), 0.0)
    grouped = x.reshape(batch * groups, -1).astype(np.float64)
    expected = (grouped - grouped.mean(axis=1, keepdims=True)) / np.sqrt(grouped.var(axis=1, keepdims=True) + 1e-5)
    assert_close(x_hat, expected.reshape(x_groups.shape), np.float32)
    assert_close(mean, grouped.mean(axis=1), np.float32)
    assert_close(inv_std, 1.0 / np.sqrt(grouped.var(axis=1) + 1e-5), np.float32)


def test_backward_returns_gradients_in_x_dtype_where_gamma_is_not_in_the_parameter_dtype(backend):
    # CuPy 13 cast ggamma and gbeta to x's dtype when gamma's dtype was not the parameter dtype
    case = CASES[2]
    x, gy, gamma, beta = _inputs(case)
    gamma16, beta16 = gamma.astype(np.float16), beta.astype(np.float16)
    device = [backend.put(a) for a in (x, gamma16, beta16)]
    _, mean, inv_std = compat.batch_normalization_forward_training(
        *device, None, None, None, None, EPS, 0.9, True, SPATIAL, False, NHWC
    )
    assert mean.dtype == np.float32
    _, ggamma, gbeta = compat.batch_normalization_backward(device[0], device[1], backend.put(gy), mean, inv_std, EPS,
                                                           True, SPATIAL, False, NHWC)
    assert ggamma.dtype == np.float16 and gbeta.dtype == np.float16


def test_compat_runs_through_the_public_functions(monkeypatch):
    from cudnn_bn import _api

    calls = []
    for name in ("forward_training", "forward_inference", "backward"):
        original = getattr(_api, name)
        monkeypatch.setattr(_api, name,
                            lambda *a, _original=original, _name=name, **k: calls.append(_name) or _original(*a, **k))
    case = CASES[0]
    x, gy, gamma, beta = _inputs(case)
    y, mean, inv_std = compat.batch_normalization_forward_training(
        x, gamma, beta, None, None, None, None, EPS, 0.9, True, SPATIAL, False
    )
    compat.batch_normalization_backward(x, gamma, gy, mean, inv_std, EPS, True, SPATIAL, False)
    compat.batch_normalization_forward_inference(x, gamma, beta, mean, 1.0 / inv_std**2, EPS, True, SPATIAL)
    assert calls == ["forward_training", "backward", "forward_inference"]


# ---- debug and the persistent overflow ----


def _persistent_call(backend, debug, **keywords):
    case = CASES[3]
    x, _, gamma, beta = _inputs(case)
    running = [backend.put(np.zeros(3, np.float32)), backend.put(np.ones(3, np.float32))]
    result = compat.batch_normalization_forward_training(
        *(backend.put(a) for a in (x, gamma, beta)), *running, None, None, EPS, 0.9, True, PERSISTENT, debug, **keywords
    )
    return result, running


@pytest.fixture
def simulated(monkeypatch, cudnn_library):
    _fresh_fallback_warnings(monkeypatch)
    with simulated_gpu(monkeypatch) as simulator:
        yield Backend("simulated_gpu", lambda array: np.array(array, copy=True).view(FakeArray), simulator)


def test_debug_raises_on_persistent_overflow_and_restores_the_running_statistics(simulated):
    simulated.simulator.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    running = [simulated.put(np.zeros(3, np.float32)), simulated.put(np.ones(3, np.float32))]
    x, _, gamma, beta = _inputs(CASES[3])
    with pytest.raises(CudnnOverflowError):
        compat.batch_normalization_forward_training(
            *(simulated.put(a) for a in (x, gamma, beta)), *running, None, None, EPS, 0.9, True, PERSISTENT, True
        )
    np.testing.assert_array_equal(to_numpy(running[0]), 0.0)
    np.testing.assert_array_equal(to_numpy(running[1]), 1.0)
    _, mean, inv_std = compat.batch_normalization_forward_training(
        *(simulated.put(a) for a in (x, gamma, beta)), None, None, None, None, EPS, 0.9, True, SPATIAL, False
    )
    with pytest.raises(CudnnOverflowError):
        compat.batch_normalization_backward(simulated.put(x), simulated.put(gamma), simulated.put(x), mean, inv_std,
                                            EPS, True, PERSISTENT, True)


def test_without_debug_persistent_is_not_checked_as_in_cupy_13(simulated):
    simulated.simulator.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    (y, _, _), _ = _persistent_call(simulated, debug=False)
    assert "cudnnQueryRuntimeError" not in simulated.simulator.calls
    assert np.isnan(y).all()  # the simulated overflow's output, handed back unchecked


def test_on_overflow_keyword_overrides_debug(simulated):
    simulated.simulator.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (y, _, _), running = _persistent_call(simulated, debug=False, on_overflow="fallback")
    assert any("overflow" in str(warning.message).lower() for warning in caught)
    x, _, gamma, beta = _inputs(CASES[3])
    expected_y, _, expected_running = _reference_training(CASES[3], x, gamma, beta, np.zeros(3), np.ones(3), 0.9)
    assert_close(y, expected_y, np.float32, scale=4)
    assert_close(running[0], expected_running[0], np.float32)


def test_debug_changes_nothing_on_numpy():
    (y, _, _), _ = _persistent_call(_numpy_backend(), debug=True)
    assert np.isfinite(y).all()


# ---- a training step written as Chainer's batch_normalization.py calls cupyx.cudnn ----


class _ChainerStyleCudnnImpl:
    """The calls of chainer.functions.normalization.batch_normalization._CudnnBatchNormalizationImpl."""

    def __init__(self, cudnn, is_for_conv2d, cudnn_mode, debug=False):
        self.cudnn, self.is_for_conv2d, self.cudnn_mode, self.debug = cudnn, is_for_conv2d, cudnn_mode, debug

    def forward(self, gamma, x, cudnn_x_layout, xp, beta, eps, decay, running_mean, running_var):
        if running_mean is not None:
            mean, var = running_mean, running_var
        else:  # dummies
            mean, var = xp.zeros_like(gamma, dtype=x.dtype), xp.zeros_like(gamma, dtype=x.dtype)
        reserve_space, y, mean, inv_std = self.cudnn.batch_normalization_forward_training_ex(
            x, gamma, beta, mean, var, None, None, eps, decay, self.is_for_conv2d, self.cudnn_mode, self.debug,
            d_layout=cudnn_x_layout,
        )
        return y, running_mean, running_var, mean, inv_std, reserve_space

    def backward(self, gamma, gy, x, cudnn_x_layout, mean, inv_std, eps, forward_data):
        gx, ggamma, gbeta = self.cudnn.batch_normalization_backward(
            x, gamma, gy, mean, inv_std, eps, self.is_for_conv2d, self.cudnn_mode, self.debug,
            d_layout=cudnn_x_layout, reserve_space=forward_data,
        )
        return (gx.astype(x.dtype, copy=False), ggamma.astype(gamma.dtype, copy=False),
                gbeta.astype(gamma.dtype, copy=False))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7]], ids=_ids)
def test_chainer_style_training_step(backend, case):
    impl = _ChainerStyleCudnnImpl(compat, case.is_for_conv2d, case.mode)
    x, gy, gamma, beta = _inputs(case)
    xp = np if backend.name == "numpy" else __import__("cupy") if backend.name == "gpu" else _FakeXp
    params = [backend.put(gamma), backend.put(beta)]
    running = [backend.put(np.zeros(gamma.shape, np.float32)), backend.put(np.ones(gamma.shape, np.float32))]
    expected_params = [gamma.astype(np.float64), beta.astype(np.float64)]
    expected_running = [np.zeros(gamma.shape), np.ones(gamma.shape)]
    learning_rate, decay = 0.1, 0.9
    for step in range(2):
        y, *_, mean, inv_std, reserve_space = impl.forward(params[0], backend.put(x), case.d_layout, xp, params[1], EPS,
                                                           decay, *running)
        gx, ggamma, gbeta = impl.backward(params[0], backend.put(gy), backend.put(x), case.d_layout, mean, inv_std, EPS,
                                          reserve_space)
        params = [params[0] - learning_rate * ggamma, params[1] - learning_rate * gbeta]

        expected_y, saved, expected_running = _reference_training(case, x, *expected_params, *expected_running, decay)
        x_ref = case.reference_frame(x)[0]
        grads = reference.backward(x_ref, case.reference_frame(gy)[0], _to_reference(case, x, expected_params[0]),
                                   saved)
        expected_grads = [_from_reference(case, x, g, gamma.shape) for g in grads[1:]]
        assert_close(y, expected_y, case.dtype, scale=4, what=f"y, step {step}")
        assert_close(gx, grads[0].reshape(case.shape), case.dtype, scale=10, what=f"gx, step {step}")
        assert_close(ggamma, expected_grads[0], case.dtype, scale=10, what=f"ggamma, step {step}")
        for actual, expected in zip(running, expected_running):
            assert_close(actual, _from_reference(case, x, expected, gamma.shape), case.dtype,
                         what=f"running, step {step}")
        expected_params = [expected_params[0] - learning_rate * expected_grads[0],
                           expected_params[1] - learning_rate * expected_grads[1]]
        expected_running = [_from_reference(case, x, r, gamma.shape) for r in expected_running]
    if backend.simulator is not None and case is CASES[2]:
        assert reserve_space is not None
        assert "cudnnBatchNormalizationBackwardEx" in backend.simulator.calls  # the reserve reached backward


class _FakeXp:
    """The two array constructors Chainer's implementation asks of cupy, on the simulated GPU."""

    @staticmethod
    def zeros_like(array, dtype=None):
        return np.zeros_like(np.asarray(array), dtype=dtype).view(FakeArray)


# ---- errors: typed, naming the argument, raised before anything changes ----


def _training_arguments(**changes):
    case = CASES[0]
    x, _, gamma, beta = _inputs(case)
    arguments = dict(
        x=x, gamma=gamma, beta=beta, running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
        mean=None, inv_std=None, eps=EPS, decay=0.9, is_for_conv2d=True, cudnn_mode=SPATIAL, debug=False, d_layout=NCHW,
    )
    arguments.update(changes)
    return arguments


BAD_TRAINING = [
    ("only mean", dict(mean=np.zeros(3, np.float32)), ValueError, "mean, inv_std: expected both or neither"),
    ("only inv_std", dict(inv_std=np.zeros(3, np.float32)), ValueError, "got only inv_std"),
    ("decay above 1", dict(decay=1.5), ValueError, "decay: expected a finite value in [0, 1], got 1.5"),
    ("decay a string", dict(decay="0.9"), TypeError, "decay: expected a float"),
    ("unknown mode", dict(cudnn_mode=7), ValueError, "cudnn_mode: expected CUDNN_BATCHNORM_PER_ACTIVATION"),
    ("unknown layout", dict(d_layout=2), ValueError,
     "d_layout: expected CUDNN_TENSOR_NCHW (0) or CUDNN_TENSOR_NHWC (1), got 2"),
    ("layout a list", dict(d_layout=[1]), ValueError,
     "d_layout: expected CUDNN_TENSOR_NCHW (0) or CUDNN_TENSOR_NHWC (1), got [1]"),
    ("NHWC for 5-D", dict(x=np.zeros((2, 3, 2, 2, 2), np.float32)), ValueError, None),
    ("gamma too small", dict(gamma=np.ones(2, np.float32)), ValueError, "gamma: expected 3 elements"),
    ("integer running_var", dict(running_var=np.ones(3, np.int32)), TypeError,
     "running_var: expected a floating dtype"),
    ("mean twice", dict(mean=np.zeros(3, np.float32)), ValueError, "mean, inv_std: expected two different arrays"),
    ("read-only mean", dict(mean=np.zeros(3, np.float32), inv_std=np.zeros(3, np.float32)), ValueError,
     "mean: expected a writable array"),
    ("strided mean of another shape",
     dict(mean=np.zeros((3, 2), np.float32)[:, 0:1], inv_std=np.zeros((3, 1), np.float32)), ValueError,
     "mean: expected a C-contiguous"),
    ("torch-like object", dict(gamma=[1.0, 1.0, 1.0]), TypeError, "__cuda_array_interface__"),
]


@pytest.mark.parametrize("label,changes,error,message", BAD_TRAINING, ids=[row[0] for row in BAD_TRAINING])
def test_bad_training_arguments_raise_before_anything_changes(label, changes, error, message):
    arguments = _training_arguments(**changes)
    if label == "NHWC for 5-D":
        arguments["d_layout"], message = NHWC, "d_layout: CUDNN_TENSOR_NHWC applies to 4-D x"
    if label == "mean twice":
        arguments["inv_std"] = arguments["mean"]
    if label == "read-only mean":
        arguments["mean"].flags.writeable = False
    before = {name: np.array(value, copy=True) for name, value in arguments.items() if isinstance(value, np.ndarray)}
    with pytest.raises(error) as raised:
        compat.batch_normalization_forward_training(**arguments)
    assert message in str(raised.value)
    for name, value in before.items():
        np.testing.assert_array_equal(arguments[name], value, err_msg=f"{name} changed")


def test_backward_requires_the_saved_statistics():
    x, gy, gamma, _ = _inputs(CASES[0])
    with pytest.raises(TypeError, match="mean: expected the saved statistic"):
        compat.batch_normalization_backward(x, gamma, gy, None, np.ones(3, np.float32), EPS, True, SPATIAL, False)


def test_reserve_space_on_numpy_is_a_type_error():
    x, gy, gamma, _ = _inputs(CASES[0])
    saved = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="reserve_space: the NumPy reference has none"):
        compat.batch_normalization_backward(x, gamma, gy, *saved, EPS, True, SPATIAL, False,
                                            reserve_space=np.zeros(8, np.uint8))


def test_reserve_space_must_be_a_device_array(simulated):
    x, gy, gamma, _ = (simulated.put(a) for a in _inputs(CASES[2]))
    saved = simulated.put(np.zeros(4, np.float32)), simulated.put(np.ones(4, np.float32))
    with pytest.raises(TypeError, match="reserve_space: expected None or the reserve_space returned"):
        compat.batch_normalization_backward(x, gamma, gy, *saved, EPS, True, PERSISTENT, False, NHWC,
                                            reserve_space=b"\0" * 512)
    assert not any("Backward" in call for call in simulated.simulator.calls)


def test_eps_follows_the_shared_checks():
    with pytest.raises(TypeError, match="^eps: "):
        compat.batch_normalization_forward_training(**_training_arguments(eps="small"))
    x, gy, gamma, _ = _inputs(CASES[0])
    saved = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="^eps: "):
        compat.batch_normalization_backward(x, gamma, gy, *saved, "small", True, SPATIAL, False)
    with pytest.raises(ValueError, match="^eps: "):
        compat.batch_normalization_backward(x, gamma, gy, *saved, 0.0, True, SPATIAL, False)


def test_compat_is_reachable_from_the_package():
    from cudnn_bn import compat as imported

    assert imported is compat and cudnn_bn.compat is compat


def test_eps_below_the_training_minimum_is_named_eps():
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="^eps: expected"):
        compat.batch_normalization_forward_training(
            x, gamma, beta, None, None, None, None, 0.0, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL, False
        )


def test_given_mean_and_inv_std_may_not_overlap_an_input():
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    before = gamma.copy()
    with pytest.raises(ValueError, match="mean: expected memory of its own"):
        compat.batch_normalization_forward_training(
            x, gamma, beta, None, None, gamma, np.empty(3, np.float32), 1e-5, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL,
            False
        )
    np.testing.assert_array_equal(gamma, before)
