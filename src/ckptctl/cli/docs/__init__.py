"""Generate the files that document the CLI, from the CLI itself, so they cannot drift.

    python -m ckptctl.cli.docs            rebuild every generated file
    python -m ckptctl.cli.docs --check    exit 1, naming every file that is stale (CI runs this)

Generated from the Typer app (typer.main.get_command(app), Typer's public API):

    completions/ckptctl.bash|zsh|fish   Typer's own scripts (`_CKPTCTL_COMPLETE=source_<shell>`)
    man/ckptctl.1                       the man page (roff)
    docs/cli.md                         the CLI reference
    tests/snapshots/help_*.txt          `--help` of every command (COLUMNS=100, no colour)

Everything is built in memory first; nothing depends on the date, the terminal or the machine.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from ckptctl.cli.docs.man import render_man, roff_markup, roff_text
from ckptctl.cli.docs.markdown import md_markup, render_markdown
from ckptctl.cli.docs.model import (
    _ANSI,
    HELP_COLUMNS,
    PROG,
    SHELLS,
    SNAPSHOT_DIR,
    command_tree,
    plain,
    split_epilog,
)

__all__ = [
    "HELP_COLUMNS",
    "PROG",
    "SHELLS",
    "SNAPSHOT_DIR",
    "command_tree",
    "generate",
    "help_text",
    "main",
    "md_markup",
    "plain",
    "render_man",
    "render_markdown",
    "roff_markup",
    "roff_text",
    "snapshot_name",
    "split_epilog",
    "stale",
    "write",
]


# ---- help snapshots and completion scripts (through the CLI itself) -----------------------------
def _invoke(app, args: list[str], env: dict[str, str]) -> str:
    from typer.testing import CliRunner

    from ckptctl.cli import output

    output.STATE.reset()
    base = {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": str(HELP_COLUMNS), "LINES": "50"}
    base.update(env)
    result = CliRunner().invoke(app, args, env=base, prog_name=PROG, catch_exceptions=False)
    return result.stdout


def normalize_help(text: str) -> str:
    """What a help snapshot stores: no escape codes, no trailing spaces, one final newline."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def help_text(args: list[str], app=None) -> str:
    """`ckptctl ARGS --help` as a snapshot stores it."""
    if app is None:
        from ckptctl.cli.app import app
    return normalize_help(_invoke(app, [*args, "--help"], {}))


def completion_script(shell: str, app=None) -> str:
    if app is None:
        from ckptctl.cli.app import app
    text = _invoke(app, [], {"_CKPTCTL_COMPLETE": f"source_{shell}"})
    if not text.strip():
        raise RuntimeError(f"Typer printed no {shell} completion script")
    return text.rstrip("\n") + "\n"


def snapshot_name(path: str) -> str:
    return f"{SNAPSHOT_DIR}/help_{path.replace(' ', '_')}.txt"


def generate(app=None) -> dict[str, str]:
    """Every generated file: relative path -> content."""
    from ckptctl import __version__

    if app is None:
        from ckptctl.cli.app import app
    tree = command_tree(app)
    files: dict[str, str] = {}
    for shell in SHELLS:
        files[f"completions/ckptctl.{shell}"] = completion_script(shell, app)
    files["man/ckptctl.1"] = render_man(tree, __version__)
    files["docs/cli.md"] = render_markdown(tree, __version__)
    files[snapshot_name(PROG)] = help_text([], app)
    for c in tree.commands:
        files[snapshot_name(c.path)] = help_text(c.path.split()[1:], app)
    return files


def _orphans(root: Path, files: dict[str, str]) -> list[str]:
    """Help snapshots of commands that no longer exist."""
    d = root / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    return sorted(f"{SNAPSHOT_DIR}/{p.name}" for p in d.glob("help_*.txt") if f"{SNAPSHOT_DIR}/{p.name}" not in files)


def stale(root: Path, files: dict[str, str]) -> list[tuple[str, str]]:
    """[(relative path, why)] for every file that differs from what the app generates."""
    out = []
    for rel, content in files.items():
        p = root / rel
        if not p.is_file():
            out.append((rel, "missing"))
        elif p.read_text(encoding="utf-8") != content:
            out.append((rel, "out of date"))
    out += [(rel, "no such command any more") for rel in _orphans(root, files)]
    return out


def write(root: Path, files: dict[str, str]) -> list[str]:
    """Write what changed (atomically, each file) and delete orphan snapshots; the paths touched."""
    changed = []
    for rel, why in stale(root, files):
        p = root / rel
        if rel not in files:
            p.unlink()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(files[rel], encoding="utf-8")
            os.replace(tmp, p)
        changed.append(f"{rel} ({'deleted' if rel not in files else why})")
    return changed


def default_root() -> Path:
    """The source tree this module lives in (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[4]
    if (here / "pyproject.toml").is_file() and (here / "src" / "ckptctl").is_dir():
        return here
    return Path.cwd()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ckptctl.cli.docs",
        description="Rebuild the completions, man page, CLI reference and help snapshots from the app.",
    )
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every stale file")
    ap.add_argument("--diff", action="store_true", help="with --check, also print a unified diff")
    ap.add_argument("--root", type=Path, default=None, help="the source tree (default: %(default)s)")
    a = ap.parse_args(argv)
    root = (a.root or default_root()).resolve()
    files = generate()
    if a.check:
        bad = stale(root, files)
        for rel, why in bad:
            print(f"stale: {rel}: {why}", file=sys.stderr)
            if a.diff and rel in files:
                p = root / rel
                old = p.read_text(encoding="utf-8").splitlines(keepends=True) if p.is_file() else []
                sys.stdout.writelines(
                    difflib.unified_diff(old, files[rel].splitlines(keepends=True), f"a/{rel}", f"b/{rel}")
                )
        if bad:
            print(
                f"{len(bad)} generated file(s) out of date in {root}: run `python -m ckptctl.cli.docs`", file=sys.stderr
            )
            return 1
        print(f"all {len(files)} generated files are up to date", file=sys.stderr)
        return 0
    changed = write(root, files)
    for c in changed:
        print(f"wrote {c}", file=sys.stderr)
    print(f"{len(changed)} of {len(files)} generated files changed in {root}", file=sys.stderr)
    return 0
