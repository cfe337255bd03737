"""Tests written for `tools/mutation.sh average` (docs/testing.md, "Mutation testing"): average's
weights (`parse_weights`, `_effective_weights`), the arithmetic (`Combiner`), the chunked stream
of tensors that are not one file range (`mean_chunks`) and the output checks (`_check_destination`,
`_same_file`).

In-process: `plan_average` / `run_average` and the CLI through CliRunner. Every output byte is
read back with safetensors/h5py and compared with a numpy reference computed here, in the order
of operations average documents (float64 or float32 accumulation, one cast at the end)."""

from __future__ import annotations

import math
import os

import h5py
import ml_dtypes
import numpy as np
import pytest
from conftest import cli

import ckptctl.cli.app  # noqa: F401  (imported at collection: mutmut forks each mutant's run from it)
from ckptctl.errors import Incompatible, UsageError
from ckptctl.ops import average as ops
from ckptctl.ops import average_combine


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.array(v, copy=True, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_h5(path, tensors, chunk=333):
    """HDF5 with gzip: a tensor is no single file range, so average streams it (mean_chunks)."""
    with h5py.File(path, "w") as f:
        for k, v in tensors.items():
            if v.size:
                f.create_dataset(k, data=v, chunks=(min(chunk, v.shape[0]),) + v.shape[1:], compression="gzip")
            else:
                f.create_dataset(k, data=v)
    return path


def load(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def bits(a) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def small_chunks(monkeypatch):
    """Blocks of 128 elements and chunks of a few blocks: every loop runs many times."""
    monkeypatch.setattr(average_combine, "BLOCK", 128)
    monkeypatch.setattr(average_combine, "CHUNK_ELEMS", 512)
    monkeypatch.setattr(average_combine, "READ_BUDGET", 3 * 2 * 4 * 384)
    monkeypatch.setattr(average_combine, "ITEM_BUDGET", 3 * 4 * 300)


def states(n=3, size=1_999, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.standard_normal(size) * (i + 1)).astype(dtype),
            "m": rng.standard_normal((40, 7)).astype(dtype),
            "e": np.zeros((0, 3), dtype),
        }
        for i in range(n)
    ]


def mean64(xs):
    acc = xs[0].astype(np.float64)
    for x in xs[1:]:
        acc = acc + x
    return acc / np.float64(len(xs))


# ---- weights ----------------------------------------------------------------------------------------
def test_parse_weights():
    assert ops.parse_weights("0.2, 0.3,0.5") == [0.2, 0.3, 0.5]
    assert ops.parse_weights("1,,2,") == [1.0, 2.0]
    assert ops.parse_weights("-1,3") == [-1.0, 3.0]
    for bad, why in (("a,b", "expected numbers separated by commas"), ("", "expected finite numbers")):
        with pytest.raises(UsageError) as e:
            ops.parse_weights(bad)
        assert e.value.message.startswith(f"--weights {bad!r}: {why}")
    for bad in ("1,nan", "inf,1", "1,-inf", ",,"):
        with pytest.raises(UsageError) as e:
            ops.parse_weights(bad)
        assert e.value.message == f"--weights {bad!r}: expected finite numbers"


def test_effective_weights_in_the_plan(tmp_path):
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states(4))]
    out = tmp_path / "o.safetensors"
    p = ops.plan_average(paths, out)
    assert p.weights == [0.25] * 4 and p.method == "mean"
    p.close()
    p = ops.plan_average(paths, out, weights=[1, 1, 2, 4])
    assert p.weights == [0.125, 0.125, 0.25, 0.5] and p.raw_weights == [1, 1, 2, 4] and p.method == "weighted"
    p.close()
    p = ops.plan_average(paths, out, ema=0.5)
    assert p.weights == [0.125, 0.125, 0.25, 0.5] and p.method == "ema" and p.decay == 0.5
    p.close()
    p = ops.plan_average(paths[:3], out, ema=0.9)
    assert p.weights == pytest.approx([0.81, 0.09, 0.1], rel=1e-15) and math.fsum(p.weights) == pytest.approx(1.0)
    p.close()
    # summed exactly (fsum): 1e16 + 1 - 1e16 is 1, not 0
    p = ops.plan_average(paths[:3], out, weights=[1e16, 1.0, -1e16])
    assert p.weights == [1e16, 1.0, -1e16]
    p.close()
    with pytest.raises(UsageError) as e:
        ops.plan_average(paths[:2], out, weights=[1.0, -1.0])
    assert e.value.message == "--weights add up to 0: a weighted mean needs a non-zero sum"
    assert not out.exists()


