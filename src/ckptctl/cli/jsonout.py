"""JSON on stdout: one strict document (RFC 8259: no bare NaN/Infinity, DEL/C1 controls and lone
surrogates escaped, so stdout stays valid UTF-8), written in one pass for plain documents."""

from __future__ import annotations

import json
import re
import sys
from itertools import chain, repeat
from math import prod
from operator import attrgetter
from typing import Any

from ckptctl.model import TensorInfo

# ---- data (stdout) ----------------------------------------------------------------------------
# json escapes C0 controls itself; DEL and the C1 controls (U+009B is a CSI) it leaves raw.
# They can only occur inside JSON strings, so escaping them keeps the document's meaning.
_JSON_CTRL = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


class _Unusual(Exception):
    """Something _dumps_indent2 leaves to json.dumps (a non-str key, a NaN, an unknown type)."""


class TensorRows(list):
    """TensorInfo objects standing for their `to_json()` rows in a JSON document: the one-pass
    writer formats each row straight from the fields (a dict per row cost as much as writing it,
    10^5 rows: issue 13); json.dumps and strict_json see `to_json()` (_json_default)."""


def _dumps_indent2(obj: Any) -> str:
    """json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False), byte for byte, for documents
    of dicts with str keys, lists, tuples, str, int, finite float, bool and None; _Unusual otherwise.

    json's indenting encoder is pure Python (its C encoder only does indent=None) and costs ~20 µs
    per tensor row of `inspect --format json`; this one is a few µs (issue 13: 10^5 tensors)."""
    from json.encoder import encode_basestring as enc  # the C one, as ensure_ascii=False uses

    parts: list[str] = []
    add = parts.append
    finite = float("inf")

    def value(o: Any, ind: str, depth: int) -> None:
        t = type(o)
        if t is str:
            add(enc(o))
        elif t is int:
            add(int.__repr__(o))
        elif o is None:
            add("null")
        elif o is True:
            add("true")
        elif o is False:
            add("false")
        elif t is float:
            if o != o or o == finite or o == -finite:
                raise _Unusual
            add(float.__repr__(o))
        elif t is dict:
            if not o:
                add("{}")
                return
            if depth > 200:
                raise _Unusual
            inner = ind + "  "
            sep = "{\n" + inner
            for k, v in o.items():
                if type(k) is not str:
                    raise _Unusual
                tv = type(v)
                if tv is str:  # the common values inline: a call per value is most of the cost
                    add(f"{sep}{enc(k)}: {enc(v)}")
                elif tv is int:
                    add(f"{sep}{enc(k)}: {int.__repr__(v)}")
                else:
                    add(f"{sep}{enc(k)}: ")
                    value(v, inner, depth + 1)
                sep = ",\n" + inner
            add("\n" + ind + "}")
        elif t is list or t is tuple:
            if not o:
                add("[]")
                return
            if depth > 200:
                raise _Unusual
            inner = ind + "  "
            if all(type(v) is int for v in o):  # a shape
                add("[\n" + inner + (",\n" + inner).join(map(int.__repr__, o)) + "\n" + ind + "]")
                return
            sep = "[\n" + inner
            for v in o:
                add(sep)
                value(v, inner, depth + 1)
                sep = ",\n" + inner
            add("\n" + ind + "]")
        elif t is TensorRows:
            if not o:
                add("[]")
                return
            rows(o, ind)
        else:
            raise _Unusual

    def rows(o: TensorRows, ind: str) -> None:
        """Each TensorInfo as value(t.to_json()) writes it: name, dtype, shape, nbytes, numel[, alias_of]."""
        inner = ind + "  "
        i2 = inner + "  "
        i3 = i2 + "  "
        pre_name, pre_dtype, pre_shape = f'{{\n{i2}"name": ', f',\n{i2}"dtype": ', f',\n{i2}"shape": '
        pre_nbytes, pre_numel, pre_alias = f',\n{i2}"nbytes": ', f',\n{i2}"numel": ', f',\n{i2}"alias_of": '
        shape_open, shape_sep, shape_close = "[\n" + i3, ",\n" + i3, "\n" + i2 + "]"
        end = "\n" + inner + "}"
        if bulk_rows(
            o,
            inner,
            pre_name,
            pre_dtype,
            pre_shape,
            pre_nbytes,
            pre_numel,
            pre_alias,
            shape_open,
            shape_sep,
            shape_close,
            end,
        ):
            add("\n" + ind + "]")
            return
        sep = "[\n" + inner
        for r in o:
            if type(r) is not TensorInfo:  # a format's own row (TF: key, full_name, slot_of): its to_json()
                add(sep)
                value(r.to_json(), inner, 2)
                sep = ",\n" + inner
                continue
            name, dtype, shape, nbytes, alias = r.name, r.dtype, r.shape, r.nbytes, r.alias_of
            if type(name) is not str or type(dtype) is not str or type(nbytes) is not int:
                raise _Unusual
            numel = 1
            for d in shape:
                if type(d) is not int:
                    raise _Unusual
                numel *= d
            shape_text = shape_open + shape_sep.join(map(int.__repr__, shape)) + shape_close if shape else "[]"
            text = (
                f"{sep}{pre_name}{enc(name)}{pre_dtype}{enc(dtype)}{pre_shape}{shape_text}"
                f"{pre_nbytes}{int.__repr__(nbytes)}{pre_numel}{int.__repr__(numel)}"
            )
            if alias is not None:
                if type(alias) is not str:
                    raise _Unusual
                text += pre_alias + enc(alias)
            add(text + end)
            sep = ",\n" + inner
        add("\n" + ind + "]")

    def bulk_rows(o: TensorRows, inner: str, *pre: str) -> bool:
        """rows() when every row is a TensorInfo of str names and int dimensions, each column read
        and formatted by C loops (map), each kind of shape, dtype and tie written once (10^5 rows,
        issue 13); False, nothing written, for anything else."""
        pre_name, pre_dtype, pre_shape, pre_nbytes, pre_numel, pre_alias, shape_open, shape_sep, shape_close, end = pre
        if set(map(type, o)) != _TENSOR_INFO:  # a format's own row (TF): its to_json(), in rows()
            return False
        names, dts, shapes, nbytes = (
            list(map(_NAME, o)),
            list(map(_DTYPE, o)),
            list(map(_SHAPE, o)),
            list(map(_NBYTES, o)),
        )
        aliases = list(map(_ALIAS_OF, o))
        if (
            set(map(type, names)) != _STR
            or set(map(type, dts)) != _STR
            or set(map(type, nbytes)) != _INT
            or not set(map(type, aliases)) <= _STR_NONE
        ):
            return False
        try:  # (type int, not bool: then equal shapes are equal tuples of the same ints, written alike)
            if not set(map(type, chain.from_iterable(shapes))) <= _INT:
                return False
            kinds = dict.fromkeys(shapes)
        except TypeError:  # a shape that is a list, or not a sequence: rows() says what to do
            return False
        numel_of, text_of = {}, {}
        for shape in kinds:
            numel_of[shape] = prod(shape)
            text_of[shape] = shape_open + shape_sep.join(map(int.__repr__, shape)) + shape_close if shape else "[]"
        dt_text = {d: enc(d) for d in set(dts)}
        tie_text = {a: "" if a is None else pre_alias + enc(a) for a in set(aliases)}
        add(
            "[\n"
            + inner
            + (",\n" + inner).join(
                map(
                    "".join,
                    zip(
                        repeat(pre_name),
                        map(enc, names),
                        repeat(pre_dtype),
                        map(dt_text.__getitem__, dts),
                        repeat(pre_shape),
                        map(text_of.__getitem__, shapes),
                        repeat(pre_nbytes),
                        map(int.__repr__, nbytes),
                        repeat(pre_numel),
                        map(int.__repr__, map(numel_of.__getitem__, shapes)),
                        map(tie_text.__getitem__, aliases),
                        repeat(end),
                    ),
                )
            )
        )
        return True

    value(obj, "", 0)
    return "".join(parts)


