"""Run discovery (ops/runs.py) over real run folders written with torch / safetensors / DCP."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from run_builders import (
    dcp_run,
    fairseq_run,
    hf_run,
    lightning_run,
    orbax_run,
    set_mtime,
    st_run,
)

from ckptctl.errors import NotFound, UsageError
from ckptctl.ops import runs
from ckptctl.ops.runs import discover, is_run_dir, parse_duration, parse_name, role_of, scan_run

HAS_TORCH_READER = importlib.util.find_spec("ckptctl.formats.torch_zip") is not None
HAS_DCP_READER = importlib.util.find_spec("ckptctl.formats.dcp") is not None
needs_torch_reader = pytest.mark.skipif(not HAS_TORCH_READER, reason="torch zip reader not in the tree yet")
needs_dcp_reader = pytest.mark.skipif(not HAS_DCP_READER, reason="DCP reader not in the tree yet")


@pytest.mark.parametrize(
    "name,step,epoch,metrics",
    [
        ("epoch=3-step=1200.ckpt", 1200, 3, {}),
        ("epoch=3-step=1200-val_loss=0.12.ckpt", 1200, 3, {"val_loss": 0.12}),
        ("epoch=3-step=1200-v1.ckpt", 1200, 3, {}),
        ("sample-epoch=02-val_acc=0.91-lr=1e-05.ckpt", None, 2, {"val_acc": 0.91, "lr": 1e-05}),
        ("checkpoint_3_1200.pt", 1200, 3, {}),
        ("checkpoint3.pt", None, 3, {}),
        ("checkpoint-500", 500, None, {}),
        ("step_1000.pt", 1000, None, {}),
        ("step-1000.safetensors", 1000, None, {}),
        ("global_step100", 100, None, {}),
        ("iter_0001000", 1000, None, {}),
        ("model_00010000.safetensors", 10000, None, {}),
        ("ckpt-5", 5, None, {}),
        ("100", 100, None, {}),
        ("model-00001-of-00003.safetensors", None, None, {}),
        ("resnet50.pt", None, None, {}),
        ("last.ckpt", None, None, {}),
        ("checkpoint_best.pt", None, None, {}),
    ],
)
def test_parse_name(name, step, epoch, metrics):
    assert parse_name(name) == (step, epoch, metrics)


@pytest.mark.parametrize(
    "name,role",
    [
        ("last.ckpt", "last"),
        ("last-v1.ckpt", "last"),
        ("checkpoint_last.pt", "last"),
        ("checkpoint_best.pt", "best"),
        ("best", "best"),
        ("model_best.pth", "best"),
        ("epoch=3-step=1200.ckpt", None),
        ("checkpoint_3_1200.pt", None),
        ("bestiary.pt", None),
    ],
)
def test_role_of(name, role):
    assert role_of(name) == role


def test_parse_duration():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("90m") == 5400
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("45s") == 45
    assert parse_duration("0") == 0
    for bad in ("7", "d", "", "1x", "-3d", "3d-"):
        with pytest.raises(UsageError):
            parse_duration(bad)


# ---- HF Trainer ---------------------------------------------------------------------------------
def test_hf_trainer_run(tmp_path):
    root = hf_run(
        tmp_path / "out", steps=(500, 1000, 1500, 2000), eval_loss={500: 0.9, 1000: 0.7, 1500: 0.4, 2000: 0.6}
    )
    run = scan_run(root)
    cks = run.checkpoints
    assert [c.step for c in cks] == [500, 1000, 1500, 2000]
    assert all(c.step_source == "trainer_state" for c in cks)
    c = cks[2]
    assert c.path == root / "checkpoint-1500"
    assert c.layout == "hf-trainer"
    assert c.format == "safetensors"
    assert c.error is None and not c.incomplete
    names = sorted(f.name for f in c.files)
    assert names == [
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
    ]
    assert c.size == sum(f.stat().st_size for f in c.files)
    assert c.metrics["eval_loss"] == 0.4
    assert c.metrics["loss"] == pytest.approx(1.8)
    assert c.has_optimizer is True
    assert c.num_tensors == 6 and c.num_params == 3 * 16 + 3 * 4
    # best_model_checkpoint of the NEWEST trainer_state names checkpoint-1500
    assert [x.best_of_run for x in cks] == [[], [], ["trainer_state best_model_checkpoint"], []]


def test_trainer_state_beats_name(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    os.rename(root / "checkpoint-1000", root / "checkpoint-7")
    c = [c for c in discover(root) if c.path.name == "checkpoint-7"][0]
    assert (c.step, c.step_source) == (1000, "trainer_state")


def test_hf_output_dir_with_final_model_is_a_run(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    shutil.copy(root / "checkpoint-1000" / "model.safetensors", root / "model.safetensors")
    shutil.copy(root / "checkpoint-1000" / "training_args.bin", root / "training_args.bin")
    assert is_run_dir(root)
    cks = discover(root)
    assert sorted(c.path.name for c in cks) == ["checkpoint-1000", "checkpoint-500", "model.safetensors"]
    assert not any(c.path.name == "training_args.bin" for c in cks)


def test_hf_incomplete_and_tmp_folders(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    (root / "checkpoint-1000" / "trainer_state.json").unlink()
    tmp = root / "tmp-checkpoint-1500"
    shutil.copytree(root / "checkpoint-500", tmp)
    by = {c.path.name: c for c in discover(root)}
    assert by["checkpoint-1000"].incomplete and "trainer_state.json" in by["checkpoint-1000"].error
    assert by["checkpoint-1000"].step == 1000 and by["checkpoint-1000"].step_source == "name"
    assert by["tmp-checkpoint-1500"].incomplete
    assert not by["checkpoint-500"].incomplete and by["checkpoint-500"].error is None


# ---- safetensors step files ---------------------------------------------------------------------
def test_safetensors_metadata_step_and_metrics(tmp_path):
    root = st_run(tmp_path / "run", steps=(100, 200), values={100: 0.25, 200: 0.125})
    os.rename(root / "model_00000200.safetensors", root / "model_00000003.safetensors")
    cks = discover(root)
    assert [(c.path.name, c.step, c.step_source) for c in cks] == [
        ("model_00000100.safetensors", 100, "metadata"),
        ("model_00000003.safetensors", 200, "metadata"),
    ]
    assert cks[1].metrics == {"eval_loss": 0.125}
    assert cks[0].format == "safetensors" and cks[0].has_optimizer is False
    assert cks[0].info is not None and cks[0].num_params == 20


def test_step_from_name_only(tmp_path):
    from safetensors.numpy import save_file

    root = tmp_path / "run"
    root.mkdir()
    for s in (30, 4, 1000):
        save_file({"w": np.zeros(2, np.float32)}, str(root / f"step_{s}.safetensors"))
    save_file({"w": np.zeros(2, np.float32)}, str(root / "final.safetensors"))
    cks = discover(root)
    assert [(c.step, c.step_source) for c in cks] == [(4, "name"), (30, "name"), (1000, "name"), (None, "none")]
    assert cks[-1].role == "final"


def test_sort_unknown_step_last_then_mtime(tmp_path):
    from safetensors.numpy import save_file

    root = tmp_path / "run"
    root.mkdir()
    for i, n in enumerate(["b.safetensors", "a.safetensors", "step_5.safetensors"]):
        save_file({"w": np.zeros(2, np.float32)}, str(root / n))
        set_mtime(root / n, 1_000_000 + (10 - i) * 100)
    assert [c.path.name for c in discover(root)] == ["step_5.safetensors", "a.safetensors", "b.safetensors"]


# ---- aliases ------------------------------------------------------------------------------------
def test_symlink_aliases(tmp_path, tmp_path_factory):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    st_run(root, steps=(7,), name="step_{step}.safetensors")
    os.symlink("checkpoint-500", root / "best")
    os.symlink("step_7.safetensors", root / "last.safetensors")
    os.symlink("nowhere.pt", root / "dangling.pt")
    outside = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    shutil.copy(root / "step_7.safetensors", outside)
    os.symlink(outside, root / "ext.safetensors")
    run = scan_run(root)
    by = {c.path.name: c for c in run.checkpoints}
    assert set(by) == {"checkpoint-500", "checkpoint-1000", "step_7.safetensors"}
    assert by["checkpoint-500"].aliases == ["best"]
    assert by["step_7.safetensors"].aliases == ["last.safetensors"]
    assert any("dangling" in w for w in run.warnings)
    assert any("outside the run folder" in w and "ext.safetensors" in w for w in run.warnings)


def test_deepspeed_latest_and_tf_checkpoint_state(tmp_path):
    import torch

    root = tmp_path / "ds"
    for s in (100, 200):
        d = root / f"global_step{s}"
        d.mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(2)}, "global_steps": s}, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {}}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (root / "latest").write_text("global_step200")
    from run_builders import tf_bundle_bytes

    index, data = tf_bundle_bytes()  # a real bundle: the TF reader (when present) reads it
    for s in (1, 2):
        (root / f"ckpt-{s}.index").write_bytes(index)
        (root / f"ckpt-{s}.data-00000-of-00001").write_bytes(data)
    (root / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n')
    by = {c.path.name: c for c in discover(root)}
    assert set(by) == {"global_step100", "global_step200", "ckpt-1", "ckpt-2"}
    assert by["global_step200"].aliases == ["latest"] and by["global_step200"].layout == "deepspeed"
    assert by["global_step200"].step == 200 and by["global_step200"].has_optimizer is True
    assert by["ckpt-2"].aliases == ["checkpoint"] and by["ckpt-2"].format == "tf-bundle"
    assert by["ckpt-2"].size == len(index) + len(data) and len(by["ckpt-2"].files) == 2
    assert by["ckpt-2"].error is None


# ---- Lightning / fairseq (torch reader) ---------------------------------------------------------
@needs_torch_reader
@pytest.mark.parametrize("last", ["symlink", "copy"])
def test_lightning_run(tmp_path, last):
    root = lightning_run(
        tmp_path / "ckpts", steps=(100, 200, 300, 400), val_loss={100: 0.9, 200: 0.5, 300: 0.7, 400: 0.8}, last=last
    )
    run = scan_run(root)
    cks = run.checkpoints
    assert [c.path.name for c in cks] == [f"epoch={e}-step={s}.ckpt" for e, s in enumerate((100, 200, 300, 400))]
    assert [c.step_source for c in cks] == ["global_step"] * 4
    assert [c.epoch for c in cks] == [0, 1, 2, 3]
    assert [c.metrics.get("val_loss") for c in cks] == pytest.approx([0.9, 0.5, 0.7, 0.8])
    assert cks[-1].aliases == ["last.ckpt"]
    assert cks[1].best_of_run and "best_model_path" in cks[1].best_of_run[0]
    assert all(c.has_optimizer for c in cks)
    assert cks[0].num_tensors == 6 and cks[0].format == "torch-zip"


@needs_torch_reader
def test_lightning_inner_step_beats_name_and_unmatched_last(tmp_path):
    from run_builders import lightning_ckpt

    root = tmp_path / "ckpts"
    root.mkdir()
    lightning_ckpt(root / "epoch=0-step=5.ckpt", 0, 100, 0.5, "", 0.5)
    lightning_ckpt(root / "last.ckpt", 1, 150, 0.4, "", 0.4)  # saved at a step no other file has
    by = {c.path.name: c for c in discover(root)}
    assert (by["epoch=0-step=5.ckpt"].step, by["epoch=0-step=5.ckpt"].step_source) == (100, "global_step")
    assert by["last.ckpt"].role == "last" and by["last.ckpt"].step == 150


@needs_torch_reader
def test_fairseq_copies(tmp_path):
    root = fairseq_run(tmp_path / "fs", best_of=1)
    run = scan_run(root)
    by = {c.path.name: c for c in run.checkpoints}
    assert [c.step for c in run.checkpoints][:3] == [100, 200, 300]
    inner = by["checkpoint_3_300.pt"].step_source
    if by.get("checkpoint_last.pt") is None:  # the reader exposes num_updates: copies are aliases
        assert "checkpoint_last.pt" in by["checkpoint_3_300.pt"].aliases
        assert "checkpoint_best.pt" in by["checkpoint_2_200.pt"].aliases
        assert inner == "global_step"
    else:  # step of the copies unknown: they stay, as the run's last/best
        assert by["checkpoint_last.pt"].role == "last" and by["checkpoint_best.pt"].role == "best"


@needs_torch_reader
def test_copies_folded_into_aliases_still_count_on_disk(tmp_path):
    """checkpoint_best.pt / checkpoint_last.pt are real copies: `du` counts them, so must we."""
    root = fairseq_run(tmp_path / "fs", best_of=1)
    os.link(root / "checkpoint_1_100.pt", root / "checkpoint_1_100-again.pt")  # same inode, counted once
    run = scan_run(root)
    by = {c.path.name: c for c in run.checkpoints}
    assert [p.name for p in by["checkpoint_3_300.pt"].copies] == ["checkpoint_last.pt"]
    files = {os.lstat(p).st_ino: os.lstat(p).st_size for p in root.iterdir()}
    assert len(files) == 5 and runs.bytes_on_disk(run.checkpoints) == sum(files.values())
    assert runs.bytes_on_disk([by["checkpoint_2_200.pt"]]) == 2 * (root / "checkpoint_2_200.pt").stat().st_size


# ---- DCP / Orbax --------------------------------------------------------------------------------
def test_dcp_step_folders(tmp_path):
    root = dcp_run(tmp_path / "dcp", steps=(100, 200))
    cks = discover(root)
    assert [(c.path.name, c.step, c.layout) for c in cks] == [("step_100", 100, "dcp"), ("step_200", 200, "dcp")]
    assert {f.name for f in cks[0].files} >= {".metadata", "__0_0.distcp"}
    if HAS_DCP_READER:
        assert cks[0].format == "dcp" and cks[0].error is None and cks[0].num_tensors == 6


def test_dcp_without_metadata_is_incomplete(tmp_path):
    root = dcp_run(tmp_path / "dcp", steps=(100, 200))
    (root / "step_200" / ".metadata").unlink()
    cks = discover(root)
    assert not cks[0].incomplete and cks[1].incomplete and ".metadata" in cks[1].error


def test_orbax_step_folders(tmp_path):
    root = orbax_run(tmp_path / "orbax", steps=(1000, 2000, 3000))
    (root / "4000.orbax-checkpoint-tmp-1712345678").mkdir()
    (root / "4000.orbax-checkpoint-tmp-1712345678" / "_CHECKPOINT_METADATA").write_text("{}")
    cks = discover(root)
    assert [(c.step, c.format, c.error, c.num_tensors) for c in cks[:3]] == [
        (s, "orbax", None, 2) for s in (1000, 2000, 3000)
    ]
    assert cks[0].metrics == {"loss": 0.5}
    assert cks[3].incomplete and cks[3].step == 4000
    assert cks[0].size == sum(f.stat().st_size for f in cks[0].files) and len(cks[0].files) == 6


# ---- layouts and edge cases ---------------------------------------------------------------------
def test_sharded_model_at_top_level_is_one_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    root = tmp_path / "run"
    root.mkdir()
    save_file({"a": np.ones(3, np.float32)}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(5, np.float32)}, str(root / "model-00002-of-00002.safetensors"))
    (root / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 32},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    st_run(root, steps=(10,), name="step_{step}.safetensors")
    cks = discover(root)
    assert [c.path.name for c in cks] == ["step_10.safetensors", "model.safetensors.index.json"]
    sh = cks[1]
    assert sh.layout == "sharded" and len(sh.files) == 3 and sh.num_params == 8
    assert sh.size == sum(f.stat().st_size for f in sh.files)


def test_broken_and_writer_temp_files(tmp_path):
    root = st_run(tmp_path / "run", steps=(100, 200))
    (root / "step_300.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (root / "step_400.pt").write_bytes(os.urandom(64))
    (root / "empty_500.safetensors").write_bytes(b"")
    (root / ".model_00000600.safetensors.ckptctl-tmp-ab12cd").write_bytes(b"\0" * 32)
    (root / "notes.txt").write_text("hi")
    (root / "config.json").write_text("{}")
    by = {c.path.name: c for c in discover(root)}
    assert set(by) == {
        "model_00000100.safetensors",
        "model_00000200.safetensors",
        "step_300.safetensors",
        "step_400.pt",
        "empty_500.safetensors",
        ".model_00000600.safetensors.ckptctl-tmp-ab12cd",
    }
    for n in ("step_300.safetensors", "step_400.pt", "empty_500.safetensors"):
        assert by[n].error and "\n" not in by[n].error and not by[n].incomplete and by[n].info is None
    assert by["step_300.safetensors"].step == 300
    assert by[".model_00000600.safetensors.ckptctl-tmp-ab12cd"].incomplete


def test_recursive_lightning_logs(tmp_path):
    root = tmp_path / "lightning_logs"
    st_run(root / "version_0" / "checkpoints", steps=(1, 2))
    st_run(root / "version_1" / "checkpoints", steps=(3,))
    (root / ".hidden").mkdir()
    st_run(root / ".hidden", steps=(99,))
    run = scan_run(root)
    assert run.checkpoints == [] and len(run.subdirs) == 2
    cks = discover(root, recursive=True)
    assert [c.step for c in cks] == [1, 2, 3]
    assert cks[2].run == root / "version_1" / "checkpoints"


def test_is_run_dir(tmp_path):
    hf = hf_run(tmp_path / "hf", steps=(5,))
    assert is_run_dir(hf) and not is_run_dir(hf / "checkpoint-5")
    st = st_run(tmp_path / "st", steps=(1,))
    assert is_run_dir(st)
    assert not is_run_dir(st / "model_00000001.safetensors")
    (tmp_path / "empty").mkdir()
    assert not is_run_dir(tmp_path / "empty")
    dcp = dcp_run(tmp_path / "dcp", steps=(1,))
    assert is_run_dir(dcp) and not is_run_dir(dcp / "step_1")


def test_single_checkpoint_paths(tmp_path):
    hf = hf_run(tmp_path / "hf", steps=(5, 6))
    one = discover(hf / "checkpoint-5")
    assert len(one) == 1 and one[0].step == 5 and one[0].best_of_run == []
    f = discover(hf / "checkpoint-5" / "model.safetensors")
    assert len(f) == 1 and f[0].format == "safetensors"
    with pytest.raises(NotFound):
        discover(tmp_path / "missing")


def test_no_tensor_data_read(tmp_path):
    """Listing 20 sparse 50 MB safetensors files reads headers only (rchar of /proc/self/io)."""
    import struct

    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("no /proc/self/io")
    root = tmp_path / "big"
    root.mkdir()
    n = 50 * 1000 * 1000 // 4
    header = json.dumps(
        {"__metadata__": {"step": "1"}, "w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    for i in range(20):
        p = root / f"step_{i}.safetensors"
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + n * 4)

    def rchar() -> int:
        return int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"])

    before = rchar()
    cks = discover(root)
    read = rchar() - before
    assert len(cks) == 20 and all(c.error is None and c.num_params == n for c in cks)
    assert read < 2_000_000, f"read {read} bytes to list 1 GB of checkpoints"


def test_parallel_discovery_matches_serial(tmp_path):
    """Many pickled checkpoints are parsed in forked workers; the result is the same as serially."""
    import subprocess
    import sys

    import torch

    root = tmp_path / "many"
    root.mkdir()
    for i in range(runs.PARALLEL_MIN + 6):
        torch.save(
            {
                "global_step": 10 * i,
                "epoch": i,
                "val_loss": 1.0 / (i + 1),
                "state_dict": {"w": torch.full((3,), float(i))},
            },
            root / f"ckpt_{i:03d}.pt",
        )
    code = (
        "import json, sys; from ckptctl.ops.runs import discover, POOL_STATE; "
        "print(json.dumps([c.to_json() for c in discover(sys.argv[1])])); "
        "print('torch' in sys.modules, POOL_STATE['used'], POOL_STATE['error'], file=sys.stderr)"
    )
    outs = []
    for jobs in ("1", "2"):
        env = dict(os.environ, CKPTCTL_JOBS=jobs)
        p = subprocess.run(
            [sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env, timeout=120
        )
        assert p.returncode == 0, p.stderr
        assert p.stderr.strip() == ("False False None" if jobs == "1" else "False True None")
        outs.append(json.loads(p.stdout))
    serial, parallel = outs
    assert serial == parallel
    assert [r["step"] for r in serial] == [10 * i for i in range(runs.PARALLEL_MIN + 6)]
    assert serial[3]["metrics"] == {"val_loss": 0.25} and serial[3]["num_params"] == 3
