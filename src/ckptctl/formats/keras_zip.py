"""Keras 3 checkpoints: `.keras` zip archives and sharded `*.weights.json` sets, read lazily.

A `.keras` file (what `model.save` and `ModelCheckpoint` write) is a zip of `metadata.json`,
`config.json` and `model.weights.h5`, every member stored (not compressed). The weights member
is opened in place: h5py reads a file object that is a window onto the member's bytes in the zip,
so nothing is extracted and only the HDF5 headers are read to list it. A contiguous dataset's
bytes then lie at member start + its HDF5 offset, which `byte_range` hands to the writers for a
zero-copy convert. The JSON members become metadata (model class, Keras version, date saved,
layer count). Tensor names are the HDF5 dataset paths, as for a Keras 3 `.weights.h5`
(`layers/dense/vars/0`, `optimizer/vars/3`).

A weights member that is compressed (someone re-zipped the archive) is read through zipfile's
decompressing stream: bounded memory, slower, no zero-copy; the listing says so in a warning.

Keras >= 3.10 can shard weights: `m.weights.json` (`{"metadata": {"total_size": n},
"weight_map": {"/layers/dense/vars": "m_00000.weights.h5", ...}}`) beside `m_00000.weights.h5`,
`m_00001.weights.h5`, ... Every shard is an ordinary Keras 3 weights HDF5 holding some of the
groups; one group's variables may run on into the next shard, so the checkpoint is the union of
the datasets of every shard (those the index names and any `m_NNNNN.weights.h5` beside it).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl.errors import CkptError, CorruptFile, NotFound, UnknownFormat
from ckptctl.formats.base import CHUNK, Reader, Seekable
from ckptctl.formats.hdf5 import HDF5Reader
from ckptctl.formats.sharded import read_weight_map
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import as_source, is_remote, open_file

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

WEIGHTS_MEMBER = "model.weights.h5"
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json / metadata.json / a shard index larger than this is not read
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    OverflowError,
    RuntimeError,
    struct.error,
    KeyError,
)
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader: 30 bytes
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}


class _Window(Seekable):
    """A read-only, seekable file object over bytes [start, start + length) of an open file."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._src, self._start, self._size, self._pos = as_source(fd), start, length, 0  # a source (or an fd)

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if not n:
            return 0
        data = self._src.pread(self._start + self._pos, n)
        got = len(data)
        memoryview(b)[:got] = data
        self._pos += got
        return got


class _Inflating(io.RawIOBase):
    """zipfile's decompressing member stream, its errors turned into one clean CorruptFile."""

    def __init__(self, stream, member: str, path):
        super().__init__()
        self._s, self._member, self._path = stream, member, path

    def _fail(self, e: BaseException):
        return CorruptFile(
            f"zip member {self._member}: cannot decompress it ({type(e).__name__}: {e})"[:300], self._path
        )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._s.tell()

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._s.seek(pos, whence)
        except Exception as e:  # noqa: BLE001 - zlib.error, lzma.LZMAError, BadZipFile (CRC), EOFError
            raise self._fail(e) from None

    def readinto(self, b) -> int:
        try:
            data = self._s.read(len(b))
        except Exception as e:  # noqa: BLE001 - as above
            raise self._fail(e) from None
        memoryview(b)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._s.close()
        finally:
            super().close()


