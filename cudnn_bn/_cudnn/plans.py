"""One plan per call signature: everything a batch-norm call derives from its signature, built
once and cached.

The signature is (operation, shape, data dtype, mode, channel axis, device); x is always passed
to cuDNN C-contiguous, so its strides follow from the shape. A plan holds the Layout, the owned
descriptors (a call keeps its plan, and so its descriptors, referenced until its native calls
return), the typed alpha/beta scalars, the parameter transposes, the route around cuDNN's limits
and, for the Ex path, the workspace and reserve sizes. A call then only looks its plan up, checks
what depends on values, and calls C.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .._core.layout import Layout, cudnn_columns_dims_and_strides, cudnn_dims_and_strides
from .._core.modes import Mode
from .._core.policy import BACKWARD, INFERENCE, TRAINING  # the operation names, defined once
from .._core.validate import param_dtype_for
from . import raw
from .descriptors import ActivationDescriptor, TensorDescriptor, cudnn_data_type
from .limits import ROUTE_AS_SPATIAL_COLUMNS, check_descriptor_fits, ex_path_unmet, inference_chunk, training_route
from .raw import BatchNormOps

__all__ = [
    "BACKWARD", "INFERENCE", "PLANS", "TRAINING", "ChunkedPlan", "Plan", "PlanCache", "plan_for", "set_ex_path_enabled",
    "uses_ex_path",
]


# alpha = 1, beta = 0 typed to the data: C float for half/float data, C double for double data.
# Module-level objects, so the addresses stay valid for the life of the process.
_FLOAT_ONE, _FLOAT_ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)
_DOUBLE_ONE, _DOUBLE_ZERO = ctypes.c_double(1.0), ctypes.c_double(0.0)
_SCALARS = {
    False: (ctypes.addressof(_FLOAT_ONE), ctypes.addressof(_FLOAT_ZERO)),
    True: (ctypes.addressof(_DOUBLE_ONE), ctypes.addressof(_DOUBLE_ZERO)),
}

_ex_path_enabled = True  # set_ex_path_enabled's toggle; plans record it when they are built


def _c_order_strides(shape) -> tuple[int, ...]:
    # computed from the shape: a contiguous array may carry any stride on a size-1 dim (even 0),
    # which cuDNN would refuse
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class Plan:
    """What one call signature needs; see the module docstring. Immutable once built, except the
    Ex sizes, which are queried on the first call that needs them."""

    __slots__ = (
        "layout", "operation", "device_id", "data_dtype", "param_dtype", "cudnn_mode", "data_desc",
        "param_desc", "alpha", "beta", "cudnn_param_shape", "param_to_cudnn", "param_from_cudnn",
        "uses_ex", "pieces", "route", "fused_sizes", "activations", "persistent", "data_desc_pointer",
        "param_desc_pointer",
    )

    def __init__(self, operation: str, layout: Layout, data_dtype, device_id: int):
        self.operation, self.layout, self.device_id = operation, layout, device_id
        self.data_dtype = np.dtype(data_dtype)
        self.param_dtype = param_dtype_for(self.data_dtype)
        self.pieces = None  # a single call; ChunkedPlan has the pieces
        self.route = training_route(layout) if operation != INFERENCE else None
        cudnn_mode = layout.mode
        if self.route == ROUTE_AS_SPATIAL_COLUMNS:  # the parameters lie in x's order: no transpose
            dims, strides = cudnn_columns_dims_and_strides(layout)
            if cudnn_mode is Mode.PER_ACTIVATION:  # per column over the rows is SPATIAL here
                cudnn_mode = Mode.SPATIAL
            self.param_to_cudnn = self.param_from_cudnn = None
            self.cudnn_param_shape = layout.param_shape
        else:
            dims, strides = cudnn_dims_and_strides(layout, _c_order_strides(layout.shape))
            self.param_to_cudnn, self.param_from_cudnn = layout.param_axes_to_cudnn, layout.param_axes_from_cudnn
            self.cudnn_param_shape = layout.cudnn_param_shape
        check_descriptor_fits(dims, strides, "x")
        self.cudnn_mode = int(cudnn_mode)
        self.data_desc = TensorDescriptor.from_dims(cudnn_data_type(self.data_dtype), dims, strides)
        self.param_desc = TensorDescriptor.derived_for_batch_norm(self.data_desc, cudnn_mode)
        # the raw pointers, read once: valid as long as this plan (which owns the descriptors) lives
        self.data_desc_pointer, self.param_desc_pointer = self.data_desc.pointer, self.param_desc.pointer
        self.persistent = layout.mode is Mode.SPATIAL_PERSISTENT
        self.alpha, self.beta = _SCALARS[self.data_dtype == np.float64]
        self.uses_ex = (
            _ex_path_enabled and operation != INFERENCE and self.route is None
            and not ex_path_unmet(layout, self.data_dtype)
        )
        self.fused_sizes = {}  # (bnOps, activation) -> Ex sizes, queried on first use
        self.activations = {}  # activation -> the ActivationDescriptor this plan owns

    # ---- parameters: x's axis order and the caller's dtype <-> cuDNN's order and dtype ----
    def param_as_is(self, array) -> bool:
        """Whether a parameter-shaped array already is what cuDNN reads (and may write in place):
        the parameter dtype, cuDNN's axis order, contiguous."""
        return array.dtype == self.param_dtype and self.param_to_cudnn is None and array.flags.c_contiguous

    def param_in(self, cupy, array):
        """A parameter in the parameter dtype and cuDNN's axis order, contiguous (itself when it
        already is)."""
        if self.param_as_is(array):
            return array  # the common case: no CuPy call at all
        array = array.astype(self.param_dtype, copy=False)
        if self.param_to_cudnn is not None:
            array = array.transpose(self.param_to_cudnn)
        return cupy.ascontiguousarray(array)

    def param_out(self, cupy, array):
        """A cuDNN-ordered parameter-shaped result back in x's axis order."""
        if self.param_from_cudnn is None:
            return array
        return cupy.ascontiguousarray(array.transpose(self.param_from_cudnn))

    def running_in(self, cupy, array):
        """The running statistic itself when cuDNN can update it in place, else a converted copy."""
        if array is None:
            return None
        return self.param_in(cupy, array)

    def running_back(self, cupy, working, caller) -> None:
        """Copy an updated temporary back into the caller's running statistic (own dtype and order)."""
        if working is not None and working is not caller:
            caller[...] = self.param_out(cupy, working).astype(caller.dtype, copy=False)

    def new_params(self, cupy):
        """Two new parameter-shaped arrays in cuDNN's order and dtype (a call's two results)."""
        shape, dtype = self.cudnn_param_shape, self.param_dtype
        return cupy.empty(shape, dtype), cupy.empty(shape, dtype)

    # ---- the Ex path ----
    def ex_workspace_sizes(self, handle_pointer: int) -> tuple[int, int, int]:
        """(forward workspace, backward workspace, reserve) bytes of the plain Ex calls (bnOps BN)."""
        return self.fused_ex_sizes(handle_pointer, BatchNormOps.BN, None)

    # ---- the fused Ex calls (bnOps BN_ACTIVATION, BN_ADD_ACTIVATION) ----
    def activation_descriptor(self, activation) -> ActivationDescriptor:
        """The activation descriptor of ``activation`` (a cudnn_bn.Activation), made once and owned
        by this plan, so it lives as long as any call that holds the plan."""
        descriptor = self.activations.get(activation)
        if descriptor is None:
            descriptor = self.activations.setdefault(
                activation, ActivationDescriptor.of(raw.ActivationMode(int(activation)))
            )
        return descriptor

    def fused_ex_sizes(self, handle_pointer: int, ops: BatchNormOps, activation) -> tuple[int, int, int]:
        """(forward workspace, backward workspace, reserve) bytes of the Ex calls with ``ops`` and
        ``activation`` (None for BN), queried once per plan and (ops, activation): the reserve space holds what the
        fused backward needs (the activation's mask), so its size depends on the ops."""
        key = (ops, activation)
        sizes = self.fused_sizes.get(key)
        if sizes is None:
            ops = BatchNormOps(ops)
            library = raw.library()
            forward, backward, reserve = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
            x, p = self.data_desc.pointer, self.param_desc.pointer
            dz = x if ops is BatchNormOps.BN_ADD_ACTIVATION else None  # dzDesc: read only by BN_ADD_ACTIVATION
            act = None if activation is None else self.activation_descriptor(activation).pointer
            # zDesc in the forward query and yDesc in the backward one are the data descriptor for
            # every bnOps, as PyTorch and CuPy 13 pass them
            library.cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(
                handle_pointer, self.cudnn_mode, int(ops), x, x, x, p, act, ctypes.byref(forward)
            )
            library.cudnnGetBatchNormalizationBackwardExWorkspaceSize(
                handle_pointer, self.cudnn_mode, int(ops), x, x, x, dz, x, p, act, ctypes.byref(backward)
            )
            library.cudnnGetBatchNormalizationTrainingExReserveSpaceSize(
                handle_pointer, self.cudnn_mode, int(ops), act, x, ctypes.byref(reserve)
            )
            sizes = self.fused_sizes.setdefault(key, (forward.value, backward.value, reserve.value))
        return sizes


