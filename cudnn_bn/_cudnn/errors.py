"""Errors raised by the cuDNN layers: one family per cuDNN status category."""

from __future__ import annotations

__all__ = [
    "CudnnBadParamError",
    "CudnnError",
    "CudnnExecutionFailedError",
    "CudnnBuildMismatchError",
    "CudnnInternalError",
    "CudnnLibraryNotFoundError",
    "CudnnLimitError",
    "CudnnNotInitializedError",
    "CudnnNotSupportedError",
    "CudnnOverflowError",
    "CudnnVersionError",
    "error_class_for",
]

RUNTIME_FP_OVERFLOW = 1007  # CUDNN_STATUS_RUNTIME_FP_OVERFLOW


class CudnnError(RuntimeError):
    """A cuDNN call returned a status other than CUDNN_STATUS_SUCCESS.

    Attributes: ``status`` (int), ``status_name`` (e.g. ``"CUDNN_STATUS_BAD_PARAM"``),
    ``function`` (the C function), ``detail`` (cuDNN's last error string, or extra context).
    """

    def __init__(self, status: int, status_name: str, function: str, detail: str = ""):
        self.status = int(status)
        self.status_name = status_name
        self.function = function
        self.detail = detail
        message = f"{function}: {status_name}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.status, self.status_name, self.function, self.detail))


class CudnnNotInitializedError(CudnnError):
    """Status 1000-1999: library not initialized, sub-library or version problems (no usable GPU)."""


class CudnnBadParamError(CudnnError):
    """Status 2000-2999: an argument cuDNN rejected."""


class CudnnNotSupportedError(CudnnError):
    """Status 3000-3999: a shape, layout, dtype or device cuDNN does not support."""


class CudnnInternalError(CudnnError):
    """Status 4000-4999: a failure inside cuDNN (allocation, compilation...)."""


class CudnnExecutionFailedError(CudnnError):
    """Status 5000-5999: a kernel failed to run."""


class CudnnOverflowError(CudnnError, ArithmeticError):
    """CUDNN_STATUS_RUNTIME_FP_OVERFLOW: SPATIAL_PERSISTENT's reduction overflowed."""


_FAMILIES = {
    1000: CudnnNotInitializedError,
    2000: CudnnBadParamError,
    3000: CudnnNotSupportedError,
    4000: CudnnInternalError,
    5000: CudnnExecutionFailedError,
}


def error_class_for(status: int) -> type[CudnnError]:
    """The CudnnError subclass for a non-success status."""
    if status == RUNTIME_FP_OVERFLOW:
        return CudnnOverflowError
    return _FAMILIES.get(status // 1000 * 1000, CudnnError)


class CudnnLibraryNotFoundError(RuntimeError):
    """libcudnn could not be found or loaded; ``searched`` lists every place that was tried."""

    def __init__(self, searched: list[str], hint: str):
        self.searched = list(searched)
        self.hint = hint
        places = "\n".join(f"  - {place}" for place in self.searched)
        super().__init__(f"libcudnn (cuDNN 9) was not found. Looked in:\n{places}\n{hint}")

    def __reduce__(self):
        return (type(self), (self.searched, self.hint))


class CudnnVersionError(RuntimeError):
    """The libcudnn found is older than this package supports."""

    def __init__(self, version: int, path: str, minimum: int):
        self.version, self.path, self.minimum = int(version), path, int(minimum)
        super().__init__(
            f"cuDNN {self.version} loaded from {path} is too old: cudnn_bn needs {self.minimum} or newer "
            "(cuDNN 9); install nvidia-cudnn-cu12 or nvidia-cudnn-cu13, or point CUDNN_BN_LIBRARY at a newer "
            "libcudnn.so.9"
        )

    def __reduce__(self):
        return (type(self), (self.version, self.path, self.minimum))


class CudnnLimitError(ValueError):
    """The input is past a limit of cuDNN's batch-norm calls (32-bit sizes, batch size) and no
    equivalent call within the limits exists; the message names the limit. Raised before any
    native call."""


class CudnnBuildMismatchError(RuntimeError):
    """The loaded libcudnn was built for another CUDA major version than CuPy's runtime.

    Attributes: ``cudnn_cuda_major``, ``cupy_cuda_major``, ``path`` (the libcudnn loaded), ``fix``.
    """

    def __init__(self, cudnn_cuda_major: int, cupy_cuda_major: int, path: str, fix: str):
        self.cudnn_cuda_major, self.cupy_cuda_major = int(cudnn_cuda_major), int(cupy_cuda_major)
        self.path, self.fix = path, fix
        super().__init__(
            f"cuDNN at {path} was built for CUDA {self.cudnn_cuda_major}, but CuPy runs CUDA "
            f"{self.cupy_cuda_major}; {fix}"
        )

    def __reduce__(self):
        return (type(self), (self.cudnn_cuda_major, self.cupy_cuda_major, self.path, self.fix))
