"""cudnn_bn.distributed.SyncBatchNorm: trains like BatchNorm on the concatenated batch (with its
activation and residual), refuses on every rank, keeps what BatchNorm keeps. Ranks run as threads
with the in-process communicator."""

from __future__ import annotations

import copy
import inspect
import os
import pickle

import numpy as np
import pytest

from conftest import FLOAT64_ROUNDING, make_case
from cudnn_bn import Activation, BatchNorm, fused, reference
from cudnn_bn import distributed as dist
from cudnn_bn.layer import KeptForBackward
from group_checks import close, results, run_ranks, shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILED = "failed (an error other than a refused input)"


def test_sync_batch_norm_trains_like_batch_norm_on_the_concatenated_batch():
    sizes = [3, 1, 2]
    rng = np.random.default_rng(5)
    batches = [(2.0 + 3.0 * rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((6, 4, 3, 3))) for _ in range(2)]
    single = BatchNorm(4, mode="spatial", momentum=None, dtype=np.float64)
    expected = []
    for x, dy in batches:
        y = single(x)
        expected.append((y, single.backward(dy), single.grad_gamma.copy(), single.grad_beta.copy()))

    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, mode="spatial", momentum=None, dtype=np.float64)
        steps = []
        for x, dy in batches:
            y = layer(shards(x, sizes)[rank])
            steps.append((y, layer.backward(shards(dy, sizes)[rank]), layer.grad_gamma, layer.grad_beta))
        return layer, steps

    outcomes = results(run_ranks(3, body))
    for step, (y, dx, grad_gamma, grad_beta) in enumerate(expected):
        close(np.concatenate([o[1][step][0] for o in outcomes]), y, np.float64, what="y")
        close(np.concatenate([o[1][step][1] for o in outcomes]), dx, np.float64, what="dx")
        for layer, steps in outcomes:
            close(steps[step][2], grad_gamma, np.float64, what="grad_gamma", scale=50)
            close(steps[step][3], grad_beta, np.float64, what="grad_beta", scale=50)
    for layer, _ in outcomes:
        assert layer.num_batches_tracked == 2
        close(layer.running_mean, single.running_mean, np.float64, what="running_mean")
        close(layer.running_var, single.running_var, np.float64, what="running_var")
        assert "group=LocalCommunicator" in repr(layer)


def test_sync_batch_norm_evaluates_without_communicating():
    group = dist.local_group(2, timeout=0.2)  # rank 1 never calls: any collective would time out
    layer = dist.SyncBatchNorm(3, group=group[0], mode="spatial", dtype=np.float64).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    np.testing.assert_allclose(layer(x), x / np.sqrt(1 + 1e-5))
    local = dist.SyncBatchNorm(3, group=group[0], mode="spatial", track_running_stats=False, dtype=np.float64).eval()
    y = local(x)  # this rank's own batch statistics
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=FLOAT64_ROUNDING)
    assert local.backward(np.ones_like(x)).shape == x.shape
    with pytest.raises(TypeError, match="group"):
        dist.SyncBatchNorm(3, group="nccl")


def test_sync_batch_norm_with_relu_and_a_residual_trains_like_batch_norm_with_them():
    sizes = [2, 1, 3]
    rng = np.random.default_rng(8)
    x, dy, residual = (rng.standard_normal((6, 4, 3)) for _ in range(3))
    single = BatchNorm(4, mode="spatial", dtype=np.float64, activation="relu")
    y = single(x, residual)
    dx = single.backward(dy)

    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, mode="spatial", dtype=np.float64, activation="relu")
        part = layer(shards(x, sizes)[rank], shards(residual, sizes)[rank])
        return layer, part, layer.backward(shards(dy, sizes)[rank])

    outcomes = results(run_ranks(3, body))
    close(np.concatenate([o[1] for o in outcomes]), y, np.float64, what="y")
    assert min(o[1].min() for o in outcomes) == 0.0  # the ReLU ran in training
    close(np.concatenate([o[2] for o in outcomes]), dx, np.float64, what="dx")
    grad_residual = np.concatenate([o[0].grad_residual for o in outcomes])
    close(grad_residual, single.grad_residual, np.float64, what="grad_residual")
    for layer, _, _ in outcomes:
        close(layer.grad_gamma, single.grad_gamma, np.float64, what="grad_gamma", scale=20)
        close(layer.grad_beta, single.grad_beta, np.float64, what="grad_beta", scale=20)
        close(layer.running_var, single.running_var, np.float64, what="running_var")
        assert isinstance(layer._kept.saved, fused.FusedSaved) and layer._kept.saved.has_residual

    def without_residual(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, mode="spatial", dtype=np.float64, activation="relu")
        layer(shards(x, sizes)[rank])
        layer.backward(shards(dy, sizes)[rank])
        return layer.grad_residual

    assert results(run_ranks(3, without_residual)) == [None] * 3


def _layer_step(rank, group, x, sizes, layer=None, **options):
    layer = layer or dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, **options)
    return layer, layer(shards(x, sizes)[rank])


