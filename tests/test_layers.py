"""The package's layers, as its folders show them: _core imports nothing above itself, _cudnn only
_core, and neither reaches the public modules or the tools (lower layers never import higher ones)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cudnn_bn"
# folder -> the cudnn_bn sub-packages it may import from (besides itself)
ALLOWED = {"_core": set(), "_cudnn": {"_core"}}


def _imported_packages(path: Path) -> set[str]:
    """The first component under cudnn_bn of every relative import in ``path`` (e.g. "_core", "fused")."""
    here = path.relative_to(PACKAGE).parts[:-1]  # ("_cudnn",)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
            target = base + (node.module.split(".") if node.module else [])
            if not target:  # "from .. import x": the top-level names themselves
                target = [alias.name for alias in node.names]
                found.update(target)
                continue
            found.add(target[0])
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_itself(folder):
    for path in sorted((PACKAGE / folder).glob("*.py")):
        above = _imported_packages(path) - ALLOWED[folder] - {folder}
        assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)}, above its layer"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    module = PACKAGE / "_core" / "layout.py"
    assert _imported_packages(module) <= {"_core"}
    assert {"_cudnn", "_core"} <= _imported_packages(PACKAGE / "_cudnn" / "ops.py")
    assert "_api" in _imported_packages(PACKAGE / "_tools" / "bench.py")  # tools sit on top
