"""GGUF: our own header parser, checked against the real fixture, gguf-py's writer and reader."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct

import numpy as np
import pytest
from conftest import REPO, cli, run

from ckptctl import dtypes
from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader, sniff
from ckptctl.formats.gguf import GGML_TYPES, PLAIN, REMOVED_TYPES, GGUFReader

gguf = pytest.importorskip("gguf", reason="gguf-py (the `dev` extra) writes the test files")
Q = gguf.GGMLQuantizationType

FIX = REPO.parent / "shared" / "fixtures" / "jax_gguf"
TINY = FIX / "tiny-llama.gguf"
needs_fixture = pytest.mark.skipif(not TINY.is_file(), reason="../shared/fixtures/jax_gguf is absent")


def sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()


def expected() -> dict:
    return json.loads((FIX / "EXPECTED.json").read_text())["tiny-llama.gguf"]


def stored_bytes(reader, name: str) -> bytes:
    return b"".join(bytes(c) for c in reader.iter_chunks(name, 1000))


def write(path, tensors: dict, meta=None, alignment: int | None = None, arch: str = "llama") -> None:
    """A GGUF file written by gguf-py: tensors are (array, raw_dtype or None)."""
    w = gguf.GGUFWriter(os.fspath(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for k, (v, vt) in (meta or {}).items():
        w.add_key_value(k, v, vt)
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def small_model(seed: int = 0, q_flip: bool = False, f_flip: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    f32 = rng.standard_normal((8, 64)).astype(np.float32)
    if f_flip:
        f32[3, 7] += 1
    q = rng.integers(0, 256, (8, 2 * 34), dtype=np.uint8)
    if q_flip:
        q[5, 9] ^= 0x10
    return {
        "token_embd.weight": (f32, None),
        "blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float16), None),
        "blk.0.ffn_up.weight": (q, Q.Q8_0),
        "output_norm.weight": (np.ones(64, dtype=np.float32), None),
    }


def one_line_error(p) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert p.stdout == ""
    return lines[0]


# ---- the type table ------------------------------------------------------------------------------
def test_type_table_matches_gguf_py():
    ours = {tid: (name, blk, size) for tid, (name, blk, size) in GGML_TYPES.items()}
    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in Q}
    assert {k: theirs[k] for k in ours} == ours  # every type we name, as gguf-py names and sizes it
    newer = sorted(theirs[k][0] for k in set(theirs) - set(ours))
    if newer:  # a gguf-py newer than 0.19: these would show as "unknown ggml type"
        import warnings

        warnings.warn(f"gguf-py knows ggml types ckptctl's table lacks: {', '.join(newer)}", stacklevel=1)
    assert not set(REMOVED_TYPES) & set(GGML_TYPES)
    quantized = {name for name, _b, _s in GGML_TYPES.values() if name not in PLAIN}
    assert quantized == set(dtypes.GGUF_QUANT_TYPES)
    for name in quantized:
        assert dtypes.BY_NAME[f"gguf:{name}"].kind == "quant"


# ---- the real fixture ----------------------------------------------------------------------------
@needs_fixture
def test_fixture_matches_expected():
    exp = expected()
    assert sniff(TINY) == "gguf"
    with open_reader(TINY) as r:
        info = r.info()
        assert info.format == "gguf" and info.kind == "v3"
        assert {t.name for t in info.tensors} == set(exp)
        for t in info.tensors:
            e = exp[t.name]
            assert r.ggml_type(t.name) == e["ggml_type"]
            assert t.dtype == {"F32": "float32", "F16": "float16", "Q8_0": "gguf:Q8_0"}[e["ggml_type"]]
            assert list(t.shape) == e["shape"]
            assert t.nbytes == e["n_bytes"]
            assert sha(stored_bytes(r, t.name)) == e["sha256"]
            rng = r.byte_range(t.name)
            with open(TINY, "rb") as f:
                f.seek(rng[1])
                assert sha(f.read(rng[2])) == e["sha256"]
    assert info.metadata["general.architecture"] == "llama"


@needs_fixture
@pytest.mark.parametrize("fmt", ["table", "tree", "json", "csv", "markdown"])
def test_fixture_inspect_every_format(fmt):
    res = cli("inspect", TINY, "--format", fmt)
    assert res.exit_code == 0, res.output
    for name in expected():
        leaf = name.rsplit(".", 2)[-2] if fmt == "tree" else name
        assert leaf in res.stdout
    if fmt == "json":
        doc = json.loads(res.stdout)
        assert doc["format"] == "gguf"
        got = {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in doc["tensors"]}
        assert got["blk.0.ffn_up.weight"] == ("gguf:Q8_0", [64, 32], 2176)
        assert doc["metadata"]["general.name"] == "tiny test model"


@needs_fixture
def test_fixture_converts_bit_exact(tmp_path):
    from safetensors.numpy import load_file

    exp = expected()
    out = tmp_path / "tiny.safetensors"
    res = run("convert", TINY, out, "--exclude", "blk.0.ffn_up.weight")
    assert res.returncode == 0, res.stderr
    back = load_file(out)
    assert set(back) == {n for n, e in exp.items() if e["ggml_type"] in ("F32", "F16")}
    for name, arr in back.items():
        assert arr.dtype == {"F32": np.float32, "F16": np.float16}[exp[name]["ggml_type"]]
        assert list(arr.shape) == exp[name]["shape"]
        assert sha(arr.tobytes()) == exp[name]["sha256"]


@needs_fixture
def test_fixture_quantized_convert_refused(tmp_path):
    out = tmp_path / "tiny.safetensors"
    line = one_line_error(run("convert", TINY, out))
    assert "'blk.0.ffn_up.weight'" in line and "Q8_0" in line and "--exclude" in line
    assert not out.exists() and os.listdir(tmp_path) == []


@needs_fixture
def test_fixture_scan_says_no_pickle():
    p = run("scan", TINY, "--format", "json")
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)
    assert r["verdict"] == "safe" and r["pickle"] is False and r["format"] == "gguf"
    assert "no pickle" in r["note"]


# ---- every ggml type, written by gguf-py ------------------------------------------------------------
PLAIN_NP = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


def every_type_tensors(rng) -> dict:
    out = {}
    for t in Q:
        if int(t) not in GGML_TYPES:
            continue  # a type newer than our table (test_type_table_matches_gguf_py says which)
        blk, size = gguf.GGML_QUANT_SIZES[t]
        name = f"t.{t.name.lower()}"
        if t.name in PLAIN_NP:
            dt = np.dtype(PLAIN_NP[t.name])
            raw = rng.integers(0, 256, 3 * 5 * dt.itemsize, dtype=np.uint8)
            out[name] = (raw.view(dt).reshape(3, 5), None)
        elif t.name == "BF16":
            out[name] = (rng.integers(0, 1 << 16, (3, 5), dtype=np.uint16), Q.BF16)
        else:  # two rows of two blocks, as raw bytes
            out[name] = (rng.integers(0, 256, (2, 2 * size), dtype=np.uint8), t)
    return out


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    rng = np.random.default_rng(42)
    tensors = every_type_tensors(rng)
    p = tmp_path_factory.mktemp("gguf") / "every.gguf"
    write(p, tensors)
    return p, tensors


def test_every_type_against_writer_and_gguf_py_reader(every_type):
    p, tensors = every_type
    ref = gguf.GGUFReader(p)
    ref_t = {t.name: t for t in ref.tensors}
    with GGUFReader(p) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == list(tensors)
        for t in info.tensors:
            arr, raw = tensors[t.name]
            qt = raw if raw is not None else Q[t.name.split(".")[1].upper()]
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            assert r.ggml_type(t.name) == qt.name
            if qt.name in PLAIN:
                assert t.dtype == PLAIN[qt.name]
                assert t.shape == arr.shape
            else:
                assert t.dtype == f"gguf:{qt.name}"
                assert t.shape == (arr.shape[0], arr.shape[1] // size * blk)  # elements, not bytes
            assert t.nbytes == arr.nbytes == ref_t[t.name].n_bytes
            assert tuple(int(x) for x in reversed(ref_t[t.name].shape)) == t.shape
            data = stored_bytes(r, t.name)
            assert data == arr.tobytes()  # the bytes gguf-py was given
            assert data == ref_t[t.name].data.tobytes()


def test_every_type_inspect_and_diff(every_type, tmp_path):
    p, tensors = every_type
    res = cli("inspect", p, "--format", "json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert len(doc["tensors"]) == len(tensors)
    # a copy with one byte changed in each tensor: diff finds every one, by value or by bytes
    data = bytearray(p.read_bytes())
    with GGUFReader(p) as r:
        for t in r.info().tensors:
            data[t.loc.offset + t.nbytes - 1] ^= 0x01
    q = tmp_path / "changed.gguf"
    q.write_bytes(bytes(data))
    res = cli("diff", p, q, "--format", "json")
    assert res.exit_code == 1
    diffs = {d["name"]: d for d in json.loads(res.stdout)["changed"]}
    assert set(diffs) == set(tensors)
    assert all(d["num_diff"] >= 1 for d in diffs.values()), diffs


def test_bf16_and_plain_types_convert_bit_exact(every_type, tmp_path):
    from safetensors.numpy import load_file

    p, tensors = every_type
    quantized = [n for n, (_a, raw) in tensors.items() if raw is not None and raw != Q.BF16]
    out = tmp_path / "plain.safetensors"
    args = ["convert", p, out]
    for n in quantized:
        args += ["--exclude", n]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    back = load_file(out)
    assert set(back) == set(tensors) - set(quantized)
    for name, arr in back.items():
        assert arr.tobytes() == tensors[name][0].tobytes()
        assert arr.shape == tensors[name][0].shape


def test_convert_to_pt_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "m.gguf"
    tensors = small_model()
    write(p, tensors)
    out = tmp_path / "m.pt"
    res = cli("convert", p, out, "--exclude", "blk.0.ffn_up.weight")
    assert res.exit_code == 0, res.output
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(tensors) - {"blk.0.ffn_up.weight"}
    for name, t in sd.items():
        assert t.numpy().tobytes() == tensors[name][0].tobytes()


def test_quantized_refusal_names_them_all(every_type, tmp_path):
    p, tensors = every_type
    res = cli("convert", p, tmp_path / "x.safetensors")
    assert res.exit_code == 1
    n_q = sum(1 for _a, raw in tensors.values() if raw is not None and raw != Q.BF16)
    assert f"{n_q} tensors are GGUF-quantized" in res.stderr and "--exclude" in res.stderr
    assert "Q4_K ×1" in res.stderr and "IQ2_XXS ×1" in res.stderr
    assert os.listdir(tmp_path) == []


# ---- metadata ----------------------------------------------------------------------------------
V = gguf.GGUFValueType


def test_metadata_every_value_type(tmp_path):
    meta = {
        "k.u8": (200, V.UINT8),
        "k.i8": (-100, V.INT8),
        "k.u16": (60000, V.UINT16),
        "k.i16": (-30000, V.INT16),
        "k.u32": (4_000_000_000, V.UINT32),
        "k.i32": (-2_000_000_000, V.INT32),
        "k.f32": (1e-5, V.FLOAT32),
        "k.bool": (True, V.BOOL),
        "k.str": ("héllo \x1b[31m", V.STRING),
        "k.u64": (2**63 + 5, V.UINT64),
        "k.i64": (-(2**62), V.INT64),
        "k.f64": (0.1, V.FLOAT64),
        "k.small": ([1, 2, 3, 4], V.ARRAY),
        "k.words": (["a", "b"], V.ARRAY),
        "k.nested": ([[1, 2], [3]], V.ARRAY),
        "tokenizer.ggml.tokens": ([f"tok{i}" for i in range(3000)], V.ARRAY),
        "tokenizer.ggml.scores": ([float(i) for i in range(3000)], V.ARRAY),
    }
    p = tmp_path / "meta.gguf"
    write(p, {"w": (np.zeros((2, 32), np.float32), None)}, meta)
    with GGUFReader(p) as r:
        m = r.info().metadata
    for k in (
        "k.u8",
        "k.i8",
        "k.u16",
        "k.i16",
        "k.u32",
        "k.i32",
        "k.bool",
        "k.str",
        "k.u64",
        "k.i64",
        "k.f64",
        "k.small",
        "k.words",
        "k.nested",
    ):
        assert m[k] == meta[k][0], k
    assert m["k.f32"] == 1e-05  # the float32 shown by its shortest decimal
    tok = b"".join(struct.pack("<Q", len(s)) + s.encode() for s in meta["tokenizer.ggml.tokens"][0])
    assert m["tokenizer.ggml.tokens"] == f"[3000 strings, sha256:{sha(tok)[:12]}]"
    scores = np.arange(3000, dtype=np.float32).tobytes()
    assert m["tokenizer.ggml.scores"] == f"[3000 float32, sha256:{sha(scores)[:12]}]"
    res = cli("inspect", p)
    assert res.exit_code == 0
    assert "[3000 strings, sha256:" in res.stdout and "tok17" not in res.stdout
    assert "\x1b" not in res.stdout  # a hostile string never reaches the terminal raw
    doc = json.loads(cli("inspect", p, "--format", "json").stdout)
    assert doc["metadata"]["k.u64"] == 2**63 + 5 and doc["metadata"]["k.nested"] == [[1, 2], [3]]


def test_custom_alignment_and_version_2(tmp_path):
    tensors = small_model()
    p = tmp_path / "a64.gguf"
    write(p, tensors, alignment=64)
    with GGUFReader(p) as r:
        assert r.info().metadata["general.alignment"] == 64
        for name, (arr, _raw) in tensors.items():
            assert stored_bytes(r, name) == arr.tobytes()
            assert r.byte_range(name)[1] % 64 == 0
    v2 = tmp_path / "v2.gguf"
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 has v3's layout
    v2.write_bytes(bytes(data))
    with GGUFReader(v2) as r:
        assert r.info().kind == "v2"
        assert stored_bytes(r, "token_embd.weight") == tensors["token_embd.weight"][0].tobytes()


def test_listing_reads_no_tensor_data(tmp_path, monkeypatch):
    p = tmp_path / "m.gguf"
    write(p, {"big": (np.zeros((256, 1024), np.float32), None)})
    reads = []
    real = os.pread

    def spy(fd, n, off):
        reads.append((off, n))
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", spy)
    with GGUFReader(p) as r:
        t = r.info().tensors[0]
    assert reads and all(off < t.loc.offset for off, _n in reads)
    assert sum(n for _o, n in reads) <= 64 * 1024  # one small window over a ~100-byte header


# ---- diff ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,code", [(None, 0), ("f", 1), ("q", 1)])
def test_diff_exit_codes(tmp_path, change, code):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write(a, small_model())
    write(b, small_model(f_flip=change == "f", q_flip=change == "q"))
    p = run("diff", a, b, "--format", "json")
    assert p.returncode == code, p.stderr
    doc = json.loads(p.stdout)
    changed = {d["name"]: d for d in doc["changed"]}
    assert doc["equal"] is (change is None)
    if change == "f":
        assert set(changed) == {"token_embd.weight"}
        assert changed["token_embd.weight"]["num_diff"] == 1
        assert changed["token_embd.weight"]["max_abs_diff"] == pytest.approx(1.0, abs=1e-6)
    elif change == "q":
        assert set(changed) == {"blk.0.ffn_up.weight"}  # compared as bytes: one byte differs
        assert changed["blk.0.ffn_up.weight"]["num_diff"] == 1
    else:
        assert not changed


def test_diff_shows_metadata_and_structure(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    toks = [f"t{i}" for i in range(100)]
    write(a, small_model(), {"tokenizer.ggml.tokens": (toks, V.ARRAY)})
    other = small_model()
    other.pop("output_norm.weight")
    write(b, other, {"tokenizer.ggml.tokens": (toks[:-1] + ["tX"], V.ARRAY)})
    res = cli("diff", a, b)
    assert res.exit_code == 1
    assert "tokenizer.ggml.tokens" in res.stdout  # same length, other strings: the digest differs
    assert "output_norm.weight" in res.stdout


# ---- bad input -------------------------------------------------------------------------------------
def _patched(src, dst, fn):
    data = bytearray(src.read_bytes())
    fn(data)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.gguf"
    write(p, small_model(), {"general.name": ("tiny", V.STRING)})
    return p


def _string_len_at(data: bytearray, text: bytes) -> int:
    """Offset of the u64 length in front of `text` in the header."""
    i = data.index(struct.pack("<Q", len(text)) + text)
    return i


BAD = {
    "bad magic": (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "bad magic"),
    "version 1": (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 1)), "version 1"),
    "version 7": (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 7)), "unsupported GGUF version 7"),
    "big-endian": (lambda d: d.__setitem__(slice(4, 8), struct.pack(">I", 3)), "big-endian"),
    "string past end": (
        lambda d: d.__setitem__(
            slice(_string_len_at(d, b"tiny"), _string_len_at(d, b"tiny") + 8), struct.pack("<Q", 10**12)
        ),
        "string length 1000000000000 runs past the end",
    ),
    "truncated data": (lambda d: d.__delitem__(slice(len(d) - 100, len(d))), "runs past the end"),
    "truncated header": (lambda d: d.__delitem__(slice(150, len(d))), "runs past the end"),
}


def test_duplicate_names_are_corrupt(tmp_path):
    # two tensors whose names differ in one letter, patched to the same name
    p = tmp_path / "dup.gguf"
    write(p, {"wa": (np.zeros(32, np.float32), None), "wb": (np.ones(32, np.float32), None)})
    q = _patched(
        p,
        tmp_path / "dup2.gguf",
        lambda d: d.__setitem__(d.index(b"wb"), ord("w")) or d.__setitem__(d.index(b"wb") + 1, ord("a")),
    )
    line = one_line_error(run("inspect", q))
    assert "tensor 'wa' appears twice" in line
    # and a duplicate metadata key
    w = tmp_path / "dupkey.gguf"
    write(w, {"w": (np.zeros(32, np.float32), None)}, {"k.one": (1, V.UINT32), "k.two": (2, V.UINT32)})
    k = _patched(
        w, tmp_path / "dupkey2.gguf", lambda d: d.__setitem__(slice(d.index(b"k.two"), d.index(b"k.two") + 5), b"k.one")
    )
    assert "metadata key 'k.one' appears twice" in one_line_error(run("inspect", k))


@pytest.mark.parametrize(
    "case",
    ["bad magic", "version 1", "version 7", "big-endian", "string past end", "truncated data", "truncated header"],
)
def test_bad_input_is_one_clean_line(good, tmp_path, case):
    fn, phrase = BAD[case]
    p = _patched(good, tmp_path / "bad.gguf", fn)
    line = one_line_error(run("inspect", p))
    assert line.startswith("error: ") and str(p) in line
    assert phrase in line, line
    if case != "bad magic":
        s = run("scan", p, "--format", "json")
        assert s.returncode == 1 and "Traceback" not in s.stderr
        assert phrase in json.loads(s.stdout)[0]["error"]


def test_unknown_and_removed_ggml_types(tmp_path):
    p = tmp_path / "t.gguf"
    write(p, {"w": (np.zeros(32, np.float32), None)})
    data = bytearray(p.read_bytes())
    i = data.index(b"w" + struct.pack("<I", 1)) + 1 + 4 + 8  # name, n_dims, ne[0] -> the type
    assert struct.unpack_from("<I", data, i)[0] == 0
    for tid, phrase in ((99, "unknown ggml type 99"), (31, "Q4_0_4_4 (31) was removed")):
        struct.pack_into("<I", data, i, tid)
        q = tmp_path / f"t{tid}.gguf"
        q.write_bytes(bytes(data))
        with pytest.raises(CorruptFile, match=phrase.replace("(", r"\(").replace(")", r"\)")):
            GGUFReader(q).info()


def test_short_and_empty_gguf_named_files(tmp_path):
    for content, phrase in ((b"GGU", "bad magic"), (b"GGUF\x03\x00", "runs past the end"), (b"\x00" * 64, "bad magic")):
        p = tmp_path / "short.gguf"
        p.write_bytes(content)
        res = cli("inspect", p)
        assert res.exit_code == 1 and phrase in res.stderr, res.stderr


def test_fuzz_mutations_raise_only_corrupt_file(good, tmp_path):
    """Random byte changes and cuts in the header: the reader lists the file or raises CorruptFile,
    and reading a listed tensor either works or raises CorruptFile."""
    base = bytearray(good.read_bytes())
    with GGUFReader(good) as r:
        header_end = r.info().tensors[0].loc.offset
    rnd = random.Random(15)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "corrupt": 0}
    for i in range(400):
        data = bytearray(base)
        if i % 5 == 0:
            del data[rnd.randrange(0, len(data)) :]
        else:
            for _ in range(rnd.randint(1, 4)):
                pos = rnd.randrange(0, header_end)
                data[pos] = rnd.choice([0, 0xFF, rnd.randrange(256), data[pos] ^ 0x80])
        p.write_bytes(bytes(data))
        try:
            with GGUFReader(p) as r:
                info = r.info()
                for t in info.tensors:
                    assert len(stored_bytes(r, t.name)) == t.nbytes
            outcomes["ok"] += 1
        except CorruptFile as e:
            assert "\n" not in str(e)
            outcomes["corrupt"] += 1
    assert outcomes["ok"] > 10 and outcomes["corrupt"] > 100, outcomes


def test_folder_with_one_gguf_file(tmp_path):
    write(tmp_path / "model.gguf", small_model())
    (tmp_path / "README.md").write_text("hi")
    res = cli("inspect", tmp_path, "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "gguf"


def test_tokenizer_string_past_end_is_named(tmp_path):
    p = tmp_path / "tok.gguf"
    toks = [f"piece{i:02d}" for i in range(40)]
    write(p, {"w": (np.zeros(32, np.float32), None)}, {"tokenizer.ggml.tokens": (toks, V.ARRAY)})
    q = _patched(
        p,
        tmp_path / "tok2.gguf",
        lambda d: d.__setitem__(
            slice(_string_len_at(d, b"piece05"), _string_len_at(d, b"piece05") + 8), struct.pack("<Q", 2**40)
        ),
    )
    line = one_line_error(run("inspect", q))
    assert "metadata key 'tokenizer.ggml.tokens': string 5 has length 1099511627776, past the end" in line


def test_ls_lists_gguf_files_of_a_run(tmp_path):
    write(tmp_path / "model-step100.gguf", small_model(0))
    write(tmp_path / "model-step200.gguf", small_model(1))
    res = cli("ls", tmp_path, "--format", "json")
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert sorted(r["step"] for r in rows) == [100, 200]
    assert {r["format"] for r in rows} == {"gguf"}


def test_huge_string_value_is_summarised_and_huge_name_refused(tmp_path):
    big = "x" * (2 * 1024 * 1024 + 3)
    p = tmp_path / "big.gguf"
    write(
        p,
        {"w": (np.zeros(32, np.float32), None)},
        {"tokenizer.chat_template": (big, V.STRING), "short": ("ok", V.STRING)},
    )
    with GGUFReader(p) as r:
        m = r.info().metadata
    assert m["tokenizer.chat_template"] == f"[string of {len(big)} bytes, sha256:{sha(big.encode())[:12]}]"
    assert m["short"] == "ok"
    q = tmp_path / "bigname.gguf"
    write(q, {"w": (np.zeros(32, np.float32), None)}, {"k" * 70000: (1, V.UINT8)})
    line = one_line_error(run("inspect", q))
    assert "the name of metadata key 1: a name of 70000 bytes (limit 65536)" in line


def test_vocabulary_across_header_windows(tmp_path):
    """A tokenizer larger than the first read windows: every length is still checked, and the
    keys after it are read from the right place."""
    toks = [f"tok{i:05d}" + "é" * (i % 7) for i in range(40000)]
    p = tmp_path / "vocab.gguf"
    write(
        p,
        {"w": (np.arange(64, dtype=np.float32), None)},
        {"tokenizer.ggml.tokens": (toks, V.ARRAY), "after": ("still here", V.STRING)},
    )
    with GGUFReader(p) as r:
        info = r.info()
        assert info.metadata["after"] == "still here"
        assert stored_bytes(r, "w") == np.arange(64, dtype=np.float32).tobytes()
    raw = b"".join(struct.pack("<Q", len(t.encode())) + t.encode() for t in toks)
    assert info.metadata["tokenizer.ggml.tokens"] == f"[40000 strings, sha256:{sha(raw)[:12]}]"
    for k in (1000, 9000, 39999):  # inside the first window, past it, the last one
        t = toks[k].encode()
        q = _patched(
            p,
            tmp_path / f"bad{k}.gguf",
            lambda d, t=t: d.__setitem__(
                slice(_string_len_at(d, t), _string_len_at(d, t) + 8), struct.pack("<Q", 2**50)
            ),
        )
        with pytest.raises(CorruptFile, match=f"string {k} has length {2**50}, past the end"):
            GGUFReader(q).info()
