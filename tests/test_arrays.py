"""cudnn_bn/_core/arrays.py: array arguments of any ndarray subclass the kind check takes for numpy.

Datasets are memory-mapped: an ``np.memmap`` (or any other ndarray subclass that does not pose as
cupy) is a numpy array, whose memory the overlap checks read from ``__array_interface__``; its
``.data`` is a memoryview, not a device pointer. Every public call that checks overlaps is run
here on real memory-mapped files and on a user-defined subclass, against the same call on plain
arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import cudnn_bn
from conftest import make_case
from cudnn_bn import compat, fused
from cudnn_bn._core.arrays import array_kind, byte_range, check_no_overlap, uniform_kind


class Tagged(np.ndarray):
    """A user's ndarray subclass that carries a tag, as array containers of other libraries do."""

    def __array_finalize__(self, obj):
        self.tag = getattr(obj, "tag", "data")


class Files:
    """Memory-mapped copies of arrays, one file each under ``directory``."""

    def __init__(self, directory):
        self.directory, self.count = directory, 0

    def map(self, array, mode="r+"):
        self.count += 1
        path = self.directory / f"array{self.count}.bin"
        np.asarray(array).tofile(path)
        return np.memmap(path, dtype=array.dtype, mode=mode, shape=array.shape)

    def shared(self, *arrays):
        """Views of one file, laid end to end except that each overlaps the next by one element."""
        self.count += 1
        path = self.directory / f"array{self.count}.bin"
        sizes = [a.size for a in arrays]
        whole = np.memmap(path, dtype=arrays[0].dtype, mode="w+", shape=(sum(sizes),))
        views, offset = [], 0
        for array, size in zip(arrays, sizes):
            views.append(whole[offset : offset + size].reshape(array.shape))
            views[-1][...] = array
            offset += size - 1
        return views


@pytest.fixture
def files(tmp_path):
    return Files(tmp_path)


def _case():
    layout, x, dy, gamma, beta = make_case((4, 3, 2, 2), "spatial", 1, np.float32)
    running = (np.full(layout.param_shape, 0.25, np.float32), np.full(layout.param_shape, 2.0, np.float32))
    return x, dy, gamma, beta, running


# ---- the byte range of a numpy subclass is its host memory ----
def test_byte_range_of_a_memmap_or_a_subclass_is_that_of_its_memory(files):
    mapped = files.map(np.arange(24, dtype=np.float32).reshape(4, 6))
    tagged = np.arange(24, dtype=np.float64).reshape(4, 6).view(Tagged)
    for array in (mapped, mapped[:, ::-2], mapped.T, tagged, tagged[::-1]):
        assert byte_range(array) == byte_range(array.view(np.ndarray))
    start = mapped.__array_interface__["data"][0]
    assert byte_range(mapped) == (start, start + 96)
    # rows 1 to 3, columns 5, 3, 1: from row 1's column 1 to the end of row 3's column 5
    assert byte_range(mapped[1:, ::-2]) == (start + 1 * 24 + 1 * 4, start + 3 * 24 + 6 * 4)
    assert byte_range(mapped[:0]) is None
    assert array_kind(x=mapped, gamma=tagged) == "numpy"


def test_overlapping_memory_mapped_views_are_refused_and_separate_ones_accepted(files):
    first, second = files.shared(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"^running_mean: expected memory of its own .* overlaps running_var's"):
        check_no_overlap({"running_mean": first, "running_var": second}, {})
    check_no_overlap({"running_mean": first[:2], "running_var": second[1:]}, {})  # adjacent, not shared


# ---- the public calls on memory-mapped files, against plain arrays ----
@pytest.mark.parametrize("mapped", ["x", "running", "every"])
def test_training_on_memory_mapped_arrays_matches_plain_arrays(files, mapped):
    x, dy, gamma, beta, running = _case()
    plain_running = [a.copy() for a in running]
    y_plain, saved_plain = cudnn_bn.forward_training(x, gamma, beta, *plain_running, mode="spatial")

    args = [x, gamma, beta]
    if mapped in ("x", "every"):
        args[0] = files.map(x, mode="r")  # a dataset opened read-only: x is only read
    if mapped == "every":
        args[1:] = [files.map(gamma), files.map(beta)]
    mapped_running = [files.map(a) for a in running] if mapped != "x" else [a.copy() for a in running]
    y, saved = cudnn_bn.forward_training(*args, *mapped_running, mode="spatial")

    assert type(y) is np.ndarray and type(saved.mean) is np.ndarray and type(saved.inv_std) is np.ndarray
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(saved.mean, saved_plain.mean)
    np.testing.assert_array_equal(saved.inv_std, saved_plain.inv_std)
    for got, want in zip(mapped_running, plain_running):
        np.testing.assert_array_equal(got, want)  # updated in place, in the caller's arrays
    if mapped != "x":
        for got, want in zip(mapped_running, plain_running):
            got.flush()
            np.testing.assert_array_equal(np.fromfile(got.filename, dtype=np.float32), want)  # and in the file
    np.testing.assert_array_equal(args[0], x)  # x itself untouched

    grads_plain = cudnn_bn.backward(x, dy, gamma, saved_plain)
    grads = cudnn_bn.backward(args[0], files.map(dy, mode="r"), args[1], saved)
    for got, want in zip(grads, grads_plain):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        cudnn_bn.forward_inference(*args, *mapped_running, mode="spatial"),
        cudnn_bn.forward_inference(x, gamma, beta, *plain_running, mode="spatial"),
    )


