"""Settled call signatures (cudnn_bn/_cudnn/signatures.py) on the simulated GPU: a call whose
arguments differ from a settled signature in shape, type, writability or kind of value is checked
again; settled signatures are remembered with their plans and bounded; and what the cached path
still checks per call: running statistics apart from every input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import cudnn_bn
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import ops, plans, signatures
from cudnn_calls import backward_args, inference_args, on_device, reference_running, settled_training, training_args
from fake_cudnn import FakeArray


# ---- a changed shape, writability or value type is checked again ----
def _refused_after_a_shape_change(call, args, position) -> None:
    """``call`` settles its signature on ``args``, then refuses them with the one at ``position``
    reshaped (x loses a channel; a parameter gains one): the changed signature is checked again."""
    call(*on_device(*args), mode="spatial")
    changed = list(args)
    changed[position] = args[0][:, :2] if position == 0 else np.concatenate([args[position], args[position][:1]])
    with pytest.raises(ValueError):
        call(*on_device(*changed), mode="spatial")


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "mean", "var"])
def test_inference_checks_again_when_any_argument_changes_shape(unsettled_gpu, position):
    _refused_after_a_shape_change(cudnn_bn.forward_inference, inference_args(), position)


@pytest.mark.parametrize("keyword,first,second", [("eps", 1, True), ("channel_axis", 1, True)])
def test_inference_checks_again_when_an_equal_value_comes_as_a_bool(unsettled_gpu, keyword, first, second):
    args = on_device(*inference_args())
    cudnn_bn.forward_inference(*args, mode="spatial", **{keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.forward_inference(*args, mode="spatial", **{keyword: second})


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "running_mean", "running_var"])
def test_training_checks_again_when_any_argument_changes_shape(unsettled_gpu, position):
    _refused_after_a_shape_change(cudnn_bn.forward_training, training_args(), position)


@pytest.mark.parametrize("position", [3, 4], ids=["running_mean", "running_var"])
def test_training_checks_again_when_a_running_statistic_becomes_read_only(unsettled_gpu, position):
    cudnn_bn.forward_training(*on_device(*training_args()), mode="spatial")
    arrays = on_device(*training_args())
    arrays[position].flags.writeable = False
    with pytest.raises((TypeError, ValueError), match=["running_mean", "running_var"][position - 3]):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("keyword,first,second", [("eps", 1, True), ("channel_axis", 1, True)])
def test_training_and_backward_check_again_when_an_equal_value_comes_as_a_bool(unsettled_gpu, keyword, first, second):
    x, gamma, beta, _, _ = on_device(*training_args())
    cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{keyword: second})
    dy = on_device(np.ones(x.shape, np.float32))[0]
    cudnn_bn.backward(x, dy, gamma, mode="spatial", **{"eps": 1e-5, "channel_axis": 1, keyword: first})
    with pytest.raises(TypeError, match=keyword):
        cudnn_bn.backward(x, dy, gamma, mode="spatial", **{"eps": 1e-5, "channel_axis": 1, keyword: second})


@pytest.mark.parametrize("position", range(3), ids=["x", "dy", "gamma"])
def test_backward_checks_again_when_any_argument_changes_shape(unsettled_gpu, position):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    args = [x, dy, gamma]
    args[position] = args[position][:, :2] if position < 2 else on_device(np.ones(4, np.float32))[0]
    with pytest.raises(ValueError):
        cudnn_bn.backward(*args, saved)


@pytest.mark.parametrize("field", ["mean", "inv_std"])
def test_backward_checks_again_when_the_saved_statistics_change_shape(unsettled_gpu, field):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    wrong = dataclasses.replace(saved, **{field: on_device(np.ones(4, np.float32))[0]})
    with pytest.raises(ValueError, match="saved"):
        cudnn_bn.backward(x, dy, gamma, wrong)


def test_backward_checks_again_when_the_saved_statistics_gain_a_reserve(unsettled_gpu):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    cudnn_bn.backward(x, dy, gamma, saved)
    with pytest.raises((TypeError, ValueError), match="reserve_space"):
        cudnn_bn.backward(x, dy, gamma,
                          dataclasses.replace(saved, reserve_space=on_device(np.ones((2, 2), np.uint8))[0]))


# ---- the signature keys the types of what it is given ----
@pytest.mark.parametrize("operation", ["training", "inference", "backward"])
def test_a_mode_equal_to_a_valid_one_but_a_bool_is_refused_after_the_valid_one_ran(unsettled_gpu, operation):
    x, dy, gamma, beta = on_device(*backward_args())
    mean, var = on_device(np.zeros(3, np.float32), np.ones(3, np.float32))
    calls = {
        "training": lambda mode: cudnn_bn.forward_training(x, gamma, beta, mode=mode),
        "inference": lambda mode: cudnn_bn.forward_inference(x, gamma, beta, mean, var, mode=mode),
        "backward": lambda mode: cudnn_bn.backward(x, dy, gamma, mode=mode, eps=1e-5),
    }
    calls[operation](1)  # Mode.SPATIAL's value: accepted
    with pytest.raises((TypeError, ValueError), match="^mode: expected"):
        calls[operation](True)  # == 1, but a bool is not a mode


class _Renamed(str):
    """A string equal to a valid name that reads as another one when lowered."""

    def lower(self):
        return "sideways"


@pytest.mark.parametrize("operation", ["training", "backward"])
def test_an_on_overflow_of_another_type_is_checked_again_though_equal(unsettled_gpu, operation):
    x, dy, gamma, beta = on_device(*backward_args())
    calls = {
        "training": lambda value: cudnn_bn.forward_training(x, gamma, beta, mode="spatial", on_overflow=value),
        "backward": lambda value: cudnn_bn.backward(x, dy, gamma, mode="spatial", eps=1e-5, on_overflow=value),
    }
    calls[operation]("raise")
    with pytest.raises(ValueError, match="^on_overflow: expected one of"):
        calls[operation](_Renamed("raise"))


class _Posing(FakeArray):
    """Device memory like the simulator's arrays, but of a type the package does not take for cupy's."""


def _posing(array):
    return np.array(array, copy=True).view(FakeArray).view(_Posing)


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "running_mean", "running_var"])
def test_training_checks_again_when_an_argument_changes_type(unsettled_gpu, position):
    args = training_args()
    ops.forward_training(*on_device(*args), "spatial", 0.1, 1e-5, 1, None)
    arrays = on_device(*args)
    arrays[position] = _posing(args[position])
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.forward_training(*arrays, "spatial", 0.1, 1e-5, 1, None)


@pytest.mark.parametrize("position", range(5), ids=["x", "gamma", "beta", "mean", "var"])
def test_inference_checks_again_when_an_argument_changes_type(unsettled_gpu, position):
    args = inference_args()
    ops.forward_inference(*on_device(*args), "spatial", 1e-5, 1)
    arrays = on_device(*args)
    arrays[position] = _posing(args[position])
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.forward_inference(*arrays, "spatial", 1e-5, 1)


@pytest.mark.parametrize("name", ["x", "dy", "gamma", "saved_mean"])
def test_backward_checks_again_when_an_argument_changes_type(unsettled_gpu, name):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    ops.backward(x, dy, gamma, saved, None, None, None, None)
    arrays = {"x": x, "dy": dy, "gamma": gamma}
    if name == "saved_mean":
        saved = dataclasses.replace(saved, mean=_posing(saved.mean.get()))
    else:
        arrays[name] = _posing(arrays[name].get())
    with pytest.raises(TypeError, match="^arrays of mixed kinds"):
        ops.backward(arrays["x"], arrays["dy"], arrays["gamma"], saved, None, None, None, None)


class _MisbehavingArray:
    """Looks like an array until its shape is read."""

    dtype = np.dtype(np.uint8)

    @property
    def shape(self):
        raise RuntimeError("no shape here")


class _UnhashableMode(str):
    def __hash__(self):
        raise ValueError("no hash here")


def test_arguments_that_break_the_signature_get_the_typed_errors_of_the_full_checks(unsettled_gpu):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    with pytest.raises(TypeError, match="saved.reserve_space"):
        cudnn_bn.backward(x, dy, gamma, dataclasses.replace(saved, reserve_space=_MisbehavingArray()))
    with pytest.raises(ValueError, match="^mode: expected one of"):
        cudnn_bn.backward(x, dy, gamma, mode=_UnhashableMode("sideways"), eps=1e-5)
    with pytest.raises(ValueError, match="^mode: expected one of"):
        cudnn_bn.forward_training(x, gamma, beta, mode=_UnhashableMode("sideways"))


# ---- saved statistics the signature cannot describe ----
class _SavedSubclass(cudnn_bn.SavedStats):
    """Saved statistics of a subclass: accepted, but not keyed (the full checks run every time)."""


def test_saved_statistics_of_a_subclass_are_checked_on_every_call(unsettled_gpu):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    fields = {field.name: getattr(saved, field.name) for field in dataclasses.fields(saved)}
    cudnn_bn.backward(x, dy, gamma, _SavedSubclass(**fields))
    wrong = dict(fields, mean=on_device(np.zeros(4, np.float32))[0])
    with pytest.raises(ValueError, match="saved"):
        cudnn_bn.backward(x, dy, gamma, _SavedSubclass(**wrong))


# ---- the memory of settled signatures ----
def test_each_call_signature_is_remembered_with_its_plan_and_the_memory_is_bounded(unsettled_gpu, monkeypatch):
    plans.PLANS.clear()
    args = inference_args()
    cudnn_bn.forward_inference(*on_device(*args), mode="spatial")
    (settled,) = signatures.SETTLED.values()
    assert settled.plan is plans.plan_for(plans.INFERENCE, settled.checked.layout, settled.checked.data_dtype, 0)
    monkeypatch.setattr(signatures, "MAX_SIGNATURES", 2)
    for batch in (5, 6, 7):
        cudnn_bn.forward_inference(*on_device(*inference_args((batch, 3, 2, 2))), mode="spatial")
        assert 1 <= len(signatures.SETTLED) <= 2


@pytest.mark.parametrize("operation", ["training", "backward"])
def test_training_and_backward_remember_their_signature_with_their_plan(unsettled_gpu, operation):
    x, dy, gamma, beta = on_device(*backward_args())
    _, saved = cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    signatures.SETTLED.clear()
    if operation == "training":
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial")
    else:
        cudnn_bn.backward(x, dy, gamma, saved)
    (settled,) = signatures.SETTLED.values()
    kind = plans.TRAINING if operation == "training" else plans.BACKWARD
    assert settled.plan is plans.plan_for(kind, settled.checked.layout, settled.checked.data_dtype, 0)


def test_a_settled_signature_skips_the_full_checks_on_its_next_call(unsettled_gpu, monkeypatch):
    plans.PLANS.clear()  # signatures settled by earlier tests go with the plans
    full_checks = []
    for name in ("check_forward_inference", "check_forward_training", "check_backward"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _original=original, _name=name, **k: full_checks.append(_name)
                            or _original(*a, **k))
    x, dy, gamma, beta = on_device(*backward_args())
    mean, var = on_device(np.zeros(3, np.float32), np.ones(3, np.float32))
    for _ in range(3):
        cudnn_bn.forward_inference(x, gamma, beta, mean, var, mode="spatial")
        _, saved = cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial")
        cudnn_bn.backward(x, dy, gamma, saved)
    assert sorted(full_checks) == ["check_backward", "check_forward_inference", "check_forward_training"]


def test_settled_signatures_are_kept_up_to_twice_the_plan_capacity(unsettled_gpu, monkeypatch):
    plans.PLANS.clear()
    monkeypatch.setattr(plans.PLANS, "capacity", 3)
    counts = []
    for batch in range(2, 10):
        cudnn_bn.forward_inference(*on_device(*inference_args((batch, 3, 2, 2))), mode="spatial")
        counts.append(len(signatures.SETTLED))
    # six kept (twice the three plans), then emptied for the seventh
    assert counts == [1, 2, 3, 4, 5, 6, 1, 2]


# ---- the running statistics apart from the inputs, checked per call from the settled extents ----
@pytest.mark.parametrize("written,other", [(3, 0), (4, 1), (3, 2)])
def test_a_cached_training_call_still_refuses_a_running_statistic_overlapping_an_input(unsettled_gpu, written, other):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    cudnn_bn.forward_training(*on_device(*training_args()), mode="spatial")  # the signature is now cached
    arrays = on_device(*training_args())
    arrays[written] = arrays[other].reshape(-1)[:3]  # a view into the other argument's memory
    with pytest.raises(ValueError,
                       match=rf"^{names[written]}: expected memory of its own .* overlaps {names[other]}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


def _carve(buffer, order, shapes):
    """Views of one flat device buffer laid end to end in ``order``: {name: view}."""
    views, offset = {}, 0
    for name in order:
        size = int(np.prod(shapes[name]))
        views[name] = buffer[offset:offset + size].reshape(shapes[name])
        offset += size
    return views


# every ordered pair of (running statistic, other argument) ends up exactly adjacent in one of these
_ADJACENT_LAYOUTS = [
    ("x", "running_mean", "gamma", "running_var", "beta"),
    ("beta", "running_var", "gamma", "running_mean", "x"),
    ("x", "running_var", "running_mean", "beta", "gamma"),
    ("beta", "running_mean", "running_var", "x", "gamma"),
]


@pytest.mark.parametrize("order", _ADJACENT_LAYOUTS,
                         ids=["-".join(n.removeprefix("running_") for n in o) for o in _ADJACENT_LAYOUTS])
def test_a_cached_training_call_accepts_adjacent_arrays_without_the_exact_overlap_check(unsettled_gpu, monkeypatch,
                                                                                        order):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    args = training_args()
    x, gamma, beta, mean, var = settled_training()
    exact_checks = []
    check_no_overlap = signatures.check_no_overlap
    monkeypatch.setattr(signatures, "check_no_overlap", lambda *a: exact_checks.append(a) or check_no_overlap(*a))
    cudnn_bn.forward_training(x, gamma, beta, mean, var, mode="spatial", momentum=0.3)  # disjoint arrays
    assert exact_checks == []
    shapes = {name: np.shape(array) for name, array in zip(names, args)}
    buffer = on_device(np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32))[0]
    views = _carve(buffer, order, shapes)
    for name, array in zip(names, args):
        views[name][...] = array
    expected = reference_running(*args, 0.3)
    cudnn_bn.forward_training(*(views[name] for name in names), mode="spatial", momentum=0.3)
    assert exact_checks == []  # touching is not overlapping: the cached path decides alone
    assert_close(views["running_mean"], expected[0], np.float32)
    assert_close(views["running_var"], expected[1], np.float32)


@pytest.mark.parametrize("written,other", [(3, 1), (4, 0), (4, 2), (3, 4), (4, 3)])
def test_a_cached_training_call_refuses_every_other_overlapping_pair(unsettled_gpu, written, other):
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    arrays = settled_training()
    # one buffer holding the other argument, then the written one sharing the other's last element
    size = arrays[other].size
    buffer = on_device(np.zeros(size + 2, np.float32))[0]
    arrays[other], arrays[written] = buffer[:size].reshape(arrays[other].shape), buffer[size - 1:]
    first, second = _culprits(names[written], names[other])
    with pytest.raises(ValueError, match=rf"^{first}: expected memory of its own .* overlaps {second}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


def _culprits(written: str, other: str) -> tuple[str, str]:
    """The names the overlap error gives: running_mean is checked first, so it is the one named
    when the two running statistics overlap."""
    return ("running_mean", "running_var") if {written, other} == {"running_mean", "running_var"} else (written, other)


def _reversed(array, axis=0):
    """A device view of ``array`` running backwards along ``axis`` (its lowest address is not its first element)."""
    device = on_device(np.flip(array, axis))[0]
    return np.flip(device, axis)


@pytest.mark.parametrize("reversed_name,written",
                         [("x", 3), ("gamma", 4), ("beta", 3), ("running_mean", 4), ("running_var", 3)])
def test_a_cached_training_call_sees_an_overlap_below_a_reversed_arrays_first_element(unsettled_gpu, reversed_name,
                                                                                      written):
    # a reversed view's first element is its highest address: the overlap sits below it
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    position = names.index(reversed_name)
    args = list(training_args())
    settle = on_device(*args)
    settle[position] = _reversed(args[position])
    cudnn_bn.forward_training(*settle, mode="spatial")  # this signature (with its strides) is now cached
    arrays = on_device(*args)
    arrays[position] = _reversed(args[position])
    lowest = arrays[position].base if arrays[position].base is not None else arrays[position]
    arrays[written] = lowest.reshape(-1)[:3]
    first, second = _culprits(names[written], reversed_name)
    with pytest.raises(ValueError, match=rf"^{first}: expected memory of its own .* overlaps {second}'s"):
        cudnn_bn.forward_training(*arrays, mode="spatial")


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_alone_is_refused_naming_both(unsettled_gpu, given):
    x, gamma, beta, mean, var = settled_training()
    statistic = {"running_mean": mean, "running_var": var}[given]
    with pytest.raises(ValueError, match=r"^running_mean, running_var: expected both or neither, got only one$"):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{given: statistic})


# ---- running statistics with CuPy's flags (no writeable) ----
class _CupyFlags:
    """Flags as CuPy's arrays have them: no ``writeable`` (device memory is always writable)."""

    def __init__(self, flags):
        self.c_contiguous, self.f_contiguous, self.owndata = flags.c_contiguous, flags.f_contiguous, flags.owndata


