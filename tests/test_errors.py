"""Error classes: family mapping, fields, messages and pickling."""

from __future__ import annotations

import pickle

import pytest

from cudnn_bn import (
    CudnnBadParamError,
    CudnnError,
    CudnnExecutionFailedError,
    CudnnInternalError,
    CudnnLibraryNotFoundError,
    CudnnNotInitializedError,
    CudnnNotSupportedError,
    CudnnOverflowError,
    CudnnVersionError,
)
from cudnn_bn._cudnn.errors import error_class_for
from cudnn_bn._cudnn.raw import Status, check_status, status_name


@pytest.mark.parametrize(
    "status,expected",
    [
        (1001, CudnnNotInitializedError),
        (1008, CudnnNotInitializedError),
        (1007, CudnnOverflowError),
        (2000, CudnnBadParamError),
        (2012, CudnnBadParamError),
        (3000, CudnnNotSupportedError),
        (3014, CudnnNotSupportedError),
        (4004, CudnnInternalError),
        (5000, CudnnExecutionFailedError),
        (9999, CudnnError),
    ],
)
def test_family_mapping(status, expected):
    assert error_class_for(status) is expected
    with pytest.raises(expected) as caught:
        check_status("cudnnSomething", status, detail="why")
    error = caught.value
    assert isinstance(error, CudnnError) and isinstance(error, RuntimeError)
    assert (error.status, error.function, error.detail) == (status, "cudnnSomething", "why")
    assert error.status_name == status_name(status)
    assert str(error) == f"cudnnSomething: {status_name(status)} (why)"


def test_success_raises_nothing():
    check_status("cudnnSomething", Status.SUCCESS)


def test_status_names():
    assert status_name(1007) == "CUDNN_STATUS_RUNTIME_FP_OVERFLOW"
    assert status_name(1999) == "CUDNN_STATUS_1999"


@pytest.mark.parametrize(
    "error",
    [
        CudnnBadParamError(2000, "CUDNN_STATUS_BAD_PARAM", "cudnnBatchNormalizationBackward", "savedMean is NULL"),
        CudnnOverflowError(1007, "CUDNN_STATUS_RUNTIME_FP_OVERFLOW", "cudnnBatchNormalizationForwardTraining"),
        CudnnLibraryNotFoundError(["$CUDNN_BN_LIBRARY: not set", "cuda.pathfinder: nothing"],
                                  "pip install nvidia-cudnn-cu12"),
        CudnnVersionError(8905, "/opt/libcudnn.so.8", 90000),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_with_their_fields(error):
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error) and str(restored) == str(error)
    assert vars(restored) == vars(error)


def test_overflow_is_also_an_arithmetic_error():
    assert issubclass(CudnnOverflowError, ArithmeticError) and issubclass(CudnnOverflowError, CudnnError)


def test_library_not_found_lists_places_and_fix():
    error = CudnnLibraryNotFoundError(["A: no", "B: no"], "pip install nvidia-cudnn-cu12")
    assert "  - A: no\n  - B: no" in str(error) and "pip install nvidia-cudnn-cu12" in str(error)
    assert "8905" in str(CudnnVersionError(8905, "/x/libcudnn.so.8", 90000))