def test_memory_mapped_running_statistics_that_share_memory_are_refused_before_any_write(files):
    x, _, gamma, beta, running = _case()
    mean, var = files.shared(*running)
    before = (np.array(mean), np.array(var))
    with pytest.raises(ValueError, match=r"^running_mean: expected memory of its own .* overlaps running_var's"):
        cudnn_bn.forward_training(files.map(x), gamma, beta, mean, var, mode="spatial")
    stats = files.shared(x, running[0])
    with pytest.raises(ValueError, match=r"^running_mean: expected memory of its own .* overlaps x's"):
        cudnn_bn.forward_training(stats[0], gamma, beta, stats[1], files.map(running[1]), mode="spatial")
    np.testing.assert_array_equal(mean, before[0])
    np.testing.assert_array_equal(var, before[1])


def test_a_read_only_memory_mapped_running_statistic_is_refused(files):
    x, _, gamma, beta, running = _case()
    with pytest.raises(
        ValueError, match=r"^running_var: expected a writable array \(it is updated in place\), got a read-only one$"
    ):
        cudnn_bn.forward_training(
            x, gamma, beta, files.map(running[0]), files.map(running[1], mode="r"), mode="spatial"
        )


def test_fused_training_with_a_memory_mapped_residual_matches_plain_arrays(files):
    x, dy, gamma, beta, running = _case()
    residual = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    plain_running = [a.copy() for a in running]
    y_plain, saved_plain = fused.forward_training(x, gamma, beta, *plain_running, residual=residual, mode="spatial")
    mapped_running = [files.map(a) for a in running]
    mapped_residual = files.map(residual, mode="r")
    y, saved = fused.forward_training(
        files.map(x, mode="r"), gamma, beta, *mapped_running, residual=mapped_residual, mode="spatial"
    )
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, y_plain)
    for got, want in zip(mapped_running, plain_running):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mapped_residual, residual)
    for got, want in zip(
        fused.backward(x, y, files.map(dy, mode="r"), gamma, saved), fused.backward(x, y_plain, dy, gamma, saved_plain)
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        fused.forward_inference(x, gamma, beta, *mapped_running, residual=mapped_residual, mode="spatial"),
        fused.forward_inference(x, gamma, beta, *plain_running, residual=residual, mode="spatial"),
    )
    shared_residual, shared_mean = files.shared(residual, running[0])
    with pytest.raises(ValueError, match=r"^running_mean: expected memory of its own .* overlaps residual's"):
        fused.forward_training(
            x, gamma, beta, shared_mean, files.map(running[1]), residual=shared_residual, mode="spatial"
        )


def test_compat_writes_memory_mapped_outputs_as_plain_ones(files):
    x, _, gamma, beta, running = _case()
    arguments = (2e-5, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL, False)
    plain_outputs = [np.zeros(3, np.float32), np.zeros(3, np.float32)]
    y_plain = compat.batch_normalization_forward_training(
        x, gamma, beta, *[a.copy() for a in running], *plain_outputs, *arguments
    )
    outputs = [files.map(np.zeros(3, np.float32)) for _ in range(2)]
    y = compat.batch_normalization_forward_training(
        x, gamma, beta, *[files.map(a) for a in running], *outputs, *arguments
    )
    np.testing.assert_array_equal(y, y_plain)
    for got, want in zip(outputs, plain_outputs):
        np.testing.assert_array_equal(got, want)
    mean, inv_std = files.shared(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"^mean: expected memory of its own .* overlaps inv_std's"):
        compat.batch_normalization_forward_training(
            x, gamma, beta, *[a.copy() for a in running], mean, inv_std, *arguments
        )
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(inv_std, 0)


def test_a_user_defined_subclass_computes_as_plain_arrays_and_keeps_its_arrays(files):
    x, dy, gamma, beta, running = _case()
    plain_running = [a.copy() for a in running]
    y_plain, saved_plain = cudnn_bn.forward_training(x, gamma, beta, *plain_running, mode="spatial")
    tagged = [a.copy().view(Tagged) for a in (x, gamma, beta, *running)]
    y, saved = cudnn_bn.forward_training(*tagged, mode="spatial")
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(saved.mean, saved_plain.mean)
    for got, want in zip(tagged[3:], plain_running):
        assert type(got) is Tagged and got.tag == "data"
        np.testing.assert_array_equal(got, want)
    for got, want in zip(tagged[:3], (x, gamma, beta)):
        np.testing.assert_array_equal(got, want)
    grads = cudnn_bn.backward(tagged[0], dy.view(Tagged), tagged[1], saved)
    for got, want in zip(grads, cudnn_bn.backward(x, dy, gamma, saved_plain)):
        np.testing.assert_array_equal(got, want)
    shared = running[0].copy().view(Tagged)
    with pytest.raises(ValueError, match=r"^running_mean: expected memory of its own .* overlaps running_var's"):
        cudnn_bn.forward_training(tagged[0], tagged[1], tagged[2], shared, shared, mode="spatial")


# ---- the kind of arrays of one known type, told without the full check ----
def test_uniform_kind_tells_the_kind_only_when_every_given_array_has_one_known_type():
    plain, other = np.ones(3), np.ones(3).view(Tagged)
    assert uniform_kind((plain, plain), (None, plain)) == "numpy"
    assert uniform_kind((plain,), (None, None)) == "numpy"  # absent optional arrays are skipped
    assert uniform_kind((plain, other)) is None  # mixed types: the full check decides
    assert uniform_kind((plain, plain), (other,)) is None
    assert uniform_kind((plain, plain), (plain, other)) is None
    assert uniform_kind((None, None)) is None  # a required None is never a kind
    assert uniform_kind(([1.0], [1.0])) is None  # a type the checks have not seen
