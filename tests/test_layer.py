"""BatchNorm layer on the NumPy side (the cupy side is the same code over cuDNN)."""

from __future__ import annotations

import pickle
import sys
import warnings

import numpy as np
import pytest

from conftest import FLOAT32_ROUNDING
from cudnn_bn import BatchNorm, Mode, fused, reference
from cudnn_bn.layer import KeptForBackward, _batch_count, _feature_shape, _listed, _prefix_hint
from fake_cudnn import FakeArray, simulated_gpu

# float32 running statistics after a few batches: every update rounds to float32 (6e-8 relative),
# and the errors add up over the batches
RUNNING_STATISTICS_RTOL = 1e-5
# the mean over a batch of a float32 y of order one: the rounding of each value and of the sum
NORMALIZED_MEAN_ATOL = 1e-5


def _batches(shape, count, seed=0):
    rng = np.random.default_rng(seed)
    return [(2.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32) for _ in range(count)]


def test_training_step_matches_the_functions_and_sets_gradients():
    layer = BatchNorm(4, mode="spatial")
    layer.gamma[...] = [0.5, 1.0, 1.5, 2.0]
    x = _batches((8, 4, 3, 3), 1)[0]
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    y = layer(x)
    dx = layer.backward(dy)
    y_ref, saved = reference.forward_training(x, layer.gamma, layer.beta, mode="spatial")
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(x, dy, layer.gamma, saved)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(layer.grad_gamma, dgamma_ref)
    np.testing.assert_array_equal(layer.grad_beta, dbeta_ref)
    assert layer.num_batches_tracked == 1


def test_running_statistics_with_momentum_and_eval_uses_them():
    layer = BatchNorm(3, momentum=0.25)
    batches = _batches((16, 3, 2, 2), 5)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    for x in batches:
        layer(x)
        expected_mean = 0.75 * expected_mean + 0.25 * x.astype(np.float64).mean(axis=(0, 2, 3))
        expected_var = 0.75 * expected_var + 0.25 * x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(layer.running_mean, expected_mean, rtol=RUNNING_STATISTICS_RTOL)
    np.testing.assert_allclose(layer.running_var, expected_var, rtol=RUNNING_STATISTICS_RTOL)
    layer.eval()
    y = layer(batches[0])
    expected = reference.forward_inference(batches[0], layer.gamma, layer.beta, layer.running_mean, layer.running_var)
    np.testing.assert_allclose(y, expected, rtol=FLOAT32_ROUNDING)
    # backward in eval mode runs through the running statistics it normalized with
    dy = np.ones_like(batches[0])
    expected = reference.backward_inference(batches[0], dy, layer.gamma, layer.running_mean, layer.running_var)
    np.testing.assert_array_equal(layer.backward(dy), expected[0])
    np.testing.assert_array_equal(layer.grad_gamma, expected[1])
    np.testing.assert_array_equal(layer.grad_beta, expected[2])


def test_momentum_none_is_the_cumulative_average():
    layer = BatchNorm(2, momentum=None, mode="per_activation")
    batches = _batches((10, 2), 6, seed=3)
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.running_mean,
                               np.mean([x.astype(np.float64).mean(axis=0) for x in batches], axis=0),
                               rtol=RUNNING_STATISTICS_RTOL)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([x.astype(np.float64).var(axis=0, ddof=1) for x in batches], axis=0),
                               rtol=RUNNING_STATISTICS_RTOL)
    assert layer.num_batches_tracked == 6


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call forward\\(\\) first"):
        BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_without_running_statistics_eval_uses_the_batch():
    layer = BatchNorm(3, track_running_stats=False, mode="spatial").eval()
    x = _batches((6, 3, 2, 2), 1)[0]
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=NORMALIZED_MEAN_ATOL)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()
    assert layer.backward(np.ones_like(x)).shape == x.shape


def test_not_affine_keeps_gamma_one_and_has_no_gradients():
    layer = BatchNorm(3, affine=False, mode="spatial")
    x = _batches((6, 3, 2, 2), 1)[0]
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_gamma is None and "weight" not in layer.state_dict()
    np.testing.assert_array_equal(layer.gamma, 1.0)


def test_per_activation_feature_shape_and_channels_last():
    layer = BatchNorm((5, 4, 3), mode="per_activation", channel_axis=-1)
    x = _batches((7, 5, 4, 3), 1)[0]
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=NORMALIZED_MEAN_ATOL)
    assert layer.running_mean.shape == (5, 4, 3)


def test_auto_mode_follows_the_policy_per_call():
    layer = BatchNorm(4, channel_axis=-1)
    x = _batches((6, 3, 3, 4), 1)[0]
    layer(x)
    assert layer._kept[1].mode is Mode.SPATIAL_PERSISTENT
    assert layer.backward(np.ones_like(x)).shape == x.shape


def test_state_dict_round_trip_and_torch_names():
    layer = BatchNorm(3)
    for x in _batches((8, 3, 2, 2), 3):
        layer(x)
    state = layer.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert state["num_batches_tracked"].dtype == np.int64 and int(state["num_batches_tracked"]) == 3
    other = BatchNorm(3)
    other.load_state_dict(state)
    for name, value in other.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
    state["running_mean"][0] = 123.0  # a copy: the layer is not changed through it
    assert layer.running_mean[0] != 123.0


def test_load_state_dict_checks_keys_and_shapes():
    layer = BatchNorm(3)
    state = layer.state_dict()
    with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
        layer.load_state_dict({k: v for k, v in state.items() if k != "bias"})
    with pytest.raises(ValueError, match="expected shape \\(3,\\), got \\(4,\\)"):
        layer.load_state_dict({**state, "weight": np.ones(4, np.float32)})


