"""CUDA arrays of other libraries as input (cudnn_bn/_cudnn/interop.py, through cudnn_bn._api).

On the simulated GPU the device memory is host memory, so stand-in objects expose a host
address through ``__cuda_array_interface__`` or a capsule through ``__dlpack__`` on a CUDA device,
exactly as torch.cuda tensors, JAX and Numba arrays do with device addresses. The fake cupy
module has no CAI-aware ``asarray`` and no ``from_dlpack``; the fixture simulated_gpu_with_interop
of tests/conftest.py adds both (zero-copy views, as CuPy's are), and the event calls, to the fake
module of each test. The tests marked ``gpu``
run the same paths with real torch.cuda tensors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn import compat, reference
from cudnn_bn._core.tolerances import assert_close
from fake_cudnn import FakeArray

# ---- stand-ins for foreign CUDA arrays ----


class CudaArrayInterfaceStandIn:
    """A producer exposing ``__cuda_array_interface__`` (as Numba, JAX and torch.cuda do)."""

    def __init__(self, memory: np.ndarray, stream=None, readonly=False, version=3):
        self.memory, self.stream, self.readonly, self.version = memory, stream, readonly, version

    @property
    def __cuda_array_interface__(self):
        interface = {
            "shape": self.memory.shape,
            "typestr": self.memory.dtype.str,
            "data": (self.memory.ctypes.data, self.readonly),
            "strides": None if self.memory.flags.c_contiguous else self.memory.strides,
            "version": self.version,
        }
        if self.version >= 3:
            interface["stream"] = self.stream
        return interface


class DLPackStandIn:
    """A producer exposing ``__dlpack__`` and ``__dlpack_device__`` (as torch.cuda and JAX do)."""

    def __init__(self, memory: np.ndarray, device_type=2, refusal=None):
        self.memory, self.device_type, self.refusal = memory, device_type, refusal
        self.streams = []  # the stream argument of every export

    def __dlpack__(self, stream=None, max_version=None, **_):
        if self.refusal is not None:
            raise RuntimeError(self.refusal)
        self.streams.append(stream)
        return self.memory.__dlpack__(max_version=max_version)  # the host capsule: simulated device memory

    def __dlpack_device__(self):
        return (self.device_type, 0)


class RefusingTensor:
    """Answers both protocols with the refusal torch gives for a tensor that requires grad."""

    message = "Can't export tensors that require gradient, use tensor.detach()"

    def __dlpack__(self, stream=None, **_):
        raise RuntimeError(self.message)

    def __dlpack_device__(self):
        return (2, 0)

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad. Use var.detach()")


@pytest.fixture
def gpu(simulated_gpu_with_interop):
    """The simulated GPU with CuPy's consumer side of both protocols (tests/conftest.py)."""
    return simulated_gpu_with_interop


def _synchronize():
    """Run the simulated kernels queued so far, before reading device memory from the host."""
    sys.modules["cupy"].cuda.Device().synchronize()


def _current_stream_pointer():
    return sys.modules["cupy"].cuda.get_current_stream().ptr


def _case(seed=0, shape=(4, 3, 2, 2), channel_axis=1):
    rng = np.random.default_rng(seed)
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = (0.5 + rng.random(shape[channel_axis])).astype(np.float32)
    beta = rng.standard_normal(shape[channel_axis]).astype(np.float32)
    return x, dy, gamma, beta


# ---- __cuda_array_interface__ ----


