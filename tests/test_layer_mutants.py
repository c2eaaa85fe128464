"""Tests that kill the surviving mutants of cudnn_bn/layer.py (docs/testing.md, mutation testing).

Each test pins one behaviour the layer's own tests left open: the fused activation path through
the layer, eps and channel_axis reaching both forward calls, counting only batches that train,
the limits at exactly their values, torch-like and cupy-like state values, and the messages.
"""

import pickle
import warnings

import numpy as np
import pytest

from cudnn_bn import fused, reference
from cudnn_bn.layer import BatchNorm, KeptForBackward, _batch_count, _feature_shape, _listed, _prefix_hint


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- the activation path ----

def test_a_relu_layer_returns_relu_of_bn_plus_residual_and_its_gradients():
    x, residual, dy = _data((4, 3, 2, 2), 1), _data((4, 3, 2, 2), 2), _data((4, 3, 2, 2), 3)
    layer = BatchNorm(3, activation="relu", mode="spatial")
    assert layer.activation is not None
    y = layer.forward(x, residual)
    expected_y, saved = fused.reference_forward_training(
        x, layer.gamma, layer.beta, residual=residual, activation="relu", mode="spatial", momentum=0.1)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)
    assert (y == 0).any() and (y >= 0).all()
    dx = layer.backward(dy)
    expected_dx, expected_dres, expected_dgamma, expected_dbeta = fused.reference_backward(
        x, expected_y, dy, layer.gamma, saved)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
    assert layer.grad_residual is not None
    np.testing.assert_allclose(layer.grad_residual, expected_dres, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.grad_gamma, expected_dgamma, rtol=1e-4, atol=1e-5)
    # the mask matters: dx differs from plain batch norm's where relu cut
    plain_dx, _, _ = reference.backward(x, dy, layer.gamma, saved.stats)
    assert not np.allclose(dx, plain_dx)


def test_a_relu_layer_in_eval_mode_applies_relu_and_the_residual():
    x, residual = _data((4, 3, 2, 2), 4), _data((4, 3, 2, 2), 5)
    layer = BatchNorm(3, activation="relu", mode="spatial").eval()
    y = layer(x, residual)
    expected = fused.reference_forward_inference(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var,
                                                 residual=residual, activation="relu", mode="spatial")
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
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
    with pytest.raises(ValueError, match=r"residual: BatchNorm\(3\) has no activation.*activation='relu', or add the residual yourself$"):
        layer(x, x)


# ---- eps, channel_axis and counting ----

@pytest.mark.parametrize("dtype, param_dtype", [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)])
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
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    layer.eval()
    mean, var = np.full(3, 0.25, np.float32), np.full(3, 2.0, np.float32)
    layer.running_mean[...], layer.running_var[...] = mean, var
    y = layer(x)
    expected = reference.forward_inference(x, layer.gamma, layer.beta, mean, var, eps=0.5, channel_axis=-1)
    np.testing.assert_allclose(y, expected, rtol=1e-6)


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
    layer.load_state_dict({"weight": _FakeTensor(fine, "torch.float64"), "bias": _FakeTensor([0.5, 1.5], "torch.bfloat16")}, strict=False)
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
    assert _prefix_hint({"1.weight": 1, "1.bias": 2}, expected, "") == "; the state holds this layer's entries under prefix '1.': pass prefix='1.'"