@pytest.mark.parametrize("kwargs,error",
                         [(dict(momentum=2.0), ValueError), (dict(eps=-1.0), ValueError),
                          (dict(mode="bogus"), ValueError)])
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        BatchNorm(3, **kwargs)


# torch's own order of float32 operations, against float64 arithmetic rounded once to float32
TORCH_FLOAT32_RTOL = TORCH_FLOAT32_ATOL = 1e-5


def test_weights_move_to_and_from_torch():
    torch = pytest.importorskip("torch")
    layer = BatchNorm(3, mode="spatial")
    for x in _batches((8, 3, 4, 4), 3):
        layer(x)
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict({name: torch.from_numpy(value) for name, value in layer.state_dict().items()})
    module.eval()
    layer.eval()
    x = _batches((4, 3, 4, 4), 1, seed=9)[0]
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), layer(x), rtol=TORCH_FLOAT32_RTOL,
                               atol=TORCH_FLOAT32_ATOL)
    trained = torch.nn.BatchNorm2d(3)
    trained(torch.from_numpy(_batches((8, 3, 4, 4), 1)[0]))
    back = BatchNorm(3)
    back.load_state_dict(trained.state_dict())
    np.testing.assert_allclose(back.running_var, trained.running_var.numpy(), rtol=FLOAT32_ROUNDING)


# ---- issue 9 B and issue 11: a layer that refuses bad input without changing, and torch's habits ----



@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


def _host(array):
    """A host copy: synchronized for a simulated device array, whose kernels run when read."""
    return array.get() if isinstance(array, FakeArray) else np.array(array, copy=True)


def _layer_state(layer):
    """Everything a forward could change, as host copies."""
    state = dict(gamma=layer.gamma, beta=layer.beta, running_mean=layer.running_mean, running_var=layer.running_var)
    arrays = {name: None if value is None else _host(value) for name, value in state.items()}
    return arrays, layer.num_batches_tracked, layer._kept


def _assert_same_state(layer, before):
    arrays, count, kept = before
    for name, value in arrays.items():
        current = getattr(layer, name)
        if value is None:
            assert current is None
        else:
            assert current.dtype == value.dtype and np.array_equal(_host(current), value, equal_nan=True), name
    assert layer.num_batches_tracked == count
    assert layer._kept is kept


def _rejected_inputs(place, other_place):
    """(label, x, error, message) for a BatchNorm(4) in float32, channels first."""
    good = _batches((6, 4, 3, 3), 1, seed=5)[0]
    return [
        ("None", None, TypeError, "x: expected"),
        ("a list", good.tolist(), TypeError, "x: expected"),
        ("1-D", place(good[0, 0, 0]), ValueError, "x: expected 2 to 5 dims"),
        ("6-D", place(good.reshape(6, 4, 3, 3, 1, 1)), ValueError, "x: expected 2 to 5 dims"),
        ("5 channels", place(np.ones((6, 5, 3, 3), np.float32)), ValueError,
         "x: expected 4 channels at axis 1 (BatchNorm(4)), got 5"),
        ("channels last", place(np.ones((6, 3, 3, 4), np.float32)), ValueError,
         "x: expected 4 channels at axis 1 (BatchNorm(4)), got 3"),
        ("int32", place(good.astype(np.int32)), TypeError,
         "x: expected dtype float32 (BatchNorm(4), dtype=float32), got int32"),
        ("complex", place(good.astype(np.complex64)), TypeError, "x: expected dtype float32"),
        ("float64", place(good.astype(np.float64)), TypeError,
         "x: expected dtype float32 (BatchNorm(4), dtype=float32), got float64"),
        ("float16", place(good.astype(np.float16)), TypeError, "x: expected dtype float32"),
        ("one value per statistic", place(good[:1, :, :1, :1]), ValueError,
         "x: training needs at least 2 values per statistic"),
        ("an empty batch", place(good[:0]), ValueError, "x: expected every dimension to be at least 1"),
        ("the other array library", other_place(good), TypeError, "x: expected a"),
    ]