# ---- the arithmetic, bit for bit ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["h5", "safetensors"])
def test_mean_weighted_and_ema_bit_exact_in_many_chunks(tmp_path, monkeypatch, fmt):
    small_chunks(monkeypatch)
    sts = states(3)
    write = save_h5 if fmt == "h5" else save
    paths = [write(tmp_path / f"s{i}.{fmt}", s) for i, s in enumerate(sts)]
    out = tmp_path / "o.safetensors"
    seen: list[int] = []
    ops.run_average(ops.plan_average(paths, out), seen.append)
    got = load(out)
    for k in ("w", "m"):
        assert bits(got[k]) == bits(mean64([s[k] for s in sts]).astype(np.float32)), k
    assert got["e"].shape == (0, 3)
    assert sum(seen) == sum(s["w"].nbytes + s["m"].nbytes for s in sts)  # every input byte read once
    ws = [0.5, 1.5, 3.0]
    ops.run_average(ops.plan_average(paths, out, weights=ws, force=True))
    got = load(out)
    for k in ("w", "m"):
        acc = sts[0][k].astype(np.float64) * ws[0]
        for s, w in zip(sts[1:], ws[1:]):
            acc = acc + s[k].astype(np.float64) * w
        assert bits(got[k]) == bits((acc / 5.0).astype(np.float32)), k
    ops.run_average(ops.plan_average(paths, out, ema=0.75, force=True))
    got = load(out)
    for k in ("w", "m"):
        acc = sts[0][k].astype(np.float64)
        for s in sts[1:]:
            acc = acc * 0.75 + s[k].astype(np.float64) * 0.25
        assert bits(got[k]) == bits(acc.astype(np.float32)), k


