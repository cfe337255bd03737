"""HDF5Reader: generic HDF5, Keras 2 / Keras 3 / HF tf_model.h5 layouts, bytes against h5py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REAL, cli, needs_real, run

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader, sniff
from ckptctl.formats.hdf5 import HDF5Reader

h5py = pytest.importorskip("h5py")
np = pytest.importorskip("numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")


def le_bytes(a) -> bytes:
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).tobytes()


def all_bytes(r, name, size=64 * 1024 * 1024) -> bytes:
    chunks = [bytes(c) for c in r.iter_chunks(name, size)]
    assert all(len(c) <= max(size, 16) for c in chunks)
    return b"".join(chunks)


@pytest.fixture
def generic(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "generic.h5"
    arrays = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((4, 5, 6)).astype("f4"),
        "f16": rng.standard_normal(7).astype("f2"),
        "i64": np.arange(-5, 5, dtype="i8"),
        "i32": np.arange(10, dtype="i4"),
        "i16": np.arange(10, dtype="i2"),
        "i8": np.arange(-3, 3, dtype="i1"),
        "u64": np.array([0, 2**63 + 5], dtype="u8"),
        "u32": np.arange(4, dtype="u4"),
        "u16": np.arange(4, dtype="u2"),
        "u8": np.arange(250, 256, dtype="u1"),
        "bool": np.array([[True, False], [False, True]]),
        "c64": (rng.standard_normal(3) + 1j).astype("c8"),
        "c128": rng.standard_normal(3) + 2j,
        "be_f32": rng.standard_normal((5, 3)).astype(">f4"),
        "be_i64": np.arange(6, dtype=">i8").reshape(2, 3),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), dtype="f4"),
    }
    with h5py.File(p, "w", track_order=True) as f:
        f.attrs["framework"] = b"testing"
        f.attrs["step"] = np.int64(42)
        f.attrs["lr"] = 0.5
        f.attrs["small"] = np.arange(3)
        f.attrs["big"] = np.arange(1000)
        f.attrs["names"] = np.array([b"a", b"b"])
        for k, v in arrays.items():
            f[k] = v
        g = f.create_group("group", track_order=True)
        arrays["group/zipped"] = np.arange(1000, dtype="f4").reshape(100, 10)
        g.create_dataset("zipped", data=arrays["group/zipped"], compression="gzip", chunks=(7, 3))
        arrays["group/sub/deep"] = np.ones((2, 2), dtype="i4")
        g.create_group("sub")["deep"] = arrays["group/sub/deep"]
        f["strings"] = np.array([b"x", b"yy"])
        f["text"] = "hello"
        f["compound"] = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
        f.create_dataset("null", data=h5py.Empty("f4"))
    return p, arrays


def test_generic_info(generic):
    p, arrays = generic
    with HDF5Reader(p) as r:
        info = r.info()
    assert info.format == "hdf5" and info.kind is None
    assert [t.name for t in info.tensors] == list(arrays)  # creation order is kept
    for t in info.tensors:
        a = arrays[t.name]
        assert t.shape == a.shape, t.name
        assert t.nbytes == a.nbytes, t.name
        assert t.dtype == a.dtype.name, t.name
    assert info.tensor("be_f32").dtype == "float32"
    assert info.tensor("c64").dtype == "complex64" and info.tensor("bool").dtype == "bool"
    assert {o.name: o.type for o in info.objects} == {
        "strings": "hdf5.Dataset (string, shape [2])",
        "text": "hdf5.Dataset (string, shape [])",
        "compound": "hdf5.Dataset (compound, shape [2])",
        "null": "hdf5.Empty (null dataspace)",
    }
    m = info.metadata
    assert m["framework"] == "testing" and m["step"] == 42 and m["lr"] == 0.5
    assert m["small"] == [0, 1, 2] and m["names"] == ["a", "b"]
    assert m["big"] == "<int64 array of shape [1000]>"


def test_generic_bytes_exact(generic):
    p, arrays = generic
    with HDF5Reader(p) as r:
        for name, a in arrays.items():
            want = le_bytes(a)
            assert all_bytes(r, name) == want, name
            assert all_bytes(r, name, size=7) == want, name  # splits down to single rows/elements
            assert all_bytes(r, name, size=100) == want, name
            rng = r.byte_range(name)
            if rng is not None:
                f, off, n = rng
                with open(f, "rb") as fh:
                    fh.seek(off)
                    assert fh.read(n) == want, name
        assert r.byte_range("f32") is not None  # contiguous little-endian: zero-copy range
        assert r.byte_range("be_f32") is None  # big-endian: bytes must be swapped
        assert r.byte_range("group/zipped") is None  # compressed
        be = r.read("be_f32")
        assert be.dtype == np.dtype("<f4") and np.array_equal(be, arrays["be_f32"])
        assert r.read("scalar").shape == () and float(r.read("scalar")) == 2.5
        assert r.read("empty").shape == (0, 3)


def test_user_block_offsets(tmp_path):
    """A file with a 512-byte user block: byte_range offsets are absolute file offsets."""
    p = tmp_path / "ub.h5"
    a = np.arange(10, dtype="f4")
    with h5py.File(p, "w", userblock_size=512) as f:
        f["a"] = a
    assert sniff(p) == "hdf5"
    with open_reader(p) as r:
        f_, off, n = r.byte_range("a")
        assert off > 512
        with open(f_, "rb") as fh:
            fh.seek(off)
            assert fh.read(n) == a.tobytes() == all_bytes(r, "a")


def test_chunks_are_bounded_for_big_rows(tmp_path):
    p = tmp_path / "rows.h5"
    a = np.arange(3 * 50 * 40, dtype="f8").reshape(3, 50, 40)
    with h5py.File(p, "w") as f:
        f.create_dataset("a", data=a, chunks=(1, 10, 40), compression="gzip")
    with HDF5Reader(p) as r:
        chunks = [bytes(c) for c in r.iter_chunks("a", 1000)]
        assert max(len(c) for c in chunks) <= 1000
        assert b"".join(chunks) == a.tobytes()


def test_raw_bits_with_dtype_attribute(tmp_path):
    p = tmp_path / "bits.h5"
    bf = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    f8 = np.array([0.5, -1.0], dtype=ml_dtypes.float8_e4m3fn)
    f8b = np.array([2.0, 4.0], dtype=ml_dtypes.float8_e5m2)
    with h5py.File(p, "w", track_order=True) as f:
        d = f.create_dataset("bf16", data=bf.view("u2"))
        d.attrs["dtype"] = "bfloat16"
        d = f.create_dataset("fp8", data=f8.view("u1"))
        d.attrs["dtype"] = "float8_e4m3fn"
        d = f.create_dataset("fp8b", data=f8b.view("u1"))
        d.attrs["dtype"] = b"float8_e5m2"
        f.create_dataset("opaque_tagged", data=bf)  # h5py: OPAQUE, empty tag
        f["opaque_tagged"].attrs["dtype"] = "bfloat16"  # Keras 3 style
        f.create_dataset("opaque_bare", data=bf)
        d = f.create_dataset("mismatch", data=np.arange(3, dtype="f4"))
        d.attrs["dtype"] = "bfloat16"  # storage is not raw bits: ignored
    with HDF5Reader(p) as r:
        info = r.info()
        got = {t.name: t.dtype for t in info.tensors}
        assert got == {
            "bf16": "bfloat16",
            "fp8": "float8_e4m3fn",
            "fp8b": "float8_e5m2",
            "opaque_tagged": "bfloat16",
            "opaque_bare": "bits16",
            "mismatch": "float32",
        }
        assert any("opaque_bare" in w for w in info.warnings)
        assert all_bytes(r, "bf16") == bf.tobytes()
        assert all_bytes(r, "opaque_tagged") == bf.tobytes()
        assert all_bytes(r, "fp8") == f8.tobytes()
        a = r.read("bf16")
        assert a.dtype == np.dtype(ml_dtypes.bfloat16) and a.tolist() == [1.5, -2.0, 3.25]
        assert r.read("fp8b").tolist() == [2.0, 4.0]


def test_hard_soft_links_and_alias_attribute(tmp_path):
    p = tmp_path / "tied.h5"
    w = np.arange(6, dtype="f4").reshape(2, 3)
    with h5py.File(p, "w", track_order=True) as f:
        f["embed/weight"] = w
        f["head/weight"] = f["embed/weight"]  # hard link: one object, two paths
        f["soft"] = h5py.SoftLink("/embed/weight")
        f["dangling"] = h5py.SoftLink("/nowhere")
        f["ext"] = h5py.ExternalLink("other.h5", "/x")
        f["bias"] = np.ones(2, dtype="f4")
        f["loop"] = f["/"]  # a group linked to its own ancestor
        f.attrs["ckptctl.aliases"] = json.dumps({"lm_head.weight": "embed/weight"})
    with HDF5Reader(p) as r:
        info = r.info()
        names = {t.name: t.alias_of for t in info.tensors}
        assert names == {
            "embed/weight": None,
            "head/weight": "embed/weight",
            "soft": "embed/weight",
            "bias": None,
            "lm_head.weight": "embed/weight",
        }
        assert info.total_bytes == w.nbytes + 8
        assert "ckptctl.aliases" not in info.metadata
        assert any("dangling" in x for x in info.warnings) and any("external link" in x for x in info.warnings)
        assert all_bytes(r, "head/weight") == w.tobytes() == all_bytes(r, "lm_head.weight")


def test_writer_style_hard_link_aliases(tmp_path):
    """ckptctl's writer: hard links plus the attribute; the attribute decides which name is stored,
    even when the alias sorts first, and no warning is raised."""
    p = tmp_path / "w.h5"
    w = np.arange(4, dtype="f4")
    with h5py.File(p, "w") as f:  # no creation order: names are listed sorted
        f["z/weight"] = w
        f["a_tied"] = f["z/weight"]
        f["m/other"] = np.zeros(2, "f4")
        f.attrs["ckptctl.aliases"] = json.dumps({"a_tied": "z/weight", "m/other": "z/weight"})
    with HDF5Reader(p) as r:
        info = r.info()
        assert {t.name: t.alias_of for t in info.tensors} == {"z/weight": None, "a_tied": "z/weight", "m/other": None}
        assert info.tensors[-1].name == "a_tied"
        assert len(info.warnings) == 1 and "'m/other'" in info.warnings[0]  # a different dataset
        assert all_bytes(r, "a_tied") == w.tobytes()


def test_keras2_save_weights_layout(tmp_path):
    """Keras 2 `save_weights`: layer_names (split past 64 KB into layer_names0, 1, ...)."""
    p = tmp_path / "k2.h5"
    with h5py.File(p, "w") as f:  # no creation order tracked: h5py lists names sorted
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.12.0"
        f.attrs["layer_names0"] = np.array([b"dense_1", b"dropout"])
        f.attrs["layer_names1"] = np.array([b"dense"])
        for layer, weights in (
            ("dense_1", ["dense_1/kernel:0", "dense_1/bias:0"]),
            ("dropout", []),
            ("dense", ["dense/kernel:0", "dense/bias:0"]),
        ):
            g = f.create_group(layer)
            g.attrs["weight_names"] = np.array([w.encode() for w in weights])
            for w in weights:
                g[w] = np.ones((2, 2) if "kernel" in w else (2,), dtype="f4")
    info = HDF5Reader(p).info()
    assert info.kind == "keras2"
    assert info.metadata == {"keras_version": "2.12.0", "backend": "tensorflow", "layers": 3}
    assert [t.name for t in info.tensors] == [  # model order, not name order
        "dense_1/dense_1/kernel:0",
        "dense_1/dense_1/bias:0",
        "dense/dense/kernel:0",
        "dense/dense/bias:0",
    ]


def test_keras2_full_model_layout(tmp_path):
    p = tmp_path / "model.h5"
    cfg = {"class_name": "Sequential", "config": {"name": "seq", "layers": [{"x": "y" * 5000}]}}
    with h5py.File(p, "w") as f:
        f.attrs["model_config"] = json.dumps(cfg)
        f.attrs["training_config"] = json.dumps({"loss": "mse", "optimizer_config": {"class_name": "Adam"}})
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([b"dense"])
        g = mw.create_group("dense")
        g.attrs["weight_names"] = np.array([b"dense/kernel:0", b"dense/bias:0"])
        g["dense/kernel:0"] = np.ones((3, 2), "f4")
        g["dense/bias:0"] = np.zeros(2, "f4")
        ow = f.create_group("optimizer_weights")
        ow.attrs["weight_names"] = np.array([b"Adam/iter:0"])
        ow["Adam/iter:0"] = np.int64(7)
    info = HDF5Reader(p).info()
    assert info.kind == "keras2-model"
    assert info.metadata == {
        "keras_version": "2.15.0",
        "backend": "tensorflow",
        "model_class": "Sequential",
        "model_name": "seq",
        "optimizer": "Adam",
        "loss": "mse",
        "layers": 1,
    }
    assert [t.name for t in info.tensors] == [
        "model_weights/dense/dense/kernel:0",
        "model_weights/dense/dense/bias:0",
        "optimizer_weights/Adam/iter:0",
    ]
    assert info.tensor("optimizer_weights/Adam/iter:0").shape == ()


def test_keras3_weights_layout(tmp_path):
    p = tmp_path / "model.weights.h5"
    with h5py.File(p, "w") as f:
        for i in range(12):
            f[f"layers/dense/vars/{i}"] = np.full(2, i, dtype="f4")
        f["layers/dense"].attrs["name"] = "dense"
        f["optimizer/vars/0"] = np.int64(3)
        f.create_group("vars")
        d = f.create_dataset(
            "layers/functional/layers/dense_1/vars/0", data=np.array([1.0, 2.0], dtype=ml_dtypes.bfloat16)
        )  # h5py: OPAQUE
        d.attrs["dtype"] = "bfloat16"  # what Keras 3 writes for bf16 variables
    info = HDF5Reader(p).info()
    assert info.kind == "keras3" and info.metadata == {"layers": 2}
    names = [t.name for t in info.tensors]
    assert names[:12] == [f"layers/dense/vars/{i}" for i in range(12)]  # 2 before 10 (natural order)
    assert names[12:] == ["layers/functional/layers/dense_1/vars/0", "optimizer/vars/0"]
    assert info.tensor("layers/functional/layers/dense_1/vars/0").dtype == "bfloat16"
    assert not info.warnings
    q = tmp_path / "not_keras.h5"
    with h5py.File(q, "w") as f:
        f["layers/conv/weight"] = np.ones(2)
    assert HDF5Reader(q).info().kind is None


def test_hf_tf_shard_layout(tmp_path):
    """transformers' sharded TF files: layer_names are the dataset paths, no keras_version."""
    p = tmp_path / "tf_model-00001-of-00002.h5"
    names = ["tf_bert_model/bert/embeddings/weight:0", "tf_bert_model/bert/pooler/dense/bias:0"]
    with h5py.File(p, "w") as f:
        for n in names:
            f.create_dataset(n, data=np.ones(3, "f4"))
        f.attrs["layer_names"] = np.array([n.encode() for n in reversed(names)])
    info = HDF5Reader(p).info()
    assert info.kind == "hf-tf"
    assert [t.name for t in info.tensors] == list(reversed(names))


