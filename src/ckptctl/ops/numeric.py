"""Arithmetic helpers of diff and average: dtype kinds, raw bytes as numpy views, single-threaded
BLAS for the calling thread (moved from ops/stream.py, which re-exports them).

numpy is imported lazily, only by the functions that need it."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from ckptctl import dtypes

if TYPE_CHECKING:
    import numpy as np

BLOCK = 1 << 17  # elements per arithmetic block (fits the L2 cache as float64)


def numeric_kind(dtype: str) -> str:
    """'float' | 'complex' | 'int' | 'bool' | 'bytes' (no arithmetic: compare bytes only)."""
    d = dtypes.BY_NAME[dtype]
    if d.kind in ("float", "complex", "int", "uint", "bool") and d.bits % 8 == 0:
        dt = dtypes.numpy_dtype(dtype)
        if dt is not None and dt.itemsize * 8 == d.bits:
            return {"uint": "int"}.get(d.kind, d.kind)
    return "bytes"


def itemsize(dtype: str) -> int:
    return dtypes.BY_NAME[dtype].itemsize


def as_array(buf, dtype: str) -> np.ndarray:
    """A flat numpy view of raw little-endian bytes (bool as uint8, bf16/fp8 via ml_dtypes)."""
    import numpy as np

    kind = numeric_kind(dtype)
    if kind == "bool":
        return np.frombuffer(buf, dtype=np.uint8)
    if kind == "bytes":
        return np.frombuffer(buf, dtype=np.uint8)
    return np.frombuffer(buf, dtype=dtypes.numpy_dtype(dtype))


_BLAS_LOCAL: Any = None  # openblas_set_num_threads_local, False when not available
_TLS = threading.local()


def blas_one_thread() -> bool:
    """Make BLAS single-threaded for the calling thread only (OpenBLAS >= 0.3.27).

    OpenBLAS's threaded ddot spins waiting for idle cores; on a busy 2-core machine it ran
    3-40x slower than one thread. `openblas_set_num_threads_local` changes the calling thread
    alone, so nothing else in the process is affected. False when numpy's BLAS is not an
    OpenBLAS we can find: callers then use numpy's own loop (einsum), about 2x slower.
    """
    global _BLAS_LOCAL
    done = getattr(_TLS, "blas1", None)
    if done is not None:
        return done
    if _BLAS_LOCAL is None:
        _BLAS_LOCAL = False
        try:
            import ctypes
            import glob

            import numpy as np

            base = os.path.dirname(os.path.dirname(np.__file__))
            for lib in sorted(glob.glob(os.path.join(base, "numpy.libs", "lib*openblas*.so*"))):
                fn = getattr(ctypes.CDLL(lib), "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int]
                    fn.restype = ctypes.c_int
                    _BLAS_LOCAL = fn
                    break
        except (OSError, AttributeError, ImportError):
            _BLAS_LOCAL = False
    ok = False
    if _BLAS_LOCAL:
        try:
            _BLAS_LOCAL(1)
            ok = True
        except Exception:  # noqa: BLE001
            ok = False
    _TLS.blas1 = ok
    return ok


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """Re(sum(conj(x) * y)) of two contiguous float64/complex128 vectors.

    Single-threaded BLAS when that can be arranged for this thread (see blas_one_thread),
    else numpy's own loop (einsum): never OpenBLAS's default threading, which spins.
    """
    import numpy as np

    if blas_one_thread():
        if np.iscomplexobj(x):
            return float(np.vdot(x, y).real)
        return float(np.dot(x, y))
    if np.iscomplexobj(x):
        return float(np.einsum("i,i->", np.conj(x), y).real)
    return float(np.einsum("i,i->", x, y))


def uint_view(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return (
        x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.itemsize])
        if x.itemsize <= 8
        else x.view(np.uint64)
    )
