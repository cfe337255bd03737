"""`ckptctl diff`: structure, exact statistics, NaN/Inf, tolerances, name alignment, formats, runs."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math

import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors.numpy)
import numpy as np
import pytest
from conftest import REAL, cli, needs_real, real_expected, real_manifest, real_params, run

from ckptctl.ops import diff as ops
from ckptctl.ops import diff_along, diff_values, stream

HAVE_TORCH_READER = importlib.util.find_spec("ckptctl.formats.torch_zip") is not None
needs_torch_reader = pytest.mark.skipif(not HAVE_TORCH_READER, reason="torch zip reader not built yet")


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.array(v, copy=True, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def ref_stats(a, b):
    """What diff must report, computed here with plain numpy float64 over both-finite pairs."""
    with np.errstate(all="ignore"):
        return _ref_stats(a, b)


def _ref_stats(a, b):
    x = np.asarray(a).astype(np.float64).ravel()
    y = np.asarray(b).astype(np.float64).ravel()
    m = np.isfinite(x) & np.isfinite(y)
    x, y = x[m], y[m]
    d = x - y
    na, nb = np.linalg.norm(x), np.linalg.norm(y)
    return {
        "max_abs_diff": float(np.abs(d).max()) if d.size else 0.0,
        "mean_abs_diff": float(np.abs(d).mean()) if d.size else 0.0,
        "rel_l2": float(np.linalg.norm(d) / na),
        "cosine": float(x @ y / (na * nb)),
    }


def jdiff(*args):
    r = cli("diff", *args, "--format", "json")
    doc = json.loads(r.stdout)
    assert r.exit_code == (0 if doc["equal"] else 1), r.output  # the exit code is the verdict
    return r, doc


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a = {
        "enc.w": rng.standard_normal((64, 48)).astype(np.float32),
        "enc.b": rng.standard_normal(48).astype(np.float32),
        "emb": rng.standard_normal((30, 8)).astype(ml_dtypes.bfloat16),
        "steps": np.arange(12, dtype=np.int64),
        "mask": np.array([True, False, True, True]),
        "same": rng.standard_normal(100).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "to_half": rng.standard_normal(16).astype(np.float32),
        "reshaped": np.zeros((4, 6), np.float32),
        "gone": np.ones(5, np.float32),
    }
    b = {k: v.copy() for k, v in a.items() if k != "gone"}
    b["enc.w"] = a["enc.w"] * np.float32(1.001)
    b["enc.w"][3, 4] = np.nan
    b["enc.w"][5, 6] = np.inf
    b["enc.b"][7] += np.float32(0.5)
    b["emb"] = (a["emb"].astype(np.float32) + 0.25).astype(ml_dtypes.bfloat16)
    b["steps"][3] = 1000
    b["mask"][1] = True
    b["to_half"] = a["to_half"].astype(np.float16)
    b["reshaped"] = np.zeros((6, 4), np.float32)
    b["new"] = np.zeros(2, np.int32)
    pa = save(tmp_path / "a.safetensors", a, {"format": "pt", "lr": "0.1"})
    pb = save(tmp_path / "b.safetensors", b, {"format": "pt", "lr": "0.2"})
    return pa, pb, a, b


def test_json_reports_structure_and_exact_statistics(pair):
    pa, pb, a, b = pair
    r, doc = jdiff(pa, pb)
    assert r.exit_code == 1
    assert doc["only_in_a"] == ["gone"] and doc["only_in_b"] == ["new"]
    assert doc["num_identical"] == 3  # same, scalar, empty
    ch = {c["name"]: c for c in doc["changed"]}
    assert set(ch) == {"enc.w", "enc.b", "emb", "steps", "mask", "to_half", "reshaped"}
    for key in ("name", "dtype_a", "dtype_b", "shape_a", "shape_b", "max_abs_diff", "rel_l2", "cosine"):
        assert key in ch["enc.w"]
    for name in ("enc.w", "enc.b", "emb", "steps", "to_half"):
        exp = ref_stats(a[name], b[name])
        for k, v in exp.items():
            assert ch[name][k] == pytest.approx(v, rel=1e-12, abs=1e-15), (name, k)
    w = ch["enc.w"]
    assert (w["nan_a"], w["nan_b"], w["inf_a"], w["inf_b"]) == (0, 1, 0, 1)
    assert w["num_diff"] == int(np.count_nonzero(a["enc.w"].view(np.uint32) != b["enc.w"].view(np.uint32)))
    assert ch["enc.b"]["num_diff"] == 1 and ch["enc.b"]["max_abs_diff"] == pytest.approx(0.5, rel=1e-6)
    assert ch["emb"]["dtype_a"] == "bfloat16" and ch["emb"]["num_diff"] > 0
    assert ch["steps"]["num_diff"] == 1 and ch["steps"]["max_abs_diff"] == 997.0
    assert ch["mask"]["num_diff"] == 1
    assert ch["to_half"]["dtype_a"] == "float32" and ch["to_half"]["dtype_b"] == "float16"
    assert "dtype float32 -> float16" in ch["to_half"]["change"]
    assert ch["reshaped"]["shape_a"] == [4, 6] and ch["reshaped"]["max_abs_diff"] is None
    # structural first, then new NaN/Inf, then by relative change
    order = [c["name"] for c in doc["changed"]]
    assert order[0] == "reshaped" and order[1] == "enc.w"
    rels = [c["rel_l2"] for c in doc["changed"][2:]]
    assert rels == sorted(rels, reverse=True)
    meta = {m["key"]: m for m in doc["metadata_changes"]}
    assert meta["lr"]["a"] == "0.1" and meta["lr"]["b"] == "0.2" and "format" not in meta


def test_identical_files_exit_0_and_self_diff_needs_no_arithmetic(pair, monkeypatch):
    pa, _pb, _a, _b = pair
    calls = []
    monkeypatch.setattr(diff_values.Comparer, "_values", lambda self, *a: calls.append(a))
    r = cli("diff", pa, pa)
    assert r.exit_code == 0, r.output
    assert "equal (bit-exact)" in r.stdout
    assert calls == []  # identical bytes are identical without math


@pytest.mark.parametrize("threads", [1, 2])
def test_multi_chunk_streaming_matches_reference(tmp_path, monkeypatch, threads):
    """Small chunks: differences only in a late chunk use the identical chunks' norms too.

    threads=1 streams both sides in lockstep (re-reading an identical prefix); threads=2 cuts
    the tensors into items that workers read and compare on their own."""
    monkeypatch.setattr(diff_values, "READ_BYTES", 4096)
    monkeypatch.setattr(diff_values, "ITEM_BYTES", 4096)
    monkeypatch.setattr(diff_values, "BLOCK", 256)
    init = diff_values.Comparer.__init__
    monkeypatch.setattr(diff_values.Comparer, "__init__", lambda self, *a, **k: init(self, *a, threads=threads))
    rng = np.random.default_rng(3)
    a = {
        "w": rng.standard_normal(10_000).astype(np.float32),
        "h": rng.standard_normal(5_003).astype(ml_dtypes.bfloat16),
        "c": (rng.standard_normal(777) + 1j * rng.standard_normal(777)).astype(np.complex64),
    }
    b = {k: v.copy() for k, v in a.items()}
    b["w"][9_000:9_010] += np.float32(1.0)  # chunks 0..8 identical, then a difference
    b["w"][9_500] = np.nan
    b["h"][5_000] = ml_dtypes.bfloat16(7.0)
    b["c"][700] += np.complex64(1 + 1j)
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    res = ops.diff_checkpoints(pa, pb)
    by = {d.name: d for d in res.changed}
    for name in ("w", "h"):
        exp = ref_stats(a[name], b[name])
        assert by[name].max_abs_diff == pytest.approx(exp["max_abs_diff"], rel=1e-12)
        assert by[name].rel_l2 == pytest.approx(exp["rel_l2"], rel=1e-9)
        assert by[name].cosine == pytest.approx(exp["cosine"], rel=1e-12)
    assert by["w"].num_diff == 11 and by["w"].nan_b == 1
    x, y = a["c"].astype(np.complex128), b["c"].astype(np.complex128)
    assert by["c"].rel_l2 == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(x), rel=1e-9)
    assert by["c"].num_diff == 1


def test_far_apart_and_zeroed_tensors(tmp_path):
    """Statistics that need no cancellation-prone shortcut: b = -a, b = 0, b unrelated to a."""
    rng = np.random.default_rng(4)
    a = {
        "neg": rng.standard_normal(1000).astype(np.float32),
        "zero": rng.standard_normal(50).astype(np.float32),
        "other": rng.standard_normal(3000).astype(np.float32),
        "near": rng.standard_normal(3000).astype(np.float32),
    }
    b = {
        "neg": -a["neg"],
        "zero": np.zeros(50, np.float32),
        "other": rng.standard_normal(3000).astype(np.float32),
        "near": a["near"] + rng.standard_normal(3000).astype(np.float32) * np.float32(1e-4),
    }
    by = {
        c["name"]: c
        for c in jdiff(save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b))[1]["changed"]
    }
    assert by["neg"]["cosine"] == pytest.approx(-1.0, abs=1e-12) and by["neg"]["rel_l2"] == pytest.approx(2.0)
    assert by["zero"]["cosine"] == 0.0 and by["zero"]["rel_l2"] == pytest.approx(1.0, abs=1e-12)
    for name in ("other", "near"):
        exp = ref_stats(a[name], b[name])
        assert by[name]["cosine"] == pytest.approx(exp["cosine"], rel=1e-12, abs=1e-13), name
        assert by[name]["rel_l2"] == pytest.approx(exp["rel_l2"], rel=1e-12), name
    assert 1 - by["near"]["cosine"] == pytest.approx(1 - ref_stats(a["near"], b["near"])["cosine"], rel=1e-6)


def test_tolerances_and_integers_stay_exact(tmp_path):
    a = {"f": np.array([1.0, 2.0, 3.0], np.float32), "i": np.array([1, 2, 3], np.int32)}
    b = {"f": np.array([1.0, 2.0 + 1e-4, 3.0], np.float32), "i": np.array([1, 2, 3], np.int32)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    assert cli("diff", pa, pb).exit_code == 1
    assert cli("diff", pa, pb, "--atol", "1e-3").exit_code == 0
    assert cli("diff", pa, pb, "--rtol", "1e-3").exit_code == 0
    assert cli("diff", pa, pb, "--atol", "1e-6").exit_code == 1
    b["i"][0] = 2
    pb = save(tmp_path / "b.safetensors", b)
    r, doc = jdiff(pa, pb, "--atol", "10")
    assert r.exit_code == 1 and [c["name"] for c in doc["changed"]] == ["i"]


def test_nan_equal_nan_and_signed_zero_is_a_bit_difference(tmp_path):
    a = {"x": np.array([np.nan, 0.0, 1.0], np.float32)}
    b = {"x": np.array([np.nan, -0.0, 1.0], np.float32)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    r, doc = jdiff(pa, pb)
    assert r.exit_code == 1 and doc["changed"][0]["num_diff"] == 1  # -0.0 differs bit for bit
    assert cli("diff", pa, pb, "--atol", "0").exit_code == 0  # but equal as a value, NaN == NaN


def test_no_values_is_structure_only(pair):
    pa, pb, _a, _b = pair
    r, doc = jdiff(pa, pb, "--no-values")
    assert doc["values_compared"] is False
    assert {c["name"] for c in doc["changed"]} == {"to_half", "reshaped"}
    assert all(c["max_abs_diff"] is None for c in doc["changed"])
    same = {"w": np.ones(3, np.float32)}
    other = {"w": np.zeros(3, np.float32)}
    d = pa.parent
    assert cli("diff", save(d / "s.safetensors", same), save(d / "o.safetensors", other), "--no-values").exit_code == 0


def test_prefix_hint_and_alignment(tmp_path):
    w = {"layer.weight": np.ones((2, 2), np.float32), "layer.bias": np.zeros(2, np.float32)}
    plain = save(tmp_path / "plain.safetensors", w)
    ddp = save(tmp_path / "ddp.safetensors", {"module." + k: v for k, v in w.items()})
    r = cli("diff", ddp, plain)
    assert r.exit_code == 1
    assert "--strip-prefix module." in r.stderr
    assert cli("diff", ddp, plain, "--strip-prefix", "module.").exit_code == 0
    lit = {"state_dict/" + k: v for k, v in w.items()}
    lit["optimizer_states/0/state/0/exp_avg"] = np.zeros(3, np.float32)
    ckpt = save(tmp_path / "lit.safetensors", lit)
    r, doc = jdiff(ckpt, plain)  # a training checkpoint: its model weights, by default
    assert r.exit_code == 0 and doc["hint"] is None
    assert doc["selection"]["a"]["root"] == "state_dict" and doc["selection"]["a"]["left_out"] == 1
    r, doc = jdiff(ckpt, plain, "--all")
    assert r.exit_code == 1 and "--key state_dict" in doc["hint"]
    r, doc = jdiff(ckpt, plain, "--key", "state_dict")
    assert r.exit_code == 0 and doc["key_a"] == "state_dict" and doc["key_b"] is None
    assert cli("diff", ckpt, plain, "--key", "nothing_here").exit_code == 2
    # a sub-tree and a prefix at once (a Lightning module holding `self.model`)
    lit2 = {"state_dict/model." + k: v for k, v in w.items()}
    lit2["optimizer_states/0/state/0/exp_avg"] = np.zeros(3, np.float32)
    ckpt2 = save(tmp_path / "lit2.safetensors", lit2)
    r, doc = jdiff(ckpt2, plain)
    assert doc["hint"].endswith("try --strip-prefix model.")
    r, doc = jdiff(ckpt2, plain, "--all")
    assert "--key state_dict --strip-prefix model." in doc["hint"]
    assert cli("diff", ckpt2, plain, "--strip-prefix", "model.").exit_code == 0
    assert cli("diff", ckpt2, plain, "--key", "state_dict", "--strip-prefix", "model.").exit_code == 0
    # HDF5-style paths: '/' read as '.'
    slash = save(tmp_path / "slash.safetensors", {k.replace(".", "/"): v for k, v in w.items()})
    r, doc = jdiff(plain, slash)
    assert "--rename '/=.'" in doc["hint"]
    assert cli("diff", plain, slash, "--rename", "/=.").exit_code == 0
    # unrelated names: no hint
    other = save(tmp_path / "other.safetensors", {"x": np.zeros(1, np.float32), "y": np.zeros(1, np.float32)})
    assert jdiff(plain, other)[1]["hint"] is None
    # both prefixes at once
    hf = save(tmp_path / "hf.safetensors", {"model." + k: v for k, v in w.items()})
    r, doc = jdiff(ddp, hf)
    assert "module." in doc["hint"] and "model." in doc["hint"]
    assert cli("diff", ddp, hf, "--strip-prefix", "module.", "--strip-prefix", "model.").exit_code == 0


def test_filter_restricts_the_comparison(pair):
    pa, pb, _a, _b = pair
    r, doc = jdiff(pa, pb, "--filter", "same", "--filter", "scalar")
    assert r.exit_code == 0 and doc["num_identical"] == 2


def test_hdf5_and_safetensors_of_the_same_weights_are_equal(tmp_path):
    import h5py

    rng = np.random.default_rng(5)
    w = {"dense/kernel": rng.standard_normal((5, 3)).astype(np.float32), "dense/bias": np.arange(3, dtype=np.int64)}
    h5 = tmp_path / "w.h5"
    with h5py.File(h5, "w") as f:
        for k, v in w.items():
            f.create_dataset(k, data=v)
    st = save(tmp_path / "w.safetensors", w)
    r, doc = jdiff(h5, st)
    assert r.exit_code == 0, doc
    assert doc["format_a"] == "hdf5" and doc["num_identical"] == 2


def test_sharded_folder_against_one_file(tmp_path):
    rng = np.random.default_rng(9)
    w = {f"layers.{i}.weight": rng.standard_normal((8, 8)).astype(np.float32) for i in range(4)}
    single = save(tmp_path / "model.safetensors", w)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(w)
    weight_map = {}
    for k, part in enumerate((names[:2], names[2:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save(shard_dir / fname, {n: w[n] for n in part})
        weight_map.update({n: fname for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(a.nbytes for a in w.values())}, "weight_map": weight_map})
    )
    r, doc = jdiff(shard_dir, single)
    assert r.exit_code == 0 and doc["format_a"] == "sharded" and doc["num_identical"] == 4
    changed = dict(w)
    changed["layers.3.weight"] = w["layers.3.weight"] * np.float32(2)
    save(shard_dir / "model-00002-of-00002.safetensors", {n: changed[n] for n in names[2:]})
    r, doc = jdiff(shard_dir, single)
    assert r.exit_code == 1 and [c["name"] for c in doc["changed"]] == ["layers.3.weight"]
    # A is 2w, B is w: |2w - w| / |2w| = 0.5, and they point the same way
    assert doc["changed"][0]["rel_l2"] == pytest.approx(0.5) and doc["changed"][0]["cosine"] == pytest.approx(1.0)


@needs_torch_reader
def test_pt_and_its_safetensors_conversion_compare_equal(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    emb = torch.randn(10, 4)
    sd = {
        "emb.weight": emb,
        "head.weight": emb,  # tied
        "ln.weight": torch.randn(4).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "fp8": torch.randn(6).to(torch.float8_e4m3fn),
        "view": torch.arange(20, dtype=torch.float32)[5:9],
    }
    pt = tmp_path / "m.pt"
    torch.save(sd, pt)
    st = tmp_path / "m.safetensors"
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, st)
    r = cli("diff", pt, st)
    assert r.exit_code == 0, r.output
    p = run("diff", pt, st)
    assert p.returncode == 0, p.stderr
    sd2 = dict(sd)
    sd2["view"] = sd["view"] + 1
    torch.save(sd2, tmp_path / "m2.pt")
    r, doc = jdiff(pt, tmp_path / "m2.pt")
    assert r.exit_code == 1 and [c["name"] for c in doc["changed"]] == ["view"]
    assert doc["changed"][0]["max_abs_diff"] == 1.0


def test_table_csv_markdown_outputs(pair):
    pa, pb, _a, _b = pair
    p = run("diff", pa, pb)
    assert p.returncode == 1
    assert "\x1b[" not in p.stdout
    lines = p.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "change"]
    first = [ln.split()[0] for ln in lines[2:9]]
    assert first[:2] == ["reshaped", "enc.w"]
    assert "gone" in p.stdout and "only in A" in p.stdout and "only in B" in p.stdout
    assert "3 identical tensors" in p.stdout and "different (bit-exact)" in p.stdout
    assert "metadata lr: 0.1 -> 0.2" in p.stdout
    rows = list(csv.DictReader(io.StringIO(cli("diff", pa, pb, "-f", "csv").stdout)))
    by = {r["name"]: r for r in rows}
    assert by["gone"]["change"] == "only in A" and by["new"]["change"] == "only in B"
    assert float(by["enc.b"]["max_abs_diff"]) == pytest.approx(0.5, rel=1e-6)
    md = cli("diff", pa, pb, "-f", "markdown").stdout
    assert md.startswith("| name") and "|---" in md.replace(":", "-")
    assert all(ln.count("|") == md.splitlines()[0].count("|") for ln in md.splitlines() if ln.startswith("|"))


def test_long_only_in_lists_are_cut_in_tables_but_not_in_json(tmp_path):
    a = {f"t{i:02d}": np.zeros(1, np.float32) for i in range(30)}
    a["shared"] = np.ones(2, np.float32)
    pa = save(tmp_path / "a.safetensors", a)
    pb = save(tmp_path / "b.safetensors", {"shared": np.ones(2, np.float32)})
    out = run("diff", pa, pb).stdout
    assert "t19" in out and "t20" not in out and "... 10 more" in out
    assert len(jdiff(pa, pb)[1]["only_in_a"]) == 30
    assert "t29" in cli("diff", pa, pb, "--show-identical").stdout
    assert "shared" in cli("diff", pa, pb, "--show-identical").stdout  # identical ones listed too
    out = run("-v", "diff", pa, pb).stdout  # -v: every name, identical ones not listed
    assert "t29" in out and "more" not in out and "shared" not in out.split("\n\n")[0]


def test_hostile_names_are_escaped(tmp_path):
    evil = "x\x1b[31mred"
    pa = save(tmp_path / "a.safetensors", {evil: np.zeros(2, np.float32)})
    pb = save(tmp_path / "b.safetensors", {evil: np.ones(2, np.float32)})
    p = run("diff", pa, pb)
    assert p.returncode == 1 and "\x1b" not in p.stdout and "\\x1b" in p.stdout


def test_errors_are_one_line_and_exit_2(tmp_path, pair):
    pa, _pb, _a, _b = pair
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pa.read_bytes()[:-10])
    for args in [(pa, tmp_path / "missing.safetensors"), (pa, bad), (pa,), (pa, pa, "--along"), (pa, "--along")]:
        p = run("diff", *args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # truncated in the data region: the header is valid but a tensor is cut short
    short = tmp_path / "short.safetensors"
    data = pa.read_bytes()
    short.write_bytes(data)
    with open(short, "r+b") as f:
        f.truncate(len(data) - 4)
    p = run("diff", pa, short)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_diff_of_safetensors_never_imports_torch(pair):
    import subprocess
    import sys

    pa, pb, _a, _b = pair
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom ckptctl.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['diff', {str(pa)!r}, {str(pb)!r}])\n"
        "assert r.exit_code == 1, r.output\nprint('torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_help_and_json_help_work():
    r = cli("diff", "--help")
    assert r.exit_code == 0 and "--along" in r.stdout and "--strip-prefix" in r.stdout


# ---- runs ------------------------------------------------------------------------------------------
def make_run(folder, steps, seed=0, nan_at=None, tweak=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = {
        "a.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "a.bias": rng.standard_normal(8).astype(np.float32),
        "count": np.array(0, np.int64),
    }
    states = {}
    for s in steps:
        w = {
            k: (
                v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01 * s / 100)
                if v.dtype == np.float32
                else np.asarray(v + 1)
            )
            for k, v in w.items()
        }
        if nan_at is not None and s >= nan_at:
            w["a.bias"] = w["a.bias"].copy()
            w["a.bias"][2] = np.nan
        if tweak and s in tweak:
            w = tweak[s](w)
        states[s] = w
        save(folder / f"step_{s}.safetensors", w)
    return states


def test_two_runs_align_by_step(tmp_path):
    make_run(tmp_path / "ra", [100, 200, 300, 400], seed=1)
    make_run(
        tmp_path / "rb",
        [100, 200, 300, 400],
        seed=1,
        tweak={300: lambda w: {**w, "a.bias": w["a.bias"] * np.float32(2)}},
    )
    (tmp_path / "rb" / "step_400.safetensors").unlink()
    save(tmp_path / "rb" / "step_500.safetensors", {"a.weight": np.zeros((16, 8), np.float32)})
    r = cli("diff", tmp_path / "ra", tmp_path / "rb", "-f", "json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    by = {s["step"]: s for s in doc["steps"]}
    assert sorted(by) == [100, 200, 300]
    assert by[100]["equal"] and by[200]["equal"] and not by[300]["equal"]
    assert by[300]["max_rel_l2_tensor"] == "a.bias" and by[300]["max_rel_l2"] == pytest.approx(1.0)
    assert by[300]["num_changed"] == 1
    assert doc["missing_in_b"] == [400] and doc["missing_in_a"] == [500]
    p = run("diff", tmp_path / "ra", tmp_path / "rb")
    assert p.returncode == 1
    assert "steps only in A: 400" in p.stdout and "steps only in B: 500" in p.stdout
    make_run(tmp_path / "rc", [100, 200], seed=2)
    make_run(tmp_path / "rd", [100, 200], seed=2)
    assert cli("diff", tmp_path / "rc", tmp_path / "rd").exit_code == 0
    p = run("diff", tmp_path / "ra", tmp_path / "ra" / "step_100.safetensors")
    assert p.returncode == 2 and "run folder" in p.stderr


def test_along_a_run(tmp_path, monkeypatch):
    states = make_run(tmp_path / "run", [10, 20, 30, 40, 50], seed=3, nan_at=40)
    monkeypatch.setattr(diff_along, "ALONG_CHUNK", 32)  # several chunks per tensor
    monkeypatch.setattr(diff_along, "BLOCK", 16)
    r = cli("diff", tmp_path / "run", "--along", "-f", "json")
    assert r.exit_code == 1, r.output  # a checkpoint holds NaN
    doc = json.loads(r.stdout)
    assert doc["first_nonfinite_step"] == 40 and doc["num_tensors"] == 2
    steps = doc["steps"]
    assert [s["step"] for s in steps] == [10, 20, 30, 40, 50]
    assert steps[0]["update_rel_l2"] is None
    assert steps[3]["num_nonfinite"] == 1 and steps[3]["nonfinite_tensors"] == ["a.bias"]

    def flat(s):
        return np.concatenate([states[s][k].astype(np.float64).ravel() for k in ("a.weight", "a.bias")])

    res = diff_along.along_run(tmp_path / "run")  # the numbers, as floats (NaN included)
    for i, s in enumerate([10, 20, 30, 40, 50]):
        got = res.steps[i]
        exp = np.linalg.norm(flat(s))
        if s >= 40:  # a NaN in the weights: the norm is NaN, never the norm of the rest
            assert np.isnan(exp) and math.isnan(got.weight_norm)
        else:
            assert got.weight_norm == pytest.approx(exp, rel=1e-12)
        if i:
            prev = flat([10, 20, 30, 40, 50][i - 1])
            exp = np.linalg.norm(flat(s) - prev) / np.linalg.norm(prev)
            if s >= 40:
                assert math.isnan(got.update_rel_l2) and math.isnan(got.update_norm)
            else:
                assert got.update_rel_l2 == pytest.approx(exp, rel=1e-9)
    p = run("diff", tmp_path / "run", "--along")
    assert p.returncode == 1 and "#" in p.stdout and "first NaN/Inf at step 40" in p.stdout
    make_run(tmp_path / "ok", [1, 2, 3], seed=4)
    p = run("diff", tmp_path / "ok", "--along")
    assert p.returncode == 0 and "no NaN/Inf" in p.stdout
    rows = list(csv.DictReader(io.StringIO(cli("diff", tmp_path / "ok", "--along", "-f", "csv").stdout)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]


def test_lockstep_reads_stay_bounded(tmp_path, monkeypatch):
    """No read asks for more than READ_BYTES, whatever the tensor size."""
    monkeypatch.setattr(diff_values, "READ_BYTES", 1 << 16)
    big = {"w": np.arange(100_000, dtype=np.float32)}
    pa, pb = save(tmp_path / "a.safetensors", big), save(tmp_path / "b.safetensors", {"w": big["w"] + 1})
    sizes = []
    real_pread = stream.ChunkSource._pread

    def spy(self, file, offset, length):
        for v in real_pread(self, file, offset, length):
            sizes.append(len(v))
            yield v

    monkeypatch.setattr(stream.ChunkSource, "_pread", spy)
    res = ops.diff_checkpoints(pa, pb)
    assert res.changed[0].max_abs_diff == 1.0
    assert sizes and max(sizes) <= 1 << 16 and sum(sizes) == 2 * 400_000


# ---- real files, each against a second real file with one known difference -------------------------
# How the second file is written, per real fixture: by the producer's own library (safetensors,
# torch.save of torch.load(weights_only=True), h5py in place on a copy) with bit 0 of one element's
# first byte flipped. Files torch will not load with weights_only (their pickles need lightning,
# argparse, numpy-scalar or TorchVersion globals) and files without tensors have no second file: listed with why.
REAL_DIFF = {
    **{
        k: "safetensors"
        for k in real_manifest()
        if k.startswith(("safetensors/", "safetensors_sharded/")) and k.endswith(".safetensors")
    },
    "torch_zip/caikit_tiny_bert_pytorch_model.bin": "torch",
    "torch_zip/caikit_tiny_t5_pytorch_model.bin": "torch",
    "torch_zip/candle_test.pt": "torch",
    "torch_zip/candle_test_with_key.pt": "torch",
    "torch_zip/candle_fortran_tensor_3d.pth": "torch",
    "torch_zip/picklescan_new_pytorch_model.bin": "torch",
    "torch_legacy/picklescan_distilbert_pytorch_model.bin": "torch",
    "tf_transformers_h5/caikit_tiny_bert_tf_model.h5": "h5py",
    "torch_zip/chemprop_v2_trained_on_cuda.pt": "skip: torch.load(weights_only=True) refuses lightning...AttributeDict",
    "torch_zip/chemprop_v1_regression_mol.pt": "skip: torch.load(weights_only=True) refuses argparse.Namespace",
    "lightning/chemprop_example_model_v2_regression_mol.ckpt": "skip: torch.load(weights_only=True) refuses numpy.core.multiarray.scalar",
    "lightning/pyannote_simple_model_on_speaker_diarization_task.ckpt": "skip: torch.load(weights_only=True) refuses torch.torch_version.TorchVersion",
}


def _flip(t):
    """A copy of tensor `t` with bit 0 of its first byte flipped (any dtype)."""
    import torch

    t = t.detach().clone().contiguous()
    t.view(-1).view(torch.uint8)[0] ^= 1
    return t


def _first_nonempty(d: dict) -> str:
    return next(k for k, v in d.items() if v.numel())


def _write_second_file(path, how: str, dst, change: bool):
    """`path` written again by its producer's library to `dst`, one element changed if `change`.
    Returns (old value, new value) of the changed element as float64 (or None)."""
    import shutil

    import torch

    if how == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        d = load_file(path)
        pair = None
        if change:
            k = _first_nonempty(d)
            old = d[k].reshape(-1)[0].double().item()
            d[k] = _flip(d[k])
            pair = (old, d[k].reshape(-1)[0].double().item())
        save_file(d, dst, metadata=meta)
        return pair
    if how == "torch":
        obj = torch.load(path, weights_only=True, map_location="cpu")
        if isinstance(obj, torch.Tensor):  # a bare tensor saved on its own
            obj = {"__bare__": obj}
        holder = obj
        while (
            not isinstance(holder, torch.Tensor)
            and isinstance(holder, dict)
            and not any(isinstance(v, torch.Tensor) and v.numel() for v in holder.values())
        ):
            holder = next(v for v in holder.values() if isinstance(v, dict))  # nested state dicts
        pair = None
        if change:
            k = next(k for k, v in holder.items() if isinstance(v, torch.Tensor) and v.numel())
            old = holder[k].reshape(-1)[0].double().item()
            holder[k] = _flip(holder[k])
            pair = (old, holder[k].reshape(-1)[0].double().item())
        torch.save(obj["__bare__"] if "__bare__" in obj else obj, dst)
        return pair
    if how == "h5py":
        import h5py

        shutil.copyfile(path, dst)
        if not change:
            return None
        with h5py.File(dst, "r+") as f:
            names = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.size else None)
            ds = f[names[0]]
            arr = ds[()]
            old = float(arr.reshape(-1)[0])
            arr.reshape(-1).view(np.uint8)[0] ^= 1
            ds[...] = arr
            return old, float(arr.reshape(-1)[0])
    raise AssertionError(how)


@pytest.mark.parametrize("rel", real_params(sorted(REAL_DIFF) if REAL.is_dir() else []), ids=str)
def test_real_file_against_a_second_file_with_one_change(tmp_path, rel):
    how = REAL_DIFF[rel]
    if how.startswith("skip:"):
        pytest.skip(how[5:].strip())
    path = REAL / rel
    n = int(real_expected()[rel]["inspect_tensors"])
    suffix = "".join(path.suffixes[-1:])
    same = tmp_path / f"same{suffix}"
    _write_second_file(path, how, same, change=False)
    r, doc = jdiff(path, same)
    assert r.exit_code == 0 and doc["equal"] and doc["num_identical"] == n and not doc["only_in_a"], doc

    other = tmp_path / f"other{suffix}"
    old, new = _write_second_file(path, how, other, change=True)
    r, doc = jdiff(path, other)
    assert r.exit_code == 1 and not doc["equal"]
    assert len(doc["changed"]) == 1 and doc["changed"][0]["num_diff"] == 1, doc["changed"]
    assert doc["num_identical"] == n - 1 and not doc["only_in_a"] and not doc["only_in_b"]
    got = doc["changed"][0]["max_abs_diff"]
    if math.isfinite(old) and math.isfinite(new) and not isinstance(got, str):
        assert got == pytest.approx(abs(new - old), rel=1e-12, abs=0)


@needs_real
def test_real_malformed_file_is_a_clean_error():
    bad = REAL / "safetensors_malformed" / "syoyo_abuse_attempt_1.safetensors"
    p = run("diff", bad, bad)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def flip_first_bit_copy(src, dst):
    """Every tensor of a real file, written again by safetensors with bit 0 of its first byte flipped."""
    from safetensors.torch import load_file, save_file

    d = load_file(src)
    flipped = {k: (_flip(v) if v.numel() else v) for k, v in d.items()}
    save_file(flipped, dst)
    return d, flipped


def _f64(t):
    import torch

    return (t.to(torch.uint8) if t.dtype == torch.bool else t).double().numpy()


@needs_real
def test_real_all_dtypes_file_against_a_bit_flipped_copy(tmp_path):
    src = REAL / "safetensors" / "fluxml_torch_alldtypes.safetensors"
    a_all, b_all = flip_first_bit_copy(src, tmp_path / "flipped.safetensors")
    r, doc = jdiff(src, tmp_path / "flipped.safetensors")
    assert r.exit_code == 1
    ch = {c["name"]: c for c in doc["changed"]}
    nonempty = [k for k, v in a_all.items() if v.numel()]
    assert set(ch) == set(nonempty)
    for name in nonempty:
        c = ch[name]
        assert c["num_diff"] == 1, name
        exp = ref_stats(_f64(a_all[name]), _f64(b_all[name]))  # values as safetensors/torch read them
        got = c["max_abs_diff"]
        if isinstance(got, str) or not np.isfinite(exp["max_abs_diff"]):
            continue  # a flipped bit can make a NaN; NaN pairs are left out of the statistics
        assert got == pytest.approx(exp["max_abs_diff"], rel=1e-12), name


@needs_real
def test_real_sharded_folder_against_a_copy_with_one_shard_changed(tmp_path):
    import shutil

    folder = REAL / "safetensors_sharded" / "fluxml"
    same = tmp_path / "same"
    shutil.copytree(folder, same)
    p = run("diff", folder, same, "--format", "json")
    assert p.returncode == 0 and json.loads(p.stdout)["num_identical"] == 36, p.stderr
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    shard = other / "model-00003-of-00006.safetensors"
    _write_second_file(folder / shard.name, "safetensors", shard, change=True)  # rewritten by safetensors
    p = run("diff", folder, other, "--format", "json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert len(doc["changed"]) == 1 and doc["changed"][0]["num_diff"] == 1 and doc["num_identical"] == 35


def test_item_workers_across_many_tensors_keep_each_tensors_verdict_and_tolerance(tmp_path, monkeypatch):
    """diff runs items of later tensors ahead while it merges earlier ones: each tensor must get
    its own statistics and its own --ignore-dtype cast tolerance, identical tensors in between
    stay arithmetic-free, and a tied pair reuses its twin's result."""
    monkeypatch.setattr(diff_values, "ITEM_BYTES", 4096)  # several items per tensor
    monkeypatch.setattr(diff_values, "BLOCK", 256)
    init = diff_values.Comparer.__init__
    monkeypatch.setattr(diff_values.Comparer, "__init__", lambda self, *a, **k: init(self, *a, threads=2))
    rng = np.random.default_rng(11)
    a, b = {}, {}
    for i in range(12):
        x = rng.standard_normal(3_000 + 97 * i).astype(np.float32)
        a[f"t{i:02d}"] = x
        y = x.copy()
        if i % 3 == 1:
            y[::7] += np.float32(0.01 * (i + 1))
        b[f"t{i:02d}"] = y
    # cast pairs: bf16 (eps 2**-7) and float16 (eps 2**-10) tolerances, side by side
    base = (rng.standard_normal(4_000) + 4).astype(np.float32)
    a["to_bf16"], b["to_bf16"] = base, base.astype(ml_dtypes.bfloat16)
    a["to_f16"] = base
    f16 = base.astype(np.float16)
    f16[1234] = np.float16(base[1234] * (1 + 2.0**-8))  # within bf16's tolerance, not float16's
    b["to_f16"] = f16
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    res = ops.diff_checkpoints(pa, pb, ignore_dtype=True)
    by = {d.name: d for d in res.changed}
    assert "to_bf16" not in by and [d.name for d in res.dtype_only] == ["to_bf16"]
    assert by["to_f16"].num_diff == 1 and by["to_f16"].rtol == 2.0**-10
    for i in range(12):
        n = f"t{i:02d}"
        if i % 3 != 1:
            assert n in res.identical
            continue
        exp = ref_stats(a[n], b[n])
        assert by[n].num_diff == len(range(0, a[n].size, 7))
        assert by[n].max_abs_diff == pytest.approx(exp["max_abs_diff"], rel=1e-12)
        assert by[n].rel_l2 == pytest.approx(exp["rel_l2"], rel=1e-9)
        assert by[n].cosine == pytest.approx(exp["cosine"], rel=1e-12)
