"""Summary of a `.ci/gpu-validate` run: Markdown ready to paste into docs/gpu-validation.md.

    python .ci/gpu_summary.py OUT_FOLDER [--steps STEPS_TSV] [--readme README.md]

Reads what the run left in the output folder (preflight.txt, junit.xml, probes.json, bench.json,
gpu-validate.log) and the step table (tab-separated: name, kind, result, exit status, seconds),
writes OUT_FOLDER/summary.md and prints it. Every input may be missing or partial (a crash, a
timeout): the summary then says so instead of failing. Needs only the standard library, so it
runs on any machine.

With ``--readme``, a run that got past the preflight (so ran on a usable GPU) also rewrites the
README's one-line validation status, between ``<!-- gpu-status -->`` and ``<!-- /gpu-status -->``,
after summary.md is written. A run the preflight stopped, a run whose summary could not be written,
and a README without exactly one pair of markers leave the README as it was; the README is
replaced atomically, so it is never half-written.
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

LOG_NAME, PREFLIGHT_NAME, JUNIT_NAME = "gpu-validate.log", "preflight.txt", "junit.xml"
PROBES_NAME, BENCH_NAME, SUMMARY_NAME = "probes.json", "bench.json", "summary.md"
VERBOSE_OUTCOME = re.compile(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))?")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
STATUS_START, STATUS_END = "<!-- gpu-status -->", "<!-- /gpu-status -->"
GPU_VALIDATION_DOC = "docs/gpu-validation.md"


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
        if len(fields) == 5:
            steps.append(dict(zip(("name", "kind", "result", "exit", "seconds"), fields)))
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
        return {"cases": [], "error": f"junit XML unreadable: {error}"}
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


def read_verbose_log(log: str) -> dict:
    """Outcomes from pytest's -v lines, for a run that left no junit XML (pytest died)."""
    cases, last_started = {}, None
    for line in log.splitlines():
        match = VERBOSE_OUTCOME.match(line)
        if not match:
            continue
        node_id, outcome = match.groups()
        if outcome:
            cases[node_id] = {"XFAIL": "xfailed", "XPASS": "passed", "ERROR": "error"}.get(outcome, outcome.lower())
            last_started = None
        else:
            last_started = node_id
    return {"outcomes": cases, "last_started": last_started}


def pytest_plugins_line(log: str) -> str:
    """pytest's own header lines: its version and the plugins it loaded."""
    found = [line.strip() for line in log.splitlines() if line.startswith(("platform ", "plugins: "))]
    return "; ".join(dict.fromkeys(found))


