"""BatchNorm(activation="relu"): the fused forward and its backward, on numpy and the simulated GPU."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from cudnn_bn import BatchNorm, Mode
from cudnn_bn._core.modes import Activation
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn.fused import PATH_COMPOSED, PATH_FUSED_EX, PATH_REFERENCE, backward, forward_inference, forward_training
from fake_cudnn import simulated_gpu


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(3)]  # x, residual, dy


@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_with_relu_is_the_fused_call(with_residual):
    x, residual, dy = _data((4, 3, 5, 5), np.float32)
    residual = residual if with_residual else None
    layer = BatchNorm(3, mode="spatial", activation="relu")
    assert layer.activation is Activation.RELU
    y = layer(x, residual=residual)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    running = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    y_ref, saved = forward_training(x, gamma, beta, *running, residual=residual, mode="spatial")
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(layer.running_var, running[1])
    assert (y >= 0).all() and layer.num_batches_tracked == 1
    dx = layer.backward(dy)
    dx_ref, dresidual, dgamma, dbeta = backward(x, y_ref, dy, gamma, saved)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(layer.grad_gamma, dgamma)
    np.testing.assert_array_equal(layer.grad_beta, dbeta)
    if with_residual:
        np.testing.assert_array_equal(layer.grad_residual, dresidual)
    else:
        assert layer.grad_residual is None
    layer.eval()
    y_eval = layer(x, residual=residual)
    np.testing.assert_array_equal(y_eval,
                                  forward_inference(x, gamma, beta, *running, residual=residual, mode="spatial"))


def test_layer_without_activation_refuses_a_residual_and_stays_unchanged():
    x, residual, _ = _data((4, 3, 2, 2), np.float32)
    layer = BatchNorm(3)
    with pytest.raises(ValueError, match="residual: BatchNorm\\(3\\) has no activation"):
        layer(x, residual=residual)
    assert layer.num_batches_tracked == 0 and (layer.running_mean == 0).all()
    with pytest.raises(ValueError, match="activation: expected one of"):
        BatchNorm(3, activation="swish")


def test_layer_with_relu_refuses_a_bad_residual_and_stays_unchanged():
    x, residual, _ = _data((4, 3, 2, 2), np.float32)
    layer = BatchNorm(3, activation="relu")
    with pytest.raises(TypeError, match="residual: expected x's dtype float32, got float64"):
        layer(x, residual=residual.astype(np.float64))
    assert layer.num_batches_tracked == 0 and (layer.running_mean == 0).all() and layer._kept is None


def test_layer_with_relu_pickles():
    x, residual, dy = _data((4, 3, 2, 2), np.float64)
    layer = BatchNorm(3, mode="spatial", activation="relu", dtype=np.float64)
    layer(x, residual=residual)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.activation is Activation.RELU
    np.testing.assert_array_equal(copy.backward(dy), layer.backward(dy))
    np.testing.assert_array_equal(copy.grad_residual, layer.grad_residual)


@pytest.mark.parametrize("channels,path", [(8, PATH_FUSED_EX), (6, PATH_COMPOSED)])
def test_layer_with_relu_on_the_simulated_gpu(monkeypatch, cudnn_library, channels, path):
    x, residual, dy = _data((4, 3, 2, channels), np.float16)
    host = BatchNorm(channels, channel_axis=-1, dtype=np.float16, activation="relu")
    y_host = host(x, residual=residual)
    dx_host = host.backward(dy)
    assert host._kept[1].path == PATH_REFERENCE and host._kept[1].mode is Mode.SPATIAL_PERSISTENT
    with simulated_gpu(monkeypatch):
        cupy = sys.modules["cupy"]
        layer = BatchNorm(channels, channel_axis=-1, dtype=np.float16, activation="relu", xp=cupy)
        y = layer(cupy.asarray(x), residual=cupy.asarray(residual))
        assert layer._kept[1].path == path
        dx = layer.backward(cupy.asarray(dy))
        assert_close(y.get(), y_host, np.float16, what="y")
        assert_close(dx.get(), dx_host, np.float16, what="dx")
        assert_close(layer.grad_residual.get(), host.grad_residual, np.float16, what="dresidual")
        assert_close(layer.grad_beta.get(), host.grad_beta, np.float16, what="dbeta", scale=x.size / channels)


def test_repr_shows_the_activation_only_when_there_is_one():
    import cudnn_bn

    assert repr(cudnn_bn.BatchNorm(16, activation="relu")).endswith(", activation='relu')")
    assert "activation" not in repr(cudnn_bn.BatchNorm(16))
