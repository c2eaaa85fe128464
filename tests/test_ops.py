"""Batch normalization through cuDNN (cudnn_bn/_cudnn/ops.py) on the simulated GPU: each call on
the device of its arrays, with that device's handle; the SPATIAL re-run after an overflow; momentum
checked per call; arrays that do not reach cuDNN as they are; the Ex path's reserve and
workspace."""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import Mode, fused, reference
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import handles, launch, ops, plans
from cudnn_calls import (
    backward_args,
    ex_case,
    inference_args,
    on_device,
    reference_running,
    settled_training,
    training_args,
)


# ---- the device of the arrays ----
def _one_on_device_1(args, position):
    """Device copies of host ``args``, all on device 0 but the one at ``position``, on device 1."""
    arrays = on_device(*args)
    with sys.modules["cupy"].cuda.Device(1):
        arrays[position] = on_device(args[position])[0]
    return arrays


@pytest.mark.parametrize("position", range(1, 5), ids=["gamma", "beta", "mean", "var"])
def test_inference_refuses_an_argument_on_another_device_naming_it(unsettled_two_gpus, position):
    arrays = _one_on_device_1(inference_args(), position)
    names = ["x", "gamma", "beta", "mean", "var"]
    devices = ", ".join(f"{name} on device {int(index == position)}" for index, name in enumerate(names))
    with pytest.raises(ValueError) as raised:
        cudnn_bn.forward_inference(*arrays, mode="spatial")
    assert str(raised.value) == f"arrays on different devices: expected one device, got {devices}"