def read_json(path: str):
    text = _read(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return {"unreadable": f"{error} (the file may have been cut off)"}


# ---------------------------------------------------------------- sections ----

def failed_steps(steps: list[dict]) -> list[str]:
    return [step["name"] for step in steps if step["kind"] == "required" and step["result"] != "passed"]


def run_verdict(preflight: dict, steps: list[dict]) -> str:
    """The run's verdict, the one place it is decided (summary header and README status line)."""
    if not steps:
        return "UNKNOWN (no step table)"
    if preflight.get("verdict", "").startswith("STOP"):
        return "NOT RUN: the preflight stopped the validation"
    failed = failed_steps(steps)
    return "FAIL (" + ", ".join(failed) + ")" if failed else "PASS (every step passed)"


def _devices(preflight: dict) -> list[str]:
    return [value for key, value in preflight.items() if key.startswith("device ")]


def section_header(preflight: dict, steps: list[dict], log: str) -> list[str]:
    verdict = run_verdict(preflight, steps)
    devices = _devices(preflight)
    lines = [
        f"### GPU validation run: {verdict}",
        "",
        f"- GPU: {'; '.join(devices) or preflight.get('devices', 'unknown')}",
        f"- CUDA driver {preflight.get('cuda_driver', '?')}, runtime {preflight.get('cuda_runtime', '?')}; "
        f"cuDNN {preflight.get('cudnn_library', '?')}",
        f"- CuPy {preflight.get('cupy', '?')}; NumPy {preflight.get('numpy', '?')}; Python {preflight.get('python', '?')}",
        f"- pytest: {pytest_plugins_line(log) or 'not recorded'}",
        f"- preflight: {preflight.get('verdict', 'no preflight.txt')}; cudnn_status: {preflight.get('cudnn_status', '?')}; "
        f"float16 kernel: {preflight.get('float16_kernel', '?')}; first call: {preflight.get('first_call', '?')}",
    ]
    source = re.search(r"source fingerprint: (\w+)", log)
    commit = source_commit(log)
    lines.append(f"- source: commit {commit or 'unknown'}, fingerprint {source.group(1) if source else 'unknown'}")
    if steps:
        lines += ["", *table(["step", "kind", "result", "exit", "seconds"],
                             [[s["name"], s["kind"], s["result"], s["exit"], s["seconds"]] for s in steps])]
        total = sum(float(s["seconds"]) for s in steps if s["seconds"].replace(".", "", 1).isdigit())
        lines.append(f"\nTime in steps: {total:.1f} s.")
    return lines


def section_suite(junit: dict | None, log: str) -> list[str]:
    lines = ["", "#### GPU suite (pytest -m gpu)"]
    if junit is None:
        verbose = read_verbose_log(log)
        counts = collections.Counter(verbose["outcomes"].values())
        lines.append("No junit XML: pytest did not finish (crash, kill or timeout). From its verbose output: "
                     + (", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o]) or "no test reported")
                     + ".")
        if verbose["last_started"]:
            lines.append(f"Last test started and never finished: `{verbose['last_started']}`.")
        failed = [node for node, outcome in verbose["outcomes"].items() if outcome in ("failed", "error")]
        lines += [f"- `{node}`: {verbose['outcomes'][node]}" for node in failed]
        return lines
    if "error" in junit:
        lines.append(junit["error"])
    cases = junit["cases"]
    counts = collections.Counter(case["outcome"] for case in cases)
    lines.append(f"{len(cases)} tests: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
                 + f"; {junit.get('seconds', 0.0):.1f} s.")
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
    lines += section_recorded_outcomes(cases)
    return lines


def section_recorded_outcomes(cases: list[dict]) -> list[str]:
    """One table per test function that recorded properties (overflow outcomes, thread stress)."""
    by_function = collections.defaultdict(list)
    for case in cases:
        if case["properties"]:
            by_function[case["node_id"].split("[")[0]].append(case)
    lines = []
    for function, group in by_function.items():
        columns = list(dict.fromkeys(name for case in group for name in case["properties"]))
        lines += ["", f"Recorded by `{function}`:", ""]
        lines += table(["case", "test outcome", *columns],
                       [[case["node_id"][len(function):] or "-", case["outcome"], *(case["properties"].get(c, "") for c in columns)]
                        for case in group])
    return lines


def section_probes(probes) -> list[str]:
    lines = ["", "#### Probes (.ci/gpu_probes.py)"]
    if probes is None:
        return lines + ["No probes.json (the step did not run or died before writing it)."]
    if "unreadable" in probes:
        return lines + [f"probes.json unreadable: {probes['unreadable']}"]
    if probes.get("verdicts"):
        lines += ["", "Limits (cuDNN called directly at each edge):", ""]
        lines += table(["limit", "case", "within the limit", "past the limit", "still holds?"],
                       [[v["limit"], v["case"], v["within"], v["past"], v["holds"]] for v in probes["verdicts"]])
    if probes.get("overflow_flag"):
        lines += ["", "SPATIAL_PERSISTENT overflow flag on ordinary data (uniform in [-2, 2]):", ""]
        lines += table(["shape", "layout", "dtype", "flag raised", "output finite", "max abs diff vs SPATIAL"],
                       [[r["shape"], r["layout"], r["dtype"], f"{r['flagged']} of {r['calls']}", r["finite"],
                         r["max_abs_difference_vs_spatial"]] for r in probes["overflow_flag"]])
    timing = probes.get("query_timing")
    if timing:
        lines += ["", "Cost of the blocking overflow query:", ""]
        lines += table(["measure", "value"], [[key, value] for key, value in timing.items()])
    for problem in probes.get("problems", []):
        lines.append(f"- problem: {problem}")
    return lines


def section_bench(bench) -> list[str]:
    lines = ["", "#### Benchmark (bench.json, bench.md)"]
    if bench is None:
        return lines + ["No bench.json."]
    if "unreadable" in bench:
        return lines + [f"bench.json unreadable: {bench['unreadable']}"]
    lines.append(f"{len(bench.get('rows', []))} rows timed; backend: {bench.get('backend', '?')}.")
    for key, value in bench.items():
        if isinstance(value, list) and value and re.search("fail|error|overflow", key):
            lines.append(f"- {key}: {len(value)}; first: {first_line(json.dumps(value[0]))}")
    return lines


def source_commit(log: str) -> str | None:
    """The commit the run's `source` step printed (git rev-parse HEAD), if any."""
    found = re.search(r"^([0-9a-f]{40})$", log, re.MULTILINE)
    return found.group(1) if found else None


# ---------------------------------------------------------------- README status line ----

def reached_the_gpu(preflight: dict, steps: list[dict]) -> bool:
    """Whether the run got past the preflight: only such a run may change the README's status."""
    ran = {step["name"] for step in steps if step["result"] != "not-run"}
    return "gpu-suite" in ran and not preflight.get("verdict", "").startswith("STOP")


def status_line(preflight: dict, steps: list[dict], junit: dict | None, log: str, date: str) -> str:
    """The README's one-line validation status after a run that reached the GPU."""
    verdict = run_verdict(preflight, steps)
    word = "passed" if verdict.startswith("PASS") else "FAILED (" + ", ".join(failed_steps(steps)) + ")"
    gpu = "; ".join(_devices(preflight)) or "an unnamed GPU"
    commit = source_commit(log)
    facts = [f"cuDNN {preflight.get('cudnn_library', '?')}", f"CuPy {preflight.get('cupy', '?')}"]
    if commit:
        facts.append(f"commit {commit[:12]}")
    if junit is not None and junit.get("cases"):
        counts = collections.Counter(case["outcome"] for case in junit["cases"])
        tests = ", ".join(f"{counts[outcome]} {outcome}" for outcome in OUTCOMES if counts[outcome])
    else:
        tests = "no test results recorded"
    return (f"**GPU validation: {word}** on {gpu}, {date} ({'; '.join(facts)}): GPU tests {tests}. "
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


def summarize(out: str, steps_path: str | None) -> str:
    return _summary(out, steps_path)["text"]


def _summary(out: str, steps_path: str | None) -> dict:
    log = _read(os.path.join(out, LOG_NAME)) or ""
    preflight = read_preflight(os.path.join(out, PREFLIGHT_NAME))
    steps = read_steps(steps_path)
    lines = section_header(preflight, steps, log)
    ran = {step["name"] for step in steps if step["result"] != "not-run"}
    junit = read_junit(os.path.join(out, JUNIT_NAME))
    if "gpu-suite" in ran or junit is not None:
        lines += section_suite(junit, log)
    if "probes" in ran or os.path.exists(os.path.join(out, PROBES_NAME)):
        lines += section_probes(read_json(os.path.join(out, PROBES_NAME)))
    if "bench" in ran or os.path.exists(os.path.join(out, BENCH_NAME)):
        lines += section_bench(read_json(os.path.join(out, BENCH_NAME)))
    status = None
    if reached_the_gpu(preflight, steps):
        status = status_line(preflight, steps, junit, log, time.strftime("%Y-%m-%d", time.gmtime()))
        lines += ["", "#### README status line", "",
                  "Written into README.md between its gpu-status markers by the run; paste it there by hand "
                  "where the run's checkout was not kept:", "", status]
    return {"text": "\n".join(lines) + "\n", "status": status}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the output folder of .ci/gpu-validate")
    parser.add_argument("--steps", help="the step table (tab-separated: name, kind, result, exit, seconds)")
    parser.add_argument("--readme", help="rewrite this README's validation status line (only after a run that reached the GPU)")
    args = parser.parse_args(argv)
    summary = _summary(args.out, args.steps)
    with open(os.path.join(args.out, SUMMARY_NAME), "w") as handle:  # fails before the README is touched
        handle.write(summary["text"])
    print(summary["text"])
    if args.readme:
        if summary["status"] is None:
            print(f"README status not updated ({args.readme}): the run did not get past the preflight")
        else:
            print(update_readme(args.readme, summary["status"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
