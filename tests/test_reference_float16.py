"""The reference's own float16 <-> float64 conversions agree with NumPy's casts bit for bit: on every
float16, every midpoint between two float16s, the float64 values next to them (including those
that round to a midpoint in float32, where rounding twice goes wrong), the edges of float16's
range, and random values over its whole range."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import make_case
from cudnn_bn import Mode, reference

ALL_FLOAT16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)


def _same_bits(actual, expected):
    """Equal float16 arrays, NaNs with NaNs (their payloads aside) and zeros with their signs."""
    both_nan = np.isnan(actual) & np.isnan(expected)
    same = actual.view(np.uint16) == expected.view(np.uint16)
    return bool(np.all(same | both_nan))


def _hard_float64_values() -> np.ndarray:
    finite = np.unique(ALL_FLOAT16[np.isfinite(ALL_FLOAT16)].astype(np.float64))
    midpoints = (finite[:-1] + finite[1:]) / 2
    edges = [65504.0, 65519.999, 65520.0, 65536.0, 1e300, np.inf, np.nan, 0.0, -0.0, 2.0**-14, 2.0**-24, 2.0**-25,
             3 * 2.0**-26, 1e-300]
    points = np.concatenate([finite, midpoints, edges, -np.asarray(edges)])
    near = [points, np.nextafter(points, np.inf), np.nextafter(points, -np.inf)]
    # within half a float32 ulp of a midpoint: float32 rounds them onto it
    for k in (1, 2**20, 2**28, 2**29 - 1, 2**29, 2**29 + 1):
        near += [points * (1 + k * 2.0**-53), points * (1 - k * 2.0**-54)]
    rng = np.random.default_rng(0)
    near.append(rng.choice([-1, 1], 1 << 16) * 10.0 ** rng.uniform(-9, 5, 1 << 16))
    return np.concatenate(near)


def _round(values, target):
    bits = tuple(np.empty(values.shape, np.uint32) for _ in range(2))
    reference._round_to_float16(values, target, bits)
    return target


def test_rounding_to_float16_is_numpys_cast():
    values = _hard_float64_values()
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
        actual = _round(values, np.empty(values.shape, np.float16))
    assert _same_bits(actual, expected)
    # the double-rounding cases were there, and taken care of
    with np.errstate(over="ignore", invalid="ignore"):
        twice = values.astype(np.float32).astype(np.float16)
    assert not _same_bits(twice, expected)


def test_rounding_to_float16_writes_into_a_strided_block():
    values = np.linspace(-3, 3, 60).reshape(3, 4, 5) * (1 + 2.0**-40)
    target = np.zeros((3, 8, 5), np.float16)
    _round(np.ascontiguousarray(values), target[:, ::2, :])
    assert _same_bits(target[:, ::2, :], values.astype(np.float16))
    assert not target[:, 1::2, :].any()


@pytest.mark.parametrize("shape", [(1 << 16,), (256, 256), (16, 64, 64)])
def test_widening_float16_is_exact_for_every_bit_pattern(shape):
    source = ALL_FLOAT16.reshape(shape)
    target = np.empty(shape)
    reference._widen_float16(source, target, np.empty(shape, np.uint32))
    expected = source.astype(np.float64)
    np.testing.assert_array_equal(target, expected)  # NaN where NaN
    assert np.array_equal(np.signbit(target), np.signbit(expected))


def test_widening_float16_without_inf_or_nan_takes_the_bit_path():
    source = ALL_FLOAT16[np.isfinite(ALL_FLOAT16)][::3][None, :]  # a strided view, every sign and exponent
    target = np.empty(source.shape)
    reference._widen_float16(source, target, np.empty(source.shape, np.uint32))
    assert np.array_equal(target, source.astype(np.float64))


def test_float16_results_with_blocks_and_outliers_are_the_float64_results_rounded():
    layout, x, dy, gamma, beta = make_case((16, 3, 40, 40), Mode.SPATIAL, 1, dtype=np.float16, seed=4, offset=2.0,
                                           scale=3.0)
    x[0, 0, :3, 0] = [60000.0, -2.0**-20, 0.0]  # an outlier, a subnormal and a zero
    y, saved = reference.forward_training(x, gamma, beta)
    dx, _, _ = reference.backward(x, dy, gamma, saved)
    y_infer = reference.forward_inference(x, gamma, beta, saved.mean, np.ones_like(saved.mean))
    wide = [a.astype(np.float64) for a in (x, dy, gamma, beta)]
    y64, saved64 = reference.forward_training(wide[0], wide[2], wide[3])
    rounded = dataclasses.replace(saved, mean=saved.mean.astype(np.float64), inv_std=saved.inv_std.astype(np.float64))
    dx64, _, _ = reference.backward(wide[0], wide[1], wide[2], rounded)
    infer64 = reference.forward_inference(wide[0], wide[2], wide[3], saved.mean.astype(np.float64), np.ones(3))
    # the data reach the exceptions: double-rounding cases in y and dx, dx below float16's normal range
    for result in (y64, dx64):
        assert np.any(result.astype(np.float32).astype(np.float16) != result.astype(np.float16))
    assert np.any((dx64 != 0) & (np.abs(dx64) < 2.0**-14))
    np.testing.assert_array_equal(y, y64.astype(np.float16))
    np.testing.assert_array_equal(dx, dx64.astype(np.float16))
    np.testing.assert_array_equal(y_infer, infer64.astype(np.float16))


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_widening_float16_with_one_kind_of_special_value_is_exact(special):
    # the bit path maps +inf to 65536 and -inf to -65536 (and NaN near them): a block holding one
    # of them alone, among ordinary values of both signs, must still take NumPy's cast
    source = np.array([1.5, -2.25, 65504.0, -65504.0, special, 0.0], np.float16)
    target = np.empty(source.shape)
    reference._widen_float16(source, target, np.empty(source.shape, np.uint32))
    np.testing.assert_array_equal(target, source.astype(np.float64))  # NaN where NaN
