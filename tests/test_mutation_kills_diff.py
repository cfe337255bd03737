"""Tests written for `tools/mutation.sh diff` (docs/testing.md, "Mutation testing"): diff's verdict
and exit code (`tensor_identical`, `result_equal`), the per-tensor statistics (`TensorDiff.from_acc`),
`diff_checkpoints` and the streaming compare (`Comparer.compare`).

In-process only (the CLI through CliRunner, `diff_checkpoints`), on files written here with
safetensors, torch and h5py; statistics are checked against numpy computed here, never against
ckptctl itself."""

from __future__ import annotations

import math
import os

import h5py
import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors.numpy)
import numpy as np
import pytest
import torch  # imported at collection: mutmut forks each mutant's run from the collected process
from conftest import cli

import ckptctl.cli.app  # noqa: F401  (the same: the CLI imported once, not in every forked run)
from ckptctl.errors import UsageError
from ckptctl.ops import diff as ops
from ckptctl.ops import diff_values
from ckptctl.ops.diff_result import DiffResult, TensorDiff, result_equal, tensor_identical


def save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.array(v, copy=True, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_pt(path, tensors):
    torch.save(tensors, str(path))
    return path


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def threads(monkeypatch, n: int, block: int = 256, read_bytes: int = 4096) -> None:
    """Small blocks and chunks, and `n` worker threads, so small tensors take every path."""
    monkeypatch.setattr(diff_values, "READ_BYTES", read_bytes)
    monkeypatch.setattr(diff_values, "ITEM_BYTES", read_bytes)
    monkeypatch.setattr(diff_values, "BLOCK", block)
    init = diff_values.Comparer.__init__
    monkeypatch.setattr(diff_values.Comparer, "__init__", lambda self, *a, **k: init(self, *a, threads=n))


class Bar:
    """A progress_factory's bar: records the total, then every advance."""

    def __init__(self, total, seen):
        self.seen = seen
        seen.append(total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n):
        self.seen.append(n)


# ---- the verdict and the exit code -------------------------------------------------------------
def test_exit_code_is_1_for_each_kind_of_difference_alone(tmp_path):
    w = {"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int64)}
    base = save(tmp_path / "base.safetensors", w)
    same = save(tmp_path / "same.safetensors", w)
    assert cli("diff", base, same).exit_code == 0
    fewer = save(tmp_path / "fewer.safetensors", {"a": w["a"]})
    assert cli("diff", base, fewer).exit_code == 1  # only in A
    assert cli("diff", fewer, base).exit_code == 1  # only in B
    changed = save(tmp_path / "changed.safetensors", {"a": w["a"], "b": np.array([1, 1, 2], np.int64)})
    assert cli("diff", base, changed).exit_code == 1  # a value
    reshaped = save(tmp_path / "reshaped.safetensors", {"a": w["a"].reshape(2, 3), "b": w["b"]})
    assert cli("diff", base, reshaped).exit_code == 1  # a shape, same bytes
    assert cli("diff", base, reshaped, "--no-values").exit_code == 1
    cast = save(tmp_path / "cast.safetensors", {"a": w["a"].astype(np.float64), "b": w["b"]})
    assert cli("diff", base, cast).exit_code == 1  # a dtype, same values
    assert cli("diff", base, cast, "--ignore-dtype").exit_code == 0  # ... which --ignore-dtype forgives
    assert cli("diff", base, changed, "--no-values").exit_code == 0  # values not compared: not a difference


def test_the_verdict_functions_case_by_case():
    def td(**kw):
        base = dict(name="t", dtype_a="float32", dtype_b="float32", shape_a=(2,), shape_b=(2,))
        return TensorDiff(**{**base, **kw})

    assert tensor_identical(td()) is True
    assert tensor_identical(td(compared=True, num_diff=0)) is True
    assert tensor_identical(td(compared=True, num_diff=1)) is False
    assert tensor_identical(td(compared=False, num_diff=3)) is True  # --no-values: not looked at
    assert tensor_identical(td(shape_b=(3,))) is False
    assert tensor_identical(td(error="unreadable")) is False
    assert tensor_identical(td(dtype_b="float16")) is False
    assert tensor_identical(td(dtype_b="float16", ignore_dtype=True)) is False  # not compared: unknown
    assert tensor_identical(td(dtype_b="float16", compared=True, num_diff=0)) is False
    assert tensor_identical(td(dtype_b="float16", ignore_dtype=True, compared=True, num_diff=0)) is True
    assert tensor_identical(td(dtype_b="float16", ignore_dtype=True, compared=True, num_diff=2)) is False
    assert tensor_identical(td(dtype_b="float16", ignore_dtype=True, compared=True, shape_b=(1,))) is False
    r = DiffResult("a", "b", "safetensors", "safetensors", True, None, None)
    assert result_equal(r) is True and r.equal is True
    for field, value in (("only_in_a", ["x"]), ("only_in_b", ["y"]), ("changed", [td(num_diff=1, compared=True)])):
        r = DiffResult("a", "b", "safetensors", "safetensors", True, None, None, **{field: value})
        assert result_equal(r) is False and r.equal is False, field


# ---- per-tensor statistics ------------------------------------------------------------------------
def test_statistics_against_zero_and_sign_and_all_nonfinite(tmp_path):
    a = {
        "zero_vs_one": np.zeros(4, np.float32),
        "zero_vs_negzero": np.zeros(3, np.float32),
        "nan_vs_num": np.array([np.nan, np.inf, np.nan], np.float32),
        "pythagoras": np.array([3.0, 4.0, 0.0, np.nan], np.float32),
        "one_vs_zero": np.ones(2, np.float64),
        "small": np.array([0.5], np.float32),
    }
    b = {
        "zero_vs_one": np.ones(4, np.float32),
        "zero_vs_negzero": np.array([-0.0, 0.0, -0.0], np.float32),
        "nan_vs_num": np.array([1.0, 2.0, np.nan], np.float32),
        "pythagoras": np.array([0.0, 4.0, 12.0, 1.0], np.float32),
        "one_vs_zero": np.zeros(2, np.float64),
        "small": np.array([0.25], np.float32),
    }
    res = ops.diff_checkpoints(save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b))
    by = {d.name: d for d in res.changed}
    assert set(by) == set(a) and res.identical == []
    d = by["zero_vs_one"]
    assert (d.norm_a, d.norm_b, d.rel_l2, d.cosine) == (0.0, 2.0, math.inf, 0.0)
    assert (d.max_abs_diff, d.mean_abs_diff, d.num_diff, d.numel, d.compared) == (1.0, 1.0, 4, 4, True)
    d = by["zero_vs_negzero"]
    assert (d.num_diff, d.rel_l2, d.cosine, d.max_abs_diff, d.mean_abs_diff) == (2, 0.0, 1.0, 0.0, 0.0)
    assert (d.norm_a, d.norm_b) == (0.0, 0.0)
    d = by["nan_vs_num"]  # no pair with both sides finite: no statistic at all, and not 0
    assert all(math.isnan(v) for v in (d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine))
    assert (d.nan_a, d.inf_a, d.nan_b, d.inf_b, d.numel) == (2, 1, 1, 0, 3)
    assert d.norm_a is None and d.norm_b is None
    d = by["pythagoras"]  # both-finite pairs: (3, 0), (4, 4), (0, 12)
    assert (d.norm_a, d.norm_b) == (5.0, math.sqrt(16 + 144))
    assert d.max_abs_diff == 12.0 and d.mean_abs_diff == 5.0  # (3 + 0 + 12) / 3
    assert d.rel_l2 == pytest.approx(math.sqrt(9 + 144) / 5, rel=1e-15)
    assert d.cosine == pytest.approx(16 / (5 * math.sqrt(160)), rel=1e-15)
    assert (d.nan_a, d.nan_b, d.num_diff) == (1, 0, 3)
    d = by["one_vs_zero"]
    assert (d.norm_a, d.norm_b, d.rel_l2, d.cosine) == (math.sqrt(2), 0.0, 1.0, 0.0)
    d = by["small"]  # norms under 1 are still norms
    assert (d.norm_a, d.norm_b, d.rel_l2, d.cosine, d.max_abs_diff) == (0.5, 0.25, 0.5, 1.0, 0.25)


def test_cosine_stays_within_minus_one_and_one(tmp_path):
    # vectors whose float64 cosine rounds past +-1 before the clamp
    a, b = {}, {}
    for s in range(40):
        x = np.random.default_rng(s).standard_normal(999).astype(np.float32)
        a[f"p{s}"], b[f"p{s}"] = x, x * np.float32(3)
        a[f"n{s}"], b[f"n{s}"] = x, x * np.float32(-3)
    res = ops.diff_checkpoints(save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b))
    cos = {d.name: d.cosine for d in res.changed}
    assert len(cos) == 80
    assert all(-1.0 <= c <= 1.0 for c in cos.values())
    assert max(cos.values()) == 1.0 and min(cos.values()) == -1.0  # some hit the clamp
    assert all(abs(c) == pytest.approx(1.0, abs=1e-12) for c in cos.values())


