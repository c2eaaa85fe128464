"""cudnn_bn.distributed over MPI: real processes, launched by ``mpiexec -n 2``, ``-n 3`` and ``-n 4``.

Each launch runs tests/mpi_ranks.py on every rank, which records its checks in one report file
per rank; the tests here read the reports. Several scenarios share one launch (a launch of 4
processes costs about a second on two cores). Every launch runs under a timeout: the
subprocess's, and MPIEXEC_TIMEOUT, which makes mpiexec itself end a job that outlives it. A launch
that fails is remembered with its world size, and one that does not end in time fails every later
launch at once, so that a broken MPI environment costs one timeout, not one per test.

When mpi4py is installed (the ``mpi`` extra, part of ``test``), these tests run: an ``mpiexec``
that is neither beside the Python interpreter nor on PATH fails them. Without mpi4py they are
skipped with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from mpi_ranks import DYING_EXIT_STATUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "mpi_ranks.py")
LAUNCH_TIMEOUT = 120  # seconds; a launch takes 1 to 3 s on a quiet 2-core machine
DEATH_NOTICED_WITHIN = 30  # seconds from launch to the end of a job whose rank died

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                                reason="mpi4py is not installed: pip install -e '.[mpi]' (or '.[test]')")


def find_mpiexec() -> str | None:
    """mpiexec beside the running interpreter (a venv's bin, where the mpich wheel puts it), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def _stop(process: subprocess.Popen) -> str:
    """End mpiexec and the ranks it started (its session), and return what it printed."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended already
        pass
    output, _ = process.communicate()
    return output or ""


def _read_report(folder: str, rank: int):
    path = os.path.join(folder, f"rank{rank}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


# the launch that did not end in time, once one has: later launches then fail at once, so that a
# hanging MPI environment costs one launch timeout rather than one per launch
_HUNG: list[str] = []


def run_mpiexec(arguments: list[str], *, cwd: str = ROOT) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``mpiexec *arguments``; return the finished process (stdout and stderr together) and
    the seconds it took.

    Fails the test when mpiexec is missing, when it does not end within LAUNCH_TIMEOUT, or when an
    earlier launch did not. mpiexec runs in a session of its own, ended with the ranks it started
    when the launch times out or is interrupted (Ctrl-C).
    """
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.fail(f"mpi4py is installed but mpiexec is neither beside {sys.executable} nor on PATH: "
                    "install the mpich wheel (pip install -e '.[mpi]') or a system MPI")
    description = f"mpiexec {' '.join(os.path.basename(argument) for argument in arguments)}"
    if _HUNG:
        pytest.fail(f"not launched: an earlier launch ({_HUNG[0]}) did not end within {LAUNCH_TIMEOUT} s")
    command = [mpiexec, *arguments]
    environment = dict(os.environ, PYTHONPATH=ROOT, MPIEXEC_TIMEOUT=str(max(1, LAUNCH_TIMEOUT - 10)))
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                               env=environment, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        output = _stop(process)
        _HUNG.append(description)
        pytest.fail(f"{description} did not end within {LAUNCH_TIMEOUT} s:\n{output}")
    except BaseException:  # Ctrl-C: mpiexec, in its own session, would outlive the test run
        _stop(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, output), time.monotonic() - start


def launch(world_size: int, scenarios: list[str], *extra_options: str):
    """Run the scenarios on ``world_size`` ranks (as :func:`run_mpiexec`); return the finished
    process, each rank's report (None for a rank that wrote none) and the seconds the launch took.
    The report folder is removed, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="cudnn_bn_mpi_") as folder:
        process, seconds = run_mpiexec([*extra_options, "-n", str(world_size), sys.executable, PROGRAM, folder,
                                        *scenarios])
        reports = [_read_report(folder, rank) for rank in range(world_size)]
    return process, reports, seconds


# "faults" leaves the last rank's communicator object behind in its count of group calls (its last
# steps run over a new object), so the scenarios that use it run before
SCENARIOS = {2: ["reference", "layer", "empty", "faults", "communicator", "device"],
             3: ["reference", "layer", "empty", "faults"], 4: ["reference", "layer", "empty", "faults"]}

_LAUNCHES: dict = {}  # world size -> (each rank's report, None) or (None, why the launch failed)


def launched(world_size: int):
    """One launch per world size, shared by the tests of that size: ``(reports, None)``, or
    ``(None, why)`` when it failed. A failure is kept too, so that every test of that size fails
    with it at once instead of launching again."""
    if world_size not in _LAUNCHES:
        _LAUNCHES[world_size] = _launch_scenarios(world_size)
    return _LAUNCHES[world_size]


def _launch_scenarios(world_size: int):
    try:
        process, reports, _ = launch(world_size, SCENARIOS[world_size])
    except pytest.fail.Exception as failure:
        return None, str(failure)
    if process.returncode != 0:
        return None, f"mpiexec -n {world_size} exited with {process.returncode}:\n{process.stdout}"
    silent = [rank for rank, report in enumerate(reports) if report is None]
    if silent:
        return None, f"mpiexec -n {world_size}: rank(s) {silent} wrote no report:\n{process.stdout}"
    return reports, None


def check_scenario(world_size: int, name: str, *, minimum_checks: int) -> None:
    """Every rank ran the scenario to its end, every check passed, and the values the group
    shares have the same bits on every rank."""
    reports, failure = launched(world_size)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    entries = [report[name] for report in reports]
    skipped = {entry["skipped"] for entry in entries}
    if skipped != {None}:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this scenario: {skipped}")
        pytest.skip(str(skipped.pop()))
    for rank, entry in enumerate(entries):
        assert entry["done"] and not entry["failures"], f"rank {rank}:\n" + "\n".join(entry["failures"])
        assert entry["checks"] >= minimum_checks, f"rank {rank} ran {entry['checks']} checks"
    first = entries[0]["digests"]
    assert first, "no fingerprints recorded"
    for rank, entry in enumerate(entries[1:], start=1):
        differing = sorted(label for label in first if entry["digests"].get(label) != first[label])
        assert not differing, f"rank {rank} differs from rank 0 in the bits of: {differing}"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_gets_the_reference_on_the_concatenated_batch(world_size):
    """Uneven shards with a one-sample rank, SPATIAL and PER_ACTIVATION, both layouts, float16,
    float32 and float64: y, dx, saved and running statistics, dgamma, dbeta."""
    check_scenario(world_size, "reference", minimum_checks=18)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sync_batch_norm_trains_like_batch_norm_on_the_whole_batch(world_size):
    """Three steps, plain and with ReLU and a residual; state_dict, load_state_dict and eval."""
    check_scenario(world_size, "layer", minimum_checks=10)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_a_refused_or_mismatched_rank_raises_on_every_rank_and_the_group_goes_on(world_size):
    check_scenario(world_size, "faults", minimum_checks=8)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_a_rank_with_an_empty_shard_takes_part_and_gets_the_reference(world_size):
    """The last rank holds no samples: the group calls in both layouts and modes, float32 and
    float64; SyncBatchNorm plain and with ReLU and a residual; a group of empty shards refused on
    every rank, and the step after it."""
    check_scenario(world_size, "empty", minimum_checks=10)


def test_the_mpi_communicator():
    check_scenario(2, "communicator", minimum_checks=5)


def test_cupy_arrays_staged_and_direct_on_the_simulated_gpu():
    """Also with an empty rank (rank 1 of 2)."""
    check_scenario(2, "device", minimum_checks=9)


@functools.lru_cache(maxsize=1)
def launcher_is_hydra() -> bool:
    """Whether mpiexec is MPICH's Hydra (the mpich wheel's), whose reports the tests read."""
    version = subprocess.run([find_mpiexec() or "mpiexec", "--version"], capture_output=True, text=True, timeout=30)
    return "HYDRA" in version.stdout


def test_a_rank_that_dies_ends_the_job_with_the_launchers_report():
    """The last rank calls os._exit in the middle of a step, the others wait in its collective:
    mpiexec ends the job at once, with the dead rank's exit status or a report of the ranks it
    killed, and (Hydra's -print-all-exitcodes) every rank's status."""
    hydra = launcher_is_hydra()
    process, reports, seconds = launch(3, ["dies"], *(["-print-all-exitcodes"] if hydra else []))
    assert process.returncode != 0 and seconds < DEATH_NOTICED_WITHIN, (process.returncode, seconds, process.stdout)
    if hydra:  # the dead rank's wait status is its exit status << 8; the survivors' are their signals
        assert process.returncode == DYING_EXIT_STATUS or "BAD TERMINATION" in process.stdout, process.stdout
        assert "Exit codes: [" in process.stdout and f",{DYING_EXIT_STATUS << 8}" in process.stdout, process.stdout
    for rank, report in enumerate(reports):
        entry = report["dies"]
        assert not entry["failures"] and "before" in entry["digests"], (rank, entry)
        assert "after" not in entry["digests"], f"rank {rank}: {entry['digests']['after']}"


def mpi_example() -> str:
    """The ```py block of docs/distributed.md's MPI worked example (``py``, not ``python``: it is a
    program for mpiexec, not a block the docs tests run in their own process)."""
    text = open(os.path.join(ROOT, "docs", "distributed.md"), encoding="utf-8").read()
    section = text[text.index("## Worked example: MPI processes"):]
    return re.search(r"^```py\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)


