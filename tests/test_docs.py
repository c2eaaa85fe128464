"""The Python blocks of docs/ run: those that need no GPU on numpy, the ones marked ``# GPU only``
on the simulated GPU, every ``# prints`` comment checked (conventions: tests/test_readme.py); and
the command lines the docs show exist.

Every guide follows the marker convention. The GPU blocks of docs/usage.md, api.md, modes.md and
troubleshooting.md also run on the simulated GPU; those of migrating-from-cupy.md and
distributed.md need what the simulator does not have (PyTorch on CUDA, NCCL and several GPUs), so
there they are only checked to be marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test_readme import GPU_MARK, ROOT, check_markers, cpu_blocks, python_blocks, run_blocks, run_gpu_blocks

DOCS = os.path.join(ROOT, "docs")
MARKED_DOCS = ["usage.md", "api.md", "modes.md", "troubleshooting.md"]
# guides whose GPU blocks need more than the simulated GPU; their other blocks run as usual
HARDWARE_ONLY_GPU_BLOCKS = ["migrating-from-cupy.md", "distributed.md"]


@pytest.mark.parametrize("name", MARKED_DOCS + HARDWARE_ONLY_GPU_BLOCKS)
def test_doc_blocks_that_need_no_gpu_run(name, monkeypatch, tmp_path):
    path = os.path.join(DOCS, name)
    check_markers(path)
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(cpu_blocks(path))
    if name == "distributed.md":  # the threads ran both ranks: each got its gradients
        assert all(result is not None and len(result) == 3 for result in namespace["out"])
    if name == "migrating-from-cupy.md":  # the one-line change gives the compat module under both names
        assert namespace["cudnn"] is namespace["libcudnn"] and namespace["cudnn"].__name__ == "cudnn_bn.compat"


@pytest.mark.parametrize("name", [
    name for name in MARKED_DOCS if any(block.marker == GPU_MARK for block in python_blocks(os.path.join(DOCS, name)))
])
def test_doc_gpu_blocks_run_on_the_simulated_gpu(name, monkeypatch, tmp_path):
    assert run_gpu_blocks(os.path.join(DOCS, name), monkeypatch, tmp_path) >= 1


def test_the_main_docs_have_runnable_examples():
    for name in ("usage.md", "api.md", "modes.md"):
        assert cpu_blocks(os.path.join(DOCS, name)), f"docs/{name}: no block that runs without a GPU"


def _help(command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cudnn_bn", command, "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_documented_command_line_options_exist():
    documented: dict[str, set] = {"compare": set(), "bench": set(), "info": set()}
    for path in [os.path.join(ROOT, "README.md")] + [os.path.join(DOCS, name) for name in MARKED_DOCS]:
        for line in open(path, encoding="utf-8"):
            for command in documented:
                for match in re.finditer(rf"(?:cudnn-bn|python -m cudnn_bn) {command}\b([^`\n]*)", line):
                    documented[command] |= set(re.findall(r"--[\w-]+", match.group(1)))
    assert documented["compare"] >= {"--require-cudnn", "--dtype"} and "--json" in documented["bench"]
    for command, options in documented.items():
        help_text = _help(command)
        missing = sorted(option for option in options if option not in help_text)
        assert not missing, f"documented options of `cudnn-bn {command}` that it does not have: {missing}"


def test_the_distributed_guide_states_the_counted_host_synchronizations():
    """Host synchronizations are counted, not guessed: the guide's table is the one
    tests/test_sync_budget.py counts on the simulated GPU, and no other sentence gives a count."""
    from test_sync_budget import DISTRIBUTED_WAITS

    text = open(os.path.join(DOCS, "distributed.md"), encoding="utf-8").read()
    section = text.split("### Host synchronizations", 1)[1].split("\n#", 1)[0]
    row = re.compile(r"^\| (device buffers only|host buffers only|both) [^|]*\| (\d+) \| (\d+) \|", re.MULTILINE)
    rows = row.findall(section)
    counted = {name.split(" (")[0]: (forward, backward) for name, (_, forward, backward) in DISTRIBUTED_WAITS.items()}
    assert {name: (int(forward), int(backward)) for name, forward, backward in rows} == counted
    elsewhere = " ".join(text.replace(section, "").split())
    sentences = re.split(r"(?<=[.;:])\s", elsewhere)
    claims = [sentence for sentence in sentences
              if re.search(r"host waits|waits? for the device|synchroni[sz]", sentence, re.IGNORECASE)
              and re.search(r"\b(once|twice|thrice|\d+ times)\b", sentence)]
    assert not claims, claims