def test_cuda_array_interface_objects_run_on_cudnn_and_get_running_statistics_in_place(gpu):
    x, dy, gamma, beta = _case()
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    wrapped = [CudaArrayInterfaceStandIn(a) for a in (x, gamma, beta, running_mean, running_var)]
    y, saved = cudnn_bn.forward_training(*wrapped, mode="spatial", momentum=0.25)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    expected_y, expected_saved = reference.forward_training(
        x.astype(np.float64), gamma, beta, expected_mean, expected_var, mode="spatial", momentum=0.25
    )
    assert isinstance(y, FakeArray)  # results come back as (here: fake) cupy arrays
    assert_close(y, expected_y, np.float32, scale=4)
    _synchronize()
    # zero copy: the kernel wrote into the producer's own memory
    assert_close(running_mean, expected_mean, np.float32)
    assert_close(running_var, expected_var, np.float32)
    assert "cudnnBatchNormalizationForwardTraining" in gpu.calls
    dx, dgamma, dbeta = cudnn_bn.backward(CudaArrayInterfaceStandIn(x), CudaArrayInterfaceStandIn(dy),
                                          CudaArrayInterfaceStandIn(gamma), saved)
    for actual, expected in zip((dx, dgamma, dbeta),
                                reference.backward(x.astype(np.float64), dy.astype(np.float64), gamma, expected_saved)):
        assert_close(actual, expected, np.float32, scale=10)
    expected_var = (1 / expected_saved.inv_std**2).astype(np.float32)
    y_inference = cudnn_bn.forward_inference(*wrapped[:3],
                                             CudaArrayInterfaceStandIn(expected_saved.mean.astype(np.float32)),
                                             CudaArrayInterfaceStandIn(expected_var), mode="spatial", eps=0.0)
    assert_close(y_inference, expected_y, np.float32, scale=4)


def test_the_producer_stream_is_waited_on_before_any_kernel(gpu):
    x, _, gamma, beta = _case()
    producer_stream = 0x5A5A
    cudnn_bn.forward_training(CudaArrayInterfaceStandIn(x, stream=producer_stream), gamma.view(FakeArray),
                              beta.view(FakeArray), mode="spatial")
    records = [entry for entry in gpu.log if entry[0] == "record"]
    waits = [entry for entry in gpu.log if entry[0] == "wait"]
    assert len(records) == 1 and len(waits) == 1
    _, stream, event, kernels_before = records[0]
    assert stream == producer_stream and kernels_before == 0
    # CuPy's current stream waits for that event, before the kernel is queued on it
    assert waits[0] == ("wait", _current_stream_pointer(), event, 0)
    assert gpu.log.index(records[0]) < gpu.log.index(waits[0])
    assert "cudnnBatchNormalizationForwardTraining" in gpu.calls


@pytest.mark.parametrize("stream", [None, "current"], ids=["no stream", "the consumer's own stream"])
def test_no_wait_when_there_is_nothing_to_wait_for(gpu, stream):
    x, _, gamma, beta = _case()
    stream = _current_stream_pointer() if stream == "current" else None
    cudnn_bn.forward_training(CudaArrayInterfaceStandIn(x, stream=stream), gamma.view(FakeArray), beta.view(FakeArray),
                              mode="spatial")
    assert not [entry for entry in gpu.log if entry[0] in ("record", "wait")]
    assert ("asarray", 0) in gpu.log


def test_a_version_2_interface_without_a_stream_is_accepted(gpu):
    x, _, gamma, beta = _case()
    y, _ = cudnn_bn.forward_training(CudaArrayInterfaceStandIn(x, version=2), gamma.view(FakeArray),
                                     beta.view(FakeArray), mode="spatial")
    assert_close(y, reference.forward_training(x.astype(np.float64), gamma, beta, mode="spatial")[0], np.float32,
                 scale=4)


def test_stream_zero_is_refused_before_anything_runs(gpu):
    x, _, gamma, beta = _case()
    with pytest.raises(ValueError, match="x: __cuda_array_interface__ 'stream' is 0"):
        cudnn_bn.forward_training(CudaArrayInterfaceStandIn(x, stream=0), gamma.view(FakeArray), beta.view(FakeArray),
                                  mode="spatial")
    assert not gpu.calls


