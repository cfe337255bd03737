"""Writing to remote storage, all but the upload itself: which URLs are writable, the missing-
bucket check, hidden temporary names and the clean-up of those a killed run left, server-side
copy and removal, and forgetting what the invocation cached about a written object."""

from __future__ import annotations

import os
import re
import time

from ckptctl.errors import CkptError, UsageError
from ckptctl.sources.config import _fs, _infos, _listings, _lock
from ckptctl.sources.listings import _info, _listing, _mtime
from ckptctl.sources.remote import RemotePath, _as_remote, as_path, is_remote, protocol
from ckptctl.sources.retry import NoSuchObject, _call

WRITABLE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # fsspec file systems with atomic uploads
REMOTE_TMP_TAG = ".ckptctl-tmp-"  # as writeutil.TMP_TAG: `.<name>.ckptctl-tmp-<host>-<pid>-<random>`
STALE_SECONDS = 24 * 3600  # a temporary of another host is removed once it is this old


def check_writable_target(path) -> None:
    """One line (a usage error, exit 2) for a URL ckptctl cannot write, before anything is read."""
    if not is_remote(path):
        return
    proto = protocol(path)
    if proto in ("http", "https"):
        raise UsageError(f"{as_path(path)}: {proto}:// is read-only; write to a local path, s3://, gs:// or az://")
    if proto not in WRITABLE:
        raise UsageError(f"{as_path(path)}: ckptctl does not write to {proto}:// (s3://, gs:// and az:// it does)")


def forget(path) -> None:
    """Drop what this invocation (and fsspec) cached about `path` and its folder: it was written."""
    rp = _as_remote(path)
    with _lock:
        for p in (rp, rp.parent):
            _infos.pop(p.url, None)
            _listings.pop(p.url, None)
    try:
        fs, key = _fs(rp)
        fs.invalidate_cache(key)
    except Exception:  # noqa: BLE001 - a cache
        pass


def check_bucket(path) -> None:
    """NoSuchObject('no such bucket') in one line when the target's bucket/container is missing."""
    rp = _as_remote(path)
    fs, key = _fs(rp)
    bucket = key.split("/", 1)[0]
    root = RemotePath(f"{rp.protocol}://{bucket}")
    try:
        ok = _call(root, fs.exists, bucket)
    except NoSuchObject:
        ok = False
    if not ok:
        raise NoSuchObject("no such bucket", root)


def _host_tag() -> str:
    import socket
    import zlib

    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def remote_temp_name(name: str) -> str:
    """A hidden name beside `name` that says which host and process writes it (stale-temp cleanup)."""
    import secrets

    return f".{name}{REMOTE_TMP_TAG}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


_TMP_SUFFIX = re.compile(r"([0-9a-f]{8})-(\d+)-[0-9a-f]{8}")


def _stale(suffix: str, age: float | None) -> bool:
    m = _TMP_SUFFIX.fullmatch(suffix)
    if not m:
        return False
    host, pid = m.group(1), int(m.group(2))
    if host == _host_tag():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True  # the writer on this machine is gone
        except OSError:
            pass
        return False
    return age is not None and age > STALE_SECONDS


def clean_stale_remote(target) -> list[str]:
    """Remove what a killed ckptctl left beside a remote `target`: temporary objects and pending
    multipart uploads named `.<name>.ckptctl-tmp-<host>-<pid>-<random>` whose process is gone
    (same host) or that are older than a day (another host). Says so on stderr; returns the URLs."""
    import sys

    rp = _as_remote(target)
    prefix = f".{rp.name}{REMOTE_TMP_TAG}"
    removed: list[str] = []
    fs, key = _fs(rp)
    now = time.time()
    try:
        listing_ = _listing(rp.parent) or {}
    except CkptError:
        listing_ = {}
    for name, e in listing_.items():
        if name.startswith(prefix) and _stale(name[len(prefix) :], now - _mtime(e) if _mtime(e) else None):
            url = rp.parent / name
            try:
                fs2, k = _fs(url)
                _call(url, fs2.rm, k, recursive=e.get("type") == "directory")
            except CkptError:
                continue
            removed.append(str(url))
    if hasattr(fs, "call_s3"):
        bucket, _, folder = key.partition("/")
        folder = folder.rsplit("/", 1)[0] + "/" if "/" in folder else ""
        try:
            resp = _call(rp, fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=folder + prefix)
        except CkptError:
            resp = {}
        for u in resp.get("Uploads", []) or []:
            rest = u["Key"][len(folder + prefix) :].split("/", 1)[0]
            started = u.get("Initiated")
            age = now - started.timestamp() if hasattr(started, "timestamp") else None
            if _stale(rest, age):
                url = RemotePath(f"{rp.protocol}://{bucket}/{u['Key']}")
                try:
                    _call(
                        url, fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]
                    )
                except CkptError:
                    continue
                removed.append(f"{url} (unfinished upload)")
    for r in removed:
        sys.stderr.write(f"note: removed {r}, left by an interrupted ckptctl run\n")
    if removed:
        forget(rp)
    return removed


def remote_copy(src, dst) -> None:
    """Server-side copy of one object (S3: CopyObject, multipart copy past 5 GB); no bytes here."""
    s, d = _as_remote(src), _as_remote(dst)
    fs, sk = _fs(s)
    _fs2, dk = _fs(d)
    size = int(_info(s).get("size") or 0) if hasattr(fs, "call_s3") else None
    if size is not None and size < 5 * 1024**3:  # one CopyObject (s3fs' copy took 2.5x longer on moto)
        bucket, _, key = dk.partition("/")
        _call(d, fs.call_s3, "copy_object", Bucket=bucket, Key=key, CopySource=sk)
    else:
        _call(d, fs.copy, sk, dk)
    forget(d)


def remote_rm(path, recursive: bool = False) -> None:
    rp = _as_remote(path)
    fs, key = _fs(rp)
    try:
        _call(rp, fs.rm, key, recursive=recursive)
    except NoSuchObject:
        pass
    forget(rp)
