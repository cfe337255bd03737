"""Orbax checkpoints: the real fixtures written by orbax-checkpoint (../shared/fixtures/jax_gguf,
known answers in EXPECTED.json), checkpoints written by TensorStore (what Orbax writes with; dev
extra) in every storage variant, and Zarr folders written by hand (numpy + zstandard/gzip) for
what must work without either."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli, run

JG = REPO.parent / "shared" / "fixtures" / "jax_gguf"
needs_fixtures = pytest.mark.skipif(
    not (JG / "EXPECTED.json").is_file(), reason="../shared/fixtures/jax_gguf is absent"
)
# orbax_single is the same tree saved once with StandardCheckpointer: its values are step 200's
CASES = {
    "orbax_run/100": "orbax_run/100",
    "orbax_run/200": "orbax_run/200",
    "orbax_single": "orbax_run/200",
    "orbax_run/100/default": "orbax_run/100",
}


def expected(key: str) -> dict:
    return json.loads((JG / "EXPECTED.json").read_text())[CASES[key]]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for d, dns, fns in os.walk(dst):
        for n in dns + fns:
            os.chmod(os.path.join(d, n), 0o755 if n in dns else 0o644)
    os.chmod(dst, 0o755)
    return dst


def aged(root: Path) -> Path:
    old = time.time() - 7200
    for d, dns, fns in os.walk(root):
        for n in dns + fns:
            os.utime(os.path.join(d, n), (old, old))
    os.utime(root, (old, old))
    return root


# ---- the real fixtures --------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize("key", list(CASES))
def test_inspect_fixture_names_dtypes_shapes(key):
    r = run("inspect", JG / key, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    exp = expected(key)
    assert doc["format"] == "orbax"
    assert {t["name"]: (t["dtype"], t["shape"]) for t in doc["tensors"]} == {
        n: (e["dtype"], e["shape"]) for n, e in exp.items()
    }


@needs_fixtures
@pytest.mark.parametrize("key", list(CASES))
def test_fixture_values_bit_exact(key):
    from ckptctl.formats import open_reader

    exp = expected(key)
    with open_reader(JG / key) as r:
        got = {t.name: sha(b"".join(bytes(c) for c in r.iter_chunks(t.name, 7))) for t in r.info().tensors}
    assert got == {n: e["sha256"] for n, e in exp.items()}


@needs_fixtures
@pytest.mark.parametrize("key", ["orbax_run/100", "orbax_run/200", "orbax_single"])
def test_convert_to_safetensors_bit_exact(tmp_path, key):
    import ml_dtypes  # noqa: F401 - lets numpy name bfloat16
    from safetensors.numpy import load_file

    out = tmp_path / "out.safetensors"
    r = cli("convert", JG / key, out)
    assert r.exit_code == 0, r.output
    assert "verified 7 tensors bit-exact" in r.stderr
    back = load_file(str(out))
    exp = expected(key)
    assert {n: (str(a.dtype), list(a.shape), sha(a.tobytes())) for n, a in back.items()} == {
        n: (e["dtype"], e["shape"], e["sha256"]) for n, e in exp.items()
    }


@needs_fixtures
def test_convert_to_pt_and_h5_bit_exact(tmp_path):
    import h5py
    import torch

    exp = expected("orbax_run/100")
    assert cli("convert", JG / "orbax_run/100", tmp_path / "a.pt").exit_code == 0
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    got = {
        n: (
            str(t.dtype).removeprefix("torch."),
            list(t.shape),
            sha(
                t.contiguous().view(torch.uint8).numpy().tobytes()
                if t.dim()
                else t.reshape(1).view(torch.uint8).numpy().tobytes()
            ),
        )
        for n, t in sd.items()
    }
    assert got == {n: (e["dtype"], e["shape"], e["sha256"]) for n, e in exp.items()}
    assert cli("convert", JG / "orbax_run/100", tmp_path / "a.h5").exit_code == 0
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for n, e in exp.items():
            ds = f[n]
            assert list(ds.shape) == e["shape"] and sha(np.ascontiguousarray(ds[()]).tobytes()) == e["sha256"], n
        assert f["dense2/kernel"].attrs["dtype"] == "bfloat16"


@needs_fixtures
def test_diff_steps_and_conversion(tmp_path):
    r = cli("diff", JG / "orbax_run/100", JG / "orbax_run/200", "--format", "json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    text = json.dumps(doc)
    assert "dense1/kernel" in text and "step_count" in text
    out = tmp_path / "s100.safetensors"
    assert cli("convert", JG / "orbax_run/100", out).exit_code == 0
    r = cli("diff", JG / "orbax_run/100", out)
    assert r.exit_code == 0, r.output
    assert "equal (bit-exact): 7 tensors" in r.stdout + r.stderr


@needs_fixtures
def test_average_of_two_steps(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for src, dst in (("orbax_run/100", a), ("orbax_run/200", b)):
        assert cli("convert", JG / src, dst).exit_code == 0
    A, B = load_file(str(a)), load_file(str(b))  # bit-exact per EXPECTED (test above)
    out = tmp_path / "avg.safetensors"
    r = cli("average", JG / "orbax_run/100", JG / "orbax_run/200", "-o", out)
    assert r.exit_code == 0, r.output
    avg = load_file(str(out))
    for n in ("dense1/kernel", "norm/scale"):
        want = ((A[n].astype(np.float64) + B[n].astype(np.float64)) / 2).astype(np.float32)
        assert avg[n].tobytes() == want.tobytes(), n
    want16 = ((A["dense2/kernel"].astype(np.float64) + B["dense2/kernel"].astype(np.float64)) / 2).astype(
        ml_dtypes.bfloat16
    )
    assert avg["dense2/kernel"].tobytes() == want16.tobytes()
    assert avg["step_count"].tobytes() == B["step_count"].tobytes()  # ints are not averaged


@needs_fixtures
def test_scan_says_no_pickle():
    r = run("scan", JG / "orbax_run", JG / "orbax_single", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(Path(d["path"]).name for d in doc) == ["100", "200", "orbax_single"]
    assert all(d["pickle"] is False and d["verdict"] == "safe" and d["format"] == "orbax" for d in doc)
    assert all("no pickle" in d["note"] for d in doc)


@needs_fixtures
def test_ls_run_shows_steps_metrics_and_counts():
    r = cli("ls", JG / "orbax_run", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [(c["step"], c["format"], c["metrics"], c["num_tensors"], c["error"]) for c in rows] == [
        (100, "orbax", {"eval_loss": 0.9}, 7, None),
        (200, "orbax", {"eval_loss": 0.7}, 7, None),
    ]
    t = cli("ls", JG / "orbax_run")
    assert "eval_loss=0.9" in t.stdout and "eval_loss=0.7" in t.stdout


@needs_fixtures
def test_prune_keeps_newest_best_and_uncommitted(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    src = JG / "orbax_run"
    losses = {100: 0.9, 200: 0.7, 300: 0.3, 400: 1.2, 500: 0.8, 600: 0.1}
    for step, loss in losses.items():
        d = copy_tree(src / ("100" if step % 200 else "200"), root / str(step))
        (d / "metrics" / "metrics").write_text(json.dumps({"eval_loss": loss}))
    (root / "600" / "commit_success.txt").unlink()  # best loss, but its save has not finished
    (root / "300" / "commit_success.txt").unlink()
    aged(root)
    r = cli("prune", root, "--keep-best", "eval_loss", "--include-broken", "--yes", "--format", "json")
    assert r.exit_code == 0, r.output
    # kept: 200 (best eval_loss among finished steps), 500 (newest finished), 300 and 600 (no commit
    # marker: a save that may still be running is never deleted, even with --include-broken)
    assert sorted(os.listdir(root), key=int) == ["200", "300", "500", "600"]
    assert (root / "600" / "default" / "manifest.ocdbt").is_file()


@needs_fixtures
def test_uncommitted_step_is_listed_incomplete(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    copy_tree(JG / "orbax_run/100", root / "100")
    copy_tree(JG / "orbax_run/200", root / "200")
    (root / "200" / "commit_success.txt").unlink()
    rows = json.loads(cli("ls", root, "--format", "json").stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [(c["step"], c["incomplete"]) for c in rows] == [(100, False), (200, True)]
    assert "commit_success.txt" in rows[1]["error"]


@needs_fixtures
def test_inspect_never_imports_jax_tensorstore_numpy():
    code = (
        "import sys\nfrom ckptctl.cli.app import app\n"
        "try:\n    app(['inspect', sys.argv[1], '--format', 'json'])\nexcept SystemExit as e:\n    assert not e.code\n"
        "bad = [m for m in ('jax', 'flax', 'orbax', 'tensorstore', 'torch', 'h5py', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad) or 'clean')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, JG / "orbax_run/100"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "clean"


# ---- bad input ----------------------------------------------------------------------------------
def one_line_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@needs_fixtures
def test_corrupt_manifest(tmp_path):
    d = copy_tree(JG / "orbax_single", tmp_path / "s")
    raw = bytearray((d / "manifest.ocdbt").read_bytes())
    raw[40] ^= 0xFF
    (d / "manifest.ocdbt").write_bytes(bytes(raw))
    one_line_error(run("inspect", d), "manifest.ocdbt")
    (d / "manifest.ocdbt").write_bytes(bytes(raw[:50]))
    one_line_error(run("convert", d, tmp_path / "o.safetensors"), "truncated")
    assert not (tmp_path / "o.safetensors").exists()


@needs_fixtures
def test_missing_data_file(tmp_path):
    d = copy_tree(JG / "orbax_run/100", tmp_path / "100")
    for f in (d / "default" / "d").iterdir():
        f.unlink()
    one_line_error(run("inspect", d), "missing")
    one_line_error(run("convert", d, tmp_path / "o.safetensors"), "missing")


@needs_fixtures
def test_run_folder_is_not_one_checkpoint():
    one_line_error(run("inspect", JG / "orbax_run"), "Orbax run folder with 2 step folders (100/, 200/)", "ckptctl ls")


@needs_fixtures
def test_bad_metadata_json(tmp_path):
    d = copy_tree(JG / "orbax_single", tmp_path / "s")
    (d / "_METADATA").write_text('{"tree_metadata": {')
    one_line_error(run("inspect", d), "_METADATA")


# ---- Zarr folders written by hand (no OCDBT: Orbax's use_ocdbt=False layout) ----------------------
def hand_item(root: Path, arrays: dict[str, tuple[np.ndarray, str | None, list[int]]]) -> Path:
    """arrays: tree path -> (array, compressor id, chunk shape). Chunk bytes via numpy, compressed
    with zstandard / gzip."""
    import zstandard

    root.mkdir(parents=True)
    tree = {}
    for name, (arr, comp, chunks) in arrays.items():
        parts = name.split("/")
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in parts],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
        z = root / ".".join(parts)
        z.mkdir()
        dt = arr.dtype.str if arr.dtype.name != "bfloat16" else "bfloat16"
        (z / ".zarray").write_text(
            json.dumps(
                {
                    "chunks": chunks,
                    "compressor": {"id": comp} if comp else None,
                    "dimension_separator": ".",
                    "dtype": dt,
                    "fill_value": None,
                    "filters": None,
                    "order": "C",
                    "shape": list(arr.shape),
                    "zarr_format": 2,
                }
            )
        )
        grid = [-(-s // c) for s, c in zip(arr.shape, chunks)]
        for idx in np.ndindex(*grid):
            block = np.zeros(chunks, dtype=arr.dtype)
            src = arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))]
            block[tuple(slice(0, s) for s in src.shape)] = src
            raw = block.tobytes()
            if comp == "zstd":
                raw = zstandard.ZstdCompressor().compress(raw)
            elif comp == "gzip":
                raw = gzip.compress(raw)
            (z / (".".join(map(str, idx)) if idx else "0")).write_bytes(raw)
    (root / "_METADATA").write_text(
        json.dumps(
            {
                "tree_metadata": tree,
                "use_ocdbt": False,
                "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True,
            }
        )
    )
    return root


def test_hand_written_zarr_chunks_big_endian_and_padding(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(3)
    arrays = {
        "enc/w": (rng.standard_normal((13, 7)).astype(">f4"), "zstd", [5, 3]),  # edge chunks padded
        "enc/b": (rng.standard_normal(9).astype(ml_dtypes.bfloat16), "gzip", [4]),
        "head/i": (np.arange(24, dtype=">i8").reshape(2, 3, 4), None, [2, 3, 4]),
        "step": (np.array(7, dtype="<i4"), "zstd", []),
    }
    d = hand_item(tmp_path / "item", arrays)
    from ckptctl.formats import open_reader

    with open_reader(d) as r:
        info = r.info()
        assert [(t.name, t.dtype, t.shape) for t in info.tensors] == [
            ("enc/w", "float32", (13, 7)),
            ("enc/b", "bfloat16", (9,)),
            ("head/i", "int64", (2, 3, 4)),
            ("step", "int32", ()),
        ]
        for name, (arr, _c, _ch) in arrays.items():
            want = arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr
            assert b"".join(bytes(c) for c in r.iter_chunks(name, 5)) == want.tobytes(), name


def test_tree_key_cannot_escape_the_folder(tmp_path):
    outside = tmp_path / "secret"
    hand_item(outside, {"w": (np.ones(4, np.float32), None, [4])})
    d = hand_item(tmp_path / "item", {"w": (np.ones(4, np.float32), None, [4])})
    meta = json.loads((d / "_METADATA").read_text())
    meta["tree_metadata"] = {
        "('../secret/w',)": {
            "key_metadata": [{"key": "../secret/w", "key_type": 2}],
            "value_metadata": {"value_type": "jax.Array"},
        }
    }
    (d / "_METADATA").write_text(json.dumps(meta))
    one_line_error(run("inspect", d), "outside")


def test_hand_written_truncated_chunk_is_one_line(tmp_path):
    arr = np.arange(64, dtype=np.float32).reshape(8, 8)
    d = hand_item(tmp_path / "item", {"w": (arr, "zstd", [8, 8])})
    chunk = d / "w" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    one_line_error(run("convert", d, tmp_path / "o.safetensors"), "'w'", "truncated")
    raw = np.arange(64, dtype=np.float32).tobytes()
    chunk.write_bytes(raw[:-4])  # uncompressed chunk one element short
    hand = tmp_path / "item2"
    hand_item(hand, {"w": (arr, None, [8, 8])})
    (hand / "w" / "0.0").write_bytes(raw[:-4])
    one_line_error(run("convert", hand, tmp_path / "o2.safetensors"), "truncated")
    (hand / "w" / "0.0").unlink()
    one_line_error(run("convert", hand, tmp_path / "o3.safetensors"), "missing")


# ---- written by TensorStore (the library Orbax writes with) --------------------------------------
def ts_item(
    root: Path,
    arrays: dict,
    *,
    zarr3=False,
    chunks=None,
    ocdbt=True,
    sharding=False,
    node_bytes=None,
    fill=None,
    config=None,
):
    """An Orbax item written with TensorStore as Orbax does: one OCDBT database, a Zarr array per leaf."""
    tensorstore = pytest.importorskip("tensorstore", reason="tensorstore (dev extra) writes OCDBT/Zarr")
    root.mkdir(parents=True)
    extra, config = config, {"compression": {"id": "zstd"}}
    if node_bytes:
        config.update(max_decoded_node_bytes=node_bytes, max_inline_value_bytes=64)
    config.update(extra or {})
    ctx = tensorstore.Context()
    tree = {}
    for name, arr in arrays.items():
        key = name.replace("/", ".")
        ch = (chunks or {}).get(name, list(arr.shape))
        dt = arr.dtype.name
        if zarr3:
            codecs = [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1}},
            ]
            if sharding:
                inner = [c // 2 if c % 2 == 0 else c for c in ch]
                codecs = [{"name": "sharding_indexed", "configuration": {"chunk_shape": inner, "codecs": codecs}}]
            spec = {
                "driver": "zarr3",
                "metadata": {
                    "shape": list(arr.shape),
                    "data_type": dt,
                    "codecs": codecs,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": ch}},
                },
            }
            if fill is not None:
                spec["metadata"]["fill_value"] = fill
        else:
            spec = {
                "driver": "zarr",
                "metadata": {
                    "shape": list(arr.shape),
                    "chunks": ch,
                    "compressor": {"id": "zstd"},
                    "dtype": "bfloat16" if dt == "bfloat16" else arr.dtype.str,
                },
            }
        spec["store_data_equal_to_fill_value"] = fill is None  # as Orbax asks
        spec["kvstore"] = (
            {"driver": "ocdbt", "base": f"file://{root}", "config": config, "path": key + "/"}
            if ocdbt
            else f"file://{root}/{key}/"
        )
        t = tensorstore.open(spec, create=True, open=True, context=ctx).result()
        t.write(arr).result()
        parts = name.split("/")
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in parts],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
    (root / "_METADATA").write_text(
        json.dumps(
            {
                "tree_metadata": tree,
                "use_ocdbt": ocdbt,
                "use_zarr3": zarr3,
                "store_array_data_equal_to_fill_value": fill is None,
            }
        )
    )
    return root


def test_chunks_never_written_read_as_fill_value(tmp_path):
    """Zarr leaves chunks equal to the fill value unwritten (unless Orbax's store-everything is on)."""
    big = np.full((3000, 1000), 2.5, np.float32)  # 12 MB chunk: the streamed path
    small = np.array([[2.5, 1.0], [2.5, 2.5]], np.float32)
    d = ts_item(tmp_path / "f", {"big": big, "small": small}, zarr3=True, chunks={"small": [1, 1]}, fill=2.5)
    from ckptctl.formats import open_reader
    from ckptctl.formats.ocdbt import OcdbtStore

    assert OcdbtStore(d).keys() == [b"big/zarr.json", b"small/c/0/1", b"small/zarr.json"]
    with open_reader(d) as r:
        assert b"".join(bytes(c) for c in r.iter_chunks("big", 1 << 20)) == big.tobytes()
        assert b"".join(bytes(c) for c in r.iter_chunks("small")) == small.tobytes()
    meta = json.loads((d / "_METADATA").read_text())
    meta["store_array_data_equal_to_fill_value"] = True  # Orbax's promise: then a missing chunk is damage
    (d / "_METADATA").write_text(json.dumps(meta))
    one_line_error(run("convert", d, tmp_path / "o.safetensors"), "missing")


def ts_arrays():
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "params/emb": rng.standard_normal((300, 257), dtype=np.float32),
        "params/blk/w16": rng.standard_normal((64, 33)).astype(ml_dtypes.bfloat16),
        "params/blk/idx": rng.integers(-5, 1000, (17, 5, 3)).astype(np.int64),
        "opt/flag": rng.integers(0, 2, (6,)).astype(bool),
        "opt/count": np.array(3.5, dtype=np.float64),
    }