def test_inference_runs_on_the_device_of_its_arrays(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    args = inference_args()
    with cupy.cuda.Device(1):
        arrays = on_device(*args)
    y = cudnn_bn.forward_inference(*arrays, mode="spatial")
    assert y.device.id == 1


@pytest.mark.parametrize("position", range(1, 5), ids=["gamma", "beta", "running_mean", "running_var"])
def test_training_refuses_an_argument_on_another_device_naming_it(unsettled_two_gpus, position):
    arrays = _one_on_device_1(training_args(), position)
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    with pytest.raises(ValueError,
                       match=r"^arrays on different devices: expected one device, "
                             rf"got .*{names[position]} on device 1"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("name", ["dy", "gamma", "saved_mean", "saved_inv_std"])
def test_backward_refuses_an_argument_on_another_device_naming_it(unsettled_two_gpus, name):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta = backward_args()
    xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial")
    with cupy.cuda.Device(1):
        if name == "dy":
            dyd = on_device(dy)[0]
        elif name == "gamma":
            gd = on_device(gamma)[0]
        else:
            field = name.removeprefix("saved_")
            saved = dataclasses.replace(saved, **{field: on_device(getattr(saved, field))[0]})
    with pytest.raises(ValueError,
                       match=rf"^arrays on different devices: expected one device, got .*{name} on device 1"):
        cudnn_bn.backward(xd, dyd, gd, saved)


def test_backward_refuses_a_reserve_space_on_another_device_naming_it(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    xd, dyd, gd, bd = ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    with cupy.cuda.Device(1):
        elsewhere = on_device(np.asarray(saved.reserve_space))[0]
    with pytest.raises(ValueError,
                       match=r"^arrays on different devices: expected one device, "
                             r"got .*saved_reserve_space on device 1"):
        cudnn_bn.backward(xd, dyd, gd, dataclasses.replace(saved, reserve_space=elsewhere))


def test_training_and_backward_run_on_the_device_of_their_arrays(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    with cupy.cuda.Device(1):
        x, dy, gamma, beta = on_device(*backward_args())
    y, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    dx, _, _ = cudnn_bn.backward(x, dy, gamma, saved)
    assert y.device.id == 1 and dx.device.id == 1


def test_training_from_another_device_updates_the_running_statistics(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    args = training_args()
    with cupy.cuda.Device(1):
        x, gamma, beta, mean, var = on_device(*args)
    expected = reference_running(*args, 0.1)
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=0.1)
    assert_close(mean, expected[0], np.float32)
    assert_close(var, expected[1], np.float32)


@pytest.mark.parametrize("mode", ["per_activation", "spatial"])
def test_backward_from_another_device_keeps_its_mode_eps_and_channel_axis(unsettled_two_gpus, mode):
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, _ = make_case((4, 2, 2, 3), Mode[mode.upper()], -1, np.float32)
    with cupy.cuda.Device(1):
        xd, dyd, gd = on_device(x, dy, gamma)
    grads = cudnn_bn.backward(xd, dyd, gd, mode=mode, eps=0.5, channel_axis=-1)
    expected = reference.backward(*(np.asarray(a, np.float64) for a in (x, dy, gamma)), mode=mode, eps=0.5,
                                  channel_axis=-1)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, np.float32, scale=10)


def test_the_fused_call_from_another_device_runs_on_its_arrays_device(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    _, x, _, gamma, beta = make_case((2, 2, 2, 8), Mode.SPATIAL, -1, np.float16)
    expected, _ = fused.reference_forward_training(*(np.asarray(a, np.float64) for a in (x, gamma, beta)),
                                                   mode="spatial", channel_axis=-1)
    with cupy.cuda.Device(1):
        xd, gd, bd = on_device(x, gamma, beta)
    y, _ = fused.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert y.device.id == 1
    assert_close(y, expected, np.float16)


# ---- the handle of the arrays' device, also when another device ran first ----
def test_inference_then_training_fallbacks_on_two_devices_each_use_their_own_handle(unsettled_two_gpus):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta = backward_args()
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    for device in (0, 1):
        with cupy.cuda.Device(device):
            xd, dyd, gd, bd, md, vd = on_device(x, dy, gamma, beta, mean, var)
        assert cudnn_bn.forward_inference(xd, gd, bd, md, vd, mode="spatial").device.id == device
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent")
        unsettled_two_gpus.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y, _ = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", on_overflow="fallback")
            dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved, on_overflow="fallback")
        unsettled_two_gpus.overflow_modes.discard(Mode.SPATIAL_PERSISTENT)
        assert y.device.id == device and dx.device.id == device


def test_a_persistent_backward_from_another_device_checks_its_statistics_once_on_theirs(unsettled_two_gpus,
                                                                                        monkeypatch):
    cupy = sys.modules["cupy"]
    _, x, _, gamma, beta = make_case((4, 2, 2, 8), Mode.SPATIAL, -1, np.float16)
    with cupy.cuda.Device(1):
        xd, gd, bd = on_device(x, gamma, beta)
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
        foreign = dataclasses.replace(saved, inv_std=saved.inv_std.copy())  # statistics the forward did not hand over
    checks, vdot = [], cupy.vdot
    monkeypatch.setattr(cupy, "vdot",
                        lambda a, b: checks.append((a.device.id, cupy.cuda.runtime.getDevice())) or vdot(a, b))
    for statistics, expected in ((saved, []), (foreign, [(1, 1)])):  # the forward's own are not read back
        for _ in range(2):  # the call that settles the signature, then the cached one, both from device 0
            checks.clear()
            dx, _, _ = cudnn_bn.backward(xd, xd, gd, statistics)
            assert checks == expected and dx.device.id == 1


def test_backward_ex_on_two_devices_queries_its_sizes_with_each_devices_handle(unsettled_two_gpus):
    plans.PLANS.clear()  # plans keep the sizes they queried
    cupy = sys.modules["cupy"]
    _, x, dy, gamma, beta = make_case((2, 2, 2, 4), Mode.SPATIAL_PERSISTENT, -1, np.float16)
    for device in (1, 0):
        with cupy.cuda.Device(device):
            xd, dyd, gd, bd = on_device(x, dy, gamma, beta)
            _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
        dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved)
        assert dx.device.id == device
    # one pool per device: a pool under any other key would lend a handle made on whichever device
    # was current when it was made to the calls of every device
    assert {device for device, _ in handles._POOLS} <= {0, 1}
    assert all(pool.device_id == device for (device, _), pool in handles._POOLS.items())


# ---- backward's fallback keeps the statistics it was given ----
def test_backward_fallback_uses_the_saved_statistics_it_was_given(unsettled_gpu):
    # statistics of another batch: a fallback that recomputed them from x would give other gradients
    _, x, dy, gamma, beta = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32)
    _, other, _, _, _ = make_case((4, 3, 2, 2), Mode.SPATIAL, 1, np.float32, seed=5, offset=0.5, scale=2.0)
    xd, dyd, gd, bd, od = on_device(x, dy, gamma, beta, other)
    _, saved = cudnn_bn.forward_training(od, gd, bd, mode="spatial_persistent")
    unsettled_gpu.overflow_modes.add(Mode.SPATIAL_PERSISTENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = cudnn_bn.backward(xd, dyd, gd, saved, mode="spatial_persistent", on_overflow="fallback")
    wide = [np.asarray(a, np.float64) for a in (x, dy, gamma)]
    given = reference.SavedStats(np.asarray(saved.mean, np.float64), np.asarray(saved.inv_std, np.float64), "spatial",
                                 1e-5, 1)
    for actual, expected in zip(grads, reference.backward(*wide, given)):
        assert_close(actual, expected, np.float32, scale=10)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "cudnn_bn: SPATIAL_PERSISTENT backward overflowed for shape (4, 3, 2, 2) float32; "
        "re-ran with SPATIAL (this warning is shown once per shape)"
    ]


# ---- the cached path: momentum, checked per call ----
@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), -0.1, 1.5, True, "0.1"],
                         ids=["nan", "inf", "negative", "above_one", "bool", "str"])
