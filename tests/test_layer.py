"""BatchNorm layer on the NumPy side (the cupy side is the same code over cuDNN)."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn import BatchNorm, Mode, reference


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
    np.testing.assert_allclose(layer.running_mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.running_var, expected_var, rtol=1e-5)
    layer.eval()
    y = layer(batches[0])
    np.testing.assert_allclose(y, reference.forward_inference(batches[0], layer.gamma, layer.beta, layer.running_mean, layer.running_var), rtol=1e-6)
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones_like(batches[0]))


def test_momentum_none_is_the_cumulative_average():
    layer = BatchNorm(2, momentum=None, mode="per_activation")
    batches = _batches((10, 2), 6, seed=3)
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([x.astype(np.float64).mean(axis=0) for x in batches], axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var, np.mean([x.astype(np.float64).var(axis=0, ddof=1) for x in batches], axis=0), rtol=1e-5)
    assert layer.num_batches_tracked == 6


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call forward\\(\\) first"):
        BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_without_running_statistics_eval_uses_the_batch():
    layer = BatchNorm(3, track_running_stats=False, mode="spatial").eval()
    x = _batches((6, 3, 2, 2), 1)[0]
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
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
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
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


@pytest.mark.parametrize("kwargs,error", [(dict(momentum=2.0), ValueError), (dict(eps=-1.0), ValueError), (dict(mode="bogus"), ValueError)])
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        BatchNorm(3, **kwargs)


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
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), layer(x), rtol=1e-5, atol=1e-5)
    trained = torch.nn.BatchNorm2d(3)
    trained(torch.from_numpy(_batches((8, 3, 4, 4), 1)[0]))
    back = BatchNorm(3)
    back.load_state_dict(trained.state_dict())
    np.testing.assert_allclose(back.running_var, trained.running_var.numpy(), rtol=1e-6)
