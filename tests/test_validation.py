"""Every bad input raises its typed error before any work, naming the argument, and leaves the
caller's arrays untouched. Run through the public functions, which share the checks with cuDNN."""

from __future__ import annotations

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import Mode, reference
from conftest import make_case


def _case(shape=(4, 3, 2, 2), mode=Mode.SPATIAL, channel_axis=1, dtype=np.float32):
    layout, x, dy, gamma, beta = make_case(shape, mode, channel_axis, dtype=dtype)
    running_mean = np.zeros(layout.param_shape, np.float32 if dtype != np.float64 else np.float64)
    running_var = np.ones_like(running_mean)
    return dict(x=x, dy=dy, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)


def _snapshot(arrays):
    return {name: array.copy() for name, array in arrays.items() if isinstance(array, np.ndarray)}


def _assert_untouched(arrays, snapshot):
    for name, before in snapshot.items():
        np.testing.assert_array_equal(arrays[name], before, err_msg=f"{name} was modified")


def _train(a, **kwargs):
    return cudnn_bn.forward_training(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], **kwargs)


BAD_TRAINING = [
    ("ndim 1", dict(x=np.zeros(5, np.float32)), ValueError, "2 to 5 dims"),
    ("ndim 6", dict(x=np.zeros((2, 3, 1, 1, 1, 1), np.float32)), ValueError, "2 to 5 dims"),
    ("integer x", dict(x=np.zeros((4, 3, 2, 2), np.int32)), TypeError, "x: expected dtype"),
    ("bool x", dict(x=np.zeros((4, 3, 2, 2), bool)), TypeError, "x: expected dtype"),
    ("complex x", dict(x=np.zeros((4, 3, 2, 2), np.complex64)), TypeError, "x: expected dtype"),
    ("gamma shape", dict(gamma=np.ones(4, np.float32)), ValueError, "gamma: expected shape (3,), got (4,)"),
    ("beta shape", dict(beta=np.ones((3, 1), np.float32)), ValueError, "beta: expected shape (3,), got (3, 1)"),
    ("integer gamma", dict(gamma=np.ones(3, np.int64)), TypeError, "gamma: expected a floating dtype"),
    ("running shape", dict(running_mean=np.zeros(2, np.float32)), ValueError, "running_mean: expected shape (3,)"),
    ("integer running", dict(running_var=np.ones(3, np.int32)), TypeError, "running_var: expected a floating dtype"),
    ("only one running", dict(running_var=None), ValueError, "both or neither"),
]


@pytest.mark.parametrize("label,change,error,message", BAD_TRAINING, ids=[c[0] for c in BAD_TRAINING])
def test_bad_training_arrays(label, change, error, message):
    arrays = _case()
    arrays.update(change)
    snapshot = _snapshot(arrays)
    with pytest.raises(error, match=_literal(message)):
        _train(arrays, mode="spatial")
    _assert_untouched(arrays, snapshot)


def _literal(text):
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(momentum=1.5), ValueError, "momentum: expected a finite value in [0, 1], got 1.5"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(momentum=float("nan")), ValueError, "momentum"),
        (dict(momentum="0.1"), TypeError, "momentum"),
        (dict(eps=-1e-5), ValueError, "eps: expected a finite value >= 0, got -1e-05"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(channel_axis=2), ValueError, "channel_axis: expected 1 (channels-first) or -1"),
        (dict(channel_axis=4), ValueError, "out of range"),
        (dict(channel_axis=-5), ValueError, "out of range"),
        (dict(channel_axis=1.0), TypeError, "channel_axis"),
        (dict(mode="batch"), ValueError, "mode: expected one of ['per_activation', 'spatial', 'spatial_persistent', 'auto']"),
        (dict(mode=7), ValueError, "mode"),
        (dict(on_overflow="maybe"), ValueError, "on_overflow: expected one of"),
    ],
)
def test_bad_training_scalars(kwargs, error, message):
    arrays = _case()
    snapshot = _snapshot(arrays)
    with pytest.raises(error, match=_literal(message)):
        _train(arrays, **{"mode": "spatial", **kwargs})
    _assert_untouched(arrays, snapshot)


