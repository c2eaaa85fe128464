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
    assert "cupy" not in sys.modules or sys.modules["cupy"].__name__ == "cupy" and not hasattr(sys.modules["cupy"], "HostArray")
    markdown = host_overhead.to_markdown(result)
    assert "| NCHW float32, SPATIAL | forward_training |" in markdown
