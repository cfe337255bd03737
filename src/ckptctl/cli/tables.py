"""Tables on stdout: Rich tables on a terminal (columns fitted to its width, long names elided in
the middle), plain tabulate text when piped (no ANSI codes, no elision), csv and markdown."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptctl.cli.terminal import STATE, _isatty, clean, color_enabled, markup_safe, out_console


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


def fit_widths(columns: Sequence[Column], cells: Sequence[Sequence[str]], total: int, wide: bool = False) -> list[int]:
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


def _shrink(
    columns: Sequence[Column], nat: list[int], alive: list[bool], upto: int, total: int, cut_short: bool = True
) -> list[int]:
    """Natural widths cut down by the stages of fit_widths(), level by level up to `upto`
    (short columns last of all: a number cut to '10.…' says nothing)."""
    from rich.cells import cell_len

    out = [n if a else 0 for n, a in zip(nat, alive)]
    excess = sum(out) - (total - 2 * (sum(alive) - 1))
    header = [max(cell_len(c.header), 6) for c in columns]
    stages = [
        [
            min(n, NAME_KEEP_WIDTH) if c.name_like else n if n <= SHORT_COLUMN else min(n, h)
            for c, n, h in zip(columns, nat, header)
        ],
        [
            min(n, NAME_MIN_WIDTH) if c.name_like else n if n <= SHORT_COLUMN else min(n, h)
            for c, n, h in zip(columns, nat, header)
        ],
        [min(n, NAME_MIN_WIDTH) if c.name_like else min(n, h) for c, n, h in zip(columns, nat, header)],
    ]
    levels = sorted({c.priority for c in columns if c.priority <= upto})
    may = [a and not c.drop and c.priority <= upto for a, c in zip(alive, columns)]
    for n, level in [(n, lv) for n in (0, 1) for lv in levels] + [(2, lv) for lv in levels if cut_short]:
        if excess <= 0:
            break
        if n == 2 and level == levels[0] and excess > sum(o - f for o, f, m in zip(out, stages[2], may) if m and o > f):
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
        if t is None:  # prose: not split
            continue
        for i in range(0, len(t), 2):
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
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([c.key for c in columns])
        # exact strings for programs; on a terminal, control characters are shown escaped
        raw = not _isatty(sys.stdout)
        for r in rows:
            writer.writerow([v if raw else clean(v) for v in (_cell(c, r, human=False) for c in columns)])
        sys.stdout.write(buf.getvalue())
        return
    if fmt == "markdown":
        from tabulate import tabulate

        body = [[_cell(c, r, human=True).replace("|", "\\|") for c in columns] for r in rows]
        sys.stdout.write(
            tabulate(
                body,
                headers=[c.header for c in columns],
                tablefmt="github",
                colalign=[c.justify for c in columns] if rows else None,
            )
            + "\n"
        )
        return
    if color_enabled(sys.stdout):
        from rich.table import Table

        con = out_console()
        cells = [[_cell(c, r, human=True) for c in columns] for r in rows]
        if rows:  # on a terminal, a column with nothing in it ("tied to" with no ties) gives its room away
            keep = [
                i
                for i in range(len(columns))
                if any(row[i].strip() not in ("", "-") for row in cells) or columns[i].name_like
            ]
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
        table = Table(
            title=markup_safe(title) if title else None, show_lines=False, header_style="bold", box=None, pad_edge=False
        )
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
            con.print(
                f"[dim]hidden to fit {term_width} columns: {markup_safe(', '.join(hidden))} (--wide shows all)[/]"
            )
        return
    from tabulate import tabulate

    if title:
        sys.stdout.write(clean(title) + "\n")
    body = [[_cell(c, r, human=True) for c in columns] for r in rows]
    sys.stdout.write(
        tabulate(
            body,
            headers=[c.header for c in columns],
            tablefmt="simple",
            colalign=[c.justify for c in columns] if rows else None,
            disable_numparse=True,
        )
        + "\n"
    )
    for line in footer or ():
        sys.stdout.write(clean(line) + "\n")
