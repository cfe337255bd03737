"""A seekable read-only file object over a remote source (zipfile, h5py and the pickle reader
read through it): an LRU cache of blocks with sequential read-ahead."""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptctl.sources.remote import RemoteSource


BLOCK = 64 * 1024  # file-object cache block: what one scattered small read fetches
MAX_AHEAD = 4 * 1024 * 1024  # read-ahead grows (doubling) up to this while reads stay sequential
CACHE_BLOCKS = 256  # 16 MiB of cached blocks per open file object at most


class CachedFile(io.RawIOBase):
    """A seekable read-only file object over a RemoteSource, with an LRU cache of BLOCK-sized blocks.

    Small reads (headers, zip directories, pickles, HDF5 metadata) are served from whole blocks,
    fetched a run at a time; large reads go straight to one ranged GET without being cached.
    """

    def __init__(self, src: RemoteSource, block: int = BLOCK, max_blocks: int = CACHE_BLOCKS, own: bool = False):
        super().__init__()
        self.src = src
        self.name = src.url
        self.size = src.size
        self.block = block
        self.max_blocks = max_blocks
        self.pos = 0
        self.own = own  # close the source with the file
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._seq_next = -1  # block after the last fetch
        self._ahead = block

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self.pos + offset
        elif whence == 2:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self.pos = pos
        return pos

    def _block(self, i: int) -> bytes | None:
        b = self._blocks.get(i)
        if b is not None:
            self._blocks.move_to_end(i)
        return b

    def _fill(self, first: int, last: int) -> None:
        """Fetch the missing blocks of [first, last], one request per missing run.

        A run that starts where the previous fetch ended is a sequential read (a pickle, a zip
        directory): it fetches ahead, doubling up to MAX_AHEAD; a scattered read fetches one block.
        """
        i = first
        while i <= last:
            if i in self._blocks:
                self._blocks.move_to_end(i)
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in self._blocks:
                j += 1
            if i == self._seq_next:
                self._ahead = min(self._ahead * 2, MAX_AHEAD)
                stop = max(j, i + self._ahead // self.block - 1)
                while j < stop and j + 1 not in self._blocks and (j + 1) * self.block < self.size:
                    j += 1
            else:
                self._ahead = self.block
            data = self.src.pread(i * self.block, (j - i + 1) * self.block)
            for k in range(i, j + 1):
                self._blocks[k] = data[(k - i) * self.block : (k - i + 1) * self.block]
            self._seq_next = j + 1
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
            i = j + 1

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        end = min(self.pos + n, self.size)
        if end <= self.pos:
            return b""
        start = self.pos
        if end - start >= 4 * self.block:
            data = self.src.pread(start, end - start)
        else:
            first, last = start // self.block, (end - 1) // self.block
            if last - first + 1 > self.max_blocks:
                data = self.src.pread(start, end - start)
            else:
                self._fill(first, last)
                parts = [self._blocks[i] for i in range(first, last + 1)]
                buf = parts[0] if len(parts) == 1 else b"".join(parts)
                off = start - first * self.block
                data = buf[off : off + (end - start)]
        self.pos = start + len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        return n

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._blocks.clear()
        if self.own:
            self.src.close()
        super().close()
