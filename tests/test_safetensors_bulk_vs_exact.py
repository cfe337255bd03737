"""The safetensors header has two checkers (issue 13): `_bulk`, column by column with C loops, and
`_exact`, entry by entry, which words every refusal. `_bulk` may decline any header (then `_exact`
decides), but whatever it accepts `_exact` must accept too, with the same tensors in the same
order and the same metadata. Checked here on generated headers, valid ones and ones with one or
two small realistic faults (the kinds a buggy writer or a hostile file has): offsets off by one, entries
out of order, empty tensors, sub-byte dtypes, bools and floats where ints belong, missing and extra
keys, duplicate keys, ':' in names and metadata (raw and escaped), a wrong file size, negative
sizes whose product is positive, half a byte of 4-bit data.
Headers are built here as JSON text, not by ckptctl's writer."""

from __future__ import annotations

import json
import random

import pytest

from ckptctl.errors import CorruptFile
from ckptctl.formats import safetensors as stf

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - after importorskip
from hypothesis import strategies as st  # noqa: E402

CODES = ["F32", "BF16", "U8", "BOOL", "F4", "F6_E2M3", "I64"]  # 32, 16, 8, 8, 4, 6, 64 bits
BITS = {"F32": 32, "BF16": 16, "U8": 8, "BOOL": 8, "F4": 4, "F6_E2M3": 6, "I64": 64}
FAULTS = [
    "none", "shuffle", "off_by_one", "swap", "negative", "bool", "float", "missing", "extra",
    "duplicate", "colon_name", "escaped_colon", "meta_colon", "meta_not_str", "unknown_dtype",
    "file_size", "hole", "overlap", "shape_not_list", "offsets_three", "negative_dims", "half_byte",
    "duplicate_inner", "duplicate_escaped",
]  # fmt: skip


def _tensors(rng: random.Random) -> list[list]:
    """[name, code, shape, begin, end] in data order, tiling the buffer; whole bytes each."""
    out, pos = [], 0
    for i in range(rng.randint(1, 6)):
        code = rng.choice(CODES)
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        numel = 1
        for s in shape:
            numel *= s
        if numel * BITS[code] % 8:
            shape = shape + [2] if BITS[code] == 4 else shape + [4]  # a whole number of bytes
            numel *= shape[-1]
        nbytes = numel * BITS[code] // 8
        out.append([f"t{i}.w" if rng.random() < 0.8 else f"t{i}", code, shape, pos, pos + nbytes])
        pos += nbytes
    return out


def _resize(ts: list[list], k: int, nbytes: int) -> int:
    """Tensor k's range made `nbytes` long, the ones after it moved along; the new data length."""
    shift = nbytes - (ts[k][4] - ts[k][3])
    ts[k][4] += shift
    for u in ts[k + 1 :]:
        u[3] += shift
        u[4] += shift
    return max(u[4] for u in ts)