def test_float32_accumulation_bit_exact(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    sts = states(3, seed=4)
    paths = [save_h5(tmp_path / f"s{i}.h5", s) for i, s in enumerate(sts)]
    out = tmp_path / "o.safetensors"
    f = np.float32
    ops.run_average(ops.plan_average(paths, out, accumulate="fp32"))
    got = load(out)
    acc = sts[0]["w"].copy()
    for s in sts[1:]:
        acc = acc + s["w"]
    assert bits(got["w"]) == bits(acc / f(3))
    ws = [0.1, 0.7, 0.2]
    ops.run_average(ops.plan_average(paths, out, weights=ws, accumulate="fp32", force=True))
    got = load(out)
    acc = sts[0]["w"] * f(ws[0])
    for s, w in zip(sts[1:], ws[1:]):
        acc = acc + s["w"] * f(w)
    assert bits(got["w"]) == bits(acc / f(math.fsum(ws)))
    ops.run_average(ops.plan_average(paths, out, ema=0.9, accumulate="fp32", force=True))
    got = load(out)
    acc = sts[0]["w"].copy()
    for s in sts[1:]:
        acc = acc * f(0.9) + s["w"] * f(1 - 0.9)
    assert bits(got["w"]) == bits(acc)


def test_half_precision_inputs_and_outputs(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    sts = states(4, seed=9, dtype=ml_dtypes.bfloat16)  # (HDF5 has no bfloat16: safetensors)
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(sts)]
    out = tmp_path / "o.safetensors"
    ops.run_average(ops.plan_average(paths, out))
    exp = mean64([s["w"] for s in sts])
    got = load(out)
    assert got["w"].dtype == ml_dtypes.bfloat16
    assert bits(got["w"]) == bits(exp.astype(np.float32).astype(ml_dtypes.bfloat16))
    ops.run_average(ops.plan_average(paths, out, dtype="fp16", force=True))
    got = load(out)
    assert got["w"].dtype == np.float16 and bits(got["w"]) == bits(exp.astype(np.float32).astype(np.float16))
    # float16 inputs streamed from HDF5, written as float16 and as float32
    sts = states(3, seed=10, dtype=np.float16)
    paths = [save_h5(tmp_path / f"h{i}.h5", s) for i, s in enumerate(sts)]
    ops.run_average(ops.plan_average(paths, out, force=True))
    exp = mean64([s["m"] for s in sts])
    assert bits(load(out)["m"]) == bits(exp.astype(np.float32).astype(np.float16))
    ops.run_average(ops.plan_average(paths, out, dtype="fp32", force=True))
    assert bits(load(out)["m"]) == bits(exp.astype(np.float32))


def test_complex_tensors_average_in_complex128(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    rng = np.random.default_rng(3)
    sts = [{"c": (rng.standard_normal(700) + 1j * rng.standard_normal(700)).astype(np.complex64)} for _ in range(3)]
    paths = [save_h5(tmp_path / f"s{i}.h5", s) for i, s in enumerate(sts)]
    out = tmp_path / "o.h5"
    ops.run_average(ops.plan_average(paths, out, weights=[1, 2, 3]))
    with h5py.File(out) as f:
        got = f["c"][()]
    acc = sts[0]["c"].astype(np.complex128) * 1.0
    for s, w in zip(sts[1:], (2.0, 3.0)):
        acc = acc + s["c"].astype(np.complex128) * w
    assert got.dtype == np.complex64 and bits(got) == bits((acc / 6.0).astype(np.complex64))


def test_tensors_of_one_block_or_less_and_odd_sizes(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    rng = np.random.default_rng(12)
    sizes = (1, 127, 128, 129, 511, 512, 513, 1537)
    sts = [{f"t{n}": rng.standard_normal(n).astype(np.float32) for n in sizes} for _ in range(2)]
    paths = [save_h5(tmp_path / f"s{i}.h5", s, chunk=100) for i, s in enumerate(sts)]
    out = tmp_path / "o.safetensors"
    ops.run_average(ops.plan_average(paths, out))
    got = load(out)
    for n in sizes:
        k = f"t{n}"
        assert bits(got[k]) == bits(mean64([s[k] for s in sts]).astype(np.float32)), k


# ---- the destination -------------------------------------------------------------------------------
def test_the_output_may_not_be_an_input_by_any_name(tmp_path):
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states(2))]
    before = [p.read_bytes() for p in paths]
    os.link(paths[0], tmp_path / "hard.safetensors")
    os.symlink(paths[1].name, tmp_path / "sym.safetensors")
    for dst in (paths[0], tmp_path / "hard.safetensors", tmp_path / "sym.safetensors", tmp_path / "." / paths[1].name):
        with pytest.raises(UsageError) as e:
            ops.plan_average(paths, dst, force=True)
        assert e.value.message == f"{dst} is one of the inputs; write the output elsewhere"
    # a shard of a sharded input, by a hard link
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save(shard_dir / "model-00001-of-00001.safetensors", states(1, seed=5)[0])
    (shard_dir / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors", '
        '"m": "model-00001-of-00001.safetensors", "e": "model-00001-of-00001.safetensors"}}'
    )
    os.link(shard_dir / "model-00001-of-00001.safetensors", tmp_path / "shard_link.safetensors")
    with pytest.raises(UsageError, match="is one of the inputs"):
        ops.plan_average([paths[0], shard_dir], tmp_path / "shard_link.safetensors", force=True)
    assert [p.read_bytes() for p in paths] == before
    r = cli("average", *paths, "-o", tmp_path / "hard.safetensors", "--force")
    assert r.exit_code == 2 and "is one of the inputs" in r.stderr
    assert paths[0].read_bytes() == before[0]


def test_a_new_output_next_to_the_inputs_is_fine(tmp_path):
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states(2))]
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.safetensors")
    plan = ops.plan_average(paths, tmp_path / "new.safetensors")  # samefile() of a missing file: no error
    plan.close()
    with pytest.raises(Incompatible) as e:
        ops.plan_average(paths, tmp_path / "dangling.safetensors")
    assert e.value.message == "already exists (--force to overwrite)"
    ops.run_average(ops.plan_average(paths, tmp_path / "dangling.safetensors", force=True))
    assert not (tmp_path / "dangling.safetensors").is_symlink() and (tmp_path / "dangling.safetensors").is_file()


