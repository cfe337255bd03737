"""Hugging Face Trainer run layout: `checkpoint-<step>/` folders (model.safetensors, optimizer.pt, ...,
trainer_state.json) in an output folder. The step, epoch, metrics (log_history at that step) and the
run's best_model_checkpoint come from trainer_state.json."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.values import _as_float
from ckptctl.ops.runs.walk import _read_json

if TYPE_CHECKING:
    from ckptctl.ops.runs.model import RunCheckpoint


def trainer_state(c: RunCheckpoint) -> None:
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


STEP_DIR = re.compile(r"^(tmp-)?checkpoint-\d+$")


class HFTrainer(Layout):
    name = "hf-trainer"
    owns = ("hf-trainer",)
    model_file_in_folder = ("hf-trainer",)

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        return "hf-trainer" if STEP_DIR.match(path.name) else None

    def incomplete(self, c: RunCheckpoint, names: set[str]) -> str | None:
        return None if "trainer_state.json" in names else "incomplete: no trainer_state.json (save interrupted?)"

    def side_files(self, c: RunCheckpoint) -> None:
        trainer_state(c)


LAYOUT = HFTrainer()