def test_a_shard_the_layer_refuses_raises_on_every_rank_and_the_next_step_is_not_mixed():
    """A shard refused on one rank must not raise there alone: that rank's next call would pair
    with its peer's first collective, and the peer would return statistics of two steps."""
    sizes = [2, 3]
    rng = np.random.default_rng(4)
    first, second = (rng.standard_normal((5, 3, 2)).astype(np.float32) for _ in range(2))

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, momentum=None)
        shard = shards(first, sizes)[rank]
        try:
            layer(shard.astype(np.int32) if rank == 1 else shard)
        except Exception as error:
            refused = error
        state = layer.state_dict()
        return refused, state, layer(shards(second, sizes)[rank]), layer

    outcomes = results(run_ranks(2, body))
    assert type(outcomes[1][0]) is TypeError and str(outcomes[1][0]).startswith("rank 1: x: expected dtype float32")
    named = outcomes[0][0]
    assert isinstance(named, dist.PeerFailedError) and "rank 1 refused its x (TypeError)" in str(named)
    single = BatchNorm(3, mode="spatial", dtype=np.float32, momentum=None)
    y = single(second)
    close(np.concatenate([o[2] for o in outcomes]), y, np.float32, what="y of the next step")
    for _, state, _, layer in outcomes:
        assert int(state["num_batches_tracked"]) == 0 and (state["running_mean"] == 0).all()
        assert layer.num_batches_tracked == 1
        close(layer.running_mean, single.running_mean, np.float32, what="running_mean")


@pytest.mark.parametrize("refusal", ["residual", "num_batches_tracked"])
def test_every_check_of_the_layer_runs_before_the_collective(refusal):
    _, x, _, _, _ = make_case((4, 3, 2), "spatial", 1, np.float32)

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, momentum=None)
        residual = None
        if rank == 1 and refusal == "residual":
            residual = np.zeros_like(x[:2])
        if rank == 1 and refusal == "num_batches_tracked":
            layer.num_batches_tracked = "seven"
        return layer(shards(x, [2, 2])[rank], residual)

    outcomes = run_ranks(2, body)
    assert type(outcomes[1]) in (TypeError, ValueError) and str(outcomes[1]).startswith(f"rank 1: {refusal}:")
    assert isinstance(outcomes[0], dist.PeerFailedError) and f"rank 1 refused its {refusal}" in str(outcomes[0])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_count_one_rank_cannot_increment_is_refused_on_every_rank_before_the_collective(momentum):
    _, x, _, _, _ = make_case((4, 3, 2), "spatial", 1, np.float32)

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, momentum=momentum)
        if rank == 1:
            layer.num_batches_tracked = 2**63 - 1
        try:
            layer(shards(x, [2, 2])[rank])
        except Exception as error:
            return error, layer.state_dict(), layer.num_batches_tracked
        return None

    outcomes = results(run_ranks(2, body))
    assert type(outcomes[1][0]) is ValueError
    assert str(outcomes[1][0]).startswith("rank 1: num_batches_tracked: expected a count below")
    assert isinstance(outcomes[0][0], dist.PeerFailedError)
    assert "rank 1 refused its num_batches_tracked" in str(outcomes[0][0])
    for (_, state, count), before in zip(outcomes, (0, 2**63 - 1)):
        assert count == before and (state["running_mean"] == 0).all() and (state["running_var"] == 1).all()


def test_a_backward_without_a_forward_on_one_rank_raises_there_and_is_named_elsewhere():
    _, x, dy, _, _ = make_case((4, 3, 2), "spatial", 1, np.float32)

    def body(rank, group):
        layer, _ = _layer_step(rank, group, x, [2, 2])
        if rank == 1:  # a rank that lost its layer after the forward
            layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32)
        return layer.backward(shards(dy, [2, 2])[rank])

    outcomes = run_ranks(2, body)
    refused = outcomes[1]
    assert type(refused) is RuntimeError and "needs the statistics of a forward() in training mode" in str(refused)
    assert isinstance(outcomes[0], dist.PeerFailedError) and f"rank 1 {FAILED}" in str(outcomes[0])


def test_both_layers_keep_one_named_tuple():
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    plain = BatchNorm(3)
    plain(x)
    group = dist.local_group(1)[0]
    synced = dist.SyncBatchNorm(3, group=group)
    synced(x)
    assert type(plain._kept) is type(synced._kept) is KeptForBackward
    assert plain._kept.group is None and synced._kept.group is group and plain._kept.x is x


def test_layers_pickled_with_a_plain_tuple_load_and_run_backward():
    """tests/fixtures/layers_with_kept_tuples.pickle: a BatchNorm and a BatchNorm with ReLU after
    one training forward each, pickled by the layer as it was when it kept a plain tuple."""
    with open(os.path.join(ROOT, "tests", "fixtures", "layers_with_kept_tuples.pickle"), "rb") as file:
        stored = pickle.load(file)
    x = stored["x"]
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    for name, options, residual in (("plain", {}, None), ("relu", {"activation": "relu"}, np.ones_like(x))):
        old = stored[name]
        assert type(old._kept) is KeptForBackward and old._kept.group is None
        fresh = BatchNorm(2, mode="spatial", **options)
        fresh(x, residual)
        np.testing.assert_array_equal(old.backward(dy), fresh.backward(dy))
        np.testing.assert_array_equal(old.grad_gamma, fresh.grad_gamma)


