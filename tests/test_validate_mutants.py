"""The checks of cudnn_bn/_core/validate.py called directly, where the public functions reach them
only after the public layer has already refused the same input (docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core import arrays, validate
from cudnn_bn._core.modes import Mode

NAMES = ["x", "gamma", "beta", "mean", "var"]


def _inference_args():
    return [np.ones((4, 3, 2, 2)), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]


def _check(args):
    return validate.check_forward_inference(*args, mode=Mode.SPATIAL, eps=0.0, channel_axis=1)


def test_inference_accepts_eps_zero():
    assert _check(_inference_args()).layout.shape == (4, 3, 2, 2)


@pytest.mark.parametrize("position", range(5), ids=NAMES)
def test_inference_refuses_a_non_array_naming_it(position):
    args = _inference_args()
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"\b{NAMES[position]}\b"):
        _check(args)


@pytest.mark.parametrize("position", range(1, 5), ids=NAMES[1:])
def test_inference_refuses_a_parameter_of_the_wrong_shape_naming_it(position):
    args = _inference_args()
    args[position] = np.ones(4)
    with pytest.raises(ValueError, match=rf"^{NAMES[position]}: "):
        _check(args)


# ---- backward ----
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
    import dataclasses

    import cudnn_bn

    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    _, saved = cudnn_bn.forward_training(x, np.ones(3), np.zeros(3), mode="spatial")
    bad = dataclasses.replace(saved, reserve_space=np.zeros((2, 2), np.uint8))
    with pytest.raises((TypeError, ValueError), match=r"^saved\.reserve_space: expected None or the non-empty 1-D contiguous uint8 buffer that "):
        cudnn_bn.backward(x, np.ones_like(x), np.ones(3), bad)


class _OtherArray(np.ndarray):
    """A NumPy subclass: accepted by array_kind, but another type than np.ndarray."""


def test_uniform_kind_tells_the_kind_only_when_every_given_array_has_one_known_type():
    plain, other = np.ones(3), np.ones(3).view(_OtherArray)
    assert arrays.uniform_kind((plain, plain), (None, plain)) == "numpy"
    assert arrays.uniform_kind((plain,), (None, None)) == "numpy"  # absent optional arrays are skipped
    assert arrays.uniform_kind((plain, other)) is None  # mixed types: the full check decides
    assert arrays.uniform_kind((plain, plain), (other,)) is None
    assert arrays.uniform_kind((plain, plain), (plain, other)) is None
    assert arrays.uniform_kind((None, None)) is None  # a required None is never a kind
    assert arrays.uniform_kind(([1.0], [1.0])) is None  # a type the checks have not seen


def test_the_finite_check_reads_the_statistics_with_their_own_array_module(cudnn_library, monkeypatch):
    import sys

    from cudnn_bn import SavedStats
    from fake_cudnn import FakeArray, simulated_gpu

    with simulated_gpu(monkeypatch):
        cupy = sys.modules["cupy"]
        calls = []
        vdot = cupy.vdot
        monkeypatch.setattr(cupy, "vdot", lambda a, b: calls.append(type(a)) or vdot(a, b))
        mean, inv_std = (np.array(values, np.float32).view(FakeArray) for values in ([0.5, -1.0], [2.0, 3.0]))
        validate.check_saved_finite(SavedStats(mean, inv_std, Mode.SPATIAL_PERSISTENT, 1e-5, 1))
        assert calls == [FakeArray]
