"""Faults survived on purpose: real `python -m ckptctl` processes SIGKILLed part-way, a full disk,
concurrent prunes, a prune racing a writer, links to the source as DST, --trash on another file
system, and names that are not valid UTF-8 coming out as valid JSON.

Processes are stopped at a named stage with CKPTCTL_TEST_PAUSE_AT=<stage> (writeutil.pause_point:
the process prints "paused at <stage>" on stderr and SIGSTOPs itself), then SIGKILLed or let go on
with SIGCONT. Inputs are written with torch / safetensors / h5py; outputs are read back with them.
Every process is bounded in time (TIMEOUT).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from run_builders import age_tree, hf_run, st_run

TIMEOUT = 120
TMP_TAG = ".ckptctl-tmp-"


# ---- helpers ------------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if TMP_TAG in p.name or ".ckptctl-old-" in p.name)


def env_with(**kw) -> dict:
    env = dict(os.environ)
    env.pop("CKPTCTL_DEBUG", None)
    env.pop("CKPTCTL_TEST_PAUSE_AT", None)
    env.update(kw)
    return env


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """A test that fails while a process is stopped must not leave it behind."""
    yield
    while _STARTED:
        p = _STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=TIMEOUT)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt as it does for a user's Ctrl-C. A process started with SIGINT ignored (a
    background job of a non-interactive shell, nohup, some CI runners) passes SIG_IGN on, and
    Python keeps an inherited SIG_IGN: the Ctrl-C tests would see the signal ignored (exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Paused:
    """`python -m ckptctl ARGS` stopped at `stage`; then .kill() or .resume()."""

    def __init__(self, args, stage: str):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ckptctl", *map(os.fspath, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env_with(CKPTCTL_TEST_PAUSE_AT=stage),
            preexec_fn=_default_sigint,
        )
        _STARTED.append(self.p)
        self.err = b""
        deadline = time.monotonic() + TIMEOUT
        want = f"paused at {stage}".encode()
        while want not in self.err:
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                self.p.kill()
                out, err = self.p.communicate()
                pytest.fail(f"never reached stage {stage}: rc={self.p.returncode} {(self.err + err).decode()}")
            r, _, _ = select.select([self.p.stderr], [], [], left)
            if r:
                chunk = os.read(self.p.stderr.fileno(), 65536)
                self.err += chunk
        while _state(self.p.pid) != "T":  # wait until it has really stopped itself
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.communicate(timeout=TIMEOUT)
        assert self.p.returncode == -signal.SIGKILL

    def resume(self) -> subprocess.CompletedProcess:
        self.p.send_signal(signal.SIGCONT)
        out, err = self.p.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(self.p.args, self.p.returncode, out.decode(), (self.err + err).decode())


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def source_pt(path: Path, n: int = 4, numel: int = 1 << 18) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)}
    sd["step"] = torch.tensor(7)
    torch.save(sd, path)
    return sd


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].contiguous().view(-1).numpy().tobytes() == want[k].contiguous().view(-1).numpy().tobytes(), k


def load_output(path: Path) -> dict:
    """DST read back with the producer's own library."""
    import torch
    from safetensors.torch import load_file

    if path.is_dir():
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)  # our own output of trusted test tensors
    raise AssertionError(path)


# ---- SIGKILL part-way ---------------------------------------------------------------------------
CONVERT_STAGES = [
    ("out.safetensors", [], "tensor-written"),  # after the first tensor's bytes
    ("out.safetensors", [], "commit"),  # the whole file written, not yet renamed in the staging folder
    ("out.safetensors", [], "staged"),  # staged, before verify
    ("out.safetensors", [], "swap-in"),  # verified and fsynced, not yet at DST
    ("out.pt", [], "tensor-written"),
    ("out.pt", [], "swap-in"),
    ("shards", ["--max-shard-size", "1MB"], "tensor-written"),
    ("shards", ["--max-shard-size", "1MB"], "swap-in"),
]


