"""diff: compare checkpoints tensor by tensor, streaming. Pure: no printing.

Three modes share one engine:
  * two checkpoints (`diff_checkpoints`): structure, file metadata and, for tensors present in
    both with the same shape, value statistics;
  * two runs (`diff_runs`): checkpoints aligned by step, one summary per common step;
  * one run (`along_run`): consecutive checkpoints, update size and weight norm per step.

Values are streamed: both tensors are read in lockstep, a bounded chunk at a time at the same
element offsets, and reduced into float64 accumulators. Identical bytes are identical without
any arithmetic (the fast path); the arithmetic runs only on chunks whose bytes differ.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes
from ckptctl.errors import CkptError, CorruptFile, UsageError
from ckptctl.formats import open_reader
from ckptctl.model import CheckpointInfo, TensorInfo

if TYPE_CHECKING:
    import numpy as np

    from ckptctl.formats.base import Reader

READ_BYTES = 16 * 1024 * 1024  # bytes read from a file per call, per side
BLOCK = 1 << 17  # elements per arithmetic block (fits the L2 cache as float64)
Progress = Callable[[int], None] | None


# ---- names: --key / --strip-prefix (ops/select.py does the work) ----------------------------------
def has_key(info: CheckpointInfo, key: str) -> bool:
    from ckptctl.ops.select import under

    return any(under(t.name, key.strip("/")) is not None for t in info.tensors)


@dataclass
class Side:
    """What one side of a diff compares: aligned name -> source TensorInfo (whose .name is the
    name in the file), in file order, and how that set was chosen."""

    names: dict[str, TensorInfo]
    root: str = ""  # the sub-tree taken ('' for all)
    training_default: bool = False  # the model weights of a training checkpoint, by default
    left_out: int = 0  # tensors outside that default (optimizer state, callbacks, ...)
    filtered_out: int = 0  # dropped by --include/--exclude

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "model_weights_only": self.training_default, "left_out": self.left_out,
                "filtered_out": self.filtered_out, "num_tensors": len(self.names)}


def pick(
    info: CheckpointInfo, key: str | None = None, strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None, rename: list[str] | None = None, *, all_: bool = False,
    include: list[str] | None = None, exclude: list[str] | None = None,
) -> Side:
    """The tensors of one side, chosen by the rule convert and average use (ops/select.py):
    `key` takes that sub-tree; `all_` every tensor under its '/'-joined name; by default the
    model weights of a training checkpoint (names under state_dict/, without that prefix) and
    everything otherwise. `strip` removes the first matching prefix; `rename` are OLD=NEW regex
    substitutions. `include`/`exclude` (and `filters`, the older name of --include) are globs,
    as convert's: matched against the name relative to the sub-tree or in full, and also against
    the aligned name (after renaming), so `-k` keeps working on the names diff shows.
    """
    from ckptctl.ops.inspect import match_any
    from ckptctl.ops.select import select as select_tensors
    from ckptctl.ops.select import under

    if not info.tensors:
        return Side({})
    if key is not None:
        sel = select_tensors(info.tensors, key=key, strip_prefix=list(strip), rename=rename)
    else:
        sel = select_tensors(info.tensors, all_=all_, strip_prefix=list(strip), rename=rename)
    inc = list(include or ()) + list(filters or ())
    exc = list(exclude or ())
    out: dict[str, TensorInfo] = {}
    dropped = 0
    for src, o in sel.pairs:
        forms = (under(src.name, sel.root) or src.name, src.name, o.name)
        if (inc and not any(match_any(f, inc) for f in forms)) or (exc and any(match_any(f, exc) for f in forms)):
            dropped += 1
            continue
        out[o.name] = src
    return Side(out, sel.root, sel.training_default, sel.outside_root if sel.training_default else 0, dropped)


def select(
    info: CheckpointInfo, key: str | None = None, strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None, rename: list[str] | None = None, **kw: Any,
) -> dict[str, TensorInfo]:
    """pick(...).names: aligned name -> source TensorInfo."""
    return pick(info, key, strip, filters, rename, **kw).names


def _candidate_prefixes(names: list[str], depth: int = 3, top: int = 5) -> list[str]:
    c: Counter[str] = Counter()
    for n in names:
        seen = 0
        for i, ch in enumerate(n):
            if ch in "./" and i + 1 < len(n):
                c[n[: i + 1]] += 1
                seen += 1
                if seen >= depth:
                    break
    return [p for p, _ in c.most_common(top)]


def _split_prefix(p: str) -> tuple[str, str]:
    """'state_dict/model.' -> ('state_dict/', 'model.'): a sub-tree (--key) and a prefix to strip."""
    cut = p.rfind("/") + 1
    return p[:cut], p[cut:]


def _transform(names: list[str], prefix: str, dots: bool) -> set[str]:
    key, strip = _split_prefix(prefix)
    out = set()
    for n in names:
        if key:
            if not n.startswith(key):
                continue
            n = n[len(key):]
        if strip and n.startswith(strip):
            n = n[len(strip):]
        out.add(n.replace("/", ".") if dots else n)
    return out


def name_hint(names_a: list[str], names_b: list[str]) -> str | None:
    """A suggestion when the two name sets match (much) better after removing a prefix such as
    `module.`, `model.` or a `state_dict/` sub-tree, or reading '/' as '.' (HDF5 paths)."""
    base = len(set(names_a) & set(names_b))
    small = min(len(set(names_a)), len(set(names_b)))
    if not names_a or not names_b or base == small:
        return None
    def n_opts(pa: str, pb: str, dots: int) -> int:
        parts = {_split_prefix(p)[0] for p in (pa, pb)} | {_split_prefix(p)[1] for p in (pa, pb)}
        return len(parts - {""}) + (1 if dots else 0)

    best = (base, 0, "", "", 0)  # (matched, -options, pa, pb, dots): most matches, then fewest options
    ca = [""] + _candidate_prefixes(names_a)
    cb = [""] + _candidate_prefixes(names_b)
    for dots in (0, 1, 2):  # translate '/' to '.' on: neither, A, B
        for pa in ca:
            sa = _transform(names_a, pa, dots == 1)
            for pb in cb:
                if not pa and not pb and not dots:
                    continue
                ka, kb = _split_prefix(pa)[0], _split_prefix(pb)[0]
                if ka and kb and ka != kb:
                    continue  # one --key cannot say both
                m = len(sa & _transform(names_b, pb, dots == 2))
                cand = (m, -n_opts(pa, pb, dots), pa, pb, dots)
                if cand[:2] > best[:2]:
                    best = cand
    matched, _n, pa, pb, dots = best
    if matched <= base or matched * 2 < small:
        return None
    opts: list[str] = []
    keys = {_split_prefix(p)[0] for p in (pa, pb)} - {""}
    opts += [f"--key {k.rstrip('/')}" for k in keys]
    opts += [f"--strip-prefix {s}" for s in dict.fromkeys(_split_prefix(p)[1] for p in (pa, pb)) if s]
    if dots:
        opts.append("--rename '/=.'")
    what = []
    if pa:
        what.append(f"removing {pa!r} in A")
    if pb:
        what.append(f"removing {pb!r} in B")
    if dots:
        what.append(f"reading '/' as '.' in {'A' if dots == 1 else 'B'}")
    return f"{matched} tensor names match after {' and '.join(what)}: try {' '.join(opts)}"


# ---- streaming ---------------------------------------------------------------------------------
def numeric_kind(dtype: str) -> str:
    """'float' | 'complex' | 'int' | 'bool' | 'bytes' (no arithmetic: compare bytes only)."""
    d = dtypes.BY_NAME[dtype]
    if d.kind in ("float", "complex", "int", "uint", "bool") and d.bits % 8 == 0:
        dt = dtypes.numpy_dtype(dtype)
        if dt is not None and dt.itemsize * 8 == d.bits:
            return {"uint": "int"}.get(d.kind, d.kind)
    return "bytes"


def itemsize(dtype: str) -> int:
    return dtypes.BY_NAME[dtype].itemsize


class ChunkSource:
    """Read one tensor's logical bytes in chunks of a fixed size (the last may be shorter).

    Uses pread into reused buffers when the reader names a contiguous byte range (no allocation
    per chunk); otherwise regroups the reader's `iter_chunks` pieces. With one buffer, a yielded
    chunk is valid until the next is requested; with `bufs` of two, chunk k stays valid until
    chunk k+2 is requested (so it can be worked on while the next one is read).
    """

    def __init__(self, reader: Reader, t: TensorInfo, chunk_bytes: int, buf: bytearray | None = None,
                 bufs: list[bytearray] | None = None):
        self.reader = reader
        self.t = t
        self.chunk_bytes = max(1, chunk_bytes)
        self.bufs = bufs if bufs else [buf if buf is not None else bytearray(0)]

    def __iter__(self) -> Iterator[memoryview | bytes]:
        t = self.t
        if t.nbytes == 0:
            return
        rng = None
        try:
            rng = self.reader.byte_range(t.name)
        except Exception:  # noqa: BLE001 - fall back to the generic path
            rng = None
        if rng is not None and rng[2] == t.nbytes:
            yield from self._pread(*rng)
            return
        yield from self._regroup()

    def _pread(self, file: str, offset: int, length: int) -> Iterator[memoryview]:
        size = min(self.chunk_bytes, length)
        for i, b in enumerate(self.bufs):
            if len(b) < size:
                self.bufs[i] = bytearray(size)
        views = [memoryview(b) for b in self.bufs]
        fd = os.open(file, os.O_RDONLY)
        try:
            pos = 0
            k = 0
            while pos < length:
                view = views[k % len(views)]
                k += 1
                want = min(size, length - pos)
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:want]], offset + pos + got)
                    if n == 0:
                        raise CorruptFile(
                            f"tensor {self.t.name!r}: file ends at byte {offset + pos + got}, "
                            f"expected data up to byte {offset + length}", file,
                        )
                    got += n
                pos += want
                yield view[:want]
        finally:
            os.close(fd)

    def _regroup(self) -> Iterator[bytes | memoryview]:
        size = self.chunk_bytes
        total = 0
        pending = bytearray()
        stable = len(self.bufs) > 1  # the consumer keeps a chunk across one more read
        for piece in self.reader.iter_chunks(self.t.name, size):
            mv = memoryview(piece).cast("B")
            total += len(mv)
            if total > self.t.nbytes:
                break
            if not pending and len(mv) == size:
                yield bytes(mv) if stable and not isinstance(piece, bytes) else mv
                continue
            pending += mv
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
        if total != self.t.nbytes:
            raise CorruptFile(
                f"tensor {self.t.name!r}: got {total} bytes, expected {self.t.nbytes}", self.reader.path
            )
        if pending:
            yield bytes(pending)


class Cursor:
    """Reads one tensor's bytes, chunk after chunk, into buffers the caller provides."""

    def __init__(self, reader: Reader, t: TensorInfo, chunk_bytes: int):
        self.t = t
        self.chunk_bytes = max(1, chunk_bytes)
        self.fd: int | None = None
        self.gen: Iterator | None = None
        rng = None
        try:
            rng = reader.byte_range(t.name)
        except Exception:  # noqa: BLE001 - fall back to the generic path
            rng = None
        if rng is not None and rng[2] == t.nbytes:
            self.file, self.offset, self.length = rng
            self.fd = os.open(rng[0], os.O_RDONLY)
            self.pos = 0
        else:
            self.gen = iter(ChunkSource(reader, t, self.chunk_bytes))

    def read_into(self, buf: bytearray) -> memoryview | None:
        """The next chunk, in `buf` (at least chunk_bytes long); None at the end."""
        view = memoryview(buf)
        if self.gen is not None:
            c = next(self.gen, None)
            if c is None:
                return None
            n = len(c)
            view[:n] = c
            return view[:n]
        if self.pos >= self.length:
            return None
        want = min(self.chunk_bytes, self.length - self.pos)
        got = 0
        while got < want:
            n = os.preadv(self.fd, [view[got:want]], self.offset + self.pos + got)
            if n == 0:
                raise CorruptFile(f"tensor {self.t.name!r}: file ends at byte {self.offset + self.pos + got}, "
                                  f"expected data up to byte {self.offset + self.length}", self.file)
            got += n
        self.pos += want
        return view[:want]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.gen = None


