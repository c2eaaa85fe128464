"""A host-memory stand-in for CuPy and for cuDNN's kernels, so that the whole cuDNN path of
cudnn_bn (argument marshalling, descriptors, pointers, scalars, transposes, temporaries, the
overflow handling and the Ex path) runs in CI without a GPU.

- ``FakeCupy`` is a module whose arrays are numpy arrays in host memory that report
  ``.data.ptr`` (their address) and ``.device.id`` like cupy arrays.
- ``KernelSimulator`` replaces the handle, stream and batch-norm functions of the real, loaded
  libcudnn. Descriptors stay real (cuDNN's host calls work without a GPU), so the simulator reads
  dims, strides and data types back from cuDNN itself, checks every argument against the ctypes
  prototype, reads alpha/beta with the width cuDNN would use, and computes with the reference.
"""

from __future__ import annotations

import contextlib
import ctypes
import types

import numpy as np

from cudnn_bn import reference
from cudnn_bn._cudnn import raw as _raw
from cudnn_bn._core.modes import Mode
from cudnn_bn._cudnn.raw import DataType, Status
from cudnn_bn._core.saved import SavedStats


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class _Device:
    def __init__(self, id=0):
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class FakeArray(np.ndarray):
    """A numpy array that answers like a cupy array."""

    @property
    def data(self):
        return _Pointer(self.ctypes.data)

    @property
    def device(self):
        return _Device(0)

    def get(self):
        return np.array(self)


FakeArray.__module__ = "cupy._core.core"  # what cudnn_bn's kind check looks at


def _fake(array):
    return array.view(FakeArray)


class _Stream:
    ptr = 0


class _Event:
    """Host clock in place of a CUDA event (the simulated kernels run synchronously)."""

    def record(self, stream=None):
        import time

        self.seconds = time.perf_counter()

    def synchronize(self):
        pass


class _Pool:
    def free_all_blocks(self):
        pass


def make_fake_cupy() -> types.ModuleType:
    module = types.ModuleType("cupy")
    module.ndarray = FakeArray
    module.asarray = lambda a, dtype=None: _fake(np.array(a, dtype=dtype, copy=True))
    module.ascontiguousarray = lambda a: a if a.flags.c_contiguous and isinstance(a, FakeArray) else _fake(np.ascontiguousarray(a))
    module.empty = lambda shape, dtype=np.float32: _fake(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype))
    module.ones = lambda shape, dtype=np.float32: _fake(np.ones(shape, dtype))
    module.zeros = lambda shape, dtype=np.float32: _fake(np.zeros(shape, dtype))
    module.isfinite = np.isfinite
    module.uint8, module.float16, module.float32, module.float64 = np.uint8, np.float16, np.float32, np.float64
    module.copyto = np.copyto
    module.get_default_memory_pool = _Pool
    module.__version__ = "simulated"
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = _Device
    cuda.Event = _Event
    cuda.get_current_stream = lambda: _Stream()
    cuda.get_elapsed_time = lambda start, stop: (stop.seconds - start.seconds) * 1e3
    cuda.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        driverGetVersion=lambda: 13000,
        getDeviceProperties=lambda index: {"name": b"simulated GPU (host memory)"},
    )
    module.cuda = cuda
    return module


_NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.DOUBLE: np.float64, DataType.HALF: np.float16}
_FAKE_HANDLE = 0x5EED


