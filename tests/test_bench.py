"""The benchmark command without a GPU: what it measures on the CPU, how it labels it, and that a
failing row or a crash leaves a record (the GPU branch runs on the simulated GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cudnn_bn._cudnn.availability import cudnn_status
from cudnn_bn._tools import bench as _bench
from cudnn_bn._tools import timing as _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_QUICK_ROWS = 2 * 2 * 3 * 3  # dtypes x layouts x modes x operations of CPU_QUICK_SHAPES[0]


@pytest.fixture
def cpu_only():
    if cudnn_status()[0]:
        pytest.skip("a GPU is present: the GPU benchmark runs instead of the CPU one")


@pytest.fixture
def small_cpu_bench(monkeypatch, cpu_only):
    """The CPU benchmark on a small shape, with a small copy buffer, so that a run takes a second."""
    monkeypatch.setattr(_bench, "CPU_QUICK_SHAPES", [(16, 8, 6, 6)])
    monkeypatch.setattr(_bench, "_last_level_cache_bytes", lambda: 1 << 20)


def test_cpu_bench_writes_labelled_json_and_markdown(tmp_path, capsys, small_cpu_bench):
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    assert _bench.run_bench(json_path=str(json_path), markdown_path=str(markdown_path), quick=True,
                            with_torch=False) == 0
    result = json.loads(json_path.read_text())
    assert result["backend"] == "CPU: NumPy reference (no PyTorch comparison)"
    assert {"date", "device", "cpu", "cpus_available", "cudnn", "cupy", "torch",
            "cuda_driver"} <= set(result["environment"])
    assert result["environment"]["cpus_available"] >= 1 and result["threads"]["reference"] == 1
    # the copy runs on a buffer past the last-level cache, and no GPU traffic model is applied
    assert result["copy"]["copy_buffer_bytes"] >= max(4 * (1 << 20), 64 << 20) and result["copy_gbps"] > 0
    assert len(result["rows"]) == _QUICK_ROWS and result["failed"] == []
    for row in result["rows"]:
        assert row["shape"] == [16, 8, 6, 6] and row["repeats"] == 3
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        # an x this small is one block (two x-sized scratch arrays) and the interpreter's own
        # allocations weigh too; test_reference_memory checks the bound on realistic sizes
        assert 0 < row["peak_float64_temporaries_x"] < 5
        assert not {"gbps", "fraction_of_copy", "bytes", "torch_ms"} & set(row)
    markdown = markdown_path.read_text()
    assert markdown.count("\n| 16x8x6x6 |") == _QUICK_ROWS and "CPU: NumPy reference" in markdown
    assert "no traffic model" in markdown and "GB/s |" not in markdown
    assert markdown in capsys.readouterr().out


def test_cpu_rows_compare_with_a_peer_and_record_its_failures(small_cpu_bench, monkeypatch):
    """torch's place, taken by stand-ins: one that runs, one that fails on float16."""
    calls = []

    def peer_operations(torch, arrays, mode, channel_axis):
        def run():
            calls.append(arrays["x"].dtype)
            if arrays["x"].dtype == np.float16:
                raise TypeError("no float16 here\nsecond line")

        return {operation: run for operation in _bench.OPERATIONS}

    stand_in = type("torch", (), {"__version__": "0.0", "get_num_threads": staticmethod(lambda: 1)})
    monkeypatch.setattr(_bench, "_torch_cpu", lambda: stand_in)
    monkeypatch.setattr(_bench, "_torch_operations", peer_operations)
    result = _bench._cpu_bench(quick=True, with_torch=True)
    assert result["backend"] == "CPU: NumPy reference (PyTorch 0.0 on the CPU)" and result["timing"]["interleaved"]
    for row in result["rows"]:
        if row["dtype"] == "float16":
            assert row["torch_error"] == "TypeError: no float16 here" and "torch_ms" not in row
        else:
            assert (len(row["samples_ms"]["torch"]["cpu"]) == len(row["samples_ms"]["reference"]["wall"])
                    == row["repeats"])
            assert row["time_vs_torch"] == pytest.approx(row["median_ms"] / row["torch_ms"])
    assert np.dtype(np.float32) in calls
    result["environment"] = _bench._environment(False)
    assert "PyTorch failed on: 16x8x6x6 NCHW float16" in _bench.to_markdown(result)


