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
    return {"cudnn": f"{major}.{minor}.{patch} ({library.version})", "cudnn_path": library.path, "cudnn_found_via": library.found_via}


def _cupy_and_gpu() -> dict:
    try:
        import cupy
    except ImportError:
        return {"cupy": "not installed", "gpu": "no GPU (CuPy not installed)"}
    info = {"cupy": cupy.__version__}
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        info["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}" if driver else "none (no CUDA driver installed)"
    except Exception as error:
        info["cuda_driver"] = f"none ({type(error).__name__})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
        info["gpu"] = ", ".join(names) if names else "no GPU"
    except Exception as error:
        info["gpu"] = f"no GPU ({type(error).__name__}: {error})"
    return info


def collect_info() -> dict:
    info = {"cudnn_bn": __import__("cudnn_bn").__version__, "python": platform.python_version(), "numpy": np.__version__}
    info.update(_cudnn())
    info.update(_cupy_and_gpu())
    usable, reason = cudnn_status()
    info["backends"] = "numpy reference, cuDNN" if usable else f"numpy reference only (cuDNN: {reason})"
    return info


def format_info(info: dict) -> str:
    width = max(len(key) for key in info)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in info.items())
