"""The program every rank of an MPI test runs (tests/test_distributed_mpi.py launches it):

    mpiexec -n <ranks> python tests/mpi_ranks.py <report folder> <scenario> [<scenario> ...]

Each rank runs the scenarios in order over ``cudnn_bn.distributed.mpi_group()`` and writes
``<report folder>/rank<r>.json`` after each one: per scenario, how many checks ran, the failures
(with their tracebacks), fingerprints of the values the group shares (the test compares them
across ranks), and why it was skipped, if it was. A check that fails is recorded and the rank goes
on, so that every rank still makes the same group calls.

Scenarios: ``reference`` (every rank's results against the reference on the concatenated batch),
``layer`` (SyncBatchNorm against BatchNorm on the whole batch), ``faults`` (refused inputs, ranks
that disagree or are out of step, a layer frozen on one rank whose next layer meets the others'
first, and the next step after each), ``empty`` (a rank whose shard
has no samples, in the group calls and the layer; a group of empty shards), ``communicator`` (the
MpiCommunicator itself), ``device`` (cupy arrays on the simulated GPU, staged and direct, with an
empty rank too), and ``dies`` (the last rank ends its process in the middle of a step).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from conftest import make_case, shape_for  # noqa: E402
from cudnn_bn import BatchNorm, Mode  # noqa: E402
from cudnn_bn import distributed as dist  # noqa: E402
from group_checks import check_rank, close, digest, rank_outputs, reference_outputs, shards  # noqa: E402

DYING_EXIT_STATUS = 3  # what the rank of the "dies" scenario exits with


class Report:
    """This rank's record of the scenarios, written to its file after each one."""

    def __init__(self, folder: str, rank: int):
        self.path, self.rank, self.scenarios = os.path.join(folder, f"rank{rank}.json"), rank, {}
        self.entry: dict = {}

    @contextlib.contextmanager
    def scenario(self, name: str):
        self.entry = dict(checks=0, failures=[], digests={}, skipped=None, seconds=None, done=False)
        self.scenarios[name] = self.entry
        start = time.perf_counter()
        try:
            yield
        except Exception:  # recorded; the test fails on it
            self.entry["failures"].append(f"scenario {name} stopped: {traceback.format_exc()}")
        self.entry["seconds"] = round(time.perf_counter() - start, 3)
        self.entry["done"] = True
        self.write()

    @contextlib.contextmanager
    def check(self, label: str):
        self.entry["checks"] += 1
        try:
            yield
        except Exception:
            self.entry["failures"].append(f"{label}: {traceback.format_exc(limit=4)}")

    def expect_error(self, label: str, call, error_type, text: str) -> None:
        """``call()`` must raise ``error_type`` with ``text`` in its message (and this rank's number)."""
        with self.check(label):
            try:
                call()
            except error_type as error:
                assert text in str(error), f"expected {text!r} in {error!r}"
                assert str(error).startswith(f"rank {self.rank}: "), str(error)
                return
            raise AssertionError(f"expected {error_type.__name__}, got no error")

    def write(self) -> None:
        partial = self.path + ".partial"
        with open(partial, "w") as file:
            json.dump(self.scenarios, file, indent=1)
        os.replace(partial, self.path)


def _sizes(world_size: int) -> list[int]:
    """Uneven shards; rank 1 holds one sample."""
    return [2, 1, 3, 2, 4, 1][:world_size]


def _sizes_with_an_empty_rank(world_size: int) -> list[int]:
    """Uneven shards; the last rank holds none (and with 3 ranks or more, rank 1 holds one sample)."""
    return [3, 1, 4, 2][: world_size - 1] + [0]


