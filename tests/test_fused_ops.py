"""cudnn_bn/_cudnn/fused_ops.py on the simulated GPU: each fused call signature is settled once (its
full checks, the plain call's settling, the path), and every later call checks what depends on
values, with the same errors as a first call. Results and paths are in tests/test_fused.py."""

from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import Mode, SavedStats
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import fused_ops, ops, plans
from cudnn_bn.fused import PATH_COMPOSED, PATH_FUSED_EX, FusedSaved, backward, forward_inference, forward_training
from fake_cudnn import simulated_gpu

EX = dict(shape=(6, 3, 2, 8), mode="spatial_persistent", channel_axis=-1, dtype=np.float16)  # the fused Ex path
COMPOSED = dict(shape=(4, 8, 3, 3), mode="spatial", channel_axis=1, dtype=np.float32)
PERSISTENT_COMPOSED = dict(shape=(6, 3, 2, 6), mode="spatial_persistent", channel_axis=-1, dtype=np.float16)  # C % 4


@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    plans.PLANS.clear()  # each test settles its own signatures
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator
    plans.PLANS.clear()


def _arrays(case, seed=0):
    """Device x, dy, gamma, beta, residual, running_mean, running_var of ``case``."""
    cupy = sys.modules["cupy"]
    layout, x, dy, gamma, beta = make_case(case["shape"], case["mode"], case["channel_axis"], case["dtype"], seed=seed)
    residual = np.random.default_rng(seed + 1).standard_normal(case["shape"]).astype(case["dtype"])
    running = (np.zeros(layout.param_shape, gamma.dtype), np.ones(layout.param_shape, gamma.dtype))
    return [cupy.asarray(a) for a in (x, dy, gamma, beta, residual, *running)]


def _count_full_checks(monkeypatch) -> list:
    """Every full check the fused calls and the plain calls they settle run, by module and name."""
    calls = []
    for module, names in (
        (
            fused_ops,
            (
                "check_forward_training",
                "check_forward_inference",
                "check_backward",
                "check_residual",
                "check_forward_output",
            ),
        ),
        (ops, ("check_forward_training", "check_forward_inference", "check_backward")),
    ):
        for name in names:
            original = getattr(module, name)
            label = f"{module.__name__.rsplit('.', 1)[1]}.{name}"
            monkeypatch.setattr(
                module,
                name,
                lambda *a, _original=original, _label=label, **k: calls.append(_label) or _original(*a, **k),
            )
    return calls


@pytest.mark.parametrize("case,path", [(EX, PATH_FUSED_EX), (COMPOSED, PATH_COMPOSED)], ids=["fused_ex", "composed"])
def test_each_fused_signature_runs_its_full_checks_once(gpu, monkeypatch, case, path):
    x, dy, gamma, beta, residual, mean, var = _arrays(case)
    common = dict(mode=case["mode"], channel_axis=case["channel_axis"])
    calls = _count_full_checks(monkeypatch)
    outputs = []
    for _ in range(3):
        y, saved = forward_training(x, gamma, beta, mean, var, residual=residual, **common)
        grads = backward(x, y, dy, gamma, saved)
        forward_inference(x, gamma, beta, mean, var, residual=residual, **common)
        outputs.append([a.get() for a in (y, *grads)])
        assert saved.path == path
    plain = ["ops.check_forward_training", "ops.check_forward_inference"] + (
        ["ops.check_backward"] if path == PATH_COMPOSED else []
    )
    # the fused call's checks, then (on the first call only) the plain call's own settling
    assert sorted(calls) == sorted(
        plain
        + [
            "fused_ops.check_forward_training",
            "fused_ops.check_residual",
            "fused_ops.check_backward",
            "fused_ops.check_forward_output",
            "fused_ops.check_forward_inference",
            "fused_ops.check_residual",
        ]
    )
    # the same inputs give the same y and gradients on the settled calls
    for later in outputs[1:]:
        for first, again in zip(outputs[0], later):
            np.testing.assert_array_equal(first, again)


def _error(call):
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    return type(caught.value), str(caught.value)


def _cold_and_warm(warm_up, bad_call):
    """The error of ``bad_call`` on a fresh cache and on a settled signature (``warm_up`` settles it)."""
    plans.PLANS.clear()
    cold = _error(bad_call)
    warm_up()
    warm = _error(bad_call)
    return cold, warm


