"""What REDUCE, NEWOBJ, BUILD, SETITEM(S), APPEND(S) and persistent ids mean to the machine: calls
of globals go to the rebuild tables (torch, numpy, Python builtins); anything else becomes an inert
`Opaque`. Loaders called on data the pickle carries are remembered (`Machine.nested`)."""

from __future__ import annotations

from typing import Any

from ckptctl.formats.pickles.rebuild_builtins import HANDLERS as _BUILTINS_HANDLERS
from ckptctl.formats.pickles.rebuild_numpy import HANDLERS as _NUMPY_HANDLERS
from ckptctl.formats.pickles.rebuild_numpy import _numpy_build
from ckptctl.formats.pickles.rebuild_torch import HANDLERS as _TORCH_HANDLERS
from ckptctl.formats.pickles.records import (
    Global,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    ODict,
    Opaque,
    PersistentRef,
    Span,
    StorageRef,
    TensorRecord,
    _kind,
)

MAX_KEY_DEPTH = 100  # nesting of tuples used as dict keys / set items (C hashing recurses)

# every global the machine rebuilds, by 'module.name'
_HANDLERS: dict[str, Any] = {**_TORCH_HANDLERS, **_BUILTINS_HANDLERS, **_NUMPY_HANDLERS}
HANDLERS = _HANDLERS


# Calls that unpickle data the pickle itself carries. Their argument, when a constant, is a whole
# nested pickle (or torch archive) that `scan` walks; the calls themselves are classified by name.
NESTED_LOADERS = frozenset(
    {
        "pickle.loads",
        "pickle.load",
        "pickle._loads",
        "pickle._load",
        "_pickle.loads",
        "_pickle.load",
        "cPickle.loads",
        "cPickle.load",
        "dill.loads",
        "dill.load",
        "dill._dill.loads",
        "dill._dill.load",
        "cloudpickle.loads",
        "cloudpickle.load",
        "cloudpickle.cloudpickle.loads",
        "torch.storage._load_from_bytes",
        "torch.load",
        "torch.serialization.load",
        "numpy.loads",
        "numpy.load",
        "joblib.load",
        "pandas.read_pickle",
        "pandas.io.pickle.read_pickle",
        "pickle.Unpickler",
        "_pickle.Unpickler",
    }
)


def nested_payload(arg: Any) -> bytes | Span | None:
    """The bytes a loader would unpickle: a bytes constant, or a BytesIO built from one."""
    if isinstance(arg, (bytes, bytearray)):
        return bytes(arg)
    if isinstance(arg, Span):
        return arg
    if isinstance(arg, str):
        return arg.encode("latin1", "replace")  # python-2 pickles' byte strings
    if isinstance(arg, Opaque) and arg.type in ("io.BytesIO", "_io.BytesIO"):
        if arg.args:
            return nested_payload(arg.args[0])
        if isinstance(arg.state, tuple) and arg.state:  # BytesIO.__getstate__: (value, pos, dict)
            return nested_payload(arg.state[0])
    return None


