"""safetensors headers read by the bulk path (formats/safetensors._bulk: column checks, and
duplicate keys found by counting ':' instead of a hook per JSON object, issue 13): what it must
still refuse, word for word, and what it must accept in the same order as the reference library.
Headers are built as bytes here, or written by the safetensors library itself."""

from __future__ import annotations

import json
import struct

import pytest

from ckptctl.errors import CorruptFile
from ckptctl.formats.safetensors import SafetensorsReader, parse_header

PATH = "/data/m.safetensors"
E4 = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'


def blob(text: str, data_len: int) -> bytes:
    body = text.encode()
    return struct.pack("<Q", len(body)) + body + b"\0" * data_len


def refused(b: bytes) -> str:
    with pytest.raises(CorruptFile) as ei:
        parse_header(b, len(b), PATH)
    return ei.value.message


def test_a_key_twice_inside_an_entry_is_refused():
    # json.loads keeps one "dtype": the entry then looks like a good one of three keys; only the
    # count of ':' (7 in the text, 6 entries in the document) shows the lost pair
    b = blob('{"a": {"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4)
    assert refused(b) == "header JSON has the key 'dtype' twice"


def test_a_key_twice_in_metadata_or_at_the_top_is_refused():
    b = blob('{"__metadata__": {"k": "v", "k": "v"}, "a": ' + E4 % (0, 4) + "}", 4)
    assert refused(b) == "header JSON has the key 'k' twice"
    b = blob('{"a:b": ' + E4 % (0, 4) + ', "a:b": ' + E4 % (0, 4) + "}", 4)
    assert refused(b) == "header JSON has the key 'a:b' twice"
    # a ':' spelled \u003a in one name does not hide a second name written twice
    b = blob('{"x\\u003a": ' + E4 % (0, 4) + ', "y": ' + E4 % (4, 8) + ', "y": ' + E4 % (4, 8) + "}", 8)
    assert refused(b) == "header JSON has the key 'y' twice"


def test_colons_and_escapes_in_names_and_metadata_are_accepted():
    text = (
        '{"__metadata__": {"url": "http://h:80/a", "t\\u003a": "12:00"}, '
        '"a:b": ' + E4 % (0, 4) + ', "c\\u003Ad": ' + E4 % (4, 8) + ', "\\\\u003a": ' + E4 % (8, 12) + "}"
    )
    b = blob(text, 12)
    n, entries, meta = parse_header(b, len(b), PATH)
    assert list(entries) == ["a:b", "c:d", "\\u003a"]
    assert [(e[2], e[3]) for e in entries.values()] == [(0, 4), (4, 8), (8, 12)]
    assert meta == {"url": "http://h:80/a", "t:": "12:00"}


def test_a_header_out_of_data_order_comes_back_in_data_order(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file

    ts = {
        f"layers.{i}.w{j}": torch.zeros(i % 3, 2, dtype=torch.float16 if j else torch.float32)
        for i in range(40)
        for j in range(2)
    }
    lib = tmp_path / "lib.safetensors"
    save_file(ts, str(lib), metadata={"note": "a:b"})
    raw = lib.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    # the same entries, listed backwards (zero-byte tensors share their begin with the next one)
    text = json.dumps(dict(reversed(header.items())), separators=(",", ":"))
    text += " " * (-len(text) % 8)
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n :])
    with safe_open(str(p), "pt") as ref:  # the reference reads it
        assert set(ref.keys()) == set(ts)
    meta = header.pop("__metadata__")
    offsets = {k: tuple(v["data_offsets"]) for k, v in header.items()}
    info = SafetensorsReader(p).info()
    got = [t.name for t in info.tensors]
    assert sorted(got) == sorted(ts)
    assert [offsets[k] for k in got] == sorted(offsets.values())  # in data order
    # among equal (begin, end) (zero-byte tensors at one place) the order of the header is kept
    assert got == [k for k, _ in sorted(reversed(list(offsets.items())), key=lambda kv: kv[1])]
    base = 8 + len(text)
    for t in info.tensors:
        assert list(t.shape) == list(ts[t.name].shape)
        assert (t.loc.offset, t.nbytes) == (base + offsets[t.name][0], offsets[t.name][1] - offsets[t.name][0])
    assert info.metadata == meta == {"note": "a:b"}


def test_an_extra_key_in_an_entry_still_reads():
    text = '{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{"y":[1,{"z":":"}]}}}'
    b = blob(text, 4)
    _n, entries, _m = parse_header(b, len(b), PATH)
    assert list(entries) == ["a"]


def test_holes_and_overlaps_in_a_well_formed_header_are_refused():
    # each entry alone is good: only the tiling shows what is wrong
    assert refused(blob('{"a": ' + E4 % (4, 8) + "}", 8)) == (
        "tensor 'a': bad data_offsets [4, 8]: a hole: bytes 0..4 of the data belong to no tensor"
    )
    assert refused(blob('{"b": ' + E4 % (4, 8) + ', "a": ' + E4 % (0, 4) + ', "c": ' + E4 % (4, 8) + "}", 12)) == (
        "tensor 'c': bad data_offsets [4, 8]: overlaps the previous tensor (begins at 4, previous ends at 8)"
    )
