"""Tests written to kill mutants of `tools/mutation.sh readers` (docs/testing.md, "Mutation
testing"): the checks every reader makes before it trusts an offset or a size. Files are written
by the producers' libraries (torch, zipfile, pickle with torch's own persistent ids, h5py) and
damaged in one place; the effect checked is the reader's verdict (one CorruptFile naming what is
wrong) or the bytes it reads, compared with torch/h5py."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from conftest import cli
from zip_patch import patch_central

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader

torch = pytest.importorskip("torch")


# ---- a torch zip written member by member, its data.pkl pickled with torch's persistent ids ----
class _Storage:
    def __init__(self, pid):
        self.pid = pid


class _Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, pid, size, stride=None, offset=0):
        self.pid, self.size, self.offset = pid, tuple(size), offset
        if stride is None:
            stride, acc = [], 1
            for s in reversed(self.size):
                stride.insert(0, acc)
                acc *= s
        self.stride = tuple(stride)

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (_Storage(self.pid), self.offset, self.size, self.stride, False, OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def _data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_archive(
    path,
    obj,
    storages: dict[str, bytes],
    *,
    pkl_compress=zipfile.ZIP_STORED,
    storage_compress=zipfile.ZIP_STORED,
    storages_last: bool = False,
) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _data_pkl(obj), compress_type=pkl_compress)
        if not storages_last:
            for k, v in storages.items():
                z.writestr(f"archive/data/{k}", v, compress_type=storage_compress)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
        if storages_last:
            for k, v in storages.items():
                z.writestr(f"archive/data/{k}", v, compress_type=storage_compress)


F4 = np.arange(4, dtype=np.float32).tobytes()


def _info(path):
    with open_reader(path) as r:
        return r.info()


def _bytes_of(path, name) -> bytes:
    with open_reader(path) as r:
        return b"".join(bytes(c) for c in r.iter_chunks(name))


def test_hand_written_archive_reads_like_torch(tmp_path):
    p = tmp_path / "ok.pt"
    write_archive(p, {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (2, 2))}, {"0": F4})
    assert torch.load(p, weights_only=True)["w"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    info = _info(p)
    assert info.tensor("w").dtype == "float32" and info.tensor("w").shape == (2, 2)
    assert _bytes_of(p, "w") == F4


@pytest.mark.parametrize(
    "pid,message",
    [
        ("storage", "a persistent id that is not a tuple (str)"),
        ((), "a persistent id that is not a tuple (tuple)"),
        (("storag", torch.FloatStorage, "0", "cpu", 4), "unknown persistent id 'storag'"),
        (("storage", torch.FloatStorage, "0", "cpu"), "unknown persistent id 'storage'"),
        (("storage", torch.FloatStorage, "0", "cpu", -1), "storage '0': bad size -1"),
        (("storage", torch.FloatStorage, "0", "cpu", 4.0), "storage '0': bad size 4.0"),
        (("storage", torch.FloatStorage, "0", "cpu", True), "storage '0': bad size True"),
        (("storage", torch.FloatStorage, "9", "cpu", 4), "storage data/9 is missing from the archive"),
        (
            ("storage", torch.FloatStorage, "0", "cpu", 5),
            "storage data/0 holds 16 bytes, but 5 float32 elements need 20",
        ),
        (
            ("storage", pickle.Pickler, "0", "cpu", 4),
            "unknown storage type 'pickle.Pickler'; it asks for pickle.Pickler, which can run code (nothing was run)",
        ),
    ],
)
def test_bad_persistent_ids_and_storages_are_refused(tmp_path, pid, message):
    p = tmp_path / "bad.pt"
    write_archive(p, {"w": _Tensor(pid, (4,))}, {"0": F4})
    with pytest.raises(CorruptFile) as e:
        _info(p)
    assert message in str(e.value), str(e.value)
    assert e.value.path is not None and str(e.value.path) == str(p)  # the refusal names the file
    assert e.value.message.endswith(message), e.value.message  # nothing after it
    r = cli("inspect", p)
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bytes_typename_and_exactly_sized_storage_are_accepted(tmp_path):
    p = tmp_path / "b.pt"
    write_archive(p, {"w": _Tensor((b"storage", torch.FloatStorage, "0", "cpu", 4), (4,))}, {"0": F4})
    assert _info(p).tensor("w").nbytes == 16
    assert _bytes_of(p, "w") == F4


def test_one_storage_named_with_two_dtypes_is_refused(tmp_path):
    p = tmp_path / "two.pt"
    obj = {
        "a": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,)),
        "b": _Tensor(("storage", torch.IntStorage, "0", "cpu", 4), (4,)),
    }
    write_archive(p, obj, {"0": F4})
    with pytest.raises(CorruptFile, match=r"storage '0' is named with two dtypes \(float32, int32\)"):
        _info(p)


def test_shared_storage_and_several_storage_types(tmp_path):
    """Two tensors on one storage (tied), and storages of three classes: each keeps its dtype."""
    h = np.array([1.5, -2.0, 3.25], dtype=np.float16).tobytes()
    obj = {
        "a": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,)),
        "a2": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (2,), offset=2),
        "h": _Tensor(("storage", torch.HalfStorage, "1", "cpu", 3), (3,)),
        "h2": _Tensor(("storage", torch.HalfStorage, "2", "cpu", 3), (3,)),
        "u": _Tensor(("storage", torch.storage.UntypedStorage, "3", "cpu", 5), (5,)),
        "u8": _Tensor(("storage", torch.ByteStorage, "4", "cpu", 2), (2,)),
    }
    p = tmp_path / "many.pt"
    write_archive(p, obj, {"0": F4, "1": h, "2": h, "3": b"\x01\x02\x03\x04\x05", "4": b"\xfe\xff"})
    info = _info(p)
    assert {t.name: t.dtype for t in info.tensors} == {
        "a": "float32",
        "a2": "float32",
        "h": "float16",
        "h2": "float16",
        "u": "uint8",
        "u8": "uint8",
    }
    assert _bytes_of(p, "a2") == F4[8:]
    assert _bytes_of(p, "h2") == h
    assert _bytes_of(p, "u") == b"\x01\x02\x03\x04\x05"


def test_storage_ending_exactly_at_the_central_directory(tmp_path):
    """zipfile writes no extra fields: the last storage's bytes end at the directory's first byte."""
    p = tmp_path / "last.pt"
    write_archive(
        p, {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))}, {"0": F4}, storages_last=True
    )
    with zipfile.ZipFile(p) as z:
        zi = z.getinfo("archive/data/0")
        assert zi.header_offset + 30 + len(zi.filename) + zi.compress_size == z.start_dir  # the boundary
    assert _bytes_of(p, "w") == F4
    assert torch.load(p, weights_only=True)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_storage_overlapping_the_central_directory_is_refused(tmp_path):
    p = tmp_path / "over.pt"
    write_archive(
        p, {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))}, {"0": F4}, storages_last=True
    )
    patch_central(p, "archive/data/0", "csize", 17)  # one byte into the directory
    with pytest.raises(CorruptFile, match="zip member 'archive/data/0' overlaps the central directory"):
        _info(p)


def test_member_header_offset_outside_the_file(tmp_path):
    """A member whose local header cannot fit in the file (read_small, the byteorder member)."""
    p = tmp_path / "off.pt"
    write_archive(p, {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))}, {"0": F4})
    size = p.stat().st_size
    patch_central(p, "archive/byteorder", "offset", size - 29)  # a 30-byte local header cannot fit
    with pytest.raises(CorruptFile, match="zip member 'archive/byteorder': its header offset lies outside the file"):
        _info(p)
    patch_central(p, "archive/byteorder", "offset", size - 30)  # fits, but is no local header
    with pytest.raises(CorruptFile, match="zip member 'archive/byteorder': bad local header signature"):
        _info(p)


def test_member_running_past_the_end_of_the_file(tmp_path):
    p = tmp_path / "past.pt"
    write_archive(p, {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))}, {"0": F4})
    with zipfile.ZipFile(p) as z:
        zi = z.getinfo("archive/byteorder")
    size = p.stat().st_size
    end = zi.header_offset + 30 + len(zi.filename)
    patch_central(p, "archive/byteorder", "csize", size - end)  # ends exactly at the end: fine
    _info(p)
    patch_central(p, "archive/byteorder", "csize", size - end + 1)
    with pytest.raises(CorruptFile, match="zip member 'archive/byteorder' runs past the end of the file"):
        _info(p)


def test_deflated_data_pkl_is_read(tmp_path):
    """Not what torch writes, but a valid zip: data.pkl deflated is read through zlib."""
    p = tmp_path / "defl.pt"
    obj = {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,)), "step": 7}
    write_archive(p, obj, {"0": F4}, pkl_compress=zipfile.ZIP_DEFLATED)
    info = _info(p)
    assert [t.name for t in info.tensors] == ["w"]
    assert _bytes_of(p, "w") == F4


def test_deflated_storage_is_listed_but_its_bytes_are_refused(tmp_path):
    p = tmp_path / "dstor.pt"
    write_archive(
        p,
        {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))},
        {"0": F4},
        storage_compress=zipfile.ZIP_DEFLATED,
    )
    assert _info(p).tensor("w").shape == (4,)
    with pytest.raises(CorruptFile, match="is compressed; ckptctl reads stored"):
        _bytes_of(p, "w")


def test_other_compression_methods_and_bad_deflate_data(tmp_path):
    p = tmp_path / "bz.pt"
    write_archive(
        p,
        {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))},
        {"0": F4},
        pkl_compress=zipfile.ZIP_BZIP2,
    )
    with pytest.raises(CorruptFile, match="uses compression method 12, which ckptctl does not read"):
        _info(p)
    p = tmp_path / "baddefl.pt"
    write_archive(
        p,
        {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))},
        {"0": F4},
        pkl_compress=zipfile.ZIP_DEFLATED,
    )
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        zi = z.getinfo("archive/data.pkl")
    start = zi.header_offset + 30 + len(zi.filename)
    data[start : start + 4] = b"\xff\xff\xff\xff"
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="bad deflate data"):
        _info(p)


def test_deflated_data_pkl_too_large_to_list(tmp_path):
    p = tmp_path / "huge.pt"
    write_archive(
        p,
        {"w": _Tensor(("storage", torch.FloatStorage, "0", "cpu", 4), (4,))},
        {"0": F4},
        pkl_compress=zipfile.ZIP_DEFLATED,
    )
    patch_central(p, "archive/data.pkl", "usize", (1 << 30) + 1)
    with pytest.raises(CorruptFile, match="is compressed and too large to list"):
        _info(p)


@pytest.mark.parametrize(
    "view",
    ["plain", "t", "none0", "none1", "step", "offset", "row", "col", "expand1"],
)
def test_byte_range_only_for_c_contiguous_views(tmp_path, view):
    """A tensor's bytes are one file range exactly when torch calls it contiguous (size-1 dims'
    strides do not matter); the bytes read equal torch's either way."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = {
        "plain": base,
        "t": base.t(),
        "none0": base[None],
        "none1": base[:, None],
        "step": base[:, ::2],
        "offset": base[1:],
        "row": base[2:3],
        "col": base[:, 1:2],
        "expand1": base[:1].expand(1, 6),
    }[view]
    p = tmp_path / "v.pt"
    torch.save({"x": t}, p)
    with open_reader(p) as r:
        rng = r.byte_range("x")
        got = b"".join(bytes(c) for c in r.iter_chunks("x"))
    assert got == t.contiguous().numpy().tobytes()
    assert (rng is not None) == t.is_contiguous(), (view, rng, t.stride())


