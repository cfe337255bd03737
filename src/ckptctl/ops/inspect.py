"""inspect: the metadata of one checkpoint, filtered and sorted. Pure: no printing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import repeat
from math import prod
from operator import attrgetter, is_not, itemgetter

from ckptctl.formats import open_reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.ops.select import match_any  # noqa: F401 - re-exported: defined with the selection rules

_NAME, _SHAPE, _NBYTES = attrgetter("name"), attrgetter("shape"), attrgetter("nbytes")
_DTYPE, _ALIAS_OF = attrgetter("dtype"), attrgetter("alias_of")
_FIRST = itemgetter(0)


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
        return sum(map(prod, map(_SHAPE, self._unique())))  # TensorInfo.numel of each

    @property
    def total_bytes(self) -> int:
        return sum(map(_NBYTES, self._unique()))

    @property
    def dtype_mix(self) -> dict[str, int]:
        from collections import Counter

        return dict(Counter(map(_DTYPE, self.part)).most_common())

    def _unique(self) -> list[TensorInfo]:
        part = self.part
        if not any(map(is_not, map(_ALIAS_OF, part), repeat(None))):
            return part  # no tied weight (10^5 tensors: no set of their names)
        names = {t.name for t in part}
        return [t for t in part if t.alias_of is None or t.alias_of not in names]


def sort_tensors(tensors: list[TensorInfo], key: str) -> list[TensorInfo]:
    if key == "name":
        return sorted(tensors, key=_NAME)
    if key == "size":
        return sorted(tensors, key=lambda t: (-t.nbytes, t.name))
    return list(tensors)


def inspect(
    path: str | os.PathLike,
    filters: list[str] | None = None,
    sort: str = "order",
    *,
    key: str | None = None,
    all_: bool = False,
) -> Inspection:
    """The part of the checkpoint convert/average would take (ops/select.py): the model weights of
    a training checkpoint by default, `key`'s sub-tree, or everything with `all_`; then --filter
    (on the full name or the name relative to the part) and --sort."""
    from ckptctl.ops.select import select, under

    with open_reader(path) as reader:
        info = reader.info()
    part, kind, root = list(info.tensors), "all", ""
    if info.tensors and key is None and not all_ and _plain_model(info.tensors):
        pass  # what select() would give: every tensor, without building 10^5 renamed copies
    elif info.tensors and (key is not None or not all_):
        sel = select(info.tensors, key=key, all_=all_)
        part = [src for src, _out in sel.pairs]
        root = sel.root
        kind = "key" if key is not None else ("model" if len(part) < len(info.tensors) else "all")
    tensors = (
        [t for t in part if match_any(t.name, filters) or (root and match_any(under(t.name, root) or "", filters))]
        if filters
        else part  # (match_any without patterns: every name)
    )
    return Inspection(
        info=info,
        tensors=sort_tensors(tensors, sort),
        dangerous=dangerous_globals(info),
        part=part,
        part_kind=kind,
        root=root,
    )


def _plain_model(tensors: list[TensorInfo]) -> bool:
    """True when the default part (ops/select.py) is every tensor as it is: no training layout
    (state_dict/, optimizer state) and no name twice (select() would refuse a clash)."""
    from ckptctl.ops.select import default_part

    names = list(map(_NAME, tensors))
    root, left = default_part(names)
    return not root and not left and len(set(names)) == len(names)


def dangerous_globals(info: CheckpointInfo) -> list[str]:
    if not info.globals:
        return []
    from ckptctl.formats.pickles.safety import classify

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
        # a tied weight is listed under its own name but its bytes and elements are counted once,
        # where the tensor it ties to is (as the header's totals and `CheckpointInfo` count them)
        nbytes, numel = (0, 0) if t.alias_of is not None else (t.nbytes, t.numel)
        node = root
        node.count += 1
        node.nbytes += nbytes
        node.numel += numel
        for part in parts[:-1]:
            node = node.children.setdefault(part, TreeNode(part))
            node.count += 1
            node.nbytes += nbytes
            node.numel += numel
        leaf = node.children.setdefault(parts[-1], TreeNode(parts[-1]))
        if leaf.tensor is not None:  # two names that split the same way ('a.b' and 'a/b')
            leaf = node.children.setdefault(t.name, TreeNode(t.name))
        leaf.tensor = t
        leaf.count = 1
        leaf.nbytes = t.nbytes
        leaf.numel = t.numel
    return root


# ---- folding repeated structure (inspect's table and markdown) ------------------------------------
@dataclass
class Fold:
    """One table row standing for `tensors`: names that differ only in whole-number components,
    with one dtype and one shape (and no tied weights). `name` writes the numbers that vary as
    `{0..59}` / `{0..6,8..255}`; the members are exactly the product of those sets."""

    name: str
    tensors: list[TensorInfo]

    @property
    def count(self) -> int:
        return len(self.tensors)

    def row(self) -> dict:
        t = self.tensors[0]
        if len(self.tensors) == 1:
            return {**t.to_json(), "count": 1}
        return {
            "name": self.name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "count": len(self.tensors),
            "numel": sum(map(prod, map(_SHAPE, self.tensors))),  # TensorInfo.numel of each
            "nbytes": sum(map(_NBYTES, self.tensors)),
            "alias_of": None,
        }


def _index_sets_text(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '{0..2,5,7,8}'; one value -> '5'."""
    if len(values) == 1:
        return str(values[0])
    runs: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start},{prev}" if prev == start + 1 else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(runs) + "}"


