#!/usr/bin/env bash
# Mutation testing, one scope at a time (docs/testing.md "Mutation testing").
#
#   tools/mutation.sh SCOPE [SCOPE...]     run mutmut on each scope, print its score
#   tools/mutation.sh all                  every scope, smallest first
#   tools/mutation.sh list                 the scopes and what they mutate
#   tools/mutation.sh score [SCOPE...]     print the scores of the last runs, run nothing
#   tools/mutation.sh survivors SCOPE      list the surviving mutants (then: show one with
#                                          `cd build/mutation/SCOPE && mutmut show NAME`)
#   tools/mutation.sh rerun SCOPE          run again only the mutants that survived last time
#
# Scopes are defined in pyproject.toml under [tool.mutmut.scopes.*]: the files mutated, the
# functions whose mutants are run, and the test files that may kill them (not the whole suite:
# mutmut runs, per mutant, only those of these tests that call the mutated function).
# Each scope works in its own folder build/mutation/SCOPE (a copy of src/, tests/ and a
# pyproject.toml whose [tool.mutmut] names that scope); results are kept there, so `score`
# and `survivors` read them later. Not part of the default test run.
#
# Environment: PYTHON (default: .venv/bin/python of this checkout, else ../main/.venv, else
# python3), MUTATION_JOBS (parallel workers, default 2), MUTATION_NICE (default 10).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    for p in "$ROOT/.venv/bin/python" "$ROOT/../main/.venv/bin/python"; do
        [[ -x $p ]] && { PYTHON=$p; break; }
    done
    PYTHON=${PYTHON:-python3}
fi
MUTMUT=$(dirname "$PYTHON")/mutmut
[[ -x $MUTMUT ]] || MUTMUT=mutmut
JOBS=${MUTATION_JOBS:-2}
NICE=${MUTATION_NICE:-10}
WORK=$ROOT/build/mutation

