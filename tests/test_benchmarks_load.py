"""Every benchmark script loads: its imports resolve (a benchmark is run by hand, rarely, so a
name moved or renamed in a shared helper would otherwise be found only by the next person to
measure; bench_orbax.py once imported a function bench_inspect.py no longer had)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted([*BENCH.glob("bench_*.py"), BENCH / "run_all.py"])


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """timing.py changes the environment of the process that imports it (bytecode caches on for
    the processes it measures): undo that for the rest of the suite."""
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", os.environ["PYTHONDONTWRITEBYTECODE"])


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_script_imports(script: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)  # module level only: main() is behind `if __name__ == "__main__"`
    finally:
        for name in [n for n in sys.modules if n.startswith("bench_") or n == "timing"]:
            sys.modules.pop(name, None)
    assert callable(getattr(mod, "main", None)), f"{script.name} has no main()"


def _run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_run_all", BENCH / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_target_names_labels_its_benchmark_prints(monkeypatch) -> None:
    """A target whose row or candidate label no benchmark prints would read "not measured"
    forever: each label must occur in its benchmark's source."""
    run_all = _run_all(monkeypatch)
    for job, key, floor, _limit, _rss in run_all.TARGETS:
        for bench, row, cand in filter(None, (key, floor)):
            src = (BENCH / run_all.BENCHES[bench][0]).read_text(encoding="utf-8")
            for label in (row.strip(), cand):
                if label in ("ckptctl",):  # bench_scale's candidate column is written by record()
                    continue
                assert label in src, f"{job}: {label!r} is not in {run_all.BENCHES[bench][0]}"


def test_targets_table_checks_ratio_seconds_and_memory(monkeypatch) -> None:
    run_all = _run_all(monkeypatch)
    rec = [
        # convert .pt -> safetensors: 1.2x the floor, 94 MB: met
        {
            "bench": "convert",
            "row": "`.pt` → safetensors",
            "candidate": "convert",
            "wall": 3.6,
            "cpu": 3.0,
            "rss_mb": 94,
        },
        {
            "bench": "convert",
            "row": "`.pt` → safetensors",
            "candidate": "cp + sync",
            "wall": 3.0,
            "cpu": 1.9,
            "rss_mb": 2,
        },
        # the same row title with more after it is another job (a prefix must not match it)
        {
            "bench": "convert",
            "row": "`.pt` → safetensors, cast to bf16",
            "candidate": "convert",
            "wall": 9.0,
            "cpu": 9.0,
            "rss_mb": 75,
        },
        # .pt -> .h5: fast enough but 160 MB: not met
        {"bench": "convert", "row": "`.pt` → `.h5`", "candidate": "convert", "wall": 3.0, "cpu": 3.0, "rss_mb": 160},
        {"bench": "convert", "row": "`.pt` → `.h5`", "candidate": "cp + sync", "wall": 3.0, "cpu": 1.0, "rss_mb": 2},
        # ls: 0.51 s against <= 0.5 s: not met
        {"bench": "ls", "row": "lightning", "candidate": "`ckptctl ls`", "wall": 0.51, "cpu": 0.4, "rss_mb": 50},
        {
            "bench": "diff-average",
            "row": "diff 2 x 4 GB",
            "candidate": "cat A B > /dev/null",
            "wall": 1.0,
            "cpu": 0.9,
            "rss_mb": 2,
        },
        {
            "bench": "diff-average",
            "row": "diff 2 x 4 GB",
            "candidate": "ckptctl diff A.safetensors A.pt (equal)",
            "wall": 1.5,
            "cpu": 1.2,
            "rss_mb": 80,
        },
    ]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in run_all.targets_table(rec).splitlines()[2:]}
    assert rows["convert `.pt` → safetensors (verify on)"].endswith("| 1.20× | ≤ 1.3×, RSS < 150 MB | yes |")
    assert rows["convert `.pt` → `.h5` (verify on)"].endswith("| **no** |")
    assert rows["`ls` of 200 Lightning `.ckpt`"].endswith("| ≤ 0.5 s | **no** |")
    assert rows["diff of two equal files (`.pt` vs its safetensors)"].endswith("| 1.50× | ≤ 1.5×, RSS < 400 MB | yes |")
    assert "not measured in this run" in rows["diff, every byte different"]
