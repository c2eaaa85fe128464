"""`.ci/gpu-validate` and its helpers on a machine without a GPU: its plan fits a GPU machine's
lease, it stops at once where no GPU is usable, its tiers run end to end on the simulated GPU
(steps, evidence files, summary, exit status) and what it leaves behind can be read.

CUDA_VISIBLE_DEVICES="" hides any GPU from the subprocesses, so these tests mean the same on a
machine that has one. The hang of a step is rehearsed with the test hook GPU_VALIDATE_HANG
(.ci/gpu_evidence.py: "CHECK@SECONDS" makes that smoke check hang and limits its step to SECONDS).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, ".ci")
if CI not in sys.path:
    sys.path.insert(0, CI)  # the helpers import each other from their folder

# a GPU machine's lease: 15 minutes of device time, the machine's start (up to 2 minutes)
# included, and one call per tier; the issue that planned it keeps step limits under about 660 s
LEASE_S, MACHINE_START_S, STEP_LIMITS_OF_A_LEASE_S, COMMAND_LIMIT_S = 15 * 60, 120, 660, 600
TIER_LIMITS = {"smoke": 150, "suite": 360, "bench": 150}


def _environment(**extra) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("CUDNN_BN_REQUIRE_GPU", "CUDNN_BN_SIMULATED_GPU", "GPU_VALIDATE_HANG", "OUT")}
    environment.update({"PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
                        "PYTHON": sys.executable, **extra})
    return environment


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CI, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _validate(*arguments, timeout=180, **environment) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(["bash", os.path.join(CI, "gpu-validate"), *arguments], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=_environment(**environment))
    return result, time.perf_counter() - start


def _steps(out) -> dict:
    """step name -> its row of steps.tsv."""
    summary = _load("gpu_summary")
    return {step["name"]: step for step in summary.read_steps(str(out / "steps.tsv"))}


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_evidence_comes_back(out) -> None:
    """What a GPU machine lets come back from one command: at most 8 files, 16 MiB each, 64 MiB
    in all, at most 2 folders deep, names of letters, digits, '.', '_' and '-' (checked here on
    its own, and by the helper the run uses)."""
    evidence = _load("gpu_evidence")
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    assert len(paths) <= 8, sorted(paths)
    assert all(os.path.getsize(path) <= 16 << 20 for path in paths)
    assert sum(os.path.getsize(path) for path in paths) <= 64 << 20
    assert all(os.path.relpath(path, out).count(os.sep) <= 2 for path in paths)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", os.path.basename(path)) for path in paths)
    assert evidence.evidence_problems(str(out)) == []


# ---------------------------------------------------------------- the plan ----

def test_the_plan_lists_each_tier_within_its_limit_and_all_three_fit_a_lease(tmp_path):
    result, _ = _validate("--plan", OUT=str(tmp_path / "never-made"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["tier", "smoke"], ["tier", "suite"], ["tier", "bench"]]
    limits = {name: int(seconds) for _, name, seconds in (line.split() for line in lines)}
    assert all(limits[tier] <= TIER_LIMITS[tier] for tier in TIER_LIMITS), limits
    assert sum(limits.values()) <= STEP_LIMITS_OF_A_LEASE_S
    assert MACHINE_START_S + sum(limits.values()) <= LEASE_S - 2 * 60  # two minutes left for transfers and idle waits
    assert not (tmp_path / "never-made").exists()  # --plan changes nothing
    validate = _load("gpu_validate")
    for tier, steps in validate.TIERS.items():  # each tier is its setup and its own steps, and one command
        assert limits[tier] == sum(step.limit_s for step in validate.SETUP + steps) <= COMMAND_LIMIT_S
    assert validate.BUDGET_S <= COMMAND_LIMIT_S - 60


# ---------------------------------------------------------------- without a GPU ----

def test_without_a_gpu_the_preflight_stops_the_run_in_seconds_with_exit_2(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- gpu-status -->\nno run\n<!-- /gpu-status -->\n")
    result, seconds = _validate(OUT=str(tmp_path / "out"), GPU_VALIDATE_README=str(readme))
    out = tmp_path / "out"
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-2000:]
    assert seconds < 60, f"the preflight should stop the run in seconds, took {seconds:.1f} s"
    preflight = (out / "preflight.txt").read_text()
    assert "cudnn_status: NOT usable" in preflight and "verdict: STOP" in preflight
    steps = _steps(out)
    assert steps["preflight"]["result"] == "failed" and steps["preflight"]["exit"] == "1"
    after_the_preflight = ("smoke-checks", "limit-probes", "suite-parallel", "suite-serial", "bench", "query-timing")
    assert {steps[name]["result"] for name in after_the_preflight} == {"not-run"}
    assert not (out / "junit.xml").exists() and not (out / "checks.jsonl").exists()
    summary = (out / "summary.md").read_text()
    assert "NOT RUN: the preflight stopped the validation" in summary
    assert "| setup | preflight | required | failed | 1 |" in summary
    assert readme.read_text() == "<!-- gpu-status -->\nno run\n<!-- /gpu-status -->\n"
    _assert_evidence_comes_back(out)


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


# ---------------------------------------------------------------- on the simulated GPU ----

def test_the_simulated_smoke_tier_completes_and_all_its_evidence_comes_back(tmp_path):
    evidence = _load("gpu_evidence")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- gpu-status -->\nno run\n<!-- /gpu-status -->\n")
    before, repository_readme = _digest(readme), _digest(os.path.join(ROOT, "README.md"))
    out = tmp_path / "out"
    result, seconds = _validate("--simulate", "smoke", OUT=str(out), GPU_VALIDATE_README=str(readme))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert seconds <= 90
    steps = _steps(out)
    assert [steps[name]["result"] for name in ("preflight", "smoke-checks", "limit-probes")] == ["simulated"] * 3
    assert "passed" not in {step["result"] for step in steps.values()}  # nothing simulated reads as passed on a GPU
    assert sorted(os.listdir(out)) == sorted([evidence.LOG, evidence.STEPS, evidence.SUMMARY, evidence.PREFLIGHT,
                                              evidence.CHECKS])
    _assert_evidence_comes_back(out)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("### GPU validation rehearsal on the simulated GPU: REHEARSED")
    assert "**Simulated.**" in summary
    assert all(f"| {tier} |" in summary for tier in ("smoke", "suite", "bench"))  # every tier named, asked for or not
    assert "| smoke | passed on the simulated GPU |" in summary
    assert all(f"`{name}` x" in summary for name in evidence.expected_entry_points())
    assert "Every entry point was called." in summary and "README status line" not in summary
    records = evidence.read_records(str(out / "checks.jsonl"))
    ends = [r for r in records if r.get("kind") == "check" and r["event"] == "end"]
    assert len(ends) >= 60 and all(r["simulated"] for r in records)
    assert {r["outcome"] for r in ends} == {"passed", "needs a GPU"}
    needing_a_gpu = {r["check"] for r in ends if r["outcome"] == "needs a GPU"}
    assert needing_a_gpu == {"torch-dlpack", "torch-cuda-array-interface", "nccl-one-rank"}
    verdicts = [r for r in records if r.get("kind") == "limit-verdict"]
    assert [r["case"].split(" vs ")[1] for r in verdicts] == ["131071x1x1x1", "262136x1x1x1", "880802x1x1x1",
                                                              "65536x1x1x1"]
    assert all(r["holds"] == "yes: refused with a status" for r in verdicts)  # what the simulator refuses
    assert _digest(readme) == before and _digest(os.path.join(ROOT, "README.md")) == repository_readme


def test_a_hung_smoke_check_is_cut_reported_and_the_tier_goes_on(tmp_path):
    out = tmp_path / "out"
    result, seconds = _validate("--simulate", "smoke", OUT=str(out), GPU_VALIDATE_HANG="compat@8",
                                GPU_VALIDATE_README="")
    assert result.returncode == 1, result.stdout[-4000:]
    assert seconds < 60
    steps = _steps(out)
    assert steps["smoke-checks"]["result"] == "timed-out" and steps["smoke-checks"]["limit"] == "8"
    assert steps["limit-probes"]["result"] == "simulated"  # the next step still ran
    log = (out / "gpu-validate.log").read_text()
    assert "compat: hanging here" in log and "Fatal Python error: Aborted" in log  # SIGABRT: every thread's stack
    summary = (out / "summary.md").read_text()
    assert "FAIL (smoke-checks)" in summary and "started and never finished (hung, crashed or cut): `compat`" in summary
    assert "| compat | did not finish |" in summary
    assert "| plain-spatial-float32-NCHW | passed on the simulated GPU |" in summary
    _assert_evidence_comes_back(out)


def test_a_crash_in_a_smoke_check_fails_that_check_and_the_checks_after_it_run_in_a_new_process(tmp_path):
    out = tmp_path / "out"
    result, _ = _validate("--simulate", "smoke", OUT=str(out), GPU_VALIDATE_FAULT="compat:crash",
                          GPU_VALIDATE_README="")
    assert result.returncode == 1, result.stdout[-4000:]
    steps = _steps(out)
    assert steps["smoke-checks"]["result"] == "failed" and steps["limit-probes"]["result"] == "simulated"
    log = (out / "gpu-validate.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log  # the crashed process's stack
    evidence = _load("gpu_evidence")
    ends = {r["check"]: r for r in evidence.read_records(str(out / "checks.jsonl")) if r.get("event") == "end"}
    assert ends["compat"]["outcome"] == "failed" and "died in this check (signal SIGSEGV" in ends["compat"]["detail"]
    assert ends["layer-train-then-eval"]["outcome"] == "passed"  # after the crash, in a new process
    assert len(ends) == len(_load("gpu_smoke").check_names())  # every check has its end
    summary = (out / "summary.md").read_text()
    assert "FAIL (smoke-checks)" in summary and "never finished" not in summary
    assert "| compat | failed |" in summary and "Every entry point was called." in summary


def test_a_smoke_check_past_its_own_limit_is_stopped_and_the_rest_still_run(tmp_path):
    evidence = _load("gpu_evidence")
    records = tmp_path / "checks.jsonl"
    only = ["plain-spatial-float32-NCHW", "compat", "layer-train-then-eval"]
    result = subprocess.run([sys.executable, os.path.join(CI, "gpu_smoke.py"), "--records", str(records),
                             "--only", *only],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=_environment(CUDNN_BN_SIMULATED_GPU="1", GPU_VALIDATE_FAULT="compat:hang@2"))
    assert result.returncode == 1, result.stdout[-3000:]
    assert "compat: no end after 2 s; stopping its process" in result.stdout
    assert "Fatal Python error: Aborted" in result.stdout
    ends = {r["check"]: r for r in evidence.read_records(str(records)) if r.get("event") == "end"}
    assert list(ends) == only
    assert ends["compat"]["outcome"] == "failed" and ends["compat"]["detail"].startswith("no end after 2 s")
    assert ends["plain-spatial-float32-NCHW"]["outcome"] == ends["layer-train-then-eval"]["outcome"] == "passed"
    [points] = [r for r in evidence.read_records(str(records)) if r.get("kind") == "entry-points"]
    # the plain check's and the layer's
    assert points["missing"] == [] and points["called"]["cudnnBatchNormalizationBackward"] >= 2


def test_steps_that_cannot_start_fail_and_the_summary_is_still_written(tmp_path):
    out = tmp_path / "out"
    result, seconds = _validate("smoke", OUT=str(out), PYTHON=str(tmp_path / "no-such-python"), GPU_VALIDATE_README="")
    assert result.returncode == 1, result.stdout[-3000:]
    steps = _steps(out)
    assert [steps[name]["result"] for name in ("preflight", "smoke-checks", "limit-probes")] == ["failed-to-start"] * 3
    assert "FAIL (preflight, smoke-checks, limit-probes)" in (out / "summary.md").read_text()
    assert "could not start: FileNotFoundError" in (out / "gpu-validate.log").read_text()


def _in_process_run(tmp_path, simulate=True):
    validate = _load("gpu_validate")
    out = tmp_path / "out"
    out.mkdir()
    return validate, validate.Run(str(out), sys.executable, simulate, None, validate.BUDGET_S, 1), out


def test_an_error_of_the_orchestrator_itself_still_leaves_a_summary(tmp_path, monkeypatch):
    validate, run, out = _in_process_run(tmp_path)
    ran = []

    def run_step(step):
        if step.tier == "smoke":
            (out / "bench.json.tmp").write_text("{")  # as a step stopped between writing and renaming leaves it
            raise RuntimeError("a bug in the orchestrator")
        ran.append(step.name)
        run.record(step, "simulated" if step.kind == "required" else "done", 0, 0.1, step.limit_s)
        return 0

    monkeypatch.setattr(run, "run", run_step)
    assert run.validate(["smoke"]) == 1
    steps = _steps(out)
    assert ran == ["preflight", "environment"] and steps["orchestrator"]["result"] == "failed"
    assert steps["smoke-checks"]["result"] == steps["limit-probes"]["result"] == "not-run"
    assert "FAIL (orchestrator)" in (out / "summary.md").read_text()
    log = (out / "gpu-validate.log").read_text()
    assert "RuntimeError: a bug in the orchestrator" in log and "removed bench.json.tmp" in log
    _assert_evidence_comes_back(out)


@pytest.mark.parametrize("preflight_result,preflight_exit,verdict,tiers_run", [
    ("timed-out", -6, None, True),  # cut at its limit before a verdict: the tiers still run, the run fails
    ("crashed-signal-11", -11, None, True),
    ("failed", 3, "DEGRADED: float16 CuPy kernels do not compile or run", True),
    ("failed", 1, "STOP: cuDNN is not usable on this machine", False),  # only its own STOP stops the run
])
def test_only_the_preflights_own_verdict_stops_the_run(tmp_path, monkeypatch, preflight_result, preflight_exit, verdict,
                                                       tiers_run):
    validate, run, out = _in_process_run(tmp_path, simulate=False)
    started = []

    def run_step(step):
        started.append(step.name)
        if step.name == "preflight":
            verdict_line = f"verdict: {verdict}\n" if verdict else ""
            (out / "preflight.txt").write_text("cudnn_status: usable: 1 GPU(s)\n" + verdict_line)
            run.record(step, preflight_result, preflight_exit, 40.0, step.limit_s)
            return preflight_exit
        run.record(step, "passed" if step.kind == "required" else "done", 0, 1.0, step.limit_s)
        return 0

    monkeypatch.setattr(run, "run", run_step)
    status = run.validate(["smoke"])
    assert ("smoke-checks" in started) == tiers_run
    assert status == (1 if tiers_run else 2)
    summary = (out / "summary.md").read_text()
    assert ("FAIL (preflight)" in summary) == tiers_run and ("NOT RUN: the preflight stopped" in summary) != tiers_run


def test_a_step_that_floods_its_output_keeps_its_head_and_tail_in_the_log(tmp_path, monkeypatch):
    import io

    validate, run, out = _in_process_run(tmp_path)
    monkeypatch.setattr(validate, "STEP_LOG_HEAD_BYTES", 10_000)
    monkeypatch.setattr(validate, "STEP_LOG_TAIL_LINES", 5)
    flood = b"".join(b"line %d\n" % number for number in range(200_000)) + b"x" * 5_000_000 + b"\nthe last line\n"
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    run._copy_output(io.BytesIO(flood))
    run.log.close()
    log = (out / "gpu-validate.log").read_text()
    assert log.startswith("line 0\nline 1\n") and log.endswith("line 199999\n" + "x" * validate.STEP_LOG_TAIL_LINE_BYTES
                                                                  + " [...]\nthe last line\n")
    assert len(log) < 20_000 and "bytes of this step's output left out here" in log
    left_out = int(re.search(r"\.\.\. (\d+) bytes of this step", log).group(1))
    kept_head = len(log.split("[gpu-validate] ...")[0])
    kept_tail = len("line 199997\nline 199998\nline 199999\n") + 5_000_001 + len("the last line\n")
    assert kept_head + left_out + kept_tail == len(flood)


def test_sigterm_stops_the_step_and_the_run_and_the_summary_is_written(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(["bash", os.path.join(CI, "gpu-validate"), "--simulate", "smoke"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env=_environment(OUT=str(out), GPU_VALIDATE_HANG="compat@60", GPU_VALIDATE_README=""))
    try:
        for line in process.stdout:
            if "compat: hanging here" in line:
                break
        process.send_signal(signal.SIGTERM)
        output = process.stdout.read()
        assert process.wait(timeout=60) == 1, output[-3000:]
    finally:
        process.kill()
    steps = _steps(out)
    assert steps["smoke-checks"]["result"] == "terminated" and steps["limit-probes"]["result"] == "not-run"
    summary = (out / "summary.md").read_text()
    assert "FAIL (smoke-checks)" in summary and "`compat`" in summary
    assert "SIGTERM: the run stops here" in output


def test_a_tier_the_budget_cannot_reach_is_not_run_which_is_not_failed(tmp_path):
    out = tmp_path / "out"
    result, _ = _validate("--simulate", "smoke", OUT=str(out), GPU_VALIDATE_BUDGET_S="40", GPU_VALIDATE_README="")
    assert result.returncode == 3, result.stdout[-3000:]
    steps = _steps(out)
    assert steps["preflight"]["result"] == "simulated"
    assert steps["smoke-checks"]["result"] == steps["limit-probes"]["result"] == "not-run"
    assert "INCOMPLETE (what ran passed; not run: smoke)" in (out / "summary.md").read_text()


def test_a_smoke_check_that_fails_does_not_hide_the_others(tmp_path, monkeypatch, cudnn_library):
    from fake_cudnn import simulated_gpu

    smoke, evidence = _load("gpu_smoke"), _load("gpu_evidence")
    records = evidence.RecordWriter(str(tmp_path / "checks.jsonl"), tier="smoke", step="smoke-checks", simulated=True)

    def calls_cudnn(checks):
        import cudnn_bn

        x = checks.cupy.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
        cudnn_bn.forward_training(x, checks.cupy.ones(3, np.float32), checks.cupy.zeros(3, np.float32), mode="spatial")
        return {"detail": "one call"}

    def fails(checks):
        raise smoke.CheckFailed("y: max abs difference 1 from the reference")

    monkeypatch.setattr(smoke.Checks, "all",
                        lambda checks: [("fails", lambda: fails(checks)), ("calls", lambda: calls_cudnn(checks))])
    with simulated_gpu(monkeypatch):
        ends = smoke.run_checks(records, only=None)
    status = smoke.finish_checks(records, ends, only=None)
    records.close()
    written = evidence.read_records(str(tmp_path / "checks.jsonl"))
    ends = {r["check"]: r for r in written if r.get("event") == "end"}
    assert status == 1
    assert ends["fails"]["outcome"] == "failed"
    assert ends["fails"]["detail"] == "CheckFailed: y: max abs difference 1 from the reference"
    assert ends["calls"]["outcome"] == "passed"
    assert ends["calls"]["entry_points"] == {"cudnnBatchNormalizationForwardTraining": 1}
    [points] = [r for r in written if r.get("kind") == "entry-points"]
    assert "cudnnBatchNormalizationBackward" in points["missing"]  # an entry point no check called fails the tier


def test_gpu_tests_run_on_the_simulated_gpu_and_the_others_say_they_need_a_gpu(tmp_path):
    junit = tmp_path / "junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={junit}",
         "-rs", "tests/test_gpu_parity.py::test_bad_input_on_the_gpu_gives_the_reference_errors",
         "tests/test_distributed.py::test_nccl_group_of_one_matches_the_reference"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment(CUDNN_BN_SIMULATED_GPU="1"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed, 1 skipped" in result.stdout and "needs a GPU: NCCL through cupyx.distributed" in result.stdout
    summary = _load("gpu_summary")
    assert summary.tests_executed(str(junit))


def test_a_simulated_benchmark_says_so_in_its_json(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(CI, "gpu_bench.py"), "--json", str(tmp_path / "bench.json")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=_environment(CUDNN_BN_SIMULATED_GPU="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["simulated"] is True and bench["backend"].startswith("SIMULATED GPU")
    assert bench["rows"] and {tuple(row["shape"]) for row in bench["rows"]} == {(16, 8, 6, 6)}


def test_a_benchmark_past_its_deadline_lists_what_it_did_not_time_and_passes(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(CI, "gpu_bench.py"), "--json", str(tmp_path / "bench.json"),
                             "--seconds", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=_environment(CUDNN_BN_SIMULATED_GPU="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["rows"] == [] and bench["failed"] == []
    sections = [entry["section"] for entry in bench["not_timed"] if "section" in entry]
    assert sections == ["copy_gbps", "host_overhead", "overflow_probe", "ex_vs_plain", "fused_vs_unfused",
                        "training_step", "backward_inference"]
    rows = [entry for entry in bench["not_timed"] if "section" not in entry]
    assert len(rows) == 2 * 4 * 3 * 2  # float16 and float32 x the four labels x three operations x NCHW and NHWC
    assert (f"Not timed, because the run's deadline had passed: {len(bench['not_timed'])} rows and sections"
            in result.stdout)
    text = _load("gpu_summary").section_bench(bench, [], True)
    assert any(line.startswith(f"- not_timed: {len(bench['not_timed'])}") for line in text)


def test_every_gpu_test_named_for_special_handling_exists():
    from conftest import GPU_SERIAL, NEEDS_A_GPU

    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "--collect-only",
                             "-q", "tests"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment())
    collected = {line.split("[")[0] for line in result.stdout.splitlines() if "::" in line}
    named = set(NEEDS_A_GPU) | set(GPU_SERIAL)
    assert named <= collected, named - collected
    serial = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu and gpu_serial",
                             "--collect-only", "-q", "tests"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment())
    assert {line.split("[")[0] for line in serial.stdout.splitlines() if "::" in line} == set(GPU_SERIAL)


# ---------------------------------------------------------------- the verdict and exit status ----

def _row(tier, name, result, exit_status="0", kind="required"):
    return dict(tier=tier, name=name, kind=kind, result=result, exit=exit_status, seconds="1.0", limit="10")


SETUP_ROWS = [_row("setup", "preflight", "passed"), _row("setup", "environment", "done", kind="info")]


@pytest.mark.parametrize("rows,simulated,status,verdict", [
    (SETUP_ROWS + [_row("smoke", "smoke-checks", "passed")], False, 0, "PASS"),
    (SETUP_ROWS + [_row("smoke", "smoke-checks", "simulated")], True, 0, "REHEARSED"),
    (SETUP_ROWS + [_row("smoke", "smoke-checks", "timed-out", "-6")], False, 1, "FAIL (smoke-checks)"),
    (SETUP_ROWS + [_row("suite", "suite-parallel", "no-test-ran")], True, 1, "FAIL (suite-parallel)"),
    (SETUP_ROWS + [_row("smoke", "smoke-checks", "not-run", "-")], True, 3,
     "INCOMPLETE (what ran passed; not run: smoke)"),
    ([_row("setup", "preflight", "simulated")], True, 1, "FAIL (no tier ran on the simulated GPU)"),
    ([_row("setup", "preflight", "passed")], False, 1, "FAIL (no tier ran)"),
    (SETUP_ROWS + [_row("smoke", "smoke-checks", "passed"), _row("bench", "bench", "not-run", "-")], False, 3,
     "INCOMPLETE"),
    ([_row("setup", "preflight", "failed", "1"), _row("smoke", "smoke-checks", "not-run", "-")], False, 2, "NOT RUN"),
    ([_row("setup", "preflight", "failed", "1")], False, 2, "NOT RUN"),  # exit 1 and no verdict: it stopped the run
    # a preflight cut at its limit or crashed did not stop the run: the tiers ran, and it fails the run
    ([_row("setup", "preflight", "timed-out", "-6"), _row("smoke", "smoke-checks", "passed")], False, 1,
     "FAIL (preflight)"),
    ([_row("setup", "preflight", "crashed-signal-11", "-11"), _row("smoke", "smoke-checks", "failed", "1")], False, 1,
     "FAIL (preflight, smoke-checks)"),
    ([_row("setup", "preflight", "failed", "3"), _row("smoke", "smoke-checks", "passed")], False, 1,
     "FAIL (preflight)"),
    ([], False, 1, "UNKNOWN"),
])
def test_the_exit_status_is_decided_in_one_place(rows, simulated, status, verdict):
    summary = _load("gpu_summary")
    decided, text = summary.exit_status(rows, {}, simulated)
    assert decided == status and text.startswith(verdict)


def test_an_info_step_that_fails_does_not_fail_the_run():
    summary = _load("gpu_summary")
    rows = [_row("setup", "preflight", "passed"), _row("setup", "environment", "failed", "127", kind="info"),
            _row("smoke", "smoke-checks", "passed")]
    assert summary.exit_status(rows, {}, False)[0] == 0


# ---------------------------------------------------------------- reading what a run left ----

XDIST_LOG = """\
[gw0] [  1%] PASSED tests/test_gpu_parity.py::test_a[x]
[gw3] [  2%] FAILED tests/test_gpu_parity.py::test_b[y]
[gw1] [  3%] SKIPPED tests/test_interop.py::test_torch_cpu_tensors_are_type_errors
[gw2] node down: Not properly terminated
worker 'gw2' crashed while running 'tests/test_gpu_parity.py::test_c[z]'
[gw0] [  4%] XFAIL tests/test_fused.py::test_d
"""


def test_the_log_parser_reads_xdist_workers_and_names_the_test_a_crashed_worker_ran():
    summary = _load("gpu_summary")
    parsed = summary.read_verbose_log(XDIST_LOG)
    assert parsed["outcomes"] == {
        "tests/test_gpu_parity.py::test_a[x]": "passed", "tests/test_gpu_parity.py::test_b[y]": "failed",
        "tests/test_interop.py::test_torch_cpu_tensors_are_type_errors": "skipped",
        "tests/test_fused.py::test_d": "xfailed",
    }
    assert parsed["crashed"] == ["tests/test_gpu_parity.py::test_c[z]"]


def test_the_summary_of_a_cut_suite_reads_the_xdist_log(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "gpu-validate.log").write_text("[gpu-validate] step suite/suite-parallel: "
                                               "start (limit 250 s): python -m pytest\n"
                                               "2 workers [7 items]\n" + XDIST_LOG)
    steps = tmp_path / "steps.tsv"
    steps.write_text("setup\tpreflight\trequired\tpassed\t0\t3.0\t25\nsuite\tsuite-parallel\trequired\ttimed-out\t-6\t260.0\t260\n")
    text = summary.summarize(str(tmp_path), str(steps))
    assert "FAIL (suite-parallel)" in text and "No junit XML" in text
    assert "1 passed, 1 failed, 1 skipped, 1 xfailed" in text
    assert "a pytest-xdist worker crashed while running `tests/test_gpu_parity.py::test_c[z]`" in text
    assert "`tests/test_gpu_parity.py::test_b[y]`: failed" in text
    assert "**3 of the 7 selected tests have no result**" in text
    assert "workers that went down (a crash, or a test past its timeout): 1" in text


def test_the_summary_names_the_test_that_never_finished_in_one_process(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "gpu-validate.log").write_text(
        "[gpu-validate] step suite/suite-serial: start (limit 60 s): python -m pytest\n"
        "tests/test_gpu_parity.py::test_a[x] PASSED [ 1%]\n"
        "tests/test_gpu_parity.py::test_b[y] FAILED [ 2%]\n"
        "tests/test_gpu_parity.py::test_c[z] Fatal Python error: Segmentation fault\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("suite\tsuite-serial\trequired\tcrashed-signal-11\t-11\t12.0\t60\n")
    text = summary.summarize(str(tmp_path), str(steps))
    assert "No junit XML" in text and "1 passed, 1 failed" in text
    assert "never finished: `tests/test_gpu_parity.py::test_c[z]`" in text
    assert "FAIL (suite-serial)" in text


CRASHING_TESTS = '''
import faulthandler, time, pytest

pytestmark = pytest.mark.gpu

@pytest.mark.parametrize("i", range(3))
def test_before(i):
    pass

def test_crashes_in_native_code():
    faulthandler._sigsegv()

def test_hangs():
    time.sleep(600)

@pytest.mark.parametrize("i", range(3))
def test_after(i):
    pass
'''


def test_the_parallel_suite_step_survives_a_crashed_and_a_hung_test_and_its_summary_names_them(tmp_path, monkeypatch):
    """The suite-parallel step's own pytest command (pytest-xdist workers, pytest-timeout by a timer
    thread) on tests that crash a worker and hang one: both fail with the worker named, the others
    run, and the summary's counts add up."""
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_timeout")
    validate, run, out = _in_process_run(tmp_path, simulate=False)
    monkeypatch.setattr(validate, "TEST_TIMEOUT_S", 3)
    run.workers = 2
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_crashing.py").write_text(CRASHING_TESTS)
    argv = run.suite_parallel()
    assert "-n" in argv and "--timeout-method=thread" in argv and argv[-1] == os.path.join(ROOT, "tests")
    argv[-1] = "tests"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=_environment(PYTHONFAULTHANDLER="1"))
    assert result.returncode == 1, result.stdout[-3000:]
    (out / "gpu-validate.log").write_text("[gpu-validate] step suite/suite-parallel: "
                                          "start (limit 250 s): pytest\n" + result.stdout)
    (out / "steps.tsv").write_text("suite\tsuite-parallel\trequired\tfailed\t1\t9.0\t250\n")
    text = _load("gpu_summary").summarize(str(out), str(out / "steps.tsv"))
    assert "8 tests: 6 passed, 0 failed, 2 error" in text and "Every one of the 8 selected tests has a result." in text
    assert "workers that went down (a crash, or a test past its timeout): 2; each was replaced" in text
    for name in ("test_crashes_in_native_code", "test_hangs"):
        assert f"- `tests/test_crashing.py::{name}` (error): failed on setup with \"worker 'gw" in text


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


