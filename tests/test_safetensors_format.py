"""SafetensorsReader: our own header parser, checked against the reference implementation."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import REAL, cli, needs_real, real_manifest, run

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader, sniff
from ckptctl.formats.safetensors import SafetensorsReader

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def tbytes(t) -> bytes:
    """A torch tensor's logical bytes (C order, little-endian), any dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def all_dtype_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    out = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "fp8_e4m3": base.to(torch.float8_e4m3fn),
        "fp8_e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5),
        "i32": torch.arange(15, dtype=torch.int32),
        "i16": torch.arange(15, dtype=torch.int16) * -3,
        "i8": torch.arange(-5, 10, dtype=torch.int8),
        "u8": torch.arange(200, 215, dtype=torch.uint8),
        "u16": torch.arange(65000, 65015, dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 1, 4_000_000_000], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 2**62], dtype=torch.int64).to(torch.uint64),
        "bool": base > 0,
        "c64": torch.complex(base, -base),
        "scalar": torch.tensor(3.25),
        "scalar_i": torch.tensor(-9, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "big": torch.randn(100, 37, generator=g),
    }
    return out


@pytest.fixture
def st_file(tmp_path):
    tensors = all_dtype_tensors()
    p = tmp_path / "all.safetensors"
    save_file(tensors, p, metadata={"format": "pt", "note": "hello"})
    return p, tensors


def write_raw(path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + hb + data)


def test_info_matches_reference(st_file):
    p, tensors = st_file
    with SafetensorsReader(p) as r:
        info = r.info()
    assert info.format == "safetensors"
    assert info.metadata == {"format": "pt", "note": "hello"}
    assert {t.name for t in info.tensors} == set(tensors)
    with safe_open(p, "pt") as ref:
        assert ref.metadata() == info.metadata
        for t in info.tensors:
            want = ref.get_tensor(t.name)
            assert t.dtype == str(want.dtype).removeprefix("torch."), t.name
            assert t.shape == tuple(want.shape), t.name
            assert t.nbytes == want.numel() * want.element_size(), t.name
            assert t.alias_of is None
    assert info.num_params == sum(t.numel() for t in tensors.values())
    assert info.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_tensors_listed_in_file_order(st_file):
    p, _ = st_file
    with SafetensorsReader(p) as r:
        offsets = [r.byte_range(t.name)[1] for t in r.info().tensors]
    assert offsets == sorted(offsets)
    # the writer sorts by dtype then name, so file order is not name order
    names = [t.name for t in SafetensorsReader(p).info().tensors]
    assert names != sorted(names)


def test_every_tensor_bytes_exact(st_file):
    p, tensors = st_file
    with SafetensorsReader(p) as r:
        for name, t in tensors.items():
            want = tbytes(t)
            got = b"".join(bytes(c) for c in r.iter_chunks(name))
            assert got == want, name
            chunks = [bytes(c) for c in r.iter_chunks(name, size=7)]
            assert all(0 < len(c) <= 7 for c in chunks), name
            assert b"".join(chunks) == want, name
            f, off, n = r.byte_range(name)
            with open(f, "rb") as fh:
                fh.seek(off)
                assert fh.read(n) == want, name


def test_read_gives_numpy_arrays(st_file):
    import numpy as np

    p, tensors = st_file
    with SafetensorsReader(p) as r:
        a = r.read("bf16")
        assert str(a.dtype) == "bfloat16" and a.shape == (3, 5)
        assert a.tobytes() == tbytes(tensors["bf16"])
        s = r.read("scalar")
        assert s.shape == () and float(s) == 3.25
        assert r.read("empty").shape == (0, 4)
        assert np.array_equal(r.read("i64"), tensors["i64"].numpy())


def test_sub_byte_dtypes(tmp_path):
    p = tmp_path / "f4.safetensors"
    write_raw(
        p,
        {
            "a": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]},
            "b": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [4, 7]},
        },
        b"\x12\x34\x56\x78abc",
    )
    with SafetensorsReader(p) as r:
        a, b = r.info().tensors
        assert (a.dtype, a.nbytes, b.dtype, b.nbytes) == ("float4_e2m1fn", 4, "float6_e2m3fn", 3)
        assert b"".join(r.iter_chunks("b")) == b"abc"


