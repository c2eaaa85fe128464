"""The one place that decides which mode "auto" runs, and what overflow does by default.

Policy (see docs/modes.md for the evidence, its limits and what would overturn it). Whatever
"auto" chooses makes no host synchronization:
- 2-D input: PER_ACTIVATION (for (N, C) data it is the same normalization as SPATIAL).
- 3-D to 5-D input: SPATIAL.
- Training on channels-last data (3-D to 5-D): SPATIAL_PERSISTENT, unchecked (on_overflow
  "ignore"), as PyTorch runs it for channels_last and channels_last_3d without ever reading the
  flag. cuDNN 9's header gives the mode's overflow-prone integer reduction to NCHW, and its
  documentation limits the overflow discussion to NCHW. PyTorch stopped using persistent for NCHW
  after accuracy losses (ResNeXt-101, R(2+1)D), so NCHW runs SPATIAL.
- Backward follows the mode that forward actually ran (``SavedStats.mode``), unchecked too.
- SPATIAL_PERSISTENT asked for by name defaults to on_overflow="raise".
"""

from __future__ import annotations

from .layout import make_layout
from .modes import AUTO, Mode, OnOverflow, parse_mode, parse_on_overflow
from .validate import resolve_backward_settings

__all__ = ["TRAINING", "INFERENCE", "BACKWARD", "backward_settings", "choose_mode"]

TRAINING, INFERENCE, BACKWARD = "forward_training", "forward_inference", "backward"


def choose_mode(requested, shape, channel_axis, operation: str, on_overflow=None) -> tuple[Mode, OnOverflow]:
    """Return the concrete mode to run and the overflow policy for it."""
    # the choice depends on the rank of x, not its sizes: remembered per (arguments, ndim)
    try:
        # types too: True == 1 == Mode.SPATIAL as keys, but only some of them are valid arguments
        key = (
            type(requested), requested, type(on_overflow), on_overflow, operation, len(shape),
            type(channel_axis), channel_axis,
        )
        chosen = _CHOSEN.get(key) if 0 not in shape else None  # an empty dim: let the checks refuse it
    except Exception:  # an unhashable or misbehaving argument: the checks below say what is wrong with it
        key = chosen = None
    if chosen is None:
        chosen = _choose(requested, shape, channel_axis, operation, on_overflow)
        if key is not None and 0 not in shape and len(_CHOSEN) < 4096:
            _CHOSEN[key] = chosen
    return chosen


_CHOSEN: dict = {}


def _choose(requested, shape, channel_axis, operation, on_overflow):
    mode = parse_mode(requested, allow_auto=True)
    chosen_by_policy = mode == AUTO
    if chosen_by_policy:
        layout = make_layout(shape, channel_axis, Mode.SPATIAL)
        if layout.ndim == 2:
            mode = Mode.PER_ACTIVATION
        elif operation == TRAINING and layout.channels_last:
            mode = Mode.SPATIAL_PERSISTENT
        else:
            mode = Mode.SPATIAL
    if on_overflow is None:  # where auto chooses persistent, cuDNN documents no overflow: nothing to read
        return mode, OnOverflow.IGNORE if chosen_by_policy else OnOverflow.RAISE
    return mode, parse_on_overflow(on_overflow)


def backward_settings(x, saved, mode, eps, channel_axis, on_overflow):
    """``(mode, on_overflow, eps, channel_axis)`` a backward call runs with: what ``saved``
    recorded, checked against the explicit arguments (resolve_backward_settings), and the policy's
    mode when there is no ``saved`` and ``mode`` is "auto"."""
    mode, eps, channel_axis = resolve_backward_settings(x, saved, mode, eps, channel_axis)
    if on_overflow is None and saved is not None:
        on_overflow = saved.on_overflow
    mode, on_overflow = choose_mode(mode, x.shape, channel_axis, BACKWARD, on_overflow)
    return mode, on_overflow, eps, channel_axis
