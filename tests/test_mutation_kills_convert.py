"""Tests written to kill mutants that survived `tools/mutation.sh convert` (docs/testing.md,
"Mutation testing"): where convert may write (the destination checks), how the staged output
gets DST's name (--force over a file and over a folder of shards), and what is left on disk.
In-process through the CLI (CliRunner), so mutmut can tie them to the code; outputs are read
back with safetensors / torch, never with ckptctl."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from ckptctl.errors import CorruptFile, Incompatible
from ckptctl.ops import convert as cv
from ckptctl.ops import convert_verify, convert_write

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


# ---- second run (plan, destination, commit, verify): killing tests for its survivors ---------------
# Each test below names the planted bug (the mutant) it turns red on. Sources are tiny, written with
# torch / safetensors; outputs are read back with torch / safetensors, never with ckptctl.
def flat(text: str) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(text.split())


def error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and flat(lines[-1]).startswith("error:"), r.stderr
    return flat(r.stderr[r.stderr.index("error:") :])


def st_data_offset(path: Path, name: str) -> int:
    """File offset of tensor `name`'s first byte, from the safetensors header (parsed here)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


def flip_staged(monkeypatch, folder: Path, name: str, tensor: str, at: int) -> None:
    """When the output is staged (writeutil's pause hook), flip one byte of `tensor` in it."""

    def hook(stage):
        if stage == "staged":
            (tmp,) = [p for p in folder.iterdir() if ".ckptctl-tmp-" in p.name]
            f = tmp / name
            data = bytearray(f.read_bytes())
            data[st_data_offset(f, tensor) + at] ^= 0x08
            f.write_bytes(bytes(data))

    monkeypatch.setattr(convert_write, "pause_point", hook)


def pt_source(tmp_path: Path, sd: dict, name: str = "src.pt") -> Path:
    p = tmp_path / name
    torch.save(sd, p)
    return p


# -- plan_convert's defaults (the API: run_convert(plan_convert(src, dst))) --------------------------
def test_the_api_verifies_by_default_and_a_damaged_output_never_reaches_dst(tmp_path, src, monkeypatch):
    # mutant: verify=False as plan_convert's default (or the plan built without it)
    dst = tmp_path / "out.safetensors"
    flip_staged(monkeypatch, tmp_path, dst.name, "layer2.w", 5)
    plan = cv.plan_convert(src, dst)
    with pytest.raises(CorruptFile) as ei:
        cv.run_convert(plan)
    plan.close()
    assert str(ei.value) == f"{dst}: verify failed: tensor 'layer2.w' differs from the source at byte 5"
    assert not dst.exists() and leftovers(tmp_path) == []


def test_the_api_refuses_an_existing_destination_by_default(tmp_path, src):
    # mutant: force=True as the default
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"mine")
    with pytest.raises(Incompatible, match="already exists"):
        cv.plan_convert(src, dst)
    assert dst.read_bytes() == b"mine"


