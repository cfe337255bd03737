"""`zipfile.ZipFile` with its central directory read in one pass over one buffer (issue 13: a
`torch.save` of 10^5 tensors is a zip of 10^5 members, and zipfile's own loop, a BytesIO read per
field and `ZipInfo.__init__` per member, was a sixth of `inspect`'s CPU).

Every member is a `zipfile.ZipInfo` with the values zipfile's reading gives it: name, local header
offset, sizes, method and flags set at once, the rest (times, CRC, attributes, extra and comment)
read from its directory entry when first asked for; a member with extra fields (zip64 sizes and
offsets) gets every attribute at once, decoded by ZipInfo's own `_decodeExtra`. So the object is
a `zipfile.ZipFile` in every way. Anything this loop does not handle exactly as zipfile does (an
end record it cannot read, a truncated or damaged directory, a name that does not decode or holds
a NUL, a version zipfile refuses) is left to zipfile's own reading, which then raises its own
error: damaged archives fail as they did before.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any

_ZF: Any = zipfile  # its private names (3.11): the end-record reader and the directory's layout
_CENTRAL = struct.Struct(_ZF.structCentralDir)
_SIZE = _CENTRAL.size
# the fields the loop sets, the others skipped as pad bytes: signature, extract version, flags,
# method, (time, date, CRC), sizes, name/extra/comment lengths, (disk, attributes), offset
_NEEDED = struct.Struct("<4s2xBxHH8xLLHHH8xL")
assert _NEEDED.size == _SIZE and _ZF.structCentralDir == "<4s4B4HL2L5H2L"
_SIGNATURE = _ZF.stringCentralDir
_MAX_VERSION = _ZF.MAX_EXTRACT_VERSION
_UTF8 = 0x800  # flag bit: the name is UTF-8


def joined_names(names: list[str]) -> str:
    """Member names as one text, each between NULs (zipfile cuts a name at a NUL, so none holds
    one): at 10^5 members a search of this text with str.find runs in C, where a Python step per
    name (a split, a set) cost 35 ms."""
    return "\0" + "\0".join(names) + "\0"


def at_top(joined: str, base: str) -> bool:
    """A member named `base` or `<folder>/base` (one folder down), in joined_names' text."""
    tail = base + "\0"
    at = joined.find(tail)
    while at >= 0:
        head = joined[joined.rfind("\0", 0, at) + 1 : at]  # the name up to `base`
        if head == "" or (head.endswith("/") and head.count("/") == 1):
            return True
        at = joined.find(tail, at + 1)
    return False


def torchscript_layout(joined: str) -> bool:
    """torch.jit.save's layout: `constants.pkl` at the top or one folder down, or any
    `.../code/__torch__.py`."""
    return "/code/__torch__.py\0" in joined or at_top(joined, "constants.pkl")


class _Irregular(Exception):
    """Something zipfile's own reading should see (and word the error of)."""


