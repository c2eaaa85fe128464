"""The command line: info and compare exit 0 without a GPU and print what they found; a failed
row is reported and the rest still runs; --require-cudnn refuses to fall back to the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cudnn_bn._core.tolerances import tolerance
from cudnn_bn._tools import cli

_, FLOAT32_ATOL = tolerance(np.float32)  # compare's default dtype; its errors are absolute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cudnn_bn", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def test_info_exits_zero_and_reports(cudnn_library):
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert f"({cudnn_library.version})" in result.stdout and cudnn_library.path in result.stdout
    assert "backends" in result.stdout and "numpy reference" in result.stdout
    assert "gpu" in result.stdout


def test_compare_reports_every_mode_and_operation_within_tolerance():
    result = _cli("compare", "--reference")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| NC") or line.startswith("| NH")]
    assert len(rows) == 2 * 3 * 3
    for row in rows:
        error = float(row.split("|")[4])
        assert error < FLOAT32_ATOL, row
    assert "NumPy reference" in result.stdout


@pytest.mark.parametrize("command", [("info",), ("compare", "--reference")])
def test_a_closed_pipe_ends_the_command_quietly_with_the_sigpipe_status(command):
    """stdout is a pipe whose reader closed before anything was written (the end of
    ``cudnn-bn compare | head -1`` once head has its line): every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "cudnn_bn", *command], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        os.close(write_end)
    assert result.returncode == cli.CLOSED_PIPE_STATUS == 141
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr  # the interpreter's last flush stays quiet too


