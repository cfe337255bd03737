"""The pickle-based readers: torch zip, legacy torch, plain pickles, torch.distributed.checkpoint.

Every tensor is compared with what torch itself loads: dtype, shape and every byte (read through
iter_chunks in tiny pieces, and through the strided path with a tiny read budget).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import REAL, cli, real_manifest, real_params, run

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader, pickles, sniff
from ckptctl.formats import torch_archive as archive_mod
from ckptctl.formats import torch_legacy as legacy_mod
from ckptctl.formats import torch_zip as zip_mod
from ckptctl.formats.dcp import DCPReader
from ckptctl.formats.torch_legacy import PickleReader, TorchLegacyReader
from ckptctl.formats.torch_zip import TorchZipReader

# torch's own warnings while the test data is made (experimental dtypes, single-process DCP)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ZOO_DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
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
    "complex32",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
]


def tbytes(x: torch.Tensor) -> bytes:
    """A tensor's logical value as bytes (C order, little-endian)."""
    if x.is_quantized:
        x = x.int_repr()
    if x.numel() == 0:
        return b""
    return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def got_bytes(reader, name: str, size: int = 7) -> bytes:
    out = []
    for c in reader.iter_chunks(name, size):
        assert 0 < len(c) <= size
        out.append(bytes(c))
    return b"".join(out)


def tname(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def check_against(reader, ref: dict, names=None) -> int:
    """Every listed tensor equals ref[name] in dtype, shape and bytes; returns how many were checked."""
    info = reader.info()
    n = 0
    for t in info.tensors:
        if names is not None and t.name not in names:
            continue
        x = ref[t.name]
        assert t.dtype == tname(x), t.name
        assert t.shape == tuple(x.shape), t.name
        assert t.nbytes == len(tbytes(x)), t.name
        assert got_bytes(reader, t.name) == tbytes(x), t.name
        n += 1
    return n


def zoo() -> dict:
    g = torch.Generator().manual_seed(0)
    sd: dict = {}
    for n in ZOO_DTYPES:
        dt = getattr(torch, n)
        isz = torch.empty((), dtype=dt).element_size()
        raw = torch.randint(0, 256, (isz * 6,), dtype=torch.uint8, generator=g)
        sd[n] = raw.view(dt).reshape(2, 3)
        sd[n + "_scalar"] = raw[:isz].view(dt).reshape(())
        sd[n + "_empty"] = torch.empty((0, 3), dtype=dt)
    sd["qint8"] = torch.quantize_per_tensor(torch.randn(4, 3, generator=g), 0.1, 3, torch.qint8)
    sd["quint8"] = torch.quantize_per_tensor(torch.randn(4, generator=g), 0.1, 3, torch.quint8)
    sd["qint32"] = torch.quantize_per_tensor(torch.randn(4, generator=g), 0.1, 3, torch.qint32)
    sd["qchannel"] = torch.quantize_per_channel(
        torch.randn(4, 3, generator=g), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 2, 3]), 0, torch.qint8
    )
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    sd["base"] = base
    sd["slice"] = base[1:, 1:3, ::2]
    sd["transpose"] = base.transpose(0, 2)
    sd["expand"] = torch.arange(3.0).reshape(3, 1).expand(3, 1000)
    sd["fortran"] = torch.empty_strided((3, 4, 5), (1, 3, 12)).copy_(base)
    sd["row"] = base[2]
    sd["tied"] = sd["base"]
    sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
    return sd


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    sd = zoo()
    files = {}
    for proto in (2, 4, 5):
        files[proto] = d / f"zoo{proto}.pt"
        torch.save(sd, files[proto], pickle_protocol=proto)
    files["legacy"] = d / "zoo_legacy.pt"
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    return sd, files


# ---- torch zip -------------------------------------------------------------------------------
@pytest.mark.parametrize("proto", [2, 4, 5])
def test_zip_dtype_zoo_matches_torch_load(zoo_files, proto):
    sd, files = zoo_files
    path = files[proto]
    assert sniff(path) == "torch-zip"
    # torch's weights_only unpickler does not accept protocol-4 FRAME opcodes: these files are ours
    ref = torch.load(path, weights_only=(proto == 2))
    with open_reader(path) as r:
        assert isinstance(r, TorchZipReader)
        info = r.info()
        assert [t.name for t in info.tensors] == list(ref)
        assert check_against(r, ref) == len(ref)
        assert info.kind == "state_dict"
        assert info.metadata["byteorder"] == "little"
        assert info.tensor("tied").alias_of == "base"
        assert all(info.tensor(n).alias_of is None for n in ("slice", "transpose", "row", "fortran"))
        assert info.tensor("qchannel").dtype == "qint8"
        assert info.tensor("float8_e4m3fn_scalar").shape == ()
        assert info.tensor("expand").nbytes == 3 * 1000 * 4  # logical size, not the 12-byte storage


def test_strided_views_with_a_tiny_read_budget(zoo_files):
    sd, files = zoo_files
    with TorchZipReader(files[2]) as r:
        r.min_read = 1  # force the slab-by-slab path down to single elements
        for name in ("slice", "transpose", "expand", "fortran", "row", "complex64", "bfloat16"):
            assert got_bytes(r, name, 5) == tbytes(sd[name]), name
            assert got_bytes(r, name, 1 << 20) == tbytes(sd[name]), name


