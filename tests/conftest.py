"""Shared test helpers: inputs for any mode x layout x dtype, and the `gpu` marker's rules.

A test marked `gpu` needs cuDNN on a CUDA GPU. Where none is usable it is skipped with the reason,
or, when the environment variable CUDNN_BN_REQUIRE_GPU=1 is set (as `.ci/gpu-validate` does), it
fails with that reason: a GPU validation run on a machine whose GPU is not usable must not pass.
After every `gpu` test the devices are synchronized, so that an asynchronous CUDA fault is charged
to the test that caused it rather than to a later one.

With CUDNN_BN_SIMULATED_GPU=1 (as `.ci/gpu-validate --simulate` sets) every `gpu` test runs on the
simulated GPU of tests/fake_cudnn.py instead, each inside its own `simulated_gpu()`, except the
ones in NEEDS_A_GPU, which skip with "needs a GPU: ..." and the reason. Such a run checks the tests
and the plumbing, never cuDNN: its comparisons are the reference against itself.

The `gpu` tests in GPU_SERIAL get the `gpu_serial` marker as well: they depend on how GPU work is
timed (a busy kernel keeps a stream occupied while the test checks the ordering) or load every
core, so the validation runs them in a serial step of their own, never beside parallel workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import sys

import numpy as np
import pytest

from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.modes import Mode
from cudnn_bn._core.validate import param_dtype_for

MODES = list(Mode)
LAYOUTS = [(2, 1), (3, 1), (3, -1), (4, 1), (4, -1), (5, 1), (5, -1)]  # (ndim, channel_axis)
DTYPES = [np.float16, np.float32, np.float64]

# Bounds for results that are not cuDNN's (cuDNN's are held to the per-dtype tolerances of
# cudnn_bn/_core/tolerances.py): the same value computed two ways on the host.
# float64 against float64 computed another way (a closed form, another order of the same sums,
# torch's autograd): a few ulps over the thousands of terms these tests sum.
FLOAT64_ROUNDING = 1e-12
# float32 results of float64 arithmetic rounded once to float32 (the reference's, the layer's on
# numpy), against the same value reached another way: a few float32 ulps (2**-23 is 1.2e-7).
FLOAT32_ROUNDING = 1e-6

REQUIRE_GPU_VARIABLE = "CUDNN_BN_REQUIRE_GPU"
SIMULATED_GPU_VARIABLE = "CUDNN_BN_SIMULATED_GPU"
SERIAL_MARKER = "gpu_serial"

# `gpu` tests whose subject the simulated GPU cannot stand in for: node id (without parameters) ->
# what they need. tests/test_gpu_validate.py checks that every entry names a collected gpu test.
NEEDS_A_GPU = {
    "tests/test_interop.py::test_torch_cuda_tensors_run_zero_copy": "torch CUDA tensors",
    "tests/test_interop.py::test_torch_tensors_that_require_grad_are_refused_and_detach_works": "torch CUDA tensors",
    "tests/test_interop.py::test_torch_work_pending_on_its_stream_is_finished_before_cudnn_reads_it":
        "torch CUDA tensors and streams",
    "tests/test_interop.py::test_torch_cpu_tensors_are_type_errors": "torch with CUDA",
    "tests/test_distributed.py::test_nccl_group_of_one_matches_the_reference": "NCCL through cupyx.distributed",
    "tests/test_gpu_parity.py::test_input_written_on_a_non_blocking_stream_just_before_the_call_is_read_after_it":
        "a CUDA kernel compiled by NVRTC (cupy.RawKernel)",
}
# `gpu` tests that run alone, not beside parallel workers: node id (without parameters) -> why
GPU_SERIAL = {
    "tests/test_gpu_parity.py::test_input_written_on_a_non_blocking_stream_just_before_the_call_is_read_after_it":
        "a 20 ms busy kernel orders the streams",
    "tests/test_interop.py::test_torch_work_pending_on_its_stream_is_finished_before_cudnn_reads_it":
        "torch's busy kernel orders the streams",
    "tests/test_gpu_parity.py::test_thread_stress_on_random_shapes_matches_the_reference": "16 threads load every core",
}


def shape_for(ndim: int, channel_axis: int, batch: int = 3, channels: int = 2, spatial=(3, 2, 2)) -> tuple[int, ...]:
    """A small input shape with channels at channel_axis."""
    rest = tuple(spatial[: ndim - 2])
    return (batch, channels) + rest if channel_axis == 1 or ndim == 2 else (batch,) + rest + (channels,)


def make_case(shape, mode, channel_axis=1, dtype=np.float64, seed=0, xp=np, offset=0.0, scale=1.0):
    """x, dy, gamma, beta (and the layout) for one call; parameters in the parameter dtype."""
    layout = make_layout(shape, channel_axis, Mode(mode) if not isinstance(mode, str) else Mode[mode.upper()])
    rng = np.random.default_rng(seed)
    param_dtype = param_dtype_for(dtype)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (0.5 + rng.random(layout.param_shape)).astype(param_dtype)
    beta = rng.standard_normal(layout.param_shape).astype(param_dtype)
    return layout, xp.asarray(x), xp.asarray(dy), xp.asarray(gamma), xp.asarray(beta)


def _switched_on(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no")


def gpu_required() -> bool:
    """True when CUDNN_BN_REQUIRE_GPU asks for `gpu` tests to fail rather than skip without a GPU."""
    return _switched_on(REQUIRE_GPU_VARIABLE)


def gpu_simulated() -> bool:
    """True when CUDNN_BN_SIMULATED_GPU asks for `gpu` tests to run on the simulated GPU."""
    return _switched_on(SIMULATED_GPU_VARIABLE)


def needs_a_gpu(nodeid: str) -> str | None:
    """What a `gpu` test needs that the simulated GPU does not have, or None."""
    return NEEDS_A_GPU.get(nodeid.split("[")[0])


def pytest_configure(config):
    config.addinivalue_line("markers", f"{SERIAL_MARKER}: a gpu test that must not run beside parallel workers "
                                       "(it depends on how GPU work is timed, or loads every core); see GPU_SERIAL")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in GPU_SERIAL:
            item.add_marker(SERIAL_MARKER)


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(usable, reason) from the package's own check, asked once per pytest run."""
    from cudnn_bn._cudnn.availability import cudnn_status

    try:
        return cudnn_status()
    except Exception as error:  # the check itself failed: that is a reason too, not a crash
        return False, f"cudnn_status() raised {type(error).__name__}: {error}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is None:
        return
    if gpu_simulated():
        needed = needs_a_gpu(item.nodeid)
        if needed:
            pytest.skip(f"needs a GPU: {needed}")
        return
    usable, reason = gpu_status()
    if not usable:
        if gpu_required():
            pytest.fail(f"{REQUIRE_GPU_VARIABLE}=1 but no usable GPU: {reason}", pytrace=False)
        pytest.skip(f"no usable GPU: {reason}")
    _check_context_after_earlier_fault()


