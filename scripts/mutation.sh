#!/usr/bin/env bash
# Mutation testing of one core module against the tests that exercise it (docs/testing.md).
#
#   scripts/mutation.sh MODULE [--worktree] [--timeout SECONDS]
#   scripts/mutation.sh MODULE --survivors [--timeout SECONDS]
#
# MODULE is one of: ops launch signatures plans limits validate arrays scalars layout handles policy
# descriptors layer reference deferred frozen.
# The run happens in a private copy of the committed tree (.mutation/MODULE/), so edits made to the
# working tree during a run change nothing, and the score belongs to the commit it prints. With
# --worktree the copy is taken from the working tree instead (tracked and untracked, not ignored):
# for trying a new test before committing it. One mutant at a time (--max-children 1); the whole
# run is bounded by --timeout (default 1800 s). With --survivors the last run's copy is kept, the
# module's own test file (the first listed for it below) is taken from the last commit, and only the
# mutants that survived (or had no test) are run again: the quick check of a new test. Needs mutmut
# (pip install -e ".[dev]"); where it lives elsewhere, MUTMUT names its command and PYTHON a Python
# importing the project and mutmut.
#
# Output: the score line, the commit, and every surviving mutant's diff in
# .mutation/MODULE/survivors.txt.
set -euo pipefail

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }

[ $# -ge 1 ] || usage
module=$1; shift
from_worktree=0
survivors_only=0
limit=1800
while [ $# -gt 0 ]; do
    case $1 in
        --worktree) from_worktree=1 ;;
        --survivors) survivors_only=1 ;;
        --timeout) limit=$2; shift ;;
        *) usage ;;
    esac
    shift
done

# module -> (source file, the test files that exercise it). The first is the module's own, where
# the tests written to kill its survivors go: --survivors takes it from the last commit.
case $module in
    ops)         source=cudnn_bn/_cudnn/ops.py;         tests="test_ops test_signatures test_launch test_cupy_path test_cudnn_safety test_compat test_interop test_api test_fused_ops" ;;
    launch)      source=cudnn_bn/_cudnn/launch.py;      tests="test_launch test_ops test_signatures test_cupy_path test_cudnn_safety test_compat test_fused test_fused_ops" ;;
    signatures)  source=cudnn_bn/_cudnn/signatures.py;  tests="test_signatures test_ops test_launch test_cupy_path test_cudnn_safety test_api test_fused_ops" ;;
    plans)       source=cudnn_bn/_cudnn/plans.py;       tests="test_plans test_cudnn_safety test_cupy_path test_descriptors" ;;
    limits)      source=cudnn_bn/_cudnn/limits.py;      tests="test_limits test_cudnn_safety test_cupy_path" ;;
    validate)    source=cudnn_bn/_core/validate.py;     tests="test_validation test_arrays test_api test_layer test_compat test_cupy_path test_adversarial" ;;
    arrays)      source=cudnn_bn/_core/arrays.py;       tests="test_arrays test_validation test_api test_compat test_cupy_path test_adversarial" ;;
    scalars)     source=cudnn_bn/_core/scalars.py;      tests="test_validation test_api test_layer test_compat" ;;
    layout)      source=cudnn_bn/_core/layout.py;       tests="test_layout test_validation test_reference test_descriptors test_properties test_cupy_path" ;;
    handles)     source=cudnn_bn/_cudnn/handles.py;     tests="test_handles test_cudnn_safety test_cupy_path test_raw" ;;
    policy)      source=cudnn_bn/_core/policy.py;       tests="test_policy test_cupy_path test_layer" ;;
    descriptors) source=cudnn_bn/_cudnn/descriptors.py; tests="test_descriptors test_cudnn_safety test_cupy_path test_raw" ;;
    layer)       source=cudnn_bn/layer.py;              tests="test_layer test_layer_fused test_api test_cudnn_safety" ;;
    reference)   source=cudnn_bn/reference.py;          tests="test_reference test_reference_float16 test_fused test_properties test_reference_memory test_api test_validation" ;;
    deferred)    source=cudnn_bn/_cudnn/deferred.py;    tests="test_deferred test_sync_budget test_handles test_cupy_path" ;;
    frozen)      source=cudnn_bn/_cudnn/frozen.py;      tests="test_frozen test_layer_frozen test_backward_inference" ;;
    *) usage ;;
esac

root=$(git rev-parse --show-toplevel)
work=$root/.mutation/$module
mutmut=${MUTMUT:-mutmut}
python=${PYTHON:-python}