class Semantics:
    """The meaning of the opcodes that build objects (a mixin of Machine: it supplies `_fail`,
    `persistent_load`, `nested` and `warnings`)."""

    persistent_load: Any
    nested: list[tuple[str, Any]]
    warnings: list[str]

    def _fail(self, msg: str, pos: int | None = None):
        raise NotImplementedError

    def _check_key(self, k: Any) -> None:
        """Only hash what cannot run away: flat-enough tuples of hashable records and scalars."""
        t = type(k)
        if t in (str, int, float, bool, bytes, type(None), complex):
            return
        if t is tuple or t is frozenset:
            _check_depth(k, 0, self)
            return
        if isinstance(
            k,
            (Global, Opaque, TensorRecord, StorageRef, NumpyArray, NumpyScalar, NumpyDtype, Span, PersistentRef, slice),
        ):
            return
        self._fail(f"unhashable {t.__name__} used as a dict key or set item")

    def _setitems(self, target: Any, items: list) -> None:
        if len(items) % 2:
            self._fail("SETITEMS with an odd number of items")
        if isinstance(target, dict):
            for i in range(0, len(items), 2):
                k = items[i]
                if type(k) is not str:
                    self._check_key(k)
                target[k] = items[i + 1]
        elif isinstance(target, Opaque):
            if target.dictitems is None:
                target.dictitems = []
            for i in range(0, len(items), 2):
                target.dictitems.append((items[i], items[i + 1]))
        else:
            self._fail(f"SETITEM on a {_kind(target)}")

    def _extend(self, target: Any, items: list) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Opaque):
            target.items = (target.items or []) + list(items)
        else:
            self._fail(f"APPEND on a {_kind(target)}")

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            return PersistentRef(pid)
        return self.persistent_load(pid)

    def _build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, Opaque):
            if isinstance(inst.state, dict) and isinstance(state, dict):
                inst.state.update(state)
            else:
                inst.state = state
        elif isinstance(inst, NumpyArray):
            _numpy_build(self, inst, state)
        elif isinstance(inst, NumpyDtype):
            if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
                inst.byteorder = state[1]
        elif isinstance(inst, ODict):
            inst.pickle_state = state
        elif isinstance(inst, (TensorRecord, NumpyScalar)):
            pass  # tensor subclasses' python attributes: nothing we show
        else:
            self._fail(f"BUILD on a {_kind(inst)}")

    def _handler(self, func: Any) -> Any:
        """The rebuild handler `_call(func, args)` comes down to, when that is all it does (a global
        with a handler, not a loader of nested pickles): handler(self, func, args, None); else None."""
        if type(func) is Global and func.full not in NESTED_LOADERS:
            return _HANDLERS.get(func.full)
        return None

    def _call(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            self._fail(f"REDUCE with {_kind(args)} arguments")
        if isinstance(func, Global):
            if func.full in NESTED_LOADERS:
                self._nested(func.full, args, None)
            h = _HANDLERS.get(func.full)
            if h is not None:
                return h(self, func, args, None)
            return Opaque(func.full, args)
        if isinstance(func, Opaque):
            return Opaque(f"{func.type}(...)", args)
        self._fail(f"REDUCE calls a {_kind(func)}")

    def _nested(self, who: str, args: tuple, kwargs: Any) -> None:
        """A loader called on data of this pickle: remember the payload (a nested pickle)."""
        arg = args[0] if args else None
        if arg is None and isinstance(kwargs, dict):
            arg = next((v for k, v in kwargs.items() if k in ("data", "b", "f", "file", "str", "s")), None)
        if isinstance(arg, str) and not who.endswith(("loads", "_load_from_bytes")):
            arg = None  # torch.load('other.pt'): a file name, not data (the loader is flagged by name)
        self.nested.append((who, nested_payload(arg)))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if type(args) is not tuple:
            self._fail(f"NEWOBJ with {_kind(args)} arguments")
        if kwargs is not None and not isinstance(kwargs, dict):
            self._fail("NEWOBJ_EX with non-dict keyword arguments")
        if isinstance(cls, Global):
            if cls.full in NESTED_LOADERS:
                self._nested(cls.full, args, kwargs)
            h = _HANDLERS.get(cls.full)
            if h is not None:
                return h(self, cls, args, kwargs)
            return Opaque(cls.full, args, kwargs)
        if isinstance(cls, Opaque):
            return Opaque(cls.type, args, kwargs)
        self._fail(f"NEWOBJ on a {_kind(cls)}")


def _check_depth(k: Any, depth: int, m: Semantics) -> None:
    if depth > MAX_KEY_DEPTH:
        m._fail("a dict key nested too deeply")
    for it in k:
        if type(it) is tuple or type(it) is frozenset:
            _check_depth(it, depth + 1, m)
        elif isinstance(it, (list, dict, set, bytearray)):
            m._fail(f"unhashable {type(it).__name__} inside a dict key")
