"""TensorFlow tensor bundles, read without TensorFlow.

Real files (../shared/fixtures/tensorflow/, written by TF 2.21 / TF 1 Saver) are asserted against
EXPECTED.json (read back by TensorFlow's own reader) and the README's constants; everything the
fixtures lack (every dtype, big-endian, several shards, strings, partitioned variables, broken
files) is written by tests/tf_writer.py and asserted against numpy, safetensors and torch.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import REPO, every_tensor
from conftest import cli as _cli
from conftest import run as _run
from tf_writer import crc, entry_proto, masked, write_bundle, write_state_file

from ckptctl.errors import CkptError
from ckptctl.formats import open_reader, resolve


# These tests compare with every variable the producer wrote (EXPECTED.json lists optimizer state
# too), so every command gets --all; the model-weights default has its own tests below.
def cli(*args, **kw):
    return _cli(*every_tensor(args), **kw)


def run(*args, **kw):
    return _run(*every_tensor(args), **kw)


TF = REPO.parent / "shared" / "fixtures" / "tensorflow"
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
TF_CKPTS = [
    "google_tftools/model-two-variables.ckpt",
    "google_tftools/model-three-variables.ckpt",
    "tf2_manager_run/ckpt-10",
    "tf2_manager_run/ckpt-20",
]


def _expected() -> dict:
    if not (TF / "EXPECTED.json").is_file():
        pytest.skip("../shared/fixtures/tensorflow is absent")
    return json.loads((TF / "EXPECTED.json").read_text())


def _name(key: str) -> str:
    return key[: -len(SUFFIX)] if key.endswith(SUFFIX) else key


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _one_line(res, path, needles, code=1):
    assert res.returncode == code, (res.returncode, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0] and all(n in lines[0] for n in needles), res.stderr


# ---- real fixtures -------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", TF_CKPTS)
def test_fixture_matches_tensorflow(rel):
    """Names, dtypes, shapes and the sha256 of every tensor's bytes, as TensorFlow read them."""
    want = _expected()[rel]
    with open_reader(TF / rel) as r:
        info = r.info()
        assert info.format == "tf-bundle"
        got = {t.name: t for t in info.tensors}
        assert GRAPH not in got  # metadata, not a tensor
        want_t = {k: v for k, v in want.items() if k != GRAPH}
        assert sorted(got) == sorted(_name(k) for k in want_t)
        for key, w in want_t.items():
            t = got[_name(key)]
            assert t.key == key
            assert (t.dtype, list(t.shape)) == (w["dtype"], w["shape"])
            assert _sha(r.iter_chunks(t.name)) == w["sha256"], key
            assert _sha(r.iter_chunks(t.name, 4)) == w["sha256"], key  # small chunks too


def test_fixture_constants_from_readme():
    _expected()
    with open_reader(TF / "google_tftools/model-two-variables.ckpt.index") as r:
        assert r.read("v1").tolist() == [1, 1, 1] and r.read("v2").tolist() == [-1] * 5
    with open_reader(TF / "google_tftools/model-three-variables.ckpt") as r:
        want = {"v1": [0] * 3, "v2": [0] * 5, "var1": [2] * 5, "var2": [-2] * 5, "var3": [-4] * 5}
        assert {n: r.read(n).tolist() for n in want} == want
        assert all(r.read(n).dtype == np.float32 for n in want)