def test_a_sync_layer_state_with_the_old_group_flag_loads_with_its_group():
    group = dist.local_group(1)[0]
    layer = dist.SyncBatchNorm(3, group=group, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((4, 3))
    layer(x)
    state = layer.__getstate__()
    state["_kept"], state["_kept_is_group"] = tuple(layer._kept[:2]), True
    old = dist.SyncBatchNorm.__new__(dist.SyncBatchNorm)
    old.__setstate__(state)
    assert "_kept_is_group" not in old.__dict__ and old._kept.group is group
    np.testing.assert_array_equal(old.backward(np.ones_like(x)), layer.backward(np.ones_like(x)))


def test_the_layer_reads_the_activation_gradient_from_the_one_definition_of_it(monkeypatch):
    """Where an activation passes the gradient is decided once, by cudnn_bn.reference, for the
    fused reference and the sync layer alike."""
    rng = np.random.default_rng(3)
    x, dy = (rng.standard_normal((4, 3, 2)) for _ in range(2))
    single = BatchNorm(3, mode="spatial", dtype=np.float64, activation="relu")
    single(x)
    expected = single.backward(dy)
    masks = []
    one_definition = reference.activation_mask

    def recording(y, activation):
        masks.append(activation)
        return one_definition(y, activation)

    monkeypatch.setattr(reference, "activation_mask", recording)
    layer = dist.SyncBatchNorm(3, group=dist.local_group(1)[0], mode="spatial", dtype=np.float64, activation="relu")
    layer(x)
    close(layer.backward(dy), expected, np.float64, what="dx")
    assert masks == [Activation.RELU]


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_layer_arguments_that_do_not_bind_are_refused_on_every_rank(phase):
    _, x, dy, _, _ = make_case((4, 3, 2), "spatial", 1, np.float32)

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32)
        shard, grad = shards(x, [2, 2])[rank], shards(dy, [2, 2])[rank]
        wrong = rank == 1
        try:
            if phase == "forward":
                layer(shard, None, "extra") if wrong else layer(shard)
            else:
                layer(shard)
                layer.backward(grad, scale=2.0) if wrong else layer.backward(grad)
        except Exception as error:
            return error, layer(shard), layer.backward(grad)  # the next step runs
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body))
    refused, named = outcomes[1][0], outcomes[0][0]
    expected = ("SyncBatchNorm.forward() too many positional arguments" if phase == "forward"
                else "SyncBatchNorm.backward() got an unexpected keyword argument 'scale'")
    assert type(refused) is TypeError and str(refused) == f"rank 1: arguments: {expected}"
    assert isinstance(named, dist.PeerFailedError) and "rank 1 refused its arguments (TypeError)" in str(named)
    close(np.concatenate([o[1] for o in outcomes]), BatchNorm(3, mode="spatial")(x), np.float32, what="next y")


def test_the_layer_shows_its_real_parameters():
    assert str(inspect.signature(dist.SyncBatchNorm.forward)) == "(self, x, residual=None)"
    assert str(inspect.signature(dist.SyncBatchNorm.backward)) == "(self, dy)"
    layer = dist.SyncBatchNorm(3, group=dist.local_group(1)[0]).eval()
    assert str(inspect.signature(layer)) == "(x, residual=None)"
    with pytest.raises(TypeError, match="too many positional arguments"):  # eval: no collective, raised at once
        layer(np.ones((2, 3), np.float32), None, "extra")


def test_a_sync_layer_refuses_to_be_pickled_or_copied_naming_its_group():
    layer = dist.SyncBatchNorm(3, group=dist.local_group(2)[0], dtype=np.float64)
    for copying in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"SyncBatchNorm cannot be pickled or copied: its group "
                                            r"\(LocalCommunicator\(rank=0, world_size=2, timeout=60\)\) .*"
                                            r"state_dict\(\)"):
            copying(layer)


# ---- empty shards and frozen layers ----

def _relu_steps(seed, shape, count=2):
    rng = np.random.default_rng(seed)
    return [tuple(2.0 + 3.0 * rng.standard_normal(shape) for _ in range(3)) for _ in range(count)]


@pytest.mark.parametrize("activation", [None, "relu"])
def test_sync_batch_norm_with_an_empty_shard_trains_like_batch_norm_on_the_concatenated_batch(activation):
    sizes = [5, 0, 4]
    steps = _relu_steps(6, (9, 4, 3, 2))
    single = BatchNorm(4, mode="spatial", momentum=None, dtype=np.float64, activation=activation)
    expected = []
    for x, dy, residual in steps:
        residual = residual if activation else None
        y = single(x, residual)
        dx = single.backward(dy)
        expected.append((y, dx, single.grad_gamma.copy(), single.grad_beta.copy(), single.grad_residual))

    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, mode="spatial", momentum=None, dtype=np.float64,
                                   activation=activation)
        outputs = []
        for x, dy, residual in steps:
            part = layer(shards(x, sizes)[rank], shards(residual, sizes)[rank] if activation else None)
            grad = layer.backward(shards(dy, sizes)[rank])
            outputs.append((part, grad, layer.grad_gamma, layer.grad_beta, layer.grad_residual))
        return layer, outputs

    outcomes = results(run_ranks(3, body))
    for step, (y, dx, grad_gamma, grad_beta, grad_residual) in enumerate(expected):
        close(np.concatenate([o[1][step][0] for o in outcomes]), y, np.float64, what="y")
        close(np.concatenate([o[1][step][1] for o in outcomes]), dx, np.float64, what="dx")
        if activation:
            close(np.concatenate([o[1][step][4] for o in outcomes]), grad_residual, np.float64, what="grad_residual")
        for _, outputs in outcomes:
            close(outputs[step][2], grad_gamma, np.float64, what="grad_gamma", scale=50)
            close(outputs[step][3], grad_beta, np.float64, what="grad_beta", scale=50)
    empty_layer, empty_outputs = outcomes[1]
    assert all(output[0].shape == output[1].shape == (0, 4, 3, 2) for output in empty_outputs)
    for layer, _ in outcomes:
        assert layer.num_batches_tracked == 2
        np.testing.assert_array_equal(layer.running_var, outcomes[0][0].running_var)  # the same bits on every rank
        close(layer.running_var, single.running_var, np.float64, what="running_var")


