"""The plan cache (cudnn_bn/_cudnn/plans.py) on the simulated GPU: what each plan records about its
call, inference pieces when training's limits are lower than inference's, the cache returning the
same plan, the Ex-path switch and its query."""

from __future__ import annotations

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import reference
from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.modes import Mode
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import limits, plans
from cudnn_bn._cudnn.errors import CudnnLimitError
from cudnn_calls import on_device


@pytest.fixture
def gpu(fresh_simulated_gpu):
    """The simulated GPU with no plan and no shown fallback warning left by an earlier test."""
    return fresh_simulated_gpu


def _wide(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _inference(shape, mode):
    layout, x, _, gamma, beta = make_case(shape, mode, 1, np.float32)
    rng = np.random.default_rng(2)
    mean, var = rng.standard_normal(layout.param_shape), 0.5 + rng.random(layout.param_shape)
    y = cudnn_bn.forward_inference(*on_device(x, gamma, beta, mean.astype(np.float32), var.astype(np.float32)),
                                   mode=mode)
    assert_close(y, reference.forward_inference(*_wide(x, gamma, beta), mean, var, mode=mode), np.float32, scale=4)


def test_inference_ignores_the_training_batch_limit_whole_and_in_pieces(gpu, monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(training_max_batch=2, inference_max_batch=4))
    _inference((3, 3, 2, 2), Mode.SPATIAL)  # one call, N past the training limit
    _inference((10, 3, 2, 2), Mode.SPATIAL)  # pieces of 4, 4 and 2, each past the training limit
    plan = plans.plan_for(plans.INFERENCE, make_layout((3, 3, 2, 2), 1, Mode.SPATIAL), np.dtype(np.float32), 0)
    assert plan.operation == plans.INFERENCE and plan.route is None and not plan.uses_ex


def test_a_chunked_plan_keeps_its_layout_and_its_pieces_device(gpu, monkeypatch):
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(inference_max_batch=4))
    layout = make_layout((10, 3, 2, 2), 1, Mode.SPATIAL)
    plan = plans.plan_for(plans.INFERENCE, layout, np.dtype(np.float32), 0)
    assert isinstance(plan, plans.ChunkedPlan) and plan.layout == layout
    assert [(start, stop) for start, stop, _ in plan.pieces] == [(0, 4), (4, 8), (8, 10)]
    assert all(piece.device_id == 0 and piece.operation == plans.INFERENCE for _, _, piece in plan.pieces)


def test_the_same_signature_gets_the_same_plan(gpu):
    layout = make_layout((4, 3, 2, 2), 1, Mode.SPATIAL)
    first = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0)
    created = plans.PLANS.created
    assert plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0) is first
    assert plans.PLANS.created == created
    assert plans.plan_for(plans.BACKWARD, layout, np.dtype(np.float32), 0) is not first


def test_a_plan_refuses_a_descriptor_past_int32_naming_x(cudnn_library):
    with pytest.raises(CudnnLimitError, match=r"^x: cuDNN takes dims"):
        plans.Plan(plans.INFERENCE, make_layout((2**16, 2**15), 1, Mode.SPATIAL), np.float32, 0)


def test_the_ex_sizes_are_queried_once_per_plan(gpu):
    from cudnn_bn._cudnn import handles

    layout = make_layout((2, 2, 2, 4), -1, Mode.SPATIAL_PERSISTENT)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float16), 0)
    assert plan.uses_ex
    with handles.borrow(0) as handle:
        first = plan.ex_workspace_sizes(handle.pointer)
        assert plan.ex_workspace_sizes(handle.pointer) == first
    assert gpu.calls.count("cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize") == 1


def test_the_default_cache_keeps_512_plans_and_clear_empties_what_holds_its_plans():
    cache = plans.PlanCache()
    for key in range(513):
        cache.get(key, object)
    assert len(cache) == 512 and cache.created == 513
    holding, other = {"call": "entry"}, {"call": "entry"}
    cache.empty_with_plans(holding.clear)
    cache.clear()
    assert len(cache) == 0 and holding == {} and other == {"call": "entry"}


def test_the_settled_signatures_are_ops_own_cache_and_go_with_the_plans():
    from cudnn_bn._cudnn import signatures

    assert not hasattr(plans.PLANS, "signatures")  # the plan cache keeps plans only
    signatures.SETTLED["a signature"] = "what it settled"
    plans.PLANS.clear()  # settled entries hold plans: they must not outlive them
    assert signatures.SETTLED == {}


def test_the_ex_path_switch_and_its_query(cudnn_library):
    ex_layout = make_layout((2, 2, 2, 4), -1, Mode.SPATIAL_PERSISTENT)
    assert plans.uses_ex_path(ex_layout, np.float16) is True
    assert not plans.uses_ex_path(make_layout((2, 2, 2, 6), -1, Mode.SPATIAL_PERSISTENT), np.float16)
    assert not plans.uses_ex_path(ex_layout, np.float32)
    enabled = plans.plan_for(plans.TRAINING, ex_layout, np.dtype(np.float16), 0)
    assert enabled.uses_ex
    previous = plans.set_ex_path_enabled(0)
    try:
        assert previous is True
        assert not plans.uses_ex_path(ex_layout, np.float16)
        # the toggle emptied the cache: the plan built now records the switch
        disabled = plans.plan_for(plans.TRAINING, ex_layout, np.dtype(np.float16), 0)
        assert disabled is not enabled and not disabled.uses_ex
        assert plans.set_ex_path_enabled(False) is False
    finally:
        plans.set_ex_path_enabled(previous)
    assert plans.uses_ex_path(ex_layout, np.float16)
    assert plans.plan_for(plans.TRAINING, ex_layout, np.dtype(np.float16), 0).uses_ex


def test_two_threads_asking_for_one_new_plan_build_it_once():
    import threading
    import time

    cache, building, built = plans.PlanCache(), threading.Event(), []

    def build():
        building.set()
        time.sleep(0.2)  # the other thread meanwhile misses the lock-free lookup and waits for the lock
        built.append(object())
        return built[-1]

    first = threading.Thread(target=lambda: cache.get("key", build))
    first.start()
    building.wait(5)
    second_got = cache.get("key", build)
    first.join(5)
    assert len(built) == 1 and cache.created == 1 and second_got is built[0]


def test_the_ex_sizes_are_kept_apart_per_bn_ops(gpu):
    # the reserve space holds the fused activation's mask: BN and BN_ACTIVATION need different
    # sizes from the same plan, in whichever order they are asked for
    from cudnn_bn._core.modes import Activation
    from cudnn_bn._cudnn import handles
    from cudnn_bn._cudnn.raw import BatchNormOps

    layout = make_layout((2, 2, 2, 8), -1, Mode.SPATIAL_PERSISTENT)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float16), 0)
    with handles.borrow(0) as handle:
        plain = plan.fused_ex_sizes(handle.pointer, BatchNormOps.BN, None)
        fused = plan.fused_ex_sizes(handle.pointer, BatchNormOps.BN_ACTIVATION, Activation.RELU)
        assert plan.ex_workspace_sizes(handle.pointer) == plain
    assert plain[2] == gpu.reserve_size and fused[2] == gpu.reserve_size + 4 * -(-2 * 2 * 2 * 8 // 32)
