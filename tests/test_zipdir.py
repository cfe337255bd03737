"""formats/zipdir.py: FastZipFile reads a zip's central directory as zipfile does (every ZipInfo
attribute, every member's bytes), and a damaged directory fails with zipfile's own error."""

from __future__ import annotations

import io
import random
import zipfile

import pytest
import torch
from conftest import run

from ckptctl.formats.zipdir import FastZipFile


def _state(cls, raw: bytes):
    """What a ZipFile class makes of `raw`: every member's attributes and bytes, or the error."""
    try:
        z = cls(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return ("error", type(e), str(e))
    with z:
        members = [tuple(getattr(zi, s) for s in zipfile.ZipInfo.__slots__) for zi in z.infolist()]
        data = {}
        for zi in z.infolist():
            try:
                data[zi.filename] = z.read(zi)
            except Exception as e:  # noqa: BLE001
                data[zi.filename] = (type(e), str(e))
        return ("ok", members, sorted(z.NameToInfo), z.start_dir, z.comment, data)


def _assorted() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr(zipfile.ZipInfo("archive/dir/"), b"")
        z.writestr("archive/é/ü.txt", b"hello" * 50, compress_type=zipfile.ZIP_DEFLATED)
        with z.open("archive/big", "w", force_zip64=True) as f:  # a zip64 extra field
            f.write(b"y" * 1000)
        cp437 = zipfile.ZipInfo("archive/plain-name")
        cp437.comment = b"a member comment"
        z.writestr(cp437, b"z")
        z.comment = b"an archive comment"
    return buf.getvalue()


@pytest.fixture(scope="module")
def torch_zip_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("zipdir") / "m.pt"
    torch.save({f"w{i}": torch.full((2,), float(i)) for i in range(50)}, p)
    return p.read_bytes()


def test_same_as_zipfile_on_real_archives(torch_zip_bytes):
    for raw in (torch_zip_bytes, _assorted(), b"a prefix before the archive" + _assorted()):
        fast = _state(FastZipFile, raw)
        assert fast[0] == "ok"
        assert fast == _state(zipfile.ZipFile, raw)
    z = FastZipFile(io.BytesIO(torch_zip_bytes))
    assert isinstance(z, zipfile.ZipFile) and all(isinstance(zi, zipfile.ZipInfo) for zi in z.infolist())


def test_damaged_directories_fail_as_zipfile_fails(torch_zip_bytes):
    rnd = random.Random(7)
    for raw in (torch_zip_bytes, _assorted()):
        z = zipfile.ZipFile(io.BytesIO(raw))
        start = z.start_dir
        outcomes = set()
        for _ in range(150):
            buf = bytearray(raw)
            for _ in range(rnd.randint(1, 4)):
                at = rnd.randrange(start, len(raw))
                buf[at] = rnd.randrange(256)
            damaged = bytes(buf)
            fast = _state(FastZipFile, damaged)
            assert fast == _state(zipfile.ZipFile, damaged)
            outcomes.add(fast[0])
        cut = raw[: start + (len(raw) - start) // 2]
        assert _state(FastZipFile, cut) == _state(zipfile.ZipFile, cut)
        assert outcomes == {"ok", "error"}


def test_a_torch_zip_with_a_damaged_directory_is_one_error_line(tmp_path, torch_zip_bytes):
    raw = bytearray(torch_zip_bytes)
    start = zipfile.ZipFile(io.BytesIO(torch_zip_bytes)).start_dir
    raw[start : start + 4] = b"PK\x09\x09"  # the first directory entry's signature
    p = tmp_path / "bad.pt"
    p.write_bytes(bytes(raw))
    r = run("inspect", p)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {p}: corrupt zip archive (Bad magic number for central directory)"
    ], r.stderr