def test_dtypes_without_arithmetic_compare_bytes(tmp_path, monkeypatch):
    raw_a = np.arange(64, dtype=np.uint8)
    raw_b = raw_a.copy()
    raw_b[[5, 6, 40]] ^= 0xFF
    ta = torch.frombuffer(bytearray(raw_a.tobytes()), dtype=torch.complex32)
    tb = torch.frombuffer(bytearray(raw_b.tobytes()), dtype=torch.complex32)
    pa = save_pt(tmp_path / "a.pt", {"c": ta.clone(), "same": ta.clone(), "cast": ta.clone()})
    pb = save_pt(
        tmp_path / "b.pt", {"c": tb.clone(), "same": ta.clone(), "cast": torch.zeros(16, dtype=torch.complex64)}
    )
    res = ops.diff_checkpoints(pa, pb)
    assert res.identical == ["same"]
    by = {d.name: d for d in res.changed}
    assert by["c"].compared and by["c"].num_diff == 3 and by["c"].numel == 16  # bytes that differ
    assert by["c"].max_abs_diff is None and by["c"].rel_l2 is None and by["c"].cosine is None
    assert by["cast"].compared is False and by["cast"].num_diff is None  # no arithmetic across that cast
    assert res.bytes_compared == 2 * (64 + 64)
    seen: list[int] = []
    ops.diff_checkpoints(pa, pb, progress_factory=lambda total: Bar(total, seen))
    assert seen == [256] + [seen[1]] * (len(seen) - 1) and sum(seen[1:]) == 256  # total, then the advances
    r = cli("diff", pa, pb, "--ignore-dtype")
    assert r.exit_code == 1 and "values not comparable" in r.stdout
    # many chunks of 8 bytes: the differences in later chunks are still counted
    monkeypatch.setattr(diff_values, "READ_BYTES", 8)
    res2 = ops.diff_checkpoints(pa, pb)
    assert {d.name: d.num_diff for d in res2.changed} == {"c": 3, "cast": None}
    assert res2.identical == ["same"]


