"""safetensors: the header is parsed here, in pure Python (no safetensors, numpy or torch import).

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. Every
rule the reference implementation enforces when it opens a file is enforced here too, each as a
CorruptFile naming what is wrong. Tensor bytes are read with os.pread in bounded chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain, repeat
from math import prod
from operator import add, itemgetter, sub
from typing import NamedTuple

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, NotFound
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.formats.gcpause import paused_gc
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.sources import is_remote, open_source

MAX_HEADER = 100_000_000  # the reference's limit on N
U64_MAX = (1 << 64) - 1
ALIASES_KEY = "ckptctl.aliases"  # __metadata__ key written by `ckptctl convert --dedupe`


class _Loc(NamedTuple):  # a tuple: built once per tensor (10^5 at MoE scale), a frozen dataclass cost 10x
    offset: int  # absolute file offset of the first byte
    length: int


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)  # in C; the loop below only runs when a key came twice
    if len(d) != len(pairs):
        seen: set = set()
        for k, _v in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX


def _fmt(n: int) -> str:
    return str(n)


def parse_header(raw: bytes, file_size: int, path=None) -> tuple[int, dict, dict[str, str] | None]:
    """Validate a whole header. `raw` holds at least the first 8 + N bytes of the file.

    Returns (N, {name: entry} in the order of the data, __metadata__). Raises CorruptFile with a precise message.
    """
    n, (names, codes, shapes, begins, ends, _nbytes), metadata = _parse(raw, file_size, path)
    return n, dict(zip(names, zip(map(dtypes.BY_ST.__getitem__, codes), shapes, begins, ends))), metadata


_Columns = tuple[list[str], list[str], list[tuple[int, ...]], list[int], list[int], list[int]]
# (names, safetensors dtype codes, shapes, begins, ends, nbytes), one item per tensor, in data order


def _parse(raw: bytes, file_size: int, path) -> tuple[int, _Columns, dict[str, str] | None]:
    """parse_header's work as columns: _bulk() when it can vouch for the header, else _exact()."""
    if file_size < 8:
        raise CorruptFile(f"file is {file_size} bytes, too short for a safetensors header (8-byte length)", path)
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER:
        raise CorruptFile(f"header length {_fmt(n)} exceeds the safetensors limit of {_fmt(MAX_HEADER)} bytes", path)
    if 8 + n > file_size:
        raise CorruptFile(f"header length {_fmt(n)} runs past the end of the {_fmt(file_size)}-byte file", path)
    body = raw[8 : 8 + n]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFile(f"header is not valid UTF-8 (byte {err.start} of the header)", path) from None
    got = _bulk(text, n, file_size)
    if got is not None:
        return n, got[0], got[1]
    entries, metadata = _exact(text, n, file_size, path)
    vals = list(entries.values())
    columns = (
        list(entries),
        [v[0].st or "" for v in vals],  # (every BY_ST entry has its code)
        [v[1] for v in vals],
        [v[2] for v in vals],
        [v[3] for v in vals],
        [v[3] - v[2] for v in vals],
    )
    return n, columns, metadata


# ---- the bulk path: every check over whole columns (C loops), no Python code per tensor -----------
# At 10^5 tensors (issue 13) a Python loop over the entries cost more than json.loads itself. _bulk
# accepts exactly what _exact accepts and returns the same tensors in the same order; anything it
# cannot vouch for (an error, an extra key in an entry, a hole, a colon it cannot account for) it
# leaves to _exact, which finds the problem and words it as before.
_CODES = frozenset(dtypes.BY_ST)
assert not any(":" in c for c in _CODES)  # the duplicate-key count below relies on it
_DTYPE, _SHAPE, _OFFSETS = itemgetter("dtype"), itemgetter("shape"), itemgetter("data_offsets")
_INT, _STR = {int}, {str}
_ST_NAME = {code: d.name for code, d in dtypes.BY_ST.items()}


