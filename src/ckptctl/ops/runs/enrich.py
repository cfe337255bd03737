"""Enrichment: the step, epoch and metrics of one checkpoint from its trainer state, its reader's
metadata (headers and pickles) and Lightning callbacks; framework layouts plug in here (through
registry.py: discovery dispatches each checkpoint to its layout's `enrich`)."""

from __future__ import annotations

import re
from pathlib import Path

from ckptctl.errors import CkptError
from ckptctl.model import CheckpointInfo
from ckptctl.ops.runs.model import RunCheckpoint
from ckptctl.ops.runs.names import AUX_NAMES, EPOCH_KEYS, FILE_SUFFIXES, STEP_KEYS, parse_name, untmp
from ckptctl.ops.runs.registry import LAYOUTS, picks_model_file
from ckptctl.ops.runs.values import _as_float, _as_int, _flatten


def name_fields(c: RunCheckpoint) -> None:
    """Step, epoch and metrics from the checkpoint's name (a temporary one as it will be named)."""
    step, epoch, metrics = parse_name(untmp(c.path.name) if c.incomplete else c.path.name)
    c.metrics.update(metrics)
    if step is not None:
        c.step, c.step_source = step, "name"
    if epoch is not None:
        c.epoch = epoch


def default_enrich(c: RunCheckpoint, read_info: bool, layout) -> None:
    """What most layouts do: the name, the layout's side files, then the reader's metadata."""
    name_fields(c)
    layout.side_files(c)
    if not read_info:
        return
    if c.error is not None and not c.files:
        return
    _read_info(c)


def _read_info(c: RunCheckpoint) -> None:
    from ckptctl import formats

    try:
        try:
            fmt, target, opened = formats.resolve_opened(c.path)
        except CkptError:
            alt = primary_file(c) if c.path.is_dir() and picks_model_file(c.layout) else None
            if alt is None:
                raise
            fmt, target, opened = formats.resolve_opened(alt)
        c.format = fmt
        reader = formats.reader_for(fmt, target, opened)  # the zip the sniffer parsed goes to the reader
        with reader:
            info = reader.info()
            c.info = info
            c.format = info.format
            _from_info(c, reader, info)
    except CkptError as e:
        if c.error is None:
            c.error = e.message
    except ModuleNotFoundError as e:
        if c.error is None:
            c.error = f"no reader available ({e.name})"
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, MemoryError) as e:
        if c.error is None:
            c.error = f"unreadable: {type(e).__name__}: {e}".splitlines()[0]


def primary_file(c: RunCheckpoint) -> Path | None:
    """The model file of a multi-file checkpoint folder whose reader cannot pick one itself."""
    cands = [
        f for f in c.files if f.name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(f.name) and not f.is_symlink()
    ]
    if not cands:
        return None
    model = [f for f in cands if "model" in f.name]
    pool = model or cands
    return max(pool, key=lambda f: (f.stat().st_size, f.name))


def _from_info(c: RunCheckpoint, reader, info: CheckpointInfo) -> None:
    """Step, epoch and metrics from what the reader found (file metadata, Lightning callbacks)."""
    meta = _flatten(info.metadata)
    inner_step = None
    for k in STEP_KEYS:
        v = _as_int(meta.get(k))
        if v is not None:
            inner_step = v
            break
    if inner_step is None:  # fairseq keeps num_updates in optimizer_history[-1]
        hist = [(k, v) for k, v in meta.items() if re.match(r"^optimizer_history/\d+/num_updates$", k)]
        if hist:
            inner_step = _as_int(max(hist, key=lambda kv: int(kv[0].split("/")[1]))[1])
    if inner_step is not None and c.step_source != "trainer_state":
        c.step = inner_step
        c.step_source = "global_step" if info.format != "safetensors" else "metadata"
    for k in EPOCH_KEYS:
        v = _as_int(meta.get(k))
        if v is not None:
            c.epoch = v
            break
    # plain numeric metadata: safetensors __metadata__ strings, top-level scalars of a pickle
    # (HDF5 attributes describe the file, not the training: left out)
    if info.format in ("safetensors", "torch-zip", "torch-legacy", "pickle"):
        top = {k: v for k, v in meta.items() if "/" not in k}
        _numeric_into(c, top, "metadata")
    for k in ("extra_state/val_loss", "extra_state/best"):
        f = _as_float(meta.get(k))
        if f is not None:
            c.metrics.setdefault(k.split("/", 1)[1] if k.endswith("val_loss") else "best_val_loss", f)
    for lay in LAYOUTS:  # what each framework stores inside a file (Lightning callbacks, ...)
        lay.from_info(c, reader, info, meta)


def _numeric_into(c: RunCheckpoint, d: dict, source: str) -> None:
    skip = set(STEP_KEYS) | set(EPOCH_KEYS) | {"format", "total_size"}
    for k, v in d.items():
        key = str(k)
        if key in skip or key.startswith(".") or "version" in key.lower() or "seed" in key.lower():
            if key in STEP_KEYS and c.step_source in ("none", "name"):
                iv = _as_int(v)
                if iv is not None:
                    c.step, c.step_source = iv, source
            if key in EPOCH_KEYS:
                iv = _as_int(v)
                if iv is not None:
                    c.epoch = iv
            continue
        f = _as_float(v)
        if f is not None:
            c.metrics[key] = f
