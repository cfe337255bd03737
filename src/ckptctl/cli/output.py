"""The one output layer: stdout carries data only; messages, warnings and progress go to stderr.

Tables are Rich tables on a terminal and plain tabulate text when piped (no ANSI codes, no
elision: `grep` and `awk` see every character). JSON is one object or array, nothing else.
Names that come from files are escaped before they reach the terminal.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ckptctl.model import TensorInfo


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


@dataclass
class State:
    quiet: bool = False
    verbose: bool = False
    no_color: bool = False
    wide: bool = False


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
        "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
        "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
        "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "B": 1,
    }
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            return int(float(num) * mult)
    return int(t)


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


# ---- data (stdout) ----------------------------------------------------------------------------
# json escapes C0 controls itself; DEL and the C1 controls (U+009B is a CSI) it leaves raw.
# They can only occur inside JSON strings, so escaping them keeps the document's meaning.
_JSON_CTRL = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


class _Unusual(Exception):
    """Something _dumps_indent2 leaves to json.dumps (a non-str key, a NaN, an unknown type)."""


class TensorRows(list):
    """TensorInfo objects standing for their `to_json()` rows in a JSON document: the one-pass
    writer formats each row straight from the fields (a dict per row cost as much as writing it,
    10^5 rows: issue 13); json.dumps and strict_json see `to_json()` (_json_default)."""


def _dumps_indent2(obj: Any) -> str:
    """json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False), byte for byte, for documents
    of dicts with str keys, lists, tuples, str, int, finite float, bool and None; _Unusual otherwise.

    json's indenting encoder is pure Python (its C encoder only does indent=None) and costs ~20 µs
    per tensor row of `inspect --format json`; this one is a few µs (issue 13: 10^5 tensors)."""
    from json.encoder import encode_basestring as enc  # the C one, as ensure_ascii=False uses

    parts: list[str] = []
    add = parts.append
    finite = float("inf")

    def value(o: Any, ind: str, depth: int) -> None:
        t = type(o)
        if t is str:
            add(enc(o))
        elif t is int:
            add(int.__repr__(o))
        elif o is None:
            add("null")
        elif o is True:
            add("true")
        elif o is False:
            add("false")
        elif t is float:
            if o != o or o == finite or o == -finite:
                raise _Unusual
            add(float.__repr__(o))
        elif t is dict:
            if not o:
                add("{}")
                return
            if depth > 200:
                raise _Unusual
            inner = ind + "  "
            sep = "{\n" + inner
            for k, v in o.items():
                if type(k) is not str:
                    raise _Unusual
                tv = type(v)
                if tv is str:  # the common values inline: a call per value is most of the cost
                    add(f"{sep}{enc(k)}: {enc(v)}")
                elif tv is int:
                    add(f"{sep}{enc(k)}: {int.__repr__(v)}")
                else:
                    add(f"{sep}{enc(k)}: ")
                    value(v, inner, depth + 1)
                sep = ",\n" + inner
            add("\n" + ind + "}")
        elif t is list or t is tuple:
            if not o:
                add("[]")
                return
            if depth > 200:
                raise _Unusual
            inner = ind + "  "
            if all(type(v) is int for v in o):  # a shape
                add("[\n" + inner + (",\n" + inner).join(map(int.__repr__, o)) + "\n" + ind + "]")
                return
            sep = "[\n" + inner
            for v in o:
                add(sep)
                value(v, inner, depth + 1)
                sep = ",\n" + inner
            add("\n" + ind + "]")
        elif t is TensorRows:
            if not o:
                add("[]")
                return
            rows(o, ind)
        else:
            raise _Unusual

    def rows(o: TensorRows, ind: str) -> None:
        """Each TensorInfo as value(t.to_json()) writes it: name, dtype, shape, nbytes, numel[, alias_of]."""
        inner = ind + "  "
        i2 = inner + "  "
        i3 = i2 + "  "
        pre_name, pre_dtype, pre_shape = f'{{\n{i2}"name": ', f',\n{i2}"dtype": ', f',\n{i2}"shape": '
        pre_nbytes, pre_numel, pre_alias = f',\n{i2}"nbytes": ', f',\n{i2}"numel": ', f',\n{i2}"alias_of": '
        shape_open, shape_sep, shape_close = "[\n" + i3, ",\n" + i3, "\n" + i2 + "]"
        end = "\n" + inner + "}"
        sep = "[\n" + inner
        for r in o:
            name, dtype, shape, nbytes, alias = r.name, r.dtype, r.shape, r.nbytes, r.alias_of
            if type(name) is not str or type(dtype) is not str or type(nbytes) is not int:
                raise _Unusual
            numel = 1
            for d in shape:
                if type(d) is not int:
                    raise _Unusual
                numel *= d
            shape_text = shape_open + shape_sep.join(map(int.__repr__, shape)) + shape_close if shape else "[]"
            text = (f"{sep}{pre_name}{enc(name)}{pre_dtype}{enc(dtype)}{pre_shape}{shape_text}"
                    f"{pre_nbytes}{int.__repr__(nbytes)}{pre_numel}{int.__repr__(numel)}")
            if alias is not None:
                if type(alias) is not str:
                    raise _Unusual
                text += pre_alias + enc(alias)
            add(text + end)
            sep = ",\n" + inner
        add("\n" + ind + "]")

    value(obj, "", 0)
    return "".join(parts)


def print_json(obj: Any) -> None:
    """`obj` as strict JSON on stdout (RFC 8259: no bare NaN/Infinity), see strict_json()."""
    try:  # the common case: plain values only, encoded in one pass
        text = _dumps_indent2(obj)
    except _Unusual:
        try:  # most documents hold no NaN/Inf: encode them as they are (the walk costs ~50% more)
            text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
        except ValueError:  # a non-finite float (or a cycle): rewrite the document strictly
            text = json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False)
    text = text.translate(_JSON_CTRL)
    if not text.isascii():
        text = _SURROGATE.sub(_escape_surrogate, text)
    sys.stdout.write(text + "\n")


# A name that was not valid UTF-8 (a file name's raw byte as \udcff, a pickle string written with
# surrogatepass, an HDF5 name of raw bytes) holds lone surrogates, which UTF-8 cannot encode: they
# can only be inside JSON strings, so they go out as \uXXXX escapes and stdout stays valid UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


NONFINITE_KEY = "nonfinite"
_PLAIN = (str, int, bool, type(None))


def nonfinite_text(v: float) -> str:
    """'nan', 'inf' or '-inf'."""
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


def strict_json(obj: Any) -> Any:
    """`obj` made of plain JSON values only, with every non-finite float written as null.

    The nearest enclosing object gets a key "nonfinite" mapping the value's path relative to
    that object ("eval_loss", or "norms.3" for an item of a list) to "nan", "inf" or "-inf",
    so a field keeps one type (number or null) and the reason is still in the document:
        {"eval_loss": NaN, "norms": [1.0, Infinity]}
     -> {"eval_loss": null, "norms": [1.0, null], "nonfinite": {"eval_loss": "nan", "norms.1": "inf"}}
    A non-finite value with no enclosing object (an item of a top-level list) is just null.
    """
    return _strict(obj, None, "", 0)  # no enclosing object yet: nowhere to say why


def _strict(o: Any, marks: dict[str, str] | None, path: str, depth: int) -> Any:
    if isinstance(o, float):
        if o == o and o not in (float("inf"), float("-inf")):
            return float(o)  # a numpy float64 (a float subclass) as a plain float
        if marks is not None:
            marks[path] = nonfinite_text(o)
        return None
    if isinstance(o, _PLAIN):
        return o
    if depth > 200:  # a cycle or absurd nesting: say what it is rather than recurse forever
        return str(o)
    if isinstance(o, dict):
        own: dict[str, str] = {}
        out: dict[Any, Any] = {}
        for k, v in o.items():
            key = k if isinstance(k, str) else _json_key(k)
            out[key] = _strict(v, own, str(key), depth + 1)
        if own:
            slot = NONFINITE_KEY
            while slot in out and not isinstance(o.get(slot), dict):
                slot = "_" + slot  # a field of that name that is not ours: never overwrite it
            prev = out.get(slot)
            out[slot] = {**prev, **own} if isinstance(prev, dict) else own
        return out
    if isinstance(o, (list, tuple, set, frozenset)):
        items = _json_default(o) if isinstance(o, (set, frozenset)) else o
        return [_strict(v, marks, f"{path}.{i}", depth + 1) for i, v in enumerate(items)]
    return _strict(_json_default(o), marks, path, depth + 1)


def _json_key(k: Any) -> str:
    """A dict key as json.dumps would write it (it accepts str, int, float, bool, None)."""
    if isinstance(k, float):
        return repr(k) if k == k and abs(k) != float("inf") else nonfinite_text(k)
    if isinstance(k, (int, bool, type(None))):
        return json.dumps(k)
    return str(k)


def _json_default(o: Any):
    if isinstance(o, TensorInfo):  # an item of TensorRows
        return o.to_json()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, bytes):
        return o.hex()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


@dataclass
class Column:
    key: str
    header: str
    human: Callable[[Any], str] | None = None  # how a table shows the value
    justify: str = "left"
    name_like: bool = False  # long names: elide on narrow terminals unless --wide
    # On a terminal too narrow for the table (see fit_widths): columns of lower priority give way
    # first; a `drop` column is left out whole rather than cut to a useless stub ("flo…").
    priority: int = 0
    drop: bool = False


def _cell(col: Column, row: dict, human: bool) -> str:
    v = row.get(col.key)
    if human and col.human is not None:
        return col.human(v)
    if v is None:
        return "" if not human else "-"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}={val}" for k, val in v.items())
    return clean(v) if human else str(v)


NAME_MIN_WIDTH = 12


NAME_KEEP_WIDTH = 24  # names shrink below this only when nothing else can give
SHORT_COLUMN = 10  # columns this narrow (numbers, sizes, dtypes) are cut last


def fit_widths(columns: Sequence[Column], cells: Sequence[Sequence[str]], total: int,
               wide: bool = False) -> list[int]:
    """Column widths for a terminal `total` cells wide; 0 for a column left out.

    Columns give way by Column.priority, lowest first: a priority level is shrunk (or dropped)
    before the next level gives a cell. Within a level:
    1. Long columns shrink, widest first: prose-like ones down to their header (min 6), name-like
       ones down to NAME_KEEP_WIDTH; short columns (<= SHORT_COLUMN) keep their width.
    2. Then name-like columns go down to NAME_MIN_WIDTH.
    3. Last of all, after every level's 1 and 2: short columns down to their header (min 6), if
       that makes it fit.
    A `drop` column is never cut: when shrinking its level and the ones below is not enough, it
    is left out (rightmost first). If it still does not fit, the widths stay there (the caller
    prints wider and the terminal wraps) rather than squeezing every column to nothing.
    Name-like cells are shortened by shorten_names(), the others cut with '…'. With `wide`,
    every column keeps its width.
    """
    from rich.cells import cell_len

    nat = [max([cell_len(c.header)] + [cell_len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if wide or sum(nat) + 2 * (len(columns) - 1) <= total:
        return nat
    alive = [True] * len(columns)
    levels = sorted({c.priority for c in columns})
    for level in levels:
        widths = _shrink(columns, nat, alive, level, total, cut_short=False)
        if _fits(widths, alive, total):
            return widths
        for i in reversed(range(len(columns))):
            if columns[i].drop and columns[i].priority == level and sum(alive) > 1:
                alive[i] = False
                widths = _shrink(columns, nat, alive, level, total, cut_short=False)
                if _fits(widths, alive, total):
                    return widths
    return _shrink(columns, nat, alive, levels[-1], total)


def _fits(widths: list[int], alive: list[bool], total: int) -> bool:
    return sum(widths) + 2 * (sum(alive) - 1) <= total  # Table(box=None): two spaces between columns


def _shrink(columns: Sequence[Column], nat: list[int], alive: list[bool], upto: int, total: int,
            cut_short: bool = True) -> list[int]:
    """Natural widths cut down by the stages of fit_widths(), level by level up to `upto`
    (short columns last of all: a number cut to '10.…' says nothing)."""
    from rich.cells import cell_len

    out = [n if a else 0 for n, a in zip(nat, alive)]
    excess = sum(out) - (total - 2 * (sum(alive) - 1))
    header = [max(cell_len(c.header), 6) for c in columns]
    stages = [
        [min(n, NAME_KEEP_WIDTH) if c.name_like else n if n <= SHORT_COLUMN else min(n, h)
         for c, n, h in zip(columns, nat, header)],
        [min(n, NAME_MIN_WIDTH) if c.name_like else n if n <= SHORT_COLUMN else min(n, h)
         for c, n, h in zip(columns, nat, header)],
        [min(n, NAME_MIN_WIDTH) if c.name_like else min(n, h) for c, n, h in zip(columns, nat, header)],
    ]
    levels = sorted({c.priority for c in columns if c.priority <= upto})
    may = [a and not c.drop and c.priority <= upto for a, c in zip(alive, columns)]
    for n, level in [(n, lv) for n in (0, 1) for lv in levels] + [(2, lv) for lv in levels if cut_short]:
        if excess <= 0:
            break
        if n == 2 and level == levels[0] and excess > sum(
                o - f for o, f, m in zip(out, stages[2], may) if m and o > f):
            break  # it will not fit anyway: keep the short columns whole
        floor = [f if m and c.priority == level else o for f, m, c, o in zip(stages[n], may, columns, out)]
        while excess > 0:  # shave the widest column of this level that may still give, a cell at a time
            i = max((j for j in range(len(out)) if out[j] > floor[j]), key=lambda j: out[j], default=None)
            if i is None:
                break
            out[i] -= 1
            excess -= 1
    return out


def elide_middle(text: str, width: int) -> str:
    """`text` in at most `width` terminal cells, keeping its start and its end:
    'encoder.layers.0.attention.self.query.weight' -> 'encoder.layers.0…self.query.weight'."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    tail_room = (width - 1) // 2
    head_room = width - 1 - tail_room
    head, used = [], 0
    for ch in text:
        if used + cell_len(ch) > head_room:
            break
        head.append(ch)
        used += cell_len(ch)
    tail, used = [], 0
    for ch in reversed(text):
        if used + cell_len(ch) > tail_room:
            break
        tail.append(ch)
        used += cell_len(ch)
    return "".join(head) + "…" + "".join(reversed(tail))


