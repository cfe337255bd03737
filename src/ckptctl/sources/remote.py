"""Remote objects: URLs (`is_remote`, `as_path`), `RemotePath` (pathlib's read-only questions
answered from listings), `RemoteSource` (ranged GETs, a few in flight), and `open_source` /
`open_file`, which hand out a local or a remote source for any path."""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import cast

from ckptctl.errors import CorruptFile, NotFound
from ckptctl.sources.cachedfile import BLOCK, CachedFile
from ckptctl.sources.config import EXTRAS, STATS, _fs, _lock
from ckptctl.sources.listings import _info, _listing, _mtime
from ckptctl.sources.local import LocalSource
from ckptctl.sources.retry import NoSuchObject, RangeIgnored, _call

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


PIECE = 16 * 1024 * 1024  # bytes per ranged request when streaming values
IN_FLIGHT = 4  # ranged requests in flight when streaming values
WINDOW = IN_FLIGHT * PIECE  # read-ahead window that coalesces sequential small reads (values)


# ---- paths ------------------------------------------------------------------------------------
# A URL that went through pathlib.Path (Typer turns path arguments into Paths) lost one slash:
# Path("s3://b/k") is "s3:/b/k". For Path objects of a remote protocol that is undone.
_COLLAPSED = re.compile(r"^(" + "|".join(sorted(EXTRAS, key=len, reverse=True)) + r"):/(?!/)")


def _url_of(path) -> str | None:
    if isinstance(path, str):
        return path if _URL.match(path) else None
    if isinstance(path, os.PathLike):
        text = os.fspath(path)
        if not isinstance(text, str):
            return None
        if _URL.match(text):
            return text
        m = _COLLAPSED.match(text)
        if m and isinstance(path, Path):
            return f"{m.group(1)}://{text[m.end() :]}"
    return None


def protocol(path) -> str | None:
    if isinstance(path, RemotePath):
        return path.protocol
    url = _url_of(path)
    m = _URL.match(url) if url else None
    return m.group(1).lower() if m else None


def is_remote(path) -> bool:
    """True for URLs other than file://."""
    p = protocol(path)
    return p is not None and p not in ("file", "local")


def as_path(path) -> Path | RemotePath:
    """The Path (local) or RemotePath (URL) readers work with."""
    if isinstance(path, RemotePath):
        return path
    url = _url_of(path)
    if url is not None and is_remote(path):  # is_remote is true only for URLs
        return RemotePath(url)
    if protocol(path) in ("file", "local"):
        return Path(re.sub(r"^[A-Za-z]+://", "", os.fspath(path)))
    return Path(path)


def _as_remote(path) -> RemotePath:
    """as_path(path) in the functions that take only URLs (listings, writes, uploads, run folders)."""
    return cast(RemotePath, as_path(path))


class _Stat:
    def __init__(self, size: int, mtime: float = 0.0):
        self.st_size = size
        self.st_mtime = mtime
        self.st_mode = 0o100444


