"""average, the arithmetic: every averaged tensor's bytes, streamed a chunk or an item at a time.

`MeanItems` serves the tensors that each input holds contiguously (item workers, ahead of the
writer across tensors); `mean_chunks` the others (a pipeline of reads and threaded blocks);
`Combiner` is the per-element arithmetic both use. See ops/average.py for the formulas.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.ops import stream
from ckptctl.ops.stream import (
    BLOCK,
    Ahead,
    Cursor,
    FileView,
    as_array,
    cancel_and_close,
    itemsize,
    numeric_kind,
)

if TYPE_CHECKING:
    from ckptctl.ops.average import AveragePlan, AvgTensor

CHUNK_ELEMS = 1 << 21  # elements per step (a float64 accumulator of 16 MiB)
READ_BUDGET = 64 * 1024 * 1024  # at most this many raw bytes per step
ITEM_BUDGET = 16 * 1024 * 1024  # raw bytes (all inputs together) one worker reads for one item
AHEAD_ITEMS = 8  # items combined ahead of the writer (each holds one output buffer)


def byte_ranges(plan: AveragePlan, t: AvgTensor) -> list[tuple[str, int, int]] | None:
    """(file, offset, length) of the tensor in every input, or None if one is not contiguous."""
    out = []
    for inp, s in zip(plan.inputs, t.srcs):
        try:
            r = inp.opened.byte_range(s.name)
        except Exception:  # noqa: BLE001 - the generic path then
            r = None
        if r is None or r[2] != s.nbytes:
            return None
        out.append(r)
    return out


class MeanItems:
    """The averaged bytes of every tensor that each input holds contiguously (safetensors, torch
    zip, contiguous HDF5), from item workers that run ahead of the writer across tensors.

    Each tensor's element range is cut into items; a worker maps its item in every input and
    combines it block by block into an output buffer (Combiner: the arithmetic of
    mean_chunks). Up to AHEAD_ITEMS items, of this tensor and the next ones, are combined while
    the main thread writes, so the writer's waits (write-back, fsync of a full queue) and the
    ends of small tensors leave no core idle. Output buffers go back to a free list once written.
    """

    def __init__(self, plan: AveragePlan, progress):
        self.plan = plan
        self.progress = progress
        self.rngs: dict[int, list[tuple[str, int, int]]] = {}
        for t in plan.tensors:
            if t.mode == "mean" and t.out.numel:
                r = byte_ranges(plan, t)
                if r is not None:
                    self.rngs[id(t)] = r
        self.fds: dict[str, int] = {}
        self.free: list[bytearray] = plan.free_list("outfree")
        self.ahead: Ahead | None = None

    def covers(self, t: AvgTensor) -> bool:
        return id(t) in self.rngs

    def _items(self):
        """(t, lo, hi, output buffer, combiner) for every item, in the order the writer takes the
        tensors; runs in the main thread (it opens files and takes buffers)."""
        for t in self.plan.tensors:
            rngs = self.rngs.get(id(t))
            if rngs is None:
                continue
            for f, _off, _len in rngs:
                if f not in self.fds:
                    self.fds[f] = os.open(f, os.O_RDONLY)
            isz = [itemsize(s.dtype) for s in t.srcs]
            numel = t.out.numel
            elems = max(BLOCK, min(CHUNK_ELEMS, ITEM_BUDGET // sum(isz)))
            elems -= elems % BLOCK
            elems = min(elems, numel)
            need = elems * dtypes.numpy_dtype(t.out.dtype).itemsize
            combine = Combiner(self.plan, t)
            for lo in range(0, numel, elems):
                i = next((i for i, b in enumerate(self.free) if len(b) >= need), None)
                obuf = self.free.pop(i) if i is not None else bytearray(need)  # by position: == compares bytes
                yield t, lo, min(numel, lo + elems), obuf, combine

    def _work(self, t: AvgTensor, lo: int, hi: int, obuf: bytearray, combine: Combiner) -> None:
        import numpy as np

        m = hi - lo
        views: list[FileView] = []
        try:
            for k, ((f, off, _len), s) in enumerate(zip(self.rngs[id(t)], t.srcs)):
                isz = itemsize(s.dtype)
                views.append(FileView(self.fds[f], f, off + lo * isz, m * isz, s.name, k))
            combine.run(
                [as_array(v.view, s.dtype) for v, s in zip(views, t.srcs)],
                np.frombuffer(obuf, dtype=dtypes.numpy_dtype(t.out.dtype), count=m),
                0,
                m,
            )
        finally:
            for v in views:
                v.close()

    def chunks(self, t: AvgTensor) -> Iterator[memoryview]:
        """Tensor t's averaged bytes, item after item (t must be the next covered tensor)."""
        if self.ahead is None:
            self.ahead = Ahead(self._items(), self._work, max(stream.threads() + 1, AHEAD_ITEMS))
        head = self.ahead.peek()
        if head is None or head[0] is not t:
            raise RuntimeError(f"average: tensor {t.out.name!r} asked for out of order")
        osz = dtypes.numpy_dtype(t.out.dtype).itemsize
        insz = sum(itemsize(s.dtype) for s in t.srcs)
        while True:
            head = self.ahead.peek()
            if head is None or head[0] is not t:
                return
            (_t, lo, hi, obuf, _c), _none = self.ahead.pop()
            if self.progress:
                self.progress((hi - lo) * insz)
            yield memoryview(obuf)[: (hi - lo) * osz]
            self.free.append(obuf)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, close the files."""
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        fds, self.fds = list(self.fds.values()), {}
        cancel_and_close((), fds)


def mean_chunks(plan: AveragePlan, t: AvgTensor, progress) -> Iterator[memoryview]:
    """The averaged tensor's bytes in the output dtype, one chunk at a time.

    Pipeline: the main thread reads chunk c+1 of every input (pread into the other of two
    buffer sets) while worker threads combine chunk c block by block (a block of every input
    at a time, so the accumulator stays in cache; each element's operations run in input
    order in one thread, so the result does not depend on the threads); the writer writes
    chunk c while chunk c+1 is being combined.
    """
    import numpy as np

    n = len(plan.inputs)
    numel = t.out.numel
    if numel == 0:
        return
    isz = max(itemsize(s.dtype) for s in t.srcs)
    elems = max(BLOCK, min(CHUNK_ELEMS, READ_BUDGET // (2 * n * isz)))
    elems -= elems % BLOCK
    elems = min(elems, numel)
    cursors = [Cursor(i.opened, s, elems * itemsize(s.dtype)) for i, s in zip(plan.inputs, t.srcs)]
    try:
        # buffers live as long as the plan: fresh ones would cost a page fault per 4 KiB per tensor
        bufsets = [
            [plan.buffer(("in", j, k), elems * itemsize(s.dtype)) for k, s in enumerate(t.srcs)] for j in range(2)
        ]
        out_np = dtypes.numpy_dtype(t.out.dtype)
        outs = [
            np.frombuffer(plan.buffer(("out", j), elems * out_np.itemsize), dtype=out_np, count=elems) for j in range(2)
        ]
        combine = Combiner(plan, t)
        threads = stream.threads()
        nchunks = -(-numel // elems)

        def read(c: int) -> list:
            xs = []
            for k, (cur, s) in enumerate(zip(cursors, t.srcs)):
                v = cur.read_into(bufsets[c % 2][k])
                if v is None:
                    raise CorruptFile(f"tensor {s.name!r}: data ends early", plan.inputs[k].path)
                xs.append(as_array(v, s.dtype))
                if progress:
                    progress(len(v))
            m = len(xs[0])
            if any(len(x) != m for x in xs):
                raise CorruptFile(f"tensor {t.out.name!r}: inputs hold different amounts of data")
            return xs

        def submit(xs: list, out) -> list:
            m = len(xs[0])
            per = -(-m // threads)
            per += -per % BLOCK
            return [stream.submit(combine.run, xs, out, lo, min(m, lo + per)) for lo in range(0, m, per)]

        xs = read(0)
        futs = submit(xs, outs[0])
        for c in range(nchunks):
            m = len(xs[0])
            nxt = read(c + 1) if c + 1 < nchunks else None  # overlaps the arithmetic of chunk c
            for f in futs:
                f.result()
            if nxt is not None:
                futs = submit(nxt, outs[(c + 1) % 2])
                xs = nxt  # (the last chunk's are not read again)
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it has the buffer protocol
            yield memoryview(outs[c % 2][:m].view(np.uint8))  # type: ignore[arg-type]
        for k, cur in enumerate(cursors):
            if cur.read_into(bufsets[0][k]) is not None:
                raise CorruptFile(f"tensor {t.srcs[k].name!r}: more data than its shape", plan.inputs[k].path)
    finally:
        for cur in cursors:
            cur.close()


class Combiner:
    """The per-element arithmetic of one tensor, on a block range of one chunk."""

    def __init__(self, plan: AveragePlan, t: AvgTensor):
        import numpy as np

        self.method = plan.method
        self.n = len(plan.inputs)
        complex_ = numeric_kind(t.out.dtype) == "complex"
        self.adt = np.dtype(np.complex128) if complex_ else np.dtype(plan.accumulate)
        self.complex = complex_
        at = self.adt.type
        self.ws = [at(w) for w in plan.raw_weights] if plan.raw_weights is not None else []  # weighted only
        self.total = at(math.fsum(plan.raw_weights)) if plan.raw_weights is not None else None
        self.keep = at(plan.decay) if plan.decay is not None else None
        self.take = at(1.0 - plan.decay) if plan.decay is not None else None
        self.count = at(self.n)
        self.out_dtype = t.out.dtype
        odt = dtypes.numpy_dtype(t.out.dtype)
        # the division can write the output itself when the cast after it is one plain rounding
        # (float64 -> float32, or none): cast_array does just that for these, other targets
        # (16- and 8-bit floats) round through float32 first, as torch does
        self.direct_out = not complex_ and odt in (np.dtype(np.float32), np.dtype(np.float64))
        # the first two inputs added in one call when converting them to the accumulator is exact
        # (float16/32 -> float64, float16 -> float32): the same sum as copy, then add
        src = dtypes.numpy_dtype(t.srcs[0].dtype) if t.srcs else None
        self.fuse_first = (
            not complex_
            and src is not None
            and src in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
            and np.can_cast(src, self.adt, "safe")
            and all(dtypes.numpy_dtype(x.dtype) == src for x in t.srcs)
        )

    def _bufs(self):
        """Two accumulator blocks for this thread, kept across tensors (no page faults per tensor)."""
        import numpy as np

        cache = getattr(_TLS, "blocks", None)
        if cache is None:
            cache = _TLS.blocks = {}
        b = cache.get((self.adt, BLOCK))
        if b is None:
            b = cache[(self.adt, BLOCK)] = (np.empty(BLOCK, self.adt), np.empty(BLOCK, self.adt))
        return b

    def run(self, xs: list, out, lo: int, hi: int) -> None:
        import numpy as np

        from ckptctl.ops.convert import cast_array

        A0, T0 = self._bufs()
        with np.errstate(all="ignore"):
            for b in range(lo, hi, BLOCK):
                e = min(hi, b + BLOCK)
                A, T = A0[: e - b], T0[: e - b]
                if self.method == "mean":
                    if self.fuse_first and len(xs) > 1:
                        np.add(xs[0][b:e], xs[1][b:e], out=A, dtype=self.adt)
                        rest = xs[2:]
                    else:
                        np.copyto(A, xs[0][b:e], casting="unsafe")
                        rest = xs[1:]
                    for x in rest:
                        np.add(A, x[b:e], out=A, casting="unsafe")
                    if self.direct_out:  # divide in the accumulator's dtype, rounded once into out
                        np.divide(A, self.count, out=out[b:e], casting="unsafe")
                        continue
                    A /= self.count
                elif self.method == "weighted":
                    np.multiply(xs[0][b:e], self.ws[0], out=A, casting="unsafe")
                    for x, w in zip(xs[1:], self.ws[1:]):
                        np.multiply(x[b:e], w, out=T, casting="unsafe")
                        A += T
                    assert self.total is not None  # weighted: raw_weights is set
                    if self.direct_out:
                        np.divide(A, self.total, out=out[b:e], casting="unsafe")
                        continue
                    A /= self.total
                else:  # ema, oldest first
                    assert self.keep is not None and self.take is not None  # set from --ema's decay
                    np.copyto(A, xs[0][b:e], casting="unsafe")
                    for x in xs[1:]:
                        A *= self.keep
                        np.multiply(x[b:e], self.take, out=T, casting="unsafe")
                        A += T
                if self.complex:
                    out[b:e] = A
                else:
                    out[b:e] = cast_array(A, self.out_dtype)


_TLS = threading.local()
