"""describe(): walk an unpickled object for its tensors (with '/'-joined names and tied weights),
opaque objects, file-level metadata and checkpoint kind; render() for JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import CorruptFile
from ckptctl.formats.pickles.modules import (
    _COMPILE_WRAPPERS,
    _DATA_PARALLEL,
    _WRAPPER_PREFIXES,
    _class_name,
    _ModuleView,
    is_module,
    is_optimizer,
    wrapper_hint,
)
from ckptctl.formats.pickles.records import (
    TENSORISH,
    Global,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    Opaque,
    PersistentRef,
    Span,
    TensorRecord,
    _kind,
    numpy_torch_dtype,
)

MAX_WALK_DEPTH = 400  # nesting of containers that describe() follows
MAX_WALK_NODES = 5_000_000  # objects describe() visits (shared references can explode)
MAX_OBJECTS = 500  # opaque objects listed in CheckpointInfo.objects
_SEVERAL = object()  # a storage with more than one tensor: its views are in _Walker.seen_view


@dataclass
class Described:
    tensors: list[tuple[str, Any, str | None]] = field(default_factory=list)  # (name, record, alias_of)
    objects: list[tuple[str, str]] = field(default_factory=list)  # (path, type)
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    warnings: list[str] = field(default_factory=list)


def _key_str(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None or isinstance(k, (int, float)):
        return str(k)
    if isinstance(k, bytes):
        return k.decode("utf-8", "replace")
    if isinstance(k, tuple):
        return "(" + ", ".join(_key_str(x) for x in k) + ")"
    if isinstance(k, Global):
        return k.full
    if isinstance(k, Opaque):
        return f"<{k.type}>"
    return f"<{type(k).__name__}>"


class _Walker:
    def __init__(self, path=None, raw_names: bool = False, torchscript: dict | None = None):
        self.path = path
        self.raw = raw_names
        self.ts = torchscript  # TorchScript class declarations (see torchscript_decls), or None
        self.views: list[_ModuleView] = []
        self.out = Described()
        self.seen_tensor: dict[int, str] = {}  # id(record) -> first name
        self.seen_view: dict[tuple, str] = {}  # (storage, dtype, offset, shape, stride) -> first name
        self.storage_first: dict[int, Any] = {}  # id(storage) -> (name, record) of its first tensor, or _SEVERAL
        self.seen_obj: set[int] = set()
        self.nodes = 0
        self.more_objects = 0
        self.names: set[str] = set()

    def tensor(self, name: str, rec: Any) -> None:
        alias = self.seen_tensor.get(id(rec))
        if alias is None and isinstance(rec, TensorRecord) and rec.storage is not None:
            # a storage's first tensor is only remembered; views are compared from its second on
            # (10^5 storages of one tensor each at MoE scale: no 5-tuple key for them)
            sid = id(rec.storage)
            first = self.storage_first.get(sid)
            if first is None:
                self.storage_first[sid] = (name, rec)
            else:
                if first is not _SEVERAL:
                    fname, frec = first
                    self.seen_view[(sid, frec.dtype, frec.offset, frec.shape, frec.stride)] = fname
                    self.storage_first[sid] = _SEVERAL
                key = (sid, rec.dtype, rec.offset, rec.shape, rec.stride)
                alias = self.seen_view.get(key)
                if alias is None:
                    self.seen_view[key] = name
        if alias is None:
            self.seen_tensor[id(rec)] = name
        if name in self.names:  # two paths that print the same ('a/b' key vs nested a -> b)
            i = 2
            while f"{name}#{i}" in self.names:
                i += 1
            name = f"{name}#{i}"
        self.names.add(name)
        self.out.tensors.append((name, rec, alias))

    def walk(self, obj: Any, parts: list[str], ancestors: set[int], depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_WALK_NODES:
            raise CorruptFile(
                f"the pickle's object graph is too large to list (over {MAX_WALK_NODES:,} objects "
                "through shared references)",
                self.path,
            )
        if isinstance(obj, TENSORISH):
            if isinstance(obj, NumpyArray) and numpy_torch_dtype(obj.dtype) is None:
                self.obj(parts, f"numpy.ndarray[{obj.dtype.code if obj.dtype else '?'}]", obj)
                return
            self.tensor("/".join(parts) if parts else "tensor", obj)
            return
        t = type(obj)
        if t in (str, int, float, bool, bytes, type(None), complex, Span, Global, NumpyScalar, NumpyDtype):
            return
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the pickle nests objects deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(obj)
        if oid in ancestors:
            return  # a cycle
        ancestors.add(oid)
        try:
            if isinstance(obj, dict):
                base = "/".join(parts) + "/" if parts else ""
                for k, v in obj.items():
                    if type(v) is TensorRecord:  # a state_dict's tensor: what walk(v, ...) would do, inline
                        self.nodes += 1
                        if self.nodes > MAX_WALK_NODES:
                            self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)  # raises
                        self.tensor(base + (k if type(k) is str else _key_str(k)), v)
                        continue
                    if _is_leaf(v):
                        continue
                    self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
            elif t is list or t is tuple:
                for i, v in enumerate(obj):
                    if _is_leaf(v):
                        continue
                    self.walk(v, parts + [str(i)], ancestors, depth + 1)
            elif isinstance(obj, Opaque):
                if not self.raw and self.special(obj, parts, ancestors, depth):
                    return
                self.obj(parts, obj.type, obj)
                for k, v in obj.fields().items():
                    if not _is_leaf(v):
                        self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
                for i, v in enumerate(obj.args or ()):
                    if not _is_leaf(v):
                        self.walk(v, parts + [f"args/{i}"], ancestors, depth + 1)
                for i, v in enumerate(obj.items or ()):
                    if not _is_leaf(v):
                        self.walk(v, parts + [str(i)], ancestors, depth + 1)
                for k, v in obj.dictitems or ():
                    if not _is_leaf(v):
                        self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
                st = obj.state
                if (
                    st is not None
                    and not isinstance(st, dict)
                    and not (isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)))
                ):
                    if not _is_leaf(st):
                        self.walk(st, parts + ["state"], ancestors, depth + 1)
            elif isinstance(obj, (set, frozenset)):
                pass
            elif isinstance(obj, PersistentRef):
                self.obj(parts, "<persistent id>", obj)
        finally:
            ancestors.discard(oid)

    def obj(self, parts: list[str], type_: str, obj: Any) -> None:
        if id(obj) in self.seen_obj:
            return
        self.seen_obj.add(id(obj))
        if len(self.out.objects) >= MAX_OBJECTS:
            self.more_objects += 1
            return
        self.out.objects.append(("/".join(parts), type_))

    # -- whole nn.Module pickles, optimizers and TorchScript modules: state_dict() names ----------
    def special(self, obj: Opaque, parts: list[str], ancestors: set[int], depth: int) -> bool:
        """List obj under the names its own state_dict() gives, when it is a module (eager or
        TorchScript), a torch.compile wrapper or an optimizer. False: walk it as any object."""
        ancestors.discard(id(obj))  # walk() marked it; the module walk marks it again
        if self.ts is not None and obj.type.startswith("__torch__.") and self.ts_is_module(obj):
            view = _ModuleView(parts, "torchscript")
            self.views.append(view)
            self.ts_module(obj, view, "", ancestors, depth, None)
            return True
        if is_module(obj):
            view = _ModuleView(parts, "module")
            self.views.append(view)
            self.module(obj, view, "", ancestors, depth, None)
            return True
        if obj.type in _COMPILE_WRAPPERS and obj.args and is_module(obj.args[0]):
            # torch.save(torch.compile(m)) pickles OptimizedModule(m, context): its state_dict()
            # names are m's under `_orig_mod.`
            view = _ModuleView(parts, "module")
            self.views.append(view)
            view.add_module("", obj.type, obj, None)
            self.obj(parts, obj.type, obj)
            self.module(obj.args[0], view, "_orig_mod.", ancestors, depth + 1, view.training.get(""))
            return True
        if is_optimizer(obj):
            self.optimizer(obj, parts, ancestors, depth)
            return True
        return False

    def _full(self, view: _ModuleView, name: str) -> str:
        return "/".join(view.parts + [name]) if view.parts else name

    def module(
        self, mod: Opaque, view: _ModuleView, prefix: str, ancestors: set[int], depth: int, parent_training: Any
    ) -> None:
        """What nn.Module.state_dict() does: own parameters (None skipped), persistent buffers,
        then each child under `name.`; a module reached twice is listed twice, like torch does."""
        self.nodes += 1
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the pickle nests modules deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(mod)
        if oid in ancestors:
            return  # a module that contains itself: torch's state_dict() would recurse forever
        ancestors.add(oid)
        try:
            f = mod.fields()
            view.add_module(prefix, mod.type, mod, parent_training)
            self.obj(view.parts + ([prefix[:-1]] if prefix else []), mod.type, mod)
            nonpersistent = f.get("_non_persistent_buffers_set")
            nonpersistent = nonpersistent if isinstance(nonpersistent, (set, frozenset)) else set()
            for group in ("_parameters", "_buffers"):
                for k, v in f[group].items():
                    name = prefix + _key_str(k)
                    if v is None:
                        continue
                    if group == "_buffers" and k in nonpersistent:
                        view.nonpersistent.append(name)
                        continue
                    if isinstance(v, TENSORISH):
                        self.tensor(self._full(view, name), v)
                    else:
                        view.odd.append(f"{name} ({_kind(v)})")
            for k, v in f.items():
                if isinstance(k, str) and isinstance(v, TENSORISH):
                    view.attributes.append(prefix + k)
            for k, child in f["_modules"].items():
                if child is None:
                    continue
                name = prefix + _key_str(k)
                if is_module(child):
                    self.module(child, view, name + ".", ancestors, depth + 1, view.training.get(prefix))
                elif not _is_leaf(child):
                    self.walk(child, view.parts + [name], ancestors, depth + 1)
        finally:
            ancestors.discard(oid)

    def ts_is_module(self, obj: Opaque) -> bool:
        decl = self.ts.get(obj.type) if self.ts else None
        if decl is not None:
            return decl.is_module
        st = obj.state
        return isinstance(st, dict) and "training" in st

    def ts_module(
        self, mod: Opaque, view: _ModuleView, prefix: str, ancestors: set[int], depth: int, parent_training: Any
    ) -> None:
        """A TorchScript module object of data.pkl: attributes in its state; which tensors are
        parameters and buffers comes from the class's `__parameters__`/`__buffers__` lines."""
        assert self.ts is not None  # only TorchScript archives have TorchScript modules
        self.nodes += 1
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the archive nests modules deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(mod)
        if oid in ancestors:
            return
        ancestors.add(oid)
        try:
            decl = self.ts.get(mod.type)
            st = mod.state
            view.add_module(prefix, mod.type, mod, parent_training, decl)
            self.obj(view.parts + ([prefix[:-1]] if prefix else []), mod.type, mod)
            if not isinstance(st, dict):  # a class with its own __getstate__: listed as it is
                if st is not None and not _is_leaf(st):
                    self.walk(st, view.parts + [prefix + "state" if prefix else "state"], ancestors, depth + 1)
                return
            if decl is not None:
                order = [k for k in decl.parameters + decl.buffers if k in st]
            else:
                order = [k for k, v in st.items() if isinstance(v, TENSORISH)]
            for k in order:
                v = st[k]
                if v is None:
                    continue
                if isinstance(v, TENSORISH):
                    self.tensor(self._full(view, prefix + k), v)
                    if decl is not None and k in decl.buffers and not mod.type.startswith("__torch__.torch."):
                        view.user_buffers.append(prefix + k)
                else:
                    view.odd.append(f"{prefix}{k} ({_kind(v)})")
            chosen = set(order)
            for k, v in st.items():
                if not isinstance(k, str) or k in chosen:
                    continue
                name = prefix + k
                if isinstance(v, TENSORISH):
                    view.attributes.append(name)
                elif isinstance(v, Opaque) and v.type.startswith("__torch__.") and self.ts_is_module(v):
                    self.ts_module(v, view, name + ".", ancestors, depth + 1, view.training.get(prefix))
        finally:
            ancestors.discard(oid)

    def optimizer(self, opt: Opaque, parts: list[str], ancestors: set[int], depth: int) -> None:
        """torch.save(optimizer): named like optimizer.state_dict() (`state/<i>/exp_avg`, the
        parameters numbered in param_groups order); the parameters themselves as `params/<i>`."""
        f = opt.fields()
        self.obj(parts, opt.type, opt)
        index: dict[int, int] = {}
        params: list[Any] = []
        groups = []
        for g in f["param_groups"]:
            if not isinstance(g, dict):
                continue
            ids = []
            for p in g.get("params") or ():
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                ids.append(index[id(p)])
            groups.append({**{_key_str(k): render(v) for k, v in g.items() if k != "params"}, "params": ids})
        base = parts
        state = f["state"]
        for p, st in state.items():
            i = index.get(id(p))
            key = str(i) if i is not None else _key_str(p)
            self.walk(st, base + ["state", key], ancestors, depth + 1)
        for i, p in enumerate(params):
            if isinstance(p, TENSORISH):
                self.tensor("/".join(base + ["params", str(i)]), p)
        label = "/".join(base + ["optimizer"]) if base else "optimizer"
        self.out.metadata[label] = _class_name(opt.type)
        self.out.metadata[("/".join(base) + "/" if base else "") + "param_groups"] = groups
        if params:
            self.out.warnings.append(
                f"{'/'.join(base) + ': ' if base else ''}a whole pickled optimizer: its state is listed under "
                f"optimizer.state_dict() names (state/<i>/...); the {len(params)} parameters it also holds "
                "are listed as params/<i>"
            )


