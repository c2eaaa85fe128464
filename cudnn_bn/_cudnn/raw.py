"""The raw cuDNN layer: enums (defined in enums.py, re-exported here), the one prototype table,
status checking, lazy binding.

Names and argument order are cuDNN's own; arguments are plain integers and pointers. Every
function that returns ``cudnnStatus_t`` goes through :func:`check_status`. The table is what
``tests/test_raw.py`` compares with the installed headers, so a wrong entry fails CI instead of
crashing on a GPU.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, c_char_p, c_double, c_int, c_size_t, c_void_p

from .enums import (
    ENUMS,
    ActivationMode,
    BatchNormOps,
    DataType,
    ErrQueryMode,
    NanPropagation,
    Status,
    TensorFormat,
)
from .errors import CudnnVersionError, error_class_for
from .loader import LoadedLibrary, load_cudnn

__all__ = [
    "ENUMS",
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
