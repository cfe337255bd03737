"""Zarr arrays as Orbax / TensorStore write them, decoded without zarr or TensorStore: the array
metadata (`.zarray` v2, `zarr.json` v3), the fill value of chunks never written, and chunk
decoding (zstd, gzip, zlib or none; v3 `bytes`, `crc32c`, `transpose`), whole or streamed piece by
piece in bounded memory. The `sharding_indexed` codec and the stores are the reader's (orbax.py).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.formats.ocdbt import ValueRef, zstd_decompress
from ckptctl.sources import RemoteSource, open_source

# Zarr v2 dtype strings (numpy typestr without byte order) and v3 data_type names -> project dtype
_V2 = {
    "f8": "float64",
    "f4": "float32",
    "f2": "float16",
    "i8": "int64",
    "i4": "int32",
    "i2": "int16",
    "i1": "int8",
    "u8": "uint64",
    "u4": "uint32",
    "u2": "uint16",
    "u1": "uint8",
    "b1": "bool",
    "c8": "complex64",
    "c16": "complex128",
}
_V3 = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint64": "uint64",
    "uint32": "uint32",
    "uint16": "uint16",
    "uint8": "uint8",
    "bool": "bool",
    "complex64": "complex64",
    "complex128": "complex128",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
}


# ---- Zarr ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZarrArray:
    """What decoding one array needs (parsed from `.zarray` or `zarr.json`)."""

    key: str  # key prefix in the store, without the trailing '/'
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    swap: bool  # stored big-endian
    codecs: tuple[Any, ...]  # v2: (compressor dict or None,), v3: the codec list
    zarr_format: int
    separator: str
    v3_default_keys: bool  # v3 "default" chunk key encoding: c/0/0
    fill_value: Any  # as the metadata has it (None: zeros)
    order: str = "C"

    @property
    def fill(self) -> bytes:
        """One element's fill value bytes (little-endian)."""
        return _fill_bytes(self.fill_value, self.dtype)

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        if self.zarr_format == 3:
            if self.v3_default_keys:
                return self.key + "/" + self.separator.join(("c",) + tuple(map(str, idx)))
            return self.key + "/" + (self.separator.join(map(str, idx)) if idx else "0")
        return self.key + "/" + (self.separator.join(map(str, idx)) if idx else "0")


def _fill_bytes(fill: Any, dtype: str) -> bytes:
    import numpy as np

    if fill is None or fill == 0:
        return b"\0" * dtypes.BY_NAME[dtype].itemsize
    npdt = dtypes.numpy_dtype(dtype)
    if npdt is None:
        return b"\0" * dtypes.BY_NAME[dtype].itemsize
    try:
        if isinstance(fill, str):
            if fill.startswith("0x"):
                return int(fill, 16).to_bytes(dtypes.BY_NAME[dtype].itemsize, "little")
            fill = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(fill, fill)
        return np.array(fill).astype(npdt).astype(npdt.newbyteorder("<")).tobytes()
    except (ValueError, TypeError, OverflowError):
        return b"\0" * dtypes.BY_NAME[dtype].itemsize


