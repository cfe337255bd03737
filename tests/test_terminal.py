"""Terminal polish: no escape codes when piped, NO_COLOR/--no-color, tables that fit, hostile names
printed literally, human numbers in tables and exact ones in JSON, global flags after the command,
"did you mean", and `ckptctl` alone.

Terminal behaviour is tested on a real pseudo-terminal (pty), not by pretending.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cli

from ckptctl.cli import output

# environment variables that would force or forbid colour, or fix a width, whatever the stream
_COLOUR_VARS = (
    "NO_COLOR",
    "FORCE_COLOR",
    "PY_COLORS",
    "GITHUB_ACTIONS",
    "TERMINAL_WIDTH",
    "COLUMNS",
    "CKPTCTL_DEBUG",
    "_TYPER_FORCE_DISABLE_TERMINAL",
    "CLICOLOR_FORCE",
    "TTY_COMPATIBLE",
)
SGR = re.compile(r"\x1b\[[0-9;]*m")
ANY_ESC = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# an SGR that sets a colour (foreground/background, 8/16/256/true colour), not just bold or dim
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")

HOSTILE = {
    "[bold]x": np.zeros(3, np.float32),
    "a\x1b[31mred": np.ones((2, 2), np.int64),
    "tab\tname": np.zeros(1, np.uint8),
    "nl\nname": np.zeros((), np.float16),
    "c1\x9bname": np.zeros(2, np.int8),
    "[/]close": np.zeros(1, np.int8),
}
# what each hostile name must look like on a terminal or in a piped table
SHOWN = {
    "[bold]x": "[bold]x",
    "a\x1b[31mred": "a\\x1b[31mred",
    "tab\tname": "tab\\tname",
    "nl\nname": "nl\\nname",
    "c1\x9bname": "c1\\x9bname",
    "[/]close": "[/]close",
}
HOSTILE_META = {"[red]k\x1b[0m": "v\x1b[31m"}


def write_hostile(path: Path) -> Path:
    """A safetensors file whose tensor names and metadata try to style or control the terminal."""
    from safetensors.numpy import save_file

    save_file(HOSTILE, str(path), metadata=HOSTILE_META)
    return path


@pytest.fixture
def hostile(tmp_path) -> Path:
    return write_hostile(tmp_path / "hostile.safetensors")


LONG = [
    "model.layers.0.self_attn.q_proj.base_layer.lora_A.default.weight.and.then.some.more.words",
    "model.layers.0.self_attn.k_proj.base_layer.lora_B.default.weight.and.then.some.more.bias",
    "model.embed_tokens.weight",
]


@pytest.fixture
def long_names(tmp_path) -> Path:
    from safetensors.numpy import save_file

    path = tmp_path / "long.safetensors"
    save_file({n: np.zeros((4, 4), np.float32) for n in LONG}, str(path))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _COLOUR_VARS}
    env.update(extra)
    return env


def run_piped(*args, **env) -> subprocess.CompletedProcess:
    """`python -m ckptctl ARGS` with stdout and stderr both pipes and no colour-forcing variables."""
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=120,
    )


def run_tty(*args, columns: int = 100, **env) -> tuple[int, str, str]:
    """`python -m ckptctl ARGS` with stdout on a pseudo-terminal `columns` wide; stderr a pipe.
    Returns (exit code, stdout with \\r\\n made \\n, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    e = clean_env(TERM="xterm-256color", COLUMNS=str(columns))
    e.update(env)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckptctl", *map(os.fspath, args)],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=e,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = p.stderr.read().decode()
    p.stderr.close()
    rc = p.wait(timeout=120)
    return rc, b"".join(chunks).decode().replace("\r\n", "\n"), err


def visible(text: str) -> str:
    return ANY_ESC.sub("", text)


# ---- piped output ---------------------------------------------------------------------------------
def test_piped_output_has_no_escape_codes(hostile, tmp_path):
    # (table, tree, markdown, json and csv of the same file: test_hostile_names_*)
    cases = [
        (),
        ("inspect", "--help"),
        ("inspect", hostile, "-f", "tree"),
        ("inspect", tmp_path / "missing.safetensors"),
        ("inspet",),
        ("inspect", hostile, "--sort", "sideways"),
    ]
    for args in cases:
        p = run_piped(*args)
        assert "\x1b" not in p.stdout and "\x1b" not in p.stderr, (args, p.stdout, p.stderr)
        assert "\x9b" not in p.stdout and "\x9b" not in p.stderr, args
        assert "Traceback" not in p.stderr, args
        if args and args[-1] == tmp_path / "missing.safetensors":
            assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_progress_bars_only_on_a_terminal(monkeypatch):
    with output.progress(100, "x") as bar:  # pytest captures stderr: not a terminal
        assert isinstance(bar, output._NoProgress)
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(isatty=lambda: True, write=lambda s: None))
    monkeypatch.setenv("TERM", "xterm")
    output.STATE.__init__()
    assert output.progress_enabled()
    output.STATE.quiet = True
    assert not output.progress_enabled()
    output.STATE.__init__()
    monkeypatch.setenv("TERM", "dumb")
    assert not output.progress_enabled()


