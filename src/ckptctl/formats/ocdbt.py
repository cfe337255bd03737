"""OCDBT (TensorStore's Optionally-Cooperative Distributed B+Tree) key-value stores, read-only.

Orbax writes an item's arrays into one OCDBT database: `manifest.ocdbt` (config + version tree),
B+tree nodes and out-of-line values in data files `d/<128-bit hex>`, and per-process sub-databases
`ocdbt.process_<i>/` whose root nodes the top-level manifest references. The format is documented
in TensorStore's `kvstore/ocdbt/index.rst` (and `format/*.h`); what is read here:

- every encoded structure (manifest, version tree node, B+tree node) = magic (u32 BE), total length
  (u64 LE), version (varint, 0), compression (varint: 0 none, 1 zstd), body, CRC-32C (u32 LE) of
  everything before it;
- manifest body: config (uuid[16], manifest_kind u8, max_inline_value_bytes, max_decoded_node_bytes,
  version_tree_arity_log2 u8, compression method + zstd level i32) then, for the single-file kind,
  a data file table, the inline versions (the newest generations: their B+tree roots) and the
  version nodes (older generations: never needed for the newest one);
- B+tree node: height u8, data file table, entry count, then columns: key prefix/suffix lengths
  (interior nodes also the subtree common prefix), key bytes, and either child references (file,
  offset, length + statistics) or leaf values (length, kind byte 0 inline / 1 out-of-line, file
  ids and offsets of the out-of-line ones, then the inline bytes).

Data file paths are relative to the database folder: transitive path (from the parent) + base path
+ relative path. Listing keys reads the manifest and the B+tree nodes only; out-of-line values are
read on demand with pread, so nothing here holds tensor data. Reads go through ckptctl.sources: the
folder may be a URL, each node or value is then one ranged GET of exactly its bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

from ckptctl.errors import CorruptFile, NotFound
from ckptctl.sources import NoSuchObject, as_path, is_remote, open_source

MANIFEST_MAGIC = 0x0CDB3A2A
VERSION_NODE_MAGIC = 0x0CDB1234
BTREE_MAGIC = 0x0CDB20DE
MAX_NODE_BYTES = 256 << 20  # refuse to read a "node" larger than this
MAX_DEPTH = 64
MAX_KEYS = 50_000_000


@dataclass(frozen=True)
class ValueRef:
    """Where a value lives: inline bytes, or `length` bytes at `offset` of data file `file`."""

    length: int
    inline: bytes | None = None
    file: str | None = None  # absolute path
    offset: int = 0


class _Buf:
    """A bounds-checked cursor over a decoded body."""

    __slots__ = ("b", "p", "what", "path")

    def __init__(self, b: bytes, what: str, path):
        self.b, self.p, self.what, self.path = b, 0, what, path

    def fail(self, msg: str):
        raise CorruptFile(f"{self.what}: {msg}", self.path)

    def varint(self) -> int:
        b, p = self.b, self.p
        r = shift = 0
        while True:
            if p >= len(b):
                self.fail("ends inside a number (truncated?)")
            c = b[p]
            p += 1
            r |= (c & 0x7F) << shift
            if not c & 0x80:
                break
            shift += 7
            if shift > 63:
                self.fail("invalid varint")
        self.p = p
        return r

    def byte(self) -> int:
        if self.p >= len(self.b):
            self.fail("ends early (truncated?)")
        v = self.b[self.p]
        self.p += 1
        return v

    def take(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.b):
            self.fail("ends early (truncated?)")
        v = self.b[self.p : self.p + n]
        self.p += n
        return v

    def u32le(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64le(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def varints(self, n: int) -> list[int]:
        return [self.varint() for _ in range(n)]


def _crc32c(data: bytes) -> int | None:
    try:
        import google_crc32c  # optional: when installed, checksums are verified
    except ImportError:
        try:
            import crc32c as _c
        except ImportError:
            return None
        return _c.crc32c(data)
    return google_crc32c.value(data)


def zstd_decompress(data: bytes, what: str, path, max_size: int | None = None) -> bytes:
    """One zstd frame (or several) -> bytes; a clean error when zstandard is missing or data is bad."""
    try:
        import zstandard
    except ImportError:
        raise CorruptFile(
            f"{what} is zstd-compressed: install the zstandard package (pip install zstandard)", path
        ) from None
    try:
        d = zstandard.ZstdDecompressor().decompressobj()
        out = d.decompress(data)
        if not d.eof:
            raise CorruptFile(f"{what}: zstd data ends early (truncated?)", path)
    except zstandard.ZstdError as e:
        raise CorruptFile(f"{what}: bad zstd data ({e})", path) from None
    if max_size is not None and len(out) > max_size:
        raise CorruptFile(f"{what}: decompresses to more than {max_size} bytes", path)
    return out


def decode_envelope(raw: bytes, magic: int, what: str, path) -> bytes:
    """Check header, length and CRC-32C of an encoded manifest / node; return its decoded body."""
    if len(raw) < 16:
        raise CorruptFile(f"{what}: {len(raw)} bytes, too short (truncated?)", path)
    m = struct.unpack_from(">I", raw)[0]
    if m != magic:
        raise CorruptFile(f"{what}: bad magic 0x{m:08x} (expected 0x{magic:08x})", path)
    length = struct.unpack_from("<Q", raw, 4)[0]
    if length != len(raw):
        raise CorruptFile(f"{what}: header says {length} bytes, found {len(raw)} (truncated?)", path)
    crc = _crc32c(raw[:-4])
    if crc is not None and crc != struct.unpack_from("<I", raw, len(raw) - 4)[0]:
        raise CorruptFile(f"{what}: CRC-32C checksum mismatch (corrupt)", path)
    hdr = _Buf(raw[:-4], what, path)
    hdr.p = 12
    version = hdr.varint()
    if version != 0:
        raise CorruptFile(f"{what}: format version {version} is not supported", path)
    comp = hdr.varint()
    body = raw[hdr.p : -4]
    if comp == 0:
        return body
    if comp == 1:
        return zstd_decompress(body, what, path, MAX_NODE_BYTES)
    raise CorruptFile(f"{what}: unknown compression format {comp}", path)


def _data_file_table(buf: _Buf, transitive: str) -> list[tuple[str, str]]:
    """[(base path incl. the transitive one, relative path)]."""
    n = buf.varint()
    if n > 1_000_000:
        buf.fail(f"data file table of {n} files")
    prefix = [0] + buf.varints(max(0, n - 1))
    suffix = buf.varints(n)
    base = buf.varints(n)
    out: list[tuple[str, str]] = []
    prev = b""
    for i in range(n):
        if prefix[i] > len(prev):
            buf.fail("bad data file table")
        path = prev[: prefix[i]] + buf.take(suffix[i])
        prev = path
        if base[i] > len(path):
            buf.fail("bad data file table")
        try:
            b, r = path[: base[i]].decode(), path[base[i] :].decode()
        except UnicodeDecodeError:
            buf.fail("data file name is not UTF-8")
        out.append((transitive + b, r))
    return out


def _listdir(p) -> list[str]:
    if is_remote(p):
        return [e.name for e in as_path(p).iterdir()]
    return os.listdir(p)


class OcdbtStore:
    """The newest version of one OCDBT database folder, as {key: ValueRef}."""

    def __init__(self, root: str | os.PathLike, label: str | None = None):
        self.root = as_path(root)  # a Path, or a sources.RemotePath
        self.label = label or os.fspath(self.root)
        self._values: dict[bytes, ValueRef] | None = None
        self.files: set[str] = set()  # data files the tree references (nodes and values)
        self.config: dict[str, int] = {}

    # -- structure ------------------------------------------------------------------------------
    def _file(self, rel: str, what: str) -> str:
        p = PurePosixPath(rel)
        if not rel or "\x00" in rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
            raise CorruptFile(f"{what} names a data file outside the checkpoint: {rel!r:.80}", self.root)
        return os.fspath(self.root / p)

    def _pread(self, path: str, offset: int, length: int, what: str) -> bytes:
        try:
            src = open_source(path)
        except (FileNotFoundError, NoSuchObject):
            raise CorruptFile(f"data file {os.path.relpath(path, self.root)} is missing ({what})", self.root) from None
        except OSError as e:
            raise NotFound(f"cannot open {os.path.relpath(path, self.root)}: {e.strerror}", self.root) from None
        try:
            data = src.pread(offset, length)
        finally:
            src.close()
        if len(data) != length:
            raise CorruptFile(
                f"data file {os.path.relpath(path, self.root)} ends before byte {offset + length} ({what}; truncated?)",
                self.root,
            )
        return data

    def _manifest(self) -> list[tuple[int, str, int, int]]:
        """Roots of the newest generation: [(height, data file, offset, length)] (0 or 1 item)."""
        mpath = self.root / "manifest.ocdbt"
        try:
            raw = mpath.read_bytes()
        except (FileNotFoundError, NoSuchObject):
            raise CorruptFile("no manifest.ocdbt (OCDBT database missing or save incomplete)", self.root) from None
        except OSError as e:
            raise NotFound(f"cannot read manifest.ocdbt: {e.strerror}", self.root) from None
        body = decode_envelope(raw, MANIFEST_MAGIC, "manifest.ocdbt", mpath)
        buf = _Buf(body, "manifest.ocdbt", mpath)
        buf.take(16)  # uuid
        kind = buf.byte()
        self.config = {
            "manifest_kind": kind,
            "max_inline_value_bytes": buf.varint(),
            "max_decoded_node_bytes": buf.varint(),
            "version_tree_arity_log2": buf.byte(),
        }
        method = buf.varint()
        if method == 1:
            buf.take(4)  # zstd level
        elif method != 0:
            buf.fail(f"unknown compression method {method}")
        if kind == 1:  # numbered manifests: the newest manifest.<16 hex digits> holds the versions
            nums = sorted(
                n
                for n in _listdir(self.root)
                if len(n) == 25 and n.startswith("manifest.") and all(c in "0123456789abcdef" for c in n[9:])
            )
            if not nums:
                raise CorruptFile("numbered OCDBT manifest without any manifest.<generation> file", self.root)
            mp = self.root / nums[-1]
            body = decode_envelope(mp.read_bytes(), MANIFEST_MAGIC, mp.name, mp)
            buf = _Buf(body, mp.name, mp)
            buf.take(16)
            buf.byte()
            buf.varint()
            buf.varint()
            buf.byte()
            if buf.varint() == 1:
                buf.take(4)
        elif kind != 0:
            buf.fail(f"unknown manifest kind {kind}")
        files = _data_file_table(buf, "")
        n = buf.varint()
        if n > 1 << 20:
            buf.fail(f"{n} inline versions")
        buf.varints(n)  # generation numbers
        heights = list(buf.take(n))
        fids, offs, lens = buf.varints(n), buf.varints(n), buf.varints(n)
        if n == 0:
            return []
        i = n - 1  # the newest generation
        if lens[i] == 0:  # an empty tree
            return []
        if fids[i] >= len(files):
            buf.fail("root node names a data file that is not in the table")
        base, rel = files[fids[i]]
        return [(heights[i], base + rel, offs[i], lens[i])]

    def _walk(self) -> dict[bytes, ValueRef]:
        values: dict[bytes, ValueRef] = {}
        roots = self._manifest()
        # (height, data file path, offset, length, transitive base, key prefix, depth)
        stack = []
        for h, rel_path, off, ln in roots:
            stack.append((h, rel_path, off, ln, "", b"", 0))
        seen: set[tuple[str, int]] = set()
        while stack:
            height, rel_path, off, ln, transitive, prefix, depth = stack.pop()
            if depth > MAX_DEPTH or (rel_path, off) in seen:
                raise CorruptFile("OCDBT B+tree has a cycle or is too deep", self.root)
            seen.add((rel_path, off))
            if ln > MAX_NODE_BYTES:
                raise CorruptFile(f"B+tree node of {ln} bytes is implausibly large", self.root)
            full = self._file(rel_path, "a B+tree node")
            self.files.add(full)
            what = f"B+tree node {rel_path}@{off}"
            body = decode_envelope(self._pread(full, off, ln, what), BTREE_MAGIC, what, self.root)
            buf = _Buf(body, what, self.root)
            node_h = buf.byte()
            if node_h != height:
                buf.fail(f"height {node_h}, its parent says {height}")
            table = _data_file_table(buf, transitive)
            n = buf.varint()
            if n == 0 or n > 1 << 20:
                buf.fail(f"{n} entries")
            pre = [0] + buf.varints(n - 1)
            suf = buf.varints(n)
            scp = buf.varints(n) if node_h > 0 else []
            keys: list[bytes] = []
            prev = b""
            for i in range(n):
                if pre[i] > len(prev):
                    buf.fail("bad key prefix length")
                k = prev[: pre[i]] + buf.take(suf[i])
                keys.append(k)
                prev = k
            if node_h > 0:
                fids, offs, lens = buf.varints(n), buf.varints(n), buf.varints(n)
                for i in range(n):
                    if fids[i] >= len(table) or scp[i] > len(keys[i]):
                        buf.fail("bad child reference")
                    base, rel = table[fids[i]]
                    stack.append(
                        (node_h - 1, base + rel, offs[i], lens[i], base, prefix + keys[i][: scp[i]], depth + 1)
                    )
                continue
            lens = buf.varints(n)
            kinds = list(buf.take(n))
            if any(k > 1 for k in kinds):
                buf.fail("bad value kind")
            ind = [i for i in range(n) if kinds[i] == 1]
            vfids = {i: buf.varint() for i in ind}
            voffs = {i: buf.varint() for i in ind}
            for i in range(n):
                key = prefix + keys[i]
                if kinds[i] == 0:
                    values[key] = ValueRef(lens[i], inline=buf.take(lens[i]))
                else:
                    if vfids[i] >= len(table):
                        buf.fail("value names a data file that is not in the table")
                    base, rel = table[vfids[i]]
                    f = self._file(base + rel, f"value of {key.decode(errors='replace')!r}")
                    self.files.add(f)
                    values[key] = ValueRef(lens[i], file=f, offset=voffs[i])
            if len(values) > MAX_KEYS:
                raise CorruptFile("OCDBT database with implausibly many keys", self.root)
        return values

    def check_files(self) -> None:
        """Every out-of-line value lies inside its data file (stat only: catches missing and
        truncated files without reading data)."""
        sizes: dict[str, int] = {}
        for key, ref in self.values.items():
            if ref.file is None:
                continue
            size = sizes.get(ref.file)
            if size is None:
                try:
                    size = sizes[ref.file] = (
                        as_path(ref.file).stat() if is_remote(ref.file) else os.stat(ref.file)
                    ).st_size
                except (OSError, NoSuchObject):
                    raise CorruptFile(
                        f"data file {os.path.relpath(ref.file, self.root)} is missing "
                        f"(holds {key.decode(errors='replace')!r})",
                        self.root,
                    ) from None
            if ref.offset + ref.length > size:
                raise CorruptFile(
                    f"data file {os.path.relpath(ref.file, self.root)} ends at byte {size}, before "
                    f"the value of {key.decode(errors='replace')!r} (truncated?)",
                    self.root,
                )

    # -- access ---------------------------------------------------------------------------------
    @property
    def values(self) -> dict[bytes, ValueRef]:
        if self._values is None:
            self._values = self._walk()
        return self._values

    def keys(self) -> list[bytes]:
        return sorted(self.values)

    def ref(self, key: str | bytes) -> ValueRef | None:
        k = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key  # a lone surrogate from JSON
        return self.values.get(k)

    def read(self, ref: ValueRef, what: str) -> bytes:
        if ref.inline is not None:
            return ref.inline
        assert ref.file is not None
        return self._pread(ref.file, ref.offset, ref.length, what)
