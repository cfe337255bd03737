"""Tests written to kill mutants that survived `tools/mutation.sh dtypes` (docs/testing.md,
"Mutation testing"). Public behaviour only: the dtype table's functions and `ckptctl convert`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cli

from ckptctl import dtypes

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.numpy")


def test_only_known_gguf_block_types_count_as_quantized():
    # `and` -> `or` made every known dtype "GGUF-quantized"
    assert dtypes.is_gguf_quant("gguf:Q4_K")
    assert dtypes.is_gguf_quant("gguf:Q8_0")
    for name in ("float32", "bfloat16", "int8", "uint8", "bool", "float8_e4m3fn"):
        assert not dtypes.is_gguf_quant(name), name
    assert not dtypes.is_gguf_quant("gguf:NOT_A_TYPE")  # a gguf: prefix alone is not enough


def test_plain_dtypes_convert_and_are_not_refused_as_quantized(tmp_path):
    # the effect of the mutant above: convert refused every tensor as "GGUF-quantized"
    src, dst = tmp_path / "a.safetensors", tmp_path / "a.pt"
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, -2, 3], dtype=np.int8)}
    st.save_file(tensors, str(src))
    r = cli("convert", src, dst)
    assert r.exit_code == 0, r.stderr
    got = torch.load(dst, weights_only=True)
    assert sorted(got) == ["i", "w"]
    assert np.array_equal(got["w"].numpy(), tensors["w"]) and np.array_equal(got["i"].numpy(), tensors["i"])


@pytest.mark.parametrize(
    "name,shape,expect",
    [
        ("bfloat16", (3, 5), 30),
        ("float64", (2,), 16),
        ("float4_e2m1fn", (2, 5), 5),
        ("int8", (), 1),
    ],
)
def test_nbytes_takes_a_dtype_object_as_well_as_a_name(name, shape, expect):
    # the mutant ignored a DType argument and looked it up as a name (KeyError)
    assert dtypes.nbytes(dtypes.get(name), shape) == expect
    assert dtypes.nbytes(name, shape) == expect
