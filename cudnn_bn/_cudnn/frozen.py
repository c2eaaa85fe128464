"""Backward through fixed statistics (a frozen batch norm) on CuPy arrays.

cuDNN has no call for it: with the statistics fixed, dx = gamma * inv_std * dy is one elementwise
pass, and dgamma and dbeta are sums over each statistic's group (docs/math.md, "Backward through
fixed statistics"). On a GPU the call queues four kernels and never waits for the device:

- one ElementwiseKernel over the parameters: inv_std and gamma * inv_std from float64
  arithmetic, and the mean split into a leading part in the parameter dtype and the rest, so that
  ``(x - mean_high) - mean_low`` keeps the accuracy of a float64 mean on float32 data;
- dx: one ElementwiseKernel, dy times the per-statistic scale in the parameter dtype, rounded
  once to x's dtype;
- dbeta: CuPy's sum of dy, accumulated in the parameter dtype;
- dgamma: one ReductionKernel whose map computes dy * x_hat, so that x_hat is never stored.

A cupy module without ElementwiseKernel (the simulated GPU of the tests) runs the same
arithmetic with CuPy ufuncs. The checks are forward_inference's (shared with the reference),
settled once per call signature; the fused variant (a ReLU mask read from y, as the fused
backward does) masks dy with fused_ops' elementwise kernel first.
"""

from __future__ import annotations

import threading

import numpy as np

from .._core.fused_saved import check_forward_output
from .._core.modes import Activation
from .._core.policy import INFERENCE, choose_mode
from .._core.validate import Checked, check_backward_inference
from .fused_ops import activation_grad
from .launch import cupy_module, on_device, same_device
from .signatures import lookup, remember, signature

__all__ = ["backward_inference", "fused_backward_inference"]

# (in_params, out_params, operation) of the parameters' ElementwiseKernel; P is the parameter
# dtype (the outputs'), G, M, V whatever float dtypes gamma, mean and var have
_PER_STATISTIC = (
    "G gamma, M mean, V var, float64 eps",
    "P scale, P inv_std, P mean_high, P mean_low",
    (
        "double inv_std_64 = rsqrt((double)var + eps);"
        " inv_std = (P)inv_std_64;"
        " scale = (P)((double)gamma * inv_std_64);"
        " P high = (P)mean;"
        " mean_high = high;"
        " mean_low = (P)((double)mean - (double)high);"
    ),
)
# dx's ElementwiseKernel: T is x's dtype, the product is computed in the parameter dtype P and
# rounded once to T
_DX = ("T dy, P scale", "T dx", "dx = (T)(static_cast<P>(dy) * scale)")
# (in_params, out_params, map, reduce, post_map, identity) of dgamma's ReductionKernel: the
# products are summed in the parameter dtype
_DGAMMA = (
    "T x, T dy, P mean_high, P mean_low, P inv_std",
    "P dgamma",
    "static_cast<P>(dy) * ((static_cast<P>(x) - mean_high) - mean_low) * inv_std",
    "a + b",
    "dgamma = a",
    "0",
)
# kernel name -> (CuPy's kernel class, its arguments before the name)
_KERNEL_SOURCES = {
    "cudnn_bn_fixed_statistics": ("ElementwiseKernel", _PER_STATISTIC),
    "cudnn_bn_fixed_statistics_dx": ("ElementwiseKernel", _DX),
    "cudnn_bn_fixed_statistics_dgamma": ("ReductionKernel", _DGAMMA),
}
_KERNELS: dict = {}
_KERNELS_LOCK = threading.Lock()


def _kernel(cupy, name: str):
    """The named kernel, made once (CuPy compiles it on first use, per dtypes and device)."""
    kernel = _KERNELS.get(name)
    if kernel is None:
        with _KERNELS_LOCK:
            kernel = _KERNELS.get(name)
            if kernel is None:
                kind, arguments = _KERNEL_SOURCES[name]
                kernel = _KERNELS[name] = getattr(cupy, kind)(*arguments, name)
    return kernel


def _has_kernels(cupy) -> bool:
    """Whether cupy can build kernels (the simulated GPU's cupy cannot: ufuncs stand in there)."""
    return hasattr(cupy, "ElementwiseKernel") and hasattr(cupy, "ReductionKernel")


def _per_statistic(cupy, gamma, mean, var, eps: float, param_dtype):
    """``(scale, inv_std, mean_high, mean_low)``, each of the parameter shape and dtype."""
    if not _has_kernels(cupy):
        inv_std = 1.0 / cupy.sqrt(var.astype(np.float64) + eps)
        mean_high = mean.astype(param_dtype)
        mean_low = (mean.astype(np.float64) - mean_high.astype(np.float64)).astype(param_dtype)
        scale = (gamma.astype(np.float64) * inv_std).astype(param_dtype)
        return scale, inv_std.astype(param_dtype), mean_high, mean_low
    outputs = [cupy.empty(gamma.shape, param_dtype) for _ in range(4)]
    _kernel(cupy, "cudnn_bn_fixed_statistics")(gamma, mean, var, eps, *outputs)
    return tuple(outputs)


