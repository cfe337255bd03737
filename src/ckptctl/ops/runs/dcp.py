"""PyTorch Distributed Checkpoint (DCP) run layout: one folder per save (`step_100/`) holding
`.metadata` and the ranks' `__<rank>_<n>.distcp` files; `.distcp` files without `.metadata` are an
interrupted save. Read through the registry's DCP reader (the `.metadata` pickle only)."""

from __future__ import annotations

from pathlib import Path

from ckptctl.ops.runs.base import Layout


class DCP(Layout):
    name = "dcp"
    owns = ("dcp",)

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        if ".metadata" in nameset or any(n.endswith(".distcp") for n in names):
            return "dcp"
        return None

    def incomplete(self, c, names: set[str]) -> str | None:
        return None if ".metadata" in names else "incomplete: .distcp files without .metadata (save interrupted?)"


LAYOUT = DCP()
