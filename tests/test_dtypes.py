"""The dtype table agrees with torch, safetensors and numpy/ml_dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from ckptctl import dtypes


def test_every_torch_dtype_we_name_exists_with_the_same_size():
    import torch

    for d in dtypes.BY_NAME.values():
        if d.name in ("float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"):
            continue  # safetensors-only sub-byte floats
        if d.kind == "string":
            continue  # TensorFlow string tensors: listed, never converted
        if dtypes.is_gguf_quant(d.name):
            continue  # GGUF block-quantized types (gguf:Q4_K, ...): no torch dtype
        td = getattr(torch, d.name)
        assert td.itemsize * 8 == d.bits, d.name
        assert td.is_floating_point == (d.kind == "float"), d.name
        assert td.is_complex == (d.kind == "complex"), d.name


def test_safetensors_codes_match_the_reference_binding():
    import safetensors.torch as st
    import torch

    # the reference's own name table: torch dtype -> safetensors code
    table = st._TYPES if hasattr(st, "_TYPES") else {}
    for code, td in table.items():
        if code in dtypes.BY_ST and isinstance(td, torch.dtype):
            assert dtypes.BY_ST[code].name == str(td).removeprefix("torch."), code


@pytest.mark.parametrize("name", [n for n, d in dtypes.BY_NAME.items() if d.np and d.bits % 8 == 0])
def test_numpy_dtype_has_the_right_itemsize(name):
    dt = dtypes.numpy_dtype(name)
    assert dt.itemsize == dtypes.BY_NAME[name].itemsize
    assert dtypes.from_numpy(dt).name == name


def test_aliases_and_codes_resolve():
    assert dtypes.get("bf16").name == "bfloat16"
    assert dtypes.get("torch.float16").name == "float16"
    assert dtypes.get("F8_E4M3").name == "float8_e4m3fn"
    assert dtypes.get("fp32").name == "float32"
    with pytest.raises(KeyError):
        dtypes.get("float128")


def test_nbytes_counts_sub_byte_types_in_bits():
    assert dtypes.nbytes("float32", (3, 4)) == 48
    assert dtypes.nbytes("float32", ()) == 4
    assert dtypes.nbytes("bfloat16", (0, 5)) == 0
    assert dtypes.nbytes("float4_e2m1fn", (2, 5)) == 5
    assert np.dtype(dtypes.numpy_dtype("bool")).itemsize == 1
