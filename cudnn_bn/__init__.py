"""cudnn_bn: cuDNN's batch normalization for CuPy arrays, with an exact NumPy reference.

``forward_training``, ``forward_inference`` and ``backward`` run the NumPy reference on numpy
arrays and cuDNN on cupy arrays; ``backward_inference`` (the gradient through fixed statistics,
for which cuDNN has no call) runs the reference or CuPy kernels. Importing this package loads
neither CuPy nor libcudnn.
"""

from . import compat, distributed, fused, reference
from ._api import (
    backward,
    backward_inference,
    check_overflow,
    cudnn_available,
    forward_inference,
    forward_training,
)
from ._core.modes import Activation, Mode, OnOverflow
from ._core.saved import SavedStats
from ._cudnn.errors import (
    CudnnBadParamError,
    CudnnBuildMismatchError,
    CudnnError,
    CudnnExecutionFailedError,
    CudnnInternalError,
    CudnnLibraryNotFoundError,
    CudnnLimitError,
    CudnnNotInitializedError,
    CudnnNotSupportedError,
    CudnnOverflowError,
    CudnnVersionError,
)
from .layer import BatchNorm
from .reference import fold_inference

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "BatchNorm",
    "CudnnBadParamError",
    "CudnnBuildMismatchError",
    "CudnnError",
    "CudnnExecutionFailedError",
    "CudnnInternalError",
    "CudnnLibraryNotFoundError",
    "CudnnLimitError",
    "CudnnNotInitializedError",
    "CudnnNotSupportedError",
    "CudnnOverflowError",
    "CudnnVersionError",
    "Mode",
    "OnOverflow",
    "SavedStats",
    "backward",
    "backward_inference",
    "check_overflow",
    "compat",
    "cudnn_available",
    "distributed",
    "fold_inference",
    "forward_inference",
    "forward_training",
    "fused",
    "reference",
]
