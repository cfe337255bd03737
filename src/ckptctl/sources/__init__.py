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

Modules: config (storage options, secrets and their redaction, file systems, the per-invocation
caches), retry (retries and one-line errors), listings (one LIST per folder, one HEAD per
object), local (LocalSource, FdSource), cachedfile (the block-cached file object over a remote
object), remote (URLs, RemotePath, RemoteSource, open_source / open_file), writes (writable
targets, temporaries and their clean-up, copy, removal), upload (Upload), runfolders (recursive
listings, fresh HEADs and deletion for ls / prune). The names below are the public API other
modules import.
"""

from __future__ import annotations

from ckptctl.sources.cachedfile import BLOCK, CACHE_BLOCKS, MAX_AHEAD, CachedFile
from ckptctl.sources.config import EXTRAS, SECRET_KEYS, STATS, configure, parse_option, redact, timeout_seconds
from ckptctl.sources.local import FdSource, LocalSource, as_source
from ckptctl.sources.remote import (
    IN_FLIGHT,
    PIECE,
    WINDOW,
    RemotePath,
    RemoteSource,
    as_path,
    file_size,
    is_remote,
    listing,
    open_file,
    open_source,
    protocol,
)
from ckptctl.sources.retry import RETRIES, AccessDenied, NoSuchObject, RangeIgnored, remote_error
from ckptctl.sources.runfolders import delete_object, find, fresh_info, prefetch_tree
from ckptctl.sources.upload import MAX_PARTS, UPLOAD_IN_FLIGHT, UPLOAD_PART, Upload
from ckptctl.sources.writes import (
    REMOTE_TMP_TAG,
    STALE_SECONDS,
    WRITABLE,
    check_bucket,
    check_writable_target,
    clean_stale_remote,
    forget,
    remote_copy,
    remote_rm,
    remote_temp_name,
)

__all__ = [
    "open_source",
    "open_file",
    "file_size",
    "as_path",
    "is_remote",
    "RemotePath",
    "LocalSource",
    "RemoteSource",
    "CachedFile",
    "configure",
    "redact",
    "listing",
    "check_writable_target",
    "STATS",
    "Upload",
    "remote_copy",
    "remote_rm",
    "clean_stale_remote",
    "check_bucket",
    "forget",
    # also imported from here by name (the split into a package kept every public name)
    "BLOCK",
    "CACHE_BLOCKS",
    "MAX_AHEAD",
    "EXTRAS",
    "SECRET_KEYS",
    "parse_option",
    "timeout_seconds",
    "FdSource",
    "as_source",
    "IN_FLIGHT",
    "PIECE",
    "WINDOW",
    "protocol",
    "RETRIES",
    "AccessDenied",
    "NoSuchObject",
    "RangeIgnored",
    "remote_error",
    "delete_object",
    "find",
    "fresh_info",
    "prefetch_tree",
    "MAX_PARTS",
    "UPLOAD_IN_FLIGHT",
    "UPLOAD_PART",
    "REMOTE_TMP_TAG",
    "STALE_SECONDS",
    "WRITABLE",
    "remote_temp_name",
]
