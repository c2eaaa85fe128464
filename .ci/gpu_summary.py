"""Summary of a `.ci/gpu-validate` run: Markdown ready to paste into docs/gpu-validation.md.

    python .ci/gpu_summary.py OUT_FOLDER [--steps STEPS_TSV] [--readme README.md] [--simulated]

Reads what the run left in the output folder (.ci/gpu_evidence.py names the files) and the step
table (tab-separated: tier, step, kind, result, exit status, seconds, limit), writes
OUT_FOLDER/summary.md and prints it. Every input may be missing or partial (a crash, a cut): the
summary then says so instead of failing. Needs only the standard library, so it runs anywhere.
The run's verdict and exit status are decided here, in :func:`exit_status`, for the summary and
for the run alike.

With ``--readme``, a run on a GPU that got past the preflight also rewrites the README's one-line
validation status, between ``<!-- gpu-status -->`` and ``<!-- /gpu-status -->``, after summary.md
is written. A run on the simulated GPU (``--simulated``), a run the preflight stopped, a run whose
summary could not be written, and a README without exactly one pair of markers leave the README
as it was; the README is replaced atomically, so it is never half-written.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)

TIERS = ("smoke", "suite", "bench")
STEP_FIELDS = ("tier", "name", "kind", "result", "exit", "seconds", "limit")
FINE = ("passed", "simulated")  # a step that ran and passed: on a GPU, or on the simulated GPU
NOT_RUN = "not-run"
PREFLIGHT_UNUSABLE = 1  # the preflight's exit status when cuDNN is not usable (.ci/gpu_preflight.py)
# pytest -v lines: "tests/x.py::t PASSED [ 1%]" in one process, "[gw3] [ 45%] PASSED tests/x.py::t" with xdist
VERBOSE_OUTCOME = re.compile(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))?")
XDIST_OUTCOME = re.compile(r"^\[gw\d+\] (?:\[\s*\d+%\] )?(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/\S+::\S+)")
XDIST_CRASH = re.compile(r"worker '?(gw\d+)'? crashed while running '?(tests/[^'\s]+)'?")
XDIST_NODE_DOWN = re.compile(r"^\[gw\d+\] node down: ")
# "8 workers [323 items]" with xdist; "collected 3939 items / 3935 deselected / 4 selected" in one process
SELECTED = re.compile(r"^\d+ workers \[(\d+) items?\]|^collect.*collected \d+ items? / \d+ deselected / (\d+) selected|"
                      r"^collect.*collected (\d+) items?$")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
STATUS_START, STATUS_END = "<!-- gpu-status -->", "<!-- /gpu-status -->"
GPU_VALIDATION_DOC = "docs/gpu-validation.md"
NEEDS_A_GPU = "needs a GPU"


def first_line(text) -> str:
    for line in str(text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


# ---------------------------------------------------------------- inputs ----

def read_steps(path: str | None) -> list[dict]:
    steps = []
    for line in (_read(path) or "").splitlines() if path else []:
        fields = line.split("\t")
        if len(fields) == len(STEP_FIELDS):
            steps.append(dict(zip(STEP_FIELDS, fields)))
    return steps


def read_preflight(path: str) -> dict:
    facts = {}
    for line in (_read(path) or "").splitlines():
        key, separator, value = line.partition(": ")
        if separator:
            facts[key] = value  # a key written twice (a "checking ..." line, then the result) keeps the last
    return facts


def _node_id(case) -> str:
    classname, name = case.get("classname", ""), case.get("name", "")
    module, _, klass = classname.partition(".Test")
    path = module.replace(".", "/") + ".py"
    return f"{path}::Test{klass}::{name}" if klass else f"{path}::{name}"


def read_junit(path: str) -> dict | None:
    """Test cases of a pytest junit XML: node id, outcome, first line of the message, seconds, properties."""
    text = _read(path)
    if text is None:
        return None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        return {"cases": [], "seconds": 0.0, "error": f"junit XML unreadable: {error}"}
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if tag == "skipped" and element.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                message = first_line(element.get("message")) or first_line(element.text)
                break
        properties = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        cases.append(dict(node_id=_node_id(case), outcome=outcome, message=message,
                          seconds=float(case.get("time") or 0.0), properties=properties))
    suite_seconds = sum(float(suite.get("time") or 0.0) for suite in root.iter("testsuite"))
    return {"cases": cases, "seconds": suite_seconds}


def tests_executed(path: str) -> bool:
    """Whether the junit XML at ``path`` records a test that ran (passed, failed or erred): all
    skipped, none collected, or no XML at all gives no verdict."""
    junit = read_junit(path)
    return bool(junit) and any(case["outcome"] in ("passed", "failed", "error") for case in junit["cases"])


def read_verbose_log(log: str) -> dict:
    """What pytest's -v output says (one process, or pytest-xdist workers): outcomes by node id,
    the tests started and never finished (in the order they started; with workers, the ones each
    was running when the step ended), the tests a crashed worker was running, how many tests were
    selected, how many workers went down, and whether xdist stopped replacing them."""
    cases, started, crashed = {}, {}, []
    names = {"XFAIL": "xfailed", "XPASS": "passed", "ERROR": "error"}
    selected = None
    for line in log.splitlines():
        xdist = XDIST_OUTCOME.match(line)
        if xdist:
            outcome, node_id = xdist.groups()
            cases[node_id] = names.get(outcome, outcome.lower())
            continue
        crash = XDIST_CRASH.search(line)
        if crash:
            crashed.append(crash.group(2))
            continue
        count = SELECTED.search(line)
        if count:
            selected = int(next(group for group in count.groups() if group is not None))
            continue
        match = VERBOSE_OUTCOME.match(line)
        if not match:
            continue
        node_id, outcome = match.groups()
        if outcome:
            cases[node_id] = names.get(outcome, outcome.lower())
        else:
            started[node_id] = None
    unfinished = [node_id for node_id in started if node_id not in cases]
    exhausted = (line.strip() for line in log.splitlines() if "maximum crashed workers reached" in line)
    return {"outcomes": cases, "unfinished": unfinished, "crashed": list(dict.fromkeys(crashed)), "selected": selected,
            "workers_down": sum(1 for line in log.splitlines() if XDIST_NODE_DOWN.match(line)),
            "workers_exhausted": next(exhausted, None)}


def step_output(log: str, tier: str, step: str) -> str:
    """The part of the run's log that one step printed: from its start line to the next step line."""
    start = log.find(f"[gpu-validate] step {tier}/{step}: start")
    if start < 0:
        return ""
    end = log.find("\n[gpu-validate] step ", start + 1)
    return log[start:] if end < 0 else log[start:end]


