"""`python -m cudnn_bn compare`: every mode and operation on a standard tensor, on the backend
that is present, against a float64 computation of the reference."""

from __future__ import annotations

import numpy as np

from .. import _api
from .._core.layout import make_layout, physical_shape
from .._core.modes import Mode
from .._core.tolerances import to_numpy
from .._core.validate import param_dtype_for
from .._cudnn.availability import cudnn_status
from .timing import describe_failure, median_gpu_seconds, median_host_seconds

__all__ = ["run_compare", "STANDARD_SHAPE"]

STANDARD_SHAPE = (16, 32, 12, 12)  # N, C, H, W (channels-last runs use N, H, W, C)
OPERATIONS = ("forward_training", "forward_inference", "backward")


def _inputs(mode: Mode, channel_axis: int, dtype, seed: int = 0):
    shape = physical_shape(STANDARD_SHAPE, channel_axis)
    layout = make_layout(shape, channel_axis, mode)
    rng = np.random.default_rng(seed)
    param_dtype = param_dtype_for(dtype)
    arrays = {
        "x": (1.5 + 2.0 * rng.standard_normal(shape)).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "gamma": (0.5 + rng.random(layout.param_shape)).astype(param_dtype),
        "beta": rng.standard_normal(layout.param_shape).astype(param_dtype),
        "mean": rng.standard_normal(layout.param_shape).astype(param_dtype),
        "var": (0.5 + rng.random(layout.param_shape)).astype(param_dtype),
    }
    return arrays


def _runners(arrays, mode, channel_axis):
    """Operation name -> callable over an array dict (numpy or cupy), same code for both backends."""
    common = dict(mode=mode, channel_axis=channel_axis)

    def train(a):
        return _api.forward_training(a["x"], a["gamma"], a["beta"], **common)

    def infer(a):
        return _api.forward_inference(a["x"], a["gamma"], a["beta"], a["mean"], a["var"], **common)

    def grad(a, saved):
        return _api.backward(a["x"], a["dy"], a["gamma"], saved)

    return train, infer, grad


def _max_error(results, expected) -> float:
    return max(float(np.max(np.abs(to_numpy(r) - to_numpy(e)))) for r, e in zip(results, expected))


def run_compare(dtype=np.float32, force_reference: bool = False) -> tuple[str, list[dict]]:
    """Run the comparison; returns (backend description, rows).

    A row whose operation raised carries ``error`` (the exception's type and first line) instead
    of ``max_abs_error`` and ``median_ms``; the other rows still run.
    """
    usable, reason = (False, "reference forced") if force_reference else cudnn_status()
    backend = "cuDNN on CuPy arrays" if usable else f"NumPy reference (cuDNN path unavailable: {reason})"
    rows = []
    for channel_axis in (1, -1):
        for mode in Mode:
            layout_name = "NCHW" if channel_axis == 1 else "NHWC"
            for operation, measure in _measurements(mode, channel_axis, dtype, usable).items():
                row = dict(layout=layout_name, mode=mode.name, ran=mode.name, operation=operation)
                try:
                    row.update(measure())
                except Exception as error:
                    row["error"] = describe_failure(error)
                rows.append(row)
    return backend, rows


def _measurements(mode, channel_axis, dtype, on_gpu: bool) -> dict:
    """operation -> callable returning {max_abs_error, median_ms, ran} for that operation on the
    standard tensor (each one sets up what it needs, so that one failure stays in its row)."""

    def setup():
        host = _inputs(mode, channel_axis, dtype)
        wide = {name: array.astype(np.float64) for name, array in host.items()}
        if on_gpu:
            import cupy

            arrays, timer = {name: cupy.asarray(array) for name, array in host.items()}, median_gpu_seconds
        else:
            arrays, timer = host, median_host_seconds
        return arrays, wide, timer, _runners(arrays, mode, channel_axis), _runners(wide, mode, channel_axis)

    def forward_training():
        arrays, wide, timer, (train, _, _), (train64, _, _) = setup()
        y, saved = train(arrays)
        y64, saved64 = train64(wide)
        error = _max_error([y, saved.mean, saved.inv_std], [y64, saved64.mean, saved64.inv_std])
        return dict(max_abs_error=error, median_ms=timer(lambda: train(arrays)) * 1e3, ran=saved.mode.name)

    def forward_inference():
        arrays, wide, timer, (_, infer, _), (_, infer64, _) = setup()
        error = _max_error([infer(arrays)], [infer64(wide)])
        return dict(max_abs_error=error, median_ms=timer(lambda: infer(arrays)) * 1e3)

    def backward():
        arrays, wide, timer, (train, _, grad), (train64, _, grad64) = setup()
        saved, saved64 = train(arrays)[1], train64(wide)[1]
        error = _max_error(grad(arrays, saved), grad64(wide, saved64))
        return dict(max_abs_error=error, median_ms=timer(lambda: grad(arrays, saved)) * 1e3, ran=saved.mode.name)

    return {"forward_training": forward_training, "forward_inference": forward_inference, "backward": backward}


def format_table(backend: str, rows: list[dict], dtype) -> str:
    header = (
        f"backend: {backend}\n"
        f"tensor: {STANDARD_SHAPE} (N, C, H, W) {np.dtype(dtype).name}, errors against the float64 reference\n"
    )
    lines = ["| layout | mode | operation | max abs error | median ms |", "|---|---|---|---|---|"]
    for row in rows:
        mode = row["mode"] if row["ran"] == row["mode"] else f"{row['mode']} (ran {row['ran']})"
        if "error" in row:
            lines.append(f"| {row['layout']} | {mode} | {row['operation']} | failed: {row['error']} | - |")
        else:
            lines.append(
                f"| {row['layout']} | {mode} | {row['operation']} | {row['max_abs_error']:.3e} "
                f"| {row['median_ms']:.3f} |"
            )
    return header + "\n".join(lines)
