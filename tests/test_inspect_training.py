"""Issue 16 point 3 (inspect): a training checkpoint is inspected like convert/average take it.

The model weights by default, `--all` for everything, `--key` for a part; the totals then agree
with `ls` and with torch's own count of the state_dict; a line on stderr says what was left out.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REAL, run
from test_hdf5_roundtrip import _STUB_PICKLE, lightning_like

LIGHTNING = sorted((REAL / "lightning").glob("*.ckpt")) if (REAL / "lightning").is_dir() else []


def _distinct_numel(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            n += t.numel()
    return n


def _all_tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _all_tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _all_tensors(v, out)
    return out


def _json(*args):
    r = run(*args, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_inspect_agrees_with_ls_and_torch(tmp_path):
    src = lightning_like(tmp_path / "last.ckpt")
    ck = torch.load(src, weights_only=True)
    model = _distinct_numel(ck["state_dict"].values())
    everything = _all_tensors(ck, [])
    assert model < _distinct_numel(everything)  # the optimizer state is not small here

    doc, err = _json("inspect", src)
    assert doc["num_params"] == model
    assert doc["num_tensors"] == len(ck["state_dict"]) == len(doc["tensors"])
    assert doc["total_bytes"] == sum(t.numel() * t.element_size() for t in ck["state_dict"].values())
    assert {t["name"] for t in doc["tensors"]} == {f"state_dict/{k}" for k in ck["state_dict"]}
    assert err == (
        f"showing model weights under state_dict/: {len(ck['state_dict'])} of {len(everything)} "
        "tensors; --all for optimizer state and the rest\n"
    )
    rows, _ = _json("ls", src)
    assert rows[0]["num_params"] == doc["num_params"] and rows[0]["num_tensors"] == doc["num_tensors"]

    full, err = _json("inspect", src, "--all")
    assert err == "" and full["num_tensors"] == len(everything) == len(full["tensors"])
    assert full["num_params"] == _distinct_numel(everything)

    opt, _ = _json("inspect", src, "--key", "optimizer_states/0")
    assert {t["name"] for t in opt["tensors"]} == {
        f"optimizer_states/0/state/0/{k}" for k in ("step", "exp_avg", "exp_avg_sq")
    }
    assert opt["num_params"] == sum(t.numel() for t in ck["optimizer_states"][0]["state"][0].values())

    # the table says it too, and --filter works on names relative to the part
    r = run("inspect", src, "--filter", "model.layer.*")
    assert r.returncode == 0 and "of " in r.stdout and "model.layer.bias" in r.stdout
    assert "optimizer_states" not in r.stdout
    r = run("inspect", src, "--key", "nope")
    assert r.returncode == 1 and "no tensor under --key 'nope'" in r.stderr
    r = run("inspect", src, "--key", "state_dict", "--all")
    assert r.returncode == 2 and r.stderr == "error: --key and --all do not go together\n"


def test_plain_model_and_optimizer_dict(tmp_path):
    sd = {"enc.weight": torch.randn(4, 3), "enc.bias": torch.randn(4)}
    opt = {"state": {0: {"exp_avg": torch.randn(4, 3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"model": sd, "optimizer": opt, "epoch": 3}, tmp_path / "ckpt.pt")
    doc, err = _json("inspect", tmp_path / "ckpt.pt")
    assert doc["num_params"] == 16 and "showing model weights: 2 of 3 tensors" in err
    rows, _ = _json("ls", tmp_path / "ckpt.pt")
    assert rows[0]["num_params"] == 16


def test_plain_state_dict_is_unchanged(tmp_path):
    torch.save({"w": torch.ones(5), "b": torch.ones(2)}, tmp_path / "m.pt")
    doc, err = _json("inspect", tmp_path / "m.pt")
    assert err == "" and doc["num_params"] == 7 and doc["part"]["left_out"] == 0


@pytest.mark.skipif(not LIGHTNING, reason="../shared/fixtures/real/lightning is absent")
@pytest.mark.parametrize("ckpt", LIGHTNING, ids=[p.name for p in LIGHTNING])
def test_real_lightning_inspect_equals_ls_equals_torch(ckpt):
    ck = torch.load(ckpt, weights_only=False, pickle_module=_STUB_PICKLE, map_location="cpu")
    model = _distinct_numel(list(ck["state_dict"].values()))
    doc, err = _json("inspect", ckpt)
    rows, _ = _json("ls", ckpt)
    assert doc["num_params"] == rows[0]["num_params"] == model
    assert doc["num_tensors"] == len(ck["state_dict"])
    assert err.startswith(f"showing model weights under state_dict/: {len(ck['state_dict'])} of ")
