"""diff, one tensor pair: stream both tensors' bytes and reduce them into statistics.

`Comparer.compare` reads the two tensors in lockstep (ops/stream.py) and returns an accumulator
(`Acc`); `TensorDiff.from_acc` (ops/diff_result.py) turns it into the per-tensor result.
Identical bytes are identical without any arithmetic (the fast path); the arithmetic runs only
on chunks whose bytes differ.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptctl.errors import CorruptFile
from ckptctl.model import TensorInfo
from ckptctl.ops.stream import (
    BLOCK,
    Ahead,
    ChunkSource,
    FileView,
    Progress,
    as_array,
    cancel_and_close,
    contiguous_range,
    dot,
    itemsize,
    lockstep,
    numeric_kind,
    same_bytes,
    uint_view,
)

if TYPE_CHECKING:
    import numpy as np

    from ckptctl.formats.base import Reader


def _tol(atol: float | None, rtol: float | None) -> tuple[bool, float, float]:
    """(is set, atol, rtol) as the Comparer holds a tolerance."""
    return (atol is not None or rtol is not None, float(atol or 0.0), float(rtol or 0.0))


READ_BYTES = 16 * 1024 * 1024  # bytes read from a file per call, per side
ITEM_BYTES = 16 * 1024 * 1024  # both sides together, per work item of the parallel compare
_TLS = threading.local()


# ---- per-tensor statistics -----------------------------------------------------------------------
@dataclass
class Acc:
    numel: int = 0
    n_diff: int = 0
    n_finite: int = 0  # element pairs where both sides are finite (the statistics' population)
    max_abs: float = 0.0
    sum_abs: float = 0.0
    ssq_d: float = 0.0
    ssq_a: float = 0.0
    ssq_b: float = 0.0
    dot_ab: float = 0.0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    arith: bool = False  # any arithmetic done (False: every chunk was byte-identical)


def _merge(acc: Acc, part: Acc) -> None:
    acc.arith = acc.arith or part.arith
    acc.n_diff += part.n_diff
    acc.n_finite += part.n_finite
    acc.max_abs = max(acc.max_abs, part.max_abs)
    acc.sum_abs += part.sum_abs
    acc.ssq_d += part.ssq_d
    acc.ssq_a += part.ssq_a
    acc.ssq_b += part.ssq_b
    acc.dot_ab += part.dot_ab
    acc.nan_a += part.nan_a
    acc.nan_b += part.nan_b
    acc.inf_a += part.inf_a
    acc.inf_b += part.inf_b


class _Buffers:
    """float64 work buffers reused across blocks (no allocation in the hot loop)."""

    def __init__(self, n: int = BLOCK):
        import numpy as np

        self.X = np.empty(n)
        self.Y = np.empty(n)
        self.D = np.empty(n)
        self.T = np.empty(n)
        self.B = np.empty(n, dtype=bool)
        self.C = np.empty(n, dtype=bool)


class Comparer:
    """Compare tensor values in float64 accumulators.

    Equality: bit-exact when atol and rtol are None (same dtype: the bits; different dtypes:
    the values, NaN equal to NaN); otherwise |a - b| <= atol + rtol * |b| for floating tensors.
    Integer and bool tensors are always compared exactly.
    """

    def __init__(self, atol: float | None = None, rtol: float | None = None, threads: int | None = None):
        self.tol = atol is not None or rtol is not None
        self.atol = float(atol or 0.0)
        self.rtol = float(rtol or 0.0)
        self.threads = max(1, threads if threads is not None else min(2, os.cpu_count() or 1))
        self._pool = None
        # read buffers, kept for every tensor: a fresh 16 MiB buffer per tensor costs 4096 page
        # faults, which on a VM took longer than the arithmetic. ChunkSource grows them in place.
        self._rbufs_a: list[bytearray] = [bytearray(0), bytearray(0)]  # two: chunk k+1 read during k
        self._rbufs_b: list[bytearray] = [bytearray(0), bytearray(0)]
        self._rbuf1_a: list[bytearray] = [bytearray(0)]  # one: no overlap
        self._rbuf1_b: list[bytearray] = [bytearray(0)]
        self._rbuf_prefix: list[bytearray] = [bytearray(0)]  # re-reading an identical prefix
        self._ahead: Ahead | None = None  # items of the pairs announced by start()
        self._planned: dict[tuple[int, int], int] = {}  # (id(ta), id(tb)) -> its number in that plan
        self._fds: dict[str, int] = {}  # files the item workers read, open until close()

    @property
    def bufs(self) -> _Buffers:
        """float64 work buffers of the calling thread, kept for the life of the thread."""
        b = getattr(_TLS, "bufs", None)
        if b is None or len(b.X) != BLOCK:
            b = _TLS.bufs = _Buffers()
        return b

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        fds, self._fds = list(self._fds.values()), {}
        cancel_and_close((), fds)

    def set_tolerance(self, atol: float | None, rtol: float | None) -> None:
        """Change the tolerance between two `compare` calls (each one finishes its work first)."""
        self.tol = atol is not None or rtol is not None
        self.atol = float(atol or 0.0)
        self.rtol = float(rtol or 0.0)

    def _submit(self, fn, *args):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckptctl-diff")
        return self._pool.submit(fn, *args)

    def _values_async(self, x, y, ka: str, kb: str, same: bool) -> list:
        """Split one chunk into `threads` parts (whole blocks) and start their arithmetic."""
        n = len(x)
        per = -(-n // self.threads)
        per += -per % BLOCK
        futs = []
        for lo in range(0, n, per):
            futs.append(self._submit(self._values_part, x[lo : lo + per], y[lo : lo + per], ka, kb, same))
        return futs

    def _values_part(self, x, y, ka: str, kb: str, same: bool) -> Acc:
        part = Acc()
        self._values(part, x, y, ka, kb, same)
        return part

    # -- one tensor pair ---------------------------------------------------------------------------
    def compare(self, ra: Reader, ta: TensorInfo, rb: Reader, tb: TensorInfo, progress: Progress = None) -> Acc:
        """Stream both tensors (same numel) and return the filled accumulator.

        While the arithmetic of chunk k runs in worker threads (numpy releases the GIL), the
        main thread reads chunk k+1 into the other of two buffers per side.
        """
        ka, kb = numeric_kind(ta.dtype), numeric_kind(tb.dtype)
        acc = Acc(numel=ta.numel)
        same = ta.dtype == tb.dtype
        if "bytes" in (ka, kb) and not same:
            raise ValueError("cannot compare values of these dtypes")
        elems = max(1, READ_BYTES // max(itemsize(ta.dtype), itemsize(tb.dtype)))
        elems -= elems % BLOCK if elems > BLOCK else 0
        if ka == "bytes":  # same dtype: bytes only
            src_a = ChunkSource(ra, ta, READ_BYTES, bufs=self._rbuf1_a)
            src_b = ChunkSource(rb, tb, READ_BYTES, bufs=self._rbuf1_b)
            for ca, cb in lockstep(src_a, src_b, ta, tb):
                if not same_bytes(ca, cb):
                    ba, bb = memoryview(ca).cast("B"), memoryview(cb).cast("B")
                    import numpy as np

                    acc.n_diff += int(np.count_nonzero(np.frombuffer(ba, np.uint8) != np.frombuffer(bb, np.uint8)))
                if progress:
                    progress(len(ca) + len(cb))
            return acc
        threaded = self.threads > 1 and "complex" not in (ka, kb) and ta.numel > 2 * BLOCK
        if threaded and self._compare_parallel(ra, ta, rb, tb, acc, progress) is not None:
            return acc
        nb = 2 if threaded else 1
        bufs_a, bufs_b = (self._rbufs_a, self._rbufs_b) if threaded else (self._rbuf1_a, self._rbuf1_b)
        src_a = ChunkSource(ra, ta, elems * itemsize(ta.dtype), bufs=bufs_a)
        src_b = ChunkSource(rb, tb, elems * itemsize(tb.dtype), bufs=bufs_b)
        fast = same  # identical bytes are identical values: skip the arithmetic
        differs = False
        eq_prefix = 0  # elements of byte-identical chunks before the first difference
        inflight: list[list] = []  # futures per chunk, oldest first

        def drain(keep: int) -> None:
            while len(inflight) > keep:
                for f in inflight.pop(0):
                    _merge(acc, f.result())

        ia, ib = iter(src_a), iter(src_b)
        try:
            while True:
                drain(nb - 1)  # the buffer the next read fills is no longer in use
                ca, cb = next(ia, None), next(ib, None)
                if ca is None or cb is None:
                    if ca is not None or cb is not None:
                        raise CorruptFile(f"tensor {ta.name!r}: the two sides hold different amounts of data")
                    break
                x, y = as_array(ca, ta.dtype), as_array(cb, tb.dtype)
                if fast and same_bytes(ca, cb):
                    if differs:
                        drain(0)
                        self._self_stats(acc, x)
                    else:
                        eq_prefix += len(x)
                else:
                    if not differs and eq_prefix:
                        self._prefix_stats(acc, ra, ta, eq_prefix)
                    differs = True
                    if threaded:
                        inflight.append(self._values_async(x, y, ka, kb, same))
                    else:
                        self._values(acc, x, y, ka, kb, same)
                if progress:
                    progress(len(ca) + len(cb))
            drain(0)
        finally:
            for futs in inflight:  # an error: let running work finish before buffers go away
                for f in futs:
                    f.cancel()
                    try:
                        f.result()
                    except Exception:  # noqa: BLE001
                        pass
        return acc

    # -- item workers: contiguous tensors cut into items, read and compared ahead -----------------
    def start(self, ra: Reader, rb: Reader, pairs: list[tuple[TensorInfo, TensorInfo, tuple]]) -> None:
        """Announce the pairs `compare` will be called with, in that order, each with the
        (atol, rtol) it will be compared with. Those that go to item workers (both contiguous in
        files, real or integer values, more than two blocks) are then read and compared up to a
        few items ahead, across tensor boundaries: with many small tensors both cores stay busy
        instead of idling at the end of each one. Results are exactly those of compare alone."""
        plan: list[tuple] = []
        for ta, tb, tol in pairs:
            rngs = self._item_ranges(ra, ta, rb, tb)
            if rngs is not None:
                self._planned[(id(ta), id(tb))] = len(plan)
                plan.append((len(plan), ta, tb, *rngs, _tol(*tol)))
        if plan:
            self._ahead = Ahead(self._items(plan), self._item, self.threads + 2, self._submit)

    def _item_ranges(self, ra: Reader, ta: TensorInfo, rb: Reader, tb: TensorInfo):
        kinds = (numeric_kind(ta.dtype), numeric_kind(tb.dtype))
        if self.threads < 2 or "complex" in kinds or "bytes" in kinds or ta.numel <= 2 * BLOCK:
            return None
        rng_a, rng_b = contiguous_range(ra, ta), contiguous_range(rb, tb)
        return None if rng_a is None or rng_b is None else (rng_a, rng_b)

    def _items(self, plan):
        """(k, ta, tb, rng_a, rng_b, tol, lo, hi) for every item of every planned pair; opens
        the files (in the consumer's thread) as they are reached."""
        for k, ta, tb, rng_a, rng_b, tol in plan:
            for f in (rng_a[0], rng_b[0]):
                if f not in self._fds:
                    self._fds[f] = os.open(f, os.O_RDONLY)
            isa, isb = itemsize(ta.dtype), itemsize(tb.dtype)
            elems = max(BLOCK, min(1 << 21, ITEM_BYTES // (isa + isb)))
            elems -= elems % BLOCK
            for lo in range(0, ta.numel, elems):
                yield k, ta, tb, rng_a, rng_b, tol, lo, min(ta.numel, lo + elems)

    def _view(self, slot: int, rng, t: TensorInfo, lo: int, hi: int) -> FileView:
        isz = itemsize(t.dtype)
        return FileView(self._fds[rng[0]], rng[0], rng[1] + lo * isz, (hi - lo) * isz, t.name, slot)

    def _item(self, _k, ta: TensorInfo, tb: TensorInfo, rng_a, rng_b, tol, lo: int, hi: int) -> Acc | None:
        """One item, in a worker: None when its bytes are identical (no arithmetic), else its Acc."""
        same = ta.dtype == tb.dtype
        fa = self._view(0, rng_a, ta, lo, hi)
        try:
            fb = self._view(1, rng_b, tb, lo, hi)
            try:
                if same and same_bytes(fa.view, fb.view):
                    return None
                part = Acc()
                self._values(
                    part,
                    as_array(fa.view, ta.dtype),
                    as_array(fb.view, tb.dtype),
                    numeric_kind(ta.dtype),
                    numeric_kind(tb.dtype),
                    same,
                    tol,
                )
                return part
            finally:
                fb.close()
        finally:
            fa.close()

    def _self_item(self, ta: TensorInfo, rng_a, lo: int, hi: int) -> Acc:
        part = Acc()
        fa = self._view(0, rng_a, ta, lo, hi)
        try:
            self._self_stats(part, as_array(fa.view, ta.dtype))
        finally:
            fa.close()
        return part

    def _compare_items(self, ahead: Ahead, k: int, acc: Acc, progress: Progress) -> Acc:
        """Merge the items of planned pair `k` in item order. Byte-identical items need no
        arithmetic unless another item differs; then their |a|^2 (= |b|^2 = a.b) is computed
        afterwards, from side A."""
        same_ranges: list[tuple[int, int]] = []
        ta = rng_a = None
        while True:
            head = ahead.peek()
            if head is None or head[0] > k:
                break
            (kk, ta, tb, rng_a, _rb, _tol, lo, hi), part = ahead.pop()
            if kk < k:
                continue  # a planned pair the caller did not compare after all
            if part is None:
                same_ranges.append((lo, hi))
            else:
                _merge(acc, part)
            if progress:
                progress((hi - lo) * (itemsize(ta.dtype) + itemsize(tb.dtype)))
        if acc.arith and same_ranges:
            futs = [self._submit(self._self_item, ta, rng_a, lo, hi) for lo, hi in same_ranges]
            try:
                for f in futs:
                    _merge(acc, f.result())
            finally:
                cancel_and_close(futs, ())
        return acc

    def _compare_parallel(
        self, ra: Reader, ta: TensorInfo, rb: Reader, tb: TensorInfo, acc: Acc, progress: Progress
    ) -> Acc | None:
        """compare() of a pair for the item workers: its planned items, or items of its own;
        None when the pair cannot go to item workers."""
        k = self._planned.pop((id(ta), id(tb)), None)
        if k is not None and self._ahead is not None:
            return self._compare_items(self._ahead, k, acc, progress)
        rngs = self._item_ranges(ra, ta, rb, tb)
        if rngs is None:
            return None
        own = (0, ta, tb, *rngs, (self.tol, self.atol, self.rtol))
        ahead = Ahead(self._items([own]), self._item, self.threads + 1, self._submit)
        try:
            return self._compare_items(ahead, 0, acc, progress)
        finally:
            ahead.close()

    def _prefix_stats(self, acc: Acc, ra: Reader, ta: TensorInfo, n: int) -> None:
        """Statistics of the byte-identical leading elements, read again from side A only."""
        done = 0
        for chunk in ChunkSource(ra, ta, READ_BYTES - READ_BYTES % itemsize(ta.dtype), bufs=self._rbuf_prefix):
            x = as_array(chunk, ta.dtype)
            take = min(len(x), n - done)
            self._self_stats(acc, x[:take])
            done += take
            if done >= n:
                break

    def _self_stats(self, acc: Acc, x: np.ndarray) -> None:
        """Accumulate a chunk that is the same on both sides (d = 0)."""
        import numpy as np

        b = self.bufs
        acc.arith = True
        for i in range(0, len(x), BLOCK):
            xs = x[i : i + BLOCK]
            k = len(xs)
            X: np.ndarray
            if np.iscomplexobj(xs):
                X = xs.astype(np.complex128)
                fin = np.isfinite(X)
                nan = int(np.count_nonzero(np.isnan(X)))
                X = X[fin]
                s = dot(X, X)
            else:
                X = b.X[:k]
                np.copyto(X, xs, casting="unsafe")
                s = dot(X, X)
                nan = 0
                fin = None
                if not math.isfinite(s):
                    fin = np.isfinite(X)
                    nan = int(np.count_nonzero(np.isnan(X)))
                    Xf = X[fin]
                    s = dot(Xf, Xf)
            nf = k if fin is None else int(np.count_nonzero(fin))
            inf = k - nf - nan
            acc.n_finite += nf
            acc.ssq_a += s
            acc.ssq_b += s
            acc.dot_ab += s
            acc.nan_a += nan
            acc.nan_b += nan
            acc.inf_a += inf
            acc.inf_b += inf

    def _values(
        self,
        acc: Acc,
        x: np.ndarray,
        y: np.ndarray,
        ka: str,
        kb: str,
        same: bool,
        tol: tuple[bool, float, float] | None = None,
    ) -> None:
        """Accumulate a chunk pair; `tol` (is_set, atol, rtol) overrides the Comparer's tolerance
        (item workers run ahead, while the Comparer is set for an earlier tensor)."""
        import numpy as np

        tol_set, atol, rtol = tol if tol is not None else (self.tol, self.atol, self.rtol)
        acc.arith = True
        if "complex" in (ka, kb):
            self._complex(acc, x, y, same)
            return
        exact_ints = ka in ("int", "bool") and kb in ("int", "bool")
        bits = same and (exact_ints or not tol_set)  # differing elements = differing bits
        b = self.bufs
        with np.errstate(all="ignore"):
            for i in range(0, len(x), BLOCK):
                xs, ys = x[i : i + BLOCK], y[i : i + BLOCK]
                k = len(xs)
                X, Y, D, B = b.X[:k], b.Y[:k], b.D[:k], b.B[:k]
                np.copyto(X, xs, casting="unsafe")
                np.copyto(Y, ys, casting="unsafe")  # (a mixed-dtype subtract would skip this, but is slower)
                np.subtract(X, Y, out=D)
                sa, dd = dot(X, X), dot(D, D)
                finite = math.isfinite(sa) and math.isfinite(dd)
                # -- how many elements differ
                if bits:
                    np.not_equal(uint_view(xs), uint_view(ys), out=B)
                    n_diff = int(np.count_nonzero(B))
                elif exact_ints:
                    np.not_equal(xs, ys, out=B)
                    n_diff = int(np.count_nonzero(B))
                elif not tol_set:
                    np.not_equal(X, Y, out=B)
                    if not finite:
                        B &= ~(np.isnan(X) & np.isnan(Y))
                    n_diff = int(np.count_nonzero(B))
                else:
                    T, C = b.T[:k], b.C[:k]
                    np.abs(Y, out=T)
                    T *= rtol
                    T += atol
                    np.abs(D, out=D)
                    np.less_equal(D, T, out=B)
                    if not finite:
                        B &= np.isfinite(X) & np.isfinite(Y)  # inf <= atol + rtol * inf: not close
                        np.equal(X, Y, out=C)
                        B |= C
                        B |= np.isnan(X) & np.isnan(Y)
                    np.subtract(X, Y, out=D)
                    n_diff = k - int(np.count_nonzero(B))
                acc.n_diff += n_diff
                # -- statistics over the pairs where both sides are finite
                if finite:
                    xd = dot(X, D)
                    if dd <= 0.25 * sa and math.isfinite(xd):
                        # b = a - d: |b|^2 and a.b follow from |a|^2, a.d and |d|^2 with a relative error
                        # of a few ulps while |d| <= |a|/2 (no cancellation); saves a dot
                        sb, ab = max(0.0, sa - 2.0 * xd + dd), sa - xd
                    else:
                        sb, ab = dot(Y, Y), dot(X, Y)
                    Df, nf = D, k
                else:
                    nan_x, nan_y = np.isnan(X), np.isnan(Y)
                    fx, fy = np.isfinite(X), np.isfinite(Y)
                    acc.nan_a += int(np.count_nonzero(nan_x))
                    acc.nan_b += int(np.count_nonzero(nan_y))
                    acc.inf_a += k - int(np.count_nonzero(fx)) - int(np.count_nonzero(nan_x))
                    acc.inf_b += k - int(np.count_nonzero(fy)) - int(np.count_nonzero(nan_y))
                    both = fx & fy
                    Xf, Yf = X[both], Y[both]
                    Df = Xf - Yf
                    nf = len(Xf)
                    sa, sb, ab, dd = dot(Xf, Xf), dot(Yf, Yf), dot(Xf, Yf), dot(Df, Df)
                acc.n_finite += nf
                if nf:
                    acc.ssq_d += dd
                    acc.ssq_a += sa
                    acc.ssq_b += sb
                    acc.dot_ab += ab
                    np.abs(Df, out=Df)
                    acc.max_abs = max(acc.max_abs, float(Df.max()))
                    acc.sum_abs += float(Df.sum())

    def _complex(self, acc: Acc, x: np.ndarray, y: np.ndarray, same: bool) -> None:
        import numpy as np

        with np.errstate(all="ignore"):
            for i in range(0, len(x), BLOCK):
                xs, ys = x[i : i + BLOCK], y[i : i + BLOCK]
                X, Y = xs.astype(np.complex128), ys.astype(np.complex128)
                D = X - Y
                nan_x, nan_y = np.isnan(X), np.isnan(Y)
                if same and not self.tol:
                    raw_x = np.frombuffer(xs.tobytes(), np.uint8).reshape(len(xs), -1)
                    raw_y = np.frombuffer(ys.tobytes(), np.uint8).reshape(len(ys), -1)
                    neq = (raw_x != raw_y).any(axis=1)
                elif not self.tol:
                    neq = (X != Y) & ~(nan_x & nan_y)
                else:
                    close = (
                        ((np.abs(D) <= self.atol + self.rtol * np.abs(Y)) & np.isfinite(X) & np.isfinite(Y))
                        | (X == Y)
                        | (nan_x & nan_y)
                    )
                    neq = ~close
                acc.n_diff += int(np.count_nonzero(neq))
                fx, fy = np.isfinite(X), np.isfinite(Y)
                acc.nan_a += int(np.count_nonzero(nan_x))
                acc.nan_b += int(np.count_nonzero(nan_y))
                acc.inf_a += len(X) - int(np.count_nonzero(fx)) - int(np.count_nonzero(nan_x))
                acc.inf_b += len(Y) - int(np.count_nonzero(fy)) - int(np.count_nonzero(nan_y))
                both = fx & fy
                Xf, Yf, Df = X[both], Y[both], D[both]
                acc.n_finite += len(Xf)
                if len(Xf):
                    acc.ssq_d += dot(Df, Df)
                    acc.ssq_a += dot(Xf, Xf)
                    acc.ssq_b += dot(Yf, Yf)
                    acc.dot_ab += dot(Xf, Yf)
                    ad = np.abs(Df)
                    acc.max_abs = max(acc.max_abs, float(ad.max()))
                    acc.sum_abs += float(ad.sum())
