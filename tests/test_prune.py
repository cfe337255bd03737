"""`ckptctl prune`: every policy, their union, protections, dry run, --yes, --trash, safety."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import cli, run
from run_builders import age_tree, hf_run, lightning_run, set_mtime, st_run, tree_hash

from ckptctl.ops.prune import Policy, execute, exp_spaced, guess_mode, make_plan
from ckptctl.ops.runs import scan_run

STEPS = (100, 200, 300, 400, 500, 600, 700, 800)


@pytest.fixture
def strun(tmp_path) -> Path:
    """Eight step files, old enough to prune; eval_loss best at 300, then 600."""
    losses = {100: 0.9, 200: 0.6, 300: 0.1, 400: 0.5, 500: 0.7, 600: 0.2, 700: 0.8, 800: 0.85}
    root = st_run(tmp_path / "run", steps=STEPS, values=losses)
    age_tree(root, 3600)
    return root


def plan_json(*args) -> dict:
    r = cli("prune", *args, "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def kept(doc) -> list:
    return [c["step"] for c in doc["checkpoints"] if c["action"] == "keep"]


def deleted(doc) -> list:
    return [c["step"] for c in doc["checkpoints"] if c["action"] == "delete"]


# ---- policies -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expect",
    [
        (["--keep-last", "3"], [600, 700, 800]),
        (["--keep-last", "1"], [800]),
        (["--keep-every", "300"], [300, 600, 800]),
        (["--keep-best", "eval_loss"], [300, 800]),
        (["--keep-best", "eval_loss", "--best-n", "2"], [300, 600, 800]),
        (["--keep-best", "eval_loss", "--mode", "max"], [100, 800]),
        (["--keep-best", "eval_loss", "--mode", "max", "--best-n", "3"], [100, 700, 800]),
        (["--keep-steps", "200,500"], [200, 500, 800]),
        (["--keep-steps", "200", "--keep-steps", "400"], [200, 400, 800]),
        (["--exp-spacing"], [100, 200, 400, 800]),
        (["--keep-last", "2", "--keep-every", "400", "--keep-best", "eval_loss"], [300, 400, 700, 800]),
    ],
)
def test_policies(strun, args, expect):
    doc = plan_json(strun, *args)
    assert kept(doc) == expect
    assert sorted(kept(doc) + deleted(doc)) == list(STEPS)
    assert doc["dry_run"] is True and doc["result"] is None
    assert doc["summary"]["bytes_freed"] == sum(
        os.path.getsize(c["path"]) for c in doc["checkpoints"] if c["action"] == "delete"
    )


def test_reasons_are_given(strun):
    doc = plan_json(strun, "--keep-last", "2", "--keep-best", "eval_loss")
    by = {c["step"]: c for c in doc["checkpoints"]}
    assert by[800]["protected_by"] == ["newest"] and by[800]["kept_by"] == ["last 2"]
    assert by[300]["kept_by"] == ["best eval_loss (0.1)"]
    assert by[100]["reasons"] == ["no policy keeps it"]


def test_keep_since(strun):
    now = time.time()
    for i, s in enumerate(STEPS):
        set_mtime(strun / f"model_{s:08d}.safetensors", now - (len(STEPS) - i) * 86400)  # 8d ago ... 1d ago
    assert kept(plan_json(strun, "--keep-since", "3d12h")) == [600, 700, 800]
    assert kept(plan_json(strun, "--keep-since", "1h")) == [800]


def test_exp_spaced_is_a_fixed_grid():
    class C:
        def __init__(self, s):
            self.step = s

    cs = [C(s) for s in (0, 250, 500, 750, 1000, 1250, 1500, 2250, 4000, 9000)]
    assert [(c.step, t) for c, t in exp_spaced(cs)] == [
        (250, 250),
        (500, 500),
        (1000, 1000),
        (2250, 2000),
        (4000, 4000),
        (9000, 8000),
    ]
    assert exp_spaced([]) == [] and exp_spaced([C(0)]) == []


def test_guess_mode():
    assert [
        guess_mode(m)
        for m in ("eval_loss", "val_loss", "wer", "eval_accuracy", "val_acc", "bleu", "f1", "perplexity", "reward")
    ] == ["min", "min", "min", "max", "max", "max", "max", "min", "max"]


def test_guessed_mode_is_said(strun):
    r = cli("prune", strun, "--keep-best", "eval_loss")
    assert r.exit_code == 0 and "lower is better" in r.stderr and "--mode" in r.stderr
    assert "lower is better" not in cli("prune", strun, "--keep-best", "eval_loss", "--mode", "min").stderr


# ---- protections --------------------------------------------------------------------------------
def test_newest_always_kept(strun):
    doc = plan_json(strun, "--keep-steps", "100")
    assert kept(doc) == [100, 800]
    assert [c for c in doc["checkpoints"] if c["step"] == 800][0]["protected_by"] == ["newest"]


def test_alias_targets_protected(strun):
    os.symlink("model_00000200.safetensors", strun / "best.safetensors")
    doc = plan_json(strun, "--keep-last", "1")
    assert kept(doc) == [200, 800]
    assert "alias target: best.safetensors" in doc["checkpoints"][1]["protected_by"]


def test_hf_best_model_checkpoint_protected(tmp_path):
    root = hf_run(
        tmp_path / "out", steps=(500, 1000, 1500, 2000), eval_loss={500: 0.3, 1000: 0.7, 1500: 0.5, 2000: 0.6}
    )
    age_tree(root)
    doc = plan_json(root, "--keep-last", "1")
    assert kept(doc) == [500, 2000]
    assert doc["checkpoints"][0]["protected_by"] == ["best per trainer_state best_model_checkpoint"]


def test_lightning_best_and_last(tmp_path):
    root = lightning_run(
        tmp_path / "ckpts",
        steps=(100, 200, 300, 400, 500),
        val_loss={100: 0.9, 200: 0.2, 300: 0.7, 400: 0.8, 500: 0.6},
        last="copy",
    )
    age_tree(root)
    doc = plan_json(root, "--keep-last", "1")
    assert kept(doc) == [200, 500]
    by = {c["step"]: c for c in doc["checkpoints"]}
    assert any("best_model_path" in r for r in by[200]["protected_by"])
    assert "alias target: last.ckpt" in by[500]["protected_by"]
    assert not any(c["path"].endswith("last.ckpt") for c in doc["checkpoints"])  # a copy: never a candidate
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0
    assert sorted(p.name for p in root.iterdir()) == ["epoch=1-step=200.ckpt", "epoch=4-step=500.ckpt", "last.ckpt"]


def test_lightning_mode_from_callback(tmp_path):
    root = lightning_run(tmp_path / "ckpts", steps=(100, 200, 300), val_loss={100: 0.1, 200: 0.5, 300: 0.9})
    age_tree(root)
    r = cli("prune", root, "--keep-best", "val_loss", "-f", "json")
    assert kept(json.loads(r.stdout)) == [100, 300]
    assert "guessed" not in r.stderr


def test_young_checkpoints_protected(tmp_path):
    root = st_run(tmp_path / "run", steps=(1, 2, 3, 4))
    doc = plan_json(root, "--keep-last", "1")
    assert deleted(doc) == []
    assert all("under --min-age 2m" in " ".join(c["protected_by"]) for c in doc["checkpoints"])
    assert "3 checkpoint(s) kept only because" in cli("prune", root, "--keep-last", "1").stderr
    assert deleted(plan_json(root, "--keep-last", "1", "--min-age", "0")) == [1, 2, 3]
    age_tree(root, 600)
    assert deleted(plan_json(root, "--keep-last", "1", "--min-age", "1h")) == []
    assert deleted(plan_json(root, "--keep-last", "1", "--min-age", "5m")) == [1, 2, 3]


def test_broken_kept_unless_include_broken(strun):
    bad = strun / "step_250.safetensors"
    bad.write_bytes(b"\x00" * 5)
    set_mtime(bad, time.time() - 3600)
    doc = plan_json(strun, "--keep-last", "2")
    row = [c for c in doc["checkpoints"] if c["path"] == os.fspath(bad)][0]
    assert row["action"] == "keep" and "--include-broken" in row["reasons"][0] and row["error"]
    doc = plan_json(strun, "--keep-last", "2", "--include-broken")
    row = [c for c in doc["checkpoints"] if c["path"] == os.fspath(bad)][0]
    assert row["action"] == "delete"
    assert kept(doc) == [700, 800]  # a broken checkpoint is never one of the "last N"


def test_incomplete_protected(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000, 1500), eval_loss={500: 0.9, 1000: 0.8, 1500: 0.1})
    shutil.copytree(root / "checkpoint-500", root / "tmp-checkpoint-2000")
    (root / "checkpoint-1000" / "trainer_state.json").unlink()
    age_tree(root)
    doc = plan_json(root, "--keep-last", "1")
    by = {Path(c["path"]).name: c for c in doc["checkpoints"]}
    assert by["tmp-checkpoint-2000"]["action"] == "keep" and "incomplete" in by["tmp-checkpoint-2000"]["reasons"][0]
    assert by["checkpoint-1000"]["action"] == "keep" and "trainer_state.json" in by["checkpoint-1000"]["reasons"][0]
    assert by["checkpoint-500"]["action"] == "delete"
    assert by["checkpoint-1500"]["protected_by"] == ["newest", "best per trainer_state best_model_checkpoint"]
    doc = plan_json(root, "--keep-last", "1", "--include-broken")
    assert {Path(c["path"]).name for c in doc["checkpoints"] if c["action"] == "delete"} == {
        "tmp-checkpoint-2000",
        "checkpoint-1000",
        "checkpoint-500",
    }


def test_unknown_step_never_deleted(strun):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(strun / "weights.safetensors"))
    set_mtime(strun / "weights.safetensors", time.time() - 7200)
    doc = plan_json(strun, "--keep-last", "1")
    row = [c for c in doc["checkpoints"] if c["step"] is None][0]
    assert row["action"] == "keep" and "step unknown" in row["reasons"][0]


# ---- dry run, --yes, --trash --------------------------------------------------------------------
def test_dry_run_changes_nothing(strun):
    os.symlink("model_00000200.safetensors", strun / "last.safetensors")
    before = tree_hash(strun)
    for fmt in ("table", "json", "csv", "markdown"):
        r = cli("prune", strun, "--keep-last", "1", "--format", fmt)
        assert r.exit_code == 0
    r = run("prune", strun, "--keep-last", "2")
    assert r.returncode == 0 and "dry run" in r.stdout and "would delete 5" in r.stdout
    assert tree_hash(strun) == before


def test_yes_deletes_exactly_the_plan(tmp_path):
    root = hf_run(
        tmp_path / "out",
        steps=(500, 1000, 1500, 2000, 2500),
        eval_loss={500: 0.9, 1000: 0.2, 1500: 0.8, 2000: 0.7, 2500: 0.75},
    )
    (root / "runs").mkdir()
    (root / "runs" / "events.out.tfevents").write_bytes(b"x")
    (root / "README.md").write_text("notes")
    age_tree(root)
    doc = plan_json(root, "--keep-last", "2")
    planned = {p for c in doc["checkpoints"] if c["action"] == "delete" for p in c["files"]}
    assert {Path(c["path"]).name for c in doc["checkpoints"] if c["action"] == "delete"} == {
        "checkpoint-500",
        "checkpoint-1500",
    }
    before = tree_hash(root)
    r = run("prune", root, "--keep-last", "2", "--yes")
    assert r.returncode == 0, r.stderr
    after = tree_hash(root)
    gone = {k for k in before if k not in after}
    assert {os.fspath(root / k) for k in gone if before[k] != "dir"} == planned
    assert gone == {k for k in before if k.startswith(("checkpoint-500", "checkpoint-1500"))}
    assert all(after[k] == before[k] for k in after)
    assert "deleted 2 checkpoints" in r.stderr


def test_yes_json_result(strun):
    doc = plan_json(strun, "--keep-last", "6", "--yes")
    assert doc["dry_run"] is False
    assert doc["result"]["done"] == [
        os.fspath(strun / "model_00000100.safetensors"),
        os.fspath(strun / "model_00000200.safetensors"),
    ]
    assert doc["result"]["failed"] is None and doc["result"]["bytes_freed"] == doc["summary"]["bytes_freed"]
    assert sorted(p.name for p in strun.iterdir())[0] == "model_00000300.safetensors"


def test_trash_moves(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000, 1500), eval_loss={500: 0.9, 1000: 0.8, 1500: 0.1})
    st_run(root, steps=(7,), name="step_{step}.safetensors")
    age_tree(root)
    set_mtime(root / "step_7.safetensors", time.time() - 7200)  # not the last one written
    before = tree_hash(root)
    trash = tmp_path / "trash"
    r = cli("prune", root, "--keep-last", "1", "--trash", trash)  # no --yes: dry run
    assert r.exit_code == 0 and "move to" in r.stdout and not trash.exists()
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 0, r.output
    moved = trash / "out"
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-1000", "checkpoint-500", "step_7.safetensors"]
    for rel, h in before.items():
        if rel.startswith(("checkpoint-500", "checkpoint-1000", "step_7")):
            assert tree_hash(moved).get(rel, "").split(":")[0] == h.split(":")[0] or h == "dir"
            assert not os.path.lexists(root / rel)
    assert (root / "checkpoint-1500").is_dir()
    # again into the same trash: nothing overwritten
    st_run(root, steps=(7,), name="step_{step}.safetensors")
    set_mtime(root / "step_7.safetensors", time.time() - 7200)
    assert cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes").exit_code == 0
    assert (moved / "step_7.safetensors").is_file() and (moved / "step_7.safetensors.1").is_file()


def test_trash_inside_checkpoint_refused(strun):
    r = run("prune", strun, "--keep-last", "1", "--trash", strun / "model_00000100.safetensors" / "t", "--yes")
    assert r.returncode == 2 and "--trash" in r.stderr
    assert len(list(strun.iterdir())) == 8


# ---- safety -------------------------------------------------------------------------------------
def test_symlink_inside_checkpoint_is_not_followed(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"keep me")
    os.symlink(precious, root / "checkpoint-500" / "linked_dir")
    os.symlink(precious / "data.bin", root / "checkpoint-500" / "linked_file.bin")
    age_tree(root)
    set_mtime(root / "checkpoint-500", time.time() - 7200)  # linking touched the folder
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 0, r.output
    assert not os.path.lexists(root / "checkpoint-500")
    assert (precious / "data.bin").read_bytes() == b"keep me"


def test_symlinked_checkpoint_name_is_an_alias_not_a_candidate(tmp_path):
    outside = st_run(tmp_path / "elsewhere", steps=(1,))
    root = st_run(tmp_path / "run", steps=(10, 20))
    os.symlink(outside / "model_00000001.safetensors", root / "step_5.safetensors")
    age_tree(root)
    doc = plan_json(root, "--keep-last", "1", "--min-age", "0")
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20]
    cli("prune", root, "--keep-last", "1", "--yes")
    assert (outside / "model_00000001.safetensors").is_file() and os.path.islink(root / "step_5.safetensors")


def test_recheck_stops_on_changed_file(strun):
    runs = [scan_run(strun)]
    plan = make_plan(runs, Policy(keep_last=2))
    victims = sorted(d.ckpt.step for d in plan.to_delete)
    assert victims == [100, 200, 300, 400, 500, 600]
    target = strun / "model_00000300.safetensors"
    with open(target, "ab") as f:  # rewritten after the plan was made
        f.write(b" ")
    out = execute(plan)
    assert [d.ckpt.step for d in out.done] == [100, 200]
    assert out.failed.ckpt.step == 300 and "changed since the plan" in out.failed_message
    assert [d.ckpt.step for d in out.not_attempted] == [400, 500, 600]
    assert target.exists() and (strun / "model_00000400.safetensors").exists()
    assert not (strun / "model_00000100.safetensors").exists()


def test_recheck_new_file_in_folder(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000))
    age_tree(root)
    plan = make_plan([scan_run(root)], Policy(keep_last=1))
    (root / "checkpoint-500" / "late.bin").write_bytes(b"x")
    out = execute(plan)
    assert out.failed is not None and "appeared since the plan" in out.failed_message
    assert len(list((root / "checkpoint-500").iterdir())) == 7


def test_failure_through_cli_reports(strun, monkeypatch):
    import ckptctl.ops.prune_execute as pr  # where _verify lives and is called

    real = pr._verify
    calls = []

    def flaky(d):
        calls.append(d.ckpt.step)
        if len(calls) == 3:
            raise pr.PruneError("simulated: file changed")
        real(d)

    monkeypatch.setattr(pr, "_verify", flaky)
    r = cli("prune", strun, "--keep-last", "3", "--yes")
    assert r.exit_code == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "stopped at" in err[0] and "2 checkpoint(s) deleted, 3 not deleted" in err[0]
    assert "not deleted: " in r.stdout and "deleted: " in r.stdout
    assert sorted(p.name for p in strun.iterdir())[0] == "model_00000300.safetensors"


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "no retention policy"),
        (["--mode", "min", "--keep-last", "2"], "--mode only applies"),
        (["--best-n", "2", "--keep-last", "2"], "--best-n only applies"),
        (["--keep-best", "val_acc"], "val_acc"),
        (["--keep-steps", "1k"], "--keep-steps"),
        (["--keep-since", "7"], "invalid duration"),
        (["--min-age", "soon", "--keep-last", "1"], "invalid duration"),
        (["--keep-last", "0"], "--keep-last"),
    ],
)
def test_usage_errors(strun, args, needle):
    before = tree_hash(strun)
    r = run("prune", strun, *args, "--yes")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert tree_hash(strun) == before


def test_bad_targets(tmp_path, strun):
    (tmp_path / "empty").mkdir()
    r = run("prune", tmp_path / "empty", "--keep-last", "1")
    assert r.returncode == 1 and "no checkpoints found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("prune", tmp_path / "missing", "--keep-last", "1")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run("prune", strun / "model_00000100.safetensors", "--keep-last", "1")
    assert r.returncode == 2 and "run folder" in r.stderr
    hf = hf_run(tmp_path / "hf", steps=(1,))
    r = run("prune", hf / "checkpoint-1", "--keep-last", "1")
    assert r.returncode == 2 and "one checkpoint" in r.stderr


def test_missing_metric_on_some(tmp_path):
    root = st_run(tmp_path / "run", steps=(1, 2, 3), values={1: 0.5, 2: 0.1, 3: 0.3})
    st_run(root, steps=(4,), metric=None, name="step_{step}.safetensors")
    age_tree(root)
    r = cli("prune", root, "--keep-best", "eval_loss", "-f", "json")
    assert kept(json.loads(r.stdout)) == [2, 4]
    assert "1 checkpoint(s) have no 'eval_loss'" in r.stderr


def test_recursive_prunes_each_run(tmp_path):
    root = tmp_path / "lightning_logs"
    st_run(root / "version_0", steps=(1, 2, 3))
    st_run(root / "version_1", steps=(4, 5, 6))
    age_tree(root)
    doc = plan_json(root, "-R", "--keep-last", "1")
    assert kept(doc) == [3, 6] and deleted(doc) == [1, 2, 4, 5]
    r = run("prune", root, "--keep-last", "1")
    assert r.returncode == 1 and "--recursive" in r.stderr


def test_table_and_help(strun):
    r = run("prune", strun, "--keep-last", "2")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["action", "step", "path", "size", "why"]
    assert [ln.split()[0] for ln in lines[2:10]] == ["delete"] * 6 + ["keep"] * 2
    assert "would delete 6" in r.stdout and "frees" in r.stdout
    h = run("prune", "--help")
    assert h.returncode == 0 and "Examples" in h.stdout and "--keep-best" in h.stdout


def test_multi_file_layouts_deleted_whole(tmp_path):
    from run_builders import dcp_run, orbax_run, tf_bundle_bytes

    dcp = dcp_run(tmp_path / "dcp", steps=(100, 200, 300))
    orbax = orbax_run(tmp_path / "orbax", steps=(1000, 2000))
    tf = tmp_path / "tf"
    tf.mkdir()
    index, data = tf_bundle_bytes()  # a real bundle: the TF reader (when present) reads it
    for s in (1, 2, 3):
        (tf / f"ckpt-{s}.index").write_bytes(index)
        (tf / f"ckpt-{s}.data-00000-of-00001").write_bytes(data)
    (tf / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    for d in (dcp, orbax, tf):
        age_tree(d)
    for d in (dcp, orbax, tf):
        r = cli("prune", d, "--keep-last", "1", "--yes")
        assert r.exit_code == 0, r.output
    assert sorted(os.listdir(dcp)) == ["step_300"]
    assert sorted(os.listdir(orbax)) == ["2000"]
    assert sorted(os.listdir(tf)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
    ]


def test_sharded_group_into_trash(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    root = st_run(tmp_path / "run", steps=(10, 20))
    save_file({"a": np.ones(3, np.float32)}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(5, np.float32)}, str(root / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 32},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    age_tree(root)
    doc = plan_json(root, "--keep-last", "1")
    row = [c for c in doc["checkpoints"] if c["step"] is None][0]
    assert row["action"] == "keep" and "step unknown" in row["reasons"][0] and len(row["files"]) == 3
    index["metadata"]["step"] = 5  # now it has a step, and goes like any other checkpoint
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    # older than the step files, or the "newest (modified last)" protection would keep it: the
    # shards were written after step 20, which only shows on a clock finer than the file system's
    for n in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        set_mtime(root / n, time.time() - 7200)
    trash = tmp_path / "trash"
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes", "-f", "json")
    assert r.exit_code == 0, r.output
    assert sorted(d for d in json.loads(r.stdout)["result"]["moved_to"]) == sorted(
        os.fspath(root / n) for n in ("model.safetensors.index.json", "model_00000010.safetensors")
    )
    moved = trash / "run" / "model"
    assert sorted(os.listdir(moved)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(os.listdir(root)) == ["model_00000020.safetensors"]