def test_summary_counts_failures_skips_recorded_outcomes_limits_and_query_cost(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={tmp_path / 'junit.xml'}", str(tmp_path / "test_sample.py")],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    (tmp_path / "preflight.txt").write_text("cudnn_status: checking ...\n"
                                            "cudnn_status: usable: 1 GPU(s)\ndevice 0: H100\nverdict: ok\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("setup\tpreflight\trequired\tpassed\t0\t3.1\t25\nsuite\tsuite-parallel\trequired\tfailed\t1\t80.2\t260\n"
                     "setup\tenvironment\tinfo\tfailed\t127\t0.0\t15\n")
    records = [
        dict(tier="smoke", kind="limit-verdict", step="limit-probes", limit="inference batch",
             case="SPATIAL float32 65535x1x1x1 vs 65536x1x1x1", within="ok", past="NOT_SUPPORTED",
             holds="yes: refused with a status"),
        dict(tier="bench", kind="query_timing", step="query-timing", measure="idle query, us", value="3.2"),
    ]
    (tmp_path / "checks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = summary.summarize(str(tmp_path), str(steps))
    assert "FAIL (suite-parallel)" in text and "device 0" not in text and "H100" in text
    assert "usable: 1 GPU(s)" in text  # the last of a repeated key
    assert "3 tests: 1 passed, 1 failed, 0 error, 1 skipped" in text
    assert "`test_sample.py::test_fails` (failed): AssertionError: one is not two" in text
    assert "1 x no overflow flagged" in text
    assert "Recorded by `test_sample.py::test_passes`" in text and "| - | passed | raised |" in text
    assert "yes: refused with a status" in text and "idle query, us | 3.2" in text


def test_a_simulated_run_never_touches_the_readme(tmp_path, capsys):
    summary = _load("gpu_summary")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- gpu-status -->\nno run\n<!-- /gpu-status -->\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "preflight.txt").write_text("device 0: simulated GPU\nverdict: ok (simulated GPU)\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("setup\tpreflight\trequired\tsimulated\t0\t1.0\t25\nsmoke\tsmoke-checks\trequired\tsimulated\t0\t4.0\t75\n")
    assert summary.main([str(tmp_path / "out"), "--steps", str(steps), "--readme", str(readme), "--simulated"]) == 0
    assert readme.read_text() == "<!-- gpu-status -->\nno run\n<!-- /gpu-status -->\n"
    assert "a run on the simulated GPU is no GPU result" in capsys.readouterr().out
    assert "README status line" not in (tmp_path / "out" / "summary.md").read_text()


def test_a_record_after_one_cut_by_a_dying_process_starts_its_own_line(tmp_path, capsys):
    evidence = _load("gpu_evidence")
    path = tmp_path / "checks.jsonl"
    # cut mid-record
    path.write_text('{"kind": "check", "check": "a", "event": "end"}\n{"kind": "check", "check": "b", "ev')
    records = evidence.RecordWriter(str(path))
    records.start_a_line()
    records.write(kind="check", check="b", event="end", outcome="failed")
    records.start_a_line()  # nothing to end now
    records.write(kind="entry-points")
    records.close()
    read = [(r["kind"], r.get("check")) for r in evidence.read_records(str(path))]
    assert read == [("check", "a"), ("check", "b"), ("entry-points", None)]
    assert path.read_text().count("\n") == 4


def test_a_log_past_the_size_limit_is_cut_to_its_head_and_tail(tmp_path):
    evidence = _load("gpu_evidence")
    log = tmp_path / "gpu-validate.log"
    log.write_bytes(b"first line\n" + b"x" * 60_000 + b"\nlast line\n")
    assert evidence.trim_to_limit(str(log), limit=16_384)
    text = log.read_bytes()
    assert len(text) <= 16_384 and text.startswith(b"first line\n") and text.endswith(b"\nlast line\n")
    assert b"bytes left out here" in text
    assert not evidence.trim_to_limit(str(log), limit=16_384)  # it fits now
    (tmp_path / "sub" / "deeper" / "deepest").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "deepest" / "bad name.txt").write_text("x")
    problems = evidence.evidence_problems(str(tmp_path))
    assert any("more than 2 folders deep" in p for p in problems) and any("'bad name.txt'" in p for p in problems)