def test_unknown_mode_in_the_reference_lists_valid_names():
    arrays = _case()
    with pytest.raises(ValueError, match="per_activation.*spatial.*spatial_persistent"):
        reference.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], mode="auto")


@pytest.mark.parametrize(
    "shape,mode",
    [((1, 3, 1, 1), Mode.SPATIAL), ((1, 3, 2, 2), Mode.PER_ACTIVATION), ((1, 3), Mode.SPATIAL), ((1, 3, 1), Mode.SPATIAL_PERSISTENT)],
)
def test_training_needs_two_values_per_statistic(shape, mode):
    layout, x, dy, gamma, beta = make_case(shape, mode)
    with pytest.raises(ValueError, match="at least 2 values per statistic"):
        cudnn_bn.forward_training(x, gamma, beta, mode=mode)
    with pytest.raises(ValueError, match="at least 2 values per statistic"):
        cudnn_bn.backward(x, dy, gamma, mode=mode, eps=1e-5)


def test_read_only_running_statistics_are_refused_not_copied():
    arrays = _case()
    arrays["running_mean"].flags.writeable = False
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        _train(arrays, mode="spatial")
    np.testing.assert_array_equal(arrays["running_var"], 1.0)


def test_read_only_parameters_of_another_float_dtype_are_cast():
    arrays = _case()
    gamma16 = arrays["gamma"].astype(np.float16)
    gamma16.flags.writeable = False
    y, saved = cudnn_bn.forward_training(arrays["x"], gamma16, arrays["beta"].astype(np.float64), mode="spatial")
    y32, _ = cudnn_bn.forward_training(arrays["x"], gamma16.astype(np.float32), arrays["beta"], mode="spatial")
    assert y.dtype == np.float32 and saved.mean.dtype == np.float32
    np.testing.assert_allclose(y, y32, rtol=1e-6, atol=1e-6)