def as_array(buf, dtype: str) -> np.ndarray:
    """A flat numpy view of raw little-endian bytes (bool as uint8, bf16/fp8 via ml_dtypes)."""
    import numpy as np

    kind = numeric_kind(dtype)
    if kind == "bool":
        return np.frombuffer(buf, dtype=np.uint8)
    if kind == "bytes":
        return np.frombuffer(buf, dtype=np.uint8)
    return np.frombuffer(buf, dtype=dtypes.numpy_dtype(dtype))


_BLAS_LOCAL: Any = None  # openblas_set_num_threads_local, False when not available
_TLS = threading.local()


def _blas_one_thread() -> bool:
    """Make BLAS single-threaded for the calling thread only (OpenBLAS >= 0.3.27).

    OpenBLAS's threaded ddot spins waiting for idle cores; on a busy 2-core machine it ran
    3-40x slower than one thread. `openblas_set_num_threads_local` changes the calling thread
    alone, so nothing else in the process is affected. False when numpy's BLAS is not an
    OpenBLAS we can find: callers then use numpy's own loop (einsum), about 2x slower.
    """
    global _BLAS_LOCAL
    done = getattr(_TLS, "blas1", None)
    if done is not None:
        return done
    if _BLAS_LOCAL is None:
        _BLAS_LOCAL = False
        try:
            import ctypes
            import glob

            import numpy as np

            base = os.path.dirname(os.path.dirname(np.__file__))
            for lib in sorted(glob.glob(os.path.join(base, "numpy.libs", "lib*openblas*.so*"))):
                fn = getattr(ctypes.CDLL(lib), "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int]
                    fn.restype = ctypes.c_int
                    _BLAS_LOCAL = fn
                    break
        except (OSError, AttributeError, ImportError):
            _BLAS_LOCAL = False
    ok = False
    if _BLAS_LOCAL:
        try:
            _BLAS_LOCAL(1)
            ok = True
        except Exception:  # noqa: BLE001
            ok = False
    _TLS.blas1 = ok
    return ok


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Re(sum(conj(x) * y)) of two contiguous float64/complex128 vectors.

    Single-threaded BLAS when that can be arranged for this thread (see _blas_one_thread),
    else numpy's own loop (einsum): never OpenBLAS's default threading, which spins.
    """
    import numpy as np

    if _blas_one_thread():
        if np.iscomplexobj(x):
            return float(np.vdot(x, y).real)
        return float(np.dot(x, y))
    if np.iscomplexobj(x):
        return float(np.einsum("i,i->", np.conj(x), y).real)
    return float(np.einsum("i,i->", x, y))


def _uint_view(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.itemsize]) if x.itemsize <= 8 \
        else x.view(np.uint64)


_MEMCMP: Any = None


def _memcmp():
    global _MEMCMP
    if _MEMCMP is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).memcmp
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _MEMCMP = fn
        except (OSError, AttributeError):
            _MEMCMP = False
    return _MEMCMP


def _same_bytes(a, b) -> bool:
    """memcmp of two buffers without copying them (memoryview == memoryview compares item by
    item in Python's struct machinery: far slower)."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a == b
    if len(a) != len(b):
        return False
    if not len(a):
        return True
    fn = _memcmp()
    if fn:
        import numpy as np

        pa = np.frombuffer(a, np.uint8).ctypes.data
        pb = np.frombuffer(b, np.uint8).ctypes.data
        return fn(pa, pb, len(a)) == 0
    return bytes(a) == bytes(b)


# ---- per-tensor statistics -----------------------------------------------------------------------
@dataclass
class _Acc:
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


def _merge(acc: _Acc, part: _Acc) -> None:
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

    @property
    def bufs(self) -> _Buffers:
        """float64 work buffers of the calling thread, kept for the life of the thread."""
        b = getattr(_TLS, "bufs", None)
        if b is None or len(b.X) != BLOCK:
            b = _TLS.bufs = _Buffers()
        return b

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

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
            futs.append(self._submit(self._values_part, x[lo: lo + per], y[lo: lo + per], ka, kb, same))
        return futs

    def _values_part(self, x, y, ka: str, kb: str, same: bool) -> _Acc:
        part = _Acc()
        self._values(part, x, y, ka, kb, same)
        return part

    # -- one tensor pair ---------------------------------------------------------------------------
    def compare(self, ra: Reader, ta: TensorInfo, rb: Reader, tb: TensorInfo, progress: Progress = None) -> _Acc:
        """Stream both tensors (same numel) and return the filled accumulator.

        While the arithmetic of chunk k runs in worker threads (numpy releases the GIL), the
        main thread reads chunk k+1 into the other of two buffers per side.
        """
        ka, kb = numeric_kind(ta.dtype), numeric_kind(tb.dtype)
        acc = _Acc(numel=ta.numel)
        same = ta.dtype == tb.dtype
        if "bytes" in (ka, kb) and not same:
            raise ValueError("cannot compare values of these dtypes")
        elems = max(1, READ_BYTES // max(itemsize(ta.dtype), itemsize(tb.dtype)))
        elems -= elems % BLOCK if elems > BLOCK else 0
        if ka == "bytes":  # same dtype: bytes only
            src_a = ChunkSource(ra, ta, READ_BYTES, bufs=self._rbuf1_a)
            src_b = ChunkSource(rb, tb, READ_BYTES, bufs=self._rbuf1_b)
            for ca, cb in _lockstep(src_a, src_b, ta, tb):
                if not _same_bytes(ca, cb):
                    x, y = memoryview(ca).cast("B"), memoryview(cb).cast("B")
                    import numpy as np

                    acc.n_diff += int(np.count_nonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8)))
                if progress:
                    progress(len(ca) + len(cb))
            return acc
        threaded = self.threads > 1 and "complex" not in (ka, kb) and ta.numel > 2 * BLOCK
        if threaded:
            rng_a, rng_b = _contiguous(ra, ta), _contiguous(rb, tb)
            if rng_a is not None and rng_b is not None:
                return self._compare_parallel(ta, tb, rng_a, rng_b, ka, kb, same, acc, progress)
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
                if fast and _same_bytes(ca, cb):
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

    def _compare_parallel(self, ta: TensorInfo, tb: TensorInfo, rng_a, rng_b, ka: str, kb: str, same: bool,
                          acc: _Acc, progress: Progress) -> _Acc:
        """Both tensors lie contiguous in files: cut the element range into items; a worker reads
        its item from both files (pread) and compares it, so reading and arithmetic use every
        core. Byte-identical items need no arithmetic unless another item differs; then their
        |a|^2 (= |b|^2 = a.b) is computed afterwards. Results merge in item order."""
        isa, isb = itemsize(ta.dtype), itemsize(tb.dtype)
        numel = ta.numel
        elems = max(BLOCK, min(1 << 21, ITEM_BYTES // (isa + isb)))
        elems -= elems % BLOCK
        fds = {}
        for f, _o, _n in (rng_a, rng_b):
            if f not in fds:
                fds[f] = os.open(f, os.O_RDONLY)

        def read(slot: int, rng, t: TensorInfo, isz: int, lo: int, hi: int) -> FileView:
            return FileView(fds[rng[0]], rng[0], rng[1] + lo * isz, (hi - lo) * isz, t.name, slot)

        def work(lo: int, hi: int):
            fa = read(0, rng_a, ta, isa, lo, hi)
            try:
                fb = read(1, rng_b, tb, isb, lo, hi)
                try:
                    if same and _same_bytes(fa.view, fb.view):
                        return None
                    part = _Acc()
                    self._values(part, as_array(fa.view, ta.dtype), as_array(fb.view, tb.dtype), ka, kb, same)
                    return part
                finally:
                    fb.close()
            finally:
                fa.close()

        def self_stats(lo: int, hi: int) -> _Acc:
            part = _Acc()
            fa = read(0, rng_a, ta, isa, lo, hi)
            try:
                self._self_stats(part, as_array(fa.view, ta.dtype))
            finally:
                fa.close()
            return part

        same_ranges: list[tuple[int, int]] = []
        pending: list = []
        starts = iter(range(0, numel, elems))

        def submit_next() -> None:
            lo = next(starts, None)
            if lo is not None:
                hi = min(numel, lo + elems)
                pending.append((lo, hi, self._submit(work, lo, hi)))

        try:
            for _ in range(self.threads + 1):
                submit_next()
            while pending:
                lo, hi, fut = pending.pop(0)
                part = fut.result()
                submit_next()
                if part is None:
                    same_ranges.append((lo, hi))
                else:
                    _merge(acc, part)
                if progress:
                    progress((hi - lo) * (isa + isb))
            if acc.arith and same_ranges:
                for f in [self._submit(self_stats, lo, hi) for lo, hi in same_ranges]:
                    _merge(acc, f.result())
        finally:
            cancel_and_close([fut for _lo, _hi, fut in pending], fds.values())
        return acc

    def _prefix_stats(self, acc: _Acc, ra: Reader, ta: TensorInfo, n: int) -> None:
        """Statistics of the byte-identical leading elements, read again from side A only."""
        done = 0
        for chunk in ChunkSource(ra, ta, READ_BYTES - READ_BYTES % itemsize(ta.dtype), bufs=self._rbuf_prefix):
            x = as_array(chunk, ta.dtype)
            take = min(len(x), n - done)
            self._self_stats(acc, x[:take])
            done += take
            if done >= n:
                break

    def _self_stats(self, acc: _Acc, x: np.ndarray) -> None:
        """Accumulate a chunk that is the same on both sides (d = 0)."""
        import numpy as np

        b = self.bufs
        acc.arith = True
        for i in range(0, len(x), BLOCK):
            xs = x[i: i + BLOCK]
            k = len(xs)
            if np.iscomplexobj(xs):
                X = xs.astype(np.complex128)
                fin = np.isfinite(X)
                nan = int(np.count_nonzero(np.isnan(X)))
                X = X[fin]
                s = _dot(X, X)
            else:
                X = b.X[:k]
                np.copyto(X, xs, casting="unsafe")
                s = _dot(X, X)
                nan = 0
                fin = None
                if not math.isfinite(s):
                    fin = np.isfinite(X)
                    nan = int(np.count_nonzero(np.isnan(X)))
                    Xf = X[fin]
                    s = _dot(Xf, Xf)
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

    def _values(self, acc: _Acc, x: np.ndarray, y: np.ndarray, ka: str, kb: str, same: bool) -> None:
        import numpy as np

        acc.arith = True
        if "complex" in (ka, kb):
            self._complex(acc, x, y, same)
            return
        exact_ints = ka in ("int", "bool") and kb in ("int", "bool")
        bits = same and (exact_ints or not self.tol)  # differing elements = differing bits
        b = self.bufs
        with np.errstate(all="ignore"):
            for i in range(0, len(x), BLOCK):
                xs, ys = x[i: i + BLOCK], y[i: i + BLOCK]
                k = len(xs)
                X, Y, D, B = b.X[:k], b.Y[:k], b.D[:k], b.B[:k]
                np.copyto(X, xs, casting="unsafe")
                np.copyto(Y, ys, casting="unsafe")  # (a mixed-dtype subtract would skip this, but is slower)
                np.subtract(X, Y, out=D)
                sa, dd = _dot(X, X), _dot(D, D)
                finite = math.isfinite(sa) and math.isfinite(dd)
                # -- how many elements differ
                if bits:
                    np.not_equal(_uint_view(xs), _uint_view(ys), out=B)
                    n_diff = int(np.count_nonzero(B))
                elif exact_ints:
                    np.not_equal(xs, ys, out=B)
                    n_diff = int(np.count_nonzero(B))
                elif not self.tol:
                    np.not_equal(X, Y, out=B)
                    if not finite:
                        B &= ~(np.isnan(X) & np.isnan(Y))
                    n_diff = int(np.count_nonzero(B))
                else:
                    T, C = b.T[:k], b.C[:k]
                    np.abs(Y, out=T)
                    T *= self.rtol
                    T += self.atol
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
                    xd = _dot(X, D)
                    if dd <= 0.25 * sa and math.isfinite(xd):
                        # b = a - d: |b|^2 and a.b follow from |a|^2, a.d and |d|^2 with a relative error
                        # of a few ulps while |d| <= |a|/2 (no cancellation); saves a dot
                        sb, ab = max(0.0, sa - 2.0 * xd + dd), sa - xd
                    else:
                        sb, ab = _dot(Y, Y), _dot(X, Y)
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
                    sa, sb, ab, dd = _dot(Xf, Xf), _dot(Yf, Yf), _dot(Xf, Yf), _dot(Df, Df)
                acc.n_finite += nf
                if nf:
                    acc.ssq_d += dd
                    acc.ssq_a += sa
                    acc.ssq_b += sb
                    acc.dot_ab += ab
                    np.abs(Df, out=Df)
                    acc.max_abs = max(acc.max_abs, float(Df.max()))
                    acc.sum_abs += float(Df.sum())

    def _complex(self, acc: _Acc, x: np.ndarray, y: np.ndarray, same: bool) -> None:
        import numpy as np

        with np.errstate(all="ignore"):
            for i in range(0, len(x), BLOCK):
                xs, ys = x[i: i + BLOCK], y[i: i + BLOCK]
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
                    close = (((np.abs(D) <= self.atol + self.rtol * np.abs(Y)) & np.isfinite(X) & np.isfinite(Y))
                             | (X == Y) | (nan_x & nan_y))
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
                    acc.ssq_d += _dot(Df, Df)
                    acc.ssq_a += _dot(Xf, Xf)
                    acc.ssq_b += _dot(Yf, Yf)
                    acc.dot_ab += _dot(Xf, Yf)
                    ad = np.abs(Df)
                    acc.max_abs = max(acc.max_abs, float(ad.max()))
                    acc.sum_abs += float(ad.sum())


ITEM_BYTES = 16 * 1024 * 1024  # both sides together, per work item of the parallel compare


def _contiguous(reader: Reader, t: TensorInfo) -> tuple[str, int, int] | None:
    try:
        r = reader.byte_range(t.name)
    except Exception:  # noqa: BLE001 - the generic path then
        return None
    return r if r is not None and r[2] == t.nbytes else None


def _pread_into(fd: int, view: memoryview, offset: int, file: str, name: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CorruptFile(f"tensor {name!r}: file ends at byte {offset + got}, expected data up to byte "
                              f"{offset + len(view)}", file)
        got += n


_MAP_FLAGS: int | None = None


def _map_flags() -> int:
    global _MAP_FLAGS
    if _MAP_FLAGS is None:
        import mmap

        _MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return _MAP_FLAGS


class FileView:
    """Bytes [offset, offset + length) of a file as a read-only buffer, without copying them.

    Maps the range (MAP_POPULATE: the page-cache pages are wired in one call) and unmaps it on
    `close`, so the process's RSS only holds the ranges being worked on. Mapping cached pages
    cost ~15 ms per GB here, against ~200 ms per GB for pread's copy. Falls back to pread into
    a thread buffer when mapping fails. The size is checked first: a file cut short since it
    was opened is a clean error, not a SIGBUS.
    """

    __slots__ = ("view", "_mm", "_mv")

    def __init__(self, fd: int, file: str, offset: int, length: int, name: str, slot: int):
        import mmap

        self._mm = self._mv = None
        if offset + length > os.fstat(fd).st_size:
            raise CorruptFile(f"tensor {name!r}: file ends before byte {offset + length}", file)
        if length == 0:
            self.view = memoryview(b"")
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._mm = mmap.mmap(fd, offset + length - start, flags=_map_flags(), prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError, OverflowError):
            self._mm = None
        if self._mm is not None:
            self._mv = memoryview(self._mm)
            self.view = self._mv[offset - start: offset - start + length]
            return
        self.view = memoryview(_tls_buffer(slot, length))[:length]
        _pread_into(fd, self.view, offset, file, name)

    def close(self) -> None:
        """Unmap; every array made from `view` must be gone by now."""
        for v in (self.view, self._mv):
            if v is not None:
                try:
                    v.release()
                except BufferError:  # still exported: the mapping goes when the last user does
                    return
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass


def cancel_and_close(futures, fds) -> None:
    """Cleanup after item workers: cancel pending `futures`, wait for those already running
    (their errors are dropped: the caller is already leaving), then close `fds`."""
    for fut in futures:
        fut.cancel()
        try:
            fut.result()
        except BaseException:  # noqa: BLE001
            pass
    for fd in fds:
        os.close(fd)


def _tls_buffer(k: int, size: int) -> bytearray:
    """Read buffer k of the calling thread, kept for the thread's life (fresh pages cost a fault each)."""
    bufs = getattr(_TLS, "reads", None)
    if bufs is None:
        bufs = _TLS.reads = []
    while len(bufs) <= k:
        bufs.append(bytearray(0))
    if len(bufs[k]) < size:
        bufs[k] = bytearray(size)
    return bufs[k]


def _lockstep(src_a, src_b, ta: TensorInfo, tb: TensorInfo) -> Iterator[tuple[Any, Any]]:
    ia, ib = iter(src_a), iter(src_b)
    while True:
        ca = next(ia, None)
        cb = next(ib, None)
        if ca is None and cb is None:
            return
        if ca is None or cb is None:
            raise CorruptFile(f"tensor {ta.name!r}: the two sides hold different amounts of data")
        yield ca, cb


# ---- results ------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    compared: bool = False  # values were compared
    numel: int = 0
    num_diff: int | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    error: str | None = None
    ignore_dtype: bool = False  # --ignore-dtype: a dtype change alone is not a difference
    atol: float | None = None  # the tolerance these values were compared with (None, None: exact)
    rtol: float | None = None

    @property
    def dtype_changed(self) -> bool:
        return self.dtype_a != self.dtype_b

    @property
    def shape_changed(self) -> bool:
        return tuple(self.shape_a) != tuple(self.shape_b)

    @property
    def values_differ(self) -> bool:
        return bool(self.num_diff)

    @property
    def identical(self) -> bool:
        if self.dtype_changed and not (self.ignore_dtype and self.compared):
            return False  # (values of dtypes without arithmetic cannot be compared across a cast)
        return not self.shape_changed and self.error is None and (not self.compared or not self.num_diff)

    @property
    def dtype_only(self) -> bool:
        """Only the dtype changed: the values were compared and all are within tolerance."""
        return (self.dtype_changed and self.compared and not self.num_diff and not self.shape_changed
                and self.error is None)

    @property
    def nonfinite(self) -> bool:
        return bool(self.nan_a or self.nan_b or self.inf_a or self.inf_b)

    @property
    def change(self) -> str:
        parts = []
        if self.shape_changed:
            parts.append(f"shape {list(self.shape_a)} -> {list(self.shape_b)}")
        if self.dtype_changed:
            parts.append(f"dtype {self.dtype_a} -> {self.dtype_b}"
                         + (" (values not comparable)" if self.ignore_dtype and not self.compared
                            and not self.shape_changed else ""))
        if self.compared and self.num_diff:
            parts.append("values")
        if self.error:
            parts.append(f"unreadable: {self.error}")
        return ", ".join(parts) or "identical"

    @classmethod
    def from_acc(cls, name: str, ta: TensorInfo, tb: TensorInfo, acc: _Acc) -> TensorDiff:
        d = cls(name, ta.dtype, tb.dtype, tuple(ta.shape), tuple(tb.shape), compared=True, numel=acc.numel,
                num_diff=acc.n_diff, nan_a=acc.nan_a, nan_b=acc.nan_b, inf_a=acc.inf_a, inf_b=acc.inf_b)
        if numeric_kind(ta.dtype) == "bytes":
            return d  # raw bytes: equal or not, no arithmetic
        if not acc.arith:
            # identical through the fast path: no arithmetic was needed
            d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine = 0.0, 0.0, 0.0, 1.0
            return d
        if acc.numel and not acc.n_finite:  # no pair with both sides finite: no statistic, not 0
            d.max_abs_diff = d.mean_abs_diff = d.rel_l2 = d.cosine = math.nan
            return d
        d.norm_a = math.sqrt(acc.ssq_a)
        d.norm_b = math.sqrt(acc.ssq_b)
        d.max_abs_diff = acc.max_abs
        d.mean_abs_diff = acc.sum_abs / acc.n_finite if acc.n_finite else (0.0 if not acc.numel else None)
        nd = math.sqrt(acc.ssq_d)
        if d.norm_a > 0:
            d.rel_l2 = nd / d.norm_a
        else:
            d.rel_l2 = 0.0 if nd == 0 else math.inf
        if d.norm_a > 0 and d.norm_b > 0:
            d.cosine = max(-1.0, min(1.0, acc.dot_ab / (d.norm_a * d.norm_b)))
        else:
            d.cosine = 1.0 if d.norm_a == d.norm_b else 0.0
        return d

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "change": self.change,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "dtype_changed": self.dtype_changed,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "numel": self.numel,
            "num_diff": self.num_diff,
            "frac_diff": (self.num_diff / self.numel) if self.num_diff is not None and self.numel else None,
            "max_abs_diff": _jf(self.max_abs_diff),
            "mean_abs_diff": _jf(self.mean_abs_diff),
            "rel_l2": _jf(self.rel_l2),
            "cosine": _jf(self.cosine),
            "nan_a": self.nan_a,
            "nan_b": self.nan_b,
            "inf_a": self.inf_a,
            "inf_b": self.inf_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "error": self.error,
        }


def _jf(v: float | None) -> float | None:
    """Numbers for JSON stay floats, inf and nan included: the output layer (print_json) writes
    the non-finite ones in its one documented, strict-JSON form."""
    return None if v is None else float(v)


def _rel_key(d: TensorDiff) -> tuple:
    """Sort changed tensors: structural changes first, then new NaN/Inf, then by relative change."""
    structural = d.shape_changed or d.error is not None
    nonfinite_changed = (d.nan_a, d.inf_a) != (d.nan_b, d.inf_b)
    r = d.rel_l2
    if r is None or math.isnan(r):
        r = math.inf
    return (not structural, not nonfinite_changed, -r, -(d.num_diff or 0), d.name)


@dataclass
class DiffResult:
    path_a: str
    path_b: str
    format_a: str
    format_b: str
    values: bool  # were values compared
    atol: float | None
    rtol: float | None
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    changed: list[TensorDiff] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    metadata_changes: list[dict[str, Any]] = field(default_factory=list)
    hint: str | None = None
    key_a: str | None = None
    key_b: str | None = None
    bytes_compared: int = 0
    ignore_dtype: bool = False
    side_a: Side | None = None
    side_b: Side | None = None
    dtype_only: list[TensorDiff] = field(default_factory=list)  # dtype changed, values within tolerance

    @property
    def equal(self) -> bool:
        """Same tensor names, dtypes, shapes and (when compared) values. File metadata is shown
        but does not count: a .pt and its safetensors conversion are equal."""
        return not (self.only_in_a or self.only_in_b or self.changed)

    @property
    def nonfinite(self) -> list[str]:
        return [d.name for d in self.changed if d.nonfinite]

    @property
    def left_out(self) -> tuple[int, int]:
        """Tensors each side left out by the model-weights default (optimizer state, ...)."""
        return tuple(s.left_out if s is not None else 0 for s in (self.side_a, self.side_b))  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.path_a,
            "b": self.path_b,
            "format_a": self.format_a,
            "format_b": self.format_b,
            "equal": self.equal,
            "values_compared": self.values,
            "atol": self.atol,
            "rtol": self.rtol,
            "key_a": self.key_a,
            "key_b": self.key_b,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "changed": [d.to_json() for d in self.changed],
            "num_identical": len(self.identical),
            "num_changed": len(self.changed),
            "ignore_dtype": self.ignore_dtype,
            "num_dtype_only": len(self.dtype_only),
            "selection": {"a": self.side_a.to_json() if self.side_a else None,
                          "b": self.side_b.to_json() if self.side_b else None},
            "metadata_changes": self.metadata_changes,
            "hint": self.hint,
        }


def cast_tolerance(dtype_a: str, dtype_b: str) -> tuple[float, float]:
    """(atol, rtol) for `--ignore-dtype` without --atol/--rtol: equal up to the cast.

    rtol is the machine epsilon of the less precise floating dtype (float16: 2**-10 ~ 9.8e-4,
    bfloat16: 2**-7 ~ 7.8e-3, float32: 2**-23 ~ 1.2e-7), twice the largest relative error of a
    round-to-nearest cast; atol is that dtype's smallest normal number (float16: 6.1e-5), for
    values that became subnormal or zero (also when the cast flushed subnormals). Integers and
    bools on both sides: exact. Infinities and NaNs must match (an overflow to inf is a change).
    """
    import numpy as np

    best: tuple[float, float] | None = None
    for d in (dtype_a, dtype_b):
        if numeric_kind(d) in ("float", "complex"):
            fi = np.finfo(dtypes.numpy_dtype(d))
            cand = (float(fi.eps), float(fi.tiny))
            if best is None or cand > best:
                best = cand
    if best is None:
        return 0.0, 0.0
    eps, tiny = best
    return tiny, eps


def metadata_changes(ma: dict[str, Any], mb: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k in list(ma) + [k for k in mb if k not in ma]:
        va, vb = ma.get(k, None), mb.get(k, None)
        if k not in mb or k not in ma or _plain(va) != _plain(vb):
            out.append({"key": k, "a": _plain(va) if k in ma else None, "b": _plain(vb) if k in mb else None,
                        "only_in": "a" if k not in mb else ("b" if k not in ma else None)})
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def open_checkpoint(path: str | os.PathLike) -> Reader:
    """open_reader, plus the model file of a trainer folder that holds several files."""
    try:
        return open_reader(path)
    except CkptError:
        p = Path(path)
        if p.is_dir():
            from ckptctl.ops import runs

            try:
                c = runs.scan_run(p, read_info=False).checkpoints
            except CkptError:
                c = []
            primary = getattr(runs, "_primary_file", None)
            if len(c) == 1 and primary is not None:
                alt = primary(c[0])
                if alt is not None:
                    return open_reader(alt)
        raise


def _resolve_key(info: CheckpointInfo, key: str | None) -> str | None:
    """--key applies to each side that has that sub-tree."""
    if key and has_key(info, key):
        return key
    return None


def diff_checkpoints(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    values: bool = True,
    key: str | None = None,
    strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None,
    rename: list[str] | None = None,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    ignore_dtype: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    readers: tuple[Reader, Reader] | None = None,
) -> DiffResult:
    """Compare two checkpoints of any formats.

    Which tensors: see `pick` (the model weights of a training checkpoint by default, `all_`
    everything, `key` a sub-tree of each side that has it). `ignore_dtype`: a dtype change alone
    is no difference; values are compared across the cast within atol/rtol, or within
    `cast_tolerance` when neither is given.

    `progress_factory(total_bytes)` may return a context manager yielding an object with
    `advance(n)`; it is called once the amount of data to compare is known.
    """
    if key is not None and all_:
        raise UsageError("--key and --all do not go together")
    if ignore_dtype and not values:
        raise UsageError("--ignore-dtype compares values across a cast; --no-values compares none")
    ra = rb = None
    try:
        ra, rb = readers if readers else (open_checkpoint(path_a), None)
        if rb is None:
            rb = open_checkpoint(path_b)
        ia, ib = ra.info(), rb.info()
        ka, kb = _resolve_key(ia, key), _resolve_key(ib, key)
        if key and ka is None and kb is None:
            raise UsageError(f"--key {key}: neither checkpoint has tensors under {key.rstrip('/')}/")
        fkw = dict(all_=all_, include=include, exclude=exclude)
        side_a = pick(ia, ka, strip, filters, rename, **fkw)
        side_b = pick(ib, kb, strip, filters, rename, **fkw)
        sa, sb = side_a.names, side_b.names
        if not sa and not sb and (side_a.filtered_out or side_b.filtered_out):
            what = " ".join([f"--include {p}" for p in list(include or ()) + list(filters or ())]
                            + [f"--exclude {p}" for p in exclude or ()])
            raise UsageError(f"no tensor left to compare in either checkpoint after {what}")
        res = DiffResult(_shown(path_a), _shown(path_b), ia.format, ib.format, values, atol, rtol, key_a=ka, key_b=kb,
                         ignore_dtype=ignore_dtype, side_a=side_a, side_b=side_b)
        res.only_in_a = [n for n in sa if n not in sb]
        res.only_in_b = [n for n in sb if n not in sa]
        res.metadata_changes = metadata_changes(ia.metadata, ib.metadata)
        if res.only_in_a or res.only_in_b:
            res.hint = name_hint(list(sa), list(sb))
        common = [n for n in sa if n in sb]
        todo: list[tuple[str, TensorInfo, TensorInfo]] = []
        results: dict[str, TensorDiff] = {}
        for n in common:
            ta, tb = sa[n], sb[n]
            d = TensorDiff(n, ta.dtype, tb.dtype, tuple(ta.shape), tuple(tb.shape), numel=ta.numel,
                           ignore_dtype=ignore_dtype)
            results[n] = d
            if not values or d.shape_changed:
                continue
            if numeric_kind(ta.dtype) == "bytes" or numeric_kind(tb.dtype) == "bytes":
                if ta.dtype != tb.dtype:
                    continue
            todo.append((n, ta, tb))
        if values and todo:
            _compare_all(ra, rb, sa, sb, todo, results, atol, rtol, progress_factory, res)
        for n in common:
            d = results[n]
            if d.identical:
                res.identical.append(n)
            else:
                res.changed.append(d)
            if d.dtype_only:
                res.dtype_only.append(d)
        res.changed.sort(key=_rel_key)
        return res
    finally:
        for r in (ra, rb):
            if r is not None and not readers:
                r.close()


def _compare_all(ra, rb, sa, sb, todo, results, atol, rtol, progress_factory, res: DiffResult) -> None:
    from contextlib import nullcontext

    cmp = Comparer(atol, rtol)
    # tied weights: when both sides tie a name to the same partner, reuse that result
    names_a = {t.name: n for n, t in sa.items()}
    names_b = {t.name: n for n, t in sb.items()}
    total = sum(ta.nbytes + tb.nbytes for _, ta, tb in todo
                if not _tied_twin(ta, tb, names_a, names_b))
    ctx = progress_factory(total) if progress_factory else nullcontext(None)
    with ctx as bar:
        try:
            _compare_each(cmp, ra, rb, todo, results, names_a, names_b, bar, res)
        finally:
            cmp.close()


def _compare_each(cmp, ra, rb, todo, results, names_a, names_b, bar, res: DiffResult) -> None:
    adv = bar.advance if bar is not None else None
    for n, ta, tb in todo:
        twin = _tied_twin(ta, tb, names_a, names_b)
        if twin is not None and twin in results and results[twin].compared:
            results[n] = TensorDiff(**{**results[twin].__dict__, "name": n})
            continue
        tol = (res.atol, res.rtol)
        if res.ignore_dtype and ta.dtype != tb.dtype and tol == (None, None):
            tol = cast_tolerance(ta.dtype, tb.dtype)
        cmp.set_tolerance(*tol)
        acc = cmp.compare(ra, ta, rb, tb, adv)  # a read error is an error (exit 2), not a difference
        results[n] = TensorDiff.from_acc(n, ta, tb, acc)
        results[n].ignore_dtype = res.ignore_dtype
        if numeric_kind(ta.dtype) != "bytes" and tol != (None, None):
            results[n].atol, results[n].rtol = float(tol[0] or 0.0), float(tol[1] or 0.0)
        res.bytes_compared += ta.nbytes + tb.nbytes


def _tied_twin(ta: TensorInfo, tb: TensorInfo, names_a: dict[str, str], names_b: dict[str, str]) -> str | None:
    if ta.alias_of and tb.alias_of:
        na, nb = names_a.get(ta.alias_of), names_b.get(tb.alias_of)
        if na is not None and na == nb:
            return na
    return None


# ---- two runs --------------------------------------------------------------------------------------
@dataclass
class StepDiff:
    step: int
    path_a: str
    path_b: str
    equal: bool | None = None
    num_changed: int = 0
    num_identical: int = 0
    only_in_a: int = 0
    only_in_b: int = 0
    max_rel_l2: float | None = None
    max_rel_name: str | None = None
    nonfinite: list[str] = field(default_factory=list)
    error: str | None = None
    metrics_a: dict[str, float] = field(default_factory=dict)  # the run's metrics at this step
    metrics_b: dict[str, float] = field(default_factory=dict)
    num_dtype_only: int = 0
    left_out: tuple[int, int] = (0, 0)  # tensors left out by the model-weights default, per side
    hint: str | None = None  # how to align the names (see name_hint)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "a": self.path_a, "b": self.path_b, "equal": self.equal,
            "metrics": {"a": {k: _jf(v) for k, v in self.metrics_a.items()},
                        "b": {k: _jf(v) for k, v in self.metrics_b.items()}},
            "num_changed": self.num_changed, "num_identical": self.num_identical,
            "num_dtype_only": self.num_dtype_only,
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
            "max_rel_l2": _jf(self.max_rel_l2), "max_rel_l2_tensor": self.max_rel_name,
            "nonfinite_tensors": self.nonfinite, "left_out": list(self.left_out), "hint": self.hint, "error": self.error,
        }


@dataclass
class RunDiff:
    run_a: str
    run_b: str
    steps: list[StepDiff] = field(default_factory=list)
    missing_in_a: list[int] = field(default_factory=list)  # steps only B has
    missing_in_b: list[int] = field(default_factory=list)  # steps only A has
    unstepped_a: list[str] = field(default_factory=list)
    unstepped_b: list[str] = field(default_factory=list)
    root: str = ""  # the sub-tree compared when the model-weights default applied

    @property
    def equal(self) -> bool:
        return (not self.missing_in_a and not self.missing_in_b
                and all(s.equal for s in self.steps))

    @property
    def metric_names(self) -> list[str]:
        """Every metric either run has at a common step, in order of first appearance."""
        seen: dict[str, None] = {}
        for s in self.steps:
            for k in list(s.metrics_a) + list(s.metrics_b):
                seen.setdefault(k, None)
        return list(seen)

    @property
    def left_out(self) -> tuple[int, int]:
        return (max((s.left_out[0] for s in self.steps), default=0),
                max((s.left_out[1] for s in self.steps), default=0))

    def to_json(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a, "run_b": self.run_b, "equal": self.equal,
            "metrics": self.metric_names,
            "steps": [s.to_json() for s in self.steps],
            "missing_in_a": self.missing_in_a, "missing_in_b": self.missing_in_b,
            "unstepped_a": self.unstepped_a, "unstepped_b": self.unstepped_b,
        }


def _run_checkpoints(run_dir: str | os.PathLike):
    from ckptctl.ops.runs import discover

    cks = discover(run_dir)
    by_step: dict[int, Any] = {}
    unstepped: list[str] = []
    for c in cks:
        if c.step is None:
            unstepped.append(c.path.name)
        elif c.step not in by_step:  # first by the runs module's order
            by_step[c.step] = c
    return by_step, unstepped


def diff_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, *, on_step: Callable[[StepDiff], None] | None = None,
              **kw: Any) -> RunDiff:
    """Align two runs by step and diff each common step's checkpoints."""
    a, ua = _run_checkpoints(run_a)
    b, ub = _run_checkpoints(run_b)
    res = RunDiff(str(run_a), str(run_b), unstepped_a=ua, unstepped_b=ub)
    res.missing_in_b = sorted(s for s in a if s not in b)
    res.missing_in_a = sorted(s for s in b if s not in a)
    for step in sorted(s for s in a if s in b):
        ca, cb = a[step], b[step]
        sd = StepDiff(step, str(ca.path), str(cb.path), metrics_a=dict(ca.metrics or {}),
                      metrics_b=dict(cb.metrics or {}))
        try:
            d = diff_checkpoints(ca.path, cb.path, **kw)
        except CkptError as e:
            sd.error = str(e)
            sd.equal = False
        else:
            sd.equal = d.equal
            sd.num_changed = len(d.changed)
            sd.num_identical = len(d.identical)
            sd.only_in_a, sd.only_in_b = len(d.only_in_a), len(d.only_in_b)
            sd.num_dtype_only = len(d.dtype_only)
            sd.left_out = d.left_out
            sd.hint = d.hint
            res.root = res.root or (d.side_a.root if d.side_a else "") or (d.side_b.root if d.side_b else "")
            rels = [(x.rel_l2, x.name) for x in d.changed if x.rel_l2 is not None]
            if rels:
                sd.max_rel_l2, sd.max_rel_name = max(rels, key=lambda r: math.inf if math.isnan(r[0]) else r[0])
            sd.nonfinite = d.nonfinite
        res.steps.append(sd)
        if on_step:
            on_step(sd)
    return res


# ---- along one run -----------------------------------------------------------------------------------
@dataclass
class AlongStep:
    """One checkpoint of a run. Norms follow IEEE arithmetic: a NaN in the weights makes the
    weight norm and the updates that involve it NaN, an Inf makes them inf (never 0)."""

    step: int | None
    path: str
    weight_norm: float = 0.0
    update_rel_l2: float | None = None  # ||w_i - w_{i-1}|| / ||w_{i-1}||
    update_norm: float | None = None
    nonfinite: int = 0  # NaN/Inf elements in this checkpoint
    nonfinite_tensors: list[str] = field(default_factory=list)
    top_tensor: str | None = None  # tensor with the largest relative update
    top_rel_l2: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "path": self.path, "weight_norm": _jf(self.weight_norm),
            "update_rel_l2": _jf(self.update_rel_l2), "update_norm": _jf(self.update_norm),
            "num_nonfinite": self.nonfinite, "nonfinite_tensors": self.nonfinite_tensors,
            "top_tensor": self.top_tensor, "top_rel_l2": _jf(self.top_rel_l2), "error": self.error,
        }


