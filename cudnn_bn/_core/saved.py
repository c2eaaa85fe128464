"""What forward training hands to backward."""

from __future__ import annotations

import dataclasses
from typing import Any

from .modes import Mode, parse_mode, parse_on_overflow
from .scalars import check_channel_axis, check_eps

__all__ = ["SavedStats", "computed_by_forward", "reserve_filled_by", "trusted_saved_stats"]


@dataclasses.dataclass(frozen=True, eq=False)
class SavedStats:
    """Batch statistics saved by ``forward_training`` for ``backward``.

    Attributes:
        mean: batch mean, parameter shape and dtype (cuDNN's ``resultSaveMean``).
        inv_std: ``1 / sqrt(biased batch variance + eps)``, parameter shape and dtype
            (cuDNN's ``resultSaveInvVariance``).
        mode: the :class:`Mode` that actually ran (after ``"auto"`` and any overflow fallback).
            A name or value given here is converted to the Mode at construction.
        eps: the epsilon used (a float >= 2**-126, as forward_training requires); backward must
            use the same one.
        channel_axis: 1, or -1 for channels-last.
        reserve_space: the uint8 device buffer of the cuDNN Ex path, needed by its backward; None
            elsewhere.
        on_overflow: the overflow policy forward ran under (an :class:`OnOverflow` or None);
            backward inherits it by default.

    The scalar fields are validated at construction (a typed error names the field); the arrays
    are checked by ``backward`` against x, since their expected shape and dtype depend on it.

    The SavedStats that a forward of this package returns on cupy arrays remembers that it made
    ``mean`` and ``inv_std``: a SPATIAL_PERSISTENT backward that checks overflow then does not
    read them back to check that they are finite (a host synchronization). Editing those arrays
    in place voids this (CuPy arrays have no version counter to notice it); a SavedStats built
    from arrays, copied, replaced or unpickled is checked.

    Equality and hashing are by identity of the arrays: two SavedStats are equal when they hold
    the same ``mean``, ``inv_std`` and ``reserve_space`` objects and equal mode, eps,
    channel_axis and on_overflow. This is cheap (no device synchronisation), never raises, and
    makes SavedStats usable as a dict key; a copy with equal values but new arrays (e.g. after
    pickling) compares unequal. Compare values with ``numpy.array_equal`` when that is meant.
    """

    mean: Any
    inv_std: Any
    mode: Mode
    eps: float
    channel_axis: int
    reserve_space: Any = None
    on_overflow: Any = None

    # set by this package's forward on the object it returns (see above); not fields, so not
    # compared, not carried by dataclasses.replace, copy or pickle
    _from_forward = False
    _reserve_ops = None  # the bnOps of the ForwardTrainingEx that filled reserve_space with these statistics

    def __post_init__(self) -> None:
        try:
            settings = dict(
                mode=parse_mode(self.mode),
                eps=check_eps(self.eps, training=True),
                channel_axis=check_channel_axis(self.channel_axis),
                on_overflow=None if self.on_overflow is None else parse_on_overflow(self.on_overflow),
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"SavedStats.{error}") from None
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    @classmethod
    def _checked(cls, mean, inv_std, mode: Mode, eps: float, channel_axis: int, reserve_space=None, on_overflow=None,
                 from_forward: bool = False, reserve_ops=None) -> "SavedStats":
        """For the computing paths, whose settings were validated by the call that made them:
        the same object without re-validating (a few microseconds per call). ``from_forward``:
        ``mean`` and ``inv_std`` are what a forward of this package computed; ``reserve_ops``: the
        bnOps of the ForwardTrainingEx that wrote them and filled ``reserve_space`` (a BackwardEx
        may read that reserve space only with the same bnOps)."""
        saved = object.__new__(cls)
        saved.__dict__.update(  # past the frozen __setattr__, as dataclasses' own __init__ goes
            mean=mean, inv_std=inv_std, mode=mode, eps=eps, channel_axis=channel_axis,
            reserve_space=reserve_space, on_overflow=on_overflow,
        )
        if from_forward:
            saved.__dict__["_from_forward"] = True
            if reserve_ops is not None:
                saved.__dict__["_reserve_ops"] = reserve_ops
        return saved

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_from_forward", None)  # a copy's arrays are not the ones the forward made
        state.pop("_reserve_ops", None)
        return state

    def _identity(self) -> tuple:
        return (
            id(self.mean),
            id(self.inv_std),
            id(self.reserve_space),
            self.mode,
            self.eps,
            self.channel_axis,
            self.on_overflow,
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, SavedStats):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


# SavedStats._checked by a name the computing paths of other modules may call: what they return was
# validated by the call that computed it.
trusted_saved_stats = SavedStats._checked


def computed_by_forward(saved: SavedStats) -> bool:
    """Whether ``saved``'s mean and inv_std are what a forward of this package computed (then a
    SPATIAL_PERSISTENT backward need not check that they are finite)."""
    return saved._from_forward


def reserve_filled_by(saved: SavedStats):
    """The bnOps of the ForwardTrainingEx of this package that filled ``saved.reserve_space`` and
    returned ``saved``; None for a SavedStats built, copied, replaced or unpickled, and for a forward
    that ran no Ex call."""
    return saved._reserve_ops
