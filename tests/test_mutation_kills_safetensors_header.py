"""safetensors.parse_header, refusal by refusal, with the whole one-line message (the readers
mutation scope: a mutant that garbles a number or drops the path in a message survived tests
that matched only key words). Headers are built as bytes here, not by ckptctl's writer."""

from __future__ import annotations

import json
import struct

import pytest

from ckptctl.errors import CorruptFile
from ckptctl.formats.safetensors import MAX_HEADER, parse_header

PATH = "/data/m.safetensors"


def blob(header, data_len: int = 0, *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(body)) + body + b"\0" * data_len


def refused(b: bytes, size: int | None = None) -> str:
    with pytest.raises(CorruptFile) as ei:
        parse_header(b, len(b) if size is None else size, PATH)
    assert str(ei.value.path) == PATH  # every refusal names the file
    return ei.value.message


def test_json_errors_say_where():
    assert refused(blob(None, raw=b'{"a": }')) == "header is not valid JSON (Expecting value at line 1 column 7)"
    deep = b"[" * 100000 + b"]" * 100000
    assert refused(blob(None, raw=deep)) == "header is not valid JSON (too deeply nested)"


def test_duplicate_key_names_it():
    assert refused(blob(None, raw=b'{"w": {}, "w": {}}')) == "header JSON has the key 'w' twice"


def test_not_an_object_and_bad_metadata():
    assert refused(blob([1, 2])) == "header is a JSON list, expected an object"
    assert refused(blob({"__metadata__": {"a": 1}})) == "__metadata__ must map strings to strings"
    assert refused(blob({"__metadata__": ["a"]})) == "__metadata__ must map strings to strings"


def test_offsets_refusals_name_the_numbers():
    e = lambda b, e_, shape=(1,): {"dtype": "F32", "shape": list(shape), "data_offsets": [b, e_]}  # noqa: E731
    assert refused(blob({"a": e(0, 4), "b": e(8, 12)}, 12)) == (
        "tensor 'b': bad data_offsets [8, 12]: a hole: bytes 4..8 of the data belong to no tensor"
    )
    # end before begin, at the current position
    assert (
        refused(blob({"a": e(0, 4), "b": e(4, 2, (0,))}, 4))
        == "tensor 'b': bad data_offsets [4, 2]: end 2 is before begin 4"
    )
    assert refused(blob({"a": e(0, 8, (2,)), "b": e(4, 8)}, 8)) == (
        "tensor 'b': bad data_offsets [4, 8]: overlaps the previous tensor (begins at 4, previous ends at 8)"
    )
    assert refused(blob({"a": e(0, 8)}, 8)) == "tensor 'a': data_offsets [0, 8] hold 8 bytes, but F32 [1] needs 4"


def test_size_mismatch_spells_the_sum():
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    b = blob(h, 8)
    n = len(b) - 8 - 8
    assert (
        refused(b + b"\0") == f"file is {len(b) + 1} bytes, but its header describes {len(b)} (8 + {n} header + 8 data)"
    )


