"""The zip archive of a `torch.save` (or `torch.jit.save`) file: its central directory read once,
members read by the offsets of their local headers (CRCs may be zero, so never through
zipfile.read), `data.pkl` run through the restricted unpickler with its persistent ids resolved to
storages `data/<key>`. Also the semantics-free scan of every pickle member of any zip (`scan`).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, UnknownFormat
from ckptctl.formats import pickles
from ckptctl.formats.base import Seekable
from ckptctl.formats.pickle_reader import pickle_failure, storage_dtype
from ckptctl.formats.strided import FileBlob
from ckptctl.formats.zipdir import FastZipFile, joined_names, torchscript_layout
from ckptctl.sources import file_size, is_remote, open_file

MAX_PICKLE_IN_MEMORY = 1 << 30  # a compressed data.pkl larger than this is refused


class _Window(Seekable):
    """A read-only view of file[base:base+length] (DCP items are zips inside a bigger file)."""

    def __init__(self, f, base: int, length: int):
        super().__init__()
        self._f = f
        self._base = base
        self._size = length
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        n = max(0, min(n, self._size - self._pos))
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


def _name_len(name: str) -> int:
    """Bytes of a member name in its header."""
    return len(name) if name.isascii() else len(name.encode("utf-8", "replace"))


class TorchArchive:
    """One torch.save zip: at the start of `path` or at [base, base+length) inside it."""

    def __init__(
        self,
        path: str | os.PathLike,
        base: int = 0,
        length: int | None = None,
        label=None,
        torchscript: bool = False,
        opened=None,
    ):
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
                raise CorruptFile(
                    f"the archive runs past the end of the file ({base + length} > {size} bytes)", self.label
                )
            self.length = length
            src = self._f if (base == 0 and length == size) else _Window(self._f, base, length)
            try:
                self.zip = FastZipFile(src)  # reads the central directory only
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                OSError,
                EOFError,
                ValueError,
                struct.error,
                NotImplementedError,
                OverflowError,
            ) as e:
                self.close()
                raise CorruptFile(f"not a complete zip archive ({e}); truncated or damaged?", self.label) from None
        infos = self.zip.infolist()
        by_name = getattr(self.zip, "NameToInfo", None)
        if type(by_name) is dict and len(by_name) == len(infos):  # no name twice: zipfile's own index, in order
            self.members: dict[str, zipfile.ZipInfo] = dict(by_name)
        else:
            self.members = {}
            for zi in infos:
                self.members.setdefault(zi.filename, zi)
        names = list(self.members)
        if not names:
            self.close()
            raise CorruptFile("an empty zip archive", self.label)
        self.torchscript = torchscript_layout(joined_names(names))
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
        self._storage_dtypes: dict[pickles.Global, tuple[str, int]] = {}  # storage class -> (dtype, itemsize)

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
            raise CorruptFile(f"zip member {zi.filename!r} runs past the end of the file (truncated?)", self.label)
        self._payload[zi.filename] = off
        return off

    def check_fits(self, zi: zipfile.ZipInfo) -> None:
        """Cheap check from the central directory: the member's bytes end before the directory."""
        name = zi.filename
        if (
            zi.header_offset < 0
            or zi.header_offset + 30 + (len(name) if name.isascii() else _name_len(name)) + zi.compress_size
            > self._cd_start
        ):  # 30: _LOCAL.size
            raise CorruptFile(
                f"zip member {zi.filename!r} overlaps the central directory (damaged archive)", self.label
            )

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
        raise CorruptFile(
            f"zip member {zi.filename!r} uses compression method {zi.compress_type}, which ckptctl does not read",
            self.label,
        )

    @property
    def big_endian(self) -> bool:
        bo = self.read_small("byteorder", 16)
        return bo is not None and bo.strip() == b"big"

    def unpickle(
        self, member: str = "data.pkl", folder: str = "data"
    ) -> tuple[Any, list[str], list[str], dict[str, pickles.StorageRef]]:
        """(root object, globals, warnings, storages by key) of data.pkl (or of another pickle whose
        storages are `<folder>/<key>`: TorchScript's constants.pkl). Raises PickleError."""
        zi = self.member(member)
        assert zi is not None
        storages: dict[str, pickles.StorageRef] = {}

        storage = self._storage

        def persistent_load(pid: Any) -> pickles.StorageRef:  # a closure: a partial with keywords costs twice as much
            return storage(pid, storages, folder)

        if zi.compress_type == zipfile.ZIP_STORED:
            self.check_fits(zi)
            start = self.payload_offset(zi)
            m = pickles.Machine(
                self._f, start=start, end=start + zi.file_size, persistent_load=persistent_load, path=self.label
            )
        else:
            m = pickles.Machine(self._member_bytes(zi), persistent_load=persistent_load, path=self.label)
        try:
            root = m.load()
        except pickles.PickleError as e:
            raise pickle_failure(e, member, self.label) from None
        return root, m.globals, m.warnings, storages

    def _storage(self, pid: Any, storages: dict[str, pickles.StorageRef], folder: str = "data") -> pickles.StorageRef:
        # once per tensor (10^5 times at MoE scale): the common case checked first, the same checks
        if type(pid) is not tuple or len(pid) < 5 or pid[0] != "storage":
            if not isinstance(pid, (tuple, list)) or not pid:
                raise CorruptFile(f"a persistent id that is not a tuple ({type(pid).__name__})", self.label)
            typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
            if typename != "storage" or len(pid) < 5:
                raise CorruptFile(f"unknown persistent id {str(typename)[:40]!r}", self.label)
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if type(key) is not str:
            key = str(key)
        if type(numel) is not int or numel < 0:
            raise CorruptFile(f"storage {key!r}: bad size {numel!r:.40}", self.label)
        # one storage class global serves every storage of its dtype
        known = self._storage_dtypes.get(storage_type) if type(storage_type) is pickles.Global else None
        if known is None:
            dtype = storage_dtype(storage_type, self.label)
            known = (dtype, dtypes.BY_NAME[dtype].itemsize)
            if type(storage_type) is pickles.Global:
                self._storage_dtypes[storage_type] = known
        dtype, itemsize = known
        ref = storages.get(key)
        if ref is not None:
            if ref.dtype != dtype:
                raise CorruptFile(f"storage {key!r} is named with two dtypes ({ref.dtype}, {dtype})", self.label)
            return ref
        zi = self.members.get(f"{self.prefix}{folder}/{key}")
        if zi is None:
            raise CorruptFile(f"storage {folder}/{key} is missing from the archive", self.label)
        self.check_fits(zi)
        need = numel * itemsize
        if zi.file_size < need:
            raise CorruptFile(
                f"storage {folder}/{key} holds {zi.file_size} bytes, but {numel} {dtype} elements need {need}",
                self.label,
            )
        ref = pickles.StorageRef(key, dtype, numel, location if type(location) is str else str(location), 0, None, zi)
        storages[key] = ref
        return ref

    def blob(self, ref: pickles.StorageRef) -> FileBlob:
        zi = ref.extra
        if zi.compress_type != zipfile.ZIP_STORED:

            def bad() -> int:
                raise CorruptFile(
                    f"storage {zi.filename!r} is compressed; ckptctl reads stored (uncompressed) storages only",
                    self.label,
                )

            return FileBlob(self.path, zi.file_size, resolve=bad, what=f"storage {zi.filename!r}")
        return _MemberBlob(self, zi)


class _MemberBlob(FileBlob):
    """A stored member's bytes, found through its local header when first read. One per storage
    (10^5 at MoE scale): no closure, and its name for messages is made only when one is needed."""

    def __init__(self, arch: TorchArchive, zi: zipfile.ZipInfo):
        self.path = arch.path
        self.nbytes = zi.file_size
        self._offset = None
        self._arch = arch
        self._zi = zi

    def _resolve(self) -> int:  # FileBlob's resolve callable, as a method
        return self._arch.payload_offset(self._zi)

    def _what(self) -> str:
        return f"storage {self._zi.filename!r}"

    what = property(_what)  # FileBlob.what (an attribute there), computed when a message needs it


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