def _bulk(text: str, n: int, file_size: int) -> tuple[_Columns, dict[str, str] | None] | None:
    try:
        header = json.loads(text)  # no object_pairs_hook: a Python call per object cost ~20%
    except (ValueError, RecursionError):
        return None
    if type(header) is not dict:
        return None
    # Duplicate keys, without a Python call per object: json.loads keeps one value of a key given
    # twice, so the document then holds fewer entries (D, summed over every object) than the text
    # has key: value pairs (P); always D <= P. Each pair has one ':' outside strings; any other
    # ':' is inside a string, where it stays a ':' of the decoded string. S counts the ':' of the
    # document's strings: at most the raw ones inside strings plus the \u003a escapes (E). So
    # P <= text.count(':') - S + E, and when that bound is <= D, then P == D: no key came twice.
    entries = len(header)
    colons = "".join(header).count(":")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if type(metadata) is not dict or not set(map(type, metadata.values())) <= _STR:
            return None
        entries += len(metadata)
        colons += "".join(metadata).count(":") + "".join(metadata.values()).count(":")
    vals = list(header.values())
    if not vals or set(map(type, vals)) != {dict} or set(map(len, vals)) != {3}:
        return None  # (no tensor: nothing to gain; an entry with another key than the three: _exact)
    try:
        codes = list(map(_DTYPE, vals))  # the three keys: then no other key (len 3)
        shapes = list(map(_SHAPE, vals))
        offsets = list(map(_OFFSETS, vals))
        if not set(codes) <= _CODES:  # (a list or an object is unhashable: TypeError)
            return None
    except (KeyError, TypeError):
        return None
    entries += 3 * len(vals)  # and no ':' in the keys, the codes (asserted above), nor in numbers
    escapes = text.count("\\u003a") + text.count("\\u003A") if "\\" in text else 0
    if text.count(":") - colons + escapes > entries:
        return None  # a duplicate key, or a ':' inside a string somewhere else: _exact decides
    if set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list} or set(map(len, offsets)) != {2}:
        return None
    flat = list(chain.from_iterable(shapes))
    if flat and (set(map(type, flat)) != _INT or min(flat) < 0 or max(flat) > U64_MAX):
        return None  # (type is int: not a bool)
    flat = list(chain.from_iterable(offsets))
    if set(map(type, flat)) != _INT or min(flat) < 0 or max(flat) > U64_MAX:
        return None
    begins, ends = flat[0::2], flat[1::2]
    shapes_t = list(map(tuple, shapes))
    sizes = {}  # (code, shape) -> bytes: few kinds of tensor among many
    for code, shape in set(zip(codes, shapes_t)):
        numel = prod(shape)
        nbits = numel * dtypes.BY_ST[code].bits
        if numel > U64_MAX or nbits > U64_MAX or nbits % 8:
            return None
        sizes[code, shape] = nbits // 8
    nbytes = list(map(sizes.__getitem__, zip(codes, shapes_t)))
    if nbytes != list(map(sub, ends, begins)):  # (so no end is before its begin)
        return None
    names = list(header)
    if begins[0] != 0 or begins[1:] != ends[:-1]:  # not in data order (the reference sorts names)
        # stable by begin; tiled, that is _exact's stable sort by (begin, end) (a zero-byte tensor
        # and the next share a begin: ordered by end when tiled), else _exact says what is wrong
        order = sorted(range(len(begins)), key=begins.__getitem__)
        names, codes, shapes_t, begins, ends, nbytes = (
            list(map(col.__getitem__, order)) for col in (names, codes, shapes_t, begins, ends, nbytes)
        )
        if begins[0] != 0 or begins[1:] != ends[:-1]:
            return None
    if 8 + n + ends[-1] != file_size:
        return None
    return (names, codes, shapes_t, begins, ends, nbytes), metadata