def test_the_api_default_keeps_tied_weights_and_writes_the_model_part_only(tmp_path):
    # mutants: dedupe_tied=True / all_=True as the defaults
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = pt_source(
        tmp_path,
        {
            "state_dict": {"emb.weight": w, "head.weight": w, "b": torch.ones(2)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
            "epoch": 1,
            "global_step": 10,
        },
    )
    dst = tmp_path / "out.safetensors"
    plan = cv.plan_convert(src, dst)
    res = cv.run_convert(plan)
    plan.close()
    got = stnp.load_file(str(dst))
    assert sorted(got) == ["b", "emb.weight", "head.weight"]  # both tied names stored, no optimizer
    assert got["head.weight"].tobytes() == w.numpy().tobytes() == got["emb.weight"].tobytes()
    # what the API reports is what is on disk
    assert res.dst == dst and res.outputs == [dst] and res.bytes_written == dst.stat().st_size


def test_the_api_default_metadata_mode_redacts_local_paths(tmp_path):
    # mutant: metadata="XXkeepXX" / "KEEP" as the default (refused as an unknown mode)
    p = tmp_path / "m.safetensors"
    stnp.save_file(TENSORS, str(p), metadata={"resume_from": "/home/alice/runs/7/last.ckpt", "lr": "0.1"})
    dst = tmp_path / "out.safetensors"
    plan = cv.plan_convert(p, dst)
    cv.run_convert(plan)
    plan.close()
    from safetensors import safe_open

    with safe_open(str(dst), "np") as f:
        meta = f.metadata()
    assert meta["resume_from"] == "<redacted>/last.ckpt" and meta["lr"] == "0.1"


# -- plan_convert through the CLI ------------------------------------------------------------------
def test_a_read_only_url_destination_is_refused_before_anything_is_read(tmp_path, src):
    # mutant: check_writable_target(None) (a closed port on loopback: nothing to wait for)
    url = "https://127.0.0.1:9/m.safetensors"
    r = cli("convert", src, url)
    assert r.exit_code == 2 and "https:// is read-only" in error_line(r), r.stderr


def test_max_shard_size_must_be_positive_and_one_byte_gives_a_shard_per_tensor(tmp_path, src):
    # mutants: `< 0` / `<= 1` for `<= 0`
    r = cli("convert", src, tmp_path / "zero", "--max-shard-size", "0")
    assert r.exit_code == 2 and error_line(r) == "error: --max-shard-size must be positive"
    assert not (tmp_path / "zero").exists()
    r = cli("convert", src, tmp_path / "one", "--max-shard-size", "1B")
    assert r.exit_code == 0, r.stderr
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    shards_equal_source(tmp_path / "one")


def test_to_names_the_format_of_a_destination_without_a_known_suffix(tmp_path, src):
    # mutant: target_format(dst, None, sharded) (--to ignored)
    dst = tmp_path / "weights.data"
    r = cli("convert", src, dst, "--to", "safetensors")
    assert r.exit_code == 0, r.stderr
    got = stnp.load_file(str(dst))
    assert all(got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())


def test_a_checkpoint_without_tensors_is_refused_in_one_line(tmp_path):
    # mutants: the reason `why` added when nothing is dangerous; the message or its path dropped
    src = pt_source(tmp_path, {"epoch": 3, "note": "hello"})
    r = cli("convert", src, tmp_path / "out.safetensors")
    assert r.exit_code == 1
    assert error_line(r) == f"error: {src}: no tensors in this checkpoint, nothing to convert"
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1",))


class _Exec:
    def __reduce__(self):
        return (exec, ("1",))


class _Call:
    def __reduce__(self):
        import subprocess

        return (subprocess.call, (["true"],))


def test_a_pickle_without_tensors_that_runs_code_names_the_first_three_calls(tmp_path):
    # mutants: the dangerous names dropped, joined otherwise, or four of them shown
    src = pt_source(tmp_path, {"a": _System(), "b": _Eval(), "c": _Exec(), "d": _Call()})
    r = cli("convert", src, tmp_path / "out.safetensors")
    assert r.exit_code == 1
    assert error_line(r) == (
        f"error: {src}: no tensors in this checkpoint, nothing to convert; it is a pickle that asks for "
        "posix.system, __builtin__.eval, __builtin__.exec, which runs code when loaded: do not load it"
    )
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]


def test_a_pickle_with_weights_that_runs_code_converts_with_a_warning_naming_the_file(tmp_path):
    # mutants: the plan built without `dangerous` (or with `info` None)
    src = pt_source(tmp_path, {"w": torch.ones(3), "evil": _System()})
    dst = tmp_path / "out.safetensors"
    r = cli("convert", src, dst)
    assert r.exit_code == 0, r.stderr
    assert f"warning: {src}: UNSAFE pickle: it asks for posix.system" in flat(r.stderr)
    assert sorted(stnp.load_file(str(dst))) == ["w"]


def test_reader_warnings_reach_stderr(tmp_path):
    # mutant: the plan built without the reader's warnings
    p = tmp_path / "m.safetensors"
    stnp.save_file(TENSORS, str(p), metadata={"ckptctl.aliases": "[1, 2]"})
    r = cli("convert", p, tmp_path / "out.pt")
    assert r.exit_code == 0, r.stderr
    assert f"warning: {p}: ignored __metadata__['ckptctl.aliases']: not a JSON object of names" in flat(r.stderr)


