"""`scan` has no blind spots: every pickle reachable from a file is walked and its globals named.

Every attack file is built here from raw pickle opcodes or by *dumping* stand-in objects whose
__reduce__ returns (os.system, ('touch MARKER',)); nothing here ever loads one. `scan` must exit 1
and name the call (and where it sits); inspect, convert, ls and diff must never run it: the
marker file never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import cli

from ckptctl.errors import CkptError
from ckptctl.formats.pickles.safety import classify_pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- raw opcode builders -----------------------------------------------------------------------
def _s(text: str) -> bytes:
    """SHORT_BINUNICODE/BINUNICODE."""
    b = text.encode()
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b


def _bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b  # BINBYTES (protocol 3+)


def _call4(module: str, name: str, *args: bytes) -> bytes:
    """Protocol-4 pickle body: STACK_GLOBAL(module, name) called (REDUCE) with the given pushed args."""
    return _s(module) + _s(name) + b"\x93(" + b"".join(args) + b"tR"


def _p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def system(marker) -> bytes:
    """os.system('touch MARKER') as a protocol-2 pickle (GLOBAL + REDUCE)."""
    cmd = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."


class Evil:
    """Pickled (never unpickled) as a call to os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Call:
    """Pickled (never unpickled) as func(arg)."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


class ObjectArrayWithPickledBytes:
    """An object-dtype numpy array whose data is a pickle (numpy's own reduce, data swapped)."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        base = np.array([0], dtype=object).__reduce__()
        func, args, state = base[:3]
        return (func, args, (state[0], state[1], state[2], state[3], self.payload))


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _nest(payload: bytes, levels: int) -> bytes:
    for _ in range(levels):
        payload = _p4(_call4("pickle", "loads", _bytes(payload)))
    return payload


# ---- the corpus: file name -> (bytes, dangerous global scan must name, where it must say) --------
def build_corpus(d, marker) -> dict[str, tuple[str, str | None]]:
    """Write every attack into d; returns {file: (dangerous global, location text or None)}."""
    ev = system(marker)
    benign = _torch_bytes({"w": torch.arange(4, dtype=torch.float32)})
    out: dict[str, tuple[str, str | None]] = {}

    def put(name, data, glob, where=None):
        (d / name).write_bytes(data)
        out[name] = (glob, where)

    # -- every member of a zip, not only data.pkl
    buf = io.BytesIO(benign)
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr("archive/extra/hook.pkl", ev)
    put("zip_extra_member.pt", buf.getvalue(), "os.system", "member archive/extra/hook.pkl")
    buf = io.BytesIO(benign)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/payload", ev)  # no extension, deflated: found by its first bytes
    put("zip_extensionless_member.pt", buf.getvalue(), "os.system", "member archive/payload")
    # -- a pickle first, a zip appended (torch.load sees no PK magic: it unpickles the start)
    put("pickle_then_zip.pt", ev + benign, "os.system", None)
    # -- a zip whose comment holds a pickle
    buf = io.BytesIO(benign)
    with zipfile.ZipFile(buf, "a") as z:
        z.comment = ev
    put("zip_comment.pt", buf.getvalue(), "os.system", "zip comment")
    # -- several pickles back to back: a benign one, then the payload
    put("concatenated.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2) + ev, "os.system", "pickle #2")
    # legacy torch layout (five pickles, then storages), payload appended after a clean data pickle
    leg = _torch_bytes({"w": torch.ones(2)}, legacy=True)
    put(
        "legacy_appended.pt",
        leg[: leg.index(b".", 40) + 1] + ev + leg[leg.index(b".", 40) + 1 :],
        "os.system",
        "pickle #",
    )
    # -- pickles nested as bytes
    put(
        "load_from_bytes.pkl",
        _p4(_call4("torch.storage", "_load_from_bytes", _bytes(ev))),
        "os.system",
        "torch.storage._load_from_bytes payload (depth 1)",
    )
    put(
        "load_from_bytes_zip.pkl",
        _p4(_call4("torch.storage", "_load_from_bytes", _bytes(_torch_bytes({"evil": Evil(marker)})))),
        "posix.system" if os.name == "posix" else "nt.system",
        "payload (depth 1) > member",
    )
    put("pickle_loads.pkl", _p4(_call4("pickle", "loads", _bytes(ev))), "os.system", "pickle.loads payload (depth 1)")
    put("pickle_loads_call.pkl", _p4(_call4("_pickle", "loads", _bytes(b"\x80\x02N."))), "_pickle.loads", None)
    put(
        "pickle_loads_proto2.pkl",
        pickle.dumps(Call(pickle.loads, ev), protocol=2),
        "os.system",
        "pickle.loads payload (depth 1)",
    )  # protocol 2 writes the bytes as _codecs.encode(text, 'latin1')
    put(
        "torch_load_bytesio.pkl",
        _p4(_call4("torch", "load", _call4("_io", "BytesIO", _bytes(ev)))),
        "os.system",
        "torch.load payload (depth 1)",
    )
    put(
        "torch_load_bytesio_state.pkl",
        pickle.dumps(Call(torch.load, io.BytesIO(ev)), protocol=4),
        "os.system",
        "torch.serialization.load payload (depth 1)",
    )  # BytesIO pickles its bytes as BUILD state
    put("dill_loads.pkl", _p4(_call4("dill", "loads", _bytes(ev))), "os.system", "dill.loads payload")
    put("cloudpickle_loads.pkl", _p4(_call4("cloudpickle", "loads", _bytes(ev))), "os.system", "cloudpickle.loads")
    put(
        "load_from_bytes_computed.pkl",
        _p4(_call4("torch.storage", "_load_from_bytes", _call4("mylib", "make_bytes"))),
        "torch.storage._load_from_bytes(<bytes built at load time>)",
        None,
    )
    put("nested_deep.pkl", _nest(ev, 3), "os.system", "depth 3")
    put("nested_too_deep.pkl", _nest(ev, 12), "<pickles nested deeper than 8>", None)
    put(
        "numpy_object_bytes.pkl",
        pickle.dumps({"a": ObjectArrayWithPickledBytes(ev)}, protocol=2),
        "os.system",
        "numpy object array payload",
    )
    np.save(d / "object_array.npy", np.array([Evil(marker), 1], dtype=object), allow_pickle=True)
    out["object_array.npy"] = ("posix.system" if os.name == "posix" else "nt.system", "npy object payload")
    np.savez(d / "object_arrays.npz", ok=np.ones(3), bad=np.array([Evil(marker)], dtype=object))
    out["object_arrays.npz"] = (
        "posix.system" if os.name == "posix" else "nt.system",
        "member bad.npy > npy object payload",
    )
    # -- globals reached indirectly
    cmd = _s(f"touch {marker}")
    indirect = {
        "getattr_module.pkl": (
            _call4("builtins", "getattr", _call4("importlib", "import_module", _s("os")), _s("system")),
            "builtins.getattr",
        ),
        "import_module.pkl": (_call4("importlib", "import_module", _s("os")), "importlib.import_module"),
        "attrgetter.pkl": (_call4("operator", "attrgetter", _s("system")), "operator.attrgetter"),
        "methodcaller.pkl": (_call4("operator", "methodcaller", _s("system"), cmd), "operator.methodcaller"),
        "itemgetter.pkl": (_call4("_operator", "itemgetter", _s("system")), "_operator.itemgetter"),
        "partial.pkl": (_call4("functools", "partial", _s("x")), "functools.partial"),
        "reduce.pkl": (_call4("functools", "reduce", _s("x")), "functools.reduce"),
        "reconstructor.pkl": (
            _call4(
                "copyreg",
                "_reconstructor",
                _s("subprocess") + _s("Popen") + b"\x93",
                _s("builtins") + _s("object") + b"\x93",
                cmd,
            ),
            "subprocess.Popen",
        ),
        "dotted_eval_call.pkl": (_call4("builtins", "eval.__call__", _s("1")), "builtins.eval.__call__"),
        "dotted_self.pkl": (_call4("os", "system.__self__", cmd), "os.system.__self__"),
        "chain_through_module.pkl": (_call4("torch.serialization", "os.system", cmd), "torch.serialization.os.system"),
        "chain_globals.pkl": (
            _call4("collections", "OrderedDict.__init__.__globals__", cmd),
            "collections.OrderedDict.__init__.__globals__",
        ),
        "builtin_alias.pkl": (_call4("__builtin__", "exec", cmd), "__builtin__.exec"),
        "posix_alias.pkl": (_call4("posix", "system", cmd), "posix.system"),
        "nt_alias.pkl": (_call4("nt", "system", cmd), "nt.system"),
        "torch_load.pkl": (_call4("torch", "load", _s("other.pt")), "torch.load"),
        "jit_load.pkl": (_call4("torch.jit", "load", _s("other.pt")), "torch.jit.load"),
        "numpy_load.pkl": (_call4("numpy", "load", _s("x.npy"), b"\x88"), "numpy.load"),
        "runpy.pkl": (_call4("runpy", "run_path", _s("x.py")), "runpy.run_path"),
        "webbrowser.pkl": (_call4("webbrowser", "open", _s("http://x")), "webbrowser.open"),
        "shutil.pkl": (_call4("shutil", "rmtree", _s("/tmp/x")), "shutil.rmtree"),
        "socket.pkl": (_call4("socket", "create_connection", _s("x")), "socket.create_connection"),
        "ctypes.pkl": (_call4("ctypes", "CDLL", _s("libc.so.6")), "ctypes.CDLL"),
        "pty.pkl": (_call4("pty", "spawn", _s("sh")), "pty.spawn"),
        "sys_modules.pkl": (_call4("sys", "modules.get", _s("os")), "sys.modules.get"),
        "code_type.pkl": (_call4("types", "CodeType", _s("x")), "types.CodeType"),
        "function_type.pkl": (_call4("types", "FunctionType", _s("x")), "types.FunctionType"),
        "pkgutil.pkl": (_call4("pkgutil", "resolve_name", _s("os:system")), "pkgutil.resolve_name"),
        "proto0_global.pkl": (None, "os.system"),
    }
    for name, (body, glob) in indirect.items():
        data = _p4(body) if body is not None else b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
        put(name, data, glob, None)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    marker = d / "MARKER"
    return d, marker, build_corpus(d, marker)


def test_scan_flags_every_attack_and_names_the_call(corpus):
    d, marker, expected = corpus
    res = subprocess.run(
        [sys.executable, "-m", "ckptctl", "scan", str(d), "--format", "json"],
        capture_output=True,
        text=True,
        cwd=d,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    doc = {os.path.basename(r["path"]): r for r in json.loads(res.stdout)}
    assert set(doc) == set(expected)
    unsafe = {ln.split(": UNSAFE: ")[0].removeprefix("error: "): ln for ln in res.stderr.splitlines() if "UNSAFE" in ln}
    for name, (glob, where) in expected.items():
        r = doc[name]
        assert r["verdict"] == "dangerous", (name, r)
        classes = {g["name"]: g for g in r["globals"]}
        assert glob in classes, (name, list(classes))
        assert classes[glob]["class"] == "dangerous", (name, classes[glob])
        if where is not None:
            assert any(where in w for w in classes[glob]["where"]), (name, classes[glob])
        line = unsafe[str(d / name)]
        assert glob in line, (name, line)
        if where is not None:
            assert where in line, (name, line)
    assert not marker.exists()


def test_nested_payload_calls_are_dangerous_and_the_inner_pickle_is_walked(corpus):
    d, _marker, _ = corpus
    r = cli("scan", d / "pickle_loads.pkl", "--format", "json")
    assert r.exit_code == 1
    g = {x["name"]: x for x in json.loads(r.stdout)[0]["globals"]}
    assert g["pickle.loads"]["class"] == "dangerous" and g["pickle.loads"]["where"] == ["pickle"]
    assert g["os.system"]["where"] == ["pickle > pickle.loads payload (depth 1)"]


# what inspect / convert / diff do with each attack (nothing is ever run): files no reader takes
UNREADABLE = {"legacy_appended.pt", "object_array.npy", "object_arrays.npz"}
# torch archives whose data.pkl is clean: their weights convert (the extra pickles are never read)
CLEAN_WEIGHTS = {"zip_comment.pt", "zip_extensionless_member.pt", "zip_extra_member.pt"}
# inspect reads the file's main pickle only: these say UNSAFE there (scan names the rest)
INSPECT_SILENT = (
    CLEAN_WEIGHTS
    | UNREADABLE
    | {"load_from_bytes.pkl", "load_from_bytes_computed.pkl", "load_from_bytes_zip.pkl", "numpy_object_bytes.pkl"}
)


def test_other_commands_warn_and_never_run_anything(corpus, tmp_path):
    """inspect, ls, diff and convert over every attack: the expected outcome, no marker, no traceback."""
    d, marker, expected = corpus
    for name in expected:
        r = cli("inspect", d / name, "--format", "json")
        assert "Traceback" not in r.output
        assert r.exit_code == (1 if name in UNREADABLE else 0), (name, r.output)
        assert ("UNSAFE" in r.stderr) == (name not in INSPECT_SILENT), (name, r.stderr)
        r = cli("diff", d / name, d / "concatenated.pkl")
        assert "Traceback" not in r.output
        assert r.exit_code == (2 if name in UNREADABLE else 1 if name in CLEAN_WEIGHTS else 0), (name, r.output)
        dst = tmp_path / f"{name}.safetensors"
        r = cli("convert", d / name, dst)
        assert "Traceback" not in r.output
        assert r.exit_code == (0 if name in CLEAN_WEIGHTS else 1), (name, r.output)
        assert dst.exists() == (name in CLEAN_WEIGHTS)
        assert not marker.exists(), name
    r = cli("ls", d, "--format", "json")
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert not marker.exists()


def test_real_subprocess_never_runs_a_payload(corpus):
    """The same through `python -m ckptctl` (the real entry point), for one file of each kind."""
    d, marker, _ = corpus
    names = ("pickle_then_zip.pt", "load_from_bytes_zip.pkl", "object_array.npy", "zip_comment.pt")
    # `ls` of the folder reads every file in it: once, not once per name (it was the same command)
    for cmd in [*(["inspect", str(d / name)] for name in names), ["ls", str(d)]]:
        p = subprocess.run([sys.executable, "-m", "ckptctl", *cmd], capture_output=True, text=True, cwd=d, timeout=120)
        assert "Traceback" not in p.stderr, (cmd, p.stderr)
    assert not marker.exists()


def test_benign_files_stay_safe(tmp_path):
    """The deeper walk adds nothing to ordinary checkpoints: no new globals, exit 0."""
    sd = {"w": torch.randn(64, 64), "b": torch.zeros(64, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    np.save(tmp_path / "plain.npy", np.arange(10.0))
    np.savez(tmp_path / "plain.npz", a=np.ones(3))
    # a storage whose bytes start like a protocol-2 pickle is not a pickle member
    torch.save(
        {"w": torch.frombuffer(bytearray(b"\x80\x02cos\nsystem\n" + b"\0" * 2), dtype=torch.uint8)},
        tmp_path / "lookalike.pt",
    )
    r = cli("scan", tmp_path, "--format", "json")
    assert r.exit_code == 0, r.output
    for f in json.loads(r.stdout):
        assert all(g["class"] == "safe" for g in f["globals"]), f
        if f["path"].endswith(".pt"):
            assert f["verdict"] == "safe" and f["error"] is None, f


@pytest.mark.parametrize(
    ("module", "name", "cls"),
    [
        ("torch.serialization", "os.system", "dangerous"),
        ("builtins", "eval.__call__", "dangerous"),
        ("mylib", "Model.__init__.__globals__", "dangerous"),
        ("mylib", "helpers.subprocess.run", "dangerous"),
        ("mylib", "Outer.Inner", "unknown"),
        ("numpy.random._pickle", "__randomstate_ctor", "unknown"),
        ("copyreg", "__newobj__", "safe"),
        ("torch._utils", "_rebuild_tensor_v2", "safe"),
    ],
)
def test_attribute_chains(module, name, cls):
    assert classify_pair(module, name) == cls


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("torch.serialization.os.system", "dangerous"),
        ("mylib.utils.subprocess.Popen", "dangerous"),
        ("mylib.os", "unknown"),
        ("mylib.code.Net", "unknown"),
        ("mylib.system", "unknown"),
    ],
)
def test_module_reached_through_another_module(name, cls):
    """The 'module.name' strings inspect and ls classify: a known module's attribute reached
    through another module is dangerous; a package's own submodule names are not guessed at."""
    from ckptctl.formats.pickles.safety import classify

    assert classify(name) == cls


# ---- the pickle machine under random opcode streams -------------------------------------------
PROBE = "_ckptctl_probe"


class _Probe:
    called = 0

    def __reduce__(self):  # pragma: no cover - never reached
        type(self).called += 1
        return (int, ())


def _probe_call(*a, **k):  # pragma: no cover - would mean the machine called a global
    _Probe.called += 1


def test_random_opcode_streams_fail_cleanly_and_run_nothing(tmp_path):
    """hypothesis: any byte stream built from pickle opcodes either reads or raises a CkptError,
    through the machine, the scan walk and describe(); nothing named by the stream is imported or
    called (a probe module in sys.modules counts calls)."""
    pytest.importorskip("hypothesis", reason="hypothesis is a dev extra")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ckptctl.formats import pickles
    from ckptctl.ops import scan_walk as scan_mod

    mod = type(sys)(PROBE)
    mod.boom = _probe_call
    mod.Probe = _Probe
    sys.modules[PROBE] = mod
    asked: list[str] = []

    class Watch:  # records any attempt to import the module the streams name but nobody has
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname.startswith("_ckptctl_absent"):
                asked.append(fullname)
            return None

    sys.meta_path.insert(0, Watch)
    g = f"c{PROBE}\nboom\n".encode()
    tokens = [
        b"\x80\x02",
        b"\x80\x04",
        b"\x80\x05",
        b"\x95" + struct.pack("<Q", 5),
        b"(",
        b")",
        b"]",
        b"}",
        b"N",
        b"\x88",
        b"K\x01",
        b"J\xff\xff\xff\xff",
        b"M\x00\x01",
        b"\x8a\x01\x05",
        b"G" + struct.pack(">d", 1.5),
        b"I7\n",
        b"L12L\n",
        b"F1.0\n",
        _s(PROBE),
        _s("boom"),
        _s("Probe"),
        _s("os"),
        _s("system"),
        b"\x93",
        g,
        f"c{PROBE}\nProbe\n".encode(),
        b"cos\nsystem\n",
        b"ctorch._utils\n_rebuild_tensor_v2\n",
        b"cnumpy.core.multiarray\n_reconstruct\n",
        b"cnumpy\ndtype\n",
        _s("O8"),
        _s("f4"),
        b"ctorch.storage\n_load_from_bytes\n",
        b"cpickle\nloads\n",
        _bytes(b"\x80\x02" + g + b")R."),
        b"C\x03abc",
        b"S'x'\n",
        b"Vu\n",
        b"U\x01a",
        b"T\x01\x00\x00\x00b",
        b"\x96" + struct.pack("<Q", 2) + b"zz",
        b"R",
        b"b",
        b"\x81",
        b"\x92",
        b"t",
        b"\x85",
        b"\x86",
        b"\x87",
        b"l",
        b"d",
        b"e",
        b"a",
        b"s",
        b"u",
        b"\x8f",
        b"\x90",
        b"\x91",
        b"0",
        b"1",
        b"2",
        b"q\x00",
        b"h\x00",
        b"r\x01\x00\x00\x00",
        b"j\x01\x00\x00\x00",
        b"\x94",
        b"p0\n",
        b"g0\n",
        b"Q",
        b"P1\n",
        b"\x82\x01",
        b"o",
        b"i" + PROBE.encode() + b"\nProbe\n",
        b"\x97",
        b"\x98",
        b"PK\x03\x04",
        b"\x93NUMPY",
        b".",
        b"c_ckptctl_absent\nrun\n",
        _s("_ckptctl_absent"),
    ]
    token = st.one_of(st.sampled_from(tokens), st.binary(min_size=1, max_size=6))

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(token, max_size=40))
    def check(parts):
        data = b"".join(parts)
        try:
            obj = pickles.Machine(data).load()
            pickles.describe(obj)
        except CkptError:
            pass
        f = io.BytesIO(data)
        try:
            pickles.Machine(f, start=0, end=len(data)).load()
        except CkptError:
            pass
        w = scan_mod.Walk()
        scan_mod._region(w, io.BytesIO(data), 0, len(data), "", 0, top=True)
        for _name, cls, _where in w.found:
            assert cls in ("safe", "unknown", "dangerous")

    try:
        check()
    finally:
        del sys.modules[PROBE]
        sys.meta_path.remove(Watch)
    assert _Probe.called == 0
    assert asked == []


def test_mutated_checkpoints_fail_cleanly(tmp_path):
    """Random byte flips, cuts and splices of real torch files (zip and legacy) and of a pickle
    that carries a nested one: the scan walk and the readers raise nothing but CkptError."""
    pytest.importorskip("hypothesis", reason="hypothesis is a dev extra")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ckptctl.formats import open_reader
    from ckptctl.ops import scan_walk as scan_mod

    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    seeds = [
        _torch_bytes(sd),
        _torch_bytes(sd, legacy=True),
        _p4(_call4("pickle", "loads", _bytes(pickle.dumps(sd["w"].numpy(), protocol=2)))),
    ]
    target = tmp_path / "m.pt"

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        st.sampled_from(range(len(seeds))),
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
        st.integers(0, 1 << 16),
        st.booleans(),
    )
    def check(i, flips, cut, splice):
        data = bytearray(seeds[i])
        for off, val in flips:
            data[off % len(data)] = val
        if splice:
            data = data[: cut % len(data)] + seeds[(i + 1) % len(seeds)]
        elif cut % 3 == 0:
            data = data[: cut % len(data)]
        target.write_bytes(bytes(data))
        scan_mod.walk_file(target)
        try:
            with open_reader(target) as rd:
                info = rd.info()
                for t in info.tensors[:4]:
                    b"".join(bytes(c) for c in rd.iter_chunks(t.name))
        except CkptError:
            pass

    check()


def test_random_pickle_programs_fail_cleanly_and_run_nothing():
    """hypothesis: well-formed pickle programs built from calls, BUILDs, NEWOBJs, containers,
    persistent ids and nested pickle.loads bytes over a mix of real and probe globals, then a few
    bytes flipped or the end cut: the machine, describe() and the scan walk raise CkptError or
    nothing, and call nothing (the probe counts calls)."""
    pytest.importorskip("hypothesis", reason="hypothesis is a dev extra")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ckptctl.formats import pickles
    from ckptctl.ops import scan_walk as scan_mod

    mod = type(sys)(PROBE)
    mod.boom = _probe_call
    mod.Probe = _Probe
    sys.modules[PROBE] = mod
    globals_ = [
        (PROBE, "boom"),
        (PROBE, "Probe"),
        ("os", "system"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("copyreg", "_reconstructor"),
        ("copyreg", "__newobj__"),
        ("torch.storage", "_load_from_bytes"),
        ("pickle", "loads"),
        ("_io", "BytesIO"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "FloatStorage"),
        ("torch", "float32"),
        ("numpy.core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("builtins", "slice"),
    ]

    def g(pair, stack: bool) -> bytes:
        return _s(pair[0]) + _s(pair[1]) + b"\x93" if stack else f"c{pair[0]}\n{pair[1]}\n".encode()

    leaf = st.one_of(
        st.integers(-(1 << 40), 1 << 40).map(lambda i: b"\x8a" + bytes([8]) + i.to_bytes(8, "little", signed=True)),
        st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
        st.text(max_size=6).map(_s),
        st.binary(max_size=8).map(_bytes),
        st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}"]),
        st.floats(allow_nan=True).map(lambda x: b"G" + struct.pack(">d", x)),
        st.tuples(st.sampled_from(globals_), st.booleans()).map(lambda t: g(*t)),
        st.sampled_from([_s("O8"), _s("f4"), _s("cpu"), _s("0")]),
    )

    def extend(child):
        many = st.lists(child, max_size=4)
        return st.one_of(
            many.map(lambda xs: b"(" + b"".join(xs) + b"t"),  # tuple
            many.map(lambda xs: b"](" + b"".join(xs) + b"e"),  # list
            st.lists(st.tuples(st.text(max_size=3).map(_s), child), max_size=3).map(
                lambda kv: b"}(" + b"".join(k + v for k, v in kv) + b"u"
            ),
            st.tuples(child, many).map(lambda t: t[0] + b"(" + b"".join(t[1]) + b"tR"),  # call
            st.tuples(st.sampled_from(globals_), many).map(lambda t: g(t[0], True) + b"(" + b"".join(t[1]) + b"tR"),
            st.tuples(st.sampled_from(globals_), many).map(lambda t: g(t[0], True) + b"(" + b"".join(t[1]) + b"t\x81"),
            st.tuples(child, child).map(lambda t: t[0] + t[1] + b"b"),  # BUILD
            many.map(lambda xs: b"(" + b"".join(xs) + b"tQ"),  # persistent id
            child.map(lambda c: c + b"\x94h\x00"),  # MEMOIZE then GET
            child.map(lambda c: g(("pickle", "loads"), True) + _bytes(b"\x80\x04" + c + b".") + b"\x85R"),
        )

    program = st.recursive(leaf, extend, max_leaves=25)

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        program,
        st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), max_size=3),
        st.integers(0, 1 << 12) | st.none(),
    )
    def check(body, flips, cut):
        data = bytearray(b"\x80\x04" + body + b".")
        for off, val in flips:
            data[off % len(data)] = val
        if cut is not None:
            data = data[: cut % (len(data) + 1)]
        data = bytes(data)
        try:
            obj = pickles.Machine(data).load()
            pickles.describe(obj)
            pickles.describe(obj, raw_names=True)
            pickles.render(obj)
        except CkptError:
            pass
        w = scan_mod.Walk()
        scan_mod._region(w, io.BytesIO(data), 0, len(data), "", 0, top=True)

    try:
        check()
    finally:
        del sys.modules[PROBE]
    assert _Probe.called == 0