def _exact(text: str, n: int, file_size: int, path) -> tuple[dict, dict[str, str] | None]:
    """Every check entry by entry, in order, and the first failure worded: the reference for _bulk."""
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise CorruptFile(f"header JSON has the key {str(err)!r} twice", path) from None
    except (json.JSONDecodeError, RecursionError) as err:
        msg = getattr(err, "msg", "too deeply nested")
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise CorruptFile(f"header is not valid JSON ({msg}{where})", path) from None
    if not isinstance(header, dict):
        raise CorruptFile(f"header is a JSON {type(header).__name__}, expected an object", path)

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CorruptFile("__metadata__ must map strings to strings", path)

    entries: dict[str, tuple[dtypes.DType, tuple[int, ...], int, int]] = {}
    in_order, last = True, (-1, -1)  # writers put the entries in data order: then no sort is needed
    for name, e in header.items():
        if not isinstance(e, dict):
            raise CorruptFile(f"tensor {name!r}: entry is not an object", path)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise CorruptFile(f"tensor {name!r}: missing {key!r}", path)
        code = e["dtype"]
        if not isinstance(code, str) or code not in dtypes.BY_ST:
            raise CorruptFile(f"tensor {name!r}: unknown dtype {code!r}", path)
        shape = e["shape"]
        # inline checks, not a generator of _is_uint calls: ~2 µs a tensor less at 10^5 (issue 13).
        # json.loads makes only int and bool numbers-without-a-dot; `type(v) is int` excludes bool.
        ok = type(shape) is list
        if ok:
            for s in shape:
                if type(s) is not int or s < 0 or s > U64_MAX:
                    ok = False
                    break
        if not ok:
            raise CorruptFile(f"tensor {name!r}: bad shape {shape!r} (expected a list of non-negative integers)", path)
        offs = e["data_offsets"]
        if (
            type(offs) is not list
            or len(offs) != 2
            or type(offs[0]) is not int
            or type(offs[1]) is not int
            or offs[0] < 0
            or offs[1] < 0
            or offs[0] > U64_MAX
            or offs[1] > U64_MAX
        ):
            raise CorruptFile(
                f"tensor {name!r}: bad data_offsets {offs!r} (expected [begin, end], non-negative integers)", path
            )
        entries[name] = (dtypes.BY_ST[code], tuple(shape), offs[0], offs[1])
        if in_order:
            span = (offs[0], offs[1])
            in_order = last <= span
            last = span

    # the reference's validate(): sorted by offsets, the tensors must tile the buffer exactly
    pos = 0
    # (sorted() is stable: on entries already in order it gives them as they are)
    ordered = list(entries.items()) if in_order else sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3]))
    for name, (dt, shape, b, e) in ordered:
        if b != pos or e < b:
            if b > pos:
                what = f"a hole: bytes {_fmt(pos)}..{_fmt(b)} of the data belong to no tensor"
            elif e < b:
                what = f"end {_fmt(e)} is before begin {_fmt(b)}"
            else:
                what = f"overlaps the previous tensor (begins at {_fmt(b)}, previous ends at {_fmt(pos)})"
            raise CorruptFile(f"tensor {name!r}: bad data_offsets [{b}, {e}]: {what}", path)
        numel = 1
        for s in shape:
            numel *= s
        nbits = numel * dt.bits
        if numel > U64_MAX or nbits > U64_MAX:
            raise CorruptFile(f"tensor {name!r}: shape {list(shape)} overflows", path)
        if nbits % 8:
            raise CorruptFile(f"tensor {name!r}: {numel} elements of {dt.st} is not a whole number of bytes", path)
        if e - b != nbits // 8:
            raise CorruptFile(
                f"tensor {name!r}: data_offsets [{b}, {e}] hold {_fmt(e - b)} bytes, but {dt.st} {list(shape)} "
                f"needs {_fmt(nbits // 8)}",
                path,
            )
        pos = e
    if 8 + n + pos != file_size:
        raise CorruptFile(
            f"file is {_fmt(file_size)} bytes, but its header describes {_fmt(8 + n + pos)} "
            f"(8 + {_fmt(n)} header + {_fmt(pos)} data)",
            path,
        )
    return (entries if in_order else dict(ordered)), metadata  # in the order of the data (sorted once, here)