def test_a_read_only_interface_cannot_receive_running_statistics(gpu):
    x, _, gamma, beta = _case()
    running_mean = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        cudnn_bn.forward_training(
            CudaArrayInterfaceStandIn(x, readonly=True), CudaArrayInterfaceStandIn(gamma, readonly=True),
            beta.view(FakeArray), CudaArrayInterfaceStandIn(running_mean, readonly=True),
            np.ones(3, np.float32).view(FakeArray), mode="spatial",
        )
    _synchronize()
    np.testing.assert_array_equal(running_mean, 0.0)
    assert not gpu.calls


# ---- __dlpack__ ----


def test_dlpack_objects_on_a_cuda_device_go_through_cupy_from_dlpack(gpu):
    x, dy, gamma, beta = _case()
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    wrapped = [DLPackStandIn(a) for a in (x, gamma, beta, running_mean, running_var)]
    y, saved = cudnn_bn.forward_training(*wrapped, mode="spatial", momentum=0.5)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    expected_y, _ = reference.forward_training(x.astype(np.float64), gamma, beta, expected_mean, expected_var,
                                               mode="spatial", momentum=0.5)
    assert_close(y, expected_y, np.float32, scale=4)
    _synchronize()
    assert_close(running_mean, expected_mean, np.float32)  # written through the zero-copy view
    assert_close(running_var, expected_var, np.float32)
    assert all(w.streams == [_current_stream_pointer() or 1] for w in wrapped)  # once each, for CuPy's current stream
    assert all(entry[-1] == 0 for entry in gpu.log if entry[0] == "from_dlpack")  # before any kernel


def test_an_object_with_both_protocols_is_taken_through_dlpack(gpu):
    class Both(DLPackStandIn, CudaArrayInterfaceStandIn):
        def __init__(self, memory):
            DLPackStandIn.__init__(self, memory)
            CudaArrayInterfaceStandIn.__init__(self, memory, stream=0x99)
    x, _, gamma, beta = _case()
    cudnn_bn.forward_training(Both(x), gamma.view(FakeArray), beta.view(FakeArray), mode="spatial")
    assert [entry[0] for entry in gpu.log] == ["from_dlpack"]


def test_saved_statistics_held_in_foreign_arrays_are_accepted(gpu):
    x, dy, gamma, beta = _case()
    _, saved = reference.forward_training(x, gamma, beta, mode="spatial")
    foreign = cudnn_bn.SavedStats(DLPackStandIn(saved.mean.copy()), DLPackStandIn(saved.inv_std.copy()), saved.mode,
                                  saved.eps, 1)
    grads = cudnn_bn.backward(x.view(FakeArray), dy.view(FakeArray), gamma.view(FakeArray), foreign)
    for actual, expected in zip(grads, reference.backward(x, dy, gamma, saved)):
        assert_close(actual, expected, np.float32, scale=10)


def test_compat_writes_given_statistics_into_foreign_arrays(gpu):
    x, _, gamma, beta = _case()
    mean, inv_std = np.full(3, np.nan, np.float32), np.full(3, np.nan, np.float32)
    y = compat.batch_normalization_forward_training(
        DLPackStandIn(x), DLPackStandIn(gamma), DLPackStandIn(beta), None, None,
        CudaArrayInterfaceStandIn(mean), DLPackStandIn(inv_std), 1e-5, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL, False,
    )
    _, saved = reference.forward_training(x.astype(np.float64), gamma, beta, mode="spatial")
    assert y.shape == x.shape
    _synchronize()
    assert_close(mean, saved.mean, np.float32)
    assert_close(inv_std, saved.inv_std, np.float32)


# ---- refusals: a TypeError naming what is accepted ----

ACCEPTED_WORDS = ("numpy", "cupy", "__cuda_array_interface__", "__dlpack__ on a CUDA device")


