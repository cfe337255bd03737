"""TensorFlow tensor bundles (`tf.train.Checkpoint`, `CheckpointManager`, TF 1 `Saver`, SavedModel
`variables/`), read without TensorFlow.

A checkpoint is a prefix P: `P.index`, a LevelDB-style sorted table, and `P.data-0000K-of-0000N`
shards holding the raw tensor bytes. The table is parsed here (footer + magic, block trailers with
their masked CRC32C checked, restart arrays, index block -> data blocks) and its values, the
BundleHeaderProto (key "") and one BundleEntryProto per tensor, are decoded with a small protobuf
wire decoder (tf_table.py; naming a checkpoint: tf_paths.py). Listing reads the index only (and the object graph, a small string tensor); tensor
bytes are read on demand with os.pread, and each tensor's CRC32C is checked when its bytes are read.

Names: TF 2's `/.ATTRIBUTES/VARIABLE_VALUE` suffix is dropped (`model/dense/kernel`); the raw key
stays in JSON as `key`. `_CHECKPOINTABLE_OBJECT_GRAPH` is metadata, not a tensor: it gives each
variable's old-style `full_name` and ties optimizer slots to their variable.

Bytes come through ckptctl.sources, so a prefix may be a URL (s3://b/run/ckpt-20): listing reads
the .index object (and the `checkpoint` state file of a folder), tensor bytes are ranged reads of
the data shards. String tensors are
listed with dtype `string`; their bytes are TF's own record (varint lengths, a masked CRC of them,
the strings), which no target format holds. Partitioned variables (`slices`) are listed with their
full shape and read when they are split along the first axis only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, Incompatible, NotFound
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.formats.tf_paths import (
    _plus,
    data_file,
    is_index,
    prefix_of,
    read_state_file,
    resolve_dir,
    resolve_path,
)
from ckptctl.formats.tf_table import (
    _Bad,
    _int,
    _one,
    _py_extend,
    _str,
    _sub,
    _varint,
    crc_extend,
    mask,
    masked_crc,
    proto_fields,
    slice_key,
    string_crc,
    string_values,
    table_entries,
)
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import as_path, open_source

if TYPE_CHECKING:
    from ckptctl.sources import LocalSource, RemotePath, RemoteSource

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
CRC_CHUNK = 8 << 20  # reads that only check a tensor's CRC32C
MAX_INDEX = 1 << 31  # an index bigger than 2 GiB is not a checkpoint index

# TF DataType enum -> ckptctl dtype name
DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    8: "complex64",
    9: "int64",
    10: "bool",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    14: "bfloat16",
    17: "uint16",
    18: "complex128",
    19: "float16",
    22: "uint32",
    23: "uint64",
    24: "float8_e5m2",
    25: "float8_e4m3fn",
    26: "float8_e4m3fnuz",
    28: "float8_e5m2fnuz",
}
UNSUPPORTED = {
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
    27: "float8_e4m3b11fnuz",
    29: "int4",
    30: "uint4",
}


# ---- entries -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TFTensorInfo(TensorInfo):
    """A TensorInfo that also carries the raw bundle key and, from the object graph, the variable's
    old-style name and the variable an optimizer slot belongs to."""

    key: str = ""
    full_name: str | None = None
    slot_of: str | None = None
    slot: str | None = None

    def to_json(self) -> dict:
        d = super().to_json()
        d["key"] = self.key
        if self.full_name:
            d["full_name"] = self.full_name
        if self.slot_of:
            d["slot_of"] = self.slot_of
            d["slot"] = self.slot
        return d


@dataclass(frozen=True)
class _Piece:
    shard: int
    offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class _Loc:
    pieces: tuple[_Piece, ...]  # one, or a partitioned variable's slices in order
    itemsize: int  # byte-swap unit for big-endian bundles (0: no swap)
    string: bool = False
    problem: str | None = None  # why the bytes cannot be read (unsupported slicing)
    count: int = 0  # elements (string tensors: their CRC covers each length as a uint32)


def _entry(value: bytes, key: str) -> dict:
    f = proto_fields(value)
    code = _int(f, 1)
    shape_f = _sub(f, 2)
    dims: list[int] = []
    if shape_f:
        if _one(shape_f[-1], 3):
            raise _Bad(f"entry {key!r}: unknown rank")
        for d in _sub(shape_f[-1], 2):
            size = _int(d, 1)
            if size < 0:
                raise _Bad(f"entry {key!r}: negative dimension {size}")
            dims.append(size)
    slices = []
    for s in _sub(f, 7):
        ext = []
        for e in _sub(s, 1):
            ext.append((_int(e, 1), _int(e, 2) if 2 in e else -1))
        slices.append(ext)
    crc = _int(f, 6) if 6 in f else None
    return {
        "dtype": code,
        "shape": tuple(dims),
        "shard": _int(f, 3),
        "offset": _int(f, 4),
        "size": _int(f, 5),
        "crc": crc,
        "slices": slices,
    }


# ---- the reader ----------------------------------------------------------------------------------
class TFBundleReader(Reader):
    format = "tf-bundle"

    def __init__(self, path: str | os.PathLike, note: str = ""):
        p = as_path(path)
        pre = prefix_of(p) if p.is_file() else None
        self.prefix = pre if pre is not None else p
        super().__init__(self.prefix)
        self.note = note
        self.index_path = _plus(self.prefix, ".index")
        self._srcs: dict[int, LocalSource | RemoteSource] = {}  # shard -> its byte source
        self._shards: list[Path | RemotePath] = []
        self._verified: set[str] = set()
        self.big_endian = False

    # -- files -----------------------------------------------------------------------------------
    def _src(self, shard: int):
        src = self._srcs.get(shard)
        if src is None:
            path = self._shards[shard]
            try:
                src = open_source(path)
            except FileNotFoundError:
                raise NotFound("data shard missing (no such file)", path) from None
            except OSError as e:
                raise NotFound(e.strerror or str(e), path) from None
            self._srcs[shard] = src
        return src

    def close(self) -> None:
        for src in self._srcs.values():
            src.close()
        self._srcs.clear()

    # -- metadata ------------------------------------------------------------------------------
    def _read_index(self) -> bytes:
        try:
            with open_source(self.index_path) as src:
                if src.size > MAX_INDEX:
                    raise CorruptFile(
                        f"index is {src.size} bytes: too large for a TF checkpoint index", self.index_path
                    )
                return src.pread(0, src.size) if src.size else b""
        except FileNotFoundError:
            raise NotFound("no such file (a TF checkpoint prefix P needs P.index)", self.index_path) from None
        except IsADirectoryError:
            raise NotFound("is a directory, expected a TF checkpoint index", self.index_path) from None
        except PermissionError:
            raise NotFound("permission denied", self.index_path) from None

    def _load_info(self) -> CheckpointInfo:
        data = self._read_index()
        try:
            entries = table_entries(data)
        except _Bad as e:
            raise CorruptFile(str(e), self.index_path) from None
        if not entries or entries[0][0] != b"":
            raise CorruptFile(
                "no bundle header (the first key must be empty): not a TF checkpoint index", self.index_path
            )
        try:
            header = proto_fields(entries[0][1])
            num_shards = _int(header, 1)
            endian = _int(header, 2)
            version = _sub(header, 3)
        except _Bad as e:
            raise CorruptFile(f"bundle header: {e}", self.index_path) from None
        if endian not in (0, 1):
            raise CorruptFile(f"bundle header: unknown endianness {endian}", self.index_path)
        if not 0 < num_shards <= 100_000 and len(entries) > 1:
            raise CorruptFile(f"bundle header: {num_shards} data shards", self.index_path)
        self.big_endian = endian == 1
        self._shards = [data_file(self.prefix, k, num_shards) for k in range(num_shards)]
        shard_sizes: dict[int, int] = {}

        def shard_size(k: int, key: str) -> int:
            if not 0 <= k < num_shards:
                raise CorruptFile(
                    f"tensor {key!r} points at shard {k}, but the header says {num_shards}", self.index_path
                )
            if k not in shard_sizes:
                try:
                    shard_sizes[k] = self._shards[k].stat().st_size
                except (FileNotFoundError, NotFound):
                    raise NotFound("data shard missing (no such file)", self._shards[k]) from None
                except OSError as e:
                    raise NotFound(e.strerror or str(e), self._shards[k]) from None
            return shard_sizes[k]

        raw: dict[bytes, dict] = {}
        order: list[bytes] = []
        for kb, value in entries[1:]:
            try:
                ent = _entry(value, kb.decode("utf-8", "replace"))
            except _Bad as err:
                raise CorruptFile(f"entry {kb[:80]!r}: {err}", self.index_path) from None
            raw[kb] = ent
            if not kb.startswith(b"\x00"):
                order.append(kb)
        # every piece of data must lie inside its shard
        for kb, ent in raw.items():
            if ent["slices"]:
                continue
            name = kb.decode("utf-8", "replace")
            if ent["offset"] < 0 or ent["size"] < 0:
                raise CorruptFile(f"tensor {name!r}: negative offset or size", self.index_path)
            if ent["size"] or num_shards:
                size = shard_size(ent["shard"], name)
                if ent["offset"] + ent["size"] > size:
                    raise CorruptFile(
                        f"tensor {name!r} points past the end of its data shard "
                        f"({ent['offset']} + {ent['size']} > {size} bytes): truncated?",
                        self._shards[ent["shard"]],
                    )

        graph = self._object_graph(raw.get(OBJECT_GRAPH_KEY.encode()))
        keys = [k.decode("utf-8", "replace") for k in order if k != OBJECT_GRAPH_KEY.encode()]
        short = [k[: -len(SUFFIX)] if k.endswith(SUFFIX) else k for k in keys]
        clash = {s for s in short if short.count(s) > 1} if len(set(short)) != len(short) else set()
        display = {k: (k if s in clash else s) for k, s in zip(keys, short)}
        tensors: list[TensorInfo] = []
        strings: list[str] = []
        for kb in order:
            key = kb.decode("utf-8", "replace")
            if key == OBJECT_GRAPH_KEY:
                continue
            ent = raw[kb]
            name = display[key]
            code = ent["dtype"]
            if code in UNSUPPORTED:
                raise Incompatible(
                    f"tensor {name!r} has TF dtype {UNSUPPORTED[code]}, which ckptctl does not read", self.index_path
                )
            if code not in DTYPES:
                raise CorruptFile(f"tensor {name!r}: unknown TF dtype number {code}", self.index_path)
            dt = DTYPES[code]
            d = dtypes.BY_NAME[dt]
            loc = self._locate(kb, ent, raw, d, name)
            if dt == "string":
                strings.append(name)
                nbytes = sum(p.size for p in loc.pieces)
            else:
                nbytes = dtypes.nbytes(d, ent["shape"])
                if loc.problem is None and sum(p.size for p in loc.pieces) != nbytes:
                    raise CorruptFile(
                        f"tensor {name!r}: {sum(p.size for p in loc.pieces)} bytes stored, "
                        f"{dt}{list(ent['shape'])} needs {nbytes}",
                        self.index_path,
                    )
            g = graph.get(key, {})
            tensors.append(
                TFTensorInfo(
                    name,
                    dt,
                    ent["shape"],
                    nbytes,
                    loc=loc,
                    key=key,
                    full_name=g.get("full_name"),
                    slot_of=display.get(g["slot_of"], g["slot_of"]) if g.get("slot_of") else None,
                    slot=g.get("slot"),
                )
            )
        meta: dict[str, object] = {"tf.num_shards": str(num_shards)}
        if version:
            meta["tf.bundle_version"] = str(_one(version[-1], 1))
        if self.big_endian:
            meta["tf.endianness"] = "big"
        warnings: list[str] = []
        if self.note:
            warnings.append(self.note)
        if strings:
            warnings.append(
                f"{len(strings)} string tensor(s) ({', '.join(strings[:3])}"
                f"{' ...' if len(strings) > 3 else ''}): listed, not convertible "
                "(convert --exclude them)"
            )
        problems = [t.name for t in tensors if t.loc.problem]
        if problems:
            warnings.append(
                f"{len(problems)} partitioned variable(s) split on more than the first axis "
                f"({', '.join(problems[:3])}): listed with their full shape, not readable"
            )
        kind = (
            "savedmodel"
            if self.prefix.name == "variables" and self.prefix.parent.name == "variables"
            else ("tf2" if OBJECT_GRAPH_KEY.encode() in raw else "tf1")
        )
        files = [str(self.index_path)] + [str(p) for p in self._shards]
        return CheckpointInfo(
            path=str(self.prefix),
            format=self.format,
            tensors=tensors,
            metadata=meta,
            kind=kind,
            files=files,
            warnings=warnings,
        )

    def _locate(self, kb: bytes, e: dict, raw: dict, d, name: str) -> _Loc:
        swap = d.itemsize if self.big_endian and d.kind not in ("bool", "string") and d.bits >= 16 else 0
        if d.kind == "complex" and swap:
            swap = d.itemsize // 2
        string = d.kind == "string"
        count = 1
        for n in e["shape"]:
            count *= n
        if not e["slices"]:
            return _Loc((_Piece(e["shard"], e["offset"], e["size"], e["crc"]),), swap, string, None, count)
        shape = e["shape"]
        parts = []
        problem = None
        for ext in e["slices"]:
            sk = slice_key(kb, ext)
            se = raw.get(sk)
            if se is None:
                raise CorruptFile(f"partitioned tensor {name!r}: slice {ext} has no entry", self.index_path)
            if len(ext) != len(shape) or any(not (s == 0 and n == -1) for s, n in ext[1:]):
                problem = "split on more than the first axis"
            start, n = ext[0] if ext else (0, -1)
            parts.append((start, n, _Piece(se["shard"], se["offset"], se["size"], se["crc"])))
        parts.sort(key=lambda x: x[0])
        if problem is None and shape:
            pos = 0
            for start, n, _p in parts:
                if start != pos or n < 0:
                    problem = "slices do not tile the first axis"
                    break
                pos += n
            if pos != shape[0]:
                problem = problem or "slices do not cover the first axis"
        if string:
            problem = problem or "slices are strings"
        if problem is not None:
            return _Loc((), swap, string, problem, count)
        return _Loc(tuple(p for _s, _n, p in parts), swap, string, None, count)

    def _object_graph(self, e: dict | None) -> dict[str, dict]:
        """checkpoint_key -> {full_name, slot_of, slot} from the TrackableObjectGraph (best effort)."""
        if e is None or e["slices"] or e["dtype"] != 7 or e["size"] > 256 << 20:
            return {}
        piece = _Piece(e["shard"], e["offset"], e["size"], e["crc"])
        count = 1
        for n in e["shape"]:
            count *= n
        blob = self._read_string(piece, OBJECT_GRAPH_KEY, count)
        try:
            n, pos = _varint(blob, 0)
            pos += 4  # masked crc32c of the lengths
            graph = proto_fields(blob[pos : pos + n])
            nodes = _sub(graph, 1)
            out: dict[str, dict] = {}
            node_key: dict[int, str] = {}
            for i, node in enumerate(nodes):
                for a in _sub(node, 2):
                    ck = _str(_one(a, 3, b""))
                    if _str(_one(a, 1, b"")) == "VARIABLE_VALUE":
                        node_key[i] = ck
                    fn = _str(_one(a, 2, b""))
                    if ck:
                        out.setdefault(ck, {})
                        if fn:
                            out[ck]["full_name"] = fn
            for node in nodes:
                for s in _sub(node, 3):
                    orig, slot_node = _one(s, 1), _one(s, 3)
                    if slot_node in node_key and orig in node_key:
                        rec = out.setdefault(node_key[slot_node], {})
                        rec["slot_of"] = node_key[orig]
                        rec["slot"] = _str(_one(s, 2, b""))
            return out
        except (_Bad, IndexError, TypeError, ValueError):
            return {}

    # -- data ----------------------------------------------------------------------------------
    def _read_piece(self, p: _Piece, name: str, swap: int, size: int = CHUNK, check: bool = True) -> Iterator[bytes]:
        src = self._src(p.shard)
        size = max(16, size - size % 16)
        pos, end = p.offset, p.offset + p.size
        crc = 0
        ranged = src.iter_range(pos, p.size, size) if src.remote and end <= src.size else None
        while pos < end:
            want = min(size, end - pos)
            chunk = next(ranged, b"") if ranged is not None else src.pread(pos, want)
            if not chunk:
                raise CorruptFile(
                    f"tensor {name!r}: data shard ends at byte {pos}, expected data up to byte {end} (truncated?)",
                    self._shards[p.shard],
                )
            pos += len(chunk)
            crc = crc_extend(crc, chunk)
            if swap:
                chunk = _swap(chunk, swap)
            yield chunk
        if check and p.crc is not None and p.size and mask(crc) != p.crc:
            raise CorruptFile(
                f"tensor {name!r}: CRC32C mismatch (stored {p.crc:#010x}, data gives "
                f"{mask(crc):#010x}): the data shard is corrupt",
                self._shards[p.shard],
            )

    def _read_string(self, p: _Piece, name: str, count: int) -> bytes:
        """A string tensor's whole record (lengths, their checksum, the strings), CRC checked."""
        blob = b"".join(self._read_piece(p, name, 0, check=False))
        if p.crc is None or not p.size:
            return blob
        try:
            crc = string_crc(blob, count, "big" if self.big_endian else "little")
        except _Bad as e:
            raise CorruptFile(f"tensor {name!r}: corrupt string record ({e})", self._shards[p.shard]) from None
        if mask(crc) != p.crc:
            raise CorruptFile(
                f"tensor {name!r}: CRC32C mismatch (stored {p.crc:#010x}, data gives "
                f"{mask(crc):#010x}): the data shard is corrupt",
                self._shards[p.shard],
            )
        return blob

    def _loc(self, name: str) -> _Loc:
        loc = self.tensor_info(name).loc
        if loc.problem:
            raise Incompatible(
                f"tensor {name!r} is a partitioned variable whose {loc.problem}; "
                "ckptctl reads only slices along the first axis",
                self.path,
            )
        return loc

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        loc = self._loc(name)
        if loc.string:
            blob = self._read_string(loc.pieces[0], name, loc.count)
            for i in range(0, len(blob), size):
                yield blob[i : i + size]
            return
        for p in loc.pieces:
            yield from self._read_piece(p, name, loc.itemsize, size)
        self._verified.add(name)

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        """The range in its shard, for a single-piece little-endian tensor, once its CRC32C is checked
        (the first call reads the bytes once; zero-copy writers then copy them in the kernel)."""
        t = self.tensor_info(name)
        loc = t.loc
        if loc.problem or loc.itemsize or len(loc.pieces) != 1 or t.dtype == "string":
            return None
        p = loc.pieces[0]
        if name not in self._verified:  # small pieces: only the checksum is wanted, not the bytes
            for _chunk in self._read_piece(p, name, 0, CRC_CHUNK):
                pass
            self._verified.add(name)
        return (str(self._shards[p.shard]), p.offset, p.size)


def _swap(chunk: bytes, itemsize: int) -> bytes:
    import numpy as np

    if len(chunk) % itemsize:
        raise CorruptFile(f"data of {len(chunk)} bytes is not whole {itemsize}-byte elements")
    return np.frombuffer(chunk, dtype=f">u{itemsize}").astype(f"<u{itemsize}").tobytes()


__all__ = [
    "TFBundleReader",
    "TFTensorInfo",
    "resolve_dir",
    "resolve_path",
    "is_index",
    "read_state_file",
    "masked_crc",
    "mask",
    "crc_extend",
    "table_entries",
    "proto_fields",
    "slice_key",
    "DTYPES",
    "string_values",
    "_py_extend",
]  # the last ones from tf_table, for the tests