if [ $survivors_only = 1 ]; then
    [ -f "$work/results.txt" ] || { echo "--survivors needs an earlier run of $module"; exit 2; }
    own=${tests%% *}
    git -C "$root" archive HEAD "tests/$own.py" | tar -xf - -C "$work"
    rerun=$(grep -E ': (survived|no tests)$' "$work/results.txt" | sed 's/^ *//; s/:.*//' || true)
    [ -n "$rerun" ] || { echo "no survivors to run again"; exit 0; }
    # a changed test selection makes mutmut forget every result: the earlier verdicts stand for the
    # mutants not run again
    (cd "$work" && "$python" - <<'EOF'
import os, re

def verdicts(path):
    return dict(re.findall(r"^\s*(\S+): (.+)$", open(path).read(), re.M)) if os.path.exists(path) else {}

now, before = verdicts("results.txt"), verdicts("results.before.txt")
merged = {name: before.get(name, status) if status == "not checked" else status for name, status in now.items()}
open("results.before.txt", "w").write("".join(f"    {name}: {status}\n" for name, status in merged.items()))
EOF
    )
    echo "$(head -1 "$work/.commit" | sed 's/, test_.* at .*//'), $own.py at $(git -C "$root" rev-parse --short HEAD)" > "$work/.commit"
else
    rm -rf "$work"
    mkdir -p "$work"
    if [ $from_worktree = 1 ]; then
        (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$work"
        commit="$(git -C "$root" rev-parse --short HEAD) + working tree"
    else
        git -C "$root" archive HEAD | tar -xf - -C "$work"
        commit=$(git -C "$root" rev-parse --short HEAD)
    fi
    echo "$commit" > "$work/.commit"
fi
commit=$(cat "$work/.commit")

# Narrow [tool.mutmut] of the copy's pyproject.toml to this module and its tests; everything else in
# the section (deselections, pytest options) stays as configured.
selected=""
for name in $tests; do
    [ -f "$work/tests/$name.py" ] && selected="$selected tests/$name.py"
done
(cd "$work" && SOURCE=$source SELECTED=$selected "$python" - <<'EOF'
import json, os, re, tomllib

with open("pyproject.toml", "rb") as f:
    settings = tomllib.load(f)["tool"]["mutmut"]
settings["only_mutate"] = [os.environ["SOURCE"]]
settings["use_git_change_detection"] = False  # the copy sits inside the repository, ignored by it
selection = [arg for arg in settings["pytest_add_cli_args_test_selection"] if arg != "tests/"]
settings["pytest_add_cli_args_test_selection"] = os.environ["SELECTED"].split() + selection
text = open("pyproject.toml").read()
head, _, rest = text.partition("[tool.mutmut]")
tail = rest[re.search(r"^\[", rest, re.M).start():] if re.search(r"^\[", rest, re.M) else ""
section = "[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
open("pyproject.toml", "w").write(head + section + "\n" + tail)
EOF
)

echo "mutation testing $source at $commit against:$selected"
cd "$work"
status=0
# shellcheck disable=SC2086  # the mutant names are words
timeout --signal=INT --kill-after=60 "$limit" "$mutmut" run --max-children 1 ${rerun:-} > run.log 2>&1 || status=$?
if [ $status = 124 ] || [ $status = 130 ]; then
    echo "stopped at the ${limit}s limit: the score below counts only the mutants tested so far"
elif [ $status != 0 ]; then
    tail -30 run.log
    echo "mutmut run failed (exit $status); see $work/run.log"
    exit $status
fi

"$mutmut" results --all true > results.txt 2>/dev/null || "$mutmut" results > results.txt
show_diffs='
import sys

from mutmut.__main__ import find_mutant, get_diff_for_mutant, status_by_exit_code

for name in sys.argv[1:]:
    mutant = find_mutant(name)
    print(f"# {name}: {status_by_exit_code[mutant.exit_code_by_key[name]]}")
    print(get_diff_for_mutant(name, path=mutant.path))
'
# shellcheck disable=SC2046  # the mutant names are words
"$python" -c "$show_diffs" $(grep -E ': (survived|no tests|timeout|suspicious)$' results.txt | sed 's/^ *//; s/:.*//') > survivors.txt
"$python" - "$source" "$commit" <<'EOF'
import os, re, sys

def verdicts(path):
    if not os.path.exists(path):
        return {}
    return dict(re.findall(r"^\s*(\S+): (.+)$", open(path).read(), re.M))

now, before = verdicts("results.txt"), verdicts("results.before.txt")
final = {name: before.get(name, status) if status == "not checked" else status for name, status in now.items()}
counts = {}
for status in final.values():
    counts[status] = counts.get(status, 0) + 1
# a timeout or a crash stops the tests as a failing assertion does: both count as killed
killed = sum(counts.get(status, 0) for status in ("killed", "timeout", "segfault"))
tested = killed + sum(counts.get(status, 0) for status in ("survived", "no tests", "suspicious"))
print(f"{sys.argv[1]} at {sys.argv[2]}: {killed}/{tested} killed ({100 * killed / max(tested, 1):.1f}%), "
      f"{counts.get('survived', 0)} survived, {counts.get('no tests', 0)} without tests, "
      f"{counts.get('suspicious', 0)} suspicious, {len(final) - tested} not run")
EOF
echo "survivors: $work/survivors.txt"
