#!/usr/bin/env python
"""Run every benchmark and print (or write into the README) every performance table, dated.

Each bench_*.py prints its markdown table(s) on stdout and its progress on stderr; this script
runs them one after the other (never two at once: they would measure each other), collects
their stdout and prints one markdown document headed by the date and the machine
(timing.machine()). The figures in the README are then the last measured ones.

    python benchmarks/run_all.py --markdown                 # every table, full sizes (~4 GB files)
    python benchmarks/run_all.py --markdown --quick         # small sizes: a smoke run, minutes
    python benchmarks/run_all.py --markdown --size 1G       # convert/inspect/diff at 1 GB
    python benchmarks/run_all.py --only convert,ls --markdown
    python benchmarks/run_all.py --write-readme             # rewrite the README's tables in place

--write-readme replaces, for each benchmark run, the text between the marker comments
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in README.md (NAME: convert, inspect, ls,
diff-average, scale, orbax, remote) with the fresh table and a "Measured ..." line; a benchmark
whose markers are missing is printed on stdout instead, and nothing else in the README changes.
Run it on a quiet machine: the tables show CPU seconds beside wall times, but only a quiet disk
makes the ratios to `cp && sync` meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import PY, RECORD_ENV, compile_tree, machine, parse_size, speed_probe  # noqa: E402 - beside this file, on the path above

README = HERE.parent / "README.md"


def _gb(size: str) -> str:
    return f"{parse_size(size) / 1e9:g}"


# name -> (script, full-size arguments, quick arguments); `size` (e.g. "1G") is substituted
BENCHES: dict[str, tuple[str, Callable[[str | None], list[str]], Callable[[str | None], list[str]]]] = {
    "convert": (
        "bench_convert.py",
        lambda size: ["--markdown", "--size", size or "4G"],
        lambda size: ["--markdown", "--quick"] + (["--size", size] if size else []),
    ),
    "inspect": (
        "bench_inspect.py",
        lambda size: ["--size-gb", _gb(size or "4G")],
        lambda size: ["--size-gb", _gb(size or "0.3G"), "--repeat", "2"],
    ),
    "ls": (
        "bench_ls.py",
        lambda size: ["--n", "200", "--size-gb", "1"],
        lambda size: ["--n", "40", "--size-gb", "0.1", "--reps", "1"],
    ),
    "diff-average": (
        "bench_diff_average.py",
        lambda size: ["--diff-gb", _gb(size or "4G"), "--avg-gb", "1"],
        lambda size: ["--diff-gb", _gb(size or "0.3G"), "--avg-gb", "0.1", "--skip-naive", "--repeat", "1"],
    ),
    "scale": ("bench_scale.py", lambda size: [], lambda size: ["--tensors", "5000", "--shards", "8", "--repeat", "1"]),
    "orbax": (
        "bench_orbax.py",
        lambda size: ["--size-gb", _gb(size or "4G")],
        lambda size: ["--size-gb", "0.2", "--repeat", "1", "--no-values"],
    ),
    "remote": ("bench_remote.py", lambda size: [], lambda size: ["--size-gb", "0.1", "--repeat", "1"]),
}


# The targets of issue 13, checked against the figures the benchmarks record (timing.record):
# (job, measured (bench, row prefix, candidate), floor (same) or None, limit, peak RSS limit MB).
# limit: a ratio of wall times to the floor when there is a floor, else seconds of wall time.
Key = tuple[str, str, str]
Target = tuple[str, Key, Key | None, float, float | None]
DIFF, AVG = "diff 2 x ", "average "  # row prefixes: the rest is the size measured
AVG_FLOOR = "floor: cat inputs + cp one input + sync (the output must be written too)"


def _convert(job: str, row: str, limit: float) -> Target:
    return (f"convert {job} (verify on)", ("convert", row, "convert"), ("convert", row, "cp + sync"), limit, 150)


def _alone(job: str, bench: str, row: str, cand: str, seconds: float) -> Target:
    return (job, (bench, row, cand), None, seconds, None)


TARGETS: list[Target] = [
    _convert("`.pt` → safetensors", "`.pt` → safetensors", 1.3),
    _convert("safetensors → `.pt`", "safetensors → `.pt`", 1.3),
    _convert("`.pt` → `.h5`", "`.pt` → `.h5`", 1.3),
    _convert("`--dtype bf16`", "`.pt` → safetensors, cast to bf16", 1.5),
    (
        "diff of two equal files (`.pt` vs its safetensors)",
        ("diff-average", DIFF, "ckptctl diff A.safetensors A.pt (equal)"),
        ("diff-average", DIFF, "cat A B > /dev/null"),
        1.5,
        400,
    ),
    (
        "diff, every byte different",
        ("diff-average", DIFF, "ckptctl diff A B (safetensors, every byte differs)"),
        ("diff-average", DIFF, "cat A B > /dev/null"),
        2.5,
        400,
    ),
    (
        "average of 5 inputs → safetensors",
        ("diff-average", AVG, "ckptctl average -> safetensors"),
        ("diff-average", AVG, AVG_FLOOR),
        1.2,
        400,
    ),
    _alone("`ls` of 200 Lightning `.ckpt`", "ls", "lightning", "`ckptctl ls`", 0.5),
    _alone("inspect 100k tensors, safetensors, JSON", "scale", "inspect --format json, safetensors", "ckptctl", 1.0),
    _alone("inspect 100k tensors, `.pt`, JSON", "scale", "inspect --format json, .pt", "ckptctl", 2.0),
    _alone("inspect 100k tensors, 128 shards, JSON", "scale", "inspect --format json, 128 shards", "ckptctl", 1.0),
    _alone("inspect of a 4 GB safetensors (whole process)", "inspect", "safetensors", "`ckptctl inspect`", 0.25),
    _alone("inspect of a 4 GB `.pt` (whole process)", "inspect", "torch-zip", "`ckptctl inspect`", 0.25),
    _alone("inspect of a 4 GB `.h5` (whole process)", "inspect", "hdf5", "`ckptctl inspect`", 0.5),
]


def _find(records: list[dict], key: Key) -> dict | None:
    """The record of `key`; a row ending in a space is a prefix (the rest is the size measured)."""
    bench, row, cand = key
    for r in reversed(records):  # the last measurement wins
        same_row = r["row"].startswith(row) if row.endswith(" ") else r["row"] == row
        if r["bench"] == bench and same_row and r["candidate"] == cand:
            return r
    return None


def targets_table(records: list[dict]) -> str:
    """The markdown table of TARGETS against the recorded figures (wall, CPU seconds, ratio, met)."""
    lines = [
        "| job | ckptctl: wall / CPU s, peak RSS | the floor: wall / CPU s | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for job, key, floor_key, limit, rss_limit in TARGETS:
        m = _find(records, key)
        f = _find(records, floor_key) if floor_key else None
        if m is None or (floor_key and f is None):
            lines.append(f"| {job} | not measured in this run | | | | |")
            continue
        cell = f"{m['wall']:.2f} s / {m['cpu']:.2f} s, {m['rss_mb']:.0f} MB"
        if f is not None:
            ratio = m["wall"] / f["wall"]
            ok = ratio <= limit
            floor = f"{f['wall']:.2f} s / {f['cpu']:.2f} s"
            ratio_s, target = f"{ratio:.2f}×", f"≤ {limit:g}×"
        else:
            ok = m["wall"] <= limit
            floor, ratio_s, target = "", "", f"≤ {limit:g} s"
        if rss_limit is not None:
            ok = ok and m["rss_mb"] < rss_limit
            target += f", RSS < {rss_limit:g} MB"
        lines.append(f"| {job} | {cell} | {floor} | {ratio_s} | {target} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines)


def run_bench(name: str, quick: bool, size: str | None, timeout: float | None) -> tuple[str, float, int]:
    """(stdout, seconds, exit code) of one benchmark; its stderr goes to ours as it runs."""
    script, full, small = BENCHES[name]
    args = (small if quick else full)(size)
    cmd = [PY, str(HERE / script), *args]
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout)
        out, code = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = -1
    return out.strip(), time.perf_counter() - t0, code


def replace_between_markers(text: str, name: str, body: str) -> tuple[str, bool]:
    """`text` with what lies between <!-- bench:NAME --> and <!-- /bench:NAME --> replaced by
    `body`; (text, False) when the markers are not both there."""
    pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.DOTALL)
    if not pat.search(text):
        return text, False
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(3), text, count=1), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print every table as one markdown document")
    ap.add_argument(
        "--write-readme",
        action="store_true",
        help=f"rewrite the tables between <!-- bench:NAME --> markers in {README.name}",
    )
    ap.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes and one or two rounds: a smoke run")
    ap.add_argument("--size", default=None, help="data size for convert/inspect/diff/orbax, e.g. 1G (default 4G)")
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHES))
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    args = ap.parse_args(argv)
    only = [n for n in filter(None, args.only.split(","))]
    unknown = [n for n in only + list(filter(None, args.skip.split(","))) if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = [n for n in (only or BENCHES) if n not in args.skip.split(",")]

    compile_tree(str(HERE.parent / "src"))  # measured as installed (timing.py: bytecode caches)
    started = machine()
    probe_start = speed_probe()
    sections: dict[str, str] = {}
    failed = []
    fd, record_path = tempfile.mkstemp(prefix="ckptctl-bench-", suffix=".jsonl")
    os.close(fd)
    os.environ[RECORD_ENV] = record_path  # the benchmarks append their figures (timing.record)
    for name in names:
        out, secs, code = run_bench(name, args.quick, args.size, args.timeout)
        print(f"== {name}: {secs:.0f} s, exit {code}", file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
            out = (out + "\n\n" if out else "") + f"(`{BENCHES[name][0]}` failed: exit {code}; see its stderr)"
        sections[name] = out
    needed = sorted({k[0] for _j, k, _f, _l, _r in TARGETS})
    try:  # a failure here must not lose the tables measured above
        with open(record_path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        os.unlink(record_path)
        if all(n in names for n in needed):
            sections = {"targets": targets_table(records), **sections}
        else:
            print(f"the table of targets needs {', '.join(needed)}: not built in this run", file=sys.stderr)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"the table of targets was not built ({type(e).__name__}: {e}); records: {record_path}", file=sys.stderr)
    end_load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    stamp = (
        f"Measured {started}{' (--quick sizes)' if args.quick else ''}, {end_load} at the end, "
        f"with `python benchmarks/run_all.py`. Speed probe (timing.speed_probe): {probe_start} at the "
        f"start; {speed_probe()} at the end."
    )

    if args.write_readme:
        text = args.readme.read_text(encoding="utf-8")
        missing = []
        for name, body in sections.items():
            text, ok = replace_between_markers(text, name, f"{body}\n\n_{stamp}_")
            if not ok:
                missing.append(name)
        args.readme.write_text(text, encoding="utf-8")
        done = [n for n in sections if n not in missing]
        print(
            f"{args.readme}: rewrote {', '.join(done) or 'nothing'}"
            + (f"; no markers for {', '.join(missing)} (printed below)" if missing else ""),
            file=sys.stderr,
        )
        for name in missing:
            print(f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->\n")
    if args.markdown or not args.write_readme:
        print(f"## Performance tables\n\n_{stamp}_\n")
        for name, body in sections.items():
            print(f"### {name}\n\n{body}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
