"""Metadata values as numbers: flattening nested checkpoint metadata, ints and floats from whatever a
pickle or JSON side file holds (numpy scalars, strings of digits), never raising."""

from __future__ import annotations

import re
from typing import Any


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
