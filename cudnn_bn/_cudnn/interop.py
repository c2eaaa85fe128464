"""CUDA arrays of other libraries (PyTorch, JAX, Numba, ...) as CuPy arrays, without a copy.

Imported only when an argument is neither a numpy nor a cupy array, so numpy users never load
CuPy. An object is accepted through one of two protocols, tried in this order:

1. DLPack: ``__dlpack__`` with ``__dlpack_device__`` reporting a CUDA device. ``cupy.from_dlpack``
   passes CuPy's current stream as ``__dlpack__(stream=...)``; the producer then orders its
   pending work before that stream (on the GPU, without blocking the host).
2. ``__cuda_array_interface__`` (version 2 or 3): ``cupy.asarray`` wraps the pointer. Version 3's
   ``stream`` names the stream the producer's pending work is queued on; CuPy's current stream is
   made to wait for an event recorded there (``cupy.asarray`` may also synchronise that stream
   from the host, as ``CUPY_CUDA_ARRAY_INTERFACE_SYNC`` decides).

Both give a view of the producer's memory, so running statistics written into the view land in
the caller's object.
"""

from __future__ import annotations

import numpy as np

from .._core.arrays import array_kind

__all__ = ["ACCEPTED", "as_supported_array", "foreign_array_hint"]

ACCEPTED = (
    "a numpy.ndarray, a cupy.ndarray, or a CUDA array exposing __cuda_array_interface__ or "
    "__dlpack__ on a CUDA device (torch.cuda tensors, JAX, Numba, ...)"
)

# DLPack device types (dlpack.h DLDeviceType) that cupy.from_dlpack imports
_DLPACK_CPU = 1
_DLPACK_CUDA_DEVICES = {2: "kDLCUDA", 13: "kDLCUDAManaged"}
_DLPACK_DEVICE_NAMES = {1: "kDLCPU", 3: "kDLCUDAHost", 10: "kDLROCM", 11: "kDLROCMHost"}

# __cuda_array_interface__ v3 stream values: 0 is forbidden (ambiguous), 1 and 2 are the legacy
# and per-thread default streams, anything else is a cudaStream_t
_AMBIGUOUS_STREAM = 0


def _cupy():
    import cupy

    return cupy


def _type_name(value) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module.split('.')[0]}.{kind.__qualname__}"


def _is_numpy_or_cupy(name: str, value) -> bool:
    try:
        array_kind(**{name: value})
    except TypeError:
        if isinstance(value, np.ndarray):
            raise  # a numpy array the shared checks refuse (masked, matrix): their message says why
        return False
    return True


def _dlpack_device(value):
    """(device_type, device_id) from ``__dlpack_device__``, or None for an object without DLPack."""
    report = getattr(value, "__dlpack_device__", None)
    if report is None or getattr(value, "__dlpack__", None) is None:
        return None
    try:
        device_type, device_id = report()
        return int(device_type), int(device_id)
    except Exception:  # a producer that cannot say where it lives (or says it in other terms) is none here
        return None


def as_supported_array(name: str, value, *, written: bool = False):
    """``value`` itself when it is a numpy or cupy array, a zero-copy cupy view of it when it is a
    CUDA array of another library, else a TypeError naming what is accepted.

    ``written`` marks an argument the call updates in place (running statistics): a read-only
    ``__cuda_array_interface__`` is refused for it with a ValueError.
    """
    if value is None or _is_numpy_or_cupy(name, value):
        return value
    refusals = []
    device = _dlpack_device(value)
    if device is not None and device[0] in _DLPACK_CUDA_DEVICES:
        try:
            return _cupy().from_dlpack(value)
        except Exception as error:  # e.g. torch refusing a tensor that requires grad, or a dtype CuPy lacks
            refusals.append(f"__dlpack__ raised {type(error).__name__}: {error}")
    try:
        interface = value.__cuda_array_interface__
    except AttributeError:
        interface = None
    except Exception as error:  # torch raises RuntimeError here for a tensor that requires grad
        refusals.append(f"__cuda_array_interface__ raised {type(error).__name__}: {error}")
        interface = None
    if interface is not None:
        return _from_cuda_array_interface(name, value, interface, written)
    if refusals:
        raise _not_wrapped(name, value, refusals)
    if device is not None:
        where = _DLPACK_DEVICE_NAMES.get(device[0], f"device type {device[0]}")
        hint = " (for the NumPy reference pass numpy.from_dlpack(...))" if device[0] == _DLPACK_CPU else ""
        raise TypeError(f"{name}: expected {ACCEPTED}, got a {_type_name(value)} on DLPack device {where}{hint}")
    raise TypeError(f"{name}: expected {ACCEPTED}, got {_type_name(value)}")