class RemotePath(os.PathLike):
    """A URL with the read-only parts of pathlib.Path's interface that readers use."""

    def __init__(self, url: str):
        url = os.fspath(url)
        m = _URL.match(url)
        if not m:
            raise ValueError(f"not a URL: {url}")
        self.protocol = m.group(1).lower()
        rest = url[m.end() :]
        while rest.endswith("/") and rest.count("/") > 0 and len(rest) > 1:
            rest = rest[:-1]
        self.url = f"{m.group(1)}://{rest}"

    # -- pure path parts ---------------------------------------------------------------------
    def __fspath__(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    @property
    def _rest(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        rest = self._rest.split("?", 1)[0]
        return rest.rsplit("/", 1)[-1] if "/" in rest else ""

    @property
    def parent(self) -> RemotePath:
        rest = self._rest
        if "/" not in rest:
            return self
        return RemotePath(f"{self.protocol}://{rest.rsplit('/', 1)[0]}")

    @property
    def parents(self) -> list[RemotePath]:
        out, p = [], self
        while p.parent != p:
            p = p.parent
            out.append(p)
        return out

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.protocol}://",) + tuple(self._rest.split("/"))

    def __truediv__(self, other) -> RemotePath:
        other = os.fspath(other).lstrip("/")
        return RemotePath(f"{self.url}/{other}") if other else self

    def joinpath(self, *others) -> RemotePath:
        p = self
        for o in others:
            p = p / o
        return p

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.with_name(self.stem + suffix)

    def resolve(self, strict: bool = False) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def is_symlink(self) -> bool:
        return False

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other) -> PurePosixPath:
        """The part of this URL below `other` (a RemotePath or URL); ValueError if not below it."""
        base = str(as_path(other)).rstrip("/")
        if self.url == base:
            return PurePosixPath(".")
        if not self.url.startswith(base + "/"):
            raise ValueError(f"{self.url} is not below {base}")
        return PurePosixPath(self.url[len(base) + 1 :])

    # -- questions answered from listings -------------------------------------------------------
    def _entry(self) -> dict | None:
        parent = self.parent
        if parent != self:
            listing = _listing(parent)
            if listing is not None:
                return listing.get(self.name)
        return None

    def is_file(self) -> bool:
        e = self._entry()
        if e is not None:
            return e.get("type") != "directory"
        if self.protocol in ("http", "https") or _listing(self.parent) is None:
            try:
                return _info(self).get("type", "file") != "directory"
            except NoSuchObject:
                return False
        return False

    def is_dir(self) -> bool:
        if self.protocol in ("http", "https"):
            return False
        e = self._entry()
        if e is not None:
            return e.get("type") == "directory"
        return bool(_listing(self))  # a bucket root, or a prefix with objects under it

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[RemotePath]:
        listing = _listing(self)
        if listing is None:
            raise FileNotFoundError(2, "no such folder", self.url)
        for name in sorted(listing):
            yield self / name

    def stat(self) -> _Stat:
        e = self._entry() or _info(self)
        return _Stat(int(e.get("size") or 0), _mtime(e))

    def lstat(self) -> _Stat:
        return self.stat()

    def info(self) -> dict:
        """The object's entry in its folder's listing (size, ETag, ...), else one HEAD."""
        return dict(self._entry() or _info(self))

    def read_bytes(self) -> bytes:
        with open_source(self) as src:
            return src.pread(0, src.size) if src.size else b""

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


def listing(path) -> list[tuple[RemotePath, dict]]:
    """(path, info) of everything directly under a remote prefix, sorted by name."""
    rp = _as_remote(path)
    entries = _listing(rp) or {}
    return [(rp / n, entries[n]) for n in sorted(entries)]


