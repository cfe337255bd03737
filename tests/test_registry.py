"""The registry: a zip is parsed once (the sniffer hands the opened archive to the reader), every
file it opens is closed again, and FORMATS declares each format in one place."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from ckptctl import formats
from ckptctl.formats import FORMATS, READERS, WRITERS, open_reader, resolve, sniff

torch = pytest.importorskip("torch")


@pytest.fixture
def cd_reads(monkeypatch):
    """How many times a zip central directory is parsed."""
    from ckptctl.formats.zipdir import FastZipFile

    calls = []
    for cls in (zipfile.ZipFile, FastZipFile):  # ckptctl's one-pass reader, and zipfile's own (its fallback)
        real = cls.__dict__["_RealGetContents"]

        def counting(self, real=real):
            if not getattr(self, "_ckptctl_counted", False):  # the fallback inside FastZipFile's is one parse
                self._ckptctl_counted = True
                calls.append(1)
            return real(self)

        monkeypatch.setattr(cls, "_RealGetContents", counting)
    return calls


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pt(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}, p)
    return p


def _keras(tmp_path):
    from test_keras_zip import make_keras

    p = tmp_path / "m.keras"
    make_keras(p, {"layers/dense/vars/0": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return p


@pytest.mark.parametrize("make", [_pt, _keras], ids=["torch-zip", "keras"])
def test_the_central_directory_is_read_once_and_every_file_closed(tmp_path, cd_reads, make):
    p = make(tmp_path)
    before = _fds()
    with open_reader(p) as r:
        info = r.info()
        assert info.tensors
        first = info.tensors[0].name
        data = b"".join(bytes(c) for c in r.iter_chunks(first))
        assert len(data) == info.tensors[0].nbytes
    assert len(cd_reads) == 1
    assert _fds() == before


def test_torch_values_through_the_handed_over_archive(tmp_path):
    p = _pt(tmp_path)
    with open_reader(p) as r:
        got = np.frombuffer(b"".join(bytes(c) for c in r.iter_chunks("w")), dtype=np.float32)
    assert got.tolist() == list(np.arange(12.0))


@pytest.mark.parametrize("make", [_pt, _keras], ids=["torch-zip", "keras"])
def test_sniff_resolve_and_unused_readers_close_what_they_opened(tmp_path, make):
    p = make(tmp_path)
    before = _fds()
    assert sniff(p) in ("torch-zip", "keras")
    assert resolve(p)[1] == p
    open_reader(p).close()  # opened, never read
    fmt, target, opened = formats.resolve_opened(p)
    assert opened is not None
    formats.reader_for(fmt, target, opened).close()
    assert _fds() == before


def test_formats_declares_each_format_once():
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names)) == len(READERS)
    assert set(WRITERS) == {"safetensors", "torch-zip", "hdf5"}
    assert formats.SPECS["gguf"].magic == (b"GGUF",) and ".gguf" in formats.CHECKPOINT_SUFFIXES


def test_a_magic_declared_in_formats_is_sniffed(tmp_path):
    """GGUF and HDF5 are recognised by the magic their FormatSpec declares."""
    import h5py

    h = tmp_path / "x.weights"  # no telling suffix
    with h5py.File(h, "w") as f:
        f["a"] = np.zeros(3, np.float32)
    assert sniff(h) == "hdf5"
    g = tmp_path / "x.bin"
    g.write_bytes(b"GGUF" + b"\0" * 60)
    assert sniff(g) == "gguf"


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["archive/data.pkl", "archive/data/0", "archive/version"], "torch-zip"),
        (["data.pkl"], "torch-zip"),  # no top folder
        (["m/data.pkl", "m/constants.pkl"], "torchscript"),
        (["m/data.pkl", "m/code/__torch__.py"], "torchscript"),
        (["m/data.pkl", "m/code/deep/code/__torch__.py"], "torchscript"),
        (["m/data.pkl", "code/__torch__.py"], "torch-zip"),  # not `<folder>/code/...`
        (["m/constants.pkl", "m/code/__torch__.py"], "TorchScript archive without data.pkl"),
        (["a/b/data.pkl"], "not PyTorch's layout"),  # two folders deep: not the layout
        (["a/xdata.pkl"], "not PyTorch's layout"),
        (["a/b/data.pkl", "m/data.pkl"], "torch-zip"),  # a deep one first, then the real one
        (["a/data.pkl.bak"], "not a PyTorch checkpoint"),
        (["data.pkl.bak"], "not a PyTorch checkpoint"),
        (["x/y", "data.pkl.bak"], "not a PyTorch checkpoint"),
        (["config.json", "metadata.json", "model.weights.h5"], "keras"),
    ],
)
def test_zip_kind_by_member_names(tmp_path, names, kind):
    """What a zip is, from its member names alone (a torch.save archive: `<folder>/data.pkl`)."""
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w") as z:
        for n in names:
            z.writestr(n, b"")
    if kind in ("torch-zip", "torchscript", "keras"):
        assert sniff(p) == kind
    else:
        with pytest.raises(formats.UnknownFormat, match=kind):
            sniff(p)