# ---------------------------------------------------------------- the limit probes ----

def test_the_limit_probes_cover_both_sides_of_every_batch_limit_with_the_packages_numbers():
    from cudnn_bn._cudnn.limits import LIMITS

    probes = _load("gpu_probes")
    numbers = probes.limit_numbers()
    assert (
        numbers["per_activation_training_max_batch"], numbers["training_max_batch"], numbers["inference_max_batch"]
    ) == (LIMITS.per_activation_training_max_batch, LIMITS.training_max_batch, LIMITS.inference_max_batch)
    groups = {group["name"]: group for group in probes.plan()}
    batches = lambda name: [case["shape"][0] for case in groups[name]["cases"]]  # noqa: E731
    assert batches("training-batch-per_activation-float32") == [131070, 131071, 262136]
    assert batches("training-batch-spatial-float32") == [880801, 880802]
    assert batches("inference-batch-spatial-float32") == [65535, 65536]
    assert groups["training-batch-per_activation-float32"]["mode"] == "PER_ACTIVATION"
    assert {group["set"] for group in groups.values()} == {"limits", "query-timing", "int32"}
    limit_groups = [g for g in groups.values() if g["set"] == "limits"]
    assert max(g["timeout"] for g in limit_groups) < _load("gpu_validate").TIERS["smoke"][1].limit_s  # they run at once
    for group in groups.values():
        if group["kind"] == "limit":
            assert group["cases"][0]["edge"] == "within"  # a crash past the limit keeps the call within it
            assert all(max(case["shape"]) < 2**31 for case in group["cases"])  # only the count may pass int32
    counts = {case["edge"]: math.prod(case["shape"])
              for g in groups.values() if g["set"] == "int32" for case in g["cases"]}
    assert counts["within"] <= LIMITS.int32_max < counts["past"]


