"""Every bad input raises its typed error before any work, naming the argument, and leaves the
caller's arrays untouched. Run through the public functions, which share the checks with cuDNN; and
the checks of cudnn_bn/_core/validate.py called directly, where the public functions reach them only
after their own layer has already refused the same input."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT32_ROUNDING, make_case
from cudnn_bn import Mode, OnOverflow, SavedStats, reference
from cudnn_bn._core import validate
from fake_cudnn import FakeArray, simulated_gpu


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
        (dict(eps=-1e-5), ValueError,
         "eps: expected a finite value >= 1.18e-38 (2**-126) in training and backward, got -1e-05"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(channel_axis=2), ValueError, "channel_axis: expected 1 (channels-first) or -1"),
        (dict(channel_axis=4), ValueError, "out of range"),
        (dict(channel_axis=-5), ValueError, "out of range"),
        (dict(channel_axis=1.0), TypeError, "channel_axis"),
        (dict(mode="batch"), ValueError,
         "mode: expected one of ['per_activation', 'spatial', 'spatial_persistent', 'auto']"),
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
    [((1, 3, 1, 1), Mode.SPATIAL), ((1, 3, 2, 2), Mode.PER_ACTIVATION), ((1, 3), Mode.SPATIAL),
     ((1, 3, 1), Mode.SPATIAL_PERSISTENT)],
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
    np.testing.assert_allclose(y, y32, rtol=FLOAT32_ROUNDING, atol=FLOAT32_ROUNDING)


def test_running_statistics_in_their_own_dtype_are_updated_in_place():
    arrays = _case()
    arrays["running_mean"] = np.zeros(3, np.float64)
    arrays["running_var"] = np.ones(3, np.float16)
    before_mean = arrays["running_mean"]
    _train(arrays, mode="spatial", momentum=1.0)
    assert arrays["running_mean"] is before_mean and before_mean.dtype == np.float64
    np.testing.assert_allclose(before_mean, arrays["x"].astype(np.float64).mean(axis=(0, 2, 3)), rtol=FLOAT32_ROUNDING)
    assert arrays["running_var"].dtype == np.float16 and not np.all(arrays["running_var"] == 1.0)


def test_same_array_for_both_running_statistics_is_refused():
    arrays = _case()
    arrays["running_var"] = arrays["running_mean"]
    with pytest.raises(ValueError, match="running_mean: expected memory of its own .* overlaps running_var's"):
        _train(arrays, mode="spatial")


def test_mixed_array_kinds_and_non_arrays_are_type_errors():
    arrays = _case()

    class NotAnArray:
        dtype, shape = np.float32, (3,)

    with pytest.raises(TypeError, match="gamma: expected a numpy.ndarray or cupy.ndarray, got list"):
        reference.forward_training(arrays["x"], [1.0, 1.0, 1.0], arrays["beta"])
    with pytest.raises(TypeError, match="beta: expected a numpy.ndarray or cupy.ndarray, got NotAnArray"):
        reference.forward_training(arrays["x"], arrays["gamma"], NotAnArray())
    with pytest.raises(TypeError, match="^gamma: expected a numpy.ndarray.* got list"):
        cudnn_bn.forward_training(arrays["x"], [1.0, 1.0, 1.0], arrays["beta"])


def test_mixed_kinds_named_in_the_error(monkeypatch, cudnn_library):
    from fake_cudnn import FakeArray, simulated_gpu

    arrays = _case()
    with simulated_gpu(monkeypatch):  # a cupy.ndarray needs a GPU; the simulated one stands in
        gamma = np.array(arrays["gamma"]).view(FakeArray)
        with pytest.raises(TypeError, match="arrays of mixed kinds.*gamma=cupy"):
            cudnn_bn.forward_training(arrays["x"], gamma, arrays["beta"])


def test_an_object_of_cupys_that_is_not_an_array_is_refused_by_name():
    impostor = type("Device", (), {"__module__": "cupy.cuda.device", "dtype": np.float32, "shape": (3,)})()
    arrays = _case()
    with pytest.raises(TypeError, match="^gamma: expected"):
        cudnn_bn.forward_training(arrays["x"], impostor, arrays["beta"])


@pytest.mark.parametrize("make", [
    lambda: np.broadcast_to(np.zeros(1, np.float32), (3,)),          # stride 0
    lambda: np.lib.stride_tricks.as_strided(np.zeros(4, np.float32), (3,), (2,)),  # elements half overlapping
])
def test_a_running_statistic_whose_elements_share_memory_is_refused(make):
    arrays = _case()
    running_mean = make()
    if not running_mean.flags.writeable:
        running_mean = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (3,), (0,), writeable=True)
    before = arrays["x"].copy()
    with pytest.raises(ValueError, match="running_mean: expected an array whose elements have memory of their own"):
        cudnn_bn.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], running_mean, np.ones(3, np.float32))
    np.testing.assert_array_equal(arrays["x"], before)


BAD_BACKWARD = [
    ("dy shape", dict(dy=np.zeros((4, 3, 2, 1), np.float32)), {}, ValueError,
     "dy: expected x's shape (4, 3, 2, 2), got (4, 3, 2, 1)"),
    ("dy dtype", dict(dy=np.zeros((4, 3, 2, 2), np.float64)), {}, TypeError,
     "dy: expected x's dtype float32, got float64"),
    ("gamma shape", dict(gamma=np.ones(2, np.float32)), {}, ValueError, "gamma: expected shape (3,), got (2,)"),
    ("mode conflict", {}, dict(mode="per_activation"), ValueError, "mode: saved statistics were computed in SPATIAL"),
    ("eps conflict", {}, dict(eps=1e-3), ValueError, "eps: saved statistics were computed with eps=1e-05"),
    ("axis conflict", {}, dict(channel_axis=-1), ValueError,
     "channel_axis: saved statistics were computed with channel_axis=1"),
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
    _, saved = reference.forward_training(np.ones((4, 2), np.float32) * np.arange(4)[:, None], np.ones(2, np.float32),
                                          np.zeros(2, np.float32))
    with pytest.raises(ValueError,
                       match=r"saved.mean: expected shape \(3,\) "
                             r"\(x of shape \(4, 3, 2, 2\), channel_axis=1, SPATIAL\), got \(2,\)"):
        reference.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved)


def test_fold_inference_checks_shapes_and_eps():
    ones = np.ones(3, np.float32)
    with pytest.raises(ValueError,
                       match=r"gamma, beta, mean, var: expected one shape \(the parameter shape\), "
                             r"got gamma \(3,\), beta \(3,\), mean \(3,\), var \(2,\)"):
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


@pytest.mark.parametrize("value", [np.int64(1), np.int32(1), np.uint8(1)], ids=lambda v: type(v).__name__)
def test_mode_accepts_a_numpy_integer_value_as_channel_axis_does(value):
    """A mode read from an array or a saved config is a numpy integer: the value, like 1."""
    from cudnn_bn._core.modes import parse_mode

    assert parse_mode(value) is Mode.SPATIAL
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), "spatial")
    y, saved = cudnn_bn.forward_training(x, gamma, beta, mode=value)
    expected_y, expected_saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    assert saved.mode is Mode.SPATIAL and np.array_equal(y, expected_y)
    assert cudnn_bn.SavedStats(saved.mean, saved.inv_std, value, 1e-5, 1).mode is Mode.SPATIAL
    np.testing.assert_array_equal(cudnn_bn.backward_inference(x, dy, gamma, beta, gamma, mode=value)[0],
                                  cudnn_bn.backward_inference(x, dy, gamma, beta, gamma, mode=1)[0])
    for wrong in (np.int64(3), np.bool_(True), np.float64(1.0)):
        with pytest.raises(ValueError, match=r"^mode: expected one of \['per_activation', 'spatial'"):
            parse_mode(wrong)


def test_other_modes_do_not_pay_for_the_finite_check():
    """Only the persistent path checks saved statistics (on a GPU the check synchronises)."""
    import dataclasses

    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    poisoned = saved.mean.copy()
    poisoned[0] = np.nan
    dx, _, _ = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], dataclasses.replace(saved, mean=poisoned))
    assert np.isnan(dx[:, 0]).all() and np.isfinite(dx[:, 1:]).all()


# ---- issue 9 B: every bad input is a typed error, raised before anything changes ----

SMALLEST_TRAINING_EPS = 2.0**-126  # float32's smallest normal number


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


def _host(array):
    """A host copy: synchronized for a simulated device array, whose kernels run when read."""
    return array.get() if isinstance(array, FakeArray) else np.asarray(array)


def _on_device(arrays):
    return {name: None if a is None else np.array(a, copy=True).view(FakeArray) for name, a in arrays.items()}


@pytest.fixture(params=["numpy", "simulated_gpu"])
def backend(request):
    """Run a test on numpy and on the simulated GPU; returns a function placing arrays there."""
    if request.param == "numpy":
        return lambda arrays: arrays
    request.getfixturevalue("gpu")
    return _on_device


CALLS = {
    "forward_training": lambda a: cudnn_bn.forward_training(a["x"], a["gamma"], a["beta"], a["running_mean"],
                                                            a["running_var"], mode="spatial"),
    "forward_inference": lambda a: cudnn_bn.forward_inference(a["x"], a["gamma"], a["beta"], a["running_mean"],
                                                              a["running_var"], mode="spatial"),
    "backward": lambda a: cudnn_bn.backward(a["x"], a["dy"], a["gamma"], mode="spatial", eps=1e-5),
}
NAMES_IN_CALL = {
    "forward_training": ["x", "gamma", "beta"],
    "forward_inference": [("x", "x"), ("gamma", "gamma"), ("beta", "beta"), ("running_mean", "mean"),
                          ("running_var", "var")],
    "backward": ["x", "dy", "gamma"],
}


@pytest.mark.parametrize(
    "call,key,name",
    [(call, *(item if isinstance(item, tuple) else (item, item)))
     for call, items in NAMES_IN_CALL.items() for item in items],
)
def test_none_for_a_required_array_is_a_type_error(backend, call, key, name):
    arrays = backend(_case())
    snapshot = _snapshot(arrays)
    arrays[key] = None
    with pytest.raises(TypeError, match=f"^{name}: expected a numpy.ndarray or cupy.ndarray, got None"):
        CALLS[call](arrays)
    _assert_untouched(arrays, {k: v for k, v in snapshot.items() if k != key})


def test_none_in_fold_inference_is_a_type_error():
    ones = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="^var: expected a numpy.ndarray or cupy.ndarray, got None"):
        cudnn_bn.fold_inference(ones, ones, ones, None, 1e-5)


@pytest.mark.parametrize("field", ["mean", "inv_std"])
def test_saved_stats_without_arrays_is_a_type_error(backend, field):
    arrays = backend(_case())
    _, saved = _train(arrays, mode="spatial")
    empty = dataclasses.replace(saved, **{field: None})
    with pytest.raises(TypeError, match=f"saved.{field}: expected a numpy.ndarray or cupy.ndarray, got None"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], empty)
    with pytest.raises(TypeError, match="saved.mean: expected"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], SavedStats(None, None, Mode.SPATIAL, 1e-5, 1))


def test_saved_stats_mode_given_by_name_is_the_mode_on_both_paths(backend):
    arrays = backend(_case())
    _, saved = _train(arrays, mode="spatial")
    by_name = SavedStats(saved.mean, saved.inv_std, "spatial", saved.eps, saved.channel_axis)
    assert by_name.mode is Mode.SPATIAL
    expected = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved)
    for got, wanted in zip(cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], by_name), expected):
        np.testing.assert_array_equal(_host(got), _host(wanted))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(mode="bogus"), ValueError, "SavedStats.mode: expected one of"),
        (dict(mode="auto"), ValueError, "SavedStats.mode: expected one of"),
        (dict(eps="1e-5"), TypeError, "SavedStats.eps: expected a float"),
        (dict(eps=0.0), ValueError, "SavedStats.eps: expected a finite value >= 1.18e-38"),
        (dict(eps=10**400), ValueError, "SavedStats.eps: expected a float >= 1.18e-38, got an integer of 401 digits"),
        (dict(channel_axis=1.0), TypeError, "SavedStats.channel_axis: expected an int"),
        (dict(on_overflow="maybe"), ValueError, "SavedStats.on_overflow: expected one of"),
    ],
)
def test_saved_stats_scalar_fields_are_validated_at_construction(change, error, message):
    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    with pytest.raises(error, match=_literal(message)):
        dataclasses.replace(saved, **change)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda s: dict(mean=s.mean.astype(np.float16)), TypeError,
         "saved.mean: expected float32 (the parameter dtype for float32 data"),
        (lambda s: dict(inv_std=s.inv_std.astype(np.int32)), TypeError, "saved.inv_std: expected float32"),
        (lambda s: dict(reserve_space=object()), TypeError,
         "saved.reserve_space: expected a numpy.ndarray or cupy.ndarray, got object"),
        (lambda s: dict(reserve_space=np.zeros(8, np.float32)), TypeError,
         "saved.reserve_space: expected None or the non-empty 1-D contiguous uint8 buffer"),
        (lambda s: dict(reserve_space=np.zeros((2, 4), np.uint8)), TypeError,
         "saved.reserve_space: expected None or the non-empty"),
        (lambda s: dict(reserve_space=np.zeros(0, np.uint8)), TypeError,
         "saved.reserve_space: expected None or the non-empty"),
    ],
)
def test_saved_stats_arrays_are_validated_where_backward_checks_them(backend, change, error, message):
    arrays = backend(_case())
    _, saved = _train(arrays, mode="spatial")
    changed = {name: backend({name: value})[name] if isinstance(value, np.ndarray) else value
               for name, value in change(saved).items()}
    bad = dataclasses.replace(saved, **changed)
    with pytest.raises(error, match=_literal(message)):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], bad)


def test_a_host_reserve_space_with_device_statistics_is_refused(gpu):
    arrays = _on_device(_case())
    _, saved = _train(arrays, mode="spatial")
    bad = dataclasses.replace(saved, reserve_space=np.zeros(8, np.uint8))
    with pytest.raises(TypeError, match="arrays of mixed kinds.*saved.reserve_space=numpy"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], bad)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(eps=10**400), "eps: expected a float >= 1.18e-38, got an integer of 401 digits"),
        (dict(momentum=10**400), "momentum: expected a float in [0, 1], got an integer of 401 digits"),
        (dict(momentum=-(10**400)), "momentum: expected a float in [0, 1], got an integer of 401 digits"),
    ],
)
def test_integers_past_float_range_are_value_errors(kwargs, message):
    arrays = _case()
    snapshot = _snapshot(arrays)
    with pytest.raises(ValueError, match=_literal(message)):
        _train(arrays, **{"mode": "spatial", **kwargs})
    with pytest.raises(ValueError, match="eps: expected a float >= 0, got an integer of 401 digits"):
        cudnn_bn.forward_inference(arrays["x"], arrays["gamma"], arrays["beta"], arrays["running_mean"],
                                   arrays["running_var"], eps=10**400)
    _assert_untouched(arrays, snapshot)


@pytest.mark.parametrize("eps", ["1e-5", b"1e-5", None, [1e-5], np.array([1e-5]), True])
def test_backward_refuses_an_eps_that_is_not_a_number(eps):
    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    with pytest.raises(TypeError, match="eps: expected a float"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, eps=eps if eps is not None else "x")
    if eps is not None:
        with pytest.raises(TypeError, match="eps: expected a float"):
            cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial", eps=eps)
        with pytest.raises(TypeError, match="eps: expected a float"):
            _train(arrays, mode="spatial", eps=eps)


def test_backward_accepts_numpy_scalars_like_the_forwards():
    arrays = _case()
    _, saved = _train(arrays, mode="spatial", eps=np.float32(1e-3), momentum=np.float64(0.5))
    cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, eps=np.float64(saved.eps))
    cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial", eps=np.float64(1e-3))


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-1), np.int8(1)])
def test_channel_axis_accepts_numpy_integers(backend, axis):
    shape = (4, 3, 2, 2) if int(axis) == 1 else (4, 2, 2, 3)
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, int(axis), dtype=np.float32)
    arrays = backend(dict(x=x, dy=dy, gamma=gamma, beta=beta))
    y, saved = cudnn_bn.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], mode="spatial",
                                         channel_axis=axis)
    y_int, _ = cudnn_bn.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], mode="spatial",
                                         channel_axis=int(axis))
    np.testing.assert_array_equal(_host(y), _host(y_int))
    assert saved.channel_axis == int(axis) and type(saved.channel_axis) is int
    cudnn_bn.forward_inference(arrays["x"], arrays["gamma"], arrays["beta"], arrays["gamma"], arrays["gamma"],
                               mode="spatial", channel_axis=axis)
    cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, channel_axis=axis)
    cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial", eps=1e-5, channel_axis=axis)
    reference.forward_training(x, gamma, beta, mode="spatial", channel_axis=axis)


@pytest.mark.parametrize("axis", [np.bool_(True), True, 1.0, "1", np.float64(1.0)])
def test_channel_axis_refuses_bools_and_non_integers(axis):
    arrays = _case()
    with pytest.raises(TypeError, match="channel_axis: expected an int"):
        _train(arrays, mode="spatial", channel_axis=axis)
    with pytest.raises(TypeError, match="channel_axis: expected an int"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial", eps=1e-5, channel_axis=axis)


MASKED_MESSAGE = "expected a plain numpy.ndarray, got a numpy masked array (its mask would be ignored)"


@pytest.mark.parametrize("name", ["x", "gamma", "beta", "running_mean", "running_var"])
def test_masked_arrays_are_refused(name):
    arrays = _case()
    arrays[name] = np.ma.masked_less(arrays[name], 0.5)
    snapshot = _snapshot(arrays)
    with pytest.raises(TypeError, match=_literal(f"{name}: {MASKED_MESSAGE}")):
        reference.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], arrays["running_mean"],
                                   arrays["running_var"])
    with pytest.raises(TypeError, match=f"^{name}: expected"):  # the public call names it too
        _train(arrays, mode="spatial")
    _assert_untouched(arrays, snapshot)
    assert isinstance(arrays[name], np.ma.MaskedArray)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_masked_arrays_are_refused_by_inference_backward_and_fold():
    arrays = _case()
    masked = np.ma.masked_less(arrays["dy"], 0.0)
    with pytest.raises(TypeError, match=_literal(f"dy: {MASKED_MESSAGE}")):
        reference.backward(arrays["x"], masked, arrays["gamma"], mode="spatial", eps=1e-5)
    mean = np.ma.array(arrays["running_mean"], mask=[0, 1, 0])
    with pytest.raises(TypeError, match=_literal(f"mean: {MASKED_MESSAGE}")):
        reference.forward_inference(arrays["x"], arrays["gamma"], arrays["beta"], mean, arrays["running_var"])
    with pytest.raises(TypeError, match=_literal(f"mean: {MASKED_MESSAGE}")):
        cudnn_bn.fold_inference(arrays["gamma"], arrays["beta"], mean, arrays["running_var"], 1e-5)
    with pytest.raises(TypeError, match=_literal("x: expected a plain numpy.ndarray, got a numpy.matrix")):
        reference.forward_training(np.asmatrix(arrays["x"][:, :, 0, 0]), arrays["gamma"], arrays["beta"])


# ---- eps: > 0 in training and backward, >= 0 in inference ----

def _constant_channel_case():
    arrays = _case()
    arrays["x"][:, 1] = 3.0
    return arrays


@pytest.mark.parametrize("eps", [0.0, 0, -0.0, 1e-300, np.float64(0.0)])
def test_training_and_backward_refuse_eps_that_makes_a_constant_channel_infinite(backend, eps):
    arrays = backend(_constant_channel_case())
    snapshot = _snapshot(arrays)
    with pytest.raises(ValueError, match="eps: expected a finite value >= 1.18e-38 .*constant channel has variance 0"):
        _train(arrays, mode="spatial", eps=eps)
    with pytest.raises(ValueError, match="eps: expected a finite value >= 1.18e-38"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], mode="spatial", eps=eps)
    _assert_untouched(arrays, snapshot)


def test_the_smallest_training_eps_keeps_a_constant_channel_finite(backend):
    arrays = backend(_constant_channel_case())
    y, saved = _train(arrays, mode="spatial", eps=SMALLEST_TRAINING_EPS)
    assert np.isfinite(_host(y)).all() and np.isfinite(_host(saved.inv_std)).all()
    grads = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved)
    assert all(np.isfinite(_host(g)).all() for g in grads)


def test_inference_allows_eps_zero(backend):
    arrays = backend(_case())
    y = cudnn_bn.forward_inference(arrays["x"], arrays["gamma"], arrays["beta"], arrays["running_mean"],
                                   arrays["running_var"], mode="spatial", eps=0.0)
    names = ("x", "gamma", "beta", "running_mean", "running_var")
    expected = reference.forward_inference(*(_host(arrays[n]) for n in names), mode="spatial", eps=0.0)
    np.testing.assert_allclose(_host(y), expected, rtol=FLOAT32_ROUNDING)
    scale, _ = cudnn_bn.fold_inference(*(_host(arrays[n]) for n in ("gamma", "beta", "running_mean", "running_var")), 0)
    np.testing.assert_allclose(scale, _host(arrays["gamma"]), rtol=FLOAT32_ROUNDING)


# ---- written arrays that share memory with another argument ----

def _overlaps(arrays, place):
    """Running statistics that alias another argument; ``place`` puts a new buffer where the
    arrays live (views of it stay views)."""
    buffer = place(np.zeros(8, np.float32))
    x2d = place(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    twice = place(np.zeros(3, np.float32))
    return {
        "shifted views of one buffer": dict(running_mean=buffer[0:3], running_var=buffer[1:4]),
        "one buffer twice": dict(running_mean=twice[:], running_var=twice[:]),
        "the same array twice": dict(running_mean=twice, running_var=twice),
        "running_mean is gamma": dict(running_mean=arrays["gamma"]),
        "running_var is beta": dict(running_var=arrays["beta"]),
        "running_var a view of gamma reversed": dict(running_var=arrays["gamma"][::-1]),
        "running_mean a view of x": dict(x=x2d, dy=place(np.ones((5, 3), np.float32)), running_mean=x2d[2]),
        "running_var a column of x": dict(x=x2d, dy=place(np.ones((5, 3), np.float32)), running_var=x2d[1:4, 1]),
        "interleaved strides": dict(running_mean=buffer[0:6:2], running_var=buffer[1:7:2]),
    }


def _place(backend):
    return lambda array: backend({"a": array})["a"]


@pytest.mark.parametrize("label", list(_overlaps(_case(), lambda a: a)))
def test_written_arrays_that_share_memory_are_refused(backend, label):
    arrays = backend(_case())
    arrays.update(_overlaps(arrays, _place(backend))[label])
    snapshot = _snapshot(arrays)
    with pytest.raises(ValueError,
                       match="running_(mean|var): expected memory of its own \\(it is written in place\\), "
                             "got an array whose memory overlaps"):
        _train(arrays, mode="spatial")
    _assert_untouched(arrays, snapshot)


def test_disjoint_views_of_one_buffer_are_accepted():
    arrays = _case()
    buffer = np.zeros(6, np.float32)
    arrays.update(running_mean=buffer[0:3], running_var=buffer[3:6])
    arrays["running_var"][...] = 1.0
    _train(arrays, mode="spatial", momentum=1.0)
    np.testing.assert_allclose(buffer[0:3], arrays["x"].astype(np.float64).mean(axis=(0, 2, 3)), rtol=FLOAT32_ROUNDING)


# ---- the SPATIAL re-run that the overflow advice suggests ----

def test_spatial_backward_accepts_persistent_statistics(backend):
    arrays = backend(_case())
    _, saved = _train(arrays, mode="spatial_persistent")
    assert saved.mode is Mode.SPATIAL_PERSISTENT
    persistent = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved)
    spatial = cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, mode="spatial")
    for a, b in zip(persistent, spatial):
        np.testing.assert_allclose(_host(a), _host(b), rtol=FLOAT32_ROUNDING, atol=FLOAT32_ROUNDING)
    with pytest.raises(ValueError,
                       match="mode: saved statistics were computed in SPATIAL_PERSISTENT, got mode=PER_ACTIVATION"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, mode="per_activation")
    _, spatial_saved = _train(arrays, mode="spatial")
    with pytest.raises(ValueError,
                       match="mode: saved statistics were computed in SPATIAL, got mode=SPATIAL_PERSISTENT"):
        cudnn_bn.backward(arrays["x"], arrays["dy"], arrays["gamma"], spatial_saved, mode="spatial_persistent")


# ---- SavedStats equality and hashing ----

def test_saved_stats_equality_is_identity_of_arrays_and_equal_settings():
    arrays = _case()
    _, saved = _train(arrays, mode="spatial")
    same = copy.copy(saved)
    assert saved == saved and saved == same and hash(saved) == hash(same)
    assert {saved: 1}[same] == 1
    assert saved != dataclasses.replace(saved, mean=saved.mean.copy())  # equal values, another array
    assert saved != dataclasses.replace(saved, eps=1e-3)
    assert saved != dataclasses.replace(saved, on_overflow="ignore")
    assert (saved == 3) is False and (saved != "saved") is True
    restored = pickle.loads(pickle.dumps(saved))
    assert restored != saved and restored.mode is Mode.SPATIAL
    np.testing.assert_array_equal(restored.mean, saved.mean)


def test_mode_prints_its_name():
    assert str(Mode.SPATIAL_PERSISTENT) == "SPATIAL_PERSISTENT"
    assert f"{Mode.PER_ACTIVATION}" == "PER_ACTIVATION" and f"{Mode.SPATIAL:>9}" == "  SPATIAL"
    assert int(Mode.SPATIAL) == 1 and Mode.SPATIAL == 1
    arrays = _case()
    _, saved = _train(arrays, mode="spatial_persistent")
    assert str(saved.mode) == "SPATIAL_PERSISTENT"


def test_the_overflow_policy_prints_what_users_type():
    assert str(OnOverflow.FALLBACK) == "fallback" and f"{OnOverflow.RAISE:>6}" == " raise"
    assert OnOverflow.IGNORE == "ignore" and repr(OnOverflow.IGNORE) == "<OnOverflow.IGNORE: 'ignore'>"
    arrays = _case()
    _, saved = cudnn_bn.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], mode="spatial_persistent",
                                         on_overflow="ignore")
    assert str(saved.on_overflow) == "ignore"


def test_overlap_bounds_use_the_device_pointer_of_cupy_arrays():
    """Real cupy arrays are not numpy arrays: their range comes from ``.data.ptr`` and byte strides."""
    from cudnn_bn._core.arrays import check_no_overlap

    class DeviceArray:  # what the check reads of a cupy.ndarray
        def __init__(self, ptr, shape, strides, itemsize=4):
            self.data = type("MemoryPointer", (), {"ptr": ptr})()
            self.shape, self.strides, self.itemsize = shape, strides, itemsize
            self.size = int(np.prod(shape))

    base = 0x7F0000000000
    check_no_overlap({"running_mean": DeviceArray(base, (3,), (4,))}, {"gamma": DeviceArray(base + 12, (3,), (4,))})
    with pytest.raises(ValueError, match="running_mean: expected memory of its own"):
        check_no_overlap({"running_mean": DeviceArray(base, (3,), (4,))}, {"gamma": DeviceArray(base + 8, (3,), (4,))})
    with pytest.raises(ValueError, match="running_var: expected memory of its own .* overlaps x's"):  # a reversed view
        check_no_overlap({"running_var": DeviceArray(base + 8, (3,), (-4,))},
                         {"x": DeviceArray(base - 396, (10, 10), (40, 4))})
    check_no_overlap({"running_var": DeviceArray(base + 8, (3,), (-4,))},
                     {"x": DeviceArray(base - 400, (10, 10), (40, 4))})  # adjacent
    check_no_overlap({"running_var": DeviceArray(base, (0,), (4,))}, {"x": DeviceArray(base, (3,), (4,))})  # empty


def test_a_masked_array_through_the_public_call_says_why_it_is_refused():
    import cudnn_bn

    x = np.ma.masked_array(np.ones((4, 3)), mask=False)
    with pytest.raises(TypeError, match="masked array \\(its mask would be ignored\\)"):
        cudnn_bn.forward_training(x, np.ones(3), np.zeros(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_finite_check_accepts_the_largest_finite_statistics(dtype):
    # its one reduction must not overflow into a false "not finite" (a plain sum or product would)
    from cudnn_bn._core.validate import check_saved_finite

    largest = np.finfo(dtype).max
    saved = cudnn_bn.SavedStats(np.full(4, largest, dtype), np.full(4, largest, dtype), "spatial_persistent", 1e-5, 1)
    check_saved_finite(saved)  # raises ValueError if it mistook them
    poisoned = cudnn_bn.SavedStats(np.full(4, largest, dtype), np.array([largest, np.inf, 1, 1], dtype),
                                   "spatial_persistent", 1e-5, 1)
    with pytest.raises(ValueError, match="saved.inv_std: expected finite values"):
        check_saved_finite(poisoned)


# ---- the checks called directly, where the public functions refuse first ----
INFERENCE_NAMES = ["x", "gamma", "beta", "mean", "var"]


def _inference_args():
    return [np.ones((4, 3, 2, 2)), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]


def _check(args):
    return validate.check_forward_inference(*args, mode=Mode.SPATIAL, eps=0.0, channel_axis=1)


def test_inference_accepts_eps_zero():
    assert _check(_inference_args()).layout.shape == (4, 3, 2, 2)


@pytest.mark.parametrize("position", range(5), ids=INFERENCE_NAMES)
def test_inference_refuses_a_non_array_naming_it(position):
    args = _inference_args()
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"\b{INFERENCE_NAMES[position]}\b"):
        _check(args)


@pytest.mark.parametrize("position", range(1, 5), ids=INFERENCE_NAMES[1:])
def test_inference_refuses_a_parameter_of_the_wrong_shape_naming_it(position):
    args = _inference_args()
    args[position] = np.ones(4)
    with pytest.raises(ValueError, match=rf"^{INFERENCE_NAMES[position]}: "):
        _check(args)


def _backward_args():
    return [np.ones((4, 3, 2, 2)), np.ones((4, 3, 2, 2)), np.ones(3)]


def test_backward_settings_accept_auto_and_refuse_a_training_eps_below_float32s_range():
    x = np.ones((4, 3, 2, 2))
    mode, eps, channel_axis = validate.resolve_backward_settings(x, None, "auto", 1e-5, 1)
    assert eps == 1e-5 and channel_axis == 1 and mode is not None
    with pytest.raises(ValueError, match=r"^eps: expected a finite value >= "):
        validate.resolve_backward_settings(x, None, "spatial", 0.0, 1)


@pytest.mark.parametrize("missing,message", [
    ("mode", "mode: required when saved is None (backward recomputes the batch statistics)"),
    ("eps", "eps: required when saved is None (it must equal the forward call's eps)"),
])
def test_backward_without_saved_statistics_names_what_it_needs(missing, message):
    settings = {"mode": "spatial", "eps": 1e-5}
    settings[missing] = None
    with pytest.raises(ValueError) as raised:
        validate.resolve_backward_settings(np.ones((4, 3, 2, 2)), None, settings["mode"], settings["eps"], 1)
    assert str(raised.value) == message


@pytest.mark.parametrize("position", range(3), ids=["x", "dy", "gamma"])
def test_backward_refuses_a_non_array_naming_it(position):
    args = _backward_args()
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"\b{['x', 'dy', 'gamma'][position]}\b"):
        validate.check_backward(*args, None, mode=Mode.SPATIAL, eps=1e-5, channel_axis=1)


def test_backward_refuses_eps_zero():
    with pytest.raises(ValueError, match="^eps: "):
        validate.check_backward(*_backward_args(), None, mode=Mode.SPATIAL, eps=0.0, channel_axis=1)


def test_persistent_backward_without_saved_statistics_says_why():
    with pytest.raises(ValueError) as raised:
        validate.check_backward(*_backward_args(), None, mode=Mode.SPATIAL_PERSISTENT, eps=1e-5, channel_axis=1)
    assert str(raised.value) == (
        "saved: SPATIAL_PERSISTENT backward requires the saved mean and inverse std from forward_training "
        "(cuDNN does not recompute them on that path), got None"
    )


def test_a_saved_reserve_space_of_the_wrong_shape_is_named():
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    _, saved = cudnn_bn.forward_training(x, np.ones(3), np.zeros(3), mode="spatial")
    bad = dataclasses.replace(saved, reserve_space=np.zeros((2, 2), np.uint8))
    with pytest.raises((TypeError, ValueError),
                       match=r"^saved\.reserve_space: "
                             r"expected None or the non-empty 1-D contiguous uint8 buffer that "):
        cudnn_bn.backward(x, np.ones_like(x), np.ones(3), bad)


def test_the_finite_check_reads_the_statistics_with_their_own_array_module(gpu, monkeypatch):
    cupy = sys.modules["cupy"]
    calls = []
    vdot = cupy.vdot
    monkeypatch.setattr(cupy, "vdot", lambda a, b: calls.append(type(a)) or vdot(a, b))
    mean, inv_std = (np.array(values, np.float32).view(FakeArray) for values in ([0.5, -1.0], [2.0, 3.0]))
    validate.check_saved_finite(SavedStats(mean, inv_std, Mode.SPATIAL_PERSISTENT, 1e-5, 1))
    assert calls == [FakeArray]
