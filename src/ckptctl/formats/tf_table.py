"""The bytes TensorFlow writes, decoded without TensorFlow: CRC32C (masked, as LevelDB stores it),
the protobuf wire format (BundleHeaderProto, BundleEntryProto, the object graph), the LevelDB-style
sorted table of a checkpoint's `.index` (footer + magic, block trailers with their CRC checked,
restart arrays, index block -> data blocks), OrderedCode keys of partitioned-variable slices and
the record of a string tensor. The reader is tf_bundle.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER = 5


# ---- CRC32C ---------------------------------------------------------------------------------------
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: list[int] | None = None


def _py_extend(crc: int, data) -> int:
    """Pure-Python CRC-32C (slow; used only when google-crc32c is missing)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc_table()
    t = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:  # a C implementation (hardware CRC32 instruction where there is one): ~3 GB/s
    import google_crc32c as _gcrc

    def crc_extend(crc: int, data) -> int:
        if not isinstance(data, bytes):
            data = bytes(data)
        return _gcrc.extend(crc, data)
except ImportError:  # pragma: no cover - the dependency is declared
    crc_extend = _py_extend


def mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc(data) -> int:
    return mask(crc_extend(0, data))


# ---- protobuf wire format ---------------------------------------------------------------------
class _Bad(ValueError):
    pass


def _varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    end = len(buf) if end is None else end
    result = shift = 0
    while True:
        if pos >= end:
            raise _Bad("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Bad("varint longer than 10 bytes")


def proto_fields(buf: bytes) -> dict[int, list]:
    """field number -> values (int for varint/fixed, bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos, end = 0, len(buf)
    v: int | bytes
    while pos < end:
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise _Bad("field number 0")
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > end:
                raise _Bad("truncated fixed64")
            v = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Bad("truncated length-delimited field")
            v = bytes(buf[pos : pos + n])
            pos += n
        elif wt == 5:
            if pos + 4 > end:
                raise _Bad("truncated fixed32")
            v = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise _Bad(f"unsupported wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def _one(f: dict[int, list], num: int, default=0):
    v = f.get(num)
    return v[-1] if v else default  # proto3: the last value wins


def _int64(v: int) -> int:
    if not isinstance(v, int):
        raise _Bad("expected an integer field")
    return v - (1 << 64) if v >= 1 << 63 else v


def _int(f: dict[int, list], num: int) -> int:
    return _int64(_one(f, num))


def _sub(f: dict[int, list], num: int) -> list[dict[int, list]]:
    out = []
    for v in f.get(num, []):
        if not isinstance(v, bytes):
            raise _Bad(f"field {num} is not a message")
        out.append(proto_fields(v))
    return out


def _str(v) -> str:
    if not isinstance(v, bytes):
        raise _Bad("expected a string field")
    return v.decode("utf-8", "replace")


# ---- the sorted table (.index) ----------------------------------------------------------------
def _block(data: bytes, offset: int, size: int, what: str) -> bytes:
    if offset + size + TRAILER > len(data) or size < 4:
        raise _Bad(f"{what} at byte {offset} (size {size}) lies past the end of the file ({len(data)} bytes)")
    block = data[offset : offset + size]
    ctype = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    if masked_crc(data[offset : offset + size + 1]) != stored:
        raise _Bad(f"{what} at byte {offset}: CRC32C mismatch in the block trailer: the index is corrupt")
    if ctype == 1:
        raise _Bad(f"{what} at byte {offset} is snappy-compressed, which TF's bundle writer never does")
    if ctype != 0:
        raise _Bad(f"{what} at byte {offset}: unknown compression type {ctype}")
    return block


def _block_entries(block: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
    n = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * n
    if n < 1 or limit < 0:
        raise _Bad(f"{what}: bad restart array ({n} restarts in {len(block)} bytes)")
    for i in range(n):
        r = int.from_bytes(block[limit + 4 * i : limit + 4 * i + 4], "little")
        if r > limit or (i == 0 and r != 0):
            raise _Bad(f"{what}: restart point {r} outside the block")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _varint(block, pos, limit)
        non_shared, pos = _varint(block, pos, limit)
        vlen, pos = _varint(block, pos, limit)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise _Bad(f"{what}: entry at byte {pos} runs past the block")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + vlen]
        pos += vlen


def _handle(value: bytes) -> tuple[int, int]:
    off, pos = _varint(value, 0)
    size, _pos = _varint(value, pos)
    return off, size


def table_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB-style table, in order; raises _Bad on any inconsistency."""
    if len(data) < FOOTER_SIZE:
        raise _Bad(f"file is {len(data)} bytes, too short for a TF checkpoint index (48-byte footer)")
    footer = data[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != MAGIC:
        raise _Bad("bad magic number: not a TF checkpoint index (LevelDB table)")
    try:
        _moff, pos = _varint(footer, 0)
        _msize, pos = _varint(footer, pos)
        ioff, pos = _varint(footer, pos)
        isize, pos = _varint(footer, pos)
    except _Bad:
        raise _Bad("corrupt footer") from None
    index = _block(data, ioff, isize, "index block")
    out: list[tuple[bytes, bytes]] = []
    last: bytes | None = None
    for sep, handle in _block_entries(index, "index block"):
        off, size = _handle(handle)
        for key, value in _block_entries(_block(data, off, size, "data block"), f"data block at byte {off}"):
            if last is not None and key <= last:
                raise _Bad(f"keys out of order at {key[:60]!r}")
            if key > sep:
                raise _Bad(f"key {key[:60]!r} is past its index separator")
            last = key
            out.append((key, value))
    return out


# ---- OrderedCode keys of partitioned-variable slices -------------------------------------------
_HEADER_BITS = [
    (0, 0),
    (0x80, 0),
    (0xC0, 0),
    (0xE0, 0),
    (0xF0, 0),
    (0xF8, 0),
    (0xFC, 0),
    (0xFE, 0),
    (0xFF, 0),
    (0xFF, 0x80),
    (0xFF, 0xC0),
]


def _num_increasing(v: int) -> bytes:
    b = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(b)]) + b


