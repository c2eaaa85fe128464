"""The GPU validation of cudnn_bn, in tiers that each fit one command on a GPU machine.

    bash .ci/gpu-validate [--simulate] [TIER]     # TIER: smoke, suite or bench; none: all three
    bash .ci/gpu-validate --plan                  # one line per tier, `tier NAME LIMIT_S`; runs nothing

Every run starts with the setup steps (the preflight, and the environment for the record), then
runs the tiers asked for, in the order smoke, suite, bench. Each step has its own time limit: at
the limit its whole process group gets SIGABRT (Python's faulthandler then prints every thread's
stack into the log) and SIGKILL ``KILL_GRACE_S`` later. A tier starts only when the limits of all
its steps fit in what is left of the run's budget (GPU_VALIDATE_BUDGET_S, default 540 s, less
``SUMMARY_RESERVE_S`` kept for the summary); one that does not fit is reported "not run", which
is not a failure. No step is ever cut short by the budget.

--simulate runs the same steps, evidence files, summary and exit status on the simulated GPU of
tests/fake_cudnn.py (CUDNN_BN_SIMULATED_GPU=1 in every step's environment): a rehearsal on a
machine with no GPU. What needs real hardware is recorded as "needs a GPU"; nothing simulated is
reported as passed on a GPU, and a simulated run never rewrites the README's status line.

The evidence goes into $OUT (./gpu-out when unset); .ci/gpu_evidence.py names the files. Exit
status: 0 every tier asked for ran and passed; 1 something failed (a simulated run that executed
nothing fails too); 2 the preflight stopped the run (no usable cuDNN); 3 what ran passed, but a
tier did not run.

Environment: PYTHON, the interpreter of the steps (default python3); GPU_VALIDATE_BUDGET_S;
GPU_VALIDATE_WORKERS, pytest-xdist workers of the suite's parallel step (default: one per core,
at most 8);
GPU_VALIDATE_README, the README whose status line a run on a GPU rewrites (default README.md;
empty: none); GPU_VALIDATE_HANG, a test hook (.ci/gpu_evidence.py, hang_request).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)
import gpu_summary  # noqa: E402

ROOT = evidence.ROOT
TIER_NAMES = ("smoke", "suite", "bench")
BUDGET_S = 540
SUMMARY_RESERVE_S = 30
KILL_GRACE_S = 10
MAX_WORKERS = 8  # pytest-xdist workers of the suite's parallel step, at most one per core


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))
TEST_TIMEOUT_S = 120  # pytest-timeout, per test, where the plugin is installed
SERIAL_MARKER = "gpu_serial"  # tests/conftest.py gives it to the gpu tests that must run alone


@dataclasses.dataclass(frozen=True)
class Step:
    tier: str  # "setup" for the steps every run starts with
    name: str
    kind: str  # "required": its failure fails the run; "info": recorded only
    limit_s: int
    command: str  # the name of the Run method that builds its argv


SETUP = (
    Step("setup", "preflight", "required", 25, "preflight"),
    Step("setup", "environment", "info", 15, "environment"),
)
TIERS = {
    "smoke": (
        Step("smoke", "smoke-checks", "required", 75, "smoke_checks"),
        Step("smoke", "limit-probes", "required", 35, "limit_probes"),
    ),
    "suite": (
        Step("suite", "suite-parallel", "required", 260, "suite_parallel"),
        Step("suite", "suite-serial", "required", 60, "suite_serial"),
    ),
    "bench": (
        Step("bench", "bench", "required", 95, "bench"),
        Step("bench", "query-timing", "required", 15, "query_timing"),
    ),
}


def tier_limit(tier: str) -> int:
    """Seconds of step limits of ``tier`` run on its own: the setup steps and its own."""
    return sum(step.limit_s for step in SETUP + TIERS[tier])


class Run:
    """One invocation: where it writes, how it runs each step, and what each step did."""

    def __init__(self, out: str, python: str, simulate: bool, readme: str | None, budget_s: int, workers: int):
        self.out, self.python, self.simulate, self.readme = out, python, simulate, readme
        self.budget_s, self.workers = budget_s, workers
        self.started = time.monotonic()
        self.deadline = self.started + budget_s - SUMMARY_RESERVE_S
        self.path = lambda name: os.path.join(out, name)  # noqa: E731
        self.log = open(self.path(evidence.LOG), "a", encoding="utf-8", errors="replace")
        self.hang = evidence.hang_request()
        self.step_environment = self._step_environment()

    def _step_environment(self) -> dict:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        environment.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        if self.simulate:
            environment[evidence.SIMULATED_GPU_VARIABLE] = "1"
            environment.pop("CUDNN_BN_REQUIRE_GPU", None)
        else:
            environment.pop(evidence.SIMULATED_GPU_VARIABLE, None)
            environment["CUDNN_BN_REQUIRE_GPU"] = "1"  # a gpu test fails, not skips, without a usable GPU
        return environment

    # ---- output ----
    def say(self, text: str) -> None:
        self.emit(f"[gpu-validate] {text}\n")

    def emit(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.log.write(text)
        self.log.flush()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    # ---- the commands ----
    def _script(self, name: str, *args) -> list[str]:
        return [self.python, "-u", os.path.join(ROOT, ".ci", name), *args]

    def preflight(self) -> list[str]:
        return self._script("gpu_preflight.py", self.out)

    def environment(self) -> list[str]:
        python = self.python
        script = f"""
echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
echo "== python packages"; "{python}" -m pip list --disable-pip-version-check 2>&1
echo "== pytest"; "{python}" -m pytest -VV -p no:cacheprovider 2>&1
echo "== source"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null
echo "source fingerprint: $(find cudnn_bn tests .ci -type f \\( -name '*.py' -o -name gpu-validate \\) | sort | xargs cat | sha256sum | cut -c1-16)"
"""
        return ["bash", "-c", script]

    def smoke_checks(self) -> list[str]:
        return self._script("gpu_smoke.py", "--records", self.path(evidence.CHECKS))

    def limit_probes(self) -> list[str]:
        return self._script("gpu_probes.py", "--records", self.path(evidence.CHECKS), "--set", "limits")

    def query_timing(self) -> list[str]:
        return self._script("gpu_probes.py", "--records", self.path(evidence.CHECKS), "--set", "query-timing")

    def bench(self) -> list[str]:
        return self._script("gpu_bench.py", "--json", self.path(evidence.BENCH))

    def _pytest(self, marker: str, junit: str, parallel: bool) -> list[str]:
        command = [self.python, "-u", "-m", "pytest", "-m", marker, "-v", "-rfEsxX", "--tb=short", "--color=no",
                   "--durations=15", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   "-o", "faulthandler_timeout=90", "-o", "junit_family=xunit1", f"--junitxml={self.path(junit)}"]
        if self._importable("pytest_timeout"):
            command.append(f"--timeout={TEST_TIMEOUT_S}")  # fails a hung test and goes on, where Python can run
        if parallel:
            if self._importable("xdist"):
                command += ["-n", str(self.workers)]
            else:
                self.say("pytest-xdist is not importable here: the parallel step runs in one process")
        return command + [os.path.join(ROOT, "tests")]

    def suite_parallel(self) -> list[str]:
        return self._pytest(f"gpu and not {SERIAL_MARKER}", evidence.JUNIT, parallel=True)

    def suite_serial(self) -> list[str]:
        return self._pytest(f"gpu and {SERIAL_MARKER}", evidence.JUNIT_SERIAL, parallel=False)

    def _importable(self, module: str) -> bool:
        check = subprocess.run([self.python, "-c", f"import {module}"], capture_output=True, env=self.step_environment, timeout=60)
        return check.returncode == 0

    # ---- running a step ----
    def record(self, step: Step, result: str, exit_status, seconds: float, limit: int) -> None:
        with open(self.path(evidence.STEPS), "a", encoding="utf-8") as handle:
            handle.write("\t".join([step.tier, step.name, step.kind, result, str(exit_status), f"{seconds:.1f}", str(limit)]) + "\n")

    def limit_of(self, step: Step) -> int:
        if self.hang is not None and step.name == "smoke-checks":
            return self.hang[1]
        return step.limit_s

    def run(self, step: Step) -> int:
        limit = self.limit_of(step)
        argv = getattr(self, step.command)()
        self.say(f"step {step.tier}/{step.name}: start (limit {limit} s): {' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}")
        start = time.monotonic()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=self.step_environment,
                                   start_new_session=True)
        reader = threading.Thread(target=self._copy_output, args=(process.stdout,), daemon=True)
        reader.start()
        cut = False
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            cut = True
            self._signal(process, signal.SIGABRT)
            try:
                process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        self._signal(process, signal.SIGKILL)  # nothing of the step outlives it (a worker holding the GPU)
        reader.join(timeout=5)
        seconds = time.monotonic() - start
        status = process.returncode
        result = self._result(step, status, cut)
        self.say(f"step {step.tier}/{step.name}: {result} (exit {status}) after {seconds:.1f} s of {limit} s; "
                 f"{time.monotonic() - self.started:.0f} s since the start")
        self.record(step, result, status, seconds, limit)
        return status

    def _copy_output(self, stream) -> None:
        for raw_line in iter(stream.readline, b""):
            self.emit(raw_line.decode("utf-8", errors="replace"))
        stream.close()

    @staticmethod
    def _signal(process, number) -> None:
        try:
            os.killpg(process.pid, number)  # the step's whole group: workers and probe children too
        except (ProcessLookupError, PermissionError):  # the group is gone
            pass

    def _result(self, step: Step, status: int, cut: bool) -> str:
        if cut:
            return "timed-out"
        if status < 0:
            return f"crashed-signal-{-status}"
        if status != 0:
            return "failed"
        if step.kind == "info":
            return "done"  # recorded for the reader, no verdict: not "passed", on a GPU or off one
        junit = {"suite-parallel": evidence.JUNIT, "suite-serial": evidence.JUNIT_SERIAL}.get(step.name)
        if junit is not None and not gpu_summary.tests_executed(self.path(junit)):
            return "no-test-ran"  # every test skipped, or none collected: no verdict
        return "simulated" if self.simulate else "passed"

    def not_run(self, steps, why: str) -> None:
        for step in steps:
            self.say(f"step {step.tier}/{step.name}: not run ({why})")
            self.record(step, "not-run", "-", 0.0, self.limit_of(step))

    # ---- the whole run ----
    def validate(self, tiers: list[str]) -> int:
        mode = "on the SIMULATED GPU of tests/fake_cudnn.py (a rehearsal: no GPU result)" if self.simulate else "on a GPU"
        self.say(f"tiers {', '.join(tiers)} {mode}; output folder {self.out}; python {self.python}; "
                 f"budget {self.budget_s} s; {evidence.utc_now()}")
        preflight = self.run(SETUP[0])
        self.run(SETUP[1])
        if preflight not in (0, gpu_summary.PREFLIGHT_DEGRADED):
            self.say(f"STOP: the preflight found no usable cuDNN (see {self.path(evidence.PREFLIGHT)}); no tier runs")
            for tier in tiers:
                self.not_run(TIERS[tier], "the preflight stopped the run")
        else:
            for tier in tiers:
                needed = sum(self.limit_of(step) for step in TIERS[tier])
                if self.left_s() < needed:
                    self.not_run(TIERS[tier], f"tier {tier} needs {needed} s of step limits, {max(self.left_s(), 0):.0f} s of the budget are left")
                    continue
                for step in TIERS[tier]:
                    self.run(step)
        return self.finish()

    def finish(self) -> int:
        time.sleep(0.1)
        self.say(f"summary: {self.path(evidence.SUMMARY)}")
        command = [sys.executable, os.path.join(ROOT, ".ci", "gpu_summary.py"), self.out, "--steps", self.path(evidence.STEPS)]
        command += ["--simulated"] if self.simulate else (["--readme", self.readme] if self.readme else [])
        self.log.flush()
        try:
            summary = subprocess.run(command, capture_output=True, text=True, timeout=SUMMARY_RESERVE_S, cwd=ROOT)
            self.emit(summary.stdout + summary.stderr)
            if summary.returncode != 0:
                self.say(f"the summary writer failed (exit {summary.returncode})")
        except subprocess.TimeoutExpired:
            self.say(f"the summary writer did not finish in {SUMMARY_RESERVE_S} s")
        steps = gpu_summary.read_steps(self.path(evidence.STEPS))
        preflight = gpu_summary.read_preflight(self.path(evidence.PREFLIGHT))
        status, verdict = gpu_summary.exit_status(steps, preflight, self.simulate)
        self.say(f"{verdict} (exit {status}, {time.monotonic() - self.started:.0f} s in all)")
        self.log.close()
        if evidence.trim_to_limit(self.path(evidence.LOG)):
            print(f"[gpu-validate] {evidence.LOG} was cut to {evidence.MAX_FILE_BYTES} bytes", flush=True)
        for problem in evidence.evidence_problems(self.out):
            print(f"[gpu-validate] WARNING: {problem}", flush=True)
        return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash .ci/gpu-validate", description=__doc__.splitlines()[0])
    parser.add_argument("tier", nargs="?", choices=TIER_NAMES, help="one tier (default: all, in order, in one budget)")
    parser.add_argument("--simulate", action="store_true", help="run on the simulated GPU of tests/fake_cudnn.py")
    parser.add_argument("--plan", action="store_true", help="print `tier NAME LIMIT_S` for each tier and run nothing")
    args = parser.parse_args(argv)
    if args.plan:
        for tier in TIER_NAMES:
            print(f"tier {tier} {tier_limit(tier)}")
        return 0
    out = os.path.abspath(os.environ.get("OUT") or "gpu-out")
    os.makedirs(out, exist_ok=True)
    for name in evidence.EVIDENCE_FILES:  # a folder used before: this run's evidence only
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    readme = os.environ.get("GPU_VALIDATE_README", "README.md")
    run = Run(out, os.environ.get("PYTHON") or "python3", args.simulate, os.path.join(ROOT, readme) if readme else None,
              int(os.environ.get("GPU_VALIDATE_BUDGET_S") or BUDGET_S), int(os.environ.get("GPU_VALIDATE_WORKERS") or default_workers()))
    return run.validate([args.tier] if args.tier else list(TIER_NAMES))


if __name__ == "__main__":
    sys.exit(main())