def _dx(cupy, dy, scale, dx):
    """dx = dy * scale (broadcast against dy), computed in scale's dtype, written into ``dx``."""
    if not _has_kernels(cupy):
        cupy.copyto(dx, dy.astype(scale.dtype) * scale, casting="same_kind")
        return dx
    _kernel(cupy, "cudnn_bn_fixed_statistics_dx")(dy, scale, dx)
    return dx


def _dgamma(cupy, x, dy, mean_high, mean_low, inv_std, axes, param_dtype):
    """sum(dy * x_hat) over ``axes``, in the parameter dtype; the statistics broadcast against x."""
    if not _has_kernels(cupy):
        centered = (x.astype(param_dtype) - mean_high) - mean_low
        return cupy.sum(dy.astype(param_dtype) * centered * inv_std, axis=axes)
    return _kernel(cupy, "cudnn_bn_fixed_statistics_dgamma")(x, dy, mean_high, mean_low, inv_std, axis=axes)


class _Settled:
    """What one call signature settled: the checked description and the arrays' device."""

    __slots__ = ("checked", "device_id")

    def __init__(self, checked: Checked, device_id: int):
        self.checked, self.device_id = checked, device_id


def _settle(x, dy, gamma, mean, var, mode, eps, channel_axis, **others) -> _Settled:
    """forward_inference's checks with dy in place of beta (``others``: the fused call's y)."""
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    checked = check_backward_inference(x, dy, gamma, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    if "y" in others:
        check_forward_output(x, others["y"])
    return _Settled(checked, same_device(x=x, dy=dy, gamma=gamma, mean=mean, var=var, **others))


def _run(cupy, settled: _Settled, x, dy, gamma, mean, var):
    """``(dx, dgamma, dbeta)`` of a settled signature, queued on the current stream of x's device."""
    checked = settled.checked
    layout, param_dtype = checked.layout, checked.param_dtype
    axes, broadcast = layout.reduce_axes, layout.broadcast_shape
    scale, inv_std, mean_high, mean_low = _per_statistic(cupy, gamma, mean, var, checked.eps, param_dtype)
    dx = _dx(cupy, dy, scale.reshape(broadcast), cupy.empty(layout.shape, checked.data_dtype))
    dbeta = cupy.sum(dy, axis=axes, dtype=param_dtype)
    dgamma = _dgamma(cupy, x, dy, mean_high.reshape(broadcast), mean_low.reshape(broadcast),
                     inv_std.reshape(broadcast), axes, param_dtype)
    return dx, dgamma, dbeta


_BACKWARD_INFERENCE, _FUSED_BACKWARD_INFERENCE = "backward_inference", "fused backward_inference"


def backward_inference(x, dy, gamma, mean, var, mode, eps, channel_axis):
    """Backward through fixed statistics on cupy arrays; same contract as
    :func:`cudnn_bn.backward_inference`."""
    cupy = cupy_module()
    key, settled = lookup((
        _BACKWARD_INFERENCE, type(mode), mode, type(channel_axis), channel_axis, type(eps), eps, signature(x),
        signature(dy), signature(gamma), signature(mean), signature(var),
    ))
    if settled is None:
        settled = remember(key, _settle(x, dy, gamma, mean, var, mode, eps, channel_axis))
    with on_device(cupy, settled.device_id):
        return _run(cupy, settled, x, dy, gamma, mean, var)


def fused_backward_inference(x, y, dy, gamma, mean, var, *, activation: Activation, mode, eps, channel_axis):
    """The fused variant on cupy arrays, ``(dx, dresidual, dgamma, dbeta)``; same contract as
    cudnn_bn.fused.reference_backward_inference: dy masked where the activation passed (read
    from the forward's output y), which is dresidual, then the plain backward of the mask."""
    cupy = cupy_module()
    key, settled = lookup((
        _FUSED_BACKWARD_INFERENCE, activation, type(mode), mode, type(channel_axis), channel_axis, type(eps), eps,
        signature(x), signature(y), signature(dy), signature(gamma), signature(mean), signature(var),
    ))
    if settled is None:
        settled = remember(key, _settle(x, dy, gamma, mean, var, mode, eps, channel_axis, y=y))
    with on_device(cupy, settled.device_id):
        grad = activation_grad(cupy, y, dy, activation)
        dx, dgamma, dbeta = _run(cupy, settled, x, grad, gamma, mean, var)
    return dx, grad, dgamma, dbeta
