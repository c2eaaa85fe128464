"""Fused batch norm + activation (+ residual add) on CuPy arrays through cuDNN.

Two paths, chosen per call signature:

- the fused Ex path: cudnnBatchNormalizationForwardTrainingEx / BackwardEx with bnOps
  BN_ACTIVATION (no residual) or BN_ADD_ACTIVATION (residual as z), where cuDNN's fused kernels
  apply (limits.fused_ex_path_unmet: SPATIAL_PERSISTENT, packed NHWC float16, C % 4 == 0, ReLU).
  The reserve space (which holds what the backward needs to undo the activation) goes from the
  forward to the backward in ``saved.stats.reserve_space``.
- the composed path elsewhere: the plain cuDNN call of cudnn_bn/_cudnn/ops.py, then one
  elementwise kernel (add + activation in forward; the activation's mask in backward, before the
  plain backward). Inference is always composed: cudnnBatchNormalizationForwardInference has no
  fused ops.

The elementwise step is a CuPy ElementwiseKernel (one pass, in place on the fresh y); a cupy
module without ElementwiseKernel (the simulated GPU of the tests) runs the same math with CuPy
ufuncs instead.
"""

from __future__ import annotations

import threading

from .._core.fused_saved import (
    PATH_COMPOSED,
    PATH_FUSED_EX,
    FusedSaved,
    check_forward_output,
    check_residual,
    check_residual_apart,
)
from .._core.modes import Activation, Mode, OnOverflow
from .._core.saved import computed_by_forward, reserve_filled_by, trusted_saved_stats
from .._core.scalars import check_momentum
from .._core.validate import check_backward, check_forward_inference, check_forward_training
from . import ops, raw
from .availability import check_cuda_build_once
from .handles import CHECKED, borrow, lane_for
from .launch import (
    after_overflow,
    after_persistent,
    check_reserve,
    cupy_module,
    give_back,
    lend,
    on_device,
    pointer,
    same_device,
    workspace,
)
from .limits import fused_ex_path_unmet
from .plans import BACKWARD, INFERENCE, TRAINING, plan_for
from .raw import BatchNormOps
from .signatures import check_running_apart, lookup, remember, running_signature, saved_signature, signature

__all__ = ["backward", "forward_inference", "forward_training", "uses_fused_ex_path"]


def uses_fused_ex_path(plan, activation: Activation) -> bool:
    """Whether a training or backward call with this plan runs the fused Ex calls."""
    return plan.uses_ex and not fused_ex_path_unmet(plan.layout, plan.data_dtype, activation)


def _bn_ops(has_residual: bool) -> BatchNormOps:
    return BatchNormOps.BN_ADD_ACTIVATION if has_residual else BatchNormOps.BN_ACTIVATION


# ---- the elementwise step of the composed path ----
# (activation, with residual) -> (in_params, out_params, body) of a CuPy ElementwiseKernel, run in
# place on the fresh y (passed as input p and output y). The form of the ReLU lines is the one
# Chainer's CuPy kernels used for float16/32/64; NaN gives 0, as the Ex path's activation
# descriptor (CUDNN_NOT_PROPAGATE_NAN) asks.
_FORWARD_BODIES = {
    (Activation.RELU, False): ("T p", "T y", "y = p > 0 ? p : (T)0"),
    (Activation.RELU, True): ("T p, T z", "T y", "T s = p + z; y = s > 0 ? s : (T)0"),
}
_BACKWARD_BODIES = {Activation.RELU: ("T y, T dy", "T g", "g = y > 0 ? dy : (T)0")}
_KERNELS: dict = {}
_KERNELS_LOCK = threading.Lock()


def _kernel(cupy, name: str, body: tuple[str, str, str]):
    kernel = _KERNELS.get(name)
    if kernel is None:
        with _KERNELS_LOCK:
            kernel = _KERNELS.get(name) or cupy.ElementwiseKernel(*body, name)
            _KERNELS[name] = kernel
    return kernel


