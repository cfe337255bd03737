"""File-system helpers of discovery: walking a checkpoint folder, sizes and times, small side files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any


def _walk_files(root: Path) -> tuple[list[Path], list[Path], float, int]:
    """(files, dirs deepest first, newest mtime, total size) under root, never following symlinks."""
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
        if path.stat().st_size > limit:
            return None
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
