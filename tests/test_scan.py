"""`ckptctl scan` and classify(): malicious pickles are flagged and never run."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REAL, cli, real_manifest

from ckptctl.formats import open_reader
from ckptctl.formats.pickles import PickleError
from ckptctl.formats.pickles.safety import classify
from ckptctl.ops.scan import scan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "posix.system",
        "nt.system",
        "os.path.join",
        "subprocess.Popen",
        "subprocess.check_output",
        "builtins.eval",
        "builtins.exec",
        "builtins.compile",
        "builtins.getattr",
        "builtins.setattr",
        "builtins.__import__",
        "builtins.open",
        "builtins.breakpoint",
        "__builtin__.eval",
        "__builtin__.apply",
        "__builtin__.globals",
        "runpy._run_code",
        "sys.modules",
        "socket.socket",
        "shutil.rmtree",
        "webbrowser.open",
        "httplib.HTTPSConnection",
        "http.client.HTTPSConnection",
        "requests.api.get",
        "aiohttp.client.ClientSession",
        "pty.spawn",
        "bdb.Bdb",
        "pdb.run",
        "asyncio.subprocess.create_subprocess_exec",
        "pickle.loads",
        "_pickle.loads",
        "dill._dill._load_type",
        "numpy.testing._private.utils.runstring",
        "torch.load",
        "torch.serialization.load",
        "torch.hub.load",
        "functools.partial",
        "operator.attrgetter",
        "operator.methodcaller",
        "ctypes.CDLL",
        "importlib.import_module",
        "marshal.loads",
        "types.FunctionType",
        "code.InteractiveInterpreter.runcode",
        "timeit.timeit",
        "pydoc.locate",
        "ssl.get_server_certificate",
        "torch._inductor.codecache.compile_file",
        "<unresolved>.<unresolved>",
        "os.<unresolved>",
    ],
)
def test_dangerous(name):
    assert classify(name) == "dangerous"


@pytest.mark.parametrize(
    "name",
    [
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_qtensor",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.FloatStorage",
        "torch.BFloat16Storage",
        "torch.storage.UntypedStorage",
        "torch.float8_e4m3fn",
        "torch.uint16",
        "torch.Size",
        "collections.OrderedDict",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
        "builtins.set",
        "__builtin__.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "_codecs.encode",
        "copyreg._reconstructor",
        "torch.distributed.checkpoint.metadata.Metadata",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "pathlib.PosixPath",
    ],
)
def test_safe(name):
    assert classify(name) == "safe"


@pytest.mark.parametrize(
    "name",
    [
        "argparse.Namespace",
        "collections.Counter",
        "builtins.dict",
        "mypackage.Model",
        "<extension code 7>",
        "torch.nn.modules.linear.Linear",
        "operator.add",
        "osx.thing",
        "numpy.random._pickle.__randomstate_ctor",
    ],
)
def test_unknown(name):
    assert classify(name) == "unknown"


# ---- payloads that would run code if unpickled -----------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch MARKER')",))


@pytest.fixture
def evil_dir(tmp_path):
    """Malicious checkpoints of every pickle-based layout; the payload would create MARKER."""
    marker = tmp_path / "MARKER"
    files = {}
    files["plain.pkl"] = pickle.dumps({"w": np.arange(3.0), "x": Evil(marker)}, protocol=2)
    files["proto0.pkl"] = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    files["inst.pkl"] = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    files["eval4.pkl"] = pickle.dumps(EvalEvil(), protocol=4)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"w": torch.ones(2), "evil": Evil(marker)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2), "evil": Evil(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    # os.system reached through STACK_GLOBAL, then the pickle is cut short
    trunc = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05touch\x94\x85R}("
    (tmp_path / "truncated.pkl").write_bytes(trunc)
    return tmp_path, marker


def test_malicious_files_are_flagged_and_never_run(evil_dir):
    d, marker = evil_dir
    names = sorted(p.name for p in d.iterdir())
    res = subprocess.run(
        [sys.executable, "-m", "ckptctl", "scan", str(d), "--format", "json"],
        capture_output=True,
        text=True,
        cwd=d,
        timeout=120,
    )
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    verdicts = {os.path.basename(r["path"]): r["verdict"] for r in doc}
    assert verdicts == {n: "dangerous" for n in names}, verdicts
    for r in doc:
        assert any(g["class"] == "dangerous" for g in r["globals"])
    byname = {os.path.basename(r["path"]): r for r in doc}
    assert "posix.system" in [g["name"] for g in byname["zip.pt"]["globals"]]
    assert "builtins.eval" in [g["name"] for g in byname["eval4.pkl"]["globals"]]
    assert byname["truncated.pkl"]["error"] and "os.system" in [g["name"] for g in byname["truncated.pkl"]["globals"]]
    assert len([ln for ln in res.stderr.splitlines() if "UNSAFE" in ln]) == len(names)
    # inspect lists what it can, warns loudly, and runs nothing either
    for n in names:
        r = subprocess.run(
            [sys.executable, "-m", "ckptctl", "inspect", str(d / n)], capture_output=True, text=True, cwd=d, timeout=120
        )
        assert "Traceback" not in r.stderr
        assert "system" in r.stderr or "eval" in r.stderr, (n, r.stderr)
        if n == "truncated.pkl":
            assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        else:
            assert r.returncode == 0, (n, r.stderr)
    assert not marker.exists()
    with open_reader(d / "zip.pt") as rd:
        assert [t.name for t in rd.info().tensors] == ["w"]


def test_truncated_pickle_keeps_globals(tmp_path):
    p = tmp_path / "t.pkl"
    p.write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00ls\x85R}(X\x01")
    with pytest.raises(PickleError) as e, open_reader(p) as r:
        r.info()
    assert e.value.globals == ["posix.system"]
    assert "posix.system" in str(e.value)


def test_evasion_with_a_non_string_stack_global(tmp_path):
    # STACK_GLOBAL over an int and a string: pickle would fail too, but a scanner must not say 'safe'
    p = tmp_path / "odd.pkl"
    p.write_bytes(b"\x80\x04K\x01\x8c\x06system\x93.")
    (r,) = scan([p])
    assert r.verdict == "dangerous" and r.error
    assert any(n.startswith("<unresolved>") for n, _ in r.globals)


def test_more_pickles_after_the_first_are_scanned(tmp_path):
    p = tmp_path / "two.pkl"
    p.write_bytes(pickle.dumps({"ok": 1}, protocol=2) + b"cos\nsystem\n(S'x'\ntR.")
    (r,) = scan([p])
    assert r.verdict == "dangerous" and ("os.system", "dangerous") in r.globals


def test_benign_files_exit_zero(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(1)}, tmp_path / "train.ckpt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "spiece.model").write_bytes(b"\n\x05hello\x12\x00")  # a tokenizer, not a checkpoint
    (tmp_path / "tokenizer.json").write_text("{}")
    res = cli("scan", tmp_path, "--format", "json")
    assert res.exit_code == 0, res.output
    doc = {os.path.basename(r["path"]): r for r in json.loads(res.stdout)}
    assert set(doc) == {"model.pt", "train.ckpt", "model.safetensors"}
    assert doc["model.pt"]["verdict"] == "safe"
    assert doc["train.ckpt"]["verdict"] == "unknown"
    assert ("argparse.Namespace", "unknown") in [(g["name"], g["class"]) for g in doc["train.ckpt"]["globals"]]
    assert doc["model.safetensors"]["verdict"] == "safe" and doc["model.safetensors"]["pickle"] is False
    table = cli("scan", tmp_path)
    assert table.exit_code == 0
    assert "safe (no pickle)" in table.stdout and "argparse.Namespace" in table.stdout
    csv = cli("scan", tmp_path / "train.ckpt", "--format", "csv")
    lines = csv.stdout.strip().splitlines()
    assert lines[0] == "path,verdict,global,class" and all(ln.split(",")[1] == "unknown" for ln in lines[1:])
    md = cli("scan", tmp_path / "model.pt", "--format", "markdown")
    # tables list only what is not safe, and count the rest
    assert md.stdout.startswith("| path") and "torch._utils._rebuild_tensor_v2" not in md.stdout
    assert "(+3 safe: --all-globals)" in md.stdout
    md = cli("scan", tmp_path / "model.pt", "--format", "markdown", "--all-globals")
    assert md.stdout.startswith("| path") and "torch._utils._rebuild_tensor_v2" in md.stdout


def test_dcp_folder_is_one_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3), "step": 3}, checkpoint_id=str(tmp_path / "run" / "dcp"), no_dist=True)
    res = cli("scan", tmp_path / "run", "--format", "json")
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)
    assert r["format"] == "dcp" and r["verdict"] == "safe"
    names = [g["name"] for g in r["globals"]]
    assert "torch.distributed.checkpoint.metadata.Metadata" in names and "torch._utils._rebuild_tensor_v2" in names


def test_not_a_checkpoint_and_missing(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    res = cli("scan", bad)
    assert res.exit_code == 1
    assert "error" in res.stdout and "PNG" in res.stdout
    res = cli("scan", tmp_path / "nope.pt")
    assert res.exit_code == 2 and "no such file" in res.stderr and res.stdout == ""


def test_help_has_examples_and_exit_codes():
    res = cli("scan", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "Examples" in text and "ckptctl scan" in text
    assert "unknown globals are reported but do not fail" in text


def test_zip_that_is_not_torch_still_has_its_pickles_scanned(tmp_path):
    import zipfile

    p = tmp_path / "weird.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner/evil.pkl", b"cos\nsystem\n(S'x'\ntR.")
        z.writestr("readme.txt", "hi")
    (r,) = scan([p])
    assert r.verdict == "dangerous" and r.format == "zip"


# ---- the real corpus ---------------------------------------------------------------------------
MALICIOUS = sorted(k for k in real_manifest() if k.startswith("malicious/"))


@pytest.mark.parametrize("rel", MALICIOUS)
def test_real_malicious_files(rel):
    path = REAL / rel
    if not path.is_file():
        pytest.skip("fixture absent")
    res = subprocess.run(
        [sys.executable, "-m", "ckptctl", "scan", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    (r,) = json.loads(res.stdout)
    if rel.endswith("picklescan_bad_pytorch.pt"):
        assert r["verdict"] == "error" and "PNG" in r["error"]
    else:
        assert r["verdict"] == "dangerous", r
    if rel.endswith("modelscan_unsafe_zip_pytorch.pt"):
        assert r["format"] == "torch-zip" and "posix.system" in [g["name"] for g in r["globals"]]
    if rel.endswith("pytorch_magic_bypass.pt"):
        assert {"__builtin__.eval", "posix.system"} <= {g["name"] for g in r["globals"]}


def test_real_corpus_folder_scan():
    if not REAL.is_dir():
        pytest.skip("fixtures absent")
    results = scan([REAL])
    by = {os.path.relpath(r.path, REAL): r for r in results}
    for rel in real_manifest():
        if rel.endswith(".json"):
            continue
        assert rel in by, rel
        v = by[rel].verdict
        if rel.startswith("malicious/"):
            assert v == ("error" if rel.endswith("bad_pytorch.pt") else "dangerous"), rel
        else:
            assert v in ("safe", "unknown"), (rel, v, by[rel].error)
    for rel in ("torch_zip/caikit_tiny_bert_pytorch_model.bin", "torch_legacy/picklescan_distilbert_pytorch_model.bin"):
        assert by[rel].verdict == "safe"
    assert by["torch_zip/chemprop_v1_regression_mol.pt"].verdict == "unknown"


def test_scan_does_not_import_torch(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, p)
    code = (
        "import sys; from ckptctl.ops.scan import scan; r = scan([sys.argv[1]]); "
        "print(r[0].verdict, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["safe", "False"], out.stderr


def test_ext_opcodes_are_reported_not_resolved(tmp_path):
    p = tmp_path / "ext.pkl"
    p.write_bytes(b"\x80\x02\x82\x07)R.")
    (r,) = scan([p])
    assert r.globals == [("<extension code 7>", "unknown")]
    assert r.verdict == "unknown"


def test_damage_after_the_pickles_still_lists_their_globals(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(64)}, p, _use_new_zipfile_serialization=False)
    data = p.read_bytes()
    p.write_bytes(data[:-100])  # the storage data is cut short; the pickles are whole
    (r,) = scan([p])
    assert r.error and "truncated" in r.error
    assert ("torch._utils._rebuild_tensor_v2", "safe") in r.globals and r.verdict == "safe"
    e = tmp_path / "empty.pkl"
    e.write_bytes(b"\x80\x02")  # nothing listed at all: no verdict
    (r,) = scan([e])
    assert r.verdict == "error"
    res = cli("scan", e)
    assert res.exit_code == 1
