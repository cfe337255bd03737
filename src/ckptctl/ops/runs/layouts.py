"""The registry of run layouts, in the order they are asked, and the questions asked of all of them.

Adding a layout: a module with a `Layout` subclass (see base.py) and a `LAYOUT` instance, and one
entry in the list registered below (registry.py holds it for the shared code the layouts import). Folders are claimed by the first layout that answers (TensorFlow first: a
folder of TF prefixes is a run, whatever its name; generic last: sharded / model folders / step names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptctl.ops.runs import dcp, deepspeed, fairseq, generic, hf_trainer, keras, lightning, orbax, registry, tf
from ckptctl.ops.runs.base import RUN, Layout

if TYPE_CHECKING:
    from pathlib import Path

    from ckptctl.ops.runs.model import RunCheckpoint

registry.register(
    [
        tf.LAYOUT,
        keras.LAYOUT,
        hf_trainer.LAYOUT,
        dcp.LAYOUT,
        orbax.LAYOUT,
        deepspeed.LAYOUT,
        lightning.LAYOUT,
        fairseq.LAYOUT,
        generic.LAYOUT,
    ],
    default=generic.LAYOUT,
)
LAYOUTS: list[Layout] = registry.LAYOUTS
ALIAS_FILES = {n: lay for lay in LAYOUTS for n in lay.alias_files}
for_layout = registry.for_layout  # the layout that owns a RunCheckpoint.layout value


def claim_dir(path: Path, names: list[str]) -> str | None:
    nameset = set(names)
    for lay in LAYOUTS:
        kind = lay.claim_dir(path, names, nameset)
        if kind is not None:
            return None if kind == RUN else kind
    return None


def claim_file(name: str) -> str:
    for lay in LAYOUTS:
        kind = lay.claim_file(name)
        if kind is not None:
            return kind
    return "file"


def single(path: Path) -> RunCheckpoint | None:
    """A checkpoint named by a path that is not a file or folder of its own (TF `run/ckpt-20`)."""
    for lay in LAYOUTS:
        if lay.names_checkpoint(path):
            return lay.single(path)
    return None


def names_checkpoint(path: Path) -> bool:
    return any(lay.names_checkpoint(path) for lay in LAYOUTS)


def role_of(name: str) -> str | None:
    for lay in LAYOUTS:
        r = lay.role(name)
        if r is not None:
            return r or None
    return None


def in_progress(c: RunCheckpoint) -> str | None:
    for lay in LAYOUTS:
        why = lay.in_progress(c)
        if why:
            return why
    return None


def plan_prune(ckpts: list[RunCheckpoint]) -> list[Any]:
    return [x for lay in LAYOUTS for x in lay.plan_prune(ckpts)]


def after_prune(removed: list[RunCheckpoint]) -> list[Any]:
    return [x for lay in LAYOUTS for x in lay.after_prune(removed)]