def test_rows_accumulate_samples_over_rounds(small_cpu_bench, monkeypatch):
    monkeypatch.setattr(_bench, "CPU_QUICK_ROUNDS", 3)
    result = _bench._cpu_bench(quick=True, with_torch=False)
    assert len(result["rows"]) == _QUICK_ROWS
    assert all(row["repeats"] == 9 and len(row["samples_ms"]["reference"]["cpu"]) == 9 for row in result["rows"])


def test_json_is_rewritten_after_every_row(tmp_path, small_cpu_bench, monkeypatch):
    json_path = tmp_path / "bench.json"
    seen = []
    save = _bench._Recorder.save

    def save_and_look(self):
        save(self)
        seen.append(len(json.loads(json_path.read_text())["rows"]))
        assert not os.path.exists(f"{json_path}.tmp")  # written beside, then renamed over

    monkeypatch.setattr(_bench._Recorder, "save", save_and_look)
    _bench.run_bench(json_path=str(json_path), quick=True, with_torch=False)
    assert seen[0] == 0 and seen[-1] == _QUICK_ROWS
    assert set(range(_QUICK_ROWS + 1)) <= set(seen)  # each row reached the file on its own


def test_a_crash_leaves_the_rows_measured_before_it(tmp_path, small_cpu_bench, monkeypatch):
    json_path = tmp_path / "bench.json"
    measure = _bench.peak_float64_temporaries
    count = []

    def crash_on_the_fifth(run, x):
        count.append(1)
        if len(count) == 5:
            raise SystemExit("the process dies here")
        return measure(run, x)

    monkeypatch.setattr(_bench, "peak_float64_temporaries", crash_on_the_fifth)
    with pytest.raises(SystemExit):
        _bench.run_bench(json_path=str(json_path), quick=True, with_torch=False)
    result = json.loads(json_path.read_text())
    assert len(result["rows"]) == 4 and result["environment"]["cpu"]


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, capsys, small_cpu_bench, monkeypatch):
    forward_inference = _bench._api.forward_inference

    def fails_on_channels_last(x, *args, channel_axis=1, **kwargs):
        if channel_axis == -1:
            raise RuntimeError("simulated failure\nwith more detail")
        return forward_inference(x, *args, channel_axis=channel_axis, **kwargs)

    monkeypatch.setattr(_bench._api, "forward_inference", fails_on_channels_last)
    json_path = tmp_path / "bench.json"
    assert _bench.run_bench(json_path=str(json_path), quick=True, with_torch=False) == 1
    result = json.loads(json_path.read_text())
    failed = result["failed"]
    assert len(failed) == 2 * 3  # dtypes x modes, NHWC inference only
    assert {f["layout"] for f in failed} == {"NHWC"} and {f["operation"] for f in failed} == {"forward_inference"}
    assert {f["error"] for f in failed} == {"RuntimeError: simulated failure"}
    assert len(result["rows"]) == _QUICK_ROWS - len(failed)
    captured = capsys.readouterr()
    assert "Failed (the run went on):" in captured.out
    assert "1 row(s)" not in captured.err and "6 row(s) failed" in captured.err


def test_spatial_and_persistent_spread_is_reported():
    rows = [
        {"shape": [2, 3], "layout": "NCHW", "dtype": "float32", "mode": "SPATIAL", "operation": "backward",
         "median_ms": 2.0},
        {"shape": [2, 3], "layout": "NCHW", "dtype": "float32", "mode": "SPATIAL_PERSISTENT", "operation": "backward",
         "median_ms": 2.5},
        {"shape": [2, 3], "layout": "NCHW", "dtype": "float32", "mode": "SPATIAL_PERSISTENT",
         "operation": "forward_training", "median_ms": 9.0},
    ]
    assert _bench._same_code_spread(rows) == pytest.approx(0.25)
    assert _bench._same_code_spread(rows[:1]) is None


