"""Tests written to kill mutants that survived `tools/mutation.sh convert` (docs/testing.md,
"Mutation testing"): where convert may write (the destination checks), how the staged output
gets DST's name (--force over a file and over a folder of shards), and what is left on disk.
In-process through the CLI (CliRunner), so mutmut can tie them to the code; outputs are read
back with safetensors / torch, never with ckptctl."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

torch = pytest.importorskip("torch")
stnp = pytest.importorskip("safetensors.numpy")

TENSORS = {f"layer{i}.w": np.arange(i * 10, i * 10 + 64, dtype=np.float32).reshape(8, 8) for i in range(4)}


def sha(p: Path) -> str:
    if p.is_dir():
        return "|".join(f"{c.name}:{sha(c)}" for c in sorted(p.iterdir()))
    return hashlib.sha256(p.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".ckptctl-" in p.name)


@pytest.fixture
def src(tmp_path) -> Path:
    p = tmp_path / "m.safetensors"
    stnp.save_file(TENSORS, str(p))
    return p


def shards_equal_source(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(stnp.load_file(str(folder / f)))
    assert sorted(got) == sorted(TENSORS)
    assert all(got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())


def test_force_replaces_an_existing_file_and_leaves_no_staging(tmp_path, src):
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"old output")
    r = cli("convert", src, dst)
    assert r.exit_code == 1 and "already exists (--force to overwrite)" in r.stderr
    assert dst.read_bytes() == b"old output"
    r = cli("convert", src, dst, "--force")
    assert r.exit_code == 0, r.stderr
    got = torch.load(dst, weights_only=True)
    assert all(got[k].numpy().tobytes() == v.tobytes() for k, v in TENSORS.items())
    assert leftovers(tmp_path) == []


def test_force_replaces_a_folder_of_shards_whole(tmp_path, src):
    dst = tmp_path / "shards"
    dst.mkdir()
    (dst / "stale-00001-of-00009.safetensors").write_bytes(b"from an older conversion")
    r = cli("convert", src, dst, "--max-shard-size", "600B")
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert sorted(os.listdir(dst)) == ["stale-00001-of-00009.safetensors"]
    r = cli("convert", src, dst, "--max-shard-size", "600B", "--force")
    assert r.exit_code == 0, r.stderr
    names = sorted(os.listdir(dst))
    assert "stale-00001-of-00009.safetensors" not in names  # the old folder went, not merged
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    shards_equal_source(dst)
    assert leftovers(tmp_path) == [] and leftovers(dst) == []
    assert dst.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_a_new_folder_of_shards_gets_the_umask_mode(tmp_path, src):
    dst = tmp_path / "new_shards"
    r = cli("convert", src, dst, "--max-shard-size", "600B")
    assert r.exit_code == 0, r.stderr
    shards_equal_source(dst)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert leftovers(tmp_path) == []


def test_force_does_not_replace_a_folder_with_a_file(tmp_path, src):
    dst = tmp_path / "out.safetensors"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = cli("convert", src, dst, "--force")
    assert r.exit_code == 1 and "is a folder" in r.stderr
    assert (dst / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_destination_in_a_missing_folder(tmp_path, src):
    r = cli("convert", src, tmp_path / "nope" / "out.pt")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_destination_that_is_the_source_under_another_name(tmp_path, src, kind):
    dst = tmp_path / "alias.safetensors"
    (os.symlink if kind == "symlink" else os.link)(src, dst)
    before = sha(src)
    for extra in ([], ["--force"]):
        r = cli("convert", src, dst, "--dtype", "bf16", *extra)
        assert r.exit_code == 2 and "is the source" in r.stderr, r.stderr
    assert sha(src) == before and os.path.lexists(dst)
    assert leftovers(tmp_path) == []


def test_a_dangling_symlink_destination_is_an_existing_destination(tmp_path, src):
    dst = tmp_path / "out.pt"
    os.symlink(tmp_path / "nowhere", dst)
    r = cli("convert", src, dst)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert dst.is_symlink() and not (tmp_path / "nowhere").exists()
    r = cli("convert", src, dst, "--force")
    assert r.exit_code == 0, r.stderr
    assert not dst.is_symlink() and not (tmp_path / "nowhere").exists()  # the link replaced, not followed
    assert sorted(torch.load(dst, weights_only=True)) == sorted(TENSORS)


def test_shards_into_the_folder_that_holds_the_source(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    stnp.save_file(TENSORS, str(folder / "m.safetensors"))
    before = sha(folder)
    r = cli("convert", folder / "m.safetensors", folder, "--max-shard-size", "600B", "--force")
    assert r.exit_code == 2 and "holds the source" in r.stderr
    assert sha(folder) == before
    # a sharded source folder converted over itself, or over one of its shards
    r = cli("convert", folder / "m.safetensors", tmp_path / "sh", "--max-shard-size", "600B")
    assert r.exit_code == 0, r.stderr
    before = sha(tmp_path / "sh")
    r = cli("convert", tmp_path / "sh", tmp_path / "sh", "--max-shard-size", "600B", "--force")
    assert r.exit_code == 2 and ("holds the source" in r.stderr or "is the source" in r.stderr), r.stderr
    shard = sorted((tmp_path / "sh").glob("*-of-*.safetensors"))[0]
    r = cli("convert", tmp_path / "sh", shard, "--force")
    assert r.exit_code == 2 and "is the source" in r.stderr, r.stderr
    assert sha(tmp_path / "sh") == before


def test_a_sharded_source_converts_to_one_file_equal_to_it(tmp_path, src):
    r = cli("convert", src, tmp_path / "sh", "--max-shard-size", "600B")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "one.safetensors"
    r = cli("convert", tmp_path / "sh", out)
    assert r.exit_code == 0, r.stderr
    got = stnp.load_file(str(out))
    assert sorted(got) == sorted(TENSORS) and all(got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())
    assert leftovers(tmp_path) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, src, monkeypatch):
    dst = tmp_path / "shards"
    r = cli("convert", src, dst, "--max-shard-size", "600B")
    assert r.exit_code == 0, r.stderr
    before = sha(dst)
    real_rename = os.rename
    moved: list[tuple[str, str]] = []

    def rename(a, b, *args, **kw):
        a, b = os.fspath(a), os.fspath(b)
        if b == os.fspath(dst) and ".ckptctl-tmp-" in a:  # the new folder into place: the disk says no
            raise OSError(5, "Input/output error", a)
        moved.append((a, b))
        return real_rename(a, b, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)
    r = cli("convert", src, dst, "--max-shard-size", "600B", "--force", "--dtype", "bf16")
    assert r.exit_code != 0
    assert sha(dst) == before  # the old output is back at DST
    assert leftovers(tmp_path) == []
    # where the old folder waited: beside DST, under a name a person can recognise
    old = Path(moved[0][1])
    assert moved[0][0] == os.fspath(dst) and old.parent == dst.parent
    assert old.name.startswith(".shards.ckptctl-old-")


def test_force_over_a_symlink_to_a_folder_replaces_the_link_not_its_target(tmp_path, src):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"not ckptctl's")
    dst = tmp_path / "shards"
    os.symlink(target, dst)
    r = cli("convert", src, dst, "--max-shard-size", "600B", "--force")
    assert r.exit_code == 0, r.stderr
    assert not dst.is_symlink() and dst.is_dir()
    shards_equal_source(dst)
    assert (target / "keep.bin").read_bytes() == b"not ckptctl's" and os.listdir(target) == ["keep.bin"]
    assert leftovers(tmp_path) == []
