"""Format registry: sniff(path) -> format name; open_reader(path) -> Reader.

Detection goes by content first; the suffix only names what a file that is not a checkpoint
pretends to be. Format modules are imported lazily so that listing a safetensors file never
imports torch or h5py.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl.errors import CorruptFile, NotFound, UnknownFormat, UsageError
from ckptctl.formats.base import Reader, Writer
from ckptctl.sources import as_path, is_remote, open_file, open_source

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class FormatSpec:
    """Everything the registry knows about one format, declared in one line of FORMATS.

    The module is imported only when a file of this format is opened (listing a safetensors file
    never imports torch or h5py). `magic`: first bytes that alone identify the format, checked by
    `sniff` in FORMATS order after the zip check (formats told apart by content, not by their first
    bytes, are recognised in `_sniff_opened`). `suffixes`: names files of this format usually have
    (`ls` and folder resolution look for them); `writer`: (module, class) when convert writes it.

    Adding a format: a new module with its Reader (and Writer) class, plus one FormatSpec here
    (and, when its first bytes do not identify it alone, a check in `_sniff_opened`)."""

    name: str
    module: str
    reader: str
    writer: tuple[str, str] | None = None
    magic: tuple[bytes, ...] = ()
    suffixes: tuple[str, ...] = ()


FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec(
        "safetensors",
        "ckptctl.formats.safetensors",
        "SafetensorsReader",
        ("ckptctl.formats.write_safetensors", "SafetensorsWriter"),
        suffixes=(".safetensors",),
    ),
    FormatSpec(
        "torch-zip",
        "ckptctl.formats.torch_zip",
        "TorchZipReader",
        ("ckptctl.formats.write_torch", "TorchZipWriter"),
        suffixes=(".pt", ".pth", ".bin", ".ckpt"),
    ),
    FormatSpec("torch-legacy", "ckptctl.formats.torch_legacy", "TorchLegacyReader", suffixes=(".pt", ".pth", ".bin")),
    FormatSpec("pickle", "ckptctl.formats.torch_legacy", "PickleReader", suffixes=(".pkl",)),
    FormatSpec(
        "hdf5",
        "ckptctl.formats.hdf5",
        "HDF5Reader",
        ("ckptctl.formats.write_hdf5", "HDF5Writer"),
        magic=(HDF5_MAGIC,),
        suffixes=(".h5", ".hdf5"),
    ),
    FormatSpec("sharded", "ckptctl.formats.sharded", "ShardedReader"),
    FormatSpec("dcp", "ckptctl.formats.dcp", "DCPReader", suffixes=(".distcp",)),
    FormatSpec("keras", "ckptctl.formats.keras_zip", "KerasZipReader", suffixes=(".keras",)),
    FormatSpec("keras-sharded", "ckptctl.formats.keras_zip", "KerasShardedReader"),
    FormatSpec("tf-bundle", "ckptctl.formats.tf_bundle", "TFBundleReader"),
    FormatSpec("gguf", "ckptctl.formats.gguf", "GGUFReader", magic=(b"GGUF",), suffixes=(".gguf",)),
    FormatSpec("torchscript", "ckptctl.formats.torch_zip", "TorchScriptReader"),
    FormatSpec("orbax", "ckptctl.formats.orbax", "OrbaxReader"),
)
SPECS: dict[str, FormatSpec] = {f.name: f for f in FORMATS}

# format name -> (module, reader class); target format -> (module, writer class): views of FORMATS
READERS: dict[str, tuple[str, str]] = {f.name: (f.module, f.reader) for f in FORMATS}
WRITERS: dict[str, tuple[str, str]] = {f.name: f.writer for f in FORMATS if f.writer}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".h5.index.json", ".pt.index.json")
# file names inside a folder that make it one checkpoint, best first
MODEL_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "tf_model.h5",
    "model.h5",
    "model.weights.h5",
)
CHECKPOINT_SUFFIXES = tuple(dict.fromkeys(x for f in FORMATS for x in f.suffixes))
KERAS_INDEX_SUFFIX = ".weights.json"  # Keras 3 sharded weights: index beside <base>_0000K.weights.h5

# well-known magics of things people mistake for checkpoints
_OTHER_MAGIC = [
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"\x93NUMPY", "a numpy .npy array; not supported"),
]


def _head(path: Path | RemotePath, n: int = 4096) -> bytes:
    if is_remote(path):
        with open_source(path) as src:
            return src.pread(0, n)
    with open(path, "rb") as f:
        return f.read(n)


def _size(path) -> int:
    return path.stat().st_size  # a RemotePath answers from its folder listing (or one HEAD)


def _describe_unknown(head: bytes) -> str:
    if not head:
        return "empty file"
    for magic, what in _OTHER_MAGIC:
        if what and head.startswith(magic):
            return f"not a checkpoint: looks like {what}"
    if head.lstrip()[:1] in (b"{", b"["):
        return "not a checkpoint: looks like a JSON/text file"
    return "unknown format: not safetensors, PyTorch, HDF5 or a pickle"


def _is_pickle(head: bytes) -> bool:
    """A pickle of protocol 2+ starts with PROTO; older ones with a handful of opcodes."""
    if len(head) >= 2 and head[0] == 0x80 and 0 <= head[1] <= 5:
        return True
    # protocol 0/1 pickles: GLOBAL 'c', MARK '(', EMPTY_DICT '}', EMPTY_LIST ']', INT 'I' ...
    if head[:1] in (b"c", b"(", b"}", b"]", b"I", b"L", b"S", b"V", b"N", b"\x8a"):
        import pickletools

        try:
            ops = 0
            for _op, _arg, _pos in pickletools.genops(head):
                ops += 1
                if ops >= 3:
                    return True
        except Exception:
            return ops >= 2
        return ops >= 1
    return False


def _is_legacy_torch(head: bytes) -> bool:
    """The first pickle of a legacy torch file is the magic number."""
    import pickletools

    try:
        for op, arg, _pos in pickletools.genops(head):
            if op.name in ("PROTO",):
                continue
            return arg == LEGACY_MAGIC
    except Exception:
        return False
    return False


class OpenedZip:
    """A zip archive the sniffer opened and parsed (its central directory read once): handed to
    the reader (`sniffed=`), which takes it over and closes it."""

    def __init__(self, path, f, zf):
        self.path = path
        self.file = f  # the open file object zipfile reads
        self.zip = zf  # the zipfile.ZipFile: central directory parsed

    def close(self) -> None:
        try:
            self.zip.close()
        finally:
            self.file.close()


def _sniff_zip(path: Path | RemotePath) -> str:
    fmt, opened = _sniff_zip_opened(path)
    opened.close()
    return fmt


def _sniff_zip_opened(path: Path | RemotePath) -> tuple[str, OpenedZip]:
    """(format, the opened archive) of a zip file; the caller owns (closes) the archive."""
    import zipfile

    from ckptctl.formats.zipdir import FastZipFile  # a zipfile.ZipFile, its directory read in one pass

    f = None
    try:
        f = open_file(path)
        z = FastZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, OverflowError) as e:
        if f is not None:
            f.close()
        raise CorruptFile(f"corrupt zip archive ({e})", path) from None
    opened = OpenedZip(path, f, z)
    try:
        return _zip_kind(path, z.namelist()), opened
    except BaseException:
        opened.close()
        raise


def _zip_kind(path: Path | RemotePath, names: list[str]) -> str:
    from ckptctl.formats.zipdir import at_top, joined_names, torchscript_layout

    joined = joined_names(names)
    has_data = at_top(joined, "data.pkl")
    if torchscript_layout(joined):
        if not has_data:
            raise UnknownFormat("a TorchScript archive without data.pkl: no weights to list", path)
        return "torchscript"  # torch.jit.save: weights from data.pkl; its code/ is never run
    if has_data:
        return "torch-zip"
    if "config.json" in names and (
        "metadata.json" in names or any(n.endswith((".weights.h5", ".weights.npz", ".weights.json")) for n in names)
    ):
        return "keras"  # a Keras 3 .keras archive (its reader says what is wrong inside)
    if any(n.endswith(".pkl") for n in names):
        raise UnknownFormat("a zip archive holding a pickle, but not PyTorch's layout", path)
    raise UnknownFormat("a zip archive, but not a PyTorch checkpoint", path)


def _sniff_dir(path: Path | RemotePath) -> tuple[str, Path | RemotePath]:
    """(format, path to open) for a directory."""
    if (path / ".metadata").is_file():
        return "dcp", path
    from ckptctl.formats.orbax import is_orbax_dir, run_hint

    if is_orbax_dir(path):
        return "orbax", path
    if hint := run_hint(path):
        raise UnknownFormat(hint, path)
    entries = sorted(p.name for p in path.iterdir())
    for suffix in INDEX_SUFFIXES:
        hits = [e for e in entries if e.endswith(suffix)]
        if hits:
            return "sharded", path / hits[0]
    keras_idx = [e for e in entries if e.endswith(KERAS_INDEX_SUFFIX) and (path / e).is_file()]
    if len(keras_idx) == 1:
        return "keras-sharded", path / keras_idx[0]
    if keras_idx:
        raise UnknownFormat(
            f"a folder with {len(keras_idx)} Keras shard indexes ({KERAS_INDEX_SUFFIX}); name one of them", path
        )
    tf = _tf_dir(path)
    if tf is not None:
        return "tf-bundle", tf[0]
    for name in MODEL_FILES:
        if (path / name).is_file():
            return sniff(path / name), path / name
    files = [path / e for e in entries if e.endswith(CHECKPOINT_SUFFIXES) and (path / e).is_file()]
    if len(files) == 1:
        return sniff(files[0]), files[0]
    if not files:
        raise UnknownFormat("a folder with no checkpoint in it (no index, .metadata or model file)", path)
    raise UnknownFormat(
        f"a folder with {len(files)} checkpoint files; name one of them (or use `ckptctl ls` for a run)",
        path,
    )


# formats whose readers read through ckptctl.sources, so also from s3://, https://, ...
REMOTE_FORMATS = (
    "safetensors",
    "torch-zip",
    "torch-legacy",
    "pickle",
    "hdf5",
    "sharded",
    "dcp",
    "keras",
    "keras-sharded",
    "torchscript",
    "tf-bundle",
    "gguf",
    "orbax",
)


def _remote_not_yet(what: str, path) -> UsageError:
    return UsageError(f"{path}: {what} on remote storage cannot be read yet; copy it to a local disk first")


def _tf_dir(path: Path | RemotePath) -> tuple[Path | RemotePath, str] | None:
    """(prefix, note) of the TF checkpoint a folder names (SavedModel, `checkpoint` state file)."""
    from ckptctl.formats import tf_bundle

    return tf_bundle.resolve_dir(path)


def _tf_file(p: Path | RemotePath) -> Path | RemotePath | None:
    """The prefix when `p` is a TF checkpoint prefix (not a file), P.index or P.data-K-of-N."""
    name = p.name
    if p.exists() and not (name.endswith(".index") or ".data-" in name):
        return None
    from ckptctl.formats import tf_bundle

    return tf_bundle.resolve_path(p)


def names_something(path: str | os.PathLike) -> bool:
    """True when `path` exists, or names a checkpoint that is not one file (a TF prefix)."""
    return os.path.exists(path) or os.path.isfile(os.fspath(path) + ".index")


def resolve(path: str | os.PathLike) -> tuple[str, Path | RemotePath]:
    """(format name, the path its reader opens) by content; raises a CkptError otherwise.

    URLs (s3://, https://, ...) work alike: a remote folder (prefix) is resolved from one listing,
    a remote file sniffed from a ranged read of its head.
    """
    fmt, target, opened = resolve_opened(path)
    if opened is not None:
        opened.close()
    return fmt, target


def resolve_opened(path: str | os.PathLike) -> tuple[str, Path | RemotePath, OpenedZip | None]:
    """resolve(), plus what sniffing opened for the reader (a parsed zip archive) or None; pass it
    to reader_for (which hands it to the reader) or close it."""
    p = as_path(path)
    try:
        if p.is_dir():
            return (*_sniff_dir(p), None)
        if not p.exists():
            if _tf_file(p) is not None:  # a TF prefix names no object itself: P.index beside it
                return "tf-bundle", p, None
            if is_remote(p):
                raise NotFound("no such object (key or URL not found)", p)
            raise NotFound("no such file or directory", p)
        fmt, opened = _sniff_opened(p)
        return fmt, p, opened
    except PermissionError:
        raise NotFound("permission denied", p) from None


def sniff(path: str | os.PathLike) -> str:
    """The format of one file, by its first bytes."""
    fmt, opened = _sniff_opened(path)
    if opened is not None:
        opened.close()
    return fmt


def _sniff_opened(path: str | os.PathLike) -> tuple[str, OpenedZip | None]:
    p = as_path(path)
    try:
        head = _head(p)
    except FileNotFoundError:
        raise NotFound("no such file or directory", p) from None
    except PermissionError:
        raise NotFound("permission denied", p) from None
    except IsADirectoryError:
        return _sniff_dir(p)[0], None
    except OSError as e:
        raise NotFound(e.strerror or str(e), p) from None
    if not head:
        raise UnknownFormat("empty file (0 bytes)", p)
    if (".data-" in p.name or p.name.endswith(".index")) and _tf_file(p) is not None:  # TF: by name too
        return "tf-bundle", None
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip_opened(p)
    for spec in FORMATS:  # formats whose first bytes alone say what they are (GGUF, HDF5)
        if spec.magic and head.startswith(spec.magic):
            return spec.name, None
    if len(head) >= 9 and head[8:9] == b"{":
        # a u64 header length then '{'; a pickle's first 8 bytes read as u64 are far too big
        n = int.from_bytes(head[:8], "little")
        if head[0] != 0x80 or n + 8 <= _size(p):
            return "safetensors", None
    if len(head) >= 10 and head[8:9] in (b" ", b"\t", b"\n", b"\r") and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
        # JSON may start with whitespace (the reference accepts it): then N must fit the file
        n = int.from_bytes(head[:8], "little")
        if 0 < n and n + 8 <= _size(p):
            return "safetensors", None
    if p.name.endswith(INDEX_SUFFIXES) and head.lstrip()[:1] == b"{":
        return "sharded", None
    if p.name.endswith(KERAS_INDEX_SUFFIX) and head.lstrip()[:1] == b"{":
        return "keras-sharded", None
    if _is_pickle(head):
        return "torch-legacy" if _is_legacy_torch(head) else "pickle", None
    if len(head) < 8 and p.suffix == ".safetensors":
        raise CorruptFile(f"file is {len(head)} bytes, too short for a safetensors header", p)
    if head[:1] == b"\x00":  # a TF index (LevelDB table) starts with the header entry ("" key)
        from ckptctl.formats import tf_bundle

        if tf_bundle.is_index(p):
            return "tf-bundle", None
    # HDF5 files may carry a user block: the superblock then sits at 512, 1024, 2048, ...
    size = _size(p)
    off = 512
    with open_file(p) as f:
        while off + 8 <= size and off <= 1 << 20:
            f.seek(off)
            if f.read(8) == HDF5_MAGIC:
                return "hdf5", None
            off *= 2
    if p.suffix.lower() == ".gguf":
        raise CorruptFile(f"not a GGUF file: bad magic {head[:4]!r} (expected b'GGUF')", p)
    raise UnknownFormat(_describe_unknown(head), p)


# reader options every open_reader call gets unless it passes its own: the CLI's --raw-names sets
# {"raw_names": True} (pickle-based readers then list objects as the pickle holds them, not under
# state_dict() names). A reader takes the options named in its `options` attribute.
READER_OPTIONS: dict[str, object] = {}


def reader_for(fmt: str, target: Path | RemotePath, opened: OpenedZip | None = None, **opts) -> Reader:
    """The reader of format `fmt` for `target`, given what resolve_opened opened (taken over:
    handed to a reader that accepts it, else closed)."""
    try:
        module, cls = READERS[fmt]
        reader_cls = getattr(importlib.import_module(module), cls)
        if opened is not None and "sniffed" in getattr(reader_cls, "options", ()):
            opts["sniffed"], opened = opened, None
        return reader_cls(target, **opts)
    finally:
        if opened is not None:
            opened.close()


def open_reader(path: str | os.PathLike, **opts) -> Reader:
    """Open any checkpoint ckptctl understands; raises NotFound/UnknownFormat/CorruptFile."""
    fmt, target, opened = resolve_opened(path)
    try:
        module, cls = READERS[fmt]
        reader_cls = getattr(importlib.import_module(module), cls)
        accepted = getattr(reader_cls, "options", ())
        opts = {k: v for k, v in {**READER_OPTIONS, **opts}.items() if k in accepted}
        if fmt == "tf-bundle" and as_path(path).is_dir():
            tf = _tf_dir(as_path(path))
            opts["note"] = tf[1] if tf else ""
        if is_remote(target) and fmt not in REMOTE_FORMATS:
            raise _remote_not_yet(f"a {fmt} checkpoint", target)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    reader = reader_for(fmt, target, opened, **opts)
    if is_remote(target):
        # byte ranges name files for os.open / copy_file_range: a remote object has none, so
        # consumers (convert, diff, average) take the streaming path through iter_chunks
        reader.byte_range = lambda name: None  # type: ignore[method-assign]  # this one instance, on purpose
    return reader


def writer_class(fmt: str) -> type[Writer]:
    module, cls = WRITERS[fmt]
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "FORMATS",
    "READERS",
    "SPECS",
    "WRITERS",
    "FormatSpec",
    "OpenedZip",
    "Reader",
    "Writer",
    "names_something",
    "open_reader",
    "reader_for",
    "resolve",
    "resolve_opened",
    "sniff",
    "writer_class",
]