def test_include_add_prefix_and_rename_all_reach_the_selection(tmp_path, src):
    # mutants: include / add_prefix / rename not passed to select
    dst = tmp_path / "out.safetensors"
    r = cli("convert", src, dst, "--include", "layer[12].*", "--add-prefix", "model.", "--rename", r"\.w$=.weight")
    assert r.exit_code == 0, r.stderr
    got = stnp.load_file(str(dst))
    assert sorted(got) == ["model.layer1.weight", "model.layer2.weight"]
    assert got["model.layer2.weight"].tobytes() == TENSORS["layer2.w"].tobytes()


def _objects_source(tmp_path: Path, n: int) -> Path:
    sd = {"w": torch.ones(2)}
    for i in range(n):
        sd[f"o{i}"] = argparse.Namespace(i=i)  # distinct objects: a pickle lists each once
    return pt_source(tmp_path, sd, f"objs{n}.pt")


@pytest.mark.parametrize(
    "n,shown",
    [
        (1, "1 non-tensor object(s) not written: o0 (argparse.Namespace)"),
        (
            3,
            "3 non-tensor object(s) not written: o0 (argparse.Namespace), o1 (argparse.Namespace), o2 (argparse.Namespace)",
        ),
        (
            4,
            "4 non-tensor object(s) not written: o0 (argparse.Namespace), o1 (argparse.Namespace), "
            "o2 (argparse.Namespace) and 1 more",
        ),
    ],
)
def test_non_tensor_objects_are_named_in_a_note(tmp_path, n, shown):
    # mutants: the object list's filter, names, count, "and N more" thresholds
    src = _objects_source(tmp_path, n)
    r = cli("convert", src, tmp_path / "out.safetensors")
    assert r.exit_code == 0, r.stderr
    lines = [flat(ln) for ln in r.stderr.splitlines() if "non-tensor object" in ln]
    assert lines == [shown], r.stderr


def test_with_key_only_the_objects_under_it_are_named(tmp_path):
    # mutants: the `sel.root` filter of the object note (==, startswith, the "/" joined)
    src = pt_source(
        tmp_path,
        {
            "model": {"a": torch.ones(2), "cfg": argparse.Namespace(x=1)},
            "model_ema": {"a": torch.ones(2), "cfg": argparse.Namespace(x=2)},
            "other": argparse.Namespace(x=3),
        },
    )
    dst = tmp_path / "out.safetensors"
    r = cli("convert", src, dst, "--key", "model")
    assert r.exit_code == 0, r.stderr
    lines = [flat(ln) for ln in r.stderr.splitlines() if "non-tensor object" in ln]
    assert lines == ["1 non-tensor object(s) not written: model/cfg (argparse.Namespace)"], r.stderr
    assert sorted(stnp.load_file(str(dst))) == ["a"]


def test_a_single_top_level_part_gets_a_key_hint_unless_key_or_all_is_given(tmp_path):
    # mutants: the `not training_default and not key and not all_` test of the hint
    src = pt_source(tmp_path, {"model_state_dict": {"a": torch.ones(2), "b": torch.zeros(2)}})
    hint = "every tensor is under model_state_dict/: --key model_state_dict writes them without that prefix"
    r = cli("convert", src, tmp_path / "a.safetensors")
    assert r.exit_code == 0 and hint in flat(r.stderr), r.stderr
    for i, extra in enumerate((["--key", "model_state_dict"], ["--all"])):
        r = cli("convert", src, tmp_path / f"b{i}.safetensors", *extra)
        assert r.exit_code == 0 and "every tensor is under" not in r.stderr, r.stderr
    # a training checkpoint (written under state_dict/ by default) gets no hint either
    src = pt_source(tmp_path, {"state_dict": {"w": torch.ones(2)}, "epoch": 3, "global_step": 9}, "train.pt")
    r = cli("convert", src, tmp_path / "c.safetensors")
    assert r.exit_code == 0 and "every tensor is under" not in r.stderr, r.stderr
    assert sorted(stnp.load_file(str(tmp_path / "c.safetensors"))) == ["w"]