VARIANTS = {
    "zarr2": {},
    "zarr2-chunked": {"chunks": {"params/emb": [64, 100], "params/blk/w16": [10, 33], "params/blk/idx": [4, 2, 3]}},
    "zarr3": {"zarr3": True},
    "zarr3-chunked": {"zarr3": True, "chunks": {"params/emb": [64, 100], "params/blk/idx": [4, 2, 3]}},
    "zarr3-sharded": {
        "zarr3": True,
        "sharding": True,
        "chunks": {"params/emb": [64, 100], "params/blk/idx": [4, 2, 2]},
    },
    "no-ocdbt": {"ocdbt": False, "chunks": {"params/emb": [64, 100]}},
    "numbered-manifest": {"config": {"manifest_kind": "numbered"}, "chunks": {"params/emb": [64, 100]}},
    "uncompressed-ocdbt": {"config": {"compression": None}},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole-chunks", "streamed-chunks"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensorstore_written_variants(tmp_path, monkeypatch, variant, stream):
    if stream:  # every chunk goes through the piece-by-piece decoder (used for chunks >= 8 MiB)
        monkeypatch.setattr("ckptctl.formats.orbax.STREAM_MIN", 1)
    arrays = ts_arrays()
    d = ts_item(tmp_path / variant, arrays, **VARIANTS[variant])
    from ckptctl.formats import open_reader

    with open_reader(d) as r:
        info = r.info()
        assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {
            n: (str(a.dtype), a.shape) for n, a in arrays.items()
        }
        for n, a in arrays.items():
            assert b"".join(bytes(c) for c in r.iter_chunks(n, 4096)) == a.tobytes(), n
    out = tmp_path / "o.safetensors"
    r = cli("convert", d, out)
    assert r.exit_code == 0, r.output
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file

    back = load_file(str(out))
    assert {n: back[n].tobytes() for n in arrays} == {n: a.tobytes() for n, a in arrays.items()}


def test_tensorstore_deep_btree_and_truncated_data_file(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"layer{i:03d}/w": rng.standard_normal((40, 30), dtype=np.float32) for i in range(40)}
    d = ts_item(tmp_path / "deep", arrays, chunks={n: [10, 30] for n in arrays}, node_bytes=300)
    from ckptctl.formats import open_reader
    from ckptctl.formats.ocdbt import OcdbtStore

    with open_reader(d) as r:
        assert len(r.info().tensors) == 40
        for n, a in arrays.items():
            assert b"".join(bytes(c) for c in r.iter_chunks(n)) == a.tobytes(), n
    ref = OcdbtStore(d).ref("layer007.w/2.0")
    assert ref is not None and ref.file is not None  # out of line, in a data file
    with open(ref.file, "r+b") as f:
        f.truncate(ref.offset + ref.length - 10)
    one_line_error(run("inspect", d), "truncated")
    one_line_error(run("convert", d, tmp_path / "o.safetensors"), "truncated")


def test_streamed_chunk_bounded_and_truncated(tmp_path):
    """A 16 MB chunk is decoded piece by piece: exact bytes, every piece at most the asked size,
    and a stored chunk cut short is a one-line error."""
    rng = np.random.default_rng(5)
    arrays = {"big": rng.standard_normal((2048, 2048), dtype=np.float32), "zeros": np.zeros((4096, 1024), np.float32)}
    d = ts_item(tmp_path / "big", arrays)
    from ckptctl.formats import open_reader

    with open_reader(d) as r:
        for n, a in arrays.items():
            pieces = [bytes(c) for c in r.iter_chunks(n, 1 << 20)]
            assert max(map(len, pieces)) <= 1 << 20 and b"".join(pieces) == a.tobytes(), n
    from ckptctl.formats.ocdbt import OcdbtStore

    ref = OcdbtStore(d).ref("big/0.0")
    with open(ref.file, "r+b") as f:  # the chunk's bytes are damaged but the file is long enough
        f.seek(ref.offset + ref.length // 2)
        f.write(b"\0" * 64)
        f.seek(ref.offset + ref.length - 300)
        f.write(b"\xff" * 300)
    r = run("convert", d, tmp_path / "o.safetensors")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "'big'" in r.stderr, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_step_with_several_items(tmp_path):
    """A CheckpointManager step with `params/` and `opt_state/` items (Flax + Optax): names start
    with the item; `ls` counts the model part and sees the optimizer; metrics from
    _CHECKPOINT_METADATA (what CheckpointManager.save(metrics=...) records)."""
    rng = np.random.default_rng(9)
    run_dir = tmp_path / "run"
    for step, loss in ((10, 2.0), (20, 1.5)):
        d = run_dir / str(step)
        ts_item(d / "params", {"dense/kernel": rng.standard_normal((4, 3), dtype=np.float32)})
        ts_item(
            d / "opt_state", {"0/mu/dense/kernel": np.zeros((4, 3), np.float32), "0/count": np.array(step, np.int32)}
        )
        (d / "_CHECKPOINT_METADATA").write_text(
            json.dumps(
                {
                    "item_handlers": {"params": "StandardCheckpointHandler", "opt_state": "StandardCheckpointHandler"},
                    "metrics": {"loss": loss},
                    "init_timestamp_nsecs": 1,
                    "commit_timestamp_nsecs": 2,
                }
            )
        )
        (d / "commit_success.txt").write_text("ok")
    doc = json.loads(run("inspect", run_dir / "20", "--all", "--format", "json").stdout)
    assert [t["name"] for t in doc["tensors"]] == [
        "params/dense/kernel",
        "opt_state/0/mu/dense/kernel",
        "opt_state/0/count",
    ]
    # the one rule for training checkpoints: model weights by default, optimizer state with --all
    doc = json.loads(run("inspect", run_dir / "20", "--format", "json").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["params/dense/kernel"]
    rows = json.loads(cli("ls", run_dir, "--format", "json").stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [(c["step"], c["metrics"], c["num_tensors"], c["has_optimizer"]) for c in rows] == [
        (10, {"loss": 2.0}, 1, True),
        (20, {"loss": 1.5}, 1, True),
    ]
