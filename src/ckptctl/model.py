"""The one small model of a checkpoint that every command is written against.

Built from metadata alone: nothing here holds tensor data.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_
from typing import Any


@dataclass(frozen=True, init=False)
class TensorInfo:
    """One named tensor as a file describes it.

    `nbytes` is the size of the tensor's logical (contiguous) value; `loc` is reader-private
    (where the bytes live); `alias_of` names an earlier tensor that is the very same tensor
    (tied weights: same storage, offset, shape and strides).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    alias_of: str | None = None
    loc: Any = field(default=None, compare=False, repr=False, hash=False)

    def __init__(
        self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, alias_of: str | None = None, loc: Any = None
    ) -> None:
        # what the generated __init__ does, half the cost: it calls object.__setattr__ per field
        # (frozen), ~0.8 µs a record; 10^5-10^6 records are built for one inspect (issue 13)
        d = self.__dict__
        d["name"] = name
        d["dtype"] = dtype
        d["shape"] = shape
        d["nbytes"] = nbytes
        d["alias_of"] = alias_of
        d["loc"] = loc

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "numel": self.numel,
        }
        if self.alias_of is not None:
            d["alias_of"] = self.alias_of
        return d


_SHAPE, _NBYTES, _DTYPE, _ALIAS_OF = (
    attrgetter("shape"),
    attrgetter("nbytes"),
    attrgetter("dtype"),
    attrgetter("alias_of"),
)


@dataclass(frozen=True)
class ObjectInfo:
    """A non-tensor object found in a pickle, shown by its class name, never imported."""

    name: str  # '/'-joined path in the checkpoint ('' for the root)
    type: str  # 'module.Class'

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type}


@dataclass
class CheckpointInfo:
    """What `inspect` shows, and what every other command walks."""

    path: str
    format: str  # safetensors | torch-zip | torch-legacy | hdf5 | sharded | dcp
    tensors: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    objects: list[ObjectInfo] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)  # 'module.name' a pickle asked for
    kind: str | None = None  # lightning | hf-trainer | keras2 | keras3 | hf-tf | ...
    files: list[str] = field(default_factory=list)  # every file of a multi-file checkpoint
    warnings: list[str] = field(default_factory=list)

    _index: tuple[list, int, dict[str, int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the name index: a cache, and it holds the list it was built from (with
        each TensorInfo's reader-private `loc`) even after `tensors` was replaced. `ls` sends
        infos back from its forked workers with `loc` stripped; the stale index made that fail
        (a lambda in a zip blob), and every Lightning .ckpt was read a second time in the parent."""
        state = dict(self.__dict__)
        state["_index"] = None
        return state

    def tensor(self, name: str) -> TensorInfo:
        """The first tensor named `name`; KeyError if none.

        Looked up in a name -> position index built on first use (a linear scan per lookup made
        sharded folders and diffs of 10^5 tensors quadratic, issue 13). `tensors` is a plain list
        callers may replace or extend, so the index is rebuilt when the list is another one or its
        length changed, and every hit is checked against the list (a stale one rebuilds it).
        Nothing in ckptctl assigns to tensors[i]; a miss in an index of this list is believed."""
        tensors = self.tensors
        for rebuild in (False, True):
            cached = self._index
            if rebuild or cached is None or cached[0] is not tensors or cached[1] != len(tensors):
                idx: dict[str, int] = {}
                for i, t in enumerate(tensors):
                    idx.setdefault(t.name, i)
                self._index = cached = (tensors, len(tensors), idx)
                rebuild = True
            pos = cached[2].get(name)
            if pos is None:
                break  # the index is of this very list: the name is not in it
            if tensors[pos].name == name:
                return tensors[pos]
            if rebuild:  # pragma: no cover - a fresh index always holds its own names
                break
        raise KeyError(name)

    # the totals below go over every tensor: written as C loops (map), 10^5 tensors (issue 13)
    @property
    def unique_tensors(self) -> list[TensorInfo]:
        tensors = self.tensors
        return list(compress(tensors, map(is_, map(_ALIAS_OF, tensors), repeat(None))))

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        """Elements in distinct tensors (tied weights count once)."""
        return sum(map(math.prod, map(_SHAPE, self.unique_tensors)))  # TensorInfo.numel of each

    @property
    def total_bytes(self) -> int:
        """Bytes of distinct tensors' values (tied weights count once)."""
        return sum(map(_NBYTES, self.unique_tensors))

    @property
    def dtype_mix(self) -> dict[str, int]:
        """dtype -> number of tensors, most common first."""
        return dict(Counter(map(_DTYPE, self.tensors)).most_common())

    def to_json(self, tensors: bool = True) -> dict[str, Any]:
        """The document `inspect --format json` starts from; without `tensors` (a caller that puts
        its own rows there) the per-tensor part is left empty rather than built and dropped."""
        return {
            "path": self.path,
            "format": self.format,
            "kind": self.kind,
            "num_tensors": self.num_tensors,
            "num_params": self.num_params,
            "total_bytes": self.total_bytes,
            "dtypes": self.dtype_mix,
            "metadata": self.metadata,
            "objects": [o.to_json() for o in self.objects],
            "files": self.files,
            "warnings": self.warnings,
            "tensors": [t.to_json() for t in self.tensors] if tensors else [],
        }