def test_sync_batch_norm_with_an_empty_shard_on_the_simulated_gpu(monkeypatch, cudnn_library):
    import sys

    from cudnn_bn.distributed import calls
    from fake_cudnn import FakeArray, simulated_gpu

    sizes = [3, 0, 2]
    (x, dy, _), = _relu_steps(7, (5, 4, 2, 2), count=1)
    x, dy = x.astype(np.float32), dy.astype(np.float32)
    single = BatchNorm(4, mode="spatial")
    y, dx = single(x), single.backward(dy)
    with simulated_gpu(monkeypatch):
        cupy = sys.modules["cupy"]
        monkeypatch.setattr(cupy, "fuse", lambda kernel_name=None: (lambda function: function), raising=False)
        calls._fused_dx.cache_clear()

        def body(rank, group):
            layer = dist.SyncBatchNorm(4, group=group, mode="spatial", xp=cupy)
            part = layer(cupy.asarray(shards(x, sizes)[rank]))
            grad = layer.backward(cupy.asarray(shards(dy, sizes)[rank]))
            assert isinstance(grad, FakeArray) and isinstance(layer.grad_gamma, FakeArray)
            cupy.cuda.get_current_stream().synchronize()
            return part.get(), grad.get(), layer.grad_gamma.get(), layer.running_var.get()

        outcomes = results(run_ranks(3, body))
        calls._fused_dx.cache_clear()
    close(np.concatenate([o[0] for o in outcomes]), y, np.float32, what="y", scale=4)
    close(np.concatenate([o[1] for o in outcomes]), dx, np.float32, what="dx", scale=10)
    assert outcomes[1][0].shape == outcomes[1][1].shape == (0, 4, 2, 2)
    for part in outcomes:
        close(part[2], single.grad_gamma, np.float32, what="grad_gamma", scale=20)
        close(part[3], single.running_var, np.float32, what="running_var")


def test_a_group_of_empty_shards_is_refused_by_every_layer_which_stays_as_it_was():
    x = np.zeros((0, 3, 2))

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64)
        try:
            layer(x)
        except ValueError as error:
            return str(error), layer.num_batches_tracked, layer._kept, layer.running_var.copy()
        return None

    for rank, (message, count, kept, running_var) in enumerate(results(run_ranks(2, body))):
        assert message.startswith(f"rank {rank}: x: every rank's shard is empty, a total of 0 samples in the group")
        assert count == 0 and kept is None
        np.testing.assert_array_equal(running_var, np.ones(3))


class _CountingGroup:
    """A rank's communicator that counts the collectives it is asked for."""

    def __init__(self, inner):
        self.inner, self.collectives = inner, 0

    rank = property(lambda self: self.inner.rank)
    world_size = property(lambda self: self.inner.world_size)

    def allreduce_sum(self, buffer):
        self.collectives += 1
        return self.inner.allreduce_sum(buffer)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_frozen_sync_layer_normalizes_locally_with_its_running_statistics_and_never_communicates(activation):
    group = _CountingGroup(dist.local_group(2, timeout=0.2)[0])  # rank 1 never calls: a collective would time out
    layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64, activation=activation, frozen=True)
    single = BatchNorm(3, mode="spatial", dtype=np.float64, activation=activation, frozen=True)
    for target in (layer, single):
        target.running_mean[...], target.running_var[...] = [0.5, -1.0, 2.0], [1.5, 0.25, 4.0]
    for x, dy, residual in _relu_steps(8, (4, 3, 2)):
        residual = residual if activation else None
        np.testing.assert_array_equal(layer(x, residual), single(x, residual))
        np.testing.assert_array_equal(layer.backward(dy), single.backward(dy))
        np.testing.assert_array_equal(layer.grad_gamma, single.grad_gamma)
        assert layer.training and layer._kept.group is None
    assert group.collectives == 0 and layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, [0.5, -1.0, 2.0])
    layer.freeze(parameters=True)
    layer(x)
    layer.backward(dy)
    assert layer.grad_gamma is None and group.collectives == 0
    with pytest.raises(RuntimeError, match=r"^BatchNorm\.backward: needs the input and statistics"):
        dist.SyncBatchNorm(3, group=group, frozen=True).backward(dy)  # refused on this rank alone: no collective
    assert "frozen=True" in repr(dist.SyncBatchNorm(3, group=group, frozen=True))
    assert repr(layer).endswith(f", group={group!r}).freeze(parameters=True)")


