"""PyTorch zip checkpoints (`torch.save` default since 1.6): `.pt`, `.pth`, `.bin`, `.ckpt`.

The zip's central directory gives every member's size and local-header offset; a member's bytes
start at local_header_offset + 30 + name_len + LOCAL extra_len (torch pads that extra field so
that data is 64-byte aligned). CRCs may be zero, so members are read by offset, never through
zipfile.read. `data.pkl` goes through the restricted unpickler (pickles.Machine); its persistent
ids name storages `data/<key>`. Tensor bytes are read with os.pread only when asked for
(iter_chunks), contiguous views directly, strided views (transposes, Fortran order, stride-0
expands) slab by slab in bounded memory.

TorchScript archives (`torch.jit.save`) are read here too (TorchScriptReader): the same zip
layout, with a module tree in data.pkl and code in `code/` that is listed, never run.

This module also holds what the other pickle-based readers share: `PickleBasedReader` (file
descriptors, iter_chunks, byte_range over `TensorLoc`s) and the strided-view engine.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, UnknownFormat
from ckptctl.formats import pickles
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import file_size, is_remote, open_file, open_source

MIN_READ = 64 * 1024  # strided reads fetch at least this much storage at once
MAX_PICKLE_IN_MEMORY = 1 << 30  # a compressed data.pkl larger than this is refused


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

    def __init__(self, data: bytes):
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
        return {"storage": self.key, "storage_dtype": self.storage_dtype, "byte_offset": self.byte_base,
                "stride": list(self.stride)}


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


def fill(read, byte_base: int, itemsize: int, off: int, shape: tuple[int, ...], stride: tuple[int, ...],
         out, min_elems: int) -> None:
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
        fill(read, byte_base, itemsize, off + i * stride[d], sub_shape, stride, out[lead + (slice(i, i + 1),)],
             min_elems)


def _swap(buf: bytearray | bytes, unit: int) -> bytes:
    import numpy as np

    return np.frombuffer(buf, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


def _pieces(buf, size: int) -> Iterator[memoryview]:
    mv = memoryview(buf)
    for i in range(0, len(mv), size):
        yield mv[i : i + size]


def iter_view(read, loc: TensorLoc, shape: tuple[int, ...], size: int, min_read: int = MIN_READ) -> Iterator[bytes | memoryview]:
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


# ---- the reader base -------------------------------------------------------------------------
class PickleBasedReader(Reader):
    """Shared by the torch zip, legacy, plain-pickle and DCP readers."""

    min_read = MIN_READ

    def __init__(self, path, raw_names: bool = False):
        super().__init__(path)
        self._srcs: dict[str, Any] = {}  # file -> sources.LocalSource / RemoteSource
        self.raw_names = raw_names  # list modules as the pickle holds them, not by state_dict() names

    def _src(self, path: str):
        src = self._srcs.get(path)
        if src is None:
            try:
                src = open_source(path)
            except OSError as e:
                raise CorruptFile(f"cannot open {path}: {e.strerror or e}", self.path) from None
            self._srcs[path] = src
        return src

    def _pread(self, path: str, offset: int, n: int) -> bytes:
        src = self._src(path)
        if src.remote:  # read-ahead window for small tensors, several requests in flight for big ones
            if offset + n > src.size:
                raise CorruptFile(f"file ends at byte {src.size}, expected data up to byte {offset + n} "
                                  "(truncated?)", path if path != os.fspath(self.path) else self.path)
            return b"".join(src.iter_range(offset, n, n or 1))
        parts = []
        got = 0
        while got < n:
            chunk = src.pread(offset + got, n - got)
            if not chunk:
                raise CorruptFile(
                    f"file ends at byte {offset + got}, expected data up to byte {offset + n} (truncated?)",
                    path if path != os.fspath(self.path) else self.path,
                )
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        srcs, self._srcs = self._srcs, {}
        for src in srcs.values():
            try:
                src.close()
            except OSError:
                pass

    def _loc(self, name: str) -> tuple[TensorInfo, Any]:
        t = self.tensor_info(name)
        return t, t.loc

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        t, loc = self._loc(name)
        if isinstance(loc, MissingLoc) or loc is None:
            reason = loc.reason if isinstance(loc, MissingLoc) else "no data"
            raise CorruptFile(f"tensor {name!r} has no data in this file ({reason})", self.path)
        yield from self._iter_loc(t, loc, size)

    def _iter_loc(self, t: TensorInfo, loc: Any, size: int) -> Iterator[bytes | memoryview]:
        def read(off: int, n: int) -> bytes:
            return loc.blob.read(self, off, n)

        yield from iter_view(read, loc, t.shape, size, self.min_read)

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        t, loc = self._loc(name)
        if not isinstance(loc, TensorLoc) or loc.swap or not isinstance(loc.blob, FileBlob):
            return None
        if t.nbytes and not c_contiguous(t.shape, loc.stride):
            return None
        if is_remote(loc.blob.path):
            return None
        return (loc.blob.path, loc.blob.file_offset(self) + loc.byte_base, t.nbytes)


# ---- building TensorInfos from the unpickled object ------------------------------------------
def tensor_infos(desc: pickles.Described, storage_blob, big_endian: bool, path) -> list[TensorInfo]:
    """TensorInfo (with TensorLoc) for each described tensor; storage_blob(StorageRef) -> Blob."""
    out: list[TensorInfo] = []
    append = out.append
    per_dtype: dict[str, tuple[int, int, int]] = {}  # dtype -> (bits, itemsize, swap unit): 10^5 tensors, few dtypes
    for name, rec, alias in desc.tensors:
        if type(rec) is pickles.TensorRecord or isinstance(rec, pickles.TensorRecord):
            dtype = rec.dtype
            known = per_dtype.get(dtype)
            if known is None:
                d = dtypes.BY_NAME[dtype]
                known = per_dtype[dtype] = (d.bits, d.itemsize, swap_unit(dtype, big_endian))
            bits, itemsize, swap = known
            numel = 1
            for s in rec.shape:
                numel *= int(s)
            nbytes = (numel * bits + 7) // 8  # dtypes.nbytes
            st = rec.storage
            if st is None:
                loc: Any = MissingLoc(rec.note or "no storage")
            else:
                sisz = dtypes.BY_NAME[st.dtype].itemsize
                loc = TensorLoc(storage_blob(st), st.view_offset * sisz + rec.offset * itemsize, rec.stride, itemsize,
                                swap, st.key, st.dtype)
            append(TensorInfo(name, dtype, rec.shape, nbytes, alias, loc))
        else:  # NumpyArray
            append(numpy_info(name, rec, alias, path))
    return out


def numpy_info(name: str, arr: pickles.NumpyArray, alias: str | None, path) -> TensorInfo:
    dt = pickles.numpy_torch_dtype(arr.dtype)
    assert dt is not None
    d = dtypes.BY_NAME[dt]
    shape = arr.shape
    numel = math.prod(shape)
    nbytes = numel * d.itemsize
    data = arr.data
    if isinstance(data, pickles.Span):
        blob: Blob = FileBlob(os.fspath(path), data.length, offset=data.offset, what=f"numpy array {name!r}")
        have = data.length
    elif isinstance(data, (bytes, bytearray)):
        blob = BytesBlob(data)
        have = len(data)
    else:
        return TensorInfo(name, dt, shape, nbytes, alias_of=alias, loc=MissingLoc("a numpy array without raw data"))
    if have != nbytes:
        raise CorruptFile(f"numpy array {name!r}: {have} bytes of data for {nbytes} bytes of {dt}{list(shape)}", path)
    if arr.fortran and len(shape) > 1:
        stride, acc = [], 1
        for s in shape:
            stride.append(acc)
            acc *= s
        stride_t = tuple(stride)
    else:
        stride_t, acc = (), 1
        for s in reversed(shape):
            stride_t = (acc,) + stride_t
            acc *= s
    swap = swap_unit(dt, arr.dtype is not None and arr.dtype.byteorder == ">")
    loc = TensorLoc(blob, 0, stride_t, d.itemsize, swap, key="inline numpy array", storage_dtype=dt)
    return TensorInfo(name, dt, shape, nbytes, alias_of=alias, loc=loc)


def pickle_failure(e: pickles.PickleError, what: str, path) -> CorruptFile:
    """A CorruptFile for a pickle that failed, naming dangerous globals it asked for before that."""
    msg = e.message
    if what:
        msg = f"{what}: {msg}"
    try:
        from ckptctl.formats.pickles.safety import classify

        bad = [g for g in dict.fromkeys(e.globals + e.more_globals) if classify(g) == "dangerous"]
    except Exception:  # noqa: BLE001 - the message is still useful without it
        bad = []
    if bad:
        msg += f"; it asks for {', '.join(bad)}, which can run code (nothing was run)"
    return pickles.PickleError(msg, path, e.globals, e.pos, e.more_globals)


# ---- zip archives ----------------------------------------------------------------------------
class _Window(io.RawIOBase):
    """A read-only view of file[base:base+length] (DCP items are zips inside a bigger file)."""

    def __init__(self, f, base: int, length: int):
        self._f = f
        self._base = base
        self._len = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, off: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = off
        elif whence == 1:
            self._pos += off
        else:
            self._pos = self._len + off
        self._pos = max(0, self._pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._len - self._pos
        n = max(0, min(n, self._len - self._pos))
        if n == 0:
            return b""
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


_LOCAL = struct.Struct("<4s5H3L2H")


class TorchArchive:
    """One torch.save zip: at the start of `path` or at [base, base+length) inside it."""

    def __init__(self, path: str | os.PathLike, base: int = 0, length: int | None = None, label=None,
                 torchscript: bool = False, opened=None):
        """`opened`: the whole-file archive the registry's sniffer already opened and parsed
        (formats.OpenedZip), taken over here: its central directory is not read a second time."""
        self.path = os.fspath(path)
        self.label = label if label is not None else path  # for messages
        self.base = base
        if opened is not None and (base != 0 or length is not None):
            opened.close()
            opened = None
        if opened is not None:
            self._f, self.zip = opened.file, opened.zip
            length = self.length = file_size(self._f)
        else:
            try:
                self._f = open_file(self.path) if is_remote(self.path) else open(self.path, "rb")  # noqa: SIM115
            except OSError as e:
                raise CorruptFile(f"cannot open: {e.strerror or e}", self.label) from None
            size = file_size(self._f)
            if length is None:
                length = size - base
            if base + length > size:
                self.close()
                raise CorruptFile(f"the archive runs past the end of the file ({base + length} > {size} bytes)",
                                  self.label)
            self.length = length
            src = self._f if (base == 0 and length == size) else _Window(self._f, base, length)
            try:
                self.zip = zipfile.ZipFile(src)  # reads the central directory only
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
                    NotImplementedError, OverflowError) as e:
                self.close()
                raise CorruptFile(f"not a complete zip archive ({e}); truncated or damaged?", self.label) from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for zi in self.zip.infolist():
            self.members.setdefault(zi.filename, zi)
        names = list(self.members)
        if not names:
            self.close()
            raise CorruptFile("an empty zip archive", self.label)
        bases = {n.split("/", 1)[-1] if "/" in n else n for n in names}
        self.torchscript = "constants.pkl" in bases or any(n.endswith("/code/__torch__.py") for n in names)
        if self.torchscript and not torchscript:
            self.close()
            raise UnknownFormat("a TorchScript archive, not a checkpoint: it holds code, not only weights", self.label)
        first = names[0]
        self.prefix = first[: first.index("/") + 1] if "/" in first else ""
        if self.prefix + "data.pkl" not in self.members:
            cands = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not cands:
                self.close()
                raise UnknownFormat("a zip archive without data.pkl: not a PyTorch checkpoint", self.label)
            self.prefix = cands[0][: -len("data.pkl")]
        self._cd_start = getattr(self.zip, "start_dir", length)
        self._payload: dict[str, int] = {}

    def close(self) -> None:
        z = getattr(self, "zip", None)
        if z is not None:
            z.close()
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()

    def member(self, name: str) -> zipfile.ZipInfo | None:
        return self.members.get(self.prefix + name)

    def payload_offset(self, zi: zipfile.ZipInfo) -> int:
        """Absolute file offset of a member's bytes, from its LOCAL header."""
        off = self._payload.get(zi.filename)
        if off is not None:
            return off
        if not 0 <= zi.header_offset <= self.length - _LOCAL.size or zi.compress_size < 0:
            raise CorruptFile(f"zip member {zi.filename!r}: its header offset lies outside the file", self.label)
        self._f.seek(self.base + zi.header_offset)
        head = self._f.read(_LOCAL.size)
        if len(head) < _LOCAL.size:
            raise CorruptFile(f"zip member {zi.filename!r}: local header past the end of the file", self.label)
        sig, _v, _flags, _comp, _t, _d, _crc, _cs, _us, nlen, xlen = _LOCAL.unpack(head)
        if sig != b"PK\x03\x04":
            raise CorruptFile(f"zip member {zi.filename!r}: bad local header signature", self.label)
        off = self.base + zi.header_offset + _LOCAL.size + nlen + xlen
        if off + zi.compress_size > self.base + self.length:
            raise CorruptFile(
                f"zip member {zi.filename!r} runs past the end of the file (truncated?)", self.label)
        self._payload[zi.filename] = off
        return off

    def check_fits(self, zi: zipfile.ZipInfo) -> None:
        """Cheap check from the central directory: the member's bytes end before the directory."""
        if zi.header_offset < 0 or zi.header_offset + _LOCAL.size + len(zi.filename.encode("utf-8", "replace")) + zi.compress_size > self._cd_start:
            raise CorruptFile(f"zip member {zi.filename!r} overlaps the central directory (damaged archive)", self.label)

    def read_small(self, name: str, limit: int = 4096) -> bytes | None:
        zi = self.member(name)
        if zi is None or zi.file_size > limit:
            return None
        return self._member_bytes(zi)

    def _member_bytes(self, zi: zipfile.ZipInfo) -> bytes:
        off = self.payload_offset(zi)
        self._f.seek(off)
        raw = self._f.read(zi.compress_size)
        if len(raw) < zi.compress_size:
            raise CorruptFile(f"zip member {zi.filename!r} is cut short (truncated file)", self.label)
        if zi.compress_type == zipfile.ZIP_STORED:
            return raw
        if zi.compress_type == zipfile.ZIP_DEFLATED:
            if zi.file_size > MAX_PICKLE_IN_MEMORY:
                raise CorruptFile(f"zip member {zi.filename!r} is compressed and too large to list", self.label)
            try:
                d = zlib.decompressobj(-15)
                out = d.decompress(raw, zi.file_size + 1)
            except zlib.error as e:
                raise CorruptFile(f"zip member {zi.filename!r}: bad deflate data ({e})", self.label) from None
            return out
        raise CorruptFile(f"zip member {zi.filename!r} uses compression method {zi.compress_type}, "
                          "which ckptctl does not read", self.label)

    @property
    def big_endian(self) -> bool:
        bo = self.read_small("byteorder", 16)
        return bo is not None and bo.strip() == b"big"

    def unpickle(self, member: str = "data.pkl", folder: str = "data") -> tuple[Any, list[str], list[str], dict[str, pickles.StorageRef]]:
        """(root object, globals, warnings, storages by key) of data.pkl (or of another pickle whose
        storages are `<folder>/<key>`: TorchScript's constants.pkl). Raises PickleError."""
        zi = self.member(member)
        assert zi is not None
        storages: dict[str, pickles.StorageRef] = {}

        def persistent_load(pid: Any) -> Any:
            return self._storage(pid, storages, folder)

        if zi.compress_type == zipfile.ZIP_STORED:
            self.check_fits(zi)
            start = self.payload_offset(zi)
            m = pickles.Machine(self._f, start=start, end=start + zi.file_size,
                                persistent_load=persistent_load, path=self.label)
        else:
            m = pickles.Machine(self._member_bytes(zi), persistent_load=persistent_load, path=self.label)
        try:
            root = m.load()
        except pickles.PickleError as e:
            raise pickle_failure(e, member, self.label) from None
        return root, m.globals, m.warnings, storages

    def _storage(self, pid: Any, storages: dict[str, pickles.StorageRef], folder: str = "data") -> pickles.StorageRef:
        if not isinstance(pid, (tuple, list)) or not pid:
            raise CorruptFile(f"a persistent id that is not a tuple ({type(pid).__name__})", self.label)
        typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) < 5:
            raise CorruptFile(f"unknown persistent id {str(typename)[:40]!r}", self.label)
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        key = str(key)
        if type(numel) is not int or numel < 0:
            raise CorruptFile(f"storage {key!r}: bad size {numel!r:.40}", self.label)
        # one storage class global serves every storage of its dtype (10^5 of them at MoE scale)
        known = self.__dict__.setdefault("_storage_dtypes", {})  # storage class global -> dtype
        dtype = known.get(storage_type) if type(storage_type) is pickles.Global else None
        if dtype is None:
            dtype = storage_dtype(storage_type, self.label)
            if type(storage_type) is pickles.Global:
                known[storage_type] = dtype
        ref = storages.get(key)
        if ref is not None:
            if ref.dtype != dtype:
                raise CorruptFile(f"storage {key!r} is named with two dtypes ({ref.dtype}, {dtype})", self.label)
            return ref
        zi = self.member(f"{folder}/{key}")
        if zi is None:
            raise CorruptFile(f"storage {folder}/{key} is missing from the archive", self.label)
        self.check_fits(zi)
        need = numel * dtypes.BY_NAME[dtype].itemsize
        if zi.file_size < need:
            raise CorruptFile(
                f"storage {folder}/{key} holds {zi.file_size} bytes, but {numel} {dtype} elements need {need}", self.label)
        ref = pickles.StorageRef(key=key, dtype=dtype, numel=numel, location=str(_location))
        ref.extra = zi
        storages[key] = ref
        return ref

    def blob(self, ref: pickles.StorageRef) -> FileBlob:
        zi = ref.extra
        if zi.compress_type != zipfile.ZIP_STORED:
            def bad() -> int:
                raise CorruptFile(f"storage {zi.filename!r} is compressed; ckptctl reads stored (uncompressed) "
                                  "storages only", self.label)
            return FileBlob(self.path, zi.file_size, resolve=bad, what=f"storage {zi.filename!r}")
        return FileBlob(self.path, zi.file_size, resolve=lambda: self.payload_offset(zi), what=f"storage {zi.filename!r}")