def test_read_returns_numpy_with_ml_dtypes(zoo_files):
    sd, files = zoo_files
    with open_reader(files[2]) as r:
        a = r.read("bfloat16")
        assert str(a.dtype) == "bfloat16" and a.shape == (2, 3)
        assert a.tobytes() == tbytes(sd["bfloat16"])
        f = r.read("fortran")
        assert np.array_equal(f, sd["fortran"].numpy())
        assert r.read("float32_scalar").shape == ()


def test_byte_range_only_for_contiguous(zoo_files):
    sd, files = zoo_files
    with open_reader(files[2]) as r:
        path, off, n = r.byte_range("base")
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == tbytes(sd["base"])
        path, off, n = r.byte_range("row")  # a contiguous view at an offset into the storage
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == tbytes(sd["row"])
        assert r.byte_range("transpose") is None
        assert r.byte_range("expand") is None


def test_inspect_cli_lists_the_zoo(zoo_files):
    sd, files = zoo_files
    res = cli("inspect", files[2], "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    by = {t["name"]: t for t in doc["tensors"]}
    assert by["float8_e5m2"]["dtype"] == "float8_e5m2" and by["float8_e5m2"]["shape"] == [2, 3]
    assert by["uint64_scalar"]["shape"] == [] and by["bool_empty"]["numel"] == 0
    assert by["tied"]["alias_of"] == "base"
    assert doc["format"] == "torch-zip" and doc["kind"] == "state_dict"
    assert "torch._utils._rebuild_tensor_v3" not in json.dumps(doc["metadata"])


def test_info_reads_no_tensor_data(tmp_path, monkeypatch):
    big = {f"w{i}": torch.full((512, 512), float(i)) for i in range(8)}  # 8 MiB of data
    path = tmp_path / "big.pt"
    torch.save(big, path)
    data_ranges = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for zi in z.infolist():
            if "/data/" in zi.filename:
                f.seek(zi.header_offset)
                nlen, xlen = struct.unpack("<HH", f.read(30)[26:30])
                start = zi.header_offset + 30 + nlen + xlen
                data_ranges.append((start, start + zi.file_size))
    reads = _record_reads(monkeypatch, archive_mod)  # the module that opens the archive
    monkeypatch.setattr(os, "pread", _no_pread)
    info = TorchZipReader(path).info()
    assert len(info.tensors) == 8
    assert reads, "the recorder saw nothing: the test would not notice data reads"
    touched = sum(_overlap(r, d) for r in reads for d in data_ranges)
    assert touched == 0
    assert sum(n for _, n in reads) < 64 * 1024


def test_legacy_info_reads_no_tensor_data(tmp_path, monkeypatch):
    big = {f"w{i}": torch.full((512, 512), float(i)) for i in range(8)}
    path = tmp_path / "big_legacy.pt"
    torch.save(big, path, _use_new_zipfile_serialization=False)
    reads = _record_reads(monkeypatch, legacy_mod)
    monkeypatch.setattr(os, "pread", _no_pread)
    info = TorchLegacyReader(path).info()
    assert len(info.tensors) == 8
    data_start = min(t.loc.blob.file_offset(None) for t in info.tensors)
    in_data = sum(max(0, off + n - max(off, data_start)) for off, n in reads)
    assert in_data <= pickles.FIRST_WINDOW  # the first look-ahead of the last pickle, nothing more
    assert os.path.getsize(path) > 8 * pickles.FIRST_WINDOW * 10


def _no_pread(*a, **k):
    raise AssertionError("os.pread during info()")


def _overlap(r, d) -> int:
    return max(0, min(r[0] + r[1], d[1]) - max(r[0], d[0]))


def _record_reads(monkeypatch, module) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    real_open = open

    class Rec:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            pos = self._f.tell()
            d = self._f.read(n)
            log.append((pos, len(d)))
            return d

        def __getattr__(self, k):
            return getattr(self._f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(module, "open", lambda *a, **k: Rec(real_open(*a, **k)), raising=False)
    return log


def test_nn_module_state_dict_and_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("steps", torch.tensor(7))

    sd = Tied().state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    with open_reader(path) as r:
        info = r.info()
        assert info.kind == "state_dict"
        assert info.tensor("head.weight").alias_of == "emb.weight"
        assert info.tensor("emb.weight").alias_of is None
        assert check_against(r, torch.load(path, weights_only=True)) == len(sd)
        assert info.num_params == sum(v.numel() for k, v in sd.items() if k != "head.weight")


def test_nested_training_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "loss": 0.25,
        "note": "hello",
        "extra": [torch.arange(3), {"deep": torch.ones(2)}],
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    ref = torch.load(path, weights_only=True)
    flat = {
        "model_state_dict/weight": ref["model_state_dict"]["weight"],
        "model_state_dict/bias": ref["model_state_dict"]["bias"],
        "optimizer/state/0/exp_avg": ref["optimizer"]["state"][0]["exp_avg"],
        "optimizer/state/1/exp_avg_sq": ref["optimizer"]["state"][1]["exp_avg_sq"],
        "optimizer/state/0/step": ref["optimizer"]["state"][0]["step"],
        "extra/0": ref["extra"][0],
        "extra/1/deep": ref["extra"][1]["deep"],
    }
    with open_reader(path) as r:
        info = r.info()
        assert info.kind == "training"
        assert check_against(r, flat, names=set(flat)) == len(flat)
        assert info.metadata["epoch"] == 3 and info.metadata["loss"] == 0.25 and info.metadata["note"] == "hello"
        assert len(info.tensors) == 2 + 6 + 2


def test_lightning_like_checkpoint_with_namespace_and_path(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    cb = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}"
    best = torch.tensor(0.125)
    ckpt = {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.2.2",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items()),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"last_epoch": 4, "_last_lr": [0.1]}],
        "callbacks": {
            cb: {
                "monitor": "val_loss",
                "best_model_score": best,
                "best_model_path": "/ck/epoch=3.ckpt",
                "best_k_models": {"/ck/epoch=3.ckpt": best},
                "dirpath": "/ck",
            }
        },
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "args": argparse.Namespace(layers=2, root=pathlib.Path("/data/set"))},
    }
    path = tmp_path / "epoch=4-step=120.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(Exception):  # torch refuses it without allow-listing; we list it anyway
        torch.load(path, weights_only=True)
    with open_reader(path) as r:
        info = r.info()
        assert info.kind == "lightning"
        m = info.metadata
        assert (m["epoch"], m["global_step"], m["pytorch-lightning_version"]) == (4, 120, "2.2.2")
        assert m["hparams_name"] == "kwargs"
        assert m["hyper_parameters"] == {"lr": 0.1, "args": {"layers": 2, "root": "/data/set"}}
        assert m[f"callbacks/{cb}/monitor"] == "val_loss"
        assert m[f"callbacks/{cb}/best_model_path"] == "/ck/epoch=3.ckpt"
        assert m["lr_schedulers"] == [{"last_epoch": 4, "_last_lr": [0.1]}]
        score = info.tensor(f"callbacks/{cb}/best_model_score")
        assert score.shape == () and r.read(score.name).item() == 0.125
        assert info.tensor(f"callbacks/{cb}/best_k_models//ck/epoch=3.ckpt").alias_of == score.name
        types = {o.name: o.type for o in info.objects}
        assert types["hyper_parameters/args"] == "argparse.Namespace"
        assert types["hyper_parameters/args/root"] == "pathlib.PosixPath"
        assert "argparse.Namespace" in info.globals and "pathlib.PosixPath" in info.globals
        flat = {f"state_dict/model.{k}": v for k, v in model.state_dict().items()}
        flat["optimizer_states/0/state/0/momentum_buffer"] = opt.state_dict()["state"][0]["momentum_buffer"]
        assert check_against(r, flat, names=set(flat)) == 3


def test_hf_trainer_side_files(tmp_path):
    import random

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 2)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    np.random.seed(3)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, tmp_path / "rng_state.pth")
    torch.save(argparse.Namespace(output_dir="out", learning_rate=5e-5), tmp_path / "training_args.bin")
    with open_reader(tmp_path / "optimizer.pt") as r:
        assert r.info().kind == "hf-optimizer"
    with open_reader(tmp_path / "rng_state.pth") as r:
        info = r.info()
        assert info.kind == "hf-rng-state"
        mt = info.tensor("numpy/1")
        assert (mt.dtype, mt.shape) == ("uint32", (624,))
        assert got_bytes(r, "numpy/1", 100) == np.random.get_state()[1].tobytes()
        assert got_bytes(r, "cpu") == tbytes(rng["cpu"])
        assert (
            "numpy.core.multiarray._reconstruct" in info.globals
            or "numpy._core.multiarray._reconstruct" in info.globals
        )
    with open_reader(tmp_path / "training_args.bin") as r:
        info = r.info()
        assert info.tensors == [] and [(o.name, o.type) for o in info.objects] == [("", "argparse.Namespace")]


