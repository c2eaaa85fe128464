"""Helpers of the group tests: ranks as threads of this process (the in-process tests,
tests/test_distributed*.py), and what every rank of a group step must return, checked against the
reference on the concatenated batch (those tests, and the program every MPI rank runs,
tests/mpi_ranks.py)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from conftest import FLOAT64_ROUNDING
from cudnn_bn import distributed as dist
from cudnn_bn import reference
from cudnn_bn._core.tolerances import assert_close

GROUP_TIMEOUT = 10.0  # seconds a collective of the in-process tests waits; they finish far sooner

# the values the group shares: bit-identical on every rank
SHARED = ("mean", "inv_std", "running_mean", "running_var", "dgamma", "dbeta")


def shards(array, sizes):
    """Split along the batch axis into consecutive pieces of the given sizes."""
    return np.split(array, np.cumsum(sizes)[:-1], axis=0)


def close(actual, expected, dtype, *, what, scale=1.0, float64_tolerance=FLOAT64_ROUNDING):
    """float64: to float64 rounding (relative to the values' scale: the merge and the per-rank sums
    reorder additions); narrower dtypes: the package's tolerance for that dtype."""
    if np.dtype(dtype) == np.float64:
        tolerance = float64_tolerance
        np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tolerance,
                                   atol=tolerance * scale, err_msg=what)
    else:
        assert_close(actual, expected, dtype, what=what, scale=scale)


def host(array) -> np.ndarray:
    """A numpy copy of a numpy or cupy (or simulated cupy) array."""
    return np.array(array.get() if hasattr(array, "get") else array, copy=True)


def rank_outputs(y, saved, running, dx, dgamma, dbeta) -> dict:
    """One rank's results of a forward and backward, as host arrays under the names checked here."""
    return dict(y=host(y), dx=host(dx), mean=host(saved.mean), inv_std=host(saved.inv_std),
                running_mean=host(running[0]), running_var=host(running[1]), dgamma=host(dgamma), dbeta=host(dbeta),
                mode=saved.mode)


def reference_outputs(x, dy, gamma, beta, mode, channel_axis, momentum) -> dict:
    """The reference's results on the concatenated batch, in float64, running statistics from
    zeros and ones."""
    wide = [np.asarray(a, np.float64) for a in (x, dy, gamma, beta)]
    running = [np.zeros(gamma.shape), np.ones(gamma.shape)]
    y, saved = reference.forward_training(wide[0], wide[2], wide[3], *running, mode=mode, momentum=momentum,
                                          channel_axis=channel_axis)
    dx, dgamma, dbeta = reference.backward(wide[0], wide[1], wide[2], saved)
    return dict(y=y, dx=dx, mean=saved.mean, inv_std=saved.inv_std, running_mean=running[0], running_var=running[1],
                dgamma=dgamma, dbeta=dbeta, batch=x.shape[0])


def check_rank(output: dict, expected: dict, rows: slice, dtype, mode, *, float64_tolerance=FLOAT64_ROUNDING) -> None:
    """One rank's outputs against the reference: its rows of y and dx, and the group's values."""
    check = lambda actual, wanted, what, scale=1.0: close(  # noqa: E731
        actual, wanted, dtype, what=what, scale=scale, float64_tolerance=float64_tolerance)
    check(output["y"], expected["y"][rows], "y", scale=4)
    check(output["dx"], expected["dx"][rows], "dx", scale=10)
    check(output["mean"], expected["mean"], "saved.mean")
    check(output["inv_std"], expected["inv_std"], "saved.inv_std", scale=4)
    check(output["running_mean"], expected["running_mean"], "running_mean")
    check(output["running_var"], expected["running_var"], "running_var (unbiased with the group's count)")
    check(output["dgamma"], expected["dgamma"], "dgamma", scale=expected["batch"])
    check(output["dbeta"], expected["dbeta"], "dbeta", scale=expected["batch"])
    assert output["mode"] is mode, (output["mode"], mode)
    assert output["mean"].dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def digest(output: dict, names=SHARED) -> str:
    """A fingerprint of the bits of the named values, to compare ranks."""
    hashed = hashlib.sha256()
    for name in names:
        hashed.update(np.ascontiguousarray(output[name]).tobytes())
    return hashed.hexdigest()


# ---- ranks as threads ----

def run_ranks(world_size, body, *, timeout=GROUP_TIMEOUT, group=None):
    """Run ``body(rank, communicator)`` on one thread per rank; return each rank's result or exception."""
    group = dist.local_group(world_size, timeout=timeout) if group is None else group
    outcomes = [None] * world_size

    def target(rank):
        try:
            outcomes[rank] = body(rank, group[rank])
        except Exception as error:  # returned, so that the test can assert on every rank's error
            outcomes[rank] = error

    threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * timeout)
    assert not any(thread.is_alive() for thread in threads), "a rank is still running: a collective hung"
    return outcomes


def results(outcomes):
    """The per-rank results, re-raising the first rank's exception if any rank failed."""
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return outcomes
