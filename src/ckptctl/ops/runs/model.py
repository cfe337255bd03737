"""What discovery returns: a RunCheckpoint per checkpoint and the Run that holds them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.model import CheckpointInfo
from ckptctl.ops.runs.names import OPTIM_HEADS
from ckptctl.ops.runs.registry import picks_model_file
from ckptctl.ops.runs.walk import _file_stats


@dataclass
class RunCheckpoint:
    path: Path  # the file or the folder (checkpoint-N/, DCP dir, shard folder, index file)
    files: list[Path]  # every file that belongs to it (deleting it = deleting these)
    step: int | None
    step_source: str  # "trainer_state" | "global_step" | "metadata" | "name" | "none"
    format: str | None  # registry format name ("orbax" when we only recognise it)
    size: int  # bytes on disk (apparent size of all files)
    mtime: float  # newest modification time among its files and folders
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # symlinks / copies / `latest` files naming it
    info: CheckpointInfo | None = None  # metadata only; TensorInfo.loc may be None: open a reader to read
    error: str | None = None  # one-line reason if broken or incomplete
    incomplete: bool = False
    # beyond the shared API
    run: Path | None = None  # the run folder it was found in
    layout: str = "file"  # hf-trainer | lightning | fairseq | dcp | orbax | deepspeed | tf | tf-savedmodel | keras | sharded | folder | file
    epoch: int | None = None
    role: str | None = None  # last | best | latest | final: a copy that matched no stepped checkpoint
    best_of_run: list[str] = field(default_factory=list)  # "trainer_state best_model_checkpoint", ...
    best_ref: dict[str, Any] | None = None  # what this checkpoint says is the run's best
    dirs: list[Path] = field(default_factory=list)  # folders to remove after its files (deepest first)
    copies: list[Path] = field(default_factory=list)  # last/best copies folded into it as aliases

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def broken(self) -> bool:
        return self.error is not None and not self.incomplete

    @property
    def has_optimizer(self) -> bool | None:
        if picks_model_file(self.layout) and self.path.is_dir():
            for f in self.files:
                if re.match(r"^(optimizer.*\.(pt|bin|safetensors)|.*optim_states\.pt)$", f.name) or any(
                    p.startswith("optimizer") for p in f.relative_to(self.path).parts[:-1]
                ):
                    return True
        if self.info is None:
            return None
        for t in self.info.tensors:
            if _head(t.name) in OPTIM_HEADS:
                return True
        for o in self.info.objects:
            if _head(o.name) in OPTIM_HEADS:
                return True
        return False

    @property
    def model_tensors(self) -> list:
        """Tensors of the model itself (state_dict/ of a training checkpoint; else optimizer state,
        schedulers, callbacks left out): what inspect shows and convert writes by default."""
        return list(self._model())

    def _model(self) -> list:
        """model_tensors, worked out once per tensor list (a row asks for it four times: tensors,
        params, bytes, dtypes); again when `info` or its `tensors` list is another or its length
        changed."""
        if self.info is None:
            return []
        tensors = self.info.tensors
        cached = self.__dict__.get("_model_cache")
        if cached is not None and cached[0] is tensors and cached[1] == len(tensors):
            return cached[2]
        from ckptctl.ops.select import model_weights  # the rule convert/average/inspect use

        out = model_weights(tensors)
        self.__dict__["_model_cache"] = (tensors, len(tensors), out)
        return out

    @property
    def num_tensors(self) -> int | None:
        return None if self.info is None else len(self._model())

    @property
    def num_params(self) -> int | None:
        if self.info is None:
            return None
        return sum(t.numel for t in self._model() if t.alias_of is None)

    @property
    def tensor_bytes(self) -> int | None:
        if self.info is None:
            return None
        return sum(t.nbytes for t in self._model() if t.alias_of is None)

    @property
    def dtype_mix(self) -> dict[str, int]:
        mix: dict[str, int] = {}
        for t in self._model():
            mix[t.dtype] = mix.get(t.dtype, 0) + 1
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]))

    @property
    def unsafe_globals(self) -> list[str]:
        """Globals of its pickle that could run code if it were loaded with pickle/torch.load."""
        if self.info is None or not self.info.globals:
            return []
        from ckptctl.ops.inspect import dangerous_globals

        return dangerous_globals(self.info)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        def rel(p: Path) -> str:
            if relative_to is not None:
                try:
                    return os.fspath(p.relative_to(relative_to))
                except ValueError:
                    pass
            return os.fspath(p)

        return {
            "path": os.fspath(self.path),
            "name": self.name,
            "run": os.fspath(self.run) if self.run is not None else None,
            "step": self.step,
            "step_source": self.step_source,
            "epoch": self.epoch,
            "format": self.format,
            "layout": self.layout,
            "kind": self.info.kind if self.info is not None else None,
            "total_bytes": self.size,
            "num_files": len(self.files),
            "files": [rel(f) for f in self.files],
            "num_tensors": self.num_tensors,
            "num_params": self.num_params,
            "tensor_bytes": self.tensor_bytes,
            "dtypes": self.dtype_mix,
            "has_optimizer": self.has_optimizer,
            "metrics": dict(self.metrics),  # NaN/Inf as floats: print_json writes them strictly
            "aliases": self.aliases,
            "role": self.role,
            "best_of_run": self.best_of_run,
            "mtime": self.mtime,
            "incomplete": self.incomplete,
            "unsafe_globals": self.unsafe_globals,
            "error": self.error,
        }


def bytes_on_disk(ckpts: list[RunCheckpoint]) -> int:
    """What `du -b` counts for these checkpoints: their files and the copies folded into them as
    aliases (a real last.ckpt copy), each inode once (hard links), symlinks not followed."""
    return _file_stats([f for c in ckpts for f in c.files + c.copies])[1]


def _head(name: str) -> str:
    """The name up to its first '/' or '.' (re.split's answer, without a regex per tensor)."""
    return name.split("/", 1)[0].split(".", 1)[0]


@dataclass
class Run:
    """What discovery found in one folder (and below it, when recursive)."""

    path: Path
    checkpoints: list[RunCheckpoint]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing when pruning, not when listing
    ignored: list[Path] = field(default_factory=list)  # files seen that are not checkpoints
    subdirs: list[Path] = field(default_factory=list)  # folders not entered (non-recursive)
    # run-level "best" pointers: (what says so, resolved checkpoint path or None)
    best: list[tuple[str, Path | None]] = field(default_factory=list)
    # symlinks and `latest`-style files met while scanning, resolved once every checkpoint is known
    links: list[Path] = field(default_factory=list, repr=False)
    alias_files: list[Path] = field(default_factory=list, repr=False)
