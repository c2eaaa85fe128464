"""The memo of cudnn_bn/_core/policy.py: a remembered choice never stands in for a check that the
same arguments with another type, an unhashable argument or an empty dimension must fail
(docs/testing.md)."""

from __future__ import annotations

import pytest

from cudnn_bn._core import policy
from cudnn_bn._core.modes import Mode, OnOverflow

SHAPE = (2, 3, 4, 5)


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(policy, "_CHOSEN", {})


def test_a_bool_mode_is_refused_after_the_equal_mode_was_remembered():
    assert policy.choose_mode(Mode.SPATIAL, SHAPE, 1, policy.TRAINING) == (Mode.SPATIAL, OnOverflow.RAISE)
    with pytest.raises(ValueError, match="^mode: "):
        policy.choose_mode(True, SHAPE, 1, policy.TRAINING)


def test_a_bool_channel_axis_is_refused_after_the_equal_axis_was_remembered():
    assert policy.choose_mode("auto", SHAPE, 1, policy.TRAINING) == (Mode.SPATIAL, OnOverflow.IGNORE)
    with pytest.raises(TypeError, match="^channel_axis: "):
        policy.choose_mode("auto", SHAPE, True, policy.TRAINING)


def test_an_unhashable_mode_is_refused():
    with pytest.raises(ValueError, match="^mode: "):
        policy.choose_mode(["spatial"], SHAPE, 1, policy.TRAINING)


def test_an_empty_dimension_is_refused_after_its_rank_was_remembered():
    policy.choose_mode("auto", SHAPE, 1, policy.TRAINING)
    with pytest.raises(ValueError, match="^x: expected every dimension to be at least 1"):
        policy.choose_mode("auto", (0, 3, 4, 5), 1, policy.TRAINING)
    with pytest.raises(ValueError, match="^x: expected every dimension to be at least 1"):
        policy.choose_mode("auto", (0, 3, 1, 5), 1, policy.TRAINING)


@pytest.mark.parametrize("recorded", [OnOverflow.FALLBACK, OnOverflow.IGNORE])
def test_backward_keeps_the_overflow_policy_its_forward_recorded_unless_told_otherwise(recorded):
    import numpy as np

    from cudnn_bn import SavedStats

    x = np.ones((2, 4, 3, 3), np.float32)
    saved = SavedStats(np.zeros(4, np.float32), np.ones(4, np.float32), Mode.SPATIAL_PERSISTENT, 1e-5, 1, on_overflow=recorded)
    assert policy.backward_settings(x, saved, None, None, None, None) == (Mode.SPATIAL_PERSISTENT, recorded, 1e-5, 1)
    # an explicit policy wins; a persistent backward asked for without saved statistics raises by default
    assert policy.backward_settings(x, saved, None, None, None, "raise")[1] is OnOverflow.RAISE
    assert policy.backward_settings(x, None, "spatial_persistent", 1e-5, None, None)[:2] == (Mode.SPATIAL_PERSISTENT, OnOverflow.RAISE)
