"""Legacy PyTorch files (`_use_new_zipfile_serialization=False`, PyTorch < 1.6, Python-2 era) and
plain pickles (`*.pkl`).

A legacy file is consecutive pickles: the magic number, the protocol version (1001), a sys_info
dict, the checkpoint object (persistent ids `('storage', type, key, location, numel,
view_metadata)`), the list of storage keys; then for each key an int64 little-endian element
count followed by that many elements. Each storage's offset follows from the counts: the reader
reads the 8-byte counts and seeks over the data, never reading it to list the file.

A plain pickle is listed as the restricted unpickler sees it: numpy arrays inside it are tensors
(their bytes stay in the file when large), other objects are opaque. Pickles that follow the first
one (a file can hold several) are scanned for the globals they ask for, so `scan` sees them.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.formats import pickles
from ckptctl.formats.pickle_reader import PickleBasedReader, checkpoint_info, pickle_failure, storage_dtype
from ckptctl.formats.strided import FileBlob
from ckptctl.model import CheckpointInfo
from ckptctl.sources import file_size, is_remote, open_file

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchLegacyReader(PickleBasedReader):
    format = "torch-legacy"
    options = ("raw_names",)

    def _load_info(self) -> CheckpointInfo:
        path = os.fspath(self.path)
        globals_: list[str] = []
        warnings: list[str] = []
        roots: dict[str, pickles.StorageRef] = {}
        views: dict[tuple, pickles.StorageRef] = {}

        def persistent_load(pid: Any) -> Any:
            return self._storage(pid, roots, views)

        with open_file(path) if is_remote(path) else open(path, "rb") as f:
            size = file_size(f)
            pos = 0
            ahead = b""  # read past the previous pickle's end: where the next one starts

            def one(what: str, pl=None) -> Any:
                nonlocal pos, ahead
                m = pickles.Machine(f, start=pos, end=size, persistent_load=pl, path=self.path, preload=ahead)
                try:
                    obj = m.load()
                except pickles.PickleError as e:
                    e.globals = globals_ + e.globals
                    raise pickle_failure(e, what, self.path) from None
                finally:
                    globals_.extend(g for g in m.globals if g not in globals_)
                warnings.extend(m.warnings)
                pos = m.pos
                ahead = m.leftover()
                return obj

            magic = one("magic number")
            if magic != LEGACY_MAGIC:
                raise CorruptFile("not a legacy PyTorch file: wrong magic number", self.path)
            protocol = one("protocol version")
            if protocol != LEGACY_PROTOCOL:
                raise CorruptFile(f"unsupported legacy protocol version {protocol!r:.40}", self.path)
            sys_info = one("sys_info")
            root = one("checkpoint object", persistent_load)
            keys = one("storage keys")
            if not isinstance(keys, list):
                raise CorruptFile("the storage key list is not a list", self.path)
            for key in keys:
                key = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
                ref = roots.get(key)
                if ref is None:
                    raise CorruptFile(f"storage {key!r} has data but no tensor refers to it", self.path)
                f.seek(pos)
                head = f.read(8)
                if len(head) < 8:
                    raise CorruptFile(f"file ends before storage {key!r} (truncated at byte {size})", self.path)
                count = struct.unpack("<q", head)[0]
                if count != ref.numel:
                    raise CorruptFile(f"storage {key!r} holds {count} elements, the pickle says {ref.numel}", self.path)
                nbytes = count * dtypes.BY_NAME[ref.dtype].itemsize
                start = pos + 8
                if start + nbytes > size:
                    raise CorruptFile(
                        f"storage {key!r} needs bytes {start}..{start + nbytes}, but the file ends at {size} (truncated?)",
                        self.path,
                    )
                ref.extra = FileBlob(path, nbytes, offset=start, what=f"storage {key!r}")
                pos = start + nbytes
            missing = [k for k, r in roots.items() if r.extra is None]
            if missing:
                raise CorruptFile(f"storage {missing[0]!r} is missing from the file", self.path)
            if pos < size:
                warnings.append(f"{size - pos} bytes after the last storage are ignored")

        meta: dict[str, Any] = {}
        if isinstance(sys_info, dict):
            le = sys_info.get("little_endian")
            if isinstance(le, bool):
                meta["byteorder"] = "little" if le else "big"
            pv = sys_info.get("protocol_version")
            if isinstance(pv, int):
                meta["legacy_protocol"] = pv

        def blob_of(ref: pickles.StorageRef):
            root_ref = roots[ref.key]
            return root_ref.extra

        # legacy storages are always written little-endian
        return checkpoint_info(
            self.path, self.format, root, globals_, warnings, blob_of, False, meta, raw_names=self.raw_names
        )

    def _storage(self, pid: Any, roots: dict, views: dict) -> Any:
        if not isinstance(pid, (tuple, list)) or not pid:
            raise CorruptFile(f"a persistent id that is not a tuple ({type(pid).__name__})", self.path)
        typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            # ('module', cls, source_file, source): an nn.Module class, saved with its source text
            # (never looked at); the class stands for itself, so its objects keep their class name
            if len(pid) > 1 and isinstance(pid[1], pickles.Global):
                return pid[1]
            return pickles.Opaque("<module source>", tuple(pid[1:2]))
        if typename != "storage" or len(pid) < 5:
            raise CorruptFile(f"unknown persistent id {str(typename)[:40]!r}", self.path)
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        view = pid[5] if len(pid) > 5 else None
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        if type(numel) is not int or numel < 0:
            raise CorruptFile(f"storage {key!r}: bad size {numel!r:.40}", self.path)
        dtype = storage_dtype(storage_type, self.path)
        ref = roots.get(key)
        if ref is None:
            ref = pickles.StorageRef(key=key, dtype=dtype, numel=numel, location=str(location))
            roots[key] = ref
        elif ref.dtype != dtype or ref.numel != numel:
            raise CorruptFile(f"storage {key!r} is described twice, differently", self.path)
        if view is None:
            return ref
        if not isinstance(view, (tuple, list)) or len(view) != 3:
            raise CorruptFile(f"storage {key!r}: bad view metadata", self.path)
        view_key, offset, view_size = view
        if (
            type(offset) is not int
            or type(view_size) is not int
            or offset < 0
            or view_size < 0
            or offset + view_size > numel
        ):
            raise CorruptFile(f"storage view {view_key!r} lies outside storage {key!r}", self.path)
        vk = (key, str(view_key))
        v = views.get(vk)
        if v is None:
            v = pickles.StorageRef(
                key=key, dtype=dtype, numel=numel, location=str(location), view_offset=offset, view_numel=view_size
            )
            views[vk] = v
        return v


class PickleReader(PickleBasedReader):
    """A plain pickle: numpy arrays are tensors, everything else is listed as opaque objects."""

    format = "pickle"
    options = ("raw_names",)

    def _load_info(self) -> CheckpointInfo:
        path = os.fspath(self.path)
        warnings: list[str] = []
        with open_file(path) if is_remote(path) else open(path, "rb") as f:
            size = file_size(f)
            m = pickles.Machine(f, start=0, end=size, path=self.path)
            try:
                root = m.load()
            except pickles.PickleError as e:
                raise pickle_failure(e, "", self.path) from None
            globals_ = list(m.globals)
            warnings.extend(m.warnings)
            if m.pos < size:
                more, err = pickles.scan_globals(f, m.pos, size, self.path)
                globals_.extend(more)
                what = f"{size - m.pos} bytes follow the pickle's end"
                if more:
                    what += f" (more pickles, asking for {', '.join(dict.fromkeys(more))})"
                elif err:
                    what += " (not a pickle)"
                warnings.append(what)
        return checkpoint_info(
            self.path, self.format, root, globals_, warnings, _no_blob, False, {}, raw_names=self.raw_names
        )


def _no_blob(ref: pickles.StorageRef):  # pragma: no cover - plain pickles have no storages
    raise CorruptFile("a plain pickle has no storages")
