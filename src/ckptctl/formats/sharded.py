"""HF sharded checkpoints: one logical checkpoint from an index json and the shards it names.

`{"metadata": {...}, "weight_map": {tensor name: shard file}}` as written by transformers for
`model.safetensors.index.json`, `pytorch_model.bin.index.json` and `tf_model.h5.index.json`.
Each shard is opened with the registry (any format ckptctl reads), lazily and once; data reads
are delegated to the shard that holds the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from itertools import compress, repeat
from operator import attrgetter, is_, ne
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, cast

from ckptctl.errors import CkptError, CorruptFile, NotFound
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.formats.gcpause import paused_gc
from ckptctl.model import CheckpointInfo, ObjectInfo, TensorInfo

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

MAX_INDEX_BYTES = 256 * 1024 * 1024
_NAME, _DTYPE, _SHAPE, _NBYTES = attrgetter("name"), attrgetter("dtype"), attrgetter("shape"), attrgetter("nbytes")
_ALIAS_OF, _LOC = attrgetter("alias_of"), attrgetter("loc")


class ShardedReader(Reader):
    format = "sharded"

    def __init__(self, path):
        super().__init__(path)
        self._shards: dict[str, Reader] = {}  # shard file name (as in the index) -> open reader
        self._where: dict[str, str] = {}  # tensor name -> shard file name

    # -- index ---------------------------------------------------------------------------------
    def _read_index(self) -> tuple[dict, dict[str, str]]:
        return read_weight_map(
            self.path, MAX_INDEX_BYTES, "shard index", '{"metadata": ..., "weight_map": {tensor: shard file}}'
        )

    def _shard_path(self, shard: str) -> Path | RemotePath:
        return self.path.parent / shard

    def _shard(self, shard: str) -> Reader:
        r = self._shards.get(shard)
        if r is None:
            from ckptctl.formats import open_reader

            p = self._shard_path(shard)
            try:
                exists = p.exists()
            except OSError as e:  # a name too long for the file system, ...
                raise NotFound(
                    f"shard {shard!r:.100} named in the index cannot be looked up ({e.strerror})", self.path
                ) from None
            if not exists:
                raise NotFound(f"shard {shard} named in the index is missing", self.path)
            if p.is_dir():
                raise CorruptFile(f"shard {shard} named in the index is a folder, not a file", self.path)
            r = open_reader(p)
            if isinstance(r, ShardedReader):
                r.close()
                raise CorruptFile(f"shard {shard} is itself a shard index", self.path)
            self._shards[shard] = r
        return r

    # -- metadata ------------------------------------------------------------------------------
    def _load_info(self) -> CheckpointInfo:
        with paused_gc():  # 10^5 names and records: see safetensors.paused_gc
            return self._load_info_now()

    def _load_info_now(self) -> CheckpointInfo:
        meta, wm = self._read_index()
        order: list[str] = list(dict.fromkeys(wm.values()))  # shard files, first mention first
        infos: dict[str, CheckpointInfo] = {}
        for shard in order:
            infos[shard] = self._shard(shard).info()

        # Each name's tensor: the first of that name in its shard, looked up in one dict of
        # (shard, name) for all shards, by C loops (map, zip): 10^5 names (issue 13)
        names, shard_of = list(wm), list(wm.values())
        held: dict[tuple[str, str], TensorInfo] = {}
        for shard in order:
            ts = infos[shard].tensors[::-1]  # backwards: the first of a name is the one kept
            held.update(zip(zip(repeat(shard), map(_NAME, ts)), ts))
        got = list(map(held.get, zip(shard_of, names)))
        if any(map(is_, got, repeat(None))):
            i = list(map(is_, got, repeat(None))).index(True)
            raise CorruptFile(f"the index maps {names[i]!r} to {shard_of[i]}, which does not hold it", self.path)
        found = cast("list[TensorInfo]", got)  # (no None: checked just above)
        if set(map(type, found)) <= {TensorInfo}:  # dataclasses.replace costs ~10 µs: built directly
            tensors = list(
                map(
                    TensorInfo,
                    map(_NAME, found),
                    map(_DTYPE, found),
                    map(_SHAPE, found),
                    map(_NBYTES, found),
                    map(_ALIAS_OF, found),
                    zip(shard_of, map(_LOC, found)),
                )
            )
        else:  # a format's own records (TF): replaced, keeping their extra fields
            tensors = [replace(t, loc=(shard, t.loc)) for t, shard in zip(found, shard_of)]
        self._where.update(zip(names, shard_of))

        warnings: list[str] = []
        objects: list[ObjectInfo] = []
        glob: list[str] = []
        formats = []
        shard_meta: list[dict] = []
        for shard in order:
            info = infos[shard]
            formats.append(info.format + (f" ({info.kind})" if info.kind else ""))
            held_names = list(map(_NAME, info.tensors))
            extra = list(compress(held_names, map(ne, map(wm.get, held_names), repeat(shard))))
            if extra:
                listed = ", ".join(repr(n) for n in extra[:5]) + (", ..." if len(extra) > 5 else "")
                warnings.append(f"shard {shard} holds {len(extra)} tensor(s) the index does not map to it: {listed}")
            warnings += [f"{shard}: {w}" for w in info.warnings]
            objects += [replace(o, name=f"{shard}:{o.name}" if o.name else shard) for o in info.objects]
            glob += [g for g in info.globals if g not in glob]
            shard_meta.append(info.metadata)

        metadata: dict[str, Any] = dict(meta)
        # what every shard carries alike (safetensors' {"format": "pt"}), when the index lacks it
        if shard_meta:
            common = dict(shard_meta[0])
            for m in shard_meta[1:]:
                common = {k: v for k, v in common.items() if k in m and m[k] == v}
            for k, v in common.items():
                metadata.setdefault(k, v)
        kinds = sorted(set(formats))
        return CheckpointInfo(
            path=str(self.path),
            format=self.format,
            tensors=tensors,
            metadata=metadata,
            objects=objects,
            globals=glob,
            kind=kinds[0] if len(kinds) == 1 else "mixed: " + ", ".join(kinds),
            files=[str(self._shard_path(s)) for s in order] + [str(self.path)],
            warnings=warnings,
        )

    # -- data ----------------------------------------------------------------------------------
    def _delegate(self, name: str) -> tuple[Reader, str]:
        self.info()
        shard = self._where.get(name)
        if shard is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return self._shard(shard), name

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        reader, n = self._delegate(name)
        return reader.iter_chunks(n, size)

    def byte_range(self, name: str):
        reader, n = self._delegate(name)
        return reader.byte_range(n)

    def read(self, name: str):
        reader, n = self._delegate(name)
        return reader.read(n)

    def shard_of(self, name: str) -> Path | RemotePath:
        """The shard file that holds `name`."""
        self._delegate(name)
        return self._shard_path(self._where[name])

    def close(self) -> None:
        errors: list[CkptError] = []
        for r in self._shards.values():
            try:
                r.close()
            except CkptError as e:  # pragma: no cover - closing read-only files
                errors.append(e)
        self._shards.clear()
        if errors:
            raise errors[0]


def read_weight_map(path, limit: int, what: str, shape: str) -> tuple[dict, dict[str, str]]:
    """(metadata, weight_map) of a JSON shard index (HF `*.index.json`, Keras `*.weights.json`).

    Checked: size under `limit`, UTF-8 JSON, a `weight_map` object whose values are shard file
    names beside the index (no absolute path, no '..', no NUL). `what` and `shape` name the index
    and its expected layout in the messages.
    """
    try:
        size = path.stat().st_size  # Path or sources.RemotePath
        if size > limit:
            raise CorruptFile(f"index is {size} bytes; that is not a {what}", path)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound("no such file or directory", path) from None
    except PermissionError:
        raise NotFound("permission denied", path) from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptFile("index is not UTF-8 text", path) from None
    except json.JSONDecodeError as e:
        raise CorruptFile(f"index is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CorruptFile(f'{what} has no "weight_map" object (expected {shape})', path)
    meta = doc.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CorruptFile('index "metadata" is not an object', path)
    wm = doc["weight_map"]
    if set(map(type, wm.values())) <= {str}:  # the usual: 10^5 entries name ~10^2 shards, each checked once
        shards = dict.fromkeys(wm.values())  # in order of first mention, as the loop below
        if "" not in shards:
            for shard in shards:
                check_shard_name(shard, path)
            return meta, wm
    checked: set[str] = set()
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptFile(f"weight_map entry {name!r} names no shard file ({shard!r})", path)
        if shard not in checked:
            check_shard_name(shard, path)
            checked.add(shard)
    return meta, wm


def check_shard_name(shard: str, index) -> None:
    """Shard names are file names beside the index: no absolute paths, no '..'."""
    posix, win = PurePosixPath(shard), PureWindowsPath(shard)
    if posix.is_absolute() or win.is_absolute() or win.drive or shard.startswith(("/", "\\")):
        raise CorruptFile(f"shard {shard!r} is an absolute path; shards must lie beside the index", index)
    if ".." in posix.parts or ".." in win.parts:
        raise CorruptFile(f"shard {shard!r} points outside the checkpoint folder ('..')", index)
    if "\x00" in shard:
        raise CorruptFile(f"shard name {shard!r} holds a NUL byte", index)