def _masked(good):
    return np.ma.masked_less(good, 0.0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rejected_input_changes_nothing_and_counts_no_batch_on_numpy(momentum):
    layer = BatchNorm(4, momentum=momentum, mode="spatial")
    clean = BatchNorm(4, momentum=momentum, mode="spatial")
    batches = _batches((6, 4, 3, 3), 3, seed=2)
    layer(batches[0])
    clean(batches[0])
    cases = _rejected_inputs(lambda a: a, lambda a: np.array(a, copy=True).view(FakeArray))
    cases.append(("masked", _masked(batches[0]), TypeError,
                  "x: expected a plain numpy.ndarray, got a numpy masked array"))
    for label, x, error, message in cases:
        before = _layer_state(layer)
        with pytest.raises(error, match=_escaped(message)):
            layer(x)
        _assert_same_state(layer, before)
        if label != "one value per statistic":  # inference takes a single sample
            layer.eval()
            with pytest.raises((TypeError, ValueError), match="^x: "):
                layer(x)
            layer.train()
        _assert_same_state(layer, before)
    for x in batches[1:]:
        layer(x)
        clean(x)
    assert layer.num_batches_tracked == clean.num_batches_tracked == 3
    np.testing.assert_array_equal(layer.running_mean, clean.running_mean)
    np.testing.assert_array_equal(layer.running_var, clean.running_var)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rejected_input_changes_nothing_and_counts_no_batch_on_the_simulated_gpu(gpu, momentum):
    import cupy  # the simulated one

    layer = BatchNorm(4, momentum=momentum, mode="spatial", xp=cupy)
    clean = BatchNorm(4, momentum=momentum, mode="spatial", xp=cupy)
    batches = [np.array(b).view(FakeArray) for b in _batches((6, 4, 3, 3), 3, seed=2)]
    layer(batches[0])
    clean(batches[0])
    for label, x, error, message in _rejected_inputs(lambda a: np.array(a, copy=True).view(FakeArray),
                                                     lambda a: np.array(a, copy=True)):
        before = _layer_state(layer)
        with pytest.raises(error, match=_escaped(message)):
            layer(x)
        _assert_same_state(layer, before)
    for x in batches[1:]:
        layer(x)
        clean(x)
    assert layer.num_batches_tracked == clean.num_batches_tracked == 3
    assert isinstance(layer.running_mean, FakeArray)
    np.testing.assert_array_equal(_host(layer.running_mean), _host(clean.running_mean))
    np.testing.assert_array_equal(_host(layer.running_var), _host(clean.running_var))


def _escaped(text):
    import re

    return re.escape(text)


def test_a_failed_backward_keeps_the_gradients():
    layer = BatchNorm(3, mode="spatial")
    x = _batches((6, 3, 2, 2), 1)[0]
    layer(x)
    layer.backward(np.ones_like(x))
    grads = (layer.grad_gamma.copy(), layer.grad_beta.copy())
    with pytest.raises(ValueError, match=r"dy: expected x's shape \(6, 3, 2, 2\)"):
        layer.backward(np.ones((6, 3, 2), np.float32))
    with pytest.raises(TypeError, match="dy: expected"):
        layer.backward(None)
    np.testing.assert_array_equal(layer.grad_gamma, grads[0])
    np.testing.assert_array_equal(layer.grad_beta, grads[1])


def test_per_activation_layer_names_its_feature_shape():
    layer = BatchNorm((5, 4), mode="per_activation")
    with pytest.raises(ValueError,
                       match=_escaped("x: expected feature shape (5, 4) after the batch axis "
                                      "(BatchNorm((5, 4)), mode PER_ACTIVATION), got (5, 3)")):
        layer(np.ones((6, 5, 3), np.float32))
    assert layer.num_batches_tracked == 0


def test_the_layer_dtype_is_enforced():
    layer = BatchNorm(4, dtype=np.float64, mode="spatial")
    x = _batches((6, 4, 3, 3), 1)[0]
    with pytest.raises(TypeError,
                       match=_escaped("x: expected dtype float64 (BatchNorm(4), dtype=float64), "
                                      "got float32; convert x, or build the layer with dtype=float32")):
        layer(x)
    y = layer(x.astype(np.float64))
    assert y.dtype == np.float64 and layer.gamma.dtype == np.float64 and layer.running_mean.dtype == np.float64
    half = BatchNorm(4, dtype=np.float16, mode="spatial")
    assert half(x.astype(np.float16)).dtype == np.float16 and half.gamma.dtype == np.float32


# y's std is gamma * sqrt(var / (var + eps)), 2 * (1 - 6e-7) below: this bound only tells the scale
# applied (2.0) from another
APPLIED_SCALE_RTOL = 1e-3


def test_weight_and_bias_are_gamma_and_beta():
    layer = BatchNorm(3, mode="spatial")
    assert layer.weight is layer.gamma and layer.bias is layer.beta
    layer.weight = np.full(3, 2.0, np.float32)
    layer.bias = np.full(3, 0.5, np.float32)
    np.testing.assert_array_equal(layer.gamma, 2.0)
    np.testing.assert_array_equal(layer.beta, 0.5)
    y = layer(_batches((8, 3, 2, 2), 1)[0])
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.5, atol=NORMALIZED_MEAN_ATOL)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 2.0, rtol=APPLIED_SCALE_RTOL)
    for value, error, message in [
        (np.ones(4, np.float32), ValueError, "weight: expected shape (3,), got (4,)"),
        (np.ones(3, np.float64), TypeError,
         "weight: expected dtype float32 (BatchNorm(3)'s parameter dtype), got float64"),
        ([1.0, 1.0, 1.0], TypeError, "weight: expected a numpy.ndarray"),
        (None, TypeError, "weight: expected"),
    ]:
        with pytest.raises(error, match=_escaped(message)):
            layer.weight = value
    with pytest.raises(ValueError, match=_escaped("gamma: expected shape (3,), got (2,)")):
        layer.gamma = np.ones(2, np.float32)
    np.testing.assert_array_equal(layer.weight, 2.0)


# ---- load_state_dict: validated and converted first, then assigned ----

def _trained_state():
    layer = BatchNorm(3, mode="spatial")
    for x in _batches((8, 3, 2, 2), 2):
        layer(x)
    return layer.state_dict()


