"""Patch one field of one member's central-directory record in a zip file, in place (tests that
need a damaged archive the zipfile module would never write)."""

from __future__ import annotations

import struct
import zipfile


def patch_central(path, member: str, field: str, value: int) -> None:
    """Set a central-directory field of one member: 'csize' | 'usize' | 'offset'."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        start = z.start_dir
    pos = start
    while data[pos : pos + 4] == b"PK\x01\x02":
        nlen, xlen, clen = struct.unpack_from("<3H", data, pos + 28)
        name = data[pos + 46 : pos + 46 + nlen].decode()
        if name == member:
            at = {"csize": 20, "usize": 24, "offset": 42}[field]
            struct.pack_into("<I", data, pos + at, value)
            path.write_bytes(bytes(data))
            return
        pos += 46 + nlen + xlen + clen
    raise AssertionError(member)