# helper: read the scopes, write a scope's folder config, compute scores
py() { "$PYTHON" - "$@" <<'PYEOF'
import fnmatch, json, sys, tomllib
from pathlib import Path

root = Path(sys.argv[2])
cfg = tomllib.loads((root / "pyproject.toml").read_text())
mm = cfg["tool"]["mutmut"]
scopes = mm.get("scopes", {})
cmd = sys.argv[1]
args = sys.argv[3:]


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def results(scope):
    """{mutant name: status} for the scope's functions, from mutmut's meta files."""
    sc = scopes[scope]
    out = {}
    for meta in (root / "build" / "mutation" / scope / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for k, code in data.get("exit_code_by_key", {}).items():
            if any(fnmatch.fnmatch(k, g) for g in sc["functions"]):
                out[k] = code
    return out


STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "killed", None: "not checked", -11: "segfault", -9: "segfault"}

if cmd == "names":
    order = sorted(scopes, key=lambda s: scopes[s].get("order", 100))
    print(" ".join(order))
elif cmd == "list":
    for s in sorted(scopes, key=lambda s: scopes[s].get("order", 100)):
        sc = scopes[s]
        print(f"{s}:\n  files:     {' '.join(sc['files'])}\n  functions: {' '.join(sc['functions'])}"
              f"\n  tests:     {' '.join(sc['tests'])}")
elif cmd == "setup":
    scope, = args
    sc = scopes[scope]
    text = (root / "pyproject.toml").read_text()
    # drop our own [tool.mutmut*] tables, then write the one for this scope
    kept, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.startswith("[tool.mutmut")
        if not skip:
            kept.append(line)
    conf = {k: v for k, v in mm.items() if k != "scopes"}
    conf["only_mutate"] = sc["files"]
    # a test file not written yet is left out (pytest would stop on it)
    conf["pytest_add_cli_args_test_selection"] = [
        t for t in sc["tests"] if not t.endswith(".py") or (root / t).is_file()]
    kept.append("\n[tool.mutmut]")
    kept += [f"{k} = {toml_value(v)}" for k, v in conf.items()]
    print("\n".join(kept))
elif cmd == "snapshot":  # the scope's verdicts, to restore those a rerun did not touch
    print(json.dumps(results(args[0])))
elif cmd == "restore":
    # mutmut resets every verdict when a scope's test list changes (a killing test added); a
    # rerun checks only the survivors, and a mutant killed before stays killed (the test that
    # killed it is still there), so the other verdicts are put back
    scope, snap, rerun = args
    old = json.loads(Path(snap).read_text())
    again = set(Path(rerun).read_text().split())
    for meta in (root / "build" / "mutation" / scope / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        changed = False
        for k, code in codes.items():
            if code is None and k in old and k not in again and old[k] is not None:
                codes[k] = old[k]
                changed = True
        if changed:
            meta.write_text(json.dumps(data, indent=4))
elif cmd == "globs":
    print("\n".join(scopes[args[0]]["functions"]))
elif cmd == "survivors":
    for k, code in sorted(results(args[0]).items()):
        if STATUS.get(code, "suspicious") not in ("killed", "timeout", "segfault"):
            print(k, STATUS.get(code, "suspicious"))
elif cmd == "score":
    # score = (killed + timeout) / mutants checked; "unchecked" > 0 means the run was stopped
    print(f"{'scope':<11} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'other':>5} "
          f"{'unchecked':>9} {'total':>6} {'score':>6}")
    for s in args:
        r = results(s)
        st = [STATUS.get(c, "suspicious") for c in r.values()]
        killed, tmo = st.count("killed"), st.count("timeout") + st.count("segfault")
        surv, nt, todo = st.count("survived"), st.count("no tests"), st.count("not checked")
        other = len(st) - killed - tmo - surv - nt - todo
        checked = len(st) - todo
        score = f"{100 * (killed + tmo) / checked:.1f}%" if checked else "-"
        print(f"{s:<11} {killed:>7} {tmo:>7} {surv:>8} {nt:>8} {other:>5} {todo:>9} {len(st):>6} {score:>6}")
PYEOF
}

run_scope() {
    local scope=$1 mode=$2 dir=$WORK/$1
    mkdir -p "$dir"
    # a copy of the sources and tests (mtimes kept: mutmut re-mutates only changed files)
    rm -rf "$dir/src.new" && cp -a "$ROOT/src" "$dir/src.new" && rm -rf "$dir/src" && mv "$dir/src.new" "$dir/src"
    rm -rf "$dir/tests" && cp -a "$ROOT/tests" "$dir/tests"
    find "$dir/src" "$dir/tests" -name __pycache__ -prune -exec rm -rf {} +
    py setup "$ROOT" "$scope" > "$dir/pyproject.toml"
    local -a names
    if [[ $mode == rerun ]]; then
        mapfile -t names < <(py survivors "$ROOT" "$scope" | cut -d' ' -f1)
        if ((${#names[@]} == 0)); then echo "$scope: no survivors to rerun"; return; fi
        py snapshot "$ROOT" "$scope" > "$dir/before-rerun.json"
        printf '%s\n' "${names[@]}" > "$dir/rerun.txt"
    else
        mapfile -t names < <(py globs "$ROOT" "$scope")
    fi
    echo "== $scope: mutating $(py list "$ROOT" | sed -n "/^$scope:/,/^[a-z]/p" | sed -n 2p | sed 's/ *files: *//')"
    local t0=$SECONDS
    # the folder must exist before Python starts: a PYTHONPATH entry that is missing at start-up
    # is cached as "nothing here", and the tests would import the unmutated package instead
    mkdir -p "$dir/mutants/src"
    # subprocess tests (`python -m ckptctl`) import the mutated copy too. One OpenMP/MKL thread:
    # mutmut forks each mutant's worker from a process that already ran torch ops, and a forked
    # child of a process with an OpenMP pool deadlocks in its first parallel torch op (seen:
    # workers asleep in futex_do_wait with 0 s of CPU until mutmut's timeout, counted as kills)
    (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$dir/mutants/src" nice -n "$NICE" "$MUTMUT" run --max-children "$JOBS" "${names[@]}" \
        > "$dir/run.log" 2>&1) || { echo "mutmut failed for $scope, see $dir/run.log"; tail -20 "$dir/run.log"; return 1; }
    [[ $mode == rerun ]] && py restore "$ROOT" "$scope" "$dir/before-rerun.json" "$dir/rerun.txt"
    echo "   $((SECONDS - t0)) s wall; log $dir/run.log"
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
    ""|-h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    list) py list "$ROOT" ;;
    score) py score "$ROOT" ${@:-$(py names "$ROOT")} ;;
    survivors) py survivors "$ROOT" "$1" ;;
    rerun) for s in "$@"; do run_scope "$s" rerun; done; py score "$ROOT" "$@" ;;
    all) local all; all=$(py names "$ROOT"); for s in $all; do run_scope "$s" full; done; py score "$ROOT" $all ;;
    *) for s in "$cmd" "$@"; do run_scope "$s" full; done; py score "$ROOT" "$cmd" "$@" ;;
    esac
}
main "$@"
