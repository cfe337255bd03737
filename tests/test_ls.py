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


@pytest.mark.parametrize(
    "sort,rev,expect",
    [
        ("step", False, [100, 200, 300, 400]),
        ("step", True, [400, 300, 200, 100]),
        ("eval_loss", False, [200, 300, 400, 100]),
        ("eval_loss", True, [100, 400, 300, 200]),
    ],
)
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
    for path, needle in (
        (tmp_path / "empty", "no checkpoints found"),
        (tmp_path / "nope", "no such file"),
        (tmp_path / "nested", "--recursive"),
    ):
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
            assert (
                row["total_bytes"]
                == sum(os.path.getsize(f if os.path.isabs(f) else Path(row["path"]).parent / f) for f in [row["path"]])
                or row["num_files"] > 1
            )
            assert row["error"] is None or "\n" not in row["error"]
    sharded = json.loads(run("ls", REAL / "safetensors_sharded" / "fluxml", "-f", "json").stdout)
    assert len(sharded) == 1 and sharded[0]["num_files"] == 7 and sharded[0]["format"] == "sharded"


# ---- issue 16: NaN/Inf metrics, ranking across runs, --best, du-like totals ----------------------
NAN, INF = float("nan"), float("inf")


def _no_constants(name):
    raise ValueError(f"bare {name} in JSON output")


def strict_loads(text: str):
    """json.loads that rejects NaN/Infinity, as jq and strict parsers do."""
    return json.loads(text, parse_constant=_no_constants)


@pytest.fixture
def nan_runs(tmp_path) -> Path:
    """A folder of runs as a user debugging a divergence has them: an HF Trainer run whose
    trainer_state.json logged eval_loss NaN and Infinity (Python's json writes them bare), a
    Lightning run whose ModelCheckpoint state has current_score / best_model_score NaN, and a
    healthy run."""
    from run_builders import lightning_ckpt

    root = tmp_path / "runs"
    hf_run(root / "hf", steps=(500, 1000, 1500, 2000), eval_loss={500: 0.9, 1000: NAN, 1500: INF, 2000: 0.5})
    assert "NaN" in (root / "hf" / "checkpoint-1000" / "trainer_state.json").read_text()
    assert "Infinity" in (root / "hf" / "checkpoint-1500" / "trainer_state.json").read_text()
    pl = root / "pl"
    pl.mkdir()
    lightning_ckpt(pl / "epoch=0-step=100.ckpt", 0, 100, 0.7, str(pl / "epoch=0-step=100.ckpt"), 0.7)
    lightning_ckpt(pl / "epoch=1-step=200.ckpt", 1, 200, NAN, str(pl / "epoch=0-step=100.ckpt"), NAN)
    lightning_ckpt(pl / "epoch=2-step=300.ckpt", 2, 300, -INF, str(pl / "epoch=0-step=100.ckpt"), NAN)
    st_run(root / "plain", steps=(1, 2), values={1: 0.25, 2: 0.125})
    return root


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown"])
def test_nan_and_inf_metrics_list_in_every_text_format(nan_runs, fmt):
    for folder in ("hf", "pl"):
        r = run("ls", nan_runs / folder, "-f", fmt)
        assert r.returncode == 0, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    hf = run("ls", nan_runs / "hf", "-f", fmt).stdout
    pl = run("ls", nan_runs / "pl", "-f", fmt).stdout
    assert "eval_loss=nan" in hf and "eval_loss=inf" in hf and "eval_loss=0.5" in hf
    assert "val_loss=nan" in pl and "val_loss=-inf" in pl
    if fmt == "csv":  # exact values: the float32 score 0.7 as it is stored
        rows = {Path(x["path"]).name: x for x in csv.DictReader(io.StringIO(hf))}
        assert "eval_loss=nan" in rows["checkpoint-1000"]["metrics"].split()
        assert "eval_loss=inf" in rows["checkpoint-1500"]["metrics"].split()
        rows = {Path(x["path"]).name: x for x in csv.DictReader(io.StringIO(pl))}
        assert rows["epoch=0-step=100.ckpt"]["metrics"] == f"val_loss={float(np.float32(0.7))!r}"
        assert rows["epoch=1-step=200.ckpt"]["metrics"] == "val_loss=nan"
    else:
        assert "val_loss=0.7" in pl