def add_activation(cupy, y, residual, activation: Activation):
    """y = act(y + residual), in place on ``y`` (a fresh C-contiguous array); returns y.

    On a GPU one ElementwiseKernel pass; a cupy module without ElementwiseKernel (the simulated
    GPU) runs the same math with ufuncs (add, then fmax, which also gives 0 for NaN)."""
    if not hasattr(cupy, "ElementwiseKernel"):
        if residual is not None:
            cupy.add(y, residual, out=y)
        cupy.fmax(y, 0, out=y)
        return y
    with_residual = residual is not None
    kernel = _kernel(cupy, f"cudnn_bn_{activation.name.lower()}{'_add' if with_residual else ''}",
                     _FORWARD_BODIES[(activation, with_residual)])
    if with_residual:
        kernel(y, residual, y)
    else:
        kernel(y, y)
    return y


def activation_grad(cupy, y, dy, activation: Activation):
    """A new C-contiguous array: dy where the activation passed its input (ReLU: y > 0), else 0."""
    if not hasattr(cupy, "ElementwiseKernel"):
        grad = cupy.zeros(dy.shape, dtype=dy.dtype)
        cupy.copyto(grad, dy, where=y > 0)
        return grad
    kernel = _kernel(cupy, f"cudnn_bn_{activation.name.lower()}_grad", _BACKWARD_BODIES[activation])
    return cupy.ascontiguousarray(kernel(y, dy))


# ---- what a fused call signature settled ----
# Keys of their own in the settled-signature cache (signatures.py), next to the plain calls'.
_FUSED_TRAINING, _FUSED_INFERENCE, _FUSED_BACKWARD = (f"fused {name}" for name in (TRAINING, INFERENCE, BACKWARD))


class _FusedSettled:
    """What one fused call signature settled: the arrays' device, the checked description, the
    plan and overflow policy, whether the fused Ex call runs (``fused_ex``), and the plain call's
    own settling (ops.settle_*), which the composed path runs (None where only the fused Ex call does)."""

    __slots__ = ("device_id", "checked", "plan", "on_overflow", "fused_ex", "plain")

    def __init__(self, device_id, checked, plan, on_overflow, fused_ex, plain):
        self.device_id, self.checked, self.plan, self.on_overflow = device_id, checked, plan, on_overflow
        self.fused_ex, self.plain = fused_ex, plain


# ---- forward training ----
def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, residual, activation: Activation,
                     mode: Mode, momentum, eps, channel_axis, on_overflow: OnOverflow):
    """Fused forward training on cupy arrays; same contract as cudnn_bn.fused.reference_forward_training."""
    cupy = cupy_module()
    key, settled = lookup((
        _FUSED_TRAINING, activation, type(mode), mode, type(on_overflow), on_overflow, type(channel_axis), channel_axis,
        type(eps), eps, signature(x), signature(gamma), signature(beta), running_signature(running_mean, running_var),
        signature(residual),
    ))
    if settled is None:
        settled, momentum = _settle_training(
            cupy, x, gamma, beta, running_mean, running_var, residual, activation, mode, momentum, eps, channel_axis,
            on_overflow,
        )
        remember(key, settled)
    else:  # what depends on values, in the order of the full checks
        if running_mean is not None:
            check_running_apart(settled.plain, x, gamma, beta, running_mean, running_var)
        momentum = check_momentum(momentum)
        if residual is not None:
            check_residual_apart(x, residual, running_mean, running_var)
    with on_device(cupy, settled.device_id):
        if settled.fused_ex:
            result = _forward_training_ex(
                cupy, settled.plan, settled.checked, x, gamma, beta, running_mean, running_var, residual, activation,
                momentum, settled.on_overflow,
            )
            if result is not None:
                return result
            # the persistent kernel overflowed and on_overflow is "fallback": SPATIAL, composed
            y, stats = ops.forward_training(
                x, gamma, beta, running_mean, running_var, Mode.SPATIAL, momentum, settled.checked.eps, channel_axis,
                OnOverflow.IGNORE,
            )
        else:
            y, stats = ops.run_training(
                cupy, settled.plain, x, gamma, beta, running_mean, running_var, momentum, channel_axis
            )
        add_activation(cupy, y, None if residual is None else cupy.ascontiguousarray(residual), activation)
    return y, FusedSaved(stats, activation, residual is not None, PATH_COMPOSED)


