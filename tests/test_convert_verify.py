"""convert's verify on real files: the parallel path (output ranges mapped, source ranges read, pieces
compared on worker threads) finds a flipped byte anywhere, names the first differing tensor in
file order and the byte offset inside it, and accepts an intact output."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ckptctl.errors import CorruptFile
from ckptctl.ops import convert as cv
from ckptctl.ops import convert_verify

torch = pytest.importorskip("torch")


@pytest.fixture
def small_pieces(monkeypatch):
    """Every tensor takes the parallel path, cut into many pieces of 4 KiB."""
    monkeypatch.setattr(convert_verify, "VERIFY_WORKERS", 2)
    monkeypatch.setattr(convert_verify, "VERIFY_PIECE", 4096)


def _pt(tmp_path: Path) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(1)
    sd = {
        "a.weight": torch.randn(64, 100, generator=g),
        "b.weight": torch.randn(50, 100, generator=g),
        "c.bias": torch.randn(100, generator=g),
    }
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    return src, sd


def _st_data_offset(path: Path, name: str) -> int:
    """File offset of tensor `name`'s first byte, from the safetensors header (parsed here)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


def _flip_and_expect_mismatch(plan, staged, at: int, mask: int) -> None:
    """Flip bits `mask` of byte `at` of tensor b.weight in the staged output: verify must name that
    byte; then the staged file and the plan are let go."""
    off = _st_data_offset(staged.out, "b.weight")
    data = bytearray(staged.out.read_bytes())
    data[off + at] ^= mask
    staged.out.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match=rf"tensor 'b.weight' differs from the source at byte {at}$"):
        cv.verify_output(plan, staged.out)
    staged.discard()
    plan.close()


def test_intact_output_verifies_every_byte(tmp_path, small_pieces):
    src, sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors")
    staged = cv.write_output(plan)
    seen: list[int] = []
    n, nbytes = cv.verify_output(plan, staged.out, progress=seen.append)
    staged.discard()
    plan.close()
    total = sum(t.numel() * 4 for t in sd.values())
    assert (n, nbytes) == (3, total) and sum(seen) == total
    assert max(seen) <= 4096  # progress came piece by piece


@pytest.mark.parametrize("at", [0, 4095, 4096, 4 * 4096 + 17, 50 * 100 * 4 - 1])
def test_a_flipped_byte_is_found_at_its_offset(tmp_path, small_pieces, at):
    src, _sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors")
    staged = cv.write_output(plan)
    _flip_and_expect_mismatch(plan, staged, at, 0x10)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("at", [0, 4097, 50 * 100 * 4 - 1])
def test_without_mmap_both_sides_are_read_and_the_byte_is_found(tmp_path, monkeypatch, parallel, at):
    """A file system that cannot map: verify reads the output with preadv too (stream.read_range)
    and compares with stream.first_difference / same_bytes (libc memcmp): same message, same offset."""
    if parallel:
        monkeypatch.setattr(convert_verify, "VERIFY_WORKERS", 2)
        monkeypatch.setattr(convert_verify, "VERIFY_PIECE", 4096)
    else:
        monkeypatch.setattr(convert_verify, "VERIFY_WORKERS", 1)

    def no_mmap(*_a, **_k):
        raise OSError("no mmap here")

    monkeypatch.setattr(convert_verify, "compare_mapped", no_mmap)
    src, sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors")
    staged = cv.write_output(plan)
    assert cv.verify_output(plan, staged.out) == (3, sum(t.numel() * 4 for t in sd.values()))
    _flip_and_expect_mismatch(plan, staged, at, 0x40)


def test_the_first_damaged_tensor_in_file_order_is_named(tmp_path, small_pieces):
    src, _sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors")
    staged = cv.write_output(plan)
    data = bytearray(staged.out.read_bytes())
    for name, at in (("b.weight", 9000), ("c.bias", 3), ("a.weight", 20000)):
        data[_st_data_offset(staged.out, name) + at] ^= 1
    staged.out.write_bytes(bytes(data))
    first = plan.files[0].tensors[0].name  # verify goes in the plan's order
    assert first == "a.weight"
    want = {"a.weight": 20000, "b.weight": 9000, "c.bias": 3}[first]
    with pytest.raises(CorruptFile, match=rf"tensor '{first}' differs from the source at byte {want}$"):
        cv.verify_output(plan, staged.out)
    staged.discard()
    plan.close()