# (nodeid, error) of the gpu test after which a synchronize failed; later tests check the context first
_FAULT: dict = {}


def _synchronize_all_devices() -> None:
    import cupy

    for device_id in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(device_id):
            cupy.cuda.Device(device_id).synchronize()


def _check_context_after_earlier_fault() -> None:
    """After a fault, a sticky CUDA error makes every later result meaningless: say where it began."""
    if not _FAULT:
        return
    try:
        _synchronize_all_devices()
    except Exception as error:
        pytest.fail(
            f"the CUDA context has been unusable since {_FAULT['nodeid']} ({_FAULT['error']}); now: "
            f"{type(error).__name__}: {error}",
            pytrace=False,
        )
    _FAULT.clear()  # the earlier error was not sticky


@pytest.fixture(autouse=True)
def _synchronize_after_gpu_test(request):
    """Wait for every kernel a `gpu` test queued, so an asynchronous fault fails that test; on
    the simulated GPU, run the test inside a simulated_gpu() of its own."""
    if request.node.get_closest_marker("gpu") is not None and gpu_simulated():
        yield from _on_the_simulated_gpu()
        return
    yield
    if request.node.get_closest_marker("gpu") is None or not gpu_status()[0]:
        return
    try:
        _synchronize_all_devices()
    except Exception as error:
        _FAULT.update(nodeid=request.node.nodeid, error=f"{type(error).__name__}: {error}")
        pytest.fail(f"device synchronize after the test failed: {type(error).__name__}: {error}", pytrace=False)


def _on_the_simulated_gpu():
    with _simulated_gpu_without_cached_plans(None):
        yield
        _synchronize_all_devices()


@contextlib.contextmanager
def _simulated_gpu_without_cached_plans(monkeypatch):
    """simulated_gpu() with the plan cache emptied before and after: plans hold descriptors and
    sizes of the simulated run that made them."""
    from cudnn_bn._cudnn import plans
    from fake_cudnn import simulated_gpu

    plans.PLANS.clear()
    try:
        with simulated_gpu(monkeypatch) as simulator:
            yield simulator
    finally:
        plans.PLANS.clear()


@pytest.fixture
def fresh_simulated_gpu(monkeypatch, cudnn_library):
    """The simulated GPU, with no plan and no shown fallback warning left by an earlier test."""
    from cudnn_bn._cudnn import launch

    monkeypatch.setattr(launch, "fallback_warnings_shown", set())
    with _simulated_gpu_without_cached_plans(monkeypatch) as simulator:
        yield simulator


@contextlib.contextmanager
def _simulated_gpu_with_nothing_settled(monkeypatch, devices):
    from cudnn_bn._cudnn import launch, signatures
    from fake_cudnn import simulated_gpu

    monkeypatch.setattr(launch, "fallback_warnings_shown", set())
    monkeypatch.setattr(launch, "WORKSPACES", {})
    signatures.SETTLED.clear()
    with simulated_gpu(monkeypatch, devices=devices) as simulator:
        yield simulator


