"""What a remote folder and object look like: one LIST per prefix and one HEAD per object,
cached for the invocation (the answers RemotePath's is_file / is_dir / stat / iterdir give)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptctl.sources.config import _fs, _infos, _listings, _lock
from ckptctl.sources.retry import AccessDenied, NoSuchObject, _call

if TYPE_CHECKING:
    from ckptctl.sources.remote import RemotePath


def _mtime(e: dict) -> float:
    v = e.get("LastModified") or e.get("last_modified") or e.get("mtime") or e.get("created")
    if v is None:
        return 0.0
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return v.timestamp()
    except AttributeError:
        return 0.0


def _info(path: RemotePath) -> dict:
    """One object's info (size, ETag, ...): one HEAD per URL and invocation."""
    with _lock:
        hit = _infos.get(path.url)
    if hit is not None:
        return hit
    fs, p = _fs(path)
    info = _call(path, fs.info, p)
    with _lock:
        _infos[path.url] = info
    return info


def _listing(path: RemotePath) -> dict[str, dict] | None:
    """{name: info} of the objects and folders directly under a prefix (one LIST), None if none."""
    if path.protocol in ("http", "https"):
        return None
    key = path.url
    with _lock:
        if key in _listings:
            return _listings[key]
    fs, p = _fs(path)
    try:
        entries = _call(path, fs.ls, p, detail=True)
    except NoSuchObject as e:
        if "bucket" in e.message:
            raise  # nothing under a missing bucket: say so rather than "no such object"
        entries = None
    except AccessDenied:  # may read objects but not list them: callers then ask per object (HEAD)
        return None
    out: dict[str, dict] | None = None
    pp = p.rstrip("/")
    if entries and not (
        len(entries) == 1
        and entries[0].get("type") != "directory"
        and str(entries[0].get("name", "")).rstrip("/") == pp
    ):  # ls of a file: no folder
        out = {}
        for entry in entries:
            full = str(entry.get("name", "")).rstrip("/")
            if full and full != pp:
                out[full.rsplit("/", 1)[-1]] = entry
    with _lock:
        _listings[key] = out
    return out
