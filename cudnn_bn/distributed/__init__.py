"""Batch normalization whose statistics span a group of processes or GPUs (synchronized batch norm).

Every rank holds one shard of the batch. The results on every rank equal single-process batch
norm over the concatenated batch: y, the saved statistics, the running statistics (unbiased with
the group's count), dx, dgamma and dbeta, bit-identical on every rank where the group shares
them. See docs/distributed.md for the data flow, the bytes each step sends and what each failure
looks like on each engine.

Modules, bottom up:
- ``errors``: the errors, each naming the rank that raises it;
- ``communicators``: the :class:`Communicator` protocol (one sum-allreduce of a 1-D float64
  buffer) and its engines: threads of one process (:func:`local_group`), NCCL
  (:func:`nccl_group`), MPI (:func:`mpi_group`, mpi4py imported on first use);
- ``protocol``: one group call as a guarded preparation and two collectives (a fixed-size
  header, then the payload whose size the headers agreed), so that a refused input, ranks that
  disagree and ranks out of step raise on every rank instead of hanging or mixing statistics;
- ``calls``: :func:`forward_training` and :func:`backward`;
- ``layer``: :class:`SyncBatchNorm`.
"""

from __future__ import annotations

from .calls import backward, forward_training
from .communicators import (
    DEFAULT_LOCAL_TIMEOUT,
    Communicator,
    LocalCommunicator,
    MpiCommunicator,
    NcclCommunicator,
    local_group,
    mpi_group,
    nccl_group,
)
from .errors import (
    CollectiveTimeoutError,
    CommunicatorBusyError,
    DistributedError,
    GroupMismatchError,
    PeerFailedError,
)
from .layer import SyncBatchNorm
from .protocol import HEADER_SIZE, CollectiveBytes, collective_bytes

__all__ = [
    "DEFAULT_LOCAL_TIMEOUT",
    "HEADER_SIZE",
    "CollectiveBytes",
    "CollectiveTimeoutError",
    "Communicator",
    "CommunicatorBusyError",
    "DistributedError",
    "GroupMismatchError",
    "LocalCommunicator",
    "MpiCommunicator",
    "NcclCommunicator",
    "PeerFailedError",
    "SyncBatchNorm",
    "backward",
    "collective_bytes",
    "forward_training",
    "local_group",
    "mpi_group",
    "nccl_group",
]