def storage_dtype(storage_type: Any, label) -> str:
    """dtype name of a storage class global (torch.FloatStorage, torch.storage.UntypedStorage, ...)."""
    name = storage_type.name if isinstance(storage_type, pickles.Global) else str(storage_type)
    name = name.rsplit(".", 1)[-1]
    if name in dtypes.BY_STORAGE:
        return dtypes.BY_STORAGE[name].name
    if name in ("UntypedStorage", "_UntypedStorage", "ByteStorage"):
        return "uint8"
    raise CorruptFile(f"unknown storage type {getattr(storage_type, 'full', name)!r:.80}", label)


def checkpoint_info(path, fmt: str, root: Any, globals_: list[str], warnings: list[str], blob_of,
                    big_endian: bool, metadata: dict[str, Any], raw_names: bool = False,
                    torchscript: dict | None = None) -> CheckpointInfo:
    with pickles.no_gc():
        desc = pickles.describe(root, path, raw_names=raw_names, torchscript=torchscript)
        tensors = tensor_infos(desc, blob_of, big_endian, path)
    meta = dict(desc.metadata)
    for k, v in metadata.items():
        meta.setdefault(k, v)
    return CheckpointInfo(
        path=os.fspath(path),
        format=fmt,
        tensors=tensors,
        metadata=meta,
        objects=[_obj(p, t) for p, t in desc.objects],
        globals=list(dict.fromkeys(globals_)),
        kind=desc.kind,
        files=[os.fspath(path)],
        warnings=list(dict.fromkeys(warnings + desc.warnings)),
    )