@dataclass
class Along:
    run: str
    steps: list[AlongStep] = field(default_factory=list)
    num_tensors: int = 0
    not_in_all: list[str] = field(default_factory=list)  # tensors some checkpoints lack (skipped)
    skipped: list[str] = field(default_factory=list)  # checkpoints that could not be read
    left_out: int = 0  # tensors a checkpoint left out by the model-weights default (the most of any)
    root: str = ""  # the sub-tree compared ('' for all)

    @property
    def first_nonfinite(self) -> AlongStep | None:
        for s in self.steps:
            if s.nonfinite:
                return s
        return None

    def to_json(self) -> dict[str, Any]:
        f = self.first_nonfinite
        return {
            "run": self.run,
            "num_checkpoints": len(self.steps),
            "num_tensors": self.num_tensors,
            "first_nonfinite_step": f.step if f else None,
            "first_nonfinite_path": f.path if f else None,
            "steps": [s.to_json() for s in self.steps],
            "not_in_all": self.not_in_all,
            "skipped": self.skipped,
            "root": self.root,
            "left_out": self.left_out,
        }


def _rel(d2: float, p2: float) -> float:
    """sqrt(d2) / sqrt(p2): NaN when either is NaN, inf for a change from zero."""
    if math.isnan(d2) or math.isnan(p2):
        return math.nan
    if p2 > 0:
        return math.sqrt(d2) / math.sqrt(p2) if math.isfinite(p2) or math.isfinite(d2) else math.nan
    return 0.0 if d2 == 0 else math.inf