def elide_end(text: str, width: int) -> str:
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        if used + cell_len(ch) > width - 1:
            break
        out.append(ch)
        used += cell_len(ch)
    return "".join(out).rstrip() + "…" if width > 0 else ""


def shorten_names(names: Sequence[str], width: int) -> list[str]:
    """Names (tensor names, paths) in at most `width` cells each, still telling rows apart.

    Leading components of a dotted or slashed name shrink to their first letter, as logback
    does ('model.layers.0.self_attn.q_proj.weight' -> 'm.l.0.s.q_proj.weight'), but only where
    no other name in `names` has a different component there with the same first letter (so
    'checkpoint-100/' and 'checkpoint-200/' stay whole); numbers and the last component stay
    whole. What still does not fit is elided in the middle. Text with spaces is prose: cut at
    the end."""
    import re

    from rich.cells import cell_len

    split = [None if any(ch.isspace() for ch in n) else re.split(r"([./])", n) for n in names]
    siblings: dict[tuple[str, ...], set[str]] = {}
    for t in split:
        for i in range(0, len(t or ()), 2):
            siblings.setdefault(tuple(t[:i]), set()).add(t[i])
    out = []
    for n, t in zip(names, split):
        if cell_len(n) <= width:
            out.append(n)
            continue
        if t is None:
            out.append(elide_end(n, width))
            continue
        parts = list(t)
        last = max((i for i in range(0, len(t), 2) if t[i]), default=-1)
        for i in range(0, len(t), 2):
            comp = t[i]
            if i == last or len(comp) <= 1 or comp.isdigit():
                continue
            if any(o != comp and o[:1] == comp[:1] for o in siblings[tuple(t[:i])]):
                continue  # shrinking it would make two rows look alike
            parts[i] = comp[0]
            if cell_len("".join(parts)) <= width:
                break
        short = "".join(parts)
        out.append(short if cell_len(short) <= width else elide_middle(short, width))
    return out


