"""The bench step of `.ci/gpu-validate`: the benchmark of `python -m cudnn_bn bench --require-cudnn
--json FILE` (every mode x operation x dtype x layout on cuDNN, against PyTorch in the same
process; the JSON is rewritten after every row, so a cut keeps the rows timed before it; the
Markdown table goes to stdout, which is the run's log), with a deadline: no row or section
starts after ``--seconds`` from this script's start, and the ones left are listed in the JSON
as not timed. A benchmark slower than planned on a fresh machine then still ends, and passes,
with the rows it timed, instead of being cut at its step's limit.

On the simulated GPU (CUDNN_BN_SIMULATED_GPU=1) the same runs against tests/fake_cudnn.py with
--quick and one small shape, since every simulated kernel is the float64 reference on the
host, and without PyTorch (its CUDA tensors need a GPU): it rehearses the step, and its times are
not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STARTED = time.monotonic()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)

if evidence.ROOT not in sys.path:
    sys.path.insert(0, evidence.ROOT)  # the repository is used from its root without an install step

SIMULATED_SHAPES = [(16, 8, 6, 6)]
SIMULATED_OVERFLOW_PROBE_SHAPE = (4, 8, 6, 6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="the benchmark's JSON, rewritten after every row")
    parser.add_argument("--seconds", type=float, help="start no row or section later than this after the start")
    args = parser.parse_args(argv)
    from cudnn_bn._tools import bench, cli

    deadline = None if args.seconds is None else STARTED + args.seconds
    if not evidence.simulated():
        if not cli._cudnn_required("bench"):  # what --require-cudnn does
            return 2
        return bench.run_bench(json_path=args.json, deadline=deadline)
    bench.GPU_SHAPES = SIMULATED_SHAPES
    bench.OVERFLOW_PROBE_SHAPE = SIMULATED_OVERFLOW_PROBE_SHAPE
    bench._torch_cuda = lambda: None
    with evidence.gpu_of_this_run():
        if not cli._cudnn_required("bench"):
            return 2
        status = bench.run_bench(json_path=args.json, quick=True, deadline=deadline)
    _mark_simulated(args.json)
    return status


def _mark_simulated(path: str) -> None:
    """Say in the JSON itself that it is no GPU's, so that it cannot be taken for one later."""
    try:
        with open(path) as handle:
            result = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return
    result["backend"] = f"SIMULATED GPU (tests/fake_cudnn.py; not a GPU's times): {result.get('backend', '?')}"
    result["simulated"] = True
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
