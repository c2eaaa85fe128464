"""What forward training hands to backward."""

from __future__ import annotations

import dataclasses
from typing import Any

from .modes import Mode

__all__ = ["SavedStats"]


@dataclasses.dataclass(frozen=True)
class SavedStats:
    """Batch statistics saved by ``forward_training`` for ``backward``.

    Attributes:
        mean: batch mean, parameter shape and dtype (cuDNN's ``resultSaveMean``).
        inv_std: ``1 / sqrt(biased batch variance + eps)``, parameter shape and dtype
            (cuDNN's ``resultSaveInvVariance``).
        mode: the :class:`Mode` that actually ran (after ``"auto"`` and any overflow fallback).
        eps: the epsilon used; backward must use the same one.
        channel_axis: 1, or -1 for channels-last.
        reserve_space: device buffer of the cuDNN Ex path, needed by its backward; None elsewhere.
        on_overflow: the overflow policy forward ran under; backward inherits it by default.
    """

    mean: Any
    inv_std: Any
    mode: Mode
    eps: float
    channel_axis: int
    reserve_space: Any = None
    on_overflow: Any = None