# ---- diff_checkpoints ---------------------------------------------------------------------------------
def test_usage_errors_name_the_problem(tmp_path):
    pa = save(tmp_path / "a.safetensors", {"enc.w": np.ones(2, np.float32)})
    with pytest.raises(UsageError) as e:
        ops.diff_checkpoints(pa, pa, key="enc", all_=True)
    assert e.value.message == "--key and --all do not go together"
    with pytest.raises(UsageError) as e:
        ops.diff_checkpoints(pa, pa, ignore_dtype=True, values=False)
    assert e.value.message == "--ignore-dtype compares values across a cast; --no-values compares none"
    with pytest.raises(UsageError) as e:
        ops.diff_checkpoints(pa, pa, key="state_dict/")
    assert e.value.message == "--key state_dict/: neither checkpoint has tensors under state_dict/"
    with pytest.raises(UsageError) as e:
        ops.diff_checkpoints(pa, pa, include=["dec.*"], filters=["x*"], exclude=["enc.*", "y"])
    assert e.value.message == (
        "no tensor left to compare in either checkpoint after --include dec.* --include x* --exclude enc.* --exclude y"
    )
    assert ops.diff_checkpoints(pa, pa, ignore_dtype=True).equal  # each flag alone is fine
    empty = save(tmp_path / "empty.safetensors", {})
    assert ops.diff_checkpoints(empty, empty, include=["x"]).equal  # nothing to filter: no error


def test_the_result_records_what_was_compared(tmp_path):
    a = {"w": np.ones(4, np.float32), "x": np.zeros(2, np.float32), "gone1": np.ones(1), "gone2": np.ones(1)}
    b = {"x": np.zeros(2, np.float32), "w": np.ones(4, np.float32) * 3, "new2": np.ones(1), "new1": np.ones(1)}
    pa = save(tmp_path / "a.safetensors", a, {"lr": "1"})
    pb = save(tmp_path / "b.safetensors", b, {"lr": "2"})
    res = ops.diff_checkpoints(pa, pb, atol=0.5, rtol=0.25)
    assert (res.path_a, res.path_b) == (str(pa), str(pb))
    assert (res.format_a, res.format_b, res.values, res.atol, res.rtol) == (
        "safetensors",
        "safetensors",
        True,
        0.5,
        0.25,
    )
    assert res.only_in_a == ["gone1", "gone2"] and res.only_in_b == ["new1", "new2"]  # in file order
    assert res.identical == ["x"] and [d.name for d in res.changed] == ["w"]
    assert res.changed[0].atol == 0.5 and res.changed[0].rtol == 0.25 and res.changed[0].num_diff == 4
    assert res.metadata_changes == [{"key": "lr", "a": "1", "b": "2", "only_in": None}]
    assert res.side_a is not None and res.side_b is not None and len(res.side_a.names) == 4
    assert res.bytes_compared == 2 * (16 + 8)
    assert res.key_a is None and res.key_b is None and res.ignore_dtype is False
    same = ops.diff_checkpoints(pa, pa, values=False)
    assert same.hint is None and same.values is False and same.bytes_compared == 0
    assert same.changed == [] and sorted(same.identical) == sorted(a)