def _limit_record(edge, operation, status="CUDNN_STATUS_SUCCESS", check="matches (y 1e-07)", shape=(65536, 1, 1, 1),
                  **extra):
    return dict(kind="limit", group="g", edge=edge, operation=operation, status=status, check=check, shape=list(shape),
                **extra)


@pytest.mark.parametrize("within,past,expected", [
    ([_limit_record("within", "forward_inference")],
     [_limit_record("past", "forward_inference", "CUDNN_STATUS_NOT_SUPPORTED", "-")], "yes: refused"),
    ([_limit_record("within", "forward_inference")], [_limit_record("past", "forward_inference")],
     "no: cuDNN ran past the limit"),
    ([_limit_record("within", "forward_inference")],
     [_limit_record("past", "forward_inference", check="WRONG (y nan)")], "yes, and worse"),
    ([_limit_record("within", "forward_inference")], [], "unclear: the call past the limit did not report"),
    ([_limit_record("within", "forward_inference", "CUDNN_STATUS_NOT_SUPPORTED", "-")], [],
     "unclear: the call within the limit failed"),
    ([], [], "unclear: no result within the limit"),
])
def test_probe_verdicts(within, past, expected):
    probes = _load("gpu_probes")
    group = dict(name="g", kind="limit", limit="inference batch", operations=["forward_inference"], mode="SPATIAL",
                 dtype="float32",
                 cases=[dict(edge="within", shape=(65535, 1, 1, 1)), dict(edge="past", shape=(65536, 1, 1, 1))])
    [row] = probes.verdicts([group], within + past)
    assert row["holds"].startswith(expected) and row["case"] == "SPATIAL float32 65535x1x1x1 vs 65536x1x1x1"


