"""Shared test helpers: run the CLI in-process (CliRunner) and as a subprocess; real fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "fixtures" / "real"


def real_files() -> list[Path]:
    """Every file listed in ../shared/fixtures/real/MANIFEST.tsv (empty when the folder is absent)."""
    manifest = REAL / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    rows = manifest.read_text().splitlines()[1:]
    return [REAL / r.split("\t", 1)[0] for r in rows if r.strip()]


def real_manifest() -> dict[str, dict[str, str]]:
    manifest = REAL / "MANIFEST.tsv"
    if not manifest.is_file():
        return {}
    lines = manifest.read_text().splitlines()
    head = lines[0].split("\t")
    return {r.split("\t")[0]: dict(zip(head, r.split("\t"))) for r in lines[1:] if r.strip()}


needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/fixtures/real is absent")
REAL_ABSENT = "../shared/fixtures/real is absent"


def real_params(items, reason: str = REAL_ABSENT) -> list:
    """`items` for a parametrize over real fixtures, or, when there are none (../shared absent),
    one parameter skipped with `reason`: the test shows as skipped, it never silently vanishes."""
    items = list(items)
    return items or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


def real_expected() -> dict[str, dict[str, str]]:
    """tests/real_expected.tsv: per real fixture, the exit code and result inspect and convert
    must give (see the file's header)."""
    lines = [ln for ln in (REPO / "tests" / "real_expected.tsv").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    head = lines[0].split("\t")
    return {r.split("\t")[0]: dict(zip(head, r.split("\t"))) for r in lines[1:]}


@pytest.fixture
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is absent")
    return REAL


def cli(*args: str | os.PathLike, env: dict | None = None):
    """Run ckptctl in-process; returns click's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from ckptctl.cli import output
    from ckptctl.cli.app import app

    output.STATE.__init__()  # global flags do not leak between invocations
    runner = CliRunner()
    return runner.invoke(app, [os.fspath(a) for a in args], env=env, catch_exceptions=False)


def run(*args: str | os.PathLike, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m ckptctl` as a real process (exit codes, stderr, no tty)."""
    full_env = dict(os.environ)
    full_env.pop("CKPTCTL_DEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *[os.fspath(a) for a in args]],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )


def every_tensor(args: tuple) -> list:
    """`args` with `--all` after the command for inspect/convert/diff/average.

    Training checkpoints (optimizer state beside the model) show model weights by default; tests
    that compare with what the producer wrote (EXPECTED.json lists every variable, optimizer
    slots included) ask for every tensor.
    """
    args = list(args)
    if args and args[0] in ("inspect", "convert", "diff", "average") and "--all" not in args:
        args.insert(1, "--all")
    return args