def test_key_takes_the_subtree_of_each_side_that_has_it(tmp_path):
    sd = {"w": torch.arange(4, dtype=torch.float32)}
    pa = save_pt(tmp_path / "a.pt", {"state_dict": sd, "epoch": 3})
    pb = save(tmp_path / "b.safetensors", {"w": np.arange(4, dtype=np.float32)})
    res = ops.diff_checkpoints(pa, pb, key="state_dict")
    assert (res.key_a, res.key_b) == ("state_dict", None)
    assert res.equal and res.identical == ["w"] and res.format_a != res.format_b


def test_shape_and_dtype_changes_are_not_compared_and_are_listed(tmp_path):
    a = {"r": np.zeros((2, 3), np.float32), "h": np.arange(5, dtype=np.float32), "i": np.arange(3, dtype=np.int32)}
    b = {"r": np.zeros((3, 2), np.float32), "h": np.arange(5, dtype=np.float16), "i": np.arange(3, dtype=np.int64)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    res = ops.diff_checkpoints(pa, pb)
    by = {d.name: d for d in res.changed}
    assert by["r"].compared is False and by["r"].numel == 6 and by["r"].num_diff is None
    assert by["h"].compared is True and by["h"].num_diff == 0 and by["h"].ignore_dtype is False
    assert res.dtype_only == [by["h"], by["i"]] or [d.name for d in res.dtype_only] == ["h", "i"]
    res = ops.diff_checkpoints(pa, pb, ignore_dtype=True)
    assert [d.name for d in res.changed] == ["r"] and sorted(res.identical) == ["h", "i"]
    assert [d.name for d in res.dtype_only] == ["h", "i"] and all(d.ignore_dtype for d in res.dtype_only)
    assert res.ignore_dtype is True
    assert res.bytes_compared == 20 + 10 + 12 + 24  # h and i compared; r (shape) not


def test_changed_tensors_come_structural_first_then_by_size_of_change(tmp_path):
    a = {"small": np.ones(100, np.float32), "big": np.ones(100, np.float32), "shape": np.ones(4, np.float32)}
    a["nan"] = np.ones(100, np.float32)
    b = {"small": a["small"] + np.float32(0.001), "big": a["big"] * 3, "shape": np.ones(5, np.float32)}
    b["nan"] = a["nan"].copy()
    b["nan"][0] = np.nan
    res = ops.diff_checkpoints(save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b))
    assert [d.name for d in res.changed] == ["shape", "nan", "big", "small"]


def test_readers_given_are_left_open_and_others_are_closed(tmp_path):
    a = {"w": np.arange(10, dtype=np.float32)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", {"w": a["w"] + 1})
    before = open_fds()
    for _ in range(3):
        ops.diff_checkpoints(pa, pb)
    assert open_fds() == before  # every file diff opened is closed again
    ra, rb = ops.open_checkpoint(pa), ops.open_checkpoint(pb)
    try:
        res = ops.diff_checkpoints(pa, pb, readers=(ra, rb))
        assert res.changed[0].num_diff == 10
        again = ops.diff_checkpoints(pa, pb, readers=(ra, rb))  # still open: usable again
        assert again.changed[0].num_diff == 10
        assert b"".join(bytes(c) for c in ra.iter_chunks("w")) == a["w"].tobytes()
    finally:
        ra.close()
        rb.close()


def test_progress_counts_every_byte_compared_once(tmp_path, monkeypatch):
    threads(monkeypatch, 1)
    rng = np.random.default_rng(2)
    a = {"w": rng.standard_normal(3000).astype(np.float32), "i": np.arange(500, dtype=np.int16)}
    a["s"] = np.zeros((2, 2), np.float32)
    b = {"w": a["w"].copy(), "i": a["i"].copy(), "s": np.zeros((4,), np.float32)}
    b["w"][2500] += 1
    seen: dict[str, list[int]] = {"total": [], "adv": []}

    class Bar:
        def __init__(self, total):
            seen["total"].append(total)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def advance(self, n):
            seen["adv"].append(n)

    res = ops.diff_checkpoints(
        save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b), progress_factory=Bar
    )
    assert seen["total"] == [2 * (12000 + 1000)]  # s (a shape change) is not compared
    assert sum(seen["adv"]) == 2 * (12000 + 1000) and len(seen["adv"]) > 2
    assert res.bytes_compared == 2 * (12000 + 1000)


