"""diff of two runs: checkpoints aligned by step, one two-checkpoint diff per common step."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import CkptError
from ckptctl.ops.diff import diff_checkpoints
from ckptctl.ops.diff_result import json_float


# ---- two runs --------------------------------------------------------------------------------------
@dataclass
class StepDiff:
    step: int
    path_a: str
    path_b: str
    equal: bool | None = None
    num_changed: int = 0
    num_identical: int = 0
    only_in_a: int = 0
    only_in_b: int = 0
    max_rel_l2: float | None = None
    max_rel_name: str | None = None
    nonfinite: list[str] = field(default_factory=list)
    error: str | None = None
    metrics_a: dict[str, float] = field(default_factory=dict)  # the run's metrics at this step
    metrics_b: dict[str, float] = field(default_factory=dict)
    num_dtype_only: int = 0
    left_out: tuple[int, int] = (0, 0)  # tensors left out by the model-weights default, per side
    hint: str | None = None  # how to align the names (see name_hint)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "a": self.path_a,
            "b": self.path_b,
            "equal": self.equal,
            "metrics": {
                "a": {k: json_float(v) for k, v in self.metrics_a.items()},
                "b": {k: json_float(v) for k, v in self.metrics_b.items()},
            },
            "num_changed": self.num_changed,
            "num_identical": self.num_identical,
            "num_dtype_only": self.num_dtype_only,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "max_rel_l2": json_float(self.max_rel_l2),
            "max_rel_l2_tensor": self.max_rel_name,
            "nonfinite_tensors": self.nonfinite,
            "left_out": list(self.left_out),
            "hint": self.hint,
            "error": self.error,
        }


@dataclass
class RunDiff:
    run_a: str
    run_b: str
    steps: list[StepDiff] = field(default_factory=list)
    missing_in_a: list[int] = field(default_factory=list)  # steps only B has
    missing_in_b: list[int] = field(default_factory=list)  # steps only A has
    unstepped_a: list[str] = field(default_factory=list)
    unstepped_b: list[str] = field(default_factory=list)
    root: str = ""  # the sub-tree compared when the model-weights default applied

    @property
    def equal(self) -> bool:
        return not self.missing_in_a and not self.missing_in_b and all(s.equal for s in self.steps)

    @property
    def metric_names(self) -> list[str]:
        """Every metric either run has at a common step, in order of first appearance."""
        seen: dict[str, None] = {}
        for s in self.steps:
            for k in list(s.metrics_a) + list(s.metrics_b):
                seen.setdefault(k, None)
        return list(seen)

    @property
    def left_out(self) -> tuple[int, int]:
        return (
            max((s.left_out[0] for s in self.steps), default=0),
            max((s.left_out[1] for s in self.steps), default=0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "equal": self.equal,
            "metrics": self.metric_names,
            "steps": [s.to_json() for s in self.steps],
            "missing_in_a": self.missing_in_a,
            "missing_in_b": self.missing_in_b,
            "unstepped_a": self.unstepped_a,
            "unstepped_b": self.unstepped_b,
        }


def _run_checkpoints(run_dir: str | os.PathLike):
    from ckptctl.ops.runs import discover

    cks = discover(run_dir)
    by_step: dict[int, Any] = {}
    unstepped: list[str] = []
    for c in cks:
        if c.step is None:
            unstepped.append(c.path.name)
        elif c.step not in by_step:  # first by the runs module's order
            by_step[c.step] = c
    return by_step, unstepped


def diff_runs(
    run_a: str | os.PathLike, run_b: str | os.PathLike, *, on_step: Callable[[StepDiff], None] | None = None, **kw: Any
) -> RunDiff:
    """Align two runs by step and diff each common step's checkpoints."""
    a, ua = _run_checkpoints(run_a)
    b, ub = _run_checkpoints(run_b)
    res = RunDiff(str(run_a), str(run_b), unstepped_a=ua, unstepped_b=ub)
    res.missing_in_b = sorted(s for s in a if s not in b)
    res.missing_in_a = sorted(s for s in b if s not in a)
    for step in sorted(s for s in a if s in b):
        ca, cb = a[step], b[step]
        sd = StepDiff(
            step, str(ca.path), str(cb.path), metrics_a=dict(ca.metrics or {}), metrics_b=dict(cb.metrics or {})
        )
        try:
            d = diff_checkpoints(ca.path, cb.path, **kw)
        except CkptError as e:
            sd.error = str(e)
            sd.equal = False
        else:
            sd.equal = d.equal
            sd.num_changed = len(d.changed)
            sd.num_identical = len(d.identical)
            sd.only_in_a, sd.only_in_b = len(d.only_in_a), len(d.only_in_b)
            sd.num_dtype_only = len(d.dtype_only)
            sd.left_out = d.left_out
            sd.hint = d.hint
            res.root = res.root or (d.side_a.root if d.side_a else "") or (d.side_b.root if d.side_b else "")
            rels = [(x.rel_l2, x.name) for x in d.changed if x.rel_l2 is not None]
            if rels:
                sd.max_rel_l2, sd.max_rel_name = max(rels, key=lambda r: math.inf if math.isnan(r[0]) else r[0])
            sd.nonfinite = d.nonfinite
        res.steps.append(sd)
        if on_step:
            on_step(sd)
    return res
