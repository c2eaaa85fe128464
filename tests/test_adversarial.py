"""A generated sweep of bad inputs over every public call, on numpy and on the simulated GPU.

Each case replaces one argument of a valid call by a bad value and asserts that the call raises a
typed error (TypeError or ValueError; KeyError for a state_dict's keys) whose message names the
argument, and that afterwards every array the caller passed, and the layer's state, is bit for bit
what it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import BatchNorm, SavedStats, reference
from fake_cudnn import FakeArray, simulated_gpu

C = 3
SHAPE = (4, C, 2, 2)
TYPED = (TypeError, ValueError)


@pytest.fixture(params=["numpy", "simulated_gpu"])
def side(request, monkeypatch):
    """Where the arrays live: ``(where, place, other_kind)``; place puts a host array there, and
    other_kind puts it in the other array library. Parametrized here for the layer tests, and per
    case (indirectly) where a call takes numpy arrays only."""
    if request.param == "numpy":
        yield request.param, (lambda a: a), (lambda a: np.array(a, copy=True).view(FakeArray))
        return
    request.getfixturevalue("cudnn_library")
    with simulated_gpu(monkeypatch):
        yield request.param, (lambda a: np.array(a, copy=True).view(FakeArray)), (lambda a: np.array(a, copy=True))


# ---- valid arguments ----

def _good_arrays(place):
    rng = np.random.default_rng(0)
    host = dict(
        x=rng.standard_normal(SHAPE).astype(np.float32),
        dy=rng.standard_normal(SHAPE).astype(np.float32),
        gamma=(0.5 + rng.random(C)).astype(np.float32),
        beta=rng.standard_normal(C).astype(np.float32),
        running_mean=np.zeros(C, np.float32),
        running_var=np.ones(C, np.float32),
    )
    return {name: place(array) for name, array in host.items()}


# ---- bad values: each a function (good value, place, other_kind, arrays) -> bad value ----

def _on_host(array):
    return array.get() if isinstance(array, FakeArray) else array


def _dtype(dtype):
    return lambda good, place, other, arrays: place(np.zeros(good.shape, dtype))


def _shape(shape):
    return lambda good, place, other, arrays: place(np.ones(shape, good.dtype))


NOT_ARRAYS = {
    "None": lambda good, place, other, arrays: None,
    "list": lambda good, place, other, arrays: _on_host(good).tolist(),
    "tuple": lambda good, place, other, arrays: (1.0, 2.0, 3.0),
    "str": lambda good, place, other, arrays: "array",
    "float": lambda good, place, other, arrays: 1.0,
    "numpy scalar": lambda good, place, other, arrays: np.float32(1.0),
    "dict": lambda good, place, other, arrays: {"data": [1.0]},
    "object": lambda good, place, other, arrays: object(),
    "other kind": lambda good, place, other, arrays: other(_on_host(good)),
    "masked": lambda good, place, other, arrays: np.ma.masked_less(_on_host(good), 0.0),
}
BAD_DTYPES = {
    name: _dtype(dtype)
    for name, dtype in {
        "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "bool": bool, "complex64": np.complex64,
        "complex128": np.complex128, "object": object, "unicode": "U3", "bytes": "S3", "datetime": "datetime64[s]",
    }.items()
}
BAD_X = {
    **NOT_ARRAYS,
    **BAD_DTYPES,
    "0-d": _shape(()),
    "1-D": _shape((4,)),
    "6-D": _shape((4, C, 1, 1, 1, 1)),
    "empty batch": _shape((0, C, 2, 2)),
    "empty spatial": _shape((4, C, 0, 2)),
    "big-endian": lambda good, place, other, arrays: place(np.zeros(good.shape, ">f4")),
    "float128": lambda good, place, other, arrays: place(np.zeros(good.shape, np.longdouble)),
}
BAD_PARAM = {
    **NOT_ARRAYS,
    **BAD_DTYPES,
    "0-d": _shape(()),
    "one too many": _shape((C + 1,)),
    "one too few": _shape((C - 1,)),
    "column": _shape((C, 1)),
    "row": _shape((1, C)),
    "empty": _shape((0,)),
}
BAD_RUNNING = {
    **{k: v for k, v in BAD_PARAM.items() if k != "None"},
    "read-only": lambda good, place, other, arrays: _read_only(place(np.zeros(C, np.float32))),
    "is gamma": lambda good, place, other, arrays: arrays["gamma"],
    "view of beta": lambda good, place, other, arrays: arrays["beta"][::-1],
    "view of x": lambda good, place, other, arrays: arrays["x"][0, :, 0, 0],
    "overlapping": lambda good, place, other, arrays: _overlapping(arrays, good),
    "None alone": lambda good, place, other, arrays: None,
}
BAD_DY = {
    **BAD_X,
    "x's shape minus one": _shape((4, C, 2, 1)),
    "float64": _dtype(np.float64),
    "float16": _dtype(np.float16),
}


def _read_only(array):
    array.flags.writeable = False
    return array


def _overlapping(arrays, good):
    """A view of the other running statistic's memory, shifted by one element."""
    other = arrays["running_var"] if good is arrays["running_mean"] else arrays["running_mean"]
    return np.lib.stride_tricks.as_strided(other[1:], (C,), other.strides)