def _names_note(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _finish_view(out: Described, view: _ModuleView, names: list[str]) -> None:
    """Metadata (classes, hyper-attributes, training) and notes of one module tree."""
    base = "/".join(view.parts) + "/" if view.parts else ""
    where = f"{base.rstrip('/')}: " if base else ""
    for path, text in view.modules:
        out.metadata[base + "module" + (f"/{path}" if path else "")] = text
    if view.more_modules:
        out.warnings.append(f"{where}{view.more_modules} more modules are not described in the metadata")
    if view.nonpersistent:
        out.warnings.append(
            f"{where}{len(view.nonpersistent)} non-persistent buffer(s) left out, as state_dict() does: "
            f"{_names_note(view.nonpersistent)} (--raw-names lists them)"
        )
    if view.attributes:
        out.warnings.append(
            f"{where}{len(view.attributes)} tensor attribute(s) that are neither parameters nor buffers left "
            f"out, as state_dict() does: {_names_note(view.attributes)} (--raw-names lists them)"
        )
    if view.user_buffers:
        out.warnings.append(
            f"{where}a TorchScript archive does not record whether a buffer is persistent: "
            f"{_names_note(view.user_buffers)} listed; if the model's state_dict() leaves one out "
            "(register_buffer(..., persistent=False)), --exclude it"
        )
    if view.odd:
        out.warnings.append(f"{where}parameters or buffers that are not tensors, not listed: {_names_note(view.odd)}")
    prefix = None
    if view.root_type in _DATA_PARALLEL:
        prefix = "module."
    elif view.root_type in _COMPILE_WRAPPERS:
        prefix = "_orig_mod."
    if prefix is not None and names and all(n.startswith(prefix) for n in names):
        out.warnings.append(wrapper_hint(prefix, where))


def _is_leaf(v: Any) -> bool:
    return type(v) in (str, int, float, bool, bytes, type(None))


def describe(root: Any, path=None, *, raw_names: bool = False, torchscript: dict | None = None) -> Described:
    """Tensors, opaque objects, metadata and kind of an unpickled checkpoint object.

    An nn.Module (the root or any sub-tree, recognised by its _parameters/_buffers/_modules
    state) is listed under the names its state_dict() gives ('0.weight', 'encoder.layers.1.bias';
    under a sub-tree: 'model/0.weight'), a pickled optimizer like its state_dict(). `raw_names`
    lists every object as the pickle holds it instead ('_modules/0/_parameters/weight').
    `torchscript`: the archive's class declarations (torchscript_decls) for a TorchScript data.pkl.
    """
    w = _Walker(path, raw_names, torchscript)
    w.walk(root, [], set(), 0)
    out = w.out
    for view in w.views:
        base = "/".join(view.parts) + "/" if view.parts else ""
        names = [n[len(base) :] for n, _r, _a in out.tensors if n.startswith(base)]
        _finish_view(out, view, names)
    if w.more_objects:
        out.warnings.append(f"{w.more_objects} more opaque objects are not listed")
    for rec_name, rec, _alias in out.tensors:
        if isinstance(rec, TensorRecord) and rec.storage is None:
            out.warnings.append(f"tensor {rec_name!r} has no data in this file: {rec.note}")
    out.kind = _kind_of(root)
    if w.views and not w.views[0].parts:
        out.kind = w.views[0].kind
    elif not raw_names and is_optimizer(root):
        out.kind = "optimizer"
    if isinstance(root, dict) and out.kind != "state_dict":
        out.metadata.update(_metadata_of(root))
    if out.kind == "state_dict" and out.tensors:
        for prefix in _WRAPPER_PREFIXES:
            if all(n.startswith(prefix) for n, _r, _a in out.tensors):
                out.warnings.append(wrapper_hint(prefix))
    return out


_MODEL_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "ema", "params")


