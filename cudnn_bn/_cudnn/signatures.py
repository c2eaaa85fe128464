"""Settled call signatures: what the first call of a signature checked and derived, kept for the
calls that follow, and the per-call checks that it leaves.

A signature is everything the full checks and the policy read except values: the types, shapes,
strides, dtypes and devices of the arrays (the written ones' writability too, the saved
statistics' settings), and mode, eps, channel_axis and on_overflow as given, with their types
(True == 1 as a key). Strides are part of it, so whether an array reaches cuDNN as it is
(contiguous, in cuDNN's dtype and axis order) is settled once too. What depends on values
(momentum, memory overlap, finite saved statistics) is checked per call.
"""

from __future__ import annotations

from .._core.arrays import byte_range, check_no_overlap
from .._core.saved import SavedStats
from .handles import CHECKED, lane_for
from .plans import PLANS

__all__ = [
    "MAX_SIGNATURES",
    "SETTLED",
    "Settled",
    "check_running_apart",
    "extents",
    "lookup",
    "remember",
    "running_signature",
    "saved_signature",
    "signature",
]

MAX_SIGNATURES = 4096


def signature(array):
    """An array's part of a call signature (None for None)."""
    return None if array is None else (type(array), array.shape, array.strides, array.dtype, array.device.id)


def running_signature(mean, var):
    """The running statistics, updated in place: their writability too (an array posing as cupy
    may be read-only). One flat tuple for the common pair."""
    if mean is None or var is None:
        return tuple(None if a is None else (signature(a), getattr(a.flags, "writeable", True)) for a in (mean, var))
    return (
        type(mean), mean.shape, mean.strides, mean.dtype, mean.device.id, getattr(mean.flags, "writeable", True),
        type(var), var.shape, var.strides, var.dtype, var.device.id, getattr(var.flags, "writeable", True),
    )


def saved_signature(saved):
    """Saved statistics' part of a signature: their arrays and settings; TypeError for anything
    but a SavedStats itself, whose call then runs the full checks."""
    if saved is None:
        return None
    if type(saved) is not SavedStats:
        raise TypeError("saved: not a SavedStats")  # no signature: the full checks name the problem
    return (
        signature(saved.mean), signature(saved.inv_std), saved.mode, saved.eps, saved.channel_axis, saved.on_overflow,
        signature(saved.reserve_space),
    )


class Settled:
    """What one call signature settled: the validated description, its plan, the overflow policy
    (``on_overflow``; ``lane``: the handle pool, by what the call does with the overflow flag,
    handles.lane_for; ``checked_overflow``: a persistent call that reads the flag right after its
    kernel), and which arguments reach cuDNN as they are. ``extents``: for forward training with
    running statistics, each of x, gamma, beta, running_mean, running_var as (first, last + 1)
    byte offsets from its address, so that the per-call overlap check is arithmetic on five
    addresses."""

    __slots__ = ("checked", "plan", "on_overflow", "lane", "checked_overflow", "x_as_is", "params_as_is", "extents")

    def __init__(self, checked, plan, on_overflow, x, params, extents=None):
        self.checked, self.plan, self.on_overflow, self.extents = checked, plan, on_overflow, extents
        self.lane = lane_for(plan.persistent, on_overflow)
        self.checked_overflow = self.lane is CHECKED
        self.x_as_is = all(array.flags.c_contiguous for array in x)
        self.params_as_is = all(plan.param_as_is(array) for array in params if array is not None)


def extents(*arrays):
    """(first, last + 1) byte offsets of each array from its address, one flat tuple; None if any
    is empty."""
    found = []
    for array in arrays:
        bounds = byte_range(array)
        if bounds is None:
            return None
        found += (bounds[0] - array.data.ptr, bounds[1] - array.data.ptr)
    return tuple(found)  # flat: (first, last + 1) of the first array, then of the second, ...


SETTLED: dict = {}  # call signature -> its Settled; the same dict for the life of the process
PLANS.empty_with_plans(SETTLED.clear)  # each entry holds a plan: PLANS.clear() empties both


def remember(key, settled):
    """Keep ``settled`` under ``key`` (None: a signature that cannot be a key); returns it."""
    if key is not None:
        signatures = SETTLED
        # each entry holds its plan: bounded like the plans, so evicted plans do not live on here
        if len(signatures) >= min(MAX_SIGNATURES, 2 * PLANS.capacity):
            signatures.clear()
        signatures[key] = settled
    return settled


def lookup(key):
    """``(key, settled)``: what ``key`` settled, or None; key None when it cannot be one."""
    try:
        return key, SETTLED.get(key)
    except Exception:  # an unhashable or misbehaving argument: the full checks name it
        return None, None


def check_running_apart(settled: Settled, x, gamma, beta, running_mean, running_var) -> None:
    """check_no_overlap for the running statistics, from five addresses and the settled extents
    (straight-line: it runs on every call); the general check runs, and names the culprit, only
    when two ranges meet."""
    extents = settled.extents
    if extents is not None:  # None: an empty argument, which the general check handles
        x_low, x_high, gamma_low, gamma_high, beta_low, beta_high, mean_low, mean_high, var_low, var_high = extents
        start = x.data.ptr
        x_low, x_high = start + x_low, start + x_high
        start = gamma.data.ptr
        gamma_low, gamma_high = start + gamma_low, start + gamma_high
        start = beta.data.ptr
        beta_low, beta_high = start + beta_low, start + beta_high
        start = running_mean.data.ptr
        mean_low, mean_high = start + mean_low, start + mean_high
        start = running_var.data.ptr
        var_low, var_high = start + var_low, start + var_high
        if not (
            (mean_low < var_high and var_low < mean_high)
            or (x_low < mean_high and mean_low < x_high) or (x_low < var_high and var_low < x_high)
            or (gamma_low < mean_high and mean_low < gamma_high) or (gamma_low < var_high and var_low < gamma_high)
            or (beta_low < mean_high and mean_low < beta_high) or (beta_low < var_high and var_low < beta_high)
        ):
            return
    check_no_overlap({"running_mean": running_mean, "running_var": running_var}, {"x": x, "gamma": gamma, "beta": beta})
