"""The "auto" mode policy and the overflow defaults (one place: cudnn_bn._core.policy), and its memo of
choices: a remembered choice never stands in for a check that the same arguments with another type, an
unhashable argument or an empty dimension must fail."""

from __future__ import annotations

import numpy as np
import pytest

import cudnn_bn
from conftest import FLOAT64_ROUNDING, make_case
from cudnn_bn import Mode, OnOverflow, SavedStats
from cudnn_bn._core import policy
from cudnn_bn._core.policy import BACKWARD, INFERENCE, TRAINING, choose_mode


@pytest.mark.parametrize(
    "shape,axis,operation,expected",
    [
        ((8, 4), 1, TRAINING, Mode.PER_ACTIVATION),
        ((8, 4), -1, TRAINING, Mode.PER_ACTIVATION),
        ((8, 4, 5), 1, TRAINING, Mode.SPATIAL),
        ((8, 4, 5, 5), 1, TRAINING, Mode.SPATIAL),
        ((8, 5, 5, 4), -1, TRAINING, Mode.SPATIAL_PERSISTENT),
        ((8, 5, 5, 5, 4), -1, TRAINING, Mode.SPATIAL_PERSISTENT),
        ((8, 5, 5, 4), -1, INFERENCE, Mode.SPATIAL),
        ((8, 5, 5, 4), -1, BACKWARD, Mode.SPATIAL),
        ((8, 4, 5, 5), 1, INFERENCE, Mode.SPATIAL),
    ],
)
def test_auto_policy(shape, axis, operation, expected):
    # whatever auto chooses reads no overflow flag: where it chooses persistent (channels-last),
    # cuDNN documents no overflow (docs/modes.md)
    mode, on_overflow = choose_mode("auto", shape, axis, operation)
    assert mode is expected and on_overflow is OnOverflow.IGNORE


def test_persistent_by_name_raises_on_overflow_by_default():
    assert choose_mode("spatial_persistent", (8, 4, 5, 5), 1, TRAINING) == (Mode.SPATIAL_PERSISTENT, OnOverflow.RAISE)
    assert choose_mode(Mode.SPATIAL, (8, 4, 5, 5), 1, TRAINING, "ignore") == (Mode.SPATIAL, OnOverflow.IGNORE)


def test_auto_records_the_mode_that_ran_and_backward_follows_it():
    _, x, dy, gamma, beta = make_case((6, 3, 3, 4), Mode.SPATIAL, channel_axis=-1)
    y, saved = cudnn_bn.forward_training(x, gamma, beta, channel_axis=-1)
    assert saved.mode is Mode.SPATIAL_PERSISTENT and saved.on_overflow is OnOverflow.IGNORE
    dx, dgamma, dbeta = cudnn_bn.backward(x, dy, gamma, saved)
    expected = cudnn_bn.reference.backward(x, dy, gamma, mode="spatial", eps=1e-5, channel_axis=-1)
    for actual, wanted in zip((dx, dgamma, dbeta), expected):
        np.testing.assert_allclose(actual, wanted, rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)


def test_backward_auto_without_saved_never_picks_persistent():
    _, x, dy, gamma, _ = make_case((6, 3, 3, 4), Mode.SPATIAL, channel_axis=-1)
    dx, _, _ = cudnn_bn.backward(x, dy, gamma, mode="auto", eps=1e-5, channel_axis=-1)
    assert dx.shape == x.shape


# ---- the memo of choices ----
SHAPE = (2, 3, 4, 5)


@pytest.fixture
def fresh_memo(monkeypatch):
    monkeypatch.setattr(policy, "_CHOSEN", {})


@pytest.mark.usefixtures("fresh_memo")
def test_a_bool_mode_is_refused_after_the_equal_mode_was_remembered():
    assert choose_mode(Mode.SPATIAL, SHAPE, 1, TRAINING) == (Mode.SPATIAL, OnOverflow.RAISE)
    with pytest.raises(ValueError, match="^mode: "):
        choose_mode(True, SHAPE, 1, TRAINING)


@pytest.mark.usefixtures("fresh_memo")
def test_a_bool_channel_axis_is_refused_after_the_equal_axis_was_remembered():
    assert choose_mode("auto", SHAPE, 1, TRAINING) == (Mode.SPATIAL, OnOverflow.IGNORE)
    with pytest.raises(TypeError, match="^channel_axis: "):
        choose_mode("auto", SHAPE, True, TRAINING)


@pytest.mark.usefixtures("fresh_memo")
def test_an_unhashable_mode_is_refused():
    with pytest.raises(ValueError, match="^mode: "):
        choose_mode(["spatial"], SHAPE, 1, TRAINING)


@pytest.mark.usefixtures("fresh_memo")
def test_an_empty_dimension_is_refused_after_its_rank_was_remembered():
    choose_mode("auto", SHAPE, 1, TRAINING)
    with pytest.raises(ValueError, match="^x: expected every dimension to be at least 1"):
        choose_mode("auto", (0, 3, 4, 5), 1, TRAINING)
    with pytest.raises(ValueError, match="^x: expected every dimension to be at least 1"):
        choose_mode("auto", (0, 3, 1, 5), 1, TRAINING)


@pytest.mark.usefixtures("fresh_memo")
@pytest.mark.parametrize("recorded", [OnOverflow.FALLBACK, OnOverflow.IGNORE])
def test_backward_keeps_the_overflow_policy_its_forward_recorded_unless_told_otherwise(recorded):
    x = np.ones((2, 4, 3, 3), np.float32)
    saved = SavedStats(np.zeros(4, np.float32), np.ones(4, np.float32), Mode.SPATIAL_PERSISTENT, 1e-5, 1,
                       on_overflow=recorded)
    assert policy.backward_settings(x, saved, None, None, None, None) == (Mode.SPATIAL_PERSISTENT, recorded, 1e-5, 1)
    # an explicit policy wins; a persistent backward asked for without saved statistics raises by default
    assert policy.backward_settings(x, saved, None, None, None, "raise")[1] is OnOverflow.RAISE
    settings = policy.backward_settings(x, None, "spatial_persistent", 1e-5, None, None)
    assert settings[:2] == (Mode.SPATIAL_PERSISTENT, OnOverflow.RAISE)
