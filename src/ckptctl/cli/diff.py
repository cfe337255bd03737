"""`ckptctl diff A B`: compare two checkpoints, two runs, or the steps of one run (--along)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ckptctl.cli import output
from ckptctl.cli.common import ExcludeOpt, FormatOpt, IncludeOpt, StripPrefixOpt, WideOpt, handle_errors
from ckptctl.cli.complete import complete_key_paths
from ckptctl.cli.inspect import RawNamesOpt
from ckptctl.cli.output import Column, Fmt, clean
from ckptctl.errors import UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl diff model.pt model.safetensors          [dim]# exit 0: equal, bit for bit[/]\n\n"
    "  ckptctl diff last.ckpt pytorch_model.bin --strip-prefix model.   [dim]# model weights of the .ckpt[/]\n\n"
    "  ckptctl diff model.pt model-fp16.safetensors --ignore-dtype       [dim]# equal up to the cast?[/]\n\n"
    "  ckptctl diff run-a/ run-b/                        [dim]# step by step, with both runs' metrics[/]\n\n"
    "  ckptctl diff run/ --along                         [dim]# update size per step, first NaN/Inf[/]\n\n"
    "Training checkpoints (Lightning .ckpt, any dict with a state_dict): the model weights are "
    "compared, as convert and average take them; --all compares everything, --key PATH one part.\n\n"
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
CSV_COLUMNS = [
    Column(k, k)
    for k in (
        "name",
        "change",
        "dtype_a",
        "dtype_b",
        "shape_a",
        "shape_b",
        "numel",
        "num_diff",
        "max_abs_diff",
        "mean_abs_diff",
        "rel_l2",
        "cosine",
        "nan_a",
        "nan_b",
        "inf_a",
        "inf_b",
    )
]


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
        rtol: Annotated[
            float | None, typer.Option("--rtol", help="Relative tolerance (of |b|) for floats.", min=0)
        ] = None,
        no_values: Annotated[
            bool,
            typer.Option(
                "--no-values", help="Compare names, dtypes and shapes only (metadata only: instant on any size)."
            ),
        ] = False,
        key: Annotated[
            str | None,
            typer.Option(
                "--key",
                autocompletion=complete_key_paths,
                help="Compare only the sub-tree PATH "
                "(e.g. optimizer_states/0 of a Lightning .ckpt), on each side that "
                "has it.",
            ),
        ] = None,
        all_: Annotated[
            bool,
            typer.Option(
                "--all",
                help="Compare every tensor of a training checkpoint "
                "(optimizer state, callbacks, ...) under its '/'-joined name, "
                "not just the model weights.",
            ),
        ] = False,
        strip: StripPrefixOpt = None,
        rename: Annotated[
            list[str] | None,
            typer.Option("--rename", help="OLD=NEW regex applied to names on both sides (e.g. '/=.'); repeatable."),
        ] = None,
        include: IncludeOpt = None,
        exclude: ExcludeOpt = None,
        ignore_dtype: Annotated[
            bool,
            typer.Option(
                "--ignore-dtype",
                help="A dtype change alone is no difference: "
                "compare values across the cast, within --atol/--rtol "
                "or, without them, within the cast's rounding (rtol = "
                "epsilon of the less precise dtype, e.g. 9.8e-4 for fp16).",
            ),
        ] = False,
        along: Annotated[
            bool,
            typer.Option(
                "--along",
                help="A is a run folder: walk its checkpoints in step order (update size, weight norm, first NaN/Inf).",
            ),
        ] = False,
        show_all: Annotated[
            bool, typer.Option("--show-identical", help="List identical tensors too, and every name only one side has.")
        ] = False,
        fmt: FormatOpt = Fmt.table,
        wide: WideOpt = False,
        raw_names: RawNamesOpt = False,
    ) -> None:
        from ckptctl.cli.common import check_paths

        check_paths(a, b)  # first: a typo says so
        from ckptctl.ops import diff as ops
        from ckptctl.ops.diff_along import along_run
        from ckptctl.ops.diff_runs import diff_runs
        from ckptctl.ops.runs import is_run_dir

        output.STATE.wide = output.STATE.wide or wide
        kw: dict[str, Any] = dict(
            key=key, strip=tuple(strip or ()), rename=rename, all_=all_, include=include, exclude=exclude
        )
        if key is not None and all_:
            raise UsageError("--key and --all do not go together")
        if along:
            if b is not None:
                raise UsageError("--along takes one run folder: ckptctl diff RUN_DIR --along")
            if not is_run_dir(a):
                raise UsageError("--along walks the checkpoints of a run folder; this is not one", a)
            if ignore_dtype:
                raise UsageError("--ignore-dtype compares two checkpoints (or two runs), not --along")
            along_res = along_run(a, progress_factory=_bar("along"), **kw)
            _left_out_note(along_res.left_out, along_res.left_out, along_res.root)
            _show_along(along_res, fmt)
            raise typer.Exit(1 if along_res.first_nonfinite else 0)
        if b is None:
            raise UsageError("give two checkpoints (or two run folders), or one run folder with --along")
        run_a, run_b = is_run_dir(a), is_run_dir(b)
        vkw: dict[str, Any] = dict(kw, atol=atol, rtol=rtol, values=not no_values, ignore_dtype=ignore_dtype)
        if run_a and run_b:
            runs_res = diff_runs(a, b, progress_factory=_bar("diff"), **vkw)
            _left_out_note(*runs_res.left_out, runs_res.root)
            _show_runs(runs_res, fmt)
            raise typer.Exit(0 if runs_res.equal else 1)
        if run_a or run_b:
            which = a if run_a else b
            raise UsageError(
                f"{which} is a run folder and the other is one checkpoint: give two checkpoints "
                "or two run folders (or name the step's checkpoint inside the run)"
            )
        res = ops.diff_checkpoints(a, b, progress_factory=_bar("diff"), **vkw)
        _left_out_note(
            *res.left_out, (res.side_a.root if res.side_a else "") or (res.side_b.root if res.side_b else "")
        )
        _show_pair(res, fmt, show_all)
        raise typer.Exit(0 if res.equal else 1)


def _left_out_note(a: int, b: int, root: str) -> None:
    """One stderr line when the model-weights default left tensors out (never on stdout)."""
    if not a and not b:
        return
    if a == b:
        n = f"{a} optimizer/other tensors left out of each"
    elif a and b:
        n = f"{a} optimizer/other tensors left out of A, {b} of B"
    else:
        n = f"{a or b} optimizer/other tensors left out of {'A' if a else 'B'}"
    output.note(f"comparing model weights only ({root + '/; ' if root else ''}{n}; --all to include)")


def _listed(names: list[str], limit: int = 3) -> str:
    """A list of names for a table or a summary line: all of them with -v, else the first few."""
    if output.STATE.verbose or len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" ... ({len(names)} in all; -v lists every one)"


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
    limit = None if show_all or output.STATE.verbose or fmt == Fmt.csv else ONLY_IN_LIMIT
    for side, names in (("A", res.only_in_a), ("B", res.only_in_b)):
        shown = names if limit is None else names[:limit]
        rows += [{"name": n, "change": f"only in {side}"} for n in shown]
        if len(shown) < len(names):
            rows.append({"name": f"... {len(names) - len(shown)} more (-v lists all)", "change": f"only in {side}"})
    if show_all:
        rows += [{"name": n, "change": "identical"} for n in res.identical]
    if fmt == Fmt.csv:
        output.render_rows(rows, CSV_COLUMNS, "csv")
        return
    lines = _summary(res)
    if rows:
        output.render_rows(rows, COLUMNS, fmt.value, footer=None)
    _lines(lines, fmt, blank=bool(rows))


def _casts(ds) -> str:
    from collections import Counter

    c = Counter(f"{d.dtype_a} -> {d.dtype_b}" for d in ds)
    return ", ".join(k if n == len(ds) else f"{k} ×{n}" for k, n in c.most_common())


def _summary(res) -> list[str]:
    exact = res.atol is None and res.rtol is None
    how = (
        "structure only, --no-values"
        if not res.values
        else "bit-exact"
        if exact
        else f"atol={res.atol or 0:g}, rtol={res.rtol or 0:g}"
    )
    if res.ignore_dtype and res.values:
        how = "same dtype bit-exact, across dtypes within the cast's rounding" if exact else how + ", across dtypes too"
    same = len(res.identical)
    lines = []
    recast = [d for d in res.changed if d.dtype_changed]
    if recast and not res.ignore_dtype:
        only = [d for d in recast if d.dtype_only]
        if res.values and len(only) == len(recast):
            lines.append(
                f"{len(recast)} tensor{'s' if len(recast) != 1 else ''} changed dtype only "
                f"({_casts(recast)}), values equal ({how}): --ignore-dtype counts them as equal"
            )
        else:
            lines.append(
                f"{len(recast)} tensor{'s' if len(recast) != 1 else ''} changed dtype ({_casts(recast)}): "
                "--ignore-dtype compares their values across the cast (within its rounding, "
                "or --atol/--rtol)"
            )
    cast = (
        f" ({len(res.dtype_only)} of them across a dtype change: {_casts(res.dtype_only)})"
        if res.ignore_dtype and res.dtype_only
        else ""
    )
    for side, key in (("A", res.key_a), ("B", res.key_b)):
        if key:
            lines.append(f"{side}: compared the {key}/ sub-tree")
    if res.equal:
        pass  # the last line says it
    elif res.identical and not res.values:
        lines.append(f"{same} tensors with the same name, dtype and shape (values not compared)")
    elif res.identical:
        lines.append(f"{same} identical tensor{'s' if same != 1 else ''}{cast}")
    changes = res.metadata_changes
    if res.format_a != res.format_b:  # keys only one format has are format details, not changes
        na = sum(1 for m in changes if m["only_in"] == "a")
        nb = sum(1 for m in changes if m["only_in"] == "b")
        if na or nb:
            lines.append(
                f"metadata: {na} keys only in A, {nb} only in B ({res.format_a} vs {res.format_b}; "
                "--format json lists them)"
            )
        changes = [m for m in changes if m["only_in"] is None]
    if len(changes) > META_LIMIT and not output.STATE.wide:
        lines.append(f"metadata: {len(changes)} keys differ (first {META_LIMIT} below; --format json lists all)")
        changes = changes[:META_LIMIT]
    for m in changes:
        if m["only_in"] == "a":
            lines.append(f"metadata {_short(m['key'])}: only in A ({_short(m['a'])})")
        elif m["only_in"] == "b":
            lines.append(f"metadata {_short(m['key'])}: only in B ({_short(m['b'])})")
        else:
            lines.append(f"metadata {_short(m['key'])}: {_short(m['a'])} -> {_short(m['b'])}")
    if res.equal:
        lines.append(f"equal ({how}): {same} tensors{cast}")
    else:
        parts = [
            f"{len(res.changed)} changed"
            + (f" ({len(res.dtype_only)} in dtype only)" if res.dtype_only and not res.ignore_dtype else "")
        ]
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


METRIC_NOISE = ("runtime", "per_second", "flos", "learning_rate", "grad_norm", "epoch")
METRICS_SHOWN = 3  # metrics side by side in a table (--wide or -v: all)


def table_metrics(names: list[str]) -> list[str]:
    """The metrics a table shows side by side: evaluation metrics first, then losses and
    accuracies; bookkeeping (runtime, flos, learning rate, ...) only with --wide or -v."""

    def rank(k: str) -> tuple[int, int]:
        low = k.lower()
        if low.startswith(("eval", "val", "test")) or "/" in low:
            return (0, names.index(k))
        if "loss" in low or "acc" in low:
            return (1, names.index(k))
        return (2, names.index(k))

    everything = output.STATE.wide or output.STATE.verbose
    keep = sorted((k for k in names if everything or not any(n in k.lower() for n in METRIC_NOISE)), key=rank)
    return keep if everything else keep[:METRICS_SHOWN]


def _show_runs(res, fmt: Fmt) -> None:
    hint = next((s.hint for s in res.steps if s.hint), None)
    if hint:
        output.note(f"hint: {hint}")
    if fmt == Fmt.json:
        output.print_json(res.to_json())
        return
    metrics = res.metric_names if fmt == Fmt.csv else table_metrics(res.metric_names)
    rows = []
    for s in res.steps:
        r = s.to_json()
        r["max_rel_l2"] = s.max_rel_l2
        r["result"] = ("error: " + s.error) if s.error else ("equal" if s.equal else "different")
        extra = [f"{k} only in {side}" for k, side in ((s.only_in_a, "A"), (s.only_in_b, "B")) if k]
        if s.num_dtype_only and not s.error:
            extra.append(f"{s.num_dtype_only} in dtype only")
        if extra:
            r["result"] += f" ({', '.join(extra)})"
        r["nonfinite_text"] = (
            ", ".join(s.nonfinite)
            if output.STATE.verbose or len(s.nonfinite) <= 2
            else ", ".join(s.nonfinite[:2]) + f" +{len(s.nonfinite) - 2} more (-v)"
        )
        for m in metrics:
            r[f"{m}_a"], r[f"{m}_b"] = s.metrics_a.get(m), s.metrics_b.get(m)
        rows.append(r)
    mcols = [
        Column(f"{m}_{side}", f"{m} {side.upper()}", human=_g, justify="right") for m in metrics for side in ("a", "b")
    ]
    if fmt == Fmt.csv:
        output.render_rows(
            rows,
            [
                Column(k, k)
                for k in (
                    "step",
                    "a",
                    "b",
                    "result",
                    "num_changed",
                    "num_identical",
                    "only_in_a",
                    "only_in_b",
                    "max_rel_l2",
                    "max_rel_l2_tensor",
                )
            ]
            + mcols,
            "csv",
        )
        return
    if rows:
        output.render_rows(rows, RUN_COLUMNS[:1] + mcols + RUN_COLUMNS[1:], fmt.value)
    lines = []
    if res.missing_in_b:
        lines.append(f"steps only in A: {_steps(res.missing_in_b)}")
    if res.missing_in_a:
        lines.append(f"steps only in B: {_steps(res.missing_in_a)}")
    for side, names in (("A", res.unstepped_a), ("B", res.unstepped_b)):
        if names:
            lines.append(f"not compared (no step) in {side}: {_listed(names, 5)}")
    hidden = [m for m in res.metric_names if m not in metrics]
    if hidden:
        lines.append(f"metrics not shown: {', '.join(hidden)} (--wide or -v shows them, --format json has all)")
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
    Column("num_nonfinite", "NaN/Inf", human=lambda v: str(v) if v else "", justify="right"),
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
        r["nonfinite_tensors"] = ", ".join(s.nonfinite_tensors)
        rows.append(r)
    if fmt == Fmt.csv:
        output.render_rows(
            rows,
            [
                Column(k, k)
                for k in (
                    "step",
                    "path",
                    "update_rel_l2",
                    "update_norm",
                    "weight_norm",
                    "num_nonfinite",
                    "top_tensor",
                    "nonfinite_tensors",
                )
            ],
            "csv",
        )
        return
    cols = ALONG_COLUMNS if fmt == Fmt.table else [c for c in ALONG_COLUMNS if c.key != "bar"]
    if output.STATE.verbose and any(s.nonfinite_tensors for s in res.steps):
        cols = cols + [Column("nonfinite_tensors", "NaN/Inf tensors")]
    if all(s.step is not None for s in res.steps) and output.color_enabled(sys.stdout) and not output.STATE.wide:
        cols = [c for c in cols if c.key != "name"]  # the step says which; keep the bar readable
    output.render_rows(rows, cols, fmt.value)
    lines = [f"{len(res.steps)} checkpoints, {res.num_tensors} floating-point tensors compared"]
    if res.not_in_all:
        lines.append(f"{len(res.not_in_all)} tensors not in every checkpoint were skipped ({_listed(res.not_in_all)})")
    f = res.first_nonfinite
    if f is not None:
        lines.append(
            f"first NaN/Inf at step {f.step} ({Path(f.path).name}): {f.nonfinite} elements in "
            f"{_listed(f.nonfinite_tensors)}"
        )
    else:
        lines.append("no NaN/Inf in any checkpoint")
    _lines(lines, fmt, blank=True)