def test_nan_metrics_json_is_strict_and_typed(nan_runs):
    r = run("ls", nan_runs / "hf", nan_runs / "pl", "-f", "json")
    assert r.returncode == 0, r.stderr
    rows = {Path(x["path"]).name: x for x in strict_loads(r.stdout)}
    m = rows["checkpoint-1000"]["metrics"]
    assert m["eval_loss"] is None and m["nonfinite"] == {"eval_loss": "nan"}
    assert m["loss"] == pytest.approx(1.9)  # the finite ones stay numbers
    assert rows["checkpoint-1500"]["metrics"]["eval_loss"] is None
    assert rows["checkpoint-1500"]["metrics"]["nonfinite"] == {"eval_loss": "inf"}
    assert (
        rows["checkpoint-2000"]["metrics"]["eval_loss"] == 0.5 and "nonfinite" not in rows["checkpoint-2000"]["metrics"]
    )
    assert rows["epoch=1-step=200.ckpt"]["metrics"] == {"val_loss": None, "nonfinite": {"val_loss": "nan"}}
    assert rows["epoch=2-step=300.ckpt"]["metrics"] == {"val_loss": None, "nonfinite": {"val_loss": "-inf"}}
    for row in rows.values():  # one type per field: a number or null
        for k, v in row["metrics"].items():
            assert k == "nonfinite" or v is None or isinstance(v, (int, float)), (k, v)


def test_one_nan_run_does_not_break_recursive_listing(nan_runs):
    r = run("ls", nan_runs, "-R")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    shown = [
        ln.split()[1]
        for ln in r.stdout.splitlines()[2:]
        if ln.split() and ln.split()[0].isdigit() and "on disk" not in ln
    ]
    assert len(shown) == 4 + 3 + 2, r.stdout  # every run's checkpoints, the healthy one included
    assert any(s.startswith("plain/model_") for s in shown)
    j = run("ls", nan_runs, "-R", "-f", "json")
    assert len(strict_loads(j.stdout)) == 9


@pytest.fixture
def two_runs(tmp_path):
    a = hf_run(tmp_path / "run-a", steps=(10, 20, 30), eval_loss={10: 0.9, 20: 0.3, 30: 0.5})
    b = hf_run(tmp_path / "run-b", steps=(10, 20, 30), eval_loss={10: 0.4, 20: NAN, 30: 0.2})
    return a, b


EXPECT_UNION = [("run-b", 30), ("run-a", 20), ("run-b", 10), ("run-a", 30), ("run-a", 10), ("run-b", 20)]


@pytest.mark.parametrize("fmt", ["json", "csv", "table", "markdown"])
def test_sort_by_metric_ranks_across_all_runs(two_runs, fmt):
    r = run("ls", *two_runs, "--sort", "eval_loss", "-f", fmt)
    assert r.returncode == 0, r.stderr
    if fmt == "json":
        got = [(Path(x["run"]).name, x["step"]) for x in strict_loads(r.stdout)]
    elif fmt == "csv":
        got = [(Path(x["run"]).name, int(x["step"])) for x in csv.DictReader(io.StringIO(r.stdout))]
    else:
        lines = [ln.strip("| ").replace("|", " ").split() for ln in r.stdout.splitlines()]
        assert lines[0][:3] == ["run", "step", "path"]  # a run column names each row's run
        got = [
            (Path(ln[0]).name, int(ln[1]))
            for ln in lines
            if len(ln) > 2 and ln[1].isdigit() and not ln[0].endswith(":")
        ]
    assert got == EXPECT_UNION  # NaN last, whatever run it is in


@pytest.mark.parametrize("fmt", ["json", "csv", "table", "markdown"])
def test_best_per_run(two_runs, fmt):
    r = run("ls", *two_runs, "--best", "eval_loss", "-f", fmt)
    assert r.returncode == 0, r.stderr
    if fmt == "json":
        got = [(Path(x["run"]).name, x["step"]) for x in strict_loads(r.stdout)]
    elif fmt == "csv":
        got = [(Path(x["run"]).name, int(x["step"])) for x in csv.DictReader(io.StringIO(r.stdout))]
    else:
        lines = [ln.strip("| ").replace("|", " ").split() for ln in r.stdout.splitlines()]
        got = [
            (Path(ln[0]).name, int(ln[1]))
            for ln in lines
            if len(ln) > 2 and ln[1].isdigit() and not ln[0].endswith(":")
        ]
        assert "best eval_loss (lowest) of each run: 2 checkpoints" in r.stdout
    assert got == [("run-a", 20), ("run-b", 30)]
    assert r.stderr == ""