def shorten_name(text: str, width: int) -> str:
    """shorten_names() of one name."""
    return shorten_names([text], width)[0]


def render_rows(
    rows: Sequence[dict],
    columns: Sequence[Column],
    fmt: str,
    title: str | None = None,
    footer: Sequence[str] | None = None,
) -> None:
    """Print rows to stdout as table, csv or markdown (json is the caller's own shape)."""
    fmt = getattr(fmt, "value", fmt)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.key for c in columns])
        # exact strings for programs; on a terminal, control characters are shown escaped
        raw = not _isatty(sys.stdout)
        for r in rows:
            w.writerow([v if raw else clean(v) for v in (_cell(c, r, human=False) for c in columns)])
        sys.stdout.write(buf.getvalue())
        return
    if fmt == "markdown":
        from tabulate import tabulate

        body = [[_cell(c, r, human=True).replace("|", "\\|") for c in columns] for r in rows]
        sys.stdout.write(
            tabulate(body, headers=[c.header for c in columns], tablefmt="github",
                     colalign=[c.justify for c in columns] if rows else None) + "\n"
        )
        return
    if color_enabled(sys.stdout):
        from rich.table import Table

        con = out_console()
        cells = [[_cell(c, r, human=True) for c in columns] for r in rows]
        if rows:  # on a terminal, a column with nothing in it ("tied to" with no ties) gives its room away
            keep = [i for i in range(len(columns)) if any(row[i].strip() not in ("", "-") for row in cells)
                    or columns[i].name_like]
            columns = [columns[i] for i in keep]
            cells = [[row[i] for i in keep] for row in cells]
        term_width = con.width
        widths = fit_widths(columns, cells, term_width, wide=STATE.wide)
        hidden = [c.header for c, w in zip(columns, widths) if w == 0]
        if hidden:  # left out to fit: the least useful columns (Column.drop)
            keep = [i for i, w in enumerate(widths) if w > 0]
            columns, widths = [columns[i] for i in keep], [widths[i] for i in keep]
            cells = [[row[i] for i in keep] for row in cells]
        need = sum(widths) + 2 * (len(columns) - 1)
        if need > con.width and not STATE.wide:
            con.width = need  # too many columns for this terminal even cut down: Rich must not squeeze
        table = Table(title=markup_safe(title) if title else None, show_lines=False,
                      header_style="bold", box=None, pad_edge=False)
        for c, w in zip(columns, widths):
            kw: dict[str, Any] = {"justify": c.justify}
            if c.name_like and STATE.wide:
                kw.update(overflow="fold")  # all of it, wrapped
            else:
                kw.update(no_wrap=True, overflow="ellipsis", width=w)
            table.add_column(c.header, **kw)
        if not STATE.wide:
            for i, c in enumerate(columns):
                if c.name_like:
                    for row, short in zip(cells, shorten_names([row[i] for row in cells], widths[i])):
                        row[i] = short
        for row in cells:
            table.add_row(*[markup_safe(v) for v in row])
        con.print(table)
        for line in footer or ():
            con.print(markup_safe(line))
        if hidden:
            con.print(f"[dim]hidden to fit {term_width} columns: {markup_safe(', '.join(hidden))} "
                      "(--wide shows all)[/]")
        return
    from tabulate import tabulate

    if title:
        sys.stdout.write(clean(title) + "\n")
    body = [[_cell(c, r, human=True) for c in columns] for r in rows]
    sys.stdout.write(
        tabulate(body, headers=[c.header for c in columns], tablefmt="simple",
                 colalign=[c.justify for c in columns] if rows else None, disable_numparse=True) + "\n"
    )
    for line in footer or ():
        sys.stdout.write(clean(line) + "\n")


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
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console(), transient=True,
    ) as p:
        task = p.add_task(markup_safe(description), total=total_bytes)
        yield _RichProgress(p, task)
