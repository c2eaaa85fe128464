"""`.ci/gpu-validate` and its helpers, on a machine without a usable GPU: the validation cannot
pass vacuously, and what it leaves behind can be read.

CUDA_VISIBLE_DEVICES="" hides any GPU from the subprocesses, so these tests mean the same on a
machine that has one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, ".ci")


def _environment(**extra) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "CUDNN_BN_REQUIRE_GPU"}
    environment.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)
    return environment


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CI, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_validate_stops_at_the_preflight_without_a_gpu(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(["bash", os.path.join(CI, "gpu-validate")], capture_output=True, text=True, timeout=180,
                            cwd=ROOT, env=_environment(OUT=str(tmp_path), PYTHON=sys.executable))
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-2000:]
    assert seconds < 60, f"the preflight should stop the run in seconds, took {seconds:.1f} s"
    preflight = (tmp_path / "preflight.txt").read_text()
    assert "cudnn_status: NOT usable" in preflight and "verdict: STOP" in preflight
    log = (tmp_path / "gpu-validate.log").read_text()
    assert "step preflight: failed (exit 1)" in log and "STOP" in log
    assert "step gpu-suite" not in log and not (tmp_path / "junit.xml").exists()  # nothing ran after the preflight
    summary = (tmp_path / "summary.md").read_text()
    assert "NOT RUN: the preflight stopped the validation" in summary and "| preflight | required | failed | 1 |" in summary
    assert len(os.listdir(tmp_path)) <= 7


@pytest.mark.parametrize("required", [False, True], ids=["skips", "fails-when-required"])
def test_gpu_tests_fail_instead_of_skipping_when_a_gpu_is_required(tmp_path, required):
    junit = tmp_path / "junit.xml"
    extra = {"CUDNN_BN_REQUIRE_GPU": "1"} if required else {}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}",
         "tests/test_gpu_parity.py::test_bad_input_on_the_gpu_gives_the_reference_errors"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment(**extra))
    if required:
        assert result.returncode == 1, result.stdout[-2000:]
        assert "1 error" in result.stdout and "CUDNN_BN_REQUIRE_GPU=1 but no usable GPU" in junit.read_text()
    else:
        assert result.returncode == 0, result.stdout[-2000:]
        assert "1 skipped" in result.stdout and "no usable GPU" in result.stdout


SAMPLE_TESTS = '''
import pytest

def test_passes(request):
    request.node.user_properties.append(("raise_run", "raised"))

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips(request):
    request.node.user_properties.append(("raise_run", "no overflow flagged"))
    pytest.skip("no overflow flagged")
'''


def test_summary_counts_failures_skips_and_recorded_outcomes(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={tmp_path / 'junit.xml'}", str(tmp_path / "test_sample.py")],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    (tmp_path / "preflight.txt").write_text("cudnn_status: checking ...\ncudnn_status: usable: 1 GPU(s)\ndevice 0: H100\nverdict: ok\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("preflight\trequired\tpassed\t0\t3.1\ngpu-suite\trequired\tfailed\t1\t80.2\nnvidia-smi\tinfo\tfailed\t127\t0.0\n")
    (tmp_path / "probes.json").write_text(json.dumps({
        "verdicts": [dict(limit="inference batch", case="SPATIAL float32", within="ok", past="NOT_SUPPORTED", holds="yes: refused with a status")],
        "overflow_flag": [dict(shape="32x64x56x56", layout="NCHW", dtype="float32", calls=6, flagged=2, finite=True, max_abs_difference_vs_spatial="0.0")],
        "query_timing": {"idle query, us": "3.2"}, "problems": []}))
    text = summary.summarize(str(tmp_path), str(steps))
    assert "FAIL (gpu-suite)" in text and "device 0" not in text and "H100" in text
    assert "usable: 1 GPU(s)" in text  # the last of a repeated key
    assert "3 tests: 1 passed, 1 failed, 0 error, 1 skipped" in text
    assert "`test_sample.py::test_fails` (failed): AssertionError: one is not two" in text
    assert "1 x no overflow flagged" in text
    assert "Recorded by `test_sample.py::test_passes`" in text and "| - | passed | raised |" in text
    assert "yes: refused with a status" in text and "2 of 6" in text and "idle query, us | 3.2" in text


def test_summary_names_the_test_that_never_finished_when_pytest_died(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "gpu-validate.log").write_text(
        "tests/test_gpu_parity.py::test_a[x] PASSED [ 1%]\n"
        "tests/test_gpu_parity.py::test_b[y] FAILED [ 2%]\n"
        "tests/test_gpu_parity.py::test_c[z] Fatal Python error: Segmentation fault\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("gpu-suite\trequired\tcrashed-signal-11\t139\t12.0\n")
    text = summary.summarize(str(tmp_path), str(steps))
    assert "No junit XML" in text and "1 passed, 1 failed" in text
    assert "never finished: `tests/test_gpu_parity.py::test_c[z]`" in text
    assert "FAIL (gpu-suite)" in text


def test_probe_plan_covers_both_sides_of_every_limit():
    probes = _load("gpu_probes")
    numbers = probes.limit_numbers()
    try:
        from cudnn_bn._cudnn.limits import LIMITS
    except ImportError:
        pass
    else:  # the probes test the package's own numbers, read from its one place
        assert numbers["source"] == "cudnn_bn/_cudnn/limits.py"
        assert (numbers["training_max_batch"], numbers["inference_max_batch"], numbers["int32_max"]) == (
            LIMITS.training_max_batch, LIMITS.inference_max_batch, LIMITS.int32_max)
    groups = probes.plan()
    edges = {}
    for group in groups:
        for case in group["cases"]:
            edges.setdefault(group["limit"], set()).add((case["edge"], case["shape"]))
    training = {shape[0] for edge, shape in edges["training batch"]}
    inference = {shape[0] for edge, shape in edges["inference batch"]}
    assert training == {numbers["training_max_batch"], numbers["training_max_batch"] + 1}
    assert inference == {numbers["inference_max_batch"], numbers["inference_max_batch"] + 1}
    counts = {edge: max(math.prod(shape) for e, shape in edges["int32 element count"] if e == edge)
              for edge in ("within", "past")}
    assert counts["within"] <= numbers["int32_max"] < counts["past"]
    for group in groups:
        if group["kind"] == "limit":
            assert [case["edge"] for case in group["cases"]] == ["within", "past"]  # a crash past the limit keeps the other
            assert all(max(case["shape"]) < 2**31 for case in group["cases"])  # only the count may pass int32
    assert {"overflow_flag", "query_timing"} <= {group["kind"] for group in groups}


def _limit_record(edge, operation, status="CUDNN_STATUS_SUCCESS", check="matches (y 1e-07)", **extra):
    return dict(kind="limit", group="g", edge=edge, operation=operation, status=status, check=check, **extra)


@pytest.mark.parametrize("within,past,expected", [
    ([_limit_record("within", "forward_inference")], [_limit_record("past", "forward_inference", "CUDNN_STATUS_NOT_SUPPORTED", "-")], "yes: refused"),
    ([_limit_record("within", "forward_inference")], [_limit_record("past", "forward_inference")], "no: cuDNN ran past the limit"),
    ([_limit_record("within", "forward_inference")], [_limit_record("past", "forward_inference", check="WRONG (y nan)")], "yes, and worse"),
    ([_limit_record("within", "forward_inference")], [], "unclear: the call past the limit did not report"),
    ([_limit_record("within", "forward_inference", "CUDNN_STATUS_NOT_SUPPORTED", "-")], [], "unclear: the call within the limit failed"),
    ([], [], "unclear: no result within the limit"),
])
def test_probe_verdicts(within, past, expected):
    probes = _load("gpu_probes")
    group = dict(name="g", kind="limit", limit="inference batch", operations=["forward_inference"], mode="SPATIAL",
                 dtype="float32", cases=[dict(edge="within", shape=(65535, 1, 1, 1)), dict(edge="past", shape=(65536, 1, 1, 1))])
    [row] = probes.verdicts([group], within + past)
    assert row["holds"].startswith(expected)


def test_probes_record_a_group_that_dies_and_go_on(tmp_path):
    out = tmp_path / "probes.json"
    result = subprocess.run([sys.executable, os.path.join(CI, "gpu_probes.py"), "--out", str(out), "--only", "query-timing",
                             "inference-batch-spatial-float32-1x1x1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment())
    assert result.returncode == 1, result.stdout[-2000:]
    written = json.loads(out.read_text())
    assert len(written["problems"]) == 2 and all("exit status" in problem for problem in written["problems"])
    assert written["verdicts"][0]["holds"].startswith("unclear")