class PlanCache:
    """Plans by signature. Bounded (the oldest plan goes first); a plan that is dropped while a
    call still holds it stays alive, with its descriptors, until that call lets go."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._plans: dict = {}
        self._lock = threading.RLock()  # a chunked inference plan builds its pieces' plans inside
        self.created = 0  # plans ever built, for tests and diagnostics
        self._held_elsewhere: list = []  # clear() of each cache whose entries hold plans of this one

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = build()
                    self.created += 1
                    while len(self._plans) >= self.capacity:
                        del self._plans[next(iter(self._plans))]
                    self._plans[key] = plan
        return plan

    def empty_with_plans(self, clear) -> None:
        """Call ``clear`` whenever the plans are emptied: for a cache whose entries hold plans
        (signatures.py's settled signatures), so that none outlives a change of what plans record."""
        self._held_elsewhere.append(clear)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            for clear in self._held_elsewhere:
                clear()


PLANS = PlanCache()


class ChunkedPlan:
    """Inference past cuDNN's limits, run as the same call in pieces along N (inference
    statistics are fixed, so the pieces give exactly the whole). ``pieces``: (start, stop, Plan)."""

    __slots__ = ("layout", "pieces")

    def __init__(self, layout: Layout, pieces):
        self.layout, self.pieces = layout, pieces

    def __getattr__(self, name):  # parameters are the same for every piece
        return getattr(self.pieces[0][2], name)


def _build(operation: str, layout: Layout, data_dtype, device_id: int):
    if operation == INFERENCE:
        chunk, batch = inference_chunk(layout), layout.shape[0]
        if chunk < batch:
            pieces = []
            for start in range(0, batch, chunk):
                stop = min(start + chunk, batch)
                piece = Layout((stop - start,) + layout.shape[1:], layout.channel_axis, layout.mode)
                pieces.append((start, stop, plan_for(INFERENCE, piece, data_dtype, device_id)))
            return ChunkedPlan(layout, tuple(pieces))
    return Plan(operation, layout, data_dtype, device_id)


def plan_for(operation: str, layout: Layout, data_dtype, device_id: int) -> Plan:
    """The cached plan of this signature (built on first use; CudnnLimitError past cuDNN's limits)."""
    key = (operation, layout.shape, layout.channel_axis, layout.mode, data_dtype, device_id)
    return PLANS.get(key, lambda: _build(operation, layout, data_dtype, device_id))


def set_ex_path_enabled(enabled: bool) -> bool:
    """Turn the Ex fast path on or off (to benchmark it against the plain call); returns the old
    setting. Plans record the choice, so the cache is emptied."""
    global _ex_path_enabled
    previous, _ex_path_enabled = _ex_path_enabled, bool(enabled)
    PLANS.clear()
    return previous


def uses_ex_path(layout: Layout, data_dtype) -> bool:
    """Whether a training or backward call on this layout and dtype runs the Ex calls."""
    return _ex_path_enabled and training_route(layout) is None and not ex_path_unmet(layout, data_dtype)