# ---- the TF index's block trailer (tf_table._block) ----------------------------------------------
def _tf_bundle(tmp_path):
    from tf_writer import write_bundle

    write_bundle(tmp_path / "c", {"a": np.arange(8, dtype=np.float32), "b": np.arange(4, dtype=np.int64)})
    return tmp_path / "c", tmp_path / "c.index"


def _tf_footer(data: bytes) -> tuple[int, int, int, int]:
    vals, pos = [], len(data) - 48
    for _ in range(4):
        v = shift = 0
        while True:
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        vals.append(v)
    return tuple(vals)


def _varint(v: int) -> bytes:
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        out += bytes([b | 0x80]) if v else bytes([b])
        if not v:
            return out


def _tf_set_index_handle(data: bytearray, ioff: int, isize: int) -> None:
    moff, msize, _o, _s = _tf_footer(bytes(data))
    body = _varint(moff) + _varint(msize) + _varint(ioff) + _varint(isize)
    data[-48:-8] = body + b"\0" * (40 - len(body))


def _tf_error(c) -> str:
    with pytest.raises(CorruptFile) as e, open_reader(c) as r:
        r.info()
    r = cli("inspect", c)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return str(e.value)


@pytest.mark.parametrize("ctype,message", [(1, "is snappy-compressed"), (2, "unknown compression type 2")])
def test_tf_index_block_compression_type(tmp_path, ctype, message):
    """The trailer's type byte, with its CRC made right: only type 0 (no compression) is read."""
    from ckptctl.formats.tf_table import masked_crc

    c, idx = _tf_bundle(tmp_path)
    data = bytearray(idx.read_bytes())
    _m, _ms, ioff, isize = _tf_footer(bytes(data))
    data[ioff + isize] = ctype
    data[ioff + isize + 1 : ioff + isize + 5] = masked_crc(bytes(data[ioff : ioff + isize + 1])).to_bytes(4, "little")
    idx.write_bytes(bytes(data))
    msg = _tf_error(c)
    assert f"index block at byte {ioff}" in msg and message in msg, msg


