"""cudnn_bn.distributed: group batch norm equals single-process batch norm on the concatenated
batch, and the protocol's guarantees (refusals on every rank, sizes agreed first, steps counted).

Ranks run as threads with the in-process communicator (every collective under a timeout, every
thread joined under a timeout), on numpy arrays (the reference) and on the simulated GPU
(tests/fake_cudnn.py: the cuDNN path with host arrays posing as cupy arrays). The NCCL
communicator runs only in the test marked gpu (skipped without a GPU); here its wrapper is
exercised over a stand-in backend. The layer's tests are in tests/test_distributed_layer.py, the
MPI processes' in tests/test_distributed_mpi.py.
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT64_ROUNDING, LAYOUTS, make_case, shape_for
from cudnn_bn import BatchNorm, Mode, fused, reference
from cudnn_bn import distributed as dist
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn.distributed import calls
from fake_cudnn import FakeArray, simulated_gpu
from group_checks import (
    GROUP_TIMEOUT,
    check_rank,
    close,
    digest,
    host,
    rank_outputs,
    reference_outputs,
    results,
    run_ranks,
    shards,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_OF_STEP = "out of step (each rank counts the group calls made on its communicator object)"
FAILED = "failed (an error other than a refused input)"
SYNC_MODES = [Mode.SPATIAL, Mode.PER_ACTIVATION]
DTYPES = [np.float16, np.float32, np.float64]


# ---- one step on every rank ----

def group_step(sizes, shape, mode, channel_axis, dtype, *, device=lambda a: a, seed=0, momentum=0.3, offset=0.0,
               scale=1.0):
    """One training step on len(sizes) ranks; returns (per-rank outputs, the concatenated inputs)."""
    full_shape = (sum(sizes),) + tuple(shape[1:])
    layout, x, dy, gamma, beta = make_case(full_shape, mode, channel_axis, dtype, seed=seed, offset=offset, scale=scale)
    x_shards, dy_shards = shards(x, sizes), shards(dy, sizes)

    def body(rank, group):
        running = [device(np.zeros(layout.param_shape, gamma.dtype)), device(np.ones(layout.param_shape, gamma.dtype))]
        xs, dys = device(x_shards[rank].copy()), device(dy_shards[rank].copy())
        y, saved = dist.forward_training(
            xs, device(gamma.copy()), device(beta.copy()), *running, group=group, mode=mode, momentum=momentum,
            channel_axis=channel_axis,
        )
        dx, dgamma, dbeta = dist.backward(xs, dys, device(gamma.copy()), saved, group=group)
        if isinstance(dx, FakeArray):  # hand the results to another thread only after its stream ran
            sys.modules["cupy"].cuda.get_current_stream().synchronize()
        return dict(y=y, saved=saved, running=running, dx=dx, dgamma=dgamma, dbeta=dbeta)

    return results(run_ranks(len(sizes), body)), (x, dy, gamma, beta)


def check_against_reference(outputs, inputs, mode, channel_axis, dtype, momentum=0.3,
                            float64_tolerance=FLOAT64_ROUNDING):
    """Every rank's outputs against the reference run on the concatenated batch; the group's
    values bit-identical on every rank."""
    expected = reference_outputs(*inputs, mode, channel_axis, momentum)
    start, digests = 0, []
    for output in outputs:
        names = ("y", "saved", "running", "dx", "dgamma", "dbeta")
        on_host = rank_outputs(*(output[name] for name in names))
        rows = slice(start, start + on_host["y"].shape[0])
        check_rank(on_host, expected, rows, dtype, mode, float64_tolerance=float64_tolerance)
        start, digests = rows.stop, digests + [digest(on_host)]
    assert start == inputs[0].shape[0] and len(set(digests)) == 1


# ---- numpy: every mode x layout x dtype, and every world size ----

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", SYNC_MODES, ids=lambda m: m.name)
def test_uneven_shards_match_the_reference_on_the_concatenated_batch(mode, ndim, channel_axis, dtype):
    shape = shape_for(ndim, channel_axis, channels=3)
    outputs, inputs = group_step([2, 1, 3], shape, mode, channel_axis, dtype)  # rank 1 holds one sample
    check_against_reference(outputs, inputs, mode, channel_axis, dtype)
    assert outputs[1]["y"].shape[0] == 1 and outputs[1]["dx"].dtype == dtype


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("mode,ndim,channel_axis",
                         [(Mode.SPATIAL, 4, 1), (Mode.PER_ACTIVATION, 2, 1), (Mode.SPATIAL, 4, -1)])
def test_one_to_eight_ranks(world_size, mode, ndim, channel_axis):
    sizes = [3, 1, 4, 2, 1, 5, 2, 1][:world_size]
    outputs, inputs = group_step(sizes, shape_for(ndim, channel_axis, channels=4), mode, channel_axis, np.float64,
                                 seed=world_size)
    check_against_reference(outputs, inputs, mode, channel_axis, np.float64)


def test_auto_and_persistent_run_spatial_for_4d_and_per_activation_for_2d():
    for requested, shape, expected in (("auto", (4, 3, 2, 2), Mode.SPATIAL),
                                       ("spatial_persistent", (4, 3, 2, 2), Mode.SPATIAL),
                                       ("auto", (4, 3), Mode.PER_ACTIVATION)):
        _, x, _, gamma, beta = make_case(shape, expected, 1, np.float64)
        outcome = results(run_ranks(2, lambda rank, group: dist.forward_training(
            shards(x, [1, 3])[rank], gamma, beta, group=group, mode=requested)))
        assert outcome[0][1].mode is expected and outcome[1][1].mode is expected


# ---- numerics: a large offset ----

# x = 1000 + 0.001 * noise: float64 holds x to spacing(1000) ~ 1.1e-13, so x - mean, and hence y,
# is known only to spacing(1000) / std ~ 1.1e-10 relative, in the reference as much as here. The
# merge's error is of that order (each rank's mean carries its rounding into the deviation terms).
OFFSET, SPREAD = 1000.0, 1e-3
OFFSET_RESOLUTION = np.spacing(OFFSET) / SPREAD
# The variance recovered from inv_std (1 / inv_std**2 - eps) is known to about twice the
# deviations' resolution (2 * OFFSET_RESOLUTION, 2.3e-10 relative); 1e-8 leaves a wide margin and is
# still a hundred times tighter than what the per-rank sums of squares keep (below).
RECOVERED_VARIANCE_RTOL = 1e-8


def test_large_offset_keeps_float64_precision_where_sums_of_squares_do_not():
    sizes = [5, 1, 7, 3]
    full = (sum(sizes), 3, 4, 4)
    outputs, inputs = group_step(sizes, full, Mode.SPATIAL, 1, np.float64, offset=OFFSET, scale=SPREAD, seed=7)
    x = inputs[0]
    exact_var = x.var(axis=(0, 2, 3))  # numpy's var is two-pass
    group_var = 1.0 / host(outputs[0]["saved"].inv_std) ** 2 - 1e-5
    np.testing.assert_allclose(group_var, exact_var, rtol=RECOVERED_VARIANCE_RTOL)
    check_against_reference(outputs, inputs, Mode.SPATIAL, 1, np.float64, float64_tolerance=4 * OFFSET_RESOLUTION)
    # what the merge avoids: summing per-rank sums of squares loses most digits here
    pieces = shards(x, sizes)
    total = sum(p.size / 3 for p in pieces)
    sums = sum(p.sum(axis=(0, 2, 3)) for p in pieces)
    squares = sum((p * p).sum(axis=(0, 2, 3)) for p in pieces)
    naive_var = squares / total - (sums / total) ** 2
    assert np.max(np.abs(naive_var / exact_var - 1)) > 1e-6


def test_spatial_shards_may_differ_in_spatial_size():
    rng = np.random.default_rng(3)
    pieces = [rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((1, 3, 2, 2)), rng.standard_normal((3, 3, 1, 3))]
    gamma, beta = rng.random(3) + 0.5, rng.standard_normal(3)
    grads = [rng.standard_normal(p.shape) for p in pieces]

    def body(rank, group):
        y, saved = dist.forward_training(pieces[rank], gamma, beta, group=group, mode="spatial")
        return (y,) + dist.backward(pieces[rank], grads[rank], gamma, saved, group=group)

    outputs = results(run_ranks(3, body))
    # the union of all values per channel, as an (M, C) matrix in SPATIAL mode
    as_rows = lambda a: np.moveaxis(a, 1, -1).reshape(-1, 3)  # noqa: E731
    x_rows, dy_rows = np.concatenate([as_rows(p) for p in pieces]), np.concatenate([as_rows(g) for g in grads])
    y_ref, saved_ref = reference.forward_training(x_rows, gamma, beta, mode="spatial")
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(x_rows, dy_rows, gamma, saved_ref)
    close(np.concatenate([as_rows(o[0]) for o in outputs]), y_ref, np.float64, what="y")
    close(np.concatenate([as_rows(o[1]) for o in outputs]), dx_ref, np.float64, what="dx")
    close(outputs[2][2], dgamma_ref, np.float64, what="dgamma", scale=10)
    close(outputs[2][3], dbeta_ref, np.float64, what="dbeta", scale=10)


# ---- two collectives per call: a header of fixed size, then the payload it agreed ----

class CountingCommunicator:
    """Passes every collective on, recording its size."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    rank = property(lambda self: self.inner.rank)
    world_size = property(lambda self: self.inner.world_size)
    device_buffers = property(lambda self: getattr(self.inner, "device_buffers", False))

    def allreduce_sum(self, buffer):
        self.sizes.append(buffer.nbytes)
        return self.inner.allreduce_sum(buffer)


