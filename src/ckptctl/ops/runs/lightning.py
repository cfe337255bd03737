"""PyTorch Lightning run layout: `epoch=3-step=1200.ckpt`, `...-val_loss=0.12.ckpt`, `last.ckpt`.
The ModelCheckpoint callback state inside a .ckpt names the monitored metric, the best path and
score, and holds the 0-d `current_score` tensor (the one tensor value run discovery reads)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptctl.model import CheckpointInfo
from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.values import _as_float

if TYPE_CHECKING:
    from ckptctl.ops.runs.model import RunCheckpoint


_CB = re.compile(
    r"^callbacks/(?P<cb>ModelCheckpoint.*?)/(?P<field>monitor|best_model_score|best_model_path|current_score)$"
)


def lightning_callbacks(c: RunCheckpoint, reader, info: CheckpointInfo, meta: dict[str, Any]) -> None:
    found: dict[str, dict[str, Any]] = {}
    for k, v in meta.items():
        m = _CB.match(k)
        if m:
            found.setdefault(m.group("cb"), {})[m.group("field")] = v
    for t in info.tensors:
        if not t.name.startswith("callbacks/"):  # what _CB needs first, without a regex per tensor
            continue
        m = _CB.match(t.name)
        if m and m.group("field") == "current_score" and t.numel == 1 and t.nbytes <= 16:  # the one read
            try:
                found.setdefault(m.group("cb"), {})[m.group("field")] = reader.read_scalar(t.name)
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
            ref: dict[str, Any] = {
                "source": f"Lightning ModelCheckpoint best_model_path ({monitor})",
                "path": best_path,
                "monitor": monitor,
            }
            score = _as_float(d.get("best_model_score"))
            if score is not None:
                ref["score"] = score
            mode = re.search(r"'mode':\s*'(min|max)'", cb)
            if mode:
                ref["mode"] = mode.group(1)
            c.best_ref = ref


class Lightning(Layout):
    name = "lightning"
    owns = ("lightning",)

    def claim_file(self, name: str) -> str | None:
        return "lightning" if PurePosixPath(name).suffix == ".ckpt" else None

    def from_info(self, c: RunCheckpoint, reader: Any, info: CheckpointInfo, meta: dict[str, Any]) -> None:
        if c.layout == "file" and info.kind:  # a .pt written by Lightning's trainer
            c.layout = "lightning" if info.kind == "lightning" else c.layout
        lightning_callbacks(c, reader, info, meta)  # any file may carry ModelCheckpoint state


LAYOUT = Lightning()
