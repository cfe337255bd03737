"""Issue 16 point 9: convert's metadata (absolute paths never copied by default, --metadata
keep|all|drop) and the wording of the training-checkpoint note after renaming."""

from __future__ import annotations

import json
import struct

import h5py
import pytest
import torch
from conftest import run
from safetensors.torch import save_file
from test_hdf5_roundtrip import lightning_like

META = {
    "data": "/home/alice/corpus/train.jsonl",
    "config": json.dumps({"output_dir": "/scratch/alice/run7", "lr": 0.1, "hub": "https://huggingface.co/a/b"}),
    "win": "C:\\Users\\alice\\model.ckpt",
    "note": "trained by alice",
}


def header(path) -> tuple[bytes, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8 : 8 + n], json.loads(raw[8 : 8 + n])


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.safetensors"
    save_file({"w": torch.arange(6.0)}, str(p), metadata=META)
    return p


def test_default_redacts_absolute_paths(tmp_path, src):
    out = tmp_path / "out.safetensors"
    r = run("convert", src, out)
    assert r.returncode == 0, r.stderr
    raw, doc = header(out)
    assert b"alice/" not in raw and b"/home" not in raw and b"/scratch" not in raw and b"C:\\\\Users" not in raw
    meta = doc["__metadata__"]
    assert meta["data"] == "<redacted>/train.jsonl"
    assert json.loads(meta["config"]) == {
        "output_dir": "<redacted>/run7",
        "lr": 0.1,
        "hub": "https://huggingface.co/a/b",
    }
    assert meta["win"] == "<redacted>/model.ckpt" and meta["note"] == "trained by alice"
    assert "3 absolute local paths redacted" in r.stderr


def test_all_copies_verbatim_and_drop_copies_nothing(tmp_path, src):
    r = run("convert", src, tmp_path / "all.safetensors", "--metadata", "all")
    assert r.returncode == 0, r.stderr
    _raw, doc = header(tmp_path / "all.safetensors")
    assert doc["__metadata__"] == {**META, "format": "pt"}
    r = run("convert", src, tmp_path / "none.safetensors", "--metadata", "drop")
    assert r.returncode == 0, r.stderr
    _raw, doc = header(tmp_path / "none.safetensors")
    assert doc["__metadata__"] == {"format": "pt"}
    r = run("convert", src, tmp_path / "none.h5", "--metadata", "drop")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "none.h5", "r") as f:
        assert dict(f.attrs) == {}
    r = run("convert", src, tmp_path / "x.safetensors", "--metadata", "some")
    assert r.returncode == 2 and "'some'" in r.stderr and "keep" in r.stderr


def test_lightning_callback_paths_are_not_copied_to_h5(tmp_path):
    ckpt = lightning_like(tmp_path / "last.ckpt")  # callbacks hold dirpath /home/u/run/ckpts
    r = run("convert", ckpt, tmp_path / "w.h5")
    assert r.returncode == 0, r.stderr
    assert b"/home/u" not in (tmp_path / "w.h5").read_bytes()
    with h5py.File(tmp_path / "w.h5", "r") as f:
        vals = {k: f.attrs[k] for k in f.attrs}
    dirpath = [v for k, v in vals.items() if k.endswith("/dirpath")]
    assert dirpath == ["<redacted>/ckpts"]
    assert vals["epoch"] == "1"


def test_training_note_says_keys_were_renamed(tmp_path):
    ckpt = lightning_like(tmp_path / "last.ckpt")
    r = run("convert", ckpt, tmp_path / "w.safetensors", "--strip-prefix", "model.")
    assert r.returncode == 0, r.stderr
    assert "original keys" not in r.stderr
    assert "with their keys renamed (3 of 3 changed by --strip-prefix/--rename/--add-prefix)" in r.stderr
    r = run("convert", ckpt, tmp_path / "v.safetensors")
    assert "with their original keys" in r.stderr
