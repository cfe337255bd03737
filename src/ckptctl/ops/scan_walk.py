"""Every pickle a file holds, for `scan`: concatenated pickles, zip members, a zip's prefix and
comment, pickles nested as bytes inside pickles and object `.npy` payloads; each walked with the
restricted pickle machine (nothing is unpickled), its globals classified."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ckptctl.formats.pickles.safety import classify, classify_pair

# ---- every pickle a file holds ---------------------------------------------------------------
MAX_DEPTH = 8  # pickles nested as bytes inside pickles (deeper: dangerous, not walked)
MAX_PICKLES = 4096  # pickles walked in one file, every view and depth together
MAX_CONCAT = 256  # pickles back to back in one stream
IN_MEMORY = 256 << 20  # a compressed member or nested payload larger than this is not walked
# zip members that loaders unpickle by their name; other members are sniffed for a pickle start
PICKLE_NAMES = (".pkl", ".pickle", ".debug_pkl", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".dill", ".npy")
_PROTO = tuple(bytes([0x80, v]) for v in range(2, 6))
_ZIP_END = b"PK\x05\x06"


@dataclass
class Walk:
    """What walk_file found: (global, class, where) for every global every pickle asks for."""

    found: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    parsed: int = 0  # pickles read to their STOP
    walked: int = 0
    kind: str | None = None  # 'zip' | 'npy' | None (what the file is when no reader knows it)

    def add(self, name: str, cls: str, where: str) -> None:
        self.found.append((name, cls, where))


def walk_file(path: str | os.PathLike) -> Walk:
    """Walk every pickle reachable in a file, never running anything: the pickles back to back
    at its start (legacy torch writes five; `pickle.load` runs the first, a loader calling it
    again the next), every pickle member of a zip found in it (wherever the zip starts: a pickle
    followed by a zip is both), a pickle in a zip's comment, the pickled payload of an
    object-dtype .npy, and pickles carried as bytes and handed to a loader
    (`pickle.loads(b'...')`, `torch.storage._load_from_bytes`, numpy object arrays), to depth
    MAX_DEPTH. Raises OSError only."""
    from ckptctl.sources import file_size, open_file

    w = Walk()
    with open_file(path) as f:  # a remote object: a block-cached file of ranged reads
        size = file_size(f)
        head = f.read(8)
        if head.startswith(b"PK\x03\x04"):
            w.kind = "zip"
        elif head.startswith(b"\x93NUMPY"):
            w.kind = "npy"
        _region(w, f, 0, size, "", 0, top=True)
    return w


def _read_at(f, off: int, n: int) -> bytes:
    f.seek(off)
    return f.read(n)


def _region(w: Walk, f, start: int, end: int, where: str, depth: int, top: bool = False, named: bool = True) -> None:
    """Every view of f[start:end]: a pickle stream at its start, an .npy, a zip anywhere in it."""
    if depth > MAX_DEPTH:
        w.add(f"<pickles nested deeper than {MAX_DEPTH}>", "dangerous", where)
        return
    head = _read_at(f, start, 8)
    if head.startswith(b"\x93NUMPY"):
        _npy(w, f, start, end, where, depth)
    elif not head.startswith(b"PK\x03\x04"):
        _stream(w, f, start, end, where or "pickle", depth, strict=named and not top)
    tail_at = max(start, end - (65535 + 22))
    if _ZIP_END in _read_at(f, tail_at, end - tail_at):
        _zip(w, f, start, end, where, depth)


def _stream(w: Walk, f, start: int, end: int, where: str, depth: int, strict: bool) -> None:
    """The pickles back to back from `start`, until the end, garbage or a broken one."""
    from ckptctl.formats.pickles import Machine, PickleError

    pos = start
    for k in range(1, MAX_CONCAT + 2):
        if pos >= end:
            return
        if k > MAX_CONCAT or w.walked >= MAX_PICKLES:
            # bytes left that scan does not walk: like pickles nested too deeply, they cannot be
            # called safe (padding with benign pickles must not hide a payload behind the limit)
            limit = f"{MAX_CONCAT} pickles back to back" if k > MAX_CONCAT else f"{MAX_PICKLES} pickles in the file"
            w.add(f"<more than {limit}: the rest not walked>", "dangerous", where)
            return
        w.walked += 1
        label = where if k == 1 else f"{where} #{k} (byte {pos - start})"
        first = _read_at(f, pos, 2)
        # what follows a failure is listed by opcodes only where a pickle surely starts (the
        # listing reads up to 64 MiB: not for the raw bytes after a legacy file's pickles)
        m = Machine(f, start=pos, end=end, path=None, lenient=first in _PROTO or (k == 1 and strict))
        err = None
        try:
            m.load()
        except PickleError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - a bug in the machine must not hide the file's globals
            err = PickleError(f"{type(e).__name__}: {e}")
        pairs = list(m.pairs)
        if err is not None:
            pairs += [p for p in err.more_pairs if p not in pairs]
        if err is not None and k == 1 and not strict and not pairs:
            return  # not a pickle at all (a zip's prefix, some other format): nothing to say
        for module, name in dict.fromkeys(pairs):
            full = f"{module}.{name}" if module else name
            w.add(full, classify_pair(module, name), label)
        for who, payload in m.nested:
            _nested(w, f, who, payload, label, depth)
        if err is not None:
            if k == 1 or pairs:
                w.errors.append(f"{label}: {err.message}")
            return
        w.parsed += 1
        if m.pos <= pos:
            return
        pos = m.pos


def _nested(w: Walk, f, who: str, payload, where: str, depth: int) -> None:
    """A pickle (or torch archive) the file carries as data and hands to a loader."""
    import io

    from ckptctl.formats.pickles import Span

    label = f"{where} > {who} payload (depth {depth + 1})"
    if payload is None:
        if classify(who) != "dangerous":  # the loader is flagged by name; this one only by its payload
            w.add(f"{who}(<bytes built at load time>)", "dangerous", where)
        return
    if isinstance(payload, Span):
        _region(w, f, payload.offset, payload.offset + payload.length, label, depth + 1)
    elif len(payload) <= IN_MEMORY:
        _region(w, io.BytesIO(payload), 0, len(payload), label, depth + 1)


def _npy(w: Walk, f, start: int, end: int, where: str, depth: int) -> None:
    """An .npy whose dtype holds objects: numpy.load(allow_pickle=True) unpickles its payload."""
    import ast
    import struct

    raw = _read_at(f, start, 12)
    if len(raw) < 10:
        return
    if raw[6] == 1:
        hlen, hstart = struct.unpack_from("<H", raw, 8)[0], 10
    elif len(raw) >= 12:
        hlen, hstart = struct.unpack_from("<I", raw, 8)[0], 12
    else:
        return
    if hlen > 1 << 20:
        w.errors.append(f"{where or 'npy'}: header of {hlen} bytes")
        return
    text = _read_at(f, start + hstart, hlen).decode("latin1")
    try:
        header = ast.literal_eval(text)
        descr = header["descr"] if isinstance(header, dict) else None
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        w.errors.append(f"{where or 'npy'}: unreadable .npy header")
        return
    if "O" in repr(descr):
        label = f"{where + ' > ' if where else ''}npy object payload"
        _stream(w, f, start + hstart + hlen, end, label, depth + 1, strict=True)


def _zip(w: Walk, f, start: int, end: int, where: str, depth: int) -> None:
    """Every pickle member of the zip that ends f[start:end] (and a pickle in its comment)."""
    import io
    import re
    import struct
    import zipfile
    import zlib

    from ckptctl.formats.torch_zip import _LOCAL, _Window

    try:
        z = zipfile.ZipFile(_Window(f, start, end - start))
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        struct.error,
        KeyError,
        NotImplementedError,
        UnicodeDecodeError,
    ):
        return
    pre = f"{where} > " if where else ""
    storage = re.compile(r"(^|/)data/\d+$")  # torch storages: raw tensor bytes, never unpickled
    with z:
        for zi in z.infolist():
            if zi.filename.endswith("/") or storage.search(zi.filename):  # not is_dir(): IndexError on an empty name
                continue
            named = zi.filename.rsplit("/", 1)[-1].lower().endswith(PICKLE_NAMES)
            label = f"{pre}member {zi.filename}"
            try:
                if zi.compress_type == zipfile.ZIP_STORED:
                    sig, *_rest, nlen, xlen = _LOCAL.unpack(_read_at(f, start + zi.header_offset, _LOCAL.size))
                    if sig != b"PK\x03\x04":
                        raise ValueError("bad local header")
                    off = start + zi.header_offset + _LOCAL.size + nlen + xlen
                    head = _read_at(f, off, 8)
                    if named or _sniff(head):
                        _region(w, f, off, min(off + zi.compress_size, end), label, depth, named=named)
                    continue
                with z.open(zi) as fh:
                    head = fh.read(8)
                if not (named or _sniff(head)):
                    continue
                if zi.file_size > IN_MEMORY:
                    w.errors.append(f"{label}: compressed and too large to scan ({zi.file_size} bytes)")
                    w.add(f"<unscanned pickle member {zi.filename}>", "unknown", label)
                    continue
                with z.open(zi) as fh:
                    raw = fh.read(IN_MEMORY + 1)
            except (
                zipfile.BadZipFile,
                OSError,
                EOFError,
                ValueError,
                struct.error,
                NotImplementedError,
                RuntimeError,
                zlib.error,
            ) as e:
                if named:
                    w.errors.append(f"{label}: {e}")
                continue
            _region(w, io.BytesIO(raw), 0, len(raw), label, depth, named=named)
        comment = z.comment
    if comment and _sniff(comment[:8]):
        _stream(w, io.BytesIO(comment), 0, len(comment), f"{pre}zip comment", depth, strict=False)


def _sniff(head: bytes) -> bool:
    """Bytes that start a pickle some loader may run (protocol 2+), a zip or an .npy."""
    return head.startswith(_PROTO) or head.startswith((b"PK\x03\x04", b"\x93NUMPY"))
