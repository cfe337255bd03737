"""File-system helpers of discovery: walking a checkpoint folder, sizes and times, small side files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ckptctl.errors import CkptError
from ckptctl.sources import RemotePath


def _walk_files(root: Path) -> tuple[list[Path], list[Path], float, int]:
    """(files, dirs deepest first, newest mtime, total size) under root, never following symlinks."""
    if is_remote(root):
        return _remote_walk(root)
    files: list[Path] = []
    dirs: list[Path] = []
    newest = 0.0
    size = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, topdown=True, followlinks=False):
        d = Path(dirpath)
        dirs.append(d)
        try:
            newest = max(newest, os.lstat(d).st_mtime)
        except OSError:
            pass
        # symlinked folders are listed by os.walk as dirs: treat the link itself as a file
        for name in list(dirnames):
            p = d / name
            if p.is_symlink():
                dirnames.remove(name)
                filenames.append(name)
        dirnames.sort()
        for name in sorted(filenames):
            p = d / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            files.append(p)
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    dirs.sort(key=lambda p: (-len(p.parts), os.fspath(p)))
    return files, dirs, newest, size


def _file_stats(paths: list[Path]) -> tuple[float, int]:
    if any(is_remote(p) for p in paths):  # objects in a bucket: sizes and times from the listing
        remote = [p for p in paths if is_remote(p)]
        r_newest, r_size = _remote_stats(remote)
        newest, size = _file_stats([p for p in paths if not is_remote(p)])
        return max(newest, r_newest), size + r_size
    newest = 0.0
    size = 0
    seen: set[tuple[int, int]] = set()
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        newest = max(newest, st.st_mtime)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_size
    return newest, size


def _read_small_text(path: Path, limit: int = 1 << 16) -> str | None:
    try:
        if is_remote(path):
            if not path.is_file():
                return None
            data = _remote_read(path, limit)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_json(path: Path, limit: int = 256 << 20) -> Any:
    try:
        if is_remote(path) and not path.is_file():  # answered by the listing: no request
            return None
        if path.stat().st_size > limit:
            return None
        if is_remote(path):
            return json.loads(_remote_read(path, limit))
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError, CkptError):
        return None


# ---- local or remote -----------------------------------------------------------------------------
# Discovery asks a folder the same questions wherever it lives. Local paths go straight to os.*
# (as fast as before); a RemotePath (s3://, gs://, ...) answers from the listings of sources.py
# (one recursive listing of the run, prefetched by discover.scan_run), never from object data.
class RemoteEntry:
    """What os.DirEntry answers, for one entry of a remote listing."""

    __slots__ = ("name", "path", "_info")

    def __init__(self, path, info: dict):
        self.path = path
        self.name = path.name
        self._info = info

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return self._info.get("type") == "directory"

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return self._info.get("type") != "directory"

    def is_symlink(self) -> bool:
        return False


def is_remote(p) -> bool:
    return isinstance(p, RemotePath)


def scandir(folder) -> list:
    """The entries of a folder (os.DirEntry locally, RemoteEntry remotely); OSError if none."""
    if not is_remote(folder):
        with os.scandir(folder) as it:
            return list(it)
    from ckptctl.sources import listing

    if not folder.is_dir():
        raise FileNotFoundError(2, "no such folder", str(folder))
    return [RemoteEntry(p, info) for p, info in listing(folder)]


def entry_path(e) -> Path:
    """The path of a scandir() entry, as a Path or RemotePath."""
    return e.path if isinstance(e, RemoteEntry) else Path(e.path)


def listdir(folder) -> list[str]:
    if not is_remote(folder):
        return os.listdir(folder)
    return [e.name for e in scandir(folder)]


def isfile(p) -> bool:
    return p.is_file() if is_remote(p) else os.path.isfile(p)


def islink(p) -> bool:
    return False if is_remote(p) else os.path.islink(p)


def lexists(p) -> bool:
    return p.exists() if is_remote(p) else os.path.lexists(p)


def realpath(p) -> str:
    return str(p) if is_remote(p) else os.path.realpath(p)


def _remote_walk(root) -> tuple[list, list, float, int]:
    """_walk_files of a remote folder, in the same order (a folder's files, then its sub-folders)."""
    files: list = []
    dirs: list = []
    newest = 0.0
    size = 0

    def visit(d) -> None:
        nonlocal newest, size
        dirs.append(d)
        entries = sorted(scandir(d), key=lambda e: e.name)
        for e in entries:
            if not e.is_dir():
                st = e.path.stat()
                files.append(e.path)
                newest = max(newest, st.st_mtime)
                size += st.st_size
        for e in entries:
            if e.is_dir():
                visit(e.path)

    visit(root)
    dirs.sort(key=lambda p: (-len(p.parts), str(p)))
    return files, dirs, newest, size


def _remote_stats(paths: list) -> tuple[float, int]:
    newest = 0.0
    size = 0
    for p in dict.fromkeys(paths):  # each object once
        try:
            st = p.stat()
        except OSError:
            continue
        newest = max(newest, st.st_mtime)
        size += st.st_size
    return newest, size


def _remote_read(path, limit: int) -> bytes:
    """A small side file (JSON, a `latest` pointer): one ranged GET of at most limit+1 bytes."""
    from ckptctl.sources import open_source

    try:
        with open_source(path) as src:
            return src.pread(0, min(src.size, limit + 1)) if src.size else b""
    except CkptError as e:
        raise OSError(e.message) from None
