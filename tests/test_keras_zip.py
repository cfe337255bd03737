"""Keras 3 `.keras` archives and sharded `*.weights.json` sets: real fixtures and generated files.

Inputs are written with zipfile + h5py (Keras 3's layout: `layers/<name>/vars/<i>`, bf16 as
uint16 with a `dtype` attribute) or are the real files in ../shared/fixtures/tensorflow; answers
come from EXPECTED.json (read back by h5py when the fixtures were made) or from the arrays the
test wrote, never from ckptctl's own reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, every_tensor
from conftest import cli as _cli
from conftest import run as _run

from ckptctl.formats import open_reader, resolve


# These tests compare with every variable the producer wrote (EXPECTED.json lists optimizer state
# too), so every command gets --all; the model-weights default has its own tests below.
def cli(*args, **kw):
    return _cli(*every_tensor(args), **kw)


def run(*args, **kw):
    return _run(*every_tensor(args), **kw)


TF = REPO.parent / "shared" / "fixtures" / "tensorflow"
KERAS_DIR = TF / "keras3_modelcheckpoint"
needs_tf = pytest.mark.skipif(not (TF / "EXPECTED.json").is_file(), reason="../shared/fixtures/tensorflow is absent")


def expected() -> dict:
    return json.loads((TF / "EXPECTED.json").read_text())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def ckpt_bytes(reader, name: str) -> bytes:
    return b"".join(bytes(c) for c in reader.iter_chunks(name))


def st_bytes(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """safetensors file -> {name: (dtype, shape, raw bytes)} through the safetensors library."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
            out[k] = (str(t.dtype).removeprefix("torch."), list(t.shape), raw.contiguous().numpy().tobytes())
    return out


