"""convert's writing: each output file streamed through its writer into a hidden staging folder
beside DST (casts recorded with CRC-32Cs for verify), then committed to DST (rename, or
server-side copies for a remote DST)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ckptctl.errors import CkptError
from ckptctl.formats import writer_class
from ckptctl.formats.writeutil import TMP_TAG, clean_stale_temps, fsync_dir, hold_lock, pause_point, staging_dir
from ckptctl.model import TensorInfo
from ckptctl.ops import stream
from ckptctl.ops.convert_cast import cast_chunks
from ckptctl.ops.stream import Ahead, FileView, cancel_and_close, read_range
from ckptctl.sources import is_remote

if TYPE_CHECKING:
    from ckptctl.formats.writeutil import StreamingWriter
    from ckptctl.ops.convert import ConvertPlan, OutputFile
    from ckptctl.sources import RemotePath

# Bytes per read. 16 MiB, not 64: glibc serves blocks up to 32 MiB from its heap once one was
# freed, so the buffers are reused instead of being mapped and page-faulted afresh each time
# (measured: 64 MiB reads ran at 0.6 GB/s from the page cache, 16 MiB ones several times faster).
CHUNK = 16 * 1024 * 1024
CAST_CHUNK = 16 * 1024 * 1024  # source bytes per cast step (a few arrays of this size live at once)
CAST_ITEM = 8 * 1024 * 1024  # source bytes per item of the parallel cast (CastItems)
CAST_AHEAD = 6  # items cast ahead of the writer (each holds one output buffer and one mapped piece)


@dataclass
class ConvertResult:
    dst: Path | RemotePath
    fmt: str
    outputs: Sequence[Path | RemotePath]
    num_tensors: int
    bytes_written: int
    verified: bool
    verified_tensors: int = 0
    verified_bytes: int = 0


def _source_chunks(plan: ConvertPlan, src: TensorInfo, out: TensorInfo, bufs: dict | None = None) -> Iterable:
    """The bytes to write for output tensor `out`: the source's, or cast. With `bufs` (a dict
    kept by the caller), a cast reads the source into one reused buffer and casts into another."""
    if out.dtype == src.dtype:
        return plan.reader.iter_chunks(src.name, CHUNK)
    raw: Iterable[bytes | memoryview] | None = None
    if bufs is not None:
        rng = plan.reader.byte_range(src.name)
        if rng is not None:
            if "in" not in bufs:
                bufs["in"] = bytearray(CAST_CHUNK)
            raw = read_range(rng[0], rng[1], rng[2], bufs["in"])
        cast_out = bufs.setdefault("out", [None])
    else:
        cast_out = None
    if raw is None:
        raw = plan.reader.iter_chunks(src.name, CAST_CHUNK)
    return cast_chunks(raw, src.dtype, out.dtype, cast_out)


def _crc32c():
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:  # pragma: no cover - a declared dependency
        return None


def _recording_crcs(chunks: Iterable, sink: list[tuple[int, int]]) -> Iterator:
    """Pass the chunks through; append (length, CRC-32C) of each to `sink` (verify checks the
    bytes on disk against them instead of casting the source a second time)."""
    import numpy as np

    crc = _crc32c()
    for c in chunks:
        a = np.frombuffer(c, dtype=np.uint8)
        if a.size:
            sink.append((a.size, crc(a)))
        yield c


class CastItems:
    """The cast bytes of every tensor of one output file whose source lies contiguously in a
    local file, cast on the worker threads ahead of the writer, across tensors.

    Each tensor's source range is cut into items of whole elements (CAST_ITEM source bytes); a
    worker maps its item (FileView), casts it into an output buffer (the same `cast_chunks` as
    the serial path, so the same bytes) and takes the CRC-32C of the result for verify. The
    main thread hands the buffers to the writer in order, so while it waits for pwrite (the
    disk's write-back) both cores keep casting; a buffer goes back to a free list once written.
    Up to CAST_AHEAD items are in flight: memory stays bounded by their size.
    """

    def __init__(self, plan: ConvertPlan, tensors: list[TensorInfo], srcs: dict[str, TensorInfo]):
        self.plan = plan
        self.todo: list[tuple[TensorInfo, TensorInfo, tuple[str, int, int]]] = []
        if _crc32c() is not None and stream.threads() > 1 and not is_remote(plan.src):
            for t in tensors:
                s = srcs[t.name]
                if t.alias_of is not None or s.dtype == t.dtype or not t.nbytes:
                    continue
                try:
                    rng = plan.reader.byte_range(s.name)
                except Exception:  # noqa: BLE001 - the serial path then
                    rng = None
                if rng is not None and rng[2] == s.nbytes:
                    self.todo.append((t, s, rng))
        self.covered = {id(t) for t, _s, _r in self.todo}
        self.fds: dict[str, int] = {}
        self.free: list[bytearray] = []
        self.ahead: Ahead | None = None

    def covers(self, t: TensorInfo) -> bool:
        return id(t) in self.covered

    def _items(self):
        """(t, s, file, offset, length, output buffer) per item, in the writer's order; runs in
        the main thread (it opens files and takes buffers)."""
        from ckptctl import dtypes

        for t, s, (file, off, length) in self.todo:
            if file not in self.fds:
                self.fds[file] = os.open(file, os.O_RDONLY)
            isz = dtypes.BY_NAME[s.dtype].itemsize
            osz = dtypes.BY_NAME[t.dtype].itemsize
            step = max(isz, CAST_ITEM - CAST_ITEM % isz)
            for lo in range(0, length, step):
                n = min(step, length - lo)
                need = n // isz * osz
                i = next((i for i, b in enumerate(self.free) if len(b) >= need), None)
                obuf = self.free.pop(i) if i is not None else bytearray(max(need, step // isz * osz))
                yield t, s, file, off + lo, n, obuf

    def _work(self, t: TensorInfo, s: TensorInfo, file: str, offset: int, length: int, obuf: bytearray):
        """One item, in a worker: (the cast bytes, their CRC-32C)."""
        import numpy as np

        v = FileView(self.fds[file], file, offset, length, s.name, 0)
        try:
            out = [obuf]
            got = None
            for c in cast_chunks([v.view], s.dtype, t.dtype, out):
                got = c  # one piece: the item holds whole elements
            a = np.frombuffer(got, dtype=np.uint8) if got is not None else np.empty(0, np.uint8)
            if a.size and np.shares_memory(a, np.frombuffer(v.view, dtype=np.uint8)):
                a = a.copy()  # (no cast: never here, but the mapping goes away below)
            return a, _crc32c()(a)
        finally:
            v.close()

    def chunks(self, t: TensorInfo, sink: list[tuple[int, int]]) -> Iterator:
        """Tensor t's cast bytes, item after item (t must be the next covered tensor); the
        (length, CRC-32C) of each goes to `sink`."""
        if self.ahead is None:
            self.ahead = Ahead(self._items(), self._work, max(stream.threads() + 1, CAST_AHEAD))
        head = self.ahead.peek()
        if head is None or head[0] is not t:
            raise RuntimeError(f"convert: tensor {t.name!r} asked for out of order")
        while True:
            head = self.ahead.peek()
            if head is None or head[0] is not t:
                return
            item, (a, crc) = self.ahead.pop()
            if a.size:
                sink.append((a.size, crc))
            yield a
            del a
            self.free.append(item[5])

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        fds, self.fds = list(self.fds.values()), {}
        cancel_and_close((), fds)


def _write_file(
    plan: ConvertPlan, f: OutputFile, path: Path, srcs: dict[str, TensorInfo], progress: Callable[[int], None] | None
) -> None:
    W = writer_class(plan.fmt)
    # every registered writer is a StreamingWriter (on_progress, durable, add_range)
    w = cast("StreamingWriter", W(path, f.tensors, f.metadata, dedupe_tied=plan.dedupe_tied))
    w.on_progress = progress
    w.durable = False  # Staged.start_sync fsyncs the staged files while verify reads them
    bufs: dict = {}  # reused by every cast in this file
    items = CastItems(plan, f.tensors, srcs)
    try:
        for t in f.tensors:
            if t.alias_of is not None:
                continue
            s = srcs[t.name]
            rng = plan.reader.byte_range(s.name) if s.dtype == t.dtype else None
            if rng is not None and hasattr(w, "add_range") and rng[2] == t.nbytes:
                w.add_range(t, rng[0], rng[1], rng[2])
            elif items.covers(t):
                sink: list[tuple[int, int]] = []
                plan.cast_crcs[t.name] = sink
                w.add(t, items.chunks(t, sink))
            elif (s.dtype != t.dtype or is_remote(plan.src)) and _crc32c() is not None:
                # a cast, or bytes that came over the network: verify checks the output on disk
                # against the checksums of what the writer was handed, instead of casting the
                # source again or downloading it a second time
                sink = []
                plan.cast_crcs[t.name] = sink
                w.add(t, _recording_crcs(_source_chunks(plan, s, t, bufs), sink))
            else:
                w.add(t, _source_chunks(plan, s, t, bufs))
        items.close()  # every item was written: nothing runs any more
        w.finish()
    except BaseException:
        items.close()  # (workers finish before the files close)
        w.abort()
        raise


@dataclass
class Staged:
    """The written output in a hidden folder beside DST, not yet at DST.

    Its files are fsynced by a background thread started with `start_sync` (the disk flushes
    while verify re-reads the same bytes from the page cache); `wait_synced` joins it, and
    commit_output does so before anything is renamed to DST."""

    tmp: Path  # the hidden folder
    out: Path | RemotePath  # what DST will be: tmp/<DST name> for one file, tmp itself for shards
    committed: bool = False
    _sync: threading.Thread | None = None
    _sync_error: OSError | None = None
    _lock_fd: int | None = None  # the folder, locked while this run may still use it
    remote_tmp: RemotePath | None = None  # remote DST: the uploaded output, hidden beside DST
    remote_prefix: bool = False  # remote_tmp is a prefix of objects (shards), not one object

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start_sync(self) -> None:
        def run() -> None:
            try:
                for p in sorted(self.tmp.iterdir()):
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(self.tmp)
            except OSError as e:
                self._sync_error = e

        self._sync = threading.Thread(target=run, name="ckptctl-fsync", daemon=True)
        self._sync.start()

    def wait_synced(self, dst: Path | RemotePath) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_error is not None:
            e = self._sync_error
            raise CkptError(f"cannot write the output: {e.strerror or e}; nothing was written", dst)

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()
        if self.remote_tmp is not None:  # committed or not: DST has its own copy by now
            from ckptctl.sources import remote_rm

            tmp, self.remote_tmp = self.remote_tmp, None
            remote_rm(tmp, recursive=self.remote_prefix)


def write_output(plan: ConvertPlan, progress: Callable[[int], None] | None = None) -> Staged:
    """Write every output file into a hidden folder beside DST; nothing is at DST yet."""
    srcs = {o.name: s for s, o in plan.selection.pairs}
    dst = plan.dst
    remote = is_remote(dst)
    if remote:
        from ckptctl.sources import clean_stale_remote

        clean_stale_remote(dst)
        clean_stale_temps(Path(staging_dir()) / dst.name)  # a killed run's local staging folder
    else:
        clean_stale_temps(dst)  # what a killed earlier run left
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_TAG}", dir=staging_dir() if remote else dst.parent))
    out = tmp if plan.sharded else tmp / dst.name
    staged = Staged(tmp, out)
    try:
        staged._lock_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        hold_lock(staged._lock_fd)
    except OSError:
        pass
    try:
        if not plan.sharded:
            _write_file(plan, plan.files[0], out, srcs, progress)
        else:
            for f in plan.files:
                _write_file(plan, f, tmp / f.path.name, srcs, progress)
            if plan.index_name:
                weight_map = {t.name: f.path.name for f in plan.files for t in f.tensors}
                index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
                data = (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")  # names checked
                with open(tmp / plan.index_name, "wb") as fh:
                    fh.write(data)
        if remote:
            _upload_staged(plan, staged)
        else:
            staged.start_sync()
        pause_point("staged")
        return staged
    except OSError as e:
        staged.discard()
        raise CkptError(f"cannot write the output: {e.strerror or e}; nothing was written", dst) from None
    except BaseException:
        staged.discard()
        raise


def _upload_staged(plan: ConvertPlan, staged: Staged) -> None:
    """Remote DST: upload the staged output to a hidden temporary beside DST (an object, or a
    prefix for shards), which verify then re-reads with ranged requests; the local copy goes."""
    from ckptctl.formats.writeutil import upload_temp

    src = staged.tmp if plan.sharded else staged.out
    staged.remote_prefix = plan.sharded
    staged.remote_tmp = upload_temp(src, plan.dst)
    staged.out = staged.remote_tmp
    shutil.rmtree(staged.tmp, ignore_errors=True)
    staged.release()


def _commit_remote(
    plan: ConvertPlan, staged: Staged, tmp: RemotePath, verified: tuple[int, int] | None
) -> ConvertResult:
    """Server-side copies from the uploaded temporary to DST (shards first, the index last, so a
    reader never finds an index naming a shard not yet there); the temporary is removed by discard."""
    from ckptctl.sources import remote_copy

    pause_point("swap-in")
    dst = plan.dst
    if plan.sharded:
        names = [f.path.name for f in plan.files] + ([plan.index_name] if plan.index_name else [])
        for name in names:
            remote_copy(tmp / name, dst / name)
        outputs = [dst / n for n in names]
    else:
        remote_copy(tmp, dst)
        outputs = [dst]
    staged.committed = True
    return _result(plan, dst, outputs, verified)


def commit_output(plan: ConvertPlan, staged: Staged, verified: tuple[int, int] | None = None) -> ConvertResult:
    """Move the staged output to DST (replacing what --force allowed to replace)."""
    if staged.remote_tmp is not None:
        return _commit_remote(plan, staged, staged.remote_tmp, verified)
    staged.wait_synced(plan.dst)  # on disk before it has DST's name
    pause_point("swap-in")
    dst = cast(Path, plan.dst)  # local: a remote DST was committed above
    if plan.sharded:
        os.chmod(staged.tmp, 0o777 & ~_umask())
        _swap_in(staged.tmp, dst)
        outputs = [dst / f.path.name for f in plan.files] + ([dst / plan.index_name] if plan.index_name else [])
    else:
        os.replace(staged.out, dst)
        fsync_dir(dst.parent)
        outputs = [dst]
    staged.committed = True
    if not plan.sharded:
        shutil.rmtree(staged.tmp, ignore_errors=True)
    staged.release()
    return _result(plan, dst, outputs, verified)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put folder `tmp` at `dst`; an existing dst (allowed by --force) is moved away first."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.ckptctl-old-", dir=dst.parent))
        os.rmdir(old)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _result(plan: ConvertPlan, dst, outputs: list, verified: tuple[int, int] | None) -> ConvertResult:
    """What a committed conversion reports: the files at DST, their sizes, what verify checked."""
    result = ConvertResult(
        dst=dst,
        fmt=plan.fmt,
        outputs=outputs,
        num_tensors=plan.num_tensors,
        bytes_written=sum(p.stat().st_size for p in outputs),
        verified=verified is not None,
    )
    if verified is not None:
        result.verified_tensors, result.verified_bytes = verified
    return result
