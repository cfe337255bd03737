"""The one dtype table: torch names (what users see) <-> safetensors codes <-> numpy/ml_dtypes.

Nothing here imports torch. `numpy_dtype()` imports ml_dtypes lazily for bf16/fp8/fp4.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class DType:
    name: str  # torch's name: float32, bfloat16, float8_e4m3fn, int64, bool, ...
    bits: int  # bits per element (as torch counts elements)
    kind: str  # float | int | uint | bool | complex | quant | raw
    st: str | None = None  # safetensors code, if safetensors can hold it
    np: str | None = None  # numpy / ml_dtypes name, if numpy can hold it
    storage: str | None = None  # legacy typed storage class name in torch pickles

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)

    @property
    def is_floating(self) -> bool:
        return self.kind == "float"


_TABLE = [
    DType("float64", 64, "float", "F64", "float64", "DoubleStorage"),
    DType("float32", 32, "float", "F32", "float32", "FloatStorage"),
    DType("float16", 16, "float", "F16", "float16", "HalfStorage"),
    DType("bfloat16", 16, "float", "BF16", "bfloat16", "BFloat16Storage"),
    DType("float8_e4m3fn", 8, "float", "F8_E4M3", "float8_e4m3fn"),
    DType("float8_e5m2", 8, "float", "F8_E5M2", "float8_e5m2"),
    DType("float8_e4m3fnuz", 8, "float", "F8_E4M3FNUZ", "float8_e4m3fnuz"),
    DType("float8_e5m2fnuz", 8, "float", "F8_E5M2FNUZ", "float8_e5m2fnuz"),
    DType("float8_e8m0fnu", 8, "float", "F8_E8M0", "float8_e8m0fnu"),
    # torch packs two fp4 values per element; safetensors' F4 counts single 4-bit values.
    DType("float4_e2m1fn_x2", 8, "float", None, None),
    DType("complex128", 128, "complex", None, "complex128", "ComplexDoubleStorage"),
    DType("complex64", 64, "complex", "C64", "complex64", "ComplexFloatStorage"),
    DType("complex32", 32, "complex", None, None),
    DType("int64", 64, "int", "I64", "int64", "LongStorage"),
    DType("int32", 32, "int", "I32", "int32", "IntStorage"),
    DType("int16", 16, "int", "I16", "int16", "ShortStorage"),
    DType("int8", 8, "int", "I8", "int8", "CharStorage"),
    DType("uint64", 64, "uint", "U64", "uint64"),
    DType("uint32", 32, "uint", "U32", "uint32"),
    DType("uint16", 16, "uint", "U16", "uint16"),
    DType("uint8", 8, "uint", "U8", "uint8", "ByteStorage"),
    DType("bool", 8, "bool", "BOOL", "bool", "BoolStorage"),
    DType("qint8", 8, "quant", None, None, "QInt8Storage"),
    DType("quint8", 8, "quant", None, None, "QUInt8Storage"),
    DType("qint32", 32, "quant", None, None, "QInt32Storage"),
    DType("quint4x2", 8, "quant", None, None, "QUInt4x2Storage"),
    DType("quint2x4", 8, "quant", None, None, "QUInt2x4Storage"),
    DType("bits8", 8, "raw", None, None),
    DType("bits16", 16, "raw", None, None),
    DType("bits1x8", 8, "raw", None, None),
    DType("bits2x4", 8, "raw", None, None),
    DType("bits4x2", 8, "raw", None, None),
    # safetensors-only sub-byte floats (no torch dtype of the same element size)
    DType("float4_e2m1fn", 4, "float", "F4", "float4_e2m1fn"),
    DType("float6_e2m3fn", 6, "float", "F6_E2M3", "float6_e2m3fn"),
    DType("float6_e3m2fn", 6, "float", "F6_E3M2", "float6_e3m2fn"),
    # TensorFlow string tensors: variable-length bytes, listed but never converted (bits 0: no fixed size)
    DType("string", 0, "string", None, None),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_ST: dict[str, DType] = {d.st: d for d in _TABLE if d.st}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in _TABLE if d.storage}
BY_NP: dict[str, DType] = {d.np: d for d in _TABLE if d.np}

# GGUF (ggml) block-quantized types, as `gguf:<TYPE>`: kind "quant", so no arithmetic (diff
# compares their bytes) and the writers refuse them. Sizes are per block, not per element:
# `bits` is a placeholder and formats/gguf.py computes nbytes from its own block table.
GGUF_QUANT_TYPES = (
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q8_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "IQ1_M",
    "TQ1_0",
    "TQ2_0",
    "MXFP4",
    "NVFP4",
    "Q1_0",
)
for _q in GGUF_QUANT_TYPES:
    BY_NAME[f"gguf:{_q}"] = DType(f"gguf:{_q}", 8, "quant")


def is_gguf_quant(name: str) -> bool:
    return name.startswith("gguf:") and name in BY_NAME


# Spellings users type on the command line (--dtype bf16) and that other tools use.
ALIASES = {
    "fp64": "float64",
    "double": "float64",
    "f64": "float64",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "e5m2": "float8_e5m2",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}


def get(name: str) -> DType:
    """Look a dtype up by torch name, alias, safetensors code or 'torch.float32'."""
    key = name.removeprefix("torch.")
    if key in BY_NAME:
        return BY_NAME[key]
    low = key.lower()
    if low in BY_NAME:
        return BY_NAME[low]
    if low in ALIASES:
        return BY_NAME[ALIASES[low]]
    if key.upper() in BY_ST:
        return BY_ST[key.upper()]
    raise KeyError(name)


def nbytes(dtype: str | DType, shape) -> int:
    d = dtype if isinstance(dtype, DType) else BY_NAME[dtype]
    n = 1
    for s in shape:
        n *= int(s)
    return (n * d.bits + 7) // 8


@cache
def numpy_dtype(name: str):
    """numpy dtype for a torch dtype name; bf16/fp8 come from ml_dtypes; raw bytes otherwise."""
    import numpy as np

    d = BY_NAME[name]
    if d.np is None:
        return None
    try:
        return np.dtype(d.np)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, d.np))


def storage_numpy_dtype(name: str):
    """A numpy dtype of the same item size that holds the raw bits (uint8/uint16/...)."""
    import numpy as np

    dt = numpy_dtype(name)
    if dt is not None:
        return dt
    return np.dtype(f"V{BY_NAME[name].itemsize}")


def from_numpy(dt) -> DType:
    import numpy as np

    dt = np.dtype(dt)
    key = dt.name
    if key in BY_NP:
        return BY_NP[key]
    raise KeyError(str(dt))


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
