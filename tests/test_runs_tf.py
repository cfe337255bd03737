"""Runs of TensorFlow (CheckpointManager, Saver, SavedModel) and Keras (ModelCheckpoint): ls and prune.

Inputs: copies of the real folders in ../shared/fixtures/tensorflow/ (never modified in place) and
folders generated here with the names TF and Keras write (bytes copied from the fixture's ckpt-10
and .keras files). Tensor counts need the TF/Keras readers and are skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import cli, run
from run_builders import TF_FIXTURES, age_tree, tf_bundle_bytes, tf_manager_run

MANAGER = TF_FIXTURES / "tf2_manager_run"
KERAS = TF_FIXTURES / "keras3_modelcheckpoint"
needs_tf_fixtures = pytest.mark.skipif(not MANAGER.is_dir(), reason="../shared/fixtures/tensorflow is absent")
needs_readers = pytest.mark.skipif(
    importlib.util.find_spec("ckptctl.formats.tf_bundle") is None
    or importlib.util.find_spec("ckptctl.formats.keras_zip") is None,
    reason="needs the TF/Keras readers",
)


def parse_state(path: Path) -> dict[str, list[str]]:
    """TF's CheckpointState text format, read independently of ckptctl: field -> values in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r'(\w+): ("(.*)"|\S+)', line)
        assert m, f"not CheckpointState text format: {line!r}"
        out.setdefault(m.group(1), []).append(m.group(3) if m.group(3) is not None else m.group(2))
    return out


def copy_fixture(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    age_tree(dst)
    return dst


def ls_json(*args) -> list[dict]:
    r = cli("ls", *args, "-f", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---- TensorFlow CheckpointManager ----------------------------------------------------------------
@needs_tf_fixtures
def test_manager_fixture_ls(tmp_path):
    run_dir = copy_fixture(MANAGER, tmp_path / "tf2_manager_run")
    rows = ls_json(run_dir)
    assert [(r["name"], r["step"], r["layout"], r["format"]) for r in rows] == [
        ("ckpt-10", 10, "tf", "tf-bundle"),
        ("ckpt-20", 20, "tf", "tf-bundle"),
    ]
    for r in rows:
        s = r["step"]
        assert sorted(r["files"]) == [
            os.fspath(run_dir / f"ckpt-{s}.data-00000-of-00001"),
            os.fspath(run_dir / f"ckpt-{s}.index"),
        ]
        assert r["total_bytes"] == sum(os.path.getsize(run_dir / f) for f in r["files"]) == 4393 + 1197
        assert r["error"] is None
    assert rows[0]["aliases"] == [] and rows[1]["aliases"] == ["checkpoint"]  # the state file's latest
    table = cli("ls", run_dir)
    assert table.exit_code == 0
    line20 = next(ln for ln in table.stdout.splitlines() if "ckpt-20" in ln)
    assert "tf-bundle" in line20 and "← checkpoint" in line20


@needs_tf_fixtures
def test_manager_fixture_prune_keep_last_1(tmp_path):
    run_dir = copy_fixture(MANAGER, tmp_path / "tf2_manager_run")
    before = (run_dir / "checkpoint").read_bytes()
    dry = run("prune", run_dir, "--keep-last", "1")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 1" in dry.stdout and "ckpt-10 will be dropped" in dry.stderr
    assert len(os.listdir(run_dir)) == 5 and (run_dir / "checkpoint").read_bytes() == before
    r = run("prune", run_dir, "--keep-last", "1", "--yes", "-f", "json")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "ckpt-20.data-00000-of-00001", "ckpt-20.index"]
    st = parse_state(run_dir / "checkpoint")
    assert st == {
        "model_checkpoint_path": ["ckpt-20"],
        "all_model_checkpoint_paths": ["ckpt-20"],
        "all_model_checkpoint_timestamps": ["1796193738.9726722"],  # ckpt-20's, ckpt-10's gone with it
        "last_preserved_timestamp": ["1796193737.4750426"],
    }
    assert oct(os.stat(run_dir / "checkpoint").st_mode & 0o777) == oct(0o644)
    res = json.loads(r.stdout)["result"]
    assert res["done"] == [os.fspath(run_dir / "ckpt-10")]
    assert res["state_files"] == [
        {"path": os.fspath(run_dir / "checkpoint"), "dropped": ["ckpt-10"], "rewritten": True, "error": None}
    ]
    # nothing TF-ish left behind: no temp file of the rewrite
    assert not [n for n in os.listdir(run_dir) if "tmp" in n]


def test_one_tf_checkpoint_named_by_prefix_index_or_shard(tmp_path):
    root = tf_manager_run(tmp_path / "run", steps=(7, 8), shards=2)
    want = [os.fspath(root / n) for n in ("ckpt-7.data-00000-of-00002", "ckpt-7.data-00001-of-00002", "ckpt-7.index")]
    for name in ("ckpt-7", "ckpt-7.index", "ckpt-7.data-00001-of-00002"):
        rows = ls_json(root / name)
        assert [(r["name"], r["step"], r["files"]) for r in rows] == [("ckpt-7", 7, want)], name
    r = cli("ls", root / "ckpt-9")
    assert r.exit_code == 2 and "no such file" in r.stderr  # a typo: usage error (issue 16)


def test_state_file_left_alone_when_it_names_none_of_the_pruned(tmp_path):
    root = tf_manager_run(tmp_path / "run", steps=(1, 2, 3, 4))
    # the manager only tracks the last three (ckpt-1 came from an earlier manager with max_to_keep=1)
    text = (
        'model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-4"\n'
        "all_model_checkpoint_timestamps: 100.5\nall_model_checkpoint_timestamps: 200.5\n"
        "all_model_checkpoint_timestamps: 300.5\nlast_preserved_timestamp: 50.0\n"
    )
    (root / "checkpoint").write_text(text)
    age_tree(root)
    ino = os.stat(root / "checkpoint").st_ino
    r = cli("prune", root, "--keep-last", "3", "--yes")
    assert r.exit_code == 0, r.output
    assert not (root / "ckpt-1.index").exists() and not (root / "ckpt-1.data-00000-of-00001").exists()
    assert (root / "checkpoint").read_text() == text and os.stat(root / "checkpoint").st_ino == ino
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(root)) == ["checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index"]
    assert (root / "checkpoint").read_text() == (
        'model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-4"\n'
        "all_model_checkpoint_timestamps: 300.5\nlast_preserved_timestamp: 50.0\n"
    )
    assert "dropped ckpt-2, ckpt-3 from the TensorFlow checkpoint state" in r.stderr


