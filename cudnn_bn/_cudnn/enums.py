"""cuDNN's C enums as IntEnums, with their prefixes stripped, and the table that maps each to its
C typedef (the header-conformance test checks every value).

Part of the raw layer (cudnn_bn/_cudnn/raw.py re-exports them all), in a module of its own that
imports nothing, so that a name such as ``compat.CUDNN_TENSOR_NHWC`` can be a member without
``import cudnn_bn`` loading the binding.
"""

from __future__ import annotations

import enum

__all__ = [
    "ENUMS",
    "ActivationMode",
    "BatchNormOps",
    "DataType",
    "ErrQueryMode",
    "NanPropagation",
    "Status",
    "TensorFormat",
]


class Status(enum.IntEnum):
    """cudnnStatus_t (CUDNN_STATUS_ prefix stripped); the thousands digit is the error family."""

    SUCCESS = 0
    NOT_INITIALIZED = 1001
    SUBLIBRARY_VERSION_MISMATCH = 1002
    SERIALIZATION_VERSION_MISMATCH = 1003
    DEPRECATED = 1004
    LICENSE_ERROR = 1005
    RUNTIME_IN_PROGRESS = 1006
    RUNTIME_FP_OVERFLOW = 1007
    SUBLIBRARY_LOADING_FAILED = 1008
    BAD_PARAM = 2000
    INVALID_VALUE = 2001
    BAD_PARAM_NULL_POINTER = 2002
    BAD_PARAM_MISALIGNED_POINTER = 2003
    BAD_PARAM_NOT_FINALIZED = 2004
    BAD_PARAM_OUT_OF_BOUND = 2005
    BAD_PARAM_SIZE_INSUFFICIENT = 2006
    BAD_PARAM_STREAM_MISMATCH = 2007
    BAD_PARAM_SHAPE_MISMATCH = 2008
    BAD_PARAM_DUPLICATED_ENTRIES = 2009
    BAD_PARAM_ATTRIBUTE_TYPE = 2010
    BAD_PARAM_CUDA_GRAPH_MISMATCH = 2011
    BAD_PARAM_DESCRIPTOR_TYPE = 2012
    NOT_SUPPORTED = 3000
    NOT_SUPPORTED_GRAPH_PATTERN = 3001
    NOT_SUPPORTED_SHAPE = 3002
    NOT_SUPPORTED_DATA_TYPE = 3003
    NOT_SUPPORTED_LAYOUT = 3004
    NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER = 3005
    NOT_SUPPORTED_INCOMPATIBLE_CUDART = 3006
    NOT_SUPPORTED_ARCH_MISMATCH = 3007
    NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING = 3008
    NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE = 3009
    NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT = 3010
    NOT_SUPPORTED_PADDING = 3011
    NOT_SUPPORTED_BAD_LAUNCH_PARAM = 3012
    NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API = 3013
    NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE = 3014
    INTERNAL_ERROR = 4000
    INTERNAL_ERROR_COMPILATION_FAILED = 4001
    INTERNAL_ERROR_UNEXPECTED_VALUE = 4002
    INTERNAL_ERROR_HOST_ALLOCATION_FAILED = 4003
    INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED = 4004
    INTERNAL_ERROR_BAD_LAUNCH_PARAM = 4005
    INTERNAL_ERROR_TEXTURE_CREATION_FAILED = 4006
    EXECUTION_FAILED = 5000
    EXECUTION_FAILED_CUDA_DRIVER = 5001
    EXECUTION_FAILED_CUBLAS = 5002
    EXECUTION_FAILED_CUDART = 5003
    EXECUTION_FAILED_CURAND = 5004


class DataType(enum.IntEnum):
    """cudnnDataType_t, the members this package uses (CUDNN_DATA_ prefix stripped)."""

    FLOAT = 0
    DOUBLE = 1
    HALF = 2
    BFLOAT16 = 9


class TensorFormat(enum.IntEnum):
    """cudnnTensorFormat_t (CUDNN_TENSOR_ prefix stripped)."""

    NCHW = 0
    NHWC = 1
    NCHW_VECT_C = 2


class BatchNormOps(enum.IntEnum):
    """cudnnBatchNormOps_t (CUDNN_BATCHNORM_OPS_ prefix stripped)."""

    BN = 0
    BN_ACTIVATION = 1
    BN_ADD_ACTIVATION = 2


class ErrQueryMode(enum.IntEnum):
    """cudnnErrQueryMode_t (CUDNN_ERRQUERY_ prefix stripped)."""

    RAWCODE = 0
    NONBLOCKING = 1
    BLOCKING = 2


class ActivationMode(enum.IntEnum):
    """cudnnActivationMode_t (CUDNN_ACTIVATION_ prefix stripped)."""

    SIGMOID = 0
    RELU = 1
    TANH = 2
    CLIPPED_RELU = 3
    ELU = 4
    IDENTITY = 5
    SWISH = 6


class NanPropagation(enum.IntEnum):
    """cudnnNanPropagation_t (CUDNN_ prefix stripped)."""

    NOT_PROPAGATE_NAN = 0
    PROPAGATE_NAN = 1


# C enum typedef -> (IntEnum, prefix its members lost); the conformance test checks the values.
ENUMS = {
    "cudnnStatus_t": (Status, "CUDNN_STATUS_"),
    "cudnnDataType_t": (DataType, "CUDNN_DATA_"),
    "cudnnTensorFormat_t": (TensorFormat, "CUDNN_TENSOR_"),
    "cudnnBatchNormOps_t": (BatchNormOps, "CUDNN_BATCHNORM_OPS_"),
    "cudnnErrQueryMode_t": (ErrQueryMode, "CUDNN_ERRQUERY_"),
    "cudnnActivationMode_t": (ActivationMode, "CUDNN_ACTIVATION_"),
    "cudnnNanPropagation_t": (NanPropagation, "CUDNN_"),
}