def _group_step(group, sizes, shape, mode, channel_axis, dtype, *, seed, device=lambda a: a, momentum=0.3):
    """This rank's forward and backward of one batch; returns (its outputs on the host, the reference's, its rows)."""
    rank = group.rank
    full_shape = (sum(sizes),) + tuple(shape[1:])
    layout, x, dy, gamma, beta = make_case(full_shape, mode, channel_axis, dtype, seed=seed)
    running = [device(np.zeros(layout.param_shape, gamma.dtype)), device(np.ones(layout.param_shape, gamma.dtype))]
    xs, dys = device(shards(x, sizes)[rank].copy()), device(shards(dy, sizes)[rank].copy())
    y, saved = dist.forward_training(xs, device(gamma.copy()), device(beta.copy()), *running, group=group, mode=mode,
                                     momentum=momentum, channel_axis=channel_axis)
    dx, dgamma, dbeta = dist.backward(xs, dys, device(gamma.copy()), saved, group=group)
    start = sum(sizes[:rank])
    expected = reference_outputs(x, dy, gamma, beta, mode, channel_axis, momentum)
    return rank_outputs(y, saved, running, dx, dgamma, dbeta), expected, slice(start, start + sizes[rank])


def _check_step(report: Report, label: str, step, dtype, mode) -> None:
    output, expected, rows = step
    with report.check(label):
        check_rank(output, expected, rows, dtype, mode)
    report.entry["digests"][label] = digest(output)


# ---------------------------------------------------------------------------------------------
# scenarios

REFERENCE_CASES = [
    (mode, ndim, channel_axis, dtype)
    for mode in (Mode.SPATIAL, Mode.PER_ACTIVATION)
    for ndim, channel_axis in ((2, 1), (4, 1), (4, -1), (5, -1))
    for dtype in (np.float32, np.float64)
] + [(Mode.SPATIAL, 4, -1, np.float16), (Mode.PER_ACTIVATION, 3, 1, np.float16)]


def reference(group, report: Report) -> None:
    sizes = _sizes(group.world_size)
    for seed, (mode, ndim, channel_axis, dtype) in enumerate(REFERENCE_CASES):
        label = f"{mode.name} ndim={ndim} channel_axis={channel_axis} {np.dtype(dtype).name}"
        shape = shape_for(ndim, channel_axis, channels=3)
        step = _group_step(group, sizes, shape, mode, channel_axis, dtype, seed=seed)
        _check_step(report, label, step, dtype, mode)


def _batches(steps: int, shape, seed: int):
    rng = np.random.default_rng(seed)
    return [tuple(2.0 + 3.0 * rng.standard_normal(shape) for _ in range(3)) for _ in range(steps)]


LAYER_OPTIONS = (dict(momentum=None), dict(momentum=0.2, activation="relu"))


def _layers_side_by_side(group, report: Report, sizes, options: dict, *, steps: int, seed: int):
    """SyncBatchNorm on this rank's shard beside BatchNorm on the whole batch, ``steps`` training
    steps, each checked; returns ``(name of the options, synced, single)``."""
    rank = group.rank
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    name = ", ".join(f"{key}={value}" for key, value in options.items())
    synced = dist.SyncBatchNorm(4, group=group, mode="spatial", dtype=np.float64, **options)
    single = BatchNorm(4, mode="spatial", dtype=np.float64, **options)
    with_residual = "activation" in options
    for step, (x, dy, residual) in enumerate(_batches(steps, (sum(sizes), 4, 3, 2), seed=seed)):
        residual = residual if with_residual else None
        y_part = synced(shards(x, sizes)[rank], None if residual is None else shards(residual, sizes)[rank])
        dx_part = synced.backward(shards(dy, sizes)[rank])
        y, dx = single(x, residual), single.backward(dy)
        with report.check(f"sizes {sizes}, {name}: step {step}: y, dx, the gradients, running_var"):
            close(y_part, y[rows], np.float64, what="y")
            close(dx_part, dx[rows], np.float64, what="dx")
            close(synced.grad_gamma, single.grad_gamma, np.float64, what="grad_gamma", scale=50)
            close(synced.grad_beta, single.grad_beta, np.float64, what="grad_beta", scale=50)
            close(synced.running_var, single.running_var, np.float64, what="running_var")
            assert synced.num_batches_tracked == single.num_batches_tracked == step + 1
            if with_residual:
                close(synced.grad_residual, single.grad_residual[rows], np.float64, what="grad_residual")
                assert y_part.size == 0 or y_part.min() == 0.0, "the ReLU ran in training"
    return name, synced, single


