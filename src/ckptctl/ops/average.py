"""average: the uniform, weighted or EMA mean of several checkpoints, streamed. Pure: no printing.

`plan_average(...)` resolves the inputs (files, or a run folder with a selection), selects the
same tensors in each (the model weights of a training checkpoint by default, `--key` as in
convert), checks that every input has the same names, shapes and dtypes (`PreflightError`
lists every mismatch; nothing is written) and plans the output. `run_average(plan)` walks the
tensors one at a time and, inside a tensor, one chunk at a time across all inputs, into a
float64 (or float32) accumulator, casts to the output dtype and streams the result to a writer
that commits atomically. Integer and bool tensors (step counters, masks, num_batches_tracked)
are copied from the last input, not averaged.

Arithmetic, in input order (step order for a run folder, and for files whose steps are known):
  mean      acc = x_0 + x_1 + ... + x_{n-1};          out = acc / n
  weighted  acc = w_0*x_0 + ... + w_{n-1}*x_{n-1};    out = acc / (w_0 + ... + w_{n-1})
  ema       acc = x_0; acc = decay*acc + (1-decay)*x_i for i = 1..n-1;  out = acc
then one cast to the output dtype (the same cast as `convert --dtype`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ckptctl import dtypes
from ckptctl.errors import CkptError, Incompatible, UsageError
from ckptctl.model import TensorInfo
from ckptctl.ops.average_combine import MeanItems, mean_chunks
from ckptctl.ops.diff import open_checkpoint
from ckptctl.ops.stream import numeric_kind

if TYPE_CHECKING:
    from ckptctl.formats.base import Reader
    from ckptctl.sources import RemotePath

META_PREFIX = "averaged."  # provenance keys in the output's file metadata


class PreflightError(Incompatible):
    """The inputs do not line up; `problems` says how, one line each."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


@dataclass
class AvgInput:
    path: Path | RemotePath
    step: int | None
    label: str  # how provenance names it
    reader: Reader | None = None
    sel: dict[str, TensorInfo] = field(default_factory=dict)  # output name -> source tensor
    out: dict[str, TensorInfo] = field(default_factory=dict)  # output name -> renamed TensorInfo

    @property
    def opened(self) -> Reader:
        """The reader, which plan_average opens before anything reads the input."""
        if self.reader is None:
            raise RuntimeError(f"{self.path}: read before it was opened")
        return self.reader


@dataclass
class AvgTensor:
    out: TensorInfo
    mode: str  # mean | copy | alias
    srcs: list[TensorInfo]


@dataclass
class AveragePlan:
    inputs: list[AvgInput]
    method: str  # mean | weighted | ema
    weights: list[float]  # effective weight of each input in the result (sums to 1)
    raw_weights: list[float] | None
    decay: float | None
    accumulate: str  # float64 | float32
    dtype: str | None
    dst: Path | RemotePath
    fmt: str
    tensors: list[AvgTensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    root: str = ""
    _buffers: dict = field(default_factory=dict, repr=False)

    @property
    def averaged(self) -> list[AvgTensor]:
        return [t for t in self.tensors if t.mode == "mean"]

    @property
    def copied(self) -> list[AvgTensor]:
        return [t for t in self.tensors if t.mode == "copy"]

    @property
    def read_bytes(self) -> int:
        return sum(sum(s.nbytes for s in t.srcs) for t in self.averaged) + sum(t.out.nbytes for t in self.copied)

    def buffer(self, key, size: int) -> bytearray:
        """A scratch buffer of at least `size` bytes, kept and reused across tensors."""
        b = self._buffers.get(key)
        if b is None or len(b) < size:
            b = self._buffers[key] = bytearray(size)
        return b

    def free_list(self, key) -> list[bytearray]:
        """A list of spare buffers, kept and reused across tensors."""
        return self._buffers.setdefault(key, [])

    def close(self) -> None:
        self._buffers.clear()
        for i in self.inputs:
            if i.reader is not None:
                i.reader.close()
                i.reader = None

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.dst),
            "format": self.fmt,
            "method": self.method,
            "decay": self.decay,
            "accumulate": self.accumulate,
            "dtype": self.dtype,
            "root": self.root,
            "inputs": [{"path": str(i.path), "step": i.step, "weight": w} for i, w in zip(self.inputs, self.weights)],
            "num_tensors": len(self.tensors),
            "num_averaged": len(self.averaged),
            "copied_from_last": [t.out.name for t in self.copied],
            "tied": [t.out.name for t in self.tensors if t.mode == "alias"],
            "output_bytes": sum(t.out.nbytes for t in self.tensors if t.out.alias_of is None),
            "notes": self.notes,
        }


