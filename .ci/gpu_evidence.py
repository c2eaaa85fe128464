"""What a `.ci/gpu-validate` run leaves behind, in one place: the evidence files, the records its
checks stream as they happen, and how a step runs on the simulated GPU instead of a GPU.

Needs only the standard library (the summary writer imports it on any machine); the simulated GPU
is imported only when asked for.

A run leaves at most ``len(EVIDENCE_FILES)`` files in its output folder, each at most
``MAX_FILE_BYTES``, all of them at most ``MAX_TOTAL_BYTES``, directly in the folder, with names of
letters, digits, ``.``, ``_`` and ``-``: what a GPU machine lets come back from one command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOG = "gpu-validate.log"  # everything, unbuffered: every step's output and its start and end
STEPS = "steps.tsv"  # one row per step as it ends: tier, step, kind, result, exit, seconds, limit
SUMMARY = "summary.md"
PREFLIGHT = "preflight.txt"  # `key: value` lines, written one by one
CHECKS = "checks.jsonl"  # one JSON record per line: smoke checks, limit probes, query timing
JUNIT = "junit.xml"  # the suite's parallel step
JUNIT_SERIAL = "junit-serial.xml"  # the suite's serial step
BENCH = "bench.json"
EVIDENCE_FILES = (LOG, STEPS, SUMMARY, PREFLIGHT, CHECKS, JUNIT, JUNIT_SERIAL, BENCH)

MAX_FILES = 8
MAX_FILE_BYTES = 16 << 20
MAX_TOTAL_BYTES = 64 << 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")

SIMULATED_GPU_VARIABLE = "CUDNN_BN_SIMULATED_GPU"  # also read by tests/conftest.py for the suite
HANG_VARIABLE = "GPU_VALIDATE_HANG"  # test hook: "CHECK@SECONDS", see hang_request()
FAULT_VARIABLE = "GPU_VALIDATE_FAULT"  # test hook: "CHECK:crash" or "CHECK:hang@SECONDS", see fault_request()

# the batch-norm entry points of cuDNN that cudnn_bn calls; the smoke tier calls each of them
BATCH_NORM_ENTRY_POINTS = (
    "cudnnBatchNormalizationForwardTraining",
    "cudnnBatchNormalizationForwardInference",
    "cudnnBatchNormalizationBackward",
    "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize",
    "cudnnGetBatchNormalizationBackwardExWorkspaceSize",
    "cudnnGetBatchNormalizationTrainingExReserveSpaceSize",
    "cudnnBatchNormalizationForwardTrainingEx",
    "cudnnBatchNormalizationBackwardEx",
)
EX_OPS_ENTRY_POINTS = ("cudnnBatchNormalizationForwardTrainingEx", "cudnnBatchNormalizationBackwardEx")
BN_OPS_NAMES = {0: "BN", 1: "BN_ACTIVATION", 2: "BN_ADD_ACTIVATION"}  # cudnnBatchNormOps_t


def expected_entry_points() -> list[str]:
    """Every entry point the smoke tier must call, the Ex kernels once per bnOps."""
    names = [name for name in BATCH_NORM_ENTRY_POINTS if name not in EX_OPS_ENTRY_POINTS]
    names += [f"{name}(bnOps={ops})" for name in EX_OPS_ENTRY_POINTS for ops in BN_OPS_NAMES.values()]
    return names


def simulated() -> bool:
    """Whether this run is on the simulated GPU (the switch the orchestrator sets for --simulate)."""
    return os.environ.get(SIMULATED_GPU_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def gpu_of_this_run():
    """Nothing on a GPU machine; on the simulated GPU, tests/fake_cudnn.py installed for the block
    (its fake cupy in sys.modules and its entry points on the loaded libcudnn)."""
    if not simulated():
        yield None
        return
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from fake_cudnn import simulated_gpu

    with simulated_gpu() as simulator:
        yield simulator


def hang_request() -> tuple[str, int] | None:
    """(check, seconds) from GPU_VALIDATE_HANG="CHECK@SECONDS": a test hook that makes the smoke
    check CHECK hang when it is reached and limits the smoke-checks step to SECONDS, so that the
    cut of a hung step can be rehearsed in seconds. None when unset."""
    text = os.environ.get(HANG_VARIABLE, "").strip()
    if not text:
        return None
    check, separator, seconds = text.partition("@")
    if not separator or not check or not seconds.isdigit() or int(seconds) < 1:
        raise ValueError(f"{HANG_VARIABLE}: expected CHECK@SECONDS (e.g. overflow-flag@5), got {text!r}")
    return check, int(seconds)


def fault_request() -> tuple[str, str, int | None] | None:
    """(check, "crash" or "hang", seconds) from GPU_VALIDATE_FAULT, a test hook of the smoke checks:
    "CHECK:crash" makes the process running the checks die of SIGSEGV in a native call when CHECK
    is reached; "CHECK:hang@SECONDS" makes CHECK hang and limits each check to SECONDS. None when
    unset."""
    text = os.environ.get(FAULT_VARIABLE, "").strip()
    if not text:
        return None
    check, _, what = text.partition(":")
    kind, _, seconds = what.partition("@")
    timed = seconds.isdigit()
    if not check or kind not in ("crash", "hang") or (kind == "hang") != timed or (timed and int(seconds) < 1):
        raise ValueError(
            f"{FAULT_VARIABLE}: expected CHECK:crash or CHECK:hang@SECONDS (e.g. compat:hang@3), got {text!r}"
        )
    return check, kind, int(seconds) if seconds else None


class RecordWriter:
    """JSON records appended to a file one line at a time and flushed at once, so that a crash or
    a cut keeps every record written before it; each is echoed to stdout (the run's log). Threads
    may share one writer."""

    def __init__(self, path: str, **common):
        self.path, self.common = path, common
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, **fields) -> dict:
        record = {**self.common, **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            print(f"[record] {line}", flush=True)
        return record

    def start_a_line(self) -> None:
        """End a line that another process left unfinished when it died, so that the next record
        is not glued to it (read_records skips only the cut line)."""
        with self._lock, open(self.path, "rb") as reader:
            size = reader.seek(0, os.SEEK_END)
            if size:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    self._file.write("\n")
                    self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str) -> list[dict]:
    """The records of a JSON-lines file; a line cut off by a crash is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def evidence_problems(folder: str) -> list[str]:
    """What in ``folder`` would not come back from a GPU machine (empty when all of it would)."""
    problems, total, count = [], 0, 0
    for directory, folders, files in os.walk(folder):
        depth = os.path.relpath(directory, folder).count(os.sep) + (directory != folder)
        if depth > 2:
            problems.append(f"{directory}: more than 2 folders deep")
        for name in folders + files:
            if not NAME_PATTERN.match(name):
                problems.append(f"{name!r}: a name of other characters than letters, digits, '.', '_' and '-'")
        for name in files:
            size = os.path.getsize(os.path.join(directory, name))
            count, total = count + 1, total + size
            if size > MAX_FILE_BYTES:
                problems.append(f"{name}: {size} bytes, more than {MAX_FILE_BYTES}")
    if count > MAX_FILES:
        problems.append(f"{count} files, more than {MAX_FILES}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all, more than {MAX_TOTAL_BYTES}")
    return problems


TEMPORARY_SUFFIXES = (".tmp", ".trimmed")  # a file written whole, then renamed over its evidence file


def remove_temporaries(folder: str) -> list[str]:
    """Remove what a step cut between writing and renaming left of an evidence file (bench.json.tmp):
    a ninth file would not come back. Only those names are touched; the names removed."""
    removed = []
    for name in EVIDENCE_FILES:
        for suffix in TEMPORARY_SUFFIXES:
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(name + suffix)
    return removed


def trim_to_limit(path: str, limit: int = MAX_FILE_BYTES) -> bool:
    """Cut a text file that outgrew ``limit`` to its first and last parts (a note between them
    says how much was left out); True when it was cut."""
    size = os.path.getsize(path)
    if size <= limit:
        return False
    keep = limit // 2 - 4096
    with open(path, "rb") as handle:
        head = handle.read(keep)
        handle.seek(size - keep)
        tail = handle.read()
    note = f"\n\n[... {size - 2 * keep} bytes left out here so that the file fits {limit} bytes ...]\n\n".encode()
    temporary = path + ".trimmed"
    with open(temporary, "wb") as handle:
        handle.write(head + note + tail)
    os.replace(temporary, path)
    return True


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