def layer(group, report: Report) -> None:
    rank, sizes = group.rank, _sizes(group.world_size)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for options in LAYER_OPTIONS:
        name, synced, single = _layers_side_by_side(group, report, sizes, options, steps=3, seed=5)
        with_residual = "activation" in options
        state = synced.state_dict()
        with report.check(f"{name}: state_dict"):
            expected = single.state_dict()
            assert sorted(state) == sorted(expected)
            assert int(state["num_batches_tracked"]) == int(expected["num_batches_tracked"]) == 3
            for key in ("weight", "bias", "running_mean", "running_var"):
                close(state[key], expected[key], np.float64, what=key)
        report.entry["digests"][f"{name}: state_dict"] = digest(state, ("running_mean", "running_var"))
        report.entry["digests"][f"{name}: grads"] = digest(dict(g=synced.grad_gamma, b=synced.grad_beta), ("g", "b"))
        x_eval, _, residual = _batches(1, (sum(sizes), 4, 3, 2), seed=6)[0]
        residual = residual if with_residual else None
        reloaded = dist.SyncBatchNorm(4, group=group, mode="spatial", dtype=np.float64, **options)
        reloaded.load_state_dict(state)
        with report.check(f"{name}: eval, also after load_state_dict"):
            expected = single.eval()(x_eval, residual)[rows]
            part_residual = None if residual is None else shards(residual, sizes)[rank]
            part = shards(x_eval, sizes)[rank]
            close(synced.eval()(part, part_residual), expected, np.float64, what="eval y")
            close(reloaded.eval()(part, part_residual), expected, np.float64, what="eval y after load")


