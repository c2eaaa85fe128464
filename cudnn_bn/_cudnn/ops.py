"""Batch normalization on CuPy arrays through cuDNN: settle, then call.

Each public call runs with its arrays' device current and looks its signature up
(signatures.py). The first call of a signature settles it (``settle_*``): the mode and overflow
policy by the policy (cudnn_bn._core.policy), the same checks as the NumPy reference, the device,
the CUDA build and the plan (plans.py). Every call then checks what depends on values and runs
the settled call (``run_*``), whose native calls get a handle lent for their length (launch.py).
The fused calls (fused_ops.py) settle their own signatures and run the same ``run_*``.
"""

from __future__ import annotations

import dataclasses

from .._core.layout import Layout
from .._core.modes import Mode, OnOverflow
from .._core.policy import backward_settings, choose_mode
from .._core.saved import computed_by_forward, reserve_filled_by, trusted_saved_stats
from .._core.scalars import check_momentum
from .._core.validate import check_backward, check_forward_inference, check_forward_training
from . import raw
from .availability import check_cuda_build_once
from .handles import PLAIN, borrow
from .launch import (
    after_overflow,
    after_persistent,
    check_reserve,
    cupy_module,
    give_back,
    lend,
    pointer,
    same_device,
    workspace,
)
from .plans import BACKWARD, INFERENCE, TRAINING, plan_for, set_ex_path_enabled, uses_ex_path
from .signatures import (
    SETTLED,
    Settled,
    check_running_apart,
    extents,
    lookup,
    remember,
    running_signature,
    saved_signature,
    signature,
)

_BN = int(raw.BatchNormOps.BN)  # bnOps of the plain Ex calls

__all__ = [
    "backward",
    "forward_inference",
    "forward_training",
    "run_backward",
    "run_inference",
    "run_training",
    "set_ex_path_enabled",
    "settle_backward",
    "settle_inference",
    "settle_training",
    "uses_ex_path",
]


# ---- forward training ----
def forward_training(x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow):
    """cuDNN forward training on cupy arrays; same contract as :func:`cudnn_bn.forward_training`
    (every argument given; ``mode`` and ``on_overflow`` as the public call takes them: the policy
    resolves them once per call signature)."""
    cupy, device_id = cupy_module(), x.device.id
    if cupy.cuda.runtime.getDevice() != device_id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(device_id):
            return forward_training(
                x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow
            )
    key = (
        TRAINING, type(mode), mode, type(on_overflow), on_overflow, type(channel_axis), channel_axis, type(eps), eps,
        type(x), x.shape, x.strides, x.dtype, device_id,  # signature(x), flat: this runs on every call
        type(gamma), gamma.shape, gamma.strides, gamma.dtype, gamma.device.id,
        type(beta), beta.shape, beta.strides, beta.dtype, beta.device.id,
        running_signature(running_mean, running_var),
    )
    try:  # lookup written out: this runs on every call
        settled = SETTLED.get(key)
    except Exception:
        key = settled = None
    if settled is None:
        settled, momentum = settle_training(
            cupy, x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow
        )
        remember(key, settled)
    else:
        if type(momentum) is not float or not 0.0 <= momentum <= 1.0:  # the common case inline: it runs on every call
            momentum = check_momentum(momentum)
        if running_mean is not None:
            check_running_apart(settled, x, gamma, beta, running_mean, running_var)
    return run_training(cupy, settled, x, gamma, beta, running_mean, running_var, momentum, channel_axis)


