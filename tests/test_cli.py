"""The command line: info and compare exit 0 without a GPU and print what they found."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cudnn_bn", *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})


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
        assert error < 1e-4, row
    assert "NumPy reference" in result.stdout


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
