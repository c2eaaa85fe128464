"""What `cudnn_status` and `info` say about a machine without a driver, a GPU or CuPy."""

from __future__ import annotations

import sys
import types

import pytest

from cudnn_bn._cudnn.availability import cudnn_status
from cudnn_bn._tools.info import collect_info


def _fake_cupy(driver: int, devices):
    def device_count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    runtime = types.SimpleNamespace(driverGetVersion=lambda: driver, getDeviceCount=device_count, runtimeGetVersion=lambda: 12090)
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