def faults(group, report: Report) -> None:
    rank, world_size = group.rank, group.world_size
    last, sizes = world_size - 1, _sizes(world_size)
    _, x, dy, gamma, beta = make_case((sum(sizes), 3, 2), "spatial", 1, np.float32)
    shard, grad = shards(x, sizes)[rank], shards(dy, sizes)[rank]

    def good_step(label, seed):
        _check_step(report, label, _group_step(group, sizes, (1, 3, 2), Mode.SPATIAL, 1, np.float32, seed=seed),
                    np.float32, Mode.SPATIAL)

    # a gamma that is not an array on the last rank: it sizes the payload, and must be read inside
    # the guard, or that rank raises alone and the other ranks wait
    bad_gamma = list(gamma) if rank == last else gamma
    call = lambda: dist.forward_training(shard, bad_gamma, beta, group=group, mode="spatial")  # noqa: E731
    if rank == last:
        report.expect_error("gamma not an array: its rank", call, TypeError, "gamma: expected a numpy.ndarray")
    else:
        report.expect_error("gamma not an array: the others", call, dist.PeerFailedError,
                            f"rank {last} refused its gamma (TypeError)")
    good_step("the step after a refused gamma", seed=1)

    # parameters of another size on rank 0, consistent with its own x: a payload sized by them
    # would differ in length between ranks (MPICH: "Message truncated", the whole job aborted);
    # the headers must catch it first
    _, x4, _, gamma4, beta4 = make_case((sum(sizes), 4, 2), "spatial", 1, np.float32)
    own = (shards(x4, sizes)[rank], gamma4, beta4) if rank == 0 else (shard, gamma, beta)
    report.expect_error(
        "parameters of different sizes", lambda: dist.forward_training(*own, group=group, mode="spatial"),
        dist.GroupMismatchError, "the ranks disagree on the parameter shape: (4,) on rank [0]",
    )
    good_step("the step after parameters of different sizes", seed=2)

    # the layer refuses an int32 shard on rank 1: every rank raises, and the next step is not
    # mixed with the refused one
    layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, momentum=None)
    call = lambda: layer(shard.astype(np.int32) if rank == 1 else shard)  # noqa: E731
    if rank == 1:
        report.expect_error("layer, int32 shard: its rank", call, TypeError, "x: expected dtype float32")
    else:
        report.expect_error("layer, int32 shard: the others", call, dist.PeerFailedError,
                            "rank 1 refused its x (TypeError)")
    _, x_next, dy_next, _, _ = make_case((sum(sizes), 3, 2), "spatial", 1, np.float32, seed=9)
    single = BatchNorm(3, mode="spatial", dtype=np.float32, momentum=None)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    y_part = layer(shards(x_next, sizes)[rank])
    dx_part = layer.backward(shards(dy_next, sizes)[rank])
    y, dx = single(x_next), single.backward(dy_next)
    with report.check("layer: the step after the refused shard"):
        close(y_part, y[rows], np.float32, what="y")
        close(dx_part, dx[rows], np.float32, what="dx", scale=10)
        close(layer.running_var, single.running_var, np.float32, what="running_var")
        assert layer.num_batches_tracked == 1

    # out of step: rank 0 runs a backward while the others start the next forward
    y, saved = dist.forward_training(shard, gamma, beta, group=group, mode="spatial")
    if rank == 0:
        call = lambda: dist.backward(shard, grad, gamma, saved, group=group)  # noqa: E731
    else:
        call = lambda: dist.forward_training(shard, gamma, beta, group=group, mode="spatial")  # noqa: E731
    report.expect_error("ranks out of step", call, dist.GroupMismatchError,
                        "out of step (each rank counts the group calls made on its communicator object): "
                        "group call #")
    good_step("the step after ranks out of step", seed=3)

    # the last rank's first layer is frozen: it makes no group call, so that rank's second layer,
    # of the same width, meets the others' first layer in one header collective (same sequence
    # number, kind and shapes); the layers' identities differ, so every rank raises, nothing is
    # merged, and the next step, both layers training, is BatchNorm's on the whole batch
    first, second = (dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32) for _ in range(2))
    if rank == last:
        first.freeze()
    others = list(range(last))
    expected_texts = (
        f"(forward_training of {second.identity}, after 1 frozen layer forward without a group call) on rank [{last}]",
        f"(forward_training of {first.identity}) on rank{'s' if len(others) > 1 else ''} {others}",
        f"before this call, the forward of {first.identity} (frozen) made no group call on rank [{last}]",
    )
    with report.check("a layer frozen on one rank: its next layer meets the others' first, every rank raises"):
        try:
            second(first(shard))
        except dist.GroupMismatchError as error:
            message = str(error)
        else:
            raise AssertionError("no error: two layers' batches were merged")
        assert message.startswith(f"rank {rank}: the ranks are out of step"), message
        for text in expected_texts:
            assert text in message, (text, message)
        assert first.num_batches_tracked == second.num_batches_tracked == 0 and not second.running_mean.any()
    first.unfreeze()
    _, x_next, dy_next, _, _ = make_case((sum(sizes), 3, 2), "spatial", 1, np.float32, seed=10)
    singles = [BatchNorm(3, mode="spatial", dtype=np.float32) for _ in range(2)]
    y_part = second(first(shards(x_next, sizes)[rank]))
    dx_part = first.backward(second.backward(shards(dy_next, sizes)[rank]))
    y = singles[1](singles[0](x_next))
    dx = singles[0].backward(singles[1].backward(dy_next))
    with report.check("the step after a layer frozen on one rank"):
        close(y_part, y[rows], np.float32, what="y")
        close(dx_part, dx[rows], np.float32, what="dx", scale=10)
        close(first.running_var, singles[0].running_var, np.float32, what="first running_var")
        assert first.num_batches_tracked == second.num_batches_tracked == 1
    report.entry["digests"]["the step after a layer frozen on one rank"] = digest(
        dict(first=first.grad_gamma, second=second.grad_gamma), ("first", "second"))

    # the last rank wraps its communicator in a new object, whose count of group calls starts at 0:
    # out of step once, then every rank counts on from the highest count and the steps run
    wrapped = Rewrapped(group) if rank == last else group
    report.expect_error("a re-created communicator", lambda: dist.forward_training(shard, gamma, beta, group=wrapped),
                        dist.GroupMismatchError, f"group call #1 (forward_training) on rank [{last}]")
    _check_step(report, "the step after a re-created communicator",
                _group_step(wrapped, sizes, (1, 3, 2), Mode.SPATIAL, 1, np.float32, seed=4), np.float32, Mode.SPATIAL)


