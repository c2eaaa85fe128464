"""`python -m cudnn_bn info`: what was found on this machine. Never fails for a missing GPU."""

from __future__ import annotations

import platform

import numpy as np

from .._cudnn.availability import cudnn_status

__all__ = ["collect_info", "format_info"]


def _cudnn() -> dict:
    from .._cudnn import raw

    try:
        library = raw.library()
    except Exception as error:  # not found / too old: report, do not fail
        return {"cudnn": f"unavailable: {type(error).__name__}: {error}"}
    major, minor, patch = library.version // 10000, library.version // 100 % 100, library.version % 100
    cudart = int(library.cudnnGetCudartVersion())
    return {
        "cudnn": f"{major}.{minor}.{patch} ({library.version})",
        "cudnn_path": library.path,
        "cudnn_found_via": library.found_via,
        "cudnn_built_for": f"CUDA {cudart // 1000}.{cudart % 1000 // 10} (cudnnGetCudartVersion {cudart})",
    }


def _build_match() -> dict:
    """Whether libcudnn and CuPy agree on the CUDA major version (both must be present)."""
    try:
        import cupy

        from .._cudnn.availability import cuda_build_mismatch

        mismatch = cuda_build_mismatch(cupy)
    except Exception:  # no cupy, no libcudnn: the lines above already say so
        return {}
    return {
        "cuda_build_check": "libcudnn and CuPy use the same CUDA major" if mismatch is None else f"MISMATCH: {mismatch}"
    }


def _cupy_and_gpu() -> dict:
    try:
        import cupy
    except ImportError:
        return {"cupy": "not installed", "gpu": "no GPU (CuPy not installed)"}
    info = {"cupy": cupy.__version__}
    try:
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
    except Exception as error:
        info["cupy_cuda_runtime"] = f"unknown ({type(error).__name__})"
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        info["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}" if driver else "none (no CUDA driver installed)"
    except Exception as error:
        info["cuda_driver"] = f"none ({type(error).__name__})"
    if info["cuda_driver"].startswith("none"):
        info["gpu"] = "no GPU (no NVIDIA driver found)"
        return info
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
        info["gpu"] = ", ".join(names) if names else "no GPU"
    except Exception as error:
        info["gpu"] = f"no GPU ({type(error).__name__}: {error})"
    return info


def collect_info() -> dict:
    info = {
        "cudnn_bn": __import__("cudnn_bn").__version__, "python": platform.python_version(), "numpy": np.__version__,
    }
    info.update(_cudnn())
    info.update(_cupy_and_gpu())
    info.update(_build_match())
    usable, reason = cudnn_status()
    info["backends"] = "numpy reference, cuDNN" if usable else f"numpy reference only (cuDNN: {reason})"
    return info


def format_info(info: dict) -> str:
    width = max(len(key) for key in info)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in info.items())
