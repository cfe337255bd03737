"""Issue 16 point 7: `convert --all` to .h5 and back is lossless on real training checkpoints.

Names HDF5 cannot hold as they are (Lightning callback state keyed by an absolute path, `.`/`..`
parts, a name that is also another's group) are mapped reversibly by the writer and mapped back
by the reader; a conversion that leaves tensors out says so in its final line. Every tensor is
checked against torch's own reading of the source and h5py/torch/safetensors reading the output.
"""

from __future__ import annotations

import pickle
import re
import types

import h5py
import numpy as np
import pytest
import torch
from conftest import REAL, run
from safetensors import safe_open

LIGHTNING = sorted((REAL / "lightning").glob("*.ckpt")) if (REAL / "lightning").is_dir() else []


# ---- torch's reading of a checkpoint (trusted test fixtures only; the product never does this) -----
class _Stub(dict):
    """Any class outside torch/numpy/builtins: its pickled state becomes dict items."""

    def __new__(cls, *a, **k):
        return dict.__new__(cls)

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, st):
        for part in st if isinstance(st, tuple) else (st,):
            if isinstance(part, dict):
                self.update(part)


class _Unpickler(pickle.Unpickler):
    def find_class(self, mod, name):
        if mod.split(".")[0] in ("torch", "collections", "numpy", "builtins", "_codecs"):
            try:
                return super().find_class(mod, name)
            except (AttributeError, ImportError):
                pass
        return type(name, (_Stub,), {})


_STUB_PICKLE = types.ModuleType("stub_pickle")
_STUB_PICKLE.Unpickler = _Unpickler
_STUB_PICKLE.load = pickle.load


def torch_tensors(path, weights_only=True) -> dict[str, bytes]:
    """'/'-joined name -> raw bytes of every tensor (and numpy array), as torch.load reads them."""
    if weights_only:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    else:
        obj = torch.load(path, weights_only=False, pickle_module=_STUB_PICKLE, map_location="cpu")
    out: dict[str, bytes] = {}

    def walk(x, pre):
        if isinstance(x, torch.Tensor):
            out[pre] = x.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
        elif isinstance(x, np.ndarray):
            out[pre] = np.ascontiguousarray(x).tobytes()
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{pre}/{k}" if pre else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{pre}/{i}" if pre else str(i))

    walk(obj, "")
    return out


def h5_tensors(path) -> dict[str, bytes]:
    """Decoded name -> bytes, read with h5py, applying the documented escaping by hand."""
    out: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        escaped = f.attrs.get("ckptctl.name_escaping") == "percent"

        def visit(group, pre):  # every link (tied weights are hard links to one dataset)
            for k in group:
                obj, p = group[k], pre + k
                if isinstance(obj, h5py.Group):
                    visit(obj, p + "/")
                    continue
                name = (
                    "/".join(re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), q) for q in p.split("/"))
                    if escaped
                    else p
                )
                out[name] = np.ascontiguousarray(obj[()]).tobytes()

        visit(f, "")
    return out


def st_tensors(path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {
            k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if f.get_tensor(k).numel()
            else b""
            for k in f.keys()
        }


def pt_tensors(path) -> dict[str, bytes]:
    return torch_tensors(path, weights_only=True)


def lightning_like(path):
    """A torch-written training checkpoint with every kind of name HDF5 cannot hold as it is."""
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    ckpt = {
        "epoch": 1,
        "global_step": 20,
        "state_dict": {
            "model.layer.weight": w,
            "model.layer.bias": torch.randn(8),
            "model.head.weight": torch.randn(2, 8).to(torch.bfloat16),
        },
        "optimizer_states": [
            {
                "state": {
                    0: {"step": torch.tensor(20.0), "exp_avg": torch.randn(8, 4), "exp_avg_sq": torch.rand(8, 4)}
                },
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            }
        ],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "best_k_models": {
                    "/home/u/run/ckpts/epoch=0-val_loss=0.87.ckpt": torch.tensor(0.87),
                    "/home/u/run/ckpts/epoch=1-val_loss=0.51.ckpt": torch.tensor(0.51),
                },
                "best_model_score": torch.tensor(0.51),
                "dirpath": "/home/u/run/ckpts",
            },
        },
        "odd": {
            ".": torch.ones(2),
            "..": torch.zeros(2),
            "100%": torch.ones(1),
            "a%2Fb": torch.ones(3),
            "x": torch.arange(3),
            "x/y": torch.arange(4),
            "trail/": torch.ones(1),
            "": {"e": torch.ones(1)},
        },
    }
    torch.save(ckpt, path)
    return path


