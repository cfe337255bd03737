"""Streaming safetensors writer.

Layout as the reference writes it: an u64 header length, compact JSON (`__metadata__` first,
then the tensors in data order), padded with spaces to a multiple of 8, then the data buffer.
Data is ordered like the reference (by dtype, then name): for the same tensors and metadata the
file is byte-identical to `safetensors.torch.save_file`'s, and every tensor is aligned. The header is known from the plan, so it is written first and each tensor's bytes
go straight to their offset (`pwrite` / `copy_file_range`): any add order works, and memory
stays bounded.

safetensors forbids aliasing: tied weights are written once per name, unless `dedupe_tied`,
which writes one copy and records `__metadata__["ckptctl.aliases"] = {alias: target}` (JSON),
which ckptctl's reader turns back into aliases.
"""

from __future__ import annotations

import json
import os

from ckptctl import dtypes
from ckptctl.errors import Incompatible
from ckptctl.formats.writeutil import AtomicFile, StreamingWriter, copy_range, write_chunks
from ckptctl.model import TensorInfo

ALIASES_KEY = "ckptctl.aliases"
MAX_HEADER = 100_000_000  # the reference refuses larger headers
# the reference's Dtype enum order; it lays data out by dtype (descending), then name, which
# also puts larger items first so every tensor is aligned to its item size
ST_ORDER = {
    code: i
    for i, code in enumerate(
        "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ "
        "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}


def st_code(t: TensorInfo) -> str:
    d = dtypes.BY_NAME.get(t.dtype)
    if d is None or d.st is None:
        raise Incompatible(f"tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot hold")
    return d.st


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8_names(names, where: str = "a safetensors header (UTF-8 JSON)") -> None:
    """Refuse a name that is not text: a name read from bytes that are not UTF-8 (a pickle
    string, an HDF5 name) holds lone surrogates, which no UTF-8 JSON header or index can store."""
    for name in names:
        if not _is_text(name):
            raise Incompatible(
                f"tensor {name!r} has a name that is not valid UTF-8 (the source stores bytes that are not "
                f"text), which {where} cannot store; one .pt file keeps it"
            )


def header_metadata(metadata: dict | None) -> dict[str, str]:
    """safetensors metadata is str -> str; transformers wants a "format" entry."""
    meta = {
        str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        for k, v in (metadata or {}).items()
    }
    meta.setdefault("format", "pt")
    return meta


class SafetensorsWriter(StreamingWriter):
    format = "safetensors"

    def __init__(self, path, tensors, metadata=None, *, dedupe_tied=False):
        super().__init__(path, tensors, metadata, dedupe_tied=dedupe_tied)
        for t in tensors:
            st_code(t)
        check_utf8_names(t.name for t in tensors)
        # what gets bytes in the file: every name, or only primaries when deduplicating
        stored = [t for t in tensors if not (dedupe_tied and t.alias_of is not None)]
        order = sorted(stored, key=lambda t: (-ST_ORDER[st_code(t)], t.name))
        self.offsets: dict[str, int] = {}
        pos = 0
        entries: dict[str, dict] = {}
        for t in order:
            self.offsets[t.name] = pos
            entries[t.name] = {"dtype": st_code(t), "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        self.data_size = pos
        meta = header_metadata(self.metadata)
        meta.pop(ALIASES_KEY, None)
        if dedupe_tied and self.root:
            meta[ALIASES_KEY] = json.dumps(self.root, ensure_ascii=False, sort_keys=True)
        doc: dict = {"__metadata__": dict(sorted(meta.items()))}
        for name, e in entries.items():
            if name == "__metadata__":
                raise Incompatible("a tensor named '__metadata__' cannot be stored in safetensors")
            doc[name] = e
        try:
            head = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:  # the names were checked: a metadata key or value
            bad = next(f"{k!r}: {v!r}" for k, v in meta.items() if not _is_text(k) or not _is_text(v))
            raise Incompatible(f"metadata {bad} is not valid UTF-8; safetensors keeps metadata as UTF-8 JSON") from None
        head += b" " * (-len(head) % 8)
        if len(head) > MAX_HEADER:
            raise Incompatible(
                f"safetensors header would be {len(head)} bytes (limit {MAX_HEADER}): "
                "too many tensors or too much metadata for one file; use --max-shard-size"
            )
        self.header = len(head).to_bytes(8, "little") + head
        self.base = len(self.header)
        self._file = AtomicFile(self.path)
        try:
            os.pwrite(self._file.fileno(), self.header, 0)
        except BaseException:
            self._file.abort()
            raise

    def _write_chunks(self, t: TensorInfo, chunks) -> None:
        write_chunks(self._file.fileno(), self.base + self.offsets[t.name], chunks, t.nbytes, t.name, self.on_progress)

    def _write_range(self, t: TensorInfo, src, offset: int, length: int) -> None:
        copy_range(src, offset, self._file.fileno(), self.base + self.offsets[t.name], length, self.on_progress)

    def _finalize(self, fd: int) -> None:
        if not self.dedupe_tied:
            for alias, root in self.root.items():
                n = self.by_name[alias].nbytes
                copy_range(fd, self.base + self.offsets[root], fd, self.base + self.offsets[alias], n)
        os.ftruncate(fd, self.base + self.data_size)