def parse_zarr_meta(raw: bytes, key: str, where, label: str | None = None) -> ZarrArray:
    """`key`: the array's key in the store; `label`: its name for messages."""
    store_key, key = key, label or key
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptFile(f"array {key!r}: Zarr metadata is not valid JSON", where) from None
    if not isinstance(m, dict):
        raise CorruptFile(f"array {key!r}: Zarr metadata is not a JSON object", where)

    def dims(v: Any, what: str) -> tuple[int, ...]:
        if not isinstance(v, list) or any(type(x) is not int or x < 0 for x in v):
            raise CorruptFile(f"array {key!r}: Zarr {what} is not a list of sizes", where)
        return tuple(v)

    fmt = m.get("zarr_format")
    if fmt == 2:
        dt = m.get("dtype")
        swap = False
        if isinstance(dt, str) and dt in _V3:  # TensorStore writes "bfloat16" etc. by name
            dtype = dt
        elif isinstance(dt, str) and len(dt) >= 3 and dt[0] in "<>|" and dt[1:] in _V2:
            dtype = _V2[dt[1:]]
            swap = dt[0] == ">" and dtypes.BY_NAME[dtype].itemsize > 1
        else:
            raise CorruptFile(f"array {key!r}: Zarr dtype {dt!r} is not supported", where)
        shape, chunks = dims(m.get("shape"), "shape"), dims(m.get("chunks"), "chunks")
        if m.get("filters"):
            raise CorruptFile(f"array {key!r}: Zarr filters {m['filters']!r} are not supported", where)
        order = m.get("order", "C")
        if order not in ("C", "F"):
            raise CorruptFile(f"array {key!r}: Zarr order {order!r} is not supported", where)
        sep = m.get("dimension_separator") or "."
        if sep not in (".", "/"):
            raise CorruptFile(f"array {key!r}: Zarr dimension_separator {sep!r:.40} is not '.' or '/'", where)
        za = ZarrArray(
            store_key, dtype, shape, chunks, swap, (m.get("compressor"),), 2, sep, False, m.get("fill_value"), order
        )
    elif fmt == 3:
        dt = m.get("data_type")
        if not isinstance(dt, str) or dt not in _V3:
            raise CorruptFile(f"array {key!r}: Zarr data type {dt!r} is not supported", where)
        dtype = _V3[dt]
        shape = dims(m.get("shape"), "shape")
        grid = m.get("chunk_grid") or {}
        cfg = grid.get("configuration") if isinstance(grid, dict) else None
        if not isinstance(cfg, dict) or grid.get("name") != "regular":
            raise CorruptFile(f"array {key!r}: Zarr chunk grid {grid!r:.80} is not supported", where)
        chunks = dims(cfg.get("chunk_shape"), "chunk_shape")
        enc = m.get("chunk_key_encoding") or {"name": "default"}
        conf = enc.get("configuration") if isinstance(enc, dict) else None
        sep = conf.get("separator") if isinstance(conf, dict) else None
        default = not isinstance(enc, dict) or enc.get("name", "default") == "default"
        sep = sep or ("/" if default else ".")
        if sep not in (".", "/"):
            raise CorruptFile(f"array {key!r}: Zarr chunk key separator {sep!r:.40} is not '.' or '/'", where)
        codecs = m.get("codecs")
        if not isinstance(codecs, list):
            raise CorruptFile(f"array {key!r}: Zarr codecs missing", where)
        if not _codecs_ok(codecs):
            raise CorruptFile(f"array {key!r}: Zarr codecs {codecs!r:.80} are malformed", where)
        za = ZarrArray(store_key, dtype, shape, chunks, False, tuple(codecs), 3, sep, default, m.get("fill_value"))
    else:
        raise CorruptFile(f"array {key!r}: unknown zarr_format {fmt!r}", where)
    if len(za.chunks) != len(za.shape) or any(c == 0 for c in za.chunks) and math.prod(za.shape) != 0:
        raise CorruptFile(f"array {key!r}: chunk shape {list(za.chunks)} does not fit shape {list(za.shape)}", where)
    isz = dtypes.BY_NAME[za.dtype].itemsize
    if max(math.prod(za.shape), math.prod(za.chunks)) * isz >= 1 << 63:  # no file or numpy array can be this big
        raise CorruptFile(
            f"array {key!r}: shape {list(za.shape)!s:.80} / chunks {list(za.chunks)!s:.80} claim more than 2^63 bytes",
            where,
        )
    return za


def _codecs_ok(codecs: Any) -> bool:
    """A codec list whose entries are names or objects with an object `configuration` (nested
    codec lists of sharding_indexed too)."""
    if not isinstance(codecs, list):
        return False
    for c in codecs:
        if isinstance(c, str):
            continue
        if not isinstance(c, dict):
            return False
        cfg = c.get("configuration")
        if cfg is None:
            continue
        if not isinstance(cfg, dict):
            return False
        for sub in ("codecs", "index_codecs"):
            if cfg.get(sub) is not None and not _codecs_ok(cfg[sub]):
                return False
    return True


