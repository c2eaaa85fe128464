"""README.md: its Python blocks run, its GPU blocks are marked as such, its links and commands are
true, and its one-line GPU validation status is kept by `.ci/gpu-validate` (`.ci/gpu_summary.py`).

The snippet machinery here is shared with tests/test_docs.py. In Markdown, a fenced ``python``
block runs as it is, each block continuing from the ones before it in the same file, unless its
first line is a marker:

- ``# GPU only``: needs CuPy, cuDNN and an NVIDIA GPU. Not run on the CPU path; run on the
  simulated GPU (tests/fake_cudnn.py) instead, in its own sequence.
- ``# needs torch``: run only where PyTorch is importable.

A line ending in ``# prints TEXT`` must print TEXT as one line (``TEXT ...`` : a line starting
with TEXT), in the order written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import stat
import subprocess
import sys
import tokenize

import numpy as np
import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

GPU_MARK = "# GPU only"
TORCH_MARK = "# needs torch"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PRINTS = re.compile(r"#\s*prints (.+?)\s*$")
# what a line prints after the Quickstart's own install, which has no CuPy: checked in a process
# where cupy cannot be imported (test_the_quickstart_prints_what_it_says_after_the_plain_install)
NO_CUPY_PRINTS = re.compile(r"#\s*after `pip install \.` \(no CuPy\) prints (.+?)\s*$")
# what a block that runs on a CPU must not touch
# (matched on code re-spaced by tokenize, so "=" may have spaces around it)
NEEDS_A_GPU = re.compile(r"\bimport cupy\b|\bcupy\.|\bcp\.|\bxp\s*=\s*cupy\b|device\s*=\s*\"cuda\"|\.cuda\(")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    line: int  # of the opening fence, 1-based
    info: str
    source: str

    @property
    def marker(self) -> str | None:
        first = self.source.lstrip().splitlines()[0] if self.source.strip() else ""
        for mark in (GPU_MARK, TORCH_MARK):
            if first.startswith(mark):
                return mark
        return None

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def fenced_blocks(path: str) -> list[Block]:
    text = open(path, encoding="utf-8").read()
    return [Block(path, text.count("\n", 0, match.start()) + 1, match.group(1).strip(), match.group(2))
            for match in FENCE.finditer(text)]


def python_blocks(path: str) -> list[Block]:
    return [block for block in fenced_blocks(path) if block.info.split()[:1] == ["python"]]


def expected_prints(source: str, patterns=(PRINTS,)) -> list[str]:
    """What the lines of ``source`` say they print, in order (a line's first matching pattern)."""
    found = []
    for line in source.splitlines():
        match = next((match for pattern in patterns if (match := pattern.search(line))), None)
        if match:
            found.append(match.group(1))
    return found


def check_prints(block: Block, printed: str, patterns=(PRINTS,)) -> None:
    """Every ``# prints`` of the block, in order, among the lines it printed."""
    lines = printed.splitlines()
    position = 0
    for expected in expected_prints(block.source, patterns):
        prefix = expected.endswith(" ...")
        wanted = expected[:-4] if prefix else expected
        while position < len(lines) and not (lines[position].startswith(wanted) if prefix
                                             else lines[position] == wanted):
            position += 1
        assert position < len(lines), f"{block.where}: expected a printed line {expected!r}; printed:\n{printed}"
        position += 1


def run_blocks(blocks: list[Block], namespace: dict | None = None) -> dict:
    """Run the blocks in order in one namespace, checking their ``# prints``; returns the namespace."""
    namespace = {"__name__": "__doc_snippet__"} if namespace is None else namespace
    for block in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                exec(compile(block.source, block.where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{block.where}: the block raised {type(error).__name__}: {error}\n"
                                     f"{block.source}") from error
        check_prints(block, printed.getvalue())
    return namespace


def cpu_blocks(path: str) -> list[Block]:
    """The blocks that run on a CPU: unmarked ones, and torch ones where torch is importable."""
    has_torch = importlib.util.find_spec("torch") is not None
    return [block for block in python_blocks(path)
            if block.marker is None or (block.marker == TORCH_MARK and has_torch)]


def code_without_comments(source: str) -> str:
    """The block's code, comments dropped (a printed message may name cupy without using it)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return tokenize.untokenize((token.type, token.string) for token in tokens if token.type != tokenize.COMMENT)


def check_markers(path: str) -> None:
    """An unmarked block needs no GPU; a GPU-marked block does need one (or the mark is wrong)."""
    for block in python_blocks(path):
        uses_gpu = bool(NEEDS_A_GPU.search(code_without_comments(block.source)))
        if block.marker is None:
            assert not uses_gpu, f"{block.where}: uses a GPU but its first line is not {GPU_MARK!r}"
        elif block.marker == GPU_MARK:
            assert uses_gpu, f"{block.where}: marked {GPU_MARK!r} but uses no GPU; run it on the CPU instead"


@contextlib.contextmanager
def simulated_cupy(monkeypatch):
    """The simulated GPU, with the ``cupy.random`` functions the docs use (host draws copied to
    the simulated device)."""
    from fake_cudnn import simulated_gpu

    with simulated_gpu(monkeypatch) as simulator:
        cupy = sys.modules["cupy"]
        rng = np.random.default_rng(0)
        random = type(sys)("cupy.random")
        random.standard_normal = lambda size=None, dtype=np.float64: cupy.asarray(
            rng.standard_normal(size, dtype=dtype))
        monkeypatch.setattr(cupy, "random", random, raising=False)
        yield simulator


def run_gpu_blocks(path: str, monkeypatch, tmp_path) -> int:
    blocks = [block for block in python_blocks(path) if block.marker == GPU_MARK]
    if blocks:
        monkeypatch.chdir(tmp_path)
        with simulated_cupy(monkeypatch):
            run_blocks(blocks)
    return len(blocks)


# ---------------------------------------------------------------- the README's blocks ----

def test_readme_python_blocks_that_need_no_gpu_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    blocks = cpu_blocks(README)
    quickstart = [block for block in blocks if "default_rng" in block.source]
    assert quickstart, "README.md: no numpy quickstart block (np.random.default_rng(...), no GPU)"
    assert "dtype=np.float32" in quickstart[0].source and "import cupy" not in quickstart[0].source
    namespace = run_blocks(blocks)
    assert isinstance(namespace["y"], np.ndarray) and str(namespace["saved"].mode) == "SPATIAL"


# cupy as a venv without it has it: importing it raises ModuleNotFoundError("No module named 'cupy'")
WITHOUT_CUPY = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "cupy":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def test_the_quickstart_prints_what_it_says_after_the_plain_install(tmp_path):
    """The Quickstart installs the package without extras, so without CuPy: its blocks run in a
    process where cupy cannot be imported and print what their comments say, the no-CuPy lines
    included."""
    blocks = cpu_blocks(README)
    script = WITHOUT_CUPY + "".join(f"\n# {block.where}\n{block.source}" for block in blocks)
    together = Block(README, blocks[0].line, "python", script)
    assert expected_prints(script, (NO_CUPY_PRINTS,)), "README.md: no line says what it prints without CuPy"
    environment = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    check_prints(together, result.stdout, (NO_CUPY_PRINTS, PRINTS))
    assert "CuPy is not installed (No module named 'cupy')" in result.stdout  # what a venv without CuPy says


def test_readme_gpu_blocks_are_marked_and_run_on_the_simulated_gpu(monkeypatch, tmp_path):
    check_markers(README)
    assert any(block.marker == GPU_MARK for block in python_blocks(README)), "README.md: no marked GPU example"
    assert run_gpu_blocks(README, monkeypatch, tmp_path) >= 1


def test_the_marker_check_catches_an_unmarked_gpu_block_and_a_needless_mark(tmp_path):
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("```python\nimport cupy as cp\nx = cp.ones(3)\n```\n")
    with pytest.raises(AssertionError, match="uses a GPU"):
        check_markers(str(unmarked))
    # the other ways a block needs one
    for line in ('x = torch.ones(3, device="cuda")', "layer = BatchNorm(4, xp=cupy)"):
        unmarked.write_text(f"```python\n{line}\n```\n")
        with pytest.raises(AssertionError, match="uses a GPU"):
            check_markers(str(unmarked))
    needless = tmp_path / "needless.md"
    needless.write_text(f"```python\n{GPU_MARK}\nimport numpy as np\n```\n")
    with pytest.raises(AssertionError, match="uses no GPU"):
        check_markers(str(needless))


def test_a_wrong_prints_comment_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(1 + 1)  # prints 3\n```\n")
    with pytest.raises(AssertionError, match="expected a printed line '3'"):
        run_blocks(python_blocks(str(page)))
    page.write_text("```python\nprint('a long line')  # prints a long ...\nprint(2)  # prints 2\n```\n")
    run_blocks(python_blocks(str(page)))


# ---------------------------------------------------------------- links and commands ----

def _readme() -> str:
    return open(README, encoding="utf-8").read()


def test_readme_links_exist_and_name_the_guides():
    text = _readme()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    missing = [target for target in local if not os.path.exists(os.path.join(ROOT, target))]
    assert not missing, f"README.md links to missing files: {missing}"
    for guide in ("examples/compare_modes.ipynb", "docs/migrating-from-cupy.md", "docs/distributed.md",
                  "docs/gpu-validation.md"):
        assert guide in local, f"README.md does not link {guide}"
    assert "bash .ci/gpu-validate" in text


def test_readme_test_commands_are_what_ci_reads():
    """The block between the ci:test-commands markers, read with .ci/run's own awk program."""
    run_script = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    awk = re.search(r"commands=\$\((awk '.*?' README\.md)\)", run_script)
    assert awk, ".ci/run no longer reads the commands with awk; update this test with it"
    result = subprocess.run(["bash", "-c", awk.group(1)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.splitlines() == ['pip install -e ".[test]"', "python -m pytest", "ruff check ."]


def test_the_readme_says_how_to_get_the_source_and_no_page_keeps_a_bare_placeholder():
    text = _readme()
    assert "## Get the source" in text and text.index("## Get the source") < text.index("## Quickstart")
    section = text[text.index("## Get the source"):text.index("## Quickstart")]
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    urls = list(project.get("urls", {}).values())
    if urls:  # once the project names its address, the README uses it
        assert any(f"git clone {url}" in section for url in urls), urls
    else:
        assert "git clone <repository URL>" in section and "[project.urls]" in section
    assert "pip install <file>" in section  # a wheel or source archive
    assert "`MANIFEST.in`" in section  # the source archive holds what the tests need
    manifest = open(os.path.join(ROOT, "MANIFEST.in"), encoding="utf-8").read().split("\n")
    for folder in ("tests", "docs", "examples", "benchmarks", ".ci"):
        assert f"graft {folder}" in manifest, folder
    assert any(line.startswith("include ") and ".gitignore" in line.split() for line in manifest)
    pages = [README] + [os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                        if name.endswith(".md")]
    for page in pages:
        page_text = open(page, encoding="utf-8").read()
        assert "<this repository>" not in page_text, page
        if "<repository URL>" in page_text and page != README:
            assert "README.md#get-the-source" in page_text, (
                f"{page}: says <repository URL> without pointing to the README")


def test_the_readme_states_what_the_test_install_costs_and_why():
    """The test extra pulls the CUDA wheels (about 3 GB): the README says so next to the command,
    and why, for as long as the extra does."""
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert "cudnn_bn[cuda12]" in extras["test"] and any(r.startswith("nvidia-cudnn-cu12") for r in extras["cuda12"])
    text = _readme()
    after_commands = text[text.index("<!-- /ci:test-commands -->"):]
    note = after_commands[:after_commands.index("\n\n", after_commands.index("The test install"))]
    assert re.search(r"about \d+(\.\d+)? GB", note) and "minutes" in note
    for reason in ("`[cuda12]`", "nvidia-cudnn-cu12", "simulated GPU", "headers"):
        assert reason in note, reason


def test_the_console_script_is_documented_and_is_python_m_cudnn_bn():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    assert project["scripts"] == {"cudnn-bn": "cudnn_bn._tools.cli:main"}
    main_module = open(os.path.join(ROOT, "cudnn_bn", "__main__.py"), encoding="utf-8").read()
    assert "from ._tools.cli import main" in main_module  # python -m cudnn_bn runs the same main
    text = _readme()
    assert "`cudnn-bn`" in text and "python -m cudnn_bn" in text
    for command in ("cudnn-bn info", "cudnn-bn compare", "cudnn-bn bench", "--require-cudnn"):
        assert command in text


def test_the_build_floor_reads_the_license_fields():
    """``license = "MIT"`` (an SPDX expression) with ``license-files`` is PEP 639, which setuptools
    reads from 77.0 on; 76 and older refuse the project ("project.license must be valid exactly by
    one definition") when pip builds without isolation against the installed setuptools."""
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    project, requires = pyproject["project"], pyproject["build-system"]["requires"]
    floors = [re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", requirement) for requirement in requires]
    floors = [int(match.group(1)) for match in floors if match]
    assert len(floors) == 1, requires
    if isinstance(project.get("license"), str) or "license-files" in project:
        assert floors[0] >= 77, requires


NOTEBOOK = "examples/compare_modes.ipynb"


def notebook_command() -> list[str]:
    """The README's command that executes the notebook, as words (tests/test_notebook.py runs it)."""
    commands = re.findall(r"`(jupyter nbconvert [^`]*)`", _readme())
    assert len(commands) == 1, commands
    return shlex.split(commands[0])


def nbconvert_output(words: list[str], cwd: str) -> str:
    """Where ``jupyter nbconvert --to notebook`` writes, by its own rules (nbconvertapp.py): the
    input itself with --inplace; else in --output-dir or the input's folder, named --output
    (".ipynb" added) or after the input, with ".nbconvert" added when neither option is given."""
    options, inputs = {}, []
    position = 2
    while position < len(words):
        word = words[position]
        if word.startswith("--") and "=" in word:
            name, value = word[2:].split("=", 1)
            options[name] = value
        elif word in ("--execute", "--inplace", "--stdout"):
            options[word[2:]] = True
        elif word.startswith("--"):
            options[word[2:]] = words[position + 1]
            position += 1
        else:
            inputs.append(word)
        position += 1
    assert len(inputs) == 1, words
    source = os.path.normpath(os.path.join(cwd, inputs[0]))
    if options.get("inplace"):
        return source
    stem = os.path.splitext(os.path.basename(source))[0]
    if "output" in options:
        name = os.path.splitext(options["output"])[0]
    else:
        name = stem if "output-dir" in options else stem + ".nbconvert"
    name += ".ipynb"
    folder = os.path.join(cwd, options["output-dir"]) if "output-dir" in options else os.path.dirname(source)
    return os.path.normpath(os.path.join(folder, name))


def test_the_notebook_extra_can_execute_the_notebook():
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", requirement)[0] for requirement in extras["notebook"]}
    assert {"nbconvert", "nbclient", "ipykernel", "matplotlib", "scikit-learn"} <= names
    assert "jupyter nbconvert --to notebook --execute" in _readme()


def test_the_documented_notebook_command_does_not_overwrite_the_committed_notebook():
    words = notebook_command()
    assert words[:2] == ["jupyter", "nbconvert"] and NOTEBOOK in words
    committed = os.path.join(ROOT, NOTEBOOK)
    written = nbconvert_output(words, ROOT)  # run from the repository root, as the README's commands are
    assert written != committed, f"{' '.join(words)} writes the committed notebook"
    assert written == os.path.join(ROOT, "build", "notebook", "compare_modes.ipynb")
    assert "`build/notebook/compare_modes.ipynb`" in _readme()
    assert "build/" in open(os.path.join(ROOT, ".gitignore"), encoding="utf-8").read().split()
    # the rules above, on the forms that do name the committed file
    assert nbconvert_output(["jupyter", "nbconvert", "--execute", "--inplace", NOTEBOOK], ROOT) == committed
    assert nbconvert_output(["jupyter", "nbconvert", "--to", "notebook", "--output", "compare_modes", NOTEBOOK],
                            ROOT) == committed
    beside = nbconvert_output(["jupyter", "nbconvert", "--to", "notebook", "--execute", NOTEBOOK], ROOT)
    assert beside == os.path.join(ROOT, "examples", "compare_modes.nbconvert.ipynb")


# ---------------------------------------------------------------- the GPU validation status ----

def _load_summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(ROOT, ".ci", "gpu_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NO_RUN_YET = "**GPU validation: no GPU run yet.**"


def _status(text: str) -> str:
    summary = _load_summary()
    start = text.index(summary.STATUS_START) + len(summary.STATUS_START)
    return text[start:text.index(summary.STATUS_END)].strip()


def test_readme_has_one_status_line_near_the_top_that_a_run_or_a_person_wrote():
    summary = _load_summary()
    text = _readme()
    assert text.count(summary.STATUS_START) == 1 and text.count(summary.STATUS_END) == 1
    assert text.index(summary.STATUS_END) < text.index("\n## "), "the status line belongs above the first section"
    status = _status(text)
    assert "\n" not in status and status
    assert status.startswith(NO_RUN_YET) or re.match(
        r"\*\*GPU validation: (passed|FAILED \(.+?\))\*\* on ", status), status
    # the README and the validation record agree on whether a GPU run exists
    record = open(os.path.join(ROOT, "docs", "gpu-validation.md"), encoding="utf-8").read()
    assert status.startswith(NO_RUN_YET) == ("**No GPU run yet.**" in record)


STUB_PYTHON = r"""#!/usr/bin/env bash
# Stands in for the Python of .ci/gpu-validate's steps: a preflight that reports a GPU (or stops),
# pytest steps that write a junit XML, every other step a success. The orchestrator and the summary
# writer run on the real Python.
case "$*" in
  *gpu_summary.py*) exec "$REAL_PYTHON" "$@" ;;
  *gpu_preflight.py*)
    out=${@: -1}
    printf 'device 0: Stub GPU 80GB\ncudnn_library: 9.28.0\ncupy: 14.2.0\ncudnn_status: usable\n' > "$out/preflight.txt"
    if [ "$STUB_PREFLIGHT" = ok ]; then echo "verdict: ok" >> "$out/preflight.txt"; exit 0; fi
    echo "verdict: STOP (no GPU)" >> "$out/preflight.txt"; exit 1 ;;
  *pytest*--junitxml=*)
    for arg in "$@"; do case $arg in --junitxml=*) junit=${arg#--junitxml=} ;; esac; done
    printf '<testsuites><testsuite time="1.0">' > "$junit"
    printf '<testcase classname="tests.test_a" name="test_one" time="0.5"/>' >> "$junit"
    printf '<testcase classname="tests.test_a" name="test_two" time="0.5">' >> "$junit"
    printf '<skipped message="not here"/></testcase></testsuite></testsuites>' >> "$junit"
    exit "${STUB_SUITE_RC:-0}" ;;
  *) exit 0 ;;
esac
"""


def _gpu_validate(tmp_path, preflight: str, readme_text: str, suite_rc: int = 0):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    before = readme.stat().st_mtime_ns
    environment = dict(os.environ, PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT=str(tmp_path / "out"),
                       GPU_VALIDATE_README=str(readme), STUB_PREFLIGHT=preflight, STUB_SUITE_RC=str(suite_rc))
    environment.pop("CUDNN_BN_REQUIRE_GPU", None)
    result = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu-validate")], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=environment)
    return result, readme, before


README_SAMPLE = f"# title\n\n<!-- gpu-status -->\n{NO_RUN_YET} Nothing ran.\n<!-- /gpu-status -->\n\n## rest\n"


def test_a_gpu_validate_run_rewrites_the_status_line_and_a_stopped_one_does_not(tmp_path):
    (tmp_path / "passing").mkdir()
    result, readme, _ = _gpu_validate(tmp_path / "passing", "ok", README_SAMPLE)
    assert result.returncode == 0, result.stdout[-3000:]
    status = _status(readme.read_text())
    assert status.startswith("**GPU validation: passed** on Stub GPU 80GB, ")
    assert "cuDNN 9.28.0" in status and "CuPy 14.2.0" in status
    assert "smoke passed; suite passed (2 passed, 2 skipped); bench passed" in status  # junit.xml and junit-serial.xml
    assert readme.read_text().replace(status, "") == README_SAMPLE.replace(f"{NO_RUN_YET} Nothing ran.", "")
    assert status in (tmp_path / "passing" / "out" / "summary.md").read_text()

    (tmp_path / "failing").mkdir()
    result, readme, _ = _gpu_validate(tmp_path / "failing", "ok", README_SAMPLE, suite_rc=1)
    assert result.returncode == 1
    assert _status(readme.read_text()).startswith("**GPU validation: FAILED (suite-parallel, suite-serial)** on ")

    (tmp_path / "stopped").mkdir()
    result, readme, before = _gpu_validate(tmp_path / "stopped", "stop", README_SAMPLE)
    assert result.returncode == 2, result.stdout[-3000:]
    assert readme.read_text() == README_SAMPLE and readme.stat().st_mtime_ns == before
    assert "README status not updated" in result.stdout


def _fake_run(out, *, stopped=False) -> str:
    """An output folder and step table as a run that reached the GPU (or was stopped) leaves them."""
    os.makedirs(out, exist_ok=True)
    verdict = "STOP (no GPU)" if stopped else "ok"
    with open(os.path.join(out, "preflight.txt"), "w") as handle:
        handle.write(f"device 0: Stub GPU\ncudnn_library: 9.28.0\ncupy: 14.2.0\nverdict: {verdict}\n")
    with open(os.path.join(out, "gpu-validate.log"), "w") as handle:
        handle.write("0123456789abcdef0123456789abcdef01234567\n")
    steps = os.path.join(out, "..", "steps.tsv")
    rows = [("setup", "preflight", "required", "failed" if stopped else "passed", "1" if stopped else "0", "1.0", "25")]
    if not stopped:
        rows.append(("suite", "suite-parallel", "required", "passed", "0", "2.0", "260"))
    with open(steps, "w") as handle:
        handle.writelines("\t".join(row) + "\n" for row in rows)
    return steps


def test_the_status_line_names_the_commit_and_is_one_line(tmp_path):
    summary = _load_summary()
    readme = tmp_path / "README.md"
    readme.write_text(README_SAMPLE)
    steps = _fake_run(str(tmp_path / "out"))
    assert summary.main([str(tmp_path / "out"), "--steps", steps, "--readme", str(readme)]) == 0
    status = _status(readme.read_text())
    assert "commit 0123456789ab" in status and "no test results recorded" in status
    assert "docs/gpu-validation.md" in status
    with pytest.raises(ValueError, match="one line"):
        summary.replace_status(README_SAMPLE, "two\nlines")


@pytest.mark.parametrize("text", [
    "# no markers\n",
    "<!-- gpu-status -->\nx\n<!-- /gpu-status -->\n<!-- gpu-status -->\ny\n<!-- /gpu-status -->\n",
    "<!-- /gpu-status -->\nx\n<!-- gpu-status -->\n",
], ids=["missing", "twice", "reversed"])
def test_a_readme_without_one_pair_of_markers_is_left_alone(tmp_path, capsys, text):
    summary = _load_summary()
    readme = tmp_path / "README.md"
    readme.write_text(text)
    steps = _fake_run(str(tmp_path / "out"))
    assert summary.main([str(tmp_path / "out"), "--steps", steps, "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    assert "README status not updated" in capsys.readouterr().out


def test_a_run_that_cannot_write_its_summary_leaves_the_readme_alone(tmp_path):
    summary = _load_summary()
    readme = tmp_path / "README.md"
    readme.write_text(README_SAMPLE)
    out = tmp_path / "out"
    steps = _fake_run(str(out))
    (out / "summary.md").mkdir()  # summary.md cannot be written, whoever runs this (root included)
    with pytest.raises(OSError):
        summary.main([str(out), "--steps", steps, "--readme", str(readme)])
    assert readme.read_text() == README_SAMPLE


def test_a_readme_that_cannot_be_replaced_is_left_whole(tmp_path, monkeypatch):
    summary = _load_summary()
    readme = tmp_path / "README.md"
    readme.write_text(README_SAMPLE)

    def refuse(source, target):
        raise PermissionError(13, "read-only file system", target)

    monkeypatch.setattr(summary.os, "replace", refuse)
    message = summary.update_readme(str(readme), "**GPU validation: passed** on a GPU")
    assert message.startswith("README status not updated") and "read-only" in message
    assert readme.read_text() == README_SAMPLE
    assert os.listdir(tmp_path) == ["README.md"]  # no temporary file left behind


def test_an_update_keeps_the_readme_permissions(tmp_path):
    summary = _load_summary()
    readme = tmp_path / "README.md"
    readme.write_text(README_SAMPLE)
    readme.chmod(0o644)
    message = summary.update_readme(str(readme), "**GPU validation: passed** on a GPU")
    assert message.startswith("README status updated")
    assert stat.S_IMODE(readme.stat().st_mode) == 0o644
    assert _status(readme.read_text()) == "**GPU validation: passed** on a GPU"
    message = summary.update_readme(str(readme), "**GPU validation: passed** on a GPU")
    assert message.startswith("README status unchanged")
