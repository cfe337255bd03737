"""Weights out of whole-model pickles (`torch.save(model)`) and TorchScript archives, without their code.

Every file here is written by torch itself; the expected names, dtypes, shapes and bytes are the
producer's own answer (`module.state_dict()`, or the scripted module's `state_dict()`). The model
classes live in a throw-away module that is deleted before ckptctl reads the files, so that
`torch.load` cannot rebuild them any more (ckptctl never imports anything from a file anyway).
"""

from __future__ import annotations

import copyreg
import importlib
import io
import json
import pickle
import re
import sys
import types
import warnings
import zipfile

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

from conftest import cli, run  # noqa: E402

from ckptctl.formats import open_reader  # noqa: E402

MODELS_SRC = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.register_buffer("scale", torch.full((d,), 0.5))
        self.register_buffer("cache", torch.zeros(d), persistent=False)
        self.register_parameter("unused", None)

    def forward(self, x):
        return self.norm(self.proj(x) * self.scale) + self.cache


class Encoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(d, 2), "b": nn.Linear(d, 3, bias=False)})

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TinyLM(nn.Module):
    """Nested custom modules, tied embedding / LM head, BatchNorm, a non-persistent buffer."""

    def __init__(self, vocab=11, d=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = Encoder(d)
        self.bn = nn.BatchNorm1d(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(6).unsqueeze(0))
        self.register_buffer("mask_cache", torch.ones(3, dtype=torch.bool), persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        x = self.encoder(x)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(x) + self.mask_cache.sum()
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """The model classes, from a module that exists only while the files are written."""
    name = f"rescue_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODELS_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    yield mod
    sys.modules.pop(name, None)


def forget(mod) -> None:
    """Make the model code unavailable: torch.load can no longer find the classes."""
    sys.modules.pop(mod.__name__, None)
    path = mod.__file__
    import os

    os.remove(path)
    importlib.invalidate_caches()


def trained_lm(models, seed=0):
    torch.manual_seed(seed)
    m = models.TinyLM()
    m.train()
    with torch.no_grad():
        for b in m.encoder.layers[0].parameters():
            b.add_(torch.randn_like(b))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):  # BatchNorm running stats and num_batches_tracked move
        opt.zero_grad()
        m(torch.randint(0, 11, (3, 6))).sum().backward()
        opt.step()
    m.eval()
    return m


def tensor_bytes(t) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_matches(path, expected: dict, *, aliases: dict | None = None, **opts) -> None:
    """ckptctl's names, dtypes, shapes and bytes equal the producer's state_dict, in its order."""
    with open_reader(path, **opts) as r:
        info = r.info()
        assert [t.name for t in info.tensors] == list(expected)
        for name, ref in expected.items():
            t = info.tensor(name)
            assert t.dtype == str(ref.dtype).removeprefix("torch."), name
            assert t.shape == tuple(ref.shape), name
            assert b"".join(bytes(c) for c in r.iter_chunks(name)) == tensor_bytes(ref), name
        if aliases is not None:
            assert {t.name: t.alias_of for t in info.tensors if t.alias_of} == aliases
    return info


def convert_and_load(src, fresh, tmp_path, *extra, expect_missing=()):
    """`ckptctl convert src out.safetensors`, then fresh.load_state_dict(load_file(out), strict=True)."""
    out = tmp_path / f"{src.stem}-out.safetensors"
    res = cli("convert", src, out, *extra)
    assert res.exit_code == 0, res.output
    loaded = safetensors_torch.load_file(str(out))
    fresh.load_state_dict(loaded, strict=True)
    return loaded


def check_bit_exact(model_sd: dict, fresh) -> None:
    got = fresh.state_dict()
    assert list(got) == list(model_sd)
    for k, v in model_sd.items():
        assert got[k].dtype == v.dtype and tensor_bytes(got[k]) == tensor_bytes(v), k


# ---- whole nn.Module pickles ------------------------------------------------------------------
def test_whole_model_pickle_names_bytes_and_convert(models, tmp_path):
    model = trained_lm(models)
    sd = model.state_dict()
    fresh = models.TinyLM()  # the architecture, built before the code goes away
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    forget(models)
    with pytest.raises(Exception, match="rescue_models"):
        torch.load(path, weights_only=False)  # the rescue situation: torch cannot rebuild it

    info = assert_matches(path, sd, aliases={"lm_head.weight": "embed.weight"})
    assert info.kind == "module"
    assert not any(k.startswith("rescue_models") for k in sys.modules)
    # what state_dict() leaves out is said, not silently dropped
    notes = " ".join(info.warnings)
    assert "3 non-persistent buffer(s) left out" in notes
    assert "encoder.layers.0.cache" in notes and "mask_cache" in notes
    # classes, training flag and hyper-attributes, from the pickle, never imported
    meta = info.metadata
    assert meta["module"].startswith(f"{models.__name__}.TinyLM(") and "training=False" in meta["module"]
    assert meta["module/encoder.layers.0.proj"] == "torch.nn.modules.linear.Linear(in_features=4, out_features=4)"
    assert "eps=1e-06" in meta["module/encoder.layers.1.norm"]
    assert "num_features=4" in meta["module/bn"]
    types_ = {o.name: o.type for o in info.objects}
    assert types_["encoder.layers.1"] == f"{models.__name__}.Block"
    assert types_["encoder.heads"] == "torch.nn.modules.container.ModuleDict"

    loaded = convert_and_load(path, fresh, tmp_path)
    assert set(loaded) == set(sd)
    check_bit_exact(sd, fresh)


def test_plain_sequential_batchnorm_and_legacy_format(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2))
    model(torch.randn(8, 5))  # running stats move
    sd = model.state_dict()
    assert "2.running_mean" in sd and "2.num_batches_tracked" in sd
    for name, kw in (("zip.pt", {}), ("legacy.pt", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save(model, path, **kw)
        info = assert_matches(path, sd, aliases={})
        assert info.kind == "module" and info.warnings == []
        assert info.metadata["module/3"] == "torch.nn.modules.dropout.Dropout(inplace=False, p=0.1)"
        fresh = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2))
        convert_and_load(path, fresh, tmp_path)
        check_bit_exact(sd, fresh)