def empty(group, report: Report) -> None:
    rank, world_size = group.rank, group.world_size
    sizes = _sizes_with_an_empty_rank(world_size)
    cases = [(Mode.SPATIAL, 4, 1, np.float64), (Mode.SPATIAL, 4, -1, np.float32),
             (Mode.PER_ACTIVATION, 2, 1, np.float64), (Mode.PER_ACTIVATION, 3, -1, np.float32)]
    for seed, (mode, ndim, channel_axis, dtype) in enumerate(cases):
        label = f"sizes {sizes}: {mode.name} ndim={ndim} channel_axis={channel_axis} {np.dtype(dtype).name}"
        step = _group_step(group, sizes, shape_for(ndim, channel_axis, channels=3), mode, channel_axis, dtype,
                           seed=seed)
        _check_step(report, label, step, dtype, mode)
        if rank == world_size - 1:
            with report.check(f"{label}: the empty rank's y and dx"):
                output = step[0]
                assert output["y"].shape[0] == output["dx"].shape[0] == 0 and output["dx"].dtype == dtype

    for options in LAYER_OPTIONS:
        name, synced, _ = _layers_side_by_side(group, report, sizes, options, steps=2, seed=7)
        shared = dict(g=synced.grad_gamma, b=synced.grad_beta, m=synced.running_mean, v=synced.running_var)
        report.entry["digests"][f"layer, {name}"] = digest(shared, tuple(shared))

    _, x, _, gamma, beta = make_case((4, 3, 2), "spatial", 1, np.float32)
    report.expect_error("every shard empty", lambda: dist.forward_training(x[:0], gamma, beta, group=group),
                        ValueError, f"x: every rank's shard is empty, a total of 0 samples in the group (values per "
                                    f"statistic: 0 on ranks {list(range(world_size))})")
    _check_step(report, "the step after a group of empty shards",
                _group_step(group, sizes, (1, 3, 2), Mode.SPATIAL, 1, np.float32, seed=9), np.float32, Mode.SPATIAL)


class Rewrapped:
    """A new object over a rank's communicator, as a program that re-creates its communicator on one rank makes."""

    def __init__(self, inner):
        self.inner = inner

    rank = property(lambda self: self.inner.rank)
    world_size = property(lambda self: self.inner.world_size)

    def allreduce_sum(self, buffer):
        return self.inner.allreduce_sum(buffer)


