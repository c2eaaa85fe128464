"""Host synchronizations per training step on the simulated GPU: a stack of 10 batch-norm layers,
forward then backward, defaults and explicit overflow settings side by side.

The simulated GPU of tests/fake_cudnn.py counts every point where the host would wait for the
device on CUDA (a BLOCKING cudnnQueryRuntimeError, a device-to-host read, a synchronize), and
nothing else, so these are exact counts, not timings: what a step makes the host wait for,
whatever the GPU.

    python benchmarks/host_syncs.py [--json PATH] [--markdown PATH]

Each configuration runs 3 steps after building its layers; the count of every step is recorded
(they are equal: the first step, which settles every call signature, waits no more than the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):  # the package from this checkout, and the simulator
    if _path not in sys.path:
        sys.path.insert(0, _path)

LAYERS, STEPS = 10, 3
# name -> (x's shape in its own axis order, channel_axis, dtype, BatchNorm keywords, check_overflow per step)
CONFIGURATIONS = {
    "defaults, NCHW float32": ((8, 8, 4, 4), 1, np.float32, {}, False),
    "defaults, NHWC float16 (Ex path)": ((8, 4, 4, 8), -1, np.float16, {}, False),
    "defaults, NHWC float32": ((8, 4, 4, 8), -1, np.float32, {}, False),
    "defaults, NDHWC float16 (Ex path)": ((4, 2, 4, 4, 8), -1, np.float16, {}, False),
    "defaults, NCDHW float64": ((4, 8, 2, 4, 4), 1, np.float64, {}, False),
    "defaults, 2-D float32": ((16, 8), 1, np.float32, {}, False),
    "defaults, NHWC float16 + ReLU + residual (fused Ex)": (
        (8, 4, 4, 8), -1, np.float16, {"activation": "relu"}, False),
    "SPATIAL_PERSISTENT, NCHW float32, raise": ((8, 8, 4, 4), 1, np.float32,
                                                {"mode": "spatial_persistent", "on_overflow": "raise"}, False),
    "SPATIAL_PERSISTENT, NCHW float32, fallback": ((8, 8, 4, 4), 1, np.float32,
                                                   {"mode": "spatial_persistent", "on_overflow": "fallback"}, False),
    "SPATIAL_PERSISTENT, NCHW float32, deferred + check_overflow() per step": (
        (8, 8, 4, 4), 1, np.float32, {"mode": "spatial_persistent", "on_overflow": "deferred"}, True),
    "SPATIAL_PERSISTENT, NCHW float32, ignore": ((8, 8, 4, 4), 1, np.float32,
                                                 {"mode": "spatial_persistent", "on_overflow": "ignore"}, False),
    "SPATIAL_PERSISTENT, NHWC float16 (Ex path), raise": (
        (8, 4, 4, 8), -1, np.float16, {"mode": "spatial_persistent", "on_overflow": "raise"}, False),
}


def _step_counts(gpu, cupy, shape, axis, dtype, options: dict, check: bool) -> tuple[list, str]:
    """(host syncs, blocking queries) of each step, and the mode the layers ran."""
    import cudnn_bn

    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal(shape).astype(dtype))
    dy = cupy.asarray(rng.standard_normal(shape).astype(dtype))
    channels = shape[axis]
    layers = [cudnn_bn.BatchNorm(channels if len(shape) > 2 else shape[1:], channel_axis=axis, dtype=dtype, xp=cupy,
                                 **options) for _ in range(LAYERS)]
    residual = cupy.asarray(rng.standard_normal(shape).astype(dtype)) if options.get("activation") else None
    counts = []
    for _ in range(STEPS):
        syncs, queries = gpu.host_syncs, gpu.runtime_queries["BLOCKING"]
        out = x
        for layer in layers:
            out = layer(out, residual) if residual is not None else layer(out)
        grad = dy
        for layer in reversed(layers):
            grad = layer.backward(grad)
        if check:
            cudnn_bn.check_overflow()
        counts.append((gpu.host_syncs - syncs, gpu.runtime_queries["BLOCKING"] - queries))
    saved = layers[0]._kept.saved
    return counts, str(saved.mode)


def measure() -> dict:
    from cudnn_bn._cudnn import handles, launch, plans
    from fake_cudnn import simulated_gpu

    rows = []
    for name, (shape, axis, dtype, options, check) in CONFIGURATIONS.items():
        plans.PLANS.clear()
        launch.fallback_warnings_shown.clear()
        with simulated_gpu() as gpu:
            counts, mode = _step_counts(gpu, sys.modules["cupy"], shape, axis, dtype, options, check)
        handles.close_all()
        plans.PLANS.clear()
        rows.append({
            "configuration": name, "shape": list(shape), "mode_ran": mode,
            "syncs_per_step": [syncs for syncs, _ in counts],
            "blocking_queries_per_step": [queries for _, queries in counts],
        })
    return {"layers": LAYERS, "steps": STEPS, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        f"Host synchronizations per training step (forward then backward through {result['layers']} BatchNorm "
        f"layers), counted on the simulated GPU; {result['steps']} steps each.",
        "",
        "| configuration | x | mode that ran | host syncs per step | of which blocking queries | per layer |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        syncs, queries = sorted(set(row["syncs_per_step"])), sorted(set(row["blocking_queries_per_step"]))
        per_layer = syncs[-1] / result["layers"]
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"| {row['configuration']} | {shape} | {row['mode_ran']} | {', '.join(map(str, syncs))} | "
                     f"{', '.join(map(str, queries))} | {per_layer:g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result as JSON here")
    parser.add_argument("--markdown", help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    result = measure()
    table = to_markdown(result)
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
