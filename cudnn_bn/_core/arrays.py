"""What the package needs to know about an array argument, whatever the call: its kind (numpy or
cupy), the memory it may touch, its module, and a host copy of it.

Shared by the NumPy reference, the cuDNN path, the layer, compat and the tools. Every check here
raises a typed error naming the argument and never modifies it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np

__all__ = [
    "OPTIONAL_ARRAYS",
    "array_kind",
    "array_module",
    "byte_range",
    "check_no_overlap",
    "check_writable",
    "elements_may_share_memory",
    "host_array",
    "is_cupy",
    "kind_module",
    "uniform_kind",
]

# The arguments a call may leave as None; every other array argument is required.
OPTIONAL_ARRAYS = ("running_mean", "running_var")


def is_cupy(array) -> bool:
    """A cupy.ndarray (not any other object of CuPy's, such as a Device or a Stream)."""
    if type(array).__module__.split(".")[0] != "cupy":
        return False
    cupy = sys.modules.get("cupy")  # loaded, since one of its objects exists
    return cupy is not None and isinstance(array, cupy.ndarray)


_KIND_OF_TYPE: dict = {np.ndarray: "numpy"}


def uniform_kind(required, optional=()) -> str | None:
    """What array_kind would return, when the types alone tell: the ``required`` arrays and the
    ``optional`` ones that are not None all of one type that already passed array_kind's checks;
    None when the full check must run."""
    array_type = type(required[0])
    for array in required:
        if type(array) is not array_type:
            return None
    for array in optional:
        if array is not None and type(array) is not array_type:
            return None
    return _KIND_OF_TYPE.get(array_type)


def array_kind(*, optional=OPTIONAL_ARRAYS, **named) -> str:
    """Return "numpy" or "cupy" for the given arrays; TypeError for a non-array or mixed kinds.

    None is accepted only for the names in ``optional`` (the running statistics). A numpy masked
    array or matrix is refused: the computation would silently ignore the mask, or reshape a
    matrix into something else.
    """
    kinds = {}
    for name, array in named.items():
        if array is None:
            if name in optional:
                continue
            raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got None")
        kind = _KIND_OF_TYPE.get(type(array))
        if kind is not None:
            kinds[name] = kind
        elif is_cupy(array):
            kinds[name] = "cupy"
        elif type(array).__module__.split(".")[0] == "cupy":
            raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got CuPy's {type(array).__name__}")
        elif isinstance(array, np.ma.MaskedArray):
            raise TypeError(
                f"{name}: expected a plain numpy.ndarray, got a numpy masked array (its mask would be "
                f"ignored); pass {name}.filled(value) or drop the masked entries first"
            )
        elif isinstance(array, np.matrix):
            raise TypeError(f"{name}: expected a plain numpy.ndarray, got a numpy.matrix; pass np.asarray({name})")
        elif isinstance(array, np.ndarray):
            kinds[name] = "numpy"
        else:
            raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got {type(array).__name__}")
        if kind is None and len(_KIND_OF_TYPE) < 64:  # an accepted type: the checks above hold for all its objects
            _KIND_OF_TYPE[type(array)] = kinds[name]
    found = set(kinds.values())
    if len(found) > 1:
        detail = ", ".join(f"{name}={kind}" for name, kind in kinds.items())
        raise TypeError(f"arrays of mixed kinds: expected all numpy or all cupy, got {detail}")
    return found.pop() if found else "numpy"


def kind_module(kind: str):
    """The array module of a kind that array_kind returned: numpy, or cupy."""
    if kind == "numpy":
        return np
    import cupy  # reached only for cupy arrays, so cupy is importable

    return cupy


def array_module(array):
    """numpy, or cupy for a cupy array."""
    return kind_module("cupy" if is_cupy(array) else "numpy")


def host_array(array, dtype=None, *, copy: bool = True) -> np.ndarray:
    """``array``'s values in a numpy array on the host, in ``dtype`` (None: its own).

    numpy arrays are copied (``copy=False``: only where the dtype asks for it); cupy arrays, and
    other arrays with a ``get()`` to the host, are read back; torch tensors (whose state the layer
    loads) go through ``detach().cpu()``, bfloat16 as float32, which numpy lacks."""
    fresh = False  # a new host array that no one else holds
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        array = tensor.numpy()  # shares the CPU tensor's memory
    elif hasattr(array, "get") and not isinstance(array, Mapping) and (
        type(array).__module__.split(".")[0] == "cupy" or not isinstance(array, np.ndarray)
    ):  # cupy (or an array posing as one), or another array that reads back with get()
        array, fresh = array.get(), True
    if copy and not fresh:
        return np.array(array, dtype=dtype, copy=True)
    return np.asarray(array, dtype=dtype)


def byte_range(array) -> tuple[int, int] | None:
    """[first, last + 1) byte addresses an array can touch; None for an empty array.

    Conservative: the bounds of the strided extent, so two arrays that interleave without
    sharing an element still count as overlapping.
    """
    if array.size == 0:
        return None
    if type(array) is np.ndarray or _is_numpy(array):
        start = array.__array_interface__["data"][0]
    else:  # cupy (or an array posing as one): the device address of the first element
        start = array.data.ptr
    flags = getattr(array, "flags", None)
    if flags is not None and flags.c_contiguous:  # the common case, without the loop
        return start, start + array.nbytes
    low = high = start
    for size, stride in zip(array.shape, array.strides):
        step = (size - 1) * stride
        if step < 0:
            low += step
        else:
            high += step
    return low, high + array.itemsize


def _is_numpy(array) -> bool:
    """A numpy array of any ndarray subclass (numpy.memmap, ...) that does not pose as cupy: its
    ``.data`` is a memoryview, not a device pointer."""
    array_type = type(array)
    kind = _KIND_OF_TYPE.get(array_type)
    if kind is None:
        kind = "cupy" if array_type.__module__.split(".")[0] == "cupy" else "numpy"
    return kind == "numpy" and isinstance(array, np.ndarray)


def check_no_overlap(written: dict, read: dict) -> None:
    """Refuse any array in ``written`` (updated in place) whose memory may overlap another argument.

    Both dicts map argument names to arrays (None entries skipped). Works for numpy and cupy
    arrays alike; may-share counts as sharing.
    """
    mine = _ranges(written)
    for name, low, high in mine:
        for other, other_low, other_high in mine + _ranges(read):
            if other != name and low < other_high and other_low < high:
                raise ValueError(
                    f"{name}: expected memory of its own (it is written in place), got an array whose memory "
                    f"overlaps {other}'s; pass a separate array, e.g. {name}.copy()"
                )


def _ranges(named: dict) -> list:
    ranges = []
    for name, array in named.items():
        bounds = None if array is None else byte_range(array)
        if bounds is not None:
            ranges.append((name, bounds[0], bounds[1]))
    return ranges


def elements_may_share_memory(array) -> bool:
    """True when two elements of ``array`` may sit at one address (a stride 0, as broadcasting
    gives, or strides that interleave): writing such an array in place loses values."""
    extent = array.itemsize
    for stride, size in sorted((abs(int(s)), int(n)) for n, s in zip(array.shape, array.strides) if n > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def check_writable(name: str, array, how: str = "written") -> None:
    """Refuse a read-only ``array``, which the call writes (``how``: "written" or "updated") in place."""
    if not getattr(array.flags, "writeable", True):
        raise ValueError(f"{name}: expected a writable array (it is {how} in place), got a read-only one")
