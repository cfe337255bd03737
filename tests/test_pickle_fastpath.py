"""The restricted unpickler's one-step path for the tensor arguments torch.save writes
(formats/pickles/fastpath.py, issue 13 item 6): checked against what torch wrote (dtype, shape,
strides, storage offsets, every byte), against the opcode loop on damaged pickles (same result,
same error, same globals), and on crafted files whose damage sits inside a sequence the fast path
takes (errors as honest as before)."""

from __future__ import annotations

import json
import random
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import run

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader, pickles
from ckptctl.formats.pickles import fastpath as fastpath_mod
from ckptctl.formats.pickles import machine as machine_mod
from ckptctl.formats.torch_zip import TorchZipReader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIRSTS = ("bfloat16", "float64", "int16", "int32", "float16", "float32", "bool")
N_SMALL = 300  # past 256 memo entries: LONG_BINGET / LONG_BINPUT as well as the one-byte forms


def _zoo() -> dict:
    base = torch.arange(512, dtype=torch.float32)
    # one tensor of each storage class first: their sequences hold a GLOBAL (the opcode loop's);
    # every tensor after them goes the fast way, but for a storage already named (by its key's memo)
    sd: dict = {f"first.{d}": torch.zeros(1, dtype=getattr(torch, d)) for d in FIRSTS}
    sd.update({f"layers.{i}.w": torch.full((2, 4), float(i), dtype=torch.bfloat16) for i in range(N_SMALL)})
    sd.update(
        {
            "scalar": torch.tensor(3.5, dtype=torch.float64),  # size () and stride (): EMPTY_TUPLE
            "vec300": torch.arange(300, dtype=torch.int16),  # BININT2 size
            "big": torch.arange(70_000, dtype=torch.int32) % 7,  # BININT size and numel
            "four_d": torch.arange(120, dtype=torch.float16).reshape(2, 3, 4, 5),  # MARK ... TUPLE
            "transposed": base[:64].view(8, 8).t(),  # strides (1, 8) on a shared storage
            "sliced": base[100:164].view(8, 8),  # storage offset 100 on the same storage
            "param": torch.nn.Parameter(torch.ones(3, 3)),  # _rebuild_parameter around the tensor
            "grad": torch.ones(2, requires_grad=True),  # NEWTRUE
            "expanded": torch.arange(4.0).view(1, 4).expand(3, 4),  # stride 0
            "bools": torch.tensor([True, False, True]),
        }
    )
    return sd


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fastpath") / "zoo.pt"
    sd = _zoo()
    torch.save(sd, path)
    return path, sd


def _count_fast(monkeypatch) -> list[int]:
    hits = [0]
    real = fastpath_mod.torch_tensor_args

    def counting(*a):
        end = real(*a)
        hits[0] += end >= 0
        return end

    monkeypatch.setattr(fastpath_mod, "torch_tensor_args", counting)
    return hits


def test_every_tensor_as_torch_wrote_it(zoo_file, monkeypatch):
    path, sd = zoo_file
    hits = _count_fast(monkeypatch)
    with open_reader(path) as r:
        info = r.info()
        got = {t.name: t for t in info.tensors}
        assert list(got) == list(sd)
        for name, t in sd.items():
            ti = got[name]
            assert ti.dtype == str(t.dtype).removeprefix("torch."), name
            assert ti.shape == tuple(t.shape), name
            assert ti.loc.stride == t.stride(), name
            assert ti.loc.byte_base == t.storage_offset() * t.element_size(), name
            assert b"".join(r.iter_chunks(name, 7)) == _raw(t), name
    assert hits[0] == len(sd) - len(FIRSTS) - 1  # "sliced": its storage key is a memo reference
    assert info.globals == [
        "torch._utils._rebuild_tensor_v2",
        "torch.BFloat16Storage",
        "collections.OrderedDict",
        "torch.DoubleStorage",
        "torch.ShortStorage",
        "torch.IntStorage",
        "torch.HalfStorage",
        "torch.FloatStorage",
        "torch.BoolStorage",
        "torch._utils._rebuild_parameter",
    ]


