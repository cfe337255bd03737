"""diff --along: one run's checkpoints in step order: update size, weight norm, first NaN/Inf."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptctl.errors import CkptError, UsageError
from ckptctl.model import TensorInfo
from ckptctl.ops.diff import open_checkpoint, pick, resolve_key
from ckptctl.ops.diff_result import json_float
from ckptctl.ops.stream import BLOCK, ChunkSource, as_array, dot, itemsize, numeric_kind

if TYPE_CHECKING:
    from ckptctl.formats.base import Reader


# ---- along one run -----------------------------------------------------------------------------------
@dataclass
class AlongStep:
    """One checkpoint of a run. Norms follow IEEE arithmetic: a NaN in the weights makes the
    weight norm and the updates that involve it NaN, an Inf makes them inf (never 0)."""

    step: int | None
    path: str
    weight_norm: float = 0.0
    update_rel_l2: float | None = None  # ||w_i - w_{i-1}|| / ||w_{i-1}||
    update_norm: float | None = None
    nonfinite: int = 0  # NaN/Inf elements in this checkpoint
    nonfinite_tensors: list[str] = field(default_factory=list)
    top_tensor: str | None = None  # tensor with the largest relative update
    top_rel_l2: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "path": self.path,
            "weight_norm": json_float(self.weight_norm),
            "update_rel_l2": json_float(self.update_rel_l2),
            "update_norm": json_float(self.update_norm),
            "num_nonfinite": self.nonfinite,
            "nonfinite_tensors": self.nonfinite_tensors,
            "top_tensor": self.top_tensor,
            "top_rel_l2": json_float(self.top_rel_l2),
            "error": self.error,
        }


@dataclass
class Along:
    run: str
    steps: list[AlongStep] = field(default_factory=list)
    num_tensors: int = 0
    not_in_all: list[str] = field(default_factory=list)  # tensors some checkpoints lack (skipped)
    skipped: list[str] = field(default_factory=list)  # checkpoints that could not be read
    left_out: int = 0  # tensors a checkpoint left out by the model-weights default (the most of any)
    root: str = ""  # the sub-tree compared ('' for all)

    @property
    def first_nonfinite(self) -> AlongStep | None:
        for s in self.steps:
            if s.nonfinite:
                return s
        return None

    def to_json(self) -> dict[str, Any]:
        f = self.first_nonfinite
        return {
            "run": self.run,
            "num_checkpoints": len(self.steps),
            "num_tensors": self.num_tensors,
            "first_nonfinite_step": f.step if f else None,
            "first_nonfinite_path": f.path if f else None,
            "steps": [s.to_json() for s in self.steps],
            "not_in_all": self.not_in_all,
            "skipped": self.skipped,
            "root": self.root,
            "left_out": self.left_out,
        }


def _rel(d2: float, p2: float) -> float:
    """sqrt(d2) / sqrt(p2): NaN when either is NaN, inf for a change from zero."""
    if math.isnan(d2) or math.isnan(p2):
        return math.nan
    if p2 > 0:
        return math.sqrt(d2) / math.sqrt(p2) if math.isfinite(p2) or math.isfinite(d2) else math.nan
    return 0.0 if d2 == 0 else math.inf


ALONG_BUDGET = 128 * 1024 * 1024  # bytes of raw chunks held at once across all checkpoints
ALONG_CHUNK = 1 << 21  # at most this many elements per chunk (a few float64 copies live at once)


def along_run(
    run_dir: str | os.PathLike,
    *,
    key: str | None = None,
    strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None,
    rename: list[str] | None = None,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    progress_factory: Callable[[int], Any] | None = None,
) -> Along:
    """Walk a run's checkpoints in step order: update size, weight norm, first NaN/Inf.

    Tensors as `pick` chooses them: the model weights of a training checkpoint by default (its
    optimizer state and callbacks never enter the norms or the NaN count), `all_` everything.

    Each file is read once: for each tensor, the same chunk of every checkpoint is read in step
    order and compared with the previous step's chunk (the only one kept, as float64).
    """
    from contextlib import nullcontext

    import numpy as np

    from ckptctl.ops.runs import discover

    cks = discover(run_dir)
    res = Along(str(run_dir))
    readers: list[Reader] = []
    sels: list[dict[str, TensorInfo]] = []
    try:
        for c in cks:
            if c.error and c.info is None:
                res.skipped.append(f"{c.path.name}: {c.error}")
                continue
            try:
                r = open_checkpoint(c.path)
                info = r.info()
            except CkptError as e:
                res.skipped.append(f"{c.path.name}: {e.message}")
                continue
            try:
                side = pick(
                    info, resolve_key(info, key), strip, filters, rename, all_=all_, include=include, exclude=exclude
                )
            except BaseException:
                r.close()
                raise
            readers.append(r)
            sels.append(side.names)
            res.left_out = max(res.left_out, side.left_out)
            res.root = res.root or side.root
            res.steps.append(AlongStep(c.step, str(c.path)))
        if len(readers) < 1:
            raise UsageError("no readable checkpoint in this run folder", run_dir)
        first = sels[0]
        names = [
            n
            for n in first
            if all(n in s for s in sels[1:])
            and numeric_kind(first[n].dtype) in ("float", "complex")
            and all(s[n].shape == first[n].shape for s in sels[1:])
            and first[n].alias_of is None
        ]
        every = set().union(*[set(s) for s in sels])
        res.not_in_all = sorted(n for n in every if not all(n in s for s in sels))
        res.num_tensors = len(names)
        n_ck = len(readers)
        ssq_w = [0.0] * n_ck
        ssq_d = [0.0] * n_ck
        ssq_p = [0.0] * n_ck
        top: list[tuple[float, str | None]] = [(-1.0, None)] * n_ck
        total = sum(s[n].nbytes for s in sels for n in names)
        ctx = progress_factory(total) if progress_factory else nullcontext(None)
        holders = [[bytearray(0)] for _ in readers]  # one read buffer per checkpoint, kept across tensors
        work: dict[Any, Any] = {}  # float64 (complex128) buffers: two chunks and one block

        def scratch(dt, n: int):
            arrs = work.get(dt)
            if arrs is None or len(arrs[0]) < n:
                arrs = work[dt] = (np.empty(n, dt), np.empty(n, dt), np.empty(BLOCK, dt))
            return arrs

        with ctx as bar, np.errstate(all="ignore"):
            for n in names:
                isz = max(itemsize(s[n].dtype) for s in sels)
                elems = max(BLOCK, min(ALONG_CHUNK, ALONG_BUDGET // (n_ck * isz)))
                elems -= elems % BLOCK
                its = [
                    iter(ChunkSource(r, s[n], elems * itemsize(s[n].dtype), bufs=h))
                    for r, s, h in zip(readers, sels, holders)
                ]
                wdt = np.dtype(np.complex128 if numeric_kind(first[n].dtype) == "complex" else np.float64)
                pair = scratch(wdt, min(elems, max(1, first[n].numel)))
                t_d = [0.0] * n_ck
                t_p = [0.0] * n_ck
                while True:
                    prev = None
                    prev_ss = 0.0
                    done = False
                    for i, (it, s) in enumerate(zip(its, sels)):
                        chunk = next(it, None)
                        if chunk is None:
                            done = True
                            break
                        x = as_array(chunk, s[n].dtype)
                        X = pair[i % 2][: len(x)]
                        np.copyto(X, x, casting="unsafe")
                        ss = dot(X, X)
                        if not math.isfinite(ss):  # NaN/Inf stay in: the norms become nan/inf
                            bad = X.size - int(np.count_nonzero(np.isfinite(X)))
                            if bad:
                                res.steps[i].nonfinite += bad
                                if n not in res.steps[i].nonfinite_tensors:
                                    res.steps[i].nonfinite_tensors.append(n)
                        ssq_w[i] += ss
                        if prev is not None:
                            dd = 0.0
                            D0 = pair[2]
                            for b in range(0, len(X), BLOCK):
                                end = min(len(X), b + BLOCK)
                                D = D0[: end - b]
                                np.subtract(X[b:end], prev[b:end], out=D)
                                dd += dot(D, D)
                            ssq_d[i] += dd
                            ssq_p[i] += prev_ss
                            t_d[i] += dd
                            t_p[i] += prev_ss
                        prev, prev_ss = X, ss
                        if bar is not None:
                            bar.advance(len(chunk))
                    if done:
                        break
                for i in range(1, n_ck):
                    rel = _rel(t_d[i], t_p[i])
                    if rel > top[i][0]:  # (a NaN update never wins: the NaN/Inf column names it)
                        top[i] = (rel, n)
        for i, step in enumerate(res.steps):
            step.weight_norm = math.sqrt(ssq_w[i])
            if i > 0:
                step.update_norm = math.sqrt(ssq_d[i])
                step.update_rel_l2 = _rel(ssq_d[i], ssq_p[i])
                if top[i][1] is not None:
                    step.top_rel_l2, step.top_tensor = top[i]
        return res
    finally:
        for r in readers:
            r.close()