def test_probes_record_a_group_that_dies_and_go_on(tmp_path):
    evidence = _load("gpu_evidence")
    records = tmp_path / "checks.jsonl"
    result = subprocess.run([sys.executable, os.path.join(CI, "gpu_probes.py"), "--records", str(records),
                             "--set", "limits", "--only", "inference-batch-spatial-float32",
                             "training-batch-spatial-float32"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_environment())
    assert result.returncode == 1, result.stdout[-2000:]
    written = evidence.read_records(str(records))
    problems = [r for r in written if r["kind"] == "problem"]
    assert len(problems) == 2 and all("exit status" in r["problem"] and r["step"] == "limit-probes" for r in problems)
    verdicts = [r for r in written if r["kind"] == "limit-verdict"]
    assert len(verdicts) == 2 and all(r["holds"].startswith("unclear") for r in verdicts)


# ---------------------------------------------------------------- the checks that need a GPU, on fakes ----

class _FakeTorch:
    """What the smoke checks use of torch, with its signatures (torch 2.x), on the simulated GPU:
    CUDA tensors whose memory is simulated device memory, exported through DLPack (device
    kDLCUDA) and __cuda_array_interface__ version 2 (no stream), as torch's are. Records calls."""

    __version__ = "2.11.0+fake"

    def __init__(self):
        import types

        self.calls = []
        self.cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=self._synchronize)
        self.nn = types.SimpleNamespace(functional=types.SimpleNamespace(batch_norm=self._batch_norm))

    def from_numpy(self, array):
        return _HostTensor(self, np.asarray(array))

    def _synchronize(self, device=None):
        self.calls.append(("synchronize", device))
        sys.modules["cupy"].cuda.Device().synchronize()

    def _batch_norm(self, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-05):
        assert all(isinstance(t, _CudaTensor) for t in (input, running_mean, running_var, weight, bias))
        self.calls.append(("batch_norm", training, momentum, eps))
        return input