class FastZipFile(zipfile.ZipFile):
    """A zipfile.ZipFile (read mode) whose central directory is read in one pass."""

    def _RealGetContents(self) -> None:
        try:
            self._fast_contents()
        except _Irregular:
            self.filelist = []
            self.NameToInfo = {}
            _ZF.ZipFile._RealGetContents(self)

    def _fast_contents(self) -> None:
        fp: Any = self.fp
        try:
            endrec = _ZF._EndRecData(fp)
        except OSError:
            raise _Irregular from None
        if not endrec:
            raise _Irregular
        size_cd = endrec[_ZF._ECD_SIZE]
        offset_cd = endrec[_ZF._ECD_OFFSET]
        concat = endrec[_ZF._ECD_LOCATION] - size_cd - offset_cd
        if endrec[_ZF._ECD_SIGNATURE] == _ZF.stringEndArchive64:
            concat -= _ZF.sizeEndCentDir64 + _ZF.sizeEndCentDir64Locator
        start_dir = offset_cd + concat
        if start_dir < 0:
            raise _Irregular
        fp.seek(start_dir, 0)
        data = fp.read(size_cd)
        self._comment = endrec[_ZF._ECD_COMMENT]
        self.start_dir = start_dir
        encoding = getattr(self, "metadata_encoding", None) or "cp437"
        # an ASCII name reads the same in cp437 and UTF-8: decoded as ASCII (C, no codec lookup)
        plain = encoding in ("cp437", "utf-8", "utf8", "ascii")
        unpack_from = _NEEDED.unpack_from
        new: Any = object.__new__
        info_cls = zipfile.ZipInfo
        filelist = self.filelist
        by_name = self.NameToInfo
        n = len(data)
        pos = 0
        while pos < size_cd:  # zipfile's `total`: bytes of the directory taken so far
            if pos + _SIZE > n:
                raise _Irregular
            sig, extract_version, flags, compress_type, csize, usize, nlen, xlen, clen, offset = unpack_from(data, pos)
            if sig != _SIGNATURE or extract_version > _MAX_VERSION:
                raise _Irregular
            at = pos + _SIZE
            pos = at + nlen + xlen + clen
            if pos > n:
                raise _Irregular
            raw = data[at : at + nlen]
            try:
                name = (
                    raw.decode("ascii") if plain and raw.isascii() else str(raw, "utf-8" if flags & _UTF8 else encoding)
                )
            except UnicodeDecodeError:
                raise _Irregular from None
            if "\0" in name:
                raise _Irregular
            if xlen:  # zip64 sizes and offsets: every attribute now, decoded as zipfile does
                x = new(info_cls)
                _fill(x, data, at - _SIZE, name)
                x._decodeExtra()
            else:
                x = new(_Member)
                x.filename = name
                x.header_offset = offset + concat
                x.compress_size = csize
                x.file_size = usize
                x.compress_type = compress_type
                x.flag_bits = flags
                x._at = at - _SIZE
                x._directory = data
                filelist.append(x)
                by_name[name] = x
                continue
            x.header_offset += concat
            filelist.append(x)
            by_name[name] = x


def _fill(x: Any, data: bytes, pos: int, name: str) -> None:
    """Every attribute zipfile's reading sets on a ZipInfo, from the directory entry at `pos`."""
    (_sig, x.create_version, x.create_system, x.extract_version, x.reserved, x.flag_bits, x.compress_type, t, d, x.CRC,
     x.compress_size, x.file_size, nlen, xlen, clen, x.volume, x.internal_attr, x.external_attr,
     x.header_offset) = _CENTRAL.unpack_from(data, pos)  # fmt: skip
    at = pos + _SIZE
    x.orig_filename = x.filename = name
    x._compresslevel = None
    x.extra = data[at + nlen : at + nlen + xlen]
    x.comment = data[at + nlen + xlen : at + nlen + xlen + clen]
    x._raw_time = t
    x.date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)


class _Member(zipfile.ZipInfo):
    """A ZipInfo whose attributes beyond name, offset, sizes, method and flags are read from its
    directory entry when first asked for (10^5 members: most are never asked)."""

    __slots__ = ("_at", "_directory")

    def __getattr__(self, attr: str) -> Any:
        if attr in zipfile.ZipInfo.__slots__:
            # the attributes set at reading stay as they are (header_offset has the prefix added)
            kept = (self.header_offset, self.compress_size, self.file_size, self.compress_type, self.flag_bits)
            _fill(self, self._directory, self._at, self.filename)
            self.header_offset, self.compress_size, self.file_size, self.compress_type, self.flag_bits = kept
            return getattr(self, attr)
        raise AttributeError(attr)

    def __repr__(self) -> str:  # as a ZipInfo's (zipfile's messages quote it)
        return "<ZipInfo" + zipfile.ZipInfo.__repr__(self)[len("<_Member") :]
