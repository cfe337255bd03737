"""Orbax CheckpointManager runs: step folders `<step>/` (or `<prefix>_<step>/`), read for `ls` and `prune`.

A step folder holds `_CHECKPOINT_METADATA` (item handlers, commit time, the `metrics` given to
`CheckpointManager.save(..., metrics=...)` that its `best_fn` ranks, custom metadata), one folder
per item (`default/` or `state/`, `params/` ... with arrays; `metrics/metrics` as JSON) and, once
the save has finished, `commit_success.txt`. Orbax writes the step into a
`<step>.orbax-checkpoint-tmp-<t>` folder and renames it when done on file systems with atomic
rename; where it cannot (GCS) and in recent versions everywhere, the commit marker says the save
finished.

The manager does not store which step is best: it ranks the steps' metrics with a `best_fn` that
is not saved. So the metrics are what `ls` shows and what `prune --keep-best METRIC` ranks.

Pure: no printing. Reads JSON side files and the checkpoint's metadata (never array data).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.walk import entry_path, isfile, listdir, scandir

COMMIT_MARKER = "commit_success.txt"
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "commit_success.txt", "manifest.ocdbt")
STEP_DIR = re.compile(r"^(\w+[_-])?\d+$")


def _numeric(d: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[str(k)] = float(v)
    return out


def _json(path: Path) -> Any:
    from ckptctl.ops.runs.walk import _read_json

    return _read_json(path, 1 << 20) if path.is_file() else None


def _run_uses_markers(step_dir: Path) -> bool:
    """Some finished step of this run has a commit marker: then a step without one is unfinished.

    (Orbax versions that relied on the atomic rename alone never wrote markers on local disks:
    there, only the temporary folder name says a save is in progress.)"""
    parent = step_dir.parent
    try:
        for e in scandir(parent):
            if (
                e.is_dir(follow_symlinks=False)
                and ".orbax-checkpoint-tmp-" not in e.name
                and isfile(entry_path(e) / COMMIT_MARKER)
            ):
                return True
    except OSError:
        return False
    return False


def in_progress(c) -> str | None:
    """Why prune must never delete this Orbax step (a save that may still be running), or None."""
    if c.layout != "orbax" or not c.path.is_dir():
        return None
    if ".orbax-checkpoint-tmp-" in c.path.name:
        return "an Orbax save in progress or interrupted (temporary folder)"
    if not (c.path / COMMIT_MARKER).is_file() and _run_uses_markers(c.path):
        return f"an Orbax save in progress or interrupted (no {COMMIT_MARKER})"
    return None


def enrich(c, read_info: bool) -> None:
    """Step, metrics, completeness and (when asked) the tensor listing of an Orbax step folder."""
    c.format = "orbax"
    meta = _json(c.path / "_CHECKPOINT_METADATA")
    if isinstance(meta, dict):
        for key in ("custom", "custom_metadata"):
            from ckptctl.ops.runs.enrich import _numeric_into

            if isinstance(meta.get(key), dict):
                _numeric_into(c, meta[key], "metadata")
        c.metrics.update(_numeric(meta.get("metrics")))
    # JSON items (JsonCheckpointHandler): <step>/<item>/<item>, e.g. metrics/metrics
    try:
        names = sorted(listdir(c.path))
    except OSError:
        names = []
    for n in names:
        f = c.path / n / n
        if (c.path / n).is_dir() and f.is_file():
            c.metrics.update(_numeric(_json(f)))
    why = in_progress(c)
    if why is not None:
        c.incomplete = True
        c.error = c.error or f"incomplete: {why}"
    if not read_info or c.incomplete:
        return
    from ckptctl.errors import CkptError
    from ckptctl.formats.orbax import OrbaxReader

    try:
        with OrbaxReader(c.path) as reader:
            c.info = reader.info()
    except CkptError as e:
        c.error = c.error or e.message
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        c.error = c.error or f"unreadable: {type(e).__name__}: {e}".splitlines()[0]


def _orbax_items(path: Path, names: list[str]) -> bool:
    """An Orbax step folder holds item folders (default/, state/, params/) with _METADATA etc."""
    for n in names:
        p = path / n
        if p.is_dir() and not p.is_symlink():
            try:
                inner = set(listdir(p))
            except OSError:
                continue
            if inner & {"_METADATA", "_sharding", "manifest.ocdbt", "checkpoint", "ocdbt.process_0"}:
                return True
    return False


class Orbax(Layout):
    name = "orbax"
    owns = ("orbax",)

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        if STEP_DIR.match(path.name) and (nameset & set(ORBAX_MARKERS) or _orbax_items(path, names)):
            return "orbax"
        if ".orbax-checkpoint-tmp-" in path.name:
            return "orbax"
        return None

    def enrich(self, c, read_info: bool) -> None:
        from ckptctl.ops.runs.enrich import name_fields

        name_fields(c)
        enrich(c, read_info)

    def in_progress(self, c) -> str | None:
        return in_progress(c)


LAYOUT = Orbax()
