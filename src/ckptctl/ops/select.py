"""Which tensors a command works on, and under which names. Pure: lists in, lists out.

Shared by convert, diff and average:
- the sub-tree: `--key PATH` (names under PATH/, with PATH/ removed), `--all` (every tensor under
  its '/'-joined name) or, by default, the model weights of a training checkpoint (`default_part`:
  names under `state_dict/`, with their original keys; else everything but the training state
  under optimizer/scheduler/callback/... top-level parts) and everything otherwise. `inspect`
  shows and `ls` counts the same default part;
- `--include GLOB` / `--exclude GLOB` on the names before renaming, relative to the sub-tree or
  in full (`model.enc` and `state_dict/model.enc` both work); a pattern without wildcards also
  matches as a module prefix, like `inspect --filter`;
- renaming: `--strip-prefix P` (the first that matches), `--rename OLD=NEW` (Python regex,
  `re.sub`, in the order given; NEW may use \\1 or \\g<name>), then `--add-prefix P`;
- collisions after renaming are errors that name both sources;
- tied weights stay tied: an alias whose target was dropped is tied to the first kept name of
  its group instead, so nothing refers to a tensor that is not written.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import compress, repeat

from ckptctl.errors import Incompatible, UsageError
from ckptctl.model import TensorInfo

TRAINING_ROOT = "state_dict"
# top-level names in a training checkpoint that are not the model
NON_MODEL_HEADS = {
    "optimizer",
    "optimizers",
    "optimizer_states",
    "optim",
    "last_optimizer_state",
    "optimizer_history",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "callbacks",
    "loops",
    "rng_state",
    "rng_states",
    "scaler",
    "grad_scaler",
    "extra_state",
    "amp",
    "opt_state",
}

_HEADS = tuple(sorted(NON_MODEL_HEADS))


@dataclass
class Selection:
    """`pairs`: (source TensorInfo, output TensorInfo) in source order; output names and
    `alias_of` are the new names. `root`: the sub-tree taken ('' for all)."""

    pairs: list[tuple[TensorInfo, TensorInfo]]
    root: str = ""
    training_default: bool = False  # the state_dict/ default of a training checkpoint applied
    outside_root: int = 0  # tensors not under the root
    filtered_out: int = 0  # dropped by --include/--exclude
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorInfo]:
        return [out for _src, out in self.pairs]

    @property
    def names(self) -> dict[str, str]:
        """output name -> source name"""
        return {out.name: src.name for src, out in self.pairs}


def match_any(name: str, patterns: list[str] | None) -> bool:
    """fnmatch against any pattern; a pattern without wildcards also matches as a prefix."""
    if not patterns:
        return True
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return True
        if not any(ch in p for ch in "*?[") and (
            name == p or name.startswith(p.rstrip("./") + ".") or name.startswith(p.rstrip("./") + "/")
        ):
            return True
    return False


def parse_rename(spec: str) -> tuple[re.Pattern, str]:
    """'OLD=NEW' -> (compiled OLD, NEW). The first '=' not escaped as '\\=' splits."""
    m = re.match(r"((?:[^=\\]|\\.)*)=(.*)\Z", spec, re.S)
    if not m or m.group(1) == "":
        raise UsageError(f"--rename {spec!r}: expected OLD=NEW (a regex and its replacement)")
    old = m.group(1).replace("\\=", "=")
    try:
        return re.compile(old), m.group(2)
    except re.error as e:
        raise UsageError(f"--rename {spec!r}: bad regex: {e}") from None


def top_level_parts(names: Iterable[str]) -> list[str]:
    """The first '/'-separated parts of names, in order of appearance."""
    seen: dict[str, None] = {}
    for n in names:
        if "/" in n:
            seen.setdefault(n.split("/", 1)[0], None)
    return list(seen)


def default_root(names: list[str]) -> str:
    """'state_dict' when the names look like a training checkpoint's, else '' (everything)."""
    return TRAINING_ROOT if any(map(str.startswith, names, repeat(TRAINING_ROOT + "/"))) else ""


def default_part(names: list[str]) -> tuple[str, set[str]]:
    """The default rule for the model weights of a checkpoint: (root, names left out).

    ('state_dict', names outside it) when any name is under state_dict/ (Lightning and the like);
    else ('', the names whose first part is training state: optimizer, lr_schedulers, callbacks,
    ...) when some other tensor remains (a plain dict of model + optimizer); else ('', none).
    """
    root = default_root(names)
    if root:
        return root, {n for n in names if under(n, root) is None}
    # the first part before any '/' or '.' (re.split per name cost ~1 µs: 10^5 names, issue 13);
    # only names that begin with such a part can be state: found first by one C loop (map)
    maybe = compress(names, map(str.startswith, names, repeat(_HEADS)))
    state = {n for n in maybe if n.split("/", 1)[0].split(".", 1)[0] in NON_MODEL_HEADS}
    return ("", state) if state and len(state) < len(names) else ("", set())