def _obj(p: str, t: str):
    from ckptctl.model import ObjectInfo

    return ObjectInfo(name=p, type=t)


class TorchZipReader(PickleBasedReader):
    format = "torch-zip"
    # what open_reader passes on (formats.READER_OPTIONS; `sniffed`: the zip the registry opened)
    options = ("raw_names", "sniffed")

    def __init__(self, path, raw_names: bool = False, sniffed=None):
        super().__init__(path, raw_names)
        self._sniffed = sniffed  # formats.OpenedZip, taken over by the first TorchArchive

    def _archive(self, torchscript: bool = False) -> TorchArchive:
        opened, self._sniffed = self._sniffed, None
        return TorchArchive(self.path, torchscript=torchscript, opened=opened)

    def _load_info(self) -> CheckpointInfo:
        arch = self._archive()
        try:
            root, globals_, warnings, _storages = arch.unpickle()
            meta: dict[str, Any] = {}
            bo = arch.read_small("byteorder", 16)
            if bo is not None:
                meta["byteorder"] = bo.decode("ascii", "replace").strip()
            fv = arch.read_small(".format_version", 64)
            if fv is not None:
                meta[".format_version"] = fv.decode("ascii", "replace").strip()
            if arch.prefix:
                meta["archive"] = arch.prefix.rstrip("/")
            big = arch.big_endian
            return checkpoint_info(self.path, self.format, root, globals_, warnings, arch.blob, big, meta,
                                   raw_names=self.raw_names)
        finally:
            self._archive_close = arch.close

    def close(self) -> None:
        opened, self._sniffed = getattr(self, "_sniffed", None), None
        if opened is not None:
            opened.close()
        closer = getattr(self, "_archive_close", None)
        if closer is not None:
            closer()
            self._archive_close = None
        super().close()