def test_folders_and_missing_parents_are_refused(tmp_path):
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states(2))]
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError) as e:
        ops.plan_average(paths, tmp_path / "out", force=True, to="safetensors")
    assert e.value.message == (
        f"{tmp_path / 'out'} is a folder: give an output file such as {tmp_path / 'out' / 'averaged.safetensors'}"
    )
    with pytest.raises(Incompatible) as e:
        ops.plan_average(paths, tmp_path / "no" / "o.safetensors", force=True)
    assert e.value.message == f"folder {tmp_path / 'no'} does not exist"
    assert e.value.path == str(tmp_path / "no" / "o.safetensors")
    (tmp_path / "o.safetensors").write_bytes(b"old")
    with pytest.raises(Incompatible) as e:
        ops.plan_average(paths, tmp_path / "o.safetensors")
    assert e.value.message == "already exists (--force to overwrite)"
    assert e.value.path == str(tmp_path / "o.safetensors")
    assert (tmp_path / "o.safetensors").read_bytes() == b"old"
    ops.run_average(ops.plan_average(paths, tmp_path / "o.safetensors", force=True))
    assert set(load(tmp_path / "o.safetensors")) == {"w", "m", "e"}
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors", "out", "s0.safetensors", "s1.safetensors"]


def test_a_bucket_destination_gets_the_same_checks(tmp_path, monkeypatch):
    """s3:// output: the bucket is checked, and a folder or an existing object is refused as
    locally (the bucket's listing simulated in-process: no server, nothing uploaded)."""
    from ckptctl import sources
    from ckptctl.sources import RemotePath

    checked: list[str] = []
    objects = {"s3://b/exists.safetensors": "file", "s3://b/folder.safetensors": "directory"}
    monkeypatch.setattr(sources, "check_bucket", lambda p: checked.append(str(p)))
    monkeypatch.setattr(RemotePath, "is_file", lambda self: objects.get(self.url) == "file")
    monkeypatch.setattr(RemotePath, "is_dir", lambda self: objects.get(self.url) == "directory")
    paths = [save(tmp_path / f"s{i}.safetensors", s) for i, s in enumerate(states(2))]
    plan = ops.plan_average(paths, "s3://b/new.safetensors")
    assert checked == ["s3://b/new.safetensors"] and str(plan.dst) == "s3://b/new.safetensors"
    plan.close()
    with pytest.raises(UsageError) as e:
        ops.plan_average(paths, "s3://b/folder.safetensors", force=True)
    assert e.value.message == (
        "s3://b/folder.safetensors is a folder: give an output file such as s3://b/folder.safetensors/averaged.safetensors"
    )
    with pytest.raises(Incompatible) as e:
        ops.plan_average(paths, "s3://b/exists.safetensors")
    assert (
        e.value.message == "already exists (--force to overwrite)" and str(e.value.path) == "s3://b/exists.safetensors"
    )
    ops.plan_average(paths, "s3://b/exists.safetensors", force=True).close()
    assert checked[-1] == "s3://b/exists.safetensors"


def test_weights_with_spaces_inside_a_number():
    assert ops.parse_weights("1 000, 2") == [1000.0, 2.0]


def test_infinities_average_without_numpy_warnings(tmp_path, monkeypatch):
    """inf + -inf is NaN in the mean: said in the output's values, not as numpy RuntimeWarnings."""
    import warnings

    small_chunks(monkeypatch)
    a = {"w": np.array([np.inf, 1.0, np.inf, 3e38] * 100, np.float32)}
    b = {"w": np.array([-np.inf, 2.0, np.inf, 3e38] * 100, np.float32)}
    paths = [save_h5(tmp_path / "a.h5", a), save_h5(tmp_path / "b.h5", b)]
    out = tmp_path / "o.safetensors"
    for kw in ({}, {"weights": [1.0, 3.0]}, {"ema": 0.5}, {"accumulate": "fp32"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a RuntimeWarning from the arithmetic fails the test
            ops.run_average(ops.plan_average(paths, out, force=True, **kw))
        got = load(out)["w"].reshape(100, 4)
        assert np.isnan(got[:, 0]).all() and (got[:, 2] == np.inf).all(), kw
    assert load(out)["w"][3] == np.inf  # 3e38 + 3e38 overflows float32 in fp32 accumulation
