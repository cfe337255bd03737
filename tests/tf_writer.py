"""A small, test-only writer of TensorFlow tensor bundles (P.index + P.data-K-of-N), written from
TF's byte layout (tensorflow/core/util/tensor_bundle, tsl/lib/io/table_builder), independently of
ckptctl's reader: its own protobuf encoder, LevelDB table builder, CRC32C (google-crc32c) and
OrderedCode slice keys.

write_bundle(prefix, {name: array}) writes numpy arrays (bf16/fp8 via ml_dtypes), string tensors
(numpy object arrays of bytes), optionally big-endian, across several data shards, and partitioned
variables (`slices={name: [rows, rows, ...]}`: split along the first axis), or along another axis
(`slice_axis`). Keys are written as given (use `.../.ATTRIBUTES/VARIABLE_VALUE` for TF 2 names).
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import ml_dtypes
import numpy as np

MAGIC = 0xDB4775248B80FB57

TF_DTYPES = {
    "float32": 1,
    "float64": 2,
    "int32": 3,
    "uint8": 4,
    "int16": 5,
    "int8": 6,
    "complex64": 8,
    "int64": 9,
    "bool": 10,
    "bfloat16": 14,
    "uint16": 17,
    "complex128": 18,
    "float16": 19,
    "uint32": 22,
    "uint64": 23,
    "float8_e5m2": 24,
    "float8_e4m3fn": 25,
}
STRING = 7


def crc(data: bytes, start: int = 0) -> int:
    return google_crc32c.extend(start, bytes(data))


def masked(c: int) -> int:
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf ------------------------------------------------------------------------------------
def varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def f_bytes(num: int, b: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(b)) + b


def f_fixed32(num: int, v: int) -> bytes:
    return varint(num << 3 | 5) + v.to_bytes(4, "little")


def shape_proto(shape) -> bytes:
    return b"".join(f_bytes(2, f_varint(1, int(d)) if d else b"") for d in shape)


def slice_proto(extents) -> bytes:
    out = b""
    for start, length in extents:
        e = b"" if length == -1 else f_varint(1, start) + f_varint(2, length)
        out += f_bytes(1, e)
    return out


def entry_proto(dtype: int, shape, shard=0, offset=0, size=0, crc32c=None, slices=None) -> bytes:
    out = f_varint(1, dtype) + f_bytes(2, shape_proto(shape))
    if shard:
        out += f_varint(3, shard)
    if offset:
        out += f_varint(4, offset)
    if size:
        out += f_varint(5, size)
    if crc32c is not None:
        out += f_fixed32(6, crc32c)
    for s in slices or []:
        out += f_bytes(7, slice_proto(s))
    return out


def header_proto(num_shards: int, big_endian: bool) -> bytes:
    out = f_varint(1, num_shards)
    if big_endian:
        out += f_varint(2, 1)
    return out + f_bytes(3, f_varint(1, 1))


# ---- OrderedCode (tensorflow/core/lib/strings/ordered_code.cc) ------------------------------------
_LEN_HEADER = [
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


def oc_num(v: int) -> bytes:
    n = (v.bit_length() + 7) // 8
    return bytes([n]) + (v.to_bytes(n, "big") if n else b"")


def oc_string(s: bytes) -> bytes:
    out = bytearray()
    for c in s:
        out += b"\x00\xff" if c == 0 else b"\xff\x00" if c == 0xFF else bytes([c])
    return bytes(out) + b"\x00\x01"


def oc_signed(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    n = x.bit_length() // 7 + 1
    buf = bytearray(v.to_bytes(10, "big", signed=True))
    b = 10 - n
    buf[b] ^= _LEN_HEADER[n][0]
    buf[b + 1] ^= _LEN_HEADER[n][1]
    return bytes(buf[b:])


def slice_key(name: str, extents) -> bytes:
    out = oc_num(0) + oc_string(name.encode()) + oc_num(len(extents))
    for start, length in extents:
        out += oc_signed(start) + oc_signed(length)
    return out


# ---- LevelDB table ---------------------------------------------------------------------------------
class _Block:
    def __init__(self, restart_interval: int):
        self.buf = bytearray()
        self.restarts = [0]
        self.interval = restart_interval
        self.count = 0
        self.last = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.interval:
            m = min(len(key), len(self.last))
            while shared < m and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        self.last = key
        self.count += 1

    def finish(self) -> bytes:
        return (
            bytes(self.buf)
            + b"".join(r.to_bytes(4, "little") for r in self.restarts)
            + len(self.restarts).to_bytes(4, "little")
        )


def table(items: list[tuple[bytes, bytes]], block_size: int = 4096, restart_interval: int = 16) -> bytes:
    out = bytearray()

    def emit(block: bytes) -> bytes:
        off = len(out)
        out.extend(block + b"\x00" + masked(crc(block + b"\x00")).to_bytes(4, "little"))
        return varint(off) + varint(len(block))

    index = _Block(1)
    blk = _Block(restart_interval)
    last = None
    for key, value in sorted(items):
        blk.add(key, value)
        last = key
        if len(blk.buf) >= block_size:
            index.add(last, emit(blk.finish()))
            blk = _Block(restart_interval)
    if blk.count or not index.count:
        index.add(last if last is not None else b"", emit(blk.finish()))
    meta_handle = emit(_Block(1).finish())
    index_handle = emit(index.finish())
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + MAGIC.to_bytes(8, "little")
    out += footer
    return bytes(out)


# ---- bundles ---------------------------------------------------------------------------------------
def tf_dtype(a: np.ndarray) -> int:
    if a.dtype == object:
        return STRING
    name = a.dtype.name
    return TF_DTYPES[name]


def raw_bytes(a: np.ndarray, big_endian: bool = False) -> bytes:
    a = np.ascontiguousarray(a)
    if big_endian and a.dtype.itemsize > 1 and a.dtype.kind in "iufc":
        return a.astype(a.dtype.newbyteorder(">")).tobytes()
    if big_endian and a.dtype.itemsize == 2 and a.dtype in (np.dtype(ml_dtypes.bfloat16),):
        return a.view(np.uint16).astype(">u2").tobytes()
    return a.tobytes()


def string_record(values, big_endian: bool = False) -> tuple[bytes, int]:
    """(stored record, masked crc32c of the entry) for a string tensor; TF checksums each length as
    a uint32 in the writing machine's byte order and stores the lengths' checksum in that order."""
    order = "big" if big_endian else "little"
    lens = b"".join(varint(len(v)) for v in values)
    c = crc(b"".join(len(v).to_bytes(4, order) for v in values))
    length_checksum = masked(c).to_bytes(4, order)
    c = crc(length_checksum, c)
    body = b"".join(values)
    c = crc(body, c)
    return lens + length_checksum + body, masked(c)


def data_name(prefix, k: int, n: int) -> Path:
    return Path(f"{prefix}.data-{k:05d}-of-{n:05d}")


def write_bundle(
    prefix,
    tensors: dict,
    *,
    big_endian: bool = False,
    num_shards: int = 1,
    slices: dict | None = None,
    slice_axis: int = 0,
    block_size: int = 4096,
    raw_entries: dict | None = None,
) -> list[Path]:
    """Write P.index and the data shards; returns the files written. Tensors go to shards in turn.

    slices: name -> list of part sizes along `slice_axis` (a partitioned variable).
    raw_entries: extra key -> entry bytes written into the index as they are (for broken files).
    """
    prefix = Path(prefix)
    os.makedirs(prefix.parent, exist_ok=True)
    shards = [bytearray() for _ in range(num_shards)]
    items: list[tuple[bytes, bytes]] = [(b"", header_proto(num_shards, big_endian))]
    turn = 0

    def put(data: bytes) -> tuple[int, int]:
        nonlocal turn
        k = turn % num_shards
        turn += 1
        off = len(shards[k])
        shards[k] += data
        return k, off

    for name, a in tensors.items():
        if isinstance(a, list):
            a = np.array(a, dtype=object)
        a = np.asarray(a) if not isinstance(a, np.ndarray) else a
        dt = tf_dtype(a)
        parts = (slices or {}).get(name)
        if parts:
            extents_list = []
            pos = 0
            for n in parts:
                ext = [(0, -1)] * a.ndim
                ext[slice_axis] = (pos, n)
                idx = [slice(None)] * a.ndim
                idx[slice_axis] = slice(pos, pos + n)
                piece = np.ascontiguousarray(a[tuple(idx)])
                data = raw_bytes(piece, big_endian)
                k, off = put(data)
                items.append((slice_key(name, ext), entry_proto(dt, piece.shape, k, off, len(data), masked(crc(data)))))
                extents_list.append(ext)
                pos += n
            items.append((name.encode(), entry_proto(dt, a.shape, slices=extents_list)))
            continue
        if dt == STRING:
            data, c = string_record([bytes(v) for v in a.reshape(-1)], big_endian)
        else:
            data = raw_bytes(a, big_endian)
            c = masked(crc(data))
        k, off = put(data)
        items.append((name.encode(), entry_proto(dt, a.shape, k, off, len(data), c)))
    for key, value in (raw_entries or {}).items():
        items.append((key if isinstance(key, bytes) else key.encode(), value))
    files = [Path(f"{prefix}.index")]
    files[0].write_bytes(table(items, block_size=block_size))
    for k, buf in enumerate(shards):
        p = data_name(prefix, k, num_shards)
        p.write_bytes(bytes(buf))
        files.append(p)
    return files


def write_state_file(folder, prefixes: list[str]) -> Path:
    """A CheckpointManager `checkpoint` file naming `prefixes` (oldest first; the last is latest)."""
    p = Path(folder) / "checkpoint"
    lines = [f'model_checkpoint_path: "{prefixes[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{x}"' for x in prefixes]
    lines += [f"all_model_checkpoint_timestamps: {1796193738.9 + i}" for i in range(len(prefixes))]
    p.write_text("\n".join(lines) + "\n")
    return p


def write_bundle_streaming(prefix, specs, *, chunk: int = 64 << 20) -> list[Path]:
    """A big single-shard little-endian bundle written in bounded memory (for benchmarks).

    specs: (key, dtype name, shape, source); source None writes zeros as a sparse range (CRC of
    zeros computed), or (path, offset) copies the tensor's bytes from that file range.
    """
    prefix = Path(prefix)
    os.makedirs(prefix.parent, exist_ok=True)
    data = data_name(prefix, 0, 1)
    items: list[tuple[bytes, bytes]] = [(b"", header_proto(1, False))]
    zeros = bytes(min(chunk, 16 << 20))
    pos = 0
    with open(data, "wb") as out:
        for key, dt, shape, source in specs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(getattr(ml_dtypes, dt, dt)).itemsize
            c = 0
            if source is None:
                left = n
                while left:
                    k = min(left, len(zeros))
                    c = crc(zeros if k == len(zeros) else zeros[:k], c)
                    left -= k
                out.truncate(pos + n)
                out.seek(pos + n)
            else:
                path, off = source
                fd = os.open(path, os.O_RDONLY)
                try:
                    done = 0
                    while done < n:
                        b = os.pread(fd, min(chunk, n - done), off + done)
                        if not b:
                            raise EOFError(path)
                        c = crc(b, c)
                        out.write(b)
                        done += len(b)
                finally:
                    os.close(fd)
            items.append((key.encode(), entry_proto(TF_DTYPES[dt], shape, 0, pos, n, masked(c))))
            pos += n
    index = Path(f"{prefix}.index")
    index.write_bytes(table(items))
    return [index, data]