def _scalars(*values):
    def label(value):
        if isinstance(value, int) and abs(value) > 10**6:
            return ("-" if value < 0 else "") + f"10**{len(str(abs(value))) - 1}"
        return repr(value)

    return {label(value): value for value in values}


HUGE = 10**400
BAD_EPS_TRAINING = _scalars("1e-5", b"1e-5", None, [1e-5], np.array(1e-5), True, np.bool_(True), float("nan"),
                            float("inf"), -float("inf"), -1.0, 0.0, 0, 1e-300, HUGE, -HUGE, 1e-5j)
BAD_EPS_INFERENCE = {k: v for k, v in BAD_EPS_TRAINING.items() if k not in ("0.0", "0", "1e-300")}
BAD_MOMENTUM = _scalars("0.1", None, True, [0.1], np.array(0.1), float("nan"), float("inf"), -0.1, 1.5, HUGE, -HUGE,
                        0.1j)
BAD_CHANNEL_AXIS = _scalars(None, 1.0, "1", True, np.bool_(True), np.float64(1.0), [1], 2, 7, -5, HUGE)
BAD_MODE = _scalars("bogus", "", 7, -1, 2.5, True, None, [], "spatial persistent")
BAD_ON_OVERFLOW = _scalars("maybe", "", 5, [], 1.5, True)


# ---- the public calls, each as (arrays, scalars) -> result ----

def _train(a, s):
    return cudnn_bn.forward_training(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], **s)


def _infer(a, s):
    return cudnn_bn.forward_inference(a["x"], a["gamma"], a["beta"], a["mean"], a["var"], **s)


def _backward(a, s):
    return cudnn_bn.backward(a["x"], a["dy"], a["gamma"], a["saved"], **s)


def _fold(a, s):
    return cudnn_bn.fold_inference(a["gamma"], a["beta"], a["mean"], a["var"], **s)


def _reference_train(a, s):
    return reference.forward_training(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], **s)


def _reference_infer(a, s):
    return reference.forward_inference(a["x"], a["gamma"], a["beta"], a["mean"], a["var"], **s)


def _reference_backward(a, s):
    return reference.backward(a["x"], a["dy"], a["gamma"], a["saved"], **s)


def _inference_arrays(arrays):
    arrays = dict(arrays)
    arrays["mean"], arrays["var"] = arrays.pop("running_mean"), arrays.pop("running_var")
    return arrays


def _backward_arrays(arrays):
    _, saved = cudnn_bn.forward_training(arrays["x"], arrays["gamma"], arrays["beta"], mode="spatial")
    return {**arrays, "saved": saved}


# (label, call, numpy only, prepare arrays, bad arrays per name, bad scalars per name)
CALLS = [
    ("forward_training", _train, False, dict,
     {"x": BAD_X, "gamma": BAD_PARAM, "beta": BAD_PARAM, "running_mean": BAD_RUNNING, "running_var": BAD_RUNNING},
     {"eps": BAD_EPS_TRAINING, "momentum": BAD_MOMENTUM, "channel_axis": BAD_CHANNEL_AXIS, "mode": BAD_MODE,
      "on_overflow": BAD_ON_OVERFLOW}),
    ("reference.forward_training", _reference_train, True, dict,
     {"x": BAD_X, "gamma": BAD_PARAM, "running_var": BAD_RUNNING},
     {"eps": BAD_EPS_TRAINING, "momentum": BAD_MOMENTUM, "channel_axis": BAD_CHANNEL_AXIS,
      "mode": {**BAD_MODE, "'auto'": "auto"}}),
    ("forward_inference", _infer, False, _inference_arrays,
     {"x": BAD_X, "gamma": BAD_PARAM, "beta": BAD_PARAM, "mean": BAD_PARAM, "var": BAD_PARAM},
     {"eps": BAD_EPS_INFERENCE, "channel_axis": BAD_CHANNEL_AXIS, "mode": BAD_MODE}),
    ("reference.forward_inference", _reference_infer, True, _inference_arrays, {"x": BAD_X, "var": BAD_PARAM},
     {"eps": BAD_EPS_INFERENCE, "mode": {**BAD_MODE, "'auto'": "auto"}}),
    ("backward", _backward, False, _backward_arrays, {"x": BAD_X, "dy": BAD_DY, "gamma": BAD_PARAM},
     {"eps": {**{k: v for k, v in BAD_EPS_TRAINING.items() if k != "None"}, "another eps": 1e-3},
      "channel_axis": {**{k: v for k, v in BAD_CHANNEL_AXIS.items() if k != "None"}, "another axis": -1},
      "mode": {**{k: v for k, v in BAD_MODE.items() if k != "None"}, "another mode": "per_activation"},
      "on_overflow": BAD_ON_OVERFLOW}),
    ("reference.backward", _reference_backward, True, _backward_arrays, {"x": BAD_X, "dy": BAD_DY},
     {"eps": {"'1e-5'": "1e-5", "0.0": 0.0, "10**400": HUGE}}),
    ("fold_inference", _fold, False, _inference_arrays,
     {"gamma": BAD_PARAM, "beta": BAD_PARAM, "mean": BAD_PARAM, "var": BAD_PARAM},
     {"eps": BAD_EPS_INFERENCE}),
]

