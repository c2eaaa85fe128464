"""The host-synchronization budget of docs/modes.md, counted on the simulated GPU
(``KernelSimulator.host_syncs`` counts only what makes the host wait for the device on CUDA):

- default calls ("auto", the layer, ``fused``, ``compat`` with debug=False) make none, in every
  layout and dtype, from the first step on; and a step after warm-up runs under the simulator's
  capture mode, which refuses any wait;
- explicit SPATIAL_PERSISTENT with "raise" or "fallback" makes at most one per call;
- ``distributed`` makes exactly the host reads of its gathered buffers (one per collective whose
  result comes back in device memory).
The deferred mode has tests of its own (tests/test_deferred.py).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import BatchNorm, Mode, compat, fused
from cudnn_bn import distributed as dist
from fake_cudnn import FakeArray


@pytest.fixture
def gpu(fresh_simulated_gpu):
    return fresh_simulated_gpu


def _device(*arrays):
    return [None if a is None else np.array(a, copy=True).view(FakeArray) for a in arrays]


def _waits(gpu) -> tuple[int, int]:
    return gpu.host_syncs, gpu.runtime_queries["BLOCKING"]


def _spent(gpu, before) -> tuple[int, int]:
    after = _waits(gpu)
    return after[0] - before[0], after[1] - before[1]


# (shape in x's own axis order, channel_axis, dtype, the mode auto runs in training)
DEFAULT_CASES = {
    "NCHW float32": ((8, 4, 3, 3), 1, np.float32, Mode.SPATIAL),
    "NHWC float16, Ex path": ((8, 3, 3, 8), -1, np.float16, Mode.SPATIAL_PERSISTENT),
    "NHWC float16": ((8, 3, 3, 3), -1, np.float16, Mode.SPATIAL_PERSISTENT),
    "NHWC float32": ((8, 3, 3, 4), -1, np.float32, Mode.SPATIAL_PERSISTENT),
    "2-D float32": ((16, 5), 1, np.float32, Mode.PER_ACTIVATION),
    "NDHWC float16, Ex path": ((4, 2, 3, 3, 8), -1, np.float16, Mode.SPATIAL_PERSISTENT),
    "NCDHW float64": ((4, 3, 2, 3, 3), 1, np.float64, Mode.SPATIAL),
}


def _steps(gpu, step, count: int = 3) -> list:
    """(host syncs, blocking queries) of each of ``count`` steps; the last one also under capture."""
    spent = []
    for index in range(count):
        before = _waits(gpu)
        if index == count - 1:
            with gpu.capturing():  # any wait would raise here, as CUDA's stream capture refuses it
                step()
        else:
            step()
        spent.append(_spent(gpu, before))
    return spent


@pytest.mark.parametrize("name", list(DEFAULT_CASES))
def test_default_training_steps_make_no_host_synchronization(gpu, name):
    shape, axis, dtype, expected_mode = DEFAULT_CASES[name]
    layout, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL if len(shape) > 2 else Mode.PER_ACTIVATION, axis, dtype)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    running = _device(np.zeros(layout.param_shape, gamma.dtype), np.ones(layout.param_shape, gamma.dtype))
    ran = []

    def step():
        _, saved = cudnn_bn.forward_training(xd, gd, bd, *running, channel_axis=axis)
        cudnn_bn.backward(xd, dyd, gd, saved)
        cudnn_bn.forward_inference(xd, gd, bd, *running, channel_axis=axis)
        ran.append((saved.mode, saved.reserve_space is not None))

    assert _steps(gpu, step) == [(0, 0)] * 3
    assert ran[0][0] is expected_mode and ran[0][1] == name.endswith("Ex path")
    assert "cudnnQueryRuntimeError" not in gpu.calls
    assert np.isfinite(running[1].get()).all()  # the steps ran (this read is the test's own wait)


@pytest.mark.parametrize("axis,dtype", [(1, np.float32), (-1, np.float16)], ids=["NCHW float32", "NHWC float16"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_layer_steps_make_no_host_synchronization(gpu, axis, dtype, activation):
    cupy = sys.modules["cupy"]
    shape = (8, 8, 3, 3) if axis == 1 else (8, 3, 3, 8)
    _, x, dy, _, _ = make_case(shape, Mode.SPATIAL, axis, dtype)
    xd, dyd, residual = _device(x, dy, x[::-1])
    layer = BatchNorm(8, channel_axis=axis, dtype=dtype, xp=cupy, activation=activation)

    def step():
        layer.train()
        layer(xd, residual if activation else None)
        layer.backward(dyd)
        layer.eval()
        layer(xd, residual if activation else None)

    assert _steps(gpu, step) == [(0, 0)] * 3
    assert layer.num_batches_tracked == 3


@pytest.mark.parametrize("axis,dtype,path", [(-1, np.float16, fused.PATH_FUSED_EX),
                                             (1, np.float32, fused.PATH_COMPOSED)],
                         ids=["NHWC float16 fused Ex", "NCHW float32 composed"])
def test_fused_steps_with_a_residual_make_no_host_synchronization(gpu, axis, dtype, path):
    shape = (8, 8, 3, 3) if axis == 1 else (8, 3, 3, 8)
    _, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, axis, dtype)
    xd, dyd, gd, bd, residual = _device(x, dy, gamma, beta, x[::-1])
    running = _device(np.zeros(8, np.float32), np.ones(8, np.float32))
    paths = []

    def step():
        y, saved = fused.forward_training(xd, gd, bd, *running, residual=residual, channel_axis=axis)
        fused.backward(xd, y, dyd, gd, saved)
        fused.forward_inference(xd, gd, bd, *running, residual=residual, channel_axis=axis)
        paths.append(saved.path)

    assert _steps(gpu, step) == [(0, 0)] * 3
    assert paths == [path] * 3


@pytest.mark.parametrize("mode,d_layout", [
    (compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, compat.CUDNN_TENSOR_NHWC),
    (compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, compat.CUDNN_TENSOR_NCHW),
    (compat.CUDNN_BATCHNORM_SPATIAL, compat.CUDNN_TENSOR_NCHW),
], ids=["persistent NHWC", "persistent NCHW", "spatial NCHW"])
def test_compat_steps_without_debug_make_no_host_synchronization(gpu, mode, d_layout):
    axis = -1 if d_layout == compat.CUDNN_TENSOR_NHWC else 1
    shape = (8, 3, 3, 8) if axis == -1 else (8, 8, 3, 3)
    _, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, axis, np.float16)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    running = _device(np.zeros(8, np.float32), np.ones(8, np.float32))

    def step():
        _, mean, inv_std = compat.batch_normalization_forward_training(
            xd, gd, bd, *running, None, None, 1e-5, 0.9, True, mode, False, d_layout
        )
        compat.batch_normalization_backward(xd, gd, dyd, mean, inv_std, 1e-5, True, mode, False, d_layout)
        compat.batch_normalization_forward_inference(xd, gd, bd, *running, 1e-5, True, mode, d_layout)

    assert _steps(gpu, step) == [(0, 0)] * 3


# ---- explicit SPATIAL_PERSISTENT that checks: at most one wait per call ----
@pytest.mark.parametrize("on_overflow", ["raise", "fallback"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_checked_persistent_calls_wait_at_most_once_each(gpu, on_overflow, axis):
    shape = (8, 4, 3, 3) if axis == 1 else (8, 3, 3, 4)
    _, x, dy, gamma, beta = make_case(shape, Mode.SPATIAL, axis, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    running = _device(np.zeros(4, np.float32), np.ones(4, np.float32))
    for _ in range(3):
        before = _waits(gpu)
        _, saved = cudnn_bn.forward_training(xd, gd, bd, *running, mode="spatial_persistent", channel_axis=axis,
                                             on_overflow=on_overflow)
        assert _spent(gpu, before) == (1, 1)  # the blocking query after the kernel
        before = _waits(gpu)
        cudnn_bn.backward(xd, dyd, gd, saved)  # the forward's own statistics: no read of them
        assert _spent(gpu, before) == (1, 1)
        before = _waits(gpu)
        foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())
        cudnn_bn.backward(xd, dyd, gd, foreign)  # statistics from elsewhere: their check is the one wait
        assert _spent(gpu, before) == (1, 0)
        before = _waits(gpu)
        cudnn_bn.forward_inference(xd, gd, bd, *running, mode="spatial_persistent", channel_axis=axis)
        assert _spent(gpu, before) == (0, 0)  # inference runs SPATIAL


def test_compat_with_debug_waits_once_per_call(gpu):
    persistent, nchw = compat.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, compat.CUDNN_TENSOR_NCHW
    _, x, dy, gamma, beta = make_case((8, 4, 3, 3), Mode.SPATIAL, 1, np.float32)
    xd, dyd, gd, bd = _device(x, dy, gamma, beta)
    before = _waits(gpu)
    _, mean, inv_std = compat.batch_normalization_forward_training(xd, gd, bd, None, None, None, None, 1e-5, 0.9,
                                                                   True, persistent, True, nchw)
    assert _spent(gpu, before) == (1, 1)
    before = _waits(gpu)
    compat.batch_normalization_backward(xd, gd, dyd, mean, inv_std, 1e-5, True, persistent, True, nchw)
    assert _spent(gpu, before) == (1, 0)  # CuPy 13's API hands over bare arrays: checked, within the one wait


# ---- distributed: the host reads of the gathered buffers, nothing else ----
class OneRank:
    """A group of one that sums as a collective library does: into a new buffer of the kind it
    was given, queued like any device work (NCCL), without a host read of its own."""

    rank, world_size = 0, 1

    def __init__(self, device_buffers: bool, host_buffers: bool):
        self.device_buffers, self.host_buffers = device_buffers, host_buffers
        self.kinds = []

    def allreduce_sum(self, buffer):
        self.kinds.append("device" if isinstance(buffer, FakeArray) else "host")
        return buffer.copy()


# communicator -> (waits per forward, per backward): the host read of each gathered buffer that
# comes back in device memory (the header is made on the host wherever the communicator takes host
# buffers), plus, for a host-only communicator, the read of the payload slot that leaves the device
DISTRIBUTED_WAITS = {
    "device buffers only (NCCL)": ((True, False), 2, 2),
    "host buffers only (MPI)": ((False, True), 1, 1),
    "both (CUDA-aware MPI)": ((True, True), 1, 1),
}


@pytest.mark.parametrize("name", list(DISTRIBUTED_WAITS))
@pytest.mark.parametrize("activation", [None, "relu"])
def test_distributed_waits_only_for_its_gathered_buffers(gpu, monkeypatch, name, activation):
    cupy = sys.modules["cupy"]
    if not hasattr(cupy, "fuse"):  # the simulated cupy has no fuse: the elementwise dx runs op by op
        monkeypatch.setattr(cupy, "fuse", lambda kernel_name=None: (lambda function: function), raising=False)
        dist.calls._fused_dx.cache_clear()
    (device_buffers, host_buffers), forward_waits, backward_waits = DISTRIBUTED_WAITS[name]
    group = OneRank(device_buffers, host_buffers)
    _, x, dy, _, _ = make_case((6, 4, 3, 3), Mode.SPATIAL, 1, np.float32)
    xd, dyd, residual = _device(x, dy, x[::-1])
    layer = dist.SyncBatchNorm(4, group=group, xp=cupy, activation=activation)
    for _ in range(2):
        before = _waits(gpu)
        layer(xd, residual if activation else None)
        assert _spent(gpu, before) == (forward_waits, 0)
        before = _waits(gpu)
        layer.backward(dyd)
        assert _spent(gpu, before) == (backward_waits, 0)
    assert len(group.kinds) == 8  # a header and a payload per call
    # the group calls themselves, as the layer makes them
    gamma, beta = _device(np.ones(4, np.float32), np.zeros(4, np.float32))
    before = _waits(gpu)
    _, saved = dist.forward_training(xd, gamma, beta, group=group)
    assert _spent(gpu, before) == (forward_waits, 0)
    before = _waits(gpu)
    dist.backward(xd, dyd, gamma, saved, group=group)
    assert _spent(gpu, before) == (backward_waits, 0)
    dist.calls._fused_dx.cache_clear()