def test_dtype_leaves_scale_and_packed_floats_alone_and_says_which(tmp_path):
    # mutants: the `kept` list (not appended, appended twice, None) and its note
    w = torch.arange(6, dtype=torch.float32)
    e8 = torch.tensor([1.0, 2.0, 4.0, 0.5]).to(torch.float8_e8m0fnu)
    p4 = torch.tensor([1, 2, 3, 4], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    src = pt_source(tmp_path, {"w": w, "s": e8, "s2": e8.clone(), "p": p4})
    dst = tmp_path / "out.pt"
    r = cli("convert", src, dst, "--dtype", "bf16")
    assert r.exit_code == 0, r.stderr
    note = "--dtype bfloat16: tensors of dtype float8_e8m0fnu, float4_e2m1fn_x2 are not cast (scale/packed formats)"
    assert note in flat(r.stderr), r.stderr
    got = torch.load(dst, weights_only=True)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], w.to(torch.bfloat16))
    assert (
        got["s"].dtype == torch.float8_e8m0fnu and got["s"].view(torch.uint8).tolist() == e8.view(torch.uint8).tolist()
    )
    assert got["p"].dtype == torch.float4_e2m1fn_x2 and got["p"].view(torch.uint8).tolist() == [1, 2, 3, 4]


def test_a_dtype_the_target_cannot_hold_is_refused_by_the_plan(tmp_path):
    # mutant: check_target(None, outs) (the writer would refuse later, after the notes)
    src = pt_source(tmp_path, {"ok": torch.zeros(3), "z": torch.zeros(3, dtype=torch.complex128)})
    with pytest.raises(Incompatible, match="tensor 'z' has dtype complex128, which safetensors cannot hold"):
        cv.plan_convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]


@pytest.mark.parametrize("n", [6, 7])
def test_metadata_a_pt_file_cannot_hold_is_listed(tmp_path, n):
    # mutants: the torch-zip test, "format" filtered, the first 6 shown, " ..." after 6
    meta = {"format": "pt", **{f"k{i}": str(i) for i in range(n)}}
    p = tmp_path / "m.safetensors"
    stnp.save_file(TENSORS, str(p), metadata=meta)
    r = cli("convert", p, tmp_path / "out.pt")
    assert r.exit_code == 0, r.stderr
    (line,) = [flat(ln) for ln in r.stderr.splitlines() if "metadata not kept" in ln]
    head = "metadata not kept (a PyTorch state dict has no place for it): "
    assert line.startswith(head), line
    listed = line[len(head) :].removesuffix(" ...").split(", ")
    # the file's order (safetensors keeps metadata in a hash map): the first 6, never "format"
    assert len(listed) == 6 and len(set(listed)) == 6 and set(listed) <= {f"k{i}" for i in range(n)}, line
    assert line.endswith(" ...") == (n > 6), line
    r = cli("convert", p, tmp_path / "out.safetensors")
    assert r.exit_code == 0 and "metadata not kept" not in r.stderr, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), "np") as f:
        assert {k: v for k, v in f.metadata().items() if k.startswith("k")} == {f"k{i}": str(i) for i in range(n)}


@pytest.mark.parametrize("dedupe", [False, True])
def test_tied_weights_stay_in_one_shard_costed_as_stored(tmp_path, dedupe):
    # mutants: _layout given fmt None (a tie costed once in safetensors) or dedupe_tied None
    w = torch.arange(100, dtype=torch.float32)  # 400 bytes
    src = pt_source(tmp_path, {"emb": w, "head": w, "c": torch.ones(100)})
    dst = tmp_path / "shards"
    r = cli("convert", src, dst, "--max-shard-size", "900B", *(["--dedupe-tied"] if dedupe else []))
    assert r.exit_code == 0, r.stderr
    # stored twice (800 bytes) the tie fills a shard; stored once (400) it shares it with c
    if dedupe:
        assert sorted(os.listdir(dst)) == ["model.safetensors"]
        shards = ["model.safetensors"]
    else:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) == 2 and index["weight_map"]["emb"] == index["weight_map"]["head"], index
    got = {}
    for s in shards:
        got.update(stnp.load_file(str(dst / s)))
    assert sorted(got) == (["c", "emb"] if dedupe else ["c", "emb", "head"])
    assert got["emb"].tobytes() == w.numpy().tobytes()