def test_overflow_boundaries():
    # (numel == 2^64-1 makes nbits overflow anyway: `numel >= U64_MAX` is an equivalent mutant)
    e2 = {"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 0]}
    assert refused(blob({"a": e2})) == "tensor 'a': shape [4294967296, 4294967296] overflows"
    # bits: 2^61 float64 elements are 2^67 bits
    e3 = {"dtype": "F64", "shape": [2**61], "data_offsets": [0, 0]}
    assert refused(blob({"a": e3})) == "tensor 'a': shape [2305843009213693952] overflows"


def test_out_of_order_entries_come_back_in_data_order():
    h = {
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
    }
    b = blob(h, 8)
    n, entries, meta = parse_header(b, len(b), PATH)
    assert list(entries) == ["a", "b", "z"]
    assert [(v[2], v[3]) for v in entries.values()] == [(0, 4), (4, 8), (8, 8)]
    assert meta is None and n == len(b) - 16
    # in order already: the same order back
    h2 = dict(sorted(h.items()))
    b2 = blob(h2, 8)
    assert list(parse_header(b2, len(b2), PATH)[1]) == ["a", "b", "z"]


def test_the_first_offset_is_checked_on_its_own():
    e = {"dtype": "F32", "shape": [1], "data_offsets": [-1, 3]}
    assert refused(blob({"a": e}, 4)) == (
        "tensor 'a': bad data_offsets [-1, 3] (expected [begin, end], non-negative integers)"
    )


def test_the_header_is_read_exactly():
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    b = blob(h, 4)
    n, entries, _ = parse_header(b, len(b), PATH)
    assert n == len(b) - 12 and list(entries) == ["a"]
    # one more byte of header than declared would break the JSON: declared length is used exactly
    body = json.dumps(h).encode()
    assert refused(struct.pack("<Q", len(body)) + body + b"}" + b"\0" * 4).startswith("file is ")


@pytest.mark.parametrize("extra", [False, True], ids=["column-checks", "entry-by-entry"])
def test_an_empty_tensor_listed_before_the_one_it_follows(extra):
    """Ends in order but begins not: an empty tensor at byte 4 listed before the tensor at 0..4.
    The file is valid and comes back in data order. An extra key in the entries (which the reader
    allows) sends the header past the column checks to the entry-by-entry ones: both must agree
    (readers scope survivor _exact 146: order judged by the ends alone refused this file)."""
    h = {
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    if extra:
        for e in h.values():
            e["note"] = "x"
    b = blob(h, 4)
    n, entries, meta = parse_header(b, len(b), PATH)
    assert list(entries) == ["a", "z"]
    assert [(v[2], v[3]) for v in entries.values()] == [(0, 4), (4, 4)]
    assert meta is None and n == len(b) - 12


def test_an_overflow_whose_offsets_match_its_bytes():
    """2^62 one-byte elements in a range of 2^62 bytes (a file size given, not written): the
    element count fits in 64 bits, the bit count does not. Refused whichever path reads it
    (st_header survivor _bulk 178: the column checks refused only when both overflowed)."""
    e = {"dtype": "U8", "shape": [2**62], "data_offsets": [0, 2**62]}
    b = blob({"a": e})
    assert refused(b, len(b) + 2**62) == "tensor 'a': shape [4611686018427387904] overflows"


def test_the_first_refusals_word_the_numbers_and_name_the_file():
    """Before the JSON is read (st_header survivors in _parse: messages, paths, boundaries)."""
    assert refused(b"\x01\x00\x00", 3) == "file is 3 bytes, too short for a safetensors header (8-byte length)"
    # exactly 8 bytes: long enough for the length; a header of 0 bytes is not JSON
    assert refused(struct.pack("<Q", 0), 8) == "header is not valid JSON (Expecting value at line 1 column 1)"
    too_long = struct.pack("<Q", MAX_HEADER + 1)
    assert refused(too_long, 10**9) == "header length 100000001 exceeds the safetensors limit of 100000000 bytes"
    at_limit = struct.pack("<Q", MAX_HEADER)  # the limit itself is allowed: then it must fit the file
    assert refused(at_limit, 1000) == "header length 100000000 runs past the end of the 1000-byte file"
    assert refused(struct.pack("<Q", 1000) + b"{}", 88) == "header length 1000 runs past the end of the 88-byte file"
    assert refused(blob(None, raw=b'{"a\xff": 1}')) == "header is not valid UTF-8 (byte 3 of the header)"


def test_a_header_only_the_entry_checks_take_reads_each_tensors_own_bytes(tmp_path):
    """An extra key in an entry (allowed) sends the header to the entry-by-entry checks; the
    tensors read from it must be each its own bytes, sized from its offsets (st_header survivors
    _parse 72, 74: the byte counts of that path)."""
    from ckptctl.formats import open_reader

    data = bytes(range(12))
    h = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "note": "x"},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12], "note": "y"},
    }
    p = tmp_path / "extra.safetensors"
    p.write_bytes(blob(h) + data)
    with open_reader(p) as r:
        info = r.info()
        assert [(t.name, t.nbytes) for t in info.tensors] == [("a", 4), ("b", 8)]
        assert b"".join(bytes(c) for c in r.iter_chunks("a")) == data[:4]
        assert b"".join(bytes(c) for c in r.iter_chunks("b")) == data[4:]