BAD_STATES = [
    ("strings", dict(running_var=np.array(["a", "b", "c"])), TypeError,
     "state['running_var']: expected real numbers (a float or integer array), got dtype <U1"),
    ("numeric strings", dict(weight=np.array(["1", "2", "3"])), TypeError, "state['weight']: expected real numbers"),
    ("complex", dict(running_mean=np.ones(3, np.complex64)), TypeError,
     "state['running_mean']: expected real numbers (a float or integer array), got dtype complex64"),
    ("bool", dict(bias=np.ones(3, bool)), TypeError, "state['bias']: expected real numbers"),
    ("None", dict(running_var=None), TypeError, "state['running_var']: expected an array, got None"),
    ("objects", dict(weight=np.array([1.0, None, 2.0], dtype=object)), TypeError,
     "state['weight']: expected real numbers"),
    ("a masked array", dict(weight=np.ma.ones(3)), TypeError,
     "state['weight']: expected a plain array, got a numpy masked array"),
    ("shape", dict(running_var=np.ones(4)), ValueError, "state['running_var']: expected shape (3,), got (4,)"),
    ("past float32", dict(running_var=np.array([1.0, 1e300, 1.0])), ValueError,
     "state['running_var']: expected values that fit float32"),
    ("count of two", dict(num_batches_tracked=np.array([1, 2])), ValueError,
     "state['num_batches_tracked']: expected a non-negative integer scalar, got shape (2,)"),
    ("count negative", dict(num_batches_tracked=-1), ValueError,
     "state['num_batches_tracked']: expected a non-negative integer scalar that fits int64, got -1"),
    ("count negative array", dict(num_batches_tracked=np.array(-1)), ValueError, "got -1"),
    ("count past int64", dict(num_batches_tracked=2**63), ValueError, "fits int64"),
    ("count float", dict(num_batches_tracked=np.array(1.5)), TypeError,
     "state['num_batches_tracked']: expected a non-negative integer scalar, got dtype float64"),
    ("count python float", dict(num_batches_tracked=2.0), TypeError,
     "state['num_batches_tracked']: expected a non-negative integer scalar"),
    ("count bool", dict(num_batches_tracked=True), TypeError,
     "state['num_batches_tracked']: expected a non-negative integer scalar, got True"),
    ("count string", dict(num_batches_tracked="3"), TypeError,
     "state['num_batches_tracked']: expected a non-negative integer scalar"),
    ("count None", dict(num_batches_tracked=None), TypeError,
     "state['num_batches_tracked']: expected an array, got None"),
]


@pytest.mark.parametrize("label,change,error,message", BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_load_state_dict_is_atomic(label, change, error, message):
    state = {**_trained_state(), **change}
    layer = BatchNorm(3, mode="spatial")
    layer(_batches((8, 3, 2, 2), 1, seed=7)[0])
    layer.backward(np.ones((8, 3, 2, 2), np.float32))
    before = _layer_state(layer)
    with pytest.raises(error, match=_escaped(message)):
        layer.load_state_dict(state)
    _assert_same_state(layer, before)


def test_load_state_dict_converts_to_the_parameter_dtype():
    state = _trained_state()
    layer = BatchNorm(3)
    layer.load_state_dict({**state, "weight": state["weight"].astype(np.float64), "bias": [0, 1, 2],
                           "num_batches_tracked": np.int32(7)})
    assert layer.gamma.dtype == np.float32 and layer.num_batches_tracked == 7 and type(layer.num_batches_tracked) is int
    np.testing.assert_array_equal(layer.beta, [0.0, 1.0, 2.0])


def test_negative_count_cannot_reach_the_cumulative_average():
    layer = BatchNorm(3, momentum=None, mode="spatial")
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": -1})
    layer.num_batches_tracked = -1  # set by hand
    with pytest.raises(ValueError,
                       match="num_batches_tracked: expected a non-negative integer scalar that fits int64, got -1"):
        layer(_batches((8, 3, 2, 2), 1)[0])
    assert layer.num_batches_tracked == -1


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count,error,message", [
    ("5", TypeError, "expected a non-negative integer scalar, got '5'"),
    (None, TypeError, "expected a non-negative integer scalar, got None"),
    (2.0, TypeError, "expected a non-negative integer scalar, got 2.0"),
    (-1, ValueError, "expected a non-negative integer scalar that fits int64, got -1"),
    (2**63 - 1, ValueError, f"expected a count below {2**63 - 1} .* so that this batch can be counted"),
], ids=["str", "None", "float", "negative", "int64 max"])
def test_a_count_that_cannot_count_this_batch_is_refused_before_any_work(count, error, message, momentum):
    """Whatever the momentum: the count is checked before the batch runs, not incremented after it
    (a batch that ran and then failed to count changed the running statistics)."""
    layer = BatchNorm(3, momentum=momentum, mode="spatial")
    layer.num_batches_tracked = count
    before = _layer_state(layer)
    with pytest.raises(error, match=f"^num_batches_tracked: {message}"):
        layer(_batches((8, 3, 2, 2), 1)[0])
    _assert_same_state(layer, before)


def test_the_last_batch_int64_can_count_runs_and_its_state_saves():
    layer = BatchNorm(3, mode="spatial")
    layer.num_batches_tracked = np.int64(2**63 - 2)
    layer(_batches((8, 3, 2, 2), 1)[0])
    assert layer.num_batches_tracked == 2**63 - 1
    assert int(layer.state_dict()["num_batches_tracked"]) == 2**63 - 1


def _sequential_state():
    """The keys torch's nn.Sequential(Conv2d, BatchNorm2d(3), ReLU, BatchNorm2d(3)) would produce."""
    state = {"0.weight": np.ones((3, 3, 1, 1), np.float32), "0.bias": np.zeros(3, np.float32)}
    for index, seed in (("1", 1), ("3", 2)):
        layer = BatchNorm(3, mode="spatial")
        layer.gamma[...] = seed
        layer(_batches((8, 3, 2, 2), seed, seed=seed)[-1])
        state.update(layer.state_dict(prefix=f"{index}."))
    return state