def pytest_plugins_line(log: str) -> str:
    """pytest's own header lines: its version and the plugins it loaded."""
    headers = ("This is pytest version", "platform ", "plugins: ")
    found = [line.strip() for line in log.splitlines() if line.startswith(headers)]
    return "; ".join(dict.fromkeys(found))


def read_json(path: str):
    text = _read(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return {"unreadable": f"{error} (the file may have been cut off)"}


# ---------------------------------------------------------------- the verdict ----

def preflight_stopped(steps: list[dict], preflight: dict) -> bool:
    """Whether the preflight stopped the run: its verdict in preflight.txt is STOP (no usable
    cuDNN), or it exited 1 without a verdict. A preflight that crashed or was cut at its limit
    did not stop the run: the tiers ran for the evidence, and the preflight's failure fails it."""
    if preflight.get("verdict", "").startswith("STOP"):
        return True
    row = next((step for step in steps if step["name"] == "preflight"), None)
    return row is not None and row["exit"] == str(PREFLIGHT_UNUSABLE) and "verdict" not in preflight


def failed_steps(steps: list[dict]) -> list[str]:
    return [step["name"] for step in steps if step["kind"] == "required" and step["result"] not in FINE + (NOT_RUN,)]


def tier_results(steps: list[dict]) -> dict:
    """tier -> "passed", "simulated", "failed" or "not run" (only tiers with steps in the table)."""
    results = {}
    for tier in TIERS:
        mine = [step for step in steps if step["tier"] == tier]
        if not mine:
            continue
        if all(step["result"] == NOT_RUN for step in mine):
            results[tier] = "not run"
        elif any(step["kind"] == "required" and step["result"] not in FINE for step in mine):
            results[tier] = "failed"
        else:
            results[tier] = "simulated" if any(step["result"] == "simulated" for step in mine) else "passed"
    return results


def exit_status(steps: list[dict], preflight: dict, simulated: bool) -> tuple[int, str]:
    """(exit status, verdict) of a run: 0 every tier ran and passed; 1 something failed, or a
    simulated run executed nothing; 2 the preflight stopped the run; 3 what ran passed, but a
    tier did not run. The one place this is decided."""
    if not steps:
        return 1, "UNKNOWN (no step table)"
    if preflight_stopped(steps, preflight):
        return 2, "NOT RUN: the preflight stopped the validation"
    failed = failed_steps(steps)
    if failed:
        return 1, "FAIL (" + ", ".join(failed) + ")"
    tiers = tier_results(steps)
    not_run = [tier for tier, result in tiers.items() if result == "not run"]
    if not_run:
        return 3, f"INCOMPLETE (what ran passed; not run: {', '.join(not_run)})"
    if not tiers:  # a run of the setup steps alone gives no verdict
        return 1, "FAIL (no tier ran" + (" on the simulated GPU)" if simulated else ")")
    if simulated:
        return 0, "REHEARSED (every tier ran on the simulated GPU and passed there; no GPU result)"
    return 0, "PASS (every tier ran and passed)"


# ---------------------------------------------------------------- sections ----

def _devices(preflight: dict) -> list[str]:
    return [value for key, value in preflight.items() if key.startswith("device ")]


def _result_text(result: str) -> str:
    """A step's result in words: "simulated" is a pass on the simulated GPU, never on a GPU."""
    return "passed on the simulated GPU" if result == "simulated" else result.replace("-", " ")


def _tier_text(result: str) -> str:
    return "passed on the simulated GPU" if result == "simulated" else result


def section_header(preflight: dict, steps: list[dict], log: str, simulated: bool) -> list[str]:
    _, verdict = exit_status(steps, preflight, simulated)
    title = "GPU validation rehearsal on the simulated GPU" if simulated else "GPU validation run"
    lines = [f"### {title}: {verdict}", ""]
    if simulated:
        lines += ["**Simulated.** Every step below ran on the simulated GPU of tests/fake_cudnn.py (host memory, "
                  "real cuDNN descriptors, the reference's numbers) on a machine without a GPU: it proves the "
                  "validation's plumbing, not cuDNN. Nothing here is a GPU result.", ""]
    lines += [
        f"- GPU: {'; '.join(_devices(preflight)) or preflight.get('devices', 'unknown')}",
        f"- CUDA driver {preflight.get('cuda_driver', '?')}, runtime {preflight.get('cuda_runtime', '?')}; "
        f"cuDNN {preflight.get('cudnn_library', '?')}",
        f"- CuPy {preflight.get('cupy', '?')}; NumPy {preflight.get('numpy', '?')}; "
        f"Python {preflight.get('python', '?')}",
        f"- pytest: {pytest_plugins_line(log) or 'not recorded'}",
        f"- preflight: {preflight.get('verdict', 'no preflight.txt')}; "
        f"cudnn_status: {preflight.get('cudnn_status', '?')}; "
        f"float16 kernel: {preflight.get('float16_kernel', '?')}; first call: {preflight.get('first_call', '?')}",
    ]
    source = re.search(r"source fingerprint: (\w+)", log)
    lines.append(
        f"- source: commit {source_commit(log) or 'unknown'}, fingerprint {source.group(1) if source else 'unknown'}"
    )
    tiers = tier_results(steps)
    lines += ["", *table(["tier", "result", "seconds", "limits of its own steps, s"],
                         [[tier, _tier_text(tiers.get(tier, "not asked for")),
                           f"{sum(float(s['seconds']) for s in steps if s['tier'] == tier):.1f}",
                           sum(int(s["limit"]) for s in steps if s["tier"] == tier)] for tier in TIERS])]
    if steps:
        lines += ["", *table(["tier", "step", "kind", "result", "exit", "seconds", "limit"],
                             [[s["tier"], s["name"], s["kind"], _result_text(s["result"]), s["exit"], s["seconds"],
                               s["limit"]] for s in steps])]
    return lines


def section_checks(records: list[dict], simulated: bool) -> list[str]:
    """The smoke tier's checks: one row each, the entry points they called, the overflow flag,
    host time."""
    lines = ["", "#### Smoke checks (.ci/gpu_smoke.py)"]
    checks = [r for r in records if r.get("kind") == "check"]
    if not checks:
        return lines + ["No check recorded (the step did not run, or died before its first check)."]
    started = [r["check"] for r in checks if r.get("event") == "start"]
    ended = {r["check"]: r for r in checks if r.get("event") == "end"}
    counts = collections.Counter(r["outcome"] for r in ended.values())
    passed = "passed on the simulated GPU" if simulated else "passed"
    summary = (
        f"{len(ended)} checks: {counts['passed']} {passed}, {counts['failed']} failed, {counts[NEEDS_A_GPU]} need a GPU"
    )
    unfinished = [name for name in started if name not in ended]
    if unfinished:
        never_finished = ", ".join(f"`{name}`" for name in unfinished)
        summary += f"; started and never finished (hung, crashed or cut): {never_finished}"
    lines.append(summary + ".")
    rows = []
    for name in started:
        record = ended.get(name)
        if record is None:
            rows.append([name, "did not finish", "-", "-"])
            continue
        outcome = passed if record["outcome"] == "passed" else record["outcome"]
        rows.append([name, outcome, record.get("seconds", "-"), _check_detail(record)[:300]])
    lines += ["", *table(["check", "outcome", "seconds", "detail"], rows)]
    points = next((r for r in records if r.get("kind") == "entry-points"), None)
    if points:
        called = points.get("called", {})
        lines += ["", "cuDNN batch-norm entry points called by the smoke checks (the Ex kernels by bnOps): "
                  + "; ".join(f"`{name}` x{count}" for name, count in sorted(called.items())) + "."]
        lines.append(
            f"Not called: {', '.join(points['missing'])}." if points.get("missing") else "Every entry point was called."
        )
    else:
        lines += ["", "No entry-point count (the checks did not finish)."]
    flags = [r for r in ended.values() if "flag_raised" in r]
    if flags:
        lines += ["", "SPATIAL_PERSISTENT overflow flag on ordinary data (uniform in [-2, 2], 32x64x56x56):", ""]
        lines += table(
            ["case", "flag raised", "what followed"],
            [[r["check"].replace("overflow-flag-", ""), r["flag_raised"], r.get("detail", "")] for r in flags],
        )
    return lines


def _check_detail(record: dict) -> str:
    """A check's own words, else its largest difference from the float64 reference."""
    differences = record.get("max_abs_difference") or {}
    if record.get("detail") or not differences:
        return record.get("detail", "")
    name = max(differences, key=differences.get)
    return f"largest abs difference from the float64 reference: {name} {differences[name]:g}"


def section_limits(records: list[dict]) -> list[str]:
    lines = ["", "#### Limit probes (.ci/gpu_probes.py --set limits)"]
    rows = [r for r in records if r.get("kind") == "limit-verdict"]
    problems = [r for r in records if r.get("kind") == "problem" and r.get("step") == "limit-probes"]
    if not rows and not problems:
        return lines + ["No verdict recorded (the step did not run, or died first)."]
    if rows:
        lines += ["", "cuDNN called directly at each edge, bypassing the package's routing; every result against "
                  "float64:", ""]
        lines += table(["limit", "case", "within the limit", "past the limit", "still holds?"],
                       [[r["limit"], r["case"], r["within"], r["past"], r["holds"]] for r in rows])
    lines += [f"- problem: {r['group']}: {r['problem']} (last output: {r.get('last_output', '')})" for r in problems]
    return lines


SUITE_STEPS = (("suite-parallel", evidence.JUNIT, "on pytest-xdist workers where the plugin is installed"),
               ("suite-serial", evidence.JUNIT_SERIAL, "the gpu_serial tests, alone"))


def _suite_step_lines(name: str, about: str, junit: dict | None, output: str, simulated: bool) -> list[str]:
    """One pytest step: its counts (from its junit XML, else from its verbose output) against the
    tests it selected, and what its output says of tests and workers that did not finish."""
    lines = ["", f"{name} ({about}):"]
    if not output and junit is None:
        return lines + ["Not run."]
    verbose = read_verbose_log(output)
    where = " on the simulated GPU" if simulated else ""
    if junit is None:
        counts = collections.Counter(verbose["outcomes"].values())
        reported = len(verbose["outcomes"])
        text = "No junit XML: pytest did not finish (crash, kill or cut). From its verbose output: "
        lines.append(text + (", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o]) or "no test reported") + ".")
    else:
        if "error" in junit:
            lines.append(junit["error"])
        counts = collections.Counter(case["outcome"] for case in junit["cases"])
        reported = len(junit["cases"])
        lines.append(f"{reported} tests{where}: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
                     + f"; {junit.get('seconds', 0.0):.1f} s.")
    if verbose["selected"] is not None:
        if reported < verbose["selected"]:
            lines.append(f"**{verbose['selected'] - reported} of the {verbose['selected']} selected tests have no "
                         "result** (the step was cut, or pytest-xdist stopped replacing crashed workers): they did not "
                         "run.")
        else:
            lines.append(f"Every one of the {verbose['selected']} selected tests has a result.")
    if verbose["unfinished"]:
        lines.append("Started and never finished: " + ", ".join(f"`{node}`" for node in verbose["unfinished"]) + ".")
    if verbose["workers_down"]:
        then = f"; then {verbose['workers_exhausted']}" if verbose["workers_exhausted"] else "; each was replaced"
        lines.append("pytest-xdist workers that went down (a crash, or a test past its timeout): "
                     f"{verbose['workers_down']}{then}.")
    lines += [f"- a pytest-xdist worker crashed while running `{node}`" for node in verbose["crashed"]]
    if junit is None:
        lines += [
            f"- `{node}`: {outcome}" for node, outcome in verbose["outcomes"].items() if outcome in ("failed", "error")
        ]
    return lines


def section_suite(out: str, log: str, steps: list[dict], simulated: bool) -> list[str]:
    lines = ["", "#### GPU suite (pytest -m gpu)"]
    cases = []
    for name, file, about in SUITE_STEPS:
        junit = read_junit(os.path.join(out, file))
        lines += _suite_step_lines(name, about, junit, step_output(log, "suite", name), simulated)
        cases += junit["cases"] if junit else []
    failures = [case for case in cases if case["outcome"] in ("failed", "error")]
    if failures:
        lines += ["", "Failures and errors (first line of each):"]
        lines += [f"- `{case['node_id']}` ({case['outcome']}): {case['message']}" for case in failures]
    skips = collections.Counter(case["message"] for case in cases if case["outcome"] in ("skipped", "xfailed"))
    if skips:
        lines += ["", "Skipped or expected to fail, by reason:"]
        lines += [f"- {count} x {reason}" for reason, count in skips.most_common()]
    slowest = sorted(cases, key=lambda case: -case["seconds"])[:5]
    if slowest:
        lines += ["", "Slowest: " + "; ".join(f"`{case['node_id']}` {case['seconds']:.1f} s" for case in slowest) + "."]
    lines += section_recorded_outcomes(cases, simulated)
    return lines


def section_recorded_outcomes(cases: list[dict], simulated: bool = False) -> list[str]:
    """One table per test function that recorded properties (overflow outcomes, thread stress)."""
    by_function = collections.defaultdict(list)
    for case in cases:
        if case["properties"]:
            by_function[case["node_id"].split("[")[0]].append(case)
    lines = []
    for function, group in by_function.items():
        columns = list(dict.fromkeys(name for case in group for name in case["properties"]))
        lines += ["", f"Recorded by `{function}`:", ""]
        def outcome(case) -> str:
            return _result_text("simulated") if simulated and case["outcome"] == "passed" else case["outcome"]

        lines += table(["case", "test outcome", *columns],
                       [[case["node_id"][len(function):] or "-", outcome(case),
                         *(case["properties"].get(c, "") for c in columns)] for case in group])
    return lines


def section_bench(bench, records: list[dict], simulated: bool) -> list[str]:
    lines = ["", "#### Benchmark (bench.json; its Markdown table is in the log)"]
    if simulated:
        lines.append(
            "On the simulated GPU: one small shape, --quick, no PyTorch; the times are the host's, not a GPU's."
        )
    if bench is None:
        lines.append("No bench.json.")
    elif "unreadable" in bench:
        lines.append(f"bench.json unreadable: {bench['unreadable']}")
    else:
        lines.append(f"{len(bench.get('rows', []))} rows timed; backend: {bench.get('backend', '?')}.")
        for key, value in bench.items():
            if isinstance(value, list) and value and re.search("fail|error|overflow|not_timed", key):
                lines.append(f"- {key}: {len(value)}; first: {first_line(json.dumps(value[0]))}")
        overhead = bench.get("host_overhead")
        if isinstance(overhead, dict) and "cudnn_bn_us_per_call" in overhead:
            torch_text = f", PyTorch {overhead['torch_us_per_call']:.1f} us" if "torch_us_per_call" in overhead else ""
            lines.append(f"- host overhead per call: cudnn_bn {overhead['cudnn_bn_us_per_call']:.1f} us{torch_text}")
    timing = [r for r in records if r.get("kind") == "query_timing"]
    problems = [r for r in records if r.get("kind") == "problem" and r.get("step") == "query-timing"]
    if timing or problems:
        lines += ["", "Cost of the blocking overflow query (.ci/gpu_probes.py --set query-timing):", ""]
        lines += table(["measure", "value"], [[r["measure"], r["value"]] for r in timing])
        lines += [f"- problem: {r['group']}: {r['problem']}" for r in problems]
    return lines


def section_evidence(out: str) -> list[str]:
    files = sorted(name for name in os.listdir(out) if os.path.isfile(os.path.join(out, name)))
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in files}
    lines = ["", "#### Evidence files", "",
             "; ".join(f"`{name}` {sizes[name]} bytes" for name in files)
             + f" ({len(files)} files; summary.md as it was being written)."]
    problems = evidence.evidence_problems(out)
    lines.append("Beyond what a GPU machine returns: " + "; ".join(problems) if problems else
                 f"Within what a GPU machine returns (at most {evidence.MAX_FILES} files, 16 MiB each, 64 MiB in all).")
    return lines


def source_commit(log: str) -> str | None:
    """The commit the run's environment step printed (git rev-parse HEAD), if any."""
    found = re.search(r"^([0-9a-f]{40})$", log, re.MULTILINE)
    return found.group(1) if found else None


# ---------------------------------------------------------------- README status line ----

def reached_the_gpu(preflight: dict, steps: list[dict]) -> bool:
    """Whether the run got past the preflight on a GPU and ran a tier: only such a run may change
    the README's status (a simulated run is refused before this is asked)."""
    ran = [step for step in steps if step["tier"] in TIERS and step["result"] != NOT_RUN]
    return bool(ran) and not preflight_stopped(steps, preflight)


def status_line(preflight: dict, steps: list[dict], out: str, log: str, date: str) -> str:
    """The README's one-line validation status after a run that reached the GPU."""
    failed = failed_steps(steps)
    word = "FAILED (" + ", ".join(failed) + ")" if failed else "passed"
    gpu = "; ".join(_devices(preflight)) or "an unnamed GPU"
    commit = source_commit(log)
    facts = [f"cuDNN {preflight.get('cudnn_library', '?')}", f"CuPy {preflight.get('cupy', '?')}"]
    if commit:
        facts.append(f"commit {commit[:12]}")
    tiers = []
    for tier, result in tier_results(steps).items():
        text = f"{tier} {result}"
        if tier == "suite" and result != "not run":
            cases = [
                case
                for name in (evidence.JUNIT, evidence.JUNIT_SERIAL)
                for case in (read_junit(os.path.join(out, name)) or {"cases": []})["cases"]
            ]
            counts = collections.Counter(case["outcome"] for case in cases)
            outcomes = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o])
            text += f" ({outcomes or 'no test results recorded'})"
        tiers.append(text)
    return (f"**GPU validation: {word}** on {gpu}, {date} ({'; '.join(facts)}): {'; '.join(tiers) or 'no tier ran'}. "
            f"Details: [{GPU_VALIDATION_DOC}]({GPU_VALIDATION_DOC}).")