def _codec_name(c: Any) -> str:
    if isinstance(c, dict):
        return str(c.get("name") or c.get("id"))
    return str(c)


def _decompress(cid: str, data: bytes, expect: int, what: str, where) -> bytes:
    if cid == "zstd":
        out = zstd_decompress(data, what, where, max_size=expect)
    elif cid == "gzip":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(data, expect + 1)
            if not d.eof:
                raise CorruptFile(f"{what}: gzip data ends early (truncated?)", where)
        except zlib.error as e:
            raise CorruptFile(f"{what}: bad gzip data ({e})", where) from None
    elif cid == "zlib":
        try:
            d = zlib.decompressobj()
            out = d.decompress(data, expect + 1)
            if not d.eof:
                raise CorruptFile(f"{what}: zlib data ends early (truncated?)", where)
        except zlib.error as e:
            raise CorruptFile(f"{what}: bad zlib data ({e})", where) from None
    else:
        raise CorruptFile(f"{what}: compressor {cid!r} is not supported (zstd, gzip and zlib are)", where)
    return out


def _crc32c(data: bytes) -> int | None:
    from ckptctl.formats.ocdbt import _crc32c as c

    return c(data)


def decode_chunk(za: ZarrArray, data: bytes, cshape: tuple[int, ...], what: str, where) -> bytes:
    """Encoded chunk -> its elements in C order, little-endian (len = prod(cshape) * itemsize)."""
    isz = dtypes.BY_NAME[za.dtype].itemsize
    expect = math.prod(cshape) * isz
    transpose = None
    if za.zarr_format == 2:
        comp = za.codecs[0]
        if comp is not None:
            if not isinstance(comp, dict):
                raise CorruptFile(f"{what}: bad compressor {comp!r:.60}", where)
            data = _decompress(str(comp.get("id")), data, expect, what, where)
        swap = za.swap
        if za.order == "F":
            transpose = tuple(reversed(range(len(cshape))))
    else:
        swap = False
        codecs = list(za.codecs)
        # bytes -> bytes codecs run last on encode: undo them first
        while codecs and _codec_name(codecs[-1]) in ("zstd", "gzip", "crc32c", "blosc"):
            c = codecs.pop()
            name = _codec_name(c)
            if name == "crc32c":
                if len(data) < 4:
                    raise CorruptFile(f"{what}: shorter than its checksum (truncated?)", where)
                want = _crc32c(data[:-4])
                if want is not None and want != struct.unpack("<I", data[-4:])[0]:
                    raise CorruptFile(f"{what}: CRC-32C checksum mismatch (corrupt)", where)
                data = data[:-4]
            else:
                data = _decompress(name, data, expect, what, where)
        if not codecs:
            raise CorruptFile(f"{what}: Zarr codec chain has no array -> bytes codec", where)
        ab = codecs.pop()
        if _codec_name(ab) != "bytes":
            raise CorruptFile(f"{what}: Zarr codec {_codec_name(ab)!r} is not supported", where)
        endian = ((ab.get("configuration") or {}).get("endian", "little")) if isinstance(ab, dict) else "little"
        swap = endian == "big" and isz > 1
        for c in codecs:  # array -> array
            if _codec_name(c) != "transpose":
                raise CorruptFile(f"{what}: Zarr codec {_codec_name(c)!r} is not supported", where)
            order = (c.get("configuration") or {}).get("order")
            if order == "C":
                continue
            if order == "F":
                order = list(reversed(range(len(cshape))))
            if not isinstance(order, list) or sorted(order) != list(range(len(cshape))):
                raise CorruptFile(f"{what}: bad transpose order {order!r}", where)
            if order != list(range(len(cshape))):
                transpose = tuple(order)
    if len(data) != expect:
        raise CorruptFile(
            f"{what}: decodes to {len(data)} bytes, {za.dtype}{list(cshape)} needs {expect} (truncated or corrupt)",
            where,
        )
    if not swap and transpose is None:
        return data
    import numpy as np

    arr = np.frombuffer(data, dtype=np.dtype(f"V{isz}"))
    if swap:
        unit = isz // 2 if dtypes.BY_NAME[za.dtype].kind == "complex" else isz
        arr = np.frombuffer(data, dtype=f">u{unit}").astype(f"<u{unit}").view(np.dtype(f"V{isz}"))
    if transpose is not None:
        stored = tuple(cshape[i] for i in transpose)
        arr = arr.reshape(stored)
        inv = [0] * len(transpose)
        for i, t in enumerate(transpose):
            inv[t] = i
        arr = np.ascontiguousarray(arr.transpose(inv))
    return arr.tobytes()