def test_fixture_json_keeps_raw_key_and_object_graph_names():
    _expected()
    res = cli("inspect", TF / "tf2_manager_run/ckpt-20", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["format"] == "tf-bundle" and doc["kind"] == "tf2"
    by = {t["name"]: t for t in doc["tensors"]}
    k = by["model/layer_with_weights-0/kernel"]
    assert k["key"] == "model/layer_with_weights-0/kernel" + SUFFIX and k["shape"] == [3, 3, 1, 4]
    assert k["full_name"] == "conv2d/kernel"  # the old-style name from the object graph
    assert by["optimizer/_variables/1"]["full_name"] == "SGD/m/conv2d/kernel"
    assert sorted(doc["files"]) == sorted(
        str(TF / "tf2_manager_run" / f) for f in ("ckpt-20.index", "ckpt-20.data-00000-of-00001")
    )


@pytest.mark.parametrize("how", ["prefix", "index", "data", "folder"])
def test_fixture_naming(how):
    want = _expected()["tf2_manager_run/ckpt-20"]
    run_dir = TF / "tf2_manager_run"
    path = {
        "prefix": run_dir / "ckpt-20",
        "index": run_dir / "ckpt-20.index",
        "data": run_dir / "ckpt-20.data-00000-of-00001",
        "folder": run_dir,
    }[how]
    res = cli("inspect", path, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["path"] == str(run_dir / "ckpt-20")
    assert {t["key"]: [t["dtype"], t["shape"]] for t in doc["tensors"]} == {
        k: [v["dtype"], v["shape"]] for k, v in want.items() if k != GRAPH
    }
    picked = [line for line in res.stderr.splitlines() if "latest checkpoint" in line]
    if how == "folder":  # the state file's model_checkpoint_path, said on stderr
        assert len(picked) == 1 and "ckpt-20" in picked[0] and str(run_dir / "checkpoint") in picked[0]
    else:
        assert picked == []


@pytest.mark.parametrize("fmt", ["table", "tree", "csv", "markdown"])
def test_fixture_inspect_formats(fmt):
    _expected()
    res = cli("inspect", TF / "tf2_manager_run/ckpt-10", "--format", fmt)
    assert res.exit_code == 0, res.stderr
    assert "layer_with_weights-2" in res.stdout and "kernel" in res.stdout
    assert ".ATTRIBUTES" not in res.stdout and GRAPH not in res.stdout
    if fmt == "csv":
        rows = res.stdout.strip().splitlines()
        assert len(rows) == 1 + 18 and rows[1].startswith("epoch,int32,")


@pytest.mark.parametrize("rel", TF_CKPTS)
def test_fixture_converts_bit_exact(tmp_path, rel):
    """safetensors and .pt outputs, read back by safetensors and torch, hold TensorFlow's bytes."""
    import torch
    from safetensors.numpy import load_file

    want = {_name(k): v for k, v in _expected()[rel].items() if k != GRAPH}
    st, pt, h5 = tmp_path / "o.safetensors", tmp_path / "o.pt", tmp_path / "o.h5"
    for out in (st, pt, h5):
        res = cli("convert", TF / rel, out)
        assert res.exit_code == 0, res.stderr
        assert "verified" in res.stderr
    arrays = load_file(str(st))
    assert sorted(arrays) == sorted(want)
    for n, w in want.items():
        a = arrays[n]
        assert (str(a.dtype), list(a.shape)) == (w["dtype"], w["shape"])
        assert hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() == w["sha256"], n
    sd = torch.load(pt, weights_only=True)
    assert sorted(sd) == sorted(want)
    for n, w in want.items():
        t = sd[n]
        assert (str(t.dtype).removeprefix("torch."), list(t.shape)) == (w["dtype"], w["shape"])
        assert hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() == w["sha256"], n
    import h5py

    with h5py.File(h5) as f:
        got = {}

        def visit(k, v):
            if isinstance(v, h5py.Dataset):
                got[k] = v[()]

        f.visititems(visit)
        assert sorted(got) == sorted(want)
        for n, w in want.items():
            assert hashlib.sha256(np.ascontiguousarray(got[n]).tobytes()).hexdigest() == w["sha256"], n


def test_fixture_diff_average_scan(tmp_path):
    _expected()
    a, b = TF / "tf2_manager_run/ckpt-10", TF / "tf2_manager_run/ckpt-20"
    st = tmp_path / "a.safetensors"
    assert cli("convert", a, st).exit_code == 0
    same = run("diff", a, st)
    assert same.returncode == 0 and "equal" in same.stdout + same.stderr, same.stderr
    assert run("diff", a, Path(f"{a}.index")).returncode == 0
    differ = cli("diff", a, b, "--format", "json")
    assert differ.exit_code == 1
    doc = json.loads(differ.stdout)
    assert "model/layer_with_weights-2/kernel" in json.dumps(doc)
    # average: ckptctl's float mean against numpy's, on the raw TF bytes
    out = tmp_path / "avg.safetensors"
    res = cli("average", a, b, "-o", out)
    assert res.exit_code == 0, res.stderr
    from safetensors.numpy import load_file

    avg = load_file(str(out))

    k = "model/layer_with_weights-2/kernel"
    with open_reader(a) as ra, open_reader(b) as rb:
        xa, xb = ra.read(k), rb.read(k)
    assert hashlib.sha256(xa.tobytes()).hexdigest() == _expected()["tf2_manager_run/ckpt-10"][k + SUFFIX]["sha256"]
    assert hashlib.sha256(xb.tobytes()).hexdigest() == _expected()["tf2_manager_run/ckpt-20"][k + SUFFIX]["sha256"]
    np.testing.assert_array_equal(avg[k], ((xa.astype(np.float64) + xb) / 2).astype(np.float32))
    # scan: no pickle in a TF bundle
    sc = run("scan", a, "--format", "json")
    assert sc.returncode == 0, sc.stderr
    (row,) = json.loads(sc.stdout)
    assert row["format"] == "tf-bundle" and row["pickle"] is False and row["verdict"] == "safe"
    assert "no pickle" in row["note"]


def test_fixture_completion_uses_the_same_names():
    _expected()
    from ckptctl.cli.complete import tensor_names

    names = tensor_names(TF / "tf2_manager_run/ckpt-10")
    assert "model/layer_with_weights-0/kernel" in names and not any(".ATTRIBUTES" in n for n in names)
    assert sorted(names) == sorted(_name(k) for k in _expected()["tf2_manager_run/ckpt-10"] if k != GRAPH)


def test_no_tensorflow_or_keras_import(tmp_path):
    _expected()
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ckptctl.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['inspect', {str(TF / 'tf2_manager_run')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'inspect imported torch'\n"
        f"r = CliRunner().invoke(app, ['convert', {str(TF / 'tf2_manager_run/ckpt-10')!r}, "
        f"{str(tmp_path / 'x.pt')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'jax'))\n"
        "print('BAD', bad)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "BAD []" in p.stdout
    assert (tmp_path / "x.pt").is_file()


# ---- written by the test writer: every dtype, layouts, naming ----------------------------------------
def _all_dtypes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for dt in [
        "float32",
        "float64",
        "float16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    ]:
        a = rng.standard_normal((3, 5)) * 100
        if dt.startswith("complex"):
            a = a + 1j * rng.standard_normal((3, 5))
        out[f"model/{dt}{SUFFIX}"] = a.astype(dt)
    for dt in ["bfloat16", "float8_e5m2", "float8_e4m3fn"]:
        out[f"model/{dt}{SUFFIX}"] = rng.standard_normal((4, 3)).astype(getattr(ml_dtypes, dt))
    out["scalar"] = np.array(3.25, np.float32)
    out["scalar_i64"] = np.array(-7, np.int64)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["big/rows"] = rng.standard_normal((300, 50)).astype(np.float32)  # spans many 4-byte chunks
    return out


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
@pytest.mark.parametrize("shards", [1, 3])
def test_every_dtype_layout(tmp_path, big_endian, shards):
    arrays = _all_dtypes()
    files = write_bundle(tmp_path / "run" / "ckpt-7", arrays, big_endian=big_endian, num_shards=shards, block_size=128)
    assert len(files) == 1 + shards
    with open_reader(tmp_path / "run" / "ckpt-7") as r:
        info = r.info()
        assert info.files == [str(f) for f in files]
        got = {t.key: t for t in info.tensors}
        assert sorted(got) == sorted(arrays)
        for key, a in arrays.items():
            t = got[key]
            want_dtype = {"bool": "bool"}.get(a.dtype.name, a.dtype.name)
            assert (t.dtype, t.shape, t.nbytes) == (want_dtype, a.shape, a.nbytes), key
            assert t.name == _name(key)
            assert b"".join(r.iter_chunks(t.name, 16)) == np.ascontiguousarray(a).tobytes(), key
            rng_ = r.byte_range(t.name)
            if big_endian and a.dtype.itemsize > 1:
                assert rng_ is None  # the bytes on disk are not the logical value
            elif not big_endian:
                assert rng_ is not None and rng_[2] == a.nbytes


def test_every_dtype_converts_bit_exact(tmp_path):
    import torch
    from safetensors.torch import load_file

    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

    arrays = _all_dtypes()
    write_bundle(tmp_path / "ckpt-1", arrays, big_endian=True, num_shards=2)
    st_arrays = {k: v for k, v in arrays.items() if v.dtype.name != "complex128"}  # safetensors has no C128
    st = tmp_path / "o.safetensors"
    res = cli("convert", tmp_path / "ckpt-1", st, "--exclude", "model/complex128")
    assert res.exit_code == 0, res.stderr
    got = load_file(str(st))
    assert sorted(got) == sorted(_name(k) for k in st_arrays)
    for k, a in st_arrays.items():
        assert raw(got[_name(k)]) == np.ascontiguousarray(a).tobytes(), k
        assert tuple(got[_name(k)].shape) == a.shape
    pt = tmp_path / "o.pt"
    res = cli("convert", tmp_path / "ckpt-1", pt)
    assert res.exit_code == 0, res.stderr
    sd = torch.load(pt, weights_only=True)
    for k, a in arrays.items():
        t = sd[_name(k)]
        assert tuple(t.shape) == a.shape and str(t.dtype) == f"torch.{a.dtype.name}"
        assert raw(t) == np.ascontiguousarray(a).tobytes(), k
    assert cli("diff", tmp_path / "ckpt-1", pt).exit_code == 0


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
def test_string_tensors_listed_not_converted(tmp_path, big_endian):
    arrays = {"words": [b"alpha", b"", b"\xffbeta"], "w": np.arange(6, dtype=np.float32)}
    write_bundle(tmp_path / "c", arrays, big_endian=big_endian)
    res = cli("inspect", tmp_path / "c", "--format", "json")
    assert res.exit_code == 0
    by = {t["name"]: t for t in json.loads(res.stdout)["tensors"]}
    assert by["words"]["dtype"] == "string" and by["words"]["shape"] == [3]
    assert "string tensor" in res.stderr and "--exclude" in res.stderr
    with open_reader(tmp_path / "c") as r:  # the record's CRC is TF's (lengths as uint32) and checks
        from ckptctl.formats.tf_bundle import string_values

        assert string_values(b"".join(r.iter_chunks("words")), 3) == [b"alpha", b"", b"\xffbeta"]
    for suffix in ("safetensors", "pt", "h5"):  # refused before anything is written
        out = tmp_path / f"o.{suffix}"
        refused = run("convert", tmp_path / "c", out)
        assert refused.returncode == 1 and "'words'" in refused.stderr and "string" in refused.stderr
        assert "Traceback" not in refused.stderr and not out.exists()
        assert "verify failed" not in refused.stderr
    out = tmp_path / "o.safetensors"
    ok = cli("convert", tmp_path / "c", out, "--exclude", "words")
    assert ok.exit_code == 0, ok.stderr
    from safetensors.numpy import load_file

    assert load_file(str(out))["w"].tolist() == list(range(6))


def test_partitioned_variable_first_axis(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(10, 6)
    write_bundle(tmp_path / "c", {"emb": a, "b": np.ones(3, np.int32)}, slices={"emb": [3, 3, 4]}, num_shards=2)
    with open_reader(tmp_path / "c") as r:
        t = r.info().tensor("emb")
        assert (t.dtype, t.shape) == ("float32", (10, 6))
        assert [x.name for x in r.info().tensors] == ["b", "emb"]  # slice entries are not tensors
        assert b"".join(r.iter_chunks("emb", 8)) == a.tobytes()
        assert r.byte_range("emb") is None
    out = tmp_path / "o.safetensors"
    assert cli("convert", tmp_path / "c", out).exit_code == 0
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(out))["emb"], a)


def test_partitioned_variable_other_axis_refused(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(6, 10)
    write_bundle(tmp_path / "c", {"emb": a}, slices={"emb": [4, 6]}, slice_axis=1)
    res = cli("inspect", tmp_path / "c", "--format", "json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["tensors"][0]["shape"] == [6, 10]
    assert "partitioned" in res.stderr
    bad = run("convert", tmp_path / "c", tmp_path / "o.safetensors")
    assert bad.returncode == 1 and "partitioned" in bad.stderr and "first axis" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_savedmodel_and_folder_naming(tmp_path):
    a = {"dense/kernel": np.ones((2, 3), np.float32)}
    sm = tmp_path / "saved"
    write_bundle(sm / "variables" / "variables", a)
    (sm / "saved_model.pb").write_bytes(b"\x08\x01")
    for path in (sm, sm / "variables", sm / "variables" / "variables", sm / "variables" / "variables.index"):
        fmt, target = resolve(path)
        assert fmt == "tf-bundle", path
        with open_reader(path) as r:
            assert r.info().path == str(sm / "variables" / "variables")
            assert r.info().kind == "savedmodel"
            assert r.read("dense/kernel").tolist() == [[1, 1, 1]] * 2
    # a run folder: the state file's latest, not the newest-looking name
    run_dir = tmp_path / "run"
    write_bundle(run_dir / "ckpt-5", {"x": np.array([5], np.int64)})
    write_bundle(run_dir / "ckpt-9", {"x": np.array([9], np.int64)})
    write_state_file(run_dir, ["ckpt-9", "ckpt-5"])
    res = run("inspect", run_dir, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(run_dir / "ckpt-5")
    assert "ckpt-5" in res.stderr and "latest" in res.stderr
    # a folder of two checkpoints without a state file: name one
    (run_dir / "checkpoint").unlink()
    amb = run("inspect", run_dir)
    assert amb.returncode == 1 and "Traceback" not in amb.stderr


# ---- bad input ---------------------------------------------------------------------------------------
def _good(tmp_path) -> Path:
    write_bundle(tmp_path / "c", {"a": np.arange(8, dtype=np.float32), "b": np.arange(4, dtype=np.int64)})
    return tmp_path / "c"


def _flip(p: Path, pos: int) -> None:
    data = bytearray(p.read_bytes())
    data[pos] ^= 0x5A
    p.write_bytes(bytes(data))


def test_bad_truncated_index(tmp_path):
    c = _good(tmp_path)
    idx = Path(f"{c}.index")
    idx.write_bytes(idx.read_bytes()[:-10])
    _one_line(run("inspect", c), idx, ["bad magic", "not a TF checkpoint index"])
    idx.write_bytes(idx.read_bytes()[:20])
    _one_line(run("inspect", c), idx, ["too short"])


def test_bad_magic(tmp_path):
    c = _good(tmp_path)
    idx = Path(f"{c}.index")
    _flip(idx, idx.stat().st_size - 1)
    _one_line(run("inspect", c), idx, ["bad magic"])
    _one_line(run("inspect", idx), idx, ["bad magic"])  # named by its index, beside its data file


def test_data_shard_without_index(tmp_path):
    c = _good(tmp_path)
    Path(f"{c}.index").unlink()
    shard = Path(f"{c}.data-00000-of-00001")
    _one_line(run("inspect", shard), shard, ["data shard", "c.index is missing"])
    _one_line(run("inspect", c), c, ["no such file"], code=2)  # a prefix naming nothing: a usage error


def test_crc32c_known_answer_and_fallback():
    from ckptctl.formats import tf_bundle

    assert tf_bundle.crc_extend(0, b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tf_bundle._py_extend(0, b"123456789") == 0xE3069283
    data = bytes(random.Random(3).getrandbits(8) for _ in range(5000))
    assert tf_bundle._py_extend(tf_bundle._py_extend(0, data[:77]), data[77:]) == crc(data)


def test_bad_block_crc(tmp_path):
    c = _good(tmp_path)
    idx = Path(f"{c}.index")
    _flip(idx, 12)  # inside the first data block
    _one_line(run("inspect", c), idx, ["CRC32C mismatch", "data block"])


def test_missing_data_shard(tmp_path):
    write_bundle(tmp_path / "c", {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}, num_shards=2)
    shard = tmp_path / "c.data-00001-of-00002"
    shard.unlink()
    _one_line(run("inspect", tmp_path / "c"), shard, ["data shard missing"])


def test_entry_past_its_shard(tmp_path):
    c = _good(tmp_path)
    shard = Path(f"{c}.data-00000-of-00001")
    shard.write_bytes(shard.read_bytes()[:-8])
    _one_line(run("inspect", c), shard, ["'b'", "past the end of its data shard"])


def test_corrupt_tensor_data_fails_on_read(tmp_path):
    c = _good(tmp_path)
    shard = Path(f"{c}.data-00000-of-00001")
    _flip(shard, 3)  # inside 'a'
    assert run("inspect", c).returncode == 0  # listing reads no tensor data
    out = tmp_path / "o.safetensors"
    _one_line(run("convert", c, out), shard, ["'a'", "CRC32C mismatch"])
    assert not out.exists()
    res = run("diff", c, c)
    assert res.returncode == 2 and "CRC32C mismatch" in res.stderr and "Traceback" not in res.stderr


def test_bad_entry_proto_and_dtype(tmp_path):
    write_bundle(tmp_path / "c", {"a": np.ones(2, np.float32)}, raw_entries={"z": b"\x0a\xff"})
    _one_line(run("inspect", tmp_path / "c"), Path(f"{tmp_path / 'c'}.index"), ["entry", "'z'"])
    write_bundle(tmp_path / "d", {}, raw_entries={"v": entry_proto(20, [1], size=0, crc32c=masked(crc(b"")))})
    _one_line(run("inspect", tmp_path / "d"), Path(f"{tmp_path / 'd'}.index"), ["'v'", "resource"])


def test_fuzzed_index_fails_only_cleanly(tmp_path):
    """Random byte flips and truncations of a multi-block index: a clean CkptError or a listing
    that still reads right, never another exception."""
    arrays = {f"layer{i}/w{SUFFIX}": np.full((i + 1,), i, np.float32) for i in range(40)}
    write_bundle(tmp_path / "c", arrays, block_size=256)
    idx = Path(f"{tmp_path / 'c'}.index")
    good = idx.read_bytes()
    rnd = random.Random(9)
    rejected = 0
    for i in range(400):
        data = bytearray(good)
        if i % 8 == 0:
            data = data[: rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 3)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        idx.write_bytes(bytes(data))
        try:
            with open_reader(tmp_path / "c") as r:
                info = r.info()
                for t in info.tensors:
                    b"".join(r.iter_chunks(t.name))
        except CkptError:
            rejected += 1
            continue
        assert sorted(t.key for t in info.tensors) == sorted(arrays)  # accepted: only padding changed
    assert rejected > 300, rejected


def test_object_graph_names_and_optimizer_slots(tmp_path):
    """A TrackableObjectGraph (written with the test writer's protobuf encoder): full_name of each
    variable, and an optimizer slot tied to its variable; the graph itself is not a tensor."""
    from tf_writer import f_bytes, f_varint

    k_var = "model/dense/kernel" + SUFFIX
    k_slot = "model/dense/kernel/.OPTIMIZER_SLOT/optimizer/m" + SUFFIX

    def attr(key, full):
        return f_bytes(2, f_bytes(1, b"VARIABLE_VALUE") + f_bytes(2, full.encode()) + f_bytes(3, key.encode()))

    root = f_bytes(1, f_varint(1, 1) + f_bytes(2, b"model")) + f_bytes(1, f_varint(1, 3) + f_bytes(2, b"optimizer"))
    var = attr(k_var, "dense/kernel")
    slot = attr(k_slot, "dense/kernel/Adam")
    opt = f_bytes(3, f_varint(1, 1) + f_bytes(2, b"m") + f_varint(3, 2))
    graph = b"".join(f_bytes(1, n) for n in (root, var, slot, opt))
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_bundle(tmp_path / "c", {GRAPH: [graph], k_var: w, k_slot: w * 0})
    res = cli("inspect", tmp_path / "c", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "tf2" and doc["warnings"] == []  # the graph is no string tensor to warn about
    by = {t["name"]: t for t in doc["tensors"]}
    assert sorted(by) == ["model/dense/kernel", "model/dense/kernel/.OPTIMIZER_SLOT/optimizer/m"]
    assert by["model/dense/kernel"]["full_name"] == "dense/kernel"
    s = by["model/dense/kernel/.OPTIMIZER_SLOT/optimizer/m"]
    assert (s["slot_of"], s["slot"], s["key"]) == ("model/dense/kernel", "m", k_slot)


def test_fixture_default_is_model_weights_like_every_training_checkpoint():
    """Issue 16's one rule holds for TF too: optimizer slots only with --all."""
    _expected()
    res = _cli("inspect", TF / "tf2_manager_run/ckpt-20", "--format", "json")
    assert res.exit_code == 0, res.stderr
    names = {t["name"] for t in json.loads(res.stdout)["tensors"]}
    assert names and not any(n.startswith("optimizer/") for n in names)
    assert "model/layer_with_weights-0/kernel" in names
    assert "--all" in res.stderr
    every = {
        t["name"]
        for t in json.loads(cli("inspect", TF / "tf2_manager_run/ckpt-20", "--format", "json").stdout)["tensors"]
    }
    assert names < every and any(n.startswith("optimizer/") for n in every)