@pytest.mark.parametrize("dst_name,extra,stage", CONVERT_STAGES, ids=lambda v: str(v))
def test_convert_killed_then_rerun(tmp_path, dst_name, extra, stage):
    src = tmp_path / "src.pt"
    sd = source_pt(src)
    before = sha(src)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / dst_name
    Paused(["convert", src, dst, *extra], stage).kill()
    assert not dst.exists(), "a killed convert left a partial DST"
    assert sha(src) == before
    left = leftovers(out)
    assert left and all(n.startswith(f".{dst_name}{TMP_TAG}") for n in left), left
    time.sleep(0.05)  # the next run starts strictly after the leftovers were last touched

    p = run("convert", src, dst, *extra, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stderr.splitlines() if "left by an interrupted ckptctl run" in line]
    assert len(notes) == len(left) and all(n.startswith("note: removed ") for n in notes), p.stderr
    assert leftovers(out) == []
    assert_same_tensors(load_output(dst), sd)
    assert sha(src) == before


@pytest.mark.parametrize("delay", [0.0, 0.4, 0.9, 1.6, 2.5])
def test_convert_killed_after_a_delay(tmp_path, delay):
    """Wherever the kill lands: DST absent or complete and valid, the source unchanged."""
    src = tmp_path / "src.pt"
    sd = source_pt(src, n=8)
    before = sha(src)
    dst = tmp_path / "out.safetensors"
    p = subprocess.Popen(
        [sys.executable, "-m", "ckptctl", "convert", src, dst],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env_with(),
    )
    _STARTED.append(p)
    time.sleep(delay)
    p.kill()
    p.wait(timeout=TIMEOUT)
    assert sha(src) == before
    if dst.exists():
        assert_same_tensors(load_output(dst), sd)
    time.sleep(0.05)
    r = run("convert", src, tmp_path / "again.safetensors", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    # the next convert into the same folder (another DST) leaves the killed one's leftovers alone:
    # only DST's own temporaries are its business; a convert to DST itself removes them
    if not dst.exists():
        p = run("convert", src, dst, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
    assert leftovers(tmp_path) == []
    assert_same_tensors(load_output(dst), sd)


def _st_inputs(tmp_path: Path, n: int = 3):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    arrays = []
    paths = []
    for i in range(n):
        a = {"w": rng.standard_normal(1 << 16).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32)}
        p = tmp_path / f"in{i}.safetensors"
        save_file(a, p)
        arrays.append(a)
        paths.append(p)
    return paths, arrays


@pytest.mark.parametrize("stage", ["tensor-written", "commit"])
def test_average_killed_then_rerun(tmp_path, stage):
    from safetensors.numpy import load_file

    paths, arrays = _st_inputs(tmp_path)
    before = [sha(p) for p in paths]
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "avg.safetensors"
    Paused(["average", *paths, "-o", dst], stage).kill()
    assert not dst.exists()
    assert [sha(p) for p in paths] == before
    left = leftovers(out)
    assert len(left) == 1 and left[0].startswith(f".avg.safetensors{TMP_TAG}"), left
    time.sleep(0.05)
    p = run("average", *paths, "-o", dst, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert f"note: removed {out / left[0]}, left by an interrupted ckptctl run" in p.stderr
    assert leftovers(out) == []
    got = load_file(dst)
    for k in ("w", "b"):
        want = (np.mean([a[k].astype(np.float64) for a in arrays], axis=0)).astype(np.float32)
        assert got[k].tobytes() == want.tobytes(), k


def test_cleanup_spares_a_live_writer_and_foreign_names(tmp_path):
    """A temporary of a run still going (locked), a name that is not ours, or one newer than the
    running process is never removed."""
    paths, _ = _st_inputs(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "avg.safetensors"
    live = Paused(["average", *paths, "-o", dst], "tensor-written")  # older than the next process
    try:
        foreign = [
            out / ".avg.safetensors.ckptctl-tmp-mine",
            out / "avg.safetensors.ckptctl-tmp-abcdefgh",
            out / ".other.safetensors.ckptctl-tmp-abcdefgh",
        ]
        for f in foreign:
            f.write_bytes(b"not ours")
            os.utime(f, (1, 1))
        live_tmp = [
            out / n
            for n in leftovers(out)
            if n.startswith(f".avg.safetensors{TMP_TAG}") and n not in {f.name for f in foreign}
        ]
        assert len(live_tmp) == 1
        time.sleep(0.05)
        p = run("average", *paths, "-o", out / "second.safetensors", timeout=TIMEOUT)
        assert p.returncode == 0 and "interrupted" not in p.stderr, p.stderr
        p = run("average", *paths, "-o", dst, "--force", timeout=TIMEOUT)  # same DST: its temporaries
        assert p.returncode == 0, p.stderr
        assert "interrupted" not in p.stderr, p.stderr  # the live one is locked, the others not ours
        assert live_tmp[0].exists() and all(f.read_bytes() == b"not ours" for f in foreign)
    finally:
        live.kill()


def test_prune_trash_killed_between_copy_and_delete(tmp_path, other_fs):
    """--trash on another file system, killed after the copy is complete but before the source
    is deleted: the checkpoint is still in the run, whole; the next run moves it and removes the
    half-done temporary in the trash."""
    root = st_run(tmp_path / "run", steps=(100, 200, 300))
    age_tree(root, 3600)
    before = tree_sha(root)
    trash = other_fs / "trash"
    Paused(["prune", root, "--keep-last", "1", "--trash", trash, "--yes"], "trash-copied").kill()
    assert tree_sha(root) == before  # nothing deleted before its copy was renamed into place
    moved = trash / "run"
    assert [p.name for p in moved.iterdir() if TMP_TAG not in p.name] == []
    assert any(TMP_TAG in p.name for p in moved.iterdir())
    time.sleep(0.05)
    p = run("prune", root, "--keep-last", "1", "--trash", trash, "--yes", timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert "left by an interrupted ckptctl run" in p.stderr
    assert sorted(os.listdir(root)) == ["model_00000300.safetensors"]
    assert tree_sha(moved) == {k: v for k, v in before.items() if "300" not in k}


def test_prune_killed_between_checkpoints(tmp_path):
    root = st_run(tmp_path / "run", steps=(100, 200, 300, 400))
    age_tree(root, 3600)
    before = tree_sha(root)
    trash = tmp_path / "trash"
    Paused(["prune", root, "--keep-last", "1", "--trash", trash, "--yes"], "pruned-one").kill()
    assert sorted(os.listdir(root)) == [
        "model_00000200.safetensors",
        "model_00000300.safetensors",
        "model_00000400.safetensors",
    ]
    assert tree_sha(trash / "run") == {"model_00000100.safetensors": before["model_00000100.safetensors"]}
    p = run("prune", root, "--keep-last", "1", "--trash", trash, "--yes", timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert tree_sha(trash / "run") == {k: v for k, v in before.items() if "400" not in k}
    assert tree_sha(root) == {"model_00000400.safetensors": before["model_00000400.safetensors"]}


# ---- another file system: tmpfs -----------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", os.fspath(mnt)], capture_output=True, text=True, timeout=30
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, timeout=30)


@pytest.fixture
def other_fs(tmp_path):
    """A folder on another file system than tmp_path: a fresh tmpfs as root, else /dev/shm."""
    if os.geteuid() == 0:
        mnt = tmp_path / "otherfs"
        mnt.mkdir()
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", os.fspath(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if p.returncode == 0:
            try:
                yield mnt
            finally:
                subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, timeout=30)
            return
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (not root, and /dev/shm absent or on the same device)")
    import tempfile

    d = Path(tempfile.mkdtemp(dir=shm))
    try:
        yield d
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "dst_name,extra", [("out.safetensors", []), ("out.pt", []), ("shards", ["--max-shard-size", "1MB"])]
)
def test_full_disk(tmp_path, tmpfs, dst_name, extra):
    src = tmp_path / "src.pt"
    source_pt(src, n=3, numel=1 << 18)  # 3 MiB of floats: does not fit in 2 MiB
    before = sha(src)
    p = run("convert", src, tmpfs / dst_name, *extra, timeout=TIMEOUT)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left" in lines[0], p.stderr
    assert p.stdout == ""
    assert os.listdir(tmpfs) == []  # nothing left behind, not even a temporary
    assert sha(src) == before


def test_full_disk_average(tmp_path, tmpfs):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"in{i}.safetensors")
        save_file({"w": rng.standard_normal(3 << 18).astype(np.float32)}, paths[-1])
    before = [sha(p) for p in paths]
    p = run("average", *paths, "-o", tmpfs / "avg.safetensors", timeout=TIMEOUT)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left" in lines[0], p.stderr
    assert os.listdir(tmpfs) == [] and [sha(p) for p in paths] == before


@pytest.mark.parametrize("kind", ["files", "folders"])
def test_trash_on_another_file_system(tmp_path, other_fs, kind):
    if kind == "files":
        root = st_run(tmp_path / "run", steps=(100, 200, 300))
        gone = ["model_00000100.safetensors", "model_00000200.safetensors"]
    else:
        root = hf_run(tmp_path / "run", steps=(500, 1000, 1500), save_best=False)
        gone = ["checkpoint-500", "checkpoint-1000"]
    age_tree(root, 3600)
    before = tree_sha(root)
    trash = other_fs / "trash"
    p = run("prune", root, "--keep-last", "1", "--trash", trash, "--yes", timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    for name in gone:
        assert not (root / name).exists()
    moved = tree_sha(trash / "run")
    assert moved == {k: v for k, v in before.items() if k.split("/")[0] in gone}  # byte for byte
    assert not any(TMP_TAG in p.name for p in (trash / "run").rglob("*"))
    assert tree_sha(root) == {k: v for k, v in before.items() if k.split("/")[0] not in gone}


# ---- concurrency --------------------------------------------------------------------------------
def test_two_prunes_at_once(tmp_path):
    """The second prune deletes what both planned while the first is stopped after its first
    deletion; the first then finds the next one gone: one clean line, nothing else touched."""
    root = st_run(tmp_path / "run", steps=(100, 200, 300, 400))
    age_tree(root, 3600)
    keep = sha(root / "model_00000400.safetensors")
    first = Paused(["prune", root, "--keep-last", "1", "--yes"], "pruned-one")
    second = run("prune", root, "--keep-last", "1", "--yes", timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr
    p = first.resume()
    assert p.returncode == 1, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disappeared since the plan was made" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(root)) == ["model_00000400.safetensors"]
    assert sha(root / "model_00000400.safetensors") == keep


def test_two_prunes_started_together(tmp_path):
    """No pause: two real processes racing. Whichever loses says so in one line; the plan's
    checkpoints are gone and the kept one is intact."""
    root = st_run(tmp_path / "run", steps=tuple(range(100, 2100, 100)))
    age_tree(root, 3600)
    keep = sha(root / "model_00002000.safetensors")
    cmd = [sys.executable, "-m", "ckptctl", "prune", os.fspath(root), "--keep-last", "1", "--yes"]
    ps = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with())
        for _ in range(2)
    ]
    _STARTED.extend(ps)
    results = [(p.wait(timeout=TIMEOUT), p.communicate()[1]) for p in ps]
    for rc, err in results:
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if rc != 0:  # lost the race for one checkpoint: exactly one line naming it
            assert rc == 1 and len(errors) == 1 and "disappeared since the plan was made" in errors[0], err
        else:
            assert errors == [], err
    assert sorted(os.listdir(root)) == ["model_00002000.safetensors"]
    assert sha(root / "model_00002000.safetensors") == keep


def test_file_removed_between_check_and_unlink_is_one_clean_line(tmp_path, monkeypatch):
    """The window test_two_prunes_started_together hits only by chance, made certain: another
    prune removes a planned file after this one re-checked it and before it unlinks it."""
    from conftest import cli

    from ckptctl.ops import prune_execute as prune_ops  # where _verify lives and is called

    root = st_run(tmp_path / "run", steps=(100, 200, 300))
    age_tree(root, 3600)
    keep = sha(root / "model_00000300.safetensors")
    verify = prune_ops._verify

    def verify_then_lose_the_race(d):
        verify(d)
        for snap in d.snapshot:
            os.unlink(snap.path)

    monkeypatch.setattr(prune_ops, "_verify", verify_then_lose_the_race)
    r = cli("prune", root, "--keep-last", "1", "--yes")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disappeared since the plan was made" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert sorted(os.listdir(root)) == ["model_00000200.safetensors", "model_00000300.safetensors"]
    assert sha(root / "model_00000300.safetensors") == keep


def test_prune_racing_a_writer(tmp_path):
    """While prune is stopped between its plan and the first deletion, a trainer saves a new
    checkpoint and rewrites one the plan named: the new one survives, the rewritten one is
    refused with one line, only planned files that did not change are deleted."""
    from safetensors.numpy import save_file

    root = st_run(tmp_path / "run", steps=(100, 200, 300, 400))
    age_tree(root, 3600)
    first = Paused(["prune", root, "--keep-last", "1", "--yes"], "prune-planned")
    new = root / "model_00000500.safetensors"
    save_file({"w": np.arange(10, dtype=np.float32)}, new)
    new_sha = sha(new)
    rewritten = root / "model_00000200.safetensors"
    save_file({"w": np.ones(999, dtype=np.float32)}, rewritten)  # a new file under a planned name
    rewritten_sha = sha(rewritten)
    p = first.resume()
    assert p.returncode == 1, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_00000200.safetensors changed since the plan was made" in errors[0], p.stderr
    assert sorted(os.listdir(root)) == [
        "model_00000200.safetensors",
        "model_00000300.safetensors",
        "model_00000400.safetensors",
        "model_00000500.safetensors",
    ]
    assert sha(new) == new_sha and sha(rewritten) == rewritten_sha


def test_prune_racing_a_writer_new_checkpoint_only(tmp_path):
    from safetensors.numpy import save_file

    root = st_run(tmp_path / "run", steps=(100, 200, 300, 400))
    age_tree(root, 3600)
    first = Paused(["prune", root, "--keep-last", "1", "--yes"], "prune-planned")
    new = root / "model_00000500.safetensors"
    save_file({"w": np.arange(10, dtype=np.float32)}, new)
    new_sha = sha(new)
    p = first.resume()
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(root)) == ["model_00000400.safetensors", "model_00000500.safetensors"]
    assert sha(new) == new_sha