@pytest.fixture
def unsettled_gpu(monkeypatch, cudnn_library):
    """The simulated GPU with no settled call signature, no Ex workspace and no shown fallback
    warning left by an earlier test. Each test settles its own signatures: mutation runs pick, for
    each mutant, the tests that reached the mutated code, and a signature settled by an earlier
    test would hide the settling."""
    with _simulated_gpu_with_nothing_settled(monkeypatch, 1) as simulator:
        yield simulator


@pytest.fixture
def unsettled_two_gpus(monkeypatch, cudnn_library):
    """unsettled_gpu with two devices."""
    with _simulated_gpu_with_nothing_settled(monkeypatch, 2) as simulator:
        yield simulator


@pytest.fixture(scope="session")
def cudnn_library():
    """The real libcudnn from the nvidia-cudnn wheel. CI installs it, so there a missing library
    fails the run instead of skipping the binding tests."""
    from cudnn_bn._cudnn import raw as _raw

    try:
        return _raw.library()
    except Exception as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test against the real libcudnn: {error}")
        pytest.skip(f"libcudnn not installed ({type(error).__name__}); pip install -e '.[test]'")


@pytest.fixture(scope="session")
def cudnn_headers(cudnn_library):
    """Text of cudnn_graph.h and cudnn_ops.h as installed beside the library."""
    from cuda import pathfinder

    from header_check import HEADERS

    directory = pathfinder.find_nvidia_header_directory("cudnn")
    if directory is None:
        pytest.fail("cuda.pathfinder found no cuDNN headers although libcudnn loaded")
    return [open(os.path.join(directory, name)).read() for name in HEADERS]


# ---- the simulated GPU with CuPy's consumer side of DLPack and __cuda_array_interface__ ----

BATCH_NORM_KERNELS = ("cudnnBatchNormalizationForwardTraining", "cudnnBatchNormalizationForwardTrainingEx",
                      "cudnnBatchNormalizationForwardInference", "cudnnBatchNormalizationBackward",
                      "cudnnBatchNormalizationBackwardEx")




class _HostCapsule:
    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **_):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


class _Event:
    """An event that also has CuPy's ``ptr`` (the simulated one has none)."""

    _pointers = itertools.count(0xE000)

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = next(self._pointers)


@pytest.fixture
def simulated_gpu_with_interop(monkeypatch, cudnn_library):
    """The simulated GPU, with CuPy's CAI import, from_dlpack, eventRecord and Stream.wait_event
    added to the fake cupy (which has none of them); ``.log`` of what it yields records them with
    how many kernels had been called."""
    from fake_cudnn import FakeArray, simulated_gpu

    with simulated_gpu(monkeypatch) as simulator:
        cupy = sys.modules["cupy"]
        log = []
        simulator.log = log
        plain_asarray = cupy.asarray

        def kernels_called():
            return sum(call in BATCH_NORM_KERNELS for call in simulator.calls)

        def asarray(obj, dtype=None, order=None):
            interface = getattr(type(obj), "__cuda_array_interface__", None) and obj.__cuda_array_interface__
            if not interface:
                return plain_asarray(obj, dtype)
            log.append(("asarray", kernels_called()))
            dtype = np.dtype(interface["typestr"])
            shape = tuple(interface["shape"])
            strides = interface["strides"] or tuple(int(np.prod(shape[i + 1:])) * dtype.itemsize
                                                    for i in range(len(shape)))
            extent = dtype.itemsize + sum((n - 1) * s for n, s in zip(shape, strides))
            buffer = (ctypes.c_char * extent).from_address(interface["data"][0])
            flat = np.frombuffer(buffer, dtype=np.uint8)
            return np.lib.stride_tricks.as_strided(flat.view(dtype), shape, strides).view(FakeArray)

        def from_dlpack(obj):
            device_type, _ = obj.__dlpack_device__()
            assert device_type in (2, 13), "cupy.from_dlpack refuses other devices"
            stream = cupy.cuda.get_current_stream().ptr or 1  # CuPy hands over its current stream (0: the default, 1)
            capsule = obj.__dlpack__(stream=stream, max_version=(1, 0))
            log.append(("from_dlpack", kernels_called()))
            return np.from_dlpack(_HostCapsule(capsule)).view(FakeArray)

        def event_record(event_ptr, stream_ptr):
            log.append(("record", stream_ptr, event_ptr, kernels_called()))

        def wait_event(stream, event):
            log.append(("wait", stream.ptr, event.ptr, kernels_called()))

        monkeypatch.setattr(cupy, "asarray", asarray)
        monkeypatch.setattr(cupy, "from_dlpack", from_dlpack, raising=False)
        monkeypatch.setattr(cupy.cuda, "Event", _Event)
        monkeypatch.setattr(cupy.cuda.runtime, "eventRecord", event_record, raising=False)
        monkeypatch.setattr(type(cupy.cuda.get_current_stream()), "wait_event", wait_event, raising=False)
        yield simulator