class KernelSimulator:
    """Stands in for cuDNN's kernels on the loaded library object; use :meth:`installed`."""

    def __init__(self, library):
        self.library = library
        self.calls: list[str] = []
        self.stream = None
        self.overflow_modes = set()  # Mode values whose calls overflow (NaN output, flag raised)
        self._flag = 0
        self.reserves = {}  # reserve pointer -> (size, saved-mean pointer) of the ForwardTrainingEx that filled it
        self.workspace_size, self.reserve_size = 256, 512

    # ---- memory ----
    def _describe(self, descriptor):
        data_type, dims, strides = ctypes.c_int(), (ctypes.c_int * 8)(), (ctypes.c_int * 8)()
        count = ctypes.c_int()
        self.library.cudnnGetTensorNdDescriptor(descriptor, 8, ctypes.byref(data_type), ctypes.byref(count), dims, strides)
        return _NUMPY_TYPES[DataType(data_type.value)], tuple(dims[: count.value]), tuple(strides[: count.value])

    def view(self, pointer, descriptor):
        """The tensor at ``pointer`` as described by ``descriptor`` (a writable numpy view)."""
        assert pointer, "NULL data pointer passed to a batch-norm kernel"
        dtype, dims, strides = self._describe(descriptor)
        itemsize = np.dtype(dtype).itemsize
        extent = 1 + sum((d - 1) * s for d, s in zip(dims, strides))
        buffer = (ctypes.c_char * (extent * itemsize)).from_address(pointer)
        flat = np.frombuffer(buffer, dtype=dtype, count=extent)
        return np.lib.stride_tricks.as_strided(flat, dims, [s * itemsize for s in strides])

    def _scalar(self, pointer, data_descriptor):
        dtype = self._describe(data_descriptor)[0]
        ctype = ctypes.c_double if dtype == np.float64 else ctypes.c_float
        return ctype.from_address(pointer).value

    def _check_scalars(self, data_descriptor, *pointers):
        values = [self._scalar(p, data_descriptor) for p in pointers]
        assert values == [1.0, 0.0] * (len(values) // 2), f"alpha/beta read as {values}: wrong scalar width"

    # ---- the kernels ----
    def _param(self, pointer, descriptor, mode):
        """1 x C x ... -> the parameter shape of the reference on the NCHW-ordered data."""
        view = self.view(pointer, descriptor)
        return view.reshape(view.shape[1] if Mode(mode).is_spatial else view.shape[1:])

    def _training(self, mode, x_desc, x, y_desc, y, p_desc, scale, bias, factor, running_mean, running_var, eps, save_mean, save_inv):
        data = self.view(x, x_desc).astype(np.float64)
        gamma, beta = self._param(scale, p_desc, mode), self._param(bias, p_desc, mode)
        running = None
        if running_mean:
            running = [self._param(running_mean, p_desc, mode), self._param(running_var, p_desc, mode)]
            wide = [r.astype(np.float64) for r in running]
        out, saved = reference.forward_training(data, gamma.astype(np.float64), beta.astype(np.float64), *(wide if running else (None, None)),
                                                 mode=Mode(mode), momentum=factor, eps=eps)
        if running:
            for target, value in zip(running, wide):
                target[...] = value
        self.view(y, y_desc)[...] = out
        self._param(save_mean, p_desc, mode)[...] = saved.mean
        self._param(save_inv, p_desc, mode)[...] = saved.inv_std
        self._finish(mode, [self.view(y, y_desc), self._param(save_mean, p_desc, mode)] + (running or []))

    def _backward(self, mode, x_desc, x, dy_desc, dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, saved_mean, saved_inv):
        if Mode(mode) is Mode.SPATIAL_PERSISTENT and not saved_mean:
            return Status.BAD_PARAM
        data = self.view(x, x_desc).astype(np.float64)
        gamma = self._param(scale, p_desc, mode).astype(np.float64)
        grad = self.view(dy, dy_desc).astype(np.float64)
        if saved_mean:
            saved = SavedStats(self._param(saved_mean, p_desc, mode).astype(np.float64), self._param(saved_inv, p_desc, mode).astype(np.float64), Mode(mode), eps, 1)
            results = reference.backward(data, grad, gamma, saved)
        else:
            results = reference.backward(data, grad, gamma, mode=Mode(mode), eps=eps)
        self.view(dx, dx_desc)[...] = results[0]
        self._param(dscale, p_desc, mode)[...] = results[1]
        self._param(dbias, p_desc, mode)[...] = results[2]
        self._finish(mode, [self.view(dx, dx_desc)])
        return Status.SUCCESS

    def _finish(self, mode, outputs):
        """A persistent kernel that overflows writes NaN and raises the flag (as cuDNN documents)."""
        if Mode(mode) is Mode.SPATIAL_PERSISTENT and Mode(mode) in self.overflow_modes:
            for output in outputs:
                output[...] = np.nan
            self._flag = Status.RUNTIME_FP_OVERFLOW

    # ---- the replaced entry points (same arguments as the C functions) ----
    def _entry(self, name, body):
        restype, argtypes = _raw.PROTOTYPES[name]

        def raw(*args):
            assert len(args) == len(argtypes), f"{name}: {len(args)} arguments for {len(argtypes)} parameters"
            for index, (ctype, arg) in enumerate(zip(argtypes, args)):
                ctype.from_param(arg)  # the conversion ctypes would do; raises on a wrong kind
            self.calls.append(name)
            return body(*args)

        return _raw._checked(name, lambda *args: int(raw(*args) or 0))

    def entries(self) -> dict:
        def create(handle_pointer):
            ctypes.cast(handle_pointer, ctypes.POINTER(ctypes.c_void_p))[0] = _FAKE_HANDLE

        def set_stream(handle, stream):
            assert handle == _FAKE_HANDLE
            self.stream = stream

        def get_stream(handle, out):
            ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = self.stream

        def query(handle, status_pointer, mode, tag):
            assert mode == _raw.ErrQueryMode.BLOCKING and tag is None
            ctypes.cast(status_pointer, ctypes.POINTER(ctypes.c_int))[0] = self._flag
            self._flag = 0

        def training(handle, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, factor, rm, rv, eps, sm, si):
            self._check_scalars(x_desc, alpha, beta)
            self._training(mode, x_desc, x, y_desc, y, p_desc, scale, bias, factor, rm, rv, eps, sm, si)

        def inference(handle, mode, alpha, beta, x_desc, x, y_desc, y, p_desc, scale, bias, mean, var, eps):
            self._check_scalars(x_desc, alpha, beta)
            if Mode(mode) is Mode.SPATIAL_PERSISTENT:
                return Status.NOT_SUPPORTED
            params = [self._param(p, p_desc, mode).astype(np.float64) for p in (scale, bias, mean, var)]
            self.view(y, y_desc)[...] = reference.forward_inference(self.view(x, x_desc).astype(np.float64), *params, mode=Mode(mode), eps=eps)

        def backward(handle, mode, a_d, b_d, a_p, b_p, x_desc, x, dy_desc, dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, sm, si):
            self._check_scalars(x_desc, a_d, b_d, a_p, b_p)
            return self._backward(mode, x_desc, x, dy_desc, dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, sm, si)

        def size_out(pointer, value):
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_size_t))[0] = value

        def training_ex_workspace(handle, mode, ops, x_desc, z_desc, y_desc, p_desc, activation, out):
            assert ops == _raw.BatchNormOps.BN and z_desc is None and activation is None
            size_out(out, self.workspace_size)

        def backward_ex_workspace(handle, mode, ops, x_desc, y_desc, dy_desc, dz_desc, dx_desc, p_desc, activation, out):
            assert ops == _raw.BatchNormOps.BN and y_desc is None and dz_desc is None and activation is None
            size_out(out, self.workspace_size)

        def reserve_size(handle, mode, ops, activation, x_desc, out):
            size_out(out, self.reserve_size)

        def training_ex(handle, mode, ops, alpha, beta, x_desc, x, z_desc, z, y_desc, y, p_desc, scale, bias, factor, rm, rv, eps, sm, si, activation, workspace, workspace_size, reserve, reserve_size_):
            assert ops == _raw.BatchNormOps.BN and z_desc is None and z is None and activation is None
            assert workspace and workspace_size == self.workspace_size and reserve and reserve_size_ == self.reserve_size
            self.reserves[reserve] = (reserve_size_, sm)
            self._check_scalars(x_desc, alpha, beta)
            self._training(mode, x_desc, x, y_desc, y, p_desc, scale, bias, factor, rm, rv, eps, sm, si)

        def backward_ex(handle, mode, ops, a_d, b_d, a_p, b_p, x_desc, x, y_desc, y, dy_desc, dy, dz_desc, dz, dx_desc, dx, p_desc, scale, bias, dscale, dbias, eps, sm, si, activation, workspace, workspace_size, reserve, reserve_size_):
            assert ops == _raw.BatchNormOps.BN and y_desc is None and dz_desc is None and activation is None
            assert self.reserves.get(reserve) == (reserve_size_, sm), "BackwardEx must get the reserve space of the forward that saved these statistics"
            assert workspace and workspace_size == self.workspace_size
            self._check_scalars(x_desc, a_d, b_d, a_p, b_p)
            return self._backward(mode, x_desc, x, dy_desc, dy, dx_desc, dx, p_desc, scale, dscale, dbias, eps, sm, si)

        bodies = {
            "cudnnCreate": create,
            "cudnnDestroy": lambda handle: None,
            "cudnnSetStream": set_stream,
            "cudnnGetStream": get_stream,
            "cudnnQueryRuntimeError": query,
            "cudnnBatchNormalizationForwardTraining": training,
            "cudnnBatchNormalizationForwardInference": inference,
            "cudnnBatchNormalizationBackward": backward,
            "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize": training_ex_workspace,
            "cudnnGetBatchNormalizationBackwardExWorkspaceSize": backward_ex_workspace,
            "cudnnGetBatchNormalizationTrainingExReserveSpaceSize": reserve_size,
            "cudnnBatchNormalizationForwardTrainingEx": training_ex,
            "cudnnBatchNormalizationBackwardEx": backward_ex,
        }
        return {name: self._entry(name, body) for name, body in bodies.items()}


@contextlib.contextmanager
def simulated_gpu(monkeypatch):
    """Install the fake cupy and the kernel simulator; tear the fake handles down afterwards."""
    import sys

    from cudnn_bn._cudnn import handles as _handles

    library = _raw.library()
    simulator = KernelSimulator(library)
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
    for name, entry in simulator.entries().items():
        monkeypatch.setattr(library, name, entry)
    try:
        yield simulator
    finally:
        handles = getattr(_handles._PER_THREAD, "handles", {})
        for handle in handles.values():
            handle.close()  # while the fake cudnnDestroy is still installed
        handles.clear()