def test_truncated_hdf5(tmp_path, generic):
    p, _ = generic
    q = tmp_path / "trunc.h5"
    q.write_bytes(p.read_bytes()[:3000])
    assert sniff(q) == "hdf5"
    with pytest.raises(CorruptFile) as e:
        open_reader(q).info()
    assert str(q) in str(e.value)
    res = run("inspect", q)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "HDF5" in res.stderr


def test_cli_json_and_no_torch(generic):
    p, arrays = generic
    res = cli("inspect", p, "--format", "json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["num_tensors"] == len(arrays) and doc["metadata"]["step"] == 42
    assert {"path", "format", "tensors", "metadata", "num_tensors", "num_params", "total_bytes"} <= set(doc)
    code = (
        "import sys\nfrom ckptctl.cli.app import app\n"
        "try:\n    app(['inspect', sys.argv[1]])\nexcept SystemExit as e:\n    c = e.code\n"
        "sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))\nsys.exit(c)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "TORCH=False" in res.stderr


@needs_real
def test_real_hf_tf_model_h5():
    p = REAL / "tf_transformers_h5" / "caikit_tiny_bert_tf_model.h5"
    with HDF5Reader(p) as r, h5py.File(p, "r") as f:
        info = r.info()
        assert info.kind == "hf-tf"
        assert info.metadata["keras_version"] == "2.12.0" and info.metadata["backend"] == "tensorflow"
        ref: dict = {}
        f.visititems(lambda n, o: ref.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
        assert {t.name for t in info.tensors} == set(ref)
        assert len(info.tensors) == 89
        # model order: layer_names, then each layer's weight_names
        assert info.tensors[0].name.endswith("embeddings/word_embeddings/weight:0")
        for t in info.tensors:
            ds = ref[t.name]
            assert (t.dtype, t.shape) == (ds.dtype.name, ds.shape)
            assert all_bytes(r, t.name) == le_bytes(ds[()])
    res = run("inspect", p, "--format", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["kind"] == "hf-tf"


def test_hdf5_inside_a_container_file(tmp_path):
    """The `_open_h5` hook and `base_offset`: an HDF5 file stored at byte N of another file is
    listed through a file object over that window, and its contiguous data addressed in the
    container (what the .keras reader builds on)."""
    import io

    from ckptctl.formats.keras_zip import _Window

    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    b = np.arange(7, dtype=">i4")  # big-endian: read through h5py, no byte range
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f["a"] = a
        f["g/b"] = b
    prefix = b"\xab" * 4099
    box = tmp_path / "box.bin"
    box.write_bytes(prefix + buf.getvalue() + b"\xcd" * 100)

    class Boxed(HDF5Reader):
        def _open_h5(self, h5py):
            self.base_offset = len(prefix)
            return h5py.File(_Window(self._fdesc(), len(prefix), len(buf.getvalue())), "r")

    with Boxed(box) as r:
        assert [t.name for t in r.info().tensors] == ["a", "g/b"]
        f, off, n = r.byte_range("a")
        assert (f, n) == (str(box), a.nbytes) and off > len(prefix)
        assert box.read_bytes()[off : off + n] == a.tobytes()
        assert b"".join(r.iter_chunks("a")) == a.tobytes()
        assert r.byte_range("g/b") is None
        assert b"".join(r.iter_chunks("g/b")) == b.astype("<i4").tobytes()