def test_tf_index_block_crc_and_bounds(tmp_path):
    c, idx = _tf_bundle(tmp_path)
    good = idx.read_bytes()
    with open_reader(c) as r:
        assert [t.name for t in r.info().tensors] == ["a", "b"]
    _m, _ms, ioff, isize = _tf_footer(good)
    # the trailer's CRC covers the type byte too
    data = bytearray(good)
    data[ioff + isize] ^= 0x01
    idx.write_bytes(bytes(data))
    assert "CRC32C mismatch in the block trailer" in _tf_error(c)
    # a block whose trailer ends exactly at the end of the file is inside it (its CRC is wrong)
    data = bytearray(good)
    _tf_set_index_handle(data, ioff, len(data) - 5 - ioff)
    idx.write_bytes(bytes(data))
    assert "CRC32C mismatch" in _tf_error(c)
    # one byte further is past the end
    data = bytearray(good)
    _tf_set_index_handle(data, ioff, len(data) - 4 - ioff)
    idx.write_bytes(bytes(data))
    msg = _tf_error(c)
    assert f"index block at byte {ioff} (size {len(data) - 4 - ioff}) lies past the end of the file" in msg, msg
    # a block of fewer than 4 bytes (no room for its restart count)
    data = bytearray(good)
    _tf_set_index_handle(data, ioff, 3)
    idx.write_bytes(bytes(data))
    assert "(size 3) lies past the end of the file" in _tf_error(c)


