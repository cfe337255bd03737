"""Tests written to kill mutants that survived `tools/mutation.sh prune` (docs/testing.md,
"Mutation testing"): prune's planner and deleter, through the CLI in-process.

A trash folder on another file system is simulated in-process: `os.rename` out of the run folder
fails with EXDEV, as the kernel says it (tests/test_faults.py does it for real with a tmpfs, in a
subprocess, which mutmut cannot tie to the code). Effects: bytes in the trash, sources gone or
untouched, no temporaries left, exit codes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import cli
from run_builders import age_tree, hf_run, set_mtime, st_run

real_rename = os.rename


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of a file, 'link:<target>' of a symlink, 'dir' of a folder."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = os.fspath(p.relative_to(root))
            out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else sha(p)
    return out


def temps(folder: Path) -> list[str]:
    return [os.fspath(p) for p in folder.rglob("*") if ".ckptctl-tmp-" in p.name] if folder.exists() else []


@pytest.fixture
def other_fs(monkeypatch):
    """Renames from inside `src_root` to anywhere outside it fail with EXDEV."""
    roots: list[str] = []

    def rename(src, dst, *a, **kw):
        s, d = os.path.abspath(src), os.path.abspath(dst)
        for r in roots:
            if s.startswith(r + os.sep) and not d.startswith(r + os.sep):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    return lambda root: roots.append(os.path.abspath(root))


def test_trash_on_another_file_system_copies_folders_and_files_then_deletes(tmp_path, other_fs):
    root = hf_run(tmp_path / "out", steps=(500, 1000, 1500), eval_loss={500: 0.9, 1000: 0.8, 1500: 0.1})
    sub = root / "checkpoint-500" / "nested"
    sub.mkdir()
    (sub / "extra.bin").write_bytes(b"nested bytes")
    os.symlink("../config.json", sub / "cfg_link")  # a relative link inside: copied as a link
    st_run(root, steps=(7,), name="step_{step}.safetensors")
    age_tree(root)
    t = time.time() - 7200
    set_mtime(root / "checkpoint-500", t)  # the files added above: not the last modified
    set_mtime(root / "step_7.safetensors", t)
    before = tree(root)
    other_fs(root)
    trash = tmp_path / "trash"
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes", "-f", "json")
    assert r.exit_code == 0, r.output
    moved = trash / "out"
    assert sorted(os.listdir(moved)) == ["checkpoint-1000", "checkpoint-500", "step_7.safetensors"]
    after = tree(moved)
    for rel, h in before.items():
        if rel.startswith(("checkpoint-500", "checkpoint-1000", "step_7")):
            assert after[rel] == h, rel  # every file byte for byte, the link as a link
            assert not os.path.lexists(root / rel)
    assert (root / "checkpoint-1500").is_dir()
    assert temps(trash) == [] and temps(root) == []
    moved_to = json.loads(r.stdout)["result"]["moved_to"]
    assert moved_to[os.fspath(root / "checkpoint-500")] == os.fspath(moved / "checkpoint-500")
    assert moved_to[os.fspath(root / "step_7.safetensors")] == os.fspath(moved / "step_7.safetensors")
    assert os.stat(moved / "step_7.safetensors").st_mtime == pytest.approx(t, abs=0.01)  # copy2 keeps it


def test_trash_on_another_file_system_twice_keeps_both_copies(tmp_path, other_fs):
    root = st_run(tmp_path / "run", steps=(10, 20))
    age_tree(root)
    other_fs(root)
    trash = tmp_path / "trash"
    first = sha(root / "model_00000010.safetensors")
    assert cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes").exit_code == 0
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.arange(5, dtype=np.float32)}, str(root / "model_00000010.safetensors"))  # a new step 10
    set_mtime(root / "model_00000010.safetensors", time.time() - 20000)  # older than step 20
    second = sha(root / "model_00000010.safetensors")
    assert second != first
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 0, r.output
    assert sha(trash / "run" / "model_00000010.safetensors") == first
    assert sha(trash / "run" / "model_00000010.safetensors.1") == second
    assert sorted(os.listdir(root)) == ["model_00000020.safetensors"]
    assert temps(trash) == []


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_copy_that_fails_leaves_the_source_and_no_temporary(tmp_path, other_fs, monkeypatch, layout):
    if layout == "file":
        root = st_run(tmp_path / "run", steps=(10, 20))
        victim = root / "model_00000010.safetensors"
    else:
        root = hf_run(tmp_path / "run", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
        victim = root / "checkpoint-500"
    age_tree(root)
    before = tree(root)
    other_fs(root)

    real_copy2, real_copytree = shutil.copy2, shutil.copytree
    copied: list[str] = []

    def full(src, dst, *a, **kw):  # the disk fills up part-way through a file
        if layout == "folder" and not copied:  # a folder: its first file still fits
            copied.append(src)
            return real_copy2(src, dst, *a, **kw)
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(dst))

    monkeypatch.setattr(shutil, "copy2", full)
    # copytree binds copy2 when it is defined: hand it the failing copy explicitly
    monkeypatch.setattr(
        shutil, "copytree", lambda src, dst, **kw: real_copytree(src, dst, **{**kw, "copy_function": full})
    )
    trash = tmp_path / "trash"
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 1
    assert "No space left on device" in r.stderr and r.stderr.count("error:") == 1
    assert tree(root) == before and victim.exists()
    assert temps(trash) == []
    # the next run, with space again, moves it
    monkeypatch.undo()
    assert cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes").exit_code == 0
    assert not victim.exists()


def test_trash_that_is_a_file_is_refused_before_anything_moves(tmp_path):
    root = st_run(tmp_path / "run", steps=(10, 20))
    age_tree(root)
    before = tree(root)
    trash = tmp_path / "trash"
    trash.write_bytes(b"not a folder")
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 2 and "exists and is not a folder" in r.stderr
    assert tree(root) == before and trash.read_bytes() == b"not a folder"


def test_trash_equal_to_a_checkpoint_folder_is_refused(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
    age_tree(root)
    before = tree(root)
    r = cli("prune", root, "--keep-last", "1", "--trash", root / "checkpoint-500", "--yes")
    assert r.exit_code == 2 and "lies inside" in r.stderr
    assert tree(root) == before
    # a sibling whose name starts like the checkpoint's is not inside it
    r = cli("prune", root, "--keep-last", "1", "--trash", root / "checkpoint-5000", "--yes")
    assert r.exit_code == 0, r.output
    assert (root / "checkpoint-5000" / "out" / "checkpoint-500").is_dir()


def test_exp_spacing_keeps_the_first_checkpoint_at_or_after_each_power_of_two(tmp_path):
    root = st_run(tmp_path / "run", steps=(0, 3, 5, 6, 13, 24, 25, 50, 97, 100))
    age_tree(root)
    r = cli("prune", root, "--exp-spacing", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    keep = sorted(c["step"] for c in doc["checkpoints"] if c["action"] == "keep")
    # grid from the smallest positive step: 3, 6, 12, 24, 48, 96 -> 3, 6, 13, 24, 50, 97; 100 is the newest
    assert keep == [3, 6, 13, 24, 50, 97, 100]
    why = {c["step"]: c["reasons"] for c in doc["checkpoints"]}
    assert "exponential spacing (first at/after step 12)" in why[13]
    assert "exponential spacing (first at/after step 96)" in why[97]


def test_exp_spacing_with_one_checkpoint_per_grid_point_and_a_gap(tmp_path):
    root = st_run(tmp_path / "run", steps=(2, 4, 8, 9, 200))
    age_tree(root)
    doc = json.loads(cli("prune", root, "--exp-spacing", "--format", "json").stdout)
    keep = sorted(c["step"] for c in doc["checkpoints"] if c["action"] == "keep")
    # 2, 4, 8, then 16, 32, 64, 128 all land on 200 (kept once), 256 > 200 ends the grid
    assert keep == [2, 4, 8, 200]
    why = {c["step"]: c["reasons"] for c in doc["checkpoints"]}
    assert [w for w in why[200] if "exponential" in w] == ["exponential spacing (first at/after step 16)"]


# ---- the re-check between plan and deletion (public make_plan / execute, as a caller would) ------
from ckptctl.ops.prune import Policy, execute, make_plan  # noqa: E402
from ckptctl.ops.runs import scan_run  # noqa: E402


def plan_for(root: Path, **policy):
    return make_plan([scan_run(root)], Policy(**policy))


def test_a_checkpoint_folder_swapped_for_a_symlink_after_planning_is_not_followed(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
    age_tree(root)
    plan = plan_for(root, keep_last=1)
    assert [d.ckpt.path.name for d in plan.to_delete] == ["checkpoint-500"]
    # the same files, now behind a symlink: every file still passes the per-file re-check
    os.rename(root / "checkpoint-500", root / ".moved")
    os.symlink(".moved", root / "checkpoint-500")
    before = tree(root / ".moved")
    out = execute(plan)
    assert out.failed is not None and out.done == []
    assert out.failed_message == f"{root / 'checkpoint-500'} is no longer a folder"
    assert tree(root / ".moved") == before and (root / "checkpoint-500").is_symlink()


def test_a_symlinked_folder_that_appears_inside_a_planned_checkpoint_stops_it(tmp_path):
    root = hf_run(tmp_path / "out", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
    age_tree(root)
    plan = plan_for(root, keep_last=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.bin").write_bytes(b"x")
    os.symlink(elsewhere, root / "checkpoint-500" / "new_link")
    before = tree(root / "checkpoint-500")
    out = execute(plan)
    assert (
        out.failed_message == f"{root / 'checkpoint-500' / 'new_link'} appeared since the plan was made "
        "(still being written?)"
    )
    assert tree(root / "checkpoint-500") == before and (elsewhere / "x.bin").exists()


def test_a_planned_file_that_disappeared_is_named(tmp_path):
    root = st_run(tmp_path / "run", steps=(10, 20, 30))
    age_tree(root)
    plan = plan_for(root, keep_last=1)
    (root / "model_00000010.safetensors").unlink()  # another prune got there first
    out = execute(plan)
    assert out.failed_message == f"{root / 'model_00000010.safetensors'} disappeared since the plan was made"
    assert (root / "model_00000020.safetensors").exists()  # stopped: nothing after it deleted
    assert [d.ckpt.path.name for d in out.not_attempted] == ["model_00000020.safetensors"]


@pytest.mark.parametrize("change", ["same_size_new_inode", "same_size_same_mtime_in_place", "resized_same_mtime"])
def test_a_planned_file_replaced_after_planning_is_not_deleted(tmp_path, change):
    root = st_run(tmp_path / "run", steps=(10, 20))
    age_tree(root)
    victim = root / "model_00000010.safetensors"
    plan = plan_for(root, keep_last=1)
    st0 = os.stat(victim)
    data = victim.read_bytes()
    new = data[:-1] + bytes([data[-1] ^ 0xFF])
    if change == "same_size_new_inode":  # a trainer re-saved it: same size and mtime, a new file
        tmp = root / "x.tmp"
        tmp.write_bytes(new)
        os.utime(tmp, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        os.replace(tmp, victim)
    elif change == "same_size_same_mtime_in_place":  # rewritten in place, mtime then bumped
        with open(victim, "r+b") as f:
            f.write(new)
        os.utime(victim, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1_000_000_000))
    else:  # grown in place, mtime put back
        with open(victim, "ab") as f:
            f.write(b"\0" * 16)
        os.utime(victim, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        new = data + b"\0" * 16
    out = execute(plan)
    assert out.failed_message == f"{victim} changed since the plan was made (size, mtime or inode)"
    assert victim.read_bytes() == new


def test_deletion_goes_oldest_step_first_whatever_the_mtimes(tmp_path, monkeypatch):
    root = st_run(tmp_path / "run", steps=(10, 20, 30, 40))
    age_tree(root)
    now = time.time()
    for i, s in enumerate((10, 20, 30)):  # mtimes in the reverse order of the steps
        set_mtime(root / f"model_{s:08d}.safetensors", now - 10000 + 1000 * (2 - i))
    plan = plan_for(root, keep_last=1)
    order: list[str] = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **kw: (order.append(Path(p).name), real_unlink(p, *a, **kw))[1])
    out = execute(plan)
    assert out.failed is None
    assert order == [f"model_{s:08d}.safetensors" for s in (10, 20, 30)]


@pytest.mark.parametrize("filename", [True, False])
def test_an_os_error_while_deleting_is_reported_with_its_file(tmp_path, monkeypatch, filename):
    root = st_run(tmp_path / "run", steps=(10, 20))
    age_tree(root)
    plan = plan_for(root, keep_last=1)
    victim = root / "model_00000010.safetensors"

    def refuse(p, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", *([os.fspath(p)] if filename else []))

    monkeypatch.setattr(os, "unlink", refuse)
    out = execute(plan)
    assert out.failed_message == f"{victim}: Permission denied"  # the checkpoint when the error names no file
    assert victim.exists() and out.partial == []


def test_a_file_removed_by_someone_else_during_deletion_is_named(tmp_path, monkeypatch):
    root = hf_run(tmp_path / "out", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
    age_tree(root)
    plan = plan_for(root, keep_last=1)
    [d] = plan.to_delete
    first, second = d.snapshot[0].path, d.snapshot[1].path
    real_unlink = os.unlink

    def racing(p, *a, **kw):
        if Path(p) == first:  # ours; meanwhile another prune removes the next one
            real_unlink(p)
            real_unlink(second)
            return None
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", racing)
    out = execute(plan)
    assert out.failed_message == f"{second} disappeared since the plan was made"
    assert out.partial == [first]
    r_json = out.to_json()
    assert r_json["partially_removed_files"] == [os.fspath(first)]


def test_exp_spacing_grid_starts_at_the_smallest_positive_step_even_one(tmp_path):
    root = st_run(tmp_path / "run", steps=(1, 2, 3, 5, 9, 17, 24))
    age_tree(root)
    doc = json.loads(cli("prune", root, "--exp-spacing", "--format", "json").stdout)
    keep = sorted(c["step"] for c in doc["checkpoints"] if c["action"] == "keep")
    assert keep == [1, 2, 5, 9, 17, 24]  # 1, 2, 4, 8, 16 -> 1, 2, 5, 9, 17; 24 the newest


def test_exp_spacing_reaches_a_last_step_on_the_grid(tmp_path):
    root = st_run(tmp_path / "run", steps=(3, 6, 12, 20, 24))
    age_tree(root)
    doc = json.loads(cli("prune", root, "--exp-spacing", "--format", "json").stdout)
    why = {c["step"]: c["reasons"] for c in doc["checkpoints"]}
    assert "exponential spacing (first at/after step 24)" in why[24]
    assert [c["step"] for c in doc["checkpoints"] if c["action"] == "delete"] == [20]


def test_too_many_earlier_copies_in_the_trash(tmp_path):
    root = st_run(tmp_path / "run", steps=(10, 20))
    age_tree(root)
    trash = tmp_path / "trash"
    (trash / "run").mkdir(parents=True)
    name = "model_00000010.safetensors"
    (trash / "run" / name).touch()
    for i in range(1, 10000):
        (trash / "run" / f"{name}.{i}").touch()
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 1 and "too many earlier copies in the trash" in r.stderr
    assert (root / name).exists() and not (trash / "run" / f"{name}.10000").exists()


@pytest.mark.parametrize("cross_fs", [False, True])
def test_a_two_file_checkpoint_moves_to_the_trash_as_a_folder_of_both(tmp_path, other_fs, cross_fs):
    from run_builders import tf_bundle_bytes

    root = tmp_path / "tf"
    root.mkdir()
    index, data = tf_bundle_bytes()
    for s in (1, 2):
        (root / f"ckpt-{s}.index").write_bytes(index)
        (root / f"ckpt-{s}.data-00000-of-00001").write_bytes(data + bytes([s]) if s == 1 else data)
    age_tree(root)
    set_mtime(root / "ckpt-1.index", time.time() - 7200)
    set_mtime(root / "ckpt-1.data-00000-of-00001", time.time() - 7200)
    want = {n: sha(root / n) for n in ("ckpt-1.index", "ckpt-1.data-00000-of-00001")}
    if cross_fs:
        other_fs(root)
    trash = tmp_path / "trash"
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 0, r.output
    moved = trash / "tf" / "ckpt-1"
    assert sorted(os.listdir(moved)) == sorted(want)  # both files, neither written over the other
    assert all(sha(moved / n) == h for n, h in want.items())
    assert sorted(os.listdir(root)) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert temps(trash) == []
    # a new ckpt-1 pruned into the same trash: a second folder, the first copy untouched
    for n in want:
        (root / n).write_bytes((root / n.replace("ckpt-1", "ckpt-2")).read_bytes())
        set_mtime(root / n, time.time() - 7200)
    r = cli("prune", root, "--keep-last", "1", "--trash", trash, "--yes")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(trash / "tf")) == ["ckpt-1", "ckpt-1.1"]
    assert all(sha(moved / n) == h for n, h in want.items())
    assert sorted(os.listdir(trash / "tf" / "ckpt-1.1")) == sorted(want)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_the_cross_file_system_copy_is_made_beside_its_destination_under_our_name(
    tmp_path, other_fs, monkeypatch, layout
):
    """A kill part-way leaves the temporary where the next run looks for it (clean_stale_temps)."""
    import re

    if layout == "file":
        root = st_run(tmp_path / "run", steps=(10, 20))
        final = tmp_path / "trash" / "run" / "model_00000010.safetensors"
    else:
        root = hf_run(tmp_path / "run", steps=(500, 1000), eval_loss={500: 0.9, 1000: 0.1})
        final = tmp_path / "trash" / "run" / "checkpoint-500"
    age_tree(root)
    other_fs(root)
    seen: list[Path] = []
    real_copy2, real_copytree = shutil.copy2, shutil.copytree
    monkeypatch.setattr(shutil, "copy2", lambda s, d, *a, **kw: (seen.append(Path(d)), real_copy2(s, d, *a, **kw))[1])
    monkeypatch.setattr(shutil, "copytree", lambda s, d, **kw: (seen.append(Path(d)), real_copytree(s, d, **kw))[1])
    r = cli("prune", root, "--keep-last", "1", "--trash", tmp_path / "trash", "--yes")
    assert r.exit_code == 0, r.output
    first = seen[0]
    assert first.parent == final.parent
    assert re.fullmatch(re.escape(f".{final.name}.ckptctl-tmp-") + r"[a-z0-9_]{8}", first.name), first.name
    assert final.exists() and not first.exists()