# -- the destination checks ------------------------------------------------------------------------
def test_refusals_name_the_destination(tmp_path, src):
    # mutants: the Incompatible errors raised without DST's path
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"x")
    r = cli("convert", src, dst)
    assert r.exit_code == 1 and error_line(r) == f"error: {dst}: already exists (--force to overwrite)"
    folder = tmp_path / "f.safetensors"
    folder.mkdir()
    r = cli("convert", src, folder, "--force")
    assert r.exit_code == 1
    assert error_line(r) == f"error: {folder}: is a folder; --force replaces files only (or use --max-shard-size)"
    missing = tmp_path / "nope" / "out.pt"
    r = cli("convert", src, missing)
    assert r.exit_code == 1 and error_line(r) == f"error: {missing}: folder {missing.parent} does not exist"


def test_a_folder_named_like_a_file_that_holds_the_source_is_refused(tmp_path):
    # mutant: `sharded and dst.is_dir()` for `sharded or dst.is_dir()`
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    stnp.save_file(TENSORS, str(folder / "m.safetensors"))
    before = sha(folder)
    for extra in ([], ["--force"]):
        r = cli("convert", folder / "m.safetensors", folder, *extra)
        assert r.exit_code == 2 and "holds the source" in error_line(r), r.stderr
    assert sha(folder) == before


# -- commit ----------------------------------------------------------------------------------------
def test_the_api_reports_the_files_it_committed(tmp_path, src):
    # mutants: the outputs of a sharded commit (the index left out), the result's DST
    dst = tmp_path / "shards"
    plan = cv.plan_convert(src, dst, max_shard_size=600)
    res = cv.run_convert(plan)
    plan.close()
    on_disk = sorted(dst.iterdir())
    assert sorted(res.outputs) == on_disk and len(on_disk) == 3  # 2 shards + the index
    assert res.dst == dst and res.bytes_written == sum(p.stat().st_size for p in on_disk)
    assert res.verified_tensors == 4 and res.verified_bytes == sum(v.nbytes for v in TENSORS.values())


def test_an_fsync_failure_names_the_destination_and_leaves_nothing(tmp_path, src, monkeypatch):
    # mutant: wait_synced(None) (the error would name no file)
    import errno

    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous")

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    r = cli("convert", src, dst, "--force")
    assert r.exit_code == 1
    assert error_line(r) == f"error: {dst}: cannot write the output: Input/output error; nothing was written"
    assert dst.read_bytes() == b"previous" and leftovers(tmp_path) == []


# -- verify ----------------------------------------------------------------------------------------
def test_a_damaged_output_fails_the_cli_in_one_line_naming_dst(tmp_path, src, monkeypatch):
    # mutants: verify's errors raised without DST (`where = None`), the byte offset shifted
    dst = tmp_path / "out.safetensors"
    flip_staged(monkeypatch, tmp_path, dst.name, "layer3.w", 201)
    r = cli("convert", src, dst)
    assert r.exit_code == 1
    assert error_line(r) == f"error: {dst}: verify failed: tensor 'layer3.w' differs from the source at byte 201"
    assert not dst.exists() and leftovers(tmp_path) == []


def _staged(tmp_path: Path, src: Path, **kw):
    plan = cv.plan_convert(src, tmp_path / "out.safetensors", **kw)
    return plan, cv.write_output(plan)


def _rewrite(staged, tensors: dict) -> None:
    staged.out.unlink()
    stnp.save_file(tensors, str(staged.out))


def _verify_error(plan, staged) -> str:
    try:
        with pytest.raises(CorruptFile) as ei:
            cv.verify_output(plan, staged.out)
        return str(ei.value)
    finally:
        staged.discard()
        plan.close()