def test_load_state_dict_with_a_prefix_takes_that_module_only():
    state = _sequential_state()
    assert "1.running_mean" in state and "3.num_batches_tracked" in state
    layer = BatchNorm(3)
    result = layer.load_state_dict(state, prefix="3.")
    assert result == ((), ()) or (result.missing_keys, result.unexpected_keys) == ([], [])
    np.testing.assert_array_equal(layer.gamma, 2.0)
    np.testing.assert_array_equal(layer.running_mean, state["3.running_mean"])
    assert layer.num_batches_tracked == int(state["3.num_batches_tracked"])
    assert set(layer.state_dict(prefix="3.")) == {k for k in state if k.startswith("3.")}


def test_load_state_dict_without_the_prefix_says_which_prefix_to_pass():
    state = _sequential_state()
    layer = BatchNorm(3)
    before = _layer_state(layer)
    with pytest.raises(KeyError,
                       match=_escaped("the state holds this layer's entries under prefix '1.': pass prefix='1.'")):
        layer.load_state_dict(state)
    with pytest.raises(KeyError, match=_escaped("missing keys ['2.bias', '2.num_batches_tracked'")):
        layer.load_state_dict(state, prefix="2.")
    _assert_same_state(layer, before)


def test_load_state_dict_not_strict_reports_what_it_skipped():
    layer = BatchNorm(3)
    state = {"1.weight": np.full(3, 4.0, np.float32), "1.extra": np.ones(3), "0.weight": np.ones(3)}
    result = layer.load_state_dict(state, strict=False, prefix="1.")
    assert result.missing_keys == ["1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert result.unexpected_keys == ["1.extra"]
    np.testing.assert_array_equal(layer.weight, 4.0)
    with pytest.raises(TypeError, match="state: expected a mapping"):
        layer.load_state_dict([("weight", np.ones(3))])
    with pytest.raises(TypeError, match="prefix: expected a str"):
        layer.load_state_dict(layer.state_dict(), prefix=1)


# ---- pickling and construction ----

def test_the_layer_pickles_with_its_state():
    layer = BatchNorm(3, momentum=None, mode="spatial")
    x = _batches((8, 3, 2, 2), 1)[0]
    layer(x)
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.xp is np and restored.num_batches_tracked == 1
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value)
    np.testing.assert_array_equal(restored.backward(np.ones_like(x)), layer.backward(np.ones_like(x)))
    assert "module" not in repr(layer.__getstate__())


def test_the_layer_accepts_the_array_library_by_name():
    assert BatchNorm(3, xp="numpy").xp is np


BAD_CONSTRUCTION = [
    (dict(num_features=3.7), TypeError,
     "num_features: expected a positive int or a tuple of them (the feature shape), got 3.7"),
    (dict(num_features="3"), TypeError,
     "num_features: expected a positive int or a tuple of them (the feature shape), got '3'"),
    (dict(num_features=True), TypeError, "num_features: expected a positive int"),
    (dict(num_features=None), TypeError, "num_features: expected a positive int"),
    (dict(num_features=(3, 2.0), mode="per_activation"), TypeError, "num_features: expected a positive int"),
    (dict(num_features=0), ValueError,
     "num_features: expected a positive int or a tuple of them (the feature shape), got 0"),
    (dict(num_features=()), ValueError, "num_features: expected a positive int"),
    (dict(num_features=(2, 0), mode="per_activation"), ValueError, "num_features: expected a positive int"),
    (dict(num_features=(1, 2, 3, 4, 5), mode="per_activation"), ValueError,
     "num_features: expected at most 4 feature dims"),
    (dict(num_features=2**31), ValueError, "num_features: expected at most 2147483647 features"),
    (dict(num_features=10**400), ValueError, "num_features: expected at most 2147483647 features"),
    (dict(num_features=(4, 3)), ValueError, "num_features: a feature shape (4, 3) is for mode='per_activation'"),
    (dict(num_features=(4, 3), mode="spatial"), ValueError,
     "num_features: a feature shape (4, 3) is for mode='per_activation'"),
    (dict(dtype=np.int32), TypeError, "dtype: expected float16, float32 or float64, got <class 'numpy.int32'>"),
    (dict(dtype="complex64"), TypeError, "dtype: expected float16, float32 or float64, got 'complex64'"),
    (dict(dtype=None), TypeError, "dtype: expected float16, float32 or float64, got None"),
    (dict(dtype="nonsense"), TypeError, "dtype: expected float16, float32 or float64, got 'nonsense'"),
    (dict(channel_axis=7), ValueError, "channel_axis: expected 1 (channels-first) or -1 (channels-last), got 7"),
    (dict(channel_axis=2), ValueError, "channel_axis: expected 1 (channels-first) or -1 (channels-last), got 2"),
    (dict(channel_axis=1.0), TypeError, "channel_axis: expected an int (1 or -1), got 1.0"),
    (dict(channel_axis=None), TypeError, "channel_axis: expected an int"),
    (dict(xp=None), TypeError, "xp: expected the numpy or cupy module (or its name), got None"),
    (dict(xp=pickle), TypeError, "xp: expected the numpy or cupy module (or its name), got <module 'pickle'"),
    (dict(xp="torch"), TypeError, "xp: expected the numpy or cupy module (or its name), got 'torch'"),
    (dict(affine="yes"), TypeError, "affine: expected True or False, got 'yes'"),
    (dict(track_running_stats=None), TypeError, "track_running_stats: expected True or False, got None"),
    (dict(eps=0.0), ValueError, "eps: expected a finite value >= 1.18e-38 (2**-126) in training and backward, got 0.0"),
    (dict(eps=10**400), ValueError, "eps: expected a float >= 1.18e-38, got an integer of 401 digits"),
    (dict(eps="1e-5"), TypeError, "eps: expected a float"),
    (dict(momentum=10**400), ValueError, "momentum: expected a float in [0, 1], got an integer of 401 digits"),
    (dict(momentum="0.1"), TypeError, "momentum: expected a float in [0, 1], got '0.1'"),
    (dict(mode="auto-ish"), ValueError, "mode: expected one of"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CONSTRUCTION, ids=[str(c[0]) for c in BAD_CONSTRUCTION])
def test_constructor_arguments_are_validated(kwargs, error, message):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=_escaped(message)):
        BatchNorm(kwargs.pop("num_features"), **kwargs)