@pytest.mark.parametrize("mode,shape", [(Mode.SPATIAL, (6, 5, 3, 2)), (Mode.PER_ACTIVATION, (6, 4, 3))])
def test_each_call_sends_a_header_then_a_payload_of_the_documented_sizes(mode, shape):
    layout, x, dy, gamma, beta = make_case(shape, mode, 1, np.float32)
    counting = [CountingCommunicator(c) for c in dist.local_group(3, timeout=GROUP_TIMEOUT)]
    sizes = [2, 1, 3]

    def body(rank, group):
        y, saved = dist.forward_training(shards(x, sizes)[rank], gamma, beta, group=group, mode=mode)
        after_forward = list(group.sizes)
        dist.backward(shards(x, sizes)[rank], shards(dy, sizes)[rank], gamma, saved, group=group)
        return after_forward, list(group.sizes)

    expected = dist.collective_bytes(3, gamma.size)
    header = 3 * dist.HEADER_SIZE * 8
    for after_forward, after_backward in results(run_ranks(3, body, group=counting)):
        assert after_forward == [header, expected.forward - header]
        assert after_backward == [header, expected.forward - header, header, expected.backward - header]
    assert expected.header == header and expected.forward == expected.backward
    assert dist.HEADER_SIZE == 25
    assert dist.collective_bytes(8, 256) == (8 * (25 + 512) * 8, 8 * (25 + 512) * 8, 8 * 25 * 8)


# ---- failures: typed errors on every rank, never a hang ----

def _step_with(per_rank_inputs, *, mode="spatial", timeout=GROUP_TIMEOUT):
    """Each rank runs forward_training on its own (x, gamma, beta, running_mean, running_var, kwargs)."""

    def body(rank, group):
        x, gamma, beta, running_mean, running_var, options = per_rank_inputs[rank]
        return dist.forward_training(x, gamma, beta, running_mean, running_var, group=group, mode=mode, **options)

    return run_ranks(len(per_rank_inputs), body, timeout=timeout)


def _inputs(shape=(3, 4, 2, 2), dtype=np.float64, seed=0, **options):
    _, x, _, gamma, beta = make_case(shape, "spatial", 1, dtype, seed=seed)
    running = [np.zeros(gamma.shape, gamma.dtype), np.ones(gamma.shape, gamma.dtype)]
    return [x, gamma, beta, *running, options]


def test_a_rank_with_another_dtype_is_named_on_every_rank_and_nothing_changes():
    inputs = [_inputs(), _inputs(dtype=np.float32), _inputs()]
    outcomes = _step_with(inputs)
    for rank, error in enumerate(outcomes):
        assert isinstance(error, dist.GroupMismatchError) and error.rank == rank
        assert "data dtype" in str(error) and "float32 on rank [1]" in str(error)
        assert "float64 on ranks [0, 2]" in str(error)
    for x, gamma, beta, running_mean, running_var, _ in inputs:
        np.testing.assert_array_equal(running_mean, 0.0)
        np.testing.assert_array_equal(running_var, 1.0)


def test_ranks_that_disagree_on_the_feature_shape_eps_or_momentum_are_named():
    _, x, _, gamma, beta = make_case((3, 4, 3), "per_activation", 1, np.float64)
    _, xt, _, gt, bt = make_case((3, 3, 4), "per_activation", 1, np.float64)  # same size, other shape
    outcomes = _step_with([[x, gamma, beta, None, None, {}], [xt, gt, bt, None, None, {}]], mode="per_activation")
    assert all(isinstance(e, dist.GroupMismatchError) and "parameter shape" in str(e) and "(3, 4) on rank [1]" in str(e)
               for e in outcomes)
    outcomes = _step_with([_inputs(eps=1e-5), _inputs(eps=1e-3)])
    assert all(isinstance(e, dist.GroupMismatchError) and "eps" in str(e) for e in outcomes)
    outcomes = _step_with([_inputs(momentum=0.1), _inputs(momentum=0.2), _inputs(momentum=0.1)])
    assert all(isinstance(e, dist.GroupMismatchError) and "momentum" in str(e) and "0.2 on rank [1]" in str(e)
               for e in outcomes)


def test_a_rank_whose_own_input_is_refused_raises_its_reason_and_the_others_name_it():
    inputs = [_inputs(), _inputs(shape=(3, 5, 2, 2)), _inputs()]  # rank 1: x has 5 channels, gamma 4
    inputs[1][1:5] = _inputs()[1:5]
    outcomes = _step_with(inputs)
    assert isinstance(outcomes[1], ValueError)
    assert str(outcomes[1]).startswith(
        "rank 1: gamma: does not match x on this rank: expected shape (5,) for x of shape (3, 5, 2, 2)")
    for rank in (0, 2):
        assert isinstance(outcomes[rank], dist.PeerFailedError) and outcomes[rank].rank == rank
        assert "rank 1 refused its gamma (ValueError) before the collective" in str(outcomes[rank])
    for _, _, _, running_mean, running_var, _ in inputs:
        np.testing.assert_array_equal(running_mean, 0.0)