# tracemalloc also counts NumPy's array headers and Python's objects: a few hundred bytes, under 0.05
# of the 32 KiB float64 array these counts are in units of
ALLOCATION_SLACK = 0.05


def test_peak_temporaries_count_what_a_call_allocates_beyond_its_result():
    x = np.ones((64, 64), np.float32)
    one_copy = _bench.peak_float64_temporaries(lambda: x.astype(np.float64) * 2.0, x)
    two_copies = _bench.peak_float64_temporaries(lambda: float((x.astype(np.float64) * 2.0).sum()), x)
    assert one_copy == pytest.approx(1.0, abs=ALLOCATION_SLACK)
    assert two_copies == pytest.approx(2.0, abs=ALLOCATION_SLACK)


def test_host_samples_interleave_and_respect_their_bounds():
    order = []
    samples = _timing.host_samples({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=2,
                                   min_repeats=4, min_seconds=0.0)
    assert order == ["a", "b"] * 6
    assert {name: {clock: len(values) for clock, values in clocks.items()} for name, clocks in samples.items()} == {
        "a": {"wall": 4, "cpu": 4}, "b": {"wall": 4, "cpu": 4}}
    capped = _timing.host_samples({"a": lambda: None}, warmup=0, min_repeats=1, min_seconds=60.0, max_repeats=7)
    assert len(capped["a"]["wall"]) == 7


def test_cpu_time_leaves_out_what_the_thread_spends_waiting():
    import time

    samples = _timing.host_samples({"sleep": lambda: time.sleep(0.02)}, warmup=0, min_repeats=2,
                                   min_seconds=0.0)["sleep"]
    assert min(samples["wall"]) >= 0.02 and max(samples["cpu"]) < 0.01
    spread = _timing.spread_ms([0.003, 0.001, 0.002])
    assert spread == pytest.approx({"min_ms": 1.0, "median_ms": 2.0, "max_ms": 3.0})


def test_gpu_rows_follow_the_traffic_model():
    row = _bench._gpu_row((2, 3), "NCHW", "float32", "SPATIAL", "backward", 1e-3, 1000, 100.0)
    assert row["bytes"] == 3000 and abs(row["gbps"] - 3e-3) < 1e-12 and abs(row["fraction_of_copy"] - 3e-5) < 1e-12


def test_bench_without_torch_never_imports_it(tmp_path, cpu_only):
    """Importing torch costs seconds and memory: `--no-torch` must not, even to print a version."""
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise AssertionError('torch was imported')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from cudnn_bn._tools import bench, cli\n"
        "bench.CPU_QUICK_SHAPES = [(16, 8, 6, 6)]\n"
        "bench._last_level_cache_bytes = lambda: None\n"
        f"sys.exit(cli.main(['bench', '--quick', '--no-torch', '--json', {str(tmp_path / 'b.json')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "b.json").read_text())["backend"] == "CPU: NumPy reference (no PyTorch comparison)"


# ---------------------------------------------------------------- the simulated GPU ----

@pytest.fixture
def gpu(monkeypatch, cudnn_library):
    from fake_cudnn import simulated_gpu

    monkeypatch.setattr(_bench, "GPU_SHAPES", [(16, 8, 6, 6)])
    monkeypatch.setattr(_bench, "OVERFLOW_PROBE_SHAPE", (4, 8, 6, 6))
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: None)
    with simulated_gpu(monkeypatch) as simulator:
        yield simulator