def test_unsorted_entries_and_padding(tmp_path):
    p = tmp_path / "u.safetensors"
    header = json.dumps(
        {
            "second": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]},
            "__metadata__": {"k": "v"},
            "first": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
            "zero": {"dtype": "F16", "shape": [0, 5], "data_offsets": [8, 8]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    write_raw(p, header, struct.pack("<fi", 1.5, -2))
    with SafetensorsReader(p) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == ["first", "second", "zero"]
        assert info.metadata == {"k": "v"}
        assert r.read("first") == 1.5 and r.read("second")[0] == -2
        assert list(r.iter_chunks("zero")) == []


E4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

# (id, header (dict or raw bytes), data, header-length override or None, expected message or None)
CASES = [
    ("ok-empty", {}, b"", None, None),
    ("ok-leading-ws", b'  {"a":' + json.dumps(E4).encode() + b"}", b"\0" * 4, None, None),
    ("ok-meta-null", {"__metadata__": None, "a": E4}, b"\0" * 4, None, None),
    ("ok-extra-field", {"a": dict(E4, foo=1)}, b"\0" * 4, None, None),
    ("ok-f4-even", {"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, None, None),
    ("header-past-eof", {"a": E4}, b"\0" * 4, 1000, "header length 1000 runs past the end of the"),
    ("huge-header", {"a": E4}, b"\0" * 4, 100_000_001, "exceeds the safetensors limit of 100000000"),
    ("trailing-nul", b'{"a":' + json.dumps(E4).encode() + b"}\0\0", b"\0" * 4, None, "not valid JSON"),
    ("bad-utf8", b'{"\xff": 1}', b"", None, "not valid UTF-8"),
    ("bad-json", b'{"a": {"dtype": "F32",', b"", None, "not valid JSON"),
    ("not-object", b"[]", b"", None, "expected an object"),
    ("meta-int", {"__metadata__": {"x": 1}, "a": E4}, b"\0" * 4, None, "__metadata__ must map strings to strings"),
    ("meta-list", {"__metadata__": [], "a": E4}, b"\0" * 4, None, "__metadata__ must map strings to strings"),
    ("entry-not-object", {"a": 5}, b"", None, "entry is not an object"),
    ("missing-dtype", {"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "missing 'dtype'"),
    ("unknown-dtype", {"a": dict(E4, dtype="C128")}, b"\0" * 16, None, "unknown dtype 'C128'"),
    ("lowercase-dtype", {"a": dict(E4, dtype="f32")}, b"\0" * 4, None, "unknown dtype 'f32'"),
    ("shape-float", {"a": dict(E4, shape=[1.0])}, b"\0" * 4, None, "bad shape"),
    ("shape-negative", {"a": dict(E4, shape=[-1])}, b"\0" * 4, None, "bad shape"),
    ("shape-bool", {"a": dict(E4, shape=[True])}, b"\0" * 4, None, "bad shape"),
    ("shape-overflow", {"a": dict(E4, shape=[2**62, 4])}, b"\0" * 4, None, "overflows"),
    ("offsets-3", {"a": dict(E4, data_offsets=[0, 4, 4])}, b"\0" * 4, None, "bad data_offsets"),
    ("offsets-negative", {"a": dict(E4, data_offsets=[-4, 0])}, b"\0" * 4, None, "bad data_offsets"),
    ("overlap", {"a": E4, "b": dict(E4, data_offsets=[2, 6])}, b"\0" * 6, None, "overlaps the previous tensor"),
    ("aliasing", {"a": E4, "b": E4}, b"\0" * 4, None, "overlaps the previous tensor"),
    ("hole", {"a": dict(E4, data_offsets=[4, 8])}, b"\0" * 8, None, "a hole"),
    ("end-before-begin", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"", None, "bad data_offsets"),
    ("size-mismatch", {"a": dict(E4, shape=[2])}, b"\0" * 4, None, "needs 8"),
    ("f4-odd", {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2, None, "whole number of bytes"),
    ("trailing-bytes", {"a": E4}, b"\0" * 5, None, "but its header describes"),
    ("truncated-data", {"a": dict(E4, shape=[4], data_offsets=[0, 16])}, b"\0" * 10, None, "but its header describes"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_reference(tmp_path, case):
    _id, header, data, length, expected = case
    p = tmp_path / "x.safetensors"
    write_raw(p, header, data, length)
    try:
        with safe_open(p, "np") as ref:
            list(ref.keys())
        ref_ok = True
    except Exception:  # noqa: BLE001 - the reference raises several types
        ref_ok = False
    r = SafetensorsReader(p)
    if expected is None:
        r.info()
        assert ref_ok
    else:
        with pytest.raises(CorruptFile) as e:
            r.info()
        assert expected in str(e.value), str(e.value)
        assert str(p) in str(e.value)
        assert not ref_ok
    r.close()


def test_duplicate_keys_rejected(tmp_path):
    """Stricter than the reference (which keeps the last): two tensors with one name are ambiguous."""
    p = tmp_path / "dup.safetensors"
    e = json.dumps(E4)
    write_raw(p, f'{{"a": {e}, "a": {e}}}'.encode(), b"\0" * 4)
    with pytest.raises(CorruptFile, match="has the key 'a' twice"):
        SafetensorsReader(p).info()


def test_too_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x05\0\0")
    with pytest.raises(CorruptFile, match="too short"):
        SafetensorsReader(p).info()


def test_truncated_after_info_is_clean(tmp_path, st_file):
    p, _ = st_file
    r = SafetensorsReader(p)
    r.info()
    _f, off, _n = r.byte_range("big")
    os.truncate(p, off + 10)
    with pytest.raises(CorruptFile, match="file ends at byte"):
        b"".join(r.iter_chunks("big"))
    r.close()


def test_aliases_metadata(tmp_path):
    p = tmp_path / "tied.safetensors"
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    save_file(
        {"embed.weight": w, "bias": torch.ones(2)},
        p,
        metadata={"format": "pt", "ckptctl.aliases": json.dumps({"lm_head.weight": "embed.weight"})},
    )
    with SafetensorsReader(p) as r:
        info = r.info()
        t = info.tensor("lm_head.weight")
        assert t.alias_of == "embed.weight" and t.shape == (2, 3) and t.dtype == "float32"
        assert "ckptctl.aliases" not in info.metadata and info.metadata == {"format": "pt"}
        assert info.num_tensors == 3 and info.total_bytes == 24 + 8  # the alias counts once
        assert b"".join(r.iter_chunks("lm_head.weight")) == tbytes(w)
        assert r.byte_range("lm_head.weight") == r.byte_range("embed.weight")
    res = cli("inspect", p)
    assert res.exit_code == 0 and "(1 tied)" in res.stdout


def test_bad_aliases_warn(tmp_path):
    p = tmp_path / "badtied.safetensors"
    save_file({"a": torch.ones(2)}, p, metadata={"ckptctl.aliases": json.dumps({"b": "missing", "a": "a"})})
    info = SafetensorsReader(p).info()
    assert [t.name for t in info.tensors] == ["a"]
    assert len(info.warnings) == 2
    p2 = tmp_path / "badtied2.safetensors"
    save_file({"a": torch.ones(2)}, p2, metadata={"ckptctl.aliases": "not json"})
    assert "not a JSON object" in SafetensorsReader(p2).info().warnings[0]


def test_registry_sniffs_safetensors_whatever_the_name(tmp_path, st_file):
    p, _ = st_file
    q = tmp_path / "weights.pt"
    q.write_bytes(p.read_bytes())
    assert sniff(q) == "safetensors"
    with open_reader(q) as r:
        assert isinstance(r, SafetensorsReader)


def test_registry_sniffs_leading_whitespace_header(tmp_path):
    p = tmp_path / "ws.bin"
    write_raw(p, b'\n  {"a":' + json.dumps(E4).encode() + b"}", b"\0" * 4)
    assert sniff(p) == "safetensors"
    res = run("inspect", p, "-f", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tensors"][0]["name"] == "a"


def test_cli_inspect_json(st_file):
    p, tensors = st_file
    for res in (cli("inspect", p, "--format", "json"), run("inspect", p, "--format", "json")):
        assert res.returncode == 0 if hasattr(res, "returncode") else res.exit_code == 0
        doc = json.loads(res.stdout)
        assert doc["format"] == "safetensors" and doc["num_tensors"] == len(tensors)
        assert doc["metadata"]["note"] == "hello"
        got = {t["name"]: (t["dtype"], tuple(t["shape"]), t["nbytes"]) for t in doc["tensors"]}
        assert got["fp8_e4m3"] == ("float8_e4m3fn", (3, 5), 15)
        assert got["scalar"] == ("float32", (), 4)
        assert got["u64"] == ("uint64", (2,), 16)


NO_TORCH = """
import sys
from ckptctl.cli.app import app
try:
    app(["inspect", sys.argv[1], "--format", "json"])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "numpy", "h5py", "safetensors") if m in sys.modules]
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def test_inspect_imports_no_torch_no_numpy(st_file):
    p, _ = st_file
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(p)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY=\n" in res.stderr, res.stderr
    assert json.loads(res.stdout)["num_tensors"] > 0


@needs_real
def test_real_safetensors_files_match_reference():
    rows = [name for name, row in real_manifest().items() if row["format"] in ("safetensors", "safetensors-shard")]
    assert rows
    for rel in rows:
        p = REAL / rel
        with SafetensorsReader(p) as r, safe_open(p, "pt") as ref:
            info = r.info()
            assert [t.name for t in info.tensors] and set(ref.keys()) == {t.name for t in info.tensors}
            assert (ref.metadata() or {}) == info.metadata
            for t in info.tensors:
                want = ref.get_tensor(t.name)
                assert t.dtype == str(want.dtype).removeprefix("torch.")
                assert t.shape == tuple(want.shape)
                assert b"".join(r.iter_chunks(t.name)) == tbytes(want), (rel, t.name)


@needs_real
def test_real_malformed_file_fails_cleanly():
    p = REAL / "safetensors_malformed" / "syoyo_abuse_attempt_1.safetensors"
    res = run("inspect", p)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "header length 1000 runs past the end of the 88-byte file" in lines[0]
    assert str(p) in lines[0]


def test_mutated_headers_agree_with_reference(tmp_path):
    """Random byte flips and truncations: we accept exactly what the reference accepts, and every
    refusal is a CorruptFile (never another exception)."""
    import random

    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
            "c": {"dtype": "I8", "shape": [], "data_offsets": [32, 33]},
        }
    ).encode()
    good = struct.pack("<Q", len(header)) + header + bytes(range(33))
    rnd = random.Random(7)
    p = tmp_path / "m.safetensors"
    agreed = accepted = 0
    for i in range(300):
        data = bytearray(good)
        if i % 10 == 0:
            data = data[: rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 3)):
                pos = rnd.randrange(len(data) - 33)  # mutate the length and header, not the data
                data[pos] = rnd.choice(b'{}[]":,0123456789 -.eEFIUB\x00\xff' + bytes([rnd.randrange(256)]))
        p.write_bytes(bytes(data))
        try:
            with safe_open(p, "np") as ref:
                ref_keys = set(ref.keys())
            ref_ok = True
        except Exception:  # noqa: BLE001
            ref_ok = False
        try:
            info = SafetensorsReader(p).info()
            ours = True
        except CorruptFile as e:
            ours = False
            if ref_ok:
                assert "twice" in str(e), (bytes(data), str(e))  # our one deliberate difference
                continue
        assert ours == ref_ok, bytes(data)
        if ours:
            assert {t.name for t in info.tensors} == ref_keys
            accepted += 1
        agreed += 1
    assert agreed > 250
    assert 5 <= accepted < 280, accepted  # both verdicts are exercised