def test_backward_without_saved_statistics_is_refused_on_that_rank_and_named_elsewhere():
    _, x, dy, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)

    def body(rank, group):
        y, saved = dist.forward_training(x[rank::2], gamma, beta, group=group, mode="per_activation")
        return dist.backward(x[rank::2], dy[rank::2], gamma, None if rank == 1 else saved, group=group)

    outcomes = run_ranks(2, body)
    assert isinstance(outcomes[1], ValueError) and "rank 1: saved" in str(outcomes[1])
    assert isinstance(outcomes[0], dist.PeerFailedError) and "rank 1 refused its saved (ValueError)" in str(outcomes[0])


def test_a_rank_that_never_calls_times_out_the_others_and_the_group_stays_broken():
    group = dist.local_group(3, timeout=0.3)
    _, x, _, gamma, beta = make_case((6, 2), "per_activation", 1, np.float64)

    def body(rank, communicator):
        if rank == 2:
            return "absent"
        return dist.forward_training(x[rank::3], gamma, beta, group=communicator, mode="per_activation")

    outcomes = run_ranks(3, body, group=group, timeout=0.3)
    for rank in (0, 1):
        error = outcomes[rank]
        assert isinstance(error, dist.CollectiveTimeoutError) and isinstance(error, TimeoutError)
        assert error.rank == rank and "waiting for rank(s) [2]" in str(error)
    with pytest.raises(dist.CollectiveTimeoutError, match="stopped working earlier"):
        group[2].allreduce_sum(np.zeros(3))  # no waiting: the group is known to be broken


def test_buffers_of_different_lengths_are_refused_by_the_local_communicator():
    outcomes = run_ranks(2, lambda rank, group: group.allreduce_sum(np.zeros(3 + rank)))
    assert all(isinstance(e, dist.GroupMismatchError) and "differ in length (3 on rank [0]; 4 on rank [1])" in str(e)
               for e in outcomes)


def test_a_buffer_refused_on_one_rank_of_the_local_communicator_is_named_on_the_others_at_once():
    start = time.monotonic()
    outcomes = run_ranks(2, lambda rank, group: group.allreduce_sum(np.zeros(3, np.float32 if rank else np.float64)))
    assert time.monotonic() - start < GROUP_TIMEOUT / 2  # not a timeout
    assert type(outcomes[1]) is TypeError and str(outcomes[1]).startswith("rank 1: buffer: expected a 1-D float64")
    assert isinstance(outcomes[0], dist.PeerFailedError)
    assert "rank(s) [1] refused the buffer they passed to allreduce_sum" in str(outcomes[0])


def test_a_group_holding_one_value_per_statistic_is_refused():
    _, x, _, gamma, beta = make_case((1, 3), "per_activation", 1, np.float64)
    with pytest.raises(ValueError, match=r"rank 0: x: training needs at least 2 values per statistic across the "
                                         r"group .*got 1 \(values per statistic: 1 on rank \[0\]\)"):
        dist.forward_training(x, gamma, beta, group=dist.local_group(1)[0], mode="per_activation")
    outcome = results(run_ranks(2, lambda rank, group: dist.forward_training(x, gamma, beta, group=group,
                                                                             mode="per_activation")))
    assert outcome[0][1].mean.shape == (3,)  # two single-sample ranks make a batch of two


def test_bad_group_arguments():
    _, x, _, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)
    with pytest.raises(TypeError, match="group: expected a communicator"):
        dist.forward_training(x, gamma, beta, group=None)
    with pytest.raises(ValueError, match="world_size: expected a positive int, got 0"):
        dist.local_group(0)
    with pytest.raises(TypeError, match="world_size"):
        dist.local_group(2.0)
    with pytest.raises(ValueError, match="timeout"):
        dist.local_group(2, timeout=0)
    with pytest.raises(TypeError, match="1-D float64"):
        dist.local_group(1)[0].allreduce_sum(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="features: expected a positive int, got 0"):
        dist.collective_bytes(2, 0)


def test_errors_pickle_with_their_rank():
    for error in (dist.CollectiveTimeoutError(3, "late"), dist.GroupMismatchError(1, "dtype"),
                  dist.PeerFailedError(0, "x"), dist.CommunicatorBusyError(2, "two threads")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.rank == error.rank and str(copy) == str(error)


# ---- the protocol: every refusal inside the exchange, sizes agreed first, steps counted ----

class RecordingCommunicator(CountingCommunicator):
    """Records every collective's length, per rank, to show that no collective saw two lengths."""

    def allreduce_sum(self, buffer):
        self.sizes.append(buffer.size)
        return self.inner.allreduce_sum(buffer)


def _same_lengths_on_every_rank(group):
    per_rank = [communicator.sizes for communicator in group]
    assert all(sizes == per_rank[0] for sizes in per_rank), per_rank


def _good_step(rank, group, sizes=(2, 3), seed=11, device=lambda a: a):
    """A valid forward and backward on shard ``rank`` of one batch; returns dgamma, on the host."""
    _, x, dy, gamma, beta = make_case((sum(sizes), 3, 2), "spatial", 1, np.float64, seed=seed)
    pieces, grads = shards(x, list(sizes)), shards(dy, list(sizes))
    x, dy, gamma, beta = device(pieces[rank]), device(grads[rank]), device(gamma), device(beta)
    y, saved = dist.forward_training(x, gamma, beta, group=group, mode="spatial")
    return host(dist.backward(x, dy, gamma, saved, group=group)[1])


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_a_gamma_that_is_not_an_array_is_refused_on_every_rank_and_the_group_still_works(call):
    """gamma sizes the payload, so it is tempting to read it before the collective; it must be
    read inside the guard, or a rank with a bad gamma raises alone and leaves the others waiting."""
    group = [RecordingCommunicator(c) for c in dist.local_group(2, timeout=GROUP_TIMEOUT)]
    _, x, dy, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float64)

    def body(rank, communicator):
        bad = list(gamma) if rank == 1 else gamma
        try:
            if call == "forward":
                dist.forward_training(x[rank::2], bad, beta, group=communicator, mode="spatial")
            else:
                _, saved = dist.forward_training(x[rank::2], gamma, beta, group=communicator, mode="spatial")
                dist.backward(x[rank::2], dy[rank::2], bad, saved, group=communicator)
        except Exception as error:
            return error, _good_step(rank, communicator)
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body, group=group))
    refused, named = outcomes[1][0], outcomes[0][0]
    assert isinstance(refused, TypeError) and str(refused).startswith("rank 1: gamma: expected a numpy.ndarray")
    assert isinstance(named, dist.PeerFailedError) and "rank 1 refused its gamma (TypeError)" in str(named)
    np.testing.assert_array_equal(outcomes[0][1], outcomes[1][1])  # the next step ran on both ranks
    _same_lengths_on_every_rank(group)


def test_ranks_whose_parameters_differ_in_size_never_reach_a_collective_of_two_lengths():
    group = [RecordingCommunicator(c) for c in dist.local_group(2, timeout=GROUP_TIMEOUT)]
    cases = [_inputs(), _inputs(shape=(3, 6, 2, 2))]  # each rank consistent with itself: 4 and 6 channels

    def body(rank, communicator):
        x, gamma, beta, running_mean, running_var, _ = cases[rank]
        try:
            dist.forward_training(x, gamma, beta, running_mean, running_var, group=communicator, mode="spatial")
        except dist.GroupMismatchError as error:
            return error, _good_step(rank, communicator)
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body, group=group))
    for rank, (error, _) in enumerate(outcomes):
        assert error.rank == rank and "the parameter shape: (4,) on rank [0]; (6,) on rank [1]" in str(error)
    _same_lengths_on_every_rank(group)
    header = 2 * dist.HEADER_SIZE
    assert group[0].sizes[0] == header and group[0].sizes[1] == header  # the refused call: its header only