def test_best_direction_nan_and_errors(two_runs, tmp_path):
    a, b = two_runs
    hi = [
        (Path(x["run"]).name, x["step"])
        for x in strict_loads(run("ls", a, b, "--best", "eval_loss", "--mode", "max", "-f", "json").stdout)
    ]
    assert hi == [("run-a", 10), ("run-b", 10)]  # b's NaN at step 20 is never "best"
    # a metric whose name says higher is better
    acc = st_run(tmp_path / "acc", steps=(1, 2, 3), metric="eval_accuracy", values={1: 0.5, 2: 0.8, 3: 0.7})
    assert [x["step"] for x in strict_loads(run("ls", acc, "--best", "eval_accuracy", "-f", "json").stdout)] == [2]
    # -inf is not the lowest loss, NaN is not a loss: a run with nothing finite is said so
    bad = st_run(tmp_path / "bad", steps=(1, 2, 3), values={1: NAN, 2: -INF, 3: 0.6})
    allbad = st_run(tmp_path / "allbad", steps=(1,), values={1: NAN})
    r = run("ls", bad, allbad, "--best", "eval_loss", "-f", "json")
    assert r.returncode == 0
    assert [x["step"] for x in strict_loads(r.stdout)] == [3]
    assert "allbad" in r.stderr and "NaN or Inf" in r.stderr
    # sorted by it, -inf does not come out on top either: non-finite values go last with NaN
    assert [x["step"] for x in strict_loads(run("ls", bad, "--sort", "eval_loss", "-f", "json").stdout)] == [3, 1, 2]
    for args, needle in ((["--best", "nope"], "nope"), (["--mode", "max"], "--best")):
        r = run("ls", a, *args)
        assert r.returncode == 2 and r.stdout == "" and needle in r.stderr and "Traceback" not in r.stderr


def _du_bytes(root: Path) -> int:
    """What `du -sb` counts for the files under root: each regular file's inode once, symlinks
    not followed (du also adds the folders themselves, which are not checkpoint bytes)."""
    seen, total = set(), 0
    for dp, _dns, fns in os.walk(root):
        for n in fns:
            st = os.lstat(Path(dp) / n)
            if (st.st_dev, st.st_ino) not in seen and not os.path.islink(Path(dp) / n):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _footer_kb(text: str) -> str:
    line = [ln for ln in text.splitlines() if " on disk" in ln][0]
    return line.split(", ")[1].removesuffix(" on disk")


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_on_disk_total_counts_like_du(tmp_path, fmt):
    from run_builders import lightning_run

    root = lightning_run(tmp_path / "ckpts", steps=(100, 200, 300), last="copy")
    r = run("ls", root, "-f", fmt)
    assert r.returncode == 0, r.stderr
    assert "← last.ckpt" in r.stdout  # the copy is shown as an alias of its twin...
    du = _du_bytes(root)
    assert du == sum(p.stat().st_size for p in root.iterdir()) and len(list(root.iterdir())) == 4
    assert _footer_kb(r.stdout) == f"{du / 1000:.1f} kB"  # ...and its bytes are on the disk all the same
    # a hard link is the same bytes once; a symlink adds nothing
    os.link(root / "epoch=0-step=100.ckpt", root / "epoch=0-step=100-hardlink.ckpt")
    os.symlink("epoch=1-step=200.ckpt", root / "best.ckpt")
    r = run("ls", root, "-f", fmt)
    assert _du_bytes(root) == du and _footer_kb(r.stdout) == f"{du / 1000:.1f} kB"
    # several runs: each run's line and the total, as du -sb of each
    other = lightning_run(tmp_path / "other", steps=(1,), last="copy")
    r = run("ls", root, other, "-f", fmt)
    lines = r.stdout.splitlines()
    per = {ln.split(":")[0].strip(): ln.rsplit(", ", 1)[1] for ln in lines if ln.startswith("  ")}
    assert per[os.fspath(root)] == f"{du / 1000:.1f} kB"
    assert per[os.fspath(other)] == f"{_du_bytes(other) / 1000:.1f} kB"
    assert _footer_kb(r.stdout) == f"{(du + _du_bytes(other)) / 1000:.1f} kB"


def test_a_trainer_state_with_an_overflowing_number_does_not_break_the_others(tmp_path):
    root = tmp_path / "runs"
    hf_run(root / "odd", steps=(10,))
    st = root / "odd" / "checkpoint-10" / "trainer_state.json"
    doc = json.loads(st.read_text())
    doc["log_history"].append({"step": 10, "total_flos": 10**400, "eval_loss": 0.25})  # json reads it as an int
    st.write_text(json.dumps(doc))
    st_run(root / "plain", steps=(1,))
    r = run("ls", root, "-R", "-f", "json")
    assert r.returncode == 0, r.stderr
    rows = {Path(x["path"]).name: x for x in strict_loads(r.stdout)}
    assert (
        rows["checkpoint-10"]["metrics"]["eval_loss"] == 0.25 and "total_flos" not in rows["checkpoint-10"]["metrics"]
    )
    assert "model_00000001.safetensors" in rows