@pytest.mark.parametrize("state", ["frozen", "eval", "frozen parameters", "eval without running statistics"])
def test_a_sync_layer_that_does_not_communicate_gives_an_empty_shard_empty_results(state):
    group = _CountingGroup(dist.local_group(2, timeout=0.2)[0])
    options = dict(track_running_stats=False) if "without" in state else {}
    layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float32, activation="relu", **options)
    if state.startswith("frozen"):
        layer.freeze(parameters=state == "frozen parameters")
    else:
        layer.eval()
    x = np.zeros((0, 3, 4), np.float32)
    y = layer(x, np.zeros_like(x))
    dx = layer.backward(np.zeros_like(x))
    assert y.shape == dx.shape == layer.grad_residual.shape == x.shape and y.dtype == dx.dtype == np.float32
    if state == "frozen parameters":
        assert layer.grad_gamma is None and layer.grad_beta is None
    else:
        np.testing.assert_array_equal(layer.grad_gamma, np.zeros(3, np.float32))
        np.testing.assert_array_equal(layer.grad_beta, np.zeros(3, np.float32))
        assert layer.grad_gamma is not layer.grad_beta
    assert group.collectives == 0 and layer.num_batches_tracked == 0
    with pytest.raises(ValueError, match=r"^dy: expected x's shape \(0, 3, 4\), got \(1, 3, 4\)"):
        layer.backward(np.zeros((1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="^x: expected 3 channels"):
        layer(np.zeros((0, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^residual: expected x's shape"):
        layer(x, np.zeros((1, 3, 4), np.float32))


@pytest.mark.parametrize("sizes", [[3, 2], [5, 0]], ids=str)
def test_parameters_frozen_between_a_training_forward_and_its_backward_leave_no_gradients_as_in_batch_norm(sizes):
    """The backward of a training forward still runs over the group (the statistics follow the
    forward), and its parameter gradients follow the parameters' state at backward, as
    BatchNorm's do: frozen there, they are None on every rank, and dx is unchanged."""
    x, dy, _ = _relu_steps(11, (5, 3, 2), count=1)[0]
    single = BatchNorm(3, mode="spatial", dtype=np.float64)
    single(x)
    single.freeze(parameters=True)
    expected_dx = single.backward(dy)
    assert single.grad_gamma is None and single.grad_beta is None

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64)
        layer.grad_gamma = layer.grad_beta = np.ones(3)  # an earlier step's, cleared as BatchNorm clears them
        layer(shards(x, sizes)[rank])
        layer.freeze(parameters=True)
        return layer.backward(shards(dy, sizes)[rank]), layer.grad_gamma, layer.grad_beta, layer._kept.group

    outcomes = results(run_ranks(2, body))
    close(np.concatenate([dx for dx, *_ in outcomes]), expected_dx, np.float64, what="dx")
    for _, grad_gamma, grad_beta, group in outcomes:
        assert group is not None  # the forward ran over the group, and so did its backward
        assert grad_gamma is None and grad_beta is None


def test_a_rank_frozen_while_the_others_train_is_a_rank_that_never_calls():
    """A user error, documented in docs/distributed.md: the frozen rank makes no collective and is
    not told; the training rank waits for it in its forward and, under local_group, raises
    CollectiveTimeoutError naming it after the timeout, with nothing changed (no hang)."""
    x = np.random.default_rng(12).standard_normal((4, 3, 2))

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64, frozen=rank == 0)
        try:
            y = layer(x)
        except dist.CollectiveTimeoutError as error:
            return error, layer.num_batches_tracked, layer._kept
        return y, layer.num_batches_tracked, layer._kept

    (y, frozen_count, kept), (error, count, nothing) = run_ranks(2, body, timeout=0.3)
    np.testing.assert_array_equal(y, BatchNorm(3, mode="spatial", dtype=np.float64, frozen=True)(x))
    assert frozen_count == 0 and kept.group is None
    assert isinstance(error, dist.CollectiveTimeoutError) and "waiting for rank(s) [0]" in str(error)
    assert count == 0 and nothing is None


@pytest.mark.parametrize("activation", [None, "relu"])
def test_the_empty_rank_may_change_from_step_to_step_and_an_eval_step_follows(activation):
    """Steps whose empty rank moves (and one of two ranks holding a sample each), each against
    BatchNorm on the concatenated batch; then an eval step with an empty shard, whose y and dx
    are BatchNorm's rows and whose gradients are this rank's own (zeros on the empty rank)."""
    plan = [[5, 0, 4], [0, 6, 3], [4, 5, 0], [1, 0, 1]]
    rng = np.random.default_rng(13)
    steps = [tuple(2.0 + 3.0 * rng.standard_normal((sum(sizes), 4, 3)) for _ in range(3)) for sizes in plan]
    with_residual = lambda r: r if activation else None  # noqa: E731
    single = BatchNorm(4, momentum=None, dtype=np.float64, activation=activation)
    expected = []
    for x, dy, residual in steps:
        y = single(x, with_residual(residual))
        expected.append((y, single.backward(dy), single.grad_gamma.copy(), single.grad_beta.copy()))
    x, dy, residual = steps[0]
    single.eval()
    expected_eval = single(x, with_residual(residual)), single.backward(dy)

    def body(rank, group):
        layer = dist.SyncBatchNorm(4, group=group, momentum=None, dtype=np.float64, activation=activation)
        outputs = []
        for sizes, (x, dy, residual) in zip(plan, steps):
            part = layer(shards(x, sizes)[rank], shards(residual, sizes)[rank] if activation else None)
            outputs.append((part, layer.backward(shards(dy, sizes)[rank]), layer.grad_gamma, layer.grad_beta))
        x, dy, residual = steps[0]
        layer.eval()
        part = layer(shards(x, plan[0])[rank], shards(residual, plan[0])[rank] if activation else None)
        return layer, outputs, (part, layer.backward(shards(dy, plan[0])[rank]), layer.grad_gamma)

    outcomes = results(run_ranks(3, body))
    for step, (y, dx, grad_gamma, grad_beta) in enumerate(expected):
        close(np.concatenate([o[1][step][0] for o in outcomes]), y, np.float64, what=f"y, step {step}")
        close(np.concatenate([o[1][step][1] for o in outcomes]), dx, np.float64, what=f"dx, step {step}")
        for _, outputs, _ in outcomes:
            assert outputs[step][2].tobytes() == outcomes[0][1][step][2].tobytes()  # the same bits on every rank
            assert outputs[step][3].tobytes() == outcomes[0][1][step][3].tobytes()
            close(outputs[step][2], grad_gamma, np.float64, what="grad_gamma", scale=50)
            close(outputs[step][3], grad_beta, np.float64, what="grad_beta", scale=50)
    for layer, _, _ in outcomes:
        assert layer.num_batches_tracked == len(plan)
        assert layer.running_var.tobytes() == outcomes[0][0].running_var.tobytes()
        close(layer.running_var, single.running_var, np.float64, what="running_var")
    close(np.concatenate([o[2][0] for o in outcomes]), expected_eval[0], np.float64, what="eval y")
    close(np.concatenate([o[2][1] for o in outcomes]), expected_eval[1], np.float64, what="eval dx")
    np.testing.assert_array_equal(outcomes[1][2][2], np.zeros(4))  # the empty shard's own gradient
    close(sum(o[2][2] for o in outcomes), single.grad_gamma, np.float64, what="eval grad_gamma summed", scale=50)


# ---- which layer a group call comes from: its identity in the header ----

OUT_OF_STEP = "out of step (each rank counts the group calls made on its communicator object)"


def _two_layers(group, *, names=(None, None), order=(0, 1)):
    """Two SyncBatchNorm layers of the same width (3 channels, float64), made in ``order``;
    returned as (first, second) whatever the order they were made in."""
    made = {}
    for index in order:
        made[index] = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64, name=names[index])
    return made[0], made[1]


def _two_layer_steps(seed, sizes, count):
    rng = np.random.default_rng(seed)
    return [tuple(2.0 + 3.0 * rng.standard_normal((sum(sizes), 3, 2)) for _ in range(2)) for _ in range(count)]


def _check_two_layer_step(outcomes, step_index, steps, sizes, singles):
    """The ranks' outputs of one step of first -> second (y, dx of the input, grad_gamma of each
    layer that communicated: a frozen one's is the rank's own) against BatchNorm's on the
    concatenated batch."""
    x, dy = steps[step_index]
    first, second = singles
    y = second(first(x))
    dx = first.backward(second.backward(dy))
    close(np.concatenate([o[step_index][0] for o in outcomes]), y, np.float64, what="y")
    close(np.concatenate([o[step_index][1] for o in outcomes]), dx, np.float64, what="dx")
    for outputs in outcomes:
        if not first.frozen:
            close(outputs[step_index][2], first.grad_gamma, np.float64, what="first grad_gamma", scale=50)
        close(outputs[step_index][3], second.grad_gamma, np.float64, what="second grad_gamma", scale=50)


def _train_two_layers(rank, layers, x, dy, sizes):
    first, second = layers
    y = second(first(shards(x, sizes)[rank]))
    dx = first.backward(second.backward(shards(dy, sizes)[rank]))
    return y, dx, first.grad_gamma.copy(), second.grad_gamma.copy()


@pytest.mark.parametrize("skipping", ["frozen", "eval"])
def test_a_rank_whose_layer_skips_its_call_meets_another_layer_and_every_rank_raises_naming_both(skipping):
    """The mix that order alone cannot see: rank 0's first layer makes no group call (frozen, or
    in eval mode), so its second layer's forward, of the same width, meets rank 1's first layer's
    forward in the same header collective, with the same sequence number, kind and shapes. The
    identities in the headers differ: both ranks raise, naming both layers and what rank 0 skipped,
    nothing changes, and the next step, every layer training, gives BatchNorm's results."""
    sizes = [2, 3]
    steps = _two_layer_steps(14, sizes, 2)

    def body(rank, group):
        layers = _two_layers(group)
        if rank == 0:
            layers[0].freeze() if skipping == "frozen" else layers[0].eval()
        x = shards(steps[0][0], sizes)[rank]
        try:
            layers[1](layers[0](x))
        except dist.GroupMismatchError as error:
            untouched = [(layer.num_batches_tracked, layer.running_mean.copy(), layer._kept) for layer in layers]
            layers[0].unfreeze() if skipping == "frozen" else layers[0].train()
            return error, untouched, _train_two_layers(rank, layers, *steps[1], sizes)
        raise AssertionError("no error: two layers' batches were merged")

    outcomes = results(run_ranks(2, body))
    reason = "frozen" if skipping == "frozen" else "in eval mode"
    counted = ", after 1 frozen layer forward without a group call" if skipping == "frozen" else ""
    for rank, (error, untouched, _) in enumerate(outcomes):
        assert error.rank == rank
        assert (f"{OUT_OF_STEP}: group call #1 (forward_training of SyncBatchNorm #2{counted}) on rank [0]; group call "
                "#1 (forward_training of SyncBatchNorm #1) on rank [1]; every rank must make the same group calls in "
                "the same order; this call changed nothing, and the next group call is #2 on every rank; before this "
                f"call, the forward of SyncBatchNorm #1 ({reason}) made no group call on rank [0]") in str(error)
        for count, running_mean, kept in untouched[1:] if rank == 0 else untouched:
            assert count == 0 and not running_mean.any() and kept is None
    singles = [BatchNorm(3, mode="spatial", dtype=np.float64) for _ in range(2)]
    _check_two_layer_step([[o[2]] for o in outcomes], 0, steps[1:], sizes, singles)


def test_named_layers_are_named_in_the_mismatch_on_every_rank():
    def body(rank, group):
        first, second = _two_layers(group, names=("layer1.bn", "layer2.bn"))
        if rank == 1:
            first.freeze()
        x = np.ones((2, 3, 2)) * np.arange(2)[:, None, None]
        try:
            second(first(x))
        except dist.GroupMismatchError as error:
            return error, first.identity, second.identity
        raise AssertionError("no error")

    for rank, (error, first, second) in enumerate(results(run_ranks(2, body))):
        assert ("group call #1 (forward_training of SyncBatchNorm 'layer1.bn') on rank [0]; group call #1 "
                "(forward_training of SyncBatchNorm 'layer2.bn', after 1 frozen layer forward without a group call) on "
                "rank [1]") in str(error)
        assert "the forward of SyncBatchNorm 'layer1.bn' (frozen) made no group call on rank [1]" in str(error)
        assert (first, second) == ("SyncBatchNorm 'layer1.bn'", "SyncBatchNorm 'layer2.bn'")


def test_a_backward_that_meets_another_layers_backward_raises_on_every_rank():
    """Backward calls carry the layer's identity too: a rank that runs the layers' backwards in
    another order is out of step at the first of them. A layer that every rank evaluated alike
    before it is no culprit, and the message does not name it."""
    sizes = [2, 2]
    x, dy = _two_layer_steps(15, sizes, 1)[0]

    def body(rank, group):
        first, second = _two_layers(group)
        second(first(shards(x, sizes)[rank]))
        dist.SyncBatchNorm(3, group=group, dtype=np.float64).eval()(shards(x, sizes)[rank])  # on every rank
        grad = shards(dy, sizes)[rank]
        try:
            first.backward(grad) if rank == 1 else second.backward(grad)
        except dist.GroupMismatchError as error:
            return error, first.grad_gamma, second.grad_gamma
        raise AssertionError("no error")

    for error, *grads in results(run_ranks(2, body)):
        assert ("group call #3 (backward of SyncBatchNorm #2) on rank [0]; group call #3 (backward of SyncBatchNorm "
                "#1) on rank [1]") in str(error)
        assert "before this call" not in str(error) and "SyncBatchNorm #3" not in str(error)
        assert grads == [None, None]


def test_layers_made_in_different_orders_on_different_ranks_are_detected_at_the_first_call():
    def body(rank, group):
        first, second = _two_layers(group, order=(0, 1) if rank == 0 else (1, 0))
        try:
            first(np.arange(12.0).reshape(2, 3, 2))
        except dist.GroupMismatchError as error:
            return error, first.identity
        raise AssertionError("no error")

    outcomes = results(run_ranks(2, body))
    assert [identity for _, identity in outcomes] == ["SyncBatchNorm #1", "SyncBatchNorm #2"]
    for error, _ in outcomes:
        assert ("group call #1 (forward_training of SyncBatchNorm #1) on rank [0]; group call #1 (forward_training "
                "of SyncBatchNorm #2) on rank [1]") in str(error)


def test_named_layers_match_by_name_whatever_order_they_were_made_in():
    sizes = [3, 2]
    steps = _two_layer_steps(16, sizes, 2)

    def body(rank, group):
        layers = _two_layers(group, names=("stem.bn", "head.bn"), order=(0, 1) if rank == 0 else (1, 0))
        return [_train_two_layers(rank, layers, x, dy, sizes) for x, dy in steps]

    outcomes = results(run_ranks(2, body))
    singles = [BatchNorm(3, mode="spatial", dtype=np.float64) for _ in range(2)]
    for step in range(2):
        _check_two_layer_step(outcomes, step, steps, sizes, singles)


@pytest.mark.parametrize("first_frozen", [False, True], ids=["training", "first layer frozen on every rank"])
def test_one_rank_evaluating_alone_between_training_steps_stays_in_step(first_frozen):
    """The common validation pattern: rank 0 alone runs the layers in eval mode between two
    training steps (no group call) while rank 1 goes on to the next step and waits in its first
    layer's forward; rank 0's first training call is that same layer's: in step, and merged.
    Eval forwards are not counted, those of a frozen layer neither; the training forwards of a
    layer frozen on every rank are counted on every rank alike."""
    sizes = [2, 3]
    steps = _two_layer_steps(17, sizes, 2)

    def body(rank, group):
        layers = _two_layers(group)
        if first_frozen:
            layers[0].freeze()
        outputs = [_train_two_layers(rank, layers, *steps[0], sizes)]
        if rank == 0:
            for layer in layers:
                layer.eval()
            layers[1](layers[0](np.ones((4, 3, 2))))
            for layer in layers:
                layer.train()
        outputs.append(_train_two_layers(rank, layers, *steps[1], sizes))
        return outputs

    outcomes = results(run_ranks(2, body))
    singles = [BatchNorm(3, mode="spatial", dtype=np.float64, frozen=first_frozen),
               BatchNorm(3, mode="spatial", dtype=np.float64)]
    for step in range(2):
        _check_two_layer_step(outcomes, step, steps, sizes, singles)


def test_a_layer_frozen_on_one_rank_for_one_step_meets_its_own_call_a_step_late_and_every_rank_raises():
    """One layer, frozen on rank 0 for one step: rank 0 makes no group call in that step, so its
    next step's forward of the same layer meets rank 1's forward of the step before, with the
    same sequence number, kind, identity and shapes. The count of frozen layer forwards skipped
    since the previous group call differs (1 on rank 0, 0 on rank 1): every rank raises, and the
    step after it trains like BatchNorm."""
    sizes = [2, 2]
    steps = _two_layer_steps(18, sizes, 3)

    def body(rank, group):
        layer = dist.SyncBatchNorm(3, group=group, mode="spatial", dtype=np.float64)
        forward = lambda step: layer(shards(steps[step][0], sizes)[rank])  # noqa: E731
        if rank == 0:
            layer.freeze()
            forward(0)
            layer.backward(shards(steps[0][1], sizes)[rank])
            layer.unfreeze()
        try:
            forward(1 if rank == 0 else 0)
        except dist.GroupMismatchError as error:
            untouched = layer.num_batches_tracked, layer.running_var.copy()
            return error, untouched, forward(2), layer.backward(shards(steps[2][1], sizes)[rank])
        raise AssertionError("no error: two steps' batches were merged")

    outcomes = results(run_ranks(2, body))
    for error, (count, running_var), _, _ in outcomes:
        assert (f"{OUT_OF_STEP}: group call #1 (forward_training of SyncBatchNorm #1, after 1 frozen layer forward "
                "without a group call) on rank [0]; group call #1 (forward_training of SyncBatchNorm #1) on rank [1]"
                ) in str(error)
        assert "before this call, the forward of SyncBatchNorm #1 (frozen) made no group call on rank [0]" in str(error)
        assert count == 0 and (running_var == 1).all()
    single = BatchNorm(3, mode="spatial", dtype=np.float64)
    close(np.concatenate([o[2] for o in outcomes]), single(steps[2][0]), np.float64, what="y of the next step")
    close(np.concatenate([o[3] for o in outcomes]), single.backward(steps[2][1]), np.float64, what="dx")


def test_a_frozen_forward_refused_on_one_rank_and_run_again_is_counted_once():
    """A frozen layer's forward refused on its rank (no collective: it raises there alone) is no
    skipped call; run again, it is counted once, as on the other rank, and the next layer's call
    is in step."""
    sizes = [2, 3]
    steps = _two_layer_steps(19, sizes, 1)

    def body(rank, group):
        layers = _two_layers(group)
        layers[0].freeze()
        if rank == 0:
            with pytest.raises(TypeError, match="x: expected dtype float64"):
                layers[0](shards(steps[0][0], sizes)[rank].astype(np.float32))
        return [_train_two_layers(rank, layers, *steps[0], sizes)]

    outcomes = results(run_ranks(2, body))
    singles = [BatchNorm(3, mode="spatial", dtype=np.float64, frozen=True), BatchNorm(3, mode="spatial",
                                                                                      dtype=np.float64)]
    _check_two_layer_step(outcomes, 0, steps, sizes, singles)


def test_a_layer_name_is_checked_when_the_layer_is_made_and_a_refused_layer_takes_no_number():
    group = dist.local_group(1)[0]
    with pytest.raises(TypeError, match=r"^name: expected a str, the same on every rank, or None, got 3$"):
        dist.SyncBatchNorm(3, group=group, name=3)
    with pytest.raises(ValueError, match=r"^name: expected a non-empty str or None, got ''$"):
        dist.SyncBatchNorm(3, group=group, name="")
    with pytest.raises(ValueError, match="momentum"):
        dist.SyncBatchNorm(3, group=group, momentum=2.0)
    first = dist.SyncBatchNorm(3, group=group)
    named = dist.SyncBatchNorm(3, group=group, name="block.bn")
    second = dist.SyncBatchNorm(3, group=group)
    assert (first.identity, named.identity, second.identity) == (
        "SyncBatchNorm #1", "SyncBatchNorm 'block.bn'", "SyncBatchNorm #2")  # named layers take no number
    assert first.name is None and named.name == "block.bn"
    assert repr(named).endswith(f", group={group!r}, name='block.bn')") and "name=" not in repr(first)
    assert dist.SyncBatchNorm(3, group=dist.local_group(1)[0]).identity == "SyncBatchNorm #1"  # numbered per group


def test_the_identity_is_not_in_the_state_dict_and_a_layer_loaded_from_one_keeps_its_own():
    group = dist.local_group(1)[0]
    trained = dist.SyncBatchNorm(3, group=group, dtype=np.float64, name="trained")
    trained(np.arange(12.0).reshape(4, 3))
    state = trained.state_dict()
    assert sorted(state) == sorted(BatchNorm(3, dtype=np.float64).state_dict())
    loaded = dist.SyncBatchNorm(3, group=group, dtype=np.float64)
    loaded.load_state_dict(state)
    assert loaded.identity == "SyncBatchNorm #1" and loaded.name is None
    np.testing.assert_array_equal(loaded.running_mean, trained.running_mean)
    with pytest.raises(TypeError, match="SyncBatchNorm cannot be pickled or copied"):
        pickle.dumps(trained)


def test_a_sync_layer_state_from_before_identities_takes_the_next_number():
    group = dist.local_group(1)[0]
    layer = dist.SyncBatchNorm(3, group=group, dtype=np.float64)
    state = layer.__getstate__()
    del state["_identity"], state["name"]
    old = dist.SyncBatchNorm.__new__(dist.SyncBatchNorm)
    old.__setstate__(state)
    assert (layer.identity, old.identity, old.name) == ("SyncBatchNorm #1", "SyncBatchNorm #2", None)
    x = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(old(x), layer(x))
