"""Run discovery: find the checkpoints in a training-run folder, with their step and metrics.

Shared by `ls`, `prune` and the run-level `diff` / `average`. Pure: no printing.

A run folder holds checkpoints written by a trainer:
  HF Trainer      checkpoint-500/ (model.safetensors, optimizer.pt, ..., trainer_state.json)
  Lightning       epoch=3-step=1200.ckpt, epoch=3-step=1200-val_loss=0.12.ckpt, last.ckpt
  fairseq         checkpoint_3_1200.pt, checkpoint3.pt, checkpoint_best.pt, checkpoint_last.pt
  DCP             step_100/ (.metadata + __0_0.distcp)
  Orbax           100/ (_CHECKPOINT_METADATA, default/, metrics/ ...): see orbax.py
  DeepSpeed       global_step100/ + a `latest` file naming it
  TensorFlow      ckpt-5.index + ckpt-5.data-00000-of-00001 + a `checkpoint` state file,
                  SavedModel folders; Keras ModelCheckpoint `.keras` / `.weights.h5` (see tf.py)
  plain           step_1000.pt, model_00010000.safetensors, sharded index + shards, model folders

Everything is lazy: readers' `info()` (headers and pickles), small JSON/text side files, and the
0-d `current_score` tensor of a Lightning ModelCheckpoint callback (and a TF checkpoint's 0-d
`epoch` variable); no other tensor data.
The step stored inside a checkpoint beats the one parsed from its name.

Modules: names (suffixes, name parsing, durations), model (RunCheckpoint, Run), walk (file-system
questions, local or remote), detect (what a folder is), discovery (walking a run, copies and
bests, the worker pools), enrich (step, epoch, metrics of one checkpoint), values (metadata as
numbers). Framework layouts are plug-ins (base.Layout, listed in layouts.LAYOUTS, which registers
them in registry.py for the shared code they import): tf, keras, hf_trainer, dcp, orbax, deepspeed,
lightning, fairseq, generic.
The names below are the public API other modules import.
"""

from __future__ import annotations

from ckptctl.ops.runs import orbax, tf  # noqa: F401 - framework layouts
from ckptctl.ops.runs.detect import is_checkpoint_dir, is_run_dir
from ckptctl.ops.runs.discovery import PARALLEL_MIN, POOL_STATE, discover, scan_run, sort_key
from ckptctl.ops.runs.enrich import primary_file
from ckptctl.ops.runs.layouts import LAYOUTS, for_layout, role_of
from ckptctl.ops.runs.model import Run, RunCheckpoint, bytes_on_disk
from ckptctl.ops.runs.names import (
    AUX_NAMES,
    FILE_SUFFIXES,
    INDEX_SUFFIXES,
    NON_MODEL_HEADS,
    OPTIM_HEADS,
    parse_duration,
    parse_name,
    strip_suffix,
    untmp,
)

_primary_file = primary_file  # the name ops/diff.py looks up

__all__ = [
    "AUX_NAMES",
    "FILE_SUFFIXES",
    "INDEX_SUFFIXES",
    "NON_MODEL_HEADS",
    "OPTIM_HEADS",
    "PARALLEL_MIN",
    "POOL_STATE",
    "LAYOUTS",
    "Run",
    "RunCheckpoint",
    "for_layout",
    "bytes_on_disk",
    "discover",
    "is_checkpoint_dir",
    "is_run_dir",
    "parse_duration",
    "parse_name",
    "primary_file",
    "role_of",
    "scan_run",
    "sort_key",
    "strip_suffix",
    "untmp",
]
