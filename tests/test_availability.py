"""What `cudnn_status` and `info` say about a machine without a driver, a GPU or CuPy, and the check
that libcudnn was built for the CUDA major that CuPy runs."""

from __future__ import annotations

import sys
import types

import pytest

from cudnn_bn._cudnn import availability, raw
from cudnn_bn._cudnn.availability import cudnn_status
from cudnn_bn._cudnn.errors import CudnnBuildMismatchError
from cudnn_bn._tools.info import collect_info


def _fake_cupy(driver: int = 12090, devices=1, runtime_version: int | None = 12090):
    """A cupy module with what the checks read: the driver version, the device count (or the
    exception counting raises) and, unless ``runtime_version`` is None, the runtime version."""

    def device_count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    runtime = types.SimpleNamespace(driverGetVersion=lambda: driver, getDeviceCount=device_count)
    if runtime_version is not None:
        runtime.runtimeGetVersion = lambda: runtime_version
    return types.SimpleNamespace(__version__="test", cuda=types.SimpleNamespace(runtime=runtime))


def test_no_driver_is_said_plainly(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0, RuntimeError("CUDA driver version is insufficient")))
    usable, reason = cudnn_status()
    assert not usable and "no NVIDIA driver found" in reason and "insufficient" not in reason


def test_a_driver_without_devices_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(12090, 0))
    assert cudnn_status() == (False, "no GPU: CUDA reports 0 devices")


def test_no_cupy_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    usable, reason = cudnn_status()
    assert not usable and "CuPy is not installed" in reason and "cudnn_bn[cuda12]" in reason


def test_info_without_a_driver_agrees_with_cudnn_status(monkeypatch, cudnn_library):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0, RuntimeError("CUDA driver version is insufficient")))
    info = collect_info()
    assert info["cuda_driver"].startswith("none") and info["gpu"] == "no GPU (no NVIDIA driver found)"
    assert "no NVIDIA driver found" in info["backends"]
    built = int(cudnn_library.cudnnGetCudartVersion())
    assert info["cudnn_built_for"].startswith(f"CUDA {built // 1000}.")


@pytest.mark.parametrize("runtime,same", [(None, True), (13000, False)])
def test_info_reports_the_cuda_build_check(monkeypatch, cudnn_library, runtime, same):
    built = int(cudnn_library.cudnnGetCudartVersion())
    fake = _fake_cupy(12090, 0)
    fake.cuda.runtime.runtimeGetVersion = lambda: runtime if runtime is not None else built
    monkeypatch.setitem(sys.modules, "cupy", fake)
    line = collect_info()["cuda_build_check"]
    if same or built // 1000 == 13:
        assert line == "libcudnn and CuPy use the same CUDA major"
    else:
        assert line.startswith("MISMATCH") and "nvidia-cudnn-cu13" in line


# ---- the CUDA build of libcudnn against CuPy's runtime ----
@pytest.fixture
def cudart_12_0(monkeypatch):
    library = types.SimpleNamespace(cudnnGetCudartVersion=lambda: 12000, path="/lib/libcudnn.so.9")
    monkeypatch.setattr(raw, "library", lambda: library)


def test_cuda_12_0_matches_cuda_12(cudart_12_0):
    assert availability.cuda_build_mismatch(_fake_cupy(runtime_version=12000)) is None
    assert availability.cuda_build_mismatch(_fake_cupy(runtime_version=12090)) is None


def test_a_cupy_without_the_runtime_query_is_not_a_mismatch(cudart_12_0):
    assert availability.cuda_build_mismatch(_fake_cupy(runtime_version=None)) is None


def test_the_mismatch_names_the_loaded_library(cudart_12_0):
    error = availability.cuda_build_mismatch(_fake_cupy(runtime_version=13000))
    assert isinstance(error, CudnnBuildMismatchError)
    assert (error.cudnn_cuda_major, error.cupy_cuda_major, error.path) == (12, 13, "/lib/libcudnn.so.9")
