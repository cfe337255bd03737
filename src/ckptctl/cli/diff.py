"""`ckptctl diff A B`: compare two checkpoints, two runs, or the steps of one run (--along)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import FormatOpt, WideOpt, handle_errors
from ckptctl.cli.complete import complete_key_paths, complete_name_prefixes, complete_tensor_names
from ckptctl.cli.inspect import RawNamesOpt
from ckptctl.cli.output import Column, Fmt, clean
from ckptctl.errors import UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl diff model.pt model.safetensors          [dim]# exit 0: equal, bit for bit[/]\n\n"
    "  ckptctl diff last.ckpt pytorch_model.bin --key state_dict --strip-prefix model.\n\n"
    "  ckptctl diff run/ --along                         [dim]# update size per step, first NaN/Inf[/]\n\n"
    "Exit status: 0 equal, 1 different (--along: 1 when a checkpoint holds NaN/Inf), 2 error."
)


def _g(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):  # JSON's spelling of inf/nan
        return v
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def _cos(v) -> str:
    """Cosine similarity; near 1 as 1-ε, which is where the information is (0.999999 hides it)."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v == 1.0:
        return "1"
    if v > 0.9999:
        return f"1-{1.0 - v:.2g}"
    return f"{v:.6f}"


def _nonfinite(r: dict) -> str:
    parts = []
    for side in ("a", "b"):
        n, i = r.get(f"nan_{side}") or 0, r.get(f"inf_{side}") or 0
        if n or i:
            bits = ([f"{n} NaN"] if n else []) + ([f"{i} Inf"] if i else [])
            parts.append(f"{side.upper()}: {' '.join(bits)}")
    return "; ".join(parts)


def _differ(r: dict) -> str:
    n, tot = r.get("num_diff"), r.get("numel")
    if n is None:
        return "-"
    return f"{n} ({100.0 * n / tot:.3g}%)" if tot else str(n)


COLUMNS = [
    Column("name", "name", name_like=True),
    Column("change", "change"),
    Column("max_abs_diff", "max abs diff", human=_g, justify="right"),
    Column("rel_l2", "rel L2", human=_g, justify="right"),
    Column("cosine", "cosine", human=_cos, justify="right"),
    Column("differ", "differ", justify="right"),
    Column("nonfinite", "NaN/Inf"),
]
ONLY_IN_LIMIT = 20  # rows per side in a table (--all, csv and json list every one)
META_LIMIT = 8  # metadata lines in a table
CSV_COLUMNS = [Column(k, k) for k in (
    "name", "change", "dtype_a", "dtype_b", "shape_a", "shape_b", "numel", "num_diff", "max_abs_diff",
    "mean_abs_diff", "rel_l2", "cosine", "nan_a", "nan_b", "inf_a", "inf_b")]


