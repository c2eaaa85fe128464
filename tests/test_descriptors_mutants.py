"""Tensor descriptors (cudnn_bn/_cudnn/descriptors.py) refusing what cuDNN's batch norm cannot take,
before the native call, with messages that name what was wrong (docs/testing.md)."""

from __future__ import annotations

import pytest

from cudnn_bn._cudnn.descriptors import TensorDescriptor
from cudnn_bn._cudnn.errors import CudnnLimitError
from cudnn_bn._cudnn.raw import DataType


def test_six_dims_are_refused(cudnn_library):
    with pytest.raises(ValueError):
        TensorDescriptor.from_dims(DataType.FLOAT, (1, 2, 1, 1, 1, 1), (2, 1, 1, 1, 1, 1))


def test_a_dim_past_int32_is_refused_naming_dims_and_strides(cudnn_library):
    with pytest.raises(CudnnLimitError, match=r"^dims, strides: cuDNN takes dims, strides and element counts as 32-bit ints"):
        TensorDescriptor.from_dims(DataType.FLOAT, (1, 2**31, 1, 1), (2**31, 1, 1, 1))