def test_zip64_and_local_extra_fields(tmp_path, zoo_files):
    sd, files = zoo_files
    src = files[2]
    dst = tmp_path / "zip64.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            data = zin.read(zi.filename)
            with zout.open(zipfile.ZipInfo(zi.filename), "w", force_zip64=True) as w:
                w.write(data)
    with zipfile.ZipFile(dst) as z, open(dst, "rb") as f:
        zi = z.infolist()[0]
        f.seek(zi.header_offset + 28)
        assert struct.unpack("<H", f.read(2))[0] >= 20, "no zip64 extra field: the test would prove nothing"
    with open_reader(dst) as r:
        assert check_against(r, torch.load(src, weights_only=True)) == len(sd)


def test_zero_crcs_and_a_zip_that_zipfile_would_refuse(tmp_path):
    sd = {"w": torch.arange(12.0).reshape(3, 4)}
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as z, pytest.raises(zipfile.BadZipFile):
        z.read(z.namelist()[-1] if False else [n for n in z.namelist() if "/data/" in n][0])
    with open_reader(path) as r:
        assert check_against(r, sd) == 1


def _rezip(src, dst, edit) -> None:
    """Copy a torch zip member by member, letting edit(name, data) -> data change members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            zout.writestr(zi.filename, edit(zi.filename, zin.read(zi.filename)))


def test_big_endian_archive_and_cuda_locations(tmp_path):
    sd = {
        "f": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "c": torch.tensor([1 + 2j, 3 - 4j]),
        "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "i": torch.arange(4, dtype=torch.int64).t(),
        "b": torch.tensor([True, False]),
    }
    src = tmp_path / "le.pt"
    torch.save(sd, src)
    isz = {}
    with zipfile.ZipFile(src) as z:
        pkl = z.read("le/data.pkl")
    # which storage key holds which dtype: from our own listing of the little-endian file
    with open_reader(src) as r:
        for t in r.info().tensors:
            isz[t.loc.key] = (dtypes_itemsize(t.dtype), t.dtype)

    def edit(name, data):
        if name.endswith("byteorder"):
            return b"big"
        if "/data/" in name and "serialization" not in name:
            size, dt = isz[name.rsplit("/", 1)[1]]
            unit = size // 2 if dt.startswith("complex") else size
            if unit > 1:
                return np.frombuffer(data, dtype=f"<u{unit}").astype(f">u{unit}").tobytes()
        if name.endswith("data.pkl"):
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        return data

    dst = tmp_path / "be.pt"
    _rezip(src, dst, edit)
    assert pkl.count(b"X\x03\x00\x00\x00cpu") >= 1
    with open_reader(dst) as r:
        info = r.info()
        assert info.metadata["byteorder"] == "big"
        assert check_against(r, sd) == len(sd)
        assert r.byte_range("f") is None  # bytes on disk are not the logical bytes
        r.min_read = 1
        assert got_bytes(r, "i", 3) == tbytes(sd["i"])


def dtypes_itemsize(name: str) -> int:
    from ckptctl import dtypes

    return dtypes.BY_NAME[name].itemsize


# ---- legacy torch ----------------------------------------------------------------------------
def test_legacy_zoo_matches_the_zip_file(zoo_files):
    sd, files = zoo_files
    path = files["legacy"]
    assert sniff(path) == "torch-legacy"
    with open_reader(path) as r:
        assert isinstance(r, TorchLegacyReader)
        info = r.info()
        assert info.metadata["legacy_protocol"] == 1001
        assert check_against(r, sd) == len(sd)  # torch 2.x cannot load legacy float8/uint16 files itself
        assert info.tensor("tied").alias_of == "base"
        r.min_read = 1
        assert got_bytes(r, "transpose", 3) == tbytes(sd["transpose"])


def test_legacy_classic_dtypes_match_torch_load(tmp_path):
    sd = {"w": torch.randn(3, 4), "i": torch.arange(5), "h": torch.ones(2, dtype=torch.float16)}
    sd["v"] = sd["w"][1:, 2:]
    path = tmp_path / "old.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with open_reader(path) as r:
        assert check_against(r, torch.load(path, weights_only=True)) == 4


# A tiny pickle assembler for files that no current tool writes (Python 2 era, storage views).
def _s(x: str | bytes) -> bytes:
    b = x.encode("latin1") if isinstance(x, str) else x
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _g(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def _i(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _legacy_file(obj_pickle: bytes, keys: list[str], storages: list[bytes], counts: list[int]) -> bytes:
    magic = 0x1950A86A20F9469CFC6C
    out = b"\x80\x02\x8a\x0a" + magic.to_bytes(10, "little", signed=True) + b"."
    out += b"\x80\x02M\xe9\x03."
    out += (
        b"\x80\x02}("
        + _s("protocol_version")
        + b"M\xe9\x03"
        + _s("little_endian")
        + b"\x88"
        + _s("type_sizes")
        + b"}("
        + _s("int")
        + _i(4)
        + b"uu."
    )
    out += obj_pickle
    out += b"\x80\x02](" + b"".join(_s(k) for k in keys) + b"e."
    for raw, count in zip(storages, counts):
        out += struct.pack("<q", count) + raw
    return out


def test_python2_era_legacy_file_with_views_and_numpy(tmp_path):
    root = np.arange(10, dtype="<f4")
    arr = np.array([1.5, -2.25, 3.0], dtype="<f8")

    def pid(view):
        return b"(" + _s("storage") + _g("torch", "FloatStorage") + _s("140") + _s("cpu") + _i(10) + view + b"t"

    obj = (
        b"\x80\x02}("
        + _s("w")
        + _g("torch._utils", "_rebuild_tensor")
        + b"("
        + pid(b"N")
        + b"Q"
        + _i(0)
        + _i(2)
        + _i(5)
        + b"\x86"
        + _i(5)
        + _i(1)
        + b"\x86tR"
        + _s("v")
        + _g("torch._utils", "_rebuild_tensor")
        + b"("
        + pid(b"(" + _s("141") + _i(2) + _i(5) + b"t")
        + b"Q"
        + _i(1)
        + _i(3)
        + b"\x85"
        + _i(1)
        + b"\x85tR"
        + _s("arr")
        + _g("numpy.core.multiarray", "_reconstruct")
        + _g("numpy", "ndarray")
        + _i(0)
        + b"\x85"
        + _s("b")
        + b"\x87R("
        + _i(1)
        + _i(3)
        + b"\x85"
        + _g("numpy", "dtype")
        + _s("f8")
        + _i(0)
        + _i(1)
        + b"\x87R("
        + _i(3)
        + _s("<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
        + _i(0)
        + b"tb\x89"
        + _s(arr.tobytes())
        + b"tb"
        + _s("epoch")
        + _i(7)
        + b"u."
    )
    path = tmp_path / "py2.pt"
    path.write_bytes(_legacy_file(obj, ["140"], [root.tobytes()], [10]))
    assert sniff(path) == "torch-legacy"
    with open_reader(path) as r:
        info = r.info()
        assert [(t.name, t.dtype, t.shape) for t in info.tensors] == [
            ("w", "float32", (2, 5)),
            ("v", "float32", (3,)),
            ("arr", "float64", (3,)),
        ]
        assert got_bytes(r, "w") == root.tobytes()
        assert got_bytes(r, "v") == root[3:6].tobytes()  # view at 2, tensor offset 1
        assert got_bytes(r, "arr") == arr.tobytes()
        assert info.metadata["epoch"] == 7
        assert "torch._utils._rebuild_tensor" in info.globals


def test_legacy_count_mismatch_and_truncation_are_corrupt(tmp_path):
    sd = {"w": torch.randn(64)}
    path = tmp_path / "l.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:-10])
    with pytest.raises(CorruptFile, match="truncated"):
        TorchLegacyReader(cut).info()
    count_at = len(data) - 64 * 4 - 8
    assert struct.unpack("<q", data[count_at : count_at + 8])[0] == 64
    bad = tmp_path / "count.pt"
    bad.write_bytes(data[:count_at] + struct.pack("<q", 65) + data[count_at + 8 :])
    with pytest.raises(CorruptFile, match="65 elements"):
        TorchLegacyReader(bad).info()


# ---- plain pickles ---------------------------------------------------------------------------
@pytest.mark.parametrize("proto", [2, 4, 5])
def test_plain_pickle_with_numpy_arrays(tmp_path, proto):
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: stays in the file (Span), read by offset
    obj = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
        "be": np.arange(5, dtype=">i4"),
        "c": np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
        "mask": np.array([True, False, True]),
        "big": big,
        "strings": np.array(["a", "bc"]),
        "meta": {"lr": 0.1, "name": "run"},
        "scalar": np.float64(2.5),
    }
    path = tmp_path / f"arrays{proto}.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=proto))
    assert sniff(path) == "pickle"
    with open_reader(path) as r:
        assert isinstance(r, PickleReader)
        info = r.info()
        names = [t.name for t in info.tensors]
        assert names == ["w", "fortran", "be", "c", "mask", "big"]
        for n in names:
            want = np.ascontiguousarray(obj[n]).astype(obj[n].dtype.newbyteorder("<")).tobytes()
            assert got_bytes(r, n, 1000) == want, n
        assert info.tensor("be").dtype == "int32"
        if proto >= 3:  # protocol 2 pickles bytes as _codecs.encode(text): they have to be decoded
            assert isinstance(info.tensor("big").loc.blob, zip_mod.FileBlob)
        assert [(o.name, o.type) for o in info.objects] == [("strings", "numpy.ndarray[U2]")]
        assert info.metadata["meta"] == {"lr": 0.1, "name": "run"} and info.metadata["scalar"] == 2.5


def test_plain_pickle_out_of_band_buffers_are_refused(tmp_path):
    bufs = []
    data = pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=bufs.append)
    path = tmp_path / "oob.pkl"
    path.write_bytes(data)
    with pytest.raises(CorruptFile, match="out-of-band"):
        PickleReader(path).info()


def test_hostile_pickles_fail_cleanly(tmp_path):
    cases = {
        # a tuple nested 300k deep used as a dict key: hashing it in C would crash the process
        "deepkey.pkl": b"\x80\x02}N" + b"\x85" * 300_000 + b"K\x01s.",
        "hugelen.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"x.",
        "badop.pkl": b"\x80\x02}\xff.",
        "nostop.pkl": b"\x80\x02}(X\x01\x00\x00\x00aK\x01",
        "memo.pkl": b"\x80\x02h\x05.",
        "underflow.pkl": b"\x80\x02R.",
        "proto9.pkl": b"\x80\x09N.",
        "deepnest.pkl": b"\x80\x02" + b"]" * 2000 + b"a" * 1999 + b".",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        res = run("inspect", tmp_path / name)
        assert res.returncode == 1, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (name, res.stderr)
        assert "Traceback" not in res.stderr and "internal error" not in res.stderr, (name, res.stderr)
        assert str(tmp_path / name) in res.stderr


def test_cycles_and_shared_references(tmp_path, monkeypatch):
    a: list = [np.arange(3, dtype=np.int8)]
    a.append(a)  # a cycle
    path = tmp_path / "cycle.pkl"
    path.write_bytes(pickle.dumps({"a": a}, protocol=2))
    with open_reader(path) as r:
        assert [t.name for t in r.info().tensors] == ["a/0"]
    # shared sub-lists doubling 40 times: 2**40 paths; the walk gives up cleanly
    x: list = [np.zeros(1, dtype=np.int8)]
    for _ in range(40):
        x = [x, x]
    path = tmp_path / "dag.pkl"
    path.write_bytes(pickle.dumps(x, protocol=2))
    monkeypatch.setattr(pickles.walk, "MAX_WALK_NODES", 10_000)
    with pytest.raises(CorruptFile, match="too large"):
        PickleReader(path).info()


# ---- torch.distributed.checkpoint ------------------------------------------------------------
def test_dcp_single_rank_save(tmp_path):
    import torch.distributed.checkpoint as dcp

    sd = {
        "w": torch.randn(4, 3),
        "b": torch.arange(5),
        "bf": torch.ones(2, 2, dtype=torch.bfloat16),
        "nested": {"x": torch.zeros(3)},
        "step": 7,
        "name": "hello",
    }
    folder = tmp_path / "dcp"
    dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    assert sniff(folder) == "dcp"
    with open_reader(folder) as r:
        assert isinstance(r, DCPReader)
        info = r.info()
        assert info.kind == "dcp" and info.format == "dcp"
        assert info.metadata["step"] == 7 and info.metadata["name"] == "hello"
        flat = {"w": sd["w"], "b": sd["b"], "bf": sd["bf"], "nested.x": sd["nested"]["x"]}
        assert check_against(r, flat) == 4
        path, off, n = r.byte_range("w")
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == tbytes(sd["w"])
    res = cli("inspect", folder, "--format", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)["num_tensors"] == 4


def test_dcp_tensor_in_several_chunks(tmp_path):
    """Chunks written by hand with torch's own metadata classes; torch's loader is the reference."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder = tmp_path / "sharded_dcp"
    folder.mkdir()
    full = {
        "w": torch.arange(35, dtype=torch.float32).reshape(7, 5),
        "h": (torch.arange(2 * 3 * 4, dtype=torch.float32) / 3).to(torch.bfloat16).reshape(2, 3, 4),
    }
    splits = {
        "w": [((0, 0), (3, 2)), ((0, 2), (3, 3)), ((3, 0), (4, 5))],
        "h": [((0, 0, 0), (2, 3, 1)), ((0, 0, 1), (2, 3, 3))],
    }
    sdm, storage = {}, {}
    blob = io.BytesIO()
    for name, parts in splits.items():
        chunks = []
        for k, (offs, sizes) in enumerate(parts):
            idx = tuple(slice(o, o + s) for o, s in zip(offs, sizes))
            piece = full[name][idx].clone()
            if k == 0 and piece.dim() == 2:
                piece = piece.t().contiguous().t()  # a Fortran-ordered chunk
            buf = io.BytesIO()
            torch.save(piece, buf)
            start = blob.tell()
            blob.write(buf.getvalue())
            storage[MetadataIndex(name, torch.Size(offs))] = _StorageInfo("__0_0.distcp", start, blob.tell() - start)
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes)))
        sdm[name] = TensorStorageMetadata(TensorProperties(dtype=full[name].dtype), full[name].size(), chunks)
    (folder / "__0_0.distcp").write_bytes(blob.getvalue())
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=sdm, storage_data=storage), f)
    loaded = {"w": torch.empty(7, 5), "h": torch.empty(2, 3, 4, dtype=torch.bfloat16)}
    dcp.load(loaded, checkpoint_id=str(folder), no_dist=True)
    assert torch.equal(loaded["w"], full["w"]) and torch.equal(loaded["h"], full["h"])
    with open_reader(folder) as r:
        assert check_against(r, full) == 2
        assert r.byte_range("w") is None
        r.min_read = 1
        assert got_bytes(r, "w", 3) == tbytes(full["w"])
        assert got_bytes(r, "h", 5) == tbytes(full["h"])


