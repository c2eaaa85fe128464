"""Batch normalization on CuPy arrays through cuDNN: the three modes, the overflow check,
the Ex fast path. Arguments are validated by the same checks as the NumPy reference before any
native call; ``mode`` arrives here already concrete (the "auto" policy lives in the API layer).
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import warnings

import numpy as np

from . import raw
from .descriptors import data_descriptor, param_descriptor
from .errors import CudnnOverflowError
from .handles import handle_for
from .._core.layout import Layout
from .._core.modes import Mode, OnOverflow
from .raw import BatchNormOps, ErrQueryMode, Status
from .._core.saved import SavedStats
from .._core.validate import check_backward, check_forward_inference, check_forward_training

__all__ = ["backward", "forward_inference", "forward_training", "set_ex_path_enabled", "uses_ex_path"]

# alpha = 1, beta = 0 scalars typed to the data: C float for half/float data, C double for double.
_ONE_ZERO = {
    False: (ctypes.c_float(1.0), ctypes.c_float(0.0)),
    True: (ctypes.c_double(1.0), ctypes.c_double(0.0)),
}


def _scalars(data_dtype) -> tuple[int, int]:
    one, zero = _ONE_ZERO[np.dtype(data_dtype) == np.float64]
    return ctypes.addressof(one), ctypes.addressof(zero)


def _cupy():
    import cupy

    return cupy


def _same_device(**named) -> int:
    devices = {name: array.device.id for name, array in named.items() if array is not None}
    if len(set(devices.values())) > 1:
        detail = ", ".join(f"{name} on device {device}" for name, device in devices.items())
        raise ValueError(f"arrays on different devices: expected one device, got {detail}")
    return devices["x"]


def _pointer(array) -> int | None:
    return None if array is None else array.data.ptr


_EX_PATH = {"enabled": True}


def set_ex_path_enabled(enabled: bool) -> bool:
    """Turn the Ex fast path on or off (for benchmarking it against the plain call); returns the old setting."""
    previous, _EX_PATH["enabled"] = _EX_PATH["enabled"], bool(enabled)
    return previous


def uses_ex_path(layout: Layout, data_dtype) -> bool:
    """Persistent + channels-last + float16 + C % 4 == 0 runs the Ex calls (NVIDIA's fast NHWC kernels)."""
    return (
        _EX_PATH["enabled"]
        and layout.mode is Mode.SPATIAL_PERSISTENT
        and layout.channels_last
        and np.dtype(data_dtype) == np.float16
        and layout.channels % 4 == 0
    )


class _Call:
    """Everything one cuDNN call needs that is derived from the validated arguments."""

    def __init__(self, layout: Layout, data_dtype, param_dtype, x):
        cupy = _cupy()
        self.layout, self.data_dtype, self.param_dtype = layout, np.dtype(data_dtype), np.dtype(param_dtype)
        self.x = cupy.ascontiguousarray(x)
        # C-order strides computed from the shape: a contiguous array may carry any stride on a
        # size-1 dim (even 0), which cuDNN would refuse
        strides = tuple(int(np.prod(layout.shape[axis + 1 :])) for axis in range(layout.ndim))
        self.data_desc = data_descriptor(layout, strides, self.data_dtype).pointer
        self.param_desc = param_descriptor(layout, strides, self.data_dtype).pointer
        self.alpha, self.beta = _scalars(self.data_dtype)
        self.cudnn_param_shape = (
            layout.param_shape
            if layout.param_axes_to_cudnn is None
            else tuple(layout.param_shape[a] for a in layout.param_axes_to_cudnn)
        )

    def data(self, array):
        """An x-shaped input as a C-contiguous array (same strides as x here)."""
        return _cupy().ascontiguousarray(array)

    def param_in(self, array):
        """A parameter in the parameter dtype and cuDNN's axis order, contiguous."""
        cupy = _cupy()
        array = array.astype(self.param_dtype, copy=False)
        if self.layout.param_axes_to_cudnn is not None:
            array = array.transpose(self.layout.param_axes_to_cudnn)
        return cupy.ascontiguousarray(array)

    def param_out(self, array):
        """A cuDNN-ordered parameter-shaped result back in x's axis order."""
        axes = self.layout.param_axes_to_cudnn
        if axes is None:
            return array
        return _cupy().ascontiguousarray(array.transpose(tuple(int(a) for a in np.argsort(axes))))

    def new_param(self):
        return _cupy().empty(self.cudnn_param_shape, dtype=self.param_dtype)

    def running_in(self, array):
        """The running statistic itself when cuDNN can update it in place, else a converted copy."""
        if array is None:
            return None
        direct = (
            array.dtype == self.param_dtype
            and array.flags.c_contiguous
            and self.layout.param_axes_to_cudnn is None
        )
        return array if direct else self.param_in(array)

    def running_back(self, working, caller) -> None:
        """Copy an updated temporary back into the caller's running statistic (own dtype and order)."""
        if working is not None and working is not caller:
            caller[...] = self.param_out(working).astype(caller.dtype, copy=False)


def _as_spatial(checked):
    """The same call in SPATIAL mode: what an overflowing SPATIAL_PERSISTENT call falls back to."""
    layout = checked.layout
    return dataclasses.replace(checked, layout=Layout(layout.shape, layout.channel_axis, Mode.SPATIAL))


def _bound_handle(device_id: int) -> int:
    return handle_for(device_id).bind_stream(_cupy().cuda.get_current_stream().ptr)


def _overflowed(handle: int) -> bool:
    """Blocking cudnnQueryRuntimeError right after the call (no cudnnSetStream in between)."""
    runtime_status = ctypes.c_int(0)
    raw.library().cudnnQueryRuntimeError(handle, ctypes.byref(runtime_status), int(ErrQueryMode.BLOCKING), None)
    if runtime_status.value == Status.RUNTIME_FP_OVERFLOW:
        return True
    raw.check_status("cudnnQueryRuntimeError (kernel status)", runtime_status.value)
    return False


_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_fallback(operation: str, shape, dtype) -> None:
    key = (operation, tuple(shape), str(dtype))
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(
        f"cudnn_bn: SPATIAL_PERSISTENT {operation} overflowed for shape {tuple(shape)} {dtype}; "
        "re-ran with SPATIAL (this warning is shown once per shape)",
        RuntimeWarning,
        stacklevel=4,
    )


def _overflow_error(function: str) -> CudnnOverflowError:
    return CudnnOverflowError(
        int(Status.RUNTIME_FP_OVERFLOW),
        "CUDNN_STATUS_RUNTIME_FP_OVERFLOW",
        function,
        "SPATIAL_PERSISTENT overflowed; running statistics were restored. Use mode='spatial' or on_overflow='fallback'",
    )


def _training_ex(call: _Call, handle, y, gamma, beta, running_mean, running_var, momentum, eps, save_mean, save_inv_std):
    library = raw.library()
    mode, ops = int(Mode.SPATIAL_PERSISTENT), int(BatchNormOps.BN)
    workspace_size, reserve_size = ctypes.c_size_t(), ctypes.c_size_t()
    library.cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(
        handle, mode, ops, call.data_desc, None, call.data_desc, call.param_desc, None, ctypes.byref(workspace_size)
    )
    library.cudnnGetBatchNormalizationTrainingExReserveSpaceSize(
        handle, mode, ops, None, call.data_desc, ctypes.byref(reserve_size)
    )
    cupy = _cupy()
    workspace = cupy.empty(max(workspace_size.value, 1), dtype=cupy.uint8)
    reserve = cupy.empty(max(reserve_size.value, 1), dtype=cupy.uint8)
    library.cudnnBatchNormalizationForwardTrainingEx(
        handle, mode, ops, call.alpha, call.beta, call.data_desc, call.x.data.ptr, None, None,
        call.data_desc, y.data.ptr, call.param_desc, gamma.data.ptr, beta.data.ptr, momentum,
        _pointer(running_mean), _pointer(running_var), eps, save_mean.data.ptr, save_inv_std.data.ptr,
        None, workspace.data.ptr, workspace_size.value, reserve.data.ptr, reserve_size.value,
    )
    return reserve


def forward_training(x, gamma, beta, running_mean=None, running_var=None, *, mode: Mode, momentum, eps, channel_axis, on_overflow: OnOverflow):
    """cuDNN forward training on cupy arrays; same contract as :func:`cudnn_bn.reference.forward_training`."""
    checked, momentum = check_forward_training(
        x, gamma, beta, running_mean, running_var, mode=mode, momentum=momentum, eps=eps, channel_axis=channel_axis
    )
    device_id = _same_device(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return _forward_training_on_device(checked, x, gamma, beta, running_mean, running_var, momentum, on_overflow, device_id)


def _forward_training_on_device(checked, x, gamma, beta, running_mean, running_var, momentum, on_overflow, device_id):
    cupy = _cupy()
    layout = checked.layout
    call = _Call(layout, checked.data_dtype, checked.param_dtype, x)
    gamma_in, beta_in = call.param_in(gamma), call.param_in(beta)
    mean_in, var_in = call.running_in(running_mean), call.running_in(running_var)
    persistent_checked = layout.mode is Mode.SPATIAL_PERSISTENT and on_overflow is not OnOverflow.IGNORE
    backup = (mean_in.copy(), var_in.copy()) if persistent_checked and mean_in is not None else None
    y = cupy.empty(call.x.shape, dtype=checked.data_dtype)
    save_mean, save_inv_std = call.new_param(), call.new_param()
    handle = _bound_handle(device_id)
    reserve = None
    if uses_ex_path(layout, checked.data_dtype):
        reserve = _training_ex(
            call, handle, y, gamma_in, beta_in, mean_in, var_in, momentum, checked.eps, save_mean, save_inv_std
        )
    else:
        raw.library().cudnnBatchNormalizationForwardTraining(
            handle, int(layout.mode), call.alpha, call.beta, call.data_desc, call.x.data.ptr, call.data_desc,
            y.data.ptr, call.param_desc, gamma_in.data.ptr, beta_in.data.ptr, momentum, _pointer(mean_in),
            _pointer(var_in), checked.eps, save_mean.data.ptr, save_inv_std.data.ptr,
        )
    if persistent_checked and _overflowed(handle):
        if backup is not None:
            mean_in[...], var_in[...] = backup
        if on_overflow is OnOverflow.RAISE:
            raise _overflow_error("cudnnBatchNormalizationForwardTraining")
        _warn_fallback("forward_training", layout.shape, checked.data_dtype)
        fallback = _as_spatial(checked)
        return _forward_training_on_device(fallback, x, gamma, beta, running_mean, running_var, momentum, OnOverflow.IGNORE, device_id)
    call.running_back(mean_in, running_mean)
    call.running_back(var_in, running_var)
    saved = SavedStats(
        mean=call.param_out(save_mean),
        inv_std=call.param_out(save_inv_std),
        mode=layout.mode,
        eps=checked.eps,
        channel_axis=layout.public_channel_axis,
        reserve_space=reserve,
    )
    return y, saved


def forward_inference(x, gamma, beta, mean, var, *, mode: Mode, eps, channel_axis):
    """cuDNN forward inference on cupy arrays; same contract as :func:`cudnn_bn.reference.forward_inference`."""
    checked = check_forward_inference(x, gamma, beta, mean, var, mode=mode, eps=eps, channel_axis=channel_axis)
    if checked.layout.mode is Mode.SPATIAL_PERSISTENT:
        # persistent is a training-kernel choice with the same math; inference runs SPATIAL, as
        # PyTorch does, since cuDNN documents only PER_ACTIVATION and SPATIAL for this call
        checked = _as_spatial(checked)
    device_id = _same_device(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        call = _Call(checked.layout, checked.data_dtype, checked.param_dtype, x)
        params = [call.param_in(array) for array in (gamma, beta, mean, var)]
        y = cupy.empty(call.x.shape, dtype=checked.data_dtype)
        raw.library().cudnnBatchNormalizationForwardInference(
            _bound_handle(device_id), int(checked.layout.mode), call.alpha, call.beta, call.data_desc,
            call.x.data.ptr, call.data_desc, y.data.ptr, call.param_desc, *(p.data.ptr for p in params), checked.eps,
        )
        return y


def backward(x, dy, gamma, saved, *, mode: Mode, eps, channel_axis, on_overflow: OnOverflow):
    """cuDNN backward on cupy arrays; same contract as :func:`cudnn_bn.reference.backward`
    (``mode``, ``eps`` and ``channel_axis`` already settled against ``saved``)."""
    checked = check_backward(x, dy, gamma, saved, mode=mode, eps=eps, channel_axis=channel_axis)
    named = {"x": x, "dy": dy, "gamma": gamma}
    if saved is not None:
        named.update(saved_mean=saved.mean, saved_inv_std=saved.inv_std)
    device_id = _same_device(**named)
    with _cupy().cuda.Device(device_id):
        return _backward_on_device(checked, x, dy, gamma, saved, on_overflow, device_id)


def _backward_on_device(checked, x, dy, gamma, saved, on_overflow, device_id):
    cupy = _cupy()
    layout = checked.layout
    call = _Call(layout, checked.data_dtype, checked.param_dtype, x)
    dy_in, gamma_in = call.data(dy), call.param_in(gamma)
    saved_mean = None if saved is None else call.param_in(saved.mean)
    saved_inv_std = None if saved is None else call.param_in(saved.inv_std)
    dx = cupy.empty(call.x.shape, dtype=checked.data_dtype)
    dgamma, dbeta = call.new_param(), call.new_param()
    handle = _bound_handle(device_id)
    library = raw.library()
    reserve = None if saved is None else saved.reserve_space
    if reserve is not None and uses_ex_path(layout, checked.data_dtype):
        mode, ops = int(layout.mode), int(BatchNormOps.BN)
        workspace_size = ctypes.c_size_t()
        library.cudnnGetBatchNormalizationBackwardExWorkspaceSize(
            handle, mode, ops, call.data_desc, None, call.data_desc, None, call.data_desc, call.param_desc, None,
            ctypes.byref(workspace_size),
        )
        workspace = cupy.empty(max(workspace_size.value, 1), dtype=cupy.uint8)
        library.cudnnBatchNormalizationBackwardEx(
            handle, mode, ops, call.alpha, call.beta, call.alpha, call.beta, call.data_desc, call.x.data.ptr,
            None, None, call.data_desc, dy_in.data.ptr, None, None, call.data_desc, dx.data.ptr, call.param_desc,
            gamma_in.data.ptr, None, dgamma.data.ptr, dbeta.data.ptr, checked.eps, _pointer(saved_mean),
            _pointer(saved_inv_std), None, workspace.data.ptr, workspace_size.value, reserve.data.ptr, reserve.size,
        )
    else:
        library.cudnnBatchNormalizationBackward(
            handle, int(layout.mode), call.alpha, call.beta, call.alpha, call.beta, call.data_desc, call.x.data.ptr,
            call.data_desc, dy_in.data.ptr, call.data_desc, dx.data.ptr, call.param_desc, gamma_in.data.ptr,
            dgamma.data.ptr, dbeta.data.ptr, checked.eps, _pointer(saved_mean), _pointer(saved_inv_std),
        )
    if layout.mode is Mode.SPATIAL_PERSISTENT and on_overflow is not OnOverflow.IGNORE and _overflowed(handle):
        if on_overflow is OnOverflow.RAISE:
            raise _overflow_error("cudnnBatchNormalizationBackward")
        _warn_fallback("backward", layout.shape, checked.data_dtype)
        fallback = _as_spatial(checked)
        plain_saved = None if saved is None else SavedStats(saved.mean, saved.inv_std, Mode.SPATIAL, saved.eps, saved.channel_axis)
        return _backward_on_device(fallback, x, dy, gamma, plain_saved, OnOverflow.IGNORE, device_id)
    return dx, call.param_out(dgamma), call.param_out(dbeta)