def test_ranks_out_of_step_raise_on_every_rank_and_nothing_is_merged():
    _, x, dy, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)
    running = [[np.zeros(3), np.ones(3)] for _ in range(2)]

    def body(rank, communicator):
        y, saved = dist.forward_training(x[rank::2], gamma, beta, *running[rank], group=communicator,
                                         mode="per_activation")
        before = [r.copy() for r in running[rank]]
        try:
            if rank == 0:  # rank 1 skips this step's backward and starts the next step
                dist.backward(x[0::2], dy[0::2], gamma, saved, group=communicator)
            else:
                dist.forward_training(x[1::2], gamma, beta, *running[rank], group=communicator, mode="per_activation")
        except dist.GroupMismatchError as error:
            return error, before
        raise AssertionError("no error")

    for rank, (error, before) in enumerate(results(run_ranks(2, body))):
        assert error.rank == rank
        assert f"{OUT_OF_STEP}: group call #2 (backward) on rank [0]; group call #2 (forward_training) on rank [1]" \
            in str(error)
        for array, kept in zip(running[rank], before):
            np.testing.assert_array_equal(array, kept)


def test_a_rank_that_skips_a_call_meets_the_next_call_by_its_call_id_and_every_rank_raises():
    """Two calls of one step with the same shapes (two layers of one width, made of the functional
    calls) and their own call_ids: rank 0 skips the first, so its second meets rank 1's first in
    the same header collective, with the same sequence number and kind. The call_ids differ:
    every rank raises, nothing changes, and the next step runs on both ranks."""
    _, x, _, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float64)
    running = [[np.zeros(3), np.ones(3)] for _ in range(2)]

    def body(rank, communicator):
        try:
            if rank == 1:  # rank 0 skips the call with call_id 1
                dist.forward_training(x[rank::2], gamma, beta, *running[rank], group=communicator, call_id=1)
            dist.forward_training(x[rank::2], gamma, beta, *running[rank], group=communicator, call_id=2)
        except dist.GroupMismatchError as error:
            return error, [r.copy() for r in running[rank]], _good_step(rank, communicator)
        raise AssertionError("no error: two calls were merged")

    outcomes = results(run_ranks(2, body))
    for rank, (error, kept, _) in enumerate(outcomes):
        assert error.rank == rank
        assert (f"{OUT_OF_STEP}: group call #1 (forward_training, call_id=2) on rank [0]; group call #1 "
                "(forward_training, call_id=1) on rank [1]") in str(error)
        np.testing.assert_array_equal(kept[0], 0.0)
        np.testing.assert_array_equal(kept[1], 1.0)
    np.testing.assert_array_equal(outcomes[0][2], outcomes[1][2])  # the next step ran on both ranks


@pytest.mark.parametrize("call_id,error_type,message", [
    (-1, ValueError, "call_id: expected an int in [0, 2**53), got -1"),
    (2**53, ValueError, "call_id: expected an int in [0, 2**53), got 9007199254740992"),
    (True, TypeError, "call_id: expected an int, the same on every rank, got True"),
    ("bn1", TypeError, "call_id: expected an int, the same on every rank, got 'bn1'"),
])
def test_a_call_id_refused_on_one_rank_raises_there_and_is_named_on_the_others(call_id, error_type, message):
    _, x, _, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float64)

    def body(rank, communicator):
        try:
            dist.forward_training(x[rank::2], gamma, beta, group=communicator, call_id=call_id if rank else 5)
        except Exception as error:
            return error, _good_step(rank, communicator)
        raise AssertionError("no error")

    (named, after), (refused, after_too) = results(run_ranks(2, body))
    assert type(refused) is error_type and str(refused) == f"rank 1: {message}"
    assert isinstance(named, dist.PeerFailedError) and f"rank 1 refused its call_id ({error_type.__name__})" in str(
        named)
    np.testing.assert_array_equal(after, after_too)


def test_call_ids_that_agree_run_and_a_numpy_integer_is_one():
    outputs = results(run_ranks(2, lambda rank, communicator: [
        dist.forward_training(np.arange(6.0).reshape(2, 3) + rank, np.ones(3), np.zeros(3), group=communicator,
                              call_id=identity)[1].mean for identity in (7, np.int64(7), 2**53 - 1)]))
    for means in outputs:
        for mean in means:
            np.testing.assert_array_equal(mean, [2.0, 3.0, 4.0])


class Rewrapped(CountingCommunicator):
    """A new object over the same rank: the call count of the protocol starts again for it."""


def test_a_rank_whose_call_count_restarted_is_out_of_step_once_then_every_count_goes_on_from_the_highest():
    group = dist.local_group(2, timeout=GROUP_TIMEOUT)

    def body(rank, communicator):
        _good_step(rank, communicator)
        rewrapped = Rewrapped(communicator) if rank == 1 else communicator  # its count starts again
        try:
            _good_step(rank, rewrapped)
        except dist.GroupMismatchError as error:
            return error, _good_step(rank, rewrapped), _good_step(rank, rewrapped)
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body, group=group))
    for error, _, _ in outcomes:
        assert (f"{OUT_OF_STEP}: group call #3 (forward_training) on rank [0]; group call #1 (forward_training) on "
                "rank [1]; every rank must make the same group calls in the same order; this call changed nothing, "
                "and the next group call is #4 on every rank") in str(error)
    for step in (1, 2):  # the next steps run on both ranks
        np.testing.assert_array_equal(outcomes[0][step], outcomes[1][step])


def test_a_rank_whose_count_restarted_and_whose_input_is_refused_counts_on_too():
    group = dist.local_group(2, timeout=GROUP_TIMEOUT)
    _, x, _, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float64)

    def body(rank, communicator):
        _good_step(rank, communicator)
        rewrapped = Rewrapped(communicator) if rank == 1 else communicator
        try:
            dist.forward_training(x[rank::2], list(gamma) if rank == 1 else gamma, beta, group=rewrapped)
        except Exception as error:
            return error, _good_step(rank, rewrapped)
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body, group=group))
    assert type(outcomes[1][0]) is TypeError and isinstance(outcomes[0][0], dist.GroupMismatchError)
    np.testing.assert_array_equal(outcomes[0][1], outcomes[1][1])  # in step again on both ranks


class OtherVersion(CountingCommunicator):
    """Writes another protocol version into its own header."""

    def allreduce_sum(self, buffer):
        if buffer.size == self.world_size * dist.HEADER_SIZE:
            buffer = buffer.copy()
            buffer[self.rank * dist.HEADER_SIZE] += 1
        return self.inner.allreduce_sum(buffer)


def test_ranks_of_different_protocol_versions_are_named():
    group = dist.local_group(2, timeout=GROUP_TIMEOUT)
    outcomes = run_ranks(2, lambda rank, c: _good_step(rank, OtherVersion(c) if rank == 1 else c), group=group)
    for error in outcomes:
        assert isinstance(error, dist.GroupMismatchError)
        assert "different versions of the group protocol: 4 on rank [0]; 5 on rank [1]" in str(error)