def one_error_line(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# -- real fixtures ---------------------------------------------------------------------------------
KERAS_FILES = [
    "keras3_modelcheckpoint/best.keras",
    "keras3_modelcheckpoint/model-001.keras",
    "keras3_modelcheckpoint/model-002.keras",
]


@needs_tf
@pytest.mark.parametrize("rel", KERAS_FILES + ["keras2_full.h5"])
def test_real_names_dtypes_shapes_and_bytes(rel):
    exp = expected()[rel]
    with open_reader(TF / rel) as r:
        info = r.info()
        assert [t.name for t in info.tensors] and {t.name for t in info.tensors} == set(exp)
        for t in info.tensors:
            e = exp[t.name]
            assert (t.dtype, list(t.shape)) == (e["dtype"], e["shape"]), t.name
            assert sha(ckpt_bytes(r, t.name)) == e["sha256"], t.name
    assert info.format == ("keras" if rel.endswith(".keras") else "hdf5")


@needs_tf
@pytest.mark.parametrize("rel", KERAS_FILES)
def test_real_bytes_are_read_in_place(rel):
    """byte_range points into the .keras file itself: the raw bytes there are the tensor."""
    exp = expected()[rel]
    path = TF / rel
    with zipfile.ZipFile(path) as zf:
        zi = zf.getinfo("model.weights.h5")
        assert zi.compress_type == zipfile.ZIP_STORED
    raw = path.read_bytes()
    with open_reader(path) as r:
        for t in r.info().tensors:
            f, off, n = r.byte_range(t.name)
            assert Path(f) == path
            assert zi.header_offset < off and off + n <= zi.header_offset + 30 + 16 + zi.file_size
            assert sha(raw[off : off + n]) == exp[t.name]["sha256"]


@needs_tf
def test_real_metadata_from_the_json_members():
    path = KERAS_DIR / "best.keras"
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("metadata.json"))
        config = json.loads(zf.read("config.json"))
    r = cli("inspect", path, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == "keras" and doc["kind"] == "keras3"
    m = doc["metadata"]
    assert m["keras_version"] == meta["keras_version"] == "3.15.1"
    assert m["date_saved"] == meta["date_saved"]
    assert m["model_class"] == config["class_name"] == "Sequential"
    assert m["layers"] == len(config["config"]["layers"]) == 4
    assert m["layers_with_weights"] == 3  # InputLayer keeps no state
    assert m["optimizer"] == "RMSprop" and m["loss"] == "mse"
    assert doc["files"] == [str(path)]


@needs_tf
@pytest.mark.parametrize("fmt", ["table", "tree", "json", "csv", "markdown"])
def test_real_inspect_every_output_format(fmt):
    r = run("inspect", KERAS_DIR / "model-001.keras", "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for leaf in ("dense_1", "layer_normalization", "optimizer"):
        assert leaf in r.stdout
    if fmt == "csv":
        rows = r.stdout.strip().splitlines()
        assert len(rows) == 1 + 14 and rows[1].startswith("layers/dense/vars/0,float32")


@needs_tf
@pytest.mark.parametrize("rel", KERAS_FILES)
def test_real_convert_safetensors_pt_h5_bit_exact(rel, tmp_path):
    import h5py
    import torch

    exp = expected()[rel]
    src = TF / rel
    st, pt, h5 = tmp_path / "m.safetensors", tmp_path / "m.pt", tmp_path / "m.h5"
    for out in (st, pt, h5):
        r = run("convert", src, out)
        assert r.returncode == 0, r.stderr
        assert "verified 14 tensors bit-exact" in r.stderr
    got = st_bytes(st)
    assert set(got) == set(exp)
    for k, (dt, shape, raw) in got.items():
        assert (dt, shape, sha(raw)) == (exp[k]["dtype"], exp[k]["shape"], exp[k]["sha256"]), k
    sd = torch.load(pt, weights_only=True)
    assert set(sd) == set(exp)
    for k, t in sd.items():
        assert sha(t.contiguous().numpy().tobytes()) == exp[k]["sha256"], k
    with h5py.File(h5, "r") as f:
        for k, e in exp.items():
            a = f[k][()]
            assert list(np.shape(a)) == e["shape"] and sha(np.ascontiguousarray(a).tobytes()) == e["sha256"], k
    # and the conversion diffs equal to its source
    for out in (st, pt, h5):
        r = run("diff", src, out)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "equal (bit-exact): 14 tensors" in r.stdout


@needs_tf
def test_real_diff_keras_vs_keras():
    exp = expected()
    same = run("diff", KERAS_DIR / "model-002.keras", KERAS_DIR / "best.keras")
    assert (KERAS_DIR / "model-002.keras").read_bytes() == (KERAS_DIR / "best.keras").read_bytes()
    assert same.returncode == 0 and "equal (bit-exact): 14 tensors" in same.stdout
    differ = run("diff", KERAS_DIR / "model-001.keras", KERAS_DIR / "best.keras", "--format", "json")
    assert differ.returncode == 1, differ.stderr
    changed = {
        k
        for k in exp["keras3_modelcheckpoint/best.keras"]
        if exp["keras3_modelcheckpoint/best.keras"][k]["sha256"]
        != exp["keras3_modelcheckpoint/model-001.keras"][k]["sha256"]
    }
    assert changed and "optimizer/vars/1" not in changed  # the learning rate did not change
    doc = json.loads(differ.stdout)
    assert doc["equal"] is False and doc["format_a"] == doc["format_b"] == "keras"
    assert {c["name"] for c in doc["changed"]} == changed
    assert doc["only_in_a"] == doc["only_in_b"] == []


def member_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a .keras archive's weights, through zipfile + h5py (the producer's libraries)."""
    import h5py

    out = {}
    with zipfile.ZipFile(path) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@needs_tf
def test_real_average_of_keras_files(tmp_path):
    from safetensors.numpy import load_file

    a, b = KERAS_DIR / "model-001.keras", KERAS_DIR / "model-002.keras"
    out = tmp_path / "avg.safetensors"
    r = run("average", a, b, "-o", out)
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    xa, xb = member_arrays(a), member_arrays(b)
    assert set(got) == set(xa)
    for k, va in xa.items():
        if va.dtype.kind == "f":
            want = ((va.astype(np.float64) + xb[k].astype(np.float64)) / 2).astype(va.dtype)
            assert got[k].tobytes() == want.tobytes(), k
        else:
            assert got[k].tobytes() == xb[k].tobytes(), k  # integers are copied from the last input


@needs_tf
def test_real_scan_says_no_pickle():
    r = run("scan", KERAS_DIR / "best.keras", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["verdict"] == "safe" and rows[0]["pickle"] is False and rows[0]["format"] == "keras"
    assert "no pickle" in rows[0]["note"]


# -- generated archives --------------------------------------------------------------------------
def bf16_bits(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).view(np.uint16)


def keras3_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "layers/dense/vars/0": rng.standard_normal((16, 8)).astype(np.float32),
        "layers/dense/vars/1": rng.standard_normal(8).astype(np.float32),
        "layers/embedding/vars/0": bf16_bits(rng.standard_normal((10, 4))),  # bf16 bits
        "layers/functional/layers/conv2d/vars/0": rng.standard_normal((3, 3, 2, 4)).astype(np.float16),
        "layers/functional/layers/conv2d/vars/1": np.zeros(4, np.float16),
        "layers/batch_normalization/vars/0": np.ones(8, np.float64),
        "optimizer/vars/0": np.array(42, np.int64),
        "optimizer/vars/1": np.array(1e-3, np.float32),
        "optimizer/vars/2": rng.standard_normal((16, 8)).astype(np.float32),
        "optimizer/vars/3": rng.standard_normal(8).astype(np.float32),
        "optimizer/vars/4": bf16_bits(rng.standard_normal((10, 4))),
    }


BF16 = {"layers/embedding/vars/0", "optimizer/vars/4"}


def write_keras3_h5(target, arrays: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(target, "w") as f:
        for name, a in arrays.items():
            ds = f.create_dataset(name, data=a)
            if name in BF16:
                ds.attrs["dtype"] = "bfloat16"
            f[name.rsplit("/", 1)[0]].attrs["name"] = name.split("/")[-3]
        f.create_group("vars").attrs["name"] = "model"


def make_keras(path: Path, arrays: dict[str, np.ndarray], compression=zipfile.ZIP_STORED, weights: bool = True) -> Path:
    buf = io.BytesIO()
    write_keras3_h5(buf, arrays)
    config = {
        "module": "keras",
        "class_name": "Functional",
        "config": {
            "name": "toy",
            "layers": [{"class_name": "InputLayer"}, {"class_name": "Dense"}, {"class_name": "Embedding"}],
        },
        "compile_config": {"optimizer": {"class_name": "AdamW"}, "loss": "mse"},
    }
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1", "date_saved": "2026-12-01@10:00:00"}))
        z.writestr("config.json", json.dumps(config))
        if weights:
            z.writestr("model.weights.h5", buf.getvalue())
    return path


def want_dtype(name: str, a: np.ndarray) -> str:
    return "bfloat16" if name in BF16 else str(a.dtype)


def test_generated_keras_lists_and_reads_exact(tmp_path):
    arrays = keras3_arrays()
    path = make_keras(tmp_path / "epoch03-0.4100.keras", arrays)
    assert resolve(path) == ("keras", path)
    with open_reader(path) as r:
        info = r.info()
        # h5py (like Keras) does not track creation order: groups list by name, vars/2 before vars/10
        assert [t.name for t in info.tensors] == sorted(arrays)
        for t in info.tensors:
            a = arrays[t.name]
            assert (t.dtype, t.shape) == (want_dtype(t.name, a), a.shape), t.name
            assert ckpt_bytes(r, t.name) == a.tobytes(), t.name
            f, off, n = r.byte_range(t.name)
            with open(f, "rb") as fh:
                fh.seek(off)
                assert fh.read(n) == a.tobytes()
    assert info.metadata["model_class"] == "Functional" and info.metadata["optimizer"] == "AdamW"
    assert info.metadata["layers"] == 3 and info.metadata["keras_version"] == "3.15.1"


def test_generated_keras_convert_every_target_bit_exact(tmp_path):
    import h5py
    import torch

    arrays = keras3_arrays()
    path = make_keras(tmp_path / "m.keras", arrays)
    st, pt, h5 = tmp_path / "o.safetensors", tmp_path / "o.pt", tmp_path / "o.h5"
    for out in (st, pt, h5):
        r = run("convert", path, out)
        assert r.returncode == 0, r.stderr
        assert f"verified {len(arrays)} tensors bit-exact" in r.stderr
    got = st_bytes(st)
    for k, a in arrays.items():
        dt, shape, raw = got[k]
        assert (dt, tuple(shape), raw) == (want_dtype(k, a), a.shape, a.tobytes()), k
    sd = torch.load(pt, weights_only=True)
    for k, a in arrays.items():
        t = sd[k]
        assert str(t.dtype) == "torch." + want_dtype(k, a)
        raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
        assert raw.numpy().tobytes() == a.tobytes(), k
    with h5py.File(h5, "r") as f:
        for k, a in arrays.items():
            assert np.ascontiguousarray(f[k][()]).tobytes() == a.tobytes(), k
            if k in BF16:
                assert f[k].attrs["dtype"] in ("bfloat16", b"bfloat16")
    r = run("diff", path, st)
    assert r.returncode == 0 and f"equal (bit-exact): {len(arrays)} tensors" in r.stdout


def test_reading_never_extracts_or_reads_the_member_through_zipfile(tmp_path, monkeypatch):
    """inspect + convert read the weights in place: no zipfile read of the member, no new files."""
    arrays = keras3_arrays()
    arrays["layers/big/vars/0"] = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(1024, 4096)  # 16 MiB
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    path = make_keras(src_dir / "m.keras", arrays)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_open = zipfile.ZipFile.open

    def guarded(self, name, *a, **k):
        n = name.filename if isinstance(name, zipfile.ZipInfo) else name
        assert not n.endswith(".h5"), f"the weights member was opened through zipfile: {n}"
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", guarded)
    read_bytes = 0
    real_pread = os.pread

    def counting(fd, n, off):
        nonlocal read_bytes
        data = real_pread(fd, n, off)
        read_bytes += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting)
    r = cli("inspect", path, "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_tensors"] == len(arrays)
    assert read_bytes < 1024 * 1024, read_bytes  # headers only, not the 16 MiB tensor
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    r = cli("convert", path, out)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(src_dir)) == ["m.keras"]
    assert os.listdir(tmp) == []
    assert sorted(os.listdir(out.parent)) == ["m.safetensors"]
    monkeypatch.undo()
    assert st_bytes(out)["layers/big/vars/0"][2] == arrays["layers/big/vars/0"].tobytes()


def test_no_tensorflow_keras_or_jax_imported(tmp_path):
    path = make_keras(tmp_path / "m.keras", keras3_arrays())
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ckptctl.cli.app import app\n"
        f"p = {str(path)!r}\n"
        "r = CliRunner().invoke(app, ['inspect', p, '--format', 'json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['convert', p, p + '.safetensors'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['diff', p, p + '.safetensors'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'jax'))\n"
        "assert 'h5py' in sys.modules\n"
        "print('BAD', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout
    assert (tmp_path / "m.keras.safetensors").is_file()


# -- sharded .weights.json -------------------------------------------------------------------------
def make_sharded(folder: Path, arrays: dict[str, np.ndarray], split: list[list[str]], mapped: int | None = None):
    """Keras's ShardedH5IOStore layout: base.weights.json + base_0000K.weights.h5.

    The index maps each vars group to the shard its first variable went to; a group's later
    variables may sit in the next shard. `mapped` leaves shards from that number on unnamed.
    """
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    wm: dict[str, str] = {}
    for i, names in enumerate(split):
        shard = f"m_{i:05d}.weights.h5"
        with h5py.File(folder / shard, "w") as f:
            for name in names:
                ds = f.create_dataset(name, data=arrays[name])
                if name in BF16:
                    ds.attrs["dtype"] = "bfloat16"
                group = "/" + name.rsplit("/", 1)[0]
                if mapped is None or i < mapped:
                    wm.setdefault(group, shard)
    total = sum(a.nbytes for a in arrays.values())
    (folder / "m.weights.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=4))
    return folder / "m.weights.json"


SPLIT = [
    ["layers/dense/vars/0"],
    ["layers/dense/vars/1", "layers/embedding/vars/0", "layers/functional/layers/conv2d/vars/0"],
    [
        "layers/functional/layers/conv2d/vars/1",
        "layers/batch_normalization/vars/0",
        "optimizer/vars/0",
        "optimizer/vars/1",
        "optimizer/vars/2",
        "optimizer/vars/3",
        "optimizer/vars/4",
    ],
]


def test_sharded_weights_json_is_one_checkpoint(tmp_path):
    arrays = keras3_arrays()
    index = make_sharded(tmp_path / "run", arrays, SPLIT)
    assert resolve(index) == ("keras-sharded", index)
    assert resolve(tmp_path / "run") == ("keras-sharded", index)
    with open_reader(tmp_path / "run") as r:
        info = r.info()
        names = [t.name for t in info.tensors]
        assert names == [n for s in SPLIT for n in sorted(s)]  # shard by shard, in shard number order
        assert len(info.files) == 4 and info.metadata["shards"] == 3
        assert info.warnings == []
        for t in info.tensors:
            a = arrays[t.name]
            assert (t.dtype, t.shape) == (want_dtype(t.name, a), a.shape)
            assert ckpt_bytes(r, t.name) == a.tobytes(), t.name
    out = tmp_path / "o.safetensors"
    r = run("convert", index, out)
    assert r.returncode == 0, r.stderr
    got = st_bytes(out)
    assert {k: v[2] for k, v in got.items()} == {k: a.tobytes() for k, a in arrays.items()}
    # the same weights in one .keras archive diff equal to the sharded set
    single = make_keras(tmp_path / "one.keras", arrays)
    r = run("diff", single, index)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"equal (bit-exact): {len(arrays)} tensors" in r.stdout
    r = run("scan", index, "--format", "json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert (row["format"], row["verdict"], row["pickle"]) == ("keras-sharded", "safe", False)


def test_sharded_unnamed_continuation_shard_is_included(tmp_path):
    arrays = keras3_arrays()
    index = make_sharded(tmp_path, arrays, SPLIT, mapped=2)  # the last shard is in no weight_map entry
    with open_reader(index) as r:
        assert {t.name for t in r.info().tensors} == set(arrays)


def test_sharded_missing_shard_and_duplicates_fail_cleanly(tmp_path):
    arrays = keras3_arrays()
    index = make_sharded(tmp_path / "a", arrays, SPLIT)
    (tmp_path / "a" / "m_00001.weights.h5").unlink()
    line = one_error_line(run("inspect", index))
    assert str(index) in line and "m_00001.weights.h5" in line and "missing" in line
    index = make_sharded(tmp_path / "b", arrays, [SPLIT[0] + SPLIT[1], SPLIT[1] + SPLIT[2]])
    line = one_error_line(run("inspect", index))
    assert "is in both m_00000.weights.h5 and m_00001.weights.h5" in line
    bad = tmp_path / "c" / "m.weights.json"
    bad.parent.mkdir()
    bad.write_text('{"weight_map": {"/vars": "../x_00000.weights.h5"}}')
    assert "outside the checkpoint folder" in one_error_line(run("inspect", bad))
    bad.write_text('{"weight_map": ')
    assert "not valid JSON" in one_error_line(run("inspect", bad))


# -- bad input -------------------------------------------------------------------------------------
def test_truncated_and_garbled_archives(tmp_path):
    good = make_keras(tmp_path / "good.keras", keras3_arrays())
    raw = good.read_bytes()
    for cut in (100, len(raw) // 2, len(raw) - 30):
        p = tmp_path / f"cut{cut}.keras"
        p.write_bytes(raw[:cut])
        line = one_error_line(run("inspect", p))
        assert line.startswith(f"error: {p}: corrupt zip archive")
    # the local header of the weights member overwritten
    with zipfile.ZipFile(good) as zf:
        off = zf.getinfo("model.weights.h5").header_offset
    bad = bytearray(raw)
    bad[off : off + 4] = b"XXXX"
    p = tmp_path / "badlocal.keras"
    p.write_bytes(bytes(bad))
    assert "zip member model.weights.h5: bad local header signature" in one_error_line(run("inspect", p))
    # the HDF5 superblock inside the member destroyed
    start = off + 30 + len("model.weights.h5")
    bad = bytearray(raw)
    bad[start : start + 64] = b"\0" * 64
    p = tmp_path / "badh5.keras"
    p.write_bytes(bytes(bad))
    line = one_error_line(run("convert", p, tmp_path / "x.safetensors"))
    assert "model.weights.h5 in the archive: not a readable HDF5 file" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_weights_member(tmp_path):
    p = make_keras(tmp_path / "empty.keras", keras3_arrays(), weights=False)
    line = one_error_line(run("inspect", p))
    assert line == f"error: {p}: a .keras archive with no weights: no model.weights.h5 member"


def test_compressed_weights_member_is_read_with_a_warning(tmp_path):
    """A re-zipped (deflated) archive: read through the decompressor, bounded, bytes exact."""
    arrays = keras3_arrays()
    p = make_keras(tmp_path / "deflated.keras", arrays, compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as zf:
        assert zf.getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    r = run("inspect", p, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert "is compressed (deflate)" in r.stderr and "no zero-copy" in r.stderr
    assert json.loads(r.stdout)["num_tensors"] == len(arrays)
    out = tmp_path / "o.safetensors"
    r = run("convert", p, out)
    assert r.returncode == 0, r.stderr
    assert {k: v[2] for k, v in st_bytes(out).items()} == {k: a.tobytes() for k, a in arrays.items()}
    with open_reader(p) as reader:
        assert all(reader.byte_range(t.name) is None for t in reader.info().tensors)


def test_corrupt_compressed_member_fails_cleanly(tmp_path):
    p = make_keras(tmp_path / "d.keras", keras3_arrays(), compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as zf:
        zi = zf.getinfo("model.weights.h5")
    start = zi.header_offset + 30 + len(zi.filename) + len(zi.extra)
    raw = bytearray(p.read_bytes())
    for i in range(start + 10, start + zi.compress_size - 10, max(1, zi.compress_size // 40)):
        raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))
    line = one_error_line(run("convert", p, tmp_path / "o.safetensors"))
    assert line.startswith(f"error: {p}: zip member model.weights.h5: cannot decompress it")
    assert not (tmp_path / "o.safetensors").exists()


def test_scan_flags_lambda_bytecode_in_config(tmp_path):
    p = make_keras(tmp_path / "lam.keras", keras3_arrays())
    lam = tmp_path / "lambda.keras"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(lam, "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            if n == "config.json":
                cfg = json.loads(data)
                cfg["config"]["layers"].append(
                    {
                        "class_name": "Lambda",
                        "config": {
                            "function": {
                                "class_name": "__lambda__",
                                "config": {"code": "4wEAAAAAAAAA", "defaults": None},
                            }
                        },
                    }
                )
                data = json.dumps(cfg).encode()
            dst.writestr(n, data)
    r = run("scan", lam, "--format", "json")
    assert r.returncode == 1, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["verdict"] == "dangerous" and rows[0]["pickle"] is False
    assert "__lambda__" in rows[0]["globals"][0]["name"]
    ok = run("scan", p)
    assert ok.returncode == 0 and "no pickle" in ok.stdout


def test_folder_naming_and_completion(tmp_path):
    from ckptctl.cli.complete import tensor_names

    arrays = keras3_arrays()
    one = tmp_path / "one"
    one.mkdir()
    p = make_keras(one / "epoch01-0.5000.keras", arrays)
    assert resolve(one) == ("keras", p)
    assert tensor_names(p) == sorted(arrays)
    make_keras(one / "epoch02-0.4000.keras", arrays)
    line = one_error_line(run("inspect", one))
    assert "a folder with 2 checkpoint files; name one of them" in line


def test_inflater_random_access_matches_zlib(tmp_path, monkeypatch):
    """The deflated-member reader: random seeks and reads give zlib's bytes; snapshots stay bounded."""
    import random

    from ckptctl.formats.keras_zip import _Inflater

    rng = np.random.default_rng(3)
    payload = (np.arange(3_000_000, dtype=np.int32) % 1000 + rng.integers(0, 4, 3_000_000)).astype(np.int32).tobytes()
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.bin", payload)
    with zipfile.ZipFile(p) as z:
        zi = z.getinfo("x.bin")
    monkeypatch.setattr(_Inflater, "MIN_SPACING", 64 * 1024)
    monkeypatch.setattr(_Inflater, "MAX_SNAPSHOTS", 32)
    fd = os.open(p, os.O_RDONLY)
    try:
        start = zi.header_offset + 30 + len(zi.filename) + len(zi.extra)
        f = _Inflater(fd, start, zi.compress_size, zi.file_size, "x.bin", p)
        r = random.Random(0)
        for _ in range(300):
            pos = r.randrange(0, len(payload))
            n = r.choice([1, 7, 4096, 100_000, 2_000_000])
            f.seek(pos)
            assert f.read(n) == payload[pos : pos + n]
        f.seek(0)
        assert f.read() == payload
        assert len(f._snaps) <= 32 + 1
    finally:
        os.close(fd)


def test_mutated_archives_read_right_or_fail_cleanly(tmp_path):
    """Random byte flips (zip headers, central directory, HDF5 structure) and truncations: every
    refusal is a CkptError, and whatever is read agrees with zipfile + h5py on the same bytes."""
    import random

    import h5py

    from ckptctl.errors import CkptError

    arrays = {k: v for k, v in keras3_arrays().items() if k not in BF16}
    good = make_keras(tmp_path / "good.keras", arrays).read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        zi = zf.getinfo("model.weights.h5")
    start = zi.header_offset + 30 + len(zi.filename)
    hot = list(range(0, 200)) + list(range(zi.header_offset, start + 2048)) + list(range(len(good) - 300, len(good)))
    rnd = random.Random(11)
    p = tmp_path / "m.keras"
    read_ok = refused = 0
    for i in range(160):
        data = bytearray(good)
        if i % 8 == 0:
            data = data[: rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 4)):
                data[rnd.choice(hot)] = rnd.randrange(256)
        p.write_bytes(bytes(data))
        try:
            with zipfile.ZipFile(p) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as f:
                ref = {}

                def keep(n, o, ref=ref):
                    if isinstance(o, h5py.Dataset):
                        ref[n] = np.ascontiguousarray(o[()]).tobytes()

                f.visititems(keep)
        except Exception:  # noqa: BLE001 - the reference refuses it
            ref = None
        try:
            with open_reader(p) as r:
                got = {t.name: ckpt_bytes(r, t.name) for t in r.info().tensors}
        except CkptError:
            refused += 1
            continue
        read_ok += 1
        if ref is not None:
            assert got == {k: v for k, v in ref.items() if k in got}, i
    assert read_ok and refused, (read_ok, refused)


def test_real_default_is_model_weights_like_every_training_checkpoint():
    """Issue 16's one rule holds for .keras too: optimizer/vars only with --all."""
    path = KERAS_DIR / "model-001.keras"
    if not path.is_file():
        pytest.skip("../shared/fixtures/tensorflow is absent")
    res = _cli("inspect", path, "--format", "json")
    assert res.exit_code == 0, res.stderr
    names = {t["name"] for t in json.loads(res.stdout)["tensors"]}
    assert names and all(n.startswith("layers/") for n in names)
    every = {t["name"] for t in json.loads(cli("inspect", path, "--format", "json").stdout)["tensors"]}
    assert names < every and any(n.startswith("optimizer/") for n in every)
