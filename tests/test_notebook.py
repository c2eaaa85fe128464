"""examples/compare_modes.ipynb executes top to bottom (reference backend on a CPU) and reports
sensible results."""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "compare_modes.ipynb")


def test_notebook_executes_and_trains_every_mode(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=110, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 2  # the speed plot and the training curves
    summary = json.loads([o.text for o in outputs if o.output_type == "stream"][-1].strip().splitlines()[-1])
    assert set(summary["final_test_accuracy"]) == {"per_activation", "spatial", "spatial_persistent"}
    assert min(summary["final_test_accuracy"].values()) > 0.9
    assert summary["max_accuracy_error"] < 1e-4
    assert "GPU" in summary["speed_source"] or "NumPy reference" in summary["speed_source"]
