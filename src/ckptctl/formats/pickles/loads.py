"""Running the restricted machine over a whole input: one pickle held in memory
(`unpickle_bytes`), and the globals of every pickle found back to back in a file region
(`scan_globals`, like picklescan does; never raises for malformed data).
"""

from __future__ import annotations

from typing import Any

from ckptctl.formats.pickles.machine import Machine
from ckptctl.formats.pickles.records import PickleError


def unpickle_bytes(data: bytes, *, persistent_load=None, path=None, encoding: str = "latin1") -> tuple[Any, list[str]]:
    """(object, globals) of one pickle held in memory."""
    m = Machine(data, persistent_load=persistent_load, path=path, encoding=encoding)
    obj = m.load()
    return obj, m.globals


def scan_globals(f, start: int, end: int, path=None, limit: int = 64) -> tuple[list[str], str | None]:
    """Globals of every pickle found back to back in f[start:end] (like picklescan does).

    Returns (globals, error) where error describes why the scan stopped early (None at a clean
    end). Never raises for malformed data.
    """
    found: list[str] = []
    pos = start
    for _ in range(limit):
        if pos >= end:
            return found, None
        m = Machine(f, start=pos, end=end, path=path)
        try:
            m.load()
        except PickleError as e:
            found.extend(m.globals)
            found.extend(e.more_globals)
            return found, e.message
        found.extend(m.globals)
        if m.pos <= pos:
            return found, None
        pos = m.pos
    return found, None
