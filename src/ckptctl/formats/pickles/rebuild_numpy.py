"""numpy's vocabulary: arrays (`_reconstruct` + BUILD, protocol 5's `_frombuffer`), dtypes and
scalars, as inert NumpyArray / NumpyDtype / NumpyScalar records."""

from __future__ import annotations

from typing import Any

from ckptctl.formats.pickles.records import (
    Global,
    MachineLike,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    Opaque,
    Span,
    _ints,
)

_NUMPY_NAMES = {
    "bool": "b1",
    "bool_": "b1",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
    "complex64": "c8",
    "complex128": "c16",
    "half": "f2",
    "single": "f4",
    "double": "f8",
    "float": "f8",
    "int": "i8",
}


def _h_np_reconstruct(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    return NumpyArray()


def _h_np_dtype(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], str):
        code = a[0]
        code = _NUMPY_NAMES.get(code, code)
        if code in ("?", "bool"):
            code = "b1"
        return NumpyDtype(code)
    if a and isinstance(a[0], Global):  # numpy 2 may pass a dtype class
        return NumpyDtype(_NUMPY_NAMES.get(a[0].name.removesuffix("DType").lower(), a[0].name))
    return NumpyDtype("?")


def _h_np_scalar(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    dt = a[0] if a and isinstance(a[0], NumpyDtype) else None
    raw = a[1] if len(a) > 1 else None
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    return NumpyScalar(dt, raw if isinstance(raw, (bytes, bytearray)) else None)


def _h_np_frombuffer(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """numpy's protocol-5 reduce: _frombuffer(buffer, dtype, shape, order)."""
    if len(a) != 4 or not isinstance(a[1], NumpyDtype):
        return Opaque(g.full, a)
    buf = a[0]
    if isinstance(buf, bytearray):
        buf = bytes(buf)
    if not isinstance(buf, (bytes, Span)):
        return Opaque(g.full, a)
    return NumpyArray(_ints(a[2], "numpy shape", m), a[1], a[3] == "F", buf)


def _numpy_build(m: MachineLike, arr: NumpyArray, state: Any) -> None:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        m._fail("numpy array BUILD state is not (version, shape, dtype, fortran, data)")
    if len(state) == 5:
        state = state[1:]
    shape, dt, fortran, raw = state
    arr.shape = _ints(shape, "numpy shape", m)
    arr.dtype = dt if isinstance(dt, NumpyDtype) else None
    arr.fortran = bool(fortran)
    if isinstance(raw, str):
        raw = raw.encode("latin1")  # python-2 era: bytes were str, decoded as latin1
    arr.data = raw
    if arr.dtype is not None and arr.dtype.kind == "O" and isinstance(raw, (bytes, bytearray, Span)):
        m.nested.append(("numpy object array", raw))  # object arrays' data is pickled objects


HANDLERS: dict[str, Any] = {
    "numpy.core.multiarray._reconstruct": _h_np_reconstruct,
    "numpy._core.multiarray._reconstruct": _h_np_reconstruct,
    "numpy.dtype": _h_np_dtype,
    "numpy.core.numeric._frombuffer": _h_np_frombuffer,
    "numpy._core.numeric._frombuffer": _h_np_frombuffer,
    "numpy.core.multiarray.scalar": _h_np_scalar,
    "numpy._core.multiarray.scalar": _h_np_scalar,
}
