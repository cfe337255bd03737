"""GGUF (llama.cpp, ggml): the header is parsed here, in pure Python (no gguf-py, no numpy).

Layout (v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 key/value
count; the key/values (string key, u32 value type, value; strings are u64 length + UTF-8 bytes,
arrays are u32 element type + u64 count + elements); the tensor infos (name, u32 n_dims, n_dims
u64 sizes `ne[]` fastest-first, u32 ggml type, u64 offset); padding to `general.alignment`
(default 32); then the data, each tensor at data_start + offset.

Only the header is read, through a bounded window: listing a 100 GB file reads its first few
megabytes (tokenizer arrays included) and nothing else. Bytes come through ckptctl.sources (a local
file or a remote object: the window is then one ranged request, 64 KiB first, doubling to 4 MiB). Every length and count is checked
against the file size before it is used, so a corrupt file is one CorruptFile, never a huge
allocation or a traceback. Shapes are reported row-major (ne[] reversed), like gguf-py's reader
and numpy. Unquantized types map to ckptctl's dtype names (F32 -> float32, ...); block-quantized
ones are `gguf:<TYPE>` (`gguf:Q8_0`): listed, diffed as bytes, never converted.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ckptctl.errors import CorruptFile, NotFound
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import as_source, open_source

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
WINDOW = 4 * 1024 * 1024  # header bytes read per pread, at most
FIRST_WINDOW = 64 * 1024  # the first read: most headers without a tokenizer fit, and little data is touched
MAX_DIMS = 64  # ggml has 4; anything this large is corruption, not a tensor
SUMMARY_OVER = 16  # arrays longer than this are summarised in the metadata, not listed
MAX_NAME = 64 * 1024  # a key or tensor name longer than this is corruption (ggml allows 64 bytes)
MAX_VALUE = 1024 * 1024  # string values longer than this are summarised, never read into memory
KEEP_MAX = 64 * 1024 * 1024  # header windows kept for an array's digest (beyond: read again)

# ggml type id -> (name, elements per block, bytes per block); from ggml.h / gguf-py constants
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# ids ggml once used and has removed (llama.cpp refuses them too)
REMOVED_TYPES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}
# unquantized ggml types -> ckptctl dtype names (bytes are the plain little-endian values)
PLAIN = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
}
BY_TYPE_NAME = {name: (tid, blk, size) for tid, (name, blk, size) in GGML_TYPES.items()}


def dtype_of(ggml_type: str) -> str:
    """ckptctl dtype name of a ggml type: float32, ..., or gguf:Q4_K for block-quantized ones."""
    return PLAIN.get(ggml_type, f"gguf:{ggml_type}")


def ggml_type_of(dtype: str) -> str | None:
    """The ggml type name behind a dtype a GGUF reader reported (F32, Q8_0, ...)."""
    if dtype.startswith("gguf:"):
        return dtype[5:]
    for g, d in PLAIN.items():
        if d == dtype:
            return g
    return None


# metadata value types: id -> (name, struct code or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    7: ("bool", "?"),
    8: ("string", None),
    9: ("array", None),
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
T_STRING, T_ARRAY, T_UINT32 = 8, 9, 4
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class _Loc:
    offset: int  # absolute file offset of the first byte
    length: int
    ggml_type: str
    ne: tuple[int, ...]  # as stored: fastest-varying first


def _f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974738e-06)."""
    packed = struct.pack("<f", x)
    for prec in range(6, 10):
        y = float(f"{x:.{prec}g}")
        if struct.pack("<f", y) == packed:
            return y
    return x


