"""cuDNN tensor and activation descriptors owned by Python objects, and their cache.

A descriptor is released by ``close()`` (idempotent), by leaving a ``with`` block, or by its
``weakref.finalize`` when the object is collected. The cache only drops its reference when it
evicts, so a descriptor another thread is still using stays alive until that thread lets go.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import weakref

import numpy as np

from . import raw
from .._core.layout import Layout, cudnn_dims_and_strides
from .._core.modes import Mode
from .raw import DataType

__all__ = [
    "ActivationDescriptor",
    "DescriptorCache",
    "TensorDescriptor",
    "cudnn_data_type",
    "data_descriptor",
    "param_descriptor",
]

_DATA_TYPES = {"float16": DataType.HALF, "float32": DataType.FLOAT, "float64": DataType.DOUBLE, "bfloat16": DataType.BFLOAT16}
_CUDNN_MAX_DIMS = 8  # CUDNN_DIM_MAX


def cudnn_data_type(dtype) -> DataType:
    """cudnnDataType_t for a floating dtype (TypeError for anything cuDNN batch norm cannot take)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return _DATA_TYPES[name]
    except KeyError:
        raise TypeError(f"dtype: expected one of {sorted(_DATA_TYPES)}, got {name}") from None


def _destroy(destroy_name: str, pointer: int) -> None:
    library = raw.library()
    getattr(library, destroy_name)(pointer)


class _Owned:
    """Owns one cuDNN descriptor pointer; subclasses name the create and destroy functions."""

    _create: str
    _destroy: str

    def __init__(self):
        library = raw.library()
        pointer = ctypes.c_void_p()
        getattr(library, self._create)(ctypes.byref(pointer))
        self._pointer = pointer.value
        self._finalizer = weakref.finalize(self, _destroy, self._destroy, self._pointer)

    @property
    def pointer(self) -> int:
        """The raw descriptor (an int), for the raw layer."""
        if not self._finalizer.alive:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._pointer

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Destroy the cuDNN descriptor now; later calls do nothing."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TensorDescriptor(_Owned):
    """A ``cudnnTensorDescriptor_t`` set with explicit dims and strides (4-D or 5-D)."""

    _create = "cudnnCreateTensorDescriptor"
    _destroy = "cudnnDestroyTensorDescriptor"

    @classmethod
    def from_dims(cls, data_type: DataType, dims, strides) -> "TensorDescriptor":
        if not 4 <= len(dims) <= 5 or len(strides) != len(dims):
            raise ValueError(f"dims, strides: expected 4 or 5 of each, got {tuple(dims)} and {tuple(strides)}")
        if any(int(d) < 1 for d in dims) or any(int(s) < 1 for s in strides):
            raise ValueError(f"dims, strides: expected positive values, got {tuple(dims)} and {tuple(strides)}")
        descriptor = cls()
        int_array = ctypes.c_int * len(dims)
        raw.library().cudnnSetTensorNdDescriptor(
            descriptor.pointer, int(data_type), len(dims), int_array(*dims), int_array(*strides)
        )
        return descriptor

    @classmethod
    def derived_for_batch_norm(cls, data: "TensorDescriptor", mode: Mode) -> "TensorDescriptor":
        """The parameter/statistics descriptor cuDNN derives from a data descriptor and mode."""
        descriptor = cls()
        raw.library().cudnnDeriveBNTensorDescriptor(descriptor.pointer, data.pointer, int(mode))
        return descriptor

    def describe(self) -> tuple[DataType, tuple[int, ...], tuple[int, ...]]:
        """Read back (data type, dims, strides) with cudnnGetTensorNdDescriptor."""
        data_type, nb_dims = ctypes.c_int(), ctypes.c_int()
        dims, strides = (ctypes.c_int * _CUDNN_MAX_DIMS)(), (ctypes.c_int * _CUDNN_MAX_DIMS)()
        raw.library().cudnnGetTensorNdDescriptor(
            self.pointer, _CUDNN_MAX_DIMS, ctypes.byref(data_type), ctypes.byref(nb_dims), dims, strides
        )
        count = nb_dims.value
        return DataType(data_type.value), tuple(dims[:count]), tuple(strides[:count])


class ActivationDescriptor(_Owned):
    """A ``cudnnActivationDescriptor_t`` (for the Ex calls' fused activation)."""

    _create = "cudnnCreateActivationDescriptor"
    _destroy = "cudnnDestroyActivationDescriptor"

    @classmethod
    def of(cls, mode: raw.ActivationMode, coef: float = 0.0) -> "ActivationDescriptor":
        descriptor = cls()
        raw.library().cudnnSetActivationDescriptor(
            descriptor.pointer, int(mode), int(raw.NanPropagation.NOT_PROPAGATE_NAN), float(coef)
        )
        return descriptor


class DescriptorCache:
    """Descriptors keyed by what defines them, so repeated shapes create nothing new.

    Bounded (least recently used dropped first); thread-safe.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.created = 0  # descriptors ever created through this cache, for tests and diagnostics

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key, make):
        with self._lock:
            descriptor = self._entries.get(key)
            if descriptor is not None:
                self._entries.move_to_end(key)
                return descriptor
            descriptor = make()
            self.created += 1
            self._entries[key] = descriptor
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return descriptor

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = DescriptorCache()


def data_descriptor(layout: Layout, strides, dtype) -> TensorDescriptor:
    """Descriptor of an x-shaped array with the given element strides (cached by shape, strides, dtype)."""
    dims, dim_strides = cudnn_dims_and_strides(layout, strides)
    data_type = cudnn_data_type(dtype)
    return CACHE.get(("data", dims, dim_strides, data_type), lambda: TensorDescriptor.from_dims(data_type, dims, dim_strides))


def param_descriptor(layout: Layout, strides, dtype) -> TensorDescriptor:
    """Descriptor of gamma, beta and the statistics, derived by cuDNN from the data descriptor."""
    dims, dim_strides = cudnn_dims_and_strides(layout, strides)
    data_type = cudnn_data_type(dtype)
    data = data_descriptor(layout, strides, dtype)
    return CACHE.get(
        ("param", dims, dim_strides, data_type, layout.mode.is_spatial),
        lambda: TensorDescriptor.derived_for_batch_norm(data, layout.mode),
    )
