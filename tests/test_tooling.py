"""The house rules hold on the whole tree: ruff (lint and format) and mypy, configured in
pyproject.toml, report nothing. Run as part of the suite so that CI enforces them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ["src", "tests", "benchmarks", "tools"]


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return [found]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_ruff_lint_is_clean():
    r = _run([*_tool("ruff"), "check", "--no-cache", *TREES])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_is_clean():
    r = _run([*_tool("ruff"), "format", "--check", "--no-cache", *TREES])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    # a cache of our own: nothing is written into the checkout
    r = _run([*_tool("mypy"), "--cache-dir", str(tmp_path / "mypy-cache")], timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
