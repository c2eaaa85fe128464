"""The GPU validation of cudnn_bn, in tiers that each fit one command on a GPU machine.

    bash .ci/gpu-validate [--simulate] [TIER]     # TIER: smoke, suite or bench; none: all three
    bash .ci/gpu-validate --plan                  # one line per tier, `tier NAME LIMIT_S`; runs nothing

Every run starts with the setup steps (the preflight, and the environment for the record), then
runs the tiers asked for, in the order smoke, suite, bench. Only the preflight's own verdict that
cuDNN is not usable stops the run; a preflight that crashed or was cut fails the run, and the
tiers still run for the evidence. Each step has its own time limit: at the limit a pytest step's
whole process group first gets SIGINT (pytest then writes its junit XML with what ran), and every
step's group SIGABRT (Python's faulthandler then prints every thread's stack into the log), then
SIGKILL (``STOP_GRACE_S`` apart). A tier starts only when the limits of all its steps, and their
grace, fit in what is left of the run's budget (GPU_VALIDATE_BUDGET_S, default 540 s, less
``SUMMARY_RESERVE_S`` kept for the summary); one that does not fit is reported "not run", which
is not a failure. No step is ever cut short by the budget. Whatever happens to a step (a crash, a
cut, a flood of output: each step keeps at most ``STEP_LOG_HEAD_BYTES`` of its output in the log,
then its last lines), and whatever happens to the run itself (an error here, SIGTERM), the summary
is written.

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
empty: none); GPU_VALIDATE_HANG and GPU_VALIDATE_FAULT, test hooks (.ci/gpu_evidence.py,
hang_request and fault_request).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)
import gpu_summary  # noqa: E402

ROOT = evidence.ROOT
TIER_NAMES = ("smoke", "suite", "bench")
BUDGET_S = 540
SUMMARY_RESERVE_S = 30
STOP_GRACE_S = {signal.SIGINT: 10, signal.SIGABRT: 5}  # how long a step cut at its limit gets after each signal
MAX_WORKERS = 8  # pytest-xdist workers of the suite's parallel step, at most one per core
TEST_TIMEOUT_S = 60  # pytest-timeout, per test, where the plugin is installed
SERIAL_MARKER = "gpu_serial"  # tests/conftest.py gives it to the gpu tests that must run alone
PYTEST_STEPS = ("suite_parallel", "suite_serial")  # the commands whose steps are stopped with SIGINT first
# a step's output kept in the log: its first STEP_LOG_HEAD_BYTES, then only its last STEP_LOG_TAIL_LINES
# lines (8 steps stay within the 16 MiB a file may have to come back from a GPU machine)
STEP_LOG_HEAD_BYTES, STEP_LOG_TAIL_LINES, STEP_LOG_TAIL_LINE_BYTES = 3 << 19, 400, 2000
PLUGIN_CHECK_TIMEOUT_S = 20
# the bench starts no row or section in the last BENCH_LAST_ROW_S of its step: the largest row or
# section that starts just before, its table and its exit fit in them
BENCH_LAST_ROW_S = 20


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


class Terminated(Exception):
    """SIGTERM reached the run (its command ran past a GPU machine's limit): stop and summarize."""


@dataclasses.dataclass(frozen=True)
class Step:
    tier: str  # "setup" for the steps every run starts with
    name: str
    kind: str  # "required": its failure fails the run; "info": recorded only
    limit_s: int
    command: str  # the name of the Run method that builds its argv


SETUP = (
    # a fresh machine: CUDA's first context, libcudnn's first load, NVRTC's first float16 compile
    Step("setup", "preflight", "required", 40, "preflight"),
    Step("setup", "environment", "info", 10, "environment"),
)
TIERS = {
    "smoke": (
        Step("smoke", "smoke-checks", "required", 75, "smoke_checks"),
        Step("smoke", "limit-probes", "required", 25, "limit_probes"),
    ),
    "suite": (
        Step("suite", "suite-parallel", "required", 250, "suite_parallel"),
        Step("suite", "suite-serial", "required", 60, "suite_serial"),
    ),
    "bench": (
        Step("bench", "bench", "required", 85, "bench"),
        Step("bench", "query-timing", "required", 15, "query_timing"),
    ),
}


def tier_limit(tier: str) -> int:
    """Seconds of step limits of ``tier`` run on its own: the setup steps and its own."""
    return sum(step.limit_s for step in SETUP + TIERS[tier])


def stop_grace(step: Step) -> int:
    """Seconds a step cut at its limit may still take while it is being stopped."""
    return sum(
        seconds for number, seconds in STOP_GRACE_S.items() if number != signal.SIGINT or step.command in PYTEST_STEPS
    )


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
        self._plugins: dict[str, bool] = {}

    def _step_environment(self) -> dict:
        environment = dict(os.environ)
        inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
        environment["PYTHONPATH"] = os.pathsep.join([ROOT] + inherited)
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
echo "source fingerprint: $(find cudnn_bn tests .ci -type f \\( -name '*.py' -o -name gpu-validate \\) |
    sort | xargs cat | sha256sum | cut -c1-16)"