def test_saver_names_multi_shard_absolute_state(tmp_path):
    """TF 1 Saver: model.ckpt-N prefixes, absolute paths in the state file, 2 data shards per step."""
    root = tf_manager_run(tmp_path / "train", steps=(5, 10, 15), prefix="model.ckpt-{step}", shards=2, absolute=True)
    age_tree(root)
    rows = ls_json(root)
    assert [(r["name"], r["step"]) for r in rows] == [("model.ckpt-5", 5), ("model.ckpt-10", 10), ("model.ckpt-15", 15)]
    assert rows[0]["files"] == [
        os.fspath(root / n)
        for n in ("model.ckpt-5.data-00000-of-00002", "model.ckpt-5.data-00001-of-00002", "model.ckpt-5.index")
    ]
    assert rows[0]["total_bytes"] == sum(os.path.getsize(f) for f in rows[0]["files"])
    assert rows[2]["aliases"] == ["checkpoint"]
    # (with the TF reader, the 2-shard names around a 1-shard index are unreadable: --include-broken)
    r = cli("prune", root, "--keep-last", "1", "--include-broken", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(root)) == [
        "checkpoint",
        "model.ckpt-15.data-00000-of-00002",
        "model.ckpt-15.data-00001-of-00002",
        "model.ckpt-15.index",
    ]
    st = parse_state(root / "checkpoint")
    assert st["model_checkpoint_path"] == [os.fspath(root / "model.ckpt-15")]
    assert st["all_model_checkpoint_paths"] == [os.fspath(root / "model.ckpt-15")]
    assert st["all_model_checkpoint_timestamps"] == ["1796193702.5"]


def test_missing_shard_and_orphan_data_are_incomplete_and_kept(tmp_path):
    root = tf_manager_run(tmp_path / "run", steps=(1, 2, 3), state=None)
    index, data = tf_bundle_bytes()
    (root / "ckpt-4.index").write_bytes(index)  # 1 of 2 shards
    (root / "ckpt-4.data-00000-of-00002").write_bytes(data)
    (root / "ckpt-5.data-00000-of-00001").write_bytes(data)  # no index: save interrupted
    age_tree(root)
    rows = {r["name"]: r for r in ls_json(root)}
    assert set(rows) == {"ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"}
    assert rows["ckpt-4"]["incomplete"] and "ckpt-4.data-00001-of-00002" in rows["ckpt-4"]["error"]
    assert rows["ckpt-5"]["incomplete"] and "without a .index" in rows["ckpt-5"]["error"]
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0, r.output
    left = sorted(os.listdir(root))
    assert left == [
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
        "ckpt-4.data-00000-of-00002",
        "ckpt-4.index",
        "ckpt-5.data-00000-of-00001",
    ]