def test_the_same_communicator_in_two_threads_is_named_and_stops_the_group_at_once():
    group = dist.local_group(2, timeout=GROUP_TIMEOUT)
    _, x, _, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)
    start = time.monotonic()
    outcomes = run_ranks(2, lambda rank, _: dist.forward_training(x, gamma, beta, group=group[0],
                                                                  mode="per_activation"))
    assert time.monotonic() - start < GROUP_TIMEOUT / 2  # not a timeout
    assert all(isinstance(e, dist.CommunicatorBusyError) and e.rank == 0 for e in outcomes)
    assert all("communicator of rank 0 was entered by a second thread" in str(e) for e in outcomes)
    with pytest.raises(dist.CommunicatorBusyError, match="rank 1: the group stopped working earlier"):
        group[1].allreduce_sum(np.zeros(2))


def test_a_thread_group_larger_than_its_collectives_can_hold_is_refused_at_once():
    """Each collective holds a slot per rank from every rank: 10**7 thread ranks took 12 s and
    gigabytes to make before anything could run, and a larger count ran out of memory."""
    limit = dist.communicators.MAX_LOCAL_WORLD_SIZE
    assert len(dist.local_group(limit, timeout=GROUP_TIMEOUT)) == limit
    for world_size, printed in ((limit + 1, str(limit + 1)), (10**7, "10000000"), (np.int64(2**40), str(2**40)),
                                (10**30, "an int of 100 bits")):
        start = time.monotonic()
        with pytest.raises(ValueError) as refused:
            dist.local_group(world_size)
        assert time.monotonic() - start < 1
        assert str(refused.value).startswith(f"world_size: expected at most {limit} thread ranks (each is a thread "
                                             f"of this process, and each collective holds a slot per rank from every "
                                             f"rank), got {printed}; a larger group runs as processes")


def test_a_communicator_refuses_to_be_pickled_or_copied_saying_why():
    """A copy of a rank's connection would be a second member for one rank (the copy's close
    would free what the original still uses, on MPI); a list of them copies as a list."""
    import copy

    group = dist.local_group(2, timeout=GROUP_TIMEOUT)
    for make in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"^LocalCommunicator cannot be pickled or copied: it is this process's "
                                            r"connection to the other ranks \(LocalCommunicator\(rank=1, "):
            make(group[1])
    assert copy.copy(group) == group  # the list, holding the same communicators
    outcomes = run_ranks(2, lambda rank, communicator: communicator.allreduce_sum(np.ones(2)), group=group)
    assert all(np.array_equal(total, [2.0, 2.0]) for total in outcomes)


def test_a_timeout_past_what_threads_can_wait_is_refused_naming_it():
    limit = repr(threading.TIMEOUT_MAX)
    just_over = threading.TIMEOUT_MAX * 1.0000001
    for timeout, printed in ((1e10, "10000000000.0"), (just_over, repr(just_over)), (2**2000, "an int of 2001 bits"),
                             (10**5000, "an int of 16610 bits"), (np.float64(1e300), "1e+300"),
                             (float("inf"), "inf"), (float("nan"), "nan"), (-1, "-1"), (0.0, "0.0")):
        with pytest.raises(ValueError) as refused:
            dist.local_group(2, timeout=timeout)
        assert str(refused.value) == (f"timeout: expected a positive finite number of seconds, at most "
                                      f"threading.TIMEOUT_MAX ({limit}), got {printed}")
    for wrong_type in (True, np.bool_(False), "1", None):
        with pytest.raises(TypeError, match="timeout: expected a positive number of seconds"):
            dist.local_group(2, timeout=wrong_type)
    assert dist.local_group(2, timeout=threading.TIMEOUT_MAX)[0].timeout == threading.TIMEOUT_MAX
    assert dist.local_group(2, timeout=np.int64(5))[0].timeout == 5.0


def test_a_rank_with_no_values_adds_nothing_to_the_merge():
    """The header carries a count per rank, and a rank with count 0 (an empty shard) leaves the
    merged statistics as they are."""
    rng = np.random.default_rng(2)
    means, m2s = rng.standard_normal((2, 3)), rng.random((2, 3))
    counts = np.array([3.0, 5.0])
    expected = calls._merge(counts, means, m2s, 8)
    empty_in_the_middle = [np.insert(values, 1, 0.0, axis=0) for values in (means, m2s)]
    with_empty = calls._merge(np.array([3.0, 0.0, 5.0]), *empty_in_the_middle, 8)
    for actual, wanted in zip(with_empty, expected):
        np.testing.assert_array_equal(actual, wanted)


# ---- empty shards: a rank with no samples takes part ----

EMPTY_SIZES = [5, 0, 4]


def _check_empty_rank(outputs, inputs, rank, dtype):
    empty = outputs[rank]
    assert empty["y"].shape == empty["dx"].shape == (0,) + tuple(inputs[0].shape[1:])
    assert empty["y"].dtype == empty["dx"].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("mode", SYNC_MODES, ids=lambda m: m.name)
def test_an_empty_shard_takes_part_and_every_rank_gets_the_reference(mode, ndim, channel_axis, dtype):
    outputs, inputs = group_step(EMPTY_SIZES, shape_for(ndim, channel_axis, channels=3), mode, channel_axis, dtype)
    check_against_reference(outputs, inputs, mode, channel_axis, dtype)  # rank 1's shared values included
    _check_empty_rank(outputs, inputs, 1, dtype)


@pytest.mark.parametrize("sizes", [[0, 3, 2], [3, 2, 0], [0, 0, 4, 0], [2, 0]], ids=str)
def test_empty_shards_anywhere_in_the_group_and_next_to_a_one_sample_rank(sizes):
    for mode, ndim, channel_axis in ((Mode.SPATIAL, 4, -1), (Mode.PER_ACTIVATION, 3, 1)):
        outputs, inputs = group_step(sizes, shape_for(ndim, channel_axis, channels=3), mode, channel_axis,
                                     np.float64, seed=len(sizes))
        check_against_reference(outputs, inputs, mode, channel_axis, np.float64)
        for rank in (r for r, size in enumerate(sizes) if size == 0):
            _check_empty_rank(outputs, inputs, rank, np.float64)


def test_a_group_of_empty_shards_is_refused_on_every_rank_naming_the_total_and_the_group_goes_on():
    _, x, dy, gamma, beta = make_case((6, 3, 2, 2), "spatial", 1, np.float64)
    running = [np.zeros(3), np.ones(3)]
    _, saved = reference.forward_training(x, gamma, beta, mode="spatial")

    def body(rank, group):
        outcomes = []
        for call in (lambda: dist.forward_training(x[:0], gamma, beta, *running, group=group, mode="spatial"),
                     lambda: dist.backward(x[:0], dy[:0], gamma, saved, group=group)):
            try:
                call()
            except ValueError as error:
                outcomes.append(str(error))
        y, _ = dist.forward_training(shards(x, [4, 2])[rank], gamma, beta, group=group, mode="spatial")
        return outcomes, y.shape

    for rank, (messages, shape) in enumerate(results(run_ranks(2, body))):
        assert messages == [
            f"rank {rank}: x: every rank's shard is empty, a total of 0 samples in the group (values per statistic: "
            f"0 on ranks [0, 1]); {call} needs samples on at least one rank"
            for call in ("forward_training", "backward")
        ]
        assert shape == ((4, 3, 2, 2) if rank == 0 else (2, 3, 2, 2))
    np.testing.assert_array_equal(running[0], 0.0)  # nothing changed


