"""Every benchmark script loads: its imports resolve (a benchmark is run by hand, rarely, so a
name moved or renamed in a shared helper would otherwise be found only by the next person to
measure; bench_orbax.py once imported a function bench_inspect.py no longer had)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted([*BENCH.glob("bench_*.py"), BENCH / "run_all.py"])


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