# ---- hostile names --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["table", "tree", "markdown"])
def test_hostile_names_print_literally_when_piped(hostile, fmt):
    p = run_piped("inspect", hostile, "-f", fmt)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x9b" not in p.stdout and "\t" not in p.stdout
    for name, shown in SHOWN.items():
        if fmt == "tree" and ("/" in name or "." in name):
            continue  # the tree splits names at '.' and '/'
        assert shown in p.stdout, (shown, p.stdout)
    assert "[red]k\\x1b[0m" in p.stdout and "v\\x1b[31m" in p.stdout
    # one line per tensor: the newline in a name did not split its row
    if fmt == "table":
        assert sum(1 for line in p.stdout.splitlines() if "nl\\nname" in line) == 1


def test_hostile_names_csv_and_json_keep_exact_strings_when_piped(hostile):
    p = run_piped("inspect", hostile, "-f", "csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert {r["name"] for r in rows} == set(HOSTILE)  # csv quotes the newline; nothing is altered
    p = run_piped("inspect", hostile, "-f", "json")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x9b" not in p.stdout  # JSON escapes them ...
    doc = json.loads(p.stdout)
    assert {t["name"] for t in doc["tensors"]} == set(HOSTILE)  # ... and they decode exactly
    assert doc["metadata"] == HOSTILE_META


def test_hostile_names_on_a_terminal(hostile):
    rc, out, err = run_tty("inspect", hostile)
    assert rc == 0, err
    assert "\x1b[1m" in out  # Rich styled the table: this really is the terminal path
    assert "\x1b[31m" not in out and "\x9b" not in out  # the names' own codes never reach it
    text = visible(out)
    for shown in SHOWN.values():
        assert shown in text, (shown, text)
    assert "[red]k\\x1b[0m" in text
    rc, out, err = run_tty("inspect", hostile, "-f", "tree")
    assert rc == 0, err
    assert "\x1b[31m" not in out and "[bold]x" in visible(out) and "a\\x1b[31mred" in visible(out)
    # csv on a terminal shows control characters escaped (exact strings only when piped)
    rc, out, err = run_tty("inspect", hostile, "-f", "csv")
    assert rc == 0, err
    assert "\x1b" not in out and "a\\x1b[31mred" in out and "nl\\nname" in out


def test_print_json_escapes_c1_controls_and_round_trips(capsys):
    obj = {"a\x9b31m": ["x\x7f\x1b", "ü → ok"]}
    output.print_json(obj)
    text = capsys.readouterr().out
    assert "\x9b" not in text and "\x7f" not in text and "\x1b" not in text
    assert "ü → ok" in text  # other non-ASCII stays readable
    assert json.loads(text) == obj


def test_error_messages_escape_names(tmp_path):
    bad = tmp_path / "x\x1b[31m[bold]y.safetensors"
    bad.write_bytes(b"\x00" * 3)
    p = run_piped("inspect", bad)
    assert p.returncode == 1
    assert "\x1b" not in p.stderr and "x\\x1b[31m[bold]y.safetensors" in p.stderr


# ---- colour -----------------------------------------------------------------------------------------
def test_colour_on_a_terminal_and_none_with_no_color(hostile):
    rc, out, _ = run_tty("inspect", hostile)
    assert rc == 0 and "\x1b[" in out  # the control: a terminal gets styles
    for args, env in [
        (("inspect", hostile), {"NO_COLOR": "1"}),
        (("--no-color", "inspect", hostile), {}),
        (("inspect", hostile, "--no-color"), {}),  # after the command too
        (("inspect", hostile, "-f", "tree", "--no-color"), {}),
    ]:
        rc, out, err = run_tty(*args, **env)
        assert rc == 0, err
        assert "\x1b" not in out, (args, env, out)
        assert "[bold]x" in out


def test_typer_help_honours_no_color_on_a_terminal():
    rc, out, _ = run_tty("inspect", "--help")
    assert rc == 0 and COLOUR_SGR.search(out), out  # the control: Typer colours its help
    for args, env in [
        (("inspect", "--help"), {"NO_COLOR": "1"}),
        (("--no-color", "inspect", "--help"), {}),
        (("inspect", "--help", "--no-color"), {}),
        (("--no-color", "--help"), {}),
    ]:
        rc, out, _ = run_tty(*args, **env)
        assert rc == 0
        assert "Usage" in out and not COLOUR_SGR.search(out), (args, env, out)


def test_no_color_does_not_leak_into_the_next_invocation(hostile):
    os.environ.pop("NO_COLOR", None)
    r = cli("--no-color", "inspect", hostile)
    assert r.exit_code == 0
    assert "NO_COLOR" not in os.environ


# ---- width ------------------------------------------------------------------------------------------
def test_wide_tables_fit_the_terminal(long_names):
    rc, out, err = run_tty("inspect", long_names, columns=70)
    assert rc == 0, err
    lines = visible(out).splitlines()
    assert all(len(line.rstrip()) <= 70 for line in lines), "\n".join(lines)
    rows = [line.split("  ")[0] for line in lines if "float32" in line and "[4, 4]" in line]
    assert len(rows) == 3 and len(set(rows)) == 3, rows  # shortened, still told apart
    assert "model.embed_tokens.weight" in rows  # a name that fits stays whole
    long_rows = sorted(r for r in rows if r.startswith("m.l.0.s."))  # leading components shrink first
    assert len(long_rows) == 2 and long_rows[0].endswith(".bias") and long_rows[1].endswith(".words")
    assert "tied to" not in out  # an empty column gives its room to the names on a terminal

    rc, out, err = run_tty("inspect", long_names, columns=50)
    text = visible(out)
    assert rc == 0 and all(len(line.rstrip()) <= 50 for line in text.splitlines()), text
    assert sum("…" in line for line in text.splitlines()) == 2  # then elided in the middle

    rc, out, err = run_tty("inspect", long_names, "--wide", columns=60)
    assert rc == 0, err
    text = visible(out)
    assert "…" not in text
    assert all(len(line.rstrip()) <= 60 for line in text.splitlines())
    assert LONG[0] in "".join(line.split("  ")[0] for line in text.splitlines())  # all of it, folded

    p = run_piped("inspect", long_names, COLUMNS="60")  # piped: whole names for grep and awk
    assert all(n in p.stdout for n in LONG) and "tied to" in p.stdout


def test_shorten_names_keeps_rows_apart():
    paths = [
        "demo-run/hf-run/checkpoint-100/optimizer.pt",
        "demo-run/hf-run/checkpoint-200/optimizer.pt",
        "demo-run/hf-run/checkpoint-100/trainer_state.json",
        "demo-run/hf-run/checkpoint-100/training_args.bin",
        "demo-run/lightning-run/last.ckpt",
    ]
    short = output.shorten_names(paths, 28)
    assert short[:2] == ["d/h/checkpoint-100/o.pt", "d/h/checkpoint-200/o.pt"]  # not 'd/h/c/o.pt' twice
    assert short[4] == "d/lightning-run/last.ckpt"
    # trainer_state/training_args may not shrink to 't': elided in the middle, still apart
    assert all(len(x) <= 28 for x in short) and short[2].endswith("er_state.json")
    assert len(set(short)) == len(paths)
    # with siblings that share first letters, the distinguishing components stay whole
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.shortcut.weight",
    ]
    short = output.shorten_names(names, 30)
    assert short[0] == "m.l.0.self_attn.q_proj.weight" and short[1] == "m.l.0.self_attn.k_proj.weight"