SIDES = ["numpy", "simulated_gpu"]


def _sides(numpy_only):
    return SIDES[:1] if numpy_only else SIDES


def _array_cases():
    for label, call, numpy_only, prepare, arrays, _ in CALLS:
        for where in _sides(numpy_only):
            for name, bad_values in arrays.items():
                for bad in bad_values:
                    yield pytest.param(where, label, name, bad, id=f"{where}-{label}-{name}-{bad}")


def _scalar_cases():
    for label, call, numpy_only, prepare, _, scalars in CALLS:
        for where in _sides(numpy_only):
            for name, bad_values in scalars.items():
                for bad in bad_values:
                    yield pytest.param(where, label, name, bad, id=f"{where}-{label}-{name}-{bad}")


def _call(label):
    return next(entry for entry in CALLS if entry[0] == label)


def _host_bytes(value):
    """Bit-for-bit content of every array reachable from ``value`` (arrays, dicts, SavedStats)."""
    if isinstance(value, np.ma.MaskedArray):
        return ("masked", value.data.tobytes(), np.ma.getmaskarray(value).tobytes())
    if isinstance(value, FakeArray):
        return (value.dtype.str, value.shape, value.get().tobytes())
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, SavedStats):
        return tuple(_host_bytes(getattr(value, field.name)) for field in dataclasses.fields(value))
    if isinstance(value, dict):
        return {key: _host_bytes(item) for key, item in value.items()}
    return repr(value) if isinstance(value, (list, tuple)) else None


def _assert_refused(call, arrays, scalars, name):
    before = _host_bytes(arrays)
    with pytest.raises(TYPED) as caught:
        call(arrays, scalars)
    message = str(caught.value)
    assert name in message, f"{type(caught.value).__name__} does not name {name!r}: {message}"
    assert _host_bytes(arrays) == before, "an argument was modified by a refused call"


@pytest.mark.parametrize("side,label,name,bad", list(_array_cases()), indirect=["side"])
def test_bad_array_is_refused_and_nothing_changes(side, label, name, bad):
    where, place, other = side
    _, call, numpy_only, prepare, bad_arrays, _ = _call(label)
    arrays = prepare(_good_arrays(place))
    arrays[name] = bad_arrays[name][bad](arrays[name], place, other, arrays)
    scalars = {"mode": "spatial"} if "fold" not in label and "backward" not in label else {}
    expected_name = "running_" if name.startswith("running_") and bad == "None alone" else name
    _assert_refused(call, arrays, scalars, expected_name)


@pytest.mark.parametrize("side,label,name,bad", list(_scalar_cases()), indirect=["side"])
def test_bad_scalar_is_refused_and_nothing_changes(side, label, name, bad):
    where, place, other = side
    _, call, numpy_only, prepare, _, bad_scalars = _call(label)
    arrays = prepare(_good_arrays(place))
    scalars = {"mode": "spatial"} if "fold" not in label and "backward" not in label else {}
    scalars[name] = bad_scalars[name][bad]
    _assert_refused(call, arrays, scalars, name)


# ---- saved statistics ----

