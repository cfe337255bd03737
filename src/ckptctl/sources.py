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
STATS = {"requests": 0, "bytes": 0}  # ranged GETs and bytes received (for -v and benchmarks)


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
        STATS.update(requests=0, bytes=0)


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
        opts["config_kwargs"] = {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 2}}


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
        from ckptctl.formats.base import pread_chunks

        return pread_chunks(self.fd, offset, length, chunk)

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


def check_writable_target(path) -> None:
    """Writing to remote storage is not supported yet: one line, before anything is read."""
    if is_remote(path):
        raise UsageError(f"writing to {protocol(path)}:// is not supported yet; write a local file "
                         f"and upload it ({as_path(path)})")


__all__ = ["open_source", "open_file", "file_size", "as_path", "is_remote", "RemotePath", "LocalSource",
           "RemoteSource", "CachedFile", "configure", "redact", "listing", "check_writable_target", "STATS"]


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