def register(app: typer.Typer) -> None:
    @app.command(
        "diff",
        help="Compare two checkpoints of any formats: tensors only in one, dtype/shape changes, file "
        "metadata, and value statistics (max abs diff, relative L2, cosine, differing elements, "
        "NaN/Inf), streamed in bounded memory. Equal means bit-exact unless --atol/--rtol. "
        "Two run folders are aligned by step; --along walks the steps of one run.",
        short_help="Compare two checkpoints (or two runs, or one run --along).",
        epilog=EXAMPLES,
    )
    @handle_errors(error_code=2)
    def diff_cmd(
        a: Annotated[Path, typer.Argument(help="Checkpoint A (file or folder), or a run folder.")],
        b: Annotated[Path | None, typer.Argument(help="Checkpoint B, or a second run folder.")] = None,
        atol: Annotated[float | None, typer.Option("--atol", help="Absolute tolerance for floats.", min=0)] = None,
        rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance (of |b|) for floats.", min=0)] = None,
        no_values: Annotated[bool, typer.Option("--no-values", help="Compare names, dtypes and shapes only "
                                                "(metadata only: instant on any size).")] = False,
        key: Annotated[str | None, typer.Option("--key", autocompletion=complete_key_paths, help="Compare this sub-tree (e.g. state_dict of a "
                                                "Lightning .ckpt), on each side that has it.")] = None,
        strip: Annotated[list[str] | None, typer.Option("--strip-prefix", autocompletion=complete_name_prefixes, help="Remove this name prefix "
                                                        "(e.g. module.) where present; repeatable.")] = None,
        rename: Annotated[list[str] | None, typer.Option("--rename", help="OLD=NEW regex applied to names on "
                                                         "both sides (e.g. '/=.'); repeatable.")] = None,
        filters: Annotated[list[str] | None, typer.Option("--filter", "-k", autocompletion=complete_tensor_names, help="Only tensors whose (aligned) "
                                                          "name matches this glob; repeatable.")] = None,
        along: Annotated[bool, typer.Option("--along", help="A is a run folder: walk its checkpoints in step "
                                            "order (update size, weight norm, first NaN/Inf).")] = False,
        show_all: Annotated[bool, typer.Option("--all", help="List identical tensors too.")] = False,
        fmt: FormatOpt = Fmt.table,
        wide: WideOpt = False,
        raw_names: RawNamesOpt = False,
    ) -> None:
        from ckptctl.ops import diff as ops
        from ckptctl.ops.runs import is_run_dir

        output.STATE.wide = output.STATE.wide or wide
        kw = dict(key=key, strip=tuple(strip or ()), filters=filters, rename=rename)
        if along:
            if b is not None:
                raise UsageError("--along takes one run folder: ckptctl diff RUN_DIR --along")
            if not is_run_dir(a):
                raise UsageError("--along walks the checkpoints of a run folder; this is not one", a)
            res = ops.along_run(a, progress_factory=_bar("along"), **kw)
            _show_along(res, fmt)
            raise typer.Exit(1 if res.first_nonfinite else 0)
        if b is None:
            raise UsageError("give two checkpoints (or two run folders), or one run folder with --along")
        run_a, run_b = is_run_dir(a), is_run_dir(b)
        vkw = dict(kw, atol=atol, rtol=rtol, values=not no_values)
        if run_a and run_b:
            res = ops.diff_runs(a, b, progress_factory=_bar("diff"), **vkw)
            _show_runs(res, fmt)
            raise typer.Exit(0 if res.equal else 1)
        if run_a or run_b:
            which = a if run_a else b
            raise UsageError(f"{which} is a run folder and the other is one checkpoint: give two checkpoints "
                             "or two run folders (or name the step's checkpoint inside the run)")
        res = ops.diff_checkpoints(a, b, progress_factory=_bar("diff"), **vkw)
        _show_pair(res, fmt, show_all)
        raise typer.Exit(0 if res.equal else 1)


def _bar(what: str):
    def factory(total: int):
        return output.progress(total, what)

    return factory


# ---- two checkpoints -------------------------------------------------------------------------------
def _show_pair(res, fmt: Fmt, show_all: bool) -> None:
    if res.hint:
        output.note(f"hint: {res.hint}")
    if fmt == Fmt.json:
        doc = res.to_json()
        if show_all:
            doc["identical"] = res.identical
        output.print_json(doc)
        return
    rows = []
    for d in res.changed:
        r = d.to_json()
        r["nonfinite"] = _nonfinite(r)
        r["differ"] = _differ(r)
        rows.append(r)
    limit = None if show_all or fmt == Fmt.csv else ONLY_IN_LIMIT
    for side, names in (("A", res.only_in_a), ("B", res.only_in_b)):
        shown = names if limit is None else names[:limit]
        rows += [{"name": n, "change": f"only in {side}"} for n in shown]
        if len(shown) < len(names):
            rows.append({"name": f"... {len(names) - len(shown)} more", "change": f"only in {side}"})
    if show_all:
        rows += [{"name": n, "change": "identical"} for n in res.identical]
    if fmt == Fmt.csv:
        output.render_rows(rows, CSV_COLUMNS, "csv")
        return
    lines = _summary(res)
    if rows:
        output.render_rows(rows, COLUMNS, fmt.value, footer=None)
    _lines(lines, fmt, blank=bool(rows))


