"""Bad input, through the CLI: one line on stderr naming the file and the problem, exit 1, never a
traceback (CKPTCTL_DEBUG=1 shows one). And every real fixture inspects or fails cleanly."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
from conftest import REAL, cli, needs_real, real_expected, real_manifest, real_params, run

REQUIRED_KEYS = {"path", "format", "tensors", "metadata", "num_tensors", "num_params", "total_bytes"}


def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


GOOD_ST = st_bytes(
    {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]},
    },
    bytes(range(20)),
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(20)


def _random_bytes() -> bytes:
    rnd = random.Random(1234)
    data = bytes(rnd.getrandbits(8) for _ in range(4096))
    assert data[0] not in (0x80, ord("c"), ord("("), ord("}"), ord("]")) and data[8:9] != b"{"
    return data


# (id, file name, content, substrings the one stderr line must hold)
FILE_CASES = [
    ("empty", "model.safetensors", b"", ["empty file"]),
    ("empty-pt", "model.pt", b"", ["empty file"]),
    ("short-safetensors", "model.safetensors", b"\x10\0\0\0\0", ["too short for a safetensors header"]),
    ("truncated-header", "model.safetensors", GOOD_ST[:40], ["runs past the end of the 40-byte file"]),
    ("truncated-data", "model.safetensors", GOOD_ST[:-6], ["but its header describes"]),
    ("random", "model.bin", _random_bytes(), ["unknown format"]),
    ("png-as-pt", "model.pt", PNG, ["not a checkpoint: looks like a PNG image"]),
    ("gzip-as-ckpt", "model.ckpt", b"\x1f\x8b\x08\x00" + bytes(40), ["not a checkpoint: looks like a gzip archive"]),
    ("text-as-safetensors", "model.safetensors", b'{"hello": "world"}\n', ["not a checkpoint", "JSON/text"]),
    (
        "corrupt-json",
        "model.safetensors",
        st_bytes(b'{"w": {"dtype": "F32", "shape": [2, 2],', bytes(16)),
        ["header is not valid JSON"],
    ),
    (
        "overlapping",
        "model.safetensors",
        st_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
        ),
        ["tensor 'b'", "overlaps the previous tensor"],
    ),
    (
        "huge-header",
        "model.safetensors",
        st_bytes({"a": 1}, b"", length=2**40),
        ["header length 1099511627776 exceeds the safetensors limit"],
    ),
    (
        "unknown-dtype",
        "model.safetensors",
        st_bytes({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        ["unknown dtype 'Q7'"],
    ),
    ("truncated-hdf5", "model.h5", b"\x89HDF\r\n\x1a\n" + bytes(100), ["HDF5"]),
    ("plain-zip", "model.pt", None, ["zip archive", "not a PyTorch checkpoint"]),
]


def _make(tmp_path, name, content):
    p = tmp_path / name
    if content is None:  # a zip that is not torch's layout
        import zipfile

        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "hello")
    else:
        p.write_bytes(content)
    return p


def assert_clean_failure(res, path, needles, code=1):
    stderr = res.stderr
    assert res.returncode == code, (res.returncode, stderr, res.stdout)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert str(path) in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert res.stdout == ""


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_subprocess(tmp_path, case):
    _id, name, content, needles = case
    p = _make(tmp_path, name, content)
    assert_clean_failure(run("inspect", p), p, needles)
    # and the file is left as it was
    if content is not None:
        assert p.read_bytes() == content


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_in_process(tmp_path, case):
    _id, name, content, needles = case
    p = _make(tmp_path, name, content)
    res = cli("inspect", p, "--format", "json")
    assert res.exit_code == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and all(n in lines[0] for n in needles), res.stderr


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    assert_clean_failure(run("inspect", p), p, ["no such file or directory"], code=2)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert_clean_failure(run("inspect", tmp_path), tmp_path, ["no checkpoint in it"])
    res = cli("inspect", tmp_path)
    assert res.exit_code == 1 and "no checkpoint in it" in res.stderr


def test_directory_with_several_checkpoints(tmp_path):
    for n in ("a.safetensors", "b.safetensors"):
        (tmp_path / n).write_bytes(GOOD_ST)
    assert_clean_failure(run("inspect", tmp_path), tmp_path, ["2 checkpoint files"])


def test_folder_with_one_checkpoint_inspects_as_it(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(GOOD_ST)
    res = run("inspect", tmp_path / "checkpoint-5", "-f", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_tensors"] == 2


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod 000 files anyway")
def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.safetensors"
    p.write_bytes(GOOD_ST)
    p.chmod(0)
    try:
        assert_clean_failure(run("inspect", p), p, ["permission denied"])
    finally:
        p.chmod(0o644)


def test_unreadable_path_component(tmp_path):
    """A path through a regular file (ENOTDIR) is unreadable even for root."""
    f = tmp_path / "file"
    f.write_bytes(GOOD_ST)
    p = f / "model.safetensors"
    res = run("inspect", p)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0]


def test_wrong_extension_safetensors_named_pt(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(GOOD_ST)
    res = run("inspect", p, "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["format"] == "safetensors" and doc["num_tensors"] == 2
    assert [t["dtype"] for t in doc["tensors"]] == ["float32", "bfloat16"]


def test_debug_shows_traceback(tmp_path):
    p = _make(tmp_path, "model.safetensors", GOOD_ST[:40])
    res = run("inspect", p, env={"CKPTCTL_DEBUG": "1"})
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "runs past the end" in res.stderr


def test_json_output_is_one_object(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(GOOD_ST)
    res = run("inspect", p, "--format", "json")
    assert res.returncode == 0 and res.stderr == ""
    doc = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert isinstance(doc, dict) and REQUIRED_KEYS <= set(doc)
    assert doc["num_tensors"] == 2 and doc["num_params"] == 6 and doc["total_bytes"] == 20
    assert doc["metadata"] == {"format": "pt"}
    for t in doc["tensors"]:
        assert {"name", "dtype", "shape", "nbytes"} <= set(t)


# ---- every real fixture ----------------------------------------------------------------------
MANIFEST = real_manifest()
OURS = {"safetensors", "safetensors-shard", "safetensors-index-json", "tf-transformers-h5"}


def _expected_from_reference(path, fmt):
    """{name: (dtype, shape)} from the reference libraries, for the formats this suite owns."""
    if fmt in ("safetensors", "safetensors-shard"):
        torch = pytest.importorskip("torch")
        from safetensors import safe_open

        out = {}
        with safe_open(path, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dt = getattr(
                    torch,
                    {
                        "BF16": "bfloat16",
                        "F8_E4M3": "float8_e4m3fn",
                        "F8_E5M2": "float8_e5m2",
                        "BOOL": "bool",
                        "U8": "uint8",
                        "I8": "int8",
                        "I16": "int16",
                        "U16": "uint16",
                        "I32": "int32",
                        "U32": "uint32",
                        "I64": "int64",
                        "F16": "float16",
                        "F32": "float32",
                        "F64": "float64",
                    }[sl.get_dtype()],
                )
                out[k] = (str(dt).removeprefix("torch."), tuple(sl.get_shape()))
        return out
    if fmt == "safetensors-index-json":
        index = json.loads(path.read_text())
        out = {}
        for shard in dict.fromkeys(index["weight_map"].values()):
            out.update(_expected_from_reference(path.parent / shard, "safetensors"))
        return {k: out[k] for k in index["weight_map"]}
    if fmt == "tf-transformers-h5":
        import h5py

        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda n, o: out.__setitem__(n, (o.dtype.name, o.shape)) if isinstance(o, h5py.Dataset) else None
            )
        return out
    raise AssertionError(fmt)


@pytest.mark.parametrize("rel", real_params(sorted(MANIFEST)), ids=str)
def test_real_fixture_inspects_or_fails_cleanly(rel):
    path = REAL / rel
    want = real_expected()[rel]  # tests/real_expected.tsv: this file's exit code and tensor count
    fmt = MANIFEST[rel]["format"]
    res = run("inspect", path, "--format", "json")
    assert "Traceback" not in res.stderr
    if fmt in OURS:
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert REQUIRED_KEYS <= set(doc)
        got = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in doc["tensors"]}
        assert got == _expected_from_reference(path, fmt)
        assert doc["num_tensors"] == len(got)
    elif fmt == "safetensors-MALFORMED" or fmt == "not-a-checkpoint":
        assert res.returncode == 1 == int(want["inspect_exit"])
        assert len(res.stderr.strip().splitlines()) == 1 and str(path) in res.stderr
    else:
        assert res.returncode == int(want["inspect_exit"]), res.stderr
        if res.returncode == 0:
            doc = json.loads(res.stdout)
            assert REQUIRED_KEYS <= set(doc) and doc["num_tensors"] == int(want["inspect_tensors"])
        else:
            assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == "", res.stderr


@needs_real
def test_real_sharded_folder():
    folder = REAL / "safetensors_sharded" / "fluxml"
    res = run("inspect", folder, "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["format"] == "sharded" and doc["num_tensors"] == 36 and doc["total_bytes"] == 4305