def replace_status(text: str, line: str) -> str:
    """``text`` with what lies between the status markers replaced by ``line``; ValueError unless
    the markers occur exactly once each, in order."""
    starts, ends = text.count(STATUS_START), text.count(STATUS_END)
    start, end = text.find(STATUS_START), text.find(STATUS_END)
    if starts != 1 or ends != 1 or end < start:
        raise ValueError(f"expected one {STATUS_START} followed by one {STATUS_END}, found {starts} and {ends}")
    if "\n" in line:
        raise ValueError("the status is one line")
    return text[: start + len(STATUS_START)] + "\n" + line + "\n" + text[end:]


def update_readme(path: str, line: str) -> str:
    """Rewrite the status line of the README at ``path``; returns what happened, in words. The
    file is replaced in one step (a temporary file renamed over it), or left as it was."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        updated = replace_status(text, line)
    except (OSError, ValueError) as error:
        return f"README status not updated ({path}: {error})"
    if updated == text:
        return f"README status unchanged ({path})"
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=".README.", dir=folder)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(updated)
        os.chmod(temporary, os.stat(path).st_mode & 0o777)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        return f"README status not updated ({path}: {error})"
    return f"README status updated ({path}): {line}"


def summarize(out: str, steps_path: str | None, simulated: bool = False) -> str:
    return _summary(out, steps_path, simulated)["text"]


def _section(title: str, build, *args) -> list[str]:
    """A section's lines; a section that fails says so and the summary goes on (every input may be
    cut, partial or not what a run writes)."""
    try:
        return build(*args)
    except Exception as error:
        return ["", f"#### {title}",
                f"This section could not be written ({type(error).__name__}: {first_line(error)}); "
                "its inputs are among the evidence files."]


def _summary(out: str, steps_path: str | None, simulated: bool) -> dict:
    log = _read(os.path.join(out, evidence.LOG)) or ""
    preflight = read_preflight(os.path.join(out, evidence.PREFLIGHT))
    steps = read_steps(steps_path)
    records = evidence.read_records(os.path.join(out, evidence.CHECKS))
    lines = _section("Run", section_header, preflight, steps, log, simulated)
    ran = {step["tier"] for step in steps if step["result"] != NOT_RUN}
    if "smoke" in ran or any(r.get("tier") == "smoke" for r in records):
        lines += _section("Smoke checks", section_checks, records, simulated)
        lines += _section("Limit probes", section_limits, records)
    junit_written = any(os.path.exists(os.path.join(out, name)) for name in (evidence.JUNIT, evidence.JUNIT_SERIAL))
    if "suite" in ran or junit_written:
        lines += _section("GPU suite", section_suite, out, log, steps, simulated)
    bench_recorded = any(r.get("tier") == "bench" for r in records)
    if "bench" in ran or os.path.exists(os.path.join(out, evidence.BENCH)) or bench_recorded:
        lines += _section("Benchmark", section_bench, read_json(os.path.join(out, evidence.BENCH)), records, simulated)
    lines += _section("Evidence files", section_evidence, out)
    status = None
    if not simulated and reached_the_gpu(preflight, steps):
        status = status_line(preflight, steps, out, log, time.strftime("%Y-%m-%d", time.gmtime()))
        lines += ["", "#### README status line", "",
                  "Written into README.md between its gpu-status markers by the run; paste it there by hand "
                  "where the run's checkout was not kept:", "", status]
    return {"text": "\n".join(lines) + "\n", "status": status}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the output folder of .ci/gpu-validate")
    parser.add_argument("--steps",
                        help="the step table (tab-separated: tier, step, kind, result, exit, seconds, limit)")
    parser.add_argument("--readme",
                        help="rewrite this README's validation status line (only after a run that reached the GPU)")
    parser.add_argument("--simulated", action="store_true",
                        help="the run was on the simulated GPU: say so everywhere, touch no README")
    args = parser.parse_args(argv)
    summary = _summary(args.out, args.steps, args.simulated)
    with open(os.path.join(args.out, evidence.SUMMARY), "w") as handle:  # fails before the README is touched
        handle.write(summary["text"])
    print(summary["text"])
    if args.readme:
        if args.simulated:
            print(f"README status not updated ({args.readme}): a run on the simulated GPU is no GPU result")
        elif summary["status"] is None:
            print(f"README status not updated ({args.readme}): the run did not get past the preflight")
        else:
            print(update_readme(args.readme, summary["status"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