def _settle_training(cupy, x, gamma, beta, running_mean, running_var, residual, activation, mode, momentum, eps,
                     channel_axis, on_overflow):
    """``(settled, momentum)``: the full checks of a fused forward-training signature (and of this
    call's values), then the plain call's settling (its plan, and the extents the per-call overlap
    check reads)."""
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    check_residual(x, residual, running_mean, running_var)
    device_id = same_device(
        x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, residual=residual
    )
    with on_device(cupy, device_id):
        plain, momentum = ops.settle_training(
            cupy, x, gamma, beta, running_mean, running_var, mode, momentum, checked.eps, channel_axis, on_overflow
        )
    fused_ex = uses_fused_ex_path(plain.plan, activation)
    return _FusedSettled(device_id, plain.checked, plain.plan, on_overflow, fused_ex, plain), momentum


def _forward_training_ex(cupy, plan, checked, x, gamma, beta, running_mean, running_var, residual, activation, momentum,
                         on_overflow):
    """The fused Ex call; None when it overflowed and on_overflow is "fallback" (statistics restored)."""
    layout, bn_ops = plan.layout, _bn_ops(residual is not None)
    x_in = cupy.ascontiguousarray(x)
    z_in = None if residual is None else cupy.ascontiguousarray(residual)
    gamma_in, beta_in = plan.param_in(cupy, gamma), plan.param_in(cupy, beta)
    mean_in, var_in = plan.running_in(cupy, running_mean), plan.running_in(cupy, running_var)
    lane = lane_for(plan.persistent, on_overflow)
    backup = (mean_in.copy(), var_in.copy()) if lane is CHECKED and mean_in is not None else None
    y = cupy.empty(x_in.shape, dtype=plan.data_dtype)
    save_mean, save_inv_std = plan.new_params(cupy)
    activation_desc = plan.activation_descriptor(activation)
    data = plan.data_desc_pointer
    z_desc = None if z_in is None else data
    handle = lend(cupy, plan, lane)
    try:
        workspace_size, _, reserve_size = plan.fused_ex_sizes(handle.pointer, bn_ops, activation)
        scratch = workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
        reserve = cupy.empty(max(reserve_size, 1), dtype=cupy.uint8)
        raw.library().cudnnBatchNormalizationForwardTrainingEx(
            handle.pointer, plan.cudnn_mode, int(bn_ops), plan.alpha, plan.beta,
            data, x_in.data.ptr,
            z_desc, pointer(z_in),  # zDesc (x's), zData: NULL without a residual
            data, y.data.ptr,  # yDesc: x's
            plan.param_desc_pointer, gamma_in.data.ptr, beta_in.data.ptr,
            momentum, pointer(mean_in), pointer(var_in),  # resultRunningMean, resultRunningVariance: NULL when not kept
            checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
            activation_desc.pointer,
            scratch.data.ptr, scratch.size, reserve.data.ptr, reserve.size,
        )
        overflowed = plan.persistent and after_persistent(cupy, handle, lane, "fused forward_training", plan)
    finally:
        give_back(handle)
    if overflowed:
        after_overflow(
            "cudnnBatchNormalizationForwardTrainingEx", TRAINING, "fused forward_training", plan, on_overflow, backup,
            (mean_in, var_in),
        )
        return None
    plan.running_back(cupy, mean_in, running_mean)
    plan.running_back(cupy, var_in, running_var)
    stats = trusted_saved_stats(
        plan.param_out(cupy, save_mean), plan.param_out(cupy, save_inv_std), layout.mode, checked.eps,
        layout.public_channel_axis, reserve, on_overflow, from_forward=True, reserve_ops=int(bn_ops),
    )
    # BackwardEx reads beta to undo the activation: a copy, so that an update of beta in place
    # between forward and backward does not change the gradient
    return y, FusedSaved(stats, activation, residual is not None, PATH_FUSED_EX, bias=beta_in.copy())