# ---- GGUF's tensor table (GGUFHeader._check_data) ------------------------------------------------
def _gguf_two(tmp_path, pad: int = 0):
    gguf = pytest.importorskip("gguf", reason="gguf-py (the `dev` extra) writes the test files")
    p = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("wa", np.arange(32, dtype=np.float32))
    w.add_tensor("wb", np.arange(32, 64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if pad:
        with open(p, "ab") as f:
            f.write(b"\0" * pad)
    return p


def _gguf_set_offset(p, name: bytes, off: int) -> None:
    data = bytearray(p.read_bytes())
    i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    at = i + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, at, off)
    p.write_bytes(bytes(data))


def test_gguf_tensors_that_touch_are_fine_and_the_last_may_end_the_file(tmp_path):
    p = _gguf_two(tmp_path)
    with open_reader(p) as r:
        info = r.info()
        assert info.warnings == []
        assert b"".join(bytes(c) for c in r.iter_chunks("wb")) == np.arange(32, 64, dtype=np.float32).tobytes()


def test_gguf_tensor_past_the_end(tmp_path):
    p = _gguf_two(tmp_path)
    _gguf_set_offset(p, b"wb", 160)
    with pytest.raises(CorruptFile) as e, open_reader(p) as r:
        r.info()
    size = p.stat().st_size
    start = size - 256  # two 128-byte tensors end the file
    assert str(e.value) == (
        f"{p}: tensor 'wb': data [{start + 160}, {start + 288}) runs past the end of the {size}-byte file (truncated?)"
    ), str(e.value)


def test_gguf_overlapping_tensors(tmp_path):
    p = _gguf_two(tmp_path)
    _gguf_set_offset(p, b"wb", 96)
    with pytest.raises(CorruptFile) as e, open_reader(p) as r:
        r.info()
    assert str(e.value) == f"{p}: tensor 'wb': data at offset 96 overlaps tensor 'wa' (which ends at 128)", str(e.value)


def test_gguf_misaligned_tensor_is_a_warning(tmp_path):
    p = _gguf_two(tmp_path, pad=32)
    _gguf_set_offset(p, b"wb", 132)
    with open_reader(p) as r:
        info = r.info()
    assert info.warnings == ["1 tensor(s) not aligned to 32 bytes (llama.cpp refuses this file), e.g. 'wb'"]


# ---- safetensors: the header's integer bounds (parse_header) ---------------------------------------
U64 = (1 << 64) - 1


def _st(tmp_path, header, data: bytes = b"", length=None):
    import json as _json

    hb = header if isinstance(header, bytes) else _json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return p


def _st_error(p) -> str:
    from ckptctl.formats.safetensors import SafetensorsReader

    with pytest.raises(CorruptFile) as e:
        SafetensorsReader(p).info()
    assert str(p) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "entry,message",
    [
        # the largest u64 is a valid dimension: the element count then overflows
        ({"dtype": "U8", "shape": [U64], "data_offsets": [0, 1]}, "overflows"),
        ({"dtype": "U8", "shape": [U64 + 1], "data_offsets": [0, 1]}, "bad shape"),
        # an end offset of 2^64-1 is a valid integer: the size check refuses it
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, U64]}, "needs 1"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, U64 + 1]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [U64, U64]}, "a hole: bytes 0..18446744073709551615"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [U64 + 1, 0]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, -1]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [False, 1]}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": {"0": 0}}, "expected [begin, end]"),
        ({"dtype": "U8", "shape": {"a": 1}, "data_offsets": [0, 1]}, "bad shape"),
        ({"dtype": 5, "shape": [1], "data_offsets": [0, 1]}, "unknown dtype 5"),
        ({"shape": [1], "data_offsets": [0, 1]}, "missing 'dtype'"),
        ({"dtype": "U8", "data_offsets": [0, 1]}, "missing 'shape'"),
        ({"dtype": "U8", "shape": [1]}, "missing 'data_offsets'"),
    ],
)
def test_header_integer_bounds_and_types(tmp_path, entry, message):
    p = _st(tmp_path, {"t": entry}, b"\0")
    msg = _st_error(p)
    assert "tensor 't'" in msg and message in msg, msg


