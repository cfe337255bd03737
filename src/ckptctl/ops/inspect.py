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
    tensors: list[TensorInfo]  # after --filter and --sort
    dangerous: list[str] = field(default_factory=list)  # globals that could run code


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


def inspect(path: str | os.PathLike, filters: list[str] | None = None, sort: str = "order") -> Inspection:
    with open_reader(path) as reader:
        info = reader.info()
    tensors = [t for t in info.tensors if match_any(t.name, filters)]
    return Inspection(info=info, tensors=sort_tensors(tensors, sort), dangerous=dangerous_globals(info))


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
