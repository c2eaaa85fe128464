"""Batch-norm modes and the overflow policy: the names users type and the values cuDNN expects."""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Activation", "Mode", "OnOverflow", "parse_activation", "parse_mode", "parse_on_overflow", "AUTO"]

AUTO = "auto"


class Mode(enum.IntEnum):
    """``cudnnBatchNormMode_t`` with the ``CUDNN_BATCHNORM_`` prefix stripped.

    PER_ACTIVATION normalizes every activation over the batch axis only; SPATIAL normalizes each
    channel over the batch and all spatial axes; SPATIAL_PERSISTENT computes what SPATIAL computes
    with a faster kernel that can overflow (see ``docs/modes.md``).
    """

    PER_ACTIVATION = 0
    SPATIAL = 1
    SPATIAL_PERSISTENT = 2

    def __str__(self) -> str:
        # IntEnum prints its value ("2"); the name is what users compare against the docs
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    @property
    def is_spatial(self) -> bool:
        """True for the two modes whose statistics are per channel."""
        return self is not Mode.PER_ACTIVATION


class OnOverflow(str, enum.Enum):
    """What to do when SPATIAL_PERSISTENT reports ``CUDNN_STATUS_RUNTIME_FP_OVERFLOW``.

    RAISE and FALLBACK read cuDNN's flag right after each call (one host synchronization);
    DEFERRED records the call and leaves the flag for :func:`cudnn_bn.check_overflow`; IGNORE
    never reads it (see docs/modes.md).
    """

    RAISE = "raise"
    FALLBACK = "fallback"
    DEFERRED = "deferred"
    IGNORE = "ignore"

    def __str__(self) -> str:
        # what users type ("fallback"), as Mode prints its name; the class repr stays for repr()
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


_MODE_NAMES = {mode.name.lower(): mode for mode in Mode}


def parse_mode(mode, *, allow_auto: bool = False):
    """Return a :class:`Mode` (or ``"auto"`` where allowed) from a Mode, its value (a Python or
    numpy integer) or its name."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str):
        key = mode.strip().lower()
        if allow_auto and key == AUTO:
            return AUTO
        if key in _MODE_NAMES:
            return _MODE_NAMES[key]
    elif (isinstance(mode, (int, np.integer)) and not isinstance(mode, (bool, np.bool_))
          and int(mode) in Mode._value2member_map_):  # a numpy integer too, as channel_axis takes
        return Mode(int(mode))
    valid = sorted(_MODE_NAMES) + ([AUTO] if allow_auto else [])
    raise ValueError(f"mode: expected one of {valid} or a cudnn_bn.Mode, got {mode!r}")


def parse_on_overflow(on_overflow) -> OnOverflow:
    """Return an :class:`OnOverflow` from its value or name."""
    try:
        return OnOverflow(on_overflow.lower() if isinstance(on_overflow, str) else on_overflow)
    except ValueError:
        valid = [choice.value for choice in OnOverflow]
        raise ValueError(f"on_overflow: expected one of {valid}, got {on_overflow!r}") from None


class Activation(enum.IntEnum):
    """The activation a fused batch-norm call applies after the normalization (and the residual
    add), valued as ``cudnnActivationMode_t`` with the ``CUDNN_ACTIVATION_`` prefix stripped.

    The one place for activations: the fused reference, the cupy paths and the layer read it.
    RELU is the one cuDNN's fused batch-norm kernels run; the other modes of cuDNN's activation
    descriptor (CLIPPED_RELU, ELU, ...) join here with their reference math when they are added.
    """

    RELU = 1

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


_ACTIVATION_NAMES = {activation.name.lower(): activation for activation in Activation}


def parse_activation(activation) -> Activation:
    """Return an :class:`Activation` from an Activation or its name ("relu")."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str) and activation.strip().lower() in _ACTIVATION_NAMES:
        return _ACTIVATION_NAMES[activation.strip().lower()]
    valid = sorted(_ACTIVATION_NAMES)
    raise ValueError(f"activation: expected one of {valid} or a cudnn_bn.Activation, got {activation!r}")