def _refuse_float16_inference(monkeypatch) -> list:
    """The simulated cuDNN answers NOT_SUPPORTED to inference on float16 data, as a real library
    might; returns the list of refusals."""
    from cudnn_bn._cudnn import raw

    library = raw.library()
    simulated = library.cudnnBatchNormalizationForwardInference
    forward_inference = _bench._api.forward_inference
    current, refusals = {}, []

    def inference(*args):
        if current["dtype"] == np.float16:
            refusals.append(current["dtype"])
            raw.check_status("cudnnBatchNormalizationForwardInference", raw.Status.NOT_SUPPORTED, "refused by the test")
        return simulated(*args)

    def noting_the_dtype(x, *args, **kwargs):
        current["dtype"] = np.dtype(x.dtype)
        return forward_inference(x, *args, **kwargs)

    monkeypatch.setattr(library, "cudnnBatchNormalizationForwardInference", inference)
    monkeypatch.setattr(_bench._api, "forward_inference", noting_the_dtype)
    return refusals


def test_gpu_bench_records_a_refused_row_and_goes_on(gpu, monkeypatch, tmp_path):
    refused = _refuse_float16_inference(monkeypatch)
    json_path = tmp_path / "b.json"
    assert _bench.run_bench(json_path=str(json_path), quick=True) == 1
    result = json.loads(json_path.read_text())
    assert result["backend"].startswith("GPU") and refused
    failed = result["failed"]
    assert failed and {(f["dtype"], f["operation"]) for f in failed} == {("float16", "forward_inference")}
    assert all(f["error"].startswith("CudnnNotSupportedError: cudnnBatchNormalizationForwardInference") for f in failed)
    # everything else was still timed: 2 dtypes x 2 layouts x (3 modes + checked persistent) x 3 operations
    assert len(result["rows"]) + len(failed) + len(result["overflowed"]) == 2 * 2 * 4 * 3
    assert {r["operation"] for r in result["rows"] if r["dtype"] == "float32"} == set(_bench.OPERATIONS)
    assert "host_overhead" in result and "ex_vs_plain" in result


def test_gpu_bench_records_a_failed_section_and_goes_on(gpu, monkeypatch, tmp_path):
    def probe_crashes():
        raise RuntimeError("probe crashed\ntraceback detail")

    monkeypatch.setattr(_bench, "_overflow_probe", probe_crashes)
    json_path = tmp_path / "b.json"
    _bench.run_bench(json_path=str(json_path), markdown_path=str(tmp_path / "b.md"), quick=True)
    result = json.loads(json_path.read_text())
    assert result["overflow_probe"] == {"error": "RuntimeError: probe crashed"}
    assert isinstance(result["ex_vs_plain"], list)  # the section after it still ran
    markdown = (tmp_path / "b.md").read_text()
    assert "overflow_probe failed: RuntimeError: probe crashed" in markdown
    # and the last one: a training step through the layers with the checks and without
    steps = {(row["layout"], row["settings"]): row for row in result["training_step"]}
    settings = _bench.TRAINING_STEP_SETTINGS
    assert set(steps) == {(layout, setting) for layout in ("NCHW", "NHWC") for setting in settings}
    assert all(row["step_ms"] > 0 and row["torch_step_ms"] is None for row in steps.values())
    assert (steps["NCHW", "defaults"]["mode"], steps["NHWC", "defaults"]["mode"]) == ("SPATIAL", "SPATIAL_PERSISTENT")
    assert steps["NCHW", "SPATIAL_PERSISTENT, raise (a check after every call)"]["mode"] == "SPATIAL_PERSISTENT"
    assert "| training step, 10 BatchNorm layers, fwd + bwd |" in markdown


def test_microseconds_per_call_warms_up_once_and_synchronizes_around_the_timed_calls():
    calls, synchronized = [], []
    value = _timing.microseconds_per_call(lambda: calls.append(len(synchronized)),
                                          lambda: synchronized.append(len(calls)), 5)
    assert calls == [0, 1, 1, 1, 1, 1] and synchronized == [1, 6] and value > 0