def test_header_length_limits(tmp_path):
    from ckptctl.formats.safetensors import MAX_HEADER, SafetensorsReader

    # exactly at the limit (and past the file's end): refused for running past the end, not the limit
    p = _st(tmp_path, {}, b"", length=MAX_HEADER)
    assert "runs past the end of the" in _st_error(p)
    p = _st(tmp_path, {}, b"", length=MAX_HEADER + 1)
    assert f"exceeds the safetensors limit of {MAX_HEADER} bytes" in _st_error(p)
    # a header that ends exactly at the end of the file (no data): read
    p = _st(tmp_path, {})
    assert SafetensorsReader(p).info().tensors == []
    p = _st(tmp_path, b"{}", length=3)
    assert "header length 3 runs past the end of the 10-byte file" in _st_error(p)
    # 8 bytes: a length and nothing else; 7: too short
    p = tmp_path / "eight.safetensors"
    p.write_bytes(struct.pack("<Q", 0))
    assert "header is not valid JSON" in _st_error(p)
    p.write_bytes(b"\0" * 7)
    assert "file is 7 bytes, too short for a safetensors header" in _st_error(p)


def test_metadata_values_must_all_be_strings(tmp_path):
    from ckptctl.formats.safetensors import SafetensorsReader

    p = _st(
        tmp_path,
        {"__metadata__": {"a": "x", "b": 2}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
        b"\0",
    )
    assert "__metadata__ must map strings to strings" in _st_error(p)
    p = _st(tmp_path, {"__metadata__": {"a": "x"}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    assert SafetensorsReader(p).info().metadata == {"a": "x"}


def test_unsorted_header_with_empty_tensors_between(tmp_path):
    """Entries out of data order, zero-size tensors at the same offset as a real one: listed in
    data order (begin, then end), bytes exact."""
    from ckptctl.formats.safetensors import SafetensorsReader

    header = {
        "c": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
        "z2": {"dtype": "U8", "shape": [0], "data_offsets": [3, 3]},
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "z0": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
    }
    p = _st(tmp_path, header, b"abcde")
    with SafetensorsReader(p) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == ["z0", "a", "z2", "c"]
        assert b"".join(r.iter_chunks("c")) == b"de" and b"".join(r.iter_chunks("a")) == b"abc"


@pytest.mark.parametrize(
    "storage_type,dtype",
    [
        (("torch", "FloatStorage"), "float32"),
        (("torch", "UntypedStorage"), "uint8"),
        (("torch.storage", "_UntypedStorage"), "uint8"),  # torch 1.x's spelling
        (("torch", "ByteStorage"), "uint8"),
        (("torch", "a.b.UntypedStorage"), "uint8"),  # a dotted name: its last part counts
        ("torch.HalfStorage", "float16"),  # a class named by a string, not a global
    ],
)
def test_storage_class_names_map_to_dtypes(storage_type, dtype):
    from ckptctl.formats import pickles
    from ckptctl.formats.pickle_reader import storage_dtype

    st = pickles.Global(*storage_type) if isinstance(storage_type, tuple) else storage_type
    assert storage_dtype(st, "f.pt") == dtype


@pytest.mark.parametrize(
    "storage_type,shown",
    [
        (("pickle", "Pickler"), "pickle.Pickler"),
        ("weird.Thing", "Thing"),
        (("torch", "Untyped Storage"), "torch.Untyped Storage"),
    ],
)
def test_unknown_storage_class_is_refused_naming_it_and_the_file(storage_type, shown):
    from ckptctl.formats import pickles
    from ckptctl.formats.pickle_reader import storage_dtype

    st = pickles.Global(*storage_type) if isinstance(storage_type, tuple) else storage_type
    with pytest.raises(CorruptFile) as e:
        storage_dtype(st, "f.pt")
    assert e.value.message == f"unknown storage type {shown!r}" and str(e.value.path) == "f.pt"
