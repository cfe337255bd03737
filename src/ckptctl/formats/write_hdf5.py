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
- Names are HDF5 paths: each '/' makes a group. Names HDF5 cannot hold as they are (a training
  checkpoint's callback state keyed by a file path: `best_k_models//home/u/x.ckpt`) are mapped
  reversibly, and the mapping is recorded so that ckptctl's reader gives the names back exactly
  (see `hdf5_paths`): a '/' is a group separator only between two non-empty parts; every other
  '/' (leading, trailing, doubled) stays inside its part as `%2F`; in each part '%' is written
  `%25`, NUL `%00`, and a part that is `.` or `..` has its dots written `%2E`; a name that is also
  the group of another (`a` and `a/b`) gets the separator after `a` written `%2F` (`a%2Fb`).
  When any name was mapped, every name is written this way and the root attribute
  `ckptctl.name_escaping = "percent"` says so (decode: split the path at '/', replace each `%XX`
  by the character with that hex code, join with '/'); otherwise names are written unchanged
  and no attribute is added.
"""

from __future__ import annotations

import json
import re

from ckptctl.errors import Incompatible
from ckptctl.formats.writeutil import AtomicFile, StreamingWriter, copy_range, writable_dtype, write_chunks
from ckptctl.model import TensorInfo

ALIASES_ATTR = "ckptctl.aliases"
ESCAPING_ATTR = "ckptctl.name_escaping"  # value "percent": names are mapped as in the docstring
ESCAPING = "percent"
_SEPARATOR = re.compile(r"(?<=[^/])/(?=[^/])")  # a '/' between two non-empty parts
NATIVE = {
    "float64",
    "float32",
    "float16",
    "complex64",
    "complex128",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
}


def storage_dtype(t: TensorInfo):
    """(numpy dtype stored in the file, value of the `dtype` attribute or None)."""
    import numpy as np

    d = writable_dtype(t, "HDF5")
    if t.dtype in NATIVE:
        return np.dtype(d.np).newbyteorder("<"), None
    return np.dtype(f"<u{d.itemsize}"), t.dtype


def _quote(part: str) -> str:
    q = part.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    return q.replace(".", "%2E") if q in (".", "..") else q


def hdf5_paths(names: list[str]) -> dict[str, str]:
    """name -> the HDF5 path it is written at (see the module docstring); the identity when
    every name is a valid, distinct HDF5 path already."""
    for n in names:
        if n == "":
            raise Incompatible("a tensor has an empty name, which cannot be an HDF5 path; rename it with --rename")
    parts = {n: _SEPARATOR.split(n) for n in names}
    for _ in range(len(names) + 1):
        paths = {n: "/".join(_quote(p) for p in ps) for n, ps in parts.items()}
        leaves = set(paths.values())
        changed = False
        for n, ps in parts.items():
            prefix = ""
            for j in range(1, len(ps)):
                prefix = (prefix + "/" if j > 1 else "") + _quote(ps[j - 1])
                if prefix in leaves:  # a dataset of that name exists: do not make it a group too
                    parts[n] = ps[: j - 1] + [ps[j - 1] + "/" + ps[j]] + ps[j + 1 :]
                    changed = True
                    break
        if not changed:
            break
    if all(ps == n.split("/") and not any(p in (".", "..") or "\0" in p for p in ps) for n, ps in parts.items()):
        return {n: n for n in names}  # valid as they are: written unchanged ('%' too)
    return paths


def unquote_path(path: str) -> str:
    """The tensor name of a path written with the "percent" escaping."""
    return "/".join(re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), p) for p in path.split("/"))


def check_paths(names: list[str]) -> None:
    """Refuse names that cannot be written at all (only the empty name: others are mapped)."""
    hdf5_paths(names)


def attr_value(v):
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


class HDF5Writer(StreamingWriter):
    format = "hdf5"

    def __init__(self, path, tensors, metadata=None, *, dedupe_tied=False):
        super().__init__(path, tensors, metadata, dedupe_tied=dedupe_tied)
        stored = {t.name: storage_dtype(t) for t in tensors}
        paths = hdf5_paths([t.name for t in tensors])
        escaped = any(p != n for n, p in paths.items())
        import h5py

        self._file = AtomicFile(self.path)
        self.offsets: dict[str, int | None] = {}
        try:
            with h5py.File(self._file.tmp, "w") as f:
                for k, v in self.metadata.items():
                    if k in (ALIASES_ATTR, ESCAPING_ATTR):
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
                    did = h5py.h5d.create(
                        f.id,
                        paths[t.name].encode("utf-8", "surrogatepass"),
                        h5py.h5t.py_create(dt, logical=True),
                        space,
                        dcpl=dcpl,
                        lcpl=lcpl,
                    )
                    off = did.get_offset() if t.nbytes else None
                    if t.nbytes and (off is None or did.get_storage_size() != t.nbytes):
                        raise Incompatible(f"tensor {t.name!r}: HDF5 did not allocate its {t.nbytes} bytes")
                    self.offsets[t.name] = off
                    if attr is not None:
                        h5py.Dataset(did).attrs["dtype"] = attr
                for alias, root in self.root.items():
                    f.id.links.create_hard(
                        paths[alias].encode("utf-8", "surrogatepass"),
                        f.id,
                        paths[root].encode("utf-8", "surrogatepass"),
                        lcpl=lcpl,
                    )
                if self.root:  # {alias path: target path}, as stored in the file
                    f.attrs[ALIASES_ATTR] = json.dumps(
                        {paths[a]: paths[r] for a, r in self.root.items()}, ensure_ascii=False, sort_keys=True
                    )
                if escaped:
                    f.attrs[ESCAPING_ATTR] = ESCAPING
        except BaseException:
            self._file.abort()
            raise

    def _write_chunks(self, t: TensorInfo, chunks) -> None:
        if t.nbytes == 0:
            write_chunks(self._file.fileno(), 0, chunks, 0, t.name)
            return
        write_chunks(self._file.fileno(), self._offset(t), chunks, t.nbytes, t.name, self.on_progress)

    def _write_range(self, t: TensorInfo, src, offset: int, length: int) -> None:
        if length:
            copy_range(src, offset, self._file.fileno(), self._offset(t), length, self.on_progress)

    def _offset(self, t: TensorInfo) -> int:
        """Where a tensor's bytes go in the file (HDF5 allocates no space for an empty tensor: None)."""
        off = self.offsets[t.name]
        assert off is not None, f"tensor {t.name!r} has no space allocated"
        return off