def test_fit_widths_keeps_short_columns_and_names_whole_when_prose_can_give():
    cols = [
        output.Column("step", "step", justify="right"),
        output.Column("path", "path", name_like=True),
        output.Column("size", "size"),
        output.Column("metrics", "metrics"),
    ]
    cells = [["100", "checkpoint-100/", "829.5 kB", "eval_loss=2.31 loss=2.51"]]
    assert output.fit_widths(cols, cells, 80) == [4, 15, 8, 24]
    w = output.fit_widths(cols, cells, 50)
    assert w[:3] == [4, 15, 8] and sum(w) + 6 == 50  # the prose column gave way
    w = output.fit_widths(cols, cells, 30)  # cannot fit: nothing squeezed to nothing
    assert w == [4, 12, 8, 7]


def test_shorten_name():
    assert output.shorten_name("model.layers.0.self_attn.q_proj.weight", 40) == "model.layers.0.self_attn.q_proj.weight"
    assert output.shorten_name("model.layers.0.self_attn.q_proj.weight", 34) == "m.layers.0.self_attn.q_proj.weight"
    assert output.shorten_name("model.layers.0.self_attn.q_proj.weight", 21) == "m.l.0.s.q_proj.weight"
    assert output.shorten_name("optimizer_states/0/state/123/exp_avg_sq", 22) == "o/0/s/123/exp_avg_sq"
    assert output.shorten_name("kept: alias target of last.ckpt", 20) == "kept: alias target…"
    assert output.elide_end("abcdef", 4) == "abc…"
    s = output.shorten_name("model.layers.0.self_attn.q_proj.weight", 12)
    assert len(s) <= 12 and "…" in s and s.startswith("m.l.")


