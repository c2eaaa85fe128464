"""The handle pool (cudnn_bn/_cudnn/handles.py) on the simulated GPU: one pool per device, a stream
bound once across threads, a cleared flag, and waiters each served in turn (docs/testing.md)."""

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


def test_clearing_the_flag_leaves_it_read(two_gpus):
    handle = handles.Handle(0)
    handle.flag_unread = True
    handle.clear_flag()
    assert handle.flag_unread is False
    handle.close()


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