def test_dcp_bad_metadata_is_corrupt(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "d"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder), no_dist=True)
    (folder / "__0_0.distcp").write_bytes(b"")  # the data file emptied
    res = run("inspect", folder)
    assert res.returncode == 1 and "truncated" in res.stderr and "Traceback" not in res.stderr
    (folder / ".metadata").write_bytes(b"\x80\x04}.")
    res = run("inspect", folder)
    assert res.returncode == 1 and "not a torch.distributed.checkpoint" in res.stderr


# ---- damaged files through the CLI -----------------------------------------------------------
def test_truncated_and_corrupted_files(tmp_path):
    sd = {"w": torch.randn(64, 64), "b": torch.arange(10)}
    zpath = tmp_path / "m.pt"
    torch.save(sd, zpath)
    lpath = tmp_path / "l.pt"
    torch.save(sd, lpath, _use_new_zipfile_serialization=False)
    zdata, ldata = zpath.read_bytes(), lpath.read_bytes()
    with zipfile.ZipFile(zpath) as z:
        pkl = z.getinfo("m/data.pkl")
    variants = {
        "zip_half.pt": zdata[: len(zdata) // 2],
        "zip_no_eocd.pt": zdata[:-30],
        "legacy_half.pt": ldata[: len(ldata) // 2],
        "legacy_in_pickle.pt": ldata[:200],
        "zip_pickle_garbage.pt": _patch(zdata, pkl.header_offset + 64 + 10, b"\xff\xfe\xfd"),
        "legacy_pickle_garbage.pt": _patch(ldata, 120, b"\xff\xfe\xfd"),
    }
    for name, data in variants.items():
        p = tmp_path / name
        p.write_bytes(data)
        res = run("inspect", p)
        assert res.returncode == 1, (name, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr and "internal error" not in res.stderr, (name, lines)
        assert name in lines[0]


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def test_storage_member_too_small_or_missing(tmp_path):
    sd = {"w": torch.randn(16)}
    src = tmp_path / "ok.pt"
    torch.save(sd, src)
    short = tmp_path / "short.pt"
    _rezip(src, short, lambda n, d: d[:10] if n.endswith("/data/0") else d)
    with pytest.raises(CorruptFile, match="holds 10 bytes"):
        TorchZipReader(short).info()
    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(missing, "w") as zout:
        for zi in zin.infolist():
            if not zi.filename.endswith("/data/0"):
                zout.writestr(zi.filename, zin.read(zi.filename))
    res = run("inspect", missing)
    assert res.returncode == 1 and "data/0 is missing" in res.stderr


def test_bad_local_header_fails_only_when_data_is_read(tmp_path):
    sd = {"w": torch.randn(8)}
    path = tmp_path / "lh.pt"
    torch.save(sd, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        off = z.getinfo("lh/data/0").header_offset
    data[off : off + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with open_reader(path) as r:
        assert r.info().tensor("w").shape == (8,)
        with pytest.raises(CorruptFile, match="local header"):
            got_bytes(r, "w")


def test_view_past_the_storage_end_is_corrupt(tmp_path):
    sd = {"w": torch.arange(4.0)}
    src = tmp_path / "v.pt"
    torch.save(sd, src)
    # size (4,) -> (9,) in data.pkl: BININT1 4 inside the size tuple
    dst = tmp_path / "v2.pt"
    _rezip(src, dst, lambda n, d: d.replace(b"K\x04\x85", b"K\x09\x85") if n.endswith("data.pkl") else d)
    with pytest.raises(CorruptFile, match="past the end of storage"):
        TorchZipReader(dst).info()


# ---- real files written by other projects ----------------------------------------------------
def _real(sub: str) -> list:
    man = real_manifest()
    return sorted(k for k in man if k.startswith(sub + "/"))


@pytest.mark.parametrize("rel", real_params(_real("torch_zip") + _real("torch_legacy") + _real("lightning")))
def test_real_files(rel):
    path = REAL / rel
    if not path.is_file():
        pytest.skip("fixture absent")
    with open_reader(path) as r:
        info = r.info()
        assert info.tensors
        try:
            ref = torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - Namespace, chemprop, pyannote globals: torch refuses them
            ref = None
        if isinstance(ref, torch.Tensor):
            ref = {"tensor": ref}
        if ref is not None:
            flat = _flatten(ref)
            assert check_against(r, flat, names=set(flat)) == len(info.tensors)
        else:  # torch's own zip reader gives the storages; compare every view of them
            _check_with_torch_records(path, r)


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def _check_with_torch_records(path, r) -> None:
    zr = torch._C.PyTorchFileReader(str(path))
    n = 0
    for t in r.info().tensors:
        loc = t.loc
        if isinstance(loc.blob, zip_mod.BytesBlob):  # a numpy array inside data.pkl
            n += 1
            continue
        rec = zr.get_record(f"data/{loc.key}")
        raw = torch.frombuffer(bytearray(rec), dtype=getattr(torch, t.dtype)) if len(rec) else torch.empty(0)
        isz = dtypes_itemsize(t.dtype)
        want = torch.as_strided(raw, t.shape, loc.stride, loc.byte_base // isz)
        assert got_bytes(r, t.name, 4096) == tbytes(want), t.name
        n += 1
    assert n == len(r.info().tensors)


def test_real_tied_t5_and_cuda_file():
    t5 = REAL / "torch_zip/caikit_tiny_t5_pytorch_model.bin"
    cuda = REAL / "torch_zip/chemprop_v2_trained_on_cuda.pt"
    if not t5.is_file() or not cuda.is_file():
        pytest.skip("fixtures absent")
    with open_reader(t5) as r:
        info = r.info()
        tied = {t.name: t.alias_of for t in info.tensors if t.alias_of}
        assert tied == {
            n: "shared.weight" for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
        }
    with open_reader(cuda) as r:
        info = r.info()
        assert info.tensors and any(o.type.startswith("chemprop.") for o in info.objects)


def test_real_lightning_metadata():
    path = REAL / "lightning/pyannote_simple_model_on_speaker_diarization_task.ckpt"
    if not path.is_file():
        pytest.skip("fixture absent")
    res = cli("inspect", path, "--all", "--format", "json")  # every tensor, optimizer state included
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["kind"] == "lightning"
    assert doc["metadata"]["pytorch-lightning_version"] == "2.1.3" and doc["metadata"]["global_step"] == 5
    names = [t["name"] for t in doc["tensors"]]
    assert any(n.endswith("/best_model_score") for n in names)
    assert "state_dict/classifier.weight" in names and "optimizer_states/0/state/0/exp_avg" in names
    assert any(k.endswith("/monitor") for k in doc["metadata"])


def test_python_m_and_no_torch_import(zoo_files):
    _sd, files = zoo_files
    code = (
        "import sys; from ckptctl.formats import open_reader; r = open_reader(sys.argv[1]); "
        "r.info(); b''.join(r.iter_chunks('transpose')); print('torch' in sys.modules)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(files[2])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    res = run("inspect", files["legacy"], "--format", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["format"] == "torch-legacy"


def test_shutil_copy_does_not_change_listing(zoo_files, tmp_path):
    """Names and locations depend on content only (the archive prefix is the original stem)."""
    _sd, files = zoo_files
    dst = tmp_path / "renamed.bin"
    shutil.copy(files[2], dst)
    with open_reader(files[2]) as a, open_reader(dst) as b:
        assert [t.to_json() for t in a.info().tensors] == [t.to_json() for t in b.info().tensors]
        assert b.info().metadata["archive"] == "zoo2"


class MyTensor(torch.Tensor):
    pass


def test_subclasses_parameters_with_state_sparse_and_meta(tmp_path):
    p = torch.nn.Parameter(torch.arange(4.0))
    p.note = "python attribute"  # pickled through _rebuild_parameter_with_state
    sparse = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    sd = {
        "sub": torch.ones(3).as_subclass(MyTensor),
        "param": p,
        "sparse": sparse,
        "meta": torch.empty(2, 3, device="meta"),
        "csr": torch.eye(3).to_sparse_csr(),
    }
    path = tmp_path / "misc.pt"
    torch.save(sd, path)
    with open_reader(path) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == [
            "sub",
            "param",
            "sparse/indices",
            "sparse/values",
            "meta",
            "csr/crow_indices",
            "csr/col_indices",
            "csr/values",
        ]
        assert got_bytes(r, "sub") == tbytes(torch.ones(3)) and got_bytes(r, "param") == tbytes(p.detach())
        assert got_bytes(r, "sparse/indices") == tbytes(sparse._indices())
        assert got_bytes(r, "sparse/values") == tbytes(sparse._values())
        assert got_bytes(r, "csr/crow_indices") == tbytes(sd["csr"].crow_indices())
        assert info.tensor("meta").shape == (2, 3) and any("'meta'" in w for w in info.warnings)
        with pytest.raises(CorruptFile, match="no data"):
            got_bytes(r, "meta")
        assert {o.type for o in info.objects} == {"torch.sparse_coo tensor", "torch.sparse_csr tensor"}
        assert "test_torch_formats.MyTensor" in info.globals


@pytest.mark.parametrize("proto", [0, 1, 2, 3, 4, 5])
def test_unpickler_agrees_with_pickle_on_plain_data(proto):
    shared = [1, 2]
    data = {
        "ints": [0, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**63, -(2**100)],
        "floats": [0.0, -1.5, 1e300, float("inf")],
        "text": ["", "x" * 300, "café", "\u2603"],
        "bytes": [b"", b"\x00\xff" * 200, bytearray(b"ab")],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        "sets": [set(), {1, 2}, frozenset({"a"})],
        "nested": {(1, "k"): {"deep": [[[]]]}},
        "shared": (shared, shared),
        "bools": [True, False, None],
        "complex": 1 - 2j,
        "slice": slice(1, None, 2),
        OrderedDict(a=1).__class__.__name__: OrderedDict([("b", 2), ("a", 1)]),
    }
    raw = pickle.dumps(data, protocol=proto)
    obj, _globals = pickles.unpickle_bytes(raw)
    want = pickle.loads(raw)  # plain builtins only: safe to load
    assert obj == want
    assert obj["shared"][0] is obj["shared"][1]
    assert isinstance(obj["OrderedDict"], pickles.ODict) and list(obj["OrderedDict"]) == ["b", "a"]


def test_fuzzed_pickles_fail_only_with_clean_errors(tmp_path):
    """Random byte flips in the pickle parts: every outcome is a listing or a CkptError."""
    import random

    from ckptctl.errors import CkptError

    rng = random.Random(1234)
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3), "v": torch.randn(4, 3).t(), "n": {"e": 3, "s": "x"}}
    zpath, lpath, ppath = tmp_path / "z.pt", tmp_path / "l.pt", tmp_path / "p.pkl"
    torch.save(sd, zpath)
    torch.save(sd, lpath, _use_new_zipfile_serialization=False)
    ppath.write_bytes(pickle.dumps({"a": np.arange(6.0).reshape(2, 3), "m": {"k": [1, 2]}}, protocol=4))
    with zipfile.ZipFile(zpath) as z:
        zi = z.getinfo("z/data.pkl")
    zdata = zpath.read_bytes()
    pkl_start = zdata.index(b"\x80\x02", zi.header_offset)
    targets = [
        (zdata, pkl_start, pkl_start + zi.file_size, ".pt"),
        (lpath.read_bytes(), 0, 400, ".pt"),
        (ppath.read_bytes(), 0, len(ppath.read_bytes()), ".pkl"),
    ]
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        data, lo, hi, suffix = targets[i % 3]
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(lo, hi)] = rng.randrange(256)
        p = tmp_path / f"fuzz{i}{suffix}"
        p.write_bytes(bytes(buf))
        try:
            with open_reader(p) as r:
                for t in r.info().tensors:
                    b"".join(bytes(c) for c in r.iter_chunks(t.name, 64))
            outcomes["ok"] += 1
        except CkptError:
            outcomes["error"] += 1
        p.unlink()
    assert outcomes["ok"] and outcomes["error"], outcomes


def test_fuzzed_zip_directories_fail_only_with_clean_errors(tmp_path):
    import random

    from ckptctl.errors import CkptError

    rng = random.Random(3)
    src = tmp_path / "src.pt"
    torch.save({"w": torch.randn(3, 4), "t": torch.randn(3, 3).t()}, src)
    data = src.read_bytes()
    cd = data.find(b"PK\x01\x02")
    errors = 0
    for _i in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(cd, len(buf))] = rng.randrange(256)
        p = tmp_path / "f.pt"
        p.write_bytes(bytes(buf))
        try:
            with open_reader(p) as r:
                for t in r.info().tensors:
                    b"".join(bytes(c) for c in r.iter_chunks(t.name, 64))
        except CkptError:
            errors += 1
    assert errors > 30
