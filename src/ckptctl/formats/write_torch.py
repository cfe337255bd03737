"""Streaming PyTorch zip writer: files `torch.load(path, weights_only=True)` loads.

The layout is torch.save's (2.x): a ZIP_STORED archive under the folder `<target stem>/` with
`data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`, `data/<key>` (one per
distinct tensor, payload on a 64-byte boundary via the 'FB' extra field), `version` and
`.data/serialization_id`. The pickle (protocol 2) is written here by hand, without torch:
an OrderedDict name -> tensor; classic dtypes through typed storages and
`torch._utils._rebuild_tensor_v2`, newer ones (float8, uint16/32/64, complex32, ...) through
`torch.storage.UntypedStorage` and `_rebuild_tensor_v3` with the dtype. Tied weights are one
tensor referenced twice through the pickle memo, so torch.load gives back real tying and the
bytes are stored once.

Every member's offset follows from the plan, so tensor bytes go straight to their place
(pwrite / copy_file_range) in any order; CRC-32s are computed while streaming and patched into
the local headers and the central directory at `finish`. Zip64 records appear when a member or
an offset passes 4 GiB.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import struct

from ckptctl import dtypes
from ckptctl.formats.writeutil import (
    AtomicFile,
    StreamingWriter,
    copy_range,
    crc_of_range,
    pwrite_all,
    writable_dtype,
    write_chunks,
)
from ckptctl.model import TensorInfo

ALIGN = 64
_U32 = 0xFFFFFFFF
_DOS_DATE = 0x0021  # 1980-01-01
_DOS_TIME = 0


def torch_dtype_ok(t: TensorInfo) -> None:
    writable_dtype(t, "PyTorch")


# ---- a protocol-2 pickle, written opcode by opcode ----------------------------------------------
class _Pickle:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0
        self.globals: dict[str, int] = {}

    def put(self) -> int:
        idx = self.memo
        self.memo += 1
        self.out += b"r" + struct.pack("<I", idx)  # LONG_BINPUT
        return idx

    def get(self, idx: int) -> None:
        self.out += b"j" + struct.pack("<I", idx)  # LONG_BINGET

    def glob(self, module: str, name: str) -> None:
        key = f"{module}\n{name}\n"
        if key in self.globals:
            self.get(self.globals[key])
            return
        self.out += b"c" + key.encode("ascii")
        self.globals[key] = self.put()

    def str(self, s: str) -> None:
        b = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            n = (v.bit_length() + 8) // 8
            self.out += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)

    def tuple(self, items: tuple[builtins.int, ...]) -> None:  # `int` here is the method above
        if len(items) == 0:
            self.out += b")"
            return
        if len(items) <= 3:
            for v in items:
                self.int(v)
            self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]
            return
        self.out += b"("
        for v in items:
            self.int(v)
        self.out += b"t"

    def empty_ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.out += b")R"

    def mark(self) -> None:
        self.out += b"("


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def build_pickle(tensors: list[TensorInfo], keys: dict[str, str], root: dict[str, str]) -> bytes:
    """data.pkl for an OrderedDict of `tensors` (aliases point at their root's tensor)."""
    p = _Pickle()
    p.empty_ordered_dict()
    p.put()
    memo: dict[str, int] = {}
    batch = 0
    p.mark()
    for t in tensors:
        if batch == 1000:
            p.out += b"u"
            p.mark()
            batch = 0
        p.str(t.name)
        primary = root.get(t.name, t.name)
        if primary in memo:
            p.get(memo[primary])
        else:
            d = dtypes.BY_NAME[t.dtype]
            v3 = d.storage is None
            p.glob("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
            p.mark()
            p.mark()  # persistent id: ('storage', storage type, key, location, numel)
            p.str("storage")
            if d.storage is None:  # v3
                p.glob("torch.storage", "UntypedStorage")
            else:
                p.glob("torch", d.storage)
            p.str(keys[primary])
            p.str("cpu")
            p.int(t.nbytes if v3 else t.numel)
            p.out += b"tQ"  # TUPLE, BINPERSID
            p.int(0)
            p.tuple(tuple(int(s) for s in t.shape))
            p.tuple(contiguous_strides(tuple(t.shape)))
            p.out += b"\x89"  # requires_grad=False
            p.empty_ordered_dict()  # backward hooks
            if v3:
                p.glob("torch", t.dtype)
            p.out += b"tR"
            memo[primary] = p.put()
        batch += 1
    p.out += b"u."
    return bytes(p.out)


# ---- zip records -------------------------------------------------------------------------------
class _Member:
    __slots__ = ("name", "size", "offset", "data_offset", "zip64", "crc", "local_len")

    def __init__(self, name: str, size: int):
        self.name = name.encode("utf-8")
        self.size = size
        self.offset = 0
        self.data_offset = 0
        self.zip64 = False
        self.crc = 0
        self.local_len = 0

    def local_header(self, crc: int) -> bytes:
        extra = b""
        usize = csize = self.size
        if self.zip64:
            extra = struct.pack("<HHQQ", 1, 16, self.size, self.size)
            usize = csize = _U32
        start = self.offset + 30 + len(self.name) + len(extra)
        pad = -(start + 4) % ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB': torch's alignment padding
        head = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if self.zip64 else 20,
            0,
            0,
            _DOS_TIME,
            _DOS_DATE,
            crc,
            csize,
            usize,
            len(self.name),
            len(extra),
        )
        return head + self.name + extra

    def central(self) -> bytes:
        fields = []
        usize = csize = self.size
        off = self.offset
        if self.size >= _U32:
            fields += [self.size, self.size]
            usize = csize = _U32
        if self.offset >= _U32:
            fields.append(self.offset)
            off = _U32
        extra = struct.pack("<HH", 1, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields) if fields else b""
        need = 45 if fields else 20
        return (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                (3 << 8) | need,
                need,
                0,
                0,
                _DOS_TIME,
                _DOS_DATE,
                self.crc,
                csize,
                usize,
                len(self.name),
                len(extra),
                0,
                0,
                0,
                (0o100644 << 16),
                off,
            )
            + self.name
            + extra
        )


