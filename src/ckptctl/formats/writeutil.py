"""Byte plumbing the streaming writers share: an atomic temp file and bounded copies.

Every writer writes into a hidden temporary file beside its target
(`.name.ckptctl-tmp-XXXX`), fsyncs it and renames it into place; `abort` removes it. Tensor bytes
move either from a reader's chunks (`write_chunks`) or straight from a byte range of the source
file (`copy_range`: `os.copy_file_range`, zero copy, with a pread/pwrite fallback). No buffer is
larger than CHUNK (64 MiB), so peak memory does not grow with tensor or checkpoint size.

Every large piece written is handed to the disk at once (`write_behind`), so the disk writes
while the next piece is copied and the closing fsync has little left to wait for.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, Incompatible
from ckptctl.formats.base import Writer
from ckptctl.model import TensorInfo

CHUNK = 64 * 1024 * 1024  # bytes per copy_file_range call (no user memory involved)
BUF = 16 * 1024 * 1024  # Python-side buffers (<= 32 MiB: glibc reuses them instead of re-mapping)
TMP_TAG = ".ckptctl-tmp-"

Progress = Callable[[int], None] | None


def writable_dtype(t: TensorInfo, target: str) -> dtypes.DType:
    """The tensor's dtype, or Incompatible when a byte-oriented `target` format cannot hold it."""
    d = dtypes.BY_NAME.get(t.dtype)
    if d is None:
        raise Incompatible(f"tensor {t.name!r} has unknown dtype {t.dtype}")
    if d.kind == "string":
        raise Incompatible(
            f"tensor {t.name!r} is a TensorFlow string tensor, which {target} cannot hold "
            f"(leave it out: --exclude {t.name!r})"
        )
    if d.kind == "quant":
        raise Incompatible(
            f"tensor {t.name!r} has dtype {t.dtype}: its quantization scale and zero point "
            "are not kept, so ckptctl does not write quantized tensors"
        )
    if d.bits % 8:
        raise Incompatible(f"tensor {t.name!r} has dtype {t.dtype}, which {target} cannot hold")
    return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(target: Path) -> str:
    return f".{target.name}{TMP_TAG}"


# ---- what an interrupted run leaves behind ------------------------------------------------------
_STARTED = time.time()  # temporaries newer than this process may belong to a run still going
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp / mkdtemp's random part


def _lock(fd: int, is_dir: bool) -> bool:
    """Take an exclusive lock without waiting; False when someone else holds one.

    Folders get flock; files get an open-file-description record lock (F_OFD_SETLK), which
    libhdf5's own flock on the same file does not conflict with."""
    import fcntl

    if is_dir:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    import struct

    F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError as e:
        if e.errno in (11, 13):  # EAGAIN, EACCES: held by another open file
            return False
        raise
    return True


def hold_lock(fd: int) -> None:
    """Mark a temporary (file or folder fd) as in use: the kernel drops the lock when the process
    dies, however it dies, so clean_stale_temps never removes a temporary of a live run."""
    try:
        _lock(fd, stat.S_ISDIR(os.fstat(fd).st_mode))
    except (OSError, ImportError):
        pass


def _in_use(path: str, is_dir: bool) -> bool:
    try:
        fd = os.open(path, (os.O_RDONLY if is_dir else os.O_RDWR) | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        if not _lock(fd, is_dir):
            return True
        if not is_dir:  # a live h5py writer holds libhdf5's flock on its file
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except (OSError, ImportError):
        return True
    finally:
        os.close(fd)  # also drops our probe locks


def clean_stale_temps(target: str | os.PathLike) -> list[str]:
    """Remove the temporaries a killed ckptctl left beside `target` and say so on stderr.

    Only our own names (`.<target name>.ckptctl-tmp-XXXXXXXX`, a file or a folder), owned by this
    user, last modified before this process started and not locked by a live writer (see
    hold_lock). Returns the paths removed.
    """
    target = Path(target)
    prefix = temp_name(target)
    removed: list[str] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix) or not _RANDOM.fullmatch(e.name[len(prefix) :]):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_mtime >= _STARTED or st.st_uid != os.getuid():
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or _in_use(e.path, stat.S_ISDIR(st.st_mode)):
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(e.path)  # never follows a symlink inside
            else:
                os.unlink(e.path)
        except OSError:
            continue
        removed.append(e.path)
        sys.stderr.write(f"note: removed {e.path}, left by an interrupted ckptctl run\n")
    return removed


PAUSE_ENV = "CKPTCTL_TEST_PAUSE_AT"