def _fold_group(members: list[tuple[tuple[int, ...], int]], k: int) -> list[tuple[list[list[int]], list[int]]]:
    """members: (index tuple, position in the table). Pieces (index sets per position, positions)
    whose index tuples are exactly the product of the sets: split on the first position that
    varies when the whole is not a product, fold each part, and merge the parts that came out
    alike."""
    tuples = list(map(_FIRST, members))
    sets = [sorted(set(map(itemgetter(i), tuples))) for i in range(k)]  # (C loops: 10^5 members)
    size = 1
    for s in sets:
        size *= len(s)
    if size == len(members):
        return [(sets, [m[1] for m in members])]
    i = next((j for j in range(k) if len(sets[j]) > 1), None)
    if i is None:  # the same name twice: no folding
        return [([[v] for v in m[0]], [m[1]]) for m in members]
    parts: dict[int, list] = {}
    for m in members:
        parts.setdefault(m[0][i], []).append(m)
    merged: dict[tuple, tuple[list[list[int]], list[int]]] = {}
    for v in sorted(parts):
        for psets, pos in _fold_group(parts[v], k):
            rest = tuple(tuple(s) for j, s in enumerate(psets) if j != i)
            got = merged.get(rest)
            if got is None:
                merged[rest] = (psets, list(pos))
            else:
                got[0][i] = sorted(set(got[0][i]) | set(psets[i]))
                got[1].extend(pos)
    return list(merged.values())


_NUMBER = None  # re: a whole '.'/'/'-separated component that is a number without leading zeros


def fold(tensors: list[TensorInfo]) -> list[Fold]:
    """Rows for a table of `tensors`: those whose names differ only in whole-number components
    ('.'/'/'-separated, written without leading zeros) and that share dtype and shape folded into
    one row (tied weights never fold), at the place of their first member; order kept."""
    global _NUMBER
    if _NUMBER is None:
        import re

        _NUMBER = re.compile(r"(?:(?<=[./])|^)(0|[1-9][0-9]*)(?=[./]|$)")
    split = _NUMBER.split  # one pass: [text, number, text, number, ..., text]
    groups: dict[tuple, list[tuple[tuple[int, ...], int]]] = {}
    slots: list[tuple | None] = []  # per position: its group's key, or None for a row of its own
    for pos, t in enumerate(tensors):
        name = t.name
        parts = split(name) if t.alias_of is None and "\0" not in name else None
        if parts is None or len(parts) == 1:  # no number (or tied, or a NUL in the name): a row of its own
            slots.append(None)
            continue
        key = ("\0".join(parts[0::2]), t.dtype, t.shape)
        groups.setdefault(key, []).append((tuple(map(int, parts[1::2])), pos))
        slots.append(key)
    first: dict[int, Fold] = {}  # position of a row's first member -> the row
    for key, members in groups.items():
        pieces = key[0].split("\0")
        for sets, positions in _fold_group(members, len(pieces) - 1):
            positions.sort()
            members_t = [tensors[p] for p in positions]
            if len(members_t) == 1:
                name = members_t[0].name
            else:
                name = pieces[0] + "".join(_index_sets_text(s) + p for s, p in zip(sets, pieces[1:]))
            first[positions[0]] = Fold(name, members_t)
    out: list[Fold] = []
    for pos, t in enumerate(tensors):
        if slots[pos] is None:
            out.append(Fold(t.name, [t]))
        elif pos in first:
            out.append(first[pos])
    return out
