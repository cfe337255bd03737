"""Pickled nn.Modules, torch.compile / DataParallel wrappers and TorchScript module trees: what
their state_dict() would list and leave out, their classes and hyper-attributes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ckptctl.formats.pickles.records import Opaque

_MODULE_KEYS = ("_parameters", "_buffers", "_modules")
_COMPILE_WRAPPERS = {"torch._dynamo.eval_frame.OptimizedModule"}
_DATA_PARALLEL = {
    "torch.nn.parallel.data_parallel.DataParallel",
    "torch.nn.parallel.distributed.DistributedDataParallel",
}
_WRAPPER_PREFIXES = {
    "module.": "a DataParallel/DistributedDataParallel wrapper",
    "_orig_mod.": "a torch.compile wrapper",
}
MAX_MODULES = 500  # modules described in the metadata


def is_module(obj: Any) -> bool:
    """An nn.Module instance, whatever its class: its state holds _parameters, _buffers, _modules."""
    if not isinstance(obj, Opaque):
        return False
    f = obj.fields()
    return all(isinstance(f.get(k), dict) for k in _MODULE_KEYS)


def is_optimizer(obj: Any) -> bool:
    if not isinstance(obj, Opaque):
        return False
    f = obj.fields()
    return isinstance(f.get("state"), dict) and isinstance(f.get("param_groups"), list) and "defaults" in f


def _class_name(t: str) -> str:
    """A TorchScript class name as the Python class it was compiled from (without __torch__. and
    the ___torch_mangle_N parts); other names as they are."""
    if t.startswith("__torch__."):
        parts = [p for p in t.split(".")[1:] if not p.startswith("___torch_mangle_")]
        return ".".join(parts) or t
    return t


def _hyper(f: dict) -> list[tuple[str, str]]:
    """A module's simple hyper-attributes (in_features=4, eps=1e-05, kernel_size=(3, 3), ...)."""
    out: list[tuple[str, str]] = []
    for k, v in f.items():
        if not isinstance(k, str) or k.startswith("_") or k == "training":
            continue
        if v is None or isinstance(v, (bool, int, float)):
            out.append((k, repr(v)))
        elif isinstance(v, str) and len(v) <= 80:
            out.append((k, repr(v)))
        elif isinstance(v, (tuple, list)) and len(v) <= 8 and all(type(x) in (int, float, bool) for x in v):
            out.append((k, repr(tuple(v))))
        if len(out) >= 16:
            break
    return out


@dataclass
class _ModuleView:
    """One module tree found in a pickle: where it is and what state_dict() leaves out."""

    parts: list[str]  # the '/'-path of the module in the pickle ([] for the root)
    kind: str  # module | torchscript
    root_type: str | None = None
    modules: list[tuple[str, str]] = field(default_factory=list)  # (path, 'Class(k=v, ...)')
    more_modules: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # prefix -> training flag
    nonpersistent: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # tensors that are neither parameter nor buffer
    odd: list[str] = field(default_factory=list)  # parameters that are not tensors
    user_buffers: list[str] = field(default_factory=list)  # TorchScript: buffers of non-torch classes

    def add_module(self, prefix: str, type_: str, obj: Opaque, parent_training: Any, decl: Any = None) -> None:
        f = obj.fields()
        training = f.get("training")
        self.training[prefix] = training
        if self.root_type is None:
            self.root_type = type_
        if len(self.modules) >= MAX_MODULES:
            self.more_modules += 1
            return
        hyper = _hyper(f)
        if decl is not None:
            declared = set(decl.parameters) | set(decl.buffers)
            hyper = [(k, v) for k, v in hyper if k not in declared]
            hyper += [(k, _ts_literal(v)) for k, v in decl.finals.items() if k not in dict(hyper)]
        # by name: TorchScript writes its constants in no stable order, and an eager module and
        # its TorchScript archive then describe themselves alike
        hyper.sort()
        if isinstance(training, bool) and (not prefix or training != parent_training):
            hyper.append(("training", repr(training)))
        if hyper or not prefix:  # containers (Sequential, ModuleList, ...) are in `objects` only
            text = _class_name(type_) + ("(" + ", ".join(f"{k}={v}" for k, v in hyper) + ")" if hyper else "")
            self.modules.append((prefix[:-1] if prefix.endswith(".") else prefix, text))


def wrapper_hint(prefix: str, where: str = "") -> str:
    return (
        f"{where}every name starts with {prefix!r} ({_WRAPPER_PREFIXES[prefix]}): names are kept as "
        f"the wrapper's state_dict() gives them; --strip-prefix {prefix} gives the inner model's names"
    )


# ---- TorchScript class declarations ------------------------------------------------------------
@dataclass
class TSClass:
    """What a TorchScript class declares in its header lines (read as text, never compiled)."""

    is_module: bool
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    finals: dict[str, str] = field(default_factory=dict)  # `in_features : Final[int] = 4`


_TS_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_TS_FINAL = re.compile(r"^  (\w+) : Final\[[^\]]*\] = (.{1,80})$")


def torchscript_decls(files: dict[str, str]) -> dict[str, TSClass]:
    """Class declarations of TorchScript code files ({'code/__torch__/a/b.py': text}) by the class's
    global name ('__torch__.a.b.Class'). Only each class's header lines are looked at: the
    `class X(Module):` line, `__parameters__ = [...]`, `__buffers__ = [...]` and `Final` constants."""
    out: dict[str, TSClass] = {}
    for fname, text in files.items():
        rel = fname.split("code/", 1)[-1]
        if not rel.endswith(".py"):
            continue
        module = rel[:-3].replace("/", ".")
        cur: TSClass | None = None
        for line in text.splitlines():
            if line.startswith("class "):
                m = re.match(r"class (\w+)\(([\w.]*)\):", line)
                cur = None
                if m:
                    cur = TSClass(is_module=m.group(2) == "Module")
                    out[f"{module}.{m.group(1)}"] = cur
                continue
            if cur is None or not line.startswith("  ") or line.startswith("   "):
                continue
            if line.startswith("  def "):
                cur = None  # the header ends where the methods start
                continue
            if line.startswith("  __parameters__ = ["):
                cur.parameters = [_ts_unescape(x) for x in _TS_QUOTED.findall(line)]
            elif line.startswith("  __buffers__ = ["):
                cur.buffers = [_ts_unescape(x) for x in _TS_QUOTED.findall(line)]
            else:
                fm = _TS_FINAL.match(line)
                if fm:
                    cur.finals[fm.group(1)] = fm.group(2).strip()
    return out


def _ts_literal(text: str) -> str:
    """A Final constant's literal as Python writes it ('1.0000000000000001e-05' -> '1e-05'); the
    text itself when it is not a plain literal. ast.literal_eval evaluates literals only."""
    import ast

    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text
    return repr(v) if isinstance(v, (int, float, bool, str, tuple, type(None))) else text


def _ts_unescape(s: str) -> str:
    return s.replace('\\"', '"').replace("\\\\", "\\")