def _summary(res) -> list[str]:
    how = ("structure only, --no-values" if not res.values else
           "bit-exact" if res.atol is None and res.rtol is None else
           f"atol={res.atol or 0:g}, rtol={res.rtol or 0:g}")
    same = len(res.identical)
    lines = []
    for side, key in (("A", res.key_a), ("B", res.key_b)):
        if key:
            lines.append(f"{side}: compared the {key}/ sub-tree")
    if res.equal:
        pass  # the last line says it
    elif res.identical and not res.values:
        lines.append(f"{same} tensors with the same name, dtype and shape (values not compared)")
    elif res.identical:
        lines.append(f"{same} identical tensor{'s' if same != 1 else ''}")
    changes = res.metadata_changes
    if res.format_a != res.format_b:  # keys only one format has are format details, not changes
        na = sum(1 for m in changes if m["only_in"] == "a")
        nb = sum(1 for m in changes if m["only_in"] == "b")
        if na or nb:
            lines.append(f"metadata: {na} keys only in A, {nb} only in B ({res.format_a} vs {res.format_b}; "
                         "--format json lists them)")
        changes = [m for m in changes if m["only_in"] is None]
    if len(changes) > META_LIMIT and not output.STATE.wide:
        lines.append(f"metadata: {len(changes)} keys differ (first {META_LIMIT} below; --format json lists all)")
        changes = changes[:META_LIMIT]
    for m in changes:
        if m["only_in"] == "a":
            lines.append(f"metadata {m['key']}: only in A ({_short(m['a'])})")
        elif m["only_in"] == "b":
            lines.append(f"metadata {m['key']}: only in B ({_short(m['b'])})")
        else:
            lines.append(f"metadata {m['key']}: {_short(m['a'])} -> {_short(m['b'])}")
    if res.equal:
        lines.append(f"equal ({how}): {same} tensors")
    else:
        parts = [f"{len(res.changed)} changed"]
        if res.only_in_a:
            parts.append(f"{len(res.only_in_a)} only in A")
        if res.only_in_b:
            parts.append(f"{len(res.only_in_b)} only in B")
        parts.append(f"{same} {'identical' if res.values else 'same'}")
        lines.append(f"different ({how}): {', '.join(parts)}")
    return lines


def _short(v) -> str:
    import json

    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 60 or output.STATE.wide else text[:57] + "..."


def _lines(lines: list[str], fmt: Fmt, blank: bool = False) -> None:
    if not lines:
        return
    if blank:
        sys.stdout.write("\n")
    for line in lines:
        sys.stdout.write(("- " if fmt == Fmt.markdown else "") + clean(line) + "\n")


# ---- two runs ----------------------------------------------------------------------------------------
RUN_COLUMNS = [
    Column("step", "step", justify="right"),
    Column("result", "result"),
    Column("num_changed", "changed", justify="right"),
    Column("max_rel_l2", "max rel L2", human=_g, justify="right"),
    Column("max_rel_l2_tensor", "tensor", name_like=True),
    Column("nonfinite_text", "NaN/Inf"),
]