MAX_CODE_TEXT = 16 << 20  # TorchScript code read (as text, for its declarations) per archive


class TorchScriptReader(TorchZipReader):
    """A TorchScript archive (`torch.jit.save`, `torch.jit.script(m).save`): the module tree of
    data.pkl, read with the restricted unpickler like any torch pickle, is listed under the names
    `module.state_dict()` gives. Its code (`code/`) is never compiled or run: the files are listed
    with their sizes, and only each class's header lines (`class X(Module):`, `__parameters__`,
    `__buffers__`, `Final` constants) are read as text, to tell parameters and buffers from other
    tensor attributes. constants.pkl is unpickled the same restricted way (its tensors are not
    weights: they are counted in the metadata, not listed); every other pickle member
    (`*.debug_pkl`, traced_inputs.pkl, extra files) is scanned for the globals it asks for.
    """

    format = "torchscript"

    def _load_info(self) -> CheckpointInfo:
        arch = self._archive(torchscript=True)
        try:
            root, globals_, warnings, _storages = arch.unpickle()
            globals_ = list(globals_)
            meta: dict[str, Any] = {}
            code: dict[str, int] = {}
            texts: dict[str, str] = {}
            extra: dict[str, int] = {}
            budget = MAX_CODE_TEXT
            pre = arch.prefix
            for name, zi in arch.members.items():
                if not name.startswith(pre) or zi.filename.endswith("/"):
                    continue
                rel = name[len(pre):]
                if rel.startswith("code/"):
                    code[rel] = zi.file_size
                    if rel.endswith(".py") and zi.file_size <= budget and not self.raw_names:
                        budget -= zi.file_size
                        texts[rel] = arch._member_bytes(zi).decode("utf-8", "replace")
                elif rel.startswith("extra/"):
                    extra[rel[len("extra/"):]] = zi.file_size
            if budget <= 0 or any(r.endswith(".py") and r not in texts for r in code) and not self.raw_names:
                warnings.append("some TorchScript code files are too large to read their declarations: "
                                "every tensor attribute of their classes is listed")
            if arch.member("constants.pkl") is not None:
                try:
                    consts, cglobals, cwarn, _ = arch.unpickle("constants.pkl", "constants")
                except pickles.PickleError as e:
                    globals_ += [g for g in e.globals + e.more_globals if g not in globals_]
                    warnings.append(f"constants.pkl: {e.message}")
                else:
                    globals_ += [g for g in cglobals if g not in globals_]
                    warnings += cwarn
                    n = sum(1 for _ in _tensors_in(consts))
                    if n:
                        meta["constants"] = f"{n} tensor constant(s) used by the code (not weights, not listed)"
            more, errors = _other_pickle_globals(arch)
            globals_ += [g for g in more if g not in globals_]
            warnings += errors
            for k, small in (("version", 16), ("byteorder", 16), ("producer_info", 256)):
                b = arch.read_small(k, small)
                if b is not None:
                    meta[k] = b.decode("utf-8", "replace").strip()
            if pre:
                meta["archive"] = pre.rstrip("/")
            meta["code"] = code
            if extra:
                meta["extra_files"] = extra
            decls = pickles.torchscript_decls(texts)
            return checkpoint_info(self.path, self.format, root, globals_, warnings, arch.blob, arch.big_endian,
                                   meta, raw_names=self.raw_names, torchscript=None if self.raw_names else decls)
        finally:
            self._archive_close = arch.close