def _kind_of(root: Any) -> str | None:
    if not isinstance(root, dict) or not root:
        return None
    keys = {k for k in root if isinstance(k, str)}
    if "pytorch-lightning_version" in keys or (
        {"state_dict", "optimizer_states"} <= keys and ({"epoch", "global_step"} & keys)
    ):
        return "lightning"
    vals = list(root.values())
    if all(isinstance(v, TENSORISH) for v in vals):
        return "state_dict"
    if {"state", "param_groups"} <= keys:
        return "hf-optimizer"
    if {"python", "numpy", "cpu"} <= keys:
        return "hf-rng-state"
    if any(k in keys for k in _MODEL_KEYS):
        return "training"
    return None


def _has_tensor(v: Any, depth: int = 0, budget: list | None = None) -> bool:
    if budget is None:
        budget = [10000]
    budget[0] -= 1
    if budget[0] < 0 or depth > 40:
        return True  # too big to call small metadata
    if isinstance(v, TENSORISH):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x, depth + 1, budget) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x, depth + 1, budget) for x in v)
    if isinstance(v, Opaque):
        return any(_has_tensor(x, depth + 1, budget) for x in v.fields().values()) or any(
            _has_tensor(x, depth + 1, budget) for x in (v.args or ())
        )
    return False


def render(v: Any, depth: int = 0, budget: list | None = None) -> Any:
    """A JSON-able rendering of a pickled value (opaque objects as '<module.Class>')."""
    if budget is None:
        budget = [2000]
    budget[0] -= 1
    if budget[0] < 0 or depth > 12:
        return "..."
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, complex):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, Span):
        return f"<{v.length} bytes>"
    if isinstance(v, dict):
        return {_key_str(k): render(x, depth + 1, budget) for k, x in list(v.items())[:500]}
    if isinstance(v, (list, tuple)):
        return [render(x, depth + 1, budget) for x in v[:500]]
    if isinstance(v, (set, frozenset)):
        items = [render(x, depth + 1, budget) for x in list(v)[:500]]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(v, NumpyScalar):
        val = v.value()
        return render(val, depth + 1, budget) if val is not None else "<numpy scalar>"
    if isinstance(v, TensorRecord):
        return f"<tensor {v.dtype} {list(v.shape)}>"
    if isinstance(v, NumpyArray):
        return f"<ndarray {numpy_torch_dtype(v.dtype) or (v.dtype.code if v.dtype else '?')} {list(v.shape)}>"
    if isinstance(v, Global):
        return f"<{v.full}>"
    if isinstance(v, Opaque):
        if v.type in _RECORD_TYPES or (v.dictitems and not v.args and v.state is None):
            fields = dict(v.fields())
            for k, x in v.dictitems or ():
                fields[k] = x
            return {_key_str(k): render(x, depth + 1, budget) for k, x in list(fields.items())[:500]}
        if v.type in _PATH_TYPES and v.args and all(isinstance(a, str) for a in v.args):
            return "/".join(a.rstrip("/") if i == 0 and a != "/" else a for i, a in enumerate(v.args)).replace(
                "//", "/"
            )
        return f"<{v.type}>"
    return f"<{type(v).__name__}>"


