"""Hugging Face Trainer run layout: `checkpoint-<step>/` folders (model.safetensors, optimizer.pt, ...,
trainer_state.json) in an output folder. The step, epoch, metrics (log_history at that step) and the
run's best_model_checkpoint come from trainer_state.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
