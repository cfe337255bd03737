"""The one output layer: stdout carries data only; messages, warnings and progress go to stderr.

Tables are Rich tables on a terminal and plain tabulate text when piped (no ANSI codes, no
elision: `grep` and `awk` see every character). JSON is one object or array, nothing else.
Names that come from files are escaped before they reach the terminal.

Modules: terminal (state, consoles, escaping, messages, progress), jsonout (JSON on stdout),
tables (table / csv / markdown rows); this one holds the format choices and human numbers and
re-exports the others' names, the API the commands use.
"""

from __future__ import annotations

from enum import Enum

# the output layer's names, where other modules and the tests find them (one module per idea below)
from ckptctl.cli.jsonout import (  # noqa: F401
    NONFINITE_KEY,
    TensorRows,
    nonfinite_text,
    print_json,
    strict_json,
)
from ckptctl.cli.tables import (  # noqa: F401
    NAME_KEEP_WIDTH,
    NAME_MIN_WIDTH,
    SHORT_COLUMN,
    Column,
    elide_end,
    elide_middle,
    fit_widths,
    render_rows,
    shorten_name,
    shorten_names,
)
from ckptctl.cli.terminal import (  # noqa: F401
    STATE,
    State,
    _isatty,
    _NoProgress,
    clean,
    color_enabled,
    debug,
    err_console,
    error,
    markup_safe,
    note,
    out_console,
    progress,
    progress_enabled,
    warn,
)


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


class InspectFmt(str, Enum):
    table = "table"
    tree = "tree"
    json = "json"
    csv = "csv"
    markdown = "markdown"


# ---- human numbers ----------------------------------------------------------------------------
def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    step = 1000.0
    v = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(v) < step or unit == "TB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= step
    return f"{n} B"  # pragma: no cover


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, '1024' -> 1024."""
    t = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "K": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "T": 1000**4,
        "B": 1,
    }
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            return int(float(num) * mult)
    return int(t)
