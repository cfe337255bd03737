"""`ckptctl average`: exact means against a float64 numpy reference, weights, EMA order, int
copying, preflight, provenance, run-folder selection, formats, atomic output."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from conftest import cli, run

from ckptctl.errors import CkptError
from ckptctl.formats import open_reader
from ckptctl.ops import average as ops
from ckptctl.ops import average_combine

HAVE_TORCH_READER = importlib.util.find_spec("ckptctl.formats.torch_zip") is not None
needs_torch_reader = pytest.mark.skipif(not HAVE_TORCH_READER, reason="torch zip reader not built yet")


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.array(v, copy=True, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def load(path):
    with open_reader(path) as r:
        return {t.name: r.read(t.name).copy() for t in r.info().tensors}, r.info()


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes()


def to_dtype(x64, dtype):
    """The reference's final cast: torch's rounding (float64 -> float32 -> 16/8-bit, RNE each)."""
    if dtype in (np.float64, np.float32):
        return x64.astype(dtype)
    return x64.astype(np.float32).astype(dtype)


def make_inputs(tmp_path, n=3, dtype=np.float32, seed=0, prefix="ck"):
    rng = np.random.default_rng(seed)
    paths, states = [], []
    for i in range(n):
        s = {
            "w": (rng.standard_normal((37, 11)) * (i + 1)).astype(dtype),
            "b": rng.standard_normal(5).astype(dtype),
            "s": np.asarray(rng.standard_normal(), dtype=dtype),
            "empty": np.zeros((0, 2), dtype),
            "count": np.array(100 * (i + 1), np.int64),
            "mask": rng.integers(0, 2, 6).astype(bool),
        }
        states.append(s)
        paths.append(save(tmp_path / f"{prefix}{i}.safetensors", s))
    return paths, states


def test_uniform_mean_is_bit_exact_against_float64_reference(tmp_path):
    paths, states = make_inputs(tmp_path)
    out = tmp_path / "avg.safetensors"
    r = cli("average", *paths, "-o", out)
    assert r.exit_code == 0, r.output
    got, info = load(out)
    for k in ("w", "b", "s", "empty"):
        acc = states[0][k].astype(np.float64)
        for s in states[1:]:
            acc = acc + s[k].astype(np.float64)
        exp = to_dtype(acc / 3, np.float32)
        assert got[k].dtype == np.float32 and got[k].shape == exp.shape
        assert bits(got[k]) == bits(exp), k
    # integer and bool tensors: copied from the last input, and the summary says so
    assert bits(got["count"]) == bits(states[-1]["count"])
    assert bits(got["mask"]) == bits(states[-1]["mask"])
    assert "copied from the last input" in r.stdout and "count" in r.stdout


def test_bf16_and_float16_inputs_and_dtype_option(tmp_path):
    paths, states = make_inputs(tmp_path, n=4, dtype=ml_dtypes.bfloat16)
    out = tmp_path / "avg.safetensors"
    assert cli("average", *paths, "-o", out).exit_code == 0
    got, _ = load(out)
    acc = sum((s["w"].astype(np.float64) for s in states[1:]), states[0]["w"].astype(np.float64))
    exp = to_dtype(acc / 4, ml_dtypes.bfloat16)
    assert got["w"].dtype == ml_dtypes.bfloat16 and bits(got["w"]) == bits(exp)
    # --dtype casts the floating tensors only
    out2 = tmp_path / "avg16.safetensors"
    assert cli("average", *paths, "-o", out2, "--dtype", "fp16").exit_code == 0
    got2, _ = load(out2)
    assert got2["w"].dtype == np.float16 and bits(got2["w"]) == bits(to_dtype(acc / 4, np.float16))
    assert got2["count"].dtype == np.int64
    # float32 accumulation
    out3 = tmp_path / "avg32.safetensors"
    assert cli("average", *paths, "-o", out3, "--accumulate", "fp32").exit_code == 0
    got3, _ = load(out3)
    acc32 = states[0]["w"].astype(np.float32)
    for s in states[1:]:
        acc32 = acc32 + s["w"].astype(np.float32)
    assert bits(got3["w"]) == bits((acc32 / np.float32(4)).astype(ml_dtypes.bfloat16))


def test_weighted_mean(tmp_path):
    paths, states = make_inputs(tmp_path)
    out = tmp_path / "w.safetensors"
    ws = [0.2, 0.3, 0.5]
    r = cli("average", *paths, "-o", out, "--weights", "0.2,0.3,0.5")
    assert r.exit_code == 0, r.output
    got, _ = load(out)
    acc = ws[0] * states[0]["w"].astype(np.float64)
    for w, s in zip(ws[1:], states[1:]):
        acc = acc + w * s["w"].astype(np.float64)
    exp = to_dtype(acc / math.fsum(ws), np.float32)
    assert bits(got["w"]) == bits(exp)
    uniform = to_dtype(sum(s["w"].astype(np.float64) for s in states) / 3, np.float32)
    assert bits(got["w"]) != bits(uniform)
    # unnormalised weights give the same mean
    out2 = tmp_path / "w2.safetensors"
    assert cli("average", *paths, "-o", out2, "--weights", "2,3,5").exit_code == 0
    got2, _ = load(out2)
    np.testing.assert_allclose(got2["w"], got["w"], rtol=1e-6)
    for bad in ("0.5,0.5", "1,-1,0", "a,b,c"):
        p = run("average", *paths, "-o", tmp_path / "x.safetensors", "--weights", bad)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_ema_runs_in_step_order(tmp_path):
    rng = np.random.default_rng(7)
    states = {}
    for step in (100, 200, 300):
        states[step] = {"w": rng.standard_normal(50).astype(np.float32)}
        save(tmp_path / f"step_{step}.safetensors", states[step])
    given = [tmp_path / "step_300.safetensors", tmp_path / "step_100.safetensors", tmp_path / "step_200.safetensors"]
    out = tmp_path / "ema.safetensors"
    r = cli("average", *given, "-o", out, "--ema", "0.9")
    assert r.exit_code == 0, r.output
    assert "step order" in r.stderr

    def ema(order):
        acc = states[order[0]]["w"].astype(np.float64)
        for s in order[1:]:
            acc = acc * 0.9 + states[s]["w"].astype(np.float64) * (1 - 0.9)
        return to_dtype(acc, np.float32)

    got, info = load(out)
    assert bits(got["w"]) == bits(ema([100, 200, 300]))
    assert bits(got["w"]) != bits(ema([300, 100, 200]))
    assert json.loads(info.metadata["averaged.steps"]) == [100, 200, 300]
    w = json.loads(info.metadata["averaged.weights"])
    assert w == pytest.approx([0.81, 0.09, 0.1]) and info.metadata["averaged.method"] == "ema decay=0.9"
    for bad in ("1", "0", "1.5"):
        assert cli("average", *given, "-o", tmp_path / "x.safetensors", "--ema", bad).exit_code == 2


def test_provenance_is_visible_through_inspect(tmp_path):
    paths, _ = make_inputs(tmp_path)
    out = tmp_path / "avg.safetensors"
    assert cli("average", *paths, "-o", out, "--weights", "1,1,2").exit_code == 0
    doc = json.loads(cli("inspect", out, "--format", "json").stdout)
    meta = doc["metadata"]
    assert meta["averaged.method"] == "weighted"
    assert json.loads(meta["averaged.inputs"]) == [str(p) for p in paths]
    assert json.loads(meta["averaged.weights"]) == [0.25, 0.25, 0.5]
    assert json.loads(meta["averaged.raw_weights"]) == [1, 1, 2]
    assert meta["averaged.accumulate"] == "float64"
    assert "2 integer/bool tensors copied from" in meta["averaged.copied"]


def test_preflight_reports_every_mismatch_and_writes_nothing(tmp_path):
    a = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)}
    b = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float16), "y": np.zeros(1, np.float32)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    out = tmp_path / "out.safetensors"
    p = run("average", pa, pb, "-o", out)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    err = p.stderr
    assert "x: missing in" in err and "y: only in" in err
    assert "w: shape [2, 3]" in err and "[3, 2]" in err
    assert "b: dtype float32" in err and "float16" in err
    assert err.strip().splitlines()[-1].startswith("error:") and "nothing written" in err
    assert not out.exists()
    assert [f.name for f in tmp_path.iterdir()] and not any("tmp" in f.name for f in tmp_path.iterdir())


def test_output_is_atomic_and_needs_force(tmp_path):
    paths, _ = make_inputs(tmp_path)
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"keep me")
    p = run("average", *paths, "-o", out)
    assert p.returncode == 1 and "--force" in p.stderr and out.read_bytes() == b"keep me"
    assert cli("average", *paths, "-o", out, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"
    # an input that turns out short mid-stream: the error is clean and nothing is left behind
    data = paths[1].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data)
    out2 = tmp_path / "avg2.safetensors"
    plan = ops.plan_average([paths[0], broken, paths[2]], out2)  # headers valid when planned
    with open(broken, "r+b") as f:
        f.truncate(len(data) - 8)
    with pytest.raises(CkptError, match="ends|truncated"):
        ops.run_average(plan)
    assert not out2.exists()
    assert not [f for f in os.listdir(tmp_path) if "ckptctl-tmp" in f]
    # the output may not be one of the inputs
    p = run("average", *paths, "-o", paths[0], "--force")
    assert p.returncode == 2 and "inputs" in p.stderr


def test_run_folder_selection(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    rng = np.random.default_rng(11)
    states = {}
    losses = {100: 0.9, 200: 0.5, 300: 0.7, 400: 0.4, 500: 0.8}
    for step, loss in losses.items():
        states[step] = {"w": rng.standard_normal(20).astype(np.float32)}
        save(rd / f"step_{step}.safetensors", states[step], {"eval_loss": str(loss)})

    def mean(steps):
        acc = states[steps[0]]["w"].astype(np.float64)
        for s in steps[1:]:
            acc = acc + states[s]["w"].astype(np.float64)
        return to_dtype(acc / len(steps), np.float32)

    cases = [
        (["--last", "2"], [400, 500]),
        (["--steps", "300,100"], [100, 300]),
        (["--best-n", "2", "--metric", "eval_loss"], [200, 400]),
        (["--best-n", "2"], [200, 400]),  # the only metric there is
        (["--best-n", "2", "--metric", "eval_loss", "--maximize"], [100, 500]),
        ([], [100, 200, 300, 400, 500]),
    ]
    for args, steps in cases:
        out = tmp_path / "avg.safetensors"
        r = cli("average", rd, *args, "-o", out, "--force", "-f", "json")
        assert r.exit_code == 0, (args, r.output)
        doc = json.loads(r.stdout)
        assert [i["step"] for i in doc["inputs"]] == steps, args
        got, info = load(out)
        assert bits(got["w"]) == bits(mean(steps)), args
        assert json.loads(info.metadata["averaged.steps"]) == steps
    for args in (["--steps", "150"], ["--best-n", "2", "--metric", "accuracy"]):
        p = run("average", rd, *args, "-o", tmp_path / "x.safetensors")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    p = run("average", rd / "step_100.safetensors", "--last", "2", "-o", tmp_path / "x.safetensors")
    assert p.returncode == 2
    p = run("average", rd / "step_100.safetensors", "-o", tmp_path / "x.safetensors")
    assert p.returncode == 2 and "at least two" in p.stderr


def test_streaming_in_small_chunks_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(average_combine, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(average_combine, "READ_BUDGET", 4000)
    monkeypatch.setattr(average_combine, "BLOCK", 256)
    rng = np.random.default_rng(2)
    states = [
        {
            "w": rng.standard_normal(12_345).astype(np.float32),
            "h": rng.standard_normal(3_001).astype(ml_dtypes.bfloat16),
        }
        for _ in range(3)
    ]
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states)]
    plan = ops.plan_average(paths, tmp_path / "o.safetensors")
    seen = []
    ops.run_average(plan, seen.append)
    assert sum(seen) == sum(s["w"].nbytes + s["h"].nbytes for s in states)
    got, _ = load(tmp_path / "o.safetensors")
    for k, dt in (("w", np.float32), ("h", ml_dtypes.bfloat16)):
        acc = states[0][k].astype(np.float64) + states[1][k].astype(np.float64) + states[2][k].astype(np.float64)
        assert bits(got[k]) == bits(to_dtype(acc / 3, dt)), k


def test_output_formats_h5_and_pt(tmp_path):
    paths, states = make_inputs(tmp_path)
    exp = to_dtype(sum(s["w"].astype(np.float64) for s in states) / 3, np.float32)
    h5 = tmp_path / "avg.h5"
    r = cli("average", *paths, "-o", h5)
    assert r.exit_code == 0, r.output
    got, info = load(h5)
    assert info.format == "hdf5" and bits(got["w"]) == bits(exp)
    assert info.metadata.get("averaged.method") == "mean"
    pt = tmp_path / "avg.pt"
    r = cli("average", *paths, "-o", pt)
    assert r.exit_code == 0, r.output
    assert "no file metadata" in r.stderr
    import torch

    sd = torch.load(pt, weights_only=True)
    assert bits(sd["w"].numpy()) == bits(exp)
    assert sd["count"].item() == 300
    assert cli("average", *paths, "-o", tmp_path / "avg.txt").exit_code == 2


@needs_torch_reader
def test_lightning_checkpoints_average_their_model_weights(tmp_path):
    import torch

    states = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {"layer.weight": torch.randn(4, 3, generator=g), "bn.num_batches_tracked": torch.tensor(10 * (i + 1))}
        emb = torch.randn(6, 2, generator=g)
        sd["emb.weight"] = emb
        sd["head.weight"] = emb  # tied
        ckpt = {
            "epoch": i,
            "global_step": 100 * (i + 1),
            "state_dict": sd,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4, 3, generator=g)}}, "param_groups": []}],
        }
        torch.save(ckpt, tmp_path / f"epoch={i}-step={100 * (i + 1)}.ckpt")
        states.append(sd)
    out = tmp_path / "avg.safetensors"
    r = cli("average", tmp_path, "-o", out)
    assert r.exit_code == 0, r.output
    assert "model weights under state_dict/" in r.stderr
    got, info = load(out)
    assert sorted(got) == ["bn.num_batches_tracked", "emb.weight", "head.weight", "layer.weight"]
    acc = sum(s["layer.weight"].double().numpy() for s in states[1:]) + states[0]["layer.weight"].double().numpy()
    assert bits(got["layer.weight"]) == bits(to_dtype(acc / 3, np.float32))
    assert bits(got["head.weight"]) == bits(got["emb.weight"])
    assert got["bn.num_batches_tracked"].item() == 30
    assert json.loads(info.metadata["averaged.steps"]) == [100, 200, 300]
    # the .pt output keeps the tie
    r = cli("average", tmp_path / "epoch=0-step=100.ckpt", tmp_path / "epoch=1-step=200.ckpt", "-o", tmp_path / "a.pt")
    assert r.exit_code == 0, r.output
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    # --key picks another part
    r = cli(
        "average",
        tmp_path / "epoch=0-step=100.ckpt",
        tmp_path / "epoch=1-step=200.ckpt",
        "-o",
        tmp_path / "opt.safetensors",
        "--key",
        "optimizer_states",
    )
    assert r.exit_code == 0, r.output
    assert list(load(tmp_path / "opt.safetensors")[0]) == ["0/state/0/exp_avg"]


def test_dry_run_writes_nothing(tmp_path):
    paths, _ = make_inputs(tmp_path)
    out = tmp_path / "avg.safetensors"
    r = cli("average", *paths, "-o", out, "--dry-run")
    assert r.exit_code == 0 and "dry run" in r.stdout and not out.exists()


def test_help():
    r = cli("average", "--help")
    assert r.exit_code == 0 and "--ema" in r.stdout and "--best-n" in r.stdout


def test_items_ahead_across_tensors_match_reference(tmp_path, monkeypatch):
    """Item workers combine later tensors while earlier ones are written: many tensors of a few
    items each, integer tensors (copied) in between, every output byte as the float64 reference."""
    monkeypatch.setattr(average_combine, "ITEM_BUDGET", 3 * 4 * 700)  # ~700 elements per item
    monkeypatch.setattr(average_combine, "BLOCK", 128)
    monkeypatch.setattr(average_combine, "AHEAD_ITEMS", 5)
    rng = np.random.default_rng(5)
    names = [f"layer{i}.w" for i in range(15)]
    states = []
    for k in range(3):
        st = {n: rng.standard_normal(1_000 + 311 * i).astype(np.float32) for i, n in enumerate(names)}
        st["layer7.steps"] = np.array([k, 10 + k], dtype=np.int64)
        states.append(st)
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states)]
    r = cli("average", *paths, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.output
    got, _ = load(tmp_path / "o.safetensors")
    for n in names:
        acc = states[0][n].astype(np.float64) + states[1][n].astype(np.float64) + states[2][n].astype(np.float64)
        assert bits(got[n]) == bits(to_dtype(acc / 3, np.float32)), n
    assert got["layer7.steps"].tolist() == [2, 12]


@pytest.mark.parametrize("weights", [None, "1,1"])
def test_a_16_bit_output_rounds_through_float32_like_torch(tmp_path, weights):
    """The mean of float64 inputs written as float16 rounds twice, float64 -> float32 -> float16,
    as torch's `.to(float16)` does: 1 + 2^-11 + 2^-40 becomes 1 + 2^-11 in float32, a tie that
    goes to even (1.0), where one rounding straight to float16 would give 1 + 2^-10. (The
    division may write a float32 or float64 output itself; a 16-bit one must not skip the step.)"""
    torch = pytest.importorskip("torch")
    a = np.array([1 + 2**-11, 3.0, -(1 + 2**-11)] * 50_000, np.float64)  # past one block
    b = np.array([1 + 2**-11 + 2**-39, 5.0, -(1 + 2**-11 + 2**-39)] * 50_000, np.float64)
    paths = [save(tmp_path / "a.safetensors", {"w": a}), save(tmp_path / "b.safetensors", {"w": b})]
    out = tmp_path / "avg.safetensors"
    extra = ["--weights", weights] if weights else []
    r = cli("average", *paths, "-o", out, "--dtype", "fp16", *extra)
    assert r.exit_code == 0, r.output
    got, _ = load(out)
    exp = torch.from_numpy((a + b) / 2).to(torch.float16).numpy()
    assert exp[0] == 1.0 and exp[2] == -1.0  # the tie went to even
    assert got["w"].dtype == np.float16 and bits(got["w"]) == bits(exp)