# ---- Comparer.compare: every path of the stream -----------------------------------------------------------
def _pair(rng, n=6000):
    a = {
        "late": rng.standard_normal(n).astype(np.float32),
        "early": rng.standard_normal(n).astype(np.float32),
        "ints": rng.integers(-50, 50, n).astype(np.int32),
        "same": rng.standard_normal(n).astype(np.float32),
        "cast": rng.standard_normal(n).astype(np.float32),
        "two": rng.standard_normal(n).astype(np.float32),
        "zeros": np.zeros(n, np.float32),
    }
    b = {k: v.copy() for k, v in a.items()}
    b["late"][n - 10 :] += np.float32(0.5)  # every chunk but the last identical
    b["late"][n - 3] = np.inf
    b["early"][1] = np.float32(7)  # a difference in the first chunk, then identical chunks
    b["ints"][[100, 4000]] += 1
    b["cast"] = a["cast"].astype(np.float64)
    b["cast"][2000] += 1.0
    b["two"][[3500, 5500]] -= np.float32(2)  # identical chunks, a difference, identical, a difference
    b["zeros"][[10, 5000]] = np.float32(-0.0)  # a bit difference, not a value difference
    return a, b


def _ref(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m = np.isfinite(x) & np.isfinite(y)
    d = x[m] - y[m]
    return float(np.abs(d).max()), float(np.abs(d).mean()), float(np.linalg.norm(d) / np.linalg.norm(x[m]))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_non_contiguous_tensors_stream_in_chunks_and_match_numpy(tmp_path, monkeypatch, n_threads):
    """HDF5 with gzip: no file range to map, so both sides are read chunk by chunk (with two
    threads, the arithmetic of chunk k overlaps the read of k+1)."""
    threads(monkeypatch, n_threads)
    a, b = _pair(np.random.default_rng(7))
    pa, pb = tmp_path / "a.h5", tmp_path / "b.h5"
    for p, w in ((pa, a), (pb, b)):
        with h5py.File(p, "w") as f:
            for k, v in w.items():
                f.create_dataset(k, data=v, chunks=(500,), compression="gzip")
    res = ops.diff_checkpoints(pa, pb)
    assert res.identical == ["same"]
    by = {d.name: d for d in res.changed}
    assert set(by) == {"late", "early", "ints", "cast", "two", "zeros"}
    assert by["zeros"].num_diff == 2 and by["zeros"].max_abs_diff == 0.0
    for name in ("late", "early", "ints", "cast", "two"):
        mx, mean, rel = _ref(a[name], b[name])
        d = by[name]
        assert d.max_abs_diff == pytest.approx(mx, rel=1e-12), name
        assert d.mean_abs_diff == pytest.approx(mean, rel=1e-9), name
        assert d.rel_l2 == pytest.approx(rel, rel=1e-9), name
        both = np.isfinite(a[name].astype(np.float64)) & np.isfinite(b[name].astype(np.float64))
        assert d.norm_a == pytest.approx(np.linalg.norm(a[name][both].astype(np.float64)), rel=1e-12), name
    assert by["late"].num_diff == 10 and by["late"].inf_b == 1 and by["late"].inf_a == 0
    assert by["early"].num_diff == 1 and by["ints"].num_diff == 2 and by["cast"].num_diff == 1
    assert by["late"].numel == 6000 and by["early"].norm_b == pytest.approx(
        np.linalg.norm(b["early"].astype(np.float64)), rel=1e-12
    )
    assert res.bytes_compared == 2 * 6 * 6000 * 4 + 4 * 6000 + 8 * 6000
    # integers stay exact under a tolerance; -0.0 is 0.0 as a value
    tol = {d.name: d.num_diff for d in ops.diff_checkpoints(pa, pb, atol=5.0).changed}
    assert tol == {"late": 1, "early": 1, "ints": 2, "cast": 0}  # (cast: a dtype change, values within)
    # and the same against safetensors (one side mapped, one side streamed)
    ps = save(tmp_path / "b.safetensors", b)
    res2 = ops.diff_checkpoints(pa, ps)
    assert {d.name: d.num_diff for d in res2.changed} == {d.name: d.num_diff for d in res.changed}
    assert {d.name: d.rel_l2 for d in res2.changed} == pytest.approx({d.name: d.rel_l2 for d in res.changed})


@pytest.mark.parametrize("n_threads", [1, 2])
def test_identical_non_contiguous_files_need_no_arithmetic(tmp_path, monkeypatch, n_threads):
    threads(monkeypatch, n_threads)
    calls = []
    for name in ("_values", "_self_stats", "_prefix_stats"):
        monkeypatch.setattr(diff_values.Comparer, name, lambda self, *a, **k: calls.append(a))
    a, _b = _pair(np.random.default_rng(8))
    a["nan"] = np.full(3000, np.nan, np.float32)
    paths = []
    for name in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            for k, v in a.items():
                f.create_dataset(k, data=v, chunks=(700,), compression="gzip")
        paths.append(tmp_path / name)
    res = ops.diff_checkpoints(*paths)
    assert res.equal and sorted(res.identical) == sorted(a) and calls == []
    assert cli("diff", *paths).exit_code == 0


def test_a_short_difference_among_identical_chunks_in_a_big_tensor(tmp_path, monkeypatch):
    """Real sizes (no patched constants), one worker: 5M float32 are two 16 MiB reads."""
    init = diff_values.Comparer.__init__
    monkeypatch.setattr(diff_values.Comparer, "__init__", lambda self, *a, **k: init(self, *a, threads=1))
    x = np.linspace(-1, 1, 5_000_000, dtype=np.float32)
    y = x.copy()
    y[4_999_990] = np.float32(2.0)
    res = ops.diff_checkpoints(save(tmp_path / "a.safetensors", {"x": x}), save(tmp_path / "b.safetensors", {"x": y}))
    d = res.changed[0]
    assert d.num_diff == 1 and d.max_abs_diff == pytest.approx(2.0 - float(x[4_999_990]), rel=1e-12)
    assert d.norm_a == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-9)


