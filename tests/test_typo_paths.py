"""Issue 16 point 2: a typo in an input path is reported as such, first, by every command.

Each command is run as a real process with one existing input and one misspelt one; the only
line on stderr must name the missing path (exit 2, a usage error), whatever the other arguments
would have made the command say.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run
from safetensors.torch import save_file


@pytest.fixture
def files(tmp_path):
    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    for step in (100, 200, 300):
        save_file({"w": torch.full((4,), float(step))}, str(run_dir / f"model_{step:08d}.safetensors"))
    one = tmp_path / "one.safetensors"
    save_file({"w": torch.zeros(4)}, str(one))
    return tmp_path, run_dir, one


def cases(tmp, run_dir, one):
    typo_run = tmp / "run-b-typo"
    typo_file = tmp / "modl.safetensors"
    return [
        # (argv, the missing path)
        (["diff", run_dir, typo_run], typo_run),  # used to say "run-a is a run folder and the other ..."
        (["diff", typo_file], typo_file),  # used to ask for two checkpoints
        (["diff", typo_run, "--along"], typo_run),
        (["average", typo_run, "--last", "3", "-o", tmp / "avg.safetensors"], typo_run),  # used to talk about --last
        (["average", one, typo_file, "-o", tmp / "avg.safetensors"], typo_file),
        (["inspect", typo_file], typo_file),
        (["ls", run_dir, typo_run], typo_run),
        (["convert", typo_file, tmp / "out.pt"], typo_file),
        (["prune", typo_run], typo_run),  # used to complain about the missing retention policy
        (["scan", one, typo_file], typo_file),  # used to print a table row and exit 1
    ]


@pytest.mark.parametrize("i", range(10))
def test_typo_path_is_reported_first(files, i):
    tmp, run_dir, one = files
    argv, missing = cases(tmp, run_dir, one)[i]
    r = run(*argv)
    assert r.returncode == 2, (argv, r.returncode, r.stderr)
    assert r.stderr == f"error: no such file or directory: {missing}\n", r.stderr
    assert r.stdout == ""
    assert not (tmp / "out.pt").exists() and not (tmp / "avg.safetensors").exists()


def test_dangling_symlink_is_missing(files):
    tmp, _run_dir, _one = files
    link = tmp / "gone.safetensors"
    link.symlink_to(tmp / "deleted.safetensors")
    r = run("inspect", link)
    assert (r.returncode, r.stderr) == (2, f"error: no such file or directory: {link}\n")