def _cli_with_stdout(args, redirect: str):
    """The command run by bash with ``redirect`` applied to its stdout (``>&-``, ``>/dev/full``)."""
    command = " ".join([sys.executable, "-m", "cudnn_bn", *args])
    return subprocess.run(["bash", "-c", f"{command} {redirect}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("command", [("info",), ("compare", "--reference")])
def test_a_command_started_with_stdout_closed_runs_without_a_traceback(command):
    """Python then has no sys.stdout: print writes nowhere, and nothing may assume a stream."""
    result = _cli_with_stdout(command, ">&-")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a device that is always full")
def test_output_that_cannot_be_written_is_one_line_and_the_io_error_status():
    result = _cli_with_stdout(["info"], ">/dev/full")
    assert result.returncode == cli.WRITE_ERROR_STATUS == 74
    assert result.stderr == "python -m cudnn_bn info: could not write its output: [Errno 28] No space left on device\n"


@pytest.mark.parametrize("option", ["--json", "--markdown"])
@pytest.mark.parametrize("where,problem", [
    (lambda tmp: tmp / "missing" / "out", "its folder {tmp}/missing does not exist"),
    (lambda tmp: tmp, "it is a folder"),
], ids=["missing folder", "a folder"])
def test_bench_refuses_an_output_file_it_cannot_write_before_running_anything(monkeypatch, capsys, tmp_path, option,
                                                                             where, problem):
    from cudnn_bn._tools import bench

    monkeypatch.setattr(bench, "run_bench", lambda **_: pytest.fail("the benchmark ran"))
    path = where(tmp_path)
    assert cli.main(["bench", "--quick", option, str(path)]) == 2
    assert capsys.readouterr().err == (f"bench {option}: cannot write {path}: {problem.format(tmp=tmp_path)}; "
                                       "nothing was run\n")


def test_compare_into_head_prints_the_first_line_and_no_traceback():
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m cudnn_bn compare --reference "
                             "| head -1; echo \"statuses ${PIPESTATUS[*]}\""],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    lines = result.stdout.splitlines()
    assert lines[0].startswith("backend: NumPy reference") and len(lines) == 2, result.stdout
    statuses = lines[1].split()[1:]
    assert statuses[0] in ("0", "141") and statuses[1] == "0", statuses  # 0 when head read all before it left
    assert "Traceback" not in result.stderr and "Broken" not in result.stderr, result.stderr


def test_unknown_command_fails():
    assert _cli("frobnicate").returncode != 0


def test_a_machine_without_cupy_or_libcudnn_still_works():
    """Block cupy and point the loader at nothing: the reference, info and compare still work."""
    code = (
        "import sys, runpy; sys.modules['cupy'] = None; sys.argv = ['cudnn_bn', 'info']\n"
        "import numpy as np, cudnn_bn\n"
        "y, saved = cudnn_bn.forward_training(np.arange(8.0).reshape(4, 2), np.ones(2), np.zeros(2))\n"
        "assert saved.mode is cudnn_bn.Mode.PER_ACTIVATION\n"
        "runpy.run_module('cudnn_bn', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, "CUDNN_BN_LIBRARY": "/nonexistent/libcudnn.so.9"})
    assert result.returncode == 0, result.stderr
    assert "cudnn" in result.stdout and "unavailable: CudnnLibraryNotFoundError" in result.stdout
    assert "CuPy is not installed" in result.stdout or "not installed" in result.stdout
    assert "numpy reference only" in result.stdout


def test_require_cudnn_fails_and_says_why_where_cudnn_is_unusable():
    from cudnn_bn._cudnn.availability import cudnn_status

    usable, reason = cudnn_status()
    if usable:
        pytest.skip("cuDNN is usable here")
    for command in ("bench", "compare"):
        result = _cli(command, "--require-cudnn")
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"{command} --require-cudnn: cuDNN is unusable here" in result.stderr and reason in result.stderr
        assert "| " not in result.stdout  # nothing ran on the reference instead


def test_compare_refuses_require_cudnn_with_reference(capsys):
    assert cli.main(["compare", "--reference", "--require-cudnn"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_compare_records_a_failed_row_and_goes_on(monkeypatch, capsys):
    from cudnn_bn._tools import compare

    backward = compare._api.backward

    def fails_on_persistent(x, dy, gamma, saved, **kwargs):
        if saved.mode.name == "SPATIAL_PERSISTENT":
            raise RuntimeError("simulated failure\nmore detail")
        return backward(x, dy, gamma, saved, **kwargs)

    monkeypatch.setattr(compare._api, "backward", fails_on_persistent)
    assert cli.main(["compare", "--reference"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if "failed:" in line]
    assert len(failed) == 2 and all("SPATIAL_PERSISTENT | backward | failed: "
                                    "RuntimeError: simulated failure | - |" in line for line in failed)
    assert len([line for line in captured.out.splitlines() if line.startswith(("| NCHW", "| NHWC"))]) == 2 * 3 * 3
    assert "2 row(s) failed" in captured.err


def test_compare_on_the_simulated_gpu_records_a_refused_row(monkeypatch, cudnn_library):
    from cudnn_bn._cudnn import raw
    from cudnn_bn._tools.compare import run_compare
    from fake_cudnn import simulated_gpu

    def refused(*args):
        raw.check_status("cudnnBatchNormalizationForwardInference", raw.Status.NOT_SUPPORTED, "refused by the test")

    with simulated_gpu(monkeypatch):
        monkeypatch.setattr(raw.library(), "cudnnBatchNormalizationForwardInference", refused)
        backend, rows = run_compare(np.float32)
    assert backend == "cuDNN on CuPy arrays" and len(rows) == 2 * 3 * 3
    failed = [row for row in rows if "error" in row]
    assert {row["operation"] for row in failed} == {"forward_inference"} and len(failed) == 6
    assert all(row["error"].startswith("CudnnNotSupportedError: cudnnBatchNormalizationForwardInference")
               for row in failed)
    assert all(row["max_abs_error"] < FLOAT32_ATOL for row in rows if "error" not in row)


def test_bench_torch_fails_clearly_where_torch_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert cli.main(["bench", "--torch"]) == 2
    assert "bench --torch: PyTorch is not importable here" in capsys.readouterr().err


def test_the_console_script_names_itself_in_its_help():
    import shutil

    script = shutil.which("cudnn-bn")
    if script is None:
        import pytest

        pytest.skip("the cudnn-bn console script is not installed in this environment")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: cudnn-bn ")
    assert _cli("--help").stdout.startswith("usage: python -m cudnn_bn ")
