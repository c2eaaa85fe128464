"""What cuDNN's batch-norm calls accept, in one place: the 32-bit limits, the batch-size limits
and the conditions of the Ex fast path.

The batch-size limits are the ones PyTorch still guards (pytorch#19911: training with N past
880801 and pytorch#2917: inference with N past 65535 fail with CUDNN_STATUS_NOT_SUPPORTED). Whether
cuDNN 9 still has them is measured on a GPU machine by ``.ci/gpu-validate``; until then they are
respected. ``LIMITS`` is read at plan time, so a test can lower it to exercise the routing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._core.layout import Layout
from .._core.modes import Activation, Mode
from .errors import CudnnLimitError

__all__ = [
    "FUSED_EX_ACTIVATIONS", "LIMITS", "Limits", "check_descriptor_fits", "ex_path_unmet", "fused_ex_path_unmet",
    "inference_chunk", "training_route",
]


@dataclasses.dataclass(frozen=True)
class Limits:
    """The numbers; see the module docstring for where each comes from."""

    int32_max: int = 2**31 - 1  # dims, strides and element counts reach cuDNN as C int
    training_max_batch: int = 880801  # ForwardTraining / Backward, N of the descriptor
    inference_max_batch: int = 65535  # ForwardInference, N of the descriptor


LIMITS = Limits()

# The 2-D route: an (N, C) input is the same computation as a 1 x C x N x 1 channels-last tensor
# in SPATIAL mode (statistics per column over the N rows); it moves N out of cuDNN's batch dim.
ROUTE_AS_SPATIAL_COLUMNS = "spatial_columns"


def check_descriptor_fits(dims, strides, what: str) -> None:
    """CudnnLimitError unless every dim, stride and the element count fits a C int."""
    limit = LIMITS.int32_max
    count = math.prod(dims)
    worst = max(max(dims), max(strides), count)
    if worst > limit:
        raise CudnnLimitError(
            f"{what}: cuDNN takes dims, strides and element counts as 32-bit ints (at most {limit}), "
            f"got dims {tuple(dims)}, strides {tuple(strides)}, {count} elements"
        )


def training_route(layout: Layout) -> str | None:
    """None when training (and backward) can run on ``layout`` as it is, else the route that
    keeps it within cuDNN's limits; CudnnLimitError when there is none."""
    batch, count = layout.shape[0], math.prod(layout.shape)
    if count > LIMITS.int32_max:
        raise CudnnLimitError(
            f"x: training on cuDNN needs the whole batch in one call, and cuDNN indexes with 32-bit ints "
            f"(at most {LIMITS.int32_max} elements), got {count} elements (shape {layout.shape}); "
            "split the batch or run the NumPy reference"
        )
    if batch <= LIMITS.training_max_batch:
        return None
    if layout.ndim == 2:
        return ROUTE_AS_SPATIAL_COLUMNS
    raise CudnnLimitError(
        f"x: cuDNN's training kernels support a batch of at most {LIMITS.training_max_batch} "
        f"(pytorch#19911), got N={batch} (shape {layout.shape}); only 2-D input can be routed around it"
    )


def inference_chunk(layout: Layout) -> int:
    """The largest number of samples one ForwardInference call may take (N itself when it fits)."""
    per_sample = math.prod(layout.shape[1:])
    if per_sample > LIMITS.int32_max:
        raise CudnnLimitError(
            f"x: one sample has {per_sample} elements, more than cuDNN's 32-bit limit {LIMITS.int32_max} "
            f"(shape {layout.shape})"
        )
    return min(layout.shape[0], LIMITS.inference_max_batch, LIMITS.int32_max // per_sample)


def ex_path_unmet(layout: Layout, data_dtype) -> list[str]:
    """The Ex fast path's conditions that ``layout`` and ``data_dtype`` do not meet (empty: it applies).

    NVIDIA's fused NHWC kernels behind cudnnBatchNormalizationForwardTrainingEx / BackwardEx need
    SPATIAL_PERSISTENT, fully packed channels-last data (x is made C-contiguous, so channels-last
    is packed NHWC), half data and C divisible by 4.
    """
    unmet = []
    if layout.mode is not Mode.SPATIAL_PERSISTENT:
        unmet.append(f"mode SPATIAL_PERSISTENT (got {layout.mode.name})")
    if not layout.channels_last:
        unmet.append("channels-last data")
    if np.dtype(data_dtype) != np.float16:
        unmet.append(f"float16 data (got {np.dtype(data_dtype)})")
    if layout.channels % 4:
        unmet.append(f"C % 4 == 0 (got C={layout.channels})")
    return unmet


# The activations cuDNN's fused batch-norm kernels apply (bnOps BN_ACTIVATION, BN_ADD_ACTIVATION).
FUSED_EX_ACTIVATIONS = frozenset({Activation.RELU})


def fused_ex_path_unmet(layout: Layout, data_dtype, activation) -> list[str]:
    """The conditions of the fused Ex calls (bnOps BN_ACTIVATION or BN_ADD_ACTIVATION) that are not
    met (empty: they apply).

    cuDNN's API reference for cudnnBatchNormalizationForwardTrainingEx / BackwardEx lists the fast
    path's conditions for every bnOps: SPATIAL_PERSISTENT, x, y, z, dy, dz, dx fully packed NHWC
    half tensors, C a multiple of 4 (required for BN_ADD_ACTIVATION; cudnn_bn asks it of every
    bnOps, as for the plain Ex path), non-NULL workspace and reserve space of at least the queried
    sizes; and the fused activation is ReLU. The layout conditions are those of ex_path_unmet (x
    is made C-contiguous, and y, z, dy, dx are checked to match it).
    """
    unmet = ex_path_unmet(layout, data_dtype)
    if activation not in FUSED_EX_ACTIVATIONS:
        unmet.append(f"activation in {sorted(a.name for a in FUSED_EX_ACTIVATIONS)} (got {activation})")
    return unmet