def test_run_folder_named_like_a_step_is_not_orbax(tmp_path):
    """`exp_1/` with a `checkpoint` file looked like an Orbax step folder; it is a TF run."""
    root = tf_manager_run(tmp_path / "exp_1", steps=(100, 200))
    age_tree(root)
    rows = ls_json(root)
    assert [(r["name"], r["step"], r["layout"]) for r in rows] == [("ckpt-100", 100, "tf"), ("ckpt-200", 200, "tf")]


def test_saved_model_folders(tmp_path):
    index, data = tf_bundle_bytes()
    export = tmp_path / "export"
    for v in (1, 2, 3):
        d = export / str(v)
        (d / "variables").mkdir(parents=True)
        (d / "assets").mkdir()
        (d / "saved_model.pb").write_bytes(b"\x08\x01" + bytes([v]) * 40)
        (d / "fingerprint.pb").write_bytes(b"\x08" * 20)
        (d / "variables" / "variables.index").write_bytes(index)
        (d / "variables" / "variables.data-00000-of-00001").write_bytes(data)
    age_tree(export)
    rows = ls_json(export)
    assert [(r["name"], r["step"], r["layout"], r["num_files"]) for r in rows] == [
        ("1", 1, "tf-savedmodel", 4),
        ("2", 2, "tf-savedmodel", 4),
        ("3", 3, "tf-savedmodel", 4),
    ]
    assert rows[0]["total_bytes"] == sum(f.stat().st_size for f in (export / "1").rglob("*") if f.is_file())
    one = ls_json(export / "2")
    assert len(one) == 1 and one[0]["name"] == "2" and one[0]["layout"] == "tf-savedmodel"
    r = cli("prune", export, "--keep-last", "1", "--include-broken", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(export)) == ["3"]
    assert sorted(os.fspath(p.relative_to(export)) for p in export.rglob("*")) == [
        "3",
        "3/assets",
        "3/fingerprint.pb",
        "3/saved_model.pb",
        "3/variables",
        "3/variables/variables.data-00000-of-00001",
        "3/variables/variables.index",
    ]


# ---- Keras ModelCheckpoint ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,step,epoch,metrics",
    [
        ("epoch03-0.4100.keras", None, 3, {"metric": 0.41}),
        ("model-001.keras", None, 1, {}),
        ("w01.weights.h5", None, 1, {}),
        ("epoch=3-val_loss=0.41.keras", None, 3, {"val_loss": 0.41}),
        ("weights.03-0.41.h5", None, 3, {"metric": 0.41}),
        ("weights.03-0.41.hdf5", None, 3, {"metric": 0.41}),
        ("model-05-0.8812-0.3301.keras", None, 5, {"metric": 0.8812, "metric2": 0.3301}),
        ("ckpt_e07_val_loss0.125.weights.h5", None, 7, {"val_loss": 0.125}),
        ("resnet50-epoch12-val_accuracy-0.91.keras", None, 12, {"val_accuracy": 0.91}),
        ("epoch04-step1200-loss1.5e-03.keras", 1200, 4, {"loss": 0.0015}),
        ("epoch02-nan.keras", None, 2, {"metric": float("nan")}),
        ("checkpoint3.keras", None, 3, {}),
    ],
)
def test_keras_names(name, step, epoch, metrics, tmp_path):
    from ckptctl.ops.runs import scan_run
    from ckptctl.ops.runs.keras import parse_keras_name

    s, e, m = parse_keras_name(name)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_bytes(b"x")  # discovery: the Keras layout, whatever else the name resembles
    found = scan_run(tmp_path / "run", read_info=False).checkpoints
    assert [(c.layout, c.epoch, c.step) for c in found] == [("keras", epoch, step)]
    assert (s, e) == (step, epoch)
    assert set(m) == set(metrics)
    for k, v in metrics.items():
        assert (m[k] == v) or (v != v and m[k] != m[k])


@pytest.mark.parametrize(
    "name,role",
    [
        ("best.keras", "best"),
        ("best_model.keras", "best"),
        ("model_best.weights.h5", "best"),
        ("best.weights.h5", "best"),
        ("last.keras", "last"),
        ("epoch03-0.41.keras", None),
        ("best-03.keras", None),
    ],
)
def test_keras_roles(name, role):
    from ckptctl.ops.runs import role_of

    assert role_of(name) == role


