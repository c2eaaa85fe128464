"""Shared test helpers: inputs for any mode x layout x dtype, and the GPU marker's skip."""

from __future__ import annotations

import numpy as np
import pytest

from cudnn_bn._core.layout import make_layout
from cudnn_bn._core.modes import Mode
from cudnn_bn._core.validate import param_dtype_for

MODES = list(Mode)
LAYOUTS = [(2, 1), (3, 1), (3, -1), (4, 1), (4, -1), (5, 1), (5, -1)]  # (ndim, channel_axis)
DTYPES = [np.float16, np.float32, np.float64]


def shape_for(ndim: int, channel_axis: int, batch: int = 3, channels: int = 2, spatial=(3, 2, 2)) -> tuple[int, ...]:
    """A small input shape with channels at channel_axis."""
    rest = tuple(spatial[: ndim - 2])
    return (batch, channels) + rest if channel_axis == 1 or ndim == 2 else (batch,) + rest + (channels,)


def make_case(shape, mode, channel_axis=1, dtype=np.float64, seed=0, xp=np, offset=0.0, scale=1.0):
    """x, dy, gamma, beta (and the layout) for one call; parameters in the parameter dtype."""
    layout = make_layout(shape, channel_axis, Mode(mode) if not isinstance(mode, str) else Mode[mode.upper()])
    rng = np.random.default_rng(seed)
    param_dtype = param_dtype_for(dtype)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (0.5 + rng.random(layout.param_shape)).astype(param_dtype)
    beta = rng.standard_normal(layout.param_shape).astype(param_dtype)
    return layout, xp.asarray(x), xp.asarray(dy), xp.asarray(gamma), xp.asarray(beta)


def _gpu_available() -> tuple[bool, str]:
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no cupy, no driver, or no device: all mean "no GPU here"
        return False, f"no usable CUDA GPU ({type(error).__name__}: {error})"
    if count < 1:
        return False, "no CUDA device found"
    try:
        from cudnn_bn._cudnn import raw as _raw

        _raw.library()
    except Exception as error:
        return False, f"libcudnn not loadable ({error})"
    return True, ""


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    available, reason = _gpu_available()
    if available:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cudnn_library():
    """The real libcudnn from the nvidia-cudnn wheel. CI installs it, so there a missing library
    fails the run instead of skipping the binding tests."""
    import os

    from cudnn_bn._cudnn import raw as _raw

    try:
        return _raw.library()
    except Exception as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test against the real libcudnn: {error}")
        pytest.skip(f"libcudnn not installed ({type(error).__name__}); pip install -e '.[test]'")


@pytest.fixture(scope="session")
def cudnn_headers(cudnn_library):
    """Text of cudnn_graph.h and cudnn_ops.h as installed beside the library."""
    import os

    from cuda import pathfinder

    from header_check import HEADERS

    directory = pathfinder.find_nvidia_header_directory("cudnn")
    if directory is None:
        pytest.fail("cuda.pathfinder found no cuDNN headers although libcudnn loaded")
    return [open(os.path.join(directory, name)).read() for name in HEADERS]
