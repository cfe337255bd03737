"""The inert records the restricted unpickler builds instead of importing and calling globals,
and the error it raises. Nothing here runs code from a pickle."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from ckptctl import dtypes
from ckptctl.errors import CorruptFile


class PickleError(CorruptFile):
    """A pickle that does not hold together; `.globals` lists what it asked for before that.

    `.more_globals` lists names that a plain opcode listing (picklescan's way: no semantics)
    finds in the rest of the failing pickle: a loader more lenient than ours could reach them.
    """

    def __init__(
        self,
        message: str,
        path=None,
        globals: list[str] | None = None,
        pos: int | None = None,
        more_globals: list[str] | None = None,
    ):
        super().__init__(message, path)
        self.globals = list(globals or [])
        self.pos = pos
        self.more_globals = list(more_globals or [])
        self.more_pairs: list[tuple[str, str]] = []  # more_globals as (module, name)


class MachineLike(Protocol):
    """What the rebuild tables use of the machine (machine.Machine)."""

    warnings: list[str]
    nested: list[tuple[str, Any]]

    def _fail(self, msg: str, pos: int | None = None) -> NoReturn: ...
    def _call(self, func: Any, args: Any) -> Any: ...
    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any: ...
    def _build(self, inst: Any, state: Any) -> None: ...
    def _check_key(self, k: Any) -> None: ...


# ---- inert records ---------------------------------------------------------------------------
class Global:
    """A global the pickle asked for. Never imported; identity-hashed."""

    __slots__ = ("module", "name", "full")

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name
        self.full = f"{module}.{name}" if module else name


class Opaque:
    """An object of a class we do not import: its type name and whatever the pickle gave it."""

    __slots__ = ("type", "args", "kwargs", "state", "items", "dictitems", "__weakref__")

    def __init__(self, type_: str, args: tuple = (), kwargs: dict | None = None):
        self.type = type_
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: list | None = None
        self.dictitems: list | None = None

    def fields(self) -> dict:
        """The object's attributes: BUILD state dict (or the dict part of (dict, slots))."""
        out: dict = {}
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
            for part in st:
                if isinstance(part, dict):
                    out.update(part)
        elif isinstance(st, dict):
            out.update(st)
        if self.kwargs:
            for k, v in self.kwargs.items():
                out.setdefault(k, v)
        return out


class ODict(dict):
    """collections.OrderedDict (and defaultdict): a dict that also keeps its BUILD state."""

    pickle_state: Any = None
    pickle_type: str = "collections.OrderedDict"


@dataclass(frozen=True, eq=False)
class Span:
    """Bytes that stay in the file: `length` bytes at absolute `offset`."""

    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(eq=False)
class StorageRef:
    """A storage a persistent id names. `dtype` is the storage's element type; `numel` counts those."""

    key: str
    dtype: str
    numel: int
    location: str = ""
    view_offset: int = 0  # legacy storage views: element offset into the root storage
    view_numel: int | None = None
    extra: Any = None  # reader-private (where the bytes are)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.BY_NAME[self.dtype].itemsize


@dataclass(eq=False)
class TensorRecord:
    storage: StorageRef | None  # None: a tensor without data (meta / unknown storage)
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    qparams: Any = None
    note: str | None = None  # why it has no data


@dataclass(eq=False)
class NumpyDtype:
    code: str  # 'f4', 'i8', 'b1', 'V16', 'O8', ...
    byteorder: str = "="

    @property
    def kind(self) -> str:
        return self.code[:1]


@dataclass(eq=False)
class NumpyArray:
    shape: tuple[int, ...] = ()
    dtype: NumpyDtype | None = None
    fortran: bool = False
    data: Any = None  # bytes | Span | list (object arrays) | None before BUILD


@dataclass(eq=False)
class NumpyScalar:
    dtype: NumpyDtype | None
    data: bytes | bytearray | None

    def value(self) -> Any:
        return _numpy_scalar_value(self.dtype, self.data)


class PersistentRef:
    """A persistent id nobody resolved (a plain pickle that refers to outside data)."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any):
        self.pid = pid


_NUMPY_CODES = {
    "b1": "bool",
    "i1": "int8",
    "u1": "uint8",
    "i2": "int16",
    "u2": "uint16",
    "i4": "int32",
    "u4": "uint32",
    "i8": "int64",
    "u8": "uint64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "c8": "complex64",
    "c16": "complex128",
}
_STRUCT = {
    "b1": "?",
    "i1": "b",
    "u1": "B",
    "i2": "h",
    "u2": "H",
    "i4": "i",
    "u4": "I",
    "i8": "q",
    "u8": "Q",
    "f2": "e",
    "f4": "f",
    "f8": "d",
}


def numpy_torch_dtype(dt: NumpyDtype | None) -> str | None:
    """torch dtype name of a numpy dtype code, or None (strings, objects, records)."""
    if dt is None:
        return None
    return _NUMPY_CODES.get(dt.code)


def _numpy_scalar_value(dt: NumpyDtype | None, data: Any) -> Any:
    if dt is None or not isinstance(data, (bytes, bytearray)):
        return None
    code = dt.code
    bo = ">" if dt.byteorder == ">" else "<"
    try:
        if code in _STRUCT:
            v = struct.unpack(bo + _STRUCT[code], bytes(data))[0]
            return v
        if code in ("c8", "c16"):
            f = "f" if code == "c8" else "d"
            re_, im = struct.unpack(bo + f + f, bytes(data))
            return complex(re_, im)
    except struct.error:
        return None
    return None


TENSORISH = (TensorRecord, NumpyArray)


def _kind(x: Any) -> str:
    if isinstance(x, Global):
        return f"global {x.full}"
    if isinstance(x, Opaque):
        return f"{x.type} object"
    return type(x).__name__


def _ints(x: Any, what: str, m: MachineLike) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)):
        m._fail(f"{what} is a {_kind(x)}, not a tuple of ints")
    for v in x:
        if type(v) is not int or v < 0:
            m._fail(f"{what} holds {v!r:.40}, not a non-negative int")
    return tuple(x)