def test_raw_names_keep_the_pickle_paths(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    res = cli("inspect", path, "--raw-names", "-f", "json")
    assert res.exit_code == 0
    names = [t["name"] for t in json.loads(res.stdout)["tensors"]]
    assert names[:2] == ["_modules/0/_parameters/weight", "_modules/0/_parameters/bias"]
    assert "_modules/1/_buffers/running_mean" in names
    res = cli("inspect", path, "-f", "json")  # the option does not stick to the next command
    assert [t["name"] for t in json.loads(res.stdout)["tensors"]] == list(model.state_dict())
    out = tmp_path / "raw.safetensors"
    assert cli("convert", path, out, "--raw-names").exit_code == 0
    assert set(safetensors_torch.load_file(str(out))) == set(names)


def test_diff_whole_model_against_its_state_dict(models, tmp_path):
    model = trained_lm(models)
    whole, sd_file = tmp_path / "whole.pt", tmp_path / "state_dict.pt"
    torch.save(model, whole)
    torch.save(model.state_dict(), sd_file)
    forget(models)
    r = run("diff", whole, sd_file)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equal (bit-exact)" in r.stdout
    # the old names do not line up with the state dict's
    r = run("diff", whole, sd_file, "--raw-names", "--no-values")
    assert r.returncode == 1


def test_module_inside_a_training_dict(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    ckpt = {"epoch": 4, "model": model, "best": 0.5}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    expected = {f"model/{k}": v for k, v in model.state_dict().items()}
    info = assert_matches(path, expected)
    assert info.metadata["epoch"] == 4 and info.metadata["model/module"].startswith(
        "torch.nn.modules.container.Sequential("
    )
    fresh = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    convert_and_load(path, fresh, tmp_path, "--key", "model")
    check_bit_exact(model.state_dict(), fresh)


def test_old_weight_norm(tmp_path):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh())
    model(torch.randn(2, 3))
    sd = model.state_dict()
    assert list(sd) == ["0.bias", "0.weight_g", "0.weight_v"]
    path = tmp_path / "wn.pt"
    torch.save(model, path)
    info = assert_matches(path, sd)
    assert any("0.weight" in w and "neither parameters nor buffers" in w for w in info.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fresh = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh())
    convert_and_load(path, fresh, tmp_path)
    check_bit_exact(sd, fresh)


class _Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


def _parametrized(kind: str):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(4)
    if kind == "weight_norm":
        return nn.Sequential(weight_norm(nn.Linear(3, 3)), nn.ReLU())
    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "weight", _Symmetric())
    return nn.Sequential(lin, nn.ReLU())


