"""Tests written to kill mutants that survived `tools/mutation.sh writeutil` (docs/testing.md,
"Mutation testing"): the atomic temporary file, the stale-temporary cleanup and the byte copies
every writer shares. Effects only: files present or gone, bytes on disk, open descriptors.
In-process (CliRunner and the writers' public classes), so mutmut can tie them to the code."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from ckptctl.errors import CorruptFile, Incompatible
from ckptctl.formats import writer_class, writeutil
from ckptctl.model import TensorInfo

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.numpy")

FORMATS = [("safetensors", ".safetensors"), ("torch-zip", ".pt"), ("hdf5", ".h5")]
INFOS = [TensorInfo("a", "float32", (4,), 16), TensorInfo("b", "int8", (3,), 3)]
A = np.array([1.5, -2.0, 3.25, 0.0], dtype=np.float32)
B = np.array([7, -8, 9], dtype=np.int8)


def open_deleted_temps() -> list[str]:
    """Our temporaries that this process still holds open after they were unlinked."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if ".ckptctl-tmp-" in target and target.endswith("(deleted)"):
            out.append(target)
    return out


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".ckptctl-tmp-" in p.name)


def read_back(fmt: str, path: Path) -> dict[str, np.ndarray]:
    if fmt == "torch-zip":
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    if fmt == "safetensors":
        return st.load_file(str(path))
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


# ---- the writers' life cycle ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_a_with_block_commits_without_an_explicit_finish(tmp_path, fmt, suffix):
    target = tmp_path / f"m{suffix}"
    with writer_class(fmt)(target, INFOS) as w:
        w.add(INFOS[0], [A.tobytes()])
        w.add(INFOS[1], [B.tobytes()])
    got = read_back(fmt, target)
    assert got["a"].tobytes() == A.tobytes() and got["b"].tobytes() == B.tobytes()
    assert temps(tmp_path) == []


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_abort_closes_the_temporary_and_a_second_abort_is_harmless(tmp_path, fmt, suffix):
    target = tmp_path / f"m{suffix}"
    before = open_deleted_temps()
    w = writer_class(fmt)(target, INFOS)
    w.add(INFOS[0], [A.tobytes()])
    w.abort()
    assert open_deleted_temps() == before  # not an unlinked file still open (its space never freed)
    w.abort()  # finish() aborts on failure, then the with-block's __exit__ aborts again
    assert not target.exists() and temps(tmp_path) == []


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_a_failed_finish_inside_a_with_block_raises_the_real_error(tmp_path, fmt, suffix):
    target = tmp_path / f"m{suffix}"
    with pytest.raises(Incompatible, match="'b'.*never written"):
        with writer_class(fmt)(target, INFOS) as w:
            w.add(INFOS[0], [A.tobytes()])
            w.finish()  # aborts itself; __exit__ then aborts a second time
    assert not target.exists() and temps(tmp_path) == []
    assert open_deleted_temps() == []


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_an_aborted_or_finished_writer_accepts_nothing_more(tmp_path, fmt, suffix):
    target = tmp_path / f"m{suffix}"
    w = writer_class(fmt)(target, INFOS)
    w.abort()
    with pytest.raises(RuntimeError, match="already finished or aborted"):
        w.add(INFOS[0], [A.tobytes()])
    assert not target.exists() and temps(tmp_path) == []
    w = writer_class(fmt)(target, INFOS)
    w.add(INFOS[0], [A.tobytes()])
    w.add(INFOS[1], [B.tobytes()])
    w.finish()
    data = target.read_bytes()
    with pytest.raises(RuntimeError, match="already finished or aborted"):
        w.add(INFOS[0], [A.tobytes()])
    assert target.read_bytes() == data


def test_the_temporary_is_beside_the_target_and_hidden(tmp_path):
    w = writer_class("safetensors")(tmp_path / "m.safetensors", INFOS)
    [name] = temps(tmp_path)
    assert name.startswith(".m.safetensors.ckptctl-tmp-") and len(name) == len(".m.safetensors.ckptctl-tmp-") + 8
    w.abort()


def test_a_missing_folder_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(Incompatible, match="does not exist"):
        writer_class("safetensors")(tmp_path / "nope" / "m.safetensors", INFOS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_the_committed_file_has_the_mode_the_umask_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        target = tmp_path / "m.safetensors"
        with writer_class("safetensors")(target, INFOS) as w:
            w.add(INFOS[0], [A.tobytes()])
            w.add(INFOS[1], [B.tobytes()])
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


# ---- stale temporaries of a killed run (what `convert` removes, and what it must leave) ---------
def _stale(path: Path, age: float = 3600, folder: bool = False) -> Path:
    if folder:
        path.mkdir()
        (path / "part.safetensors").write_bytes(b"partial")
    else:
        path.write_bytes(b"partial")
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_convert_removes_only_its_own_stale_temporaries(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "out.pt"
    st.save_file({"w": A}, str(src))
    own_file = _stale(tmp_path / ".out.pt.ckptctl-tmp-ab_d1234")
    own_dir = _stale(tmp_path / ".out.pt.ckptctl-tmp-x9y8z7w6", folder=True)
    keep = [
        _stale(tmp_path / ".out.pt.ckptctl-tmp-abc"),  # not 8 random characters
        _stale(tmp_path / ".out.pt.ckptctl-tmp-abcd12345"),  # 9
        _stale(tmp_path / ".out.pt.ckptctl-tmp-ABCD1234"),  # not mkstemp's alphabet
        _stale(tmp_path / ".other.pt.ckptctl-tmp-abcd1234"),  # another target's
        _stale(tmp_path / "x.out.pt.ckptctl-tmp-abcd1234"),  # not hidden: a user's file
        _stale(tmp_path / ".out.pt.ckptctl-tmp-fresh123", age=-600),  # newer than this process
    ]
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    link = tmp_path / ".out.pt.ckptctl-tmp-link1234"
    link.symlink_to(victim)
    t = time.time() - 3600
    os.utime(link, (t, t), follow_symlinks=False)

    r = cli("convert", src, dst)
    assert r.exit_code == 0, r.stderr
    assert not own_file.exists() and not own_dir.exists()
    assert r.stderr.count("left by an interrupted ckptctl run") == 2
    assert f"note: removed {own_file}" in r.stderr and f"note: removed {own_dir}" in r.stderr
    for p in keep:
        assert p.read_bytes() == b"partial", p.name
    assert link.is_symlink() and victim.read_bytes() == b"precious"
    assert torch.load(dst, weights_only=True)["w"].numpy().tobytes() == A.tobytes()


def test_a_stale_looking_temporary_another_writer_holds_is_left_alone(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "out.safetensors"
    st.save_file({"w": A}, str(src))
    held = _stale(tmp_path / ".out.safetensors.ckptctl-tmp-held1234")
    fd = os.open(held, os.O_RDWR)
    try:
        writeutil.hold_lock(fd)  # what a live writer holds on its temporary
        r = cli("convert", src, dst)
        assert r.exit_code == 0, r.stderr
        assert held.read_bytes() == b"partial" and "held1234" not in r.stderr
    finally:
        os.close(fd)
    r = cli("convert", src, tmp_path / "out2.safetensors")  # another target: not its business
    assert held.exists()
    r = cli("convert", src, dst, "--force")  # the lock is gone: now it is removed
    assert r.exit_code == 0, r.stderr
    assert not held.exists() and f"note: removed {held}" in r.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file owned by another user")
def test_a_stale_temporary_of_another_user_is_left_alone(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "out.pt"
    st.save_file({"w": A}, str(src))
    theirs = _stale(tmp_path / ".out.pt.ckptctl-tmp-them1234")
    os.chown(theirs, 12345, 12345)
    r = cli("convert", src, dst)
    assert r.exit_code == 0, r.stderr
    assert theirs.read_bytes() == b"partial"


# ---- byte copies --------------------------------------------------------------------------------
def _src_file(tmp_path: Path, n: int = 1000) -> tuple[Path, bytes]:
    data = bytes((i * 37 + 11) % 256 for i in range(n))
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("src_off,dst_off,length", [(0, 0, 1000), (13, 5, 700), (999, 0, 1), (40, 40, 0)])
def test_copy_range_copies_exactly_the_range(tmp_path, crc, src_off, dst_off, length):
    import zlib

    p, data = _src_file(tmp_path)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    seen: list[int] = []
    try:
        value = writeutil.copy_range(p, src_off, fd, dst_off, length, progress=seen.append, crc=crc)
    finally:
        os.close(fd)
    want = data[src_off : src_off + length]
    assert out.read_bytes() == b"\0" * dst_off + want if length else out.read_bytes() == b""
    assert sum(seen) == length
    assert value == (zlib.crc32(want) if crc else 0)


def test_copy_range_from_an_open_descriptor_leaves_it_open(tmp_path):
    p, data = _src_file(tmp_path)
    sfd = os.open(p, os.O_RDONLY)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        writeutil.copy_range(sfd, 100, fd, 0, 50)
        os.fstat(sfd)  # still ours
    finally:
        os.close(fd)
        os.close(sfd)
    assert out.read_bytes() == data[100:150]


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM])
def test_copy_range_falls_back_to_pread_when_the_kernel_refuses(tmp_path, monkeypatch, err):
    p, data = _src_file(tmp_path)
    calls = []

    def refuse(*a):
        calls.append(a)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", True)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        assert writeutil.copy_range(p, 7, fd, 3, 900) == 0
    finally:
        os.close(fd)
    assert calls and out.read_bytes() == b"\0" * 3 + data[7:907]


def test_copy_range_does_not_hide_a_real_io_error(tmp_path, monkeypatch):
    p, _ = _src_file(tmp_path)

    def fail(*a):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", fail)
    monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", True)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as e:
            writeutil.copy_range(p, 0, fd, 0, 100)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("crc", [False, True])
def test_copy_range_past_the_end_of_the_source_is_a_clean_error(tmp_path, monkeypatch, copy, crc):
    p, _ = _src_file(tmp_path, 100)
    monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", copy)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(CorruptFile, match="file ends at byte 100, expected data up to byte 130"):
            writeutil.copy_range(p, 30, fd, 0, 100, crc=crc)
    finally:
        os.close(fd)


def test_write_chunks_places_every_chunk_at_its_offset_and_counts_them(tmp_path):
    import zlib

    chunks = [b"abc", memoryview(b"defg"), bytearray(b""), np.frombuffer(b"hijklmno", dtype=np.uint16)]
    want = b"abcdefghijklmno"
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    seen: list[int] = []
    try:
        value = writeutil.write_chunks(fd, 10, iter(chunks), len(want), "t", progress=seen.append, crc=True)
    finally:
        os.close(fd)
    assert out.read_bytes() == b"\0" * 10 + want
    assert value == zlib.crc32(want) and seen == [3, 4, 8]
    fd = os.open(out, os.O_RDWR)
    try:
        with pytest.raises(CorruptFile, match="got 3 bytes, expected 4"):
            writeutil.write_chunks(fd, 0, [b"abc"], 4, "t")
        with pytest.raises(CorruptFile, match="more than its 4 bytes"):
            writeutil.write_chunks(fd, 0, [b"abc", b"de"], 4, "t")
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt,suffix,target", [("torch-zip", ".pt", "PyTorch"), ("hdf5", ".h5", "HDF5")])
@pytest.mark.parametrize(
    "dtype,what",
    [
        ("float4_e2m1fn", "has dtype float4_e2m1fn, which {target} cannot hold"),
        ("no_such", "has unknown dtype no_such"),
        ("gguf:Q4_K", "does not write quantized tensors"),
        ("string", "is a TensorFlow string tensor, which {target} cannot hold"),
    ],
)
def test_writers_refuse_dtypes_they_cannot_hold_before_creating_anything(tmp_path, fmt, suffix, target, dtype, what):
    with pytest.raises(Incompatible, match=what.format(target=target)):
        writer_class(fmt)(tmp_path / f"m{suffix}", [TensorInfo("x", dtype, (2,), 1)])
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_must_point_at_a_written_tensor_of_the_same_shape(tmp_path):
    W = writer_class("safetensors")
    with pytest.raises(Incompatible, match="two tensors are named 'a'"):
        W(tmp_path / "m.safetensors", [INFOS[0], INFOS[0]])
    with pytest.raises(Incompatible, match="tied to 'zz', which is not written"):
        W(tmp_path / "m.safetensors", [INFOS[0], TensorInfo("t", "float32", (4,), 16, alias_of="zz")])
    with pytest.raises(Incompatible, match="another dtype or shape"):
        W(tmp_path / "m.safetensors", [INFOS[0], TensorInfo("t", "float32", (2, 2), 16, alias_of="a")])
    with pytest.raises(Incompatible, match="which is not written"):  # a loop of aliases
        W(
            tmp_path / "m.safetensors",
            [TensorInfo("p", "float32", (4,), 16, alias_of="q"), TensorInfo("q", "float32", (4,), 16, alias_of="p")],
        )
    # a chain of aliases resolves to its primary
    infos = [
        INFOS[0],
        TensorInfo("t1", "float32", (4,), 16, alias_of="a"),
        TensorInfo("t2", "float32", (4,), 16, alias_of="t1"),
    ]
    with W(tmp_path / "m.safetensors", infos) as w:
        w.add(infos[0], [A.tobytes()])
    got = st.load_file(str(tmp_path / "m.safetensors"))
    assert all(got[k].tobytes() == A.tobytes() for k in ("a", "t1", "t2"))
    assert temps(tmp_path) == []


def test_each_tensor_is_written_once_and_only_planned_ones(tmp_path):
    w = writer_class("safetensors")(tmp_path / "m.safetensors", INFOS)
    w.add(INFOS[0], [A.tobytes()])
    with pytest.raises(Incompatible, match="'a' written twice"):
        w.add(INFOS[0], [A.tobytes()])
    with pytest.raises(Incompatible, match="'zz' was not in the plan"):
        w.add(TensorInfo("zz", "float32", (4,), 16), [A.tobytes()])
    with pytest.raises(Incompatible, match="source range is 5 bytes, expected 3"):
        w.add_range(INFOS[1], str(tmp_path / "x"), 0, 5)
    w.abort()
    infos = INFOS + [TensorInfo("c", "int8", (1,), 1), TensorInfo("d", "int8", (1,), 1)]
    w = writer_class("safetensors")(tmp_path / "m.safetensors", infos)
    with pytest.raises(Incompatible, match=r"'a' and 3 more never written"):
        w.finish()
    w = writer_class("safetensors")(tmp_path / "m.safetensors", infos)
    for i in infos[:3]:
        w.add(i, [b"\0" * i.nbytes])
    with pytest.raises(Incompatible, match=r"'d' never written"):
        w.finish()
    assert temps(tmp_path) == [] and not (tmp_path / "m.safetensors").exists()


# ---- the copy loops, several pieces each (the real pieces are 64 MiB / 16 MiB) ------------------
@pytest.mark.parametrize("path", ["copy_file_range", "pread", "refused_after_the_first_piece"])
def test_copy_range_in_many_pieces(tmp_path, monkeypatch, path):
    p, data = _src_file(tmp_path, 1000)
    monkeypatch.setattr(writeutil, "CHUNK", 7)
    monkeypatch.setattr(writeutil, "BUF", 5)
    monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", path != "pread")
    if path == "refused_after_the_first_piece":
        real = os.copy_file_range
        calls = []

        def once(*a):
            calls.append(a)
            if len(calls) > 1:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return real(*a)

        monkeypatch.setattr(os, "copy_file_range", once)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    seen: list[int] = []
    try:
        writeutil.copy_range(p, 101, fd, 13, 777, progress=seen.append)
    finally:
        os.close(fd)
    assert out.read_bytes() == b"\0" * 13 + data[101:878]
    assert sum(seen) == 777 and max(seen) <= 7
    with pytest.raises(CorruptFile, match="file ends at byte 1000, expected data up to byte 1010"):
        fd = os.open(out, os.O_RDWR)
        try:
            writeutil.copy_range(p, 10, fd, 0, 1000)
        finally:
            os.close(fd)


def test_a_stale_looking_temporary_under_an_hdf5_flock_is_left_alone(tmp_path):
    import fcntl

    src, dst = tmp_path / "a.safetensors", tmp_path / "out.h5"
    st.save_file({"w": A}, str(src))
    held = _stale(tmp_path / ".out.h5.ckptctl-tmp-hdf51234")
    fd = os.open(held, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what libhdf5 holds on a file h5py has open for writing
        r = cli("convert", src, dst)
        assert r.exit_code == 0, r.stderr
        assert held.read_bytes() == b"partial"
    finally:
        os.close(fd)
