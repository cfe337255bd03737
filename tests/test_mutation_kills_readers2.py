"""More tests written to kill mutants of `tools/mutation.sh readers` (docs/testing.md, "Mutation
testing"), from the survivors of the run after test_mutation_kills_readers.py: the zip members of
a torch archive (where their bytes start, how much of a deflated member is inflated, the whole
one-line refusal naming the file), byte ranges of empty and oddly strided tensors, the GGUF and TF
index checks at their edges, HDF5 byte ranges.

Files are written by torch / zipfile / gguf-py / h5py / the test TF writer and damaged in one
place; the effect checked is the reader's verdict (the whole message, the file named) or the
bytes it reads, compared with what the producer wrote. In-process only (mutmut ties tests to the
code it mutates through the calls it records)."""

from __future__ import annotations

import struct
import zipfile

import numpy as np
import pytest
from conftest import cli
from test_mutation_kills_readers import (
    F4,
    _data_pkl,
    _st,
    _st_error,
    _Tensor,
    _tf_bundle,
    _tf_footer,
    _tf_set_index_handle,
    write_archive,
)
from zip_patch import patch_central

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader

torch = pytest.importorskip("torch")


def _refusal(path) -> str:
    """The reader's whole refusal (str: 'PATH: message'), and the CLI's: exit 1, that one line."""
    with pytest.raises(CorruptFile) as e, open_reader(path) as r:
        r.info()
    res = cli("inspect", path)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(str(e.value)), res.stderr
    return str(e.value)


def _w(key: str = "0", n: int = 4) -> _Tensor:
    return _Tensor(("storage", torch.FloatStorage, key, "cpu", n), (n,))


def _data_start(path, member: str) -> int:
    """Where a member's bytes start, from its local header (read here, not by ckptctl)."""
    with zipfile.ZipFile(path) as z:
        zi = z.getinfo(member)
    with open(path, "rb") as f:
        f.seek(zi.header_offset)
        head = f.read(30)
    assert head[:4] == b"PK\x03\x04"
    nlen, xlen = struct.unpack_from("<2H", head, 26)
    return zi.header_offset + 30 + nlen + xlen


