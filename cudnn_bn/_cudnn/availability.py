"""Which backends can run here: the NumPy reference always; cuDNN when CuPy, a GPU and libcudnn are all present."""

from __future__ import annotations

__all__ = ["cudnn_status"]


def _driver_version(cupy) -> int | None:
    """cudaDriverGetVersion: 0 when no driver is installed; None when it cannot be asked."""
    try:
        return int(cupy.cuda.runtime.driverGetVersion())
    except Exception:
        return None


def cudnn_status() -> tuple[bool, str]:
    """(usable, reason): whether cupy arrays can run through cuDNN on this machine, and why not."""
    try:
        import cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error}); pip install 'cudnn_bn[cuda12]' or '[cuda13]'"
    if _driver_version(cupy) == 0:
        # without a driver CUDA's own message blames the driver's version, which misleads
        return False, "no NVIDIA driver found on this machine (no GPU); the NumPy reference still works"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: its text says which
        return False, f"no GPU: {type(error).__name__}: {error}"
    if count < 1:
        return False, "no GPU: CUDA reports 0 devices"
    try:
        from .handles import borrow

        with cupy.cuda.Device(0), borrow(0):
            pass
    except Exception as error:
        return False, f"cuDNN unusable: {type(error).__name__}: {error}"
    return True, f"{count} GPU(s)"