class RemoteSource:
    """A remote object: ranged GETs through fsspec, exactly the bytes asked for."""

    remote = True
    local_path = None

    def __init__(self, path):
        self.path = as_path(path)
        self.url = str(self.path)
        self.fs, self.key = _fs(self.path)
        entry = self.path._entry()
        info = entry if entry is not None and entry.get("size") is not None else _info(self.path)
        if info.get("type") == "directory":
            raise NotFound("is a folder, expected an object", self.url)
        self.size = int(info.get("size") or 0)
        self.etag = info.get("ETag") or info.get("etag")
        self._http = None
        self._wlock = threading.Lock()
        self._wstart = 0
        self._wbuf: bytes | None = None
        self._wsize = BLOCK
        if self.path.protocol in ("http", "https") and self.size:
            # fsspec's HTTPFile checks each answer is the range asked for, without reading the body
            self._http = _call(
                self.url, self.fs.open, self.key, "rb", block_size=BLOCK, cache_type="none", size=self.size
            )

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a remote object has no file descriptor")

    def _get(self, start: int, end: int) -> bytes:
        if self._http is not None:
            data = self._http._fetch_range(start, end)
        else:
            data = self.fs.cat_file(self.key, start=start, end=end)
        if len(data) > end - start:
            raise RangeIgnored("the server ignores Range requests (it sent the whole object)", self.url)
        with _lock:
            STATS["requests"] += 1
            STATS["bytes"] += len(data)
        return data

    def pread(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset (fewer only past the end of the object), in one ranged GET."""
        end = min(offset + n, self.size)
        if n <= 0 or offset >= end:
            return b""
        data = _call(self.url, self._get, offset, end)
        if len(data) < end - offset:
            raise CorruptFile(
                f"the server sent {len(data)} bytes for a {end - offset}-byte range "
                "(object changed or connection cut?)",
                self.url,
            )
        return data

    def read_ahead(self, offset: int, n: int) -> bytes:
        """n bytes at offset through a read-ahead window: sequential reads of small tensors coalesce.

        The window starts at one BLOCK and grows x4 per sequential step up to WINDOW (fetched as
        IN_FLIGHT concurrent pieces); a read elsewhere starts small again. One window per source.
        """
        end = offset + n
        if end > self.size:
            raise CorruptFile(f"file ends at byte {self.size}, expected data up to byte {end}", self.url)
        if n <= 0:
            return b""
        with self._wlock:
            ws, wb = self._wstart, self._wbuf
            if wb is not None and ws <= offset and end <= ws + len(wb):
                return wb[offset - ws : end - ws]
            sequential = wb is not None and ws <= offset <= ws + len(wb) + BLOCK
            self._wsize = min(self._wsize * 4, WINDOW) if sequential else BLOCK
            stop = min(self.size, max(end, offset + self._wsize))
            if stop - offset > PIECE:
                buf = b"".join(self._pieces(offset, stop))
            else:
                buf = self.pread(offset, stop - offset)
            self._wstart, self._wbuf = offset, buf
            return buf[:n]

    def _pieces(self, offset: int, end: int) -> Iterator[bytes]:
        """[offset, end) in PIECE-sized ranged GETs, IN_FLIGHT at a time, in order."""
        from concurrent.futures import ThreadPoolExecutor

        starts = list(range(offset, end, PIECE))
        with ThreadPoolExecutor(IN_FLIGHT) as ex:
            futs = []
            it = iter(starts)
            try:
                for s in it:
                    futs.append(ex.submit(self.pread, s, min(PIECE, end - s)))
                    if len(futs) >= IN_FLIGHT:
                        break
                while futs:
                    data = futs.pop(0).result()
                    nxt = next(it, None)
                    if nxt is not None:
                        futs.append(ex.submit(self.pread, nxt, min(PIECE, end - nxt)))
                    yield data
            finally:
                for f in futs:
                    f.cancel()

    def iter_range(self, offset: int, length: int, chunk: int) -> Iterator[bytes]:
        """The bytes [offset, offset+length) in order, in pieces of at most `chunk` bytes:
        small ranges through the read-ahead window, large ones IN_FLIGHT ranged GETs at a time."""
        end = offset + length
        if end > self.size:
            raise CorruptFile(f"file ends at byte {self.size}, expected data up to byte {end}", self.url)
        chunk = max(1, chunk)
        if length <= WINDOW:
            data = self.read_ahead(offset, length)
            for i in range(0, length, chunk):
                yield data[i : i + chunk]
            return
        piece = min(chunk, PIECE)
        for data in self._pieces(offset, end):
            for i in range(0, len(data), piece):
                yield data[i : i + piece]

    def open(self) -> CachedFile:
        return CachedFile(self)

    def close(self) -> None:
        h, self._http = self._http, None
        if h is not None:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing a read-only handle
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(path) -> LocalSource | RemoteSource:
    """A byte source for a local path or a URL (raises OSError locally, CkptError remotely)."""
    if is_remote(path):
        return RemoteSource(path)
    return LocalSource(as_path(path))


def open_file(path):
    """A seekable binary file object: the built-in open for local paths, a cached one for URLs."""
    if is_remote(path):
        return CachedFile(RemoteSource(path), own=True)
    return open(os.fspath(as_path(path)), "rb")  # noqa: SIM115 - the caller closes it


def file_size(f) -> int:
    """Size of a file object from open_file / open_source(...).open()."""
    if isinstance(f, CachedFile):
        return f.size
    return os.fstat(f.fileno()).st_size
