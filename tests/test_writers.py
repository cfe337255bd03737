"""The three streaming writers, checked with the reference loaders (torch.load(weights_only=True),
safetensors.safe_open, h5py): every dtype of the zoo, scalars, empty tensors, tied weights,
chunking, zero-copy ranges, atomicity."""

from __future__ import annotations

import json
import os
import struct
import zipfile

import numpy as np
import pytest

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, Incompatible
from ckptctl.formats import writer_class
from ckptctl.model import TensorInfo

torch = pytest.importorskip("torch")

ZOO = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "complex64",
    "complex128",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
]
ST_ZOO = [d for d in ZOO if dtypes.BY_NAME[d].st]


def raw(t) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def zoo_tensors(names=ZOO, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(names):
        d = dtypes.BY_NAME[name]
        shape = (2, 3 + i % 3)
        n = 1
        for s in shape:
            n *= s
        b = torch.randint(0, 256, (n * d.itemsize,), dtype=torch.uint8, generator=g)
        if name == "bool":
            b = b % 2
        t = b.view(torch.int16).view(getattr(torch, name)) if name == "bits16" else b.view(getattr(torch, name))
        out[f"zoo.{name}"] = t.reshape(shape)
    out["scalar"] = torch.tensor(3.25, dtype=torch.float32)
    out["scalar_i"] = torch.tensor(-7, dtype=torch.int64)
    out["empty"] = torch.zeros(0, 4)
    out["empty_bf16"] = torch.zeros(3, 0, dtype=torch.bfloat16)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out["view.t"] = base.t()  # non-contiguous: written as its logical value
    out["view.slice"] = base[1:3, ::2]
    return out


def info_of(name, t, alias=None) -> TensorInfo:
    return TensorInfo(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size(), alias)


def write(fmt, path, tensors: dict, aliases=None, metadata=None, chunk=7, order=None, **kw):
    aliases = aliases or {}
    infos = [info_of(n, t, aliases.get(n)) for n, t in tensors.items()]
    w = writer_class(fmt)(path, infos, metadata, **kw)
    for i in order(infos) if order else infos:
        b = raw(tensors[i.name])
        w.add(i, (b[k : k + chunk] for k in range(0, len(b), chunk)))
    w.finish()
    return infos


def leftovers(folder) -> list[str]:
    return [p for p in os.listdir(folder) if ".ckptctl-tmp-" in p]


# ---- torch zip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("force_zip64", [False, True])
def test_torch_zip_zoo_loads_bit_exact(tmp_path, force_zip64):
    ts = zoo_tensors()
    ts["tied"] = ts["zoo.float32"]
    p = tmp_path / "model.pt"
    write(
        "torch-zip", p, ts, aliases={"tied": "zoo.float32"}, order=lambda i: list(reversed(i)), force_zip64=force_zip64
    )
    sd = torch.load(p, weights_only=True)
    assert type(sd).__name__ == "OrderedDict"
    assert list(sd) == list(ts)
    for k, t in ts.items():
        assert sd[k].dtype == t.dtype, k
        assert tuple(sd[k].shape) == tuple(t.shape), k
        assert raw(sd[k]) == raw(t), k
    assert sd["tied"] is sd["zoo.float32"]  # real tying, one storage
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None  # CRCs are right
        names = z.namelist()
        assert names[0] == "model/data.pkl" and "model/byteorder" in names and "model/version" in names
        assert z.read("model/version") == b"3\n" and z.read("model/byteorder") == b"little"
        data = [n for n in names if "/data/" in n]
        assert len(data) == len(ts) - 1  # tied weights stored once
        raw_file = p.read_bytes()
        for zi in z.infolist():
            name_len, extra_len = struct.unpack("<HH", raw_file[zi.header_offset + 26 : zi.header_offset + 30])
            assert (zi.header_offset + 30 + name_len + extra_len) % 64 == 0  # torch's alignment
    mm = torch.load(p, weights_only=True, mmap=True)
    assert all(raw(mm[k]) == raw(t) for k, t in ts.items())


def test_torch_zip_refuses_quantized_and_subbyte(tmp_path):
    for dt in ("qint8", "float4_e2m1fn"):
        with pytest.raises(Incompatible, match=f"'w'.*{dt}"):
            writer_class("torch-zip")(tmp_path / "x.pt", [TensorInfo("w", dt, (4,), 4)])
    assert os.listdir(tmp_path) == []


# ---- safetensors --------------------------------------------------------------------------------
def test_safetensors_zoo_and_reference_bytes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ts = {k: v for k, v in zoo_tensors(ST_ZOO).items()}
    p = tmp_path / "a.safetensors"
    write("safetensors", p, ts, metadata={"format": "pt"})
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in ts.items()}, ref, metadata={"format": "pt"})
    assert p.read_bytes() == ref.read_bytes()  # same layout, header and padding as the reference
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, t in ts.items():
            g = f.get_tensor(k)
            assert g.dtype == t.dtype and tuple(g.shape) == tuple(t.shape) and raw(g) == raw(t), k


