"""Arguments of the cuDNN path's calls on the simulated GPU (tests/fake_cudnn.py), shared by the
tests of ops, signatures, launch and plans: copies of host arrays on the device, one small float32
SPATIAL case per call, the Ex path's case, and the running statistics the reference computes."""

from __future__ import annotations

import numpy as np

import cudnn_bn
from conftest import make_case
from cudnn_bn import Mode, reference
from fake_cudnn import FakeArray


def on_device(*arrays):
    """Copies of host arrays on the simulated GPU."""
    return [np.array(a, copy=True).view(FakeArray) for a in arrays]


def inference_args(shape=(4, 3, 2, 2)):
    """Host x, gamma, beta, mean, var of a float32 SPATIAL inference call."""
    layout, x, _, gamma, beta = make_case(shape, Mode.SPATIAL, 1, np.float32)
    mean, var = np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32)
    return x, gamma, beta, mean, var


def training_args(shape=(4, 3, 2, 2)):
    """Host x, gamma, beta, running_mean, running_var of a float32 SPATIAL training call."""
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, 1, np.float32)
    return x, gamma, beta, np.zeros(layout.param_shape, np.float32), np.ones(layout.param_shape, np.float32)


def backward_args():
    """Host x, dy, gamma, beta of a float32 SPATIAL backward call (beta for its forward)."""
    layout, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    return x, dy, gamma, beta


def ex_case():
    """Device x, dy, gamma, beta that take the Ex path: SPATIAL_PERSISTENT, channels-last float16
    with C % 4 == 0."""
    _, x, dy, gamma, beta = make_case((2, 2, 2, 4), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    return on_device(x, dy, gamma, beta)


def settled_training(momentum=0.3):
    """Device arrays of a training call whose signature is now settled (one call made)."""
    arrays = on_device(*training_args())
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=momentum)
    return arrays


def _host(array):
    """A synchronized float64 host copy (the simulated GPU runs queued work first)."""
    return np.asarray(array.get() if hasattr(array, "get") else array, np.float64)


def reference_running(x, gamma, beta, mean, var, momentum):
    """The running statistics after one SPATIAL training step of the reference from ``mean`` and
    ``var``, in float64."""
    mean, var = _host(mean).copy(), _host(var).copy()
    reference.forward_training(_host(x), _host(gamma), _host(beta), mean, var, mode="spatial", momentum=float(momentum))
    return mean, var
