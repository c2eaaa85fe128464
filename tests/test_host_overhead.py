"""benchmarks/host_overhead.py runs end to end: no-op C kernels bound through the prototype table,
real descriptors, the stand-in CuPy; and it leaves the process as it found it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the no-op kernels")
def test_the_host_overhead_benchmark_measures_every_call_and_restores_the_library(cudnn_library):
    import host_overhead

    before = {name: getattr(cudnn_library, name) for name in host_overhead._NOOP_NAMES}
    result = host_overhead.measure(calls=70)
    rows = {(row["case"], row["operation"]): row for row in result["rows"]}
    for case in ("NCHW float32, SPATIAL", "NHWC float16, SPATIAL_PERSISTENT (Ex)"):
        for operation in ("forward_training", "backward", "forward_inference", "forward_training + backward"):
            row = rows[(case, operation)]
            assert 0 < row["min_us"] <= row["median_us"] <= row["max_us"]
    assert {name: getattr(cudnn_library, name) for name in host_overhead._NOOP_NAMES} == before
    assert ("cupy" not in sys.modules
            or sys.modules["cupy"].__name__ == "cupy" and not hasattr(sys.modules["cupy"], "HostArray"))
    markdown = host_overhead.to_markdown(result)
    assert "| NCHW float32, SPATIAL | forward_training |" in markdown


def test_the_numpy_pass_benchmark_adds_its_passes_into_the_floor(capsys):
    import numpy_passes

    costs = numpy_passes.pass_costs((2, 8, 4, 4))
    assert set(costs) == {"widen float32 to float64", "subtract (float64)", "multiply (float64)", "add (float64)",
                          "narrow float64 to float32", "per-channel sum (float64)"}
    assert all(value > 0 for value in costs.values())
    floor = numpy_passes.exact_forward_floor(dict.fromkeys(costs, 1.0))
    assert floor == {"statistics": 5.0, "output": 5.0, "total": 10.0}  # one widened copy for both statistics
    half = numpy_passes.half_costs((2, 8, 4, 4))
    assert len(half) == 4 and all(value > 0 for value in half.values())
    assert numpy_passes.main(["--shape", "2", "8", "4", "4"]) == 0
    printed = capsys.readouterr().out
    assert "least exact training forward" in printed and "float16 in and out alone" in printed