class TorchZipWriter(StreamingWriter):
    format = "torch-zip"

    def __init__(self, path, tensors, metadata=None, *, dedupe_tied=False, force_zip64=False):
        super().__init__(path, tensors, metadata, dedupe_tied=dedupe_tied)
        for t in tensors:
            torch_dtype_ok(t)
        stem = self.path.name.split(".", 1)[0] or "archive"  # torch: basename up to the first '.'
        if not self.path.name.isascii():  # torch writes through a stream then: "archive/"
            stem = "archive"
        self.prefix = stem + "/"
        self.keys = {t.name: str(i) for i, t in enumerate(self.primaries)}
        pkl = build_pickle(tensors, self.keys, self.root)
        sid = str(int.from_bytes(hashlib.sha256(pkl).digest()[:16], "little")).encode()
        small_before = [
            ("data.pkl", pkl),
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ]
        small_after = [("version", b"3\n"), (".data/serialization_id", sid)]
        self.small: dict[int, bytes] = {}
        self.members: list[_Member] = []
        self.data_member: dict[str, _Member] = {}
        for name, data in small_before:
            self.small[len(self.members)] = data
            self.members.append(_Member(self.prefix + name, len(data)))
        for t in self.primaries:
            m = _Member(f"{self.prefix}data/{self.keys[t.name]}", t.nbytes)
            self.data_member[t.name] = m
            self.members.append(m)
        for name, data in small_after:
            self.small[len(self.members)] = data
            self.members.append(_Member(self.prefix + name, len(data)))
        pos = 0
        for m in self.members:
            m.offset = pos
            m.zip64 = force_zip64 or m.size >= _U32 or pos >= _U32
            m.local_len = len(m.local_header(0))
            m.data_offset = pos + m.local_len
            pos = m.data_offset + m.size
        self.end = pos
        self.force_zip64 = force_zip64
        self._pool = None
        self._file = AtomicFile(self.path)
        try:
            import zlib

            for i, data in self.small.items():
                m = self.members[i]
                m.crc = zlib.crc32(data)
                pwrite_all(self._file.fileno(), m.local_header(m.crc) + data, m.offset)
            for m in self.data_member.values():
                pwrite_all(self._file.fileno(), m.local_header(0), m.offset)
        except BaseException:
            self._file.abort()
            raise

    def _write_chunks(self, t: TensorInfo, chunks) -> None:
        m = self.data_member[t.name]
        m.crc = write_chunks(self._file.fileno(), m.data_offset, chunks, t.nbytes, t.name, self.on_progress, crc=True)

    def _write_range(self, t: TensorInfo, src, offset: int, length: int) -> None:
        m = self.data_member[t.name]
        # the CRC is computed from the source range on a second thread while the kernel copies
        # (zlib and preadv release the GIL): zero-copy speed with a CRC torch and unzip can check
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptctl-crc")
        crc = self._pool.submit(_crc_of_source, src, offset, length)
        try:
            copy_range(src, offset, self._file.fileno(), m.data_offset, length, self.on_progress)
        finally:
            m.crc = crc.result()

    def _finalize(self, fd: int) -> None:
        for m in self.data_member.values():
            pwrite_all(fd, m.local_header(m.crc), m.offset)
        cd = b"".join(m.central() for m in self.members)
        cd_off = self.end
        n = len(self.members)
        tail = b""
        if self.force_zip64 or cd_off >= _U32 or n >= 0xFFFF or len(cd) >= _U32:
            z64 = cd_off + len(cd)
            tail += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(cd), cd_off)
            tail += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
            tail += struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(len(cd), _U32), _U32, 0
            )
        else:
            tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_off, 0)
        pwrite_all(fd, cd + tail, cd_off)
        os.ftruncate(fd, cd_off + len(cd) + len(tail))
        self._release()

    def _release(self) -> None:
        """Stop the CRC thread (waits for a running CRC)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _crc_of_source(src, offset: int, length: int) -> int:
    fd = os.open(src, os.O_RDONLY) if not isinstance(src, int) else src
    try:
        return crc_of_range(fd, offset, length)
    finally:
        if not isinstance(src, int):
            os.close(fd)