_NAME, _DTYPE, _SHAPE = attrgetter("name"), attrgetter("dtype"), attrgetter("shape")
_NBYTES, _ALIAS_OF = attrgetter("nbytes"), attrgetter("alias_of")
_STR, _INT, _STR_NONE, _TENSOR_INFO = {str}, {int}, {str, type(None)}, {TensorInfo}


def print_json(obj: Any) -> None:
    """`obj` as strict JSON on stdout (RFC 8259: no bare NaN/Infinity), see strict_json()."""
    try:  # the common case: plain values only, encoded in one pass
        text = _dumps_indent2(obj)
    except _Unusual:
        try:  # most documents hold no NaN/Inf: encode them as they are (the walk costs ~50% more)
            text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
        except ValueError:  # a non-finite float (or a cycle): rewrite the document strictly
            text = json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False)
    text = text.translate(_JSON_CTRL)
    if not text.isascii():
        text = _SURROGATE.sub(_escape_surrogate, text)
    sys.stdout.write(text + "\n")


# A name that was not valid UTF-8 (a file name's raw byte as \udcff, a pickle string written with
# surrogatepass, an HDF5 name of raw bytes) holds lone surrogates, which UTF-8 cannot encode: they
# can only be inside JSON strings, so they go out as \uXXXX escapes and stdout stays valid UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


