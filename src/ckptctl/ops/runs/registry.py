"""The registered run layouts, in the order they are asked, for the shared code below them.

layouts.py imports every layout module and registers their `Layout`s here (`register`). The
modules every layout itself imports (model.py, enrich.py) ask here instead of importing
layouts.py, which would close an import loop (layouts -> a layout -> enrich -> layouts).
Importing any ckptctl.ops.runs module first runs the package __init__, which imports layouts.py,
so the registry is filled before anything asks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptctl.ops.runs.base import Layout

LAYOUTS: list[Layout] = []  # layouts.LAYOUTS is this list
_BY_NAME: dict[str, Layout] = {}
_DEFAULT: list[Layout] = []  # the layout of values no layout owns (generic: folder / file / sharded)


def register(layouts: list[Layout], default: Layout) -> None:
    """Register `layouts` (in the order they are asked) and the `default` for unowned values."""
    LAYOUTS[:] = layouts
    _BY_NAME.clear()
    _BY_NAME.update({v: lay for lay in layouts for v in lay.owns})
    _DEFAULT[:] = [default]


def for_layout(value: str) -> Layout:
    """The layout that owns a RunCheckpoint.layout value (generic for folder / file / sharded)."""
    return _BY_NAME.get(value, _DEFAULT[0])


def picks_model_file(layout: str) -> bool:
    """A multi-file folder (HF Trainer, DeepSpeed, model folder) whose model file discovery picks."""
    return layout in for_layout(layout).model_file_in_folder