@pytest.mark.parametrize("dedupe", [False, True])
def test_safetensors_tied(tmp_path, dedupe):
    from safetensors import safe_open
    from safetensors.torch import load_file

    w = torch.randn(4, 3)
    ts = {"emb": w, "head": w, "b": torch.ones(2, dtype=torch.bfloat16)}
    p = tmp_path / "t.safetensors"
    write("safetensors", p, ts, aliases={"head": "emb"}, metadata={"epoch": 3, "name": "x"}, dedupe_tied=dedupe)
    with safe_open(p, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "pt" and meta["epoch"] == "3" and meta["name"] == "x"
    if dedupe:
        assert keys == {"emb", "b"}
        assert json.loads(meta["ckptctl.aliases"]) == {"head": "emb"}
        from ckptctl.formats import open_reader

        with open_reader(p) as r:
            info = r.info()
            assert info.tensor("head").alias_of == "emb"
            assert bytes(r.read("head").tobytes()) == raw(w)
    else:
        assert keys == {"emb", "head", "b"} and "ckptctl.aliases" not in meta
        sd = load_file(p)
        assert raw(sd["head"]) == raw(w) == raw(sd["emb"])


def test_safetensors_refuses_dtype_before_writing(tmp_path):
    infos = [TensorInfo("ok", "float32", (2,), 8), TensorInfo("c", "complex128", (2,), 32)]
    with pytest.raises(Incompatible, match="'c' has dtype complex128, which safetensors cannot hold"):
        writer_class("safetensors")(tmp_path / "x.safetensors", infos)
    assert os.listdir(tmp_path) == []


def test_safetensors_zero_copy_range(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src.safetensors"
    ts = {"a": torch.randn(100, 7), "b": torch.arange(9, dtype=torch.int16)}
    save_file(ts, src)
    from ckptctl.formats import open_reader

    with open_reader(src) as r:
        infos = r.info().tensors
        out = tmp_path / "out.safetensors"
        w = writer_class("safetensors")(out, infos, None)
        seen = []
        w.on_progress = seen.append
        for i in infos:
            w.add_range(i, *r.byte_range(i.name))
        w.finish()
    got = load_file(out)
    assert all(raw(got[k]) == raw(t) for k, t in ts.items())
    assert sum(seen) == sum(i.nbytes for i in infos)


# ---- HDF5 ---------------------------------------------------------------------------------------
def test_hdf5_zoo_nested_tied(tmp_path):
    h5py = pytest.importorskip("h5py")
    ts = zoo_tensors()
    ts["enc/layer.0/w"] = torch.randn(3, 2)
    ts["tied"] = ts["zoo.float32"]
    p = tmp_path / "m.h5"
    write(
        "hdf5",
        p,
        ts,
        aliases={"tied": "zoo.float32"},
        metadata={"format": "pt", "epoch": 2},
        order=lambda i: sorted(i, key=lambda t: t.name),
    )
    with h5py.File(p, "r") as f:
        assert f.attrs["format"] == "pt" and f.attrs["epoch"] == "2"
        assert json.loads(f.attrs["ckptctl.aliases"]) == {"tied": "zoo.float32"}
        assert f["tied"].id == f["zoo.float32"].id  # hard link: bytes stored once
        for k, t in ts.items():
            ds = f[k]
            assert ds.shape == tuple(t.shape), k
            name = str(t.dtype).removeprefix("torch.")
            native = dtypes.BY_NAME[name].np and "float8" not in name and name != "bfloat16"
            assert ("dtype" in ds.attrs) == (not native), k
            if not native:
                assert ds.attrs["dtype"] == name and ds.dtype.kind == "u"
            assert np.asarray(ds[()]).tobytes() == raw(t), k
    from ckptctl.formats import open_reader

    with open_reader(p) as r:  # ckptctl's reader gets the dtypes back from the attribute
        info = r.info()
        for k, t in ts.items():
            assert info.tensor(k).dtype == str(t.dtype).removeprefix("torch."), k
            assert b"".join(bytes(c) for c in r.iter_chunks(k)) == raw(t), k


@pytest.mark.parametrize("names", [["a", "a/b"], ["x//y"], ["/abs"], ["a/./b"], ["trail/"], ["a/../b", "c%2Fd"]])
def test_hdf5_maps_names_it_cannot_hold_and_reads_them_back(tmp_path, names):
    """Issue 16 point 7: such names are percent-mapped (recorded in a root attribute), not refused."""
    import h5py

    from ckptctl.formats import open_reader

    infos = [TensorInfo(n, "float32", (1,), 4) for n in names]
    w = writer_class("hdf5")(tmp_path / "x.h5", infos)
    for i, t in enumerate(infos):
        w.add(t, [np.float32(i).tobytes()])
    w.finish()
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f.attrs["ckptctl.name_escaping"] == "percent"
    with open_reader(tmp_path / "x.h5") as r:
        assert [t.name for t in r.info().tensors] == names
        for i, n in enumerate(names):
            assert b"".join(bytes(c) for c in r.iter_chunks(n)) == np.float32(i).tobytes()


def test_hdf5_refuses_the_empty_name(tmp_path):
    with pytest.raises(Incompatible, match="--rename"):
        writer_class("hdf5")(tmp_path / "x.h5", [TensorInfo("", "float32", (1,), 4)])
    assert os.listdir(tmp_path) == []


# ---- the contract, for all three ----------------------------------------------------------------
@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("torch-zip", ".pt"), ("hdf5", ".h5")])
def test_abort_and_failures_leave_nothing(tmp_path, fmt, suffix):
    target = tmp_path / f"out{suffix}"
    target.write_bytes(b"old")  # an existing target stays as it was
    infos = [TensorInfo("a", "float32", (4,), 16), TensorInfo("b", "int8", (3,), 3)]
    W = writer_class(fmt)
    # too few bytes
    w = W(target, infos)
    with pytest.raises(CorruptFile, match="'a': got 8 bytes, expected 16"):
        w.add(infos[0], [b"\0" * 8])
    w.abort()
    # too many bytes
    w = W(target, infos)
    with pytest.raises(CorruptFile, match="more than"):
        w.add(infos[1], [b"\0" * 4])
    w.abort()
    # a tensor never added
    w = W(target, infos)
    w.add(infos[0], [b"\0" * 16])
    with pytest.raises(Incompatible, match="'b'.*never written"):
        w.finish()

    # an exception inside the chunk stream (reader failure, Ctrl-C)
    def boom():
        yield b"\0" * 4
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with W(target, infos) as w:
            w.add(infos[0], boom())
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("torch-zip", ".pt"), ("hdf5", ".h5")])
def test_alias_add_is_ignored_and_file_mode(tmp_path, fmt, suffix):
    a = torch.randn(5)
    infos = [TensorInfo("a", "float32", (5,), 20), TensorInfo("a2", "float32", (5,), 20, alias_of="a")]
    p = tmp_path / f"m{suffix}"
    w = writer_class(fmt)(p, infos)
    w.add(infos[1], iter(()))  # an alias: nothing to write, chunks not consumed
    w.add(infos[0], [raw(a)])
    w.finish()
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    from ckptctl.formats import open_reader

    if fmt == "torch-zip":
        sd = torch.load(p, weights_only=True)
        assert raw(sd["a2"]) == raw(a) and sd["a2"] is sd["a"]
        return
    with open_reader(p) as r:
        assert {t.name for t in r.info().tensors} == {"a", "a2"}
        assert r.read("a2").tobytes() == raw(a)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
