"""`ckptctl ls`: table/json/csv/markdown, sorting, several runs, bad input; in-process and as a process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL, cli, run
from run_builders import hf_run, st_run


@pytest.fixture
def strun(tmp_path) -> Path:
    return st_run(tmp_path / "run", steps=(100, 200, 300, 400), values={100: 0.9, 200: 0.3, 300: 0.5, 400: 0.7})


def test_table(strun):
    r = cli("ls", strun)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["step", "path", "format", "size"]
    body = [ln for ln in lines[2:] if ln.strip() and not ln.startswith("4 checkpoints")]
    assert [ln.split()[0] for ln in body] == ["100", "200", "300", "400"]
    assert all("safetensors" in ln and "eval_loss=" in ln for ln in body)
    assert "4 checkpoints" in lines[-1] and "on disk" in lines[-1]
    assert r.stderr == ""


def test_json_exact(strun):
    r = cli("ls", strun, "--format", "json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        assert {"path", "step", "format", "total_bytes", "metrics"} <= set(row)
        assert row["total_bytes"] == os.path.getsize(row["path"])
        assert isinstance(row["total_bytes"], int)
    assert [row["step"] for row in rows] == [100, 200, 300, 400]
    assert rows[1]["metrics"] == {"eval_loss": 0.3}
    assert rows[0]["num_params"] == 20 and rows[0]["dtypes"] == {"float32": 2}


def test_json_step_null_and_error(tmp_path):
    root = st_run(tmp_path / "run", steps=(1,))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(root / "weights.safetensors"))
    (root / "step_9.safetensors").write_bytes(b"\xff" * 20)
    r = cli("ls", root, "-f", "json")
    assert r.exit_code == 0
    rows = {Path(x["path"]).name: x for x in json.loads(r.stdout)}
    assert rows["weights.safetensors"]["step"] is None
    assert rows["step_9.safetensors"]["error"] and rows["step_9.safetensors"]["step"] == 9
    assert rows["step_9.safetensors"]["num_tensors"] is None
    t = cli("ls", root)
    assert t.exit_code == 0 and "error" in t.stdout.splitlines()[0]
    assert "1 unreadable or incomplete" in t.stdout


def test_csv_and_markdown(strun):
    r = cli("ls", strun, "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["step"] for x in rows] == ["100", "200", "300", "400"]
    assert rows[0]["total_bytes"] == str(os.path.getsize(rows[0]["path"]))
    assert rows[0]["format"] == "safetensors"
    m = cli("ls", strun, "-f", "markdown")
    assert m.exit_code == 0
    assert m.stdout.startswith("| ") and "|---" in m.stdout.replace(" ", "").replace(":", "")
    assert "4 checkpoints" in m.stdout


@pytest.mark.parametrize("sort,rev,expect", [
    ("step", False, [100, 200, 300, 400]),
    ("step", True, [400, 300, 200, 100]),
    ("eval_loss", False, [200, 300, 400, 100]),
    ("eval_loss", True, [100, 400, 300, 200]),
])
def test_sort(strun, sort, rev, expect):
    args = ["ls", strun, "--sort", sort, "-f", "json"] + (["-r"] if rev else [])
    assert [x["step"] for x in json.loads(cli(*args).stdout)] == expect


def test_sort_size_and_mtime(tmp_path):
    from run_builders import set_mtime

    root = st_run(tmp_path / "run", steps=(1, 2, 3))
    with open(root / "model_00000002.safetensors", "ab"):
        pass
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(100, np.float32)}, str(root / "step_4.safetensors"))
    for s, t in ((1, 300), (2, 100), (3, 200)):
        set_mtime(root / f"model_{s:08d}.safetensors", 1_700_000_000 + t)
    set_mtime(root / "step_4.safetensors", 1_700_000_000)
    assert [x["step"] for x in json.loads(cli("ls", root, "--sort", "mtime", "-f", "json").stdout)] == [4, 2, 3, 1]
    assert [x["step"] for x in json.loads(cli("ls", root, "--sort", "size", "-f", "json").stdout)][-1] == 4


def test_sort_unknown_metric(strun):
    r = run("ls", strun, "--sort", "val_acc")
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "val_acc" in r.stderr and "eval_loss" in r.stderr
    assert "Traceback" not in r.stderr


def test_several_runs(tmp_path):
    a = st_run(tmp_path / "a", steps=(1, 2))
    b = hf_run(tmp_path / "b", steps=(10,))
    r = cli("ls", a, b)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].split()[0] == "run"
    assert "3 checkpoints" in r.stdout and f"{a}: 2 checkpoints" in r.stdout
    rows = json.loads(cli("ls", a, b, "-f", "json").stdout)
    assert [(Path(x["run"]).name, x["step"]) for x in rows] == [("a", 1), ("a", 2), ("b", 10)]


def test_files_on_command_line_are_one_run(strun):
    files = sorted(strun.glob("*.safetensors"))[:2]
    r = cli("ls", *files, "-f", "json")
    assert r.exit_code == 0
    assert [x["step"] for x in json.loads(r.stdout)] == [100, 200]
    assert not cli("ls", *files).stdout.startswith("run")


def test_hf_run_row(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000), eval_loss={500: 0.5, 1000: 0.25})
    os.symlink("checkpoint-1000", root / "best")
    r = cli("ls", root)
    assert r.exit_code == 0
    row = [ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] == "1000"][0]
    assert "checkpoint-1000/" in row and "yes" in row and "eval_loss=0.25" in row and "← best" in row
    rows = json.loads(cli("ls", root, "-f", "json").stdout)
    assert rows[1]["aliases"] == ["best"] and rows[1]["best_of_run"] and rows[1]["has_optimizer"] is True
    assert rows[1]["total_bytes"] == sum(p.stat().st_size for p in (root / "checkpoint-1000").iterdir())
    assert rows[1]["num_files"] == 6


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    st_run(tmp_path / "nested" / "sub", steps=(1,))
    for path, needle in ((tmp_path / "empty", "no checkpoints found"), (tmp_path / "nope", "no such file"),
                         (tmp_path / "nested", "--recursive")):
        r = run("ls", path)
        assert r.returncode == (2 if needle == "no such file" else 1), r.stderr
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert cli("ls", tmp_path / "nested", "-R").exit_code == 0


def test_one_empty_among_several(tmp_path, strun):
    (tmp_path / "empty").mkdir()
    r = cli("ls", strun, tmp_path / "empty")
    assert r.exit_code == 0 and "no checkpoints found" in r.stderr


def test_hostile_names_are_escaped(tmp_path):
    root = st_run(tmp_path / "run", steps=(1,), name="step_{step}\x1b[31m[bold]x.safetensors")
    r = run("ls", root)
    assert r.returncode == 0
    assert "\x1b" not in r.stdout and "\\x1b[31m[bold]x" in r.stdout
    rows = json.loads(run("ls", root, "-f", "json").stdout)
    assert rows[0]["path"].endswith("step_1\x1b[31m[bold]x.safetensors")


def test_help_and_json_as_process(strun):
    h = run("ls", "--help")
    assert h.returncode == 0 and "Examples" in h.stdout and "--sort" in h.stdout
    r = run("ls", strun, "--format", "json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4 and r.stderr == ""


def test_safetensors_run_does_not_import_torch(strun):
    code = (
        "import sys; from typer.testing import CliRunner; from ckptctl.cli.app import app; "
        f"r = CliRunner().invoke(app, ['ls', {os.fspath(strun)!r}]); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/fixtures/real is absent")
def test_real_fixture_folders():
    """Every folder of real files lists without crashing; malicious/ is never opened."""
    for sub in sorted(p for p in REAL.iterdir() if p.is_dir() and p.name != "malicious"):
        r = run("ls", sub, "-f", "json")
        assert "Traceback" not in r.stderr, sub
        if r.returncode != 0:  # only "no checkpoints" is allowed to fail
            assert "no checkpoints found" in r.stderr, (sub, r.stderr)
            continue
        rows = json.loads(r.stdout)
        assert rows, sub
        for row in rows:
            assert row["total_bytes"] == sum(os.path.getsize(f if os.path.isabs(f) else Path(row["path"]).parent / f)
                                             for f in [row["path"]]) or row["num_files"] > 1
            assert row["error"] is None or "\n" not in row["error"]
    sharded = json.loads(run("ls", REAL / "safetensors_sharded" / "fluxml", "-f", "json").stdout)
    assert len(sharded) == 1 and sharded[0]["num_files"] == 7 and sharded[0]["format"] == "sharded"
