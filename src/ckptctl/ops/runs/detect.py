"""What a folder is: one checkpoint (and of which layout), a run folder holding checkpoints, or neither."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

from ckptctl.ops.runs import layouts
from ckptctl.ops.runs.names import (
    AUX_NAMES,
    FILE_SUFFIXES,
    INDEX_SUFFIXES,
    SHARD_NAME,
    TF_DATA,
    strip_suffix,
)
from ckptctl.ops.runs.walk import entry_path, listdir, scandir
from ckptctl.sources import as_path


# ---- what a folder is --------------------------------------------------------------------------
def _dir_layout(path: Path, names: list[str] | None = None) -> str | None:
    """The layout of a folder that is ONE checkpoint, or None (a run folder or something else):
    the first registered layout that claims it (layouts.py)."""
    try:
        names = names if names is not None else listdir(path)
    except OSError:
        return None
    return layouts.claim_dir(path, names)


def _checkpoint_layout(path: Path) -> str | None:
    """_dir_layout, except that a model folder holding other checkpoints is a run, not one checkpoint.

    (An HF output folder has the final model.safetensors next to its checkpoint-N/ folders; a
    folder of loose model files in several formats is a run of unstepped checkpoints.)
    """
    layout = _dir_layout(path)
    if layout not in ("folder", "sharded"):
        return layout
    try:
        entries = scandir(path)
    except OSError:
        return layout
    models = 0
    for e in entries:
        if e.is_symlink() or e.name.startswith("."):
            continue
        if e.is_dir():
            if _dir_layout(entry_path(e)) is not None or _holds_checkpoints(entry_path(e)):
                return None
        elif e.is_file() and (
            e.name.endswith(INDEX_SUFFIXES)
            or (_is_checkpoint_file_name(e.name) and not SHARD_NAME.search(strip_suffix(e.name)))
        ):
            models += 1
    return None if models >= 2 else layout


def _holds_checkpoints(path: Path) -> bool:
    """A folder with a checkpoint file or checkpoint folder directly inside (a run)."""
    try:
        for e in scandir(path):
            if e.is_symlink() or e.name.startswith("."):
                continue
            if e.is_file() and _is_checkpoint_file_name(e.name):
                return True
            if e.is_dir() and _dir_layout(entry_path(e)) is not None:
                return True
    except OSError:
        return False
    return False


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A folder that is one checkpoint (checkpoint-N/, DCP, Orbax step, shards, model folder)."""
    p = cast(Path, as_path(path))  # a RemotePath has the parts of Path's interface used here
    return p.is_dir() and _checkpoint_layout(p) is not None


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder holding checkpoints (a run), as opposed to a folder that is one checkpoint.

    Cheap: looks at names only. True when the folder is not itself one checkpoint and holds at
    least one checkpoint file or checkpoint folder.
    """
    p = as_path(path)
    if not p.is_dir() or is_checkpoint_dir(p):
        return False
    try:
        entries = scandir(p)
    except OSError:
        return False
    for e in entries:
        if e.is_symlink():
            continue
        if e.is_file() and (_is_checkpoint_file_name(e.name) or TF_DATA.match(e.name)):
            return True
        if e.is_dir() and _checkpoint_layout(entry_path(e)) is not None:
            return True
    return False


def _is_checkpoint_file_name(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(name) and not name.startswith(".")
