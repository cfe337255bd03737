"""Python's own vocabulary: OrderedDict/defaultdict, set/frozenset, slice, complex, bytes and
bytearray (Python-2 era encodings included), copyreg's reconstructors, `object`."""

from __future__ import annotations

from typing import Any

from ckptctl.formats.pickles.records import Global, MachineLike, ODict, Opaque, _kind

_ENCODINGS = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf8", "utf-8", "ascii", "us-ascii"}


def _h_ordered_dict(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    d = ODict()
    d.pickle_type = g.full
    if g.name == "defaultdict":
        return d  # the first argument is the default factory (a global, classified on its own)
    if a:
        src = a[0]
        if isinstance(src, dict):
            for k, v in src.items():
                d[k] = v
        elif isinstance(src, (list, tuple)):
            for pair in src:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    m._fail(f"{g.full} built from a sequence that is not of pairs")
                m._check_key(pair[0])
                d[pair[0]] = pair[1]
        else:
            m._fail(f"{g.full} built from a {_kind(src)}")
    return d


def _h_set(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if not a:
        return set() if g.name == "set" else frozenset()
    src = a[0]
    if not isinstance(src, (list, tuple, set, frozenset, dict, str, bytes)):
        m._fail(f"{g.full} of a {_kind(src)}")
    for it in src:
        m._check_key(it)
    return set(src) if g.name == "set" else frozenset(src)


def _h_slice(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) > 3 or any(x is not None and type(x) is not int for x in a):
        return Opaque(g.full, a)
    return slice(*a)


def _h_complex(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) <= 2 and all(type(x) in (int, float) for x in a):
        return complex(*a)
    return Opaque(g.full, a)


def _h_bytearray(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if not a:
        return bytearray()
    if isinstance(a[0], (bytes, bytearray)):
        return bytearray(a[0])
    if isinstance(a[0], str) and len(a) >= 2 and isinstance(a[1], str) and a[1].lower() in _ENCODINGS:
        return bytearray(a[0].encode(a[1]))
    if isinstance(a[0], list) and all(type(x) is int and 0 <= x < 256 for x in a[0]):
        return bytearray(a[0])
    return Opaque(g.full, a)


def _h_bytes(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """builtins.bytes(): protocols 0-2 pickle b'' as a call with no arguments."""
    if not a:
        return b""
    b = _h_bytearray(m, g, a, kw)
    return bytes(b) if isinstance(b, bytearray) else b


def _h_codecs_encode(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], str):
        enc = a[1] if len(a) > 1 else "utf-8"
        if isinstance(enc, str) and enc.lower() in _ENCODINGS:
            try:
                return a[0].encode(enc)
            except UnicodeEncodeError:
                m._fail(f"_codecs.encode: text does not fit {enc}")
    return Opaque(g.full, a)


def _h_object(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    return Opaque(g.full, a, kw)


def _h_reconstructor(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """copyreg._reconstructor(cls, base, state): an instance of cls."""
    if len(a) >= 1:
        return m._new(a[0], (), None)
    return Opaque(g.full, a)


def _h_newobj(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """copyreg.__newobj__(cls, *args)."""
    if len(a) >= 1:
        return m._new(a[0], tuple(a[1:]), None)
    return Opaque(g.full, a)


HANDLERS: dict[str, Any] = {
    "collections.OrderedDict": _h_ordered_dict,
    "collections.defaultdict": _h_ordered_dict,
    "builtins.set": _h_set,
    "builtins.frozenset": _h_set,
    "__builtin__.set": _h_set,
    "__builtin__.frozenset": _h_set,
    "builtins.slice": _h_slice,
    "__builtin__.slice": _h_slice,
    "builtins.complex": _h_complex,
    "__builtin__.complex": _h_complex,
    "builtins.bytearray": _h_bytearray,
    "__builtin__.bytearray": _h_bytearray,
    "builtins.bytes": _h_bytes,
    "__builtin__.bytes": _h_bytes,
    "builtins.object": _h_object,
    "__builtin__.object": _h_object,
    "_codecs.encode": _h_codecs_encode,
    "copyreg._reconstructor": _h_reconstructor,
    "copy_reg._reconstructor": _h_reconstructor,
    "copyreg.__newobj__": _h_newobj,
    "copy_reg.__newobj__": _h_newobj,
}
