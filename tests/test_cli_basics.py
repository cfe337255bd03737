"""The CLI as a whole: version, help, no arguments, demo."""

from __future__ import annotations

import json
import re

import numpy as np
from conftest import cli, run

from ckptctl import __version__

COMMANDS = ["inspect", "ls", "diff", "convert", "prune", "average", "scan", "demo"]


def test_version():
    r = cli("--version")
    assert r.exit_code == 0
    assert r.stdout.strip() == f"ckptctl {__version__}"


def test_no_arguments_lists_commands_and_a_tip():
    r = cli()
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.stdout
    assert "Tip:" in r.stdout


def test_every_command_has_help_with_examples():
    for c in COMMANDS:
        r = cli(c, "--help")
        assert r.exit_code == 0, c
        assert "Examples" in r.stdout, c
        assert re.search(rf"ckptctl {c}\b", r.stdout), c


def test_python_dash_m_and_unknown_command_exit_2():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"ckptctl {__version__}"
    p = run("inspekt", "x")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr


def test_demo_writes_a_sample_every_file_of_which_inspects(tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", out)
    assert r.exit_code == 0, r.output
    assert "ckptctl ls" in r.stdout
    assert (out / "hf-run" / "checkpoint-300" / "trainer_state.json").is_file()
    assert (out / "lightning-run" / "last.ckpt").is_symlink()
    targets = [
        out / "model.pt",
        out / "model-bf16.safetensors",
        out / "model.h5",
        out / "lightning-run" / "last.ckpt",
        out / "hf-run" / "checkpoint-100",
    ]
    for t in targets:
        r = cli("inspect", t, "--format", "json")
        assert r.exit_code == 0, (t, r.output)
        doc = json.loads(r.stdout)
        assert doc["num_tensors"] > 0, t
    # the tied lm_head survives in model.pt as an alias of the embedding
    doc = json.loads(cli("inspect", out / "model.pt", "--format", "json").stdout)
    tied = {t["name"]: t.get("alias_of") for t in doc["tensors"]}
    assert tied["lm_head.weight"] == "embed.weight"
    # a second demo into the same folder refuses without --force
    p = run("demo", out)
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr


def test_demo_run_that_went_nan_is_the_debugging_tour(tmp_path):
    """The README's 'Finding where a run went wrong' runs on what demo writes."""
    import math

    from safetensors.numpy import load_file

    out = tmp_path / "demo"
    assert cli("demo", out).exit_code == 0
    nan_run = out / "hf-run-nan"
    # what demo wrote, read with the producers' own readers: NaN from step 300, in weights and logs
    for step in (100, 200, 300, 400):
        w = load_file(nan_run / f"checkpoint-{step}" / "model.safetensors")
        bad = {k for k, v in w.items() if v.dtype.kind == "f" and np.isnan(v).any()}
        assert bad == ({"blocks.1.attn.weight", "blocks.1.attn.bias"} if step >= 300 else set()), step
        state = json.loads((nan_run / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert math.isnan(state["log_history"][-1]["eval_loss"]) == (step >= 300)
    # ls: strict JSON, NaN as null + nonfinite
    r = run("ls", nan_run, "--format", "json")
    assert r.returncode == 0, r.stderr

    def no_constants(c):
        raise ValueError(c)

    rows = json.loads(r.stdout, parse_constant=no_constants)
    assert [(row["step"], row["metrics"]["eval_loss"]) for row in rows] == [
        (100, 2.31),
        (200, 1.87),
        (300, None),
        (400, None),
    ]
    assert rows[2]["metrics"]["nonfinite"] == {"loss": "nan", "eval_loss": "nan"}
    # --along: the first NaN step, exit 1
    r = run("diff", nan_run, "--along")
    assert r.returncode == 1, r.stderr
    assert "first NaN/Inf at step 300" in r.stdout and "blocks.1.attn.weight" in r.stdout


def test_name_selection_options_are_the_same_on_convert_diff_and_average(tmp_path):
    """--include/--filter/-k, --exclude/-x and --strip-prefix are one shared declaration: each
    spelling selects the same tensors in convert (read back with safetensors) and in diff."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "a.safetensors"
    t = {
        "module.enc.w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "module.enc.b": np.ones(3, np.float16),
        "module.head.w": np.zeros((1, 2), np.int64),
    }
    save_file(t, str(src))
    for i, sel in enumerate((["--include", "*enc*"], ["--filter", "*enc*"], ["-k", "*enc*"])):
        dst = tmp_path / f"o{i}.safetensors"
        r = cli("convert", src, dst, *sel, "-x", "*.b", "--strip-prefix", "module.")
        assert r.exit_code == 0, r.output
        out = load_file(str(dst))
        assert list(out) == ["enc.w"] and out["enc.w"].tobytes() == t["module.enc.w"].tobytes()
    other = tmp_path / "b.safetensors"
    save_file({**t, "module.head.w": np.ones((1, 2), np.int64)}, str(other))
    assert cli("diff", src, other, "--filter", "*enc*").exit_code == 0
    assert cli("diff", src, other, "-k", "*head*").exit_code == 1
