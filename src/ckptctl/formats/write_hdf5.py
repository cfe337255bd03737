"""Streaming HDF5 writer (h5py, imported lazily).

One dataset per tensor at its name; '/' in a name makes nested groups. The whole structure
(groups, datasets, attributes, links) is created from the plan first, with contiguous
datasets whose space is allocated at once and never filled; their file offsets are then
known, and tensor bytes go straight there (pwrite / copy_file_range), like the other writers:
bounded memory, any add order, and h5py never holds a tensor.

- dtypes HDF5 has no type for (bfloat16, float8_*, complex32, float4_e2m1fn_x2, bits*) are
  stored as raw unsigned integers of the same width with the attribute `dtype=<torch name>`
  (Keras's convention for bfloat16).
- Scalars are 0-d datasets, empty tensors zero-size datasets.
- File metadata becomes root attributes (str values as str, others as JSON).
- Tied weights are HDF5 hard links to one dataset (bytes stored once), also listed in the
  root attribute `ckptctl.aliases` (JSON {alias: target}).
- Names that cannot be HDF5 paths are refused (Incompatible) with the fix (--rename): a name
  that is also the group of another (`a` and `a/b`), empty parts (`a//b`, leading or trailing
  '/'), `.` or `..` parts. Nothing is escaped, so names read back exactly as written.
"""

from __future__ import annotations

import json

from ckptctl.errors import Incompatible
from ckptctl.formats.writeutil import AtomicFile, StreamingWriter, copy_range, writable_dtype, write_chunks
from ckptctl.model import TensorInfo

ALIASES_ATTR = "ckptctl.aliases"
NATIVE = {"float64", "float32", "float16", "complex64", "complex128", "bool",
          "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def storage_dtype(t: TensorInfo):
    """(numpy dtype stored in the file, value of the `dtype` attribute or None)."""
    import numpy as np

    d = writable_dtype(t, "HDF5")
    if t.dtype in NATIVE:
        return np.dtype(d.np).newbyteorder("<"), None
    return np.dtype(f"<u{d.itemsize}"), t.dtype


def check_paths(names: list[str]) -> None:
    """Refuse names that are not distinct HDF5 paths (see the module docstring)."""
    groups: dict[str, str] = {}
    leaves = set(names)
    for n in names:
        parts = n.split("/")
        if n == "" or any(p in ("", ".", "..") for p in parts):
            raise Incompatible(f"tensor name {n!r} is not a valid HDF5 path (empty, '.' or '..' part); "
                               "rename it with --rename")
        for i in range(1, len(parts)):
            groups.setdefault("/".join(parts[:i]), n)
    for g, child in groups.items():
        if g in leaves:
            raise Incompatible(f"tensor names {g!r} and {child!r} cannot both be HDF5 paths "
                               f"({g!r} would be a dataset and a group); rename one with --rename")


def attr_value(v):
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


class HDF5Writer(StreamingWriter):
    format = "hdf5"

    def __init__(self, path, tensors, metadata=None, *, dedupe_tied=False):
        super().__init__(path, tensors, metadata, dedupe_tied=dedupe_tied)
        stored = {t.name: storage_dtype(t) for t in tensors}
        check_paths([t.name for t in tensors])
        import h5py

        self._file = AtomicFile(self.path)
        self.offsets: dict[str, int | None] = {}
        try:
            with h5py.File(self._file.tmp, "w") as f:
                for k, v in self.metadata.items():
                    if k == ALIASES_ATTR:
                        continue
                    f.attrs[str(k)] = attr_value(v)
                lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
                lcpl.set_create_intermediate_group(True)
                lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
                for t in self.primaries:
                    dt, attr = stored[t.name]
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                    if t.shape:
                        space = h5py.h5s.create_simple(tuple(int(s) for s in t.shape))
                    else:
                        space = h5py.h5s.create(h5py.h5s.SCALAR)
                    did = h5py.h5d.create(f.id, t.name.encode("utf-8", "surrogatepass"),
                                          h5py.h5t.py_create(dt, logical=True), space, dcpl=dcpl, lcpl=lcpl)
                    off = did.get_offset() if t.nbytes else None
                    if t.nbytes and (off is None or did.get_storage_size() != t.nbytes):
                        raise Incompatible(f"tensor {t.name!r}: HDF5 did not allocate its {t.nbytes} bytes")
                    self.offsets[t.name] = off
                    if attr is not None:
                        h5py.Dataset(did).attrs["dtype"] = attr
                for alias, root in self.root.items():
                    f.id.links.create_hard(alias.encode("utf-8", "surrogatepass"), f.id,
                                           root.encode("utf-8", "surrogatepass"), lcpl=lcpl)
                if self.root:
                    f.attrs[ALIASES_ATTR] = json.dumps(self.root, ensure_ascii=False, sort_keys=True)
        except BaseException:
            self._file.abort()
            raise

    def _write_chunks(self, t: TensorInfo, chunks) -> None:
        if t.nbytes == 0:
            write_chunks(self._file.fd, 0, chunks, 0, t.name)
            return
        write_chunks(self._file.fd, self.offsets[t.name], chunks, t.nbytes, t.name, self.on_progress)

    def _write_range(self, t: TensorInfo, src, offset: int, length: int) -> None:
        if length:
            copy_range(src, offset, self._file.fd, self.offsets[t.name], length, self.on_progress)
