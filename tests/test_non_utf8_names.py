"""A tensor whose name is not valid UTF-8 (HDF5 stores names as bytes; a pickle string can be
anything): the formats that keep names as UTF-8 JSON (a safetensors header, a shard index) and
h5py's writer cannot store it. convert refuses before writing anything, in one line naming the
tensor; a single .pt keeps the name, and torch reads it back."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

BAD = "w\udcff"  # how a raw byte 0xff in a name reads in Python (surrogateescape)


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in" / "model.h5"
    p.parent.mkdir()
    with h5py.File(p, "w") as f:
        f.create_dataset(b"w\xff", data=np.arange(4, dtype=np.float32))
        f.create_dataset("ok", data=np.arange(3, dtype=np.float32))
    return p


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C.UTF-8")
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", "convert", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("dst", "extra", "where"),
    [
        ("out.safetensors", [], "a safetensors header"),
        ("out.h5", [], "an HDF5 file written through h5py"),
        ("shards", ["--max-shard-size", "16B", "--to", "torch"], "the shard index pytorch_model.bin.index.json"),
    ],
)
def test_a_name_that_is_not_utf8_is_refused_before_anything_is_written(src, tmp_path, dst, extra, where):
    before = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    r = _convert(str(src), str(out / dst), *extra)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: tensor 'w\\udcff' has a name that is not valid UTF-8"), lines[0]
    assert where in lines[0] and "one .pt file keeps it" in lines[0]
    assert os.listdir(out) == []  # no output, no staging folder
    assert src.read_bytes() == before


def test_one_pt_file_keeps_the_name_and_torch_reads_it_back(src, tmp_path):
    dst = tmp_path / "out.pt"
    r = _convert(str(src), str(dst))
    assert r.returncode == 0, r.stderr
    sd = torch.load(dst, weights_only=True)
    assert sorted(sd) == sorted([BAD, "ok"])
    assert sd[BAD].numpy().tobytes() == np.arange(4, dtype=np.float32).tobytes()
    assert sd["ok"].numpy().tobytes() == np.arange(3, dtype=np.float32).tobytes()
