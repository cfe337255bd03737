"""convert: any checkpoint -> safetensors / PyTorch zip / HDF5, streaming and exact. Pure: no printing.

Two steps, so the CLI can report what will happen before the bytes move:
`plan_convert(...)` opens the source, selects and renames tensors, checks every tensor against
the target format and refuses (one CkptError) before anything is written; `run_convert(plan)`
streams each tensor through a writer (zero copy via `byte_range` when no cast is needed),
commits atomically (files: temp + rename; shard folders: temp folder + rename) and verifies by
re-reading the output and comparing every tensor's bytes with the source (cast again when
--dtype was given).

This module holds the plan and the public entry points; the rest lives beside it:
convert_cast (dtype casts), convert_metadata (which metadata is carried over),
convert_write (staging, writing, committing) and convert_verify (re-reading and comparing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ckptctl import dtypes
from ckptctl.errors import Incompatible, UsageError
from ckptctl.formats import open_reader, resolve
from ckptctl.formats.base import Reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.ops.convert_cast import (  # noqa: F401  (re-exported: average, the CLI and tests use them here)
    BF16_BLOCK,
    BF16_FROM,
    CAST_DTYPES,
    CAST_SHORT,
    aligned_chunks,
    cast_array,
    cast_chunks,
    cast_target,
    castable,
    f32_to_bf16_bits,
)
from ckptctl.ops.convert_metadata import (  # noqa: F401  (re-exported)
    CONTAINER_KEYS,
    MAX_META_VALUE,
    METADATA_MODES,
    REDACTED,
    carry_metadata,
    redact_paths,
)
from ckptctl.ops.convert_verify import (  # noqa: F401  (re-exported)
    MAP_WINDOW,
    VERIFY_BUF,
    VERIFY_PIECE,
    VERIFY_WORKERS,
    compare_mapped,
    same_bytes,
    verify_output,
)
from ckptctl.ops.convert_write import (  # noqa: F401  (re-exported)
    CAST_CHUNK,
    CHUNK,
    ConvertResult,
    Staged,
    commit_output,
    write_output,
)
from ckptctl.ops.inspect import dangerous_globals
from ckptctl.ops.select import Selection, select
from ckptctl.sources import RemotePath, as_path, check_writable_target, is_remote

# --to spellings -> writer format
TARGETS = {
    "safetensors": "safetensors",
    "st": "safetensors",
    "pt": "torch-zip",
    "pth": "torch-zip",
    "torch": "torch-zip",
    "pytorch": "torch-zip",
    "bin": "torch-zip",
    "torch-zip": "torch-zip",
    "ckpt": "torch-zip",
    "h5": "hdf5",
    "hdf5": "hdf5",
    "keras": "hdf5",
}
SUFFIXES = {
    ".safetensors": "safetensors",
    ".pt": "torch-zip",
    ".pth": "torch-zip",
    ".bin": "torch-zip",
    ".ckpt": "torch-zip",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}
# HF names for sharded output: (single file, shard stem, shard suffix)
SHARD_NAMES = {
    "safetensors": ("model.safetensors", "model", ".safetensors"),
    "torch-zip": ("pytorch_model.bin", "pytorch_model", ".bin"),
    "hdf5": ("tf_model.h5", "tf_model", ".h5"),
}


# ---- target -----------------------------------------------------------------------------------
def target_format(dst: Path | RemotePath, to: str | None, sharded: bool) -> str:
    if to:
        fmt = TARGETS.get(to.lower())
        if fmt is None:
            raise UsageError(f"unknown target {to!r}: use safetensors, pt or h5")
        return fmt
    fmt = SUFFIXES.get(dst.suffix.lower())
    if fmt:
        return fmt
    if sharded:
        return "safetensors"
    if dst.is_dir() or str(dst).endswith(os.sep):
        raise UsageError(
            f"{dst} is a folder: give an output file (e.g. {dst / 'model.safetensors'}), "
            "or --max-shard-size to write shards into it"
        )
    what = f"unknown suffix {dst.suffix!r}" if dst.suffix else "no suffix"
    raise UsageError(f"{dst}: {what}; use .safetensors, .pt/.pth/.bin/.ckpt or .h5/.hdf5, or --to")


def check_target(fmt: str, tensors: list[TensorInfo]) -> None:
    """Raise Incompatible naming the first tensor the target format cannot hold."""
    if fmt == "safetensors":
        from ckptctl.formats.write_safetensors import check_utf8_names, st_code

        for t in tensors:
            st_code(t)
        check_utf8_names(t.name for t in tensors)
    elif fmt == "torch-zip":
        from ckptctl.formats.write_torch import torch_dtype_ok

        for t in tensors:
            torch_dtype_ok(t)
    elif fmt == "hdf5":
        from ckptctl.formats.write_hdf5 import check_paths, storage_dtype
        from ckptctl.formats.write_safetensors import check_utf8_names

        for t in tensors:
            storage_dtype(t)
        check_paths([t.name for t in tensors])
        check_utf8_names((t.name for t in tensors), "an HDF5 file written through h5py")


def refuse_gguf_quantized(tensors: list[TensorInfo]) -> None:
    """GGUF block-quantized tensors (gguf:Q4_K, ...) have no dtype in the target formats and
    ckptctl does not dequantize them: name them all, once, and say how to leave them out."""
    q = [t for t in tensors if dtypes.is_gguf_quant(t.dtype)]
    if not q:
        return
    from collections import Counter

    kinds = ", ".join(f"{d.removeprefix('gguf:')} ×{n}" for d, n in Counter(t.dtype for t in q).most_common())
    names = ", ".join(repr(t.name) for t in q[:3]) + (f" and {len(q) - 3} more" if len(q) > 3 else "")
    it = "it" if len(q) == 1 else "them"
    raise Incompatible(
        f"{len(q)} tensor{'s are' if len(q) > 1 else ' is'} GGUF-quantized ({kinds}), which ckptctl "
        f"does not dequantize: {names}; leave {it} out with --exclude (e.g. --exclude {q[0].name!r})"
    )


# ---- shards -----------------------------------------------------------------------------------
def plan_shards(sizes: list[int], max_size: int) -> list[list[int]]:
    """Indexes of items per shard, in order: a new shard starts when the next item would pass
    max_size (an item larger than max_size gets a shard of its own). Like transformers."""
    shards: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, s in enumerate(sizes):
        if cur and total + s > max_size:
            shards.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += s
    if cur or not shards:
        shards.append(cur)
    return shards


def shard_file_names(fmt: str, n: int) -> tuple[list[str], str | None]:
    single, stem, suffix = SHARD_NAMES[fmt]
    if n == 1:
        return [single], None
    return [f"{stem}-{i:05d}-of-{n:05d}{suffix}" for i in range(1, n + 1)], single + ".index.json"


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class OutputFile:
    path: Path | RemotePath  # final path (inside the temp folder while writing shards)
    tensors: list[TensorInfo]  # output infos (dtype after cast), in write order
    metadata: dict[str, str]


@dataclass
class ConvertPlan:
    src: Path | RemotePath
    dst: Path | RemotePath
    fmt: str
    reader: Reader
    info: CheckpointInfo
    selection: Selection
    out_dtype: dict[str, str]  # output name -> dtype written
    files: list[OutputFile]
    index_name: str | None
    sharded: bool
    dedupe_tied: bool
    verify: bool
    force: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dangerous: list[str] = field(default_factory=list)
    cast_to: str | None = None
    # output name -> (length, CRC-32C) of each piece handed to the writer, for cast tensors and
    # for every tensor of a remote source (verify checks the output against them)
    cast_crcs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors if t.alias_of is None)

    @property
    def num_tensors(self) -> int:
        return len(self.selection.pairs)

    def close(self) -> None:
        self.reader.close()


def _same_file(a: Path | RemotePath, b: Path | RemotePath) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_destination(
    src: Path | RemotePath, src_files: list[Path | RemotePath], dst: Path | RemotePath, sharded: bool, force: bool
) -> None:
    if is_remote(dst):
        return _check_remote_destination(src, src_files, dst, sharded, force)
    if not dst.parent.is_dir():
        raise Incompatible(f"folder {dst.parent} does not exist", dst)
    src_abs = src.resolve()
    dst_abs = dst.resolve()
    for f in [src, *src_files]:
        if _same_file(f, dst) or f.resolve() == dst_abs:
            raise UsageError(f"{dst} is the source; write the output elsewhere")
    if src_abs == dst_abs or (sharded or dst.is_dir()) and dst_abs in src_abs.parents:
        raise UsageError(f"{dst} holds the source; write the output elsewhere")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise Incompatible("already exists (--force to overwrite)", dst)
        if dst.is_dir() and not sharded:
            raise Incompatible("is a folder; --force replaces files only (or use --max-shard-size)", dst)


def _check_remote_destination(src, src_files, dst, sharded: bool, force: bool) -> None:
    """The checks above for a URL: the bucket exists, DST is not the source, --force to replace."""
    from ckptctl.sources import check_bucket

    check_bucket(dst)
    srcs = [as_path(f) for f in [src, *src_files]]
    if dst in srcs or (sharded and any(dst in getattr(f, "parents", []) for f in srcs)):
        raise UsageError(f"{dst} is the source; write the output elsewhere")
    if sharded:
        if dst.is_file():
            raise Incompatible("is an object; --max-shard-size writes a folder (prefix)", dst)
        if dst.is_dir() and not force:
            raise Incompatible("already exists (--force to overwrite)", dst)
    else:
        if dst.is_dir():
            raise Incompatible("is a folder; --force replaces files only (or use --max-shard-size)", dst)
        if dst.is_file() and not force:
            raise Incompatible("already exists (--force to overwrite)", dst)


def plan_convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    key: str | None = None,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    strip_prefix: list[str] | None = None,
    add_prefix: str | None = None,
    rename: list[str] | None = None,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    dedupe_tied: bool = False,
    verify: bool = True,
    force: bool = False,
    metadata: str = "keep",
) -> ConvertPlan:
    check_writable_target(dst)
    src, dst = as_path(src), as_path(dst) if is_remote(dst) else Path(dst)
    sharded = max_shard_size is not None
    if max_shard_size is not None and max_shard_size <= 0:  # sharded
        raise UsageError("--max-shard-size must be positive")
    fmt = target_format(dst, to, sharded)
    cast_to = cast_target(dtype) if dtype else None
    reader = open_reader(src)
    try:
        info = reader.info()
        _fmt, opened = resolve(src)
        src_files = [as_path(f) for f in info.files] + [opened]
        _check_destination(src, src_files, dst, sharded, force)
        if not info.tensors:
            danger = dangerous_globals(info)
            why = (
                f"; it is a pickle that asks for {', '.join(danger[:3])}, which runs code when loaded: do not load it"
                if danger
                else ""
            )
            raise Incompatible(f"no tensors in this checkpoint, nothing to convert{why}", src)
        sel = select(
            info.tensors,
            key=key,
            all_=all_,
            include=include,
            exclude=exclude,
            strip_prefix=strip_prefix,
            add_prefix=add_prefix,
            rename=rename,
        )
        notes = list(sel.notes)
        warnings = list(info.warnings)
        scope = [
            o
            for o in info.objects
            if not sel.root or o.name == sel.root or o.name.startswith(sel.root.rstrip("/") + "/")
        ]
        if scope:
            shown = ", ".join(f"{o.name or '/'} ({o.type})" for o in scope[:3])
            more = f" and {len(scope) - 3} more" if len(scope) > 3 else ""
            notes.append(f"{len(scope)} non-tensor object(s) not written: {shown}{more}")
        if not sel.training_default and not key and not all_:
            tops = top_level_only(info.tensors)
            if tops:
                notes.append(f"every tensor is under {tops}/: --key {tops} writes them without that prefix")
        out_dtype: dict[str, str] = {}
        kept: list[str] = []
        outs: list[TensorInfo] = []
        for _s, o in sel.pairs:
            d = o.dtype
            if cast_to and dtypes.BY_NAME.get(o.dtype) is not None and dtypes.BY_NAME[o.dtype].is_floating:
                if castable(o.dtype):
                    d = cast_to
                elif o.dtype not in kept:
                    kept.append(o.dtype)
            out_dtype[o.name] = d
            outs.append(o if d == o.dtype else replace(o, dtype=d, nbytes=dtypes.nbytes(d, o.shape)))
        if kept:
            notes.append(f"--dtype {cast_to}: tensors of dtype {', '.join(kept)} are not cast (scale/packed formats)")
        refuse_gguf_quantized(outs)
        check_target(fmt, outs)
        meta = carry_metadata(info.metadata, notes, metadata)
        if fmt == "torch-zip":
            lost = [k for k in meta if k != "format"]
            if lost:
                notes.append(
                    f"metadata not kept (a PyTorch state dict has no place for it): {', '.join(lost[:6])}"
                    + (" ..." if len(lost) > 6 else "")
                )
        files, index_name = _layout(fmt, dst, outs, meta, max_shard_size, dedupe_tied)
        if index_name:
            from ckptctl.formats.write_safetensors import check_utf8_names

            check_utf8_names((t.name for t in outs), f"the shard index {index_name} (UTF-8 JSON)")
        return ConvertPlan(
            src=src,
            dst=dst,
            fmt=fmt,
            reader=reader,
            info=info,
            selection=sel,
            out_dtype=out_dtype,
            files=files,
            index_name=index_name,
            sharded=sharded,
            dedupe_tied=dedupe_tied,
            verify=verify,
            force=force,
            notes=notes,
            warnings=warnings,
            dangerous=dangerous_globals(info),
            cast_to=cast_to,
        )
    except BaseException:
        reader.close()
        raise


def top_level_only(tensors: list[TensorInfo]) -> str | None:
    """The one '/'-part every tensor name starts with, if there is one (e.g. model_state_dict)."""
    tops = {t.name.split("/", 1)[0] if "/" in t.name else None for t in tensors}
    if len(tops) == 1:
        (top,) = tops
        return top
    return None


def _layout(
    fmt: str,
    dst: Path | RemotePath,
    outs: list[TensorInfo],
    metadata: dict[str, str],
    max_shard_size: int | None,
    dedupe_tied: bool,
) -> tuple[list[OutputFile], str | None]:
    if max_shard_size is None:
        return [OutputFile(dst, outs, metadata)], None
    # tie groups stay in one shard; a group costs what the writer stores for it
    groups: dict[str, list[TensorInfo]] = {}
    for t in outs:
        groups.setdefault(t.alias_of or t.name, []).append(t)
    dup = fmt == "safetensors" and not dedupe_tied
    order = list(groups.values())
    sizes = [sum(t.nbytes for t in g) if dup else g[0].nbytes for g in order]
    shards = plan_shards(sizes, max_shard_size)
    names, index_name = shard_file_names(fmt, len(shards))
    files = []
    for name, idx in zip(names, shards):
        members = [t for i in idx for t in order[i]]
        files.append(OutputFile(dst / name, members, metadata))
    return files, index_name


# ---- running ----------------------------------------------------------------------------------
def run_convert(
    plan: ConvertPlan,
    progress: Callable[[int], None] | None = None,
    verify_progress: Callable[[int], None] | None = None,
) -> ConvertResult:
    """Write the output beside DST, verify it (unless plan.verify is False), then move it in."""
    staged = write_output(plan, progress)
    try:
        verified = verify_output(plan, staged.out, verify_progress) if plan.verify else None
        return commit_output(plan, staged, verified)
    finally:
        staged.discard()