def _not_wrapped(name: str, value, refusals: list) -> TypeError:
    """The error for a CUDA array that CuPy could not take, with each protocol's reason and, where
    this machine cannot run CuPy at all (no CuPy, no driver, no GPU), that reason in words."""
    reasons = "; ".join(refusals)
    try:
        from .availability import cupy_device_problem

        problem = cupy_device_problem(_cupy())
    except ImportError as error:
        from .availability import cupy_missing

        problem = cupy_missing(error)
    if problem is not None:
        return TypeError(f"{name}: the {_type_name(value)} could not be wrapped as a cupy array ({reasons}): {problem}")
    return TypeError(
        f"{name}: the {_type_name(value)} could not be wrapped as a cupy array ({reasons}); "
        "a torch tensor that requires grad must be passed as tensor.detach() (it shares the memory)"
    )


def _has_cuda_array_interface(value) -> bool:
    try:
        return getattr(value, "__cuda_array_interface__", None) is not None
    except Exception:  # torch raises for a tensor that requires grad: it has one
        return True


def foreign_array_hint(name: str, value, module: str) -> str | None:
    """For a caller that takes ``module``'s arrays only ("numpy" or "cupy": the layer, whose state
    lives in one of them), what ``value`` is and how to pass it, e.g. "a torch.Tensor on DLPack
    device kDLCPU; pass numpy.from_dlpack(x) (a view, no copy)". None for an object that speaks
    neither DLPack nor ``__cuda_array_interface__``."""
    device = _dlpack_device(value)
    if device is not None:
        where = _DLPACK_CUDA_DEVICES.get(device[0]) or _DLPACK_DEVICE_NAMES.get(device[0], f"device type {device[0]}")
        described = f"a {_type_name(value)} on DLPack device {where}"
        on_gpu, on_host = device[0] in _DLPACK_CUDA_DEVICES, device[0] == _DLPACK_CPU
        wrapped = f"cupy.from_dlpack({name})"
    elif _has_cuda_array_interface(value):
        described = f"a {_type_name(value)} exposing __cuda_array_interface__"
        on_gpu, on_host, wrapped = True, False, f"cupy.asarray({name})"
    else:
        return None
    if on_gpu:
        advice = f"pass {wrapped} (a view, no copy)"
        if module != "cupy":
            advice = f"it is on a GPU: copy it to the host, or use cupy arrays ({wrapped}, a view, no copy)"
    elif on_host:
        advice = f"pass numpy.from_dlpack({name}) (a view, no copy)"
        if module == "cupy":
            advice = f"pass cupy.asarray(numpy.from_dlpack({name})) (a copy to the GPU)"
    else:
        return described  # a device neither numpy nor cupy reads
    return f"{described}; {advice}"


def _from_cuda_array_interface(name: str, value, interface, written: bool):
    if not isinstance(interface, dict) or "data" not in interface:
        raise TypeError(f"{name}: __cuda_array_interface__ must be a dict with 'data', got {interface!r}")
    readonly = bool(interface["data"][1]) if interface["data"] is not None else False
    if written and readonly:
        raise ValueError(
            f"{name}: expected a writable array (it is updated in place), got a read-only __cuda_array_interface__"
        )
    stream = interface.get("stream")  # absent before version 3: the data is ready on any stream
    if stream is not None:
        if isinstance(stream, bool) or not isinstance(stream, int):
            raise TypeError(f"{name}: __cuda_array_interface__ 'stream' must be None or an int, got {stream!r}")
        if stream == _AMBIGUOUS_STREAM:
            raise ValueError(
                f"{name}: __cuda_array_interface__ 'stream' is 0, which version 3 forbids as ambiguous; "
                "expected None, 1 (legacy default), 2 (per-thread default) or a stream pointer"
            )
    try:
        array = _cupy().asarray(value)
    except Exception as error:  # CuPy missing or without a device here, or an interface it cannot read
        raise _not_wrapped(name, value, [f"cupy.asarray raised {type(error).__name__}: {error}"]) from error
    if stream is not None:
        _wait_for_producer(array, stream)
    return array


def _wait_for_producer(array, producer_stream: int) -> None:
    """Make CuPy's current stream (on the array's device) wait for the work queued so far on
    ``producer_stream``: an event there and a GPU-side wait, no host synchronisation."""
    cupy = _cupy()
    with array.device:
        consumer = cupy.cuda.get_current_stream()
        if consumer.ptr == producer_stream:
            return
        event = cupy.cuda.Event(block=False, disable_timing=True)
        # the runtime call rather than Event.record: it takes a raw stream pointer on CuPy 13 and 14
        cupy.cuda.runtime.eventRecord(event.ptr, producer_stream)
        consumer.wait_event(event)
