"""fairseq run layout: `checkpoint_<epoch>_<updates>.pt`, `checkpoint<epoch>.pt`, `checkpoint_best.pt`,
`checkpoint_last.pt`. The step is `num_updates` of the last optimizer_history entry, else the name
(names.parse_name reads both patterns); best/last copies fold into the stepped file they equal."""

from __future__ import annotations

from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.names import FAIRSEQ, FAIRSEQ_EPOCH, strip_suffix


class Fairseq(Layout):
    name = "fairseq"
    owns = ("fairseq",)

    def claim_file(self, name: str) -> str | None:
        stem = strip_suffix(name)
        return "fairseq" if FAIRSEQ.match(stem) or FAIRSEQ_EPOCH.match(stem) else None


LAYOUT = Fairseq()
