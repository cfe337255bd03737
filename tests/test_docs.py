"""Generated docs (completions, man page, CLI reference, help snapshots) and shell completion.

When a command's help changes, these tests fail until `python -m ckptctl.cli.docs` is rerun: that is
the point. The dynamic completers are tested directly and through the shell protocol.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import pytest
import typer
from conftest import REAL, REPO, cli, real_files

from ckptctl.cli import complete, docs

TREE = docs.command_tree()
COMMANDS = [c.name for c in TREE.commands]
SECTIONS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "GLOBAL OPTIONS",
    "COMMANDS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "SHELL COMPLETION",
    "EXAMPLES",
    "SEE ALSO",
]
REGEN = "stale: run `python -m ckptctl.cli.docs` and commit the result"


def py(*args, env=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("CKPTCTL_DEBUG", "FORCE_COLOR", "GITHUB_ACTIONS")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, *map(os.fspath, args)], capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return docs.generate()


# ---- the committed files match the app ------------------------------------------------------------
def test_generated_files_are_up_to_date():
    p = py("-m", "ckptctl.cli.docs", "--check", "--root", REPO)
    assert p.returncode == 0, f"{REGEN}\n{p.stderr}"


@pytest.mark.parametrize("path", [docs.PROG] + [f"{docs.PROG} {c}" for c in COMMANDS])
def test_help_snapshot(path):
    snap = REPO / docs.snapshot_name(path)
    assert snap.is_file(), f"no snapshot {snap.name}: {REGEN}"
    assert docs.help_text(path.split()[1:]) == snap.read_text(encoding="utf-8"), REGEN


def test_snapshots_are_plain_and_fixed_width(generated):
    snaps = {k: v for k, v in generated.items() if k.startswith(docs.SNAPSHOT_DIR)}
    assert len(snaps) == len(COMMANDS) + 1
    for name, text in snaps.items():
        assert "\x1b" not in text, name
        assert max(len(line) for line in text.splitlines()) <= docs.HELP_COLUMNS, name
        assert "Usage: ckptctl" in text, name


def docs_main(capsys, *args) -> SimpleNamespace:
    """`python -m ckptctl.cli.docs ARGS` in-process (the subprocess form is tested above)."""
    rc = docs.main([*map(os.fspath, args)])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_check_names_every_stale_file_and_write_repairs_them(tmp_path, generated, capsys):
    docs.write(tmp_path, generated)
    assert docs.stale(tmp_path, generated) == []
    p = docs_main(capsys, "--check", "--root", tmp_path)
    assert p.returncode == 0, p.stderr

    (tmp_path / "man/ckptctl.1").write_text(generated["man/ckptctl.1"].replace("EXIT STATUS", "EXIT"))
    (tmp_path / docs.snapshot_name("ckptctl inspect")).unlink()
    (tmp_path / docs.SNAPSHOT_DIR / "help_ckptctl_gone.txt").write_text("old\n")
    (tmp_path / "completions/ckptctl.fish").write_text("# hand-edited\n")
    p = py("-m", "ckptctl.cli.docs", "--check", "--root", tmp_path)  # the real exit code, from a process
    assert p.returncode == 1
    assert "man/ckptctl.1: out of date" in p.stderr
    assert "help_ckptctl_inspect.txt: missing" in p.stderr
    assert "help_ckptctl_gone.txt: no such command" in p.stderr
    assert "completions/ckptctl.fish: out of date" in p.stderr
    assert "4 generated file(s) out of date" in p.stderr
    assert (tmp_path / "completions/ckptctl.fish").read_text() == "# hand-edited\n"  # --check writes nothing

    p = docs_main(capsys, "--check", "--diff", "--root", tmp_path)
    assert p.returncode == 1 and "\n-.SH EXIT\n" in p.stdout and "\n+.SH EXIT STATUS\n" in p.stdout

    p = docs_main(capsys, "--root", tmp_path)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / docs.SNAPSHOT_DIR / "help_ckptctl_gone.txt").exists()
    assert docs_main(capsys, "--check", "--root", tmp_path).returncode == 0


# ---- the man page -----------------------------------------------------------------------------------
def groff_warnings(text: str, tmp_path: Path) -> str:
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    f = tmp_path / "page.1"
    f.write_text(text, encoding="utf-8")
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(f)], capture_output=True, text=True)
    return p.stderr


def render(text: str, tmp_path: Path) -> str:
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    f = tmp_path / "page.1"
    f.write_text(text, encoding="utf-8")
    p = subprocess.run(
        ["groff", "-man", "-Tutf8", "-P-cbou", str(f)],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    return p.stdout


def test_man_page_renders_cleanly_and_is_complete(tmp_path, generated):
    man = generated["man/ckptctl.1"]
    assert groff_warnings(man, tmp_path) == ""
    assert all(ord(ch) < 128 for ch in man)  # non-ASCII goes through \[uXXXX]
    for s in SECTIONS:
        assert f".SH {s}\n" in man or f'.SH "{s}"\n' in man, s
    out = render(man, tmp_path)
    for c in TREE.commands:
        assert f"ckptctl {c.name}" in out
        for p in c.options:
            assert max(p.opts, key=len) in out, (c.name, p.opts)
    for p in TREE.options:
        assert max(p.opts, key=len) in out
    for var in ("CKPTCTL_DEBUG", "NO_COLOR", "COLUMNS", "TERM"):
        assert var in out
    assert "[bold]" not in man and "[/]" not in man  # Rich markup translated, not leaked
    assert "ckptctl inspect model.safetensors" in out  # examples from the epilogs


def test_man_page_path_in_pyproject_is_installed_data():
    text = (REPO / "pyproject.toml").read_text()
    assert '"share/man/man1" = ["man/ckptctl.1"]' in text
    assert (REPO / "man/ckptctl.1").is_file()


class Colour(str, enum.Enum):
    red = "red"
    green = "green"


def toy_app() -> typer.Typer:
    app = typer.Typer(name="ckptctl", rich_markup_mode="rich", add_completion=False)

    @app.callback()
    def main(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hush.")] = False) -> None:
        """The toy: résumé × 2."""

    @app.command(
        "paint",
        help="Paint a [bold]checkpoint[/] — fast.\n\n.dotfiles are fine; so is \\backslash and `--colour`.",
        epilog="[bold]Examples[/]\n\n  ckptctl paint a.pt --colour green    # the green one\n"
        "  ckptctl paint 'x  # y.pt'\n\n"
        "Keep the old one:\n\n  ckptctl paint a.pt -n 3\n\nA closing note.",
    )
    def paint(
        src: Annotated[Path, typer.Argument(help="The [italic]source[/].")],
        more: Annotated[list[Path] | None, typer.Argument(help="Others.")] = None,
        colour: Annotated[Colour, typer.Option("--colour", "-c", help="Which colour.")] = Colour.red,
        n: Annotated[int, typer.Option("-n", help="How many.")] = 1,
        tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag.")] = None,
        secret: Annotated[bool, typer.Option("--secret", hidden=True)] = False,
        dry: Annotated[bool, typer.Option("--dry-run/--no-dry-run", help="Plan only.")] = True,
    ) -> None:
        pass

    @app.command("hidden-cmd", hidden=True)
    def hidden_cmd() -> None:
        pass

    return app


def test_generator_on_a_toy_app(tmp_path):
    tree = docs.command_tree(toy_app())
    assert [c.name for c in tree.commands] == ["paint"]
    paint = tree.commands[0]
    assert paint.synopsis() == "ckptctl paint [OPTIONS] SRC [MORE...]"
    by = {p.name: p for p in paint.params}
    assert "secret" not in by
    assert by["colour"].choices == ["red", "green"] and by["colour"].default == "red"
    assert by["n"].metavar == "N" and by["n"].default == "1"
    assert by["tag"].multiple and by["tag"].default is None
    assert by["dry"].metavar is None and by["dry"].secondary_opts == ["--no-dry-run"]
    assert by["dry"].default == "--dry-run"
    notes, examples = docs.split_epilog(paint.epilog)
    assert [e.command for e in examples] == [
        "ckptctl paint a.pt --colour green",
        "ckptctl paint 'x  # y.pt'",
        "ckptctl paint a.pt -n 3",
    ]
    assert [e.description for e in examples] == ["the green one", "", "Keep the old one:"]
    assert [docs.plain(n) for n in notes] == ["A closing note."]

    man = docs.render_man(tree, "9.9")
    assert groff_warnings(man, tmp_path) == ""
    assert "\\fBcheckpoint\\fR" in man and "\\fIsource\\fR" in man and "\\[u2014]" in man
    assert "\\&.dotfiles" in man and "\\ebackslash" in man and "\\fB\\-\\-colour\\fR" in man
    out = render(man, tmp_path)
    assert "One of: red, green" not in out  # the choices are already the metavar
    assert "--colour red|green" in out and "Default: red." in out and "Repeatable." in out
    assert "--dry-run / --no-dry-run" in out and "hidden-cmd" not in out and "--secret" not in out
    assert "Keep the old one:" in out and "ckptctl paint a.pt -n 3" in out and "A closing note." in out
    assert "résumé × 2" in out

    md = docs.render_markdown(tree, "9.9")
    assert "**checkpoint**" in md and "*source*" in md and "[bold]" not in md
    assert "| `-c`, `--colour` `red\\|green` | Which colour. Default: `red`. |" in md
    assert (
        "```sh\n# the green one\nckptctl paint a.pt --colour green\nckptctl paint 'x  # y.pt'\n"
        "# Keep the old one:\nckptctl paint a.pt -n 3\n```"
    ) in md


def test_markup_helpers():
    assert docs.plain("[bold]Examples[/]") == "Examples"
    assert docs.roff_markup("[bold]a[/] b [italic]c[/]") == "\\fBa\\fR b \\fIc\\fR"
    assert docs.md_markup("[bold]a [/]b") == "**a** b"
    assert docs.plain("[not closed") == "[not closed"
    assert docs.roff_text("use --filter or -k, not bit-for-bit") == "use \\-\\-filter or \\-k, not bit-for-bit"


def test_every_finished_command_ends_its_help_with_examples():
    for c in TREE.commands:
        if "not built yet" in c.help:
            continue
        _, examples = docs.split_epilog(c.epilog)
        assert len(examples) >= 2, f"ckptctl {c.name} --help should end with 2-3 examples"


# ---- completion scripts -----------------------------------------------------------------------------
def test_completion_scripts_are_typers_and_committed(generated):
    for shell in docs.SHELLS:
        text = (REPO / f"completions/ckptctl.{shell}").read_text()
        assert text == generated[f"completions/ckptctl.{shell}"], REGEN
        assert "_CKPTCTL_COMPLETE=complete_" + shell in text
        assert "ckptctl" in text


@pytest.fixture
def shim(tmp_path) -> Path:
    """A `ckptctl` on PATH that runs this checkout's package with this interpreter."""
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "ckptctl"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ckptctl "$@"\n')
    exe.chmod(0o755)
    return d


