"""The errors of a group call. Every one names the rank that raises it."""

from __future__ import annotations

__all__ = [
    "CollectiveTimeoutError",
    "CommunicatorBusyError",
    "DistributedError",
    "GroupMismatchError",
    "PeerFailedError",
    "on_rank",
]


class DistributedError(RuntimeError):
    """Base of the errors of a group call. ``rank``: the rank that raises it; ``detail``: what happened."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank}: {detail}")
        self.rank, self.detail = rank, detail

    def __reduce__(self):
        return type(self), (self.rank, self.detail)


class CollectiveTimeoutError(DistributedError, TimeoutError):
    """A collective did not complete in time (a rank never called it, or the group broke earlier)."""


class GroupMismatchError(DistributedError, ValueError):
    """The ranks called with inputs that do not belong to one batch (different dtypes, feature
    shapes, modes, eps, momentum, buffer lengths), or they are out of step: not at the same call."""


class PeerFailedError(DistributedError):
    """Another rank's call failed before the collective (that rank raised the reason); this call
    changed nothing."""


class CommunicatorBusyError(DistributedError):
    """A rank's communicator was entered by a second thread while a collective of that rank was
    in progress: every rank (thread) needs a communicator of its own."""


def on_rank(rank: int, error: Exception) -> Exception:
    """A TypeError or ValueError from this rank's own checks, with the rank in its message."""
    if type(error) in (TypeError, ValueError):
        return type(error)(f"rank {rank}: {error}")
    return error
