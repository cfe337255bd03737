"""Naming a TensorFlow checkpoint: a prefix P (`P.index` + `P.data-K-of-N`), a file of it, a
`checkpoint` state file, a SavedModel or run folder. Local paths and URLs (sources.RemotePath) alike.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl.errors import NotFound
from ckptctl.formats.tf_table import FOOTER_SIZE, MAGIC
from ckptctl.sources import as_path, is_remote, open_source

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

DATA_RE = re.compile(r"^(?P<prefix>.+)\.data-(?P<k>\d{5,})-of-(?P<n>\d{5,})$")


def _plus(p: Path | RemotePath, suffix: str) -> Path | RemotePath:
    """`p` with `suffix` appended to its name (a Path, or a sources.RemotePath for URLs)."""
    return p.with_name(p.name + suffix) if is_remote(p) else Path(f"{p}{suffix}")


def data_file(prefix: Path | RemotePath, shard: int, num_shards: int) -> Path | RemotePath:
    return _plus(prefix, f".data-{shard:05d}-of-{num_shards:05d}")


def prefix_of(path: Path | RemotePath) -> Path | RemotePath | None:
    """The checkpoint prefix a file name belongs to (P.index, P.data-K-of-N), else None."""
    name = path.name
    if name.endswith(".index"):
        return path.with_name(name[: -len(".index")])
    m = DATA_RE.match(name)
    if m:
        return path.with_name(m["prefix"])
    return None


def is_index(path: Path | RemotePath) -> bool:
    """Whether the file ends with a LevelDB table footer (the TF index magic)."""
    try:
        with open_source(path) as src:
            if src.size < FOOTER_SIZE:
                return False
            return int.from_bytes(src.pread(src.size - 8, 8), "little") == MAGIC
    except OSError:
        return False


def read_state_file(path: Path | RemotePath) -> tuple[str | None, list[str]]:
    """(model_checkpoint_path, all_model_checkpoint_paths) of a `checkpoint` CheckpointState file."""
    latest = None
    every: list[str] = []
    try:
        text = as_path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None, []
    for line in text.splitlines():
        m = re.match(r'\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"', line)
        if not m:
            continue
        value = m.group(2).encode().decode("unicode_escape")
        if m.group(1) == "model_checkpoint_path":
            latest = value
        else:
            every.append(value)
    return latest, every


def _state_prefix(folder: Path | RemotePath, value: str) -> Path | RemotePath:
    if is_remote(folder):  # a path of the machine that wrote it means nothing here: relative only
        from pathlib import PurePosixPath

        v = PurePosixPath(value)
        p = folder / value if not v.is_absolute() else folder / v.name
        if not _plus(p, ".index").is_file() and _plus(folder / v.name, ".index").is_file():
            return folder / v.name
        return p
    p = Path(value)
    if not p.is_absolute():
        p = folder / p
    if not Path(f"{p}.index").is_file():  # written elsewhere and moved: look beside the state file
        alt = folder / p.name
        if Path(f"{alt}.index").is_file():
            return alt
    return p


def resolve_dir(folder: Path | RemotePath) -> tuple[Path | RemotePath, str] | None:
    """(prefix, note) when a folder names one TF checkpoint: a SavedModel, a run folder with a
    `checkpoint` state file, or a folder holding exactly one P.index; else None."""
    for sub in (folder / "variables" / "variables", folder / "variables"):
        if _plus(sub, ".index").is_file():
            return sub, ""
    state = folder / "checkpoint"
    if state.is_file():
        latest, every = read_state_file(state)
        if latest is None and every:
            latest = every[-1]
        if latest:
            p = _state_prefix(folder, latest)
            return p, f"picked as the latest checkpoint named in {state}"
    try:
        entries: list[Path | RemotePath] = list(folder.iterdir())
        indexes = [e for e in sorted(entries) if e.name.endswith(".index") and e.is_file()]
    except OSError:
        return None
    indexes = [e for e in indexes if is_index(e)]
    if len(indexes) == 1:
        pre = prefix_of(indexes[0])
        if pre is not None:  # always: the name ends with .index
            return pre, ""
    return None


def resolve_path(p: Path | RemotePath) -> Path | RemotePath | None:
    """The prefix when `p` names a TF checkpoint by its prefix, index or a data file; else None."""
    if not p.exists():
        if _plus(p, ".index").is_file():
            return p
        return None
    if p.is_file():
        pre = prefix_of(p)
        if pre is None:
            return None
        index = _plus(pre, ".index")
        if p.name.endswith(".index"):  # the index itself: by its magic, or (broken) beside its data
            if is_index(p) or _has_data_files(pre):
                return pre
            return None
        if index.is_file():
            return pre
        raise NotFound(f"a TF checkpoint data shard, but its index {index.name} is missing", p)
    return None


def _has_data_files(pre: Path | RemotePath) -> bool:
    """Whether any P.data-K-of-N lies beside the prefix P."""
    if is_remote(pre):
        import fnmatch

        pattern = f"{glob.escape(pre.name)}.data-*-of-*"
        try:
            return any(fnmatch.fnmatchcase(e.name, pattern) for e in pre.parent.iterdir())
        except FileNotFoundError:
            return False
    assert isinstance(pre, Path)  # not remote: a local path
    return any(pre.parent.glob(f"{glob.escape(pre.name)}.data-*-of-*"))