def test_running_statistics_in_their_own_dtype_are_updated_in_place():
    arrays = _case()
    arrays["running_mean"] = np.zeros(3, np.float64)
    arrays["running_var"] = np.ones(3, np.float16)
    before_mean = arrays["running_mean"]
    _train(arrays, mode="spatial", momentum=1.0)
    assert arrays["running_mean"] is before_mean and before_mean.dtype == np.float64
    np.testing.assert_allclose(before_mean, arrays["x"].astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    assert arrays["running_var"].dtype == np.float16 and not np.all(arrays["running_var"] == 1.0)


def test_same_array_for_both_running_statistics_is_refused():
    arrays = _case()
    arrays["running_var"] = arrays["running_mean"]
    with pytest.raises(ValueError, match="two different arrays"):
        _train(arrays, mode="spatial")


def test_mixed_array_kinds_and_non_arrays_are_type_errors():
    arrays = _case()

    class NotAnArray:
        dtype, shape = np.float32, (3,)

    with pytest.raises(TypeError, match="gamma: expected a numpy.ndarray or cupy.ndarray, got list"):
        cudnn_bn.forward_training(arrays["x"], [1.0, 1.0, 1.0], arrays["beta"])
    with pytest.raises(TypeError, match="beta: expected a numpy.ndarray or cupy.ndarray, got NotAnArray"):
        cudnn_bn.forward_training(arrays["x"], arrays["gamma"], NotAnArray())


def test_mixed_kinds_named_in_the_error():
    cupy = pytest.importorskip("cupy")
    arrays = _case()
    # A cupy array cannot be created without a GPU; a subclass of its type name stands in for the kind check.
    fake_cupy = type("ndarray", (), {"__module__": "cupy._core.core", "dtype": np.float32, "shape": (3,)})()
    with pytest.raises(TypeError, match="arrays of mixed kinds.*gamma=cupy"):
        cudnn_bn.forward_training(arrays["x"], fake_cupy, arrays["beta"])
    assert cupy is not None


BAD_BACKWARD = [
    ("dy shape", dict(dy=np.zeros((4, 3, 2, 1), np.float32)), {}, ValueError, "dy: expected x's shape (4, 3, 2, 2), got (4, 3, 2, 1)"),
    ("dy dtype", dict(dy=np.zeros((4, 3, 2, 2), np.float64)), {}, TypeError, "dy: expected x's dtype float32, got float64"),
    ("gamma shape", dict(gamma=np.ones(2, np.float32)), {}, ValueError, "gamma: expected shape (3,), got (2,)"),
    ("mode conflict", {}, dict(mode="per_activation"), ValueError, "mode: saved statistics were computed in SPATIAL"),
    ("eps conflict", {}, dict(eps=1e-3), ValueError, "eps: saved statistics were computed with eps=1e-05"),
    ("axis conflict", {}, dict(channel_axis=-1), ValueError, "channel_axis: saved statistics were computed with channel_axis=1"),
]


@pytest.mark.parametrize("label,change,kwargs,error,message", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_backward(label, change, kwargs, error, message):
    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    arrays.update(change)
    snapshot = _snapshot(arrays)
    with pytest.raises(error, match=_literal(message)):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, **kwargs)
    _assert_untouched(arrays, snapshot)


def test_backward_without_saved_needs_mode_and_eps():
    arrays = _case()
    with pytest.raises(ValueError, match="mode: required when saved is None"):
        reference.backward(arrays["x"], arrays["dy"], arrays["gamma"], eps=1e-5)
    with pytest.raises(ValueError, match="eps: required when saved is None"):
        reference.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial")


def test_persistent_backward_requires_saved_statistics():
    arrays = _case()
    with pytest.raises(ValueError, match="SPATIAL_PERSISTENT backward requires the saved mean and inverse std"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial_persistent", eps=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("field", ["mean", "inv_std"])
def test_non_finite_saved_statistics_are_refused(bad, field):
    import dataclasses

    arrays = _case()
    _, saved = _train(arrays, mode="spatial_persistent")
    poisoned = getattr(saved, field).copy()
    poisoned[1] = bad
    with pytest.raises(ValueError, match=f"saved.{field}: expected finite values"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], dataclasses.replace(saved, **{field: poisoned}))


def test_saved_of_the_wrong_type_or_shape():
    arrays = _case()
    for backward in (reference.backward, cudnn_bn.backward):
        with pytest.raises(TypeError, match="saved: expected cudnn_bn.SavedStats"):
            backward(arrays["x"], arrays["dy"], arrays["gamma"], {"mean": 0})
    _, saved = reference.forward_training(np.ones((4, 2), np.float32) * np.arange(4)[:, None], np.ones(2, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"saved.mean: expected shape \(3,\), got \(2,\)"):
        reference.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved)


def test_fold_inference_checks_shapes_and_eps():
    ones = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="var: expected shape"):
        cudnn_bn.fold_inference(ones, ones, ones, np.ones(2, np.float32), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        cudnn_bn.fold_inference(ones, ones, ones, ones, -1.0)
    with pytest.raises(TypeError, match="mean: expected a floating dtype"):
        cudnn_bn.fold_inference(ones, ones, np.ones(3, np.int8), ones, 1e-5)


@pytest.mark.parametrize("name", ["mean", "var"])
def test_bad_inference_statistics(name):
    _, x, _, gamma, beta = make_case((4, 3), Mode.PER_ACTIVATION, dtype=np.float32)
    stats = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}
    stats[name] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=f"{name}: expected shape \\(3,\\), got \\(4,\\)"):
        cudnn_bn.forward_inference(x, gamma, beta, stats["mean"], stats["var"])


def test_mode_accepts_enum_name_and_value():
    from cudnn_bn._core.modes import parse_mode

    assert parse_mode("SPATIAL") is Mode.SPATIAL
    assert parse_mode(2) is Mode.SPATIAL_PERSISTENT
    assert parse_mode(Mode.PER_ACTIVATION) is Mode.PER_ACTIVATION
    with pytest.raises(ValueError):
        parse_mode(True)


def test_other_modes_do_not_pay_for_the_finite_check():
    """Only the persistent path checks saved statistics (on a GPU the check synchronises)."""
    import dataclasses

    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    poisoned = saved.mean.copy()
    poisoned[0] = np.nan
    dx, _, _ = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], dataclasses.replace(saved, mean=poisoned))
    assert np.isnan(dx[:, 0]).all() and np.isfinite(dx[:, 1:]).all()
