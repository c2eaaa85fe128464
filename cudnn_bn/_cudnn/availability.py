"""Which backends can run here: the NumPy reference always; cuDNN when CuPy, a GPU and libcudnn
are all present, and libcudnn was built for the CUDA major version CuPy runs."""

from __future__ import annotations

from . import raw
from .errors import CudnnBuildMismatchError

__all__ = ["check_cuda_build_once", "cuda_build_checked", "cuda_build_mismatch", "cudnn_status", "cupy_device_problem",
           "cupy_missing"]


def _driver_version(cupy) -> int | None:
    """cudaDriverGetVersion: 0 when no driver is installed; None when it cannot be asked."""
    try:
        return int(cupy.cuda.runtime.driverGetVersion())
    except Exception:
        return None


def cupy_missing(error: ImportError) -> str:
    """What to say when ``import cupy`` raised ``error``."""
    return f"CuPy is not installed ({error}); pip install 'cudnn_bn[cuda12]' or '[cuda13]'"


def _devices(cupy) -> tuple[int, str | None]:
    """(GPUs CuPy sees, why it cannot use any of them or None)."""
    if _driver_version(cupy) == 0:
        # without a driver CUDA's own message blames the driver's version, which misleads
        return 0, "no NVIDIA driver found on this machine (no GPU); the NumPy reference still works"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: its text says which
        return 0, f"no GPU: {type(error).__name__}: {error}"
    if count < 1:
        return 0, "no GPU: CUDA reports 0 devices"
    return count, None


def cupy_device_problem(cupy) -> str | None:
    """Why CuPy cannot make arrays on this machine (no driver, no GPU), or None when it has a
    device. In words, as cudnn_status says it; for a layer whose state cannot be allocated."""
    return _devices(cupy)[1]


def cudnn_status() -> tuple[bool, str]:
    """(usable, reason): whether cupy arrays can run through cuDNN on this machine, and why not."""
    try:
        import cupy
    except ImportError as error:
        return False, cupy_missing(error)
    count, problem = _devices(cupy)
    if problem is not None:
        return False, problem
    try:
        from .handles import borrow

        with cupy.cuda.Device(0), borrow(0):
            pass
    except Exception as error:
        return False, f"cuDNN unusable: {type(error).__name__}: {error}"
    return True, f"{count} GPU(s)"


# ---- the CUDA build of libcudnn against CuPy's runtime ----
def cuda_build_mismatch(cupy) -> CudnnBuildMismatchError | None:
    """The error to raise when libcudnn was built for another CUDA major than CuPy runs, else None.

    ``pip install torch`` brings nvidia-cudnn-cu13, which overwrites nvidia-cudnn-cu12's
    libcudnn.so.9 in the same folder; nothing else notices.
    """
    library = raw.library()
    cudnn_major = int(library.cudnnGetCudartVersion()) // 1000
    runtime_version = getattr(cupy.cuda.runtime, "runtimeGetVersion", None)
    if runtime_version is None:
        return None
    cupy_major = int(runtime_version()) // 1000
    if cudnn_major == cupy_major:
        return None
    fix = (
        f"reinstall the cuDNN wheel for CUDA {cupy_major}: pip uninstall -y nvidia-cudnn-cu{cudnn_major} && "
        f"pip install --force-reinstall nvidia-cudnn-cu{cupy_major} (both wheels write nvidia/cudnn/lib/libcudnn.so.9; "
        f"the last one installed wins), or install cupy-cuda{cudnn_major}x, or point CUDNN_BN_LIBRARY at a "
        f"libcudnn.so.9 built for CUDA {cupy_major}"
    )
    return CudnnBuildMismatchError(cudnn_major, cupy_major, library.path, fix)


cuda_build_checked = False  # the check passed in this process (the answer cannot change)


def check_cuda_build_once(cupy) -> None:
    """Raise cuda_build_mismatch's error, if any; after the first pass, nothing."""
    global cuda_build_checked
    if not cuda_build_checked:
        error = cuda_build_mismatch(cupy)
        if error is not None:
            raise error
        cuda_build_checked = True