@pytest.mark.parametrize(
    "value,expected",
    [
        (DLPackStandIn(np.zeros((4, 3, 2, 2), np.float32), device_type=1),
         "on DLPack device kDLCPU (for the NumPy reference pass numpy.from_dlpack"),
        (DLPackStandIn(np.zeros((4, 3, 2, 2), np.float32), device_type=3), "on DLPack device kDLCUDAHost"),
        ([[1.0, 2.0], [3.0, 4.0]], "got list"),
        ("x", "got str"),
    ],
    ids=["cpu tensor", "pinned host tensor", "list", "string"],
)
def test_objects_of_neither_kind_are_type_errors_naming_what_is_accepted(value, expected):
    _, _, gamma, beta = _case()
    with pytest.raises(TypeError) as raised:
        cudnn_bn.forward_training(value, gamma, beta, mode="spatial")
    message = str(raised.value)
    assert message.startswith("x: expected") and expected in message
    for word in ACCEPTED_WORDS:
        assert word in message


def test_a_refusing_producer_is_a_type_error_carrying_its_reason(gpu):
    _, _, gamma, beta = _case()
    with pytest.raises(TypeError) as raised:
        cudnn_bn.forward_training(RefusingTensor(), gamma.view(FakeArray), beta.view(FakeArray), mode="spatial")
    message = str(raised.value)
    assert message.startswith("x: the test_interop.RefusingTensor could not be wrapped as a cupy array")
    assert RefusingTensor.message in message and "__cuda_array_interface__ raised RuntimeError" in message
    assert "tensor.detach()" in message and not gpu.calls


class MisreportedDevice:
    """A producer whose ``__dlpack_device__`` answers in other terms than DLPack's two integers."""

    def __init__(self, report):
        self.report = report

    def __dlpack__(self, **_):
        raise AssertionError("never exported: its device is unknown")

    def __dlpack_device__(self):
        return self.report


@pytest.mark.parametrize("report", [("cuda", 0), (2,), None, (2.5j, 0)], ids=["names", "one", "none", "complex"])
def test_a_device_reported_in_other_terms_is_no_dlpack_producer(report):
    x, _, gamma, beta = _case()
    with pytest.raises(TypeError, match=r"^gamma: expected a numpy.ndarray, .* got test_interop.MisreportedDevice$"):
        cudnn_bn.forward_training(x, MisreportedDevice(report), beta, mode="spatial")
    with pytest.raises(TypeError, match=r"^x: expected a numpy.ndarray or cupy.ndarray, got MisreportedDevice$"):
        cudnn_bn.BatchNorm(3)(MisreportedDevice(report))


def test_a_cuda_array_on_a_machine_without_cupy_is_a_type_error_naming_it(monkeypatch):
    x, _, gamma, beta = _case()
    running_mean = np.zeros(3, np.float32)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails, as where it is not installed
    with pytest.raises(TypeError, match=r"^running_var: the test_interop.CudaArrayInterfaceStandIn could not be "
                                        r"wrapped as a cupy array \(cupy.asarray raised ModuleNotFoundError: .*\): "
                                        r"CuPy is not installed"):
        cudnn_bn.forward_training(x, gamma, beta, running_mean, CudaArrayInterfaceStandIn(np.ones(3, np.float32)),
                                  mode="spatial")
    np.testing.assert_array_equal(running_mean, 0.0)


def test_a_cuda_array_that_cupy_refuses_is_a_type_error_naming_it(gpu, monkeypatch):
    """cupy.asarray fails where CuPy has no device, and for an interface it cannot read: the
    argument is named with the reason, and nothing runs."""
    x, _, gamma, beta = _case()
    running_mean = np.zeros(3, np.float32)

    def refuse(obj, dtype=None, order=None):
        raise RuntimeError("cudaErrorInsufficientDriver")

    monkeypatch.setattr(sys.modules["cupy"], "asarray", refuse)
    with pytest.raises(TypeError, match=r"^running_var: the test_interop.CudaArrayInterfaceStandIn could not be "
                                        r"wrapped as a cupy array \(cupy.asarray raised RuntimeError: "
                                        r"cudaErrorInsufficientDriver\)"):
        cudnn_bn.forward_training(x.view(FakeArray), gamma.view(FakeArray), beta.view(FakeArray),
                                  running_mean.view(FakeArray), CudaArrayInterfaceStandIn(np.ones(3, np.float32)),
                                  mode="spatial")
    _synchronize()
    np.testing.assert_array_equal(running_mean, 0.0)
    assert not gpu.calls