def _carved(cupy, *shapes, dtype):
    """Views of one device buffer, laid end to end except that each overlaps the next by one element."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    buffer = cupy.zeros(sum(sizes), dtype)
    views, offset = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buffer[offset : offset + size].reshape(shape))
        offset += size - 1
    return views


@pytest.mark.parametrize("case", [EX, COMPOSED], ids=["fused_ex", "composed"])
def test_a_settled_fused_training_checks_values_with_a_first_calls_errors(gpu, case):
    cupy = sys.modules["cupy"]
    x, _, gamma, beta, residual, mean, var = _arrays(case)
    common = dict(mode=case["mode"], channel_axis=case["channel_axis"])
    # arrays with the signatures of the good ones, whose memory overlaps where it must not
    shared_mean, shared_gamma = _carved(cupy, mean.shape, gamma.shape, dtype=mean.dtype)
    shared_gamma[...] = gamma
    bad_calls = {
        "momentum": (dict(momentum=float("nan")), "momentum: expected a finite value in [0, 1], got nan"),
        "residual_is_x": (
            dict(residual=x),
            "residual: expected memory of its own, got an array whose memory overlaps x; pass a copy",
        ),
        "mean_over_gamma": (
            dict(gamma=shared_gamma, running_mean=shared_mean),
            "running_mean: expected memory of its own (it is "
            "written in place), got an array whose memory overlaps gamma's",
        ),
    }
    if x.dtype == mean.dtype:  # float32 data: a running statistic can share a buffer with the residual
        shared_residual, shared_var = _carved(cupy, x.shape, var.shape, dtype=x.dtype)
        bad_calls["var_over_residual"] = (
            dict(residual=shared_residual, running_var=shared_var),
            "running_var: expected memory "
            "of its own (it is written in place), got an array whose memory overlaps residual's",
        )
    good = dict(gamma=gamma, running_mean=mean, running_var=var, residual=residual)
    for name, (changes, message) in bad_calls.items():
        arguments = {**good, **changes}

        def bad_call():
            return forward_training(
                x,
                arguments["gamma"],
                beta,
                arguments["running_mean"],
                arguments["running_var"],
                residual=arguments["residual"],
                **{**common, **{k: v for k, v in changes.items() if k == "momentum"}},
            )

        cold, warm = _cold_and_warm(
            lambda: forward_training(x, gamma, beta, mean, var, residual=residual, **common), bad_call
        )
        assert cold == warm, name
        assert warm[1].startswith(message), (name, warm)
        running = [arguments["running_mean"].get(), arguments["running_var"].get()]
        assert _error(bad_call) == warm  # refused before anything is written
        for kept, array in zip(running, (arguments["running_mean"], arguments["running_var"])):
            np.testing.assert_array_equal(kept, array.get())


def test_a_settled_fused_inference_refuses_a_residual_that_is_x(gpu):
    x, _, gamma, beta, residual, mean, var = _arrays(COMPOSED)
    common = dict(mode=COMPOSED["mode"], channel_axis=COMPOSED["channel_axis"])
    cold, warm = _cold_and_warm(
        lambda: forward_inference(x, gamma, beta, mean, var, residual=residual, **common),
        lambda: forward_inference(x, gamma, beta, mean, var, residual=x, **common),
    )
    assert (
        cold
        == warm
        == (ValueError, "residual: expected memory of its own, got an array whose memory overlaps x; pass a copy")
    )


def test_a_settled_persistent_fused_backward_checks_finite_statistics_once_per_call(gpu, monkeypatch):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta, residual, _, _ = _arrays(PERSISTENT_COMPOSED)
    y, saved = forward_training(x, gamma, beta, residual=residual, mode="spatial_persistent", channel_axis=-1)
    assert saved.path == PATH_COMPOSED and saved.mode is Mode.SPATIAL_PERSISTENT and saved.on_overflow == "raise"
    backward(x, y, dy, gamma, saved)  # settles the signature
    checks, vdot = [], cupy.vdot
    monkeypatch.setattr(cupy, "vdot", lambda a, b: checks.append(a) or vdot(a, b))
    backward(x, y, dy, gamma, saved)
    assert checks == []  # the forward's own statistics, passed on by the fused call, are not read back
    foreign = type(saved.stats)._checked(
        saved.mean.copy(), saved.inv_std, saved.mode, saved.eps, saved.channel_axis, None, saved.on_overflow
    )
    backward(x, y, dy, gamma, FusedSaved(foreign, saved.activation, saved.has_residual, saved.path))
    assert len(checks) == 1  # statistics from elsewhere: once, by the plain backward the fused call runs
    poisoned = saved.mean.get()
    poisoned[0] = np.nan
    stats = type(saved.stats)._checked(
        cupy.asarray(poisoned), saved.inv_std, saved.mode, saved.eps, saved.channel_axis, None, saved.on_overflow
    )
    bad = FusedSaved(stats, saved.activation, saved.has_residual, saved.path)
    with pytest.raises(ValueError, match=r"^saved\.mean: expected finite values"):
        backward(x, y, dy, gamma, bad)


def test_a_settled_fused_ex_backward_checked_its_reserve_when_settled(gpu):
    cupy = sys.modules["cupy"]
    x, dy, gamma, beta, _, _, _ = _arrays(EX)
    y, saved = forward_training(x, gamma, beta, mode=EX["mode"], channel_axis=EX["channel_axis"])
    assert saved.path == PATH_FUSED_EX
    size = saved.reserve_space.size
    small = FusedSaved(
        type(saved.stats)._checked(
            saved.mean,
            saved.inv_std,
            saved.mode,
            saved.eps,
            saved.channel_axis,
            cupy.empty(size - 1, np.uint8),
            saved.on_overflow,
        ),
        saved.activation,
        False,
        PATH_FUSED_EX,
        bias=saved.bias,
    )
    message = (
        rf"^saved\.reserve_space: expected at least {size} bytes on device 0 \(the forward's reserve space\), "
        rf"got {size - 1} bytes"
    )
    for _ in range(2):  # refused every time: a refused signature is not kept
        with pytest.raises(ValueError, match=message):
            backward(x, y, dy, gamma, small)
    assert not any(call.startswith("cudnnBatchNormalizationBackward") for call in gpu.calls)


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add-relu"])
def test_the_plain_backward_of_fused_ex_statistics_reads_no_reserve_space(gpu, with_residual):
    """A fused forward's reserve space holds its activation's mask too, for a BackwardEx with the
    same bnOps: the plain backward given those statistics runs cudnnBatchNormalizationBackward,
    with the NumPy reference's results, and settled runs the same way."""
    x, dy, gamma, beta, residual, _, _ = _arrays(EX)
    _, saved = forward_training(x, gamma, beta, residual=residual if with_residual else None, mode=EX["mode"],
                                channel_axis=EX["channel_axis"])
    assert saved.path == PATH_FUSED_EX and saved.reserve_space is not None
    host = [array.get() for array in (x, dy, gamma, saved.mean, saved.inv_std)]
    expected = cudnn_bn.backward(*host[:3], SavedStats(host[3], host[4], saved.mode, saved.eps, saved.channel_axis))
    for _ in range(2):  # settling the signature, then settled
        got = cudnn_bn.backward(x, dy, gamma, saved.stats)
        for actual, want in zip(got, expected):
            assert_close(actual, want, EX["dtype"], scale=EX["shape"][0])
    assert gpu.calls.count("cudnnBatchNormalizationBackward") == 2
    assert "cudnnBatchNormalizationBackwardEx" not in gpu.calls


