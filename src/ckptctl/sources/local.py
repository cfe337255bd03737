"""Local byte sources: a file read with os.pread on one descriptor, or a descriptor the caller owns."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ckptctl.errors import CorruptFile


class LocalSource:
    """A local file: os.pread on one descriptor; open() is the built-in open."""

    remote = False

    def __init__(self, path):
        self.path = os.fspath(path)
        self.url = self.path
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise

    @property
    def local_path(self) -> str:
        return self.path

    def fileno(self) -> int:
        return self.fd

    def pread(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def iter_range(self, offset: int, length: int, chunk: int) -> Iterator[bytes]:
        """`length` bytes at `offset` in pieces of at most `chunk` bytes, with os.pread."""
        end = offset + length
        pos = offset
        while pos < end:
            data = os.pread(self.fd, min(chunk, end - pos), pos)
            if not data:
                raise CorruptFile(f"file ends at byte {pos}, expected data up to byte {end}")
            pos += len(data)
            yield data

    def open(self):
        return open(self.path, "rb")  # noqa: SIM115 - the caller closes it

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FdSource(LocalSource):
    """A LocalSource over a descriptor the caller owns (not closed here)."""

    def __init__(self, fd: int):
        self.path = self.url = f"<fd {fd}>"
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def close(self) -> None:
        pass


def as_source(src):
    """A source from a source, or from an os-level descriptor (int) kept open by its owner."""
    return FdSource(src) if isinstance(src, int) else src
