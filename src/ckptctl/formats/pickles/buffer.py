"""Reading one pickle's bytes: a buffer in memory, or a file region read in growing windows,
with large payloads left in the file."""

from __future__ import annotations

import os
from typing import Any

WINDOW = 1 << 20  # bytes read from the file at a time (at most)
FIRST_WINDOW = 64 << 10  # the first read of a pickle (legacy files have data right after theirs)


class _NeedBytes(Exception):
    pass


class Buffered:
    """The bytes of one pickle: `source` is bytes (a whole member already in memory) or a readable
    binary file object positioned anywhere: `start`/`end` give the absolute region; `preload` holds
    bytes of the file from `start` on, already read. The subclass supplies `_fail`."""

    path: Any

    def __init__(
        self, source: bytes | bytearray | memoryview | Any, start: int, end: int | None, preload: bytes
    ) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._file = None
            buf = bytes(source)
            self._data = buf[start:end] if (start or end is not None) else buf
            self._base = start
            self._end = start + len(self._data)
        else:
            self._file = source
            self._data = bytes(preload)  # bytes of the file from `start` on, already read
            self._base = start
            if end is None:
                source.seek(0, os.SEEK_END)
                end = source.tell()
            self._end = end
        self.pos = start  # absolute position of the next unread byte
        self._start = start
        self._window = FIRST_WINDOW

    def _fail(self, msg: str, pos: int | None = None):
        raise NotImplementedError

    # -- buffer management ---------------------------------------------------------------------
    def _fill(self, data: bytes, pos: int, need: int) -> tuple[bytes, int]:
        """Make data[pos:pos+need] available (reading more of the file); returns (data, pos)."""
        if self._file is None:
            raise _NeedBytes
        abs_pos = self._base + pos
        have = data[pos:]
        want = max(need - len(have), self._window)
        self._window = min(self._window * 2, WINDOW)
        avail = self._end - (abs_pos + len(have))
        want = min(want, avail)
        if want > 0:
            self._file.seek(abs_pos + len(have))
            more = self._file.read(want)
            have = have + more
        self._base = abs_pos
        if len(have) < need:
            self._data = have
            raise _NeedBytes
        return have, 0

    def _fill_soft(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """Read ahead as far as the region allows (at most WINDOW bytes more)."""
        abs_pos = self._base + pos
        have = data[pos:]
        want = min(self._window, self._end - (abs_pos + len(have)))
        self._window = min(self._window * 2, WINDOW)  # start small: the pickle may end soon
        if want <= 0:
            return data, pos
        assert self._file is not None  # called for file-backed pickles only
        self._file.seek(abs_pos + len(have))
        more = self._file.read(want)
        self._base = abs_pos
        return have + more, 0

    def _skip(self, data: bytes, pos: int, n: int) -> tuple[bytes, int]:
        """Skip n bytes that stay in the file."""
        if pos + n <= len(data):
            return data, pos + n
        abs_target = self._base + pos + n
        if abs_target > self._end:
            self._base += pos
            raise _NeedBytes
        self._base = abs_target
        return b"", 0

    def leftover(self) -> bytes:
        """Bytes already read past this pickle's STOP (the next pickle's preload)."""
        return self._data[self.pos - self._base :] if self._file is not None else b""

    def _fill_or_fail(self, data: bytes, pos: int, ln: int) -> tuple[bytes, int]:
        try:
            return self._fill(data, pos, ln)
        except _NeedBytes:
            self._fail(f"a {ln}-byte string runs past the end", self._base + pos)
        raise AssertionError  # pragma: no cover

    def _readline(self, data: bytes, pos: int) -> tuple[bytes, int, bytes]:
        end = data.find(b"\n", pos)
        while end < 0:
            if self._file is None or self._base + len(data) >= self._end:
                self._fail("a text opcode without its newline", self._base + pos)
            have = len(data) - pos
            data, pos = self._fill(data, pos, have + 1)
            end = data.find(b"\n", pos)
            if have > 1 << 20 and end < 0:
                self._fail("a text opcode argument longer than 1 MiB", self._base + pos)
        line = data[pos:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line, end + 1, data
