"""`ckptctl ls RUN_DIR...`: one row per checkpoint of a training run, with step and metrics."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import FormatOpt, WideOpt, handle_errors
from ckptctl.cli.complete import metric_completer
from ckptctl.cli.output import Column, Fmt, clean, human_bytes, human_count
from ckptctl.errors import NotFound, UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl ls runs/bert-base/\n\n"
    "  ckptctl ls lightning_logs/ --recursive --sort val_loss\n\n"
    "  ckptctl ls run-a/ run-b/ --format json | jq '.[] | {path, step, metrics}'"
)
SORTS = ("step", "mtime", "size", "name")


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
    return " ".join(f"{clean(k)}={metrics[k]:.4g}" for k in keys) or "-"


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
    else:  # a metric: checkpoints without it (or NaN) last, whatever the direction
        have = [c for c in ckpts if key in c.metrics and not math.isnan(c.metrics[key])]
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
            list[Path], typer.Argument(help="Run folders (or checkpoint files/folders) to list.")
        ],
        fmt: FormatOpt = Fmt.table,
        sort: Annotated[
            str, typer.Option("--sort", "-s", autocompletion=metric_completer("step", "mtime", "size", "name"), help="step, mtime, size, name or a METRIC name (e.g. eval_loss).")
        ] = "step",
        reverse: Annotated[bool, typer.Option("--reverse", "-r", help="Reverse the order.")] = False,
        recursive: Annotated[
            bool, typer.Option("--recursive", "-R", help="Also look in sub-folders (lightning_logs/version_0/...).")
        ] = False,
        wide: WideOpt = False,
    ) -> None:
        from ckptctl.cli.common import check_paths; check_paths(run_dirs)  # first: a typo says so
        from ckptctl.ops.runs import scan_run

        output.STATE.wide = output.STATE.wide or wide
        runs = []
        loose: dict[Path, list[Path]] = {}
        for p in run_dirs:
            if p.is_file() or p.is_symlink() and not p.is_dir():
                loose.setdefault(p.parent, []).append(p)
                continue
            runs.append(scan_run(p, recursive=recursive))
        for parent, files in loose.items():  # files named on the command line: one run per folder
            merged = None
            for f in files:
                r = scan_run(f)
                if merged is None:
                    merged = r
                else:
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
        order = _sort([d["_c"] for d in rows], sort, reverse)
        pos = {id(c): i for i, c in enumerate(order)}
        rows.sort(key=lambda d: pos[id(d["_c"])])
        for d in rows:
            d.pop("_c")
        if fmt == Fmt.json:
            for d in rows:
                d.pop("shown")
            output.print_json(rows)
            return
        _render(rows, fmt.value, multi)


def _render(rows: list[dict], fmt: str, multi: bool) -> None:
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
    cols = []
    if multi:
        cols.append(Column("run", "run", name_like=True))
    cols += [
        Column("step", "step", human=lambda s: "-" if s is None else str(s), justify="right"),
        Column("shown" if fmt != "csv" else "path", "path", name_like=True),
        Column("format", "format", human=lambda f: f or "?"),
        Column("total_bytes", "size", human=human_bytes, justify="right"),
        Column("num_tensors", "tensors", human=lambda n: "-" if n is None else str(n), justify="right"),
        Column("num_params", "params", human=human_count, justify="right"),
        Column("dtypes_text", "dtypes"),
        Column("optim", "optim"),
        Column("metrics_text", "metrics"),
        Column("modified", "modified"),
    ]
    if fmt == "csv":  # machine-readable: exact values, one key per column
        for d in rows:
            d["dtypes"] = " ".join(f"{k}={v}" for k, v in d["dtypes"].items())
            d["metrics"] = " ".join(f"{k}={v!r}" for k, v in d["metrics"].items())
            d["aliases"] = " ".join(d["aliases"])
            d["best"] = "yes" if d["best_of_run"] else ""
        cols = ([Column("run", "run")] if multi else []) + [
            Column(k, k) for k in ("step", "path", "format", "total_bytes", "num_files", "num_tensors", "num_params",
                                   "dtypes", "has_optimizer", "metrics", "mtime", "aliases", "role", "best",
                                   "incomplete", "error")]
        output.render_rows(rows, cols, "csv")
        return
    if any(d["notes"] for d in rows):
        cols.append(Column("notes", "notes"))
    if any(d["error"] for d in rows):
        cols.append(Column("error", "error", human=lambda e: clean(e) if e else ""))
    n = len(rows)
    total = sum(d["total_bytes"] for d in rows)
    broken = sum(1 for d in rows if d["error"])
    footer = [f"{n} checkpoint{'s' if n != 1 else ''}, {human_bytes(total)} on disk"
              + (f", {broken} unreadable or incomplete" if broken else "")]
    if multi:
        per: dict[str, list[int]] = {}
        for d in rows:
            per.setdefault(d["run"], []).append(d["total_bytes"])
        footer += [f"  {r}: {len(v)} checkpoint{'s' if len(v) != 1 else ''}, {human_bytes(sum(v))}"
                   for r, v in per.items()]
    if fmt == "markdown":
        output.render_rows(rows, cols, "markdown")
        import sys

        sys.stdout.write("\n" + "\n".join(footer) + "\n")
        return
    output.render_rows(rows, cols, fmt, footer=footer)