class _Inflater(Seekable):
    """Random access to a deflated zip member in bounded memory, without extracting it.

    Decompresses forward from the member's first compressed byte (os.pread) and keeps a snapshot
    of the decompressor (`zlib` `copy()`: its state and 32 KiB window) every `spacing` output
    bytes, at most MAX_SNAPSHOTS of them (~45 KiB each). A seek backwards restarts from the
    nearest snapshot before the target, so each read decompresses at most `spacing` bytes it
    does not return, and h5py's scattered header reads cost one forward pass in all.
    """

    MAX_SNAPSHOTS = 256
    MIN_SPACING = 4 * 1024 * 1024
    IN_STEP = 256 * 1024  # compressed bytes per pread
    SKIP_STEP = 1024 * 1024  # decompressed bytes produced at once while skipping forward

    def __init__(self, fd: int, start: int, csize: int, usize: int, member: str, path):
        super().__init__()
        import zlib

        self._zlib = zlib
        self._src, self._start, self._csize, self._size = as_source(fd), start, csize, usize  # a source or fd
        self._member, self._path = member, path
        self._spacing = max(self.MIN_SPACING, -(-usize // self.MAX_SNAPSHOTS))
        # a state: [upos (bytes output so far), cpos (next compressed byte to feed), decompressor, tail]
        first = (0, 0, zlib.decompressobj(-zlib.MAX_WBITS), b"")
        self._snaps: list[tuple[int, int, Any, bytes]] = [first]
        self._state: list[Any] = [0, 0, first[2].copy(), b""]  # upos, cpos, decompressor, tail
        self._pos = 0

    def _fail(self, why: str) -> CorruptFile:
        return CorruptFile(f"zip member {self._member}: cannot decompress it ({why})"[:300], self._path)

    def _produce(self, n: int) -> bytes:
        """Up to n decompressed bytes from the current state, which moves past them."""
        upos, cpos, d, tail = self._state
        out: list[bytes] = []
        got = 0
        while got < n:
            if tail:
                data = tail
            else:
                want = min(self.IN_STEP, self._csize - cpos)
                data = self._src.pread(self._start + cpos, want) if want > 0 else b""
                cpos += len(data)
                if not data and d.eof:
                    break
            try:
                chunk = d.decompress(data, n - got) if data else d.flush()
            except self._zlib.error as e:
                raise self._fail(str(e)) from None
            tail = d.unconsumed_tail
            if not chunk and not data:
                raise self._fail(f"data ends at byte {upos} of {self._size} (truncated?)")
            out.append(chunk)
            got += len(chunk)
            upos += len(chunk)
            if upos >= self._snaps[-1][0] + self._spacing:
                self._snaps.append((upos, cpos, d.copy(), tail))
            if d.eof:
                break
        self._state = [upos, cpos, d, tail]
        return b"".join(out)

    def _goto(self, target: int) -> None:
        if not (self._snaps[-1][0] <= self._state[0] <= target):
            i = max(k for k, snap in enumerate(self._snaps) if snap[0] <= target)
            upos, cpos, d, tail = self._snaps[i]
            if not (upos <= self._state[0] <= target):
                self._state = [upos, cpos, d.copy(), tail]
        while self._state[0] < target:
            if not self._produce(min(self.SKIP_STEP, target - self._state[0])):
                raise self._fail(f"data ends at byte {self._state[0]} of {self._size} (truncated?)")

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if not n:
            return 0
        self._goto(self._pos)
        data = self._produce(n)
        if len(data) < n:
            raise self._fail(f"data ends at byte {self._pos + len(data)} of {self._size} (truncated?)")
        memoryview(b)[:n] = data
        self._pos += n
        return n


def _zip_source(path):
    """The zip file to open: its path when local (zipfile opens it), a cached file object when remote."""
    import contextlib

    return open_file(path) if is_remote(path) else contextlib.nullcontext(path)


def _member_start(src, zinfo: zipfile.ZipInfo, file_size: int, path) -> int:
    """Offset in the zip file of a member's first data byte, from its local file header."""
    head = as_source(src).pread(zinfo.header_offset, _LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size:
        raise CorruptFile(f"zip member {zinfo.filename}: local header past the end of the file (truncated?)", path)
    fields = _LOCAL_HEADER.unpack(head)
    if fields[0] != b"PK\x03\x04":
        raise CorruptFile(f"zip member {zinfo.filename}: bad local header signature", path)
    start = zinfo.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
    if start + zinfo.compress_size > file_size:
        raise CorruptFile(
            f"zip member {zinfo.filename} runs past the end of the file ({start + zinfo.compress_size} > "
            f"{file_size} bytes; truncated?)",
            path,
        )
    return start


def _read_json(zf: zipfile.ZipFile, name: str, warnings: list[str]) -> dict | None:
    """A small JSON member as a dict; None (with a warning) when absent, too big or not JSON."""
    try:
        zinfo = zf.getinfo(name)
    except KeyError:
        return None
    if zinfo.file_size > MAX_JSON_BYTES:
        warnings.append(f"{name} is {zinfo.file_size} bytes; not read")
        return None
    try:
        doc = json.loads(zf.read(zinfo).decode("utf-8"))
    except (*_ZIP_ERRORS, UnicodeDecodeError, RecursionError) as e:
        warnings.append(f"{name} is not readable JSON ({type(e).__name__}: {e})"[:300])
        return None
    if not isinstance(doc, dict):
        warnings.append(f"{name} is not a JSON object")
        return None
    return doc


def keras_metadata(config: dict | None, meta: dict | None) -> dict[str, Any]:
    """Model class, name, layer count, optimizer, loss, Keras version and save date."""
    out: dict[str, Any] = {}
    if meta:
        for k in ("keras_version", "date_saved"):
            if isinstance(meta.get(k), (str, int, float)):
                out[k] = meta[k]
    if config:
        if isinstance(config.get("class_name"), str):
            out["model_class"] = config["class_name"]
        conf = config.get("config")
        if isinstance(conf, dict):
            if isinstance(conf.get("name"), str):
                out["model_name"] = conf["name"]
            if isinstance(conf.get("layers"), list):
                out["layers"] = len(conf["layers"])
        comp = config.get("compile_config")
        if isinstance(comp, dict):
            opt = comp.get("optimizer")
            if isinstance(opt, dict) and isinstance(opt.get("class_name"), str):
                out["optimizer"] = opt["class_name"]
            elif isinstance(opt, str):
                out["optimizer"] = opt
            if isinstance(comp.get("loss"), str):
                out["loss"] = comp["loss"]
    return out


def config_code(path) -> list[str]:
    """What in a .keras archive's config.json is Python code (Lambda bytecode), for `scan`.

    Keras serialises a Python lambda as `{"class_name": "__lambda__", "config": {"code": <base64
    marshal>}}` and runs it when the model is loaded with `safe_mode=False`.
    """
    warnings: list[str] = []
    try:
        with _zip_source(path) as f, zipfile.ZipFile(f) as zf:
            config = _read_json(zf, "config.json", warnings)
    except FileNotFoundError:
        raise NotFound("no such file or directory", path) from None
    except _ZIP_ERRORS as e:
        raise CorruptFile(f"corrupt .keras archive: not a readable zip ({e})", path) from None
    found: list[str] = []

    def walk(obj, where: str, depth: int) -> None:
        if depth > 200:
            return
        if isinstance(obj, dict):
            if obj.get("class_name") == "__lambda__":
                found.append(
                    f"config.json{where}: __lambda__ (marshalled Python bytecode, run by "
                    "keras load_model(safe_mode=False))"
                )
                return
            for k, v in obj.items():
                walk(v, f"{where}/{k}", depth + 1)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}", depth + 1)

    walk(config, "", 0)
    if warnings:
        raise CorruptFile("; ".join(warnings), path)
    return found


class KerasZipReader(HDF5Reader):
    """A Keras 3 `.keras` archive; its `model.weights.h5` read in place through h5py."""

    format = "keras"
    options = ("sniffed",)  # the zip the registry's sniffer opened (formats.OpenedZip), taken over

    def __init__(self, path, sniffed=None):
        super().__init__(path)
        self._sniffed = sniffed
        self._zip: zipfile.ZipFile | None = sniffed.zip if sniffed is not None else None
        self._stream = None  # the file object h5py reads
        self._member: str = WEIGHTS_MEMBER
        self._zip_warnings: list[str] = []

    # -- the archive ---------------------------------------------------------------------------
    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(open_file(self.path) if is_remote(self.path) else self.path)
            except FileNotFoundError:
                raise NotFound("no such file or directory", self.path) from None
            except PermissionError:
                raise NotFound("permission denied", self.path) from None
            except _ZIP_ERRORS as e:
                raise CorruptFile(f"corrupt .keras archive: not a readable zip ({e})", self.path) from None
        return self._zip

    def _weights_info(self, zf: zipfile.ZipFile) -> zipfile.ZipInfo:
        names = zf.namelist()
        if WEIGHTS_MEMBER in names:
            return zf.getinfo(WEIGHTS_MEMBER)
        h5 = [n for n in names if n.endswith(".h5") and not n.startswith("assets/")]
        if len(h5) == 1:
            return zf.getinfo(h5[0])
        if any(n.endswith(".weights.npz") for n in names):
            raise UnknownFormat(
                "a .keras archive with npz weights (model.weights.npz); only HDF5 weights are supported", self.path
            )
        if any(n.endswith(".weights.json") for n in names):
            raise UnknownFormat(
                "a .keras archive with sharded weights inside; not supported (unzip it and inspect its .weights.json)",
                self.path,
            )
        if h5:
            raise CorruptFile(f"a .keras archive with {len(h5)} .h5 members and no {WEIGHTS_MEMBER}", self.path)
        raise CorruptFile(f"a .keras archive with no weights: no {WEIGHTS_MEMBER} member", self.path)

    def _open_h5(self, h5py):
        zf = self._open_zip()
        zinfo = self._weights_info(zf)
        self._member = zinfo.filename
        if zinfo.flag_bits & 0x1:
            raise UnknownFormat(f"{zinfo.filename} in the archive is encrypted", self.path)
        if zinfo.compress_type == zipfile.ZIP_STORED:
            if zinfo.compress_size != zinfo.file_size:
                raise CorruptFile(
                    f"zip member {zinfo.filename}: stored with {zinfo.compress_size} bytes but "
                    f"{zinfo.file_size} declared",
                    self.path,
                )
            fd = self._source()
            start = _member_start(fd, zinfo, fd.size, self.path)
            self.base_offset = start
            self._stream = _Window(fd, start, zinfo.file_size)
        else:
            method = _METHODS.get(zinfo.compress_type, f"method {zinfo.compress_type}")
            if zinfo.compress_type == zipfile.ZIP_DEFLATED:
                fd = self._source()
                start = _member_start(fd, zinfo, fd.size, self.path)
                self._stream = _Inflater(fd, start, zinfo.compress_size, zinfo.file_size, zinfo.filename, self.path)
            else:  # bzip2, lzma: zipfile's stream (a seek backwards decompresses again from the start)
                try:
                    self._stream = _Inflating(zf.open(zinfo), zinfo.filename, self.path)
                except _ZIP_ERRORS as e:
                    raise CorruptFile(
                        f"zip member {zinfo.filename} ({method}) cannot be read ({e})", self.path
                    ) from None
            self.base_offset = None  # no file offsets: every read goes through the decompressor
            self._zip_warnings = [
                f"{zinfo.filename} is compressed ({method}), not stored as Keras writes it: read through the "
                "decompressor (slower; no zero-copy convert)"
            ]
        return h5py.File(self._stream, "r")

    def _file(self):
        try:
            return super()._file()
        except CorruptFile as e:
            if e.message.startswith(("zip member", "corrupt .keras", "a .keras")):
                raise
            raise CorruptFile(f"{self._member} in the archive: {e.message}", self.path) from None

    # -- metadata ------------------------------------------------------------------------------
    def _load_info(self) -> CheckpointInfo:
        zf = self._open_zip()
        warnings: list[str] = []
        config = _read_json(zf, "config.json", warnings)
        meta = _read_json(zf, "metadata.json", warnings)
        try:
            info = super()._load_info()
        except CorruptFile as e:
            if e.message.startswith(("zip member", "corrupt .keras", "a .keras", self._member)):
                raise
            raise CorruptFile(f"{self._member} in the archive: {e.message}", self.path) from None
        except _ZIP_ERRORS as e:  # a damaged compressed member fails while h5py reads it
            raise CorruptFile(
                f"{self._member} in the archive cannot be read ({type(e).__name__}: {e})"[:300], self.path
            ) from None
        km = keras_metadata(config, meta)
        rest = dict(info.metadata)
        if "layers" in rest and "layers" in km:  # the HDF5 reader counts layer groups: those with state
            rest["layers_with_weights"] = rest.pop("layers")
        info.metadata = {**km, **rest}
        info.kind = info.kind or "keras3"
        info.warnings = self._zip_warnings + warnings + info.warnings
        return info

    def close(self) -> None:
        try:
            super().close()  # the h5py file first, then the stream it reads
        finally:
            if isinstance(self._stream, _Inflating):
                self._stream.close()
            self._stream = None
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            if self._sniffed is not None:
                self._sniffed.close()  # and the file it read (a ZipFile leaves a passed-in file open)
                self._sniffed = None


# -- sharded Keras weights ---------------------------------------------------------------------
_SHARD_RE = re.compile(r"_(\d{5,})\.weights\.h5$")


def shard_base(index: Path | RemotePath) -> str:
    """`m.weights.json` -> `m`: the stem Keras names the shards after (`m_00000.weights.h5`)."""
    name = index.name
    for suf in (".weights.json", ".json"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return index.stem


class KerasShardedReader(Reader):
    """Keras 3 sharded weights: a `*.weights.json` index and its `*_NNNNN.weights.h5` shards."""

    format = "keras-sharded"

    def __init__(self, path):
        super().__init__(path)
        self._shards: dict[str, HDF5Reader] = {}
        self._where: dict[str, str] = {}

    def _index(self) -> tuple[dict, dict[str, str]]:
        return read_weight_map(
            self.path,
            MAX_JSON_BYTES,
            "Keras shard index",
            '{"weight_map": {"/layers/<name>/vars": "<base>_00000.weights.h5", ...}}',
        )

    def _shard_names(self, wm: dict[str, str]) -> list[str]:
        """Shards the index names, then any `<base>_NNNNN.weights.h5` beside it, by number."""
        names = list(dict.fromkeys(wm.values()))
        base = shard_base(self.path)
        folder = self.path.parent
        try:
            beside = [
                e.name
                for e in folder.iterdir()
                if e.name.startswith(base + "_") and _SHARD_RE.search(e.name) and e.name[len(base) :].count("_") == 1
            ]
        except OSError:
            beside = []
        names += [n for n in beside if n not in names]

        def key(n: str):
            m = _SHARD_RE.search(n)
            return (0, int(m.group(1)), n) if m else (1, 0, n)

        return sorted(names, key=key)

    def _shard(self, shard: str) -> HDF5Reader:
        r = self._shards.get(shard)
        if r is None:
            p = self.path.parent / shard
            if not p.exists():
                raise NotFound(f"shard {shard} named in the index is missing", self.path)
            if not p.is_file():
                raise CorruptFile(f"shard {shard} named in the index is not a file", self.path)
            r = HDF5Reader(p)
            self._shards[shard] = r
        return r

    def _load_info(self) -> CheckpointInfo:
        meta, wm = self._index()
        tensors: list[TensorInfo] = []
        warnings: list[str] = []
        files: list[str] = []
        held: dict[str, set[str]] = {}
        for shard in self._shard_names(wm):
            try:
                info = self._shard(shard).info()
            except CkptError as e:
                raise type(e)(f"shard {shard}: {e.message}", self.path) from None
            files.append(str(self.path.parent / shard))
            warnings += [f"{shard}: {w}" for w in info.warnings]
            held[shard] = set()
            for t in info.tensors:
                if t.name in self._where:
                    raise CorruptFile(f"tensor {t.name!r} is in both {self._where[t.name]} and {shard}", self.path)
                self._where[t.name] = shard
                held[shard].add(t.name.rsplit("/", 1)[0])
                tensors.append(t)
        for group, shard in wm.items():
            g = group.strip("/")
            if g and shard in held and g not in held[shard] and "vars" in g.split("/"):
                warnings.append(f"the index maps {group} to {shard}, which holds none of its variables")
        metadata: dict[str, Any] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        metadata["shards"] = len(files)
        return CheckpointInfo(
            path=str(self.path),
            format=self.format,
            tensors=tensors,
            metadata=metadata,
            kind="keras3",
            files=files + [str(self.path)],
            warnings=warnings,
        )

    def _delegate(self, name: str) -> HDF5Reader:
        self.info()
        shard = self._where.get(name)
        if shard is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return self._shard(shard)

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        return self._delegate(name).iter_chunks(name, size)

    def byte_range(self, name: str):
        return self._delegate(name).byte_range(name)

    def read(self, name: str):
        return self._delegate(name).read(name)

    def close(self) -> None:
        for r in self._shards.values():
            r.close()
        self._shards.clear()