# ---- small members are read exactly (TorchArchive._member_bytes, read_small) ----------------------
def test_small_members_are_read_to_their_size_not_to_the_end_of_the_file(tmp_path):
    """`byteorder` and `.format_version` are followed by other members in what torch.save writes:
    their text is exactly what torch wrote, nothing of the next member."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, p)
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
        assert names.index("m/byteorder") < len(names) - 1  # not the last member
        want_fv = z.read("m/.format_version").decode().strip()
    with open_reader(p) as r:
        meta = r.info().metadata
    assert meta["byteorder"] == "little"
    assert meta[".format_version"] == want_fv


def test_a_big_endian_archive_is_read_as_big_endian(tmp_path):
    """`byteorder` says big (torch.save on a big-endian machine): storages are swapped on read.
    The member is not the last one, so only its own bytes may be compared with b'big'."""
    vals = np.array([1.5, -2.0, 3.25, 1e-3], dtype=np.float32)
    p = tmp_path / "be.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", _data_pkl({"w": _w()}))
        z.writestr("archive/byteorder", b"big")
        z.writestr("archive/data/0", vals.astype(">f4").tobytes())
        z.writestr("archive/version", b"3\n")
    with open_reader(p) as r:
        assert r.info().metadata["byteorder"] == "big"
        got = b"".join(bytes(c) for c in r.iter_chunks("w"))
        assert r.byte_range("w") is None  # swapped bytes: no zero-copy range
    assert got == vals.astype("<f4").tobytes()


# ---- a deflated data.pkl: inflated to its declared size, never further ------------------------------
def _deflated(tmp_path):
    p = tmp_path / "defl.pt"
    write_archive(p, {"w": _w(), "step": 7}, {"0": F4}, pkl_compress=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as z:
        size = z.getinfo("archive/data.pkl").file_size
    return p, size


def test_a_deflated_data_pkl_of_exactly_one_gib_declared_is_listed(tmp_path):
    """The limit is 'more than 1 GiB': a declared size of exactly 2^30 is inflated (here to the
    real, small pickle) and listed."""
    p, _size = _deflated(tmp_path)
    patch_central(p, "archive/data.pkl", "usize", 1 << 30)
    with open_reader(p) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == ["w"] and info.metadata["step"] == 7
        assert b"".join(bytes(c) for c in r.iter_chunks("w")) == F4
    patch_central(p, "archive/data.pkl", "usize", (1 << 30) + 1)
    assert _refusal(p) == f"{p}: zip member 'archive/data.pkl' is compressed and too large to list"


def test_a_deflated_member_is_not_inflated_past_its_declared_size(tmp_path):
    """A deflate stream that holds more than the central directory declares (a zip bomb's shape) is
    inflated to the declared size (+1 byte, to see that there is more) and no further: the pickle
    comes out cut short and is refused."""
    p, size = _deflated(tmp_path)
    patch_central(p, "archive/data.pkl", "usize", size - 2)
    msg = _refusal(p)
    assert msg == f"{p}: data.pkl: pickle ends without a STOP (truncated at byte {size - 1})", msg
    patch_central(p, "archive/data.pkl", "usize", size)
    with open_reader(p) as r:
        assert [t.name for t in r.info().tensors] == ["w"]


# ---- every refusal names the file -------------------------------------------------------------------
def test_bad_deflate_data_names_the_member_and_the_file(tmp_path):
    p, _size = _deflated(tmp_path)
    start = _data_start(p, "archive/data.pkl")
    data = bytearray(p.read_bytes())
    data[start : start + 4] = b"\xff\xff\xff\xff"
    p.write_bytes(bytes(data))
    msg = _refusal(p)
    assert msg.startswith(f"{p}: zip member 'archive/data.pkl': bad deflate data (Error -3 "), msg


def test_another_compression_method_names_the_member_and_the_file(tmp_path):
    p = tmp_path / "bz.pt"
    write_archive(p, {"w": _w()}, {"0": F4}, pkl_compress=zipfile.ZIP_LZMA)
    assert _refusal(p) == (
        f"{p}: zip member 'archive/data.pkl' uses compression method 14, which ckptctl does not read"
    )


def test_data_pkl_overlapping_the_central_directory_names_the_file(tmp_path):
    p = tmp_path / "o.pt"
    write_archive(p, {"w": _w()}, {"0": F4})
    with zipfile.ZipFile(p) as z:
        zi, cd = z.getinfo("archive/data.pkl"), z.start_dir
    end = 30 + len(zi.filename)  # data.pkl is the first member: its bytes start here
    patch_central(p, "archive/data.pkl", "csize", cd - end + 1)
    assert _refusal(p) == f"{p}: zip member 'archive/data.pkl' overlaps the central directory (damaged archive)"


def test_local_header_refusals_name_the_member_and_the_file(tmp_path):
    p = tmp_path / "h.pt"
    write_archive(p, {"w": _w()}, {"0": F4})
    size = p.stat().st_size
    patch_central(p, "archive/byteorder", "offset", size - 29)
    assert _refusal(p) == f"{p}: zip member 'archive/byteorder': its header offset lies outside the file"
    patch_central(p, "archive/byteorder", "offset", size - 30)
    assert _refusal(p) == f"{p}: zip member 'archive/byteorder': bad local header signature"


def test_a_member_past_the_end_names_the_file(tmp_path):
    p = tmp_path / "e.pt"
    write_archive(p, {"w": _w()}, {"0": F4})
    start = _data_start(p, "archive/byteorder")
    patch_central(p, "archive/byteorder", "csize", p.stat().st_size - start + 1)
    assert _refusal(p) == f"{p}: zip member 'archive/byteorder' runs past the end of the file (truncated?)"


def test_a_storage_whose_header_is_damaged_is_refused_when_read(tmp_path):
    """The storage's local header is first read when its bytes are: the refusal then names the
    storage member and the file (listing does not read it)."""
    p = tmp_path / "s.pt"
    write_archive(p, {"w": _w()}, {"0": F4})
    start = _data_start(p, "archive/data/0")
    data = bytearray(p.read_bytes())
    off = start - 30 - len("archive/data/0")
    data[off : off + 4] = b"PK\x05\x06"
    p.write_bytes(bytes(data))
    with open_reader(p) as r:
        assert r.info().tensor("w").shape == (4,)
        with pytest.raises(CorruptFile) as e:
            b"".join(bytes(c) for c in r.iter_chunks("w"))
    assert str(e.value) == f"{p}: zip member 'archive/data/0': bad local header signature", str(e.value)


# ---- byte ranges ----------------------------------------------------------------------------------
def test_an_empty_tensor_has_an_empty_byte_range_at_its_member(tmp_path):
    """A zero-element tensor's storage is a 0-byte member: its range is (file, where the member's
    bytes start, 0), not a refusal."""
    p = tmp_path / "e.pt"
    torch.save({"e": torch.empty(0), "w": torch.ones(3)}, p)
    with zipfile.ZipFile(p) as z:
        zi = [i for i in z.infolist() if i.filename.startswith("e/data/") and i.file_size == 0]
        assert len(zi) == 1
        empty = zi[0].filename
    with open_reader(p) as r:
        assert r.byte_range("e") == (str(p), _data_start(p, empty), 0)
        assert b"".join(bytes(c) for c in r.iter_chunks("e")) == b""
        f, off, n = r.byte_range("w")
    with open(f, "rb") as fh:
        fh.seek(off)
        assert fh.read(n) == torch.ones(3).numpy().tobytes()


@pytest.mark.parametrize("view", ["every_other_row", "size1_odd_stride", "size2_rows_apart", "size1_then_step"])
def test_byte_range_of_views_with_size_1_and_size_2_dims(tmp_path, view):
    """Dims of size 1 may have any stride (torch: still contiguous); dims of size 2 may not."""
    base = torch.arange(60, dtype=torch.float32)
    t = {
        "every_other_row": base[:24].reshape(4, 6)[::2],  # (2, 6) strides (12, 1)
        "size1_odd_stride": torch.as_strided(base, (1, 6), (100, 1)),
        "size2_rows_apart": torch.as_strided(base, (2, 3), (7, 1)),
        "size1_then_step": torch.as_strided(base, (3, 1, 2), (2, 9, 1)),
    }[view]
    p = tmp_path / "v.pt"
    torch.save({"x": t}, p)
    with open_reader(p) as r:
        rng = r.byte_range("x")
        got = b"".join(bytes(c) for c in r.iter_chunks("x"))
    assert got == t.contiguous().numpy().tobytes()
    assert (rng is not None) == t.is_contiguous(), (view, rng, t.stride())
    if rng is not None:
        with open(rng[0], "rb") as fh:
            fh.seek(rng[1])
            assert fh.read(rng[2]) == got


# ---- GGUF: tensors in data order, whatever their sizes --------------------------------------------
def test_gguf_a_big_tensor_before_a_small_one_is_fine(tmp_path):
    """Overlaps are looked for in data order (by offset): a 256-byte tensor at 0 then a 128-byte
    one at 256 do not overlap."""
    gguf = pytest.importorskip("gguf", reason="gguf-py (the `dev` extra) writes the test files")
    p = tmp_path / "t.gguf"
    a, b = np.arange(64, dtype=np.float32), np.arange(100, 132, dtype=np.float32)
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("big", a)
    w.add_tensor("small", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_reader(p) as r:
        info = r.info()
        assert info.warnings == [] and [t.name for t in info.tensors] == ["big", "small"]
        assert b"".join(bytes(c) for c in r.iter_chunks("big")) == a.tobytes()
        assert b"".join(bytes(c) for c in r.iter_chunks("small")) == b.tobytes()


# ---- TF index: a 4-byte block is inside the file -------------------------------------------------
def test_tf_index_block_of_four_bytes_is_read_and_its_restart_array_refused(tmp_path):
    """A block of exactly 4 bytes (only its restart count) with a right trailer passes the bounds
    and CRC checks; its restart array is what is wrong."""
    from ckptctl.formats.tf_table import masked_crc

    c, idx = _tf_bundle(tmp_path)
    data = bytearray(idx.read_bytes())
    _m, _ms, ioff, _isize = _tf_footer(bytes(data))
    data[ioff : ioff + 5] = b"\0\0\0\0\0"  # 0 restarts, compression type 0
    data[ioff + 5 : ioff + 9] = masked_crc(bytes(data[ioff : ioff + 5])).to_bytes(4, "little")
    _tf_set_index_handle(data, ioff, 4)
    idx.write_bytes(bytes(data))
    with pytest.raises(CorruptFile) as e, open_reader(c) as r:
        r.info()
    assert "bad restart array (0 restarts in 4 bytes)" in str(e.value), str(e.value)
    assert "past the end" not in str(e.value)


# ---- HDF5: a file range only for little-endian (or one-byte) contiguous data -----------------------
def test_hdf5_two_byte_big_endian_data_has_no_file_range(tmp_path):
    """Big-endian int16/float16 must be swapped (no zero-copy range, the bytes read are
    little-endian); one-byte and little-endian contiguous data is one range, the bytes h5py wrote."""
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "be.h5"
    arrays = {
        "be_i2": np.arange(-3, 4, dtype=">i2"),
        "be_f2": np.array([1.5, -2.0, 65504.0], dtype=">f2"),
        "u1": np.arange(5, dtype="u1"),
        "le_i2": np.arange(-3, 4, dtype="<i2"),
    }
    with h5py.File(p, "w") as f:
        for k, a in arrays.items():
            f[k] = a
        offsets = {k: f[k].id.get_offset() for k in arrays}
    with open_reader(p) as r:
        for k, a in arrays.items():
            got = b"".join(bytes(c) for c in r.iter_chunks(k))
            assert got == a.astype(a.dtype.newbyteorder("<")).tobytes(), k
        assert r.byte_range("be_i2") is None and r.byte_range("be_f2") is None
        assert r.byte_range("u1") == (str(p), offsets["u1"], 5)
        assert r.byte_range("le_i2") == (str(p), offsets["le_i2"], 14)


# ---- persistent ids: how their parts are shown -----------------------------------------------------
@pytest.mark.parametrize(
    "pid,message",
    [
        # a bytes type name that is not ASCII: shown with U+FFFD, never a decoding error
        ((b"\xffstorage", "FloatStorage", "0", "cpu", 4), "unknown persistent id '\ufffdstorage'"),
        # a long type name: its first 40 characters
        (("s" * 50, "FloatStorage", "0", "cpu", 4), "unknown persistent id '" + "s" * 40 + "'"),
        # a key that is not a string is named as one
        (("storage", "FloatStorage", 0, "cpu", -1), "storage '0': bad size -1"),
        # neither a tuple nor a list (nor anything with a length)
        (7, "a persistent id that is not a tuple (int)"),
        # a list of five is a persistent id like a tuple; a list of four is too short
        (["storage", "FloatStorage", "0", "cpu"], "unknown persistent id 'storage'"),
    ],
)
def test_persistent_id_parts_in_refusals(tmp_path, pid, message):
    p = tmp_path / "pid.pt"
    if isinstance(pid, (tuple, list)) and pid[1] == "FloatStorage":
        pid = type(pid)([pid[0], torch.FloatStorage, *pid[2:]])
    write_archive(p, {"w": _Tensor(pid, (4,))}, {"0": F4})
    with pytest.raises(CorruptFile) as e:
        with open_reader(p) as r:
            r.info()
    assert e.value.message == f"data.pkl: {message}", e.value.message
    assert str(e.value.path) == str(p)


@pytest.mark.parametrize("pid", [("storage", "FS", 0, "cpu", 4), ["storage", "FS", "0", "cpu", 4]])
def test_an_int_key_and_a_list_persistent_id_are_read(tmp_path, pid):
    p = tmp_path / "ok.pt"
    pid = type(pid)([pid[0], torch.FloatStorage, *pid[2:]])
    write_archive(p, {"w": _Tensor(pid, (4,))}, {"0": F4})
    with open_reader(p) as r:
        assert r.info().tensor("w").dtype == "float32"
        assert b"".join(bytes(c) for c in r.iter_chunks("w")) == F4


# ---- safetensors: entries out of order, the numbers in the refusals ----------------------------------
def test_safetensors_entries_sorted_by_begin_not_by_end(tmp_path):
    """Header order: an empty tensor at 3, then the 3-byte tensor before it. Their ends are in
    order (3, 3), their begins are not: the file is valid, listed in data order."""
    from ckptctl.formats.safetensors import SafetensorsReader

    header = {
        "z": {"dtype": "U8", "shape": [0], "data_offsets": [3, 3]},
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
    }
    p = _st(tmp_path, header, b"abc")
    with SafetensorsReader(p) as r:
        assert [t.name for t in r.info().tensors] == ["a", "z"]
        assert b"".join(r.iter_chunks("a")) == b"abc" and b"".join(r.iter_chunks("z")) == b""


@pytest.mark.parametrize(
    "header,data,message",
    [
        # an empty tensor inside the previous one overlaps it (it does not end before it begins)
        (
            {"a": ("U8", [4], [0, 4]), "z": ("U8", [0], [2, 2])},
            4,
            "tensor 'z': bad data_offsets [2, 2]: overlaps the previous tensor (begins at 2, previous ends at 4)",
        ),
        # the byte count of a tensor that does not begin at 0
        (
            {"a": ("U8", [1], [0, 1]), "t": ("U8", [1], [1, 3])},
            3,
            "tensor 't': data_offsets [1, 3] hold 2 bytes, but U8 [1] needs 1",
        ),
        # 2^53 + 1 bytes: exact integers, not floats (the size is right; the file is too short)
        (
            {"t": ("U8", [2**53 + 1], [0, 2**53 + 1])},
            0,
            "file is {size} bytes, but its header describes {want} (8 + {n} header + 9007199254740993 data)",
        ),
        # the key named twice is the one in the message, not the first key
        ('{"a": 1, "b": 2, "b": 3}', 0, "header JSON has the key 'b' twice"),
    ],
)
def test_safetensors_refusals_name_the_right_numbers(tmp_path, header, data, message):
    import json as _json

    if isinstance(header, str):
        hb = header.encode()
    else:
        hb = _json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in header.items()}).encode()
    p = _st(tmp_path, hb, b"\0" * data)
    size = p.stat().st_size
    want = message.format(size=size, n=len(hb), want=8 + len(hb) + 2**53 + 1)
    msg = _st_error(p)
    assert msg == f"{p}: {want}", msg


def test_a_file_truncated_after_listing_is_refused_when_a_tensor_is_read(tmp_path):
    """The file is cut (another process rewriting it) between listing and reading: the tensor
    before the cut still reads; the storage whose local header the cut went through (read only
    now: 128 KiB further than anything read before, so not in any read buffer) is one refusal
    naming the member and the file."""
    p = tmp_path / "t.pt"
    big = np.arange(32768, dtype=np.float32)
    write_archive(
        p,
        {"a": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 32768), (32768,)), "b": _w("1")},
        {"0": big.tobytes(), "1": F4},
    )
    cut = _data_start(p, "archive/data/1") - len("archive/data/1") - 30 + 10  # inside b's local header
    with open_reader(p) as r:
        r.info()
        with open(p, "r+b") as f:
            f.truncate(cut)
        assert b"".join(bytes(c) for c in r.iter_chunks("a")) == big.tobytes()
        with pytest.raises(CorruptFile) as e:
            b"".join(bytes(c) for c in r.iter_chunks("b"))
    assert str(e.value) == f"{p}: zip member 'archive/data/1': local header past the end of the file", str(e.value)