# ---- forward inference: always composed ----
def forward_inference(x, gamma, beta, mean, var, *, residual, activation: Activation, mode: Mode, eps, channel_axis):
    """Fused forward inference on cupy arrays: the plain cuDNN call, then one elementwise kernel."""
    cupy = cupy_module()
    key, settled = lookup((
        _FUSED_INFERENCE, type(mode), mode, type(eps), eps, type(channel_axis), channel_axis, signature(x),
        signature(gamma), signature(beta), signature(mean), signature(var), signature(residual),
    ))
    if settled is None:
        settled = remember(key, _settle_inference(cupy, x, gamma, beta, mean, var, residual, mode, eps, channel_axis))
    elif residual is not None:
        check_residual_apart(x, residual)
    with on_device(cupy, settled.device_id):
        y = ops.run_inference(cupy, settled.plain, x, gamma, beta, mean, var)
        return add_activation(cupy, y, None if residual is None else cupy.ascontiguousarray(residual), activation)


def _settle_inference(cupy, x, gamma, beta, mean, var, residual, mode, eps, channel_axis) -> _FusedSettled:
    """The full checks of a fused forward-inference signature, then the plain call's settling."""
    check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    check_residual(x, residual)
    device_id = same_device(x=x, gamma=gamma, beta=beta, mean=mean, var=var, residual=residual)
    with on_device(cupy, device_id):
        plain = ops.settle_inference(cupy, x, gamma, beta, mean, var, mode, eps, channel_axis)
    return _FusedSettled(device_id, plain.checked, plain.plan, None, False, plain)


# ---- backward ----
def backward(x, y, dy, gamma, saved: FusedSaved, *, mode: Mode, eps, channel_axis, on_overflow: OnOverflow):
    """Fused backward on cupy arrays; same contract as cudnn_bn.fused.reference_backward."""
    cupy = cupy_module()
    stats = saved.stats
    try:
        key = (
            _FUSED_BACKWARD, saved.activation, saved.has_residual, saved.path, signature(saved.bias), type(mode), mode,
            type(eps), eps, type(channel_axis), channel_axis, type(on_overflow), on_overflow, signature(x),
            signature(y), signature(dy), signature(gamma), saved_signature(stats),
        )
    except Exception:  # statistics of a SavedStats subclass, or something other than arrays: the full checks name it
        key = None
    key, settled = lookup(key)
    if settled is None:
        settled = remember(key, _settle_backward(cupy, x, y, dy, gamma, saved, mode, eps, channel_axis, on_overflow))
    # BackwardEx reads the reserve space (the activation's mask) of the forward that wrote these
    # statistics, at the addresses it wrote them: with a copy of them (pickled, deep-copied,
    # converted), the composed path, which reads the mask from y
    fused_ex = (settled.fused_ex and settled.plan.param_as_is(stats.mean) and settled.plan.param_from_cudnn is None
                and reserve_filled_by(stats) == int(_bn_ops(saved.has_residual)))
    with on_device(cupy, settled.device_id):
        if fused_ex:
            result = _backward_ex(cupy, settled.plan, settled.checked, x, y, dy, gamma, saved, settled.on_overflow)
            if result is not None:
                return result
        grad = activation_grad(cupy, y, dy, saved.activation)
        plain = _plain_stats(stats)
        if fused_ex:  # the persistent kernel overflowed and on_overflow is "fallback": SPATIAL, composed
            dx, dgamma, dbeta = ops.backward(x, grad, gamma, plain, Mode.SPATIAL, eps, channel_axis, OnOverflow.IGNORE)
        elif settled.fused_ex:  # statistics or reserve space copied: the composed path's plain backward
            dx, dgamma, dbeta = ops.backward(x, grad, gamma, plain, mode, eps, channel_axis, settled.on_overflow)
        else:
            dx, dgamma, dbeta = ops.run_backward(cupy, settled.plain, x, grad, gamma, plain, channel_axis)
    return dx, (grad if saved.has_residual else None), dgamma, dbeta


