"""The benchmark command on the CPU: it measures, labels the backend, and writes JSON and markdown."""

from __future__ import annotations

import json

import pytest

from cudnn_bn._tools import bench as _bench
from cudnn_bn._cudnn.availability import cudnn_status


def test_cpu_bench_writes_labelled_json_and_markdown(tmp_path, capsys):
    if cudnn_status()[0]:
        pytest.skip("a GPU is present: the GPU benchmark is recorded under docs/benchmarks instead")
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    assert _bench.run_bench(json_path=str(json_path), markdown_path=str(markdown_path), quick=True) == 0
    result = json.loads(json_path.read_text())
    assert result["backend"].startswith("CPU: NumPy reference")
    assert {"date", "device", "cudnn", "cupy", "torch", "cuda_driver"} <= set(result["environment"])
    shape = _bench.CPU_SHAPES[0]
    expected_rows = 2 * 2 * 3 * 3  # dtypes x layouts x modes x operations
    assert len(result["rows"]) == expected_rows
    for row in result["rows"]:
        assert row["shape"] == list(shape) and row["median_ms"] > 0 and row["gbps"] > 0
        itemsize = 2 if row["dtype"] == "float16" else 4
        assert row["bytes"] == _bench.TRAFFIC[row["operation"]] * itemsize * 8 * 16 * 28 * 28
    markdown = markdown_path.read_text()
    assert markdown.count("\n| 8x16x28x28 |") == expected_rows and "CPU: NumPy reference" in markdown
    assert markdown in capsys.readouterr().out


def test_bytes_follow_the_traffic_model():
    row = _bench._row((2, 3), "NCHW", "float32", "SPATIAL", "backward", 1e-3, 1000, 100.0)
    assert row["bytes"] == 3000 and abs(row["gbps"] - 3e-3) < 1e-12 and abs(row["fraction_of_copy"] - 3e-5) < 1e-12