def test_an_empty_shard_whose_input_is_refused_raises_its_reason_and_the_others_name_it():
    _, x, dy, gamma, beta = make_case((6, 3, 2, 2), "spatial", 1, np.float64)

    def body(rank, group):
        shard = shards(x, [6, 0])[rank]
        return dist.forward_training(shard.astype(np.int32) if rank == 1 else shard, gamma, beta, group=group)

    outcomes = run_ranks(2, body)
    assert type(outcomes[1]) is TypeError
    assert "rank 1: x: expected dtype float16, float32 or float64" in str(outcomes[1])
    assert isinstance(outcomes[0], dist.PeerFailedError) and "rank 1 refused its x (TypeError)" in str(outcomes[0])

    def wrong_dy(rank, group):
        _, saved = dist.forward_training(shards(x, [6, 0])[rank], gamma, beta, group=group)
        return dist.backward(shards(x, [6, 0])[rank], dy[:1] if rank == 1 else dy, gamma, saved, group=group)

    outcomes = run_ranks(2, wrong_dy)
    assert type(outcomes[1]) is ValueError
    assert "rank 1: dy: expected x's shape (0, 3, 2, 2), got (1, 3, 2, 2)" in str(outcomes[1])
    assert isinstance(outcomes[0], dist.PeerFailedError)


def test_an_empty_shards_local_moments_are_zeros_not_nan():
    from cudnn_bn._core.layout import make_layout

    layout = make_layout((0, 3, 2), 1, Mode.SPATIAL, empty_batch=True)
    with np.errstate(all="raise"):  # a mean of no values would warn and give NaN
        mean, m2 = calls._local_moments(np.zeros((0, 3, 2)), layout, np)
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(m2, np.zeros(3))


@pytest.mark.parametrize("call", ["forward_training", "forward_inference", "backward", "backward_inference",
                                  "fused.forward_training", "layer"])
def test_a_single_process_call_on_an_empty_batch_is_refused_saying_why(call):
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), "spatial", 1, np.float32)
    empty, mean, var = x[:0], np.zeros(3, np.float32), np.ones(3, np.float32)
    _, saved = reference.forward_training(x, gamma, beta, mode="spatial")
    calls_by_name = {
        "forward_training": lambda: cudnn_bn.forward_training(empty, gamma, beta),
        "forward_inference": lambda: cudnn_bn.forward_inference(empty, gamma, beta, mean, var),
        "backward": lambda: cudnn_bn.backward(empty, dy[:0], gamma, saved),
        "backward_inference": lambda: cudnn_bn.backward_inference(empty, dy[:0], gamma, mean, var),
        "fused.forward_training": lambda: fused.forward_training(empty, gamma, beta),
        "layer": lambda: BatchNorm(3)(empty),
    }
    with pytest.raises(ValueError) as raised:
        calls_by_name[call]()
    assert str(raised.value) == (
        "x: expected every dimension to be at least 1, got shape (0, 3, 2, 2) (an empty batch: cuDNN describes no "
        "empty tensor and a batch of no samples has no statistics; in synchronized batch norm, cudnn_bn.distributed "
        "takes a rank's empty shard)"
    )


def test_mpi_group_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"mpi_group needs mpi4py .*pip install 'cudnn_bn\[mpi\]'"):
        dist.mpi_group()


def test_importing_the_package_does_not_import_mpi4py():
    code = "import sys, cudnn_bn, cudnn_bn.distributed; print('mpi4py' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


# ---- the simulated GPU: the cuDNN path of every rank, with the in-process communicator ----

@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch) as simulator:
        simulator.fused_kernels = []

        def eager_fuse(kernel_name=None):
            """Stands in for cupy.fuse: the fused function runs op by op on the host arrays."""
            simulator.fused_kernels.append(kernel_name)
            return lambda function: function

        fake_cupy = sys.modules["cupy"]
        if not hasattr(fake_cupy, "fuse"):  # the fake module offers no fuse of its own
            monkeypatch.setattr(fake_cupy, "fuse", eager_fuse, raising=False)
        calls._fused_dx.cache_clear()  # the fake module lives as long as the process: fuse afresh per test
        yield simulator
        calls._fused_dx.cache_clear()


def _device(array):
    return np.array(array, copy=True).view(FakeArray)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ndim,channel_axis", [(2, 1), (4, 1), (4, -1), (5, -1)])
@pytest.mark.parametrize("mode", SYNC_MODES, ids=lambda m: m.name)
def test_simulated_gpu_matches_the_reference_on_the_concatenated_batch(gpu, mode, ndim, channel_axis, dtype):
    outputs, inputs = group_step([2, 1, 3], shape_for(ndim, channel_axis, channels=4), mode, channel_axis, dtype,
                                 device=_device)
    for output in outputs:
        assert all(isinstance(output[name], FakeArray) for name in ("y", "dx", "dgamma", "dbeta"))
        assert isinstance(output["saved"].mean, FakeArray) and output["dx"].dtype == dtype
    check_against_reference(outputs, inputs, mode, channel_axis, dtype)
    # normalization with the group's statistics by ForwardInference, local sums by Backward; no
    # ForwardTraining, whose statistics would be the shard's
    assert gpu.calls.count("cudnnBatchNormalizationForwardInference") == 3
    assert gpu.calls.count("cudnnBatchNormalizationBackward") == 3
    assert "cudnnBatchNormalizationForwardTraining" not in gpu.calls
    assert gpu.fused_kernels == ["cudnn_bn_group_dx"]  # dx: one fused elementwise function


def test_simulated_gpu_large_offset(gpu):
    outputs, inputs = group_step([4, 1, 2], (7, 3, 3, 3), Mode.SPATIAL, 1, np.float64, device=_device, offset=OFFSET,
                                 scale=SPREAD)
    check_against_reference(outputs, inputs, Mode.SPATIAL, 1, np.float64, float64_tolerance=4 * OFFSET_RESOLUTION)


def test_simulated_gpu_sync_batch_norm_with_relu_and_a_residual(gpu):
    sizes = [2, 1]
    rng = np.random.default_rng(12)
    x, dy, residual = (rng.standard_normal((3, 4, 2, 2)).astype(np.float32) for _ in range(3))
    single = BatchNorm(4, mode="spatial", activation="relu")
    y, dx = single(x, residual), single.backward(dy)

    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, mode="spatial", activation="relu", xp=sys.modules["cupy"])
        part = layer(_device(shards(x, sizes)[rank]), _device(shards(residual, sizes)[rank]))
        grad = layer.backward(_device(shards(dy, sizes)[rank]))
        sys.modules["cupy"].cuda.get_current_stream().synchronize()
        return layer._kept.saved.path, host(part), host(grad), host(layer.grad_residual), host(layer.grad_gamma)

    outcomes = results(run_ranks(2, body))
    assert {o[0] for o in outcomes} == {fused.PATH_COMPOSED}  # the plain cuDNN call, then one elementwise kernel
    assert_close(np.concatenate([o[1] for o in outcomes]), y, np.float32, scale=4)
    assert_close(np.concatenate([o[2] for o in outcomes]), dx, np.float32, scale=10)
    np.testing.assert_array_equal(np.concatenate([o[3] for o in outcomes]), single.grad_residual)
    assert_close(outcomes[1][4], single.grad_gamma, np.float32, scale=10)


