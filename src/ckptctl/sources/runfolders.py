"""Remote run folders (ls / prune): one recursive listing of a prefix, cached as the per-folder
listings; fresh HEADs; deletion of one object."""

from __future__ import annotations

from ckptctl.sources.config import _fs, _infos, _listings, _lock
from ckptctl.sources.remote import RemotePath, _as_remote
from ckptctl.sources.retry import AccessDenied, _call


def find(path, fresh: bool = False) -> list[tuple[RemotePath, dict]]:
    """(path, info) of every object under a remote prefix, in one recursive listing (a paged LIST
    without delimiter); `fresh`: not from fsspec's listing cache (prune's re-check)."""
    rp = _as_remote(path)
    fs, p = _fs(rp)
    if fresh:
        try:
            fs.invalidate_cache(p)
        except Exception:  # noqa: BLE001 - a file system without a cache
            pass
    found = _call(rp, fs.find, p, detail=True)
    scheme = rp.url.split("://", 1)[0]
    pp = p.rstrip("/")
    out = []
    for full, info in sorted((found or {}).items()):
        full = str(full).rstrip("/")
        if full.startswith(pp + "/") and info.get("type") != "directory":
            out.append((RemotePath(f"{scheme}://{full}"), info))
    return out


def prefetch_tree(path) -> bool:
    """List everything under a remote prefix in one recursive listing and cache it as the
    per-folder listings iterdir/is_dir/stat answer from, so that discovering a run of N checkpoint
    folders costs one listing, not N+1. False (nothing cached) where the protocol cannot list
    (http/https), listing is denied or nothing lies under the prefix."""
    rp = _as_remote(path)
    if rp.protocol in ("http", "https"):
        return False
    try:
        objects = find(rp)
    except AccessDenied:
        return False
    scheme = rp.url.split("://", 1)[0]
    base = rp.url.split("://", 1)[1]
    tree: dict[str, dict[str, dict]] = {}
    for obj, info in objects:
        parts = obj.url.split("://", 1)[1][len(base) + 1 :].split("/")
        cur = base
        for i, part in enumerate(parts):
            child = f"{cur}/{part}"
            entries = tree.setdefault(cur, {})
            if i == len(parts) - 1:
                entries[part] = info
            else:
                entries.setdefault(part, {"name": child, "type": "directory", "size": 0})
            cur = child
    with _lock:
        for folder, entries in tree.items():
            _listings[RemotePath(f"{scheme}://{folder}").url] = entries
    return bool(tree)


def fresh_info(path) -> dict:
    """The object's info (size, ETag / generation, ...) from a HEAD made now, not a cached one."""
    rp = _as_remote(path)
    fs, p = _fs(rp)
    try:
        fs.invalidate_cache(p)
    except Exception:  # noqa: BLE001 - a file system without a cache
        pass
    info = _call(rp, fs.info, p)
    with _lock:
        _infos[rp.url] = info
    return info


def delete_object(path) -> None:
    """Delete one remote object (one DELETE); NoSuchObject if it is already gone."""
    rp = _as_remote(path)
    fs, p = _fs(rp)
    _call(rp, fs.rm_file, p)