def _settle_backward(cupy, x, y, dy, gamma, saved, mode, eps, channel_axis, on_overflow) -> _FusedSettled:
    """The full checks of a fused backward signature (and of this call's values), then its plan,
    and on the composed path the plain backward's settling."""
    stats = saved.stats
    checked = check_backward(x, dy, gamma, stats, mode=mode, eps=eps, channel_axis=channel_axis, check_finite=False)
    check_forward_output(x, y)
    named = {"x": x, "y": y, "dy": dy, "gamma": gamma, "saved_mean": stats.mean, "saved_inv_std": stats.inv_std}
    if saved.path == PATH_FUSED_EX:
        named.update(saved_reserve_space=stats.reserve_space, saved_bias=saved.bias)
    device_id = same_device(**named)
    check_cuda_build_once(cupy)
    plan = plan_for(BACKWARD, checked.layout, checked.data_dtype, device_id)
    fused_ex = (
        saved.path == PATH_FUSED_EX and stats.reserve_space is not None and saved.bias is not None
        and uses_fused_ex_path(plan, saved.activation)
    )
    with on_device(cupy, device_id):
        if fused_ex:  # BackwardEx reads the forward's reserve space, which holds the activation's mask too
            with borrow(device_id) as handle:
                reserve_size = plan.fused_ex_sizes(handle.pointer, _bn_ops(saved.has_residual), saved.activation)[2]
            check_reserve(stats.reserve_space, reserve_size, device_id)
            plain = None
        else:  # the plain backward of the activation's gradient, which has dy's shape, dtype and device
            plain = ops.settle_backward(cupy, x, dy, gamma, _plain_stats(stats), mode, eps, channel_axis, on_overflow)
    return _FusedSettled(device_id, checked, plan, on_overflow, fused_ex, plain)


def _plain_stats(stats):
    """What the plain backward gets: the statistics alone (the Ex reserve space belongs to the fused
    ops), still marked as the forward's when they were."""
    return trusted_saved_stats(
        stats.mean, stats.inv_std, stats.mode, stats.eps, stats.channel_axis, None, stats.on_overflow,
        from_forward=computed_by_forward(stats),
    )


def _backward_ex(cupy, plan, checked, x, y, dy, gamma, saved, on_overflow):
    """The fused BackwardEx call (its reserve space checked when the signature was settled); None
    when it overflowed and on_overflow is "fallback"."""
    stats, bn_ops = saved.stats, _bn_ops(saved.has_residual)
    x_in, y_in, dy_in = cupy.ascontiguousarray(x), cupy.ascontiguousarray(y), cupy.ascontiguousarray(dy)
    gamma_in = plan.param_in(cupy, gamma)
    bias = saved.bias  # already in cuDNN's order and the parameter dtype
    saved_mean, saved_inv_std = plan.param_in(cupy, stats.mean), plan.param_in(cupy, stats.inv_std)
    dx = cupy.empty(x_in.shape, dtype=plan.data_dtype)
    dz = cupy.empty(x_in.shape, dtype=plan.data_dtype) if saved.has_residual else None
    dgamma, dbeta = plan.new_params(cupy)
    reserve = stats.reserve_space
    activation_desc = plan.activation_descriptor(saved.activation)
    lane = lane_for(plan.persistent, on_overflow)
    data = plan.data_desc_pointer
    dz_desc = None if dz is None else data
    handle = lend(cupy, plan, lane)
    try:
        _, workspace_size, _ = plan.fused_ex_sizes(handle.pointer, bn_ops, saved.activation)
        scratch = workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
        raw.library().cudnnBatchNormalizationBackwardEx(
            handle.pointer, plan.cudnn_mode, int(bn_ops), plan.alpha, plan.beta, plan.alpha, plan.beta,
            data, x_in.data.ptr,
            data, y_in.data.ptr,  # yDesc: x's
            data, dy_in.data.ptr,  # dyDesc: x's
            dz_desc, pointer(dz),  # dzDesc (x's), dzData: NULL without a residual
            data, dx.data.ptr,  # dxDesc: x's
            plan.param_desc_pointer, gamma_in.data.ptr, bias.data.ptr,
            dgamma.data.ptr, dbeta.data.ptr, checked.eps, saved_mean.data.ptr, saved_inv_std.data.ptr,
            activation_desc.pointer,
            scratch.data.ptr, scratch.size, reserve.data.ptr, reserve.size,
        )
        overflowed = plan.persistent and after_persistent(
            cupy, handle, lane, "fused backward", plan, None if computed_by_forward(stats) else stats
        )
    finally:
        give_back(handle)
    if overflowed:
        after_overflow("cudnnBatchNormalizationBackwardEx", BACKWARD, "fused backward", plan, on_overflow)
        return None
    return dx, dz, plan.param_out(cupy, dgamma), plan.param_out(cupy, dbeta)
