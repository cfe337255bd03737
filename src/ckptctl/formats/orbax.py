"""Orbax checkpoints (JAX / Flax / MaxText / T5X), read without JAX, Orbax or TensorStore.

What a checkpoint is:
- a CheckpointManager step folder `<step>/` (`_CHECKPOINT_METADATA`, one folder per item:
  `default/` or `state/`, `params/`, ... with arrays, `metrics/` with JSON);
- an item folder, or one `Checkpointer`/`StandardCheckpointer` save: `_METADATA` (the tree:
  every leaf's key path and value type), `manifest.ocdbt` + `d/` + `ocdbt.process_<i>/` (the
  OCDBT database holding every array as a Zarr array under the key `<dot.joined.path>/`),
  `_sharding`, `array_metadatas/`. Without OCDBT (`use_ocdbt=False`) each array is a Zarr
  folder `<dot.joined.path>/` of its own.

Names are the tree paths joined with `/` (`params/dense1/kernel`). `info()` reads `_METADATA`,
the OCDBT manifest and B+tree nodes and each array's `.zarray` / `zarr.json`: no chunk data.
Values are decoded chunk by chunk (Zarr v2 and v3; zstd, gzip, zlib or no compression; v3
`bytes`, `crc32c`, `transpose` and `sharding_indexed` codecs), so memory stays bounded by one
chunk row of a tensor (zarr.py). `zstandard` decompresses zstd; nothing else outside numpy is needed.

Bytes and listings come through ckptctl.sources, so the folder may be a URL (s3://b/run/100): one
LIST per folder, one GET per JSON file / manifest / B+tree node, ranged GETs for chunk bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, NotFound, UnknownFormat
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.formats.ocdbt import OcdbtStore, ValueRef
from ckptctl.formats.zarr import (
    ZarrArray,
    _codec_name,
    _crc32c,
    _fill_pieces,
    _stream_decode,
    decode_chunk,
    parse_zarr_meta,
)
from ckptctl.model import CheckpointInfo, ObjectInfo, TensorInfo
from ckptctl.sources import as_path, is_remote, open_source

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

ITEM_MARKERS = ("_METADATA", "manifest.ocdbt", "_sharding", "array_metadatas")
JSON_MAX = 64 << 20


def listdir(p) -> list[str]:
    """The names in a folder: os.listdir, or one (cached) LIST of a remote prefix; OSError when none."""
    if is_remote(p):
        return [e.name for e in as_path(p).iterdir()]
    return os.listdir(p)


def is_item_dir(p: Path | RemotePath) -> bool:
    """A folder holding one Orbax item / single save (`_METADATA` or an OCDBT manifest)."""
    try:
        names = set(listdir(p))
    except OSError:
        return False
    return (
        "_METADATA" in names or "manifest.ocdbt" in names or ("_CHECKPOINT_METADATA" in names and "_sharding" in names)
    )


def item_dirs(step: Path | RemotePath) -> list[Path | RemotePath]:
    """Item folders of a step folder that hold arrays, `default` first."""
    try:
        entries = sorted(listdir(step))
    except OSError:
        return []
    items = [step / n for n in entries if (step / n).is_dir() and not (step / n).is_symlink() and is_item_dir(step / n)]
    items.sort(key=lambda p: (p.name != "default", p.name))
    return items


def is_orbax_dir(p: Path | RemotePath) -> bool:
    """An item folder, a single save, or a step folder with `_CHECKPOINT_METADATA` / item folders."""
    if is_item_dir(p):
        return True
    try:
        names = set(listdir(p))
    except OSError:
        return False
    if "_CHECKPOINT_METADATA" in names:
        return True
    return bool(item_dirs(p))


def run_hint(p: Path | RemotePath) -> str | None:
    """A message for a CheckpointManager run folder (step folders inside), else None."""
    try:
        steps = sorted((n for n in listdir(p) if n.isdigit() and is_orbax_dir(p / n)), key=int)
    except OSError:
        return None
    if not steps:
        return None
    shown = ", ".join(s + "/" for s in steps[:3]) + (", ..." if len(steps) > 3 else "")
    return (
        f"an Orbax run folder with {len(steps)} step folder{'s' if len(steps) != 1 else ''} ({shown}): "
        f"name one of them, or list the run with `ckptctl ls`"
    )


def _read_json(path: Path | RemotePath, what: str) -> Any:
    try:
        if is_remote(path):
            if not as_path(path).is_file():
                return None
            with open_source(path) as src:
                data = src.pread(0, min(src.size, JSON_MAX + 1))
        else:
            with open(path, "rb") as f:
                data = f.read(JSON_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NotFound(f"cannot read {what}: {e.strerror}", path) from None
    if len(data) > JSON_MAX:
        raise CorruptFile(f"{what} is larger than {JSON_MAX >> 20} MiB", path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptFile(f"{what} is not valid JSON (corrupt or truncated)", path) from None


STREAM_MIN = 8 << 20  # chunks at least this large (decoded) are decoded piece by piece


# ---- key-value stores ---------------------------------------------------------------------------
class _DirStore:
    """A plain folder (Orbax with use_ocdbt=False): keys are relative file paths."""

    def __init__(self, root: Path | RemotePath):
        self.root = root
        self.files: set[str] = set()

    def ref(self, key: str) -> ValueRef | None:
        parts = key.split("/")
        if not key or "\x00" in key or "\\" in key or key.startswith("/") or ".." in parts:
            raise CorruptFile(f"array key {key!r:.80} points outside the checkpoint folder", self.root)
        p = self.root / key
        if is_remote(p):  # from the listing of the array's folder (one LIST per folder)
            try:
                if not p.is_file():
                    return None
                size = p.stat().st_size
            except (OSError, NotFound, UnicodeEncodeError):
                return None
        else:
            try:
                st = os.stat(p)
            except (OSError, UnicodeEncodeError):  # a lone surrogate (a JSON escape) names no file
                return None
            if not os.path.isfile(p):
                return None
            size = st.st_size
        self.files.add(os.fspath(p))
        return ValueRef(size, file=os.fspath(p), offset=0)

    def read(self, ref: ValueRef, what: str) -> bytes:
        assert ref.file is not None
        if is_remote(ref.file):
            with open_source(ref.file) as src:
                data = src.pread(0, ref.length + 1)
        else:
            with open(ref.file, "rb") as f:
                data = f.read(ref.length + 1)
        if len(data) != ref.length:
            raise CorruptFile(f"{what}: file changed while reading", self.root)
        return data

    def keys(self) -> list[bytes]:
        out = []
        if is_remote(self.root):
            todo = [(self.root, "")]
            while todo:
                folder, rel = todo.pop()
                try:
                    entries: list[Path | RemotePath] = list(as_path(folder).iterdir())
                except OSError:
                    continue
                for e in entries:
                    if e.is_dir():
                        todo.append((e, rel + e.name + "/"))
                    else:
                        out.append((rel + e.name).encode())
            return sorted(out)
        for dp, _dn, fn in os.walk(os.fspath(self.root)):  # (os.walk takes fspath of a Path too)
            for n in fn:
                out.append(os.path.relpath(os.path.join(dp, n), self.root).replace(os.sep, "/").encode())
        return sorted(out)


@dataclass(frozen=True)
class OrbaxLoc:
    item: int  # index into the reader's items
    za: ZarrArray


@dataclass
class _Item:
    path: Path | RemotePath
    prefix: str  # '' or 'itemname/'
    store: Any = None
    all_chunks: bool = False  # _METADATA says every chunk was written (even all-fill ones)


class OrbaxReader(Reader):
    format = "orbax"

    def __init__(self, path):
        super().__init__(path)
        p = self.path  # a Path, or a sources.RemotePath
        if not p.is_dir():
            raise NotFound("not a folder", p)
        self._items: list[_Item] = []
        self._json_items: dict[str, Any] = {}
        if is_item_dir(p):
            self._items.append(_Item(p, ""))
        else:
            found = item_dirs(p)
            handlers = _read_json(p / "_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA")
            order = (
                list(handlers.get("item_handlers") or {})
                if isinstance(handlers, dict) and isinstance(handlers.get("item_handlers"), dict)
                else []
            )
            # the order the manager saved them in (default first), then the rest by name
            found.sort(key=lambda d: (d.name != "default", order.index(d.name) if d.name in order else len(order)))
            if not found:
                raise UnknownFormat("an Orbax step folder with no item holding arrays (no _METADATA)", p)
            single = len(found) == 1
            for d in found:
                self._items.append(_Item(d, "" if single else d.name + "/"))

    # -- metadata -------------------------------------------------------------------------------
    def _store(self, item: _Item):
        if item.store is None:
            if (item.path / "manifest.ocdbt").is_file():
                item.store = OcdbtStore(item.path)
            elif any(n.startswith("ocdbt.process_") for n in listdir(item.path)):
                raise CorruptFile(
                    "no manifest.ocdbt beside the ocdbt.process_* folders (the save did not finish?)", item.path
                )
            else:
                item.store = _DirStore(item.path)
        return item.store

    def _load_info(self) -> CheckpointInfo:
        root = self.path
        tensors: list[TensorInfo] = []
        objects: list[ObjectInfo] = []
        meta: dict[str, Any] = {}
        files: list[str] = []
        warnings: list[str] = []
        kind = None
        cm = _read_json(root / "_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA")
        if isinstance(cm, dict):
            handlers = cm.get("item_handlers")
            if isinstance(handlers, str):
                kind = handlers.rsplit(".", 1)[-1]
            for k in ("metrics", "custom_metadata", "custom"):
                if isinstance(cm.get(k), dict) and cm[k]:
                    meta[k] = cm[k]
            if isinstance(cm.get("commit_timestamp_nsecs"), int):
                meta["commit_timestamp_nsecs"] = cm["commit_timestamp_nsecs"]
            files.append(os.fspath(root / "_CHECKPOINT_METADATA"))
        # JSON items of a step folder (metrics/metrics)
        if not is_item_dir(root):
            for d in sorted(listdir(root)):
                sub = root / d
                if sub.is_dir() and not sub.is_symlink() and not is_item_dir(sub) and (sub / d).is_file():
                    doc = _read_json(sub / d, f"{d}/{d}")
                    if isinstance(doc, (dict, list, int, float, str)):
                        meta[d] = doc
        for idx, item in enumerate(self._items):
            self._item_info(idx, item, tensors, objects, meta, files, warnings)
            if kind is None:
                kind = meta.pop("_kind", None)
            meta.pop("_kind", None)
        return CheckpointInfo(
            path=os.fspath(self.path),
            format=self.format,
            tensors=tensors,
            metadata=meta,
            objects=objects,
            kind=kind,
            files=files,
            warnings=warnings,
        )

    def _item_info(self, idx: int, item: _Item, tensors, objects, meta, files, warnings) -> None:
        md_path = item.path / "_METADATA"
        md = _read_json(md_path, "_METADATA")
        store = self._store(item)
        leaves: list[tuple[str, str, str]] = []  # (tree path, storage key, value type)
        if md is None:
            if not (item.path / "manifest.ocdbt").is_file() and not (item.path / "checkpoint").exists():
                raise CorruptFile("no _METADATA in this Orbax item", item.path)
            # older saves: no tree metadata; list the arrays the store holds
            for k in store.keys():
                s = k.decode(errors="replace")
                if s.endswith("/.zarray") or s.endswith("/zarr.json"):
                    key = s.rsplit("/", 1)[0]
                    leaves.append((key.replace(".", "/"), key, "array"))
            warnings.append(f"{item.path.name}: no _METADATA; names are the storage keys with '.' read as '/'")
        else:
            files.append(os.fspath(md_path))
            if not isinstance(md, dict):
                raise CorruptFile("_METADATA is not a JSON object", md_path)
            tree = md.get("tree_metadata")
            if not isinstance(tree, dict):
                raise CorruptFile("_METADATA has no tree_metadata", md_path)
            for flat, entry in tree.items():
                if not isinstance(entry, dict):
                    raise CorruptFile(f"_METADATA: entry {flat!r:.60} is not an object", md_path)
                km = entry.get("key_metadata")
                vm = entry.get("value_metadata") or {}
                if not isinstance(km, list) or not isinstance(vm, dict):
                    raise CorruptFile(f"_METADATA: entry {flat!r:.60} has no key_metadata", md_path)
                parts = [str(k.get("key")) if isinstance(k, dict) else str(k) for k in km]
                vtype = str(vm.get("value_type", "?"))
                leaves.append(("/".join(parts), ".".join(parts), vtype))
            if isinstance(md.get("custom_metadata"), dict) and md["custom_metadata"]:
                meta[f"{item.prefix}custom_metadata" if item.prefix else "custom_metadata"] = md["custom_metadata"]
            item.all_chunks = md.get("store_array_data_equal_to_fill_value") is True
            storage = {"use_ocdbt": md.get("use_ocdbt"), "use_zarr3": md.get("use_zarr3")}
            meta.setdefault("storage", {k: v for k, v in storage.items() if v is not None})
        for name, key, vtype in leaves:
            full = item.prefix + name
            if vtype in ("None", "Dict", "List", "Tuple", "NamedTuple") or vtype.startswith("Empty"):
                continue  # empty containers
            ref_v2 = store.ref(key + "/.zarray")
            ref = ref_v2 or store.ref(key + "/zarr.json")
            if ref is None:
                if vtype in ("jax.Array", "np.ndarray", "scalar", "array"):
                    raise CorruptFile(
                        f"array {full!r}: no Zarr metadata ({key}/.zarray) in the store "
                        "(a missing or incomplete data file?)",
                        item.path,
                    )
                objects.append(ObjectInfo(full, vtype))
                continue
            za = parse_zarr_meta(store.read(ref, f"{key} metadata"), key, item.path, full)
            d = dtypes.BY_NAME[za.dtype]
            tensors.append(TensorInfo(full, za.dtype, za.shape, dtypes.nbytes(d, za.shape), loc=OrbaxLoc(idx, za)))
        if isinstance(store, OcdbtStore):
            store.check_files()
        files.extend(
            sorted(os.fspath(item.path / n) for n in ("manifest.ocdbt", "_sharding") if (item.path / n).is_file())
        )
        files.extend(sorted(getattr(store, "files", ())))

    # -- data -----------------------------------------------------------------------------------
    def _chunk(self, loc: OrbaxLoc, idx: tuple[int, ...], name: str) -> bytes:
        """One chunk's elements (full chunk shape), fill value where the chunk was never written."""
        za = loc.za
        item = self._items[loc.item]
        store = self._store(item)
        key = za.chunk_key(idx)
        what = f"{name!r} chunk {key}"
        sharding = za.zarr_format == 3 and za.codecs and _codec_name(za.codecs[0]) == "sharding_indexed"
        ref = store.ref(key)
        if ref is None:
            if item.all_chunks:
                raise CorruptFile(f"{what} is missing from the store (Orbax writes every chunk)", item.path)
            return za.fill * math.prod(za.chunks)
        data = store.read(ref, what)
        if sharding:
            return self._shard(za, data, what, item.path)
        return decode_chunk(za, data, za.chunks, what, item.path)

    def _stream_chunk(self, loc: OrbaxLoc, idx: tuple[int, ...], name: str, want: int, size: int):
        """The first `want` decoded bytes of a chunk stored out of line, in pieces of at most `size`
        bytes, or None when the chunk is small or its codecs need the whole chunk at once."""
        za = loc.za
        isz = dtypes.BY_NAME[za.dtype].itemsize
        if za.zarr_format == 2:
            if za.swap or za.order != "C":
                return None
            comp = za.codecs[0]
            cid = None if comp is None else str(comp.get("id")) if isinstance(comp, dict) else "?"
        else:
            names = [_codec_name(c) for c in za.codecs]
            if (
                not names
                or names[0] != "bytes"
                or len(names) > 2
                or (len(names) == 2 and names[1] not in ("zstd", "gzip"))
            ):
                return None
            cfg = za.codecs[0].get("configuration") if isinstance(za.codecs[0], dict) else None
            if isz > 1 and (cfg or {}).get("endian", "little") != "little":
                return None
            cid = names[1] if len(names) == 2 else None
        if cid not in (None, "zstd", "gzip", "zlib"):
            return None
        item = self._items[loc.item]
        store = self._store(item)
        key = za.chunk_key(idx)
        ref = store.ref(key)
        expect = math.prod(za.chunks) * isz
        if expect < STREAM_MIN:
            return None
        if ref is None:
            if item.all_chunks:
                raise CorruptFile(
                    f"{name!r} chunk {key} is missing from the store (Orbax writes every chunk)", item.path
                )
            return _fill_pieces(za.fill, want, size)
        return _stream_decode(ref, cid, expect, want, size, f"{name!r} chunk {key}", item.path)

    def _shard(self, za: ZarrArray, data: bytes, what: str, where) -> bytes:
        """A v3 shard: inner chunks + an index of (offset, nbytes) u64 pairs."""
        import numpy as np

        cfg = (za.codecs[0].get("configuration") or {}) if isinstance(za.codecs[0], dict) else {}
        inner = tuple(cfg.get("chunk_shape") or ())
        if len(inner) != len(za.chunks) or any(type(x) is not int or x <= 0 or s % x for x, s in zip(inner, za.chunks)):
            raise CorruptFile(f"{what}: bad sharding chunk_shape {list(inner)}", where)
        grid = tuple(s // x for s, x in zip(za.chunks, inner))
        n = math.prod(grid)
        index_codecs = [_codec_name(c) for c in cfg.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]]
        ilen = n * 16 + (4 * index_codecs.count("crc32c"))
        if len(data) < ilen:
            raise CorruptFile(f"{what}: shard smaller than its index (truncated?)", where)
        at_start = cfg.get("index_location", "end") == "start"
        ibytes = data[:ilen] if at_start else data[len(data) - ilen :]
        if "crc32c" in index_codecs:
            want = _crc32c(ibytes[:-4])
            if want is not None and want != struct.unpack("<I", ibytes[-4:])[0]:
                raise CorruptFile(f"{what}: shard index checksum mismatch (corrupt)", where)
            ibytes = ibytes[:-4]
        index = np.frombuffer(ibytes, dtype="<u8").reshape(n, 2)
        inner_za = ZarrArray(
            za.key,
            za.dtype,
            za.shape,
            inner,
            False,
            tuple(cfg.get("codecs") or [{"name": "bytes"}]),
            3,
            za.separator,
            za.v3_default_keys,
            za.fill_value,
        )
        isz = dtypes.BY_NAME[za.dtype].itemsize
        out = np.empty(za.chunks, dtype=np.dtype(f"V{isz}"))
        for flat in range(n):
            off, nb = int(index[flat, 0]), int(index[flat, 1])
            pos = np.unravel_index(flat, grid)
            sl = tuple(slice(p * x, (p + 1) * x) for p, x in zip(pos, inner))
            if off == 2**64 - 1 and nb == 2**64 - 1:
                piece = za.fill * math.prod(inner)
            else:
                if off + nb > len(data):
                    raise CorruptFile(f"{what}: inner chunk past the end of the shard (truncated?)", where)
                piece = decode_chunk(inner_za, data[off : off + nb], inner, what, where)
            out[sl] = np.frombuffer(piece, dtype=out.dtype).reshape(inner)
        return out.tobytes()

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        t = self.tensor_info(name)
        loc = t.loc
        if not isinstance(loc, OrbaxLoc):
            raise CorruptFile(f"tensor {name!r} has no data location", self.path)
        if t.numel == 0:
            return
        za = loc.za
        shape, chunks = za.shape, za.chunks
        isz = dtypes.BY_NAME[za.dtype].itemsize
        size = max(1, int(size))
        if not shape:  # scalar
            yield self._chunk(loc, (), name)[:isz]
            return
        grid = [-(-s // c) for s, c in zip(shape, chunks)]
        if all(g == 1 for g in grid[1:]):
            # chunks are whole rows of the array: stream them in order, trimming the padding
            row = math.prod(shape[1:]) * isz
            full_row = math.prod(chunks[1:]) * isz
            for i in range(grid[0]):
                idx = (i,) + (0,) * (len(shape) - 1)
                rows = min(chunks[0], shape[0] - i * chunks[0])
                if full_row == row:
                    stream = self._stream_chunk(loc, idx, name, rows * row, size)
                    if stream is not None:  # a large stored chunk: decoded piece by piece
                        yield from stream
                        continue
                data = self._chunk(loc, idx, name)
                if full_row == row:
                    piece = memoryview(data)[: rows * row]
                else:
                    import numpy as np

                    arr = np.frombuffer(data, dtype=np.dtype(f"V{isz}")).reshape(chunks)
                    sl = (slice(0, rows),) + tuple(slice(0, s) for s in shape[1:])
                    piece = memoryview(np.ascontiguousarray(arr[sl]).tobytes())
                for o in range(0, len(piece), size):
                    yield piece[o : o + size]
            return
        # general grid: assemble one chunk row (all chunks with the same index along dim 0) at a time
        import itertools

        import numpy as np

        vdt = np.dtype(f"V{isz}")
        for i in range(grid[0]):
            rows = min(chunks[0], shape[0] - i * chunks[0])
            try:
                slab = np.empty((rows,) + tuple(shape[1:]), dtype=vdt)
            except (MemoryError, ValueError):  # a shape (mostly fill value) far larger than memory
                raise CorruptFile(
                    f"tensor {name!r}: a row of chunks is {rows * math.prod(shape[1:]) * isz} bytes, "
                    "too large to assemble in memory",
                    self.path,
                ) from None
            for rest in itertools.product(*[range(g) for g in grid[1:]]):
                idx = (i,) + rest
                data = self._chunk(loc, idx, name)
                arr = np.frombuffer(data, dtype=vdt).reshape(chunks)
                dst = [slice(0, rows)]
                src = [slice(0, rows)]
                for d, j in enumerate(rest, start=1):
                    lo = j * chunks[d]
                    hi = min(lo + chunks[d], shape[d])
                    dst.append(slice(lo, hi))
                    src.append(slice(0, hi - lo))
                slab[tuple(dst)] = arr[tuple(src)]
            piece = memoryview(slab.tobytes())
            for o in range(0, len(piece), size):
                yield piece[o : o + size]