def bash_complete(shim: Path, words: list[str], cwd: Path) -> list[str]:
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    script = REPO / "completions/ckptctl.bash"
    arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = textwrap.dedent(f"""
        source '{script}'
        COMP_WORDS=({arr})
        COMP_CWORD={len(words) - 1}
        _ckptctl_completion ckptctl
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    env.pop("CKPTCTL_DEBUG", None)
    p = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line]


@pytest.fixture
def model(tmp_path) -> Path:
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file(
        {
            "encoder.layer.0.weight": np.zeros(2, np.float32),
            "encoder.layer.1.weight": np.zeros(2, np.float32),
            "decoder.weight": np.zeros(2, np.float32),
            "bad\x1bname": np.zeros(1, np.int8),
        },
        str(path),
    )
    return path


def test_bash_script_completes_commands_and_tensor_names(shim, model, tmp_path):
    got = bash_complete(shim, ["ckptctl", ""], tmp_path)
    assert set(COMMANDS) <= set(got), got
    got = bash_complete(shim, ["ckptctl", "inspect", str(model), "--filter", "enc"], tmp_path)
    assert got == ["encoder.layer.0.weight", "encoder.layer.1.weight"]
    got = bash_complete(shim, ["ckptctl", "inspect", "m.safetensors", "-k", ""], tmp_path)  # relative path
    assert got == ["decoder.weight", "encoder.layer.0.weight", "encoder.layer.1.weight"]


def test_completion_protocol_in_a_subprocess(model):
    env = {
        "_CKPTCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": f"ckptctl inspect {model} --filter dec",
        "COMP_CWORD": "4",
    }
    p = py("-m", "ckptctl", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["decoder.weight"]
    env = {"_CKPTCTL_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": f"ckptctl inspect {model} --filter "}
    p = py("-m", "ckptctl", env=env)
    assert p.returncode == 0 and "encoder.layer.0.weight" in p.stdout and "bad" not in p.stdout
    env = {
        "_CKPTCTL_COMPLETE": "complete_fish",
        "_TYPER_COMPLETE_FISH_ACTION": "get-args",
        "_TYPER_COMPLETE_ARGS": f"ckptctl inspect {model} --filter encoder.layer.1",
    }
    p = py("-m", "ckptctl", env=env)
    assert p.returncode == 0 and p.stdout.split() == ["encoder.layer.1.weight"]
    # a missing file on the line: no completions, no error output
    env = {
        "_CKPTCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": "ckptctl inspect /nonexistent.pt --filter x",
        "COMP_CWORD": "4",
    }
    p = py("-m", "ckptctl", env=env)
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr == ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_install_completion_still_works(tmp_path):
    # --install-completion detects the shell from the process's ancestors (shellingham), so run it
    # from a real bash as a user would: the test must not depend on pytest's own parent being a
    # shell (under setsid/nohup/CI runners none is). `; exit $?` keeps bash from exec'ing python.
    import shlex

    cmd = shlex.join([sys.executable, "-m", "ckptctl", "--install-completion"]) + "; exit $?"
    e = {k: v for k, v in os.environ.items() if k not in ("CKPTCTL_DEBUG", "FORCE_COLOR", "GITHUB_ACTIONS")}
    e.update(HOME=str(tmp_path), SHELL="/bin/bash")
    p = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", cmd],
        capture_output=True,
        text=True,
        env=e,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    installed = list(tmp_path.rglob("ckptctl*"))
    assert installed, p.stdout
    assert "_CKPTCTL_COMPLETE=complete_bash" in installed[0].read_text()
    assert "source" in (tmp_path / ".bashrc").read_text()


# ---- the completers themselves ----------------------------------------------------------------------
def ctx(**params) -> SimpleNamespace:
    return SimpleNamespace(params=params, args=[], command_path="ckptctl inspect")


def test_tensor_completer_direct(model, tmp_path):
    assert complete.complete_tensor_names(ctx(path=model), [], "encoder.layer.1") == ["encoder.layer.1.weight"]
    assert complete.complete_tensor_names(ctx(path=model), [], "") == [
        "decoder.weight",
        "encoder.layer.0.weight",
        "encoder.layer.1.weight",
    ]  # no control characters
    # from the raw words when the parameter was not parsed yet; paths given as str
    assert complete.complete_tensor_names(ctx(), ["inspect", str(model)], "dec") == ["decoder.weight"]
    # two checkpoints (diff A B): the union, first seen first
    from safetensors.numpy import save_file

    other = tmp_path / "o.safetensors"
    save_file({"decoder.weight": np.zeros(1, np.int8), "head.bias": np.zeros(1, np.int8)}, str(other))
    got = complete.complete_tensor_names(ctx(a=model, b=other), [], "")
    assert got[-1] == "head.bias" and got.count("decoder.weight") == 1
    # --key paths
    save_file(
        {"state_dict/enc.w": np.zeros(1), "optimizer_states/0/state/1/exp_avg": np.zeros(1)},
        str(tmp_path / "k.safetensors"),
    )
    keys = complete.complete_key_paths(ctx(path=tmp_path / "k.safetensors"), [], "")
    assert sorted(keys) == [
        "optimizer_states",
        "optimizer_states/0",
        "optimizer_states/0/state",
        "optimizer_states/0/state/1",
        "state_dict",
    ]
    assert complete.complete_key_paths(ctx(path=tmp_path / "k.safetensors"), [], "st") == ["state_dict"]
    # --strip-prefix: the next prefix level
    assert complete.complete_name_prefixes(ctx(path=model), [], "") == ["decoder.", "encoder."]
    assert complete.complete_name_prefixes(ctx(path=model), [], "encoder.") == ["encoder.layer."]
    assert complete.complete_name_prefixes(ctx(path=model), [], "encoder.layer.1.") == []


def test_completers_never_crash(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "run"
    folder.mkdir()
    cases = [
        ctx(path=junk),
        ctx(path=empty),
        ctx(path=folder),
        ctx(path=tmp_path / "nope"),
        ctx(path=None),
        ctx(path=123),
        ctx(path=True),
        ctx(paths=[junk, None]),
        None,
        SimpleNamespace(),
    ]
    for c in cases:
        for fn in (
            complete.complete_tensor_names,
            complete.complete_key_paths,
            complete.complete_metric_names,
            complete.complete_name_prefixes,
            complete.metric_completer("step"),
        ):
            got = fn(c, ["--weird", str(junk)], "")
            assert isinstance(got, list)
    assert complete.metric_completer("step", "size")(None, [], "s") == ["step", "size"]


def test_narrow_offers_the_next_level_when_there_are_many():
    names = [f"model.layers.{i}.mlp.weight" for i in range(300)] + ["lm_head.weight"]
    assert complete.narrow(names, "lm") == ["lm_head.weight"]
    top = complete.narrow(names, "", limit=50)
    assert top == ["model.", "lm_head."]
    lvl = complete.narrow(names, "model.layers.", limit=50)
    assert lvl[:3] == ["model.layers.0.", "model.layers.1.", "model.layers.2."] and len(lvl) == 300
    assert complete.narrow(names, "model.layers.1", limit=50)[:2] == ["model.layers.1.", "model.layers.10."]
    assert complete.narrow(names, "model.*") == []  # a glob being typed


def test_metric_completer_duck_types_ops_runs(monkeypatch, tmp_path):
    fake = SimpleNamespace(
        discover=lambda d: [
            SimpleNamespace(metrics={"eval_loss": 0.1}),
            {"metrics": {"eval_acc": 0.9, "bad\nname": 1}},
            SimpleNamespace(metrics=None),
        ]
    )
    monkeypatch.setitem(sys.modules, "ckptctl.ops.runs", fake)
    run = tmp_path / "run"
    run.mkdir()
    c = SimpleNamespace(params={"run_dir": run}, args=[], command_path="ckptctl prune")
    assert complete.complete_metric_names(c, [], "") == ["eval_acc", "eval_loss"]
    assert complete.complete_metric_names(c, [], "eval_l") == ["eval_loss"]
    assert complete.metric_completer("step", "mtime", "size")(c, [], "") == [
        "step",
        "mtime",
        "size",
        "eval_acc",
        "eval_loss",
    ]
    monkeypatch.setitem(sys.modules, "ckptctl.ops.runs", SimpleNamespace())  # no discover: nothing
    assert complete.complete_metric_names(c, [], "") == []


def test_metric_completer_on_an_hf_trainer_run(tmp_path):
    runs = pytest.importorskip("ckptctl.ops.runs")
    if not hasattr(runs, "discover"):
        pytest.skip("ops.runs has no discover() yet")
    from safetensors.numpy import save_file

    run = tmp_path / "hf-run"
    for step, loss in ((10, 0.9), (20, 0.5)):
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({"w": np.zeros(2, np.float32)}, str(d / "model.safetensors"))
        state = {
            "global_step": step,
            "best_metric": loss,
            "best_model_checkpoint": str(d),
            "log_history": [{"step": s, "eval_loss": x, "epoch": 1.0} for s, x in ((10, 0.9), (20, 0.5)) if s <= step],
        }
        (d / "trainer_state.json").write_text(json.dumps(state))
    c = SimpleNamespace(params={"run_dir": run}, args=[], command_path="ckptctl prune")
    assert "eval_loss" in complete.complete_metric_names(c, [], "eval")


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/fixtures/real is absent")
def test_tensor_completer_on_real_files():
    checked = 0
    for path in real_files():
        if "malicious" in path.parts:  # never handed to anything that could unpickle
            continue
        r = cli("inspect", path, "--all", "--format", "json")  # every tensor, not the model part
        got = complete.tensor_names(path)  # never raises
        if r.exit_code == 0:
            names = [t["name"] for t in json.loads(r.stdout)["tensors"]]
            assert got == [n for n in names if complete._completable(n)], path
            checked += 1
        else:
            assert got == [], path
    assert checked >= 5