def _last_line(r):
    return r.stderr.strip().splitlines()[-1]


def test_all_to_h5_and_back_is_lossless_torch_written(tmp_path):
    src = lightning_like(tmp_path / "last.ckpt")
    want = torch_tensors(src)
    assert (
        "callbacks/ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}/best_k_models/"
        "/home/u/run/ckpts/epoch=0-val_loss=0.87.ckpt"
        in want
        and "odd/x/y" in want
        and "odd/." in want
    )
    r = run("convert", src, tmp_path / "x.h5", "--all")
    assert r.returncode == 0, r.stderr
    assert h5_tensors(tmp_path / "x.h5") == want  # names mapped back by the documented rule, bytes equal
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f.attrs["ckptctl.name_escaping"] == "percent"
    for out, read in (("y.pt", pt_tensors), ("y.safetensors", st_tensors)):
        r = run("convert", tmp_path / "x.h5", tmp_path / out, "--all")
        assert r.returncode == 0, r.stderr
        assert read(tmp_path / out) == want, out
        assert "left out" not in r.stderr


def test_h5_back_without_all_says_what_it_left_out(tmp_path):
    src = lightning_like(tmp_path / "last.ckpt")
    want = torch_tensors(src)
    assert run("convert", src, tmp_path / "x.h5", "--all").returncode == 0
    r = run("convert", tmp_path / "x.h5", tmp_path / "w.safetensors")
    assert r.returncode == 0, r.stderr
    got = st_tensors(tmp_path / "w.safetensors")
    assert got == {k[len("state_dict/") :]: v for k, v in want.items() if k.startswith("state_dict/")}
    left = len(want) - len(got)
    last = _last_line(r)
    assert last.startswith(f"wrote {tmp_path / 'w.safetensors'}: 3 tensors")
    assert "verified 3 tensors bit-exact" in last
    assert (
        f"{left} tensors left out (optimizer state and the rest of the training checkpoint; --all to keep them)" in last
    ), last


def test_plain_names_are_written_unescaped(tmp_path):
    from safetensors.torch import save_file

    save_file({"a/b": torch.ones(2), "c%d": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    assert run("convert", tmp_path / "m.safetensors", tmp_path / "m.h5").returncode == 0
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert "ckptctl.name_escaping" not in f.attrs and "a/b" in f and "c%d" in f


@pytest.mark.skipif(not LIGHTNING, reason="../shared/fixtures/real/lightning is absent")
@pytest.mark.parametrize("ckpt", LIGHTNING, ids=[p.name for p in LIGHTNING])
def test_real_lightning_all_to_h5_and_back(tmp_path, ckpt):
    want = torch_tensors(ckpt, weights_only=False)
    assert any("best_k_models//" in n for n in want)  # a callback keyed by an absolute path
    # --raw-names: the pickle paths torch's own reading gives (modules kept in hyper_parameters would
    # otherwise get their state_dict names, issue 12); what is tested here is the HDF5 name mapping
    r = run("convert", ckpt, tmp_path / "x.h5", "--all", "--raw-names")
    assert r.returncode == 0, r.stderr
    assert h5_tensors(tmp_path / "x.h5") == want
    r = run("convert", tmp_path / "x.h5", tmp_path / "y.safetensors", "--all")
    assert r.returncode == 0, r.stderr
    assert st_tensors(tmp_path / "y.safetensors") == want
    r = run("convert", tmp_path / "x.h5", tmp_path / "z.pt", "--all")
    assert r.returncode == 0, r.stderr
    assert pt_tensors(tmp_path / "z.pt") == want
    # and without --all: the model weights, and the final line counts what was left out
    r = run("convert", tmp_path / "x.h5", tmp_path / "w.safetensors")
    assert r.returncode == 0, r.stderr
    got = st_tensors(tmp_path / "w.safetensors")
    assert got == {k[len("state_dict/") :]: v for k, v in want.items() if k.startswith("state_dict/")}
    assert f"; {len(want) - len(got)} tensors left out (optimizer state" in _last_line(r)
