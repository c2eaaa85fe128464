"""Tests that kill the surviving mutants of cudnn_bn/reference.py (docs/testing.md, mutation testing).

Each test pins one behaviour the reference's own tests left open: a block that ends part-way
along the inner axis, forward_inference's default eps, fold_inference's result dtype, and the
messages that refuse CuPy arrays and mode "auto".
"""

import numpy as np
import pytest

from cudnn_bn import reference
from cudnn_bn._core import arrays


def _float64_batch_norm(x, gamma, beta, eps):
    """Spatial NCL batch norm straight from its definition, in float64."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    var = x64.var(axis=(0, 2), keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps) * gamma[None, :, None] + beta[None, :, None]


@pytest.mark.parametrize("shape", [(1, 1, 8193), (1, 2, 8193)])
def test_blocks_that_end_part_way_along_the_inner_axis(shape):
    # 8193 values in a row: one block of 8192 and one of 1, with per-group arrays written out
    x = np.random.default_rng(0).standard_normal(shape) * 3 + 5
    gamma, beta = np.linspace(0.5, 1.5, shape[1]), np.linspace(-1, 1, shape[1])
    y, saved = reference.forward_training(x, gamma, beta, eps=1e-3)
    np.testing.assert_allclose(y, _float64_batch_norm(x, gamma, beta, 1e-3), rtol=1e-12, atol=1e-12)
    y = reference.forward_inference(x, gamma, beta, saved.mean, 1 / saved.inv_std**2 - 1e-3, eps=1e-3)
    np.testing.assert_allclose(y, _float64_batch_norm(x, gamma, beta, 1e-3), rtol=1e-9, atol=1e-9)
    dy = np.random.default_rng(1).standard_normal(shape)
    dx, dgamma, dbeta = reference.backward(x, dy, gamma, saved)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2)), rtol=1e-12)
    x_hat = (x - saved.mean[None, :, None]) * saved.inv_std[None, :, None]
    np.testing.assert_allclose(dgamma, (dy * x_hat).sum(axis=(0, 2)), rtol=1e-10, atol=1e-10)
    assert dx.shape == shape and np.isfinite(dx).all()


def test_forward_inference_defaults_eps_to_1e_minus_5():
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    mean, var = np.zeros(3, np.float32), np.full(3, 1e-3, np.float32)
    np.testing.assert_array_equal(
        reference.forward_inference(x, gamma, beta, mean, var),
        reference.forward_inference(x, gamma, beta, mean, var, eps=1e-5),
    )


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("low, high", [(np.float16, np.float32), (np.float32, np.float64)])
def test_fold_inference_returns_the_widest_dtype_of_its_inputs_at_least_float32(position, low, high):
    arrays = [np.full(3, 0.5, low) for _ in range(4)]
    scale, shift = reference.fold_inference(*arrays)
    assert scale.dtype == shift.dtype == np.promote_types(low, np.float32)
    arrays[position] = arrays[position].astype(high)
    scale, shift = reference.fold_inference(*arrays)
    assert scale.dtype == shift.dtype == high


class _PosingAsCupy(np.ndarray):
    """A NumPy array that the kind check takes for a CuPy one."""


def test_cupy_arrays_are_refused_with_the_references_message(monkeypatch):
    monkeypatch.setitem(arrays._KIND_OF_TYPE, _PosingAsCupy, "cupy")
    device = lambda a: np.asarray(a, np.float32).view(_PosingAsCupy)  # noqa: E731
    x, ones, zeros = device(np.ones((2, 3))), device(np.ones(3)), device(np.zeros(3))
    with pytest.raises(TypeError, match=r"^cudnn_bn\.reference: expected numpy arrays; use cudnn_bn\.forward_training etc\. for cupy arrays$"):
        reference.forward_inference(x, ones, zeros, zeros, ones)


def test_backward_without_saved_statistics_refuses_mode_auto_with_its_message():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"^mode: the reference needs an explicit mode, got 'auto'$"):
        reference.backward(x, x, np.ones(3, np.float32), mode="auto", eps=1e-5)
