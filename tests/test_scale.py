"""Checkpoints of 10^4-10^5 tensors (mixture of experts): folded tables, the name index, the
one-pass JSON encoder. Inputs are written with safetensors / torch in tmp_path (20k tensors: fast)."""

from __future__ import annotations

import json
import re
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from safetensors.numpy import save_file

LAYERS, EXPERTS, MATS = 10, 500, ("w1", "w2", "w3", "w4")  # 20,000 tensors
ODD_SHAPE = "model.layers.3.experts.7.w1"  # planted: a shape the rest of its row does not have
ODD_DTYPE = "model.layers.8.experts.499.w2"  # planted: another dtype


def _moe_file(path: Path) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for layer, expert, w in product(range(LAYERS), range(EXPERTS), MATS):
        sd[f"model.layers.{layer}.experts.{expert}.{w}"] = np.zeros((2, 3), np.float16)
    sd[ODD_SHAPE] = np.zeros((3, 2), np.float16)
    sd[ODD_DTYPE] = np.zeros((2, 3), np.float32)
    sd["model.norm.weight"] = np.ones(3, np.float32)
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    p = tmp_path_factory.mktemp("moe") / "moe.safetensors"
    return p, _moe_file(p)


def _expand(pattern: str) -> list[str]:
    """'a.{0..2,5}.b.{1,3}' -> every name it stands for."""
    parts = re.split(r"(\{[^}]*\})", pattern)
    choices = []
    for part in parts:
        if part.startswith("{"):
            vals: list[str] = []
            for run in part[1:-1].split(","):
                a, _, b = run.partition("..")
                vals += [str(v) for v in range(int(a), int(b or a) + 1)]
            choices.append(vals)
        else:
            choices.append([part])
    return ["".join(c) for c in product(*choices)]


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("name "))
    return [ln.split() for ln in lines[head + 2 :] if ln.strip()]


def test_table_folds_to_a_known_number_of_rows_and_every_tensor_is_accounted_for(moe):
    path, sd = moe
    r = cli("inspect", path)
    assert r.exit_code == 0, r.output
    rows = _table_rows(r.stdout)
    # 4 matrices fold to 4 rows each split around its planted tensor: w1 (all but layer 3,
    # layer 3 without expert 7, the odd one), w2 (same around layer 8 / expert 499), w3, w4,
    # plus model.norm.weight: 1 + 3 + 3 + 1 + 1 = 9 rows
    assert len(rows) == 9, r.stdout
    assert re.search(r"^rows +9 for 20,001 tensors \(", r.stdout, re.M), r.stdout
    seen: dict[str, tuple[str, str]] = {}
    for row in rows:
        name, count, dtype = row[0], int(row[1].replace(",", "")), row[2]
        shape = "".join(row[3:5]) if row[3].startswith("[") and not row[3].endswith("]") else row[3]
        names = _expand(name)
        assert len(names) == count == len(set(names)), row
        for n in names:
            assert n not in seen, n
            seen[n] = (dtype, shape)
    assert set(seen) == set(sd)
    # a fold never hides a tensor of another dtype or shape: every name a row stands for has the
    # row's dtype and shape in the file
    np_names = {"float16": "float16", "float32": "float32"}
    for n, (dtype, shape) in seen.items():
        a = sd[n]
        assert np_names[str(a.dtype)] == dtype, n
        assert shape == "[" + ",".join(map(str, a.shape)) + "]", (n, shape)
    assert ["model.layers.3.experts.7.w1", "1", "float16", "[3,", "2]"] == next(
        r_ for r_ in rows if r_[0] == ODD_SHAPE
    )[:5]
    assert any(r_[0] == "model.layers.3.experts.{0..6,8..499}.w1" and r_[1] == "499" for r_ in rows)
    assert any(r_[0] == "model.layers.{0..2,4..9}.experts.{0..499}.w1" and r_[1] == "4,500" for r_ in rows)


def test_no_fold_lists_every_tensor_and_json_csv_never_fold(moe):
    path, sd = moe
    r = cli("inspect", path, "--no-fold")
    assert r.exit_code == 0
    assert len(_table_rows(r.stdout)) == len(sd)
    assert "rows " not in r.stdout
    doc = json.loads(cli("inspect", path, "-f", "json", "--fold").stdout)
    names = [t["name"] for t in doc["tensors"]]
    assert len(names) == len(sd) and set(names) == set(sd)
    csv = cli("inspect", path, "-f", "csv", "--fold").stdout.splitlines()
    assert len(csv) == 1 + len(sd)


