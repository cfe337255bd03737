"""Generic layouts: sharded models (an index and its shards), model folders (config.json +
model.safetensors, ...), folders and files named by step (`step_1000.pt`, `model_00010000.safetensors`,
`iter_0001000/`) and plain checkpoint files; Megatron's `latest_checkpointed_iteration.txt` pointer.
Asked last: whatever no framework claims."""

from __future__ import annotations

import re
from pathlib import Path

from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.names import EPOCH_PATTERN, FILE_SUFFIXES, INDEX_SUFFIXES, ROLE_STEM, STEP_PATTERNS, strip_suffix
from ckptctl.ops.runs.walk import entry_path, scandir


def _explicit_step(name: str) -> bool:
    """The name says step/iter/epoch outright (`step_100`, `epoch=3`, `iter_0001000`)."""
    stem = strip_suffix(name)
    return bool(
        STEP_PATTERNS[1].search(stem)
        or STEP_PATTERNS[2].search(stem)
        or EPOCH_PATTERN.search(stem)
        or re.search(r"(?:^|[-_])(step|epoch)=", stem)
    )


def _has_checkpoint_file(path: Path, depth: int = 2) -> bool:
    try:
        for e in scandir(path):
            if e.is_file(follow_symlinks=False) and e.name.endswith(FILE_SUFFIXES + (".distcp",)):
                return True
            if depth > 1 and e.is_dir(follow_symlinks=False) and _has_checkpoint_file(entry_path(e), depth - 1):
                return True
    except OSError:
        return False
    return False


class Generic(Layout):
    name = "generic"
    owns = ("sharded", "folder", "file")
    model_file_in_folder = ("folder",)
    alias_files = ("latest_checkpointed_iteration.txt",)  # Megatron: an iteration number

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        if any(n.endswith(INDEX_SUFFIXES) for n in names):
            return "sharded"
        from ckptctl.formats import MODEL_FILES

        if nameset & set(MODEL_FILES):
            return "folder"
        if _explicit_step(path.name) and _has_checkpoint_file(path):
            return "folder"
        return None

    def alias_target(self, file_name: str, text: str) -> str | None:
        t = text.strip()
        return f"iter_{int(t):07d}" if t.isdigit() else None

    def role(self, name: str) -> str | None:
        m = ROLE_STEM.match(strip_suffix(name))
        return m.group(1).lower() if m else None


LAYOUT = Generic()