# ---- DST that is the source under another name --------------------------------------------------
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("cmd", ["convert", "average"])
def test_dst_linked_to_source_is_refused(tmp_path, link, cmd):
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32)}, src)
    other = tmp_path / "other.safetensors"
    save_file({"w": np.ones(1000, dtype=np.float32)}, other)
    before = sha(src)
    dst = tmp_path / "dst.safetensors"
    if link == "symlink":
        dst.symlink_to(src.name)
    else:
        os.link(src, dst)
    for force in ([], ["--force"]):
        args = ["convert", src, dst, *force] if cmd == "convert" else ["average", other, src, "-o", dst, *force]
        p = run(*args, timeout=TIMEOUT)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and ("is the source" in lines[0] or "is one of the inputs" in lines[0]), p.stderr
        assert sha(src) == before and os.path.samefile(src, dst)
        assert dst.is_symlink() == (link == "symlink")
    assert leftovers(tmp_path) == []


def test_dst_symlink_to_a_source_shard_is_refused(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32)}, src)
    before = sha(src)
    dst = tmp_path / "out.pt"
    dst.symlink_to(src)
    p = run("convert", src, dst, "--force", timeout=TIMEOUT)
    assert p.returncode == 2 and "is the source" in p.stderr, p.stderr
    assert sha(src) == before