def _tensors_in(obj: Any, depth: int = 0):
    if depth > 50:
        return
    if isinstance(obj, pickles.TENSORISH):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)


def _other_pickle_globals(arch: TorchArchive) -> tuple[list[str], list[str]]:
    """Globals of the archive's other pickles (debug info, traced inputs, *.pkl extra files),
    by the semantics-free scan: `scan` reports them, nothing here keeps their contents."""
    found: list[str] = []
    errors: list[str] = []
    for name, zi in arch.members.items():
        rel = name[len(arch.prefix):] if name.startswith(arch.prefix) else name
        if rel in ("data.pkl", "constants.pkl") or not rel.endswith(("pkl", ".pickle")):
            continue
        if zi.file_size > MAX_PICKLE_IN_MEMORY:
            errors.append(f"{rel}: not scanned (too large)")
            continue
        try:
            if zi.compress_type == zipfile.ZIP_STORED:
                start = arch.payload_offset(zi)
                g, err = pickles.scan_globals(arch._f, start, start + zi.file_size, arch.label)
            else:  # torch deflates the *.debug_pkl members
                raw = arch._member_bytes(zi)
                g, err = pickles.scan_globals(io.BytesIO(raw), 0, len(raw), arch.label)
        except CorruptFile as e:
            errors.append(f"{rel}: {e.message}")
            continue
        found += g
        if err:
            errors.append(f"{rel}: {err}")
    return found, errors