@pytest.mark.parametrize("mode,ndim,channel_axis", [(Mode.SPATIAL, 4, -1), (Mode.PER_ACTIVATION, 2, 1)])
def test_simulated_gpu_with_an_empty_shard_matches_the_reference_with_no_native_call_on_it(gpu, mode, ndim,
                                                                                          channel_axis):
    outputs, inputs = group_step(EMPTY_SIZES, shape_for(ndim, channel_axis, channels=4), mode, channel_axis,
                                 np.float32, device=_device)
    check_against_reference(outputs, inputs, mode, channel_axis, np.float32)
    assert all(isinstance(outputs[1][name], FakeArray) for name in ("y", "dx", "dgamma", "dbeta"))
    _check_empty_rank(outputs, inputs, 1, np.float32)
    assert gpu.calls.count("cudnnBatchNormalizationForwardInference") == 2  # the two ranks that hold samples
    assert gpu.calls.count("cudnnBatchNormalizationBackward") == 2


def test_simulated_gpu_an_empty_shard_waits_for_the_device_no_more_than_a_shard_of_one_sample(gpu):
    """The simulator counts the host's waits (of all ranks: threads here): a step whose rank 1 is
    empty waits no more often than one whose rank 1 holds a sample."""
    counts = {}
    for sizes in ([5, 1, 4], [5, 0, 4]):
        before = gpu.host_syncs
        group_step(sizes, (10, 3, 2, 2), Mode.SPATIAL, 1, np.float32, device=_device)
        counts[str(sizes)] = gpu.host_syncs - before
    assert 0 < counts["[5, 0, 4]"] <= counts["[5, 1, 4]"], counts


class StandInBackend:
    """What NcclCommunicator uses of cupyx.distributed's NCCLBackend, for one rank: all_reduce
    of a world of one copies its input."""

    def __init__(self, rank=0, n_devices=1):
        self.rank, self._n_devices, self.calls, self.kinds = rank, n_devices, [], []

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        self.calls.append((in_array.shape, op))
        self.kinds.append(type(in_array))
        out_array[...] = in_array


def test_nccl_communicator_wrapper_over_a_stand_in_backend(gpu):
    backend = StandInBackend()
    communicator = dist.NcclCommunicator(backend, 1)
    layout, x, dy, gamma, beta = make_case((5, 3, 2, 2), "spatial", 1, np.float32)
    y, saved = dist.forward_training(_device(x), _device(gamma), _device(beta), group=communicator, mode="spatial")
    dx, dgamma, dbeta = dist.backward(_device(x), _device(dy), _device(gamma), saved, group=communicator)
    y_ref, saved_ref = reference.forward_training(x, gamma, beta, mode="spatial")
    grads_ref = reference.backward(x, dy, gamma, saved_ref)
    assert_close(y, y_ref, np.float32, scale=4)
    for actual, expected in zip((dx, dgamma, dbeta), grads_ref):
        assert_close(actual, expected, np.float32, scale=10)
    header, payload = (dist.HEADER_SIZE,), (2 * 3,)  # every buffer on the device, NCCL's only memory
    assert backend.calls == [(header, "sum"), (payload, "sum")] * 2
    assert all(kind is FakeArray for kind in backend.kinds)
    with pytest.raises(TypeError, match="expected a cupy array"):
        communicator.allreduce_sum(np.zeros(4))
    calls_before = len(backend.calls)
    with pytest.raises(TypeError, match="rank 0: gamma: expected a numpy.ndarray or cupy.ndarray, got list"):
        dist.forward_training(_device(x), [1.0, 1.0, 1.0], _device(beta), group=communicator, mode="spatial")
    assert backend.calls[calls_before:] == [(header, "sum")]  # the refusing rank entered the header collective
    with pytest.raises(ValueError, match="created for 2 devices, got 1"):
        dist.NcclCommunicator(StandInBackend(n_devices=2), 1)
    with pytest.raises(TypeError, match="backend"):
        dist.NcclCommunicator(object(), 1)
    with pytest.raises(TypeError, match="world_size: expected a positive int"):
        dist.NcclCommunicator(StandInBackend(), 1.0)


class ThreadedBackend(StandInBackend):
    """A stand-in NCCL backend for one rank of several (threads): all_reduce sums through a local
    group, and every buffer it is given is recorded."""

    def __init__(self, local):
        super().__init__(local.rank, local.world_size)
        self.local = local

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        self.calls.append((in_array.shape, op))
        out_array[...] = self.local.allreduce_sum(in_array)


def test_nccl_allreduce_sum_agrees_the_lengths_before_nccl_sees_a_buffer(gpu):
    backends = [ThreadedBackend(local) for local in dist.local_group(2, timeout=GROUP_TIMEOUT)]

    def body(rank, _):
        communicator = dist.NcclCommunicator(backends[rank], 2)
        outcomes = []
        for buffer in (_device(np.ones(3 + rank)), np.ones(3) if rank else _device(np.ones(3)),
                       _device(np.full(3, rank + 1.0))):
            try:
                outcomes.append(host(communicator.allreduce_sum(buffer)))
            except Exception as error:
                outcomes.append(error)
        return outcomes

    outcomes = results(run_ranks(2, body))
    for rank, (lengths, refused, good) in enumerate(outcomes):
        assert isinstance(lengths, dist.GroupMismatchError) and lengths.rank == rank
        assert "allreduce buffers differ in length (3 on rank [0]; 4 on rank [1])" in str(lengths)
        np.testing.assert_array_equal(good, [3.0, 3.0, 3.0])  # the next collective works
    assert type(outcomes[1][1]) is TypeError and "rank 1: buffer: expected a cupy array" in str(outcomes[1][1])
    assert isinstance(outcomes[0][1], dist.PeerFailedError) and "rank(s) [1] refused the buffer" in str(outcomes[0][1])
    for backend in backends:  # the lengths' collective (one value per rank) each time; a buffer only when they agree
        assert backend.calls == [((2,), "sum"), ((2,), "sum"), ((2,), "sum"), ((3,), "sum")]


def test_nccl_group_calls_skip_the_agreement_of_lengths_even_through_a_wrapper_on_one_rank(gpu):
    """The group calls' buffers have lengths every rank knows: no rank spends a collective on
    agreeing them, also where a wrapper (which knows nothing of that) stands between the call and
    the communicator on some ranks only."""
    backends = [ThreadedBackend(local) for local in dist.local_group(2, timeout=GROUP_TIMEOUT)]
    _, x, dy, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float32)

    def body(rank, _):
        communicator = dist.NcclCommunicator(backends[rank], 2)
        group = Rewrapped(communicator) if rank == 1 else communicator
        y, saved = dist.forward_training(_device(x[rank::2]), _device(gamma), _device(beta), group=group)
        dx = dist.backward(_device(x[rank::2]), _device(dy[rank::2]), _device(gamma), saved, group=group)[0]
        return host(y), host(dx)

    outcomes = results(run_ranks(2, body))
    y_ref, saved_ref = reference.forward_training(x, gamma, beta, mode="spatial")
    assert_close(np.concatenate([o[0] for o in outcomes]), np.concatenate([y_ref[0::2], y_ref[1::2]]), np.float32,
                 scale=4)
    header, payload = (2 * dist.HEADER_SIZE,), (2 * 2 * 3,)
    for backend in backends:
        assert backend.calls == [(header, "sum"), (payload, "sum")] * 2


class EitherMemory(CountingCommunicator):
    """Declares what a CUDA-aware MPI communicator takes, host and device buffers alike, and
    records the kind of every buffer it is given."""

    device_buffers = host_buffers = True

    def allreduce_sum(self, buffer):
        self.sizes.append(type(buffer).__name__)
        return self.inner.allreduce_sum(buffer)