class SafetensorsReader(Reader):
    format = "safetensors"

    def __init__(self, path):
        super().__init__(path)
        self._src = None  # sources.LocalSource / RemoteSource

    # -- file access ---------------------------------------------------------------------------
    def _open(self):
        if self._src is None:
            try:
                self._src = open_source(self.path)
            except FileNotFoundError:
                raise NotFound("no such file or directory", self.path) from None
            except PermissionError:
                raise NotFound("permission denied", self.path) from None
            except IsADirectoryError:
                raise NotFound("is a directory, expected a .safetensors file", self.path) from None
        return self._src

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    # -- metadata ------------------------------------------------------------------------------
    def _load_info(self) -> CheckpointInfo:
        with paused_gc():
            return self._load_info_now()

    def _load_info_now(self) -> CheckpointInfo:
        src = self._open()
        size = src.size
        # remote: one request for the length and (usually) the whole header; local: exact preads
        first = src.pread(0, min(size, 64 * 1024) if src.remote else 8) if size >= 8 else b""
        head = first[:8]
        if size < 8:
            parse_header(head, size, self.path)
        n = int.from_bytes(head, "little")
        raw = head
        if n <= MAX_HEADER and 8 + n <= size:
            raw = first[: 8 + n] if len(first) >= 8 + n else head + self._pread_exact(src, n, 8)
        n, (names, codes, shapes, begins, _ends, nbytes), metadata = _parse(raw, size, self.path)
        # in data order; built by C loops (map), one TensorInfo and one _Loc per tensor
        locs = map(tuple.__new__, repeat(_Loc), zip(map(add, begins, repeat(8 + n)), nbytes))
        tensors = list(map(TensorInfo, names, map(_ST_NAME.__getitem__, codes), shapes, nbytes, repeat(None), locs))
        meta = dict(metadata or {})
        warnings: list[str] = []
        aliases = meta.pop(ALIASES_KEY, None)
        if aliases is not None:
            tensors += self._aliases(aliases, tensors, warnings)
        return CheckpointInfo(
            path=str(self.path),
            format=self.format,
            tensors=tensors,
            metadata=meta,
            files=[str(self.path)],
            warnings=warnings,
        )

    def _pread_exact(self, src, n: int, offset: int) -> bytes:
        parts = []
        pos = offset
        end = offset + n
        while pos < end:
            chunk = src.pread(pos, min(end - pos, CHUNK))
            if not chunk:
                raise CorruptFile(f"file ends at byte {pos} while reading the header", self.path)
            parts.append(chunk)
            pos += len(chunk)
        return b"".join(parts)

    def _aliases(self, text: str, tensors: list[TensorInfo], warnings: list[str]) -> list[TensorInfo]:
        """Tied weights stored once: {alias: target} in __metadata__['ckptctl.aliases']."""
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError:
            mapping = None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            warnings.append(f"ignored __metadata__[{ALIASES_KEY!r}]: not a JSON object of names")
            return []
        by_name = {t.name: t for t in tensors}
        out = []
        for alias, target in mapping.items():
            t = by_name.get(target)
            if alias in by_name:
                warnings.append(f"ignored tied-weight alias {alias!r}: a tensor of that name is stored")
            elif t is None:
                warnings.append(f"ignored tied-weight alias {alias!r}: its target {target!r} is not in the file")
            else:
                out.append(TensorInfo(alias, t.dtype, t.shape, t.nbytes, alias_of=target, loc=t.loc))
        return out

    # -- data ----------------------------------------------------------------------------------
    def _loc(self, name: str) -> _Loc:
        return self.tensor_info(name).loc

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        loc = self._loc(name)
        src = self._open()
        try:
            yield from src.iter_range(loc.offset, loc.length, size)
        except CorruptFile as e:
            raise CorruptFile(f"tensor {name!r}: {e.message} (file truncated?)", e.path or self.path) from None

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        if is_remote(self.path):
            return None
        loc = self._loc(name)
        return (str(self.path), loc.offset, loc.length)