NONFINITE_KEY = "nonfinite"
_PLAIN = (str, int, bool, type(None))


def nonfinite_text(v: float) -> str:
    """'nan', 'inf' or '-inf'."""
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


def strict_json(obj: Any) -> Any:
    """`obj` made of plain JSON values only, with every non-finite float written as null.

    The nearest enclosing object gets a key "nonfinite" mapping the value's path relative to
    that object ("eval_loss", or "norms.3" for an item of a list) to "nan", "inf" or "-inf",
    so a field keeps one type (number or null) and the reason is still in the document:
        {"eval_loss": NaN, "norms": [1.0, Infinity]}
     -> {"eval_loss": null, "norms": [1.0, null], "nonfinite": {"eval_loss": "nan", "norms.1": "inf"}}
    A non-finite value with no enclosing object (an item of a top-level list) is just null.
    """
    return _strict(obj, None, "", 0)  # no enclosing object yet: nowhere to say why


def _strict(o: Any, marks: dict[str, str] | None, path: str, depth: int) -> Any:
    if isinstance(o, float):
        if o == o and o not in (float("inf"), float("-inf")):
            return float(o)  # a numpy float64 (a float subclass) as a plain float
        if marks is not None:
            marks[path] = nonfinite_text(o)
        return None
    if isinstance(o, _PLAIN):
        return o
    if depth > 200:  # a cycle or absurd nesting: say what it is rather than recurse forever
        return str(o)
    if isinstance(o, dict):
        own: dict[str, str] = {}
        out: dict[Any, Any] = {}
        for k, v in o.items():
            key = k if isinstance(k, str) else _json_key(k)
            out[key] = _strict(v, own, str(key), depth + 1)
        if own:
            slot = NONFINITE_KEY
            while slot in out and not isinstance(o.get(slot), dict):
                slot = "_" + slot  # a field of that name that is not ours: never overwrite it
            prev = out.get(slot)
            out[slot] = {**prev, **own} if isinstance(prev, dict) else own
        return out
    if isinstance(o, (list, tuple, set, frozenset)):
        items = _json_default(o) if isinstance(o, (set, frozenset)) else o
        return [_strict(v, marks, f"{path}.{i}", depth + 1) for i, v in enumerate(items)]
    return _strict(_json_default(o), marks, path, depth + 1)


def _json_key(k: Any) -> str:
    """A dict key as json.dumps would write it (it accepts str, int, float, bool, None)."""
    if isinstance(k, float):
        return repr(k) if k == k and abs(k) != float("inf") else nonfinite_text(k)
    if isinstance(k, (int, bool, type(None))):
        return json.dumps(k)
    return str(k)


def _json_default(o: Any):
    if isinstance(o, TensorInfo):  # an item of TensorRows
        return o.to_json()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, bytes):
        return o.hex()
    if hasattr(o, "item"):
        return o.item()
    return str(o)
