"""What the pickle-based readers (torch zip, torch legacy, plain pickle, DCP) share: the reader
base (`PickleBasedReader`: byte sources, iter_chunks, byte_range over `TensorLoc`s) and the step
from an unpickled object to a CheckpointInfo (tensor_infos, numpy arrays, storage dtypes, the
message of a pickle that failed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.formats import pickles
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.formats.gcpause import paused_gc
from ckptctl.formats.strided import (
    MIN_READ,
    Blob,
    BytesBlob,
    FileBlob,
    MissingLoc,
    TensorLoc,
    c_contiguous,
    iter_view,
    swap_unit,
)
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import is_remote, open_source


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
                raise CorruptFile(
                    f"file ends at byte {src.size}, expected data up to byte {offset + n} (truncated?)",
                    path if path != os.fspath(self.path) else self.path,
                )
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
def _fast_new(cls: type, names: tuple[str, ...]) -> Any:
    """A maker of frozen dataclass `cls` that fills its __dict__ directly: the generated __init__
    sets each field through object.__setattr__ (twice the time: 10^5 objects at MoE scale). The
    same object, field for field; `cls` itself when it is not the plain dataclass this expects
    (other fields, __slots__, a __post_init__)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    if tuple(fields) != names or "__slots__" in vars(cls) or hasattr(cls, "__post_init__"):
        return cls
    # the fresh object's own __dict__ (sharing its keys with the class's other objects, as
    # __init__'s would), filled in field order
    src = f"def make({', '.join(names)}):\n    obj = new(cls)\n    d = obj.__dict__\n"
    src += "".join(f"    d[{n!r}] = {n}\n" for n in names) + "    return obj\n"
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    exec(src, scope)  # noqa: S102 - our own source text, built from the dataclass's field names
    return scope["make"]


new_tensor_info = _fast_new(TensorInfo, ("name", "dtype", "shape", "nbytes", "alias_of", "loc"))
_new_loc = _fast_new(TensorLoc, ("blob", "byte_base", "stride", "itemsize", "swap", "key", "storage_dtype"))


def tensor_infos(desc: pickles.Described, storage_blob, big_endian: bool, path) -> list[TensorInfo]:
    """TensorInfo (with TensorLoc) for each described tensor; storage_blob(StorageRef) -> Blob
    (asked once per storage: the tensors of a storage share its blob)."""
    out: list[TensorInfo] = []
    append = out.append
    per_dtype: dict[str, tuple[int, int, int]] = {}  # dtype -> (bits, itemsize, swap unit): 10^5 tensors, few dtypes
    blobs: dict[int, Any] = {}  # id(StorageRef) -> its blob (the refs live as long as desc)
    make_info, make_loc, record = new_tensor_info, _new_loc, pickles.TensorRecord
    for name, rec, alias in desc.tensors:
        if type(rec) is record or isinstance(rec, record):
            dtype = rec.dtype
            known = per_dtype.get(dtype)
            if known is None:
                d = dtypes.BY_NAME[dtype]
                known = per_dtype[dtype] = (d.bits, d.itemsize, swap_unit(dtype, big_endian))
            bits, itemsize, swap = known
            shape = rec.shape
            numel = 1
            for s in shape:
                numel *= int(s)
            st = rec.storage
            if st is None:
                loc: Any = MissingLoc(rec.note or "no storage")
            else:
                blob = blobs.get(id(st))
                if blob is None:
                    blob = blobs[id(st)] = storage_blob(st)
                view_offset = st.view_offset  # elements of the storage's dtype (legacy views)
                loc = make_loc(
                    blob,
                    (view_offset * dtypes.BY_NAME[st.dtype].itemsize if view_offset else 0) + rec.offset * itemsize,
                    rec.stride,
                    itemsize,
                    swap,
                    st.key,
                    st.dtype,
                )
            append(make_info(name, dtype, shape, (numel * bits + 7) // 8, alias, loc))  # nbytes: dtypes.nbytes
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


def storage_dtype(storage_type: Any, label) -> str:
    """dtype name of a storage class global (torch.FloatStorage, torch.storage.UntypedStorage, ...)."""
    name = storage_type.name if isinstance(storage_type, pickles.Global) else str(storage_type)
    name = name.rsplit(".", 1)[-1]
    if name in dtypes.BY_STORAGE:
        return dtypes.BY_STORAGE[name].name
    if name in ("UntypedStorage", "_UntypedStorage", "ByteStorage"):
        return "uint8"
    raise CorruptFile(f"unknown storage type {getattr(storage_type, 'full', name)!r:.80}", label)


def checkpoint_info(
    path,
    fmt: str,
    root: Any,
    globals_: list[str],
    warnings: list[str],
    blob_of,
    big_endian: bool,
    metadata: dict[str, Any],
    raw_names: bool = False,
    torchscript: dict | None = None,
) -> CheckpointInfo:
    with paused_gc():
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