def _recorded_kinds(device):
    group = [EitherMemory(c) for c in dist.local_group(2, timeout=GROUP_TIMEOUT)]
    results(run_ranks(2, lambda rank, communicator: _good_step(rank, communicator, device=device), group=group))
    return [communicator.sizes for communicator in group]


def test_numpy_arrays_go_to_a_communicator_that_takes_host_buffers_on_the_host_whatever_else_it_takes():
    """Without a GPU: a device buffer would raise CUDA's error."""
    assert _recorded_kinds(lambda a: a) == [["ndarray"] * 4] * 2


def test_cupy_arrays_send_their_payload_on_the_device_to_a_communicator_that_takes_both(gpu):
    # the header is made on the host, where such a communicator takes it; the payload stays on the device
    assert _recorded_kinds(_device) == [["ndarray", "FakeArray"] * 2] * 2


# ---- a real NCCL group of one (needs a GPU; skipped here) ----

@pytest.mark.gpu
def test_nccl_group_of_one_matches_the_reference(monkeypatch):
    import socket

    import cupy

    if "mpi4py.MPI" not in sys.modules:
        # cupyx.distributed imports mpi4py where it is installed, and mpi4py's import initializes
        # MPI, which a process not started by an MPI launcher may wait on: this test needs no MPI
        monkeypatch.setenv("MPI4PY_RC_INITIALIZE", "0")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    communicator = dist.nccl_group(1, 0, port=port)
    try:
        layout, x, dy, gamma, beta = make_case((6, 4, 3, 3), "spatial", 1, np.float32)
        running = [cupy.zeros(4, cupy.float32), cupy.ones(4, cupy.float32)]
        y, saved = dist.forward_training(cupy.asarray(x), cupy.asarray(gamma), cupy.asarray(beta), *running,
                                         group=communicator, mode="spatial")
        grads = dist.backward(cupy.asarray(x), cupy.asarray(dy), cupy.asarray(gamma), saved, group=communicator)
        wide_running = [np.zeros(4), np.ones(4)]
        y_ref, saved_ref = reference.forward_training(x, gamma, beta, *wide_running, mode="spatial", momentum=0.1)
        assert_close(y, y_ref, np.float32, scale=4)
        for actual, expected in zip(grads, reference.backward(x, dy, gamma, saved_ref)):
            assert_close(actual, expected, np.float32, scale=10)
        for actual, expected in zip(running, wide_running):
            assert_close(actual, expected, np.float32)
    finally:
        communicator.close()


def _forward_with_a_misspelled_keyword(x, gamma, beta, saved, dy, group):
    return dist.forward_training(x, gamma, beta, group=group, mode="spatial", chanel_axis=1)


def _backward_with_an_extra_positional(x, gamma, beta, saved, dy, group):
    return dist.backward(x, dy, gamma, saved, "spatial", group=group)


def _forward_without_beta(x, gamma, beta, saved, dy, group):
    return dist.forward_training(x, gamma, group=group, mode="spatial")


@pytest.mark.parametrize("wrong_call,message", [
    (_forward_with_a_misspelled_keyword, "forward_training() got an unexpected keyword argument 'chanel_axis'"),
    (_backward_with_an_extra_positional, "backward() too many positional arguments"),
    (_forward_without_beta, "forward_training() missing a required argument: 'beta'"),
], ids=["misspelled keyword", "extra positional", "missing argument"])
def test_arguments_that_do_not_bind_are_refused_inside_the_guard_on_every_rank(wrong_call, message):
    _, x, dy, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float64)

    def body(rank, group):
        shard, grad = x[rank::2], dy[rank::2]
        _, saved = dist.forward_training(shard, gamma, beta, group=group, mode="spatial")
        try:
            if rank == 1:
                wrong_call(shard, gamma, beta, saved, grad, group)
            elif wrong_call is _backward_with_an_extra_positional:
                dist.backward(shard, grad, gamma, saved, group=group)
            else:
                dist.forward_training(shard, gamma, beta, group=group, mode="spatial")
        except Exception as error:
            return error, _good_step(rank, group)
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body))
    refused, named = outcomes[1][0], outcomes[0][0]
    assert type(refused) is TypeError and str(refused) == f"rank 1: arguments: {message}"
    assert isinstance(named, dist.PeerFailedError) and "rank 1 refused its arguments (TypeError)" in str(named)
    np.testing.assert_array_equal(outcomes[0][1], outcomes[1][1])  # the next step ran on both ranks


def test_the_group_calls_show_their_real_parameters():
    assert str(inspect.signature(dist.forward_training)) == (
        "(x, gamma, beta, running_mean=None, running_var=None, *, group, mode='auto', momentum=0.1, eps=1e-05, "
        "channel_axis=1, call_id=0)")
    assert str(inspect.signature(dist.backward)) == (
        "(x, dy, gamma, saved, *, group, mode=None, eps=None, channel_axis=None, call_id=0)")
    assert dist.forward_training.__name__ == "forward_training" and "group" in dist.forward_training.__doc__
    # group itself is bound by Python before the call starts: a rank without it raises at once
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'group'"):
        dist.forward_training(np.ones((2, 3)), np.ones(3), np.zeros(3))


class InterruptedWhileWidened(np.ndarray):
    """An array whose float64 copy (the first step of this rank's moments) is interrupted, as a
    Ctrl-C or a sys.exit() in a signal handler would interrupt it."""

    interruption: BaseException

    def astype(self, *arguments, **options):
        raise self.interruption


@pytest.mark.parametrize("interruption", [KeyboardInterrupt("Ctrl-C"), SystemExit(3)], ids=lambda e: type(e).__name__)
def test_a_rank_interrupted_while_preparing_enters_the_header_then_raises_the_interruption(interruption):
    _, x, _, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)

    def body(rank, group):
        shard = x[rank::2]
        if rank == 1:
            shard = shard.view(InterruptedWhileWidened)
            shard.interruption = interruption
        try:
            dist.forward_training(shard, gamma, beta, group=group, mode="per_activation")
        except BaseException as error:  # noqa: B036 (what each rank raised is the point)
            return error, _good_step(rank, group)
        raise AssertionError("no error")

    start = time.monotonic()
    outcomes = results(run_ranks(2, body))
    assert time.monotonic() - start < GROUP_TIMEOUT / 2  # nobody waited for a timeout
    assert outcomes[1][0] is interruption  # re-raised unchanged on its rank, after the header collective
    named = outcomes[0][0]
    assert isinstance(named, dist.PeerFailedError)
    assert "rank 1 was interrupted (KeyboardInterrupt or SystemExit) before the collective" in str(named)
    np.testing.assert_array_equal(outcomes[0][1], outcomes[1][1])  # the next step ran on both ranks


def test_a_failure_other_than_bad_input_is_raised_unchanged_and_named_to_the_others(monkeypatch):
    _, x, _, gamma, beta = make_case((4, 3), "per_activation", 1, np.float64)
    real_moments = calls._local_moments

    def failing_on_rank_0(shard, layout, xp):
        if shard.shape[0] == 1:
            raise MemoryError("no memory for the float64 copy")
        return real_moments(shard, layout, xp)

    monkeypatch.setattr(calls, "_local_moments", failing_on_rank_0)
    outcomes = run_ranks(2, lambda rank, group: dist.forward_training(x[: 1 + 2 * rank], gamma, beta, group=group,
                                                                      mode="per_activation"))
    assert type(outcomes[0]) is MemoryError and outcomes[0].__cause__ is None
    assert isinstance(outcomes[1], dist.PeerFailedError) and f"rank 0 {FAILED}" in str(outcomes[1])
