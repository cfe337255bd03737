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
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ckptctl.errors import CkptError, UsageError
from ckptctl.formats.writeutil import clean_stale_temps, fsync_dir, hold_lock, pause_point, temp_name
from ckptctl.ops.runs import Run, RunCheckpoint, layouts
from ckptctl.ops.runs.tf import StateRewrite

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

# metric names where bigger is better; everything else (losses, perplexity, error rates) is min
_MAX_METRIC = re.compile(
    r"(acc|accuracy|f1|bleu|rouge|auc|auroc|precision|recall|map|score|exact|match|top\d|iou|dice|"
    r"r2|corr|pearson|spearman|reward|return|meteor|chrf|sacrebleu|win_?rate|pass@)", re.I
)
_MIN_METRIC = re.compile(r"(loss|err|error|perplexity|ppl|wer|cer|mse|mae|rmse|nll|fid)", re.I)


class PruneError(CkptError):
    """Deletion stopped part-way; the message says what was and was not deleted."""


@dataclass
class Policy:
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: str | None = None
    mode: str | None = None  # min | max; None: from the Lightning callback, else from the name
    best_n: int = 1
    keep_steps: list[int] = field(default_factory=list)
    keep_since: float | None = None  # seconds
    keep_since_text: str | None = None
    exp_spacing: bool = False
    min_age: float = 120.0
    min_age_text: str = "2m"
    include_broken: bool = False

    def any(self) -> bool:
        return bool(self.keep_last or self.keep_every or self.keep_best or self.keep_steps
                    or self.keep_since is not None or self.exp_spacing)

    def to_json(self) -> dict[str, Any]:
        return {
            "keep_last": self.keep_last, "keep_every": self.keep_every, "keep_best": self.keep_best,
            "mode": self.mode, "best_n": self.best_n if self.keep_best else None,
            "keep_steps": self.keep_steps or None, "keep_since": self.keep_since_text,
            "exp_spacing": self.exp_spacing, "min_age": self.min_age_text,
            "include_broken": self.include_broken,
        }


def guess_mode(metric: str) -> str:
    if _MIN_METRIC.search(metric):
        return "min"
    return "max" if _MAX_METRIC.search(metric) else "min"


@dataclass(frozen=True)
class FileSnap:
    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    mode: int

    @classmethod
    def take(cls, p: Path) -> FileSnap:
        st = os.lstat(p)
        return cls(p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode))

    def same_as(self, other: FileSnap) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.mode) == (
            other.dev, other.ino, other.size, other.mtime_ns, other.mode)


@dataclass(frozen=True)
class RemoteSnap:
    """An object as the listing showed it when the plan was made."""

    path: Any  # RemotePath
    size: int
    etag: str | None
    generation: str | None

    @classmethod
    def of(cls, path, info: dict) -> RemoteSnap:
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        gen = info.get("generation") or info.get("VersionId") or info.get("version_id")
        return cls(path, int(info.get("size") or 0), str(etag).strip('"') if etag else None,
                   str(gen) if gen is not None else None)

    def same_as(self, other: RemoteSnap) -> bool:
        if self.size != other.size:
            return False
        if self.etag and other.etag and self.etag != other.etag:
            return False
        return not (self.generation and other.generation and self.generation != other.generation)


def _remote(p) -> bool:
    from ckptctl.sources import RemotePath

    return isinstance(p, RemotePath)


@dataclass
class Decision:
    ckpt: RunCheckpoint
    keep: bool
    reasons: list[str]
    root: Path  # the run folder given on the command line (the deletion boundary)
    snapshot: list[Any] = field(default_factory=list)  # FileSnap (local) or RemoteSnap
    protected_by: list[str] = field(default_factory=list)  # protections that apply
    kept_by: list[str] = field(default_factory=list)  # policies that keep it

    @property
    def action(self) -> str:
        return "keep" if self.keep else "delete"

    def to_json(self) -> dict[str, Any]:
        c = self.ckpt
        return {
            "path": os.fspath(c.path), "run": os.fspath(c.run) if c.run else None, "step": c.step,
            "epoch": c.epoch,
            "format": c.format, "action": self.action, "reasons": self.reasons,
            "protected_by": self.protected_by, "kept_by": self.kept_by, "total_bytes": c.size,
            "files": [os.fspath(f) for f in c.files], "metrics": c.metrics, "aliases": c.aliases,
            "mtime": c.mtime, "error": c.error,
        }