"""
        return ["bash", "-c", script]

    def smoke_checks(self) -> list[str]:
        return self._script("gpu_smoke.py", "--records", self.path(evidence.CHECKS))

    def limit_probes(self) -> list[str]:
        return self._script("gpu_probes.py", "--records", self.path(evidence.CHECKS), "--set", "limits")

    def query_timing(self) -> list[str]:
        return self._script("gpu_probes.py", "--records", self.path(evidence.CHECKS), "--set", "query-timing")

    def bench(self) -> list[str]:
        step = next(step for step in TIERS["bench"] if step.command == "bench")
        return self._script(
            "gpu_bench.py", "--json", self.path(evidence.BENCH), "--seconds", str(step.limit_s - BENCH_LAST_ROW_S)
        )

    def _pytest(self, marker: str, junit: str, parallel: bool) -> list[str]:
        command = [self.python, "-u", "-m", "pytest", "-m", marker, "-v", "-rfEsxX", "--tb=short", "--color=no",
                   "--durations=15", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   "-o", f"faulthandler_timeout={TEST_TIMEOUT_S * 3 // 4}", "-o", "junit_family=xunit1",
                   f"--junitxml={self.path(junit)}"]
        workers = parallel and self._importable("xdist")
        if parallel and not workers:
            self.say("pytest-xdist is not importable here: the parallel step runs in one process")
        if self._importable("pytest_timeout"):
            # a hung test fails and the rest go on: on a worker, a timer thread ends the worker even
            # inside a native call (pytest-xdist reports the test as crashed and starts a new worker);
            # in one process, SIGALRM, which keeps the process and its junit XML, where Python can run
            command += [f"--timeout={TEST_TIMEOUT_S}", f"--timeout-method={'thread' if workers else 'signal'}"]
        else:
            self.say("pytest-timeout is not importable here: a hung test is only cut with its whole step")
        if workers:
            command += ["-n", str(self.workers)]
        return command + [os.path.join(ROOT, "tests")]

    def suite_parallel(self) -> list[str]:
        return self._pytest(f"gpu and not {SERIAL_MARKER}", evidence.JUNIT, parallel=True)

    def suite_serial(self) -> list[str]:
        return self._pytest(f"gpu and {SERIAL_MARKER}", evidence.JUNIT_SERIAL, parallel=False)

    def _importable(self, module: str) -> bool:
        """Whether the steps' Python imports ``module`` (asked once; a hung or failed check says no)."""
        if module not in self._plugins:
            try:
                check = subprocess.run([self.python, "-c", f"import {module}"], capture_output=True,
                                       env=self.step_environment, timeout=PLUGIN_CHECK_TIMEOUT_S)
                self._plugins[module] = check.returncode == 0
            except (OSError, subprocess.TimeoutExpired) as error:
                self.say(f"could not ask whether {module} is importable: {type(error).__name__}: {error}")
                self._plugins[module] = False
        return self._plugins[module]

    # ---- running a step ----
    def record(self, step: Step, result: str, exit_status, seconds: float, limit: int) -> None:
        with open(self.path(evidence.STEPS), "a", encoding="utf-8") as handle:
            fields = [step.tier, step.name, step.kind, result, str(exit_status), f"{seconds:.1f}", str(limit)]
            handle.write("\t".join(fields) + "\n")

    def limit_of(self, step: Step) -> int:
        if self.hang is not None and step.name == "smoke-checks":
            return self.hang[1]
        return step.limit_s

    def run(self, step: Step) -> int | None:
        """Run ``step`` to its end or its limit and record it; its exit status (None when it
        could not start: the error is recorded as its result)."""
        limit = self.limit_of(step)
        start = time.monotonic()
        try:
            argv = getattr(self, step.command)()
            if step.command == "environment":
                command = "bash -c (nvidia-smi; pip list; pytest -VV; git; a source fingerprint)"
            else:
                command = shlex.join(argv)
            self.say(f"step {step.tier}/{step.name}: start (limit {limit} s): {command}")
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env=self.step_environment, start_new_session=True)
        except Exception as error:  # no interpreter, no such file: the step failed, the run goes on
            self.say(f"step {step.tier}/{step.name}: could not start: {type(error).__name__}: {error}")
            self.record(step, "failed-to-start", "-", time.monotonic() - start, limit)
            return None
        reader = threading.Thread(target=self._copy_output, args=(process.stdout,), daemon=True)
        reader.start()
        ended = "on its own"
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            ended = "cut"
            self._stop(process, step)
        except Terminated:
            ended = "terminated"
            raise
        finally:  # also on SIGTERM: nothing of the step outlives it (a worker holding the GPU)
            self._signal(process, signal.SIGKILL)
            process.wait()
            reader.join(timeout=5)
            seconds = time.monotonic() - start
            status = process.returncode
            result = self._result(step, status, ended)
            self.say(f"step {step.tier}/{step.name}: {result} (exit {status}) after {seconds:.1f} s of {limit} s; "
                     f"{time.monotonic() - self.started:.0f} s since the start")
            self.record(step, result, status, seconds, limit)
        return status

    def _stop(self, process, step: Step) -> None:
        """A step past its limit: SIGINT first to pytest (its junit XML keeps what ran), SIGABRT
        (every thread's stack into the log), then the caller's SIGKILL; each after the last one's grace."""
        for number, grace in STOP_GRACE_S.items():
            if number == signal.SIGINT and step.command not in PYTEST_STEPS:
                continue
            self.say(f"step {step.tier}/{step.name}: past its limit, sending {signal.Signals(number).name}")
            self._signal(process, number)
            try:
                process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass

    def _copy_output(self, stream) -> None:
        """The step's output into the log: its first STEP_LOG_HEAD_BYTES, then only its last lines
        (each cut to STEP_LOG_TAIL_LINE_BYTES)."""
        kept, after_head, tail = 0, 0, collections.deque(maxlen=STEP_LOG_TAIL_LINES)
        for raw_line in iter(stream.readline, b""):
            if not tail and kept + len(raw_line) <= STEP_LOG_HEAD_BYTES:
                kept += len(raw_line)
                self.emit(raw_line.decode("utf-8", errors="replace"))
                continue
            after_head += len(raw_line)
            text = raw_line[:STEP_LOG_TAIL_LINE_BYTES].decode("utf-8", errors="replace")
            tail.append((text if text.endswith("\n") else text + " [...]\n", len(raw_line)))
        stream.close()
        if tail:
            left_out = after_head - sum(size for _, size in tail)
            self.emit(f"[gpu-validate] ... {left_out} bytes of this step's output left out here (it printed more than "
                      f"{STEP_LOG_HEAD_BYTES} bytes); its last {len(tail)} lines:\n")
            self.emit("".join(text for text, _ in tail))

    @staticmethod
    def _signal(process, number) -> None:
        try:
            os.killpg(process.pid, number)  # the step's whole group: workers and probe children too
        except (ProcessLookupError, PermissionError):  # the group is gone
            pass

    def _result(self, step: Step, status: int, ended: str) -> str:
        if ended == "cut":
            return "timed-out"
        if ended == "terminated":
            return "terminated"
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
        """Every step of ``tiers``, then the summary, whatever happened on the way."""
        mode = (
            "on the SIMULATED GPU of tests/fake_cudnn.py (a rehearsal: no GPU result)" if self.simulate else "on a GPU"
        )
        self.say(f"tiers {', '.join(tiers)} {mode}; output folder {self.out}; python {self.python}; "
                 f"budget {self.budget_s} s; {evidence.utc_now()}")
        try:
            self._run_steps(tiers)
        except Terminated:
            self.say("SIGTERM: the run stops here; the summary follows")
            self._not_recorded(tiers, "the run was terminated (SIGTERM)")
        except Exception:  # a fault of this script must not cost the evidence gathered so far
            self.say("ERROR in .ci/gpu_validate.py itself; the summary follows:\n" + traceback.format_exc())
            self.record(Step("setup", "orchestrator", "required", 0, "-"), "failed", "-", 0.0, 0)
            self._not_recorded(tiers, "the orchestrator failed")
        return self.finish()

    def _not_recorded(self, tiers: list[str], why: str) -> None:
        """Record as not run every step of ``tiers`` that has no row in the step table yet."""
        recorded = {row["name"] for row in gpu_summary.read_steps(self.path(evidence.STEPS))}
        self.not_run([step for tier in tiers for step in TIERS[tier] if step.name not in recorded], why)

    def _run_steps(self, tiers: list[str]) -> None:
        self.run(SETUP[0])
        self.run(SETUP[1])
        steps = gpu_summary.read_steps(self.path(evidence.STEPS))
        if gpu_summary.preflight_stopped(steps, gpu_summary.read_preflight(self.path(evidence.PREFLIGHT))):
            self.say(f"STOP: the preflight found no usable cuDNN (see {self.path(evidence.PREFLIGHT)}); no tier runs")
            for tier in tiers:
                self.not_run(TIERS[tier], "the preflight stopped the run")
            return
        for tier in tiers:
            needed = sum(self.limit_of(step) + stop_grace(step) for step in TIERS[tier])
            if self.left_s() < needed:
                self.not_run(TIERS[tier], f"tier {tier} needs {needed} s of step limits and grace, "
                                          f"{max(self.left_s(), 0):.0f} s of the budget are left")
                continue
            for step in TIERS[tier]:
                self.run(step)

    def finish(self) -> int:
        if signal.getsignal(signal.SIGTERM) is _terminated:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the summary is what SIGTERM leaves time for
        time.sleep(0.1)
        for name in evidence.remove_temporaries(self.out):
            self.say(f"removed {name}, left by a step stopped while it rewrote that file")
        self.say(f"summary: {self.path(evidence.SUMMARY)}")
        command = [
            sys.executable, os.path.join(ROOT, ".ci", "gpu_summary.py"), self.out, "--steps", self.path(evidence.STEPS)
        ]
        command += ["--simulated"] if self.simulate else (["--readme", self.readme] if self.readme else [])
        self.log.flush()
        written = False
        try:
            summary = subprocess.run(command, capture_output=True, text=True, timeout=SUMMARY_RESERVE_S, cwd=ROOT)
            self.emit(summary.stdout[-STEP_LOG_HEAD_BYTES:] + summary.stderr[-STEP_LOG_HEAD_BYTES:])
            written = summary.returncode == 0
            if not written:
                self.say(f"the summary writer failed (exit {summary.returncode})")
        except Exception as error:  # a timeout, or no interpreter
            self.say(f"the summary writer did not finish: {type(error).__name__}: {error}")
        steps = gpu_summary.read_steps(self.path(evidence.STEPS))
        preflight = gpu_summary.read_preflight(self.path(evidence.PREFLIGHT))
        status, verdict = gpu_summary.exit_status(steps, preflight, self.simulate)
        if not written:
            self._fallback_summary(steps, verdict)
        self.say(f"{verdict} (exit {status}, {time.monotonic() - self.started:.0f} s in all)")
        self.log.close()
        if evidence.trim_to_limit(self.path(evidence.LOG)):
            print(f"[gpu-validate] {evidence.LOG} was cut to {evidence.MAX_FILE_BYTES} bytes", flush=True)
        for problem in evidence.evidence_problems(self.out):
            print(f"[gpu-validate] WARNING: {problem}", flush=True)
        return status

    def _fallback_summary(self, steps: list[dict], verdict: str) -> None:
        """The verdict and the step table, where the summary writer could not write summary.md."""
        title = "GPU validation rehearsal on the simulated GPU" if self.simulate else "GPU validation run"
        lines = [f"### {title}: {verdict}", "",
                 "The summary writer failed (its error is at the end of gpu-validate.log); this is the step table "
                 "alone.", ""]
        fields = list(gpu_summary.STEP_FIELDS)
        lines += gpu_summary.table(fields, [[step[field] for field in fields] for step in steps])
        with open(self.path(evidence.SUMMARY), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


def _terminated(number, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the summary must not be cut by a second one
    raise Terminated()


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
              int(os.environ.get("GPU_VALIDATE_BUDGET_S") or BUDGET_S),
              int(os.environ.get("GPU_VALIDATE_WORKERS") or default_workers()))
    signal.signal(signal.SIGTERM, _terminated)
    return run.validate([args.tier] if args.tier else list(TIER_NAMES))


if __name__ == "__main__":
    sys.exit(main())