def _save_parametrized(model, path) -> None:
    """torch.save refuses parametrized modules ("only supported through state_dict()"): pickle it
    the way it would be without that guard, with torch's own pickler: the dynamic
    Parametrized<Class> is saved as its original class and its __dict__ (hooks left out: weight_norm's
    is a local function, which pickle cannot save)."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nn.Module) and type(obj).__name__.startswith("Parametrized"):
                state = {k: (type(v)() if k.endswith("_hooks") else v) for k, v in obj.__dict__.items()}
                return copyreg._reconstructor, (type(obj).__bases__[0], object, None), state
            return NotImplemented

    shim = types.SimpleNamespace(Pickler=Pickler, __name__="pickle", HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    torch.save(model, path, pickle_module=shim)


@pytest.mark.parametrize("kind", ["weight_norm", "symmetric"])
def test_parametrizations_whole_pickle(tmp_path, kind):
    model = _parametrized(kind)
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        torch.save(model, io.BytesIO())
    path = tmp_path / "param.pt"
    _save_parametrized(model, path)
    sd = model.state_dict()
    want = (
        ["0.bias", "0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
        if kind == "weight_norm"
        else ["0.bias", "0.parametrizations.weight.original"]
    )
    assert list(sd) == want
    assert_matches(path, sd)
    fresh = _parametrized(kind)
    convert_and_load(path, fresh, tmp_path)
    check_bit_exact(sd, fresh)


def test_data_parallel_and_compile_prefix_hints(tmp_path):
    torch.manual_seed(5)
    inner = nn.Sequential(nn.Linear(2, 2))
    dp = nn.DataParallel(inner)
    path = tmp_path / "dp.pt"
    torch.save(dp, path)
    info = assert_matches(path, dp.state_dict())
    assert [t.name for t in info.tensors] == ["module.0.weight", "module.0.bias"]  # not renamed silently
    assert any("--strip-prefix module." in w for w in info.warnings)
    res = cli("inspect", path)
    assert "--strip-prefix module." in res.stderr and "--strip-prefix" not in res.stdout
    fresh = nn.Sequential(nn.Linear(2, 2))
    convert_and_load(path, fresh, tmp_path, "--strip-prefix", "module.")
    check_bit_exact(inner.state_dict(), fresh)
    # a flat state dict saved from the wrapper gets the same hint
    flat = tmp_path / "dp_sd.pt"
    torch.save(dp.state_dict(), flat)
    with open_reader(flat) as r:
        assert any("--strip-prefix module." in w for w in r.info().warnings)


def test_torch_compile_wrapper(tmp_path):
    torch.manual_seed(6)
    inner = nn.Sequential(nn.Linear(2, 3))
    compiled = torch.compile(inner)
    path = tmp_path / "compiled.pt"
    torch.save(compiled, path)
    info = assert_matches(path, compiled.state_dict())
    assert [t.name for t in info.tensors] == ["_orig_mod.0.weight", "_orig_mod.0.bias"]
    assert any("--strip-prefix _orig_mod." in w for w in info.warnings)
    fresh = nn.Sequential(nn.Linear(2, 3))
    convert_and_load(path, fresh, tmp_path, "--strip-prefix", "_orig_mod.")
    check_bit_exact(inner.state_dict(), fresh)


def test_whole_optimizer_listed_as_its_state_dict(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt, path)
    osd = opt.state_dict()
    expected = {f"state/{i}/{k}": v for i, st in osd["state"].items() for k, v in st.items()}
    expected.update({f"params/{i}": p for i, p in enumerate(model.parameters())})
    info = assert_matches(path, expected)
    assert info.kind == "optimizer"
    assert info.metadata["optimizer"] == "torch.optim.adamw.AdamW"
    groups = info.metadata["param_groups"]
    assert [g["params"] for g in groups] == [g["params"] for g in osd["param_groups"]]
    assert [g["lr"] for g in groups] == [0.001, 0.5]


# ---- TorchScript archives -----------------------------------------------------------------------
def _scripted_cases(models):
    torch.manual_seed(8)
    lm = trained_lm(models)
    seq = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    seq(torch.randn(5, 3))
    seq.eval()
    return [
        ("lm_scripted", lm, torch.jit.script(lm), models.TinyLM),
        (
            "seq_scripted",
            seq,
            torch.jit.script(seq),
            lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
        ),
        (
            "seq_traced",
            seq,
            torch.jit.trace(seq, torch.randn(2, 3)),
            lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
        ),
        (
            "weight_norm_scripted",
            _parametrized("weight_norm"),
            torch.jit.script(_parametrized("weight_norm")),
            lambda: _parametrized("weight_norm"),
        ),
    ]


def test_torchscript_archives(models, tmp_path):
    cases = _scripted_cases(models)
    for name, _eager, scripted, _make in cases:
        scripted.save(str(tmp_path / f"{name}.pt"))
    fresh = {name: make() for name, _e, _s, make in cases}
    forget(models)
    for name, eager, scripted, _make in cases:
        path = tmp_path / f"{name}.pt"
        ssd = scripted.state_dict()  # the archive's own answer
        info = assert_matches(
            path, dict(ssd), aliases={"lm_head.weight": "embed.weight"} if name.startswith("lm") else {}
        )
        assert info.format == "torchscript" and info.kind == "torchscript"
        assert info.metadata["code"] and all(k.startswith("code/") for k in info.metadata["code"])
        with zipfile.ZipFile(path) as z:
            sizes = {n.split("/", 1)[1]: z.getinfo(n).file_size for n in z.namelist() if "/code/" in n}
        assert info.metadata["code"] == sizes
        # TorchScript keeps no persistent flag: the non-persistent buffers are in its state_dict
        # (and in ckptctl's listing); the eager model's state_dict leaves them out
        nonpersistent = sorted(set(ssd) - set(eager.state_dict()))
        assert nonpersistent == (
            ["encoder.layers.0.cache", "encoder.layers.1.cache", "mask_cache"] if name.startswith("lm") else []
        )
        persistence = [w for w in info.warnings if "does not record whether a buffer is persistent" in w]
        if name.startswith("lm"):  # said for the buffers of the model's own classes
            (note,) = persistence
            assert "position_ids" in note and "mask_cache" in note and "running_mean" not in note
        else:
            assert persistence == []
        extra = [a for n in nonpersistent for a in ("--exclude", n)]
        convert_and_load(path, fresh[name], tmp_path, *extra)
        check_bit_exact(eager.state_dict(), fresh[name])


def test_torchscript_metadata_and_plain_attributes(tmp_path):
    class WithAttrs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.plain = torch.ones(3)  # a tensor attribute, neither parameter nor buffer
            self.sizes = [1, 2]

        def forward(self, x):
            return self.fc(x) + self.plain.sum() + torch.arange(2.0) * 3

    m = WithAttrs()
    traced = torch.jit.trace(m, torch.ones(1, 2))
    path = tmp_path / "attrs.pt"
    torch.jit.script(m).save(str(path))
    info = assert_matches(path, dict(torch.jit.load(str(path)).state_dict()))
    assert [t.name for t in info.tensors] == ["fc.weight", "fc.bias"]
    assert any("plain" in w and "neither parameters nor buffers" in w for w in info.warnings)
    assert info.metadata["module/fc"] == "torch.nn.modules.linear.Linear(in_features=2, out_features=2)"
    raw = assert_matches(path, {"plain": m.plain, "fc/weight": m.fc.weight, "fc/bias": m.fc.bias}, raw_names=True)
    assert raw.format == "torchscript"
    tpath = tmp_path / "traced.pt"
    traced.save(str(tpath))
    info = assert_matches(tpath, dict(traced.state_dict()))
    with zipfile.ZipFile(tpath) as z:  # one storage per tensor constant here
        n = sum(1 for name in z.namelist() if "/constants/" in name)
    assert n and info.metadata["constants"].startswith(f"{n} tensor constant(s)")


def test_scan_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(nn.Sequential(nn.Linear(2, 2))).save(str(path))
    r = run("scan", path, "-f", "json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    assert res["format"] == "torchscript" and res["verdict"] == "unknown"
    classes = {g["name"]: g["class"] for g in res["globals"]}
    # TorchScript class references (mangled when a class was scripted before in this process)
    ts = {re.sub(r"\.___torch_mangle_\d+", "", n): c for n, c in classes.items() if n.startswith("__torch__.")}
    assert ts == {
        "__torch__.torch.nn.modules.container.Sequential": "unknown",
        "__torch__.torch.nn.modules.linear.Linear": "unknown",
    }
    assert classes["torch._utils._rebuild_tensor_v2"] == "safe"
    assert classes["torch.jit._pickle.build_intlist"] == "safe"  # from the *.debug_pkl members
    assert "TorchScript" in res["note"] and "code/" in res["note"]


def test_scan_torchscript_with_a_malicious_pickle(tmp_path):
    good = tmp_path / "good.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(good))

    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("echo pwned",)

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/constants.pkl"):
                data = pickle.dumps((Evil(),), protocol=2)
            zout.writestr(item, data)
    r = run("scan", bad)
    assert r.returncode == 1
    assert "dangerous" in r.stdout and "system" in r.stdout
    r = run("inspect", bad)  # the weights are still listed; the danger is said loudly
    assert r.returncode == 0 and "weight" in r.stdout
    assert "UNSAFE" in r.stderr


def test_torchscript_no_longer_refused_but_damaged_one_is(tmp_path):
    path = tmp_path / "s.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    r = run("inspect", path)
    assert r.returncode == 0 and "torchscript" in r.stdout and "weight" in r.stdout
    bad = tmp_path / "nodata.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("/data.pkl"):
                zout.writestr(item, zin.read(item.filename))
    r = run("inspect", bad)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "TorchScript archive without data.pkl" in r.stderr


def test_scan_damaged_torchscript_still_lists_every_pickle(tmp_path):
    good = tmp_path / "good.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(good))

    class Evil:
        def __reduce__(self):
            import subprocess

            return subprocess.call, (["true"],)

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = data[: len(data) // 2]  # cut short: the reader fails on it
            elif item.filename.endswith(".debug_pkl"):
                data = pickle.dumps(Evil(), protocol=4)
            zout.writestr(item, data)
    r = run("scan", bad, "-f", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    (res,) = json.loads(r.stdout)
    assert res["verdict"] == "dangerous" and "data.pkl" in res["error"]
    classes = {g["name"]: g["class"] for g in res["globals"]}
    assert classes["subprocess.call"] == "dangerous"
    assert any(n.startswith("__torch__.") for n in classes)  # what data.pkl asked for before it ends


def test_shared_submodule_is_listed_under_both_names_and_tied(tmp_path):
    torch.manual_seed(9)
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"enc": shared, "dec": nn.Sequential(nn.ReLU(), shared)})
    sd = model.state_dict()
    assert list(sd) == ["enc.weight", "enc.bias", "dec.1.weight", "dec.1.bias"]  # torch lists it twice
    path = tmp_path / "shared.pt"
    torch.save(model, path)
    assert_matches(path, sd, aliases={"dec.1.weight": "enc.weight", "dec.1.bias": "enc.bias"})
    fresh = nn.ModuleDict({"enc": nn.Linear(2, 2), "dec": nn.Sequential(nn.ReLU(), nn.Linear(2, 2))})
    convert_and_load(path, fresh, tmp_path)
    check_bit_exact(sd, fresh)