def test_inspect_json_of_the_zoo(zoo_file):
    path, sd = zoo_file
    r = run("inspect", path, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["tensors"]
    assert [(x["name"], x["shape"], x["nbytes"]) for x in rows] == [
        (k, list(t.shape), t.numel() * t.element_size()) for k, t in sd.items()
    ]


def _outcome(data: bytes, arch) -> tuple:
    """What the machine makes of `data` (storages resolved in the real archive): the tensors
    (name, dtype, shape, stride, offset, storage key/dtype/size), globals, warnings and nested
    pickles; or the error with its globals."""
    storages: dict = {}
    m = pickles.Machine(data, persistent_load=lambda pid: arch._storage(pid, storages), path="x")
    try:
        root = m.load()
        desc = pickles.describe(root, "x")
    except CorruptFile as e:
        return ("error", type(e).__name__, e.message, getattr(e, "globals", None), getattr(e, "more_globals", None))
    rows = []
    for name, rec, alias in desc.tensors:
        st = getattr(rec, "storage", None)
        rows.append(
            (
                name,
                alias,
                rec.dtype if isinstance(rec, pickles.TensorRecord) else None,
                getattr(rec, "shape", None),
                getattr(rec, "stride", None),
                getattr(rec, "offset", None),
                None if st is None else (st.key, st.dtype, st.numel, st.location),
            )
        )
    return ("ok", rows, m.globals, m.pairs, m.warnings, m.nested, desc.kind, sorted(desc.objects))


def test_damaged_pickles_end_as_the_opcode_loop_ends(zoo_file, monkeypatch):
    """Bytes changed inside the tensor sequences: with the fast path on and off, the machine
    gives the same tensors, or fails with the same message and the same globals."""
    path, _sd = zoo_file
    r = TorchZipReader(path)
    arch = r._archive()
    try:
        data = arch._member_bytes(arch.member("data.pkl"))
        start = data.index(b"layers.40.w")  # past the one-time opcodes: where the fast path runs
        rnd = random.Random(13)
        special = b"hjqrKMJt()Q\x85\x86\x87\x88\x89RX\xff\x00\x01"
        fast_seen = 0
        for i in range(200):
            buf = bytearray(data)
            for _ in range(1 + i % 3):
                at = rnd.randrange(start, len(data) - 1)
                buf[at] = rnd.choice(special) if rnd.random() < 0.7 else rnd.randrange(256)
            damaged = bytes(buf)
            hits = [0]
            real = fastpath_mod.torch_tensor_args

            def counting(*a, real=real, hits=hits):
                end = real(*a)
                hits[0] += end >= 0
                return end

            monkeypatch.setattr(fastpath_mod, "torch_tensor_args", counting)
            fast = _outcome(damaged, arch)
            monkeypatch.setattr(fastpath_mod, "torch_tensor_args", real)
            with monkeypatch.context() as off:
                off.setattr(machine_mod, "torch_entries", lambda *a: -1)
                slow = _outcome(damaged, arch)
            assert fast == slow, f"mutation {i}"
            fast_seen += hits[0] > 0
        assert fast_seen > 150  # the damaged pickles did go through the fast path
    finally:
        arch.close()


def _rewrite(src, dst, edit) -> None:
    """A copy of a torch zip with data.pkl changed by edit(bytes) -> bytes (members stored)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            raw = zin.read(zi)
            if zi.filename.endswith("/data.pkl"):
                raw = edit(raw)
            zout.writestr(zi.filename, raw)


def _last_entry(raw: bytes) -> int:
    return raw.index(b"layers.299.w")


@pytest.mark.parametrize(
    ("what", "edit", "message"),
    [
        (
            "negative numel",
            lambda raw, at: raw[:at] + re.sub(rb"K\x08t", b"J\xff\xff\xff\xfft", raw[at:], count=1),
            "storage '299': bad size -1",
        ),
        (
            "view past the storage",
            lambda raw, at: raw[:at] + raw[at:].replace(b"K\x02K\x04\x86", b"K\x02K\x05\x86", 1),
            "reaches past the end of storage '299' (16 bytes)",
        ),
        (
            "storage not in the archive",
            lambda raw, at: raw[:at] + raw[at:].replace(b"X\x03\x00\x00\x00299", b"X\x03\x00\x00\x00999", 1),
            "storage data/999 is missing from the archive",
        ),
        (
            "the rebuild function from a memo entry that was never written",
            lambda raw, at: raw[:at] + raw[at:].replace(b"h\x02((", b"j\xff\xff\x00\x00((", 1),
            "memo key 65535 not found",
        ),
        (
            "numel larger than the storage member",
            lambda raw, at: raw[:at] + re.sub(rb"K\x08t", b"K\x09t", raw[at:], count=1),
            "storage data/299 holds 16 bytes, but 9 bfloat16 elements need 18",
        ),
    ],
)
def test_damage_inside_a_fast_sequence_is_an_honest_error(tmp_path, what, edit, message):
    src = tmp_path / "ok.pt"
    torch.save({f"layers.{i}.w": torch.zeros(2, 4, dtype=torch.bfloat16) for i in range(N_SMALL)}, src)
    bad = tmp_path / "bad.pt"
    _rewrite(src, bad, lambda raw: edit(raw, _last_entry(raw)))
    r = run("inspect", bad, "--format", "json")
    assert r.returncode == 1, what
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_storage_shared_by_a_fast_and_a_slow_tensor(tmp_path):
    """Two names for one tensor and two views of one storage, past the first 256 memo entries."""
    w = torch.arange(16, dtype=torch.float32).view(4, 4)
    sd = {f"pad.{i}": torch.zeros(1) for i in range(N_SMALL)}
    sd.update({"w": w, "tied": w, "row": w[1], "col": w[:, 2]})
    p = tmp_path / "tied.pt"
    torch.save(sd, p)
    with open_reader(p) as r:
        got = {t.name: t for t in r.info().tensors}
        assert got["tied"].alias_of == "w"
        assert got["row"].alias_of is None and got["row"].loc.byte_base == 16
        assert got["col"].loc.stride == (4,) and got["col"].loc.byte_base == 8
        for k in ("w", "row", "col"):
            assert np.frombuffer(b"".join(r.iter_chunks(k)), np.float32).tolist() == sd[k].flatten().tolist()