def model_weights(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """The tensors of the default part (see default_part), in order, under their own names."""
    _root, out = default_part([t.name for t in tensors])
    return [t for t in tensors if t.name not in out]


def under(name: str, root: str) -> str | None:
    """name relative to root (None when outside it)."""
    if not root:
        return name
    prefix = root.rstrip("/") + "/"
    return name[len(prefix) :] if name.startswith(prefix) and len(name) > len(prefix) else None


def rename_one(
    name: str, strip_prefix: list[str] | None, rename: list[tuple[re.Pattern, str]] | None, add_prefix: str | None
) -> str:
    for p in strip_prefix or ():
        if p and name.startswith(p):
            name = name[len(p) :]
            break
    for pat, repl in rename or ():
        try:
            name = pat.sub(repl, name)
        except (re.error, IndexError) as e:
            raise UsageError(f"--rename {pat.pattern}={repl}: {e}") from None
    if add_prefix:
        name = add_prefix + name
    return name


def find_collisions(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(new name, [source names])] for every new name given to more than one source."""
    if len({new for _src, new in pairs}) == len(pairs):
        return []
    by_new: dict[str, list[str]] = {}
    for src, new in pairs:
        by_new.setdefault(new, []).append(src)
    return [(new, srcs) for new, srcs in by_new.items() if len(srcs) > 1]


def alias_roots(tensors: list[TensorInfo]) -> dict[str, str]:
    """name -> the name of the primary tensor of its tie group (itself when untied)."""
    by = {t.name: t for t in tensors}
    out: dict[str, str] = {}
    for t in tensors:
        r, hops = t.name, 0
        while (u := by.get(r)) is not None and (a := u.alias_of) is not None and a in by and hops <= len(by):
            r, hops = a, hops + 1
        out[t.name] = r
    return out


def _renamed(t: TensorInfo, name: str, alias_of: str | None) -> TensorInfo:
    """t named `name`, tied to `alias_of`, without a location. dataclasses.replace costs ~10 µs a
    call, too much at 10^5 tensors (issue 13): a plain TensorInfo is built directly."""
    if type(t) is TensorInfo:
        return TensorInfo(name, t.dtype, t.shape, t.nbytes, alias_of)
    return replace(t, name=name, alias_of=alias_of, loc=None)


def retie(pairs: list[tuple[TensorInfo, TensorInfo]], all_tensors: list[TensorInfo]):
    """Point each kept alias at the kept primary of its group (new names)."""
    if all(t.alias_of is None for t in all_tensors) and all(new.alias_of is None for _src, new in pairs):
        return list(pairs)  # no tied weights (the common case): nothing to point anywhere
    roots = alias_roots(all_tensors)
    first_kept: dict[str, str] = {}  # group root (source name) -> first kept output name
    out = []
    for src, new in pairs:
        g = roots.get(src.name, src.name)
        if g not in first_kept:
            first_kept[g] = new.name
            want = None
        else:
            want = first_kept[g]
        # dataclasses.replace costs ~10 µs a call: 10^5 tensors (issue 13) build them directly
        out.append((src, new if new.alias_of == want else _renamed(new, new.name, want)))
    return out


def select(
    tensors: list[TensorInfo],
    *,
    key: str | None = None,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    strip_prefix: list[str] | None = None,
    add_prefix: str | None = None,
    rename: list[str] | None = None,
) -> Selection:
    """Pick and rename tensors; raises UsageError/Incompatible with a one-line reason."""
    if key is not None and all_:
        raise UsageError("--key and --all do not go together")
    names = [t.name for t in tensors]
    training = False
    if all_:
        root = ""
    elif key is not None:
        root = key.strip("/")
        if root and not any(under(n, root) for n in names):
            tops = top_level_parts(names)
            hint = f"; parts here: {', '.join(tops[:8])}" if tops else "; this checkpoint has no sub-trees"
            raise Incompatible(f"no tensor under --key {key!r}{hint}")
    left: set[str] = set()
    if not all_ and key is None:
        root, left = default_part(names)
        training = bool(root or left)
    patterns = [parse_rename(r) for r in rename or ()]
    pairs: list[tuple[TensorInfo, TensorInfo]] = []
    outside = filtered = renamed = 0
    for t in tensors:
        rel = under(t.name, root)
        if rel is None or t.name in left:
            outside += 1
            continue
        if include and not (match_any(rel, include) or match_any(t.name, include)):
            filtered += 1
            continue
        if exclude and (match_any(rel, exclude) or match_any(t.name, exclude)):
            filtered += 1
            continue
        new = rename_one(rel, strip_prefix, patterns, add_prefix)
        renamed += new != rel
        if new == "":
            raise Incompatible(f"tensor {t.name!r} has an empty name after renaming")
        pairs.append((t, _renamed(t, new, t.alias_of)))
    sel = Selection(pairs=[], root=root, training_default=training, outside_root=outside, filtered_out=filtered)
    if not pairs:
        what = []
        if root:
            what.append(f"under {root}/")
        if include:
            what.append("matching --include " + " ".join(include))
        if exclude:
            what.append("left by --exclude " + " ".join(exclude))
        raise Incompatible("no tensor selected" + (" (" + ", ".join(what) + ")" if what else ""))
    clashes = find_collisions([(s.name, o.name) for s, o in pairs])
    if clashes:
        new, srcs = clashes[0]
        k = len(clashes) - 1
        more = f" (and {k} more clash{'es' if k > 1 else ''})" if k else ""
        raise Incompatible(f"tensors {srcs[0]!r} and {srcs[1]!r} would both be named {new!r} after renaming{more}")
    sel.pairs = retie(pairs, tensors)
    if training:
        sel.notes.append(
            f"training checkpoint: writing the {len(sel.pairs)} model weights"
            + (f" under {root}/ " if root else " ")
            + (
                f"with their keys renamed ({renamed} of {len(sel.pairs)} changed by --strip-prefix/--rename/"
                "--add-prefix)"
                if renamed
                else "with their original keys"
            )
            + (f"; {outside} other tensors (optimizer state, ...) left out" if outside else "")
            + " (--all keeps everything, --key PATH picks another part)"
        )
    return sel
