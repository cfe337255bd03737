"""The one interface every format implements, and the byte helpers they share.

A Reader lists a checkpoint from metadata alone (`info`) and reads one tensor's bytes on demand
(`iter_chunks`, `read`), never more than it is asked for. Tensor bytes are always the tensor's
logical value: C-contiguous, little-endian, exactly `TensorInfo.nbytes` long.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.model import CheckpointInfo, TensorInfo

if TYPE_CHECKING:
    import numpy as np

CHUNK = 64 * 1024 * 1024  # default streaming chunk: 64 MiB


class Reader:
    """Base class for format readers. Subclasses implement `info` and `iter_chunks`."""

    format: str = "?"

    def __init__(self, path: str | os.PathLike):
        from ckptctl.sources import as_path

        self.path = as_path(path)  # a Path, or a RemotePath for URLs (same read-only interface)
        self._info: CheckpointInfo | None = None

    # -- metadata ---------------------------------------------------------------------------
    def info(self) -> CheckpointInfo:
        """Names, dtypes, shapes, sizes and file metadata; never touches tensor data."""
        if self._info is None:
            self._info = self._load_info()
        return self._info

    def _load_info(self) -> CheckpointInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.info().tensor(name)
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    # -- data -------------------------------------------------------------------------------
    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        """The tensor's logical bytes in pieces of at most `size` bytes (bounded memory)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        """(file, offset, length) when the tensor's logical bytes lie contiguous in one file.

        Lets writers copy without going through Python buffers (`os.copy_file_range`).
        """
        return None

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a numpy array (bf16/fp8 via ml_dtypes; raw bytes otherwise)."""
        import numpy as np

        t = self.tensor_info(name)
        buf = bytearray(t.nbytes)
        pos = 0
        for chunk in self.iter_chunks(name):
            n = len(chunk)
            buf[pos : pos + n] = chunk
            pos += n
        if pos != t.nbytes:
            raise CorruptFile(f"tensor {name!r}: got {pos} bytes, expected {t.nbytes}", self.path)
        dt = dtypes.numpy_dtype(t.dtype)
        d = dtypes.BY_NAME[t.dtype]
        if dt is None or d.bits % 8:
            return np.frombuffer(buf, dtype=np.uint8)
        return np.frombuffer(buf, dtype=dt).reshape(t.shape)

    def read_scalar(self, name: str) -> float:
        """The value of a one-element tensor as a float, decoded without numpy for the common
        dtypes (importing numpy costs a listing more than reading hundreds of scores)."""
        import struct

        t = self.tensor_info(name)
        if t.numel != 1:
            raise ValueError(f"tensor {name!r} has {t.numel} elements, not one")
        fmt = _SCALAR_FORMATS.get(t.dtype)
        if fmt is None:
            return float(self.read(name).reshape(-1)[0])
        raw = b"".join(bytes(c) for c in self.iter_chunks(name))
        if len(raw) != t.nbytes:
            raise CorruptFile(f"tensor {name!r}: got {len(raw)} bytes, expected {t.nbytes}", self.path)
        if t.dtype == "bfloat16":
            raw = b"\0\0" + raw  # the high half of a float32
        return float(struct.unpack(fmt, raw)[0])

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SCALAR_FORMATS = {
    "float32": "<f",
    "float64": "<d",
    "float16": "<e",
    "bfloat16": "<f",
    "int8": "<b",
    "uint8": "<B",
    "int16": "<h",
    "int32": "<i",
    "int64": "<q",
    "bool": "<?",
}


class Writer:
    """Base class for streaming writers.

    Plan first, then stream: the constructor gets every tensor's TensorInfo (name, dtype, shape,
    nbytes, alias_of) and the file metadata, so that formats whose header comes first
    (safetensors) can write it; then `add` is called once per tensor, in the planned order, with
    the tensor's logical bytes in bounded chunks; `finish` writes to a temporary file beside the
    target, fsyncs and renames it into place; `abort` removes the temporary file and leaves the
    target as it was. Nothing is ever written to `path` itself before `finish`.
    """

    format: str = "?"

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: list[TensorInfo],
        metadata: dict[str, str] | None = None,
        *,
        dedupe_tied: bool = False,
    ):
        self.path = Path(path)
        self.tensors = tensors
        self.metadata = dict(metadata or {})
        self.dedupe_tied = dedupe_tied

    def add(self, info: TensorInfo, chunks: Iterable[bytes | memoryview]) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def finish(self) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def abort(self) -> None:
        """Remove every temporary file; the target is left as it was."""


class Seekable(io.RawIOBase):
    """A read-only, seekable file object of `_size` bytes; subclasses read at `self._pos`."""

    _size = 0
    _pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos
