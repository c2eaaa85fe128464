"""examples/compare_modes.ipynb: committed executed and labelled with where it ran, public API
only, every plot saying what it can and cannot show without a GPU; and it executes top to bottom
(here through nbconvert, as `jupyter nbconvert --execute` runs it) with sensible results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cudnn_bn._core.tolerances import tolerance
from test_readme import nbconvert_output, notebook_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "compare_modes.ipynb")
# cudnn_bn._cudnn, cudnn_bn.layer._host, from cudnn_bn import _api; not cudnn_bn.__version__
PRIVATE_NAME = re.compile(r"\bcudnn_bn(?:\.\w+)*\s*\.\s*_(?!_)\w*|from\s+cudnn_bn\S*\s+import\s+\(?\s*_(?!_)\w*")


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _text(output: dict) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def _has_image(cell: dict) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell["outputs"])


def _summary(notebook: dict) -> dict:
    last = [output for output in _code_cells(notebook)[-1]["outputs"] if output["output_type"] == "stream"]
    assert last, "the last cell printed no summary"
    return json.loads(_text(last[-1]).strip().splitlines()[-1])


def _committed() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as handle:
        return json.load(handle)


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_notebook_uses_public_api_only():
    sources = "\n".join(_source(cell) for cell in _code_cells(_committed()))
    assert "cudnn_bn.cudnn_available()" in sources
    private = PRIVATE_NAME.findall(sources)
    assert not private, f"the notebook uses private names: {private}"


def test_every_plot_says_what_it_can_and_cannot_show_without_a_gpu():
    plotting = [cell for cell in _code_cells(_committed()) if "plt." in _source(cell)]
    assert len(plotting) >= 4  # statistics, accuracy, time, training curves
    for cell in plotting:
        source = _source(cell)
        assert re.search(r"[Cc]annot show", source), f"a plot does not say what it cannot show:\n{source[:300]}"
        assert "CPU" in source and ("GPU" in source or "ON_GPU" in source), (
            f"a plot is not labelled by device:\n{source[:300]}")


def test_committed_notebook_is_executed_with_its_plots_and_says_where():
    notebook = _committed()
    cells = _code_cells(notebook)
    assert all(cell["execution_count"] is not None for cell in cells), "commit the notebook executed"
    assert not [output for cell in cells for output in cell["outputs"] if output["output_type"] == "error"]
    assert sum(_has_image(cell) for cell in cells) >= 4
    where = "".join(_text(output) for output in cells[0]["outputs"])
    assert re.match(r"Executed on (CPU|GPU): ", where), where
    summary = _summary(notebook)
    assert summary["executed_on"] in where
    assert (summary["backend"] == "cudnn") == where.startswith("Executed on GPU")


def test_notebook_executes_with_nbconvert_and_shows_what_differs_between_modes(tmp_path):
    pytest.importorskip("nbconvert")  # in the notebook extra, which the test extra includes
    pytest.importorskip("sklearn")
    environment = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       MPLBACKEND="module://matplotlib_inline.backend_inline")
    # the README's command as written, run from a folder that stands for the repository root
    # (its notebook a link to the real one), so that what it writes lands in tmp_path
    os.symlink(os.path.dirname(NOTEBOOK), tmp_path / "examples")
    with open(NOTEBOOK, "rb") as handle:
        committed = handle.read()
    words = notebook_command()
    command = [sys.executable, "-m", "nbconvert", *words[2:], "--ExecutePreprocessor.timeout=110"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    written = nbconvert_output(words, str(tmp_path))
    assert os.path.commonpath([written, str(tmp_path)]) == str(tmp_path)
    assert os.path.realpath(written) != os.path.realpath(NOTEBOOK)
    with open(NOTEBOOK, "rb") as handle:
        assert handle.read() == committed, "the README's command rewrote the committed notebook"
    with open(written, encoding="utf-8") as handle:
        notebook = json.load(handle)
    cells = _code_cells(notebook)
    assert not [output for cell in cells for output in cell["outputs"] if output["output_type"] == "error"]
    assert sum(_has_image(cell) for cell in cells) >= 4
    summary = _summary(notebook)
    # what differs between the modes, on any machine
    assert summary["statistics_shapes"] == {"PER_ACTIVATION": [2, 6, 6], "SPATIAL": [2], "SPATIAL_PERSISTENT": [2]}
    assert summary["persistent_backward"] == {"without_saved": "ValueError", "with_saved": "ran"}
    assert summary["auto_training_choice"] == {
        "2-D (N, C)": "PER_ACTIVATION", "NCHW": "SPATIAL", "NHWC (channels-last)": "SPATIAL_PERSISTENT"}
    assert set(summary["final_test_accuracy"]) == {"per_activation", "spatial", "spatial_persistent"}
    assert min(summary["final_test_accuracy"].values()) > 0.9
    assert summary["max_accuracy_error"] < tolerance(np.float32)[1]  # float32 data, absolute errors
    assert set(summary["timed_calls_ms"]) == {"PER_ACTIVATION", "SPATIAL", "SPATIAL_PERSISTENT"}
    if summary["backend"] == "reference":
        # the same reference code runs both spatial modes: the notebook must say so, and it is exact
        assert summary["spatial_persistent_vs_spatial"] == 0.0
        assert summary["spatial_vs_persistent_curve_difference"] == 0.0
        assert summary["executed_on"].startswith("CPU: ")
