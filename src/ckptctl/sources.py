"""Where a checkpoint's bytes come from: a local file or a remote object, behind one interface.

Readers never ask where their bytes live. They get a *source* from `open_source(path)`:

    src = open_source(self.path)      # LocalSource or RemoteSource
    src.size                          # bytes in the object
    src.pread(offset, n)              # like os.pread: fewer bytes only at the end of the object
    src.iter_range(offset, n, chunk)  # bounded pieces; remote: several ranged requests in flight
    src.open()                        # a seekable binary file object (zipfile, h5py, pickles)
    src.local_path                    # the file's path when local (copy_file_range), else None

Local files keep today's fast paths: `pread` is `os.pread` on one descriptor, `open()` is the
built-in `open(path, "rb")` and `byte_range` callers still get a real path. Remote objects go
through fsspec (`fsspec.url_to_fs`): every read is one ranged GET for exactly the bytes asked for
(`cat_file(path, start, end)`), file objects sit on a small block cache sized for headers (64 KiB
blocks, read-ahead doubling to 4 MiB while reads are sequential), and value streaming keeps a few ranged requests in flight.

Paths: a remote URL is carried as a `RemotePath`, which answers the read-only questions readers
ask a `pathlib.Path` (`/`, `name`, `parent`, `suffix`, `exists`, `is_file`, `is_dir`, `iterdir`,
`stat`) from one listing per folder, so that folder logic (sharded, DCP, Keras indexes) needs no
change. `as_path(p)` gives a `RemotePath` for URLs and a `Path` otherwise.

Adopting this in a reader (a few mechanical lines; local behaviour and speed stay as they were):

- `self.path` is already a Path or RemotePath (Reader.__init__ calls as_path): use `self.path`
  and `self.path.parent / name`, never `Path(self.path)` (that would lose the `//` of a URL).
- `fd = os.open(p, ...)` + `os.pread(fd, n, off)`  ->  `src = open_source(p)` + `src.pread(off, n)`;
  `os.fstat(fd).st_size` -> `src.size`; `src.close()` in close().
- `pread_chunks(fd, off, n, size)` (tensor bytes)  ->  `src.iter_range(off, n, size)`.
- `open(p, "rb")` for zipfile / pickles / h5py  ->  `open_file(p) if is_remote(p) else open(p, "rb")`
  (or just `open_file(p)`); `os.fstat(f.fileno()).st_size` -> `file_size(f)`.
- `os.path.getsize(p)` / `os.stat(p)` -> `as_path(p).stat().st_size`; `os.scandir(d)` /
  `os.listdir(d)` -> `as_path(d).iterdir()` (one LIST per folder, cached per invocation);
  `Path(p).read_bytes()` -> `as_path(p).read_bytes()`.
- byte_range(): nothing to do; open_reader() turns it off for remote readers (writers then
  stream through iter_chunks instead of copy_file_range).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ckptctl.errors import CkptError, CorruptFile, NotFound, UsageError

# protocol -> the ckptctl extra that installs its fsspec file system
EXTRAS = {
    "s3": "s3", "s3a": "s3",
    "gs": "gcs", "gcs": "gcs",
    "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure",
    "hf": "hf",
    "http": "http", "https": "http",
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

BLOCK = 64 * 1024  # file-object cache block: what one scattered small read fetches
MAX_AHEAD = 4 * 1024 * 1024  # read-ahead grows (doubling) up to this while reads stay sequential
CACHE_BLOCKS = 256  # 16 MiB of cached blocks per open file object at most
PIECE = 16 * 1024 * 1024  # bytes per ranged request when streaming values
IN_FLIGHT = 4  # ranged requests in flight when streaming values
WINDOW = IN_FLIGHT * PIECE  # read-ahead window that coalesces sequential small reads (values)
RETRIES = 3  # attempts per request for transient failures (timeouts, resets, 5xx)
SECRET_KEYS = ("key", "secret", "token", "password", "passwd", "credential", "sas", "signature", "account_key")

_lock = threading.Lock()
_options: dict[str, object] = {}
_secrets: list[str] = []
_fs_cache: dict[str, object] = {}
_listings: dict[str, dict[str, dict] | None] = {}
_infos: dict[str, dict] = {}
STATS = {"requests": 0, "bytes": 0, "sent": 0, "parts": 0}  # ranged GETs, bytes received, bytes and parts uploaded


# ---- configuration ----------------------------------------------------------------------------
def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value); true/false/null/numbers/JSON objects are decoded, else a string."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise UsageError(f"--storage-option expects KEY=VALUE, got {_redact_text(text)!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    low = raw.strip().lower()
    value: object
    if low in ("true", "yes", "on"):
        value = True
    elif low in ("false", "no", "off"):
        value = False
    elif low in ("none", "null"):
        value = None
    else:
        try:
            value = json.loads(raw)
            if not isinstance(value, (int, float, dict, list)):
                value = raw
        except ValueError:
            value = raw
    return key, value


def configure(options: list[str] | dict | None = None) -> None:
    """Set the storage options for this invocation (the CLI calls this once) and forget caches."""
    global _options
    opts: dict[str, object] = {}
    if isinstance(options, dict):
        opts = dict(options)
    else:
        for text in options or []:
            k, v = parse_option(text)
            opts[k] = v
    with _lock:
        _options = opts
        _secrets.clear()
        _collect_secrets(opts)
        _infos.clear()
        _listings.clear()  # file systems are kept (keyed by options and environment): listings are not
        STATS.update(requests=0, bytes=0, sent=0, parts=0)


def _collect_secrets(opts: dict, force: bool = False) -> None:
    for k, v in opts.items():
        secret = force or any(s in str(k).lower() for s in SECRET_KEYS)
        if isinstance(v, dict):
            _collect_secrets(v, secret)
        elif secret and v not in (None, True, False) and len(str(v)) >= 3:
            _secrets.append(str(v))


def _redact_text(text: str) -> str:
    if "=" in text:
        k, v = text.split("=", 1)
        if any(s in k.lower() for s in SECRET_KEYS):
            return f"{k}=***"
    return text


def redact(message: str) -> str:
    """The message with every secret storage-option value (and AWS secret env) replaced by ***."""
    secrets = list(_secrets)
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "AZURE_STORAGE_KEY"):
        v = os.environ.get(env)
        if v and len(v) >= 3:
            secrets.append(v)
    for s in sorted(secrets, key=len, reverse=True):
        message = message.replace(s, "***")
    message = _USERINFO.sub(r"\1***@", message)  # https://user:PASSWORD@host/...
    return _SIGNED.sub(r"\1***", message)  # presigned / SAS URLs: ?X-Amz-Signature=..., &sig=...


_USERINFO = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
_SIGNED = re.compile(r"([?&](?:X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential|X-Goog-Signature|X-Goog-Credential"
                     r"|sig|signature|token|access_token|api_key|key)=)[^&\s'\"]+", re.IGNORECASE)


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
            return f"{m.group(1)}://{text[m.end():]}"
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
    if is_remote(path):
        return RemotePath(_url_of(path))
    if protocol(path) in ("file", "local"):
        return Path(re.sub(r"^[A-Za-z]+://", "", os.fspath(path)))
    return Path(path)


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
        rest = url[m.end():]
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
        return PurePosixPath(self.url[len(base) + 1:])

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


# ---- file systems and errors ---------------------------------------------------------------
class RangeIgnored(CkptError):
    """A server that answers a ranged request with the whole object."""


class NoSuchObject(NotFound):
    """404: no such bucket, key or URL (as opposed to access denied)."""


class AccessDenied(NotFound):
    """401/403."""


def _fs(path: RemotePath):
    """The fsspec file system of a URL (one per protocol and invocation) and the path inside it."""
    proto = path.protocol
    env = tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
                                            "CKPTCTL_TIMEOUT", "HF_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"))
    cache_key = f"{proto}|{sorted(_options.items(), key=str)!r}|{env!r}"
    with _lock:
        fs = _fs_cache.get(cache_key)
    if fs is None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a core dependency
            raise CkptError("remote paths need fsspec: pip install fsspec") from None
        opts = dict(_options)
        opts.setdefault("skip_instance_cache", True)
        _default_timeouts(proto, opts)
        try:
            fs, _p = fsspec.url_to_fs(path.url, **opts)
        except ImportError:
            extra = EXTRAS.get(proto)
            if extra:
                raise CkptError(f"{proto}:// needs the {extra} extra: pip install 'ckptctl[{extra}]'") from None
            raise CkptError(f"{proto}:// is not a protocol fsspec knows here") from None
        except ValueError as e:
            if "Protocol not known" in str(e) or "not known" in str(e):
                raise UsageError(f"{proto}:// is not a protocol ckptctl can read") from None
            raise CkptError(redact(f"{path}: cannot set up {proto}:// ({e})")) from None
        except TypeError as e:
            raise UsageError(redact(f"a --storage-option is not accepted by {proto}:// ({e})")) from None
        with _lock:
            _fs_cache[cache_key] = fs
    return fs, fs._strip_protocol(path.url) if proto not in ("http", "https") else path.url


def timeout_seconds() -> float:
    try:
        return float(os.environ.get("CKPTCTL_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def _default_timeouts(proto: str, opts: dict) -> None:
    """A per-request timeout (CKPTCTL_TIMEOUT, default 60 s) unless the user configured one."""
    t = timeout_seconds()
    if proto in ("http", "https"):
        if "client_kwargs" not in opts:
            import aiohttp

            opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}
    elif proto in ("s3", "s3a") and "config_kwargs" not in opts:
        # 32 connections: ls reads 16 headers at once and a multipart upload keeps 8 parts in
        # flight; botocore's default pool of 10 capped ls at 10 requests in flight
        opts["config_kwargs"] = {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 2},
                                 "max_pool_connections": 32}


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, CkptError, ValueError)):
        return False
    st = _status(e)
    if st is not None:
        return st >= 500 or st == 429
    return isinstance(e, (TimeoutError, ConnectionError, OSError)) or type(e).__name__ in (
        "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
        "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError", "ReadTimeoutError",
        "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError")


def remote_error(e: BaseException, url) -> CkptError:
    """One line naming the URL and the problem, without secrets."""
    if isinstance(e, CkptError):
        return e
    cause = e.__cause__ or e.__context__
    if isinstance(e, FileNotFoundError) and cause is not None and _status(cause) != 404 \
            and not isinstance(cause, FileNotFoundError):
        return remote_error(cause, url)  # fsspec's HTTP info says "not found" for 403s and timeouts too
    text = redact(str(e))
    low = text.lower()
    st = _status(e)
    name = type(e).__name__
    if isinstance(e, FileNotFoundError) or st == 404 or "nosuchkey" in low or "nosuchbucket" in low:
        what = "no such bucket" if "bucket" in low else "no such object (key or URL not found)"
        return NoSuchObject(what, url)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return NotFound("no credentials found (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        "~/.aws/config; or --storage-option anon=true for a public bucket)", url)
    if isinstance(e, PermissionError) or st in (401, 403) or "accessdenied" in low or "forbidden" in low:
        return AccessDenied("access denied (check credentials: AWS_PROFILE, --storage-option ...)", url)
    if isinstance(e, TimeoutError) or "timeout" in name.lower() or "timed out" in low:
        return CkptError(f"timed out after {RETRIES} attempts (CKPTCTL_TIMEOUT={timeout_seconds():g}s)", url)
    if "range requests" in low:
        return RangeIgnored("the server ignores HTTP Range requests (it sends the whole object); ckptctl "
                            "reads only the bytes it needs and refuses to download it all", url)
    if name in ("ClientPayloadError", "ContentLengthError", "IncompleteRead", "ResponseStreamingError") \
            or isinstance(e, ConnectionResetError) or "connection reset" in low:
        return CkptError(f"connection cut half way through a read, {RETRIES} attempts (server reset or closed "
                         "it before the whole range arrived)", url)
    if isinstance(e, (ConnectionError,)) or "connect" in name.lower() or "disconnect" in name.lower():
        return CkptError(f"connection failed after {RETRIES} attempts ({text or name})", url)
    if st is not None:
        return CkptError(f"server answered HTTP {st} ({text or name})", url)
    return CkptError(f"remote read failed: {name}: {text}" if text else f"remote read failed: {name}", url)


def _call(url, fn, *args, **kwargs):
    """fn(*args) with bounded retries of transient failures; errors become one-line CkptErrors."""
    delay = 0.2
    for attempt in range(RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - mapped below
            if attempt + 1 < RETRIES and _transient(e):
                time.sleep(delay)
                delay *= 3
                continue
            raise remote_error(e, url) from None
    raise AssertionError("unreachable")  # pragma: no cover


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
    if entries and not (len(entries) == 1 and entries[0].get("type") != "directory"
                        and str(entries[0].get("name", "")).rstrip("/") == pp):  # ls of a file: no folder
        out = {}
        for e in entries:
            full = str(e.get("name", "")).rstrip("/")
            if full and full != pp:
                out[full.rsplit("/", 1)[-1]] = e
    with _lock:
        _listings[key] = out
    return out


def listing(path) -> list[tuple[RemotePath, dict]]:
    """(path, info) of everything directly under a remote prefix, sorted by name."""
    rp = as_path(path)
    entries = _listing(rp) or {}
    return [(rp / n, entries[n]) for n in sorted(entries)]


# ---- sources ----------------------------------------------------------------------------------
class LocalSource:
    """A local file: os.pread on one descriptor; open() is the built-in open."""

    remote = False

    def __init__(self, path):
        self.path = os.fspath(path)
        self.url = self.path
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise

    @property
    def local_path(self) -> str:
        return self.path

    def fileno(self) -> int:
        return self.fd

    def pread(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def iter_range(self, offset: int, length: int, chunk: int) -> Iterator[bytes]:
        """`length` bytes at `offset` in pieces of at most `chunk` bytes, with os.pread."""
        end = offset + length
        pos = offset
        while pos < end:
            data = os.pread(self.fd, min(chunk, end - pos), pos)
            if not data:
                raise CorruptFile(f"file ends at byte {pos}, expected data up to byte {end}")
            pos += len(data)
            yield data

    def open(self):
        return open(self.path, "rb")  # noqa: SIM115 - the caller closes it

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            self._http = _call(self.url, self.fs.open, self.key, "rb", block_size=BLOCK, cache_type="none",
                               size=self.size)

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
            raise CorruptFile(f"the server sent {len(data)} bytes for a {end - offset}-byte range "
                              "(object changed or connection cut?)", self.url)
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
                return wb[offset - ws:end - ws]
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
                yield data[i:i + chunk]
            return
        piece = min(chunk, PIECE)
        for data in self._pieces(offset, end):
            for i in range(0, len(data), piece):
                yield data[i:i + piece]

    def open(self) -> io.BufferedReader:
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


class CachedFile(io.RawIOBase):
    """A seekable read-only file object over a RemoteSource, with an LRU cache of BLOCK-sized blocks.

    Small reads (headers, zip directories, pickles, HDF5 metadata) are served from whole blocks,
    fetched a run at a time; large reads go straight to one ranged GET without being cached.
    """

    def __init__(self, src: RemoteSource, block: int = BLOCK, max_blocks: int = CACHE_BLOCKS, own: bool = False):
        super().__init__()
        self.src = src
        self.name = src.url
        self.size = src.size
        self.block = block
        self.max_blocks = max_blocks
        self.pos = 0
        self.own = own  # close the source with the file
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._seq_next = -1  # block after the last fetch
        self._ahead = block

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self.pos + offset
        elif whence == 2:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self.pos = pos
        return pos

    def _block(self, i: int) -> bytes:
        b = self._blocks.get(i)
        if b is not None:
            self._blocks.move_to_end(i)
        return b

    def _fill(self, first: int, last: int) -> None:
        """Fetch the missing blocks of [first, last], one request per missing run.

        A run that starts where the previous fetch ended is a sequential read (a pickle, a zip
        directory): it fetches ahead, doubling up to MAX_AHEAD; a scattered read fetches one block.
        """
        i = first
        while i <= last:
            if i in self._blocks:
                self._blocks.move_to_end(i)
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in self._blocks:
                j += 1
            if i == self._seq_next:
                self._ahead = min(self._ahead * 2, MAX_AHEAD)
                stop = max(j, i + self._ahead // self.block - 1)
                while j < stop and j + 1 not in self._blocks and (j + 1) * self.block < self.size:
                    j += 1
            else:
                self._ahead = self.block
            data = self.src.pread(i * self.block, (j - i + 1) * self.block)
            for k in range(i, j + 1):
                self._blocks[k] = data[(k - i) * self.block:(k - i + 1) * self.block]
            self._seq_next = j + 1
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
            i = j + 1

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        end = min(self.pos + n, self.size)
        if end <= self.pos:
            return b""
        start = self.pos
        if end - start >= 4 * self.block:
            data = self.src.pread(start, end - start)
        else:
            first, last = start // self.block, (end - 1) // self.block
            if last - first + 1 > self.max_blocks:
                data = self.src.pread(start, end - start)
            else:
                self._fill(first, last)
                parts = [self._blocks[i] for i in range(first, last + 1)]
                buf = parts[0] if len(parts) == 1 else b"".join(parts)
                off = start - first * self.block
                data = buf[off:off + (end - start)]
        self.pos = start + len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        return n

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._blocks.clear()
        if self.own:
            self.src.close()
        super().close()


class FdSource(LocalSource):
    """A LocalSource over a descriptor the caller owns (not closed here)."""

    def __init__(self, fd: int):
        self.path = self.url = f"<fd {fd}>"
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def close(self) -> None:
        pass


def as_source(src):
    """A source from a source, or from an os-level descriptor (int) kept open by its owner."""
    return FdSource(src) if isinstance(src, int) else src


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


# ---- writing ------------------------------------------------------------------------------------
WRITABLE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # fsspec file systems with atomic uploads
# bytes per uploaded part (S3: 5 MiB..5 GiB, at most 10,000 parts) and parts uploading at once:
# memory is at most (UPLOAD_IN_FLIGHT + 1) parts. 8 MiB x 8 (s3transfer: 8 MiB x 10) uploaded a
# 200 MB file to moto in 7.5-7.7 s where 16 MiB x 4 took 8-10 s (interleaved, loaded machine).
UPLOAD_PART = 8 * 1024 * 1024
UPLOAD_IN_FLIGHT = 8
MAX_PARTS = 10_000
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
    rp = as_path(path)
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
    rp = as_path(path)
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

    rp = as_path(target)
    prefix = f".{rp.name}{REMOTE_TMP_TAG}"
    removed: list[str] = []
    fs, key = _fs(rp)
    now = time.time()
    try:
        listing_ = _listing(rp.parent) or {}
    except CkptError:
        listing_ = {}
    for name, e in listing_.items():
        if name.startswith(prefix) and _stale(name[len(prefix):], now - _mtime(e) if _mtime(e) else None):
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
            rest = u["Key"][len(folder + prefix):].split("/", 1)[0]
            started = u.get("Initiated")
            age = now - started.timestamp() if hasattr(started, "timestamp") else None
            if _stale(rest, age):
                url = RemotePath(f"{rp.protocol}://{bucket}/{u['Key']}")
                try:
                    _call(url, fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                          UploadId=u["UploadId"])
                except CkptError:
                    continue
                removed.append(f"{url} (unfinished upload)")
    for r in removed:
        sys.stderr.write(f"note: removed {r}, left by an interrupted ckptctl run\n")
    if removed:
        forget(rp)
    return removed


class Upload:
    """One remote object written as a stream: nothing is visible at the URL until `complete()`,
    and `abort()` leaves nothing (the multipart upload is aborted).

    S3 (s3fs): a multipart upload of UPLOAD_PART-sized parts (8 MiB), UPLOAD_IN_FLIGHT (8) uploading at once
    on a thread pool while the caller produces the next; memory stays at a few parts whatever the
    object's size. Objects smaller than one part go up in one PUT at `complete()`. Other
    protocols use fsspec's own writer (`fs.open(..., "wb", autocommit=False)`, `commit()` /
    `discard()`). `size_hint` (bytes, when known) raises the part size so that the object fits
    in S3's 10,000 parts.
    """

    def __init__(self, path, size_hint: int | None = None, progress=None):
        self.path = as_path(path)
        self.url = str(self.path)
        check_writable_target(self.path)
        self.fs, self.key = _fs(self.path)
        self.part = UPLOAD_PART
        if size_hint:
            need = -(-size_hint // (MAX_PARTS - 1))
            self.part = max(self.part, -(-need // (1 << 20)) << 20)
        self.progress = progress
        self.size = 0
        self._buf = bytearray()
        self._done = False
        self._s3 = hasattr(self.fs, "call_s3")
        self._mpu: str | None = None
        self._parts: list = []  # futures of {"PartNumber", "ETag"}
        self._pool = None
        self._file = None
        if self._s3:
            self.bucket, _, self.obj = self.key.partition("/")
        else:
            self._file = _call(self.url, self.fs.open, self.key, "wb", block_size=self.part, autocommit=False)

    # -- writing ------------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._done:
            raise RuntimeError("upload already completed or aborted")
        mv = memoryview(data).cast("B")
        if not self._s3:
            _call(self.url, self._file.write, mv)
            self.size += len(mv)
            if self.progress:
                self.progress(len(mv))
            return
        while mv:
            take = min(len(mv), self.part - len(self._buf))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) >= self.part:
                self._send(bytes(self._buf))
                self._buf = bytearray()

    def write_file(self, path, offset: int = 0, length: int | None = None) -> None:
        """Upload `length` bytes of a local file from `offset` (one part read at a time)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            done = 0
            while done < length:
                want = min(self.part - len(self._buf) if self._s3 else self.part, length - done)
                data = os.pread(fd, want, offset + done)
                if not data:
                    raise CorruptFile(f"file ends at byte {offset + done}, expected {offset + length}", path)
                if self._s3 and not self._buf and len(data) == self.part:
                    self._send(data)
                else:
                    self.write(data)
                done += len(data)
        finally:
            os.close(fd)

    def _send(self, data: bytes) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._mpu is None:
            resp = _call(self.url, self.fs.call_s3, "create_multipart_upload", Bucket=self.bucket, Key=self.obj)
            self._mpu = resp["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOAD_IN_FLIGHT, thread_name_prefix="ckptctl-upload")
        pending = [f for f in self._parts if not f.done()]
        if len(pending) >= UPLOAD_IN_FLIGHT:
            pending[0].result()  # back-pressure: at most UPLOAD_IN_FLIGHT parts in memory
        for f in self._parts:
            if f.done() and f.exception() is not None:
                raise f.exception()
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> dict:
        resp = _call(self.url, self.fs.call_s3, "upload_part", Bucket=self.bucket, Key=self.obj,
                     UploadId=self._mpu, PartNumber=number, Body=data)
        with _lock:
            STATS["sent"] = STATS.get("sent", 0) + len(data)
            STATS["parts"] = STATS.get("parts", 0) + 1
            self.size += len(data)
        if self.progress:
            self.progress(len(data))
        return {"PartNumber": number, "ETag": resp["ETag"]}

    # -- ending -------------------------------------------------------------------------------
    def complete(self) -> None:
        """Make the object appear at the URL, whole (an existing object is replaced only now)."""
        if self._done:
            raise RuntimeError("upload already completed or aborted")
        try:
            if not self._s3:
                _call(self.url, self._file.close)
                _call(self.url, self._file.commit)
            elif self._mpu is None:
                data = bytes(self._buf)
                _call(self.url, self.fs.call_s3, "put_object", Bucket=self.bucket, Key=self.obj, Body=data)
                with _lock:
                    STATS["sent"] = STATS.get("sent", 0) + len(data)
                self.size += len(data)
                if self.progress:
                    self.progress(len(data))
            else:
                if self._buf:
                    self._send(bytes(self._buf))
                    self._buf = bytearray()
                parts = [f.result() for f in self._parts]
                _call(self.url, self.fs.call_s3, "complete_multipart_upload", Bucket=self.bucket, Key=self.obj,
                      UploadId=self._mpu, MultipartUpload={"Parts": parts})
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._shutdown()
        forget(self.path)

    def abort(self) -> None:
        """Leave nothing behind: cancel queued parts and abort the multipart upload (idempotent)."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        for f in self._parts:
            f.cancel()
        self._shutdown()
        if self._file is not None:
            try:
                self._file.discard()
            except Exception:  # noqa: BLE001 - best effort; nothing was committed
                pass
        if self._mpu is not None:
            try:
                _call(self.url, self.fs.call_s3, "abort_multipart_upload", Bucket=self.bucket, Key=self.obj,
                      UploadId=self._mpu)
            except CkptError:
                pass
            self._mpu = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.complete()


def remote_copy(src, dst) -> None:
    """Server-side copy of one object (S3: CopyObject, multipart copy past 5 GB); no bytes here."""
    s, d = as_path(src), as_path(dst)
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
    rp = as_path(path)
    fs, key = _fs(rp)
    try:
        _call(rp, fs.rm, key, recursive=recursive)
    except NoSuchObject:
        pass
    forget(rp)


__all__ = ["open_source", "open_file", "file_size", "as_path", "is_remote", "RemotePath", "LocalSource",
           "RemoteSource", "CachedFile", "configure", "redact", "listing", "check_writable_target", "STATS",
           "Upload", "remote_copy", "remote_rm", "clean_stale_remote", "check_bucket", "forget"]


# ---- run folders: one recursive listing, fresh HEADs, deletion (ls / prune) -------------------------
def find(path, fresh: bool = False) -> list[tuple[RemotePath, dict]]:
    """(path, info) of every object under a remote prefix, in one recursive listing (a paged LIST
    without delimiter); `fresh`: not from fsspec's listing cache (prune's re-check)."""
    rp = as_path(path)
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
    rp = as_path(path)
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
        parts = obj.url.split("://", 1)[1][len(base) + 1:].split("/")
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
    rp = as_path(path)
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
    rp = as_path(path)
    fs, p = _fs(rp)
    _call(rp, fs.rm_file, p)