def test_verify_names_a_missing_and_an_unexpected_tensor(tmp_path, src):
    # mutants: the missing/extra lists, `and` for `or`, which name is quoted
    dst = tmp_path / "out.safetensors"
    plan, staged = _staged(tmp_path, src)
    _rewrite(staged, {k: v for k, v in TENSORS.items() if k != "layer1.w"})
    assert _verify_error(plan, staged) == f"{dst}: verify failed: output has 3 tensors, expected 4 (missing 'layer1.w')"
    plan, staged = _staged(tmp_path, src)
    _rewrite(staged, {**TENSORS, "stray": np.zeros(2, np.float32)})
    assert _verify_error(plan, staged) == f"{dst}: verify failed: output has 5 tensors, expected 4 (unexpected 'stray')"
    assert leftovers(tmp_path) == []


def test_verify_names_a_tensor_of_the_wrong_dtype_or_shape(tmp_path, src):
    # mutants: `and` for `or` in the structure check, `==` for `!=`, the shapes compared with None
    dst = tmp_path / "out.safetensors"
    plan, staged = _staged(tmp_path, src)
    _rewrite(staged, {**TENSORS, "layer2.w": TENSORS["layer2.w"].view(np.int32)})
    assert (
        _verify_error(plan, staged) == f"{dst}: verify failed: tensor 'layer2.w' is int32[8, 8], expected float32[8, 8]"
    )
    plan, staged = _staged(tmp_path, src)
    _rewrite(staged, {**TENSORS, "layer2.w": TENSORS["layer2.w"].reshape(4, 16)})
    assert (
        _verify_error(plan, staged)
        == f"{dst}: verify failed: tensor 'layer2.w' is float32[4, 16], expected float32[8, 8]"
    )


def test_verify_of_an_unreadable_output_says_so_naming_dst(tmp_path, src):
    # mutants: the "cannot read the output back" error without its message or DST
    dst = tmp_path / "out.safetensors"
    plan, staged = _staged(tmp_path, src)
    staged.out.write_bytes(b"\xff" * 64)
    err = _verify_error(plan, staged)
    assert err.startswith(f"{dst}: verify: cannot read the output back (") and err.endswith(")"), err


def test_verify_compares_the_second_copy_of_a_tied_weight(tmp_path):
    # mutants: `or` / `is None` in the alias test: a tie stored twice (safetensors) was skipped
    w = torch.arange(64, dtype=torch.float32)
    src = pt_source(tmp_path, {"emb": w, "head": w, "b": torch.ones(4)})
    plan, staged = _staged(tmp_path, src)
    (alias,) = [t.name for t in plan.files[0].tensors if t.alias_of is not None]
    data = bytearray(staged.out.read_bytes())
    data[st_data_offset(staged.out, alias) + 9] ^= 1
    staged.out.write_bytes(bytes(data))
    assert _verify_error(plan, staged).endswith(f"verify failed: tensor {alias!r} differs from the source at byte 9")


def test_verify_counts_every_tensor_of_a_tied_pt_output(tmp_path):
    # mutants: the counts (n, bytes) around an alias, `break` for `continue` after it
    w = torch.arange(64, dtype=torch.float32)
    z = torch.arange(10, dtype=torch.int64)
    src = pt_source(tmp_path, {"emb": w, "head": w, "z": z, "last": torch.ones(3, dtype=torch.float16)})
    plan = cv.plan_convert(src, tmp_path / "out.pt")
    staged = cv.write_output(plan)
    try:
        assert cv.verify_output(plan, staged.out) == (4, 64 * 4 + 10 * 8 + 3 * 2)
    finally:
        staged.discard()
        plan.close()


