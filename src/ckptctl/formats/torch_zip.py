"""PyTorch zip checkpoints (`torch.save` default since 1.6): `.pt`, `.pth`, `.bin`, `.ckpt`.

The zip's central directory gives every member's size and local-header offset; a member's bytes
start at local_header_offset + 30 + name_len + LOCAL extra_len (torch pads that extra field so
that data is 64-byte aligned). CRCs may be zero, so members are read by offset, never through
zipfile.read. `data.pkl` goes through the restricted unpickler (pickles.Machine); its persistent
ids name storages `data/<key>`. Tensor bytes are read with os.pread only when asked for
(iter_chunks), contiguous views directly, strided views (transposes, Fortran order, stride-0
expands) slab by slab in bounded memory.

TorchScript archives (`torch.jit.save`) are read here too (TorchScriptReader): the same zip
layout, with a module tree in data.pkl and code in `code/` that is listed, never run.

The archive itself is torch_archive.py; what the pickle-based readers share is pickle_reader.py
(the reader base, building TensorInfos) and strided.py (blobs, TensorLoc, the strided engine).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptctl.errors import CorruptFile
from ckptctl.formats import pickles
from ckptctl.formats.pickle_reader import PickleBasedReader, checkpoint_info
from ckptctl.formats.strided import BytesBlob, FileBlob, TensorLoc, boxes, c_contiguous, fill, iter_view
from ckptctl.formats.torch_archive import (
    _LOCAL,
    MAX_PICKLE_IN_MEMORY,
    TorchArchive,
    _Window,
    scan_zip_pickles,
)
from ckptctl.model import CheckpointInfo


class TorchZipReader(PickleBasedReader):
    format = "torch-zip"
    # what open_reader passes on (formats.READER_OPTIONS; `sniffed`: the zip the registry opened)
    options = ("raw_names", "sniffed")
    _archive_close: Callable[[], None] | None = None  # the open archive's close, once info() has run

    def __init__(self, path, raw_names: bool = False, sniffed=None):
        super().__init__(path, raw_names)
        self._sniffed = sniffed  # formats.OpenedZip, taken over by the first TorchArchive

    def _archive(self, torchscript: bool = False) -> TorchArchive:
        opened, self._sniffed = self._sniffed, None
        return TorchArchive(self.path, torchscript=torchscript, opened=opened)

    def _load_info(self) -> CheckpointInfo:
        arch = self._archive()
        try:
            root, globals_, warnings, _storages = arch.unpickle()
            meta: dict[str, Any] = {}
            bo = arch.read_small("byteorder", 16)
            if bo is not None:
                meta["byteorder"] = bo.decode("ascii", "replace").strip()
            fv = arch.read_small(".format_version", 64)
            if fv is not None:
                meta[".format_version"] = fv.decode("ascii", "replace").strip()
            if arch.prefix:
                meta["archive"] = arch.prefix.rstrip("/")
            big = bo is not None and bo.strip() == b"big"  # arch.big_endian, without reading the member again
            return checkpoint_info(
                self.path, self.format, root, globals_, warnings, arch.blob, big, meta, raw_names=self.raw_names
            )
        finally:
            self._archive_close = arch.close

    def close(self) -> None:
        opened, self._sniffed = getattr(self, "_sniffed", None), None
        if opened is not None:
            opened.close()
        closer = getattr(self, "_archive_close", None)
        if closer is not None:
            closer()
            self._archive_close = None
        super().close()


MAX_CODE_TEXT = 16 << 20  # TorchScript code read (as text, for its declarations) per archive


class TorchScriptReader(TorchZipReader):
    """A TorchScript archive (`torch.jit.save`, `torch.jit.script(m).save`): the module tree of
    data.pkl, read with the restricted unpickler like any torch pickle, is listed under the names
    `module.state_dict()` gives. Its code (`code/`) is never compiled or run: the files are listed
    with their sizes, and only each class's header lines (`class X(Module):`, `__parameters__`,
    `__buffers__`, `Final` constants) are read as text, to tell parameters and buffers from other
    tensor attributes. constants.pkl is unpickled the same restricted way (its tensors are not
    weights: they are counted in the metadata, not listed); every other pickle member
    (`*.debug_pkl`, traced_inputs.pkl, extra files) is scanned for the globals it asks for.
    """

    format = "torchscript"

    def _load_info(self) -> CheckpointInfo:
        arch = self._archive(torchscript=True)
        try:
            root, globals_, warnings, _storages = arch.unpickle()
            globals_ = list(globals_)
            meta: dict[str, Any] = {}
            code: dict[str, int] = {}
            texts: dict[str, str] = {}
            extra: dict[str, int] = {}
            budget = MAX_CODE_TEXT
            pre = arch.prefix
            for name, zi in arch.members.items():
                if not name.startswith(pre) or zi.filename.endswith("/"):
                    continue
                rel = name[len(pre) :]
                if rel.startswith("code/"):
                    code[rel] = zi.file_size
                    if rel.endswith(".py") and zi.file_size <= budget and not self.raw_names:
                        budget -= zi.file_size
                        texts[rel] = arch._member_bytes(zi).decode("utf-8", "replace")
                elif rel.startswith("extra/"):
                    extra[rel[len("extra/") :]] = zi.file_size
            if budget <= 0 or any(r.endswith(".py") and r not in texts for r in code) and not self.raw_names:
                warnings.append(
                    "some TorchScript code files are too large to read their declarations: "
                    "every tensor attribute of their classes is listed"
                )
            if arch.member("constants.pkl") is not None:
                try:
                    consts, cglobals, cwarn, _ = arch.unpickle("constants.pkl", "constants")
                except pickles.PickleError as e:
                    globals_ += [g for g in e.globals + e.more_globals if g not in globals_]
                    warnings.append(f"constants.pkl: {e.message}")
                else:
                    globals_ += [g for g in cglobals if g not in globals_]
                    warnings += cwarn
                    n = sum(1 for _ in _tensors_in(consts))
                    if n:
                        meta["constants"] = f"{n} tensor constant(s) used by the code (not weights, not listed)"
            more, errors = _other_pickle_globals(arch)
            globals_ += [g for g in more if g not in globals_]
            warnings += errors
            for k, small in (("version", 16), ("byteorder", 16), ("producer_info", 256)):
                b = arch.read_small(k, small)
                if b is not None:
                    meta[k] = b.decode("utf-8", "replace").strip()
            if pre:
                meta["archive"] = pre.rstrip("/")
            meta["code"] = code
            if extra:
                meta["extra_files"] = extra
            decls = pickles.torchscript_decls(texts)
            return checkpoint_info(
                self.path,
                self.format,
                root,
                globals_,
                warnings,
                arch.blob,
                arch.big_endian,
                meta,
                raw_names=self.raw_names,
                torchscript=None if self.raw_names else decls,
            )
        finally:
            self._archive_close = arch.close


def _tensors_in(obj: Any, depth: int = 0):
    if depth > 50:
        return
    if isinstance(obj, pickles.TENSORISH):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)


def _other_pickle_globals(arch: TorchArchive) -> tuple[list[str], list[str]]:
    """Globals of the archive's other pickles (debug info, traced inputs, *.pkl extra files),
    by the semantics-free scan: `scan` reports them, nothing here keeps their contents."""
    found: list[str] = []
    errors: list[str] = []
    for name, zi in arch.members.items():
        rel = name[len(arch.prefix) :] if name.startswith(arch.prefix) else name
        if rel in ("data.pkl", "constants.pkl") or not rel.endswith(("pkl", ".pickle")):
            continue
        if zi.file_size > MAX_PICKLE_IN_MEMORY:
            errors.append(f"{rel}: not scanned (too large)")
            continue
        try:
            if zi.compress_type == zipfile.ZIP_STORED:
                start = arch.payload_offset(zi)
                g, err = pickles.scan_globals(arch._f, start, start + zi.file_size, arch.label)
            else:  # torch deflates the *.debug_pkl members
                raw = arch._member_bytes(zi)
                g, err = pickles.scan_globals(io.BytesIO(raw), 0, len(raw), arch.label)
        except CorruptFile as e:
            errors.append(f"{rel}: {e.message}")
            continue
        found += g
        if err:
            errors.append(f"{rel}: {err}")
    return found, errors


# re-exported from their new homes for the importers of before the split (ops/scan.py, tests)
__all__ = [
    "TorchZipReader",
    "TorchScriptReader",
    "TorchArchive",
    "PickleBasedReader",
    "TensorLoc",
    "FileBlob",
    "BytesBlob",
    "iter_view",
    "fill",
    "boxes",
    "c_contiguous",
    "scan_zip_pickles",
    "Path",
    "_LOCAL",
    "_Window",
]
