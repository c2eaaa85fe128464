"""Which backends can run here: the NumPy reference always; cuDNN when CuPy, a GPU and libcudnn are all present."""

from __future__ import annotations

__all__ = ["cudnn_status"]


def cudnn_status() -> tuple[bool, str]:
    """(usable, reason): whether cupy arrays can run through cuDNN on this machine, and why not."""
    try:
        import cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error}); pip install 'cudnn_bn[cuda12]' or '[cuda13]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver; its text says which
        return False, f"no GPU: {type(error).__name__}: {error}"
    if count < 1:
        return False, "no GPU: CUDA reports 0 devices"
    try:
        from .handles import handle_for

        with cupy.cuda.Device(0):
            handle_for(0)
    except Exception as error:
        return False, f"cuDNN unusable: {type(error).__name__}: {error}"
    return True, f"{count} GPU(s)"