def settle_training(cupy, x, gamma, beta, running_mean, running_var, mode, momentum, eps, channel_axis, on_overflow):
    """``(settled, momentum)``: the full checks of a forward-training signature (and of this call's
    values), then its plan; momentum as a float."""
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, TRAINING, on_overflow)
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    device_id = same_device(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    check_cuda_build_once(cupy)
    plan = plan_for(TRAINING, checked.layout, checked.data_dtype, device_id)  # limits are checked here
    running_extents = None if running_mean is None else extents(x, gamma, beta, running_mean, running_var)
    params = (gamma, beta, running_mean, running_var)
    return Settled(checked, plan, on_overflow, (x,), params, running_extents), momentum


def run_training(cupy, settled: Settled, x, gamma, beta, running_mean, running_var, momentum: float, channel_axis):
    """The forward training of a settled signature whose per-call checks passed, on the current
    device (x's): ``(y, saved)``; after an overflow, the SPATIAL re-run's or CudnnOverflowError."""
    plan, checked = settled.plan, settled.checked
    on_overflow, lane = settled.on_overflow, settled.lane
    x_in = x if settled.x_as_is else cupy.ascontiguousarray(x)
    if settled.params_as_is:
        gamma_in, beta_in, mean_in, var_in = gamma, beta, running_mean, running_var
    else:
        gamma_in, beta_in = plan.param_in(cupy, gamma), plan.param_in(cupy, beta)
        mean_in, var_in = plan.running_in(cupy, running_mean), plan.running_in(cupy, running_var)
    backup = (mean_in.copy(), var_in.copy()) if settled.checked_overflow and mean_in is not None else None
    y = cupy.empty(x_in.shape, plan.data_dtype)
    save_mean, save_inv_std = plan.new_params(cupy)
    library, reserve = raw.library(), None
    x_desc, p_desc = plan.data_desc_pointer, plan.param_desc_pointer
    handle = lend(cupy, plan, lane)
    try:
        if plan.uses_ex:
            workspace_size, _, reserve_size = plan.ex_workspace_sizes(handle.pointer)
            scratch = workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            reserve = cupy.empty(max(reserve_size, 1), cupy.uint8)
            library.cudnnBatchNormalizationForwardTrainingEx(
                handle.pointer, plan.cudnn_mode, _BN, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr,
                None, None,  # zDesc, zData: no residual
                x_desc, y.data.ptr,  # yDesc: x's
                p_desc, gamma_in.data.ptr, beta_in.data.ptr,
                momentum,
                pointer(mean_in), pointer(var_in),  # resultRunningMean, resultRunningVariance: NULL when not kept
                checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
                None,  # activationDesc: none for bnOps BN
                scratch.data.ptr, scratch.size, reserve.data.ptr, reserve.size,
            )
        else:
            library.cudnnBatchNormalizationForwardTraining(
                handle.pointer, plan.cudnn_mode, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr,
                x_desc, y.data.ptr,  # yDesc: x's
                p_desc, gamma_in.data.ptr, beta_in.data.ptr, momentum,
                None if mean_in is None else mean_in.data.ptr,  # resultRunningMean (pointer() inline): NULL if not kept
                None if var_in is None else var_in.data.ptr,  # resultRunningVariance
                checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
            )
        overflowed = plan.persistent and after_persistent(cupy, handle, lane, TRAINING, plan)
    finally:
        give_back(handle)
    if overflowed:
        after_overflow(
            "cudnnBatchNormalizationForwardTraining", TRAINING, "forward_training", plan, on_overflow, backup,
            (mean_in, var_in),
        )
        return forward_training(
            x, gamma, beta, running_mean, running_var, Mode.SPATIAL, momentum, checked.eps, channel_axis,
            OnOverflow.IGNORE,
        )
    if not settled.params_as_is:
        plan.running_back(cupy, mean_in, running_mean)
        plan.running_back(cupy, var_in, running_var)
    if plan.param_from_cudnn is not None:
        save_mean, save_inv_std = plan.param_out(cupy, save_mean), plan.param_out(cupy, save_inv_std)
    return y, trusted_saved_stats(
        save_mean, save_inv_std, plan.layout.mode, checked.eps, plan.layout.public_channel_axis, reserve,
        on_overflow, from_forward=True, reserve_ops=None if reserve is None else _BN,
    )


# ---- forward inference ----
def forward_inference(x, gamma, beta, mean, var, mode, eps, channel_axis):
    """cuDNN forward inference on cupy arrays; same contract as :func:`cudnn_bn.forward_inference`."""
    cupy = cupy_module()
    if cupy.cuda.runtime.getDevice() != x.device.id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(x.device.id):
            return forward_inference(x, gamma, beta, mean, var, mode, eps, channel_axis)
    key, settled = lookup((
        INFERENCE, type(mode), mode, type(channel_axis), channel_axis, type(eps), eps, signature(x), signature(gamma),
        signature(beta), signature(mean), signature(var),
    ))
    if settled is None:
        settled = remember(key, settle_inference(cupy, x, gamma, beta, mean, var, mode, eps, channel_axis))
    return run_inference(cupy, settled, x, gamma, beta, mean, var)


def settle_inference(cupy, x, gamma, beta, mean, var, mode, eps, channel_axis) -> Settled:
    """The full checks of a forward-inference signature, then its plan."""
    mode, _ = choose_mode(mode, x.shape, channel_axis, INFERENCE)
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    if checked.layout.mode is Mode.SPATIAL_PERSISTENT:
        # persistent is a training-kernel choice with the same math; inference runs SPATIAL, as
        # PyTorch does, since cuDNN documents only PER_ACTIVATION and SPATIAL for this call
        layout = checked.layout
        checked = dataclasses.replace(checked, layout=Layout(layout.shape, layout.channel_axis, Mode.SPATIAL))
    device_id = same_device(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    check_cuda_build_once(cupy)
    plan = plan_for(INFERENCE, checked.layout, checked.data_dtype, device_id)
    return Settled(checked, plan, None, (x,), (gamma, beta, mean, var))


def run_inference(cupy, settled: Settled, x, gamma, beta, mean, var):
    """The forward inference of a settled signature, on the current device (x's): y."""
    plan = settled.plan
    x_in = x if settled.x_as_is else cupy.ascontiguousarray(x)
    params = (gamma, beta, mean, var)
    if not settled.params_as_is:
        params = [plan.param_in(cupy, a) for a in params]
    y = cupy.empty(x_in.shape, plan.data_dtype)
    gamma_ptr, beta_ptr, mean_ptr, var_ptr = [p.data.ptr for p in params]
    # one call, or pieces along N past cuDNN's limits (a slice costs a view: only then)
    pieces = ((plan, x_in, y),)
    if plan.pieces is not None:
        pieces = [(piece, x_in[start:stop], y[start:stop]) for start, stop, piece in plan.pieces]
    library, eps = raw.library(), settled.checked.eps
    handle = lend(cupy, plan, PLAIN)
    try:
        for piece, x_piece, y_piece in pieces:
            x_desc = piece.data_desc_pointer
            library.cudnnBatchNormalizationForwardInference(
                handle.pointer, piece.cudnn_mode, piece.alpha, piece.beta,
                x_desc, x_piece.data.ptr,
                x_desc, y_piece.data.ptr,  # yDesc: x's
                piece.param_desc_pointer, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
            )
    finally:
        give_back(handle)
    return y


# ---- backward ----
def backward(x, dy, gamma, saved, mode, eps, channel_axis, on_overflow):
    """cuDNN backward on cupy arrays; same contract as :func:`cudnn_bn.backward` (the settings
    are resolved against ``saved`` once per call signature)."""
    cupy = cupy_module()
    if cupy.cuda.runtime.getDevice() != x.device.id:  # the rare case: again, with x's device current
        with cupy.cuda.Device(x.device.id):
            return backward(x, dy, gamma, saved, mode, eps, channel_axis, on_overflow)
    try:
        key = (
            BACKWARD, type(mode), mode, type(eps), eps, type(channel_axis), channel_axis, type(on_overflow),
            on_overflow, signature(x), signature(dy), signature(gamma), saved_signature(saved),
        )
    except Exception:  # saved is not a SavedStats, or holds something other than arrays: the full checks name it
        key = None
    key, settled = lookup(key)
    if settled is None:
        settled = remember(key, settle_backward(cupy, x, dy, gamma, saved, mode, eps, channel_axis, on_overflow))
    return run_backward(cupy, settled, x, dy, gamma, saved, channel_axis)


def settle_backward(cupy, x, dy, gamma, saved, mode, eps, channel_axis, on_overflow) -> Settled:
    """The full checks of a backward signature (and of this call's values), then its plan."""
    mode, on_overflow, eps, channel_axis = backward_settings(x, saved, mode, eps, channel_axis, on_overflow)
    checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis, check_finite=False)
    named = {"x": x, "dy": dy, "gamma": gamma}
    if saved is not None:
        named.update(saved_mean=saved.mean, saved_inv_std=saved.inv_std, saved_reserve_space=saved.reserve_space)
    device_id = same_device(**named)
    check_cuda_build_once(cupy)
    plan = plan_for(BACKWARD, checked.layout, checked.data_dtype, device_id)
    reserve = None if saved is None else saved.reserve_space
    if reserve is not None and plan.uses_ex:  # BackwardEx reads the forward's reserve space
        with borrow(device_id) as handle:
            check_reserve(reserve, plan.ex_workspace_sizes(handle.pointer)[2], device_id)
    saved_arrays = () if saved is None else (saved.mean, saved.inv_std)
    return Settled(checked, plan, on_overflow, (x, dy), (gamma,) + saved_arrays)


def run_backward(cupy, settled: Settled, x, dy, gamma, saved, channel_axis):
    """The backward of a settled signature whose per-call checks passed, on the current device
    (x's): ``(dx, dgamma, dbeta)``; after an overflow, the SPATIAL re-run's or CudnnOverflowError.
    A persistent call that checks overflow checks saved statistics that its own forward did not
    make (SavedStats) for NaN and Inf too, within the same wait (launch.after_persistent)."""
    plan, checked = settled.plan, settled.checked
    on_overflow, lane = settled.on_overflow, settled.lane
    if settled.x_as_is:
        x_in, dy_in = x, dy
    else:
        x_in, dy_in = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy)
    saved_mean = saved_inv_std = reserve = None
    if saved is not None:
        saved_mean, saved_inv_std, reserve = saved.mean, saved.inv_std, saved.reserve_space
    gamma_in = gamma
    if not settled.params_as_is:
        gamma_in = plan.param_in(cupy, gamma)
        if saved is not None:
            saved_mean, saved_inv_std = plan.param_in(cupy, saved_mean), plan.param_in(cupy, saved_inv_std)
    dx = cupy.empty(x_in.shape, plan.data_dtype)
    dgamma, dbeta = plan.new_params(cupy)
    library = raw.library()
    x_desc, p_desc = plan.data_desc_pointer, plan.param_desc_pointer
    # BackwardEx reads the reserve space its plain Ex forward filled with these statistics, where it
    # wrote them; with a copy of them (pickled, converted, compat's caller arrays) or a fused forward's
    # reserve space (other bnOps), the plain backward, which reads none
    uses_ex = (reserve is not None and plan.uses_ex and reserve_filled_by(saved) == _BN and saved_mean is saved.mean
               and plan.param_from_cudnn is None)
    handle = lend(cupy, plan, lane)
    try:
        if uses_ex:  # the reserve's size was checked when the signature was settled
            workspace_size = plan.ex_workspace_sizes(handle.pointer)[1]
            scratch = workspace(cupy, plan.device_id, handle.bound_identity, workspace_size)
            library.cudnnBatchNormalizationBackwardEx(
                handle.pointer, plan.cudnn_mode, _BN, plan.alpha, plan.beta, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr,
                None, None,  # yDesc, yData: read only to undo an activation
                x_desc, dy_in.data.ptr,  # dyDesc: x's
                None, None,  # dzDesc, dzData: no residual
                x_desc, dx.data.ptr,  # dxDesc: x's
                p_desc, gamma_in.data.ptr,
                None,  # bnBiasData: read only to undo an activation
                dgamma.data.ptr, dbeta.data.ptr, checked.eps,
                pointer(saved_mean), pointer(saved_inv_std),  # savedMean, savedInvVariance: NULL to recompute
                None,  # activationDesc: none for bnOps BN
                scratch.data.ptr, scratch.size, reserve.data.ptr, reserve.size,
            )
        else:
            library.cudnnBatchNormalizationBackward(
                handle.pointer, plan.cudnn_mode, plan.alpha, plan.beta, plan.alpha, plan.beta,
                x_desc, x_in.data.ptr,
                x_desc, dy_in.data.ptr,  # dyDesc: x's
                x_desc, dx.data.ptr,  # dxDesc: x's
                p_desc, gamma_in.data.ptr, dgamma.data.ptr, dbeta.data.ptr, checked.eps,
                pointer(saved_mean), pointer(saved_inv_std),  # savedMean, savedInvVariance: NULL to recompute
            )
        overflowed = plan.persistent and after_persistent(
            cupy, handle, lane, BACKWARD, plan, None if saved is None or computed_by_forward(saved) else saved
        )
    finally:
        give_back(handle)
    if overflowed:
        after_overflow("cudnnBatchNormalizationBackward", BACKWARD, "backward", plan, on_overflow)
        plain_saved = None
        if saved is not None:
            plain_saved = trusted_saved_stats(saved.mean, saved.inv_std, Mode.SPATIAL, saved.eps, saved.channel_axis)
        return backward(x, dy, gamma, plain_saved, Mode.SPATIAL, checked.eps, channel_axis, OnOverflow.IGNORE)
    if plan.param_from_cudnn is not None:
        dgamma, dbeta = plan.param_out(cupy, dgamma), plan.param_out(cupy, dbeta)
    return dx, dgamma, dbeta
