"""cuDNN tensor and activation descriptors owned by Python objects.

A descriptor is released by ``close()`` (idempotent), by leaving a ``with`` block, or by its
``weakref.finalize`` when the object is collected. Whoever passes a descriptor to cuDNN keeps
the object (not its ``pointer``) referenced until the native call returns; the call plans of
``plans.py`` own the descriptors of every batch-norm call.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref

import numpy as np

from .._core.modes import Mode
from . import raw
from .limits import check_descriptor_fits
from .raw import DataType

__all__ = ["ActivationDescriptor", "TensorDescriptor", "cudnn_data_type", "descriptors_created"]

_DATA_TYPES = {
    "float16": DataType.HALF, "float32": DataType.FLOAT, "float64": DataType.DOUBLE, "bfloat16": DataType.BFLOAT16,
}
_CUDNN_MAX_DIMS = 8  # CUDNN_DIM_MAX


def cudnn_data_type(dtype) -> DataType:
    """cudnnDataType_t for a floating dtype (TypeError for anything cuDNN batch norm cannot take)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return _DATA_TYPES[name]
    except KeyError:
        raise TypeError(f"dtype: expected one of {sorted(_DATA_TYPES)}, got {name}") from None


_CREATED = itertools.count()  # next() is atomic under the GIL
_created_so_far = 0


def descriptors_created() -> int:
    """How many descriptors this process has created (a plan cache that works keeps this flat)."""
    return _created_so_far


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
        global _created_so_far
        _created_so_far = next(_CREATED) + 1
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
        check_descriptor_fits(dims, strides, "dims, strides")  # a C int array would truncate silently
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