def test_constructor_accepts_numpy_integers_and_bools():
    layer = BatchNorm(np.int64(3), channel_axis=np.int64(-1), affine=np.bool_(False), dtype="float64")
    assert layer.param_shape == (3,) and layer.channel_axis == -1 and type(layer.channel_axis) is int
    assert layer.affine is False and layer.dtype == np.float64
    assert BatchNorm([5, 4], mode="per_activation").param_shape == (5, 4)


def test_layer_on_the_simulated_gpu_validates_its_own_arguments(gpu):
    import cupy  # the simulated one

    layer = BatchNorm(4, mode="spatial", xp="cupy")
    assert layer.xp is cupy and isinstance(layer.gamma, FakeArray)
    with pytest.raises(TypeError,
                       match=_escaped("x: expected a cupy array (BatchNorm(4) keeps its state there), "
                                      "got a numpy array")):
        layer(np.ones((6, 4, 3, 3), np.float32))
    with pytest.raises(TypeError,
                       match=_escaped("weight: expected a cupy array (BatchNorm(4) keeps its state there), "
                                      "got a numpy array")):
        layer.weight = np.ones(4, np.float32)
    state = {**layer.state_dict(), "running_mean": np.arange(4.0)}
    layer.load_state_dict(state)
    assert isinstance(layer.running_mean, FakeArray)
    np.testing.assert_array_equal(_host(layer.running_mean), np.arange(4.0))
    before = _layer_state(layer)
    with pytest.raises(TypeError, match="state\\['running_var'\\]: expected real numbers"):
        layer.load_state_dict({**state, "running_var": np.array(["a", "b", "c", "d"])})
    _assert_same_state(layer, before)


def test_repr_names_dtype_and_array_library():
    assert repr(BatchNorm(3)) == (
        "BatchNorm(3, mode='auto', eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "channel_axis=1, dtype=float32, xp=numpy)"
    )


# ---- refusals with the hints the functions give ----
class _DLPackProducer:
    """Stands in for a tensor of another library (torch is not needed): it exposes DLPack on
    ``device_type`` and is never read."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, stream=None, max_version=None, **_):
        raise AssertionError("the layer must refuse it before reading it")

    def __dlpack_device__(self):
        return (self.device_type, 0)


_DLPackProducer.__module__, _DLPackProducer.__qualname__ = "torch", "Tensor"  # names as torch's would print
_KDL_CPU, _KDL_CUDA = 1, 2


def test_a_host_tensor_of_another_library_is_refused_naming_dlpack_and_the_conversion():
    layer = BatchNorm(8)
    before = _layer_state(layer)
    expected = ("x: expected a numpy array (BatchNorm(8) keeps its state there), got a torch.Tensor on DLPack device "
                "kDLCPU; pass numpy.from_dlpack(x) (a view, no copy)")
    with pytest.raises(TypeError, match=f"^{_escaped(expected)}$"):
        layer(_DLPackProducer(_KDL_CPU))
    with pytest.raises(TypeError,
                       match=_escaped("got a torch.Tensor on DLPack device kDLCPU; pass numpy.from_dlpack(weight)")):
        layer.weight = _DLPackProducer(_KDL_CPU)
    _assert_same_state(layer, before)
    # the functions give the same pointer for the same object
    import cudnn_bn

    with pytest.raises(TypeError,
                       match=_escaped("on DLPack device kDLCPU (for the NumPy reference pass numpy.from_dlpack(...))")):
        cudnn_bn.forward_training(_DLPackProducer(_KDL_CPU), np.ones(8, np.float32), np.zeros(8, np.float32))


def test_a_gpu_tensor_given_to_a_host_layer_says_how_cupy_takes_it():
    with pytest.raises(TypeError,
                       match=_escaped("got a torch.Tensor on DLPack device kDLCUDA; it is on a GPU: copy it to the "
                                                 "host, or use cupy arrays (cupy.from_dlpack(x), a view, no copy)")):
        BatchNorm(8)(_DLPackProducer(_KDL_CUDA))


def test_a_host_tensor_given_to_a_cupy_layer_says_how_to_copy_it_there(gpu):
    layer = BatchNorm(4, xp="cupy")
    with pytest.raises(TypeError, match=_escaped("x: expected a cupy array (BatchNorm(4) keeps its state there), got a "
                                                 "torch.Tensor on DLPack device kDLCPU; pass "
                                                 "cupy.asarray(numpy.from_dlpack(x)) (a copy to the GPU)")):
        layer(_DLPackProducer(_KDL_CPU))


def test_a_cupy_layer_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises, as where it is not installed
    with pytest.raises(ModuleNotFoundError) as raised:
        BatchNorm(8, xp="cupy")
    message = str(raised.value)
    assert message.startswith("xp='cupy': CuPy is not installed (") and raised.value.name == "cupy"
    assert "pip install 'cudnn_bn[cuda12]' or '[cuda13]'" in message and "xp='numpy'" in message
    assert BatchNorm(8, xp="numpy").xp is np  # the way out it names works


def test_a_cupy_layer_on_a_machine_without_a_gpu_says_so():
    """This machine's real CuPy: importable, but without a driver it cannot allocate."""
    import importlib

    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        pytest.skip("CuPy is not installed here")
    from cudnn_bn._cudnn.availability import cupy_device_problem

    problem = cupy_device_problem(cupy)
    if problem is None:
        pytest.skip("CuPy has a device here: nothing is refused")
    with pytest.raises(RuntimeError) as raised:
        BatchNorm(8, xp="cupy")
    assert str(raised.value) == (f"xp='cupy': CuPy cannot allocate the layer's state here: {problem}. "
                                 "A layer with xp='numpy' runs the NumPy reference.")
    assert type(raised.value.__cause__).__module__.startswith("cupy")  # CuPy's own error stays as the cause


