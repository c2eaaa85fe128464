"""The handle pool (cudnn_bn/_cudnn/handles.py) on the simulated GPU: one pool per device and lane, a
stream bound once across threads and rebound without waiting, a handle claimed by itself (and
handed to its claim before anyone borrows it again), waiters each served in turn, and close_all
having the layers above forget their records of the handles before it destroys them."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from cudnn_bn._cudnn import handles
from fake_cudnn import simulated_gpu


@pytest.fixture
def two_gpus(monkeypatch, cudnn_library):
    handles.close_all()
    with simulated_gpu(monkeypatch, devices=2) as simulator:
        yield simulator
    handles.close_all()


def test_each_device_has_its_own_pool_and_lends_its_own_handles(two_gpus):
    assert handles.pool_for(0) is handles.pool_for(0)
    assert handles.pool_for(1) is not handles.pool_for(0) and handles.pool_for(1).device_id == 1
    cupy = sys.modules["cupy"]
    with cupy.cuda.Device(1):
        with handles.borrow(1) as handle:
            assert handle.device_id == 1


def test_a_stream_bound_in_one_thread_is_not_bound_again_in_another(two_gpus):
    cupy = sys.modules["cupy"]
    handle = handles.Handle(0)
    stream = cupy.cuda.Stream()
    handle.bind_stream(stream)
    bound = two_gpus.calls.count("cudnnSetStream")
    thread = threading.Thread(target=handle.bind_stream, args=(stream,))
    thread.start()
    thread.join(5)
    assert two_gpus.calls.count("cudnnSetStream") == bound == 1
    handle.close()


def test_rebinding_a_handle_waits_for_nothing(two_gpus):
    cupy = sys.modules["cupy"]
    handle = handles.Handle(0)
    for _ in range(3):
        handle.bind_stream(cupy.cuda.Stream())
    assert "cudnnQueryRuntimeError" not in two_gpus.calls and two_gpus.host_syncs == 0
    assert two_gpus.calls.count("cudnnSetStream") == 3
    handle.close()


@pytest.mark.parametrize("persistent,on_overflow,lane", [
    (True, "raise", handles.CHECKED),
    (True, "fallback", handles.CHECKED),
    (True, "deferred", handles.DEFERRED),
    (True, "ignore", handles.PLAIN),
    (True, None, handles.PLAIN),
    (False, "raise", handles.PLAIN),
    (False, "deferred", handles.PLAIN),
])
def test_a_call_borrows_from_the_lane_of_what_it_does_with_the_flag(persistent, on_overflow, lane):
    from cudnn_bn._core.modes import parse_on_overflow

    policy = None if on_overflow is None else parse_on_overflow(on_overflow)
    assert handles.lane_for(persistent, policy) is lane


def test_each_device_and_lane_has_its_own_pool(two_gpus):
    pools = {(device, lane): handles.pool_for(device, lane) for device in (0, 1) for lane in (handles.PLAIN,
             handles.CHECKED, handles.DEFERRED)}
    assert len({id(pool) for pool in pools.values()}) == 6
    assert all(pool.device_id == device and pool.lane == lane for (device, lane), pool in pools.items())
    assert handles.pool_for(0) is pools[(0, handles.PLAIN)] and set(handles.pools()) == set(pools.values())


def test_claim_takes_that_very_handle_and_waits_while_it_is_lent(two_gpus):
    pool = handles.HandlePool(0, size=2)
    first, second = pool.acquire(), pool.acquire()
    pool.release(first)
    claimed = []
    thread = threading.Thread(target=lambda: claimed.append(pool.claim(second) or second))
    thread.start()
    time.sleep(0.05)
    assert claimed == [] and pool._idle == [first]  # the other idle handle does not do
    pool.release(second)
    thread.join(5)
    assert claimed == [second] and pool._idle == [first]
    pool.release(second)
    pool.close()


def test_a_claimed_handle_goes_to_its_claim_before_its_holder_can_borrow_it_again(two_gpus):
    # a thread that keeps borrowing (release, then acquire at once) would otherwise take the handle
    # back every time, and check_overflow, which claims it, would wait on
    pool = handles.HandlePool(0, size=1)
    handle, order = pool.acquire(), []

    def claim():
        pool.claim(handle)
        order.append("claimed")
        pool.release(handle)

    claimer = threading.Thread(target=claim, daemon=True)
    claimer.start()
    for _ in range(500):
        if pool._waiting:
            break
        time.sleep(0.01)
    pool.release(handle)
    assert pool.acquire() is handle  # waits until the claim has had it
    order.append("borrowed again")
    claimer.join(5)
    assert order == ["claimed", "borrowed again"]
    pool.release(handle)
    assert pool._idle == [handle] and not pool._claims and not pool._handed
    pool.close()


def test_two_waiters_are_each_served_when_the_only_handle_comes_back(two_gpus):
    pool = handles.HandlePool(0, size=1)
    first = pool.acquire()
    served = []

    def borrower():
        handle = pool.acquire()
        served.append(handle)
        pool.release(handle)

    waiters = [threading.Thread(target=borrower, daemon=True) for _ in range(2)]  # a lost wake-up must not hang the run
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)  # both are now waiting for the one handle
    pool.release(first)
    for waiter in waiters:
        waiter.join(5)
    assert not any(waiter.is_alive() for waiter in waiters) and served == [first, first]
    pool.close()


def test_a_failed_create_gives_its_place_in_the_pool_back(two_gpus, monkeypatch):
    from cudnn_bn._cudnn import raw

    pool = handles.HandlePool(0, size=2)

    def refuse(pointer):
        raise RuntimeError("cudnnCreate refused")

    monkeypatch.setattr(raw.library(), "cudnnCreate", refuse)
    with pytest.raises(RuntimeError, match="cudnnCreate refused"):
        pool.acquire()
    assert pool.created == 0


def test_closing_a_pool_forgets_its_idle_handles(two_gpus):
    pool = handles.HandlePool(0, size=2)
    lent = [pool.acquire(), pool.acquire()]
    assert pool.created == 2 and all(handle.device_id == 0 for handle in lent)
    for handle in lent:
        pool.release(handle)
    pool.close()
    assert pool.created == 0 and all(handle.closed for handle in lent)


def test_close_all_has_the_layers_above_forget_first_then_destroys_the_idle_handles(two_gpus, monkeypatch):
    monkeypatch.setattr(handles, "_FORGET_ON_CLOSE", list(handles._FORGET_ON_CLOSE))  # restored: this forget ends here
    with handles.borrow(0) as handle:
        pass
    seen = []
    handles.forget_on_close(lambda: seen.append(handle.closed))
    handles.close_all()
    assert seen == [False]  # forgotten while the handle was still alive
    assert handle.closed and handles.pools() == []


def test_closing_a_handle_destroys_it_in_cudnn(two_gpus):
    from cudnn_bn._cudnn import raw
    from cudnn_bn._cudnn.errors import CudnnBadParamError

    handle = handles.Handle(0)
    pointer = handle.pointer
    handle.close()
    with pytest.raises(CudnnBadParamError):  # a second destroy: the first one happened
        raw.library().cudnnDestroy(pointer)


def test_no_gpu_at_create_says_so_and_keeps_cudnns_status(two_gpus, monkeypatch):
    from cudnn_bn._cudnn import raw
    from cudnn_bn._cudnn.errors import CudnnNotInitializedError

    def no_gpu(pointer):
        raise CudnnNotInitializedError(1001, "CUDNN_STATUS_NOT_INITIALIZED", "cudnnCreate", "no driver")

    monkeypatch.setattr(raw.library(), "cudnnCreate", no_gpu)
    with pytest.raises(CudnnNotInitializedError) as raised:
        handles.Handle(0)
    error = raised.value
    assert (error.status, error.status_name, error.function) == (1001, "CUDNN_STATUS_NOT_INITIALIZED", "cudnnCreate")
    assert error.detail == f"{handles.NO_GPU_MESSAGE}; no driver"