class _Cursor:
    """Sequential little-endian reads of the header through a bounded pread window."""

    def __init__(self, src, size: int, path):
        self.src, self.size, self.path = as_source(src), size, path  # a sources.*Source (or an fd)
        self.pos = 0
        self.win = b""
        self.win_start = 0
        self.next_window = FIRST_WINDOW  # doubles up to WINDOW: small headers read little past their end
        self.keep_from: int | None = None  # while set, windows left behind are kept (array digests)
        self.kept: list[tuple[int, bytes]] = []

    def fail(self, msg: str):
        raise CorruptFile(msg, self.path)

    def take(self, n: int, what: str) -> bytes:
        """The next n bytes; CorruptFile naming `what` when the file ends first."""
        if n > self.size - self.pos:
            self.fail(f"{what} runs past the end of the {self.size}-byte file (needs {n} bytes at byte {self.pos})")
        lo = self.pos - self.win_start
        if lo < 0 or lo + n > len(self.win):
            if n > WINDOW:
                data = self._read(self.pos, n)
                self.pos += n
                return data
            if self.keep_from is not None and self.win and sum(len(b) for _s, b in self.kept) < KEEP_MAX:
                self.kept.append((self.win_start, self.win))
            start = self.pos
            if self.keep_from is not None and self.win:  # no gap between kept windows (skipped strings)
                wend = self.win_start + len(self.win)
                if wend < start <= wend + FIRST_WINDOW:
                    start = wend
            self.win = self._read(start, min(max(n + self.pos - start, self.next_window), self.size - start))
            self.next_window = min(2 * self.next_window, WINDOW)
            self.win_start = start
            lo = self.pos - start
        self.pos += n
        return self.win[lo : lo + n]

    def _read(self, offset: int, n: int) -> bytes:
        parts = []
        end = offset + n
        while offset < end:
            chunk = self.src.pread(offset, min(end - offset, CHUNK))
            if not chunk:
                self.fail(f"file ends at byte {offset} while reading the header")
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def unpack(self, code: str, what: str):
        s = struct.calcsize("<" + code)
        return struct.unpack("<" + code, self.take(s, what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)

    def string(self, what: str, limit: int | None = MAX_NAME) -> str:
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            self.fail(f"{what}: string length {n} runs past the end of the {self.size}-byte file")
        if limit is not None and n > limit:
            self.fail(f"{what}: a name of {n} bytes (limit {limit})")
        return self.take(n, what).decode("utf-8", errors="replace")

    def long_string(self, what: str) -> str | tuple[int, int]:
        """A string value; one over MAX_VALUE bytes is stepped over: (start, end) of its bytes."""
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            self.fail(f"{what}: string length {n} runs past the end of the {self.size}-byte file")
        if n > MAX_VALUE:
            start = self.pos
            self.pos += n
            return start, self.pos
        return self.take(n, what).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings, checking every length (tokenizer arrays: the fast path,
        a tight loop over the window: ~0.1 s for a 152k-token vocabulary plus 151k merges)."""
        unpack_from = _U64.unpack_from
        size = self.size
        i = 0
        while i < count:
            win, base, pos = self.win, self.win_start, self.pos
            end = len(win) - 8
            while i < count and pos - base <= end:
                n = unpack_from(win, pos - base)[0]
                pos += 8
                if n > size - pos:
                    self.pos = pos
                    self.fail(f"{what}: string {i} has length {n}, past the end of the {size}-byte file")
                pos += n
                i += 1
            self.pos = pos
            if i < count:  # the next length is not in the window: read it (and a new window)
                n = self.u64(f"the length of string {i} of {what}")
                if n > size - self.pos:
                    self.fail(f"{what}: string {i} has length {n}, past the end of the {size}-byte file")
                self.pos += n
                i += 1


class GGUFHeader:
    """Everything before the tensor data: version, metadata, tensor infos, data start."""

    def __init__(self, src, size: int, path=None):
        """`src`: a sources.LocalSource / RemoteSource (or an os-level descriptor)."""
        self.path = path
        self.size = size
        c = _Cursor(src, size, path)
        head = c.take(4, "the GGUF magic") if size >= 4 else b""
        if size < 4 or head != MAGIC:
            raise CorruptFile(f"not a GGUF file: bad magic {bytes(head)!r} (expected b'GGUF')", path)
        raw_version = c.u32("the GGUF version")
        if raw_version & 0xFFFF == 0 and raw_version:
            raise CorruptFile(f"big-endian GGUF (version {raw_version >> 24}) is not supported", path)
        if raw_version == 1:
            raise CorruptFile(
                "GGUF version 1 (llama.cpp before Oct 2023) is not supported; "
                "convert it again with a current llama.cpp",
                path,
            )
        if raw_version not in (2, 3):
            raise CorruptFile(f"unsupported GGUF version {raw_version} (ckptctl reads versions 2 and 3)", path)
        self.version = raw_version
        n_tensors = c.u64("the tensor count")
        n_kv = c.u64("the metadata count")
        # every key/value takes at least 8 + 4 + 1 bytes and every tensor info 8 + 4 + 4 + 8
        if n_kv > (size - c.pos) // 13:
            c.fail(f"metadata count {n_kv} cannot fit in the {size}-byte file")
        if n_tensors > (size - c.pos) // 24:
            c.fail(f"tensor count {n_tensors} cannot fit in the {size}-byte file")

        self.metadata: dict[str, object] = {}
        self.types: dict[str, str] = {}  # key -> value type name (array[string] for arrays)
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = c.string(f"the name of metadata key {i}")
            if key in self.metadata:
                c.fail(f"metadata key {key!r} appears twice")
            vtype = c.u32(f"the value type of metadata key {key!r}")
            value, tname = self._value(c, vtype, f"metadata key {key!r}", depth=0)
            self.metadata[key] = value
            self.types[key] = tname
            if key == "general.alignment":
                if vtype != T_UINT32:
                    c.fail(f"general.alignment has type {tname}, expected uint32")
                if value == 0 or value & (value - 1):
                    c.fail(f"general.alignment {value} is not a power of two")
                alignment = value
        self.alignment = alignment

        self.tensors: list[tuple[str, str, tuple[int, ...], int, int]] = []  # name, type, ne, offset, nbytes
        seen: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"the name of tensor {i}")
            if name in seen:
                c.fail(f"tensor {name!r} appears twice")
            seen.add(name)
            n_dims = c.u32(f"tensor {name!r}: the number of dimensions")
            if n_dims > MAX_DIMS:
                c.fail(f"tensor {name!r}: {n_dims} dimensions")
            ne = struct.unpack(f"<{n_dims}Q", c.take(8 * n_dims, f"tensor {name!r}: the dimensions"))
            tid = c.u32(f"tensor {name!r}: the ggml type")
            offset = c.u64(f"tensor {name!r}: the data offset")
            if tid not in GGML_TYPES:
                if tid in REMOVED_TYPES:
                    c.fail(
                        f"tensor {name!r}: ggml type {REMOVED_TYPES[tid]} ({tid}) was removed from ggml; "
                        "convert the model again with a current llama.cpp"
                    )
                c.fail(f"tensor {name!r}: unknown ggml type {tid}")
            tname, blk, tsize = GGML_TYPES[tid]
            numel = 1
            for d in ne:
                numel *= d
            if numel >= 1 << 63:
                c.fail(f"tensor {name!r}: shape {list(reversed(ne))} overflows")
            row = ne[0] if ne else 1
            if row % blk:
                c.fail(f"tensor {name!r}: rows of {row} elements are not whole {tname} blocks of {blk}")
            nbytes = numel // blk * tsize
            self.tensors.append((name, tname, tuple(ne), offset, nbytes))
        self.header_end = c.pos
        self.data_start = -(-c.pos // alignment) * alignment
        self.warnings: list[str] = []
        self._check_data()

    def _check_data(self) -> None:
        path, size, start = self.path, self.size, self.data_start
        misaligned = [n for n, _t, _ne, off, _nb in self.tensors if off % self.alignment]
        if misaligned:
            self.warnings.append(
                f"{len(misaligned)} tensor(s) not aligned to {self.alignment} bytes "
                f"(llama.cpp refuses this file), e.g. {misaligned[0]!r}"
            )
        prev_end, prev_name = 0, None
        for name, _tname, _ne, off, nbytes in sorted(self.tensors, key=lambda t: (t[3], t[4])):
            if start + off + nbytes > size:
                raise CorruptFile(
                    f"tensor {name!r}: data [{start + off}, {start + off + nbytes}) runs past the end of the "
                    f"{size}-byte file (truncated?)",
                    path,
                )
            if off < prev_end and nbytes:
                raise CorruptFile(
                    f"tensor {name!r}: data at offset {off} overlaps tensor {prev_name!r} (which ends at {prev_end})",
                    path,
                )
            if nbytes:
                prev_end, prev_name = off + nbytes, name

    def _value(self, c: _Cursor, vtype: int, what: str, depth: int):
        """(value as shown, type name). Arrays over SUMMARY_OVER items become a one-line summary."""
        if vtype not in VALUE_TYPES:
            c.fail(f"{what}: unknown value type {vtype}")
        tname, code = VALUE_TYPES[vtype]
        if vtype == T_STRING:
            v = c.long_string(what)
            if isinstance(v, tuple):
                return f"[string of {v[1] - v[0]} bytes, sha256:{self._digest(c, *v)}]", tname
            return v, tname
        if vtype != T_ARRAY:
            assert code is not None  # only strings and arrays have no struct code
            v = c.unpack(code, what)
            return (_f32(v) if vtype == 6 else v), tname
        if depth >= 4:
            c.fail(f"{what}: arrays nested more than 4 deep")
        etype = c.u32(f"{what}: the array element type")
        count = c.u64(f"{what}: the array length")
        if etype not in VALUE_TYPES:
            c.fail(f"{what}: unknown array element type {etype}")
        ename, ecode = VALUE_TYPES[etype]
        noun = {"string": "strings", "array": "arrays"}.get(ename, ename)
        min_size = struct.calcsize("<" + ecode) if ecode else (8 if etype == T_STRING else 12)
        if count * min_size > c.size - c.pos:
            c.fail(f"{what}: array of {count} {noun} runs past the end of the {c.size}-byte file")
        tag = f"array[{ename}]"
        if count <= SUMMARY_OVER:
            items = [self._value(c, etype, f"{what}[{k}]", depth + 1)[0] for k in range(count)]
            return items, tag
        start = c.pos
        outer = c.keep_from
        if outer is None:
            c.keep_from = start
        if etype == T_STRING:
            c.skip_strings(count, what)
        elif etype == T_ARRAY:
            for k in range(count):
                self._value(c, etype, f"{what}[{k}]", depth + 1)
        else:
            c.pos += count * min_size  # checked against the file size above
        digest = self._digest(c, start, c.pos)
        c.keep_from = outer
        if outer is None:
            c.kept.clear()
        return f"[{count} {noun}, sha256:{digest}]", tag

    @staticmethod
    def _digest(c: _Cursor, start: int, end: int) -> str:
        """First 12 hex digits of the sha256 of the array's stored element bytes (so `diff` sees a
        changed tokenizer whose length stayed the same)."""
        h = hashlib.sha256()
        pos = start
        for ws, wb in [*c.kept, (c.win_start, c.win)]:  # the header windows read since `start`: no re-read
            if ws <= pos < ws + len(wb):
                take = min(end, ws + len(wb)) - pos
                h.update(memoryview(wb)[pos - ws : pos - ws + take])
                pos += take
        if pos >= end:
            return h.hexdigest()[:12]
        while pos < end:
            chunk = c.src.pread(pos, min(end - pos, CHUNK))
            if not chunk:
                c.fail(f"file ends at byte {pos} while reading the header")
            h.update(chunk)
            pos += len(chunk)
        return h.hexdigest()[:12]


class GGUFReader(Reader):
    format = "gguf"

    def __init__(self, path):
        super().__init__(path)
        self._src = None  # sources.LocalSource / RemoteSource
        self.header: GGUFHeader | None = None

    def _open(self):
        if self._src is None:
            try:
                self._src = open_source(self.path)
            except FileNotFoundError:
                raise NotFound("no such file or directory", self.path) from None
            except PermissionError:
                raise NotFound("permission denied", self.path) from None
            except IsADirectoryError:
                raise NotFound("is a directory, expected a .gguf file", self.path) from None
        return self._src

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def _load_info(self) -> CheckpointInfo:
        src = self._open()
        h = self.header = GGUFHeader(src, src.size, self.path)
        tensors = []
        for name, tname, ne, off, nbytes in h.tensors:
            shape = tuple(reversed(ne))
            tensors.append(
                TensorInfo(name, dtype_of(tname), shape, nbytes, loc=_Loc(h.data_start + off, nbytes, tname, ne))
            )
        return CheckpointInfo(
            path=str(self.path),
            format=self.format,
            kind=f"v{h.version}",
            tensors=tensors,
            metadata=dict(h.metadata),
            files=[str(self.path)],
            warnings=list(h.warnings),
        )

    def _loc(self, name: str) -> _Loc:
        return self.tensor_info(name).loc

    def ggml_type(self, name: str) -> str:
        return self._loc(name).ggml_type

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        loc = self._loc(name)
        src = self._open()
        try:
            yield from src.iter_range(loc.offset, loc.length, size)
        except CorruptFile as e:
            raise CorruptFile(f"tensor {name!r}: {e.message} (file truncated?)", e.path or self.path) from None

    def byte_range(self, name: str) -> tuple[str, int, int]:
        loc = self._loc(name)
        return (str(self.path), loc.offset, loc.length)
