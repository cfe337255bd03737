"""prune's deletion: exactly the planned files, each re-checked first (local: inode, size, mtime,
inside the run folder; object storage: a fresh HEAD), or moved to a trash folder durably."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ckptctl.errors import CkptError, UsageError
from ckptctl.formats.writeutil import clean_stale_temps, fsync_dir, hold_lock, pause_point, temp_name
from ckptctl.ops.prune_model import Decision, FileSnap, Outcome, Plan, PruneError, RemoteSnap, _remote
from ckptctl.ops.runs import layouts


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
            outcome.not_attempted = todo[i + 1 :]
            return
        outcome.partial = []
        outcome.done.append(d)
        pause_point("pruned-one")


# ---- deletion on object storage ----------------------------------------------------------------
TRASH_REMOTE = (
    "--trash is not supported on remote storage (objects cannot be moved, only copied and "
    "deleted); prune without --trash deletes them, after a dry run"
)


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
            raise PruneError(
                f"{snap.path} changed since the plan was made (size or ETag); its checkpoint "
                f"{d.ckpt.path} was not deleted"
            )
    if d.ckpt.dirs:
        planned = {os.fspath(s.path) for s in d.snapshot}
        extra = sorted(os.fspath(p) for p, _ in find(d.ckpt.path, fresh=True) if os.fspath(p) not in planned)
        if extra:
            raise PruneError(
                f"{extra[0]} appeared since the plan was made (still being written?); its checkpoint "
                f"{d.ckpt.path} was not deleted"
            )


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
            outcome.not_attempted = todo[i + 1 :]
            return outcome
        try:
            for snap in d.snapshot:
                delete_object(snap.path)
                outcome.partial.append(snap.path)
        except CkptError as e:
            outcome.failed = d
            outcome.failed_message = f"{e.path}: {e.message}" if e.path else e.message
            outcome.not_attempted = todo[i + 1 :]
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