def _signed_increasing(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    n = x.bit_length() // 7 + 1
    buf = bytearray(v.to_bytes(10, "big", signed=True))
    begin = 10 - n
    buf[begin] ^= _HEADER_BITS[n][0]
    buf[begin + 1] ^= _HEADER_BITS[n][1]
    return bytes(buf[begin:])


def slice_key(name: bytes, extents: list[tuple[int, int]]) -> bytes:
    """tensorflow::checkpoint::EncodeTensorNameSlice: the key of one stored slice."""
    esc = b"".join(b"\x00\xff" if c == 0 else b"\xff\x00" if c == 0xFF else bytes([c]) for c in name)
    out = bytearray(_num_increasing(0) + esc + b"\x00\x01" + _num_increasing(len(extents)))
    for start, length in extents:
        out += _signed_increasing(start) + _signed_increasing(length)
    return bytes(out)


def string_crc(record: bytes, count: int, order: Literal["little", "big"] = "little") -> int:
    """TF's (unmasked) CRC32C of a string tensor record: each length as a uint32 in the writer's order
    (uint64 past 4 GiB), the stored masked checksum of the lengths, then the string bytes."""
    pos = 0
    lens = bytearray()
    total = 0
    for _ in range(count):
        n, pos = _varint(record, pos)
        lens += n.to_bytes(4 if n <= 0xFFFFFFFF else 8, order)  # host order of the writer
        total += n
    if pos + 4 + total != len(record):
        raise _Bad(f"lengths add up to {pos + 4 + total} bytes, the record has {len(record)}")
    crc = crc_extend(0, bytes(lens))
    return crc_extend(crc, record[pos:])


def string_values(record: bytes, count: int) -> list[bytes]:
    """The strings of a string tensor's stored record (for tests and `inspect`-free callers)."""
    lens = []
    pos = 0
    for _ in range(count):
        n, pos = _varint(record, pos)
        lens.append(n)
    pos += 4
    out = []
    for n in lens:
        out.append(record[pos : pos + n])
        pos += n
    return out
