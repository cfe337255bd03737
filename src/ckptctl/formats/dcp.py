"""torch.distributed.checkpoint folders: `.metadata` plus `__<rank>_<n>.distcp` files.

`.metadata` is a plain pickle (protocol 4) of `Metadata(state_dict_metadata={fqn:
TensorStorageMetadata(properties, size, chunks) | BytesStorageMetadata}, storage_data=
{MetadataIndex(fqn, offset): _StorageInfo(relative_path, offset, length)}, ...)`. It is read with
the restricted unpickler: those classes are never imported, their BUILD state gives the fields.

Each item at (offset, length) of a `.distcp` file is a complete torch.save zip (or, with the
safetensors serialization format, the raw bytes). Listing reads `.metadata` only, plus the small
non-tensor items (`BytesStorageMetadata`: step counters, strings) for their values. A tensor
saved in several chunks is assembled in C order block by block: each output block of at most
`size` bytes (or MIN_READ) is filled from the chunks it overlaps, so memory stays bounded
whatever the chunk layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, NotFound
from ckptctl.formats import pickles
from ckptctl.formats.pickle_reader import PickleBasedReader, pickle_failure
from ckptctl.formats.strided import (
    FileBlob,
    MissingLoc,
    TensorLoc,
    _pieces,
    _swap,
    boxes,
    c_contiguous,
    fill,
    iter_view,
)
from ckptctl.formats.torch_archive import TorchArchive
from ckptctl.model import CheckpointInfo, ObjectInfo, TensorInfo
from ckptctl.sources import as_path, file_size, is_remote, open_file

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

BYTES_ITEM_MAX = 1 << 20  # non-tensor items up to this size are read for their value


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # absolute path of the .distcp file
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DCPLoc:
    chunks: tuple[Chunk, ...]
    itemsize: int

    def describe(self) -> dict[str, Any]:
        return {
            "chunks": [
                {
                    "offsets": list(c.offsets),
                    "sizes": list(c.sizes),
                    "file": os.path.basename(c.file),
                    "offset": c.offset,
                    "length": c.length,
                }
                for c in self.chunks
            ]
        }


def _fields(obj: Any) -> dict:
    if isinstance(obj, pickles.Opaque):
        return obj.fields()
    if isinstance(obj, dict):
        return obj
    return {}


def _shape(v: Any, what: str, path) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or any(type(x) is not int or x < 0 for x in v):
        raise CorruptFile(f".metadata: {what} is not a tuple of sizes", path)
    return tuple(v)


class DCPReader(PickleBasedReader):
    format = "dcp"

    def __init__(self, path):
        super().__init__(path)
        self._items: dict[tuple[str, int], TensorLoc] = {}

    def _load_info(self) -> CheckpointInfo:
        folder = self.path  # a Path, or a sources.RemotePath
        md_path = folder / ".metadata"
        if not md_path.is_file():
            raise NotFound("no .metadata in this folder: not a torch.distributed.checkpoint", folder)
        with open_file(md_path) as f:
            size = file_size(f)
            m = pickles.Machine(f, start=0, end=size, path=md_path)
            try:
                root = m.load()
            except pickles.PickleError as e:
                raise pickle_failure(e, ".metadata", md_path) from None
        globals_ = list(m.globals)
        warnings = list(m.warnings)
        top = _fields(root)
        sdm = top.get("state_dict_metadata")
        sdata = top.get("storage_data")
        if not isinstance(sdm, dict) or not isinstance(sdata, dict):
            raise CorruptFile(".metadata is not a torch.distributed.checkpoint Metadata object", md_path)

        index: dict[tuple[str, tuple], tuple[str, int, int, tuple]] = {}
        files: dict[str, None] = {os.fspath(md_path): None}
        for mi, si in sdata.items():
            mf, sf = _fields(mi), _fields(si)
            fqn = mf.get("fqn")
            off = mf.get("offset")
            rel = sf.get("relative_path")
            o, ln = sf.get("offset"), sf.get("length")
            if (
                not isinstance(fqn, str)
                or not isinstance(rel, str)
                or type(o) is not int
                or type(ln) is not int
                or o < 0
                or ln < 0
            ):
                raise CorruptFile(".metadata: a storage entry without fqn, file, offset or length", md_path)
            full = self._item_path(folder, rel, md_path)
            files[full] = None
            td = sf.get("transform_descriptors") or ()
            key = (fqn, tuple(off) if isinstance(off, (tuple, list)) else ())
            index[key] = (full, o, ln, tuple(str(x) for x in td))

        sizes: dict[str, int] = {}
        for full in files:
            if full.endswith(".metadata"):
                continue
            try:
                sizes[full] = as_path(full).stat().st_size
            except (OSError, NotFound):
                raise CorruptFile(f"data file {os.path.basename(full)} is missing", folder) from None
        for (fqn, _), (full, o, ln, _td) in index.items():
            if o + ln > sizes[full]:
                raise CorruptFile(
                    f"{fqn!r}: item at {o}+{ln} runs past the end of {os.path.basename(full)} "
                    f"({sizes[full]} bytes; truncated?)",
                    folder,
                )

        tensors: list[TensorInfo] = []
        meta: dict[str, Any] = {}
        objects: list[ObjectInfo] = []
        for fqn, smd in sdm.items():
            fqn = str(fqn)
            f_ = _fields(smd)
            typ = smd.type if isinstance(smd, pickles.Opaque) else type(smd).__name__
            if typ.endswith("BytesStorageMetadata"):
                item = index.get((fqn, ())) or next((v for k, v in index.items() if k[0] == fqn), None)
                if item is None:
                    raise CorruptFile(f".metadata: no storage entry for {fqn!r}", md_path)
                self._bytes_item(fqn, item, meta, objects, globals_, warnings)
                continue
            if "chunks" not in f_:
                raise CorruptFile(f".metadata: {fqn!r} is neither tensor nor bytes metadata ({typ})", md_path)
            props = f_.get("properties")
            pstate = props.state if isinstance(props, pickles.Opaque) else props
            dt_g = None
            if isinstance(pstate, tuple) and pstate:
                dt_g = pstate[0]
            elif isinstance(pstate, dict):
                dt_g = pstate.get("dtype")
            elif isinstance(props, pickles.Opaque):
                dt_g = props.fields().get("dtype")
            if not isinstance(dt_g, pickles.Global) or dt_g.name not in dtypes.BY_NAME:
                raise CorruptFile(f".metadata: {fqn!r} has no known dtype", md_path)
            dtype = dt_g.name
            shape = _shape(f_.get("size"), f"{fqn!r} size", md_path)
            chunks: list[Chunk] = []
            covered = 0
            for ch in f_.get("chunks") or ():
                cf = _fields(ch)
                offs = _shape(cf.get("offsets"), f"{fqn!r} chunk offsets", md_path)
                szs = _shape(cf.get("sizes"), f"{fqn!r} chunk sizes", md_path)
                if (
                    len(offs) != len(shape)
                    or len(szs) != len(shape)
                    or any(o + s > d for o, s, d in zip(offs, szs, shape))
                ):
                    raise CorruptFile(f".metadata: a chunk of {fqn!r} lies outside its size {list(shape)}", md_path)
                item = index.get((fqn, offs))
                if item is None:
                    raise CorruptFile(f".metadata: no storage entry for chunk {list(offs)} of {fqn!r}", md_path)
                chunks.append(Chunk(offs, szs, item[0], item[1], item[2], item[3]))
                covered += math.prod(szs)
            if covered != math.prod(shape):
                raise CorruptFile(
                    f".metadata: the chunks of {fqn!r} cover {covered} of {math.prod(shape)} elements", md_path
                )
            d = dtypes.BY_NAME[dtype]
            tensors.append(
                TensorInfo(fqn, dtype, shape, dtypes.nbytes(d, shape), loc=DCPLoc(tuple(chunks), d.itemsize))
            )
        version = top.get("version")
        if isinstance(version, (str, int)):
            meta.setdefault("version", version)
        return CheckpointInfo(
            path=os.fspath(self.path),
            format=self.format,
            tensors=tensors,
            metadata=meta,
            objects=objects,
            globals=list(dict.fromkeys(globals_)),
            kind="dcp",
            files=list(files),
            warnings=warnings,
        )

    @staticmethod
    def _item_path(folder: Path | RemotePath, rel: str, md_path) -> str:
        p = PurePosixPath(rel)
        if not rel or "\x00" in rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
            raise CorruptFile(f".metadata names a data file outside the folder: {rel!r:.80}", md_path)
        return os.fspath(folder / p)

    def _bytes_item(self, fqn: str, item, meta: dict, objects: list, globals_: list, warnings: list) -> None:
        full, o, ln, td = item
        if td or ln > BYTES_ITEM_MAX:
            objects.append(ObjectInfo(fqn, "bytes"))
            return
        with open_file(full) as f:
            f.seek(o)
            head = f.read(4)
        if head != b"PK\x03\x04":
            objects.append(ObjectInfo(fqn, "bytes"))
            return
        arch = TorchArchive(full, base=o, length=ln, label=f"{fqn} ({os.path.basename(full)}@{o})")
        try:
            root, g, w, _st = arch.unpickle()
        except pickles.PickleError as e:
            e.globals = list(dict.fromkeys(globals_ + e.globals))
            raise
        finally:
            arch.close()
        globals_.extend(g)
        warnings.extend(w)
        if root is None or isinstance(root, (bool, int, float, str)):
            meta[fqn] = pickles.render(root)
        elif isinstance(root, pickles.Opaque):
            objects.append(ObjectInfo(fqn, root.type))
        else:
            meta[fqn] = pickles.render(root)

    # -- data ---------------------------------------------------------------------------------
    def _item_loc(self, ch: Chunk, dtype: str, name: str) -> TensorLoc:
        key = (ch.file, ch.offset)
        loc = self._items.get(key)
        if loc is not None:
            return loc
        if ch.transforms:
            raise CorruptFile(
                f"{name!r} is stored with transforms ({', '.join(ch.transforms)}) that ckptctl does not read", self.path
            )
        d = dtypes.BY_NAME[dtype]
        head = self._pread(ch.file, ch.offset, min(4, ch.length)) if ch.length else b""
        if head == b"PK\x03\x04":
            arch = TorchArchive(
                ch.file,
                base=ch.offset,
                length=ch.length,
                label=f"{self.path}: {name} ({os.path.basename(ch.file)}@{ch.offset})",
            )
            try:
                root, _g, _w, _st = arch.unpickle()
                if not isinstance(root, pickles.TensorRecord) or root.storage is None:
                    raise CorruptFile(f"item of {name!r} is not a tensor", self.path)
                if root.dtype != dtype or root.shape != ch.sizes:
                    raise CorruptFile(
                        f"item of {name!r} holds {root.dtype}{list(root.shape)}, .metadata says "
                        f"{dtype}{list(ch.sizes)}",
                        self.path,
                    )
                st = root.storage
                blob = arch.blob(st)
                blob.file_offset(self)  # resolve now: the archive is closed below
                from ckptctl.formats.strided import swap_unit

                loc = TensorLoc(
                    blob,
                    st.view_offset * dtypes.BY_NAME[st.dtype].itemsize + root.offset * d.itemsize,
                    root.stride,
                    d.itemsize,
                    swap_unit(dtype, arch.big_endian),
                    key=st.key,
                    storage_dtype=st.dtype,
                )
            finally:
                arch.close()
        else:
            need = math.prod(ch.sizes) * d.itemsize
            if ch.length != need:
                raise CorruptFile(
                    f"item of {name!r} is {ch.length} bytes, {dtype}{list(ch.sizes)} needs {need}", self.path
                )
            stride: tuple[int, ...] = ()
            acc = 1
            for s in reversed(ch.sizes):
                stride = (acc,) + stride
                acc *= s
            loc = TensorLoc(
                FileBlob(ch.file, ch.length, offset=ch.offset, what=f"item of {name!r}"), 0, stride, d.itemsize
            )
        self._items[key] = loc
        return loc

    def _iter_loc(self, t: TensorInfo, loc: Any, size: int):
        if isinstance(loc, MissingLoc):
            raise CorruptFile(f"tensor {t.name!r} has no data ({loc.reason})", self.path)
        if not loc.chunks or t.numel == 0:
            return
        if len(loc.chunks) == 1:
            cl = self._item_loc(loc.chunks[0], t.dtype, t.name)
            yield from iter_view(lambda off, n: cl.blob.read(self, off, n), cl, t.shape, size, self.min_read)
            return
        import numpy as np

        isz = loc.itemsize
        size = max(1, int(size))
        vdt = np.dtype(f"V{isz}")
        budget = max(size, self.min_read, isz)
        min_elems = max(1, self.min_read // isz)
        for lo, hi in boxes(t.shape, isz, budget):
            bshape = tuple(h - l for l, h in zip(lo, hi))
            out = np.empty(bshape, dtype=vdt)
            for ch in loc.chunks:
                ilo = [max(l, o) for l, o in zip(lo, ch.offsets)]
                ihi = [min(h, o + s) for h, o, s in zip(hi, ch.offsets, ch.sizes)]
                if any(a >= b for a, b in zip(ilo, ihi)):
                    continue
                cl = self._item_loc(ch, t.dtype, t.name)
                sub_shape = tuple(b - a for a, b in zip(ilo, ihi))
                sub_off = sum((a - o) * st for a, o, st in zip(ilo, ch.offsets, cl.stride))
                sl = tuple(slice(a - l, b - l) for a, b, l in zip(ilo, ihi, lo))
                target = out[sl] if sl else out

                def read(off: int, n: int, cl=cl) -> bytes:
                    return cl.blob.read(self, off, n)

                if cl.swap:
                    tmp = np.empty(sub_shape, dtype=vdt)
                    fill(read, cl.byte_base, isz, sub_off, sub_shape, cl.stride, tmp, min_elems)
                    target[...] = np.frombuffer(_swap(tmp.tobytes(), cl.swap), dtype=vdt).reshape(sub_shape)
                else:
                    fill(read, cl.byte_base, isz, sub_off, sub_shape, cl.stride, target, min_elems)
            yield from _pieces(out.tobytes(), size)

    def byte_range(self, name: str):
        t = self.tensor_info(name)
        loc = t.loc
        if not isinstance(loc, DCPLoc) or len(loc.chunks) != 1:
            return None
        cl = self._item_loc(loc.chunks[0], t.dtype, t.name)
        if not isinstance(cl.blob, FileBlob):  # (always one: items are files)
            return None
        if cl.swap or (t.numel and not c_contiguous(t.shape, cl.stride)) or is_remote(cl.blob.path):
            return None
        return (cl.blob.path, cl.blob.file_offset(self) + cl.byte_base, t.nbytes)

    def scan_items(self) -> tuple[list[str], list[str]]:
        """Globals of every item's pickle (for `scan`): (globals, errors). Never raises for bad pickles."""
        found: list[str] = []
        errors: list[str] = []
        info = self.info()
        seen: set[tuple[str, int]] = set()
        for t in info.tensors:
            loc = t.loc
            if not isinstance(loc, DCPLoc):
                continue
            for ch in loc.chunks:
                if (ch.file, ch.offset) in seen or not ch.length:
                    continue
                seen.add((ch.file, ch.offset))
                if self._pread(ch.file, ch.offset, min(4, ch.length)) != b"PK\x03\x04":
                    continue
                try:
                    arch = TorchArchive(
                        ch.file,
                        base=ch.offset,
                        length=ch.length,
                        label=f"{t.name} ({os.path.basename(ch.file)}@{ch.offset})",
                    )
                except CorruptFile as e:
                    errors.append(str(e))
                    continue
                try:
                    _root, g, _w, _st = arch.unpickle()
                    found.extend(g)
                except pickles.PickleError as e:
                    found.extend(e.globals)
                    errors.append(str(e))
                except CorruptFile as e:
                    errors.append(str(e))
                finally:
                    arch.close()
        return found, errors