def test_a_cached_training_call_refuses_a_bad_momentum_before_writing(unsettled_gpu, momentum):
    x, gamma, beta, mean, var = settled_training()
    before = (mean.get(), var.get())
    with pytest.raises((TypeError, ValueError), match="^momentum: expected"):
        cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=momentum)
    assert np.array_equal(mean.get(), before[0]) and np.array_equal(var.get(), before[1])


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.1, np.float32(0.5), np.float64(0.25), 1],
                         ids=["zero", "one", "float", "float32", "float64", "int"])
def test_a_cached_training_call_updates_with_any_valid_momentum_and_checks_only_non_floats(unsettled_gpu, monkeypatch,
                                                                                           momentum):
    x, gamma, beta, mean, var = settled_training()
    expected = reference_running(x, gamma, beta, mean, var, momentum)
    full_checks = []
    check_momentum = ops.check_momentum
    monkeypatch.setattr(ops, "check_momentum", lambda value: full_checks.append(value) or check_momentum(value))
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=momentum)
    assert_close(mean, expected[0], np.float32)
    assert_close(var, expected[1], np.float32)
    # a float in [0, 1] is the common case, checked inline; anything else takes the full check
    assert len(full_checks) == (0 if type(momentum) is float else 1)


# ---- arrays that do not reach cuDNN as they are ----
def test_inference_of_a_non_contiguous_x_matches_the_reference_also_once_settled(unsettled_gpu):
    x, gamma, beta, mean, var = inference_args()
    wide = np.concatenate([x, x + 1.0], axis=3)[..., ::2]  # every other element of a wider array
    expected = reference.forward_inference(*(np.asarray(a, np.float64) for a in (wide, gamma, beta, mean, var)),
                                           mode="spatial")
    for _ in range(2):
        arrays = on_device(np.concatenate([x, x + 1.0], axis=3), gamma, beta, mean, var)
        arrays[0] = arrays[0][..., ::2]
        assert_close(cudnn_bn.forward_inference(*arrays, mode="spatial"), expected, np.float32)


def test_backward_of_non_contiguous_x_and_dy_matches_the_reference(unsettled_gpu):
    x, dy, gamma, _ = backward_args()
    expected = reference.backward(*(np.asarray(a, np.float64) for a in (x, dy, gamma)), mode="spatial", eps=1e-5)
    strided = [on_device(np.repeat(a, 2, axis=0))[0][::2] for a in (x, dy)]  # every other row: the values of a
    grads = cudnn_bn.backward(*strided, on_device(gamma)[0], mode="spatial", eps=1e-5)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, np.float32, scale=10)


def test_backward_reads_non_contiguous_saved_statistics_as_their_values(unsettled_gpu):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    expected = cudnn_bn.backward(x, dy, gamma, saved)
    spread = {name: on_device(np.repeat(getattr(saved, name).get(), 2))[0][::2] for name in ("mean", "inv_std")}
    for actual, wanted in zip(cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, **spread)), expected):
        assert_close(actual, wanted.get(), np.float32)


