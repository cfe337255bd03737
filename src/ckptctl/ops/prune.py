"""prune: retention policies -> a plan (keep / delete, and why) -> safe deletion. Pure: no printing.

A checkpoint is kept when ANY policy keeps it or a protection applies. Policies rank the
readable checkpoints whose step is known, per run folder; everything else is kept and the plan
says why. Deletion removes exactly the files recorded in the plan, after checking each one is
still the same file (inode, size, mtime) and still inside the run folder; it never follows a
symlink and stops at the first problem, reporting what was and was not deleted.

On object storage (s3://, gs://, az://) the plan comes from one recursive listing; each object of
a checkpoint is re-checked right before deletion (size and ETag / generation from a fresh HEAD,
and no new object under a checkpoint-N/ prefix). A checkpoint with a changed object is skipped
(Outcome.skipped) and the others still go; a failed DELETE stops like a local failure.

The plan's data (Policy, Decision, Plan, Outcome, the file snapshots) is in prune_model; the
deletion (local, to a trash folder, on object storage) in prune_execute. This module makes the
plan and re-exports the names of both that callers use.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ckptctl.errors import CkptError, UsageError
from ckptctl.ops.prune_execute import TRASH_REMOTE, check_trash, execute  # noqa: F401  (re-exported)
from ckptctl.ops.prune_model import (  # noqa: F401  (re-exported: the CLI and tests use them here)
    Decision,
    FileSnap,
    Outcome,
    Plan,
    Policy,
    PruneError,
    RemoteSnap,
    _remote,
)
from ckptctl.ops.runs import Run, RunCheckpoint, layouts

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

# metric names where bigger is better; everything else (losses, perplexity, error rates) is min
_MAX_METRIC = re.compile(
    r"(acc|accuracy|f1|bleu|rouge|auc|auroc|precision|recall|map|score|exact|match|top\d|iou|dice|"
    r"r2|corr|pearson|spearman|reward|return|meteor|chrf|sacrebleu|win_?rate|pass@)",
    re.I,
)
_MIN_METRIC = re.compile(r"(loss|err|error|perplexity|ppl|wer|cer|mse|mae|rmse|nll|fid)", re.I)


def guess_mode(metric: str) -> str:
    if _MIN_METRIC.search(metric):
        return "min"
    return "max" if _MAX_METRIC.search(metric) else "min"


# ---- planning ----------------------------------------------------------------------------------
def validate(policy: Policy) -> None:
    if not policy.any():
        raise UsageError(
            "no retention policy given, so nothing can be decided: add at least one of --keep-last N, "
            "--keep-every K, --keep-best METRIC, --keep-steps S,..., --keep-since DURATION, --exp-spacing "
            "(every checkpoint not kept by a policy would be deleted; nothing was deleted)"
        )
    if policy.keep_best is None and policy.mode is not None:
        raise UsageError("--mode only applies to --keep-best METRIC")
    if policy.keep_best is None and policy.best_n != 1:
        raise UsageError("--best-n only applies to --keep-best METRIC")


def make_plan(runs: list[Run], policy: Policy, now: float | None = None) -> Plan:
    validate(policy)
    now = time.time() if now is None else now
    plan = Plan(decisions=[], policy=policy)
    all_ckpts = [c for r in runs for c in r.checkpoints]
    if policy.keep_best:
        have = [c for c in all_ckpts if policy.keep_best in c.metrics]
        if not have:
            seen = sorted({m for c in all_ckpts for m in c.metrics})
            hint = f"metrics found: {', '.join(seen)}" if seen else "no checkpoint carries any metric"
            raise UsageError(f"no checkpoint has the metric {policy.keep_best!r} ({hint})")
        if policy.mode is None:
            policy.mode = _callback_mode(all_ckpts, policy.keep_best)
            if policy.mode is None:
                policy.mode = guess_mode(policy.keep_best)
                better = "lower" if policy.mode == "min" else "higher"
                plan.notes.append(
                    f"--keep-best {policy.keep_best}: {better} is better "
                    "(guessed from the name; set --mode min|max to be sure)"
                )
        missing = [c for c in all_ckpts if policy.keep_best not in c.metrics and c.error is None]
        if missing:
            plan.warnings.append(
                f"{len(missing)} checkpoint(s) have no {policy.keep_best!r} metric; --keep-best cannot keep them"
            )
    for run in runs:
        plan.warnings.extend(run.warnings)
        plan.notes.extend(run.notes)
        groups: dict[Path | None, list[RunCheckpoint]] = {}
        for c in run.checkpoints:
            groups.setdefault(c.run, []).append(c)
        for group in groups.values():
            plan.decisions.extend(_decide_group(group, run.path, policy, now))
    young_only = [
        d
        for d in plan.decisions
        if d.keep and not d.kept_by and len(d.protected_by) == 1 and "--min-age" in d.protected_by[0]
    ]
    if young_only:
        plan.notes.append(
            f"{len(young_only)} checkpoint(s) kept only because they were modified within "
            f"--min-age {policy.min_age_text} (a save may be in progress); --min-age 0 includes them"
        )
    if policy.keep_steps:
        present = {c.step for c in all_ckpts} | {c.epoch for c in all_ckpts if c.layout == "keras" and c.step is None}
        absent = [s for s in policy.keep_steps if s not in present]
        if absent:
            plan.warnings.append(f"--keep-steps: no checkpoint at step {', '.join(map(str, absent))}")
    for d in plan.to_delete:
        if _remote(d.ckpt.path):  # from the listing the plan was made from: no request
            try:
                # a remote run lists RemotePaths (RunCheckpoint.files says Path)
                d.snapshot = [RemoteSnap.of(f, cast("RemotePath", f).info()) for f in d.ckpt.files]
            except CkptError as e:
                d.keep = True
                d.reasons.append(f"could not stat its objects ({e.message}); kept")
            continue
        try:
            d.snapshot = [FileSnap.take(f) for f in d.ckpt.files]
        except OSError as e:
            d.keep = True
            d.reasons.append(f"could not stat its files ({e.strerror}); kept")
    remote_tf = sorted(
        {os.fspath(d.ckpt.path.parent) for d in plan.to_delete if _remote(d.ckpt.path) and d.ckpt.layout == "tf"}
    )
    for folder in remote_tf:
        plan.warnings.append(
            f"{folder}: the TensorFlow `checkpoint` state file is not rewritten on remote storage; "
            "it will still name the deleted checkpoints"
        )
    for s in layouts.plan_prune([d.ckpt for d in plan.to_delete if not _remote(d.ckpt.path)]):
        if s.error:
            plan.warnings.append(
                f"{s.path}: TensorFlow checkpoint state {s.error}; it will still name "
                f"{', '.join(s.dropped)} once deleted"
            )
            continue
        plan.notes.append(
            f"{s.path}: TensorFlow checkpoint state; {', '.join(s.dropped)} will be dropped from "
            "all_model_checkpoint_paths (with their timestamps) once deleted"
        )
    return plan


def _callback_mode(ckpts: list[RunCheckpoint], metric: str) -> str | None:
    for c in sorted(ckpts, key=lambda c: -(c.step or 0)):
        ref = c.best_ref or {}
        if ref.get("monitor") == metric and ref.get("mode") in ("min", "max"):
            return ref["mode"]
    return None


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _decide_group(group: list[RunCheckpoint], root: Path, policy: Policy, now: float) -> list[Decision]:
    reasons: dict[int, list[str]] = {id(c): [] for c in group}
    protect: dict[int, list[str]] = {id(c): [] for c in group}
    healthy = [c for c in group if c.error is None and not c.incomplete]
    # Keras ModelCheckpoint folders number their files by epoch: with no step in the group, rank by epoch
    by = (
        "step"
        if any(c.step is not None for c in healthy)
        or not any(c.epoch is not None and c.layout == "keras" for c in healthy)
        else "epoch"
    )

    def pos(c: RunCheckpoint) -> int | None:
        return getattr(c, by)

    ranked = sorted([c for c in healthy if pos(c) is not None], key=lambda c: (pos(c), c.mtime))

    # -- policies ---------------------------------------------------------------------------
    if policy.keep_last:
        for c in ranked[-policy.keep_last :]:
            reasons[id(c)].append(f"last {policy.keep_last}")
    if policy.keep_every:
        for c in ranked:
            if cast(int, pos(c)) % policy.keep_every == 0:  # ranked: never None
                reasons[id(c)].append(f"{by} divisible by {policy.keep_every}")
    if policy.keep_best:
        m = policy.keep_best
        scored = [c for c in ranked if m in c.metrics]
        sign = 1 if policy.mode == "min" else -1

        def key(c: RunCheckpoint):
            v = c.metrics[m]
            return (math.isnan(v), sign * v if not math.isnan(v) else 0.0, -cast(int, pos(c)))  # ranked: never None

        for rank, c in enumerate(sorted(scored, key=key)[: policy.best_n], 1):
            if math.isnan(c.metrics[m]):
                break
            label = (
                f"best {m} ({_fmt(c.metrics[m])})" if policy.best_n == 1 else f"best {m} #{rank} ({_fmt(c.metrics[m])})"
            )
            reasons[id(c)].append(label)
    if policy.keep_steps:
        wanted = set(policy.keep_steps)
        for c in ranked:
            if pos(c) in wanted:
                reasons[id(c)].append(f"{by} {pos(c)} listed")
    if policy.keep_since is not None:
        for c in ranked:
            if c.mtime >= now - policy.keep_since:
                reasons[id(c)].append(f"modified within {policy.keep_since_text}")
    if policy.exp_spacing:
        for c, target in exp_spaced(ranked, by):
            reasons[id(c)].append(f"exponential spacing (first at/after {by} {target})")

    # -- protections ------------------------------------------------------------------------
    if ranked:
        top = pos(ranked[-1])
        for c in ranked:
            if pos(c) == top:
                protect[id(c)].append("newest")
    if ranked:  # a run resumed from an earlier step writes lower steps last: keep its latest too
        newest_m = max(ranked, key=lambda c: (c.mtime, pos(c)))
        if not protect[id(newest_m)]:
            protect[id(newest_m)].append("newest (modified last)")
    for c in group:
        p = protect[id(c)]
        if c.aliases:
            p.append("alias target: " + ", ".join(c.aliases))
        if c.role:
            p.append(f"the run's {c.role} checkpoint")
        for src in c.best_of_run:
            p.append(f"best per {src}")  # e.g. trainer_state best_model_checkpoint
        age = now - c.mtime
        if age < policy.min_age:
            p.append(f"modified {_age(age)} ago, under --min-age {policy.min_age_text} (may be being written)")
        if c.incomplete:
            held = layouts.in_progress(c)  # an Orbax save without its commit marker may still be running
            if held:
                p.append(f"{held}: never deleted, even with --include-broken")
            elif not policy.include_broken:
                p.append(f"{c.error or 'incomplete'} (kept; --include-broken deletes it)")
        elif c.error is not None:
            if not policy.include_broken:
                p.append(f"unreadable: {c.error} (kept; --include-broken deletes it)")
        elif pos(c) is None and not p:
            p.append(f"{by} unknown: prune only deletes checkpoints whose {by} it knows")
    out = []
    for c in group:
        why = protect[id(c)] + reasons[id(c)]
        keep = bool(why)
        if not keep:
            if c.error is not None:
                why = [f"unreadable, --include-broken: {c.error}"]
            else:
                why = ["no policy keeps it"]
        out.append(
            Decision(ckpt=c, keep=keep, reasons=why, root=root, protected_by=protect[id(c)], kept_by=reasons[id(c)])
        )
    return out


def exp_spaced(ranked: list[RunCheckpoint], by: str = "step") -> list[tuple[RunCheckpoint, int]]:
    """For base = smallest positive step and k = 0, 1, 2, ...: the first checkpoint at or after
    base * 2**k. A fixed grid, so running prune again later keeps what it kept before."""
    steps = [c for c in ranked if getattr(c, by) and getattr(c, by) > 0]
    if not steps:
        return []
    base = getattr(steps[0], by)
    out: list[tuple[RunCheckpoint, int]] = []
    target = base
    i = 0
    last = getattr(steps[-1], by)
    while target <= last:
        while i < len(steps) and getattr(steps[i], by) < target:
            i += 1
        if i >= len(steps):
            break
        if not out or out[-1][0] is not steps[i]:
            out.append((steps[i], target))
        target *= 2
    return out


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