def test_an_unreadable_input_is_its_own_error_and_nothing_stays_open(tmp_path):
    from ckptctl.errors import CkptError

    good = save(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    before = open_fds()
    for pair in ((bad, good), (good, bad), (tmp_path / "missing.safetensors", good), (good, tmp_path / "nope")):
        with pytest.raises(CkptError) as e:
            ops.diff_checkpoints(*pair)
        assert e.value.message  # the reader's error, not an AttributeError from the clean-up
    assert open_fds() == before


def test_rename_and_all_apply_to_both_sides(tmp_path):
    a = {"enc.w": np.ones(3, np.float32), "enc.b": np.zeros(2, np.float32)}
    b = {"encoder.w": np.ones(3, np.float32), "encoder.b": np.zeros(2, np.float32)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    assert ops.diff_checkpoints(pa, pb).only_in_a == ["enc.b", "enc.w"]
    res = ops.diff_checkpoints(pa, pb, rename=["^encoder\\.=enc."])
    assert res.equal and sorted(res.identical) == ["enc.b", "enc.w"]
    res = ops.diff_checkpoints(pb, pa, rename=["^encoder\\.=enc."])
    assert res.equal
    sd = {"w": torch.ones(3)}
    opt = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    pt1 = save_pt(tmp_path / "t1.pt", {"state_dict": sd, "optimizer": opt})
    opt2 = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    pt2 = save_pt(tmp_path / "t2.pt", {"state_dict": sd, "optimizer": opt2})
    assert ops.diff_checkpoints(pt1, pt2).equal  # the model weights only, by default
    res = ops.diff_checkpoints(pt1, pt2, all_=True)
    assert not res.equal and [d.name for d in res.changed] == ["optimizer/state/0/exp_avg"]
    assert "state_dict/w" in res.identical


def test_filters_that_empty_one_side_only(tmp_path):
    pa = save(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
    pb = save(tmp_path / "b.safetensors", {"y": np.ones(2, np.float32)})
    res = ops.diff_checkpoints(pa, pb, include=["x"])  # A keeps x, B keeps nothing: not an error
    assert res.only_in_a == ["x"] and res.only_in_b == [] and not res.equal
    empty = save(tmp_path / "empty.safetensors", {})
    with pytest.raises(UsageError, match="no tensor left to compare in either checkpoint after --exclude y"):
        ops.diff_checkpoints(pb, empty, exclude=["y"])  # only A had something to filter


def test_same_bytes_under_another_dtype_are_not_the_same_values(tmp_path):
    f = np.array([1.0, 2.0, -3.5, 0.0], np.float32)
    pa = save(tmp_path / "f.safetensors", {"w": f})
    pb = save(tmp_path / "i.safetensors", {"w": f.view(np.int32)})
    res = ops.diff_checkpoints(pa, pb, ignore_dtype=True, atol=1.0)
    assert [d.name for d in res.changed] == ["w"] and res.changed[0].num_diff == 3  # 0.0 is 0 in both
    assert cli("diff", pa, pb, "--ignore-dtype").exit_code == 1


def test_item_workers_count_progress_too(tmp_path, monkeypatch):
    threads(monkeypatch, 2)
    rng = np.random.default_rng(6)
    a = {"w": rng.standard_normal(5000).astype(np.float32)}
    b = {"w": a["w"].copy()}
    b["w"][4000] += 1
    seen: list[int] = []
    res = ops.diff_checkpoints(
        save(tmp_path / "a.safetensors", a),
        save(tmp_path / "b.safetensors", b),
        progress_factory=lambda total: Bar(total, seen),
    )
    assert seen[0] == 40000 and sum(seen[1:]) == 40000 and len(seen) > 2
    assert res.changed[0].num_diff == 1


def test_bytes_are_compared_exactly_whatever_the_tolerance(tmp_path):
    raw_a = np.arange(64, dtype=np.uint8)
    raw_b = raw_a.copy()
    raw_b[[5, 6, 40]] += 1  # each byte off by one: "close" for any tolerance, but not the same bytes
    ta = torch.frombuffer(bytearray(raw_a.tobytes()), dtype=torch.complex32)
    tb = torch.frombuffer(bytearray(raw_b.tobytes()), dtype=torch.complex32)
    pa, pb = save_pt(tmp_path / "a.pt", {"c": ta.clone()}), save_pt(tmp_path / "b.pt", {"c": tb.clone()})
    res = ops.diff_checkpoints(pa, pb, atol=1000.0, rtol=1.0)
    assert [d.num_diff for d in res.changed] == [3] and not res.equal
    assert cli("diff", pa, pb, "--atol", "1000").exit_code == 1


def test_the_comparer_refuses_values_it_cannot_compare(tmp_path):
    pa = save_pt(tmp_path / "a.pt", {"c": torch.zeros(4, dtype=torch.complex32)})
    pb = save_pt(tmp_path / "b.pt", {"c": torch.zeros(4, dtype=torch.complex64)})
    ra, rb = ops.open_checkpoint(pa), ops.open_checkpoint(pb)
    cmp = diff_values.Comparer()
    try:
        (ta,), (tb,) = ra.info().tensors, rb.info().tensors
        for x, y, rx, ry in ((ta, tb, ra, rb), (tb, ta, rb, ra)):
            with pytest.raises(ValueError) as e:
                cmp.compare(rx, x, ry, y)
            assert str(e.value) == "cannot compare values of these dtypes"
    finally:
        cmp.close()
        ra.close()
        rb.close()


def test_the_arithmetic_of_big_tensors_runs_on_worker_threads(tmp_path, monkeypatch):
    """compare() with two threads: the arithmetic of a real-valued tensor of more than two blocks
    runs on worker threads while the main thread reads on; small, complex and one-thread
    compares stay on the calling thread. (Both cores in use is the point of the design; a
    regression would only show as a slower diff.)"""
    import threading

    where: dict[str, set[str]] = {}
    real = diff_values.Comparer._values

    def spy(self, acc, x, *a, **k):
        name = threading.current_thread().name
        where.setdefault(self._tag, set()).add("worker" if name.startswith("ckptctl-diff") else "main")
        return real(self, acc, x, *a, **k)

    monkeypatch.setattr(diff_values.Comparer, "_values", spy)
    rng = np.random.default_rng(1)
    sizes = {"exactly_two_blocks": 512, "just_over": 513, "three_blocks": 768, "small": 100}
    a = {k: rng.standard_normal(n).astype(np.float32) for k, n in sizes.items()}
    a["cplx"] = (rng.standard_normal(2000) + 1j).astype(np.complex64)
    b = {k: v + np.ones_like(v) for k, v in a.items()}
    pa, pb = tmp_path / "a.h5", tmp_path / "b.h5"
    for p, w in ((pa, a), (pb, b)):
        with h5py.File(p, "w") as f:
            for k, v in w.items():
                f.create_dataset(k, data=v, chunks=(50,), compression="gzip")
    ra, rb = ops.open_checkpoint(pa), ops.open_checkpoint(pb)
    try:
        tens_a = {t.name: t for t in ra.info().tensors}
        tens_b = {t.name: t for t in rb.info().tensors}
        monkeypatch.setattr(diff_values, "READ_BYTES", 4096)
        monkeypatch.setattr(diff_values, "BLOCK", 256)
        for n_threads in (1, 2):
            for name in [*sizes, "cplx"]:
                cmp = diff_values.Comparer(threads=n_threads)
                cmp._tag = f"{n_threads}:{name}"
                try:
                    acc = cmp.compare(ra, tens_a[name], rb, tens_b[name])
                finally:
                    cmp.close()
                assert acc.n_diff == a[name].size, name
    finally:
        ra.close()
        rb.close()
    assert where == {
        "1:exactly_two_blocks": {"main"},
        "1:just_over": {"main"},
        "1:three_blocks": {"main"},
        "1:small": {"main"},
        "2:exactly_two_blocks": {"main"},
        "2:just_over": {"worker"},
        "2:three_blocks": {"worker"},
        "2:small": {"main"},
        "1:cplx": {"main"},
        "2:cplx": {"main"},
    }


def test_statistics_from_an_accumulator():
    from ckptctl.model import TensorInfo

    f32 = TensorInfo(name="t", dtype="float32", shape=(3,), nbytes=12)
    none = TensorInfo(name="t", dtype="float32", shape=(0,), nbytes=0)
    # identical through the fast path: no arithmetic was needed
    d = TensorDiff.from_acc("t", f32, f32, diff_values.Acc(numel=3, arith=False))
    assert (d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine, d.compared) == (0.0, 0.0, 0.0, 1.0, True)
    # an empty tensor that went through the arithmetic: zeros, not a division by zero
    d = TensorDiff.from_acc("t", none, none, diff_values.Acc(numel=0, arith=True))
    assert (d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine) == (0.0, 0.0, 0.0, 1.0)
    # no pair with both sides finite
    d = TensorDiff.from_acc("t", f32, f32, diff_values.Acc(numel=3, n_diff=3, arith=True, nan_a=3))
    assert all(math.isnan(v) for v in (d.max_abs_diff, d.mean_abs_diff, d.rel_l2, d.cosine))
    assert (d.num_diff, d.nan_a, d.numel) == (3, 3, 3)


def test_every_selection_applies_to_both_sides(tmp_path):
    def pt(name, scale):
        sd = {"w": torch.arange(4, dtype=torch.float32) * scale}
        ema = {"w": torch.arange(4, dtype=torch.float32) * 10}
        return save_pt(tmp_path / name, {"state_dict": sd, "ema": ema, "step": 1})

    pa, pb = pt("a.pt", 1), pt("b.pt", 2)
    res = ops.diff_checkpoints(pa, pb, key="ema")  # the EMA weights agree, the model weights do not
    assert (res.key_a, res.key_b) == ("ema", "ema") and res.equal and res.identical == ["w"]
    assert not ops.diff_checkpoints(pa, pb).equal
    with pytest.raises(UsageError) as e:
        ops.diff_checkpoints(pa, pb, key="emaX/")
    assert e.value.message == "--key emaX/: neither checkpoint has tensors under emaX/"
    w = {"enc.w": np.ones(2, np.float32), "dec.w": np.ones(2, np.float32)}
    sa = save(tmp_path / "a.safetensors", w)
    sb = save(tmp_path / "b.safetensors", {"enc.w": w["enc.w"], "dec.w": w["dec.w"] * 2})
    for kw in ({"filters": ["enc.*"]}, {"include": ["enc.*"]}, {"exclude": ["dec.*"]}):
        res = ops.diff_checkpoints(sa, sb, **kw)
        assert res.equal and res.identical == ["enc.w"] and res.only_in_a == res.only_in_b == [], kw
    ddp = save(tmp_path / "ddp.safetensors", {"module." + k: v for k, v in w.items()})
    res = ops.diff_checkpoints(ddp, sa)
    assert res.hint is not None and "--strip-prefix module." in res.hint
    assert ops.diff_checkpoints(sa, sa).hint is None


def test_a_values_pair_after_one_that_cannot_be_compared_is_still_compared(tmp_path):
    c32 = torch.zeros(4, dtype=torch.complex32)
    pa = save_pt(tmp_path / "a.pt", {"c": torch.zeros(4, dtype=torch.complex64), "z": torch.ones(3)})
    pb = save_pt(tmp_path / "b.pt", {"c": c32, "z": torch.ones(3) * 2})
    for x, y in ((pa, pb), (pb, pa)):  # the bytes dtype on either side
        res = ops.diff_checkpoints(x, y)
        by = {d.name: d for d in res.changed}
        assert by["c"].compared is False and by["z"].compared is True and by["z"].num_diff == 3
