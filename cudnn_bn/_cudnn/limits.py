"""What cuDNN's batch-norm calls accept, in one place: the 32-bit limits, the batch-size limits
and the conditions of the Ex fast path.

The batch-size limits, each a call that fails with CUDNN_STATUS_NOT_SUPPORTED past it:

- training and backward in PER_ACTIVATION past N = 131070 (pytorch#2917, "The magic number is
  131070", on 2-D input; PyTorch guarded it from PR #2919 on);
- training and backward in SPATIAL and SPATIAL_PERSISTENT past N = 880801: PyTorch's own guard,
  measured on cuDNN 7.6.5 in its PR #32763 (for pytorch#29744);
- inference past N = 65535 (pytorch#19911, in eval mode; guarded by the same PR).

Today's PyTorch sends only input of 3 or more dims to cuDNN, so the PER_ACTIVATION figure is no
longer exercised there. Whether cuDNN 9 still has these limits is measured on a GPU machine by the
limit probes of ``.ci/gpu-validate smoke``; until then they are respected. ``LIMITS`` is read at
plan time, so a test can lower it to exercise the routing.
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
    training_max_batch: int = 880801  # SPATIAL and SPATIAL_PERSISTENT ForwardTraining / Backward, N of the descriptor
    per_activation_training_max_batch: int = 131070  # PER_ACTIVATION ForwardTraining / Backward, N of the descriptor
    inference_max_batch: int = 65535  # ForwardInference, N of the descriptor

    def training_batch_limit(self, mode: Mode) -> int:
        """The largest N that training and backward in ``mode`` may pass to cuDNN."""
        return self.per_activation_training_max_batch if mode is Mode.PER_ACTIVATION else self.training_max_batch


LIMITS = Limits()

# The columns route: statistics per column of an (N, F) matrix, which is what 2-D input is in every
# mode and what PER_ACTIVATION input of any rank is (F = every axis but N, in memory order). It is
# the same computation as a 1 x F x N x 1 channels-last tensor in SPATIAL mode, which moves N out of
# cuDNN's batch dim.
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
    limit = LIMITS.training_batch_limit(layout.mode)
    if batch <= limit:
        return None
    if layout.ndim == 2 or layout.mode is Mode.PER_ACTIVATION:
        return ROUTE_AS_SPATIAL_COLUMNS
    raise CudnnLimitError(
        f"x: cuDNN's {layout.mode.name} training kernels support a batch of at most {limit} "
        f"(PyTorch's guard, PR #32763), got N={batch} (shape {layout.shape}); only 2-D and PER_ACTIVATION "
        "input can be routed around it: split the batch, or run the NumPy reference"
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