def scan_zip_pickles(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(globals, errors) of every pickle member of any zip archive (for `scan`), never unpickling."""
    found: list[str] = []
    errors: list[str] = []
    with open_file(path) if is_remote(path) else open(path, "rb") as f:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            return found, [f"not a complete zip archive ({e})"]
        with z:
            for zi in z.infolist():
                if zi.filename.endswith("/"):  # is_dir() fails on an empty name
                    continue
                base = zi.filename.rsplit("/", 1)[-1]
                if not (base.endswith((".pkl", ".pickle", ".debug_pkl")) or base in ("data.pkl", "constants.pkl")):
                    continue
                try:
                    f.seek(zi.header_offset)
                    head = f.read(_LOCAL.size)
                    sig, *_rest, nlen, xlen = _LOCAL.unpack(head)
                    if sig != b"PK\x03\x04":
                        raise ValueError("bad local header")
                    start = zi.header_offset + _LOCAL.size + nlen + xlen
                    if zi.compress_type == zipfile.ZIP_STORED:
                        g, err = pickles.scan_globals(f, start, start + zi.compress_size, path)
                    else:
                        if zi.file_size > MAX_PICKLE_IN_MEMORY:
                            errors.append(f"{zi.filename}: compressed and too large to scan")
                            continue
                        f.seek(start)
                        raw = zlib.decompressobj(-15).decompress(f.read(zi.compress_size), zi.file_size + 1)
                        g, err = pickles.scan_globals(io.BytesIO(raw), 0, len(raw), path)
                except (ValueError, struct.error, zlib.error, OSError) as e:
                    errors.append(f"{zi.filename}: {e}")
                    continue
                found.extend(g)
                if err:
                    errors.append(f"{zi.filename}: {err}")
    return found, errors


__all__ = ["TorchZipReader", "TorchScriptReader", "TorchArchive", "PickleBasedReader", "TensorLoc", "FileBlob", "BytesBlob",
           "iter_view", "fill", "boxes", "c_contiguous", "scan_zip_pickles", "Path"]