def test_foreign_cuda_arrays_do_not_mix_with_numpy(gpu):
    x, _, gamma, beta = _case()
    with pytest.raises(TypeError, match="mixed kinds"):
        cudnn_bn.forward_training(DLPackStandIn(x), gamma, beta, mode="spatial")
    assert not gpu.calls


def test_numpy_users_never_load_cupy_or_the_converter():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import cudnn_bn
        from cudnn_bn import compat
        x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
        gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
        y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
        cudnn_bn.backward(x, x, gamma, saved)
        compat.batch_normalization_forward_training(x, gamma, beta, None, None, None, None, 1e-5, 0.9, True, 1, False)
        modules = ("cupy", "cudnn_bn._cudnn.interop", "cudnn_bn._cudnn.ops")
        print(sorted(name for name in modules if name in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- on a GPU, with torch ----


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_torch_cuda_tensors_run_zero_copy(channel_axis):
    torch = _torch_cuda()
    x, dy, gamma, beta = _case(shape=(8, 3, 4, 4) if channel_axis == 1 else (8, 4, 4, 3), channel_axis=channel_axis)
    device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    running_mean, running_var = device(np.zeros(3, np.float32)), device(np.ones(3, np.float32))
    y, saved = cudnn_bn.forward_training(device(x), device(gamma), device(beta), running_mean, running_var,
                                         mode="spatial", momentum=0.5, channel_axis=channel_axis)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    expected_y, expected_saved = reference.forward_training(x.astype(np.float64), gamma, beta, expected_mean,
                                                            expected_var, mode="spatial", momentum=0.5,
                                                            channel_axis=channel_axis)
    assert_close(y, expected_y, np.float32, scale=4)
    assert_close(running_mean.cpu().numpy(), expected_mean, np.float32)  # updated inside the torch tensor
    assert_close(running_var.cpu().numpy(), expected_var, np.float32)
    grads = cudnn_bn.backward(device(x), device(dy), device(gamma), saved)
    for actual, expected in zip(grads,
                                reference.backward(x.astype(np.float64), dy.astype(np.float64), gamma, expected_saved)):
        assert_close(actual, expected, np.float32, scale=10)
    wrapped_back = torch.from_dlpack(y)  # results are cupy arrays; DLPack takes them back to torch
    assert wrapped_back.is_cuda and tuple(wrapped_back.shape) == x.shape


@pytest.mark.gpu
def test_torch_tensors_that_require_grad_are_refused_and_detach_works():
    torch = _torch_cuda()
    x, _, gamma, beta = _case()
    weight = torch.from_numpy(gamma).cuda().requires_grad_()
    with pytest.raises(TypeError, match="gamma: .*detach"):
        cudnn_bn.forward_training(torch.from_numpy(x).cuda(), weight, torch.from_numpy(beta).cuda(), mode="spatial")
    y, _ = cudnn_bn.forward_training(torch.from_numpy(x).cuda(), weight.detach(), torch.from_numpy(beta).cuda(),
                                     mode="spatial")
    assert_close(y, reference.forward_training(x.astype(np.float64), gamma, beta, mode="spatial")[0], np.float32,
                 scale=4)


class _CudaArrayInterfaceOnly:
    """A torch.cuda tensor seen only through __cuda_array_interface__, as version 3 with the
    'stream' its pending work is on: torch's current stream when it was wrapped. (torch's own
    interface is version 2, without a stream: its consumer may read at once, so torch's pending
    work on another stream must then be finished by the caller.)"""

    def __init__(self, tensor):
        import torch

        self.tensor = tensor
        pointer = torch.cuda.current_stream().cuda_stream
        self.stream = pointer if pointer != 0 else 1  # version 3 names the legacy default stream 1, never 0

    @property
    def __cuda_array_interface__(self):
        return {**self.tensor.__cuda_array_interface__, "version": 3, "stream": self.stream}


@pytest.mark.gpu
@pytest.mark.parametrize("protocol", ["dlpack", "cuda_array_interface"])
def test_torch_work_pending_on_its_stream_is_finished_before_cudnn_reads_it(protocol):
    torch = _torch_cuda()
    x, _, gamma, beta = _case(shape=(16, 8, 16, 16))
    wrap = (lambda t: t) if protocol == "dlpack" else _CudaArrayInterfaceOnly
    side = torch.cuda.Stream()  # not CuPy's stream: without the wait cuDNN would read unwritten memory
    with torch.cuda.stream(side):
        source = torch.from_numpy(x).cuda()
        torch.cuda._sleep(200_000_000)  # keep the producer busy so that a missing wait shows
        data = source * 2.0
        y, _ = cudnn_bn.forward_training(wrap(data), wrap(torch.from_numpy(gamma).cuda()),
                                         wrap(torch.from_numpy(beta).cuda()), mode="spatial")
    expected, _ = reference.forward_training(2.0 * x.astype(np.float64), gamma, beta, mode="spatial")
    assert_close(y, expected, np.float32, scale=4)


@pytest.mark.gpu
def test_torch_cpu_tensors_are_type_errors():
    torch = _torch_cuda()
    x, _, gamma, beta = _case()
    with pytest.raises(TypeError, match="x: expected .* on DLPack device kDLCPU"):
        cudnn_bn.forward_training(torch.from_numpy(x), torch.from_numpy(gamma).cuda(), torch.from_numpy(beta).cuda(),
                                  mode="spatial")


# ---- the hint for callers that take one array module only (the layer) ----
@pytest.mark.parametrize("value,module,expected", [
    (DLPackStandIn(np.ones(2), device_type=1), "numpy",
     "a test_interop.DLPackStandIn on DLPack device kDLCPU; pass numpy.from_dlpack(x) (a view, no copy)"),
    (DLPackStandIn(np.ones(2), device_type=1), "cupy",
     "a test_interop.DLPackStandIn on DLPack device kDLCPU; pass cupy.asarray(numpy.from_dlpack(x)) "
     "(a copy to the GPU)"),
    (DLPackStandIn(np.ones(2), device_type=13), "cupy",
     "a test_interop.DLPackStandIn on DLPack device kDLCUDAManaged; pass cupy.from_dlpack(x) (a view, no copy)"),
    (CudaArrayInterfaceStandIn(np.ones(2)), "cupy",
     "a test_interop.CudaArrayInterfaceStandIn exposing __cuda_array_interface__; pass cupy.asarray(x) "
     "(a view, no copy)"),
    (CudaArrayInterfaceStandIn(np.ones(2)), "numpy",
     "a test_interop.CudaArrayInterfaceStandIn exposing __cuda_array_interface__; it is on a GPU: copy it to the "
     "host, or use cupy arrays (cupy.asarray(x), a view, no copy)"),
    (DLPackStandIn(np.ones(2), device_type=10), "numpy", "a test_interop.DLPackStandIn on DLPack device kDLROCM"),
    (RefusingTensor(), "cupy",
     "a test_interop.RefusingTensor on DLPack device kDLCUDA; pass cupy.from_dlpack(x) (a view, no copy)"),
    ([1.0, 2.0], "numpy", None),
], ids=["host-numpy", "host-cupy", "managed-cupy", "cai-cupy", "cai-numpy", "rocm", "refusing", "list"])
def test_the_hint_says_what_a_foreign_array_is_and_how_to_pass_it(value, module, expected):
    from cudnn_bn._cudnn.interop import foreign_array_hint

    assert foreign_array_hint("x", value, module) == expected
