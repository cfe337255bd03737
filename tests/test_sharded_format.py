"""ShardedReader: HF index json + shards (safetensors, torch .bin, TF .h5) as one checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REAL, cli, needs_real, run

from ckptctl.errors import CorruptFile, NotFound
from ckptctl.formats import open_reader, resolve
from ckptctl.formats.sharded import ShardedReader

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def tbytes(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layers.0.weight": torch.randn(4, 4, generator=g).bfloat16(),
        "layers.0.bias": torch.zeros(4, dtype=torch.float16),
        "layers.1.weight": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "layers.1.mask": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int64),
        "head.weight": torch.randn(3, 4, generator=g),
    }


def write_sharded(
    folder, sd: dict, n_shards: int = 3, index_name="model.safetensors.index.json", weight_map_order=None, metadata=None
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    shards = [names[i::n_shards] for i in range(n_shards)]
    wm: dict[str, str] = {}
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, folder / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in part})
    if weight_map_order is not None:
        wm = {k: wm[k] for k in weight_map_order}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    doc = {"metadata": metadata if metadata is not None else {"total_size": total}, "weight_map": wm}
    (folder / index_name).write_text(json.dumps(doc, indent=2))
    return wm


def test_folder_and_index_give_one_checkpoint(tmp_path):
    sd = state_dict()
    order = sorted(sd)  # transformers writes the weight_map sorted
    wm = write_sharded(tmp_path / "ck", sd, weight_map_order=order)
    fmt, target = resolve(tmp_path / "ck")
    assert fmt == "sharded" and target.name == "model.safetensors.index.json"
    for path in (tmp_path / "ck", target):
        with open_reader(path) as r:
            assert isinstance(r, ShardedReader)
            info = r.info()
            assert info.format == "sharded" and info.kind == "safetensors"
            assert [t.name for t in info.tensors] == order  # weight_map order
            assert info.metadata == {"total_size": info.total_bytes, "format": "pt"}
            assert len(info.files) == 4 and info.files[-1] == str(target)
            assert not info.warnings
            for name, t in sd.items():
                ti = info.tensor(name)
                assert ti.dtype == str(t.dtype).removeprefix("torch.") and ti.shape == tuple(t.shape)
                assert b"".join(bytes(c) for c in r.iter_chunks(name, 5)) == tbytes(t), name
                f, off, n = r.byte_range(name)
                assert f.endswith(wm[name])
                with open(f, "rb") as fh:
                    fh.seek(off)
                    assert fh.read(n) == tbytes(t)
                assert r.shard_of(name).name == wm[name]
            assert r.read("step").shape == ()
            assert r.read("layers.0.weight").tobytes() == tbytes(sd["layers.0.weight"])
        assert r._shards == {}  # close() closed every shard


def test_cli_inspect_sharded(tmp_path):
    sd = state_dict()
    write_sharded(tmp_path / "ck", sd)
    for res in (cli("inspect", tmp_path / "ck", "-f", "json"), run("inspect", tmp_path / "ck", "-f", "json")):
        doc = json.loads(res.stdout)
        assert doc["format"] == "sharded" and doc["num_tensors"] == len(sd)
        assert doc["num_params"] == sum(t.numel() for t in sd.values())
    res = cli("inspect", tmp_path / "ck")
    assert res.exit_code == 0 and "sharded (safetensors)" in res.stdout and "files" in res.stdout
    code = (
        "import sys\nfrom ckptctl.cli.app import app\n"
        "try:\n    app(['inspect', sys.argv[1]])\nexcept SystemExit as e:\n    c = e.code\n"
        "sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))\nsys.exit(c)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "TORCH=False" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        ("/etc/passwd", "is an absolute path"),
        ("../outside.safetensors", "points outside the checkpoint folder"),
        ("sub/../../x.safetensors", "points outside the checkpoint folder"),
        ("C:\\weights.safetensors", "is an absolute path"),
    ],
)
def test_shard_names_validated(tmp_path, bad, message):
    sd = state_dict()
    wm = write_sharded(tmp_path, sd)
    wm["evil"] = bad
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CorruptFile) as e:
        open_reader(tmp_path).info()
    assert message in str(e.value) and repr(bad) in str(e.value)
    res = run("inspect", tmp_path)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_missing_shard(tmp_path):
    wm = write_sharded(tmp_path, state_dict())
    gone = wm["embed.weight"]
    (tmp_path / gone).unlink()
    with pytest.raises(NotFound, match=f"shard {gone} named in the index is missing"):
        open_reader(tmp_path).info()
    res = run("inspect", tmp_path)
    assert res.returncode == 1 and gone in res.stderr and "Traceback" not in res.stderr


def test_tensor_not_in_its_shard(tmp_path):
    wm = write_sharded(tmp_path, state_dict())
    wm["ghost.weight"] = wm["embed.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CorruptFile, match="maps 'ghost.weight' to model-0000"):
        open_reader(tmp_path).info()


def test_shard_tensor_not_in_index_warns(tmp_path):
    sd = state_dict()
    wm = write_sharded(tmp_path, sd)
    del wm["head.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    info = open_reader(tmp_path).info()
    assert "head.weight" not in {t.name for t in info.tensors}
    assert len(info.warnings) == 1 and "'head.weight'" in info.warnings[0]
    res = run("inspect", tmp_path)
    assert res.returncode == 0 and "warning:" in res.stderr and "head.weight" in res.stderr


def test_corrupt_shard_names_the_shard(tmp_path):
    wm = write_sharded(tmp_path, state_dict())
    shard = tmp_path / wm["step"]
    shard.write_bytes(shard.read_bytes()[:-3])
    res = run("inspect", tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and wm["step"] in res.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', 'no "weight_map"'),
        ('{"weight_map": []}', 'no "weight_map"'),
        ('{"weight_map": {"a": 3}}', "names no shard file"),
        ('{"metadata": 5, "weight_map": {}}', '"metadata" is not an object'),
    ],
)
def test_bad_index(tmp_path, text, message):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptFile, match=message):
        open_reader(tmp_path).info()
    res = run("inspect", tmp_path / "model.safetensors.index.json")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1


def test_hdf5_shards(tmp_path):
    """transformers' tf_model.h5.index.json: shards are HDF5 files named by weight paths."""
    np = pytest.importorskip("numpy")
    h5py = pytest.importorskip("h5py")
    names = [
        "tf_bert_model/bert/embeddings/weight:0",
        "tf_bert_model/bert/pooler/dense/kernel:0",
        "tf_bert_model/bert/pooler/dense/bias:0",
    ]
    arrays = {n: np.arange(6 * (i + 1), dtype="f4") for i, n in enumerate(names)}
    wm = {}
    for i, part in enumerate([names[:2], names[2:]], 1):
        fname = f"tf_model-{i:05d}-of-00002.h5"
        with h5py.File(tmp_path / fname, "w") as f:
            for n in part:
                f.create_dataset(n, data=arrays[n])
            f.attrs["layer_names"] = np.array([n.encode() for n in part])
        wm.update({n: fname for n in part})
    (tmp_path / "tf_model.h5.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    with open_reader(tmp_path) as r:
        info = r.info()
        assert info.kind == "hdf5 (hf-tf)"
        assert [t.name for t in info.tensors] == names
        for n, a in arrays.items():
            assert b"".join(r.iter_chunks(n)) == a.tobytes()


@pytest.mark.skipif(
    importlib.util.find_spec("ckptctl.formats.torch_zip") is None,
    reason="ckptctl.formats.torch_zip (the torch zip reader) is not in the tree yet",
)
def test_torch_bin_shards(tmp_path):
    sd = state_dict()
    names = list(sd)
    wm = {}
    for i, part in enumerate([names[:3], names[3:]], 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / fname)
        wm.update({k: fname for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    fmt, target = resolve(tmp_path)
    assert fmt == "sharded" and target.name == "pytorch_model.bin.index.json"
    with open_reader(tmp_path) as r:
        info = r.info()
        assert info.kind.startswith("torch-zip") and [t.name for t in info.tensors] == names
        for n, t in sd.items():
            ti = info.tensor(n)
            assert (ti.dtype, ti.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            assert b"".join(bytes(c) for c in r.iter_chunks(n)) == tbytes(t), n
    res = run("inspect", tmp_path, "-f", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_tensors"] == len(sd)


@needs_real
@pytest.mark.parametrize("via", ["folder", "index"])
def test_real_fluxml_sharded(via):
    folder = REAL / "safetensors_sharded" / "fluxml"
    path = folder if via == "folder" else folder / "model.safetensors.index.json"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with open_reader(path) as r:
        info = r.info()
        assert info.format == "sharded" and info.kind == "safetensors"
        assert [t.name for t in info.tensors] == list(index["weight_map"])
        assert info.total_bytes == index["metadata"]["total_size"]
        assert len(info.files) == 7 and not info.warnings
        for t in info.tensors:
            with safe_open(folder / index["weight_map"][t.name], "pt") as ref:
                want = ref.get_tensor(t.name)
            assert (t.dtype, t.shape) == (str(want.dtype).removeprefix("torch."), tuple(want.shape))
            assert b"".join(r.iter_chunks(t.name)) == tbytes(want), t.name
    res = run("inspect", path, "--format", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["num_tensors"] == 36