def test_cli_exit_code_and_nothing_left_when_the_output_is_damaged(tmp_path):
    """Whole process: a byte flipped in the staged file (the CKPTCTL_TEST_PAUSE_AT hook holds the
    run after writing) makes convert exit 1 with one line, and leaves no DST and no temp folder."""
    src, _sd = _pt(tmp_path)
    dst = tmp_path / "out.safetensors"
    code = f"""
import os, sys, json, struct
from pathlib import Path
import ckptctl.formats.writeutil as wu
real = wu.pause_point
def flip(stage):
    if stage == "staged":
        tmp = [p for p in Path({str(tmp_path)!r}).iterdir() if ".ckptctl-" in p.name][0]
        f = tmp / "out.safetensors"
        raw = bytearray(f.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        off = 8 + n + json.loads(raw[8:8 + n])["a.weight"]["data_offsets"][0]
        raw[off + 12345] ^= 4
        f.write_bytes(bytes(raw))
import ckptctl.ops.convert_write as cw
cw.pause_point = flip
from ckptctl.cli.app import main
sys.argv = ["ckptctl", "convert", {str(src)!r}, {str(dst)!r}]
main()
"""
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensor 'a.weight' differs from the source at byte 12345" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not dst.exists() and [x.name for x in tmp_path.iterdir()] == ["src.pt"]


def test_cast_output_damaged_is_caught_with_its_offset(tmp_path):
    """A cast is verified against CRC-32Cs of the bytes handed to the writer; on a mismatch the
    tensor is cast again to name the exact byte."""
    src, _sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors", dtype="bf16")
    staged = cv.write_output(plan)
    assert set(plan.cast_crcs) == {"a.weight", "b.weight", "c.bias"}
    off = _st_data_offset(staged.out, "b.weight")
    data = bytearray(staged.out.read_bytes())
    data[off + 777] ^= 0x80
    staged.out.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match=r"tensor 'b.weight' differs from the source at byte 777$"):
        cv.verify_output(plan, staged.out)
    staged.discard()
    plan.close()