def test_an_allocation_failure_on_a_working_device_is_not_relabelled(gpu, monkeypatch):
    import cupy  # the simulated one, which has a device

    def out_of_memory(*args, **kwargs):
        raise MemoryError("out of memory allocating 32 bytes")

    monkeypatch.setattr(cupy, "ones", out_of_memory)
    with pytest.raises(MemoryError, match="^out of memory allocating 32 bytes$"):
        BatchNorm(8, xp="cupy")


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- the activation path ----
# A relu layer on numpy runs the fused reference (equal today); these bounds leave room for another
# order of float32 operations, forward and (summed over the batch) backward, and still catch a
# missing residual or ReLU mask, errors of order one.
FUSED_FORWARD_RTOL, FUSED_FORWARD_ATOL = 1e-5, 1e-6
FUSED_BACKWARD_RTOL, FUSED_BACKWARD_ATOL = 1e-4, 1e-5


def test_a_relu_layer_returns_relu_of_bn_plus_residual_and_its_gradients():
    x, residual, dy = _data((4, 3, 2, 2), 1), _data((4, 3, 2, 2), 2), _data((4, 3, 2, 2), 3)
    layer = BatchNorm(3, activation="relu", mode="spatial")
    assert layer.activation is not None
    y = layer.forward(x, residual)
    expected_y, saved = fused.reference_forward_training(
        x, layer.gamma, layer.beta, residual=residual, activation="relu", mode="spatial", momentum=0.1)
    np.testing.assert_allclose(y, expected_y, rtol=FUSED_FORWARD_RTOL, atol=FUSED_FORWARD_ATOL)
    assert (y == 0).any() and (y >= 0).all()
    dx = layer.backward(dy)
    expected_dx, expected_dres, expected_dgamma, expected_dbeta = fused.reference_backward(
        x, expected_y, dy, layer.gamma, saved)
    np.testing.assert_allclose(dx, expected_dx, rtol=FUSED_BACKWARD_RTOL, atol=FUSED_BACKWARD_ATOL)
    assert layer.grad_residual is not None
    np.testing.assert_allclose(layer.grad_residual, expected_dres, rtol=FUSED_BACKWARD_RTOL, atol=FUSED_BACKWARD_ATOL)
    np.testing.assert_allclose(layer.grad_gamma, expected_dgamma, rtol=FUSED_BACKWARD_RTOL, atol=FUSED_BACKWARD_ATOL)
    # the mask matters: dx differs from plain batch norm's where relu cut
    plain_dx, _, _ = reference.backward(x, dy, layer.gamma, saved.stats)
    assert not np.allclose(dx, plain_dx)


def test_a_relu_layer_in_eval_mode_applies_relu_and_the_residual():
    x, residual = _data((4, 3, 2, 2), 4), _data((4, 3, 2, 2), 5)
    layer = BatchNorm(3, activation="relu", mode="spatial").eval()
    y = layer(x, residual)
    expected = fused.reference_forward_inference(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var,
                                                 residual=residual, activation="relu", mode="spatial")
    np.testing.assert_allclose(y, expected, rtol=FUSED_FORWARD_RTOL, atol=FUSED_FORWARD_ATOL)
    assert (y == 0).any()


def test_the_activation_shows_in_repr_and_survives_pickling():
    layer = BatchNorm(3, activation="relu")
    assert "activation='relu'" in repr(layer)
    assert "activation" not in repr(BatchNorm(3))
    assert pickle.loads(pickle.dumps(layer)).activation == layer.activation


def test_a_layer_pickled_before_activations_existed_loads_and_runs_backward():
    layer = BatchNorm(3, mode="spatial")
    x, dy = _data((4, 3, 2), 6), _data((4, 3, 2), 7)
    layer(x)
    state = layer.__getstate__()
    del state["activation"], state["grad_residual"]
    state["_kept"] = state["_kept"][:2]
    old = BatchNorm.__new__(BatchNorm)
    old.__setstate__(state)
    assert old.activation is None and old.grad_residual is None
    assert type(old._kept) is KeptForBackward and old._kept.y is None and old._kept.group is None
    np.testing.assert_array_equal(old.backward(dy), layer.backward(dy))


def test_a_residual_without_an_activation_is_refused_naming_both():
    layer = BatchNorm(3)
    x = _data((4, 3), 8)
    with pytest.raises(ValueError,
                       match=r"residual: BatchNorm\(3\) has no activation"
                             r".*activation='relu', or add the residual yourself$"):
        layer(x, x)