_RECORD_TYPES = {
    "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "types.SimpleNamespace",
}
_PATH_TYPES = {
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.Path",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
}
_META_DICTS = {"hyper_parameters", "hparams", "datamodule_hyper_parameters", "args", "config", "cfg", "hparams_name"}
_META_MAX_CHARS = 16384


def _metadata_of(root: dict) -> dict[str, Any]:
    import json

    meta: dict[str, Any] = {}
    for k, v in root.items():
        key = _key_str(k)
        if v is None or isinstance(v, (bool, int, float, str)):
            meta[key] = render(v)
        elif isinstance(v, NumpyScalar):
            meta[key] = render(v)
        elif key == "callbacks" and isinstance(v, dict):
            for cb, state in v.items():
                fields = state if isinstance(state, dict) else state.fields() if isinstance(state, Opaque) else {}
                for fk, fv in fields.items():
                    if fv is None or isinstance(fv, (bool, int, float, str, NumpyScalar)):
                        meta[f"callbacks/{_key_str(cb)}/{_key_str(fk)}"] = render(fv)
        elif isinstance(v, (dict, Opaque, list, tuple)) and (key in _META_DICTS or not _has_tensor(v)):
            if isinstance(v, Opaque) and v.type not in _RECORD_TYPES and key not in _META_DICTS:
                continue  # listed in CheckpointInfo.objects
            r = render(v)
            try:
                text = json.dumps(r, default=str)
            except (TypeError, ValueError):
                continue
            if len(text) <= _META_MAX_CHARS:
                meta[key] = r
    return meta