@pytest.fixture
def small_pieces(monkeypatch):
    """Every tensor of 1 KiB or more takes verify's parallel path, in pieces of 4 KiB."""
    monkeypatch.setattr(convert_verify, "VERIFY_WORKERS", 2)
    monkeypatch.setattr(convert_verify, "VERIFY_PIECE", 4096)


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.float32])
def test_cast_outputs_verify_on_the_parallel_path_settings(tmp_path, small_pieces, src_dtype):
    # mutants: a cast tensor sent to the parallel byte compare (fp16 -> bf16 has the same size:
    # raw source bytes against cast bytes), the parallel test's `and`s turned to `or`
    g = torch.Generator().manual_seed(2)
    sd = {"a": torch.randn(3000, generator=g).to(src_dtype), "b": torch.randn(700, generator=g).to(src_dtype)}
    src = pt_source(tmp_path, sd)
    plan, staged = _staged(tmp_path, src, dtype="bf16")
    seen: list[int] = []
    try:
        assert cv.verify_output(plan, staged.out, progress=seen.append) == (2, 3700 * 2)
    finally:
        staged.discard()
        plan.close()
    assert sum(seen) == 3700 * 2


# -- a remote DST or source (moto's S3 server on loopback, in-process so mutmut can tie the tests) --
BUCKET = "mutkills"


@pytest.fixture
def s3(s3_env):
    import boto3

    c = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    try:
        c.create_bucket(Bucket=BUCKET)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        c.delete_object(Bucket=BUCKET, Key=o["Key"])
    return c


