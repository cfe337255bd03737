"""The terminal side of the output layer: --quiet/--verbose/--no-color/--wide state, Rich consoles
(colour only on a terminal, never with NO_COLOR), escaping of names from files, the messages on
stderr and the progress bar (stderr, terminals only)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class State:
    quiet: bool = False
    verbose: bool = False
    no_color: bool = False
    wide: bool = False

    def reset(self) -> None:
        """Back to the defaults (one in-process invocation after another: docs, tests)."""
        for f in fields(self):
            setattr(self, f.name, f.default)


STATE = State()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def color_enabled(stream=None) -> bool:
    stream = stream or sys.stdout
    if STATE.no_color or os.environ.get("NO_COLOR", "") != "":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console(stderr: bool):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = color_enabled(stream)
    return Console(
        file=stream,
        force_terminal=tty,
        no_color=not tty,
        color_system="auto" if tty else None,
        highlight=False,
        soft_wrap=not tty,
        emoji=False,
    )


def out_console():
    return _console(False)


def err_console():
    return _console(True)


# ---- escaping ---------------------------------------------------------------------------------
_CTRL = {i: f"\\x{i:02x}" for i in list(range(0x20)) + [0x7F]}
_CTRL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
for _c in range(0x80, 0xA0):  # C1 controls (CSI etc.)
    _CTRL[_c] = f"\\x{_c:02x}"


def clean(s: Any) -> str:
    """A string from a file, made safe for a terminal: control characters shown escaped."""
    return str(s).translate(_CTRL)


def markup_safe(s: Any) -> str:
    """clean() plus Rich-markup escaping, for text passed to Rich."""
    from rich.markup import escape

    return escape(clean(s))


# ---- messages (stderr) ------------------------------------------------------------------------
def error(msg: str) -> None:
    err_console().print(f"[bold red]error:[/] {markup_safe(msg)}")


def warn(msg: str) -> None:
    """A warning on stderr; silenced by --quiet ("only errors on stderr")."""
    if not STATE.quiet:
        err_console().print(f"[yellow]warning:[/] {markup_safe(msg)}")


def note(msg: str) -> None:
    """Informational line on stderr; silenced by --quiet."""
    if not STATE.quiet:
        err_console().print(markup_safe(msg))


def debug(msg: str) -> None:
    if STATE.verbose:
        err_console().print(f"[dim]{markup_safe(msg)}[/]")


# ---- progress (stderr, terminals only) --------------------------------------------------------
class _NoProgress:
    def advance(self, n: int) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


class _RichProgress:
    def __init__(self, progress, task):
        self._p = progress
        self._t = task

    def advance(self, n: int) -> None:
        self._p.advance(self._t, n)

    def set_description(self, text: str) -> None:
        self._p.update(self._t, description=markup_safe(text))


def progress_enabled() -> bool:
    if STATE.quiet:
        return False
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress(total_bytes: int, description: str) -> Iterator[Any]:
    """A bytes progress bar (throughput, ETA) on stderr when it is a terminal; else a no-op."""
    if not progress_enabled():
        yield _NoProgress()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    ) as p:
        task = p.add_task(markup_safe(description), total=total_bytes)
        yield _RichProgress(p, task)
