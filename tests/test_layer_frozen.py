"""BatchNorm frozen (``frozen=True``, ``freeze()`` / ``unfreeze()``) and the backward after a
forward with the running statistics (eval mode or frozen), on numpy and the simulated GPU; with
torch installed, also against torch's autograd through an eval-mode nn.BatchNorm2d."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT64_ROUNDING
from cudnn_bn import BatchNorm, Mode, fused, reference
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn.layer import FixedStatistics
from fake_cudnn import FakeArray, simulated_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(shape, count, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [((2.0 + 3.0 * rng.standard_normal(shape)).astype(dtype), rng.standard_normal(shape).astype(dtype))
            for _ in range(count)]


def _trained(channels=3, shape=(8, 3, 4, 4), **options):
    """A layer after two training steps: running statistics away from 0 and 1, gamma and beta set."""
    layer = BatchNorm(channels, **options)
    for x, _ in _batches(shape, 2, seed=1, dtype=layer.dtype):
        layer(x)
    layer.gamma[...] = np.linspace(0.5, 2.0, layer.gamma.size).reshape(layer.param_shape)
    layer.beta[...] = np.linspace(-1.0, 1.0, layer.beta.size).reshape(layer.param_shape)
    return layer


def _state(layer):
    return [np.array(a, copy=True) for a in (layer.running_mean, layer.running_var)], layer.num_batches_tracked


@pytest.mark.parametrize("how", ["constructor", "freeze"])
def test_a_frozen_layer_normalizes_with_its_running_statistics_and_never_updates_them(how):
    layer = _trained() if how == "freeze" else BatchNorm(3, frozen=True)
    if how == "freeze":
        assert layer.freeze() is layer
    (mean, var), count = _state(layer)
    assert layer.training and layer.frozen and not layer.parameters_frozen
    for x, dy in _batches((8, 3, 4, 4), 3, seed=2):
        y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_array_equal(y, reference.forward_inference(x, layer.gamma, layer.beta, mean, var))
        expected = reference.backward_inference(x, dy, layer.gamma, mean, var)
        np.testing.assert_array_equal(dx, expected[0])
        np.testing.assert_array_equal(layer.grad_gamma, expected[1])
        np.testing.assert_array_equal(layer.grad_beta, expected[2])
        assert isinstance(layer._kept.saved, FixedStatistics)
    (after_mean, after_var), after_count = _state(layer)
    np.testing.assert_array_equal(after_mean, mean)
    np.testing.assert_array_equal(after_var, var)
    assert after_count == count


def test_frozen_steps_do_not_count_in_the_cumulative_average():
    """momentum=None averages over the batches counted: a frozen step, in train() or eval(), is
    not one, so after unfreeze() the layer is where one that never saw the frozen batches is."""
    batches = [x for x, _ in _batches((8, 3, 4, 4), 5, seed=19)]
    layer, never_frozen = BatchNorm(3, momentum=None), BatchNorm(3, momentum=None)
    for x in batches[:2]:
        layer(x)
        never_frozen(x)
    layer.freeze()
    (mean, var), count = _state(layer)
    for x in batches[2:4]:
        layer(x)
        layer.eval()(x)
        layer.train()
    (after_mean, after_var), after_count = _state(layer)
    np.testing.assert_array_equal(after_mean, mean)
    np.testing.assert_array_equal(after_var, var)
    assert after_count == count == 2
    layer.unfreeze()(batches[4])
    never_frozen(batches[4])
    assert layer.num_batches_tracked == never_frozen.num_batches_tracked == 3
    np.testing.assert_array_equal(layer.running_mean, never_frozen.running_mean)
    np.testing.assert_array_equal(layer.running_var, never_frozen.running_var)


def test_frozen_parameters_give_no_parameter_gradients_and_the_same_dx():
    layer = _trained()
    x, dy = _batches((8, 3, 4, 4), 1, seed=3)[0]
    layer.freeze()
    layer(x)
    dx = layer.backward(dy)
    assert layer.freeze(parameters=True) is layer and layer.parameters_frozen and layer.frozen
    layer(x)
    np.testing.assert_array_equal(layer.backward(dy), dx)
    assert layer.grad_gamma is None and layer.grad_beta is None
    layer.freeze()  # freeze() again: the statistics only
    layer(x)
    layer.backward(dy)
    assert not layer.parameters_frozen and layer.grad_gamma is not None


def test_unfreeze_trains_again_and_train_does_not_unfreeze():
    layer = _trained().freeze(parameters=True)
    layer.eval().train()
    assert layer.frozen and layer.parameters_frozen  # a flag that survives .train(), unlike torch's eval()
    (mean, _), count = _state(layer)
    assert layer.unfreeze() is layer and not layer.frozen and not layer.parameters_frozen
    x, dy = _batches((8, 3, 4, 4), 1, seed=4)[0]
    layer(x)
    layer.backward(dy)
    assert layer.num_batches_tracked == count + 1 and not np.array_equal(layer.running_mean, mean)
    assert layer.grad_gamma is not None


def test_freezing_between_forward_and_backward_keeps_the_gradient_of_what_ran():
    layer = _trained()
    x, dy = _batches((8, 3, 4, 4), 1, seed=5)[0]
    layer(x)  # a training forward: batch statistics
    saved = layer._kept.saved
    layer.freeze()
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dx, reference.backward(x, dy, layer.gamma, saved)[0])


def test_frozen_without_running_statistics_is_refused_and_without_affine_parameters_allowed():
    message = ("{}: a layer with track_running_stats=False has no running statistics to freeze (it normalizes with "
               "each batch's own), got {}; build it with track_running_stats=True")
    with pytest.raises(ValueError) as raised:
        BatchNorm(3, track_running_stats=False, frozen=True)
    assert str(raised.value) == message.format("frozen", "frozen=True")
    layer = BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError) as raised:
        layer.freeze()
    assert str(raised.value) == message.format("BatchNorm(3).freeze", "freeze()")
    assert not layer.frozen
    for bad, error in (("yes", "frozen: expected True or False, got 'yes'"),):
        with pytest.raises(TypeError, match=error):
            BatchNorm(3, frozen=bad)
    with pytest.raises(TypeError, match="parameters: expected True or False, got 1"):
        BatchNorm(3).freeze(parameters=1)
    plain = BatchNorm(3, affine=False).freeze(parameters=True)
    x, dy = _batches((4, 3, 2, 2), 1, seed=6)[0]
    plain(x)
    dx = plain.backward(dy)
    assert plain.grad_gamma is None and plain.grad_beta is None and dx.shape == x.shape


def test_eval_mode_backward_runs_through_the_running_statistics():
    layer = _trained(activation=None)
    layer.eval()
    x, dy = _batches((8, 3, 4, 4), 1, seed=7)[0]
    layer(x)
    dx = layer.backward(dy)
    expected = reference.backward_inference(x, dy, layer.gamma, layer.running_mean, layer.running_var)
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(layer.grad_gamma, expected[1])
    assert layer.num_batches_tracked == 2


@pytest.mark.parametrize("with_residual", [True, False])
def test_a_frozen_relu_layer_runs_the_fused_backward_through_fixed_statistics(with_residual):
    layer = _trained(activation="relu", channel_axis=-1, shape=(8, 4, 4, 3)).freeze()
    x, dy = _batches((8, 4, 4, 3), 1, seed=8)[0]
    residual = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32) if with_residual else None
    y = layer(x, residual)
    dx = layer.backward(dy)
    stats = (layer.gamma, layer.beta, layer.running_mean, layer.running_var)
    np.testing.assert_array_equal(y, fused.forward_inference(x, *stats, residual=residual, channel_axis=-1))
    expected = fused.backward_inference(x, y, dy, layer.gamma, *stats[2:], channel_axis=-1)
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(layer.grad_beta, expected[3])
    if with_residual:
        np.testing.assert_array_equal(layer.grad_residual, expected[1])
    else:
        assert layer.grad_residual is None


def test_the_frozen_state_is_not_in_state_dict_and_pickle_keeps_it():
    layer = _trained().freeze(parameters=True)
    assert sorted(layer.state_dict()) == sorted(BatchNorm(3).state_dict())
    other = BatchNorm(3)
    other.load_state_dict(layer.state_dict())
    assert not other.frozen  # loading a state changes no frozen state, either way
    layer.load_state_dict(BatchNorm(3).state_dict())
    assert layer.frozen and layer.parameters_frozen
    x, dy = _batches((8, 3, 4, 4), 1, seed=10)[0]
    layer(x)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.frozen and copy.parameters_frozen
    np.testing.assert_array_equal(copy.backward(dy), layer.backward(dy))
    assert copy.grad_gamma is None
    copy(x)
    assert copy.num_batches_tracked == layer.num_batches_tracked


def test_layers_pickled_before_freezing_existed_load_unfrozen():
    with open(os.path.join(ROOT, "tests", "fixtures", "layers_with_kept_tuples.pickle"), "rb") as file:
        stored = pickle.load(file)
    for name in ("plain", "relu"):
        old = stored[name]
        assert not old.frozen and not old.parameters_frozen
        assert old.freeze().frozen


def test_repr_shows_the_frozen_state():
    assert repr(BatchNorm(4, frozen=True)).endswith(", xp=numpy, frozen=True)")
    assert repr(BatchNorm(4).freeze(parameters=True)).endswith(", xp=numpy).freeze(parameters=True)")
    assert "frozen" not in repr(BatchNorm(4)) and "freeze" not in repr(BatchNorm(4).freeze().unfreeze())


def test_a_refused_input_leaves_a_frozen_layer_as_it_was():
    layer = _trained().freeze()
    x, dy = _batches((8, 3, 4, 4), 1, seed=11)[0]
    layer(x)
    layer.backward(dy)
    kept, grads = layer._kept, (layer.grad_gamma.copy(), layer.grad_beta.copy())
    with pytest.raises(ValueError, match="^x: expected 3 channels"):
        layer(x[:, :2])
    with pytest.raises(ValueError, match=r"^dy: expected x's shape"):
        layer.backward(dy[:2])
    assert layer._kept is kept
    np.testing.assert_array_equal(layer.grad_gamma, grads[0])
    np.testing.assert_array_equal(layer.grad_beta, grads[1])


def test_backward_without_a_forward_is_still_refused():
    with pytest.raises(RuntimeError, match=r"^BatchNorm\.backward: needs the input and statistics of a forward\(\)"):
        BatchNorm(3, frozen=True).backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_a_frozen_layer_on_the_simulated_gpu_matches_the_numpy_layer(monkeypatch, cudnn_library, dtype):
    host = _trained(channel_axis=-1, shape=(8, 4, 4, 3), dtype=dtype).freeze()
    steps = _batches((8, 4, 4, 3), 2, seed=12, dtype=dtype)
    expected = [(host(x), host.backward(dy), host.grad_gamma, host.grad_beta) for x, dy in steps]
    with simulated_gpu(monkeypatch) as simulator:
        cupy = sys.modules["cupy"]
        layer = BatchNorm(3, channel_axis=-1, dtype=dtype, xp=cupy, frozen=True)
        layer.load_state_dict(host.state_dict())
        for (x, dy), (y_host, dx_host, dgamma_host, dbeta_host) in zip(steps, expected):
            y = layer(cupy.asarray(x))
            dx = layer.backward(cupy.asarray(dy))
            assert isinstance(dx, FakeArray) and isinstance(layer.grad_gamma, FakeArray)
            assert_close(y, y_host, dtype, what="y")
            assert_close(dx, dx_host, dtype, what="dx")
            assert_close(layer.grad_gamma, dgamma_host, dtype, what="grad_gamma", scale=128)
            assert_close(layer.grad_beta, dbeta_host, dtype, what="grad_beta", scale=128)
        assert layer.num_batches_tracked == host.num_batches_tracked == 2
        np.testing.assert_array_equal(layer.running_var.get(), host.running_var)
        assert "cudnnBatchNormalizationForwardTraining" not in simulator.calls
        assert simulator.calls.count("cudnnBatchNormalizationForwardInference") == 2


# torch's autograd in float64: the same formulas in another order. dx is a product per element (a
# tenth of the absolute allowance); grad_gamma sums dy * x_hat over 128 values, whose terms cancel
# (ten times the relative one).
TORCH_DX_ATOL = FLOAT64_ROUNDING / 10
TORCH_DGAMMA_RTOL = 10 * FLOAT64_ROUNDING


def test_a_frozen_layer_matches_torch_autograd_through_an_eval_mode_batch_norm():
    torch = pytest.importorskip("torch")
    layer = _trained(dtype=np.float64).freeze()
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    module.load_state_dict({name: torch.from_numpy(value) for name, value in layer.state_dict().items()})
    module.eval()
    for x, dy in _batches((8, 3, 4, 4), 3, seed=13, dtype=np.float64):
        xt = torch.tensor(x, requires_grad=True)
        module.zero_grad()
        module(xt).backward(torch.from_numpy(dy))
        y, dx = layer(x), layer.backward(dy)
        expected_y = module(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(y, expected_y, rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=FLOAT64_ROUNDING, atol=TORCH_DX_ATOL)
        np.testing.assert_allclose(layer.grad_gamma, module.weight.grad.numpy(), rtol=TORCH_DGAMMA_RTOL,
                                   atol=FLOAT64_ROUNDING)
        np.testing.assert_allclose(layer.grad_beta, module.bias.grad.numpy(), rtol=FLOAT64_ROUNDING,
                                   atol=FLOAT64_ROUNDING)
    # the running statistics stayed where the state left them, on both sides
    np.testing.assert_array_equal(layer.running_mean, module.running_mean.numpy())
    assert int(layer.state_dict()["num_batches_tracked"]) == int(module.num_batches_tracked) == 2


def test_a_frozen_relu_layer_with_a_residual_matches_torch_relu_of_eval_batch_norm_plus_residual():
    """Step by step against torch's autograd through relu(bn(x) + z) with an eval-mode
    nn.BatchNorm2d whose weight and bias require gradients; the state goes from torch (trained
    a step, so its statistics are its own) to the frozen channels-last layer."""
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    module(torch.from_numpy(_batches((8, 3, 4, 4), 1, seed=16, dtype=np.float64)[0][0]))  # a training step
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        module.bias.copy_(torch.tensor([-1.0, 0.25, 1.0]))
    module.eval()
    layer = BatchNorm(3, dtype=np.float64, activation="relu", channel_axis=-1, frozen=True)
    layer.load_state_dict(module.state_dict())
    rng = np.random.default_rng(17)
    to_torch = lambda a: torch.tensor(np.ascontiguousarray(np.moveaxis(a, -1, 1)), requires_grad=True)  # noqa: E731
    to_numpy = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)  # noqa: E731
    for x, dy in _batches((8, 4, 4, 3), 3, seed=18, dtype=np.float64):
        residual = rng.standard_normal(x.shape)
        xt, zt = to_torch(x), to_torch(residual)
        module.zero_grad()
        out = torch.relu(module(xt) + zt)
        out.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(dy, -1, 1))))
        y, dx = layer(x, residual), layer.backward(dy)
        assert 0 < (y > 0).mean() < 1  # the mask matters
        np.testing.assert_allclose(y, to_numpy(out), rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)
        np.testing.assert_allclose(dx, to_numpy(xt.grad), rtol=FLOAT64_ROUNDING, atol=TORCH_DX_ATOL)
        np.testing.assert_array_equal(layer.grad_residual, to_numpy(zt.grad))
        np.testing.assert_allclose(layer.grad_gamma, module.weight.grad.numpy(), rtol=TORCH_DGAMMA_RTOL,
                                   atol=FLOAT64_ROUNDING)
        np.testing.assert_allclose(layer.grad_beta, module.bias.grad.numpy(), rtol=TORCH_DGAMMA_RTOL,
                                   atol=FLOAT64_ROUNDING)
    np.testing.assert_array_equal(layer.running_var, module.running_var.numpy())
    assert layer.num_batches_tracked == int(module.num_batches_tracked) == 1


def test_the_modes_resolved_at_forward_are_what_backward_runs_with():
    layer = BatchNorm((3, 2), mode="per_activation", frozen=True)
    x, dy = _batches((5, 3, 2), 1, seed=14)[0]
    layer(x)
    layer.mode = "spatial"  # a change after forward does not change what backward computes
    assert layer._kept.saved.mode is Mode.PER_ACTIVATION
    expected = cudnn_bn.backward_inference(x, dy, layer.gamma, layer.running_mean, layer.running_var,
                                           mode="per_activation")
    np.testing.assert_array_equal(layer.backward(dy), expected[0])


@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_frozen_layer_step_on_the_simulated_gpu_never_waits_for_the_device(fresh_simulated_gpu, activation):
    """forward (cuDNN's inference call) and backward (the CuPy kernels) of a frozen layer, inside
    a stream capture, where any wait of the host would raise."""
    cupy = sys.modules["cupy"]
    layer = BatchNorm(3, channel_axis=-1, xp=cupy, activation=activation, frozen=True)
    x, dy = (cupy.asarray(a) for a in _batches((8, 4, 4, 3), 1, seed=15)[0])
    before = fresh_simulated_gpu.host_syncs
    with fresh_simulated_gpu.capturing():
        for _ in range(2):
            layer(x, x[::-1].copy() if activation else None)
            dx = layer.backward(dy)
    assert fresh_simulated_gpu.host_syncs == before and dx.shape == x.shape
