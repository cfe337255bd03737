"""convert's dtype casts (--dtype): exactly torch's `.to(dtype)` on numpy arrays, chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, UsageError

# dtypes --dtype may name, and the floating dtypes that get cast (others are left as they are)
CAST_DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
)
CAST_SHORT = ("bf16", "fp16", "fp32", "fp64", "fp8_e4m3", "fp8_e5m2")  # what help and errors suggest


def cast_target(dtype: str) -> str:
    valid = f"use one of {', '.join(CAST_SHORT)} (or torch's names: {', '.join(CAST_DTYPES)})"
    try:
        d = dtypes.get(dtype)
    except KeyError:
        import difflib

        close = difflib.get_close_matches(dtype.lower(), [*CAST_SHORT, *CAST_DTYPES], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"--dtype {dtype!r}: unknown dtype; {hint}{valid}") from None
    if d.name not in CAST_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: cast targets are floating dtypes; {valid}")
    return d.name


def castable(dtype: str) -> bool:
    return dtype in CAST_DTYPES


def cast_array(x, dst: str):
    """Cast a numpy array of a floating dtype exactly like torch's `.to(dst)` for every non-NaN value.

    torch rounds to nearest even through float32 (so float64 -> 16/8-bit rounds twice), and
    saturates float8_e4m3fn at +-448 (inf included) instead of producing NaN. NaN stays NaN;
    its payload bits are not specified (torch's own differ between code paths).
    """
    import numpy as np

    out = dtypes.numpy_dtype(dst)
    if x.dtype == out:
        return x
    with np.errstate(all="ignore"):
        if dst not in ("float64", "float32") and x.dtype == np.float64:
            x = x.astype(np.float32)
        if dst == "float8_e4m3fn":
            x = np.clip(x.astype(np.float32, copy=False), -448.0, 448.0)
        return x.astype(out)


def aligned_chunks(chunks: Iterable, itemsize: int) -> Iterator[memoryview]:
    """Re-cut byte chunks so that each holds whole elements."""
    rest = bytearray()
    for c in chunks:
        mv = memoryview(c).cast("B")
        if rest:
            need = -len(rest) % itemsize
            rest += mv[:need]
            mv = mv[need:]
            if len(rest) % itemsize:
                continue
            yield memoryview(bytes(rest))
            rest = bytearray()
        n = len(mv) - len(mv) % itemsize
        if n:
            yield mv[:n]
        rest += mv[n:]
    if rest:
        raise CorruptFile(f"tensor data ends in the middle of an element ({len(rest)} stray bytes)")


BF16_BLOCK = 1 << 16  # elements per step of the bf16 cast (its scratch stays in the CPU cache)
BF16_FROM = ("float16", "float32", "float64")  # sources cast to bfloat16 without ml_dtypes


def f32_to_bf16_bits(x, out, scratch) -> None:
    """Round float32 array `x` to bfloat16 as torch does, writing the bits into uint16 array `out`.

    Round to nearest even on the bit pattern: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, which also
    carries to the next binade and to infinity exactly like ml_dtypes and torch; NaN stays NaN
    (sign kept, quiet bit set). Pure numpy in cache-sized blocks: `import ml_dtypes` alone costs
    ~0.9 CPU s here, more than casting a gigabyte. `scratch` is a uint32 array of BF16_BLOCK
    elements and a bool array of as many, reused."""
    import numpy as np

    u = x.view(np.uint32)
    a_full, nan_full = scratch
    for i in range(0, u.size, BF16_BLOCK):
        xs = u[i : i + BF16_BLOCK]
        n = xs.size
        a = a_full[:n]
        np.right_shift(xs, 16, out=a)
        np.bitwise_and(a, 1, out=a)
        np.add(a, 0x7FFF, out=a)
        np.add(a, xs, out=a)
        np.right_shift(a, 16, out=a)
        o = out[i : i + n]
        np.copyto(o, a, casting="unsafe")
        m = nan_full[:n]
        np.isnan(x[i : i + n], out=m)
        if m.any():
            o[m] = ((xs[m] >> 16) | 0x0040).astype(np.uint16)


def _bf16_chunks(chunks: Iterable, src: str, out: list | None) -> Iterator:
    import numpy as np

    sdt = np.dtype(src)
    scratch = (np.empty(BF16_BLOCK, np.uint32), np.empty(BF16_BLOCK, np.bool_))
    out = out if out is not None else [None]
    for c in aligned_chunks(chunks, sdt.itemsize):
        x = np.frombuffer(c, dtype=sdt)
        if sdt != np.float32:
            with np.errstate(all="ignore"):
                x = x.astype(np.float32)  # torch goes through float32 too (float64: rounds twice)
        need = x.size * 2
        if out[0] is None or len(out[0]) < need:
            out[0] = bytearray(need)
        o = np.frombuffer(out[0], dtype=np.uint16, count=x.size)
        f32_to_bf16_bits(x, o, scratch)
        yield o.view(np.uint8)


def cast_chunks(chunks: Iterable, src: str, dst: str, out: list | None = None) -> Iterator:
    """The cast bytes, as uint8 arrays (buffers: no copy into bytes objects).

    With `out` (a one-item list holding a bytearray or None), the casts that need no intermediate
    step are written into that reused buffer (grown when too small): each piece yielded is then
    valid until the next one is asked for."""
    import numpy as np

    if dst == "bfloat16" and src in BF16_FROM:
        yield from _bf16_chunks(chunks, src, out)
        return
    sdt = dtypes.numpy_dtype(src)
    odt = dtypes.numpy_dtype(dst)
    direct = (
        out is not None
        and sdt != odt
        and dst != "float8_e4m3fn"
        and not (dst not in ("float64", "float32") and sdt == np.float64)
    )
    for c in aligned_chunks(chunks, sdt.itemsize):
        x = np.frombuffer(c, dtype=sdt)
        if direct and out is not None:  # (direct implies out)
            need = x.size * odt.itemsize
            if out[0] is None or len(out[0]) < need:
                out[0] = bytearray(need)
            o = np.frombuffer(out[0], dtype=odt, count=x.size)
            with np.errstate(all="ignore"):
                np.copyto(o, x, casting="unsafe")  # the same cast loop as astype, into the reused buffer
            yield o.view(np.uint8)
        else:
            yield np.ascontiguousarray(cast_array(x, dst)).view(np.uint8)