def pause_point(stage: str) -> None:
    """Test hook, off unless CKPTCTL_TEST_PAUSE_AT=<stage>: say so on stderr and stop (SIGSTOP)
    until a test SIGKILLs the process or lets it go on with SIGCONT (tests/test_faults.py)."""
    if os.environ.get(PAUSE_ENV) == stage:
        import signal

        sys.stderr.write(f"paused at {stage}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


class AtomicFile:
    """A temporary file beside `target`, renamed over it by `commit`, removed by `abort`."""

    def __new__(cls, target=None, *a, **k):
        """AtomicFile(url) is a RemoteAtomicFile: writers need not know."""
        if cls is AtomicFile and target is not None:
            from ckptctl.sources import is_remote

            if is_remote(target):
                return object.__new__(RemoteAtomicFile)
        return object.__new__(cls)

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        parent = self.target.parent
        if not parent.is_dir():
            raise Incompatible(f"folder {parent} does not exist")
        clean_stale_temps(self.target)
        fd, name = tempfile.mkstemp(prefix=temp_name(self.target), dir=parent)
        hold_lock(fd)
        self.fd: int | None = fd
        self.tmp = Path(name)

    def fileno(self) -> int:
        """The temporary file's descriptor, while it is open (before commit or abort)."""
        assert self.fd is not None, "the temporary file is already committed or aborted"
        return self.fd

    def commit(self, sync: bool = True) -> None:
        """Rename the file over the target; with `sync` False the caller fsyncs it (and the
        folder) before anything depends on it (convert writes into a hidden staging folder)."""
        assert self.fd is not None, "commit after close"
        os.fchmod(self.fd, 0o666 & ~_umask())
        if sync:
            os.fsync(self.fd)
        pause_point("commit")
        os.replace(self.tmp, self.target)  # before close: the lock is held until the name is gone
        os.close(self.fd)
        self.fd = None
        if sync:
            fsync_dir(self.target.parent)

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


class RemoteAtomicFile(AtomicFile):
    """An output at a URL (s3://, gs://, az://): the writer writes a local temporary file as usual
    (writers that seek back, h5py and the zip's headers, need one), and `commit` uploads it with
    `publish`: nothing is at the URL until every byte is up, and a failed or interrupted upload
    leaves nothing there. The local file lives in CKPTCTL_TMPDIR (default: the system's temp folder)."""

    def __init__(self, target):
        from ckptctl.sources import as_path, check_bucket, check_writable_target

        self.target = as_path(target)
        check_writable_target(self.target)
        check_bucket(self.target)
        clean_stale_temps(Path(staging_dir()) / self.target.name)  # a killed run's staged file
        fd, name = tempfile.mkstemp(prefix=temp_name(self.target), dir=staging_dir())
        hold_lock(fd)
        self.fd = fd
        self.tmp = Path(name)

    def commit(self, sync: bool = True) -> None:
        assert self.fd is not None, "commit after close"
        pause_point("commit")
        try:
            publish(self.tmp, self.target)
        finally:
            self.abort()  # the local file only


def staging_dir() -> str:
    """Where outputs bound for remote storage are staged (CKPTCTL_TMPDIR, else the temp folder)."""
    d = os.environ.get("CKPTCTL_TMPDIR") or tempfile.gettempdir()
    if not os.path.isdir(d):
        raise Incompatible(f"CKPTCTL_TMPDIR={d} is not a folder")
    return d


def upload_temp(local: str | os.PathLike, target, progress: Progress = None):
    """Upload a local file or folder to a hidden temporary beside the remote `target`
    (`.<name>.ckptctl-tmp-<host>-<pid>-<random>`, an object or a prefix of objects) and return
    its RemotePath. A failure leaves nothing (the multipart upload is aborted, parts already
    whole are removed); what a SIGKILL leaves is removed by the next write to `target`
    (sources.clean_stale_remote)."""
    from ckptctl.sources import Upload, as_path, remote_rm, remote_temp_name

    target = as_path(target)
    tmp = target.parent / remote_temp_name(target.name)
    local = Path(local)
    files = [(local, tmp)] if local.is_file() else [(p, tmp / p.name) for p in sorted(local.iterdir())]
    try:
        for path, url in files:
            with Upload(url, size_hint=path.stat().st_size, progress=progress) as up:
                up.write_file(path)
                pause_point("upload-parts")
    except BaseException:
        remote_rm(tmp, recursive=not local.is_file())
        raise
    return tmp


def publish(local: str | os.PathLike, target, progress: Progress = None) -> None:
    """Put a local file at the remote `target`, whole or not at all: upload to a hidden temporary
    object beside it, then a server-side copy to `target` (an existing object is replaced only
    then), then remove the temporary."""
    from ckptctl.sources import as_path, clean_stale_remote, remote_copy, remote_rm

    target = as_path(target)
    clean_stale_remote(target)
    tmp = upload_temp(local, target, progress)
    try:
        pause_point("uploaded")
        remote_copy(tmp, target)
    finally:
        remote_rm(tmp)


def fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


WRITE_BEHIND_MIN = 1 << 20  # smaller pieces are left to the closing fsync
_sync_file_range = None  # libc's sync_file_range once looked up; False where there is none


def write_behind(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes of `fd` at `offset` to disk, without waiting (Linux).

    `sync_file_range(SYNC_FILE_RANGE_WRITE)`: the kernel queues the range's dirty pages for
    writeback now instead of after its 30 s timeout, so writing to disk overlaps the copy and the
    closing fsync only waits for the tail. No effect on durability (fsync still decides it);
    a no-op on other systems or file systems that refuse it.
    """
    global _sync_file_range
    if length < WRITE_BEHIND_MIN or _sync_file_range is False:
        return
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
        if not _sync_file_range:
            return
    if _sync_file_range(fd, offset, length, 2) != 0:  # 2 = SYNC_FILE_RANGE_WRITE
        _sync_file_range = False


def _load_sync_file_range():
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        f = ctypes.CDLL(None, use_errno=True).sync_file_range  # releases the GIL while it runs
    except (OSError, AttributeError):
        return False
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - the kernel reports ENOSPC as an error, not 0
            raise OSError(28, "No space left on device")
        view = view[n:]
        offset += n


def write_chunks(
    fd: int,
    offset: int,
    chunks: Iterable[bytes | memoryview],
    length: int,
    name: str,
    progress: Progress = None,
    crc: bool = False,
) -> int:
    """Write exactly `length` bytes from `chunks` at `offset`; returns their CRC-32 (or 0)."""
    pos = 0
    value = 0
    for chunk in chunks:
        n = len(memoryview(chunk).cast("B")) if not isinstance(chunk, bytes) else len(chunk)
        if pos + n > length:
            raise CorruptFile(f"tensor {name!r}: got more than its {length} bytes")
        if n:
            pwrite_all(fd, chunk, offset + pos)
            write_behind(fd, offset + pos, n)
            if crc:
                value = zlib.crc32(chunk, value)
            pos += n
            if progress:
                progress(n)
    if pos != length:
        raise CorruptFile(f"tensor {name!r}: got {pos} bytes, expected {length}")
    return value


_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def copy_range(
    src: str | os.PathLike | int,
    src_offset: int,
    fd: int,
    dst_offset: int,
    length: int,
    progress: Progress = None,
    crc: bool = False,
) -> int:
    """Copy `length` bytes of file `src` at `src_offset` to `fd` at `dst_offset`.

    Uses os.copy_file_range (no bytes through Python) and falls back to pread/pwrite in
    bounded pieces. With `crc`, the bytes are read to compute their CRC-32 (returned).
    """
    own = not isinstance(src, int)
    sfd = src if isinstance(src, int) else os.open(src, os.O_RDONLY)
    try:
        if crc or not _COPY_FILE_RANGE:
            return _copy_pread(sfd, src_offset, fd, dst_offset, length, progress, crc)
        done = 0
        while done < length:
            want = min(CHUNK, length - done)
            try:
                n = os.copy_file_range(sfd, fd, want, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno in (18, 22, 38, 95, 1):  # EXDEV EINVAL ENOSYS EOPNOTSUPP EPERM
                    return _copy_pread(sfd, src_offset + done, fd, dst_offset + done, length - done, progress, False)
                raise
            if n == 0:
                raise CorruptFile(
                    f"file ends at byte {src_offset + done}, expected data up to byte {src_offset + length}"
                )
            write_behind(fd, dst_offset + done, n)
            done += n
            if progress:
                progress(n)
        return 0
    finally:
        if own:
            os.close(sfd)


def _pread_pieces(fd: int, offset: int, length: int, short: Callable[[int], str]) -> Iterator[memoryview]:
    """`length` bytes of `fd` at `offset`, read into one reused buffer of at most BUF bytes.

    Yields each piece as read (valid until the next one); a file that ends early raises
    CorruptFile(short(position where it ended)).
    """
    buf = bytearray(min(BUF, max(length, 1)))
    view = memoryview(buf)
    done = 0
    while done < length:
        want = min(len(buf), length - done)
        n = os.preadv(fd, [view[:want]], offset + done)
        if n == 0:
            raise CorruptFile(short(offset + done))
        yield view[:n]
        done += n


def _copy_pread(sfd: int, src_offset: int, fd: int, dst_offset: int, length: int, progress: Progress, crc: bool) -> int:
    def short(at: int) -> str:
        return f"file ends at byte {at}, expected data up to byte {src_offset + length}"

    # _pread_pieces yields exactly `length` bytes or raises, so write_chunks' length checks hold
    return write_chunks(
        fd,
        dst_offset,
        _pread_pieces(sfd, src_offset, length, short),
        length,
        f"bytes {src_offset}..{src_offset + length}",
        progress,
        crc,
    )


def crc_of_range(fd: int, offset: int, length: int) -> int:
    """CRC-32 of bytes already in a file (read back in bounded pieces)."""
    value = 0
    for piece in _pread_pieces(fd, offset, length, lambda _at: "temporary file is shorter than written"):
        value = zlib.crc32(piece, value)
    return value


# ---- the plan every streaming writer starts from ------------------------------------------------


class StreamingWriter(Writer):
    """Plan bookkeeping shared by the writers.

    `add` must be called once for each tensor whose `alias_of` is None (any order); a call for
    an alias is accepted and ignored (its chunks are not consumed): the writer writes aliases
    itself (a copy, a hard link, a pickle memo reference or a metadata entry). `add_range` is the
    zero-copy variant. `on_progress(nbytes)`, when set, is called as bytes are written.
    `durable = False` skips the fsync in `finish` for a caller that fsyncs the file itself.
    """

    def __init__(self, path, tensors, metadata=None, *, dedupe_tied=False):
        super().__init__(path, tensors, metadata, dedupe_tied=dedupe_tied)
        self.on_progress: Progress = None
        self.durable = True
        seen: dict[str, TensorInfo] = {}
        for t in tensors:
            if t.name in seen:
                raise Incompatible(f"two tensors are named {t.name!r}")
            seen[t.name] = t
        self.by_name = seen
        self.root: dict[str, str] = {}  # alias -> the primary tensor it shares bytes with
        for t in tensors:
            if t.alias_of is None:
                continue
            r, hops = t.alias_of, 0
            while r in seen and seen[r].alias_of is not None and hops < len(tensors):
                r, hops = seen[r].alias_of, hops + 1
            if r not in seen or seen[r].alias_of is not None:
                raise Incompatible(f"tensor {t.name!r} is tied to {t.alias_of!r}, which is not written")
            p = seen[r]
            if (p.dtype, tuple(p.shape), p.nbytes) != (t.dtype, tuple(t.shape), t.nbytes):
                raise Incompatible(f"tensor {t.name!r} is tied to {r!r} but has another dtype or shape")
            self.root[t.name] = r
        self.primaries = [t for t in tensors if t.alias_of is None]
        self._done: set[str] = set()
        self._closed = False

    # -- the state machine ---------------------------------------------------------------------
    def _claim(self, info: TensorInfo) -> TensorInfo | None:
        """The planned TensorInfo for an add() call, or None for an alias (nothing to write)."""
        if self._closed:
            raise RuntimeError("writer already finished or aborted")
        planned = self.by_name.get(info.name)
        if planned is None:
            raise Incompatible(f"tensor {info.name!r} was not in the plan")
        if planned.alias_of is not None:
            return None
        if info.name in self._done:
            raise Incompatible(f"tensor {info.name!r} written twice")
        self._done.add(info.name)
        return planned

    def _check_complete(self) -> None:
        missing = [t.name for t in self.primaries if t.name not in self._done]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise Incompatible(f"tensor {missing[0]!r}{more} never written")

    # -- the template: subclasses set `self._file` (an AtomicFile) and fill in the hooks ------
    _file: AtomicFile

    def add(self, info: TensorInfo, chunks) -> None:
        t = self._claim(info)
        if t is None:
            return
        self._write_chunks(t, chunks)
        pause_point("tensor-written")

    def add_range(self, info: TensorInfo, src, offset: int, length: int) -> None:
        t = self._claim(info)
        if t is None:
            return
        if length != t.nbytes:
            raise Incompatible(f"tensor {t.name!r}: source range is {length} bytes, expected {t.nbytes}")
        self._write_range(t, src, offset, length)
        pause_point("tensor-written")

    def finish(self) -> None:
        try:
            self._check_complete()
            self._finalize(self._file.fileno())
            self._file.commit(sync=self.durable)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        self._closed = True
        self._release()
        self._file.abort()

    def _write_chunks(self, t: TensorInfo, chunks) -> None:
        """Write a claimed primary tensor's bytes from `chunks`."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _write_range(self, t: TensorInfo, src, offset: int, length: int) -> None:
        """Copy a claimed primary tensor's bytes (`length == t.nbytes`) from a file range."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _finalize(self, fd: int) -> None:
        """Complete the temporary file once every tensor is written (before the commit)."""

    def _release(self) -> None:
        """Release per-format resources on abort (before the temporary file is removed)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finish()
