"""`ckptctl prune RUN_DIR`: keep what retention policies say, delete the rest (dry run by default)."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import FormatOpt, WideOpt, check_paths, handle_errors
from ckptctl.cli.complete import complete_metric_names
from ckptctl.cli.output import Column, Fmt, clean, human_bytes
from ckptctl.errors import CkptError, NotFound, UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl prune runs/bert/ --keep-last 3 --keep-best eval_loss\n\n"
    "  ckptctl prune lightning_logs/ -R --keep-every 10000 --exp-spacing --yes\n\n"
    "  ckptctl prune runs/gpt/ --keep-last 2 --keep-since 7d --trash /scratch/trash --yes\n\n"
    "Always kept: the newest checkpoint, alias targets (last.ckpt, best, checkpoint_best.pt, the TF "
    "`checkpoint` file's latest), the HF best_model_checkpoint / Lightning best_model_path, incomplete "
    "saves, anything newer than --min-age, and unreadable checkpoints unless --include-broken. Keras "
    "ModelCheckpoint folders rank by epoch; deleting TF checkpoints also drops them from the `checkpoint` file."
)


class Mode(str, Enum):
    min = "min"
    max = "max"


def _steps(values: list[str] | None) -> list[int]:
    out: list[int] = []
    for v in values or []:
        for part in v.replace(" ", "").split(","):
            if not part:
                continue
            if not part.isdigit():
                raise UsageError(f"--keep-steps {v!r}: expected step numbers like 1000,5000")
            out.append(int(part))
    return out


def register(app: typer.Typer) -> None:
    @app.command(
        "prune",
        help="Delete old checkpoints of a training run by composable retention policies. A checkpoint is "
        "kept if ANY policy keeps it or a protection applies. Without --yes it only prints the plan "
        "(keep/delete, why, bytes freed); with --yes it deletes exactly the planned files, re-checking "
        "each one first; --trash DIR moves them instead.",
        short_help="Delete old checkpoints by retention policy (dry run by default).",
        epilog=EXAMPLES,
    )
    @handle_errors
    def prune_cmd(
        run_dirs: Annotated[
            list[Path],
            typer.Argument(help="Run folder(s) holding the checkpoints (a path or a URL such as s3://bucket/run)."),
        ],
        keep_last: Annotated[int | None, typer.Option("--keep-last", min=1, help="Keep the N highest steps.")] = None,
        keep_every: Annotated[
            int | None, typer.Option("--keep-every", min=1, help="Keep steps divisible by K.")
        ] = None,
        keep_best: Annotated[
            str | None,
            typer.Option(
                "--keep-best",
                autocompletion=complete_metric_names,
                metavar="METRIC",
                help="Keep the best by METRIC (e.g. eval_loss).",
            ),
        ] = None,
        mode: Annotated[
            Mode | None, typer.Option("--mode", help="min or max for --keep-best (default: guessed from the name).")
        ] = None,
        best_n: Annotated[int, typer.Option("--best-n", min=1, help="How many best to keep (with --keep-best).")] = 1,
        keep_steps: Annotated[
            list[str] | None, typer.Option("--keep-steps", metavar="S,S,...", help="Keep these steps (e.g. 1000,5000).")
        ] = None,
        keep_since: Annotated[
            str | None,
            typer.Option(
                "--keep-since", metavar="DURATION", help="Keep those modified within DURATION (7d, 12h, 30m)."
            ),
        ] = None,
        exp_spacing: Annotated[
            bool, typer.Option("--exp-spacing", help="Keep exponentially spaced steps (first at/after s, 2s, 4s, ...).")
        ] = False,
        min_age: Annotated[
            str, typer.Option("--min-age", metavar="DURATION", help="Never touch checkpoints modified more recently.")
        ] = "2m",
        include_broken: Annotated[
            bool,
            typer.Option("--include-broken", help="Also delete unreadable or incomplete checkpoints no policy keeps."),
        ] = False,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Really delete (or move, with --trash).")] = False,
        trash: Annotated[
            Path | None,
            typer.Option("--trash", metavar="DIR", help="Move checkpoints into DIR instead of deleting them."),
        ] = None,
        recursive: Annotated[
            bool, typer.Option("--recursive", "-R", help="Also prune runs in sub-folders (each folder on its own).")
        ] = False,
        fmt: FormatOpt = Fmt.table,
        wide: WideOpt = False,
    ) -> None:
        check_paths(run_dirs)  # first: a typo says so
        from ckptctl.ops.prune import TRASH_REMOTE, Policy, check_trash, execute, make_plan, validate
        from ckptctl.ops.runs import parse_duration, scan_run
        from ckptctl.sources import as_path, is_remote

        roots = [as_path(p) for p in run_dirs]  # s3://bucket/run: planned from one recursive listing

        output.STATE.wide = output.STATE.wide or wide
        policy = Policy(
            keep_last=keep_last,
            keep_every=keep_every,
            keep_best=keep_best,
            mode=mode.value if mode else None,
            best_n=best_n,
            keep_steps=_steps(keep_steps),
            keep_since=parse_duration(keep_since) if keep_since is not None else None,
            keep_since_text=keep_since,
            exp_spacing=exp_spacing,
            min_age=parse_duration(min_age),
            min_age_text=min_age,
            include_broken=include_broken,
        )
        validate(policy)
        remote = [p for p in roots if is_remote(p)]
        if remote and trash is not None:
            raise UsageError(TRASH_REMOTE)
        runs = []
        for p in roots:
            if is_remote(p):
                _check_remote_run(p)
            elif not p.is_dir():
                if not os.path.lexists(p):
                    raise NotFound("no such file or directory", p)
                raise UsageError("prune takes a run folder; to delete one file, use rm", p)
            run = scan_run(p, recursive=recursive)
            if run.path != p:
                raise UsageError("this folder is one checkpoint, not a run; prune its parent folder instead", p)
            if not run.checkpoints:
                hint = " (try --recursive)" if run.subdirs and not recursive else ""
                raise NotFound(f"no checkpoints found{hint}; nothing to prune", p)
            runs.append(run)
        plan = make_plan(runs, policy)
        for w in plan.warnings:
            output.warn(w)
        for n in plan.notes:
            output.note(n)
        if trash is not None:
            check_trash(trash, plan)
        outcome = execute(plan, trash) if yes and plan.to_delete else None
        if fmt == Fmt.json:
            output.print_json(
                {
                    "runs": [os.fspath(r.path) for r in runs],
                    "dry_run": not yes,
                    "trash": os.fspath(trash) if trash else None,
                    "policy": policy.to_json(),
                    "checkpoints": [d.to_json() for d in plan.decisions],
                    "summary": {
                        "checkpoints": len(plan.decisions),
                        "keep": len(plan.to_keep),
                        "delete": len(plan.to_delete),
                        "bytes_freed": plan.bytes_freed,
                    },
                    "result": outcome.to_json() if outcome else None,
                }
            )
        else:
            _render_plan(plan, runs, fmt.value, yes, trash)
            if outcome is not None:
                _render_outcome(outcome, trash)
        for sf in outcome.state_files if outcome is not None else []:
            if sf.done:
                output.note(
                    f"{clean(sf.path)}: dropped {', '.join(map(clean, sf.dropped))} from the TensorFlow "
                    "checkpoint state (rewritten atomically)"
                )
        for msg in outcome.skipped_messages if outcome is not None else []:
            output.warn(msg)  # one line per checkpoint left alone because an object changed
        if outcome is not None and outcome.failed is not None:
            raise CkptError(_failure_line(outcome, trash))
        if outcome is not None and outcome.skipped:
            n_skipped = len(outcome.skipped)
            raise CkptError(
                f"{n_skipped} checkpoint{'s' if n_skipped != 1 else ''} skipped (see above); "
                f"{len(outcome.done)} deleted"
            )
        bad = [sf for sf in (outcome.state_files if outcome is not None else []) if sf.error]
        if bad:
            sf = bad[0]
            raise CkptError(
                f"{sf.path}: could not drop {', '.join(sf.dropped)} from the TensorFlow checkpoint "
                f"state ({sf.error}); the checkpoints were {'moved' if trash else 'deleted'}"
            )


def _check_remote_run(p) -> None:
    """A remote run folder is a prefix with objects under it (one LIST); http(s) cannot be listed."""
    if p.protocol in ("http", "https"):
        raise UsageError("prune needs a listing of the run folder, which http(s) does not have", p)
    if not p.is_dir():
        if p.is_file():
            raise UsageError("prune takes a run folder (a prefix holding checkpoints), not one object", p)
        raise NotFound("no such prefix (nothing found under it)", p)


def _render_plan(plan, runs, fmt: str, yes: bool, trash: Path | None) -> None:
    multi = len(runs) > 1
    rows = []
    for d in plan.decisions:
        c = d.ckpt
        try:
            shown = os.fspath(c.path.relative_to(d.root))
        except ValueError:
            shown = c.path.name
        if c.dirs:
            shown += "/"
        rows.append(
            {
                "action": d.action,
                "step": c.step,
                "epoch": c.epoch,
                "path": shown if fmt != "csv" else os.fspath(c.path),
                "run": os.fspath(d.root),
                "total_bytes": c.size,
                "why": "; ".join(d.reasons),
            }
        )
    epochs = (
        [Column("epoch", "epoch", human=lambda e: "-" if e is None else str(e), justify="right")]
        if any(r["epoch"] is not None and r["step"] is None for r in rows)
        else []
    )  # Keras ModelCheckpoint folders
    cols = ([Column("run", "run", name_like=True)] if multi else []) + [
        Column("action", "action"),
        Column("step", "step", human=lambda s: "-" if s is None else str(s), justify="right"),
        *epochs,
        Column("path", "path", name_like=True),
        Column("total_bytes", "size", human=human_bytes, justify="right"),
        Column("why", "why", name_like=True),
    ]
    n_del, freed = len(plan.to_delete), plan.bytes_freed
    verb = f"move to {trash}" if trash else "delete"
    if not plan.to_delete:
        footer = [f"{len(rows)} checkpoints: all kept; nothing to {verb}"]
    elif yes:
        footer = [f"{len(rows)} checkpoints: keep {len(plan.to_keep)}, {verb} {n_del} ({human_bytes(freed)})"]
    else:
        footer = [
            f"{len(rows)} checkpoints: keep {len(plan.to_keep)}, would {verb} {n_del} (frees {human_bytes(freed)})",
            f"dry run: nothing was changed; add --yes to {verb} them",
        ]
    if fmt == "csv":
        output.render_rows(rows, cols, "csv")
        return
    if fmt == "markdown":
        output.render_rows(rows, cols, "markdown")
        sys.stdout.write("\n" + "\n".join(footer) + "\n")
        return
    output.render_rows(rows, cols, fmt, footer=footer)


def _render_outcome(outcome, trash: Path | None) -> None:
    verb = "moved" if trash else "deleted"
    if outcome.done:
        output.note(
            f"{verb} {len(outcome.done)} checkpoint{'s' if len(outcome.done) != 1 else ''}, "
            f"{human_bytes(outcome.bytes_freed)}" + (f" into {trash}" if trash else " freed")
        )
    if outcome.failed is not None:
        lines = [f"{verb}: {clean(d.ckpt.path)}" for d in outcome.done]
        if outcome.partial:
            lines.append(
                f"PARTLY {verb} ({len(outcome.partial)} of {len(outcome.failed.ckpt.files)} files): "
                f"{clean(outcome.failed.ckpt.path)}"
            )
        else:
            lines.append(f"not {verb} (failed): {clean(outcome.failed.ckpt.path)}")
        lines += [f"not {verb}: {clean(d.ckpt.path)}" for d in outcome.not_attempted]
        sys.stdout.write("\n".join(lines) + "\n")


def _failure_line(outcome, trash: Path | None) -> str:
    verb = "moved" if trash else "deleted"
    done, rest = len(outcome.done), len(outcome.not_attempted) + 1
    part = f" ({len(outcome.partial)} of its files were already {verb})" if outcome.partial else ""
    return (
        f"stopped at {outcome.failed.ckpt.path}: {outcome.failed_message}{part}; "
        f"{done} checkpoint(s) {verb}, {rest} not {verb}"
    )