def _bad_saved(saved, place, other):
    mean = _on_host(saved.mean)
    replace = lambda **change: dataclasses.replace(saved, **change)  # noqa: E731
    return {
        "a dict": {"mean": saved.mean},
        "an object": object(),
        "a string": "saved",
        "None arrays": SavedStats(None, None, saved.mode, saved.eps, saved.channel_axis),
        "list mean": replace(mean=mean.tolist()),
        "float16 mean": replace(mean=place(mean.astype(np.float16))),
        "int inv_std": replace(inv_std=place(mean.astype(np.int32))),
        "complex mean": replace(mean=place(mean.astype(np.complex64))),
        "wrong shape": replace(mean=place(np.zeros(C + 1, np.float32))),
        "2-D mean": replace(mean=place(mean[None, :])),
        "other kind": replace(mean=other(mean)),
        "masked mean": replace(mean=np.ma.masked_less(mean, 0.0)),
        "object reserve": replace(reserve_space=object()),
        "float reserve": replace(reserve_space=place(np.zeros(16, np.float32))),
        "2-D reserve": replace(reserve_space=place(np.zeros((2, 8), np.uint8))),
        "empty reserve": replace(reserve_space=place(np.zeros(0, np.uint8))),
        "reserve of the other kind": replace(reserve_space=other(np.zeros(16, np.uint8))),
        "channels-last statistics": replace(channel_axis=-1),
    }


SAVED_CASES = list(_bad_saved(SavedStats(np.zeros(C, np.float32), np.ones(C, np.float32), "spatial", 1e-5, 1),
                              lambda a: a, lambda a: a))


SAVED_SWEEP = [
    pytest.param(where, label, bad, id=f"{where}-{label}-{bad}")
    for label, numpy_only in (("backward", False), ("reference.backward", True))
    for where in _sides(numpy_only)
    for bad in SAVED_CASES
]


@pytest.mark.parametrize("side,label,bad", SAVED_SWEEP, indirect=["side"])
def test_bad_saved_statistics_are_refused_and_nothing_changes(side, label, bad):
    where, place, other = side
    _, call, numpy_only, prepare, _, _ = _call(label)
    arrays = prepare(_good_arrays(place))
    arrays["saved"] = _bad_saved(arrays["saved"], place, other)[bad]
    _assert_refused(call, arrays, {}, "saved")


@pytest.mark.parametrize(
    "field,bad",
    [("mode", v) for v in ("bogus", "auto", 7, None, 1.5)]
    + [("eps", v) for v in ("1e-5", None, 0.0, -1.0, float("nan"), HUGE, True)]
    + [("channel_axis", v) for v in (1.0, "1", None, True)]
    + [("on_overflow", v) for v in ("maybe", 5, 1.5)],
)
def test_saved_stats_construction_refuses_bad_settings(field, bad):
    settings = dict(mean=np.zeros(C, np.float32), inv_std=np.ones(C, np.float32), mode="spatial", eps=1e-5,
                    channel_axis=1)
    settings[field] = bad
    with pytest.raises(TYPED, match=f"^SavedStats.{field}: "):
        SavedStats(**settings)


# ---- the layer ----

def _layer_snapshot(layer):
    return (
        _host_bytes({name: getattr(layer, name)
                     for name in ("gamma", "beta", "running_mean", "running_var", "grad_gamma", "grad_beta")
                     if getattr(layer, name) is not None}),
        layer.num_batches_tracked,
        id(layer._kept),
        layer.training,
    )


def _trained_layer(where, place, momentum):
    layer = BatchNorm(C, mode="spatial", momentum=momentum, xp="numpy" if where == "numpy" else "cupy")
    x = place(np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32))
    layer(x)
    layer.backward(place(np.ones(SHAPE, np.float32)))
    return layer, x