def _show_runs(res, fmt: Fmt) -> None:
    if fmt == Fmt.json:
        output.print_json(res.to_json())
        return
    rows = []
    for s in res.steps:
        r = s.to_json()
        r["max_rel_l2"] = s.max_rel_l2
        r["result"] = ("error: " + s.error) if s.error else ("equal" if s.equal else "different")
        extra = [f"{k} only in {side}" for k, side in ((s.only_in_a, "A"), (s.only_in_b, "B")) if k]
        if extra:
            r["result"] += f" ({', '.join(extra)})"
        r["nonfinite_text"] = ", ".join(s.nonfinite[:3]) + (" ..." if len(s.nonfinite) > 3 else "")
        rows.append(r)
    if fmt == Fmt.csv:
        output.render_rows(rows, [Column(k, k) for k in ("step", "a", "b", "result", "num_changed", "num_identical",
                                                         "only_in_a", "only_in_b", "max_rel_l2",
                                                         "max_rel_l2_tensor")], "csv")
        return
    if rows:
        output.render_rows(rows, RUN_COLUMNS, fmt.value)
    lines = []
    if res.missing_in_b:
        lines.append(f"steps only in A: {_steps(res.missing_in_b)}")
    if res.missing_in_a:
        lines.append(f"steps only in B: {_steps(res.missing_in_a)}")
    for side, names in (("A", res.unstepped_a), ("B", res.unstepped_b)):
        if names:
            lines.append(f"not compared (no step) in {side}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    same = sum(1 for s in res.steps if s.equal)
    lines.append(f"{'equal' if res.equal else 'different'}: {len(res.steps)} common steps, {same} equal")
    _lines(lines, fmt, blank=bool(rows))


def _steps(steps: list[int]) -> str:
    text = ", ".join(map(str, steps[:20]))
    return text + (f" ... ({len(steps)} steps)" if len(steps) > 20 else "")


# ---- along one run -------------------------------------------------------------------------------------
ALONG_COLUMNS = [
    Column("step", "step", justify="right"),
    Column("update_rel_l2", "rel update", human=_g, justify="right"),
    Column("bar", ""),
    Column("weight_norm", "weight norm", human=lambda v: _g(v, 6), justify="right"),
    Column("nonfinite", "NaN/Inf", human=lambda v: str(v) if v else "", justify="right"),
    Column("top_tensor", "largest update", name_like=True),
    Column("name", "checkpoint", name_like=True),
]


def _bar_text(v, vmax: float, width: int = 12) -> str:
    if v is None or vmax <= 0 or not math.isfinite(v):
        return "" if v is None else ("!" * 3)
    tty = output.color_enabled(sys.stdout)
    cells = v / vmax * width
    if not tty:
        return "#" * max(1 if v > 0 else 0, round(cells))
    full = int(cells)
    eighths = int((cells - full) * 8)
    return "█" * full + ("" if not eighths else " ▏▎▍▌▋▊▉"[eighths])


def _show_along(res, fmt: Fmt) -> None:
    for s in res.skipped:
        output.warn(f"skipped {s}")
    if fmt == Fmt.json:
        output.print_json(res.to_json())
        return
    ups = [s.update_rel_l2 for s in res.steps if s.update_rel_l2 is not None and math.isfinite(s.update_rel_l2)]
    vmax = max(ups, default=0.0)
    rows = []
    for s in res.steps:
        r = s.to_json()
        r.update(name=Path(s.path).name, update_rel_l2=s.update_rel_l2, weight_norm=s.weight_norm)
        r["bar"] = _bar_text(s.update_rel_l2, vmax) if fmt == Fmt.table else ""
        if s.top_tensor and s.top_rel_l2 is not None:
            r["top_tensor"] = f"{s.top_tensor} ({_g(s.top_rel_l2, 3)})"
        rows.append(r)
    if fmt == Fmt.csv:
        output.render_rows(rows, [Column(k, k) for k in ("step", "path", "update_rel_l2", "update_norm",
                                                         "weight_norm", "nonfinite", "top_tensor")], "csv")
        return
    cols = ALONG_COLUMNS if fmt == Fmt.table else [c for c in ALONG_COLUMNS if c.key != "bar"]
    if all(s.step is not None for s in res.steps) and output.color_enabled(sys.stdout) and not output.STATE.wide:
        cols = [c for c in cols if c.key != "name"]  # the step says which; keep the bar readable
    output.render_rows(rows, cols, fmt.value)
    lines = [f"{len(res.steps)} checkpoints, {res.num_tensors} floating-point tensors compared"]
    if res.not_in_all:
        lines.append(f"{len(res.not_in_all)} tensors not in every checkpoint were skipped "
                     f"({', '.join(res.not_in_all[:3])}{' ...' if len(res.not_in_all) > 3 else ''})")
    f = res.first_nonfinite
    if f is not None:
        names = ", ".join(f.nonfinite_tensors[:3]) + (" ..." if len(f.nonfinite_tensors) > 3 else "")
        lines.append(f"first NaN/Inf at step {f.step} ({Path(f.path).name}): {f.nonfinite} elements in {names}")
    else:
        lines.append("no NaN/Inf in any checkpoint")
    _lines(lines, fmt, blank=True)