class _HostTensor:
    def __init__(self, torch, array):
        self.torch, self.array = torch, array

    def cuda(self, device=None, non_blocking=False):
        return _CudaTensor(self.torch, sys.modules["cupy"].asarray(self.array.copy()))

    def numpy(self, *, force=False):
        return self.array


class _CudaTensor:
    def __init__(self, torch, device_array):
        self.torch, self.device_array = torch, device_array

    def cpu(self):
        return _HostTensor(self.torch, self.device_array.get())

    def __dlpack__(self, *, stream=-1, max_version=None, dl_device=None, copy=None):
        assert isinstance(stream, int) and stream != 0, stream  # torch refuses 0 on CUDA
        self.torch.calls.append(("__dlpack__", stream))
        return self.device_array.view(np.ndarray).__dlpack__(max_version=max_version)

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA

    @property
    def __cuda_array_interface__(self):
        self.torch.calls.append(("__cuda_array_interface__",))
        array = self.device_array
        return dict(typestr=array.dtype.str, shape=tuple(array.shape), strides=None,
                    data=(array.__array_interface__["data"][0], False), version=2)


class _FakeNcclBackend:
    """cupyx.distributed's NCCL backend for one rank (CuPy 14): rank, n_devices, all_reduce, stop."""

    def __init__(self, n_devices, rank, host, port):
        self.rank, self._n_devices, self.calls = rank, n_devices, [("init", n_devices, rank, host, port)]

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        assert op == "sum" and in_array.flags.c_contiguous and in_array.dtype == out_array.dtype == np.float64
        self.calls.append(("all_reduce", in_array.size))
        out_array[...] = in_array  # a group of one sums one buffer

    def stop(self):
        self.calls.append(("stop",))