ALONG_BUDGET = 128 * 1024 * 1024  # bytes of raw chunks held at once across all checkpoints
ALONG_CHUNK = 1 << 21  # at most this many elements per chunk (a few float64 copies live at once)


def along_run(
    run_dir: str | os.PathLike, *, key: str | None = None, strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None, rename: list[str] | None = None, all_: bool = False,
    include: list[str] | None = None, exclude: list[str] | None = None,
    progress_factory: Callable[[int], Any] | None = None,
) -> Along:
    """Walk a run's checkpoints in step order: update size, weight norm, first NaN/Inf.

    Tensors as `pick` chooses them: the model weights of a training checkpoint by default (its
    optimizer state and callbacks never enter the norms or the NaN count), `all_` everything.

    Each file is read once: for each tensor, the same chunk of every checkpoint is read in step
    order and compared with the previous step's chunk (the only one kept, as float64).
    """
    import numpy as np
    from contextlib import nullcontext

    from ckptctl.ops.runs import discover

    cks = discover(run_dir)
    res = Along(str(run_dir))
    readers: list[Reader] = []
    sels: list[dict[str, TensorInfo]] = []
    try:
        for c in cks:
            if c.error and c.info is None:
                res.skipped.append(f"{c.path.name}: {c.error}")
                continue
            try:
                r = open_checkpoint(c.path)
                info = r.info()
            except CkptError as e:
                res.skipped.append(f"{c.path.name}: {e.message}")
                continue
            try:
                side = pick(info, _resolve_key(info, key), strip, filters, rename, all_=all_, include=include,
                            exclude=exclude)
            except BaseException:
                r.close()
                raise
            readers.append(r)
            sels.append(side.names)
            res.left_out = max(res.left_out, side.left_out)
            res.root = res.root or side.root
            res.steps.append(AlongStep(c.step, str(c.path)))
        if len(readers) < 1:
            raise UsageError("no readable checkpoint in this run folder", run_dir)
        first = sels[0]
        names = [n for n in first if all(n in s for s in sels[1:])
                 and numeric_kind(first[n].dtype) in ("float", "complex")
                 and all(s[n].shape == first[n].shape for s in sels[1:])
                 and first[n].alias_of is None]
        every = set().union(*[set(s) for s in sels])
        res.not_in_all = sorted(n for n in every if not all(n in s for s in sels))
        res.num_tensors = len(names)
        n_ck = len(readers)
        ssq_w = [0.0] * n_ck
        ssq_d = [0.0] * n_ck
        ssq_p = [0.0] * n_ck
        top: list[tuple[float, str | None]] = [(-1.0, None)] * n_ck
        total = sum(s[n].nbytes for s in sels for n in names)
        ctx = progress_factory(total) if progress_factory else nullcontext(None)
        holders = [[bytearray(0)] for _ in readers]  # one read buffer per checkpoint, kept across tensors
        work: dict[Any, Any] = {}  # float64 (complex128) buffers: two chunks and one block

        def scratch(dt, n: int):
            arrs = work.get(dt)
            if arrs is None or len(arrs[0]) < n:
                arrs = work[dt] = (np.empty(n, dt), np.empty(n, dt), np.empty(BLOCK, dt))
            return arrs

        with ctx as bar, np.errstate(all="ignore"):
            for n in names:
                isz = max(itemsize(s[n].dtype) for s in sels)
                elems = max(BLOCK, min(ALONG_CHUNK, ALONG_BUDGET // (n_ck * isz)))
                elems -= elems % BLOCK
                its = [iter(ChunkSource(r, s[n], elems * itemsize(s[n].dtype), bufs=h))
                       for r, s, h in zip(readers, sels, holders)]
                wdt = np.dtype(np.complex128 if numeric_kind(first[n].dtype) == "complex" else np.float64)
                pair = scratch(wdt, min(elems, max(1, first[n].numel)))
                t_d = [0.0] * n_ck
                t_p = [0.0] * n_ck
                while True:
                    prev = None
                    prev_ss = 0.0
                    done = False
                    for i, (it, s) in enumerate(zip(its, sels)):
                        chunk = next(it, None)
                        if chunk is None:
                            done = True
                            break
                        x = as_array(chunk, s[n].dtype)
                        X = pair[i % 2][: len(x)]
                        np.copyto(X, x, casting="unsafe")
                        ss = _dot(X, X)
                        if not math.isfinite(ss):  # NaN/Inf stay in: the norms become nan/inf
                            bad = X.size - int(np.count_nonzero(np.isfinite(X)))
                            if bad:
                                res.steps[i].nonfinite += bad
                                if n not in res.steps[i].nonfinite_tensors:
                                    res.steps[i].nonfinite_tensors.append(n)
                        ssq_w[i] += ss
                        if prev is not None:
                            dd = 0.0
                            D0 = pair[2]
                            for b in range(0, len(X), BLOCK):
                                e = min(len(X), b + BLOCK)
                                D = D0[: e - b]
                                np.subtract(X[b:e], prev[b:e], out=D)
                                dd += _dot(D, D)
                            ssq_d[i] += dd
                            ssq_p[i] += prev_ss
                            t_d[i] += dd
                            t_p[i] += prev_ss
                        prev, prev_ss = X, ss
                        if bar is not None:
                            bar.advance(len(chunk))
                    if done:
                        break
                for i in range(1, n_ck):
                    rel = _rel(t_d[i], t_p[i])
                    if rel > top[i][0]:  # (a NaN update never wins: the NaN/Inf column names it)
                        top[i] = (rel, n)
        for i, s in enumerate(res.steps):
            s.weight_norm = math.sqrt(ssq_w[i])
            if i > 0:
                s.update_norm = math.sqrt(ssq_d[i])
                s.update_rel_l2 = _rel(ssq_d[i], ssq_p[i])
                if top[i][1] is not None:
                    s.top_rel_l2, s.top_tensor = top[i]
        return res
    finally:
        for r in readers:
            r.close()


def _shown(path) -> str:
    """A path as given; a URL whole again (a Path folds the '//' of s3://b/k)."""
    from ckptctl.sources import as_path

    return str(as_path(path))
