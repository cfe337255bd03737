"""Where a pickled tensor's bytes live and how to read them: storages (`Blob`s in a file or in
memory), a tensor's place in its storage (`TensorLoc`), and the strided-view engine that yields the
logical C-order bytes of any view (transposes, Fortran order, stride-0 expands, big-endian data)
slab by slab in bounded memory. Shared by every pickle-based reader (torch zip, legacy, DCP).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile

if TYPE_CHECKING:
    from ckptctl.formats.pickle_reader import PickleBasedReader

MIN_READ = 64 * 1024  # strided reads fetch at least this much storage at once


# ---- where bytes live ------------------------------------------------------------------------
class Blob:
    """A storage's bytes: `read(offset, n)` relative to the storage start."""

    nbytes: int = 0
    path: str | None = None

    def read(self, reader: PickleBasedReader, offset: int, n: int) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def file_offset(self, reader: PickleBasedReader) -> int | None:
        return None


class FileBlob(Blob):
    """Bytes in a file at an absolute offset (resolved lazily: zip local headers are read on use)."""

    path: str

    def __init__(self, path: str, nbytes: int, offset: int | None = None, resolve=None, what: str = ""):
        self.path = path
        self.nbytes = nbytes
        self._offset = offset
        self._resolve = resolve
        self.what = what

    def file_offset(self, reader: PickleBasedReader) -> int:
        if self._offset is None:
            self._offset = self._resolve()
        return self._offset

    def read(self, reader: PickleBasedReader, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.nbytes:
            raise CorruptFile(f"read past the end of {self.what or 'a storage'}", reader.path)
        return reader._pread(self.path, self.file_offset(reader) + offset, n)


class BytesBlob(Blob):
    """Bytes already in memory (small numpy arrays inline in a pickle)."""

    def __init__(self, data: bytes | bytearray):
        self.data = bytes(data)
        self.nbytes = len(self.data)

    def read(self, reader: PickleBasedReader, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]


@dataclass(frozen=True)
class TensorLoc:
    """Where one tensor's elements are: element i lies at byte byte_base + sum(i_d * stride_d) * itemsize."""

    blob: Blob
    byte_base: int
    stride: tuple[int, ...]
    itemsize: int
    swap: int = 0  # byte-swap unit (big-endian data); 0: none
    key: str = ""  # storage key / record, for humans
    storage_dtype: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "storage": self.key,
            "storage_dtype": self.storage_dtype,
            "byte_offset": self.byte_base,
            "stride": list(self.stride),
        }


@dataclass(frozen=True)
class MissingLoc:
    """A tensor listed without data (meta tensors, storages outside the file)."""

    reason: str


# ---- the strided engine ----------------------------------------------------------------------
def c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for s, st in zip(reversed(shape), reversed(stride)):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def boxes(shape: tuple[int, ...], itemsize: int, budget: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """C-order blocks (lo, hi) of a tensor, each at most `budget` bytes (or one element)."""
    nd = len(shape)
    if nd == 0:
        yield (), ()
        return
    if math.prod(shape) == 0:
        return
    inner = [1] * (nd + 1)
    for d in range(nd - 1, -1, -1):
        inner[d] = inner[d + 1] * shape[d]
    max_elems = max(1, budget // itemsize)
    k = 0
    while k < nd - 1 and inner[k + 1] > max_elems:
        k += 1
    rows = max(1, max_elems // inner[k + 1])
    for prefix in itertools.product(*(range(s) for s in shape[:k])):
        for r in range(0, shape[k], rows):
            lo = prefix + (r,) + (0,) * (nd - k - 1)
            hi = tuple(p + 1 for p in prefix) + (min(r + rows, shape[k]),) + tuple(shape[k + 1 :])
            yield lo, hi


def fill(
    read, byte_base: int, itemsize: int, off: int, shape: tuple[int, ...], stride: tuple[int, ...], out, min_elems: int
) -> None:
    """Copy the strided view (element offset off, shape, stride) into `out` (C-order, void dtype)."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    n = math.prod(shape)
    if n == 0:
        return
    span = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    if span <= max(2 * n, min_elems):
        raw = read(byte_base + off * itemsize, span * itemsize)
        src = np.frombuffer(raw, dtype=out.dtype, count=span)
        out[...] = as_strided(src, shape=shape, strides=[st * itemsize for st in stride], writeable=False)
        return
    # too sparse to read in one go: split along the dimension with the largest stride
    d = max((i for i in range(len(shape)) if shape[i] > 1), key=lambda i: stride[i])
    sub_shape = shape[:d] + (1,) + shape[d + 1 :]
    lead = (slice(None),) * d
    for i in range(shape[d]):
        fill(
            read, byte_base, itemsize, off + i * stride[d], sub_shape, stride, out[lead + (slice(i, i + 1),)], min_elems
        )


def _swap(buf: bytearray | bytes, unit: int) -> bytes:
    import numpy as np

    return np.frombuffer(buf, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


def _pieces(buf, size: int) -> Iterator[memoryview]:
    mv = memoryview(buf)
    for i in range(0, len(mv), size):
        yield mv[i : i + size]


def iter_view(
    read, loc: TensorLoc, shape: tuple[int, ...], size: int, min_read: int = MIN_READ
) -> Iterator[bytes | memoryview]:
    """The logical C-order bytes of a (possibly strided) view, in pieces of at most `size` bytes."""
    isz = loc.itemsize
    numel = math.prod(shape)
    if numel == 0:
        return
    size = max(1, int(size))
    nbytes = numel * isz
    if c_contiguous(shape, loc.stride):
        if not loc.swap:
            pos = 0
            while pos < nbytes:
                n = min(size, nbytes - pos)
                yield read(loc.byte_base + pos, n)
                pos += n
            return
        block = max(isz, (max(size, min_read) // isz) * isz)
        pos = 0
        while pos < nbytes:
            n = min(block, nbytes - pos)
            yield from _pieces(_swap(read(loc.byte_base + pos, n), loc.swap), size)
            pos += n
        return
    import numpy as np

    vdt = np.dtype(f"V{isz}")
    budget = max(size, min_read, isz)
    min_elems = max(1, min_read // isz)
    for lo, hi in boxes(shape, isz, budget):
        bshape = tuple(h - l for l, h in zip(lo, hi))
        off = sum(l * st for l, st in zip(lo, loc.stride))
        out = np.empty(bshape, dtype=vdt)
        fill(read, loc.byte_base, isz, off, bshape, loc.stride, out, min_elems)
        buf = out.tobytes()
        if loc.swap:
            buf = _swap(buf, loc.swap)
        yield from _pieces(buf, size)


def swap_unit(dtype: str, big_endian: bool) -> int:
    """Bytes per value to reverse when the data is big-endian (complex: each half); 0 for none."""
    if not big_endian:
        return 0
    d = dtypes.BY_NAME[dtype]
    unit = d.itemsize // 2 if d.kind == "complex" else d.itemsize
    return unit if unit > 1 else 0
