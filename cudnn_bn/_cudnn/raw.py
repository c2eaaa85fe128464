"""The raw cuDNN layer: enums, the one prototype table, status checking, lazy binding.

Names and argument order are cuDNN's own; arguments are plain integers and pointers. Every
function that returns ``cudnnStatus_t`` goes through :func:`check_status`. The table is what
``tests/test_raw.py`` compares with the installed headers, so a wrong entry fails CI instead of
crashing on a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from ctypes import POINTER, c_char_p, c_double, c_int, c_size_t, c_void_p

from .errors import CudnnVersionError, error_class_for
from .loader import LoadedLibrary, load_cudnn

__all__ = [
    "ActivationMode",
    "BatchNormOps",
    "DataType",
    "ErrQueryMode",
    "MIN_VERSION",
    "NanPropagation",
    "PROTOTYPES",
    "Status",
    "TensorFormat",
    "check_status",
    "library",
    "status_name",
]

MIN_VERSION = 90000  # cudnnGetVersion() of cuDNN 9.0.0


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

# Opaque C types, spelled as ctypes sees them.
handle_t = c_void_p  # cudnnHandle_t
tensor_desc_t = c_void_p  # cudnnTensorDescriptor_t
activation_desc_t = c_void_p  # cudnnActivationDescriptor_t
stream_t = c_void_p  # cudaStream_t
status_t = c_int  # cudnnStatus_t
enum_t = c_int  # every other enum
int_array = POINTER(c_int)  # int[] and int*
size_out = POINTER(c_size_t)  # size_t*

# name -> (restype, argtypes). The C declaration stands above each entry.
PROTOTYPES = {
    # size_t cudnnGetVersion(void);
    "cudnnGetVersion": (c_size_t, ()),
    # size_t cudnnGetCudartVersion(void);
    "cudnnGetCudartVersion": (c_size_t, ()),
    # const char *cudnnGetErrorString(cudnnStatus_t status);
    "cudnnGetErrorString": (c_char_p, (status_t,)),
    # void cudnnGetLastErrorString(char *message, size_t max_size);
    "cudnnGetLastErrorString": (None, (c_char_p, c_size_t)),
    # cudnnStatus_t cudnnCreate(cudnnHandle_t *handle);
    "cudnnCreate": (status_t, (POINTER(handle_t),)),
    # cudnnStatus_t cudnnDestroy(cudnnHandle_t handle);
    "cudnnDestroy": (status_t, (handle_t,)),
    # cudnnStatus_t cudnnSetStream(cudnnHandle_t handle, cudaStream_t streamId);
    "cudnnSetStream": (status_t, (handle_t, stream_t)),
    # cudnnStatus_t cudnnGetStream(cudnnHandle_t handle, cudaStream_t *streamId);
    "cudnnGetStream": (status_t, (handle_t, POINTER(stream_t))),
    # cudnnStatus_t cudnnQueryRuntimeError(cudnnHandle_t handle, cudnnStatus_t *rstatus,
    #                                      cudnnErrQueryMode_t mode, cudnnRuntimeTag_t *tag);
    "cudnnQueryRuntimeError": (status_t, (handle_t, POINTER(status_t), enum_t, c_void_p)),
    # cudnnStatus_t cudnnCreateTensorDescriptor(cudnnTensorDescriptor_t *tensorDesc);
    "cudnnCreateTensorDescriptor": (status_t, (POINTER(tensor_desc_t),)),
    # cudnnStatus_t cudnnSetTensorNdDescriptor(cudnnTensorDescriptor_t tensorDesc, cudnnDataType_t dataType,
    #                                          int nbDims, const int dimA[], const int strideA[]);
    "cudnnSetTensorNdDescriptor": (status_t, (tensor_desc_t, enum_t, c_int, int_array, int_array)),
    # cudnnStatus_t cudnnGetTensorNdDescriptor(const cudnnTensorDescriptor_t tensorDesc, int nbDimsRequested,
    #     cudnnDataType_t *dataType, int *nbDims, int dimA[], int strideA[]);
    "cudnnGetTensorNdDescriptor": (status_t, (tensor_desc_t, c_int, POINTER(enum_t), int_array, int_array, int_array)),
    # cudnnStatus_t cudnnDestroyTensorDescriptor(cudnnTensorDescriptor_t tensorDesc);
    "cudnnDestroyTensorDescriptor": (status_t, (tensor_desc_t,)),
    # cudnnStatus_t cudnnDeriveBNTensorDescriptor(cudnnTensorDescriptor_t derivedBnDesc,
    #     const cudnnTensorDescriptor_t xDesc, cudnnBatchNormMode_t mode);
    "cudnnDeriveBNTensorDescriptor": (status_t, (tensor_desc_t, tensor_desc_t, enum_t)),
    # cudnnStatus_t cudnnBatchNormalizationForwardTraining(cudnnHandle_t handle, cudnnBatchNormMode_t mode,
    #     const void *alpha, const void *beta, const cudnnTensorDescriptor_t xDesc, const void *x,
    #     const cudnnTensorDescriptor_t yDesc, void *y, const cudnnTensorDescriptor_t bnScaleBiasMeanVarDesc,
    #     const void *bnScale, const void *bnBias, double exponentialAverageFactor, void *resultRunningMean,
    #     void *resultRunningVariance, double epsilon, void *resultSaveMean, void *resultSaveInvVariance);
    "cudnnBatchNormalizationForwardTraining": (
        status_t,
        (handle_t, enum_t, c_void_p, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t,
         c_void_p, c_void_p, c_double, c_void_p, c_void_p, c_double, c_void_p, c_void_p),
    ),
    # cudnnStatus_t cudnnBatchNormalizationForwardInference(cudnnHandle_t handle, cudnnBatchNormMode_t mode,
    #     const void *alpha, const void *beta, const cudnnTensorDescriptor_t xDesc, const void *x,
    #     const cudnnTensorDescriptor_t yDesc, void *y, const cudnnTensorDescriptor_t bnScaleBiasMeanVarDesc,
    #     const void *bnScale, const void *bnBias, const void *estimatedMean, const void *estimatedVariance,
    #     double epsilon);
    "cudnnBatchNormalizationForwardInference": (
        status_t,
        (handle_t, enum_t, c_void_p, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t,
         c_void_p, c_void_p, c_void_p, c_void_p, c_double),
    ),
    # cudnnStatus_t cudnnBatchNormalizationBackward(cudnnHandle_t handle, cudnnBatchNormMode_t mode,
    #     const void *alphaDataDiff, const void *betaDataDiff, const void *alphaParamDiff,
    #     const void *betaParamDiff, const cudnnTensorDescriptor_t xDesc, const void *x,
    #     const cudnnTensorDescriptor_t dyDesc, const void *dy, const cudnnTensorDescriptor_t dxDesc, void *dx,
    #     const cudnnTensorDescriptor_t dBnScaleBiasDesc, const void *bnScale, void *dBnScaleResult,
    #     void *dBnBiasResult, double epsilon, const void *savedMean, const void *savedInvVariance);
    "cudnnBatchNormalizationBackward": (
        status_t,
        (handle_t, enum_t, c_void_p, c_void_p, c_void_p, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t,
         c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, c_void_p, c_void_p, c_double, c_void_p,
         c_void_p),
    ),
    # cudnnStatus_t cudnnBatchNormalizationForwardTrainingEx(cudnnHandle_t handle, cudnnBatchNormMode_t mode,
    #     cudnnBatchNormOps_t bnOps, const void *alpha, const void *beta, const cudnnTensorDescriptor_t xDesc,
    #     const void *xData, const cudnnTensorDescriptor_t zDesc, const void *zData,
    #     const cudnnTensorDescriptor_t yDesc, void *yData, const cudnnTensorDescriptor_t bnScaleBiasMeanVarDesc,
    #     const void *bnScale, const void *bnBias, double exponentialAverageFactor, void *resultRunningMean,
    #     void *resultRunningVariance, double epsilon, void *resultSaveMean, void *resultSaveInvVariance,
    #     cudnnActivationDescriptor_t activationDesc, void *workspace, size_t workSpaceSizeInBytes,
    #     void *reserveSpace, size_t reserveSpaceSizeInBytes);
    "cudnnBatchNormalizationForwardTrainingEx": (
        status_t,
        (handle_t, enum_t, enum_t, c_void_p, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p,
         tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, c_void_p, c_double, c_void_p, c_void_p, c_double,
         c_void_p, c_void_p, activation_desc_t, c_void_p, c_size_t, c_void_p, c_size_t),
    ),
    # cudnnStatus_t cudnnBatchNormalizationBackwardEx(cudnnHandle_t handle, cudnnBatchNormMode_t mode,
    #     cudnnBatchNormOps_t bnOps, const void *alphaDataDiff, const void *betaDataDiff,
    #     const void *alphaParamDiff, const void *betaParamDiff, const cudnnTensorDescriptor_t xDesc,
    #     const void *xData, const cudnnTensorDescriptor_t yDesc, const void *yData,
    #     const cudnnTensorDescriptor_t dyDesc, const void *dyData, const cudnnTensorDescriptor_t dzDesc,
    #     void *dzData, const cudnnTensorDescriptor_t dxDesc, void *dxData,
    #     const cudnnTensorDescriptor_t dBnScaleBiasDesc, const void *bnScaleData, const void *bnBiasData,
    #     void *dBnScaleData, void *dBnBiasData, double epsilon, const void *savedMean,
    #     const void *savedInvVariance, cudnnActivationDescriptor_t activationDesc, void *workSpace,
    #     size_t workSpaceSizeInBytes, void *reserveSpace, size_t reserveSpaceSizeInBytes);
    "cudnnBatchNormalizationBackwardEx": (
        status_t,
        (handle_t, enum_t, enum_t, c_void_p, c_void_p, c_void_p, c_void_p, tensor_desc_t, c_void_p,
         tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p, tensor_desc_t, c_void_p,
         tensor_desc_t, c_void_p, c_void_p, c_void_p, c_void_p, c_double, c_void_p, c_void_p,
         activation_desc_t, c_void_p, c_size_t, c_void_p, c_size_t),
    ),
    # cudnnStatus_t cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(cudnnHandle_t handle,
    #     cudnnBatchNormMode_t mode, cudnnBatchNormOps_t bnOps, const cudnnTensorDescriptor_t xDesc,
    #     const cudnnTensorDescriptor_t zDesc, const cudnnTensorDescriptor_t yDesc,
    #     const cudnnTensorDescriptor_t bnScaleBiasMeanVarDesc, const cudnnActivationDescriptor_t activationDesc,
    #     size_t *sizeInBytes);
    "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize": (
        status_t,
        (handle_t, enum_t, enum_t, tensor_desc_t, tensor_desc_t, tensor_desc_t, tensor_desc_t, activation_desc_t,
         size_out),
    ),
    # cudnnStatus_t cudnnGetBatchNormalizationBackwardExWorkspaceSize(cudnnHandle_t handle,
    #     cudnnBatchNormMode_t mode, cudnnBatchNormOps_t bnOps, const cudnnTensorDescriptor_t xDesc,
    #     const cudnnTensorDescriptor_t yDesc, const cudnnTensorDescriptor_t dyDesc,
    #     const cudnnTensorDescriptor_t dzDesc, const cudnnTensorDescriptor_t dxDesc,
    #     const cudnnTensorDescriptor_t dBnScaleBiasDesc, const cudnnActivationDescriptor_t activationDesc,
    #     size_t *sizeInBytes);
    "cudnnGetBatchNormalizationBackwardExWorkspaceSize": (
        status_t,
        (handle_t, enum_t, enum_t, tensor_desc_t, tensor_desc_t, tensor_desc_t, tensor_desc_t, tensor_desc_t,
         tensor_desc_t, activation_desc_t, size_out),
    ),
    # cudnnStatus_t cudnnGetBatchNormalizationTrainingExReserveSpaceSize(cudnnHandle_t handle,
    #     cudnnBatchNormMode_t mode, cudnnBatchNormOps_t bnOps, const cudnnActivationDescriptor_t activationDesc,
    #     const cudnnTensorDescriptor_t xDesc, size_t *sizeInBytes);
    "cudnnGetBatchNormalizationTrainingExReserveSpaceSize": (
        status_t,
        (handle_t, enum_t, enum_t, activation_desc_t, tensor_desc_t, size_out),
    ),
    # cudnnStatus_t cudnnCreateActivationDescriptor(cudnnActivationDescriptor_t *activationDesc);
    "cudnnCreateActivationDescriptor": (status_t, (POINTER(activation_desc_t),)),
    # cudnnStatus_t cudnnSetActivationDescriptor(cudnnActivationDescriptor_t activationDesc,
    #     cudnnActivationMode_t mode, cudnnNanPropagation_t reluNanOpt, double coef);
    "cudnnSetActivationDescriptor": (status_t, (activation_desc_t, enum_t, enum_t, c_double)),
    # cudnnStatus_t cudnnDestroyActivationDescriptor(cudnnActivationDescriptor_t activationDesc);
    "cudnnDestroyActivationDescriptor": (status_t, (activation_desc_t,)),
}


def status_name(status: int) -> str:
    """``CUDNN_STATUS_...`` for a status code (a numbered name for codes newer than this table)."""
    try:
        return f"CUDNN_STATUS_{Status(status).name}"
    except ValueError:
        return f"CUDNN_STATUS_{int(status)}"


class Library:
    """libcudnn with every prototype of :data:`PROTOTYPES` bound; attribute names are C names."""

    def __init__(self, loaded: LoadedLibrary):
        self.path = loaded.path
        self.found_via = loaded.found_via
        self._cdll = loaded.cdll
        for name, (restype, argtypes) in PROTOTYPES.items():
            function = getattr(self._cdll, name)
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, _checked(name, function) if restype is status_t else function)
        self.version = int(self.cudnnGetVersion())

    def last_error_string(self) -> str:
        """cuDNN's detail for the most recent failure on this thread ('' when it has none)."""
        buffer = ctypes.create_string_buffer(1024)
        self.cudnnGetLastErrorString(buffer, len(buffer))
        return buffer.value.decode(errors="replace").strip()


def check_status(function: str, status: int, detail: str = "") -> None:
    """Raise the CudnnError subclass for ``status`` unless it is CUDNN_STATUS_SUCCESS."""
    if status != Status.SUCCESS:
        if not detail and _LIBRARY is not None:
            detail = _LIBRARY.last_error_string()
        raise error_class_for(status)(status, status_name(status), function, detail)


def _checked(name: str, function):
    def call(*args):
        status = function(*args)
        if status:  # CUDNN_STATUS_SUCCESS is 0; check_status names the failure
            check_status(name, status)

    call.__name__ = call.__qualname__ = name
    return call


_LIBRARY: Library | None = None
_LOCK = threading.Lock()


def library() -> Library:
    """The bound libcudnn, loaded on first use (once, under a lock); checks cuDNN >= 9.0."""
    global _LIBRARY
    if _LIBRARY is None:
        with _LOCK:
            if _LIBRARY is None:
                bound = Library(load_cudnn())
                if bound.version < MIN_VERSION:
                    raise CudnnVersionError(bound.version, bound.path, MIN_VERSION)
                _LIBRARY = bound
    return _LIBRARY