def communicator(group, report: Report) -> None:
    rank, world_size = group.rank, group.world_size
    with report.check("numpy buffers: the sum, also of a non-contiguous view"):
        values = (np.arange(2 * world_size, dtype=np.float64) * (rank + 1))[::2]
        total = group.allreduce_sum(values)
        expected = np.arange(2 * world_size, dtype=np.float64)[::2] * sum(range(1, world_size + 1))
        assert type(total) is np.ndarray and np.array_equal(total, expected), (total, expected)
    report.entry["digests"]["the sum"] = digest(dict(total=total), ("total",))
    report.expect_error("a buffer of another dtype", lambda: group.allreduce_sum(np.zeros(3, np.float32)), TypeError,
                        "buffer: expected a 1-D float64 array")
    # buffers of different lengths: MPICH would abort the whole job ("Message truncated"), after
    # another rank had returned a wrong sum; the lengths are agreed first, so every rank raises
    report.expect_error("buffers of different lengths", lambda: group.allreduce_sum(np.ones(3 + rank)),
                        dist.GroupMismatchError, "allreduce buffers differ in length (3 on rank [0]; 4 on rank [1]")
    last = world_size - 1
    if rank == last:
        report.expect_error("a buffer refused on one rank: its rank",
                            lambda: group.allreduce_sum(np.zeros(3, np.float32)), TypeError,
                            "buffer: expected a 1-D float64 array")
    else:
        report.expect_error("a buffer refused on one rank: the others", lambda: group.allreduce_sum(np.zeros(3)),
                            dist.PeerFailedError, f"rank(s) [{last}] refused the buffer they passed to allreduce_sum")
    with report.check("the sum after buffers of different lengths"):
        assert np.array_equal(group.allreduce_sum(np.ones(2)), np.full(2, float(world_size)))
    with report.check("argument checks, repr"):
        assert repr(group) == f"MpiCommunicator(rank={rank}, world_size={world_size}, cuda_aware=False)"
        assert group.device_buffers is False and group.comm is not None
        for arguments, error_type, text in ((dict(cuda_aware="yes"), TypeError, "cuda_aware: expected True or False"),
                                            (dict(comm=object()), TypeError, "comm: expected an mpi4py.MPI.Intracomm")):
            try:
                dist.mpi_group(**arguments)
            except error_type as error:
                assert text in str(error), str(error)
            else:
                raise AssertionError(f"mpi_group({arguments}) raised nothing")
    with report.check("pickle, copy and deepcopy refused: a copy's close would free the original's duplicate"):
        import copy
        import pickle

        for make in (pickle.dumps, copy.copy, copy.deepcopy):
            try:
                make(group)
            except TypeError as error:
                assert str(error).startswith("MpiCommunicator cannot be pickled or copied"), str(error)
            else:
                raise AssertionError(f"{make.__name__} of an MpiCommunicator raised nothing")
        assert np.array_equal(group.allreduce_sum(np.ones(2)), np.full(2, float(world_size)))
    with dist.mpi_group(cuda_aware=True) as cuda_aware:  # numpy arrays go to MPI directly: no GPU is touched
        sizes = _sizes(world_size)
        _check_step(report, "cuda_aware=True with numpy arrays",
                    _group_step(cuda_aware, sizes, (1, 3, 2), Mode.SPATIAL, 1, np.float32, seed=5), np.float32,
                    Mode.SPATIAL)
    # a refused argument on one rank only: every rank has joined the collective Dup, then learns of
    # the refusal, frees the duplicate and raises; the next mpi_group works
    last = world_size - 1
    call = lambda: dist.mpi_group(cuda_aware="yes" if rank == last else False)  # noqa: E731
    if rank == last:
        report.expect_error("cuda_aware refused on one rank: its rank", call, TypeError,
                            "cuda_aware: expected True or False, got 'yes'")
    else:
        report.expect_error("cuda_aware refused on one rank: the others", call, dist.PeerFailedError,
                            f"rank(s) [{last}] refused their arguments to mpi_group")
    with dist.mpi_group() as after, report.check("mpi_group after a refused argument"):
        assert np.array_equal(after.allreduce_sum(np.ones(1)), [float(world_size)])

    # communicators never closed: MPI runs out of them (MPICH: about 2000), and says so on every rank
    kept = []
    with report.check("communicators never closed: a DistributedError naming the limit"):
        try:
            for _ in range(100_000):
                kept.append(dist.mpi_group())
        except dist.DistributedError as error:
            assert "close()" in str(error) and "about 2000" in str(error), str(error)
            assert str(error).startswith(f"rank {rank}: MPI could not duplicate the communicator"), str(error)
        else:
            raise AssertionError("100000 communicators and no error")
    report.entry["digests"]["communicators made before MPI ran out"] = str(len(kept))
    for communicator in kept:
        communicator.close()
    with dist.mpi_group() as after, report.check("mpi_group after closing them"):
        assert np.array_equal(after.allreduce_sum(np.ones(1)), [float(world_size)])

    with dist.mpi_group() as closing:  # every rank closes it: freeing a communicator is collective
        closing.allreduce_sum(np.zeros(2))
    with report.check("closed: idempotent, and refuses collectives"):
        closing.close()
        assert closing.comm is None
    report.expect_error("a collective on a closed communicator", lambda: closing.allreduce_sum(np.zeros(2)),
                        dist.DistributedError, "the MPI communicator was closed")


