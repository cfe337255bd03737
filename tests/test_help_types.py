"""Issue 16 point 9: help shows placeholders, not Typer's Python types (`<bool>`, `<list[str]>`)."""

from __future__ import annotations

import re

import pytest
from conftest import run

COMMANDS = ["", "inspect", "ls", "diff", "convert", "prune", "average", "scan", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_no_python_types(cmd):
    r = run(*([cmd] if cmd else []), "--help", env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    assert not re.search(r"<bool>|<list\[|list\[str\]|list\[Path\]", r.stdout), r.stdout


def test_flags_show_no_type_and_lists_show_a_placeholder():
    r = run("convert", "--help", env={"COLUMNS": "120", "NO_COLOR": "1"})
    lines = {ln.split()[1].split(",")[0]: ln for ln in r.stdout.splitlines() if ln.startswith("│ --")}
    assert "<glob>" in lines["--include"] and "<glob>" in lines["--exclude"]
    assert "<prefix>" in lines["--strip-prefix"] and "<old=new>" in lines["--rename"]
    assert "<" not in lines["--all"].split("Write")[0] and "<" not in lines["--force"].split("Overwrite")[0]
    r = run("average", "--help", env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert re.search(r"inputs\.\.\.\s+<path>\.\.\.", r.stdout), r.stdout