# ---- inputs ---------------------------------------------------------------------------------------
def parse_steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected step numbers separated by commas, e.g. 1000,2000,3000") from None


def parse_weights(text: str) -> list[float]:
    try:
        ws = [float(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.2,0.3,0.5") from None
    if not ws or not all(math.isfinite(w) for w in ws):
        raise UsageError(f"--weights {text!r}: expected finite numbers")
    return ws


def resolve_inputs(
    paths: list[Path | RemotePath],
    *,
    last: int | None = None,
    steps: list[int] | None = None,
    best_n: int | None = None,
    metric: str | None = None,
    maximize: bool = False,
) -> tuple[list[AvgInput], list[str]]:
    """The checkpoints to average, in step order when a run folder is given."""
    from ckptctl.ops.runs import discover, is_run_dir, scan_run

    notes: list[str] = []
    selecting = last is not None or steps is not None or best_n is not None
    if len(paths) == 1 and is_run_dir(paths[0]):
        run = paths[0]
        cks = discover(run)
        usable = [c for c in cks if c.step is not None and c.error is None and not c.incomplete]
        skipped = [c for c in cks if c not in usable]
        if skipped:
            notes.append(
                "skipped (no step, broken or incomplete): "
                + ", ".join(c.path.name for c in skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
            )
        if not usable:
            raise UsageError("no checkpoint with a step in this run folder", run)
        chosen = usable
        if steps is not None:
            by = {c.step: c for c in usable}
            missing = [s for s in steps if s not in by]
            if missing:
                have = ", ".join(str(c.step) for c in usable[:20])
                raise UsageError(f"--steps: no checkpoint for step {', '.join(map(str, missing))} (steps: {have})", run)
            chosen = [by[s] for s in sorted(set(steps))]
        if best_n is not None:
            pool = chosen
            names = sorted({k for c in pool for k in c.metrics})
            if metric is None:
                if len(names) != 1:
                    raise UsageError(
                        "--best-n needs --metric NAME"
                        + (f" (metrics here: {', '.join(names)})" if names else "; no checkpoint here records a metric")
                    )
                metric = names[0]
            scored = [c for c in pool if metric in c.metrics and math.isfinite(c.metrics[metric])]
            if not scored:
                raise UsageError(
                    f"--metric {metric}: no checkpoint records it"
                    + (f" (metrics here: {', '.join(names)})" if names else ""),
                    run,
                )
            scored.sort(key=lambda c: (-c.metrics[metric] if maximize else c.metrics[metric], c.step))
            chosen = sorted(scored[:best_n], key=lambda c: cast(int, c.step))  # usable: a step each
            notes.append(
                f"best {len(chosen)} by {metric} ({'highest' if maximize else 'lowest'}): "
                + ", ".join(f"step {c.step} ({c.metrics[metric]:g})" for c in chosen)
            )
        if last is not None:
            chosen = chosen[-last:] if last > 0 else []
        return [AvgInput(c.path, c.step, str(c.path)) for c in chosen], notes
    if selecting:
        raise UsageError("--last, --steps and --best-n select from one run folder: give the run folder alone")
    out = []
    for p in paths:
        if is_run_dir(p):
            raise UsageError(
                f"{p} is a run folder: give it alone (with --last N, --steps or --best-n) or name its checkpoints"
            )
        step = None
        try:
            found = scan_run(p).checkpoints
            if len(found) == 1:
                step = found[0].step
        except CkptError:
            pass
        out.append(AvgInput(p, step, str(p)))
    return out, notes


# ---- planning ---------------------------------------------------------------------------------------
def _same_file(a: Path | RemotePath, b: Path | RemotePath) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_destination(dst: Path | RemotePath, inputs: list[AvgInput], force: bool) -> None:
    from ckptctl.sources import as_path, check_bucket, is_remote

    if is_remote(dst):  # the same checks for a URL (the writer uploads it whole or not at all)
        check_bucket(dst)
        for i in inputs:
            named = [i.path] + ([f for f in i.reader.info().files] if i.reader is not None else [])
            if any(as_path(f) == dst for f in named):
                raise UsageError(f"{dst} is one of the inputs; write the output elsewhere")
        if dst.is_dir():
            raise UsageError(f"{dst} is a folder: give an output file such as {dst / 'averaged.safetensors'}")
        if dst.is_file() and not force:
            raise Incompatible("already exists (--force to overwrite)", dst)
        return
    for i in inputs:
        files = [i.path]
        if i.reader is not None:
            files += [Path(f) for f in i.reader.info().files]
        if any(_same_file(f, dst) for f in files) or dst.resolve() == i.path.resolve():
            raise UsageError(f"{dst} is one of the inputs; write the output elsewhere")
    if dst.is_dir():
        raise UsageError(f"{dst} is a folder: give an output file such as {dst / 'averaged.safetensors'}")
    if not dst.parent.is_dir():
        raise Incompatible(f"folder {dst.parent} does not exist", dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise Incompatible("already exists (--force to overwrite)", dst)


def plan_average(
    paths: Sequence[str | os.PathLike],
    dst: str | os.PathLike,
    *,
    weights: list[float] | None = None,
    ema: float | None = None,
    last: int | None = None,
    steps: list[int] | None = None,
    best_n: int | None = None,
    metric: str | None = None,
    maximize: bool = False,
    key: str | None = None,
    all_: bool = False,
    strip_prefix: list[str] | None = None,
    dtype: str | None = None,
    accumulate: str = "float64",
    to: str | None = None,
    force: bool = False,
) -> AveragePlan:
    from ckptctl.ops.convert import cast_target, check_target, target_format
    from ckptctl.ops.select import select

    if weights is not None and ema is not None:
        raise UsageError("--weights and --ema do not go together")
    if ema is not None and not 0.0 < ema < 1.0:
        raise UsageError(f"--ema {ema}: the decay must lie strictly between 0 and 1 (e.g. 0.999)")
    acc = {"fp64": "float64", "float64": "float64", "fp32": "float32", "float32": "float32"}.get(accumulate)
    if acc is None:
        raise UsageError(f"--accumulate {accumulate!r}: use fp64 or fp32")
    out_dtype = cast_target(dtype) if dtype else None
    from ckptctl.sources import as_path, check_writable_target, is_remote

    check_writable_target(dst)
    dst = as_path(dst) if is_remote(dst) else Path(dst)
    fmt = target_format(dst, to, False)
    inputs, notes = resolve_inputs(
        [as_path(p) if is_remote(p) else Path(p) for p in paths],
        last=last,
        steps=steps,
        best_n=best_n,
        metric=metric,
        maximize=maximize,
    )
    if len(inputs) < 2:
        raise UsageError(f"need at least two checkpoints to average, got {len(inputs)}")
    if weights is not None and len(weights) != len(inputs):
        raise UsageError(f"--weights has {len(weights)} values for {len(inputs)} checkpoints")
    # step order: a run folder is already in it; files are put in it when every step is known
    raw = list(weights) if weights is not None else None
    known = [i.step for i in inputs if i.step is not None]
    if len(known) == len(inputs) and known != sorted(known):
        order = sorted(range(len(inputs)), key=lambda k: known[k])
        inputs = [inputs[k] for k in order]
        if raw is not None:
            raw = [raw[k] for k in order]
        notes.append(
            "inputs taken in step order: "
            + ", ".join(str(i.step) for i in inputs)
            + (" (each weight stays with its checkpoint)" if raw is not None else "")
        )
    elif ema is not None and not all(i.step is not None for i in inputs):
        notes.append("EMA in the order given (not every step is known): oldest first")
    plan = AveragePlan(
        inputs=inputs,
        method="ema" if ema is not None else ("weighted" if raw else "mean"),
        weights=[],
        raw_weights=raw,
        decay=ema,
        accumulate=acc,
        dtype=out_dtype,
        dst=dst,
        fmt=fmt,
        notes=notes,
    )
    try:
        sels = []
        for i in inputs:
            i.reader = open_checkpoint(i.path)
            info = i.reader.info()
            try:
                s = select(info.tensors, key=key, all_=all_, strip_prefix=strip_prefix)
            except CkptError as e:
                raise type(e)(e.message, i.path) from None
            sels.append(s)
            i.sel = {o.name: src for src, o in s.pairs}
            i.out = {o.name: o for _src, o in s.pairs}
        plan.root = sels[0].root
        if sels[0].training_default:
            outside = sels[0].outside_root
            plan.notes.append(
                "training checkpoints: averaging the model weights"
                + (f" under {plan.root}/" if plan.root else "")
                + (f" ({outside} other tensors left out; --all keeps them)" if outside else "")
            )
        _preflight(inputs)
        plan.weights = _effective_weights(len(inputs), raw, ema)
        plan.tensors = _plan_tensors(inputs, out_dtype, acc)
        check_target(fmt, [t.out for t in plan.tensors])
        _check_destination(dst, inputs, force)
        plan.metadata = _provenance(plan)
        if fmt == "torch-zip":
            plan.notes.append(
                "a PyTorch zip has no file metadata: provenance is not recorded in the output "
                "(write .safetensors or .h5 to keep it)"
            )
        return plan
    except BaseException:
        plan.close()
        raise


def _preflight(inputs: list[AvgInput]) -> None:
    ref = inputs[0]
    problems: list[str] = []
    for i in inputs[1:]:
        missing = [n for n in ref.sel if n not in i.sel]
        extra = [n for n in i.sel if n not in ref.sel]
        for n in missing:
            problems.append(f"{n}: missing in {i.label}")
        for n in extra:
            problems.append(f"{n}: only in {i.label} (not in {ref.label})")
        for n, t in ref.sel.items():
            u = i.sel.get(n)
            if u is None:
                continue
            if tuple(u.shape) != tuple(t.shape):
                problems.append(f"{n}: shape {list(t.shape)} in {ref.label} but {list(u.shape)} in {i.label}")
            elif u.dtype != t.dtype:
                problems.append(f"{n}: dtype {t.dtype} in {ref.label} but {u.dtype} in {i.label}")
    if problems:
        raise PreflightError(
            f"the inputs do not line up ({len(problems)} mismatch{'es' if len(problems) != 1 else ''}: "
            "same tensor names, shapes and dtypes needed); nothing written",
            problems,
        )


def _effective_weights(n: int, raw: list[float] | None, ema: float | None) -> list[float]:
    if ema is not None:
        return [ema ** (n - 1)] + [(1 - ema) * ema ** (n - 1 - k) for k in range(1, n)]
    if raw is None:
        return [1.0 / n] * n
    total = math.fsum(raw)
    if total == 0:
        raise UsageError("--weights add up to 0: a weighted mean needs a non-zero sum")
    return [w / total for w in raw]


def _plan_tensors(inputs: list[AvgInput], out_dtype: str | None, acc: str) -> list[AvgTensor]:
    from ckptctl.ops.convert import castable

    ref = inputs[0]
    out: list[AvgTensor] = []
    for name, o in ref.out.items():
        srcs = [i.sel[name] for i in inputs]
        alias = o.alias_of
        if alias is not None and not all(i.out[name].alias_of == alias for i in inputs[1:]):
            alias = None  # tied in some inputs only: average it as a tensor of its own
        kind = numeric_kind(o.dtype)
        if kind == "float" or kind == "complex":
            dt = out_dtype if (out_dtype and kind == "float" and castable(o.dtype)) else o.dtype
            mode = "mean"
        else:
            dt = o.dtype
            mode = "copy"
        t = replace(o, dtype=dt, alias_of=alias, loc=None, nbytes=dtypes.nbytes(dt, o.shape))
        out.append(AvgTensor(t, "alias" if alias is not None else mode, srcs))
    return out


def _provenance(plan: AveragePlan) -> dict[str, str]:
    method = plan.method
    if plan.method == "ema":
        method = f"ema decay={plan.decay:g}"
    meta = {
        META_PREFIX + "method": method,
        META_PREFIX + "inputs": json.dumps([i.label for i in plan.inputs], ensure_ascii=False),
        META_PREFIX + "steps": json.dumps([i.step for i in plan.inputs]),
        META_PREFIX + "weights": json.dumps([round(w, 12) for w in plan.weights]),
        META_PREFIX + "accumulate": plan.accumulate,
    }
    if plan.raw_weights is not None:
        meta[META_PREFIX + "raw_weights"] = json.dumps(plan.raw_weights)
    if plan.copied:
        what = "tensor" if len(plan.copied) == 1 else "tensors"
        meta[META_PREFIX + "copied"] = f"{len(plan.copied)} integer/bool {what} copied from {plan.inputs[-1].label}"
    if plan.dtype:
        meta[META_PREFIX + "dtype"] = plan.dtype
    return meta


# ---- running ----------------------------------------------------------------------------------------
@dataclass
class AverageResult:
    dst: Path | RemotePath
    fmt: str
    num_tensors: int
    num_averaged: int
    copied: list[str]
    bytes_written: int


def run_average(plan: AveragePlan, progress: Callable[[int], None] | None = None) -> AverageResult:
    """Stream the average into plan.dst (atomically: nothing there until every byte is written)."""
    from ckptctl.formats import writer_class

    W = writer_class(plan.fmt)
    w = W(plan.dst, [t.out for t in plan.tensors], plan.metadata)
    items: MeanItems | None = None
    try:
        items = MeanItems(plan, progress)
        for t in plan.tensors:
            if t.mode == "alias":
                continue
            if t.mode == "copy":
                _copy_last(w, plan, t, progress)
            else:
                w.add(t.out, items.chunks(t) if items.covers(t) else mean_chunks(plan, t, progress))
        w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        if items is not None:
            items.close()  # (workers finish before the inputs close)
        plan.close()
    return AverageResult(
        plan.dst,
        plan.fmt,
        len(plan.tensors),
        len(plan.averaged),
        [t.out.name for t in plan.copied],
        plan.dst.stat().st_size,
    )


def _copy_last(w, plan: AveragePlan, t: AvgTensor, progress) -> None:
    last = plan.inputs[-1]
    src = t.srcs[-1]
    rng = last.opened.byte_range(src.name)
    if rng is not None and hasattr(w, "add_range") and rng[2] == t.out.nbytes:
        w.add_range(t.out, rng[0], rng[1], rng[2])
        if progress:
            progress(rng[2])
        return

    def chunks():
        for c in last.opened.iter_chunks(src.name):
            if progress:
                progress(len(c))
            yield c

    w.add(t.out, chunks())