_PIECE = 4 << 20


def _fill_pieces(fill: bytes, want: int, size: int) -> Iterator[bytes]:
    """`want` bytes of a repeated fill value (a chunk never written), in pieces of at most `size`."""
    piece = fill * max(1, min(size, _PIECE) // len(fill))
    left = want
    while left > 0:
        n = min(left, len(piece))
        yield piece[:n]
        left -= n


def _stream_decode(ref: ValueRef, cid: str | None, expect: int, want: int, size: int, what: str, where):
    """Decode one stored chunk with bounded memory: yield its first `want` bytes, check it holds
    exactly `expect` bytes (the rest is read and dropped: padding of an edge chunk)."""
    src = open_source(ref.file) if ref.inline is None else None
    try:
        pos, end = ref.offset, ref.offset + ref.length

        def raw(n: int) -> bytes:
            nonlocal pos
            n = min(n, end - pos)
            if n <= 0:
                return b""
            if ref.inline is not None:
                data = ref.inline[pos - ref.offset : pos - ref.offset + n]
            else:
                assert src is not None  # opened above: the value is not inline
                if isinstance(src, RemoteSource):  # sequential pieces coalesce into ranged GETs of a growing window
                    data = src.read_ahead(pos, n)
                else:
                    data = src.pread(pos, n)
            if not data:
                raise CorruptFile(f"{what}: data file ends early (truncated?)", where)
            pos += len(data)
            return data

        def decoded() -> Iterator[bytes]:
            if cid is None:
                while piece := raw(_PIECE):
                    yield piece
            elif cid == "zstd":
                try:
                    import zstandard
                except ImportError:
                    raise CorruptFile(f"{what} is zstd-compressed: install the zstandard package", where) from None

                class _Src:
                    def read(self, n: int = -1) -> bytes:
                        return raw(_PIECE if n is None or n < 0 else n)

                reader = zstandard.ZstdDecompressor().stream_reader(_Src(), read_size=1 << 20)  # type: ignore[arg-type]  # any object with read(); the stub says IO
                try:
                    while piece := reader.read(_PIECE):
                        yield piece
                except zstandard.ZstdError as e:
                    raise CorruptFile(f"{what}: bad zstd data ({e})", where) from None
            else:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS if cid == "gzip" else zlib.MAX_WBITS)
                try:
                    while True:
                        data = d.unconsumed_tail or raw(1 << 20)
                        if not data:
                            break
                        piece = d.decompress(data, _PIECE)
                        if piece:
                            yield piece
                        if d.eof:
                            break
                except zlib.error as e:
                    raise CorruptFile(f"{what}: bad {cid} data ({e})", where) from None

        got = 0
        for piece in decoded():
            if got + len(piece) > expect:
                raise CorruptFile(f"{what}: decodes to more than the {expect} bytes of a chunk (corrupt)", where)
            if got < want:
                mv = memoryview(piece)[: want - got]
                for o in range(0, len(mv), size):
                    yield mv[o : o + size]
            got += len(piece)
        if got != expect:
            raise CorruptFile(f"{what}: decodes to {got} bytes, the chunk needs {expect} (truncated or corrupt)", where)
    finally:
        if src is not None:
            src.close()