@dataclass
class Plan:
    decisions: list[Decision]
    policy: Policy
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def to_delete(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def to_keep(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    @property
    def bytes_freed(self) -> int:
        return sum(d.ckpt.size for d in self.to_delete)


@dataclass
class Outcome:
    done: list[Decision] = field(default_factory=list)  # deleted (or moved)
    failed: Decision | None = None
    failed_message: str | None = None
    partial: list[Path] = field(default_factory=list)  # files of `failed` already removed
    not_attempted: list[Decision] = field(default_factory=list)
    moved_to: dict[str, str] = field(default_factory=dict)
    state_files: list[StateRewrite] = field(default_factory=list)  # TF `checkpoint` files rewritten
    remote: bool = False
    skipped: list[Decision] = field(default_factory=list)  # remote: an object changed since the plan
    skipped_messages: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(d.ckpt.size for d in self.done)

    def to_json(self) -> dict[str, Any]:
        out = self._json()
        if self.remote:
            out["skipped"] = [{"path": os.fspath(d.ckpt.path), "why": m}
                              for d, m in zip(self.skipped, self.skipped_messages)]
        return out

    def _json(self) -> dict[str, Any]:
        return {
            "done": [os.fspath(d.ckpt.path) for d in self.done],
            "failed": os.fspath(self.failed.ckpt.path) if self.failed else None,
            "error": self.failed_message,
            "partially_removed_files": [os.fspath(p) for p in self.partial],
            "not_attempted": [os.fspath(d.ckpt.path) for d in self.not_attempted],
            "moved_to": self.moved_to or None,
            "state_files": [s.to_json() for s in self.state_files],
            "bytes_freed": self.bytes_freed,
        }


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
                plan.notes.append(f"--keep-best {policy.keep_best}: {better} is better "
                                  "(guessed from the name; set --mode min|max to be sure)")
        missing = [c for c in all_ckpts if policy.keep_best not in c.metrics and c.error is None]
        if missing:
            plan.warnings.append(f"{len(missing)} checkpoint(s) have no {policy.keep_best!r} metric; "
                                 "--keep-best cannot keep them")
    for run in runs:
        plan.warnings.extend(run.warnings)
        plan.notes.extend(run.notes)
        groups: dict[Path | None, list[RunCheckpoint]] = {}
        for c in run.checkpoints:
            groups.setdefault(c.run, []).append(c)
        for group in groups.values():
            plan.decisions.extend(_decide_group(group, run.path, policy, now))
    young_only = [d for d in plan.decisions if d.keep and not d.kept_by and len(d.protected_by) == 1
                  and "--min-age" in d.protected_by[0]]
    if young_only:
        plan.notes.append(f"{len(young_only)} checkpoint(s) kept only because they were modified within "
                          f"--min-age {policy.min_age_text} (a save may be in progress); --min-age 0 includes them")
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
    remote_tf = sorted({os.fspath(d.ckpt.path.parent) for d in plan.to_delete
                        if _remote(d.ckpt.path) and d.ckpt.layout == "tf"})
    for folder in remote_tf:
        plan.warnings.append(f"{folder}: the TensorFlow `checkpoint` state file is not rewritten on remote storage; "
                             "it will still name the deleted checkpoints")
    for s in layouts.plan_prune([d.ckpt for d in plan.to_delete if not _remote(d.ckpt.path)]):
        if s.error:
            plan.warnings.append(f"{s.path}: TensorFlow checkpoint state {s.error}; it will still name "
                                 f"{', '.join(s.dropped)} once deleted")
            continue
        plan.notes.append(f"{s.path}: TensorFlow checkpoint state; {', '.join(s.dropped)} will be dropped from "
                          "all_model_checkpoint_paths (with their timestamps) once deleted")
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
    by = "step" if any(c.step is not None for c in healthy) or not any(
        c.epoch is not None and c.layout == "keras" for c in healthy) else "epoch"

    def pos(c: RunCheckpoint) -> int | None:
        return getattr(c, by)

    ranked = sorted([c for c in healthy if pos(c) is not None], key=lambda c: (pos(c), c.mtime))

    # -- policies ---------------------------------------------------------------------------
    if policy.keep_last:
        for c in ranked[-policy.keep_last:]:
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
            label = f"best {m} ({_fmt(c.metrics[m])})" if policy.best_n == 1 else \
                f"best {m} #{rank} ({_fmt(c.metrics[m])})"
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
        out.append(Decision(ckpt=c, keep=keep, reasons=why, root=root,
                            protected_by=protect[id(c)], kept_by=reasons[id(c)]))
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


# ---- deletion ----------------------------------------------------------------------------------
def _inside(path: Path, real_root: str) -> bool:
    """path's parent folder, with symlinks resolved, lies inside the run folder."""
    parent = os.path.realpath(path.parent)
    return parent == real_root or parent.startswith(real_root.rstrip(os.sep) + os.sep)


def _verify(d: Decision) -> None:
    """Raise PruneError unless every planned file is still exactly what was planned."""
    c = d.ckpt
    real_root = os.path.realpath(d.root)
    for snap in d.snapshot:
        if not _inside(snap.path, real_root):
            raise PruneError(f"{snap.path} is not inside the run folder {d.root} (symlinked folder?); refusing")
        try:
            now = FileSnap.take(snap.path)
        except FileNotFoundError:
            raise PruneError(f"{snap.path} disappeared since the plan was made") from None
        if not now.same_as(snap):
            raise PruneError(f"{snap.path} changed since the plan was made (size, mtime or inode)")
    if c.dirs:
        if os.path.islink(c.path) or not os.path.isdir(c.path):
            raise PruneError(f"{c.path} is no longer a folder")
        planned = {os.fspath(s.path) for s in d.snapshot}
        for dirpath, dirnames, filenames in os.walk(c.path, followlinks=False):
            for n in filenames + [x for x in dirnames if os.path.islink(os.path.join(dirpath, x))]:
                p = os.path.join(dirpath, n)
                if p not in planned:
                    raise PruneError(f"{p} appeared since the plan was made (still being written?)")


def _delete(d: Decision, outcome: Outcome) -> None:
    for snap in d.snapshot:  # unlink never follows a symlink: a link is removed, its target is not
        try:
            os.unlink(snap.path)
        except FileNotFoundError:  # removed by someone else between _verify and here (another prune)
            raise PruneError(f"{snap.path} disappeared since the plan was made") from None
        outcome.partial.append(snap.path)
    for folder in d.ckpt.dirs:  # deepest first
        os.rmdir(folder)


def _unique(dest: Path) -> Path:
    if not os.path.lexists(dest):
        return dest
    for i in range(1, 10000):
        cand = dest.with_name(f"{dest.name}.{i}")
        if not os.path.lexists(cand):
            return cand
    raise PruneError(f"{dest}: too many earlier copies in the trash")


def _move(d: Decision, trash: Path, outcome: Outcome) -> str:
    c = d.ckpt
    try:
        rel = c.path.relative_to(d.root)
    except ValueError:
        rel = Path(c.path.name)
    dest = _unique(trash / d.root.resolve().name / rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if c.dirs:  # one folder: one rename when the trash is on the same file system
        try:
            os.rename(c.path, dest)
            outcome.partial.extend(s.path for s in d.snapshot)
            return os.fspath(dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        _copy_durably(Path(c.path), dest, folder=True)
        _delete(d, outcome)
        return os.fspath(dest)
    # loose files (one file, an index + its shards, a TF prefix group): keep their names
    if len(c.files) > 1:
        from ckptctl.ops.runs import INDEX_SUFFIXES

        base = c.path.name
        for suf in INDEX_SUFFIXES:
            base = base.removesuffix(suf)
        dest = _unique(dest.with_name(base))
        dest.mkdir(parents=True)
    for snap in d.snapshot:
        target = dest / snap.path.relative_to(c.path.parent) if len(c.files) > 1 else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(snap.path, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            if stat.S_ISLNK(snap.mode):
                os.symlink(os.readlink(snap.path), target)
            else:
                _copy_durably(snap.path, target, folder=False)
            os.unlink(snap.path)
        outcome.partial.append(snap.path)
    return os.fspath(dest)


def _copy_durably(src: Path, dest: Path, folder: bool) -> None:
    """Copy `src` to `dest` on another file system: into a hidden temporary beside `dest`, every
    file fsynced, then renamed to `dest` (and its folder fsynced), so the source is deleted only
    once a complete copy is on disk. A kill part-way leaves the source and at most the
    temporary, which the next run removes (writeutil.clean_stale_temps)."""
    clean_stale_temps(dest)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(dest), dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=temp_name(dest), dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    lock = os.open(tmp, os.O_RDONLY if folder else os.O_RDWR)
    hold_lock(lock)
    try:
        if folder:
            shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)
            for dirpath, _dirs, files in os.walk(tmp, topdown=False):
                for n in files:
                    p = os.path.join(dirpath, n)
                    if not os.path.islink(p):
                        _fsync(p)
                fsync_dir(Path(dirpath))
        else:
            shutil.copy2(src, tmp, follow_symlinks=False)
            _fsync(tmp)
        pause_point("trash-copied")
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def execute(plan: Plan, trash: Path | None = None) -> Outcome:
    """Delete (or move to `trash`) exactly the planned checkpoints, oldest first.

    Stops at the first problem: the Outcome then names the failed checkpoint, the files of it
    already removed, and the checkpoints not attempted.
    """
    todo = sorted(plan.to_delete, key=lambda d: (d.ckpt.step is None, d.ckpt.step or 0, d.ckpt.mtime))
    if any(_remote(d.root) for d in plan.decisions):
        if trash is not None:
            raise UsageError(TRASH_REMOTE)
        return _execute_remote(todo)
    outcome = Outcome()
    pause_point("prune-planned")
    try:
        _execute(todo, trash, outcome)
    finally:  # TF: drop what is gone from the `checkpoint` state file, also after a stop part-way
        gone = [d.ckpt for d in outcome.done]
        if outcome.failed is not None and outcome.partial:
            gone.append(outcome.failed.ckpt)
        outcome.state_files = layouts.after_prune(gone)
    return outcome


def _execute(todo: list[Decision], trash: Path | None, outcome: Outcome) -> None:
    for i, d in enumerate(todo):
        outcome.partial = []
        try:
            _verify(d)
            if trash is not None:
                outcome.moved_to[os.fspath(d.ckpt.path)] = _move(d, trash, outcome)
            else:
                _delete(d, outcome)
        except (PruneError, OSError) as e:
            outcome.failed = d
            if isinstance(e, OSError):
                where = e.filename or d.ckpt.path
                outcome.failed_message = f"{where}: {e.strerror or e}"
            else:
                outcome.failed_message = e.message
            outcome.not_attempted = todo[i + 1:]
            return
        outcome.partial = []
        outcome.done.append(d)
        pause_point("pruned-one")


# ---- deletion on object storage ----------------------------------------------------------------
TRASH_REMOTE = ("--trash is not supported on remote storage (objects cannot be moved, only copied and "
                "deleted); prune without --trash deletes them, after a dry run")


def _verify_remote(d: Decision) -> None:
    """Raise PruneError unless every planned object is still the one planned (fresh HEAD: size,
    ETag / generation) and, for a checkpoint-N/ prefix, no object appeared under it."""
    from ckptctl.sources import NoSuchObject, find, fresh_info

    root = os.fspath(d.root).rstrip("/") + "/"
    for snap in d.snapshot:
        if not os.fspath(snap.path).startswith(root):
            raise PruneError(f"{snap.path} is not under the run folder {d.root}; refusing")
        try:
            now = RemoteSnap.of(snap.path, fresh_info(snap.path))
        except NoSuchObject:
            raise PruneError(f"{snap.path} disappeared since the plan was made") from None
        if not now.same_as(snap):
            raise PruneError(f"{snap.path} changed since the plan was made (size or ETag); its checkpoint "
                             f"{d.ckpt.path} was not deleted")
    if d.ckpt.dirs:
        planned = {os.fspath(s.path) for s in d.snapshot}
        extra = sorted(os.fspath(p) for p, _ in find(d.ckpt.path, fresh=True) if os.fspath(p) not in planned)
        if extra:
            raise PruneError(f"{extra[0]} appeared since the plan was made (still being written?); its checkpoint "
                             f"{d.ckpt.path} was not deleted")


def _execute_remote(todo: list[Decision]) -> Outcome:
    """Delete the planned objects checkpoint by checkpoint, oldest first; skip a checkpoint whose
    objects changed since the plan; stop at the first failed DELETE."""
    from ckptctl.sources import delete_object

    outcome = Outcome(remote=True)
    for i, d in enumerate(todo):
        outcome.partial = []
        try:
            _verify_remote(d)
        except PruneError as e:
            outcome.skipped.append(d)
            outcome.skipped_messages.append(e.message)
            continue
        except CkptError as e:
            outcome.failed, outcome.failed_message = d, e.message
            outcome.not_attempted = todo[i + 1:]
            return outcome
        try:
            for snap in d.snapshot:
                delete_object(snap.path)
                outcome.partial.append(snap.path)
        except CkptError as e:
            outcome.failed = d
            outcome.failed_message = f"{e.path}: {e.message}" if e.path else e.message
            outcome.not_attempted = todo[i + 1:]
            return outcome
        outcome.partial = []
        outcome.done.append(d)
    return outcome


def check_trash(trash: Path, plan: Plan) -> None:
    """The trash folder must not lie inside a checkpoint that is about to move."""
    t = os.path.realpath(trash)
    for d in plan.to_delete:
        p = os.path.realpath(d.ckpt.path)
        if t == p or t.startswith(p + os.sep):
            raise UsageError(f"--trash {trash} lies inside {d.ckpt.path}, which is to be moved")
    if os.path.exists(trash) and not os.path.isdir(trash):
        raise UsageError(f"--trash {trash} exists and is not a folder")