def s3_keys(c) -> list[str]:
    return sorted(o["Key"] for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def s3_tensors(c, key: str) -> dict:
    return stnp.load(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_convert_to_s3_in_process_checks_dst_and_commits_one_object(s3, src):
    # mutants: DST a local Path for a URL, the remote destination checks given wrong arguments,
    # the remote commit given wrong arguments, verify's remote read order given None
    url = f"s3://{BUCKET}/out/m.safetensors"
    r = cli("convert", src, url)
    assert r.exit_code == 0, r.stderr
    assert "verified 4 tensors bit-exact" in flat(r.stderr)  # the remote commit reports verify's count
    assert s3_keys(s3) == ["out/m.safetensors"]  # no temporary left beside it
    got = s3_tensors(s3, "out/m.safetensors")
    assert sorted(got) == sorted(TENSORS) and all(got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())
    r = cli("convert", src, url)
    assert r.exit_code == 1 and error_line(r) == f"error: {url}: already exists (--force to overwrite)"
    r = cli("convert", url, url, "--force")
    assert r.exit_code == 2 and "is the source" in error_line(r)
    before = s3.get_object(Bucket=BUCKET, Key="out/m.safetensors")["Body"].read()
    r = cli("convert", src, url, "--force", "--dtype", "fp16")
    assert r.exit_code == 0, r.stderr
    assert s3.get_object(Bucket=BUCKET, Key="out/m.safetensors")["Body"].read() != before
    assert s3_tensors(s3, "out/m.safetensors")["layer0.w"].dtype == np.float16


def test_convert_to_an_s3_folder_of_shards_in_process(s3, src):
    # mutants: `sharded` dropped from the remote destination checks
    url = f"s3://{BUCKET}/sh"
    r = cli("convert", src, url, "--max-shard-size", "600B")
    assert r.exit_code == 0, r.stderr
    keys = s3_keys(s3)
    assert keys == [
        "sh/model-00001-of-00002.safetensors",
        "sh/model-00002-of-00002.safetensors",
        "sh/model.safetensors.index.json",
    ]
    got = {}
    for k in keys[:2]:
        got.update(s3_tensors(s3, k))
    assert sorted(got) == sorted(TENSORS) and all(got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())
    r = cli("convert", src, url, "--max-shard-size", "600B")
    assert r.exit_code == 1 and error_line(r) == f"error: {url}: already exists (--force to overwrite)"


def test_convert_from_s3_in_process_verifies_what_it_wrote(s3, src, tmp_path, monkeypatch):
    # mutants: verify's read order for a remote source given None
    s3.upload_file(str(src), BUCKET, "in/m.safetensors")
    dst = tmp_path / "out.pt"
    r = cli("convert", f"s3://{BUCKET}/in/m.safetensors", dst)
    assert r.exit_code == 0, r.stderr
    got = torch.load(dst, weights_only=True)
    assert all(got[k].numpy().tobytes() == v.tobytes() for k, v in TENSORS.items())
    dst2 = tmp_path / "out.safetensors"
    flip_staged(monkeypatch, tmp_path, dst2.name, "layer1.w", 17)
    r = cli("convert", f"s3://{BUCKET}/in/m.safetensors", dst2)
    assert r.exit_code == 1
    assert error_line(r) == f"error: {dst2}: verify failed: tensor 'layer1.w' differs from the source at byte 17"
    assert not dst2.exists()


def test_verify_in_a_forked_child_of_a_process_that_already_verified(tmp_path, src, small_pieces):
    """The shared worker pool, started by a first verify, must not be inherited threadless by a
    forked child (mutmut's workers, ls's fork pool): there a submitted piece never ran and verify
    waited forever."""
    import signal
    import time

    big = tmp_path / "big.safetensors"
    stnp.save_file({"a": np.arange(4096, dtype=np.float32), "b": np.ones(3000, np.float32)}, str(big))
    plan, staged = _staged(tmp_path, big)
    try:
        assert cv.verify_output(plan, staged.out) == (2, 7096 * 4)  # the pool is running now
        pid = os.fork()
        if pid == 0:  # the child: verify again, on the parallel path
            code = 1
            try:
                code = 0 if cv.verify_output(plan, staged.out) == (2, 7096 * 4) else 1
            finally:
                os._exit(code)
        for _ in range(600):  # a hang guard, not a speed check: 60 s for 28 KB
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("verify in a forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        staged.discard()
        plan.close()


# ---- written after the run, from its survivors (planted by hand: red) -----------------------------
@pytest.mark.parametrize("shards", [False, True])
def test_a_full_disk_while_writing_names_dst_and_leaves_nothing(tmp_path, src, monkeypatch, shards):
    # mutants: write_output's OSError message (strerror, the path) and its cleanup
    import errno

    from ckptctl.formats import writeutil

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", False)
    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "write", full)
    dst = tmp_path / ("sh" if shards else "out.pt")
    r = cli("convert", src, dst, *(["--max-shard-size", "600B"] if shards else []))
    assert r.exit_code == 1, r.stderr
    assert (
        flat(r.stderr[r.stderr.index("error:") :])
        == f"error: {dst}: cannot write the output: No space left on device; nothing was written"
    )
    assert not dst.exists() and leftovers(tmp_path) == []


def test_a_conversion_leaves_no_descriptor_open(tmp_path, src):
    # mutants: Staged.release (the staging folder's lock descriptor never closed)
    before = sorted(os.listdir("/proc/self/fd"))
    for i, extra in enumerate(([], ["--max-shard-size", "600B"], ["--no-verify"])):
        r = cli(
            "convert",
            src,
            tmp_path / f"o{i}.safetensors" if not extra or extra[0] != "--max-shard-size" else tmp_path / f"o{i}",
            *extra,
        )
        assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("mode", ["all", "drop"])
def test_metadata_mode_reaches_the_written_file(tmp_path, mode):
    # mutant: carry_metadata called without the mode (always "keep")
    p = tmp_path / "m.safetensors"
    stnp.save_file(TENSORS, str(p), metadata={"resume_from": "/home/alice/runs/7/last.ckpt", "lr": "0.1"})
    dst = tmp_path / "out.safetensors"
    r = cli("convert", p, dst, "--metadata", mode)
    assert r.exit_code == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(dst), "np") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "format"}
    assert meta == ({"resume_from": "/home/alice/runs/7/last.ckpt", "lr": "0.1"} if mode == "all" else {})


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("shards", [False, True])
def test_a_conversion_says_nothing_on_stderr_but_its_lines(tmp_path, src, shards):
    # mutants: the background fsync thread dying of a TypeError (fsync(None), fsync_dir(None)):
    # the files were never fsynced and Python printed the thread's traceback
    dst = tmp_path / ("sh" if shards else "out.safetensors")
    r = cli("convert", src, dst, *(["--max-shard-size", "600B"] if shards else []))
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr
