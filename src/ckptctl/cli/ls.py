"""`ckptctl ls RUN_DIR...`: one row per checkpoint of a training run, with step and metrics."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import FormatOpt, WideOpt, handle_errors
from ckptctl.cli.complete import metric_completer
from ckptctl.cli.output import Column, Fmt, clean, human_bytes, human_count
from ckptctl.cli.prune import Mode
from ckptctl.errors import NotFound, UsageError

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl ls runs/bert-base/\n\n"
    "  ckptctl ls lightning_logs/ --recursive --sort val_loss\n\n"
    "  ckptctl ls run-a/ run-b/ --sort eval_loss      # ranked across both runs\n\n"
    "  ckptctl ls run-a/ run-b/ --best eval_loss      # the best checkpoint of each run\n\n"
    "  ckptctl ls run-a/ run-b/ --format json | jq '.[] | {path, step, metrics}'"
)
SORTS = ("step", "mtime", "size", "name")
KEEP = 9  # Column.priority of what a narrow terminal must still show whole


def fmt_metrics(metrics: dict[str, float], limit: int | None = 4) -> str:
    """`eval_loss=0.512 loss=0.61`: evaluation metrics first, bookkeeping (runtime, flos) left out."""

    def rank(k: str) -> tuple[int, str]:
        low = k.lower()
        if low.startswith(("eval", "val", "test")) or "/" in low:
            return (0, k)
        if "loss" in low or "acc" in low:
            return (1, k)
        return (2, k)

    noise = ("runtime", "per_second", "flos", "learning_rate", "grad_norm", "epoch")
    keys = sorted((k for k in metrics if not any(n in k.lower() for n in noise)), key=rank)
    if limit is not None and len(keys) > limit:
        keys = keys[:limit]
    return " ".join(f"{clean(k)}={fmt_metric(metrics[k])}" for k in keys) or "-"


def fmt_metric(v, spec: str = ".4g") -> str:
    """A metric for a table: 0.5123, 1.2e+04; non-finite ones as nan, inf, -inf."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return clean(v)
    if not math.isfinite(v):
        return output.nonfinite_text(float(v))
    return format(v, spec)


def fmt_time(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def fmt_dtypes(mix: dict[str, int]) -> str:
    if not mix:
        return "-"
    parts = [f"{d}" if len(mix) == 1 else f"{d}×{n}" for d, n in mix.items()]
    return ",".join(parts[:3]) + ("…" if len(parts) > 3 else "")


def _sort(ckpts, key: str, reverse: bool):
    from ckptctl.ops.runs import sort_key

    if key == "step":  # runs stay together
        out = sorted(ckpts, key=lambda c: (os.fspath(c.run or ""), sort_key(c)))
    elif key == "mtime":
        out = sorted(ckpts, key=lambda c: (c.mtime, os.fspath(c.path)))
    elif key == "size":
        out = sorted(ckpts, key=lambda c: (c.size, os.fspath(c.path)))
    elif key == "name":
        out = sorted(ckpts, key=lambda c: os.fspath(c.path))
    else:  # a metric: checkpoints without it (or NaN/Inf) last, whatever the direction
        have = [c for c in ckpts if key in c.metrics and math.isfinite(c.metrics[key])]
        rest = [c for c in ckpts if c not in have]
        have.sort(key=lambda c: (c.metrics[key], sort_key(c)), reverse=reverse)
        return have + sorted(rest, key=sort_key)
    return list(reversed(out)) if reverse else out


def _display_path(c, run) -> str:
    try:
        rel = c.path.relative_to(run.path)
    except ValueError:
        rel = Path(c.path.name)
    suffix = "/" if c.path.is_dir() and not c.path.is_symlink() else ""
    return os.fspath(rel) + suffix


def register(app: typer.Typer) -> None:
    @app.command(
        "ls",
        help="List the checkpoints of training-run folders: step, format, size on disk, tensors, "
        "params, dtypes, optimizer state, metrics and time, sorted by step, with totals. Understands "
        "HF Trainer checkpoint-N/ folders, Lightning .ckpt, fairseq, DCP, Orbax and plain step files; "
        "symlinks and last/best copies show as aliases. Reads headers and metadata only.",
        short_help="List the checkpoints of a training run (step, size, metrics).",
        epilog=EXAMPLES,
    )
    @handle_errors
    def ls_cmd(
        run_dirs: Annotated[
            list[Path],
            typer.Argument(help="Run folders (or checkpoint files/folders) to list; paths or URLs (s3://bucket/run)."),
        ],
        fmt: FormatOpt = Fmt.table,
        sort: Annotated[
            str,
            typer.Option(
                "--sort",
                "-s",
                autocompletion=metric_completer("step", "mtime", "size", "name"),
                help="step, mtime, size, name or a METRIC name (e.g. eval_loss).",
            ),
        ] = "step",
        reverse: Annotated[bool, typer.Option("--reverse", "-r", help="Reverse the order.")] = False,
        recursive: Annotated[
            bool, typer.Option("--recursive", "-R", help="Also look in sub-folders (lightning_logs/version_0/...).")
        ] = False,
        best: Annotated[
            str | None,
            typer.Option(
                "--best",
                autocompletion=metric_completer(),
                metavar="METRIC",
                help="Only the best checkpoint of each run by METRIC (e.g. eval_loss); NaN/Inf never count as best.",
            ),
        ] = None,
        mode: Annotated[
            Mode | None,
            typer.Option(
                "--mode",
                help="min or max for --best (default: the Lightning "
                "ModelCheckpoint mode, else guessed from the name: loss is min).",
            ),
        ] = None,
        wide: WideOpt = False,
    ) -> None:
        from ckptctl.cli.common import check_paths

        check_paths(run_dirs)  # first: a typo says so
        from ckptctl.ops.runs import scan_run
        from ckptctl.sources import as_path

        roots = [as_path(p) for p in run_dirs]  # s3://bucket/run: a RemotePath (listings, header reads)

        if mode is not None and best is None:
            raise UsageError("--mode only applies to --best METRIC")

        output.STATE.wide = output.STATE.wide or wide
        runs = []
        loose: dict[Path | RemotePath, list[Path | RemotePath]] = {}
        for p in roots:
            if p.is_file() or p.is_symlink() and not p.is_dir():
                loose.setdefault(p.parent, []).append(p)
                continue
            runs.append(scan_run(p, recursive=recursive))
        for _parent, files in loose.items():  # files named on the command line: one run per folder
            merged = scan_run(files[0])
            for f in files[1:]:
                r = scan_run(f)
                merged.checkpoints.extend(r.checkpoints)
                merged.warnings.extend(r.warnings)
            runs.append(merged)
        for r in runs:
            for w in r.warnings:
                output.warn(w)
        empty = [r for r in runs if not r.checkpoints]
        for r in empty:
            hint = ""
            if r.subdirs and not recursive:
                hint = f" (it has {len(r.subdirs)} sub-folder(s): try --recursive)"
            if len(runs) == 1:
                raise NotFound(f"no checkpoints found{hint}", r.path)
            output.warn(f"{r.path}: no checkpoints found{hint}")
        if len(empty) == len(runs):
            raise NotFound("no checkpoints found in any of the given folders")
        known = set(SORTS) | {m for r in runs for c in r.checkpoints for m in c.metrics}
        if sort not in known:
            metrics = sorted(known - set(SORTS))
            raise UsageError(
                f"--sort {sort!r}: not step, mtime, size or name, and no checkpoint has a metric of that name"
                + (f" (metrics found: {', '.join(metrics)})" if metrics else " (no checkpoint carries metrics)")
            )
        multi = len(runs) > 1
        rows = []
        for r in runs:
            for c in r.checkpoints:
                d = c.to_json()
                d["run"] = os.fspath(r.path)
                d["shown"] = _display_path(c, r)
                d["_c"] = c
                rows.append(d)
        run_order = list(dict.fromkeys(d["run"] for d in rows))  # footer lines in the order given
        heading = None
        if best is not None:
            rows, heading = _best_rows(rows, best, mode.value if mode else None, known - set(SORTS))
        # one order over every row of every run given (`ls A B --sort eval_loss` ranks across runs)
        order = _sort([d["_c"] for d in rows], sort, reverse)
        pos = {id(c): i for i, c in enumerate(order)}
        rows.sort(key=lambda d: pos[id(d["_c"])])
        if fmt == Fmt.json:
            for d in rows:
                d.pop("shown")
                d.pop("_c")
            output.print_json(rows)
            return
        _render(rows, fmt.value, multi, heading, run_order)


def _best_rows(rows: list[dict], metric: str, mode: str | None, metrics: set[str]) -> tuple[list[dict], str]:
    """The best row of each run by `metric` (finite values only; ties: the later step), and the
    footer heading that says which way is better."""
    from ckptctl.ops.prune import _MAX_METRIC, _MIN_METRIC, _callback_mode, guess_mode

    if metric not in metrics:
        raise UsageError(
            f"--best {metric!r}: no checkpoint has a metric of that name"
            + (f" (metrics found: {', '.join(sorted(metrics))})" if metrics else " (no checkpoint carries metrics)")
        )
    if mode is None:
        mode = _callback_mode([d["_c"] for d in rows], metric)
    if mode is None:
        mode = guess_mode(metric)
        if not (_MIN_METRIC.search(metric) or _MAX_METRIC.search(metric)):
            output.note(
                f"--best {metric}: {'lower' if mode == 'min' else 'higher'} is better "
                "(guessed from the name; set --mode min|max to be sure)"
            )
    sign = 1.0 if mode == "min" else -1.0
    groups: dict[tuple[str, str], list[dict]] = {}
    for d in rows:  # a run: a folder given, and within it (--recursive) each folder of checkpoints
        groups.setdefault((d["run"], os.fspath(d["_c"].run or d["run"])), []).append(d)
    picked = []
    for (_, folder), group in groups.items():
        scored = [
            d
            for d in group
            if isinstance(d["_c"].metrics.get(metric), float) and math.isfinite(d["_c"].metrics[metric])
        ]
        if not scored:
            bad = sum(1 for d in group if metric in d["_c"].metrics)
            output.warn(
                f"{folder}: "
                + (f"every {metric} is NaN or Inf" if bad else f"no checkpoint has {metric}")
                + "; no best shown for it"
            )
            continue
        picked.append(min(scored, key=lambda d: (sign * d["_c"].metrics[metric], -(d["_c"].step or 0))))
    if not picked:
        raise NotFound(f"--best {metric}: no checkpoint has a finite {metric}")
    return picked, f"best {metric} ({'lowest' if mode == 'min' else 'highest'}) of each run"


def _render(
    rows: list[dict], fmt: str, multi: bool, heading: str | None = None, run_order: list[str] | None = None
) -> None:
    from ckptctl.ops.runs import bytes_on_disk

    wide = output.STATE.wide
    for d in rows:
        notes = []
        if d["aliases"]:
            notes.append("← " + ", ".join(d["aliases"]))
        if d["role"]:
            notes.append(f"({d['role']})")
        if d["best_of_run"]:
            notes.append("best")
        if d["unsafe_globals"]:
            notes.append("UNSAFE pickle: " + ", ".join(d["unsafe_globals"]))
        d["notes"] = " ".join(notes)
        d["metrics_text"] = fmt_metrics(d["metrics"], None if wide or fmt == "csv" else 4)
        d["optim"] = {True: "yes", False: "no", None: "-"}[d["has_optimizer"]]
        d["modified"] = fmt_time(d["mtime"])
        d["dtypes_text"] = fmt_dtypes(d["dtypes"])
    # On a narrow terminal the columns give way by priority (output.fit_widths): run, step, path,
    # metrics and notes stay whole longest; dtypes, optim, tensors, format, params and modified are
    # left out, in that order, before any of them is cut.
    cols = []
    if multi:
        cols.append(Column("run", "run", name_like=True, priority=KEEP))
    cols.append(Column("step", "step", human=lambda s: "-" if s is None else str(s), justify="right", priority=KEEP))
    if any(d["epoch"] is not None and d["step"] is None for d in rows):  # Keras ModelCheckpoint: epochs only
        cols.append(
            Column("epoch", "epoch", human=lambda e: "-" if e is None else str(e), justify="right", priority=KEEP)
        )
    cols += [
        Column("shown" if fmt != "csv" else "path", "path", name_like=True, priority=KEEP),
        Column("format", "format", human=lambda f: f or "?", priority=3, drop=True),
        Column("total_bytes", "size", human=human_bytes, justify="right", priority=7),
        Column(
            "num_tensors",
            "tensors",
            human=lambda n: "-" if n is None else str(n),
            justify="right",
            priority=2,
            drop=True,
        ),
        Column("num_params", "params", human=human_count, justify="right", priority=4, drop=True),
        Column("dtypes_text", "dtypes", priority=0, drop=True),
        Column("optim", "optim", priority=1, drop=True),
        Column("metrics_text", "metrics", priority=KEEP),
        Column("modified", "modified", priority=5, drop=True),
    ]
    if fmt == "csv":  # machine-readable: exact values, one key per column
        for d in rows:
            d["dtypes"] = " ".join(f"{k}={v}" for k, v in d["dtypes"].items())
            d["metrics"] = " ".join(f"{k}={v!r}" for k, v in d["metrics"].items())
            d["aliases"] = " ".join(d["aliases"])
            d["best"] = "yes" if d["best_of_run"] else ""
        cols = ([Column("run", "run")] if multi else []) + [
            Column(k, k)
            for k in (
                "step",
                "epoch",
                "path",
                "format",
                "total_bytes",
                "num_files",
                "num_tensors",
                "num_params",
                "dtypes",
                "has_optimizer",
                "metrics",
                "mtime",
                "aliases",
                "role",
                "best",
                "incomplete",
                "error",
            )
        ]
        output.render_rows(rows, cols, "csv")
        return
    # on disk as du counts it: a last.ckpt copy folded into its twin too, each inode once
    ckpts: dict[str, list] = {r: [] for r in (run_order or []) if any(d["run"] == r for d in rows)}
    ckpts.update({d["run"]: [] for d in rows if d["run"] not in ckpts})
    for d in rows:
        ckpts[d["run"]].append(d.pop("_c"))
    if any(d["notes"] for d in rows):
        cols.append(Column("notes", "notes", priority=KEEP))
    if any(d["error"] for d in rows):
        cols.append(Column("error", "error", human=lambda e: clean(e) if e else "", priority=6))
    n = len(rows)
    total = bytes_on_disk([c for cs in ckpts.values() for c in cs])
    broken = sum(1 for d in rows if d["error"])
    footer = [
        (f"{heading}: " if heading else "") + f"{n} checkpoint{'s' if n != 1 else ''}, "
        f"{human_bytes(total)} on disk" + (f", {broken} unreadable or incomplete" if broken else "")
    ]
    if multi:
        footer += [
            f"  {r}: {len(cs)} checkpoint{'s' if len(cs) != 1 else ''}, {human_bytes(bytes_on_disk(cs))}"
            for r, cs in ckpts.items()
        ]
    if fmt == "markdown":
        output.render_rows(rows, cols, "markdown")
        import sys

        sys.stdout.write("\n" + "\n".join(footer) + "\n")
        return
    output.render_rows(rows, cols, fmt, footer=footer)
