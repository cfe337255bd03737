"""The shape of a run-layout plug-in: one `Layout` per training framework, each answering the same
questions about a folder and the checkpoints in it. `layouts.py` lists them in the order they are
asked; the shared walking (discovery.py) and enrichment (enrich.py) call them and hold no
framework's rules of their own.

A layout overrides only what applies to it; the defaults say "not mine" / "nothing to add".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ckptctl.model import CheckpointInfo
    from ckptctl.ops.runs.model import Run, RunCheckpoint

RUN = "run"  # claim_dir's answer for a folder that is a run of this layout (never one checkpoint)


class Layout:
    name = ""
    owns: tuple[str, ...] = ()  # the RunCheckpoint.layout values this layout enriches
    alias_files: tuple[str, ...] = ()  # pointer files naming a checkpoint (`latest`, TF `checkpoint`)
    model_file_in_folder: tuple[str, ...] = ()  # folder layouts whose model file discovery picks itself

    # -- is this mine? --------------------------------------------------------------------------
    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        """The layout of `path` when this folder is ONE checkpoint of mine; RUN when it is a run
        of mine that no other layout may call one checkpoint; else None."""
        return None

    def claim_file(self, name: str) -> str | None:
        """The layout of a checkpoint file named `name`, or None."""
        return None

    def names_checkpoint(self, path: Path) -> bool:
        """`path` names one of my checkpoints without being a file or folder of that name."""
        return False

    # -- which checkpoints are in it -----------------------------------------------------------
    def scan(self, folder: Path, names: list[str], claimed: set[str], run: Run) -> None:
        """Group loose files of `folder` into checkpoints (adding to run.checkpoints, their names
        to `claimed`) before the shared walk treats every remaining entry on its own."""

    def single(self, path: Path) -> RunCheckpoint | None:
        """The checkpoint `path` names when names_checkpoint(path)."""
        return None

    def incomplete(self, c: RunCheckpoint, names: set[str]) -> str | None:
        """Why a checkpoint folder of mine (its top-level `names`) is an interrupted save, or None."""
        return None

    # -- step / epoch / metrics ----------------------------------------------------------------
    def enrich(self, c: RunCheckpoint, read_info: bool) -> None:
        """Step, epoch, metrics and (when read_info) the metadata of one checkpoint of mine."""
        from ckptctl.ops.runs.enrich import default_enrich

        default_enrich(c, read_info, self)

    def side_files(self, c: RunCheckpoint) -> None:
        """Read what my framework writes beside the weights (trainer_state.json) into `c`."""

    def from_info(self, c: RunCheckpoint, reader: Any, info: CheckpointInfo, meta: dict[str, Any]) -> None:
        """Called for EVERY checkpoint read (any layout): what my framework stores inside a file."""

    # -- aliases, best and protected ones ------------------------------------------------------
    def alias_target(self, file_name: str, text: str) -> str | None:
        """The checkpoint name a pointer file of mine (one of alias_files) names."""
        return None

    def role(self, name: str) -> str | None:
        """None: not my name; "" : my name, no role; else last | best | latest | final."""
        return None

    def twin(self, c: RunCheckpoint, stepped: list[RunCheckpoint]) -> RunCheckpoint | None:
        """The stepped checkpoint a last/best copy `c` of mine is a copy of, beyond same step and size."""
        return None

    def in_progress(self, c: RunCheckpoint) -> str | None:
        """Why prune must never delete `c` (a save of mine that may still be running), or None."""
        return None

    def plan_prune(self, ckpts: list[RunCheckpoint]) -> list[Any]:
        """What deleting `ckpts` will change in my side files (for the plan)."""
        return []

    def after_prune(self, removed: list[RunCheckpoint]) -> list[Any]:
        """Bring my side files in line once `removed` are gone."""
        return []