def test_the_mpi_example_of_the_docs_runs_as_written(tmp_path):
    program = tmp_path / "sync_bn_mpi.py"
    program.write_text(mpi_example())
    result, _ = run_mpiexec(["-n", "3", sys.executable, "-m", "mpi4py", str(program)], cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout
    # (the ranks' lines may interleave in mpiexec's output)
    printed = sorted(re.findall(r"rank (\d): running_mean sum (\S+), grad_beta sum ([\d.]+)", result.stdout))
    assert [rank for rank, _, _ in printed] == ["0", "1", "2"], result.stdout
    assert len({(mean, grad) for _, mean, grad in printed}) == 1, result.stdout  # the same sums on every rank
    assert printed[0][2] == "1152.0"  # 8 channels x (2 + 3 + 4 samples) x 16 values, dy = 1


def test_mpiexec_is_found_beside_the_interpreter_first(monkeypatch, tmp_path):
    beside = tmp_path / "mpiexec"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "")
    assert find_mpiexec() == str(beside)
    beside.unlink()
    assert find_mpiexec() is None


def test_a_missing_mpiexec_fails_the_tests_rather_than_skipping_them(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_mpiexec", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="mpi4py is installed but mpiexec is neither beside"):
        launch(2, ["communicator"])


# ---- the launcher itself: what a broken MPI environment costs ----

def test_a_failed_launch_is_shared_by_the_tests_of_its_size_not_repeated(monkeypatch):
    launches = []

    def failing_launch(world_size, scenarios, *extra_options):
        launches.append(world_size)
        pytest.fail(f"mpiexec -n {world_size} did not end within {LAUNCH_TIMEOUT} s")

    monkeypatch.setattr(sys.modules[__name__], "launch", failing_launch)
    monkeypatch.setitem(SCENARIOS, 5, ["reference", "layer", "empty", "faults"])  # a size no other test launches
    for name in SCENARIOS[5]:
        with pytest.raises(pytest.fail.Exception, match="did not end within"):
            check_scenario(5, name, minimum_checks=1)
    assert launches == [5]


@pytest.fixture
def hanging_mpiexec(monkeypatch, tmp_path):
    """An mpiexec that never ends, a launch timeout of 1 s, temporary folders made under tmp_path."""
    script = tmp_path / "mpiexec"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "find_mpiexec", lambda: str(script))
    monkeypatch.setattr(module, "LAUNCH_TIMEOUT", 1)
    monkeypatch.setattr(module, "_HUNG", [], raising=False)
    folders = tmp_path / "folders"
    folders.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folders))
    return folders


def test_a_hung_launch_is_stopped_and_later_launches_fail_at_once(hanging_mpiexec):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not end within 1 s"):
        launch(2, ["faults"])
    assert time.monotonic() - start < 10
    assert list(hanging_mpiexec.iterdir()) == []  # the report folder is removed
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="not launched: an earlier launch .* did not end within 1 s"):
        launch(3, ["faults"])
    assert time.monotonic() - start < 0.5


def test_ctrl_c_during_a_launch_stops_mpiexec_and_removes_the_folder(hanging_mpiexec, monkeypatch):
    started = []

    class InterruptedWhileWaiting(subprocess.Popen):
        def __init__(self, *arguments, **options):
            super().__init__(*arguments, **options)
            started.append(self)

        def communicate(self, input=None, timeout=None):
            if timeout is not None:
                raise KeyboardInterrupt
            return super().communicate(input)

    monkeypatch.setattr(subprocess, "Popen", InterruptedWhileWaiting)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(2, ["faults"])
        assert started[0].wait(timeout=5) is not None  # mpiexec (in its own session) was ended
        assert list(hanging_mpiexec.iterdir()) == []
    finally:
        if started and started[0].poll() is None:
            os.killpg(started[0].pid, signal.SIGKILL)