def test_elide_middle_and_fit_widths():
    assert output.elide_middle("abcdefghij", 5) == "ab…ij"
    assert output.elide_middle("abc", 5) == "abc"
    assert output.elide_middle("abcdef", 1) == "…"
    from rich.cells import cell_len

    s = output.elide_middle("模型.层.注意力.权重.weight", 9)
    assert cell_len(s) <= 9 and s.endswith("ight") and "…" in s
    cols = [output.Column("name", "name", name_like=True), output.Column("dtype", "dtype")]
    cells = [["x" * 80, "float32"], ["y" * 10, "int8"]]
    assert output.fit_widths(cols, cells, 40) == [40 - 2 - 7, 7]
    assert output.fit_widths(cols, cells, 200) == [80, 7]
    assert output.fit_widths(cols, cells, 40, wide=True) == [80, 7]
    assert output.fit_widths(cols, cells, 10)[0] == output.NAME_MIN_WIDTH  # never below the minimum


# ---- numbers ----------------------------------------------------------------------------------------
def test_human_numbers_in_tables_exact_in_json(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "n.safetensors"
    save_file({"big": np.zeros(1_234_567, np.int8), "small": np.zeros(3, np.float32)}, str(path))
    p = run_piped("inspect", path)
    assert p.returncode == 0, p.stderr
    big = next(line for line in p.stdout.splitlines() if line.startswith("big "))
    assert big.split()[-3:] == ["1.2M", "1.2", "MB"], big
    doc = json.loads(run_piped("inspect", path, "-f", "json").stdout)
    t = {x["name"]: x for x in doc["tensors"]}
    assert t["big"]["numel"] == 1_234_567 and t["big"]["nbytes"] == 1_234_567
    assert doc["total_bytes"] == 1_234_567 + 12


# ---- global flags, suggestions, bare ckptctl --------------------------------------------------------
def test_global_flags_work_after_the_command(hostile):
    r = cli("inspect", hostile, "-q")
    assert r.exit_code == 0, r.output
    assert output.STATE.quiet and not output.STATE.verbose
    r = cli("inspect", hostile, "--verbose", "--no-color")
    assert r.exit_code == 0, r.output
    assert output.STATE.verbose and output.STATE.no_color
    r = cli("-q", "inspect", hostile)
    assert r.exit_code == 0 and output.STATE.quiet
    # the word after an option that takes a value is that value, not a flag
    r = cli("inspect", hostile, "--filter", "-q", "-f", "json")
    assert r.exit_code == 0, r.output
    assert not output.STATE.quiet
    assert json.loads(r.stdout)["filter"] == ["-q"]
    p = run_piped("inspect", hostile, "-v", "-q")
    assert p.returncode == 0 and "No such option" not in p.stderr


def test_quiet_leaves_only_errors_on_stderr(hostile, tmp_path):
    p = run_piped("inspect", hostile, "--filter", "nomatch")
    assert p.returncode == 0 and "warning: no tensor matches nomatch" in p.stderr  # the control
    for args in (("-q", "inspect", hostile, "--filter", "nomatch"), ("inspect", hostile, "--filter", "nomatch", "-q")):
        p = run_piped(*args)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
    p = run_piped("inspect", tmp_path / "missing.pt", "-q")
    assert p.returncode == 2 and "error:" in p.stderr  # errors still show


def test_hoist_global_flags_respects_the_commands_own_options():
    from ckptctl.cli.app import hoist_global_flags

    own_v = SimpleNamespace(opts=["--values", "-v"], secondary_opts=[], param_type_name="option", is_flag=True)
    takes = SimpleNamespace(opts=["--key", "-k"], secondary_opts=[], param_type_name="option", is_flag=False)
    arg = SimpleNamespace(opts=["path"], secondary_opts=[], param_type_name="argument")
    cmd = SimpleNamespace(params=[own_v, takes, arg])
    rest, found = hoist_global_flags(cmd, ["a", "-v", "-q", "--key", "--no-color", "b", "--", "-q"])
    assert rest == ["a", "-v", "--key", "--no-color", "b", "--", "-q"]
    assert found == {"quiet"}


def test_did_you_mean_for_commands_and_options(hostile):
    p = run_piped("inspet", hostile)
    assert p.returncode == 2 and "Did you mean 'inspect'" in p.stderr and "Traceback" not in p.stderr
    p = run_piped("list", ".")
    assert p.returncode == 2 and "Did you mean 'ls'" in p.stderr
    p = run_piped("avg")
    assert p.returncode == 2 and "Did you mean 'average'" in p.stderr
    p = run_piped("inspect", hostile, "--filtr", "x")
    assert p.returncode == 2 and "--filter" in p.stderr
    p = run_piped("frobnicate")
    assert p.returncode == 2 and "No such command 'frobnicate'" in p.stderr and "Did you mean" not in p.stderr


def test_bare_ckptctl_lists_commands_and_a_tip():
    from ckptctl.cli.docs import command_tree

    p = run_piped()
    assert p.returncode == 0, p.stderr
    for c in command_tree().commands:
        assert c.name in p.stdout
    assert "Tip:" in p.stdout and "ckptctl demo" in p.stdout


# ---- narrow terminals (issue 16 point 8) ------------------------------------------------------------
@pytest.fixture
def lightning_nan_run(tmp_path) -> Path:
    """A Lightning run that went NaN, with last.ckpt -> the newest and a best checkpoint."""
    from run_builders import lightning_run

    return lightning_run(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints",
        steps=(100, 200, 300, 400),
        val_loss={100: 0.9, 200: 0.35, 300: float("nan"), 400: 0.5},
    )


@pytest.mark.parametrize("columns", [100, 80])
def test_ls_on_a_narrow_terminal_keeps_path_step_metrics_and_notes_whole(lightning_nan_run, columns):
    rc, out, err = run_tty("ls", lightning_nan_run, columns=columns)
    assert rc == 0, err
    lines = visible(out).splitlines()
    assert all(len(line.rstrip()) <= columns for line in lines), "\n".join(lines)
    head = lines[0].split()
    assert head[:2] == ["step", "path"] and "metrics" in head and head[-1] == "notes"
    assert "dtypes" not in head and "optim" not in head  # the least useful columns went first
    rows = {
        line.split()[0]: line
        for line in lines[1:]
        if line.split() and line.split()[0].isdigit() and "on disk" not in line
    }
    assert sorted(rows, key=int) == ["100", "200", "300", "400"]
    for step, epoch in (("100", 0), ("200", 1), ("300", 2), ("400", 3)):
        assert f"epoch={epoch}-step={step}.ckpt" in rows[step]  # whole, not 'epoch=1…44.ckpt'
    assert "val_loss=0.9" in rows["100"] and "val_loss=0.35" in rows["200"] and "val_loss=nan" in rows["300"]
    assert "← last.ckpt" in rows["400"] and "best" in rows["200"]
    assert "…" not in "\n".join(rows.values())
    assert any(line.startswith("hidden to fit") and "dtypes" in line for line in lines)  # said so
    # piped, nothing is left out
    p = run_piped("ls", lightning_nan_run, COLUMNS=str(columns))
    assert p.returncode == 0 and {"format", "dtypes", "optim", "tensors"} <= set(p.stdout.splitlines()[0].split())


def test_ls_on_a_wide_terminal_and_with_wide_shows_every_column(lightning_nan_run):
    for args, columns in (((), 200), (("--wide",), 100)):
        rc, out, err = run_tty("ls", lightning_nan_run, *args, columns=columns)
        assert rc == 0, err
        text = visible(out)
        assert {"format", "size", "tensors", "params", "dtypes", "optim", "modified"} <= set(text.split())
        assert "hidden to fit" not in text


def test_fit_widths_gives_way_by_declared_priority():
    C = output.Column
    cols = [
        C("step", "step", priority=9),
        C("path", "path", name_like=True, priority=9),
        C("format", "format", priority=3, drop=True),
        C("size", "size", priority=7),
        C("dtypes", "dtypes", priority=0, drop=True),
        C("metrics", "metrics", priority=9),
        C("modified", "modified", priority=5, drop=True),
    ]
    cells = [
        ["400", "epoch=3-step=400.ckpt", "torch-zip", "10.3 kB", "float32", "val_loss=0.5 loss=1.7", "2026-12-02 07:56"]
    ]
    nat = [4, 21, 9, 7, 7, 21, 16]
    assert output.fit_widths(cols, cells, 200) == nat
    assert sum(nat) + 12 == 97
    assert output.fit_widths(cols, cells, 97) == nat  # fits exactly: nothing dropped
    assert output.fit_widths(cols, cells, 96) == [4, 21, 9, 7, 0, 21, 16]  # dtypes first
    assert output.fit_widths(cols, cells, 80) == [4, 21, 0, 7, 0, 21, 16]  # then format
    assert output.fit_widths(cols, cells, 60) == [4, 21, 0, 7, 0, 21, 0]  # then modified
    # only when nothing droppable is left do the kept columns shrink: the prose first
    assert output.fit_widths(cols, cells, 58) == [4, 21, 0, 7, 0, 20, 0]
    assert output.fit_widths(cols, cells, 50) == [4, 21, 0, 7, 0, 12, 0]  # down to its header
    assert output.fit_widths(cols, cells, 45) == [4, 21, 0, 7, 0, 7, 0]
    assert output.fit_widths(cols, cells, 40) == [4, 16, 0, 7, 0, 7, 0]  # then the names
    assert output.fit_widths(cols, cells, 20) == [4, 12, 0, 7, 0, 7, 0]  # no further: the terminal wraps
    assert output.fit_widths(cols, cells, 35) == [4, 12, 0, 6, 0, 7, 0]  # a short column last of all
    assert output.fit_widths(cols, cells, 200, wide=True) == nat
    assert output.fit_widths(cols, cells, 10, wide=True) == nat