def test_a_fused_ex_saved_with_another_bn_ops_runs_composed(gpu):
    """The reserve space of a BN_ADD_ACTIVATION forward, handed back as a FusedSaved without the
    residual (BN_ACTIVATION): the mask and the plain backward, with the reference's results."""
    x, dy, gamma, beta, residual, _, _ = _arrays(EX)
    y, saved = forward_training(x, gamma, beta, residual=residual, mode=EX["mode"], channel_axis=EX["channel_axis"])
    assert saved.path == PATH_FUSED_EX and saved.has_residual
    without = dataclasses.replace(saved, has_residual=False)
    host = [array.get() for array in (x, y, dy, gamma, saved.mean, saved.inv_std)]
    stats = SavedStats(host[4], host[5], saved.mode, saved.eps, saved.channel_axis)
    expected = backward(*host[:4], FusedSaved(stats, saved.activation, False, PATH_COMPOSED))
    got = backward(x, y, dy, gamma, without)
    assert got[1] is None and expected[1] is None
    for index in (0, 2, 3):  # dx, dgamma, dbeta
        assert_close(got[index], expected[index], EX["dtype"], scale=EX["shape"][0])
    assert "cudnnBatchNormalizationBackwardEx" not in gpu.calls


@pytest.mark.parametrize("copy_of", [
    copy.deepcopy,
    lambda saved: dataclasses.replace(saved, stats=dataclasses.replace(
        saved.stats, mean=saved.mean.copy(), inv_std=saved.inv_std.copy(), reserve_space=saved.reserve_space.copy())),
], ids=["deepcopy", "arrays copied"])
def test_a_copy_of_fused_ex_statistics_runs_composed_with_the_same_results(gpu, copy_of):
    """BackwardEx reads the mask its forward left in the reserve space for these statistics: a copy
    of the FusedSaved runs the mask and the plain backward instead."""
    x, dy, gamma, beta, residual, _, _ = _arrays(EX)
    y, saved = forward_training(x, gamma, beta, residual=residual, mode=EX["mode"], channel_axis=EX["channel_axis"])
    assert saved.path == PATH_FUSED_EX
    expected = [a.get() for a in backward(x, y, dy, gamma, saved)]
    assert gpu.calls.count("cudnnBatchNormalizationBackwardEx") == 1
    for _ in range(2):  # settling the signature, then settled
        for got, want in zip(backward(x, y, dy, gamma, copy_of(saved)), expected):
            assert_close(got, want, EX["dtype"])
    assert gpu.calls.count("cudnnBatchNormalizationBackwardEx") == 1
    assert gpu.calls.count("cudnnBatchNormalizationBackward") == 2
