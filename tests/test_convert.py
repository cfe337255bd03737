"""`ckptctl convert`: selection and renaming, casting (checked against torch), shards, every
(source, target) pair end to end through the CLI, round trips, bad input, atomicity, real files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL, cli, real_expected, real_manifest, real_params, run

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, Incompatible, UsageError
from ckptctl.formats import READERS
from ckptctl.formats.base import Reader
from ckptctl.model import CheckpointInfo, TensorInfo
from ckptctl.ops import convert as cv
from ckptctl.ops.select import find_collisions, parse_rename, select

torch = pytest.importorskip("torch")


def have_reader(fmt: str) -> bool:
    return importlib.util.find_spec(READERS[fmt][0]) is not None


def needs_reader(*fmts):
    missing = [f for f in fmts if not have_reader(f)]
    return pytest.mark.skipif(bool(missing), reason=f"reader not built yet: {missing}")


def raw(t) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def T(name, dtype="float32", shape=(2,), alias=None):
    return TensorInfo(name, dtype, shape, dtypes.nbytes(dtype, shape), alias)


def sha(path: Path) -> str:
    if path.is_dir():
        return "".join(sha(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tmp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".ckptctl-" in p.name]


# ---- selection (pure) ---------------------------------------------------------------------------
LIGHTNING = [
    T("state_dict/model.enc.w"),
    T("state_dict/model.enc.b"),
    T("state_dict/model.head.w"),
    T("optimizer_states/0/state/0/exp_avg"),
    T("optimizer_states/0/state/1/exp_avg"),
]


def test_select_training_default_key_all():
    s = select(LIGHTNING)
    assert [o.name for o in s.tensors] == ["model.enc.w", "model.enc.b", "model.head.w"]
    assert s.training_default and s.outside_root == 2 and "training checkpoint" in s.notes[0]
    assert s.names["model.enc.w"] == "state_dict/model.enc.w"
    s = select(LIGHTNING, key="optimizer_states/0")
    assert [o.name for o in s.tensors] == ["state/0/exp_avg", "state/1/exp_avg"] and not s.notes
    s = select(LIGHTNING, all_=True)
    assert [o.name for o in s.tensors] == [t.name for t in LIGHTNING]
    with pytest.raises(Incompatible, match="no tensor under --key 'nope'.*state_dict, optimizer_states"):
        select(LIGHTNING, key="nope")
    with pytest.raises(UsageError):
        select(LIGHTNING, key="state_dict", all_=True)
    flat = [T("a"), T("b")]
    s = select(flat)
    assert [o.name for o in s.tensors] == ["a", "b"] and not s.training_default


def test_select_filters_and_renames():
    s = select(LIGHTNING, include=["model.enc"], strip_prefix=["model."], add_prefix="bert.")
    assert [o.name for o in s.tensors] == ["bert.enc.w", "bert.enc.b"] and s.filtered_out == 1
    full = select(LIGHTNING, include=["state_dict/model.enc"])  # the full name works too
    assert [o.name for o in full.tensors] == ["model.enc.w", "model.enc.b"]
    s = select(LIGHTNING, exclude=["*.b"], rename=[r"^model\.(\w+)\.=\1/"])
    assert [o.name for o in s.tensors] == ["enc/w", "head/w"]
    s = select([T("module.a"), T("b")], strip_prefix=["module."])
    assert [o.name for o in s.tensors] == ["a", "b"]
    with pytest.raises(
        Incompatible,
        match=r"'state_dict/model\.enc\.w' and 'state_dict/model\.enc\.b' would "
        r"both be named 'x'",
    ):
        select(LIGHTNING, rename=[".+=x"])
    with pytest.raises(Incompatible, match="no tensor selected.*--include nothing"):
        select(LIGHTNING, include=["nothing"])
    with pytest.raises(UsageError, match="OLD=NEW"):
        parse_rename("noequals")
    with pytest.raises(UsageError, match="bad regex"):
        parse_rename("(=x")
    pat, repl = parse_rename(r"a\=b=c")
    assert pat.pattern == "a=b" and repl == "c"
    assert find_collisions([("a", "x"), ("b", "y"), ("c", "x")]) == [("x", ["a", "c"])]


def test_select_keeps_ties_when_target_dropped():
    ts = [T("emb"), T("dec.w", alias="emb"), T("head", alias="dec.w"), T("other")]
    s = select(ts)
    assert [(o.name, o.alias_of) for o in s.tensors] == [
        ("emb", None),
        ("dec.w", "emb"),
        ("head", "emb"),
        ("other", None),
    ]
    s = select(ts, exclude=["emb"], add_prefix="m.")
    assert [(o.name, o.alias_of) for o in s.tensors] == [("m.dec.w", None), ("m.head", "m.dec.w"), ("m.other", None)]


# ---- shards, chunking, comparing (pure) ---------------------------------------------------------
def test_plan_shards_and_names():
    assert cv.plan_shards([4, 4, 4], 8) == [[0, 1], [2]]
    assert cv.plan_shards([10, 1, 1], 8) == [[0], [1, 2]]  # a big tensor gets its own shard
    assert cv.plan_shards([1, 10, 1], 8) == [[0], [1], [2]]
    assert cv.plan_shards([], 8) == [[]]
    assert cv.shard_file_names("safetensors", 1) == (["model.safetensors"], None)
    assert cv.shard_file_names("torch-zip", 2) == (
        ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
        "pytorch_model.bin.index.json",
    )


def test_aligned_chunks_and_same_bytes():
    data = bytes(range(40))
    pieces = [data[:3], data[3:4], data[4:17], data[17:40]]
    out = list(cv.aligned_chunks(pieces, 4))
    assert all(len(c) % 4 == 0 for c in out) and b"".join(bytes(c) for c in out) == data
    with pytest.raises(CorruptFile, match="middle of an element"):
        list(cv.aligned_chunks([data[:6]], 4))
    assert cv.same_bytes([data[:5], data[5:]], [data]) is None
    assert cv.same_bytes([data], [data[:39]]) == 39
    assert cv.same_bytes([data], [data[:20], b"\xff", data[21:]]) == 20
    assert cv.same_bytes([], [b"", b""]) is None


# ---- casting, checked against torch -------------------------------------------------------------
def _sample(dtype: str) -> np.ndarray:
    """Random values over many magnitudes plus the special cases, as a numpy array of `dtype`."""
    rng = np.random.default_rng(1)
    v = np.concatenate(
        [
            rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 12, 20000),
            [
                0.0,
                -0.0,
                np.inf,
                -np.inf,
                np.nan,
                448,
                449,
                464,
                465,
                480,
                57344,
                61440,
                65504,
                65520,
                1e-45,
                2.0**-126,
                2.0**-149,
                3.4028235e38,
                1e39,
                1 + 2.0**-8 + 2.0**-40,
                1 + 2.0**-11 + 2.0**-50,
                -1255.4999498196614,
                0.5 * 2.0**-133,
            ],
        ]
    )
    with np.errstate(all="ignore"):
        return v.astype(dtypes.numpy_dtype(dtype))


@pytest.mark.parametrize("src", cv.CAST_DTYPES)
def test_cast_matches_torch(src):
    x = _sample(src)
    tsrc = (
        torch.from_numpy(x.view(f"u{x.itemsize}").astype(np.int64))
        .to({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.itemsize])
        .view(getattr(torch, src))
    )
    assert raw(tsrc) == x.tobytes()
    for dst in cv.CAST_DTYPES:
        got = cv.cast_array(x, dst)
        want = np.frombuffer(raw(tsrc.to(getattr(torch, dst))), dtype=dtypes.numpy_dtype(dst))
        with np.errstate(all="ignore"):
            nan_w = np.isnan(want.astype(np.float64))
        nan_g = np.isnan(got.astype(np.float64))
        assert (nan_w == nan_g).all(), (src, dst)
        gb = got.view(f"u{got.itemsize}")[~nan_g]
        wb = want.view(f"u{want.itemsize}")[~nan_w]
        bad = np.nonzero(gb != wb)[0]
        assert bad.size == 0, (src, dst, x[~nan_g][bad[:5]], gb[bad[:5]], wb[bad[:5]])


def test_cast_chunks_is_chunk_independent():
    x = _sample("float32")
    b = x.tobytes()
    pieces = [b[i : i + 1001] for i in range(0, len(b), 1001)]  # cuts through elements
    out = b"".join(bytes(c) for c in cv.cast_chunks(pieces, "float32", "bfloat16"))
    assert out == cv.cast_array(x, "bfloat16").tobytes()


def test_cast_target_names():
    assert cv.cast_target("bf16") == "bfloat16" and cv.cast_target("fp8_e4m3") == "float8_e4m3fn"
    with pytest.raises(UsageError, match="cast targets"):
        cv.cast_target("int8")
    with pytest.raises(UsageError, match="unknown dtype"):
        cv.cast_target("float13")


# ---- a fake reader drives ops/convert without any real format -----------------------------------
class FakeReader(Reader):
    format = "fake"

    def __init__(self, tensors: dict, aliases=None, fail_on=None, metadata=None):
        super().__init__("fake")
        self.t = tensors
        self.aliases = aliases or {}
        self.fail_on = fail_on
        self.metadata = metadata or {}

    def _load_info(self):
        return CheckpointInfo(
            "fake",
            "fake",
            [
                TensorInfo(
                    n,
                    str(t.dtype).removeprefix("torch."),
                    tuple(t.shape),
                    t.numel() * t.element_size(),
                    self.aliases.get(n),
                )
                for n, t in self.t.items()
            ],
            metadata=self.metadata,
        )

    def iter_chunks(self, name, size=cv.CHUNK):
        b = raw(self.t[name])
        for i in range(0, len(b), 5):
            if name == self.fail_on and i >= 5:
                raise CorruptFile(f"tensor {name!r}: file truncated")
            yield b[i : i + 5]


@pytest.fixture
def fake_src(monkeypatch, tmp_path):
    """Make plan_convert read `tmp_path/src.fake` through a FakeReader."""
    state = {}

    def fake_open(path):
        if Path(path).name == "src.fake":
            return state["reader"]
        from ckptctl.formats import open_reader as real

        return real(path)

    monkeypatch.setattr(cv, "open_reader", fake_open)
    monkeypatch.setattr(cv, "resolve", lambda p: ("fake", Path(p)))
    src = tmp_path / "src.fake"
    src.write_bytes(b"x")

    def make(tensors, **kw):
        state["reader"] = FakeReader(tensors, **kw)
        return src

    return make


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".h5"])
def test_ops_convert_with_fake_reader(fake_src, tmp_path, suffix):
    w = torch.randn(3, 5)
    ts = {
        "enc.w": w,
        "dec.w": w,
        "b16": torch.randn(7).to(torch.bfloat16),
        "i": torch.arange(5),
        "s": torch.tensor(1.5, dtype=torch.float64),
        "e": torch.zeros(0, 3),
    }
    src = fake_src(ts, aliases={"dec.w": "enc.w"}, metadata={"epoch": 4})
    dst = tmp_path / f"out{suffix}"
    plan = cv.plan_convert(src, dst, dtype="bf16")
    assert plan.out_dtype == {
        "enc.w": "bfloat16",
        "dec.w": "bfloat16",
        "b16": "bfloat16",
        "i": "int64",
        "s": "bfloat16",
        "e": "bfloat16",
    }
    res = cv.run_convert(plan)
    assert res.verified and res.verified_tensors == 6 and res.outputs == [dst]
    if suffix == ".pt":
        sd = torch.load(dst, weights_only=True)
        assert sd["dec.w"] is sd["enc.w"]
    else:
        from ckptctl.formats import open_reader

        with open_reader(dst) as r:
            sd = {
                t.name: torch.from_numpy(r.read(t.name).view(f"u{r.read(t.name).itemsize}").astype(np.int64))
                for t in r.info().tensors
            }
            assert r.info().tensor("dec.w").alias_of == "enc.w" or suffix == ".safetensors"
            if suffix == ".safetensors":
                assert r.info().metadata["epoch"] == "4"
        sd = {k: v for k, v in sd.items()}
        return
    for k, t in ts.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert sd[k].dtype == want.dtype and raw(sd[k]) == raw(want), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".h5"])
def test_failure_mid_stream_leaves_nothing(fake_src, tmp_path, suffix):
    src = fake_src({"a": torch.randn(10), "b": torch.randn(10)}, fail_on="b")
    dst = tmp_path / f"out{suffix}"
    dst.write_bytes(b"previous")
    plan = cv.plan_convert(src, dst, force=True)
    with pytest.raises(CorruptFile, match="truncated"):
        cv.run_convert(plan)
    assert dst.read_bytes() == b"previous"
    assert tmp_leftovers(tmp_path) == []


def test_verify_catches_a_wrong_output(fake_src, tmp_path, monkeypatch):
    src = fake_src({"a": torch.randn(10)})
    dst = tmp_path / "out.safetensors"
    plan = cv.plan_convert(src, dst)
    staged = cv.write_output(plan)
    data = bytearray(staged.out.read_bytes())
    data[-1] ^= 1
    staged.out.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="verify failed: tensor 'a' differs from the source at byte 39"):
        cv.verify_output(plan, staged.out)
    staged.discard()
    assert not dst.exists() and tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize("shards", [None, "1KB"])
def test_output_is_fsynced_before_it_gets_dsts_name(tmp_path, monkeypatch, shards):
    """The staged files are fsynced by a background thread while verify runs; the rename to
    DST waits for it (a power cut never leaves a DST whose bytes were not on disk)."""
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({f"w{i}": torch.randn(100) for i in range(4)}, str(src))
    dst = tmp_path / ("out" if shards else "out.safetensors")
    events: list[tuple[str, int]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        time.sleep(0.05)  # a slow disk: without the wait, the rename would come first
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    def moved(real):
        def f(a, b, *k):
            real(a, b, *k)
            if Path(b) == dst:
                events.append(("dst", 0))

        return f

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    r = cli("convert", src, dst, *(["--max-shard-size", shards] if shards else []))
    assert r.exit_code == 0, r.output
    files = sorted(dst.iterdir()) if shards else [dst]
    assert len(files) == (3 if shards else 1)  # 2 shards + index
    at = events.index(("dst", 0))
    synced = {ino for kind, ino in events[:at] if kind == "fsync"}
    assert {p.stat().st_ino for p in files} <= synced
    if shards:
        assert dst.stat().st_ino in synced  # the staged folder itself, before it is renamed


def test_fsync_failure_is_one_line_and_leaves_nothing(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(100)}, str(src))
    before = sha(src)
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous")
    code = (
        "import os, errno, sys, runpy\n"
        "def fsync(fd): raise OSError(errno.EIO, os.strerror(errno.EIO))\n"
        "os.fsync = fsync\n"
        "sys.argv = ['ckptctl', 'convert', sys.argv[1], sys.argv[2], '--force']\n"
        "runpy.run_module('ckptctl', run_name='__main__')\n"
    )
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: {dst}: cannot write the output: Input/output error; nothing was written"
    )
    assert "Traceback" not in p.stderr
    assert dst.read_bytes() == b"previous" and sha(src) == before and tmp_leftovers(tmp_path) == []


def test_write_behind_hands_every_large_piece_to_the_disk(tmp_path, monkeypatch):
    """Large pieces go to sync_file_range as they are written; a refusal turns it off, and the
    output is the same either way."""
    from safetensors.torch import load_file, save_file

    from ckptctl.formats import writeutil

    src = tmp_path / "src.safetensors"
    ts = {"big": torch.randn(3 << 20), "small": torch.randn(10)}
    save_file(ts, str(src))
    calls: list[tuple[int, int]] = []

    def fake(fd, offset, length, flags):
        assert flags == 2 and os.fstat(fd).st_size >= offset + length
        calls.append((offset, length))
        return 0

    for copy in (True, False):  # copy_file_range and the pread/pwrite path
        monkeypatch.setattr(writeutil, "_COPY_FILE_RANGE", copy)
        monkeypatch.setattr(writeutil, "_sync_file_range", fake)
        calls.clear()
        dst = tmp_path / f"out{copy}.safetensors"
        assert cli("convert", src, dst).exit_code == 0
        assert sum(n for _, n in calls) == 12 << 20  # every byte of "big", none of "small"
        assert all(torch.equal(load_file(str(dst))[k], v) for k, v in ts.items())

    def refuse(fd, offset, length, flags):
        calls.append((offset, length))
        return -1

    monkeypatch.setattr(writeutil, "_sync_file_range", refuse)
    calls.clear()
    dst = tmp_path / "refused.pt"
    assert cli("convert", src, dst, "--dtype", "bf16").exit_code == 0
    assert len(calls) == 1 and writeutil._sync_file_range is False
    sd = torch.load(dst, weights_only=True)
    assert all(raw(sd[k]) == raw(v.to(torch.bfloat16)) for k, v in ts.items())


def test_write_behind_is_real_on_linux():
    from ckptctl.formats import writeutil

    f = writeutil._load_sync_file_range()
    if not os.sys.platform.startswith("linux"):
        assert f is False
        return
    import tempfile

    with tempfile.TemporaryFile() as fh:
        fh.write(b"x" * (2 << 20))
        fh.flush()
        assert f(fh.fileno(), 0, 2 << 20, 2) == 0


# ---- generated source files of every format -----------------------------------------------------
def zoo(fmt: str) -> dict:
    """Tensors covering the dtype zoo each format can hold, views, scalars, empties."""
    g = torch.Generator().manual_seed(3)
    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex64",
        "uint16",
        "uint32",
        "uint64",
    ]
    out = {}
    for i, name in enumerate(names):
        d = dtypes.BY_NAME[name]
        b = torch.randint(0, 256, (6 * d.itemsize,), dtype=torch.uint8, generator=g)
        if name == "bool":
            b = b % 2
        if name.startswith("float"):  # no NaN payload games: finite values
            b = torch.randn(6, generator=g).to(getattr(torch, name)).view(torch.uint8)
        out[f"layer{i}.{name}"] = b.view(getattr(torch, name)).reshape(2, 3)
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    out["view.t"] = base.t()
    out["view.cols"] = base[:, 1:3]
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3, dtype=torch.float16)
    if fmt == "legacy":
        for k in [
            k
            for k in out
            if out[k].dtype in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
        ]:
            del out[k]  # torch cannot load its own legacy files with these
    return out


def save_source(fmt: str, folder: Path, tensors: dict, tied=("tied.head", "layer1.float32")) -> Path:
    """Write `tensors` (+ a tied alias) in format `fmt`; returns the path to convert."""
    ts = dict(tensors)
    if tied:
        ts[tied[0]] = ts[tied[1]]
    if fmt == "safetensors":
        from safetensors.torch import save_file

        p = folder / "src.safetensors"
        save_file({k: v.contiguous() for k, v in ts.items() if k != tied[0]}, p, metadata={"format": "pt"})
    elif fmt == "torch-zip":
        p = folder / "src.pt"
        torch.save(ts, p)
    elif fmt == "legacy":
        p = folder / "src_legacy.bin"
        torch.save(ts, p, _use_new_zipfile_serialization=False)
    elif fmt == "hdf5":
        p = folder / "src.h5"
        import h5py

        with h5py.File(p, "w") as f:
            for k, v in ts.items():
                if k == tied[0]:
                    f[k] = f[tied[1]]  # a hard link
                    continue
                name = str(v.dtype).removeprefix("torch.")
                arr = (
                    np.frombuffer(raw(v), dtype=dtypes.numpy_dtype(name)).reshape(tuple(v.shape))
                    if name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
                    else np.frombuffer(raw(v), dtype=f"u{v.element_size()}").reshape(tuple(v.shape))
                )
                f.create_dataset(k, data=arr)
                if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
                    f[k].attrs["dtype"] = name
    elif fmt == "sharded":
        from safetensors.torch import save_file

        p = folder / "src_sharded"
        p.mkdir()
        names = [k for k in ts if k != tied[0]]
        half = len(names) // 2
        wm = {}
        for i, part in enumerate([names[:half], names[half:]]):
            fn = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({k: ts[k].contiguous() for k in part}, p / fn, metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        p = folder / "src_dcp"
        dcp.save({k: v.contiguous() for k, v in ts.items() if k != tied[0]}, checkpoint_id=str(p))
    else:
        raise ValueError(fmt)
    return p


def load_any(path: Path) -> dict:
    """The output read back with the reference libraries (not ckptctl)."""
    s = str(path)
    if s.endswith(".pt"):
        return dict(torch.load(path, weights_only=True))
    if s.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import h5py

    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = np.asarray(obj[()])
                dt = obj.attrs.get("dtype")
                t = torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy())
                tdt = getattr(torch, dt) if dt else getattr(torch, dtypes.from_numpy(a.dtype).name)
                out[name] = t.view(tdt).reshape(a.shape) if a.size else torch.zeros(a.shape, dtype=tdt)

        f.visititems(visit)
        for alias, target in json.loads(f.attrs.get("ckptctl.aliases", "{}")).items():
            out[alias] = out[target]
    return out


SOURCES = ["safetensors", "torch-zip", "legacy", "hdf5", "sharded", "dcp"]
READER_OF = {
    "safetensors": "safetensors",
    "torch-zip": "torch-zip",
    "legacy": "torch-legacy",
    "hdf5": "hdf5",
    "sharded": "sharded",
    "dcp": "dcp",
}
TARGET_SUFFIXES = [".safetensors", ".pt", ".h5"]
TIES = ("torch-zip", "legacy", "hdf5")  # sources that can hold tied weights


@pytest.mark.parametrize("suffix", TARGET_SUFFIXES)
@pytest.mark.parametrize("src_fmt", SOURCES)
def test_every_pair_end_to_end(tmp_path, src_fmt, suffix):
    if not have_reader(READER_OF[src_fmt]) or (suffix == ".pt" and not have_reader("torch-zip")):
        pytest.skip("reader not built yet")
    ts = zoo(src_fmt)
    if suffix == ".safetensors" or src_fmt in ("safetensors", "sharded"):
        ts = {k: v for k, v in ts.items() if v.dtype != torch.complex64 or suffix != ".safetensors"}
    src = save_source(src_fmt, tmp_path, ts)
    before = sha(src)
    dst = tmp_path / f"out{suffix}"
    r = cli("convert", src, dst)
    assert r.exit_code == 0, r.output
    assert "verified" in r.stderr and "bit-exact" in r.stderr
    got = load_any(dst)
    want = dict(ts)
    if src_fmt in TIES:
        want["tied.head"] = ts["layer1.float32"]
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype, k
        assert tuple(got[k].shape) == tuple(t.shape), k
        assert raw(got[k]) == raw(t), k
    if suffix == ".pt":
        import zipfile

        with zipfile.ZipFile(dst) as z:
            assert z.testzip() is None  # CRCs right, also on the zero-copy path
    if suffix == ".pt" and src_fmt in TIES:
        assert got["tied.head"] is got["layer1.float32"]  # tying survives into the .pt
    assert sha(src) == before
    assert tmp_leftovers(tmp_path) == []


@needs_reader("torch-zip", "hdf5", "safetensors")
def test_round_trip_pt_h5_safetensors_pt(tmp_path):
    ts = {k: v for k, v in zoo("torch-zip").items() if v.dtype != torch.complex64}
    src = save_source("torch-zip", tmp_path, ts)
    a, b, c = tmp_path / "a.h5", tmp_path / "b.safetensors", tmp_path / "c.pt"
    for s, d in ((src, a), (a, b), (b, c)):
        r = run("convert", s, d)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    orig = torch.load(src, weights_only=True)
    back = torch.load(c, weights_only=True)
    assert list(back) == list(orig) or set(back) == set(orig)
    for k in orig:
        assert back[k].dtype == orig[k].dtype and back[k].shape == orig[k].shape and raw(back[k]) == raw(orig[k]), k


@needs_reader("safetensors")
def test_dedupe_tied_round_trip(tmp_path):
    w = torch.randn(6, 4)
    src = tmp_path / "src.pt"
    torch.save({"emb.weight": w, "lm_head.weight": w, "b": torch.zeros(2)}, src)
    if not have_reader("torch-zip"):
        pytest.skip("torch-zip reader not built yet")
    out = tmp_path / "d.safetensors"
    r = cli("convert", src, out, "--dedupe-tied")
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert set(f.keys()) == {"emb.weight", "b"}
        assert json.loads(f.metadata()["ckptctl.aliases"]) == {"lm_head.weight": "emb.weight"}
    back = tmp_path / "back.pt"
    assert cli("convert", out, back).exit_code == 0
    sd = torch.load(back, weights_only=True)
    assert sd["lm_head.weight"] is sd["emb.weight"] and raw(sd["emb.weight"]) == raw(w)


@needs_reader("safetensors")
def test_cast_selection_and_shards_cli(tmp_path):
    from safetensors.torch import load_file, save_file

    ts = {f"module.layers.{i}.w": torch.randn(64, 16) for i in range(5)}
    ts["module.step"] = torch.tensor(7)
    ts["module.mask"] = torch.ones(3, dtype=torch.bool)
    src = tmp_path / "src.safetensors"
    save_file(ts, src, metadata={"format": "pt", "run": "r1"})
    out = tmp_path / "shards"
    r = cli(
        "convert",
        src,
        out,
        "--strip-prefix",
        "module.",
        "--exclude",
        "module.layers.4",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "5KB",
    )
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert set(index["weight_map"]) == {"layers.0.w", "layers.1.w", "layers.2.w", "layers.3.w", "step", "mask"}
    merged = {}
    for fn in set(index["weight_map"].values()):
        merged.update(load_file(out / fn))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for k, t in merged.items():
        s = ts["module." + k]
        want = s.to(torch.bfloat16) if s.is_floating_point() else s
        assert t.dtype == want.dtype and raw(t) == raw(want), k
    assert "cast to bfloat16" in r.stderr and "in 2 shards" in r.stderr
    # --force replaces the folder; without it the folder is refused
    r = cli("convert", src, out, "--max-shard-size", "5KB")
    assert r.exit_code == 1 and "already exists (--force to overwrite)" in r.stderr
    r = cli("convert", src, out, "--max-shard-size", "1GB", "--to", "pt", "--force", "--no-verify")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_model.bin"]
    assert tmp_leftovers(tmp_path) == []


@needs_reader("torch-zip", "safetensors")
def test_training_checkpoint_default_key_all(tmp_path):
    from safetensors.torch import load_file

    sd = {"model.enc.weight": torch.randn(3, 3), "model.enc.bias": torch.randn(3)}
    ckpt = {
        "epoch": 2,
        "global_step": 40,
        "state_dict": sd,
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(40.0), "exp_avg": torch.randn(3, 3)}},
                "param_groups": [{"lr": 0.1, "params": [0]}],
            }
        ],
    }
    src = tmp_path / "last.ckpt"
    torch.save(ckpt, src)
    out = tmp_path / "w.safetensors"
    r = cli("convert", src, out)
    assert r.exit_code == 0, r.output
    assert "training checkpoint" in r.stderr and "--all" in r.stderr
    got = load_file(out)
    assert set(got) == set(sd) and all(raw(got[k]) == raw(v) for k, v in sd.items())
    r = cli("convert", src, tmp_path / "opt.safetensors", "--key", "optimizer_states/0")
    assert r.exit_code == 0, r.output
    assert set(load_file(tmp_path / "opt.safetensors")) == {"state/0/step", "state/0/exp_avg"}
    r = cli("convert", src, tmp_path / "all.pt", "--all")
    assert r.exit_code == 0, r.output
    assert {"state_dict/model.enc.weight", "optimizer_states/0/state/0/exp_avg"} <= set(
        torch.load(tmp_path / "all.pt", weights_only=True)
    )


# ---- bad input: one line, exit code, nothing written --------------------------------------------
@needs_reader("safetensors")
@pytest.mark.parametrize(
    "args,code,message",
    [
        (["out.xyz"], 2, "unknown suffix '.xyz'"),
        (["out"], 2, "no suffix"),
        (["out.bin", "--to", "onnx"], 2, "unknown target 'onnx'"),
        (["out.safetensors", "--include", "nomatch"], 1, "no tensor selected"),
        (["out.safetensors", "--rename", ".+=same"], 1, "would both be named 'same'"),
        (["out.safetensors", "--dtype", "int8"], 2, "cast targets"),
        (["out.safetensors", "--key", "a", "--all"], 2, "--key and --all"),
        (["out.safetensors", "--max-shard-size", "lots"], 2, "--max-shard-size 'lots'"),
        (
            ["out.safetensors", "--dtype", "fp61"],
            2,
            "use one of bf16, fp16, fp32, fp64, fp8_e4m3, fp8_e5m2 "
            "(or torch's names: float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, float8_e4m3fnuz, "
            "float8_e5m2fnuz)",
        ),
        (["out.safetensors", "--rename", "broken(=x"], 2, "bad regex"),
    ],
)
def test_bad_input(tmp_path, args, code, message):
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(2), "b/c": torch.ones(1)}, src)
    before = sha(src)
    r = run("convert", src, *[tmp_path / a if i == 0 else a for i, a in enumerate(args)])
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
    assert sha(src) == before


@needs_reader("hdf5")
def test_dtype_target_cannot_hold(tmp_path):
    import h5py

    src = tmp_path / "c.h5"
    with h5py.File(src, "w") as f:
        f["ok"] = np.zeros(3, np.float32)
        f["z"] = np.zeros(3, np.complex128)
    r = run("convert", src, tmp_path / "c.safetensors")
    assert r.returncode == 1
    assert r.stderr.strip().endswith("tensor 'z' has dtype complex128, which safetensors cannot hold")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.safetensors").exists() and tmp_leftovers(tmp_path) == []


@needs_reader("safetensors")
def test_refuses_to_overwrite_source(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2)}, src)
    before = sha(src)
    r = cli("convert", src, src, "--force", "--dtype", "bf16")
    assert r.exit_code == 2 and "is the source" in r.stderr
    r = cli("convert", src, tmp_path / "x.pt")
    assert sha(src) == before


@needs_reader("safetensors")
def test_help_and_missing_source(tmp_path):
    r = cli("convert", "--help")
    assert r.exit_code == 0 and "Examples" in r.output and "--max-shard-size" in r.output
    r = run("convert", tmp_path / "nope.pt", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- real files written by other projects -------------------------------------------------------
EXPECTED = real_expected()  # tests/real_expected.tsv: per fixture, the exit code and result


def test_real_expected_table_covers_every_fixture():
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is absent")
    assert set(EXPECTED) == set(real_manifest()) | {"safetensors_sharded/fluxml"}


def _reference_tensors(path):
    """The source's tensors as the safetensors library reads them (safetensors sources only)."""
    from safetensors.torch import load_file

    if path.is_dir():
        path = path / "model.safetensors.index.json"
    if path.name.endswith(".index.json"):
        out = {}
        for shard in dict.fromkeys(json.loads(path.read_text())["weight_map"].values()):
            out.update(load_file(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    return None


@pytest.mark.parametrize("rel", real_params(sorted(EXPECTED) if REAL.is_dir() else []), ids=str)
def test_real_files_convert_as_the_table_says(tmp_path, rel):
    path = REAL / rel
    want = EXPECTED[rel]
    out = tmp_path / "out.safetensors"
    r = run("convert", path, out)
    assert "Traceback" not in r.stderr
    assert r.returncode == int(want["convert_exit"]), r.stderr
    assert tmp_leftovers(tmp_path) == []
    if r.returncode != 0:
        errors = r.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error:") and want["convert_result"] in errors[0], r.stderr
        assert not out.exists() and r.stdout == ""
        return
    from safetensors.torch import load_file

    got = load_file(out)  # the reference loader accepts it
    assert len(got) == int(want["convert_result"])
    ref = _reference_tensors(path)
    if ref is not None:  # a safetensors source: every tensor, byte for byte, as safetensors reads it
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert raw(got[k]) == raw(v), k


@pytest.mark.skipif(not (REAL / "malicious" / "modelscan_unsafe_zip_pytorch.pt").is_file(), reason="no fixture")
@needs_reader("torch-zip")
def test_dangerous_pickle_without_weights_is_refused(tmp_path):
    out = tmp_path / "safe.safetensors"
    r = run("convert", REAL / "malicious" / "modelscan_unsafe_zip_pytorch.pt", out)
    assert r.returncode == 1, r.stderr  # a payload without weights: nothing to convert
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no tensors in this checkpoint" in lines[0] and "posix.system" in lines[0], r.stderr
    assert not out.exists() and tmp_leftovers(tmp_path) == []


class _Evil:
    """Pickles as a call to os.system; never unpickled here (ckptctl's reader runs nothing)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@needs_reader("torch-zip", "safetensors")
def test_dangerous_pickle_with_weights_converts_and_warns(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 4)
    src = tmp_path / "trojan.pt"
    torch.save({"w": w, "evil": _Evil()}, src)  # saving runs nothing
    out = tmp_path / "clean.safetensors"
    r = run("convert", src, out)
    assert r.returncode == 0, r.stderr
    assert "UNSAFE" in r.stderr and "system" in r.stderr and "Traceback" not in r.stderr
    assert "non-tensor object" in r.stderr  # the payload is dropped, with a note
    got = load_file(out)
    assert set(got) == {"w"} and raw(got["w"]) == raw(w)