def test_the_checks_that_need_a_gpu_run_their_gpu_branches_against_torch_and_nccl_fakes(simulated_gpu_with_interop,
                                                                                        monkeypatch):
    """torch-dlpack, torch-cuda-array-interface, host-time-vs-torch and nccl-one-rank as they run on
    a GPU (not their simulated stand-ins): every call they make to torch, to cupyx.distributed and
    to cudnn_bn, with the signatures of the real libraries, and their results checked."""
    import types

    smoke = _load("gpu_smoke")
    torch = _FakeTorch()
    backends = []

    def init_process_group(n_devices, rank, *, backend="nccl", host=None, port=None, use_mpi=False):
        assert backend == "nccl" and not use_mpi and isinstance(port, int)
        backends.append(_FakeNcclBackend(n_devices, rank, host, port))
        return backends[-1]

    cupyx, distributed = types.ModuleType("cupyx"), types.ModuleType("cupyx.distributed")
    cupyx.distributed, distributed.init_process_group = distributed, init_process_group
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.distributed", distributed)
    # cupy.fuse compiles the group's dx kernel on a GPU; here the fused function runs op by op
    monkeypatch.setattr(sys.modules["cupy"], "fuse", lambda kernel_name=None: (lambda function: function),
                        raising=False)
    monkeypatch.delenv("MPI4PY_RC_INITIALIZE", raising=False)
    monkeypatch.delenv("NCCL_DEBUG", raising=False)
    checks = smoke.Checks(None)
    checks.simulated = False  # the branches a GPU runs

    dlpack = checks.torch_call("dlpack")
    assert [call for call in torch.calls if call[0] == "__dlpack__"] and dlpack["torch"] == torch.__version__
    assert set(dlpack["max_abs_difference"]) == {"y", "running mean (in the torch tensor)",
                                                 "running var (in the torch tensor)"}
    torch.calls.clear()
    interface = checks.torch_call("cuda_array_interface")
    assert ("__cuda_array_interface__",) in torch.calls
    assert not [call for call in torch.calls if call[0] == "__dlpack__"]
    # written in place, in the tensor's memory
    assert interface["max_abs_difference"]["running var (in the torch tensor)"] < 1e-6
    torch.calls.clear()
    timed = checks.host_time()
    batch_norms = [call for call in torch.calls if call[0] == "batch_norm"]
    assert len(batch_norms) == smoke.HOST_TIME_CALLS + 1
    assert batch_norms[0] == ("batch_norm", True, smoke.MOMENTUM, smoke.EPS)
    assert ("synchronize", None) in torch.calls and timed["torch_us"] > 0 and timed["ratio"] > 0
    assert "torch.nn.functional" in timed["detail"]

    group = checks.nccl_one_rank()
    [backend] = backends
    assert backend.calls[0][:3] == ("init", 1, 0) and backend.calls[-1] == ("stop",)
    assert [call for call in backend.calls if call[0] == "all_reduce"]  # the statistics went through the group
    assert set(group["max_abs_difference"]) == {"y", "dx", "dgamma", "dbeta"}
    assert os.environ["MPI4PY_RC_INITIALIZE"] == "0" and os.environ["NCCL_DEBUG"] == "WARN"