class _LikeCupy(FakeArray):
    """The simulator's array with CuPy's flags."""

    @property
    def flags(self):
        return _CupyFlags(np.ndarray.flags.__get__(self))

_LikeCupy.__module__ = FakeArray.__module__


def test_running_statistics_without_a_writeable_flag_are_updated_like_cupys(unsettled_gpu):
    args = training_args()
    expected = reference_running(*args, 0.1)
    arrays = on_device(*args)
    arrays[3], arrays[4] = arrays[3].view(_LikeCupy), arrays[4].view(_LikeCupy)
    assert not hasattr(arrays[3].flags, "writeable")
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=0.1)  # settles the signature
    expected = reference_running(*args[:3], *expected, 0.1)
    cudnn_bn.forward_training(*arrays, mode="spatial", momentum=0.1)  # the cached path
    assert_close(arrays[3], expected[0], np.float32)
    assert_close(arrays[4], expected[1], np.float32)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_with_cupys_flags_alone_is_refused_naming_both(unsettled_gpu, given):
    x, gamma, beta, mean, var = on_device(*training_args())
    statistic = {"running_mean": mean, "running_var": var}[given].view(_LikeCupy)
    with pytest.raises(ValueError, match=r"^running_mean, running_var: expected both or neither, got only one$"):
        cudnn_bn.forward_training(x, gamma, beta, mode="spatial", **{given: statistic})
