"""diff results: one tensor pair (`TensorDiff`, made from a Comparer's `Acc`) and two checkpoints
(`DiffResult`), with their JSON forms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptctl.model import TensorInfo
from ckptctl.ops.stream import numeric_kind

if TYPE_CHECKING:
    from ckptctl.ops.diff import Side
    from ckptctl.ops.diff_values import Acc


# ---- results ------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    compared: bool = False  # values were compared
    numel: int = 0
    num_diff: int | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    error: str | None = None
    ignore_dtype: bool = False  # --ignore-dtype: a dtype change alone is not a difference
    atol: float | None = None  # the tolerance these values were compared with (None, None: exact)
    rtol: float | None = None

    @property
    def dtype_changed(self) -> bool:
        return self.dtype_a != self.dtype_b

    @property
    def shape_changed(self) -> bool:
        return tuple(self.shape_a) != tuple(self.shape_b)

    @property
    def values_differ(self) -> bool:
        return bool(self.num_diff)

    @property
    def identical(self) -> bool:
        return tensor_identical(self)

    @property
    def dtype_only(self) -> bool:
        """Only the dtype changed: the values were compared and all are within tolerance."""
        return (
            self.dtype_changed and self.compared and not self.num_diff and not self.shape_changed and self.error is None
        )

    @property
    def nonfinite(self) -> bool:
        return bool(self.nan_a or self.nan_b or self.inf_a or self.inf_b)

    @property
    def change(self) -> str:
        parts = []
        if self.shape_changed:
            parts.append(f"shape {list(self.shape_a)} -> {list(self.shape_b)}")
        if self.dtype_changed:
            parts.append(
                f"dtype {self.dtype_a} -> {self.dtype_b}"
                + (
                    " (values not comparable)"
                    if self.ignore_dtype and not self.compared and not self.shape_changed
                    else ""
                )
            )
        if self.compared and self.num_diff:
            parts.append("values")
        if self.error:
            parts.append(f"unreadable: {self.error}")
        return ", ".join(parts) or "identical"

    @classmethod
    def from_acc(cls, name: str, ta: TensorInfo, tb: TensorInfo, acc: Acc) -> TensorDiff:
        d = cls(
            name,
            ta.dtype,
            tb.dtype,
            tuple(ta.shape),
            tuple(tb.shape),
            compared=True,
            numel=acc.numel,
            num_diff=acc.n_diff,
            nan_a=acc.nan_a,
            nan_b=acc.nan_b,
            inf_a=acc.inf_a,
            inf_b=acc.inf_b,
        )
        if numeric_kind(ta.dtype) == "bytes":
            return d  # raw bytes: equal or not, no arithmetic
        if not acc.arith:
            # identical through the fast path: no arithmetic was needed
            d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine = 0.0, 0.0, 0.0, 1.0
            return d
        if acc.numel and not acc.n_finite:  # no pair with both sides finite: no statistic, not 0
            d.max_abs_diff = d.mean_abs_diff = d.rel_l2 = d.cosine = math.nan
            return d
        d.norm_a = math.sqrt(acc.ssq_a)
        d.norm_b = math.sqrt(acc.ssq_b)
        d.max_abs_diff = acc.max_abs
        d.mean_abs_diff = acc.sum_abs / acc.n_finite if acc.n_finite else (0.0 if not acc.numel else None)
        nd = math.sqrt(acc.ssq_d)
        if d.norm_a > 0:
            d.rel_l2 = nd / d.norm_a
        else:
            d.rel_l2 = 0.0 if nd == 0 else math.inf
        if d.norm_a > 0 and d.norm_b > 0:
            d.cosine = max(-1.0, min(1.0, acc.dot_ab / (d.norm_a * d.norm_b)))
        else:
            d.cosine = 1.0 if d.norm_a == d.norm_b else 0.0
        return d

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "change": self.change,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "dtype_changed": self.dtype_changed,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "numel": self.numel,
            "num_diff": self.num_diff,
            "frac_diff": (self.num_diff / self.numel) if self.num_diff is not None and self.numel else None,
            "max_abs_diff": json_float(self.max_abs_diff),
            "mean_abs_diff": json_float(self.mean_abs_diff),
            "rel_l2": json_float(self.rel_l2),
            "cosine": json_float(self.cosine),
            "nan_a": self.nan_a,
            "nan_b": self.nan_b,
            "inf_a": self.inf_a,
            "inf_b": self.inf_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "error": self.error,
        }


# The verdicts, as plain functions (the properties above call them): `diff`'s exit code is
# `0 if DiffResult.equal else 1`, and mutation testing (docs/testing.md) cannot mutate a property.
def tensor_identical(d: TensorDiff) -> bool:
    """No difference in this pair: same shape, no read error, and the values (when compared) all
    equal within tolerance; a dtype change counts unless --ignore-dtype compared the values."""
    if d.dtype_changed and not (d.ignore_dtype and d.compared):
        return False  # (values of dtypes without arithmetic cannot be compared across a cast)
    return not d.shape_changed and d.error is None and (not d.compared or not d.num_diff)


def result_equal(res: DiffResult) -> bool:
    """Two checkpoints are equal: no tensor only on one side, none changed."""
    return not (res.only_in_a or res.only_in_b or res.changed)


def json_float(v: float | None) -> float | None:
    """Numbers for JSON stay floats, inf and nan included: the output layer (print_json) writes
    the non-finite ones in its one documented, strict-JSON form."""
    return None if v is None else float(v)


def rel_key(d: TensorDiff) -> tuple:
    """Sort changed tensors: structural changes first, then new NaN/Inf, then by relative change."""
    structural = d.shape_changed or d.error is not None
    nonfinite_changed = (d.nan_a, d.inf_a) != (d.nan_b, d.inf_b)
    r = d.rel_l2
    if r is None or math.isnan(r):
        r = math.inf
    return (not structural, not nonfinite_changed, -r, -(d.num_diff or 0), d.name)


@dataclass
class DiffResult:
    path_a: str
    path_b: str
    format_a: str
    format_b: str
    values: bool  # were values compared
    atol: float | None
    rtol: float | None
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    changed: list[TensorDiff] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    metadata_changes: list[dict[str, Any]] = field(default_factory=list)
    hint: str | None = None
    key_a: str | None = None
    key_b: str | None = None
    bytes_compared: int = 0
    ignore_dtype: bool = False
    side_a: Side | None = None
    side_b: Side | None = None
    dtype_only: list[TensorDiff] = field(default_factory=list)  # dtype changed, values within tolerance

    @property
    def equal(self) -> bool:
        """Same tensor names, dtypes, shapes and (when compared) values. File metadata is shown
        but does not count: a .pt and its safetensors conversion are equal."""
        return result_equal(self)

    @property
    def nonfinite(self) -> list[str]:
        return [d.name for d in self.changed if d.nonfinite]

    @property
    def left_out(self) -> tuple[int, int]:
        """Tensors each side left out by the model-weights default (optimizer state, ...)."""
        return tuple(s.left_out if s is not None else 0 for s in (self.side_a, self.side_b))  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.path_a,
            "b": self.path_b,
            "format_a": self.format_a,
            "format_b": self.format_b,
            "equal": self.equal,
            "values_compared": self.values,
            "atol": self.atol,
            "rtol": self.rtol,
            "key_a": self.key_a,
            "key_b": self.key_b,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "changed": [d.to_json() for d in self.changed],
            "num_identical": len(self.identical),
            "num_changed": len(self.changed),
            "ignore_dtype": self.ignore_dtype,
            "num_dtype_only": len(self.dtype_only),
            "selection": {
                "a": self.side_a.to_json() if self.side_a else None,
                "b": self.side_b.to_json() if self.side_b else None,
            },
            "metadata_changes": self.metadata_changes,
            "hint": self.hint,
        }