def keras_epoch_file(dst: Path, tag: str) -> Path:
    """A real Keras 3 archive (the fixture's members), made distinct by its metadata.json."""
    with zipfile.ZipFile(KERAS / "model-001.keras") as src, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta["date_saved"] = tag
                data = json.dumps(meta).encode()
            out.writestr(info.filename, data)
    return dst


@pytest.fixture
def keras_run(tmp_path) -> Path:
    if not KERAS.is_dir():
        pytest.skip("../shared/fixtures/tensorflow is absent")
    root = tmp_path / "kr"
    root.mkdir()
    for e, v in ((1, "0.5000"), (2, "0.2000"), (3, "0.4100"), (4, "0.3500")):
        keras_epoch_file(root / f"epoch{e:02d}-{v}.keras", f"2026-01-0{e}@00:00:00")
    shutil.copyfile(root / "epoch02-0.2000.keras", root / "best.keras")  # save_best_only (min)
    age_tree(root)
    return root


def test_keras_folder_ls(keras_run):
    rows = ls_json(keras_run)
    assert [(r["name"], r["epoch"], r["step"], r["layout"], r["metrics"]) for r in rows] == [
        ("epoch01-0.5000.keras", 1, None, "keras", {"metric": 0.5}),
        ("epoch02-0.2000.keras", 2, None, "keras", {"metric": 0.2}),
        ("epoch03-0.4100.keras", 3, None, "keras", {"metric": 0.41}),
        ("epoch04-0.3500.keras", 4, None, "keras", {"metric": 0.35}),
    ]
    assert rows[1]["aliases"] == ["best.keras"]  # a byte copy: same members, same CRCs
    assert all(r["error"] is None for r in rows)
    table = cli("ls", keras_run).stdout.splitlines()
    assert table[0].split()[:3] == ["step", "epoch", "path"]
    assert table[4].split()[:3] == ["-", "3", "epoch03-0.4100.keras"] and "metric=0.41" in table[4]


