"""Enrichment: the step, epoch and metrics of one checkpoint from its trainer state, its reader's
metadata (headers and pickles) and Lightning callbacks; framework layouts plug in here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from ckptctl.errors import CkptError
from ckptctl.model import CheckpointInfo
from ckptctl.ops.runs import tf as runs_tf
from ckptctl.ops.runs.model import RunCheckpoint
from ckptctl.ops.runs.names import AUX_NAMES, EPOCH_KEYS, FILE_SUFFIXES, STEP_KEYS, parse_name, untmp
from ckptctl.ops.runs.walk import _read_json


def _enrich(c: RunCheckpoint, read_info: bool) -> None:
    if c.layout in runs_tf.LAYOUTS:
        runs_tf.enrich(c, read_info)
        return
    step, epoch, metrics = parse_name(untmp(c.path.name) if c.incomplete else c.path.name)
    c.metrics.update(metrics)
    if step is not None:
        c.step, c.step_source = step, "name"
    if epoch is not None:
        c.epoch = epoch
    if c.layout == "orbax":
        from ckptctl.ops.runs.orbax import enrich as enrich_orbax

        enrich_orbax(c, read_info)
        return
    if c.layout == "hf-trainer":
        _trainer_state(c)
    if not read_info:
        return
    if c.error is not None and not c.files:
        return
    _read_info(c)


def _trainer_state(c: RunCheckpoint) -> None:
    doc = _read_json(c.path / "trainer_state.json")
    if not isinstance(doc, dict):
        if (c.path / "trainer_state.json").exists() and c.error is None:
            c.error = "trainer_state.json is not valid JSON"
        return
    gs = doc.get("global_step")
    if isinstance(gs, int) and not isinstance(gs, bool):
        c.step, c.step_source = gs, "trainer_state"
    ep = doc.get("epoch")
    if isinstance(ep, (int, float)) and not isinstance(ep, bool):
        c.epoch = int(ep) if float(ep).is_integer() else c.epoch
        c.metrics.setdefault("epoch", float(ep))
    for entry in doc.get("log_history") or []:
        if not isinstance(entry, dict) or entry.get("step") != c.step:
            continue
        for k, v in entry.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            f = _as_float(v)  # an int too big for a float is not a metric (float() would raise)
            if f is not None:
                c.metrics[k] = f
    best = doc.get("best_model_checkpoint")
    if isinstance(best, str) and best:
        ref: dict[str, Any] = {"source": "trainer_state best_model_checkpoint", "path": best}
        if isinstance(doc.get("best_metric"), (int, float)):
            ref["score"] = float(doc["best_metric"])
        c.best_ref = ref


def _read_info(c: RunCheckpoint) -> None:
    from ckptctl import formats

    try:
        try:
            fmt, target = formats.resolve(c.path)
        except CkptError:
            alt = primary_file(c) if c.path.is_dir() and c.layout in ("folder", "deepspeed", "hf-trainer") else None
            if alt is None:
                raise
            fmt, target = formats.resolve(alt)
        c.format = fmt
        module, cls = formats.READERS[fmt]
        reader = getattr(importlib.import_module(module), cls)(target)
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
    cands = [f for f in c.files if f.name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(f.name)
             and not f.is_symlink()]
    if not cands:
        return None
    model = [f for f in cands if "model" in f.name]
    pool = model or cands
    return max(pool, key=lambda f: (f.stat().st_size, f.name))


def _from_info(c: RunCheckpoint, reader, info: CheckpointInfo) -> None:
    """Step, epoch and metrics from what the reader found (file metadata, Lightning callbacks)."""
    meta = _flatten(info.metadata)
    if c.layout == "file" and info.kind:
        c.layout = "lightning" if info.kind == "lightning" else c.layout
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
    _lightning_callbacks(c, reader, info, meta)


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


_CB = re.compile(r"^callbacks/(?P<cb>ModelCheckpoint.*?)/(?P<field>monitor|best_model_score|best_model_path|current_score)$")


def _lightning_callbacks(c: RunCheckpoint, reader, info: CheckpointInfo, meta: dict[str, Any]) -> None:
    found: dict[str, dict[str, Any]] = {}
    for k, v in meta.items():
        m = _CB.match(k)
        if m:
            found.setdefault(m.group("cb"), {})[m.group("field")] = v
    for t in info.tensors:
        m = _CB.match(t.name)
        if m and m.group("field") == "current_score" and t.numel == 1 and t.nbytes <= 16:  # the one read
            try:
                arr = reader.read(t.name)
                found.setdefault(m.group("cb"), {})[m.group("field")] = float(arr.reshape(-1)[0])
            except Exception:  # noqa: BLE001 - a score we cannot read is just not shown
                continue
    for cb, d in found.items():
        monitor = d.get("monitor")
        if not isinstance(monitor, str):
            mm = re.search(r"'monitor':\s*'([^']+)'", cb)
            monitor = mm.group(1) if mm else None
        if not monitor:
            continue
        cur = _as_float(d.get("current_score"))
        if cur is not None:
            c.metrics[monitor] = cur
        best_path = d.get("best_model_path")
        if isinstance(best_path, str) and best_path:
            ref: dict[str, Any] = {"source": f"Lightning ModelCheckpoint best_model_path ({monitor})",
                                   "path": best_path, "monitor": monitor}
            score = _as_float(d.get("best_model_score"))
            if score is not None:
                ref["score"] = score
            mode = re.search(r"'mode':\s*'(min|max)'", cb)
            if mode:
                ref["mode"] = mode.group(1)
            c.best_ref = ref


def _flatten(d: Any, prefix: str = "", out: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(d, dict) and depth < 6:
        for k, v in d.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, (dict, list)) and depth < 5:
                _flatten(v, key, out, depth + 1)
            out[key] = v
    elif isinstance(d, list) and depth < 6:
        for i, v in enumerate(d[:64]):
            key = f"{prefix}/{i}"
            if isinstance(v, (dict, list)):
                _flatten(v, key, out, depth + 1)
            out[key] = v
    return out


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        return int(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return _as_int(v.item())
        except Exception:  # noqa: BLE001
            return None
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return None
    if isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", s, re.I):
            return float(s)
        return None
    if hasattr(v, "item") and not isinstance(v, bytes):
        try:
            return _as_float(v.item())
        except Exception:  # noqa: BLE001
            return None
    return None