def test_markdown_folds_and_small_tables_stay_whole(tmp_path, moe):
    path, _sd = moe
    md = cli("inspect", path, "-f", "markdown").stdout
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| model")]
    assert len(cells) == 9  # as the table: 8 folded or planted rows and model.norm.weight
    assert ["model.layers.{0..9}.experts.{0..499}.w3", "5,000", "float16", "[2, 3]"] in [c[:4] for c in cells]
    small = tmp_path / "small.safetensors"
    save_file({f"layers.{i}.w": np.zeros(2, np.float32) for i in range(12)}, str(small))
    r = cli("inspect", small)
    assert len(_table_rows(r.stdout)) == 12 and "{" not in r.stdout
    r = cli("inspect", small, "--fold")
    rows = _table_rows(r.stdout)
    assert rows == [["layers.{0..11}.w", "12", "float32", "[2]", "24", "96", "B"]]


def test_fold_keeps_tied_weights_and_names_with_leading_zeros_apart():
    from ckptctl.model import TensorInfo as T
    from ckptctl.ops.inspect import fold

    ts = [T(f"h.{i}.w", "float32", (2,), 8) for i in range(3)]
    ts.append(T("h.3.w", "float32", (2,), 8, alias_of="h.0.w"))
    ts += [T("b.01.w", "float32", (2,), 8), T("b.02.w", "float32", (2,), 8)]
    got = [(f.name, f.count) for f in fold(ts)]
    assert got == [("h.{0..2}.w", 3), ("h.3.w", 1), ("b.01.w", 1), ("b.02.w", 1)]


def test_name_index_follows_the_list():
    from ckptctl.model import CheckpointInfo
    from ckptctl.model import TensorInfo as T

    info = CheckpointInfo("x", "safetensors", tensors=[T(f"t{i}", "float32", (1,), 4) for i in range(20_000)])
    assert info.tensor("t19999").name == "t19999"
    with pytest.raises(KeyError):
        info.tensor("nope")
    info.tensors.append(T("late", "float16", (1,), 2))  # extended after the index was built
    assert info.tensor("late").dtype == "float16"
    info.tensors = [T("b", "int8", (1,), 1), T("b", "int16", (1,), 2)]  # another list: first one wins
    assert info.tensor("b").dtype == "int8"
    with pytest.raises(KeyError):
        info.tensor("t0")
    info.tensors.append(T("c", "int32", (1,), 4))
    assert info.tensor("c").dtype == "int32"
    info.tensors.reverse()  # same list, same length, moved: a stale hit is noticed
    assert info.tensor("c").dtype == "int32" and info.tensor("b").dtype == "int16"


def test_sharded_folder_of_many_shards(tmp_path):
    names = [f"model.layers.{i // 200}.experts.{i % 200}.w" for i in range(20_000)]
    wm = {}
    for s in range(100):
        shard = f"model-{s + 1:05d}-of-00100.safetensors"
        part = names[s * 200 : (s + 1) * 200]
        save_file({n: np.full(2, s, np.int8) for n in part}, str(tmp_path / shard))
        wm.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    doc = json.loads(cli("inspect", tmp_path, "-f", "json").stdout)
    assert doc["num_tensors"] == 20_000 and [t["name"] for t in doc["tensors"]] == names
    r = cli("inspect", tmp_path)
    assert _table_rows(r.stdout)[0][:2] == ["model.layers.{0..99}.experts.{0..199}.w", "20,000"]
    from ckptctl.formats import open_reader

    with open_reader(tmp_path) as rd:  # data of the last tensor comes from the last shard
        assert rd.read(names[-1]).tobytes() == bytes([99, 99])


def test_print_json_matches_json_dumps():
    import io
    import sys

    from ckptctl.cli import output

    docs = [
        {
            "a": [1, 2.5, -0.0, 1e300, True, False, None, 'x\u009b"\\\n é'],
            "b": {},
            "c": [],
            "d": [[], {"e": [[1], (2, 3)]}],
        },
        [],
        "s",
        3,
    ]
    for d in docs:
        buf, old = io.StringIO(), sys.stdout
        sys.stdout = buf
        try:
            output.print_json(d)
        finally:
            sys.stdout = old
        want = json.dumps(d, indent=2, ensure_ascii=False).replace("\u009b", "\\u009b") + "\n"
        assert buf.getvalue() == want