def device(group, report: Report) -> None:
    """The group calls on cupy arrays, with the simulated GPU (tests/fake_cudnn.py: host memory
    posing as device memory): staged through host memory, and passed to MPI directly."""
    try:
        from cudnn_bn._cudnn import raw

        raw.library()
    except Exception as error:
        report.entry["skipped"] = f"libcudnn not installed ({type(error).__name__}): the simulated GPU needs it"
        return
    from cudnn_bn.distributed import calls
    from fake_cudnn import FakeArray, simulated_gpu

    def on_device(array):
        return np.array(array, copy=True).view(FakeArray)

    with simulated_gpu() as simulator:
        cupy = sys.modules["cupy"]
        if not hasattr(cupy, "fuse"):  # the fake module has no fuse: the fused dx runs op by op
            cupy.fuse = lambda kernel_name=None: (lambda function: function)
        calls._fused_dx.cache_clear()
        sizes = _sizes(group.world_size)
        for cuda_aware in (False, True):
            communicator = dist.mpi_group(cuda_aware=cuda_aware)
            with report.check(f"cuda_aware={cuda_aware}: a device buffer comes back on the device"):
                total = communicator.allreduce_sum(on_device(np.full(3, float(group.rank))))
                expected = np.full(3, float(sum(range(group.world_size))))
                assert isinstance(total, FakeArray) and np.array_equal(total.get(), expected)
            for mode, ndim, channel_axis in ((Mode.SPATIAL, 4, -1), (Mode.PER_ACTIVATION, 2, 1)):
                label = f"cuda_aware={cuda_aware}: {mode.name} ndim={ndim}"
                step = _group_step(communicator, sizes, shape_for(ndim, channel_axis, channels=3), mode, channel_axis,
                                   np.float32, seed=ndim, device=on_device)
                _check_step(report, label, step, np.float32, mode)
            with_empty = _sizes_with_an_empty_rank(group.world_size)
            step = _group_step(communicator, with_empty, (1, 3, 2, 2), Mode.SPATIAL, 1, np.float32, seed=7,
                               device=on_device)
            _check_step(report, f"cuda_aware={cuda_aware}: sizes {with_empty}", step, np.float32, Mode.SPATIAL)
            communicator.close()
        with report.check("cuDNN ran the normalization and local sums of every rank that holds samples"):
            holds_samples = int(_sizes_with_an_empty_rank(group.world_size)[group.rank] > 0)
            assert simulator.calls.count("cudnnBatchNormalizationForwardInference") == 4 + 2 * holds_samples
            assert simulator.calls.count("cudnnBatchNormalizationBackward") == 4 + 2 * holds_samples


def dies(group, report: Report) -> None:
    """A good step, then the last rank ends its process (without finalizing MPI) while the
    others enter the next collective: mpiexec must end the job."""
    sizes = _sizes(group.world_size)
    step = _group_step(group, sizes, (1, 3), Mode.PER_ACTIVATION, 1, np.float64, seed=1)
    _check_step(report, "the step before", step, np.float64, Mode.PER_ACTIVATION)
    report.entry["digests"]["before"] = "written"
    report.write()
    group.allreduce_sum(np.zeros(1))  # every rank has written its report
    if group.rank == group.world_size - 1:
        os._exit(DYING_EXIT_STATUS)
    _group_step(group, sizes, (1, 3), Mode.PER_ACTIVATION, 1, np.float64, seed=2)
    report.entry["digests"]["after"] = "a collective returned without the dead rank"


SCENARIOS = dict(reference=reference, layer=layer, faults=faults, empty=empty, communicator=communicator,
                 device=device, dies=dies)


def main(folder: str, names: list[str]) -> None:
    group = dist.mpi_group()
    report = Report(folder, group.rank)
    for name in names:
        with report.scenario(name):
            SCENARIOS[name](group, report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
