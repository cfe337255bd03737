"""inspect: the metadata of one checkpoint, filtered and sorted. Pure: no printing."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

from ckptctl.formats import open_reader
from ckptctl.model import CheckpointInfo, TensorInfo


@dataclass
class Inspection:
    info: CheckpointInfo
    tensors: list[TensorInfo]  # the part, after --filter and --sort (source names)
    dangerous: list[str] = field(default_factory=list)  # globals that could run code
    part: list[TensorInfo] = field(default_factory=list)  # the part shown: default, --key or --all
    part_kind: str = "all"  # "model" (the default rule left something out), "key" or "all"
    root: str = ""  # the sub-tree of the part ('' for none)

    @property
    def left_out(self) -> int:
        return len(self.info.tensors) - len(self.part)

    @property
    def num_tensors(self) -> int:
        return len(self.part)

    @property
    def num_params(self) -> int:
        """Elements of distinct tensors of the part (tied weights count once), like `ls`."""
        return sum(t.numel for t in self._unique())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._unique())

    @property
    def dtype_mix(self) -> dict[str, int]:
        from collections import Counter

        return dict(Counter(t.dtype for t in self.part).most_common())

    def _unique(self) -> list[TensorInfo]:
        names = {t.name for t in self.part}
        return [t for t in self.part if t.alias_of is None or t.alias_of not in names]


def match_any(name: str, patterns: list[str] | None) -> bool:
    """fnmatch against any pattern; a pattern without wildcards also matches as a prefix."""
    if not patterns:
        return True
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return True
        if not any(ch in p for ch in "*?[") and (name == p or name.startswith(p.rstrip("./") + ".")
                                                 or name.startswith(p.rstrip("./") + "/")):
            return True
    return False


def sort_tensors(tensors: list[TensorInfo], key: str) -> list[TensorInfo]:
    if key == "name":
        return sorted(tensors, key=lambda t: t.name)
    if key == "size":
        return sorted(tensors, key=lambda t: (-t.nbytes, t.name))
    return list(tensors)


def inspect(path: str | os.PathLike, filters: list[str] | None = None, sort: str = "order", *,
            key: str | None = None, all_: bool = False) -> Inspection:
    """The part of the checkpoint convert/average would take (ops/select.py): the model weights of
    a training checkpoint by default, `key`'s sub-tree, or everything with `all_`; then --filter
    (on the full name or the name relative to the part) and --sort."""
    from ckptctl.ops.select import select, under

    with open_reader(path) as reader:
        info = reader.info()
    part, kind, root = list(info.tensors), "all", ""
    if info.tensors and (key is not None or not all_):
        sel = select(info.tensors, key=key, all_=all_)
        part = [src for src, _out in sel.pairs]
        root = sel.root
        kind = "key" if key is not None else ("model" if len(part) < len(info.tensors) else "all")
    tensors = [t for t in part
               if match_any(t.name, filters) or (root and match_any(under(t.name, root) or "", filters))]
    return Inspection(info=info, tensors=sort_tensors(tensors, sort), dangerous=dangerous_globals(info),
                      part=part, part_kind=kind, root=root)


def dangerous_globals(info: CheckpointInfo) -> list[str]:
    if not info.globals:
        return []
    from ckptctl.ops.scan import classify

    return [g for g in info.globals if classify(g) == "dangerous"]


@dataclass
class TreeNode:
    name: str
    children: dict[str, TreeNode] = field(default_factory=dict)
    tensor: TensorInfo | None = None
    count: int = 0
    nbytes: int = 0
    numel: int = 0


def build_tree(tensors: list[TensorInfo]) -> TreeNode:
    """Group names by module prefix ('.' and '/' both separate levels) with subtotals."""
    import re

    root = TreeNode("")
    for t in tensors:
        parts = [p for p in re.split(r"[./]", t.name) if p != ""] or [t.name]
        node = root
        node.count += 1
        node.nbytes += t.nbytes
        node.numel += t.numel
        for part in parts[:-1]:
            node = node.children.setdefault(part, TreeNode(part))
            node.count += 1
            node.nbytes += t.nbytes
            node.numel += t.numel
        leaf = node.children.setdefault(parts[-1], TreeNode(parts[-1]))
        if leaf.tensor is not None:  # two names that split the same way ('a.b' and 'a/b')
            leaf = node.children.setdefault(t.name, TreeNode(t.name))
        leaf.tensor = t
        leaf.count = 1
        leaf.nbytes = t.nbytes
        leaf.numel = t.numel
    return root
