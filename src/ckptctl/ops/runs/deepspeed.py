"""DeepSpeed run layout: `global_step<N>/` folders (mp_rank_00_model_states.pt, *_optim_states.pt)
and a `latest` file naming the newest tag. The model file is picked among the folder's files."""

from __future__ import annotations

import re
from pathlib import Path

from ckptctl.ops.runs.base import Layout

STEP_DIR = re.compile(r"^global_step\d+$")


class DeepSpeed(Layout):
    name = "deepspeed"
    owns = ("deepspeed",)
    model_file_in_folder = ("deepspeed",)
    alias_files = ("latest",)

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        return "deepspeed" if STEP_DIR.match(path.name) else None

    def alias_target(self, file_name: str, text: str) -> str | None:
        return text.strip()  # a tag like global_step1200


LAYOUT = DeepSpeed()