def test_keras_keep_best_min_max(keras_run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(keras_run, other, copy_function=shutil.copy2)
    r = cli("prune", keras_run, "--keep-best", "metric", "--yes")
    assert r.exit_code == 0, r.output
    assert "lower is better" in r.stderr
    assert sorted(os.listdir(keras_run)) == ["best.keras", "epoch02-0.2000.keras", "epoch04-0.3500.keras"]
    r = cli("prune", other, "--keep-best", "metric", "--mode", "max", "-f", "json")
    assert r.exit_code == 0, r.output
    plan = {Path(d["path"]).name: (d["action"], d["epoch"]) for d in json.loads(r.stdout)["checkpoints"]}
    assert plan == {
        "epoch01-0.5000.keras": ("keep", 1),
        "epoch02-0.2000.keras": ("keep", 2),
        "epoch03-0.4100.keras": ("delete", 3),
        "epoch04-0.3500.keras": ("keep", 4),
    }
    assert len(os.listdir(other)) == 5  # dry run


def test_keras_best_without_twin_is_protected_and_keep_last_ranks_epochs(tmp_path):
    import h5py
    import numpy as np

    root = tmp_path / "w"
    root.mkdir()
    for e in (1, 2, 3, 10):  # Keras 3 save_weights layout; epoch 10 after 3 (not by name order)
        with h5py.File(root / f"w{e:02d}.weights.h5", "w") as f:
            f.create_dataset("layers/dense/vars/0", data=np.full((3, 2), e, np.float32))
            f.create_dataset("layers/dense/vars/1", data=np.zeros(2, np.float32))
    with h5py.File(root / "best.weights.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.full((3, 2), 7, np.float32))
    age_tree(root)
    rows = ls_json(root)
    assert [(r["name"], r["epoch"], r["role"], r["num_tensors"]) for r in rows] == [
        ("w01.weights.h5", 1, None, 2),
        ("w02.weights.h5", 2, None, 2),
        ("w03.weights.h5", 3, None, 2),
        ("w10.weights.h5", 10, None, 2),
        ("best.weights.h5", None, "best", 1),
    ]
    r = cli("prune", root, "--keep-last", "2", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(root)) == ["best.weights.h5", "w03.weights.h5", "w10.weights.h5"]
    assert "the run's best checkpoint" in r.stdout


@needs_tf_fixtures
def test_keras_fixture_folder(tmp_path):
    root = copy_fixture(KERAS, tmp_path / "keras3_modelcheckpoint")
    rows = ls_json(root)
    assert [(r["name"], r["epoch"]) for r in rows] == [("model-001.keras", 1), ("model-002.keras", 2)]
    assert rows[1]["aliases"] == ["best.keras"]  # best.keras is byte-identical to model-002.keras
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(root)) == ["best.keras", "model-002.keras"]


# ---- with the readers (after the TF / Keras reader branches are merged) ---------------------------
@needs_readers
@needs_tf_fixtures
def test_counts_with_readers(tmp_path):
    from ckptctl.ops.runs import NON_MODEL_HEADS

    expected = json.loads((TF_FIXTURES / "EXPECTED.json").read_text())
    tf_run = copy_fixture(MANAGER, tmp_path / "tf")
    tf_model = [
        k
        for k in expected["tf2_manager_run/ckpt-10"]
        if k.split("/")[0] not in NON_MODEL_HEADS and k != "_CHECKPOINTABLE_OBJECT_GRAPH"
    ]
    rows = ls_json(tf_run)
    for r in rows:
        assert r["error"] is None and r["num_tensors"] == len(tf_model) and r["has_optimizer"] is True
    # the checkpoint's own `epoch` variable (0-d int32); the fixture's step-20 save holds epoch 2
    assert [(r["step"], r["epoch"]) for r in rows] == [(10, 1), (20, 2)]
    k_run = copy_fixture(KERAS, tmp_path / "k")
    k_model = [k for k in expected["keras3_modelcheckpoint/model-001.keras"] if not k.startswith("optimizer/")]
    for r in ls_json(k_run):
        assert r["error"] is None and r["num_tensors"] == len(k_model) and r["has_optimizer"] is True
        assert r["format"] == "keras"


@needs_tf_fixtures
def test_manager_prune_into_trash_rewrites_state(tmp_path):
    run_dir = copy_fixture(MANAGER, tmp_path / "tf2_manager_run")
    trash = tmp_path / "trash"
    r = run("prune", run_dir, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "ckpt-20.data-00000-of-00001", "ckpt-20.index"]
    moved = trash / "tf2_manager_run" / "ckpt-10"
    assert sorted(os.listdir(moved)) == ["ckpt-10.data-00000-of-00001", "ckpt-10.index"]
    assert (moved / "ckpt-10.index").read_bytes() == (MANAGER / "ckpt-10.index").read_bytes()
    assert parse_state(run_dir / "checkpoint")["all_model_checkpoint_paths"] == ["ckpt-20"]


def test_unparseable_state_file_is_left_and_reported(tmp_path):
    root = tf_manager_run(tmp_path / "run", steps=(1, 2, 3))
    text = (root / "checkpoint").read_text() + "model_checkpoint_path { weird }\n"
    (root / "checkpoint").write_text(text)
    age_tree(root)
    dry = run("prune", root, "--keep-last", "2")
    assert (
        dry.returncode == 0
        and "cannot be rewritten: line 9 is not `field: value`; it will still name ckpt-1" in dry.stderr
    )
    r = run("prune", root, "--keep-last", "2", "--yes")
    assert r.returncode == 1
    assert sorted(os.listdir(root)) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
    ]
    assert (root / "checkpoint").read_text() == text
    err = r.stderr.strip().splitlines()[-1]
    assert "could not drop ckpt-1" in err and "line 9" in err and "Traceback" not in r.stderr


def test_keras_sharded_weights_epochs(tmp_path):
    """Keras 3 sharded save_weights: wNN.weights.json + the wNN_0000K.weights.h5 its weight_map names."""
    import h5py
    import numpy as np

    root = tmp_path / "sharded"
    root.mkdir()
    for e in (1, 2, 3):
        shards = [f"w{e:02d}_{k:05d}.weights.h5" for k in range(2)]
        for k, shard in enumerate(shards):
            with h5py.File(root / shard, "w") as f:
                f.create_dataset(f"layers/dense_{k}/vars/0", data=np.full((4, 4), e, np.float32))
        index = {
            "metadata": {"total_size": 128},
            "weight_map": {"/layers/dense_0/vars": shards[0], "/layers/dense_1/vars": shards[1]},
        }
        (root / f"w{e:02d}.weights.json").write_text(json.dumps(index))
    age_tree(root)
    rows = ls_json(root)
    assert [(r["name"], r["epoch"], r["layout"], r["num_files"]) for r in rows] == [
        ("w01.weights.json", 1, "keras", 3),
        ("w02.weights.json", 2, "keras", 3),
        ("w03.weights.json", 3, "keras", 3),
    ]
    assert all(r["error"] is None for r in rows)
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(root)) == ["w03.weights.json", "w03_00000.weights.h5", "w03_00001.weights.h5"]