# ---- eps, channel_axis and counting ----
@pytest.mark.parametrize("dtype, param_dtype",
                         [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)])
def test_a_new_layer_keeps_every_parameter_in_the_parameter_dtype(dtype, param_dtype):
    layer = BatchNorm(3, dtype=dtype)
    for array in (layer.gamma, layer.beta, layer.running_mean, layer.running_var):
        assert array.dtype == param_dtype
    assert layer.state_dict()["bias"].dtype == param_dtype


def test_eps_and_channel_axis_reach_training_and_inference():
    x = _data((4, 2, 3), 9)
    layer = BatchNorm(3, eps=0.5, channel_axis=-1, mode="spatial")
    y = layer(x)
    expected, _ = reference.forward_training(x, layer.gamma, layer.beta, eps=0.5, channel_axis=-1)
    np.testing.assert_allclose(y, expected, rtol=FLOAT32_ROUNDING)
    layer.eval()
    mean, var = np.full(3, 0.25, np.float32), np.full(3, 2.0, np.float32)
    layer.running_mean[...], layer.running_var[...] = mean, var
    y = layer(x)
    expected = reference.forward_inference(x, layer.gamma, layer.beta, mean, var, eps=0.5, channel_axis=-1)
    np.testing.assert_allclose(y, expected, rtol=FLOAT32_ROUNDING)


def test_a_layer_without_running_statistics_counts_no_batch():
    layer = BatchNorm(3, track_running_stats=False)
    layer(_data((4, 3), 10))
    assert layer.num_batches_tracked == 0


# ---- limits at exactly their values ----
def test_four_feature_dims_are_accepted_and_five_refused():
    assert _feature_shape((2, 2, 2, 2)) == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="at most 4 feature dims"):
        _feature_shape((2, 2, 2, 2, 2))


def test_exactly_int32_max_features_are_accepted():
    assert _feature_shape(2**31 - 1) == (2**31 - 1,)


def test_a_count_of_exactly_int64_max_is_accepted():
    assert _batch_count("n", 2**63 - 1) == 2**63 - 1


def test_repr_shows_a_feature_shape_of_two_dims():
    assert repr(BatchNorm((3, 4), mode="per_activation")).startswith("BatchNorm((3, 4), ")


# ---- state values and messages ----
class _FakeTensor:
    """Enough of a torch tensor for the layer: detach, cpu, float, numpy; bfloat16 has no numpy()."""

    def __init__(self, values, dtype):
        self._values, self.dtype = np.asarray(values), dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return _FakeTensor(self._values.astype(np.float32), "torch.float32")

    def numpy(self):
        if self.dtype == "torch.bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self._values

    def __array__(self, *args, **kwargs):
        raise TypeError("a tensor is read through numpy()")


class _FakeDeviceArray:
    """A cupy-like array: its values come to the host through get()."""

    def __init__(self, values):
        self._values = np.asarray(values)

    def get(self):
        return self._values

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion to a NumPy array is not allowed")


def test_torch_like_tensors_load_including_bfloat16_without_rounding_others():
    layer = BatchNorm(2, dtype=np.float64)
    fine = np.array([1 + 2.0**-40, 3.0])
    state = {"weight": _FakeTensor(fine, "torch.float64"), "bias": _FakeTensor([0.5, 1.5], "torch.bfloat16")}
    layer.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(layer.gamma, fine)
    np.testing.assert_array_equal(layer.beta, [0.5, 1.5])


def test_cupy_like_arrays_load_through_get():
    layer = BatchNorm(2)
    layer.load_state_dict({"weight": _FakeDeviceArray(np.array([2.0, 3.0], np.float32))}, strict=False)
    np.testing.assert_array_equal(layer.gamma, [2.0, 3.0])


def test_a_value_past_float32_is_refused_without_a_warning():
    layer = BatchNorm(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="past its range"):
            layer.load_state_dict({"weight": np.array([1e300, 1.0])}, strict=False)


def test_messages_name_the_argument_and_the_type_given():
    layer = BatchNorm(2)
    with pytest.raises(TypeError, match="prefix: expected a str, got 3"):
        layer.state_dict(prefix=3)
    with pytest.raises(TypeError, match="got list"):
        layer.load_state_dict([("weight", 1)])
    with pytest.raises(TypeError, match=r"state\['weight'\]: expected an array of real numbers, got list"):
        layer.load_state_dict({"weight": [[1.0, 2.0], [3.0]]}, strict=False)
    message = r"^BatchNorm\.backward: needs the input and statistics of a forward\(\); call forward\(\) first$"
    with pytest.raises(RuntimeError, match=message):
        layer.backward(np.zeros((2, 2), np.float32))


def test_long_key_lists_show_eight_and_count_the_rest():
    assert _listed([str(i) for i in range(8)]) == str([str(i) for i in range(8)])
    nine = [f"k{i}" for i in range(9)]
    assert _listed(nine) == f"{nine[:8]} and 1 more"
    eleven = [f"k{i:02}" for i in range(11)]
    assert _listed(eleven) == f"{eleven[:8]} and 3 more"


def test_no_prefix_hint_for_a_state_already_under_the_right_prefix():
    expected = ["weight", "bias"]
    assert _prefix_hint({"weight": 1, "bias": 2, "other": 3}, expected, "") == ""
    assert _prefix_hint({"1.weight": 1, "1.bias": 2}, expected, "") == (
        "; the state holds this layer's entries under prefix '1.': pass prefix='1.'"
    )
