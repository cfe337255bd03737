"""What a folder is: one checkpoint (and of which layout), a run folder holding checkpoints, or neither."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptctl.ops.runs import tf as runs_tf
from ckptctl.ops.runs.names import (
    AUX_NAMES,
    EPOCH_PATTERN,
    FILE_SUFFIXES,
    INDEX_SUFFIXES,
    SHARD_NAME,
    STEP_PATTERNS,
    TF_DATA,
    strip_suffix,
)

# ---- what a folder is --------------------------------------------------------------------------
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "commit_success.txt", "manifest.ocdbt")


def _dir_layout(path: Path, names: list[str] | None = None) -> str | None:
    """The layout of a folder that is ONE checkpoint, or None (a run folder or something else)."""
    name = path.name
    try:
        names = names if names is not None else os.listdir(path)
    except OSError:
        return None
    nameset = set(names)
    tf = runs_tf.dir_kind(path, names)
    if tf is not None:
        return None if tf == "run" else tf
    if re.match(r"^(tmp-)?checkpoint-\d+$", name):
        return "hf-trainer"
    if ".metadata" in nameset or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if re.match(r"^(\w+[_-])?\d+$", name) and (nameset & set(ORBAX_MARKERS) or _orbax_items(path, names)):
        return "orbax"
    if ".orbax-checkpoint-tmp-" in name:
        return "orbax"
    if re.match(r"^global_step\d+$", name):
        return "deepspeed"
    if any(n.endswith(INDEX_SUFFIXES) for n in names):
        return "sharded"
    from ckptctl.formats import MODEL_FILES

    if nameset & set(MODEL_FILES):
        return "folder"
    if _explicit_step(name) and _has_checkpoint_file(path):
        return "folder"
    return None


def _explicit_step(name: str) -> bool:
    """The name says step/iter/epoch outright (`step_100`, `epoch=3`, `iter_0001000`)."""
    stem = strip_suffix(name)
    return bool(STEP_PATTERNS[1].search(stem) or STEP_PATTERNS[2].search(stem) or EPOCH_PATTERN.search(stem)
                or re.search(r"(?:^|[-_])(step|epoch)=", stem))


def _checkpoint_layout(path: Path) -> str | None:
    """_dir_layout, except that a model folder holding other checkpoints is a run, not one checkpoint.

    (An HF output folder has the final model.safetensors next to its checkpoint-N/ folders; a
    folder of loose model files in several formats is a run of unstepped checkpoints.)
    """
    layout = _dir_layout(path)
    if layout not in ("folder", "sharded"):
        return layout
    try:
        entries = list(os.scandir(path))
    except OSError:
        return layout
    models = 0
    for e in entries:
        if e.is_symlink() or e.name.startswith("."):
            continue
        if e.is_dir():
            if _dir_layout(Path(e.path)) is not None or _holds_checkpoints(Path(e.path)):
                return None
        elif e.is_file() and (e.name.endswith(INDEX_SUFFIXES) or (
                _is_checkpoint_file_name(e.name) and not SHARD_NAME.search(strip_suffix(e.name)))):
            models += 1
    return None if models >= 2 else layout


def _holds_checkpoints(path: Path) -> bool:
    """A folder with a checkpoint file or checkpoint folder directly inside (a run)."""
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_symlink() or e.name.startswith("."):
                    continue
                if e.is_file() and _is_checkpoint_file_name(e.name):
                    return True
                if e.is_dir() and _dir_layout(Path(e.path)) is not None:
                    return True
    except OSError:
        return False
    return False


def _orbax_items(path: Path, names: list[str]) -> bool:
    """An Orbax step folder holds item folders (default/, state/, params/) with _METADATA etc."""
    for n in names:
        p = path / n
        if p.is_dir() and not p.is_symlink():
            try:
                inner = set(os.listdir(p))
            except OSError:
                continue
            if inner & {"_METADATA", "_sharding", "manifest.ocdbt", "checkpoint", "ocdbt.process_0"}:
                return True
    return False


def _has_checkpoint_file(path: Path, depth: int = 2) -> bool:
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False) and e.name.endswith(FILE_SUFFIXES + (".distcp",)):
                    return True
                if depth > 1 and e.is_dir(follow_symlinks=False) and _has_checkpoint_file(Path(e.path), depth - 1):
                    return True
    except OSError:
        return False
    return False


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A folder that is one checkpoint (checkpoint-N/, DCP, Orbax step, shards, model folder)."""
    p = Path(path)
    return p.is_dir() and _checkpoint_layout(p) is not None


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder holding checkpoints (a run), as opposed to a folder that is one checkpoint.

    Cheap: looks at names only. True when the folder is not itself one checkpoint and holds at
    least one checkpoint file or checkpoint folder.
    """
    p = Path(path)
    if not p.is_dir() or is_checkpoint_dir(p):
        return False
    try:
        entries = list(os.scandir(p))
    except OSError:
        return False
    for e in entries:
        if e.is_symlink():
            continue
        if e.is_file() and (_is_checkpoint_file_name(e.name) or TF_DATA.match(e.name)):
            return True
        if e.is_dir() and _checkpoint_layout(Path(e.path)) is not None:
            return True
    return False


def _is_checkpoint_file_name(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(name) and not name.startswith(".")