# ---- names that are not plain ASCII, or not UTF-8 at all ---------------------------------------
def run_bytes(*args) -> subprocess.CompletedProcess:
    """ckptctl with stdout as raw bytes, under a C locale (the strictest for Python's stdout)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *map(os.fsencode, args)],
        capture_output=True,
        env=env_with(LC_ALL="C", LANG="C", PYTHONIOENCODING=""),
        timeout=TIMEOUT,
    )


def strict_json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    return json.loads(p.stdout.decode("utf-8", "strict"))  # raw invalid bytes would raise here


UNI = ["héllo.权重", "emoji.🙂", "tab\tname", "ctrl.\x1b[31m"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".h5"])
def test_unicode_tensor_and_file_names_through_every_writer(tmp_path, suffix):
    import torch

    src = tmp_path / "ünï-\udcff.pt"  # the \udcff is the raw byte 0xff in the file name
    sd = {n: torch.full((3,), float(i)) for i, n in enumerate(UNI)}
    torch.save(sd, src)
    dst = tmp_path / f"out-ñ-\udcfe{suffix}"
    p = run_bytes("convert", src, dst)
    assert p.returncode == 0, p.stderr
    assert os.path.exists(os.fsencode(dst))
    doc = strict_json(run_bytes("inspect", dst, "--format", "json"))
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(UNI)
    doc = strict_json(run_bytes("ls", tmp_path, "--format", "json"))
    text = json.dumps(doc, ensure_ascii=False)
    assert "ünï-" in text and "out-ñ-" in text
    assert "ünï-\udcff.pt" in text and f"out-ñ-\udcfe{suffix}" in text  # the raw bytes, escaped
    if suffix == ".safetensors":
        from safetensors.torch import load

        assert_same_tensors(load(Path(dst).read_bytes()), sd)  # its Rust loader refuses such a path
    elif suffix == ".pt":
        assert_same_tensors(torch.load(dst, weights_only=True), sd)
    else:
        import h5py

        with h5py.File(dst, "r") as f:
            got = {}
            f.visititems(lambda n, o: got.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        assert sorted(got) == sorted(UNI)
        for i, n in enumerate(UNI):
            assert got[n].tobytes() == np.full(3, float(i), np.float32).tobytes(), n


def test_non_utf8_pickle_string_is_escaped_json(tmp_path):
    import torch

    path = tmp_path / "bad.pt"
    torch.save({"w\udcff\ud800x": torch.ones(2), "meta": {"note": "a\udcfeb"}}, path)  # surrogatepass in the pickle
    p = run_bytes("inspect", path, "--format", "json")
    doc = strict_json(p)
    names = [t["name"] for t in doc["tensors"]]
    assert names == ["w\udcff\ud800x"]  # the JSON escapes \udcff and \ud800 read back as written
    assert b"\\udcff" in p.stdout and b"\xed\xb3\xbf" not in p.stdout
    strict_json(run_bytes("ls", tmp_path, "--format", "json"))


# h5py decodes a raw-byte name with the locale's file system encoding: surrogateescape under C,
# U+FFFD under a UTF-8 locale; both must reach stdout as valid UTF-8 JSON
HDF5_RAW_NAMES = ("grp\udcff/w\udcfe\udc80", "grp\ufffd/w\ufffd\ufffd")


def test_hdf5_raw_byte_names_are_escaped_json(tmp_path):
    import h5py

    path = tmp_path / "raw.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group(b"grp\xff")
        g.create_dataset(b"w\xfe\x80", data=np.arange(4, dtype=np.float32))
        g.attrs[b"note\xff"] = np.bytes_(b"v\xfa")
    p = run_bytes("inspect", path, "--format", "json")
    doc = strict_json(p)
    assert len(doc["tensors"]) == 1
    name = doc["tensors"][0]["name"]
    assert name in HDF5_RAW_NAMES, name
    strict_json(run_bytes("ls", tmp_path, "--format", "json"))


def test_safetensors_key_of_invalid_utf8(tmp_path):
    """A header whose key holds raw bytes that are not UTF-8: a clean one-line error (the format
    says the header is UTF-8 JSON), never a traceback or bytes on stdout."""
    import struct

    header = b'{"w\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    p = run_bytes("inspect", path, "--format", "json")
    assert p.returncode == 1 and p.stdout == b"", p.stderr
    err = p.stderr.decode("utf-8", "strict").strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    strict_json(run_bytes("ls", tmp_path, "--format", "json"))


def test_safetensors_metadata_with_escaped_surrogates(tmp_path):
    """Valid JSON whose strings hold \\udcff escapes (lone surrogates): out as escapes again."""
    import struct

    header = b'{"w\\udcff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"k\\ud800":"v\\udfff"}}'
    path = tmp_path / "esc.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    p = run_bytes("inspect", path, "--format", "json")
    doc = strict_json(p)
    assert [t["name"] for t in doc["tensors"]] == ["w\udcff"]
    assert doc["metadata"] == {"k\ud800": "v\udfff"}
    strict_json(run_bytes("ls", tmp_path, "--format", "json"))