def test_cast_to_bf16_matches_torch_bit_for_bit(tmp_path):
    """The ml_dtypes-free float32/float16/float64 -> bfloat16 cast gives torch's bits for every
    non-NaN value (ties to even, carries into the exponent and to inf), NaN stays NaN."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [
            0,
            -(2**31),
            0x7F800000,
            -8388608,
            0x7FC00000,
            0x7F800001,
            -1,
            0x7F7FFFFF,
            0x00000001,
            0x00008000,
            0x00018000,
            0x3F808000,
            0x3F818000,
            0x7F7F8000,
            0x7F7F7FFF,
        ],
        dtype=torch.int64,
    ).to(torch.int32)
    f32 = torch.cat([bits, special]).view(torch.float32)
    sd = {"f32": f32, "f64": f32.double() * 1.0000001, "f16": f32[torch.isfinite(f32)].clamp(-6e4, 6e4).half()}
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    dst = tmp_path / "out.safetensors"
    p = subprocess.run(
        [sys.executable, "-m", "ckptctl", "-q", "convert", str(src), str(dst), "--dtype", "bf16"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    out = load_file(str(dst))
    for k, v in sd.items():
        want = v.to(torch.bfloat16)
        got = out[k]
        assert got.dtype == torch.bfloat16
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), k
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), k


def test_plain_conversion_with_verify_imports_no_numpy(tmp_path):
    """Verify maps the output and compares with libc's memcmp through ctypes: a conversion with
    no cast never imports numpy (~0.17 CPU s of a whole run)."""
    src, _sd = _pt(tmp_path)
    dst = tmp_path / "out.safetensors"
    code = (
        "import sys, atexit; atexit.register(lambda: print('numpy' in sys.modules, file=sys.stderr)); "
        "from ckptctl.cli.app import main; "
        f"sys.argv = ['ckptctl', '-q', 'convert', {str(src)!r}, {str(dst)!r}]; main()"
    )
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr
    from safetensors.torch import load_file

    out = load_file(str(dst))
    assert set(out) == {"a.weight", "b.weight", "c.bias"}
    assert all(torch.equal(out[k], v) for k, v in _sd.items())


def test_stream_read_range_pieces_and_a_short_file(tmp_path):
    """stream.read_range (verify's and cast's reads): a file range in buffer-sized pieces, in
    order, each the right bytes; a file that ends early is one CorruptFile naming both bytes."""
    from ckptctl.ops import stream

    data = bytes(range(256)) * 40  # 10240 bytes
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    buf = bytearray(1000)
    pieces = [bytes(p) for p in stream.read_range(str(f), 17, 5000, buf)]
    assert [len(p) for p in pieces] == [1000] * 5 and b"".join(pieces) == data[17:5017]
    assert stream.first_difference(stream.read_range(str(f), 17, 5000, buf), [data[17:5017]]) is None
    with pytest.raises(CorruptFile, match=r": file ends at byte 10240, expected data up to byte 11000$"):
        list(stream.read_range(str(f), 9500, 1500, buf))  # the first piece already runs short


@pytest.mark.parametrize("item", [2, 4096, 1 << 20])
def test_cast_items_on_workers_give_torch_bytes_and_record_the_pieces(tmp_path, monkeypatch, item):
    """The cast runs on the worker threads in items (CAST_ITEM source bytes, whole elements),
    ahead of the writer across tensors: the bytes written are torch's `.to(bfloat16)` /
    `.to(float16)`, tensor by tensor, whatever the item size, and each item's (length, CRC-32C)
    is recorded in file order for verify."""
    import google_crc32c
    from safetensors.torch import load_file

    from ckptctl.ops import convert_write, stream

    monkeypatch.setattr(stream, "threads", lambda: 2)  # the parallel path even on one core
    monkeypatch.setattr(convert_write, "CAST_ITEM", item)
    src, sd = _pt(tmp_path)
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        dst = tmp_path / f"out_{dtype}.safetensors"
        plan = cv.plan_convert(src, dst, dtype=dtype)
        staged = cv.write_output(plan)
        raw = staged.out.read_bytes()
        for name, t in sd.items():
            want = t.to(tdt).view(torch.int16).numpy().tobytes()
            off = _st_data_offset(staged.out, name)
            assert raw[off : off + len(want)] == want, (dtype, name)
            pieces = plan.cast_crcs[name]
            step = max(4, item - item % 4) // 2  # output bytes per item: half the source's
            assert [n for n, _c in pieces] == [min(step, len(want) - k) for k in range(0, len(want), step)]
            pos = 0
            for n, c in pieces:
                assert c == google_crc32c.value(want[pos : pos + n])
                pos += n
        cv.commit_output(plan, staged, cv.verify_output(plan, staged.out))
        staged.discard()
        plan.close()
        got = load_file(dst)
        assert all(torch.equal(got[k].view(torch.int16), sd[k].to(tdt).view(torch.int16)) for k in sd)


@pytest.mark.parametrize("at", [0, 777, 4999])
def test_cast_output_damaged_in_a_later_crc_batch_names_the_byte(tmp_path, monkeypatch, at):
    """The recorded CRC-32Cs are checked in batches on the worker threads; a damaged byte in any
    batch (the first, a middle one, the last) makes verify cast the tensor again and name the
    exact byte, and an intact tensor before it passes."""
    from ckptctl.ops import convert_write

    monkeypatch.setattr(convert_verify, "VERIFY_WORKERS", 2)
    monkeypatch.setattr(convert_verify, "VERIFY_PIECE", 1024)  # a batch per few pieces
    monkeypatch.setattr(convert_write, "CAST_ITEM", 512)  # 256 output bytes per piece
    src, _sd = _pt(tmp_path)
    plan = cv.plan_convert(src, tmp_path / "out.safetensors", dtype="bf16")
    staged = cv.write_output(plan)
    assert len(plan.cast_crcs["b.weight"]) == 40  # 10,000 bytes of bf16 in pieces of 256
    _flip_and_expect_mismatch(plan, staged, at, 0x01)