@pytest.mark.parametrize("shape,channel_axis,mode", [((6, 3), 1, "per_activation"), ((4, 2, 2, 3), -1, "spatial")])
def test_inference_auto_runs_the_policys_mode(unsettled_gpu, shape, channel_axis, mode):
    layout, x, _, gamma, beta = make_case(shape, Mode[mode.upper()], channel_axis, np.float32)
    mean, var = np.full(layout.param_shape, 0.25, np.float32), np.full(layout.param_shape, 2.0, np.float32)
    expected = reference.forward_inference(*(np.asarray(a, np.float64) for a in (x, gamma, beta, mean, var)), mode=mode,
                                           channel_axis=channel_axis)
    y = cudnn_bn.forward_inference(*on_device(x, gamma, beta, mean, var), mode="auto", channel_axis=channel_axis)
    assert_close(y, expected, np.float32)


# ---- the Ex path's reserve and workspace ----
def test_saved_statistics_without_a_reserve_take_the_plain_backward_on_an_ex_layout(unsettled_gpu):
    xd, dyd, gd, bd = ex_case()
    previous = plans.set_ex_path_enabled(False)
    try:
        _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    finally:
        plans.set_ex_path_enabled(previous)
    assert saved.reserve_space is None
    cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" not in unsettled_gpu.calls
    assert "cudnnBatchNormalizationBackward" in unsettled_gpu.calls


@pytest.mark.parametrize("copy_of,reads_the_reserve", [
    (copy.deepcopy, False),
    (lambda saved: dataclasses.replace(saved, mean=saved.mean.copy()), False),
    (lambda saved: dataclasses.replace(saved, reserve_space=saved.reserve_space.copy()), False),
    (lambda saved: cudnn_bn.SavedStats(saved.mean, saved.inv_std, saved.mode, saved.eps, saved.channel_axis,
                                       saved.reserve_space, saved.on_overflow), False),
], ids=["deepcopy", "mean copied", "reserve copied", "rebuilt from its arrays"])
def test_backward_ex_reads_a_reserve_space_only_with_the_statistics_it_was_filled_for(unsettled_gpu, copy_of,
                                                                                    reads_the_reserve):
    """BackwardEx must get the reserve space its forward filled for the saved mean it is given
    (the pairing the simulated GPU enforces): it reads it only with the forward's own SavedStats;
    with a copy of either, or a SavedStats rebuilt from the same arrays, the plain backward, with
    the same results, before and after the signature is settled."""
    xd, dyd, gd, bd = ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    expected = [a.get() for a in cudnn_bn.backward(xd, dyd, gd, saved)]
    for _ in range(2):
        for got, want in zip(cudnn_bn.backward(xd, dyd, gd, copy_of(saved)), expected):
            np.testing.assert_array_equal(got.get(), want)
    ex_calls = 3 if reads_the_reserve else 1
    assert unsettled_gpu.calls.count("cudnnBatchNormalizationBackwardEx") == ex_calls
    assert unsettled_gpu.calls.count("cudnnBatchNormalizationBackward") == 3 - ex_calls


def test_an_empty_reserve_request_still_gets_a_one_byte_buffer(unsettled_gpu):
    plans.PLANS.clear()  # plans keep the sizes they queried
    unsettled_gpu.reserve_size = 0
    xd, _, gd, bd = ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    assert saved.reserve_space.size == 1


def test_backward_ex_gets_the_workspace_it_asked_for_not_the_reserve_size(unsettled_gpu):
    plans.PLANS.clear()  # plans keep the sizes they queried
    unsettled_gpu.workspace_size, unsettled_gpu.reserve_size = 1024, 16
    xd, dyd, gd, bd = ex_case()
    _, saved = cudnn_bn.forward_training(xd, gd, bd, mode="spatial_persistent", channel_axis=-1)
    launch.WORKSPACES.clear()  # backward allocates its own
    dx, _, _ = cudnn_bn.backward(xd, dyd, gd, saved)
    assert "cudnnBatchNormalizationBackwardEx" in unsettled_gpu.calls and np.all(np.isfinite(dx.get()))
    assert [buffer.size for buffer in launch.WORKSPACES.values()] == [1024]
    plans.PLANS.clear()  # their sizes are this test's