def test_tensor_rows_are_written_as_their_to_json_rows():
    """`inspect --format json` writes its rows straight from TensorInfo fields (output.TensorRows):
    byte for byte what json.dumps writes for [t.to_json() ...], the odd cases included (tied
    weights, a scalar, a name that was not UTF-8, C1 controls, a shape of numpy ints: that one
    goes through json.dumps)."""
    import io
    import sys

    from ckptctl.cli import output
    from ckptctl.model import TensorInfo as T

    cases = [
        [
            T("a.w", "float32", (2, 3), 24),
            T("b", "bfloat16", (), 2),
            T("a.tied", "float32", (2, 3), 24, alias_of="a.w"),
            T('x\udcff\u009b"\\ é', "int8", (0, 4), 0),
            T("big", "uint8", (1 << 40,), 1 << 40),
        ],
        [T("np", "float16", (np.int64(2),), 4)],
        [],
    ]
    texts = []
    for ts in cases:
        got, old = io.StringIO(), sys.stdout
        try:
            sys.stdout = got
            output.print_json({"n": len(ts), "tensors": output.TensorRows(ts), "after": [1]})
        finally:
            sys.stdout = old
        want = json.dumps(
            {"n": len(ts), "tensors": [t.to_json() for t in ts], "after": [1]},
            indent=2,
            ensure_ascii=False,
            default=lambda o: o.item(),
        )
        want = want.replace("\udcff", "\\udcff").replace("\u009b", "\\u009b") + "\n"
        assert got.getvalue() == want
        texts.append(got.getvalue())
    doc = json.loads(texts[0])
    assert [r["name"] for r in doc["tensors"]] == ["a.w", "b", "a.tied", 'x\udcff\u009b"\\ é', "big"]
    assert doc["tensors"][2]["alias_of"] == "a.w" and "alias_of" not in doc["tensors"][0]
    assert doc["tensors"][1]["shape"] == [] and doc["tensors"][1]["numel"] == 1
    assert "\\udcff" in texts[0] and "\\u009b" in texts[0]  # escaped: stdout stays valid UTF-8


def test_pt_past_256_memo_entries_lists_what_torch_holds(tmp_path):
    """torch.save past 256 memo entries writes LONG_BINPUT/LONG_BINGET (the unpickler's fast
    path memoizes strings, tuples and rebuilt tensors in the same turn): every tensor comes out
    with torch's name, dtype, shape and bytes, tied weights as aliases, views at their offset."""
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    sd: dict = {}
    for i in range(700):
        dt = (torch.float32, torch.bfloat16, torch.int64, torch.float16)[i % 4]
        sd[f"model.layers.{i // 7}.experts.{i % 7}.w"] = (torch.arange(i % 5 + 1, dtype=torch.float32) * i).to(dt)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["view.rows"] = base[1:3]  # offset 6 into a shared storage
    sd["view.t"] = base.t()  # strided
    sd["tied.early"] = sd["model.layers.0.experts.1.w"]  # memoized with BINPUT
    sd["tied"] = sd["model.layers.90.experts.1.w"]  # past 256 memo entries: LONG_BINPUT
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    r = subprocess.run(
        [sys.executable, "-m", "ckptctl", "inspect", str(path), "-f", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    rows = {t["name"]: t for t in json.loads(r.stdout)["tensors"]}
    assert list(rows) == list(sd)
    for name, t in sd.items():
        row = rows[name]
        assert row["dtype"] == str(t.dtype).removeprefix("torch."), name
        assert row["shape"] == list(t.shape) and row["numel"] == t.numel(), name
        assert row["nbytes"] == t.numel() * t.element_size(), name
    assert rows["tied.early"]["alias_of"] == "model.layers.0.experts.1.w"
    assert rows["tied"]["alias_of"] == "model.layers.90.experts.1.w"
    assert sum("alias_of" in row for row in rows.values()) == 2
    from ckptctl.formats import open_reader

    with open_reader(path) as rd:
        for name in ("view.rows", "view.t", "model.layers.99.experts.6.w", "model.layers.50.experts.3.w"):
            assert rd.read(name).tobytes() == sd[name].contiguous().view(torch.uint8).numpy().tobytes(), name
