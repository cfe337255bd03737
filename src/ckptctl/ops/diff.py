"""diff: compare checkpoints tensor by tensor, streaming. Pure: no printing.

Three modes share one engine:
  * two checkpoints (`diff_checkpoints`, here): structure, file metadata and, for tensors
    present in both with the same shape, value statistics (ops/diff_values.py);
  * two runs (`diff_runs`, ops/diff_runs.py): checkpoints aligned by step, one summary per step;
  * one run (`along_run`, ops/diff_along.py): consecutive checkpoints, update size and weight
    norm per step.

Values are streamed: both tensors are read in lockstep, a bounded chunk at a time at the same
element offsets, and reduced into float64 accumulators. Identical bytes are identical without
any arithmetic (the fast path); the arithmetic runs only on chunks whose bytes differ.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes
from ckptctl.errors import CkptError, UsageError
from ckptctl.formats import open_reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.ops.diff_result import DiffResult, TensorDiff, rel_key
from ckptctl.ops.diff_values import Comparer
from ckptctl.ops.stream import numeric_kind

if TYPE_CHECKING:
    from ckptctl.formats.base import Reader


# ---- names: --key / --strip-prefix (ops/select.py does the work) ----------------------------------
def has_key(info: CheckpointInfo, key: str) -> bool:
    from ckptctl.ops.select import under

    return any(under(t.name, key.strip("/")) is not None for t in info.tensors)


@dataclass
class Side:
    """What one side of a diff compares: aligned name -> source TensorInfo (whose .name is the
    name in the file), in file order, and how that set was chosen."""

    names: dict[str, TensorInfo]
    root: str = ""  # the sub-tree taken ('' for all)
    training_default: bool = False  # the model weights of a training checkpoint, by default
    left_out: int = 0  # tensors outside that default (optimizer state, callbacks, ...)
    filtered_out: int = 0  # dropped by --include/--exclude

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "model_weights_only": self.training_default,
            "left_out": self.left_out,
            "filtered_out": self.filtered_out,
            "num_tensors": len(self.names),
        }


def pick(
    info: CheckpointInfo,
    key: str | None = None,
    strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None,
    rename: list[str] | None = None,
    *,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Side:
    """The tensors of one side, chosen by the rule convert and average use (ops/select.py):
    `key` takes that sub-tree; `all_` every tensor under its '/'-joined name; by default the
    model weights of a training checkpoint (names under state_dict/, without that prefix) and
    everything otherwise. `strip` removes the first matching prefix; `rename` are OLD=NEW regex
    substitutions. `include`/`exclude` (and `filters`, the older name of --include) are globs,
    as convert's: matched against the name relative to the sub-tree or in full, and also against
    the aligned name (after renaming), so `-k` keeps working on the names diff shows.
    """
    from ckptctl.ops.inspect import match_any
    from ckptctl.ops.select import select as select_tensors
    from ckptctl.ops.select import under

    if not info.tensors:
        return Side({})
    if key is not None:
        sel = select_tensors(info.tensors, key=key, strip_prefix=list(strip), rename=rename)
    else:
        sel = select_tensors(info.tensors, all_=all_, strip_prefix=list(strip), rename=rename)
    inc = list(include or ()) + list(filters or ())
    exc = list(exclude or ())
    out: dict[str, TensorInfo] = {}
    dropped = 0
    for src, o in sel.pairs:
        forms = (under(src.name, sel.root) or src.name, src.name, o.name)
        if (inc and not any(match_any(f, inc) for f in forms)) or (exc and any(match_any(f, exc) for f in forms)):
            dropped += 1
            continue
        out[o.name] = src
    return Side(out, sel.root, sel.training_default, sel.outside_root if sel.training_default else 0, dropped)


def select(
    info: CheckpointInfo,
    key: str | None = None,
    strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None,
    rename: list[str] | None = None,
    **kw: Any,
) -> dict[str, TensorInfo]:
    """pick(...).names: aligned name -> source TensorInfo."""
    return pick(info, key, strip, filters, rename, **kw).names


def _candidate_prefixes(names: list[str], depth: int = 3, top: int = 5) -> list[str]:
    c: Counter[str] = Counter()
    for n in names:
        seen = 0
        for i, ch in enumerate(n):
            if ch in "./" and i + 1 < len(n):
                c[n[: i + 1]] += 1
                seen += 1
                if seen >= depth:
                    break
    return [p for p, _ in c.most_common(top)]


def _split_prefix(p: str) -> tuple[str, str]:
    """'state_dict/model.' -> ('state_dict/', 'model.'): a sub-tree (--key) and a prefix to strip."""
    cut = p.rfind("/") + 1
    return p[:cut], p[cut:]


def _transform(names: list[str], prefix: str, dots: bool) -> set[str]:
    key, strip = _split_prefix(prefix)
    out = set()
    for n in names:
        if key:
            if not n.startswith(key):
                continue
            n = n[len(key) :]
        if strip and n.startswith(strip):
            n = n[len(strip) :]
        out.add(n.replace("/", ".") if dots else n)
    return out


def name_hint(names_a: list[str], names_b: list[str]) -> str | None:
    """A suggestion when the two name sets match (much) better after removing a prefix such as
    `module.`, `model.` or a `state_dict/` sub-tree, or reading '/' as '.' (HDF5 paths)."""
    base = len(set(names_a) & set(names_b))
    small = min(len(set(names_a)), len(set(names_b)))
    if not names_a or not names_b or base == small:
        return None

    def n_opts(pa: str, pb: str, dots: int) -> int:
        parts = {_split_prefix(p)[0] for p in (pa, pb)} | {_split_prefix(p)[1] for p in (pa, pb)}
        return len(parts - {""}) + (1 if dots else 0)

    best = (base, 0, "", "", 0)  # (matched, -options, pa, pb, dots): most matches, then fewest options
    ca = [""] + _candidate_prefixes(names_a)
    cb = [""] + _candidate_prefixes(names_b)
    for dots in (0, 1, 2):  # translate '/' to '.' on: neither, A, B
        for pa in ca:
            sa = _transform(names_a, pa, dots == 1)
            for pb in cb:
                if not pa and not pb and not dots:
                    continue
                ka, kb = _split_prefix(pa)[0], _split_prefix(pb)[0]
                if ka and kb and ka != kb:
                    continue  # one --key cannot say both
                m = len(sa & _transform(names_b, pb, dots == 2))
                cand = (m, -n_opts(pa, pb, dots), pa, pb, dots)
                if cand[:2] > best[:2]:
                    best = cand
    matched, _n, pa, pb, dots = best
    if matched <= base or matched * 2 < small:
        return None
    opts: list[str] = []
    keys = {_split_prefix(p)[0] for p in (pa, pb)} - {""}
    opts += [f"--key {k.rstrip('/')}" for k in keys]
    opts += [f"--strip-prefix {s}" for s in dict.fromkeys(_split_prefix(p)[1] for p in (pa, pb)) if s]
    if dots:
        opts.append("--rename '/=.'")
    what = []
    if pa:
        what.append(f"removing {pa!r} in A")
    if pb:
        what.append(f"removing {pb!r} in B")
    if dots:
        what.append(f"reading '/' as '.' in {'A' if dots == 1 else 'B'}")
    return f"{matched} tensor names match after {' and '.join(what)}: try {' '.join(opts)}"


def cast_tolerance(dtype_a: str, dtype_b: str) -> tuple[float, float]:
    """(atol, rtol) for `--ignore-dtype` without --atol/--rtol: equal up to the cast.

    rtol is the machine epsilon of the less precise floating dtype (float16: 2**-10 ~ 9.8e-4,
    bfloat16: 2**-7 ~ 7.8e-3, float32: 2**-23 ~ 1.2e-7), twice the largest relative error of a
    round-to-nearest cast; atol is that dtype's smallest normal number (float16: 6.1e-5), for
    values that became subnormal or zero (also when the cast flushed subnormals). Integers and
    bools on both sides: exact. Infinities and NaNs must match (an overflow to inf is a change).
    """
    import numpy as np

    best: tuple[float, float] | None = None
    for d in (dtype_a, dtype_b):
        if numeric_kind(d) in ("float", "complex"):
            fi = np.finfo(dtypes.numpy_dtype(d))
            cand = (float(fi.eps), float(fi.tiny))
            if best is None or cand > best:
                best = cand
    if best is None:
        return 0.0, 0.0
    eps, tiny = best
    return tiny, eps


def metadata_changes(ma: dict[str, Any], mb: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k in list(ma) + [k for k in mb if k not in ma]:
        va, vb = ma.get(k, None), mb.get(k, None)
        if k not in mb or k not in ma or _plain(va) != _plain(vb):
            out.append(
                {
                    "key": k,
                    "a": _plain(va) if k in ma else None,
                    "b": _plain(vb) if k in mb else None,
                    "only_in": "a" if k not in mb else ("b" if k not in ma else None),
                }
            )
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def open_checkpoint(path: str | os.PathLike) -> Reader:
    """open_reader, plus the model file of a trainer folder that holds several files."""
    try:
        return open_reader(path)
    except CkptError:
        p = Path(path)
        if p.is_dir():
            from ckptctl.ops import runs

            try:
                c = runs.scan_run(p, read_info=False).checkpoints
            except CkptError:
                c = []
            primary = getattr(runs, "_primary_file", None)
            if len(c) == 1 and primary is not None:
                alt = primary(c[0])
                if alt is not None:
                    return open_reader(alt)
        raise


def resolve_key(info: CheckpointInfo, key: str | None) -> str | None:
    """--key applies to each side that has that sub-tree."""
    if key and has_key(info, key):
        return key
    return None


def diff_checkpoints(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    values: bool = True,
    key: str | None = None,
    strip: tuple[str, ...] | list[str] = (),
    filters: list[str] | None = None,
    rename: list[str] | None = None,
    all_: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    ignore_dtype: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    readers: tuple[Reader, Reader] | None = None,
) -> DiffResult:
    """Compare two checkpoints of any formats.

    Which tensors: see `pick` (the model weights of a training checkpoint by default, `all_`
    everything, `key` a sub-tree of each side that has it). `ignore_dtype`: a dtype change alone
    is no difference; values are compared across the cast within atol/rtol, or within
    `cast_tolerance` when neither is given.

    `progress_factory(total_bytes)` may return a context manager yielding an object with
    `advance(n)`; it is called once the amount of data to compare is known.
    """
    if key is not None and all_:
        raise UsageError("--key and --all do not go together")
    if ignore_dtype and not values:
        raise UsageError("--ignore-dtype compares values across a cast; --no-values compares none")
    ra = rb = None
    try:
        ra, rb = readers if readers else (open_checkpoint(path_a), None)
        if rb is None:
            rb = open_checkpoint(path_b)
        ia, ib = ra.info(), rb.info()
        ka, kb = resolve_key(ia, key), resolve_key(ib, key)
        if key and ka is None and kb is None:
            raise UsageError(f"--key {key}: neither checkpoint has tensors under {key.rstrip('/')}/")
        side_a = pick(ia, ka, strip, filters, rename, all_=all_, include=include, exclude=exclude)
        side_b = pick(ib, kb, strip, filters, rename, all_=all_, include=include, exclude=exclude)
        sa, sb = side_a.names, side_b.names
        if not sa and not sb and (side_a.filtered_out or side_b.filtered_out):
            what = " ".join(
                [f"--include {p}" for p in list(include or ()) + list(filters or ())]
                + [f"--exclude {p}" for p in exclude or ()]
            )
            raise UsageError(f"no tensor left to compare in either checkpoint after {what}")
        res = DiffResult(
            _shown(path_a),
            _shown(path_b),
            ia.format,
            ib.format,
            values,
            atol,
            rtol,
            key_a=ka,
            key_b=kb,
            ignore_dtype=ignore_dtype,
            side_a=side_a,
            side_b=side_b,
        )
        res.only_in_a = [n for n in sa if n not in sb]
        res.only_in_b = [n for n in sb if n not in sa]
        res.metadata_changes = metadata_changes(ia.metadata, ib.metadata)
        if res.only_in_a or res.only_in_b:
            res.hint = name_hint(list(sa), list(sb))
        common = [n for n in sa if n in sb]
        todo: list[tuple[str, TensorInfo, TensorInfo]] = []
        results: dict[str, TensorDiff] = {}
        for n in common:
            ta, tb = sa[n], sb[n]
            d = TensorDiff(
                n, ta.dtype, tb.dtype, tuple(ta.shape), tuple(tb.shape), numel=ta.numel, ignore_dtype=ignore_dtype
            )
            results[n] = d
            if not values or d.shape_changed:
                continue
            if numeric_kind(ta.dtype) == "bytes" or numeric_kind(tb.dtype) == "bytes":
                if ta.dtype != tb.dtype:
                    continue
            todo.append((n, ta, tb))
        if values and todo:
            _compare_all(ra, rb, sa, sb, todo, results, atol, rtol, progress_factory, res)
        for n in common:
            d = results[n]
            if d.identical:
                res.identical.append(n)
            else:
                res.changed.append(d)
            if d.dtype_only:
                res.dtype_only.append(d)
        res.changed.sort(key=rel_key)
        return res
    finally:
        for r in (ra, rb):
            if r is not None and not readers:
                r.close()


def _compare_all(ra, rb, sa, sb, todo, results, atol, rtol, progress_factory, res: DiffResult) -> None:
    from contextlib import nullcontext

    cmp = Comparer(atol, rtol)
    # tied weights: when both sides tie a name to the same partner, reuse that result
    names_a = {t.name: n for n, t in sa.items()}
    names_b = {t.name: n for n, t in sb.items()}
    total = sum(ta.nbytes + tb.nbytes for _, ta, tb in todo if not _tied_twin(ta, tb, names_a, names_b))
    ctx = progress_factory(total) if progress_factory else nullcontext(None)
    with ctx as bar:
        try:
            _compare_each(cmp, ra, rb, todo, results, names_a, names_b, bar, res)
        finally:
            cmp.close()


def _tolerance(res: DiffResult, ta: TensorInfo, tb: TensorInfo) -> tuple[float | None, float | None]:
    tol = (res.atol, res.rtol)
    if res.ignore_dtype and ta.dtype != tb.dtype and tol == (None, None):
        tol = cast_tolerance(ta.dtype, tb.dtype)
    return tol


def _compare_each(cmp, ra, rb, todo, results, names_a, names_b, bar, res: DiffResult) -> None:
    adv = bar.advance if bar is not None else None
    # the pairs compared, in order, announced first so the item workers can run ahead across tensors
    # (a tied pair whose twin was compared before reuses that result)
    done: set[str] = set()
    pairs = []
    for n, ta, tb in todo:
        twin = _tied_twin(ta, tb, names_a, names_b)
        if twin is None or twin not in done:
            pairs.append((ta, tb, _tolerance(res, ta, tb)))
        done.add(n)
    cmp.start(ra, rb, pairs)
    for n, ta, tb in todo:
        twin = _tied_twin(ta, tb, names_a, names_b)
        if twin is not None and twin in results and results[twin].compared:
            results[n] = TensorDiff(**{**results[twin].__dict__, "name": n})
            continue
        tol = _tolerance(res, ta, tb)
        cmp.set_tolerance(*tol)
        acc = cmp.compare(ra, ta, rb, tb, adv)  # a read error is an error (exit 2), not a difference
        results[n] = TensorDiff.from_acc(n, ta, tb, acc)
        results[n].ignore_dtype = res.ignore_dtype
        if numeric_kind(ta.dtype) != "bytes" and tol != (None, None):
            results[n].atol, results[n].rtol = float(tol[0] or 0.0), float(tol[1] or 0.0)
        res.bytes_compared += ta.nbytes + tb.nbytes


def _tied_twin(ta: TensorInfo, tb: TensorInfo, names_a: dict[str, str], names_b: dict[str, str]) -> str | None:
    if ta.alias_of and tb.alias_of:
        na, nb = names_a.get(ta.alias_of), names_b.get(tb.alias_of)
        if na is not None and na == nb:
            return na
    return None


def _shown(path) -> str:
    """A path as given; a URL whole again (a Path folds the '//' of s3://b/k)."""
    from ckptctl.sources import as_path

    return str(as_path(path))