LAYER_X = {
    **BAD_X,
    "other channels": _shape((4, C + 1, 2, 2)),
    "channels last": _shape((4, 2, 2, C)),
    "float64": _dtype(np.float64),
    "float16": _dtype(np.float16),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", list(LAYER_X))
def test_layer_forward_refuses_bad_x_and_keeps_its_state(side, bad, training):
    where, place, other = side
    layer, good = _trained_layer(where, place, momentum=None)
    layer.train(training)
    x = LAYER_X[bad](good, place, other, {})
    before, x_before = _layer_snapshot(layer), _host_bytes(x)
    with pytest.raises(TYPED, match="^x: "):
        layer(x)
    assert _layer_snapshot(layer) == before and _host_bytes(x) == x_before


@pytest.mark.parametrize("bad", list(BAD_DY))
def test_layer_backward_refuses_bad_dy_and_keeps_its_gradients(side, bad):
    where, place, other = side
    layer, good = _trained_layer(where, place, momentum=0.1)
    dy = BAD_DY[bad](good, place, other, {})
    before = _layer_snapshot(layer)
    with pytest.raises(TYPED, match="dy"):
        layer.backward(dy)
    assert _layer_snapshot(layer) == before


STATE_VALUES = {
    "None": None,
    "strings": np.array(["a", "b", "c"]),
    "complex": np.ones(C, np.complex64),
    "bool": np.ones(C, bool),
    "objects": np.array([1.0, None, 2.0], dtype=object),
    "masked": np.ma.ones(C),
    "shape": np.ones(C + 1),
    "2-D": np.ones((1, C)),
    "past float32": np.array([1.0, 1e300, 1.0]),
    "a dict": {"a": 1},
    "a string": "1.0",
}
COUNT_VALUES = {
    "None": None, "negative": -1, "negative array": np.array(-1), "two": np.array([1, 2]), "float": 1.5,
    "float array": np.array(2.0), "bool": True, "string": "3", "past int64": 2**63, "complex": 1j,
}
STATE_CASES = [(name, bad) for name in ("weight", "bias", "running_mean", "running_var") for bad in STATE_VALUES]
STATE_CASES += [("num_batches_tracked", bad) for bad in COUNT_VALUES]


@pytest.mark.parametrize("name,bad", STATE_CASES, ids=[f"{n}-{b}" for n, b in STATE_CASES])
def test_layer_load_state_dict_refuses_and_keeps_its_state(side, name, bad):
    where, place, other = side
    layer, _ = _trained_layer(where, place, momentum=0.1)
    state = layer.state_dict()
    state[name] = (COUNT_VALUES if name == "num_batches_tracked" else STATE_VALUES)[bad]
    before, state_before = _layer_snapshot(layer), _host_bytes(state)
    with pytest.raises(TYPED, match=f"state\\['{name}'\\]"):
        layer.load_state_dict(state)
    assert _layer_snapshot(layer) == before and _host_bytes(state) == state_before


@pytest.mark.parametrize(
    "change",
    ["missing", "extra", "prefixed", "not a mapping", "bad prefix"],
)
def test_layer_load_state_dict_refuses_bad_keys(side, change):
    where, place, other = side
    layer, _ = _trained_layer(where, place, momentum=0.1)
    state = layer.state_dict()
    arguments = {}
    if change == "missing":
        del state["bias"]
    elif change == "extra":
        state["scale"] = np.ones(C, np.float32)
    elif change == "prefixed":
        state = {f"1.{key}": value for key, value in state.items()}
    elif change == "not a mapping":
        state = list(state.items())
    else:
        arguments["prefix"] = 1
    before = _layer_snapshot(layer)
    with pytest.raises((KeyError, TypeError), match="state|prefix"):
        layer.load_state_dict(state, **arguments)
    assert _layer_snapshot(layer) == before


CONSTRUCTION = (
    [("num_features", v) for v in (3.7, "3", True, None, 0, -1, (), (3, 0), [3.0], 2**31, 10**400, np.float64(3))]
    + [("mode", v) for v in ("bogus", 7, None, [], 2.5)]
    + [("eps", v) for v in BAD_EPS_TRAINING.values()]
    + [("momentum", v) for v in BAD_MOMENTUM.values() if v is not None]
    + [("channel_axis", v) for v in (None, 1.0, "1", True, 0, 2, 3, 7, -2, HUGE)]
    + [("dtype", v) for v in (None, np.int32, "int64", bool, np.complex64, "nonsense", object, [np.float32])]
    + [("xp", v) for v in (None, "torch", "np", dataclasses, 3, object())]
    + [("affine", v) for v in (None, "yes", 1, [])]
    + [("track_running_stats", v) for v in (None, "no", 0)]
)


@pytest.mark.parametrize("name,bad", CONSTRUCTION, ids=[f"{n}-{b!r}"[:60] for n, b in CONSTRUCTION])
def test_layer_construction_refuses_bad_arguments(name, bad):
    arguments = {"num_features": C, name: bad}
    with pytest.raises(TYPED, match=f"^{name}: "):
        BatchNorm(arguments.pop("num_features"), **arguments)


def test_the_sweep_is_large():
    """The generated cases above number in the hundreds per side."""
    per_side = {where: 0 for where in SIDES}
    for case in list(_array_cases()) + list(_scalar_cases()) + SAVED_SWEEP:
        per_side[case.values[0]] += 1
    layer_cases = 2 * len(LAYER_X) + len(BAD_DY) + len(STATE_CASES) + 5
    assert per_side["numpy"] + layer_cases + len(CONSTRUCTION) > 600
    assert per_side["simulated_gpu"] + layer_cases > 300