def _header(rng: random.Random) -> tuple[str, int, str]:
    """(JSON text, data length, the faults applied: none, one or two)."""
    ts = _tensors(rng)
    data_len = ts[-1][4]
    faults = set(rng.sample(FAULTS, rng.choice([1, 1, 2])))
    if "duplicate_escaped" in faults:  # a key given twice, and a name with an escaped ':'
        faults |= {"duplicate_inner", "escaped_colon"}
    meta: dict | None = {"format": "pt"} if rng.random() < 0.5 else None
    k = rng.randrange(len(ts))
    t = ts[k]
    if "shuffle" in faults:
        rng.shuffle(ts)
    if "off_by_one" in faults:
        t[rng.choice([3, 4])] += rng.choice([-1, 1])
    if "swap" in faults:
        t[3], t[4] = t[4], t[3]
    if "negative" in faults:
        t[3] = -1
    if "hole" in faults:
        for u in ts[k:]:
            u[3] += 1
            u[4] += 1
    if "overlap" in faults and k > 0:
        t[3] -= 1
    if "colon_name" in faults:
        t[0] = "a:b" + t[0]
    if "escaped_colon" in faults:
        t[0] = "esc" + t[0]  # the ':' is written as \u003a below
    if "meta_colon" in faults:
        meta = {"a:b": "c:d", "e": "::"}
    if "meta_not_str" in faults:
        meta = {"a": 1}
    if "unknown_dtype" in faults:
        t[1] = "F33"
    if "negative_dims" in faults:  # 2 elements from two negative sizes, in a 2-byte range
        t[1], t[2] = "U8", [-1, -2]
        data_len = _resize(ts, k, 2)
    if "half_byte" in faults:  # 12 bits: one and a half bytes, in a one-byte range
        t[1], t[2] = "F4", [3]
        data_len = _resize(ts, k, 1)
    entries = {}
    for name, code, shape, b, e in ts:
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [b, e]}
    e = entries[t[0]]
    if "bool" in faults:
        (e["shape"] if e["shape"] and rng.random() < 0.5 else e["data_offsets"])[0] = True
    if "float" in faults:
        e["data_offsets"][1] = float(e["data_offsets"][1])
    if "missing" in faults:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    if "extra" in faults:
        e["extra"] = "x"
    if "shape_not_list" in faults:
        e["shape"] = 3
    if "offsets_three" in faults:
        e["data_offsets"] = e["data_offsets"] + [0]
    doc = ({"__metadata__": meta} if meta is not None else {}) | entries
    text = json.dumps(doc, separators=(",", ":"))
    if "duplicate" in faults:
        body = json.dumps(entries[t[0]], separators=(",", ":"))
        text = text[:-1] + f',"{t[0]}":{body}}}'
    if "duplicate_inner" in faults and "dtype" in entries[t[0]]:  # "dtype" twice in one entry
        body = json.dumps(entries[t[0]], separators=(",", ":"))
        v = json.dumps(entries[t[0]]["dtype"])
        twice = body.replace(f'"dtype":{v}', f'"dtype":{v},"dtype":{v}', 1)
        text = text.replace(f'"{t[0]}":{body}', f'"{t[0]}":{twice}', 1)
    if "escaped_colon" in faults:  # (the duplicate too: the same key, escaped alike)
        esc = rng.choice(["\\u003a", "\\u003A"])  # JSON allows either case
        text = text.replace(f'"{t[0]}"', '"' + t[0].replace("esc", f"e{esc}s") + '"')
    size_fault = 1 if "file_size" in faults else 0
    return text, data_len + size_fault, ",".join(sorted(faults))


def _exact(text: str, data_len: int):
    n = len(text.encode())
    try:
        entries, meta = stf._exact(text, n, 8 + n + data_len, "f")
    except CorruptFile as e:
        return ("refused", e.message)
    names = list(entries)
    vals = list(entries.values())
    return (
        "ok",
        names,
        [v[0].st for v in vals],
        [v[1] for v in vals],
        [v[2] for v in vals],
        [v[3] for v in vals],
        meta,
    )


def _bulk(text: str, data_len: int):
    n = len(text.encode())
    got = stf._bulk(text, n, 8 + n + data_len)
    if got is None:
        return None
    (names, codes, shapes, begins, ends, nbytes), meta = got
    assert nbytes == [e - b for b, e in zip(begins, ends)] and all(type(x) is int for x in nbytes)
    return ("ok", names, codes, shapes, begins, ends, meta)


@settings(max_examples=400, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_what_the_column_checks_accept_the_entry_checks_accept_alike(rnd):
    text, data_len, fault = _header(rnd)
    exact = _exact(text, data_len)
    bulk = _bulk(text, data_len)
    if bulk is not None:
        assert exact == bulk, (fault, text)
    # and parse_header gives the entry checks' verdict, whichever path it took
    raw = len(text.encode()).to_bytes(8, "little") + text.encode()
    size = len(raw) + data_len
    if exact[0] == "refused":
        with pytest.raises(CorruptFile) as ei:
            stf.parse_header(raw, size, "f")
        assert ei.value.message == exact[1]
    else:
        n, entries, meta = stf.parse_header(raw, size, "f")
        assert list(entries) == exact[1] and meta == exact[6]
        assert [v[0].st for v in entries.values()] == exact[2]
        assert [v[1] for v in entries.values()] == exact[3]
        assert [(v[2], v[3]) for v in entries.values()] == list(zip(exact[4], exact[5]))


def test_the_generator_makes_both_kinds():
    """The property above is only worth something if the headers reach both verdicts and the
    column checks accept many of them (else it compares nothing)."""
    rng = random.Random(7)
    seen = {"ok": 0, "refused": 0, "bulk": 0}
    faults = set()
    for _ in range(600):
        text, data_len, fault = _header(rng)
        faults.update(fault.split(","))
        seen[_exact(text, data_len)[0]] += 1
        seen["bulk"] += _bulk(text, data_len) is not None
    assert faults == set(FAULTS)
    assert seen["ok"] > 80 and seen["refused"] > 200 and seen["bulk"] > 80, seen
