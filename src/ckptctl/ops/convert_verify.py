"""convert's verify: re-read the written output with ckptctl's readers and compare names, dtypes,
shapes and every byte with the source (mmap + memcmp, pieces on worker threads, CRC-32Cs of casts)."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl.errors import CkptError, CorruptFile
from ckptctl.formats import open_reader
from ckptctl.formats.base import Reader
from ckptctl.model import TensorInfo
from ckptctl.ops import stream
from ckptctl.ops.convert_write import CHUNK, _crc32c, _source_chunks
from ckptctl.ops.stream import MAP_WINDOW, compare_mapped, first_difference, pread_into, read_range, tls_buffer
from ckptctl.sources import is_remote

same_bytes = first_difference  # its old name here (convert re-exports it)
__all__ = [
    "MAP_WINDOW",
    "VERIFY_BUF",
    "VERIFY_PIECE",
    "VERIFY_WORKERS",
    "compare_mapped",
    "same_bytes",
    "verify_output",
]

if TYPE_CHECKING:
    from ckptctl.ops.convert import ConvertPlan
    from ckptctl.sources import RemotePath

# ---- verifying --------------------------------------------------------------------------------
VERIFY_WORKERS = stream.threads()  # the shared worker pool's size: pieces go there when > 1
VERIFY_PIECE = 64 * 1024 * 1024  # bytes per parallel verify task
VERIFY_BUF = 8 * 1024 * 1024  # a verify worker's read buffer (and its mmap window)


def _compare_piece(got: tuple[str, int, int], src: tuple[str, int, int]) -> int | None:
    """compare_mapped of an output range against a source range (a verify worker's task)."""
    buf = tls_buffer(0, VERIFY_BUF)
    try:
        return compare_mapped(got, read_range(src[0], src[1], src[2], buf), VERIFY_BUF)
    except (OSError, ValueError):  # a file system that cannot map: read both
        return first_difference(read_range(*got, tls_buffer(1, VERIFY_BUF)), read_range(*src, buf))


def _crc_piece(file: str, offset: int, crcs: list[tuple[int, int]]) -> bool:
    """True when the file's bytes from `offset`, cut in the recorded pieces, have the recorded
    CRC-32Cs (a verify worker's task: the output is mapped, not copied)."""
    import numpy as np

    crc = _crc32c()
    fd = os.open(file, os.O_RDONLY)
    try:
        pos = offset
        for n, want in crcs:  # one piece mapped at a time (a few MB): RSS stays flat
            try:
                v = stream.FileView(fd, file, pos, n, "", 0)
            except CorruptFile:  # the file ends early
                return False
            try:
                if crc(np.frombuffer(v.view, dtype=np.uint8)) != want:
                    return False
            finally:
                v.close()  # (the array went with the call above)
            pos += n
        return True
    finally:
        os.close(fd)


def _crc_batches(crcs: list[tuple[int, int]], size: int):
    """(start, pieces) of consecutive recorded pieces, about `size` bytes each."""
    start = pos = 0
    batch: list[tuple[int, int]] = []
    for n, c in crcs:
        if batch and pos + n - start > size:
            yield start, batch
            start, batch = pos, []
        batch.append((n, c))
        pos += n
    if batch:
        yield start, batch


def _compare_tensor(
    plan: ConvertPlan,
    reader: Reader,
    name: str,
    s: TensorInfo,
    e: TensorInfo,
    out_rng: tuple[str, int, int] | None,
    bufs: tuple[bytearray, bytearray],
    use_crcs: bool = True,
) -> int | None:
    """None when output tensor `name` holds the bytes expected from source tensor `s`."""
    crcs = plan.cast_crcs.get(name) if use_crcs else None
    if (
        crcs is not None
        and out_rng is not None
        and out_rng[2] == e.nbytes
        and sum(n for n, _c in crcs) == e.nbytes
        and _crcs_match(out_rng, crcs, bufs[0])
    ):
        return None
    # no checksums, or they do not match: compare with the source (cast again) for the offset
    want = _expected_chunks(plan, s, e, bufs[1])
    if out_rng is not None and out_rng[2] == e.nbytes:
        try:
            return compare_mapped(out_rng, want, VERIFY_BUF)
        except (OSError, ValueError):  # a file system that cannot map: read it instead
            want = _expected_chunks(plan, s, e, bufs[1])
    return first_difference(_range_or_chunks(reader, name, bufs[0]), want)


def _crcs_match(rng: tuple[str, int, int], crcs: list[tuple[int, int]], buf: bytearray) -> bool:
    """True when the file range, cut in the recorded pieces, has the recorded CRC-32Cs."""
    import numpy as np

    crc = _crc32c()
    fd = os.open(rng[0], os.O_RDONLY)
    try:
        pos = rng[1]
        for n, want in crcs:
            if len(buf) < n:
                buf = bytearray(n)
            try:
                pread_into(fd, memoryview(buf)[:n], pos, rng[0], None)
            except CorruptFile:  # the file ends early
                return False
            if crc(np.frombuffer(buf, dtype=np.uint8, count=n)) != want:
                return False
            pos += n
        return True
    finally:
        os.close(fd)


def _range_or_chunks(reader: Reader, name: str, buf: bytearray) -> Iterable:
    rng = reader.byte_range(name)
    if rng is not None:
        return read_range(rng[0], rng[1], rng[2], buf)
    return reader.iter_chunks(name, CHUNK)


def _expected_chunks(plan: ConvertPlan, src: TensorInfo, out: TensorInfo, buf: bytearray) -> Iterable:
    if out.dtype == src.dtype:
        return _range_or_chunks(plan.reader, src.name, buf)
    return _source_chunks(plan, src, out)


def _in_data_order(items: list, locs: dict) -> list:
    """items (name, info) sorted by where each tensor's bytes lie (shard, offset) when the reader
    knows it (safetensors, HDF5, shards of them); others keep their place."""

    def key(i_item):
        i, (name, _e) = i_item
        loc = locs.get(name)
        shard = ""
        if isinstance(loc, tuple) and len(loc) == 2:
            shard, loc = str(loc[0]), loc[1]
        off = getattr(loc, "offset", None)
        return (shard, off if isinstance(off, int) else i, i)

    return [it for _i, it in sorted(enumerate(items), key=key)]


def verify_output(
    plan: ConvertPlan, at: Path | RemotePath | None = None, progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Re-read the output (at `at`, default DST) with ckptctl's readers and compare names, dtypes,
    shapes and every byte with the source (cast again when --dtype was given)."""
    where = plan.dst
    at = at or plan.dst
    srcs = {o.name: s for s, o in plan.selection.pairs}
    expected = {t.name: t for f in plan.files for t in f.tensors}
    try:
        reader = open_reader(at)
    except CkptError as err:
        raise CorruptFile(f"verify: cannot read the output back ({err.message})", where) from None
    with reader:
        got = {t.name: t for t in reader.info().tensors}
        missing = [n for n in expected if n not in got]
        extra = [n for n in got if n not in expected]
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise CorruptFile(f"verify failed: output has {len(got)} tensors, expected {len(expected)} ({what})", where)
        for name, e in expected.items():  # the structure first, in one pass
            g = got[name]
            if g.dtype != e.dtype or tuple(g.shape) != tuple(e.shape):
                raise CorruptFile(
                    f"verify failed: tensor {name!r} is {g.dtype}{list(g.shape)}, expected {e.dtype}{list(e.shape)}",
                    where,
                )
        n = nbytes = 0
        bufs: tuple[bytearray, bytearray] | None = None  # reused for every tensor compared on this thread
        # (name, bytes, a Future or the result: None or the offset of the first difference, piece
        # start, what compares the whole tensor when a CRC batch does not match: its task says False)
        pending: collections.deque = collections.deque()
        recompared: dict[str, int | None] = {}

        def settle(block: bool) -> None:
            nonlocal nbytes
            while pending and (block or not isinstance(pending[0][2], Future) or pending[0][2].done()):
                name, size, res, base, whole = pending.popleft()
                diff = res.result() if isinstance(res, Future) else res
                if diff is False:  # a CRC batch: the bytes on disk are not those written
                    if name not in recompared:
                        recompared[name] = whole()
                    diff, base = recompared[name], 0
                elif diff is True:
                    diff = None
                if diff is not None:
                    raise CorruptFile(
                        f"verify failed: tensor {name!r} differs from the source at byte {base + diff}", where
                    )
                nbytes += size
                if progress:
                    progress(size)

        order = list(expected.items())
        if is_remote(at):  # read the remote output front to back: its read-ahead then coalesces
            order = _in_data_order(order, {k: got[k].loc for k in expected})
        elif is_remote(plan.src):
            order = _in_data_order(order, {k: srcs[k].loc for k in expected})
        try:
            for name, e in order:
                g = got[name]
                if g.alias_of is not None and e.alias_of is not None:
                    n += 1
                    continue  # the same bytes as its target, which is compared
                s = srcs[name]
                n += 1
                out_rng = reader.byte_range(name)
                src_rng = plan.reader.byte_range(s.name) if s.dtype == e.dtype else None
                if (
                    out_rng is not None
                    and src_rng is not None
                    and out_rng[2] == src_rng[2] == e.nbytes
                    and VERIFY_WORKERS > 1
                    and e.nbytes >= VERIFY_PIECE // 4
                ):
                    # plain bytes on both sides: pieces compared on every core (preadv, mmap and
                    # memcmp release the GIL), results taken in order so the first difference is reported
                    for k in range(0, e.nbytes, VERIFY_PIECE):
                        m = min(VERIFY_PIECE, e.nbytes - k)
                        fut = stream.submit(
                            _compare_piece, (out_rng[0], out_rng[1] + k, m), (src_rng[0], src_rng[1] + k, m)
                        )
                        pending.append((name, m, fut, k, None))
                    settle(False)
                    continue
                if bufs is None:
                    bufs = (tls_buffer(0, VERIFY_BUF), tls_buffer(1, VERIFY_BUF))  # small: RSS stays flat
                crcs = plan.cast_crcs.get(name)
                if (
                    crcs is not None
                    and out_rng is not None
                    and out_rng[2] == e.nbytes
                    and VERIFY_WORKERS > 1
                    and sum(n for n, _c in crcs) == e.nbytes
                ):
                    # checksums of what was written (a cast): batches checked on every core, the
                    # output mapped; a batch that does not match compares the tensor with the source

                    def whole(name=name, s=s, e=e, out_rng=out_rng, bufs=bufs):
                        return _compare_tensor(plan, reader, name, s, e, out_rng, bufs, use_crcs=False)

                    for k, batch in _crc_batches(crcs, VERIFY_PIECE):
                        fut = stream.submit(_crc_piece, out_rng[0], out_rng[1] + k, batch)
                        pending.append((name, sum(n for n, _c in batch), fut, k, whole))
                    settle(False)
                    continue
                pending.append((name, e.nbytes, _compare_tensor(plan, reader, name, s, e, out_rng, bufs), 0, None))
                settle(False)
            settle(True)
        finally:  # leaving early: pieces not started are cancelled, running ones waited for
            stream.cancel_and_close([p[2] for p in pending if isinstance(p[2], Future)], ())
    return n, nbytes
