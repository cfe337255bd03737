"""Fuzzing every parser (issue 11, item 5): the short, deterministic run of tools/fuzz_targets.py.

Seeds are small valid files written by each producer's library (or ../shared fixtures), mutated by
bit flips, truncations, length-field edits, JSON number swaps and range edits; checksummed formats
are also mutated under their checksum (OCDBT re-sealed, TF index rebuilt). The property: ckptctl
returns a result or raises a CkptError subclass - no other exception, no hang (a CPU-time alarm
per input), no huge allocation (RLIMIT_AS a little above what the process maps) - and through the
CLI exit 1 with one line on stderr, never a traceback. HDF5 (and .keras, which holds HDF5) run in a
worker subprocess: a crash in libhdf5 must not take the test run with it.

hypothesis drives the mutator through `st.randoms()`, derandomized and without a database, so a
failing input shrinks to the edits that matter and CI sees the same inputs every run. The long
run is tools/fuzz.sh (docs/testing.md, "Fuzzing"). The pickle machine's own opcode-level fuzzers
stay in tests/test_scan_blind_spots.py.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from conftest import cli, run

from ckptctl.errors import CkptError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz_targets as ft  # noqa: E402 - tools/ is put on the path above

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - after importorskip
from hypothesis import strategies as st  # noqa: E402

IN_PROCESS = [p for p in ft.PARSERS if p not in ft.SUBPROCESS_PARSERS]
EXAMPLES = 40  # per parser; the whole file stays well under a minute on two shared cores


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-seeds")


_SEEDS: dict[str, list] = {}


def seeds_of(parser: str, root: Path) -> list:
    if parser not in _SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SEEDS[parser] = ft.build_seeds(parser, root)
    return _SEEDS[parser]


@pytest.mark.parametrize("parser", IN_PROCESS)
def test_parser_fails_only_cleanly(parser, seed_root, tmp_path):
    from ckptctl.formats import open_reader

    seeds = seeds_of(parser, seed_root)
    ws = ft.Workspace(seeds, tmp_path)
    for i, s in enumerate(seeds):  # the fuzz starts from files the parser reads, tensors listed
        with open_reader(ws.copies[i] / s.entry if s.entry else ws.copies[i]) as rd:
            assert rd.info().tensors, (parser, s.name)
    outcomes = {"ok": 0, "error": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.integers(0, len(seeds) - 1), st.randoms(use_true_random=False))
    def check(k, rnd):
        data = seeds[k].generate(rnd)
        outcomes[ft.check_one(ws, k, seeds[k], data, cpu_seconds=20)] += 1

    with warnings.catch_warnings(), ft.memory_cap():
        warnings.simplefilter("ignore")
        check()
    assert outcomes["error"] > 0  # the mutations do reach the parser's checks


@pytest.mark.parametrize("parser", ft.SUBPROCESS_PARSERS)
def test_hdf5_parsers_in_a_worker_process(parser, tmp_path):
    """libhdf5 is C: these run in the supervisor's worker subprocess, so a segfault is a finding
    (the worker's death, with the input saved), not the end of the test run."""
    s = ft.campaign(parser, 60, seed=1, out=tmp_path)
    assert s["crashes"] == [] and s["findings"] == 0, (
        s,
        [p.read_text() for p in (tmp_path / "findings").glob("*.txt")],
    )
    assert s["ok"] + s["error"] + s["caught"] == 60 and s["error"] > 0


# ---- through the CLI: exit 1 and one line, never a traceback --------------------------------------
def _clean(res, where) -> None:
    if res.exit_code == 0:
        json.loads(res.stdout)  # a result: valid JSON on stdout
        return
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1, (where, res.exit_code, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (where, res.stderr)
    assert "internal error" not in lines[0] and "Traceback" not in res.stderr, (where, res.stderr)


@pytest.mark.parametrize("parser", IN_PROCESS)
def test_cli_says_one_line(parser, seed_root, tmp_path):
    seeds = seeds_of(parser, seed_root)
    ws = ft.Workspace(seeds, tmp_path)
    rnd = random.Random(f"cli:{parser}")
    failed = 0
    for n in range(6):
        k = n % len(seeds)
        entry = ws.place(k, seeds[k], seeds[k].generate(rnd))
        res = cli("inspect", "--all", "--format", "json", entry)
        _clean(res, (seeds[k].name, n))
        failed += res.exit_code == 1
    assert failed


@pytest.mark.parametrize("parser", ["hdf5", "tf-bundle"])
def test_real_process_says_one_line(parser, seed_root, tmp_path):
    """One rejected input per parser through `python -m ckptctl`: exit status 1, one stderr line."""
    seeds = seeds_of(parser, seed_root)
    ws = ft.Workspace(seeds, tmp_path)
    rnd = random.Random(f"proc:{parser}")
    for n in range(20):
        k = n % len(seeds)
        r = run("inspect", ws.place(k, seeds[k], seeds[k].generate(rnd)))
        if r.returncode == 0:
            continue
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr
        return
    pytest.fail("no input was rejected")


# ---- a crash inside libhdf5 is one line, not a dead process ---------------------------------------
CRASH_IN_H5 = """
import ctypes, sys
import h5py
def crash(*a, **k):
    ctypes.string_at(0)  # a real SIGSEGV inside a C call, as a damaged file can cause in libhdf5
h5py.h5o.open = crash
from ckptctl.cli.app import main
sys.argv = ["ckptctl", *sys.argv[1:]]
main()
"""


def test_segfault_in_libhdf5_is_one_clean_line(seed_root, tmp_path):
    """HDF5Reader walks the file in a forked child first; the child dies of SIGSEGV, ckptctl says
    so in one line and exits 1 (before the guard: the process died, exit -11, nothing said)."""
    import subprocess

    (src,) = [s for s in seeds_of("hdf5", seed_root) if s.name == "h5py-keras2"]
    script = tmp_path / "crash.py"
    script.write_text(CRASH_IN_H5)
    out = str(tmp_path / "out.safetensors")
    for cmd, code in ((["inspect", src.template], 1), (["convert", src.template, out], 1)):
        r = subprocess.run(
            [sys.executable, str(script), *map(str, cmd)], capture_output=True, text=True, timeout=300, check=False
        )
        assert r.returncode == code, (cmd, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "libhdf5 crashed reading it (SIGSEGV)" in lines[0], (cmd, r.stderr)
        assert not (tmp_path / "out.safetensors").exists()


def test_real_libhdf5_segfault_found_by_the_fuzz(seed_root, tmp_path):
    """Found by the hdf5 fuzz (input 6130 of seed 2): one byte of the h5py seed, 6201, from 1 to 3
    and libhdf5 dies of SIGSEGV reading the group attribute weight_names. h5py alone crashes
    (the control); ckptctl
    inspect and convert say so in one line, exit 1, and write nothing."""
    import subprocess

    (src,) = [s for s in seeds_of("hdf5", seed_root) if s.name == "h5py-keras2"]
    data = bytearray(src.data)
    assert len(data) == 12336 and data[6201] == 1, "the seed's layout changed: find the byte again"
    data[6201] = 3
    p = tmp_path / "segv.h5"
    p.write_bytes(bytes(data))
    walk = (
        "import h5py, sys\nf = h5py.File(sys.argv[1], 'r')\n"  # every attribute of every object
        "f.visititems(lambda n, o: list(o.attrs.items()))"
    )
    control = subprocess.run([sys.executable, "-c", walk, str(p)], capture_output=True, timeout=120, check=False)
    if control.returncode != -11:
        pytest.skip(f"this libhdf5 no longer crashes on the input (h5py exit {control.returncode})")
    out = tmp_path / "out.safetensors"
    for args in (["inspect", p], ["convert", p, out]):
        r = run(*args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        want = f"error: {p}: damaged HDF5 structure: libhdf5 crashed reading it (SIGSEGV); refused"
        assert r.stderr.strip().splitlines() == [want], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


HANG_IN_H5 = """
import sys
from ckptctl.formats import hdf5_guard
hdf5_guard.GUARD_CPU_BASE = 2  # the budget, made small for the test (60 s + 5 s per MiB by default)
from ckptctl.cli.app import main
sys.argv = ["ckptctl", *sys.argv[1:]]
main()
"""


def test_libhdf5_loop_on_a_damaged_file_is_one_clean_line(tmp_path):
    """Found by the hdf5 fuzz (the worker stopped making progress on input 699 of seed 2): on
    keras2_full.h5 with byte 5464 and bytes 5472-5497 zeroed (the root group's vlen string
    attributes), reading attribute 'backend' loops forever inside libhdf5; ckptctl hung, Ctrl-C
    could not stop it. The guard child now runs under a CPU budget and ckptctl says so in one line."""
    import subprocess

    fx = ft.FIXTURES / "tensorflow" / "keras2_full.h5"
    if not fx.is_file():
        pytest.skip("../shared/fixtures/tensorflow is absent")
    data = bytearray(fx.read_bytes())
    data[5464] = 0
    data[5472:5498] = bytes(26)
    p = tmp_path / "loop.h5"
    p.write_bytes(bytes(data))
    script = tmp_path / "budget.py"
    script.write_text(HANG_IN_H5)
    r = subprocess.run(
        [sys.executable, str(script), "inspect", str(p)], capture_output=True, text=True, timeout=240, check=False
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "libhdf5 did not finish reading its metadata" in lines[0], r.stderr


HUGE_ALLOC_IN_H5 = """
import sys
import h5py
import numpy as np
real = h5py.h5o.open
def greedy(*a, **k):
    np.empty(8 << 30, np.uint8)  # what libhdf5 does for a damaged length: 8 GiB (np.empty touches none)
    return real(*a, **k)
h5py.h5o.open = greedy
from ckptctl.cli.app import main
sys.argv = ["ckptctl", *sys.argv[1:]]
main()
"""


def test_libhdf5_allocating_for_a_damaged_length_is_one_clean_line(seed_root, tmp_path):
    """Found by the hdf5 fuzz (input 5729 of seed 2, keras2_full.h5 with a range rewritten): libhdf5
    allocated what a damaged length asked for while iterating links - ckptctl's RSS reached 23 GB
    and the kernel killed it (exit 137). The guard child now runs with 1 GiB of address space more
    than the process maps; when libhdf5 (here: an 8 GiB allocation patched into h5o.open) fails
    there, the file is refused in one line and the parent never allocates it."""
    import subprocess

    (src,) = [s for s in seeds_of("hdf5", seed_root) if s.name == "h5py-keras2"]
    script = tmp_path / "greedy.py"
    script.write_text(HUGE_ALLOC_IN_H5)
    r = subprocess.run(
        [sys.executable, str(script), "inspect", str(src.template)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "libhdf5 asked for more than 1 GiB of memory" in lines[0], r.stderr


# ---- malicious pickles: nothing ever runs -------------------------------------------------------
def _payloads(marker: Path) -> list[bytes]:
    """Pickles that would create `marker` if anything unpickled them (os/posix.system, exec,
    subprocess, nested pickle.loads), as plain pickles and inside torch's layouts."""
    cmd = f"touch {marker}"

    def s(x):
        return b"\x8c" + bytes([len(x.encode())]) + x.encode()

    proto0 = f"cos\nsystem\n(V{cmd}\ntR.".encode()
    posix = f"cposix\nsystem\n(V{cmd}\ntR.".encode()
    stack = b"\x80\x04" + s("builtins") + s("exec") + b"\x93" + s(f"open({str(marker)!r}, 'w')") + b"\x85R."
    sub = b"\x80\x04" + s("subprocess") + s("call") + b"\x93]" + b"(" + s("touch") + s(str(marker)) + b"e\x85R."
    nested = b"\x80\x04" + s("pickle") + s("loads") + b"\x93C" + bytes([len(proto0)]) + proto0 + b"\x85R."
    in_dict = b"\x80\x02}(X\x01\x00\x00\x00w" + proto0[:-1] + b"u."  # a state_dict entry that is the call
    torch_zip = io.BytesIO()
    with zipfile.ZipFile(torch_zip, "w") as z:
        z.writestr("archive/data.pkl", posix)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    legacy = b"".join(
        [
            pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
            pickle.dumps(1001, protocol=2),
            pickle.dumps({"little_endian": True}, protocol=2),
            stack,
        ]
    )
    return [proto0, posix, stack, sub, nested, in_dict, torch_zip.getvalue(), legacy]


def test_payloads_are_live(tmp_path):
    """Control: the payloads do run when Python's pickle loads them (in a throwaway process, with
    another marker path), so the marker check below is not passing on dead payloads."""
    import subprocess

    control = tmp_path / "control-marker"
    for i, p in enumerate(_payloads(control)[:6]):
        f = tmp_path / f"p{i}.pkl"
        f.write_bytes(p)
        subprocess.run(
            [sys.executable, "-c", "import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())", str(f)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert control.exists(), i
        control.unlink()


def test_fuzzed_malicious_pickles_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    payloads = _payloads(marker)
    f = tmp_path / "m.pkl"
    from ckptctl.formats import open_reader, pickles
    from ckptctl.ops import scan_walk as scan_mod

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.integers(0, len(payloads) - 1), st.randoms(use_true_random=False), st.booleans())
    def check(k, rnd, keep):
        data = payloads[k] if keep else ft.mutate(payloads[k], rnd, ft.length_fields(payloads[k]))
        f.write_bytes(data)
        try:
            pickles.describe(pickles.Machine(data).load())
        except CkptError:
            pass
        scan_mod.walk_file(f)
        try:
            with open_reader(f) as rd:
                for t in rd.info().tensors[:4]:
                    b"".join(bytes(c) for c in rd.iter_chunks(t.name))
        except CkptError:
            pass
        assert not marker.exists(), data

    with ft.bounded(300):
        check()
    # and the unmutated ones through every command, in real processes
    for i, p in enumerate(payloads):
        src = tmp_path / (f"m{i}.pt" if p[:2] == b"PK" or i == len(payloads) - 1 else f"m{i}.pkl")
        src.write_bytes(p)
    srcs = sorted(tmp_path.glob("m[0-9]*"))
    r = run("scan", *srcs)
    assert r.returncode == 1 and r.stdout.count("dangerous") >= len(srcs), r.stdout
    for src in (srcs[0], srcs[-1]):  # a plain pickle and the legacy torch layout
        r = run("convert", src, tmp_path / "o.safetensors")
        assert r.returncode == 1 and not (tmp_path / "o.safetensors").exists(), r.stderr
    for src in srcs:
        for cmd in (["inspect", src], ["diff", src, src]):
            cli(*cmd)
    assert not marker.exists()


# ---- regressions: inputs the fuzzers found --------------------------------------------------------
def test_zip_member_with_an_empty_name(tmp_path):
    """Found by the torch-zip fuzz (a length-field edit set a central-directory name length to 0):
    zipfile's ZipInfo.is_dir() indexes filename[-1] and raised IndexError in scan and in the
    torch zip reader's pickle walk (`internal error: IndexError`). Now the member is skipped like
    any non-pickle member; a dangerous data.pkl beside it is still flagged."""
    for name, pkl, code, verdict in (
        ("ok.pt", b"\x80\x02}q\x00.", 0, "safe"),
        ("bad.pt", b"cposix\nsystem\n(Vtrue\ntR.", 1, "dangerous"),
    ):
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/version", "3\n")
            z.writestr(zipfile.ZipInfo(""), b"x")
        f = tmp_path / name
        f.write_bytes(b.getvalue())
        assert "" in zipfile.ZipFile(f).namelist()
        r = cli("scan", "--format", "json", f)
        assert r.exit_code == code, r.stderr
        assert json.loads(r.stdout)[0]["verdict"] == verdict, r.stdout
        r = cli("inspect", "--format", "json", f)
        assert r.exit_code == 0 and json.loads(r.stdout)["num_tensors"] == 0, r.stderr


def _zarr_item(root: Path, v3: bool, meta_edit: dict) -> Path:
    """An Orbax item without OCDBT holding one 2x4 float32 array 'w' as Zarr v2 or v3 (one raw
    chunk, written by hand), with `meta_edit` applied to its array metadata."""
    import numpy as np

    root.mkdir()
    (root / "_METADATA").write_text(
        json.dumps(
            {
                "tree_metadata": {
                    "('w',)": {
                        "key_metadata": [{"key": "w", "key_type": 2}],
                        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
                    }
                },
                "use_ocdbt": False,
                "use_zarr3": v3,
                "store_array_data_equal_to_fill_value": True,
            }
        )
    )
    raw = np.arange(8, dtype="<f4").tobytes()
    if v3:
        meta = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [2, 4],
            "data_type": "float32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 4]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "fill_value": 0,
        }
        (root / "w" / "c" / "0").mkdir(parents=True)
        (root / "w" / "c" / "0" / "0").write_bytes(raw)
        name = "zarr.json"
    else:
        meta = {
            "zarr_format": 2,
            "shape": [2, 4],
            "chunks": [2, 4],
            "dtype": "<f4",
            "compressor": None,
            "fill_value": None,
            "filters": None,
            "order": "C",
            "dimension_separator": ".",
        }
        (root / "w").mkdir()
        (root / "w" / "0.0").write_bytes(raw)
        name = ".zarray"
    meta.update(meta_edit)
    (root / "w" / name).write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(
    "v3, edit, words",
    [
        (False, {}, None),  # control: the hand-written item reads
        (True, {}, None),
        (False, {"dimension_separator": {"a": 1}}, "dimension_separator"),
        (True, {"data_type": ["float32"]}, "data type"),
        (True, {"codecs": [{"name": "bytes", "configuration": 1.5}]}, "codecs"),
        (
            True,
            {"codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [1, 4], "codecs": [7]}}]},
            "codecs",
        ),
        (True, {"chunk_key_encoding": {"name": "default", "configuration": ["/"]}}, None),  # bad config: default '/'
        (True, {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": 3}}}, "separator"),
    ],
    ids=[
        "v2",
        "v3",
        "v2-separator-object",
        "v3-dtype-list",
        "v3-codec-config-float",
        "v3-inner-codec-int",
        "v3-key-encoding-config-list",
        "v3-separator-int",
    ],
)
def test_zarr_metadata_of_the_wrong_type(tmp_path, v3, edit, words):
    """Found by the orbax fuzz (JSON nodes replaced by values of another type): a list as v3
    data_type (TypeError: unhashable), a float codec configuration (AttributeError), an object as
    the v2 dimension_separator (AttributeError on .join) were internal errors. Now one line."""
    root = _zarr_item(tmp_path / "item", v3, edit)
    r = cli("inspect", "--format", "json", root)
    if words is None:
        assert r.exit_code == 0, r.stderr
        import numpy as np

        from ckptctl.formats import open_reader

        with open_reader(root) as rd:
            got = b"".join(bytes(c) for c in rd.iter_chunks("w"))
        assert got == np.arange(8, dtype="<f4").tobytes()
        return
    _clean(r, edit)
    assert r.exit_code == 1 and words in r.stderr, r.stderr


def test_hdf5_damage_found_by_fuzzing(tmp_path):
    """Found by the hdf5 fuzz: (1) the superblock's root object header address zeroed: h5py's
    KeyError ('ring type mismatch') escaped as an internal error; now one CorruptFile line.
    (2) a float datatype whose exponent bias no numpy type can hold: h5py's ValueError on .dtype
    stopped the listing; now that dataset is an object with a note and the rest still lists."""
    import h5py
    import numpy as np

    p = tmp_path / "root.h5"
    with h5py.File(p, "w", libver="earliest") as f:
        f.create_dataset("w", data=np.ones(3, np.float32))
    data = bytearray(p.read_bytes())
    assert data[8] == 0 and struct.unpack_from("<Q", data, 64)[0] > 0  # superblock v0: root entry at 56
    data[64] = 0  # the root group's object header address, as the fuzz left it
    data[72] = 0  # its cache type
    p.write_bytes(bytes(data))
    r = run("inspect", p)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "damaged HDF5 structure" in r.stderr and "internal error" not in r.stderr, r.stderr

    p = tmp_path / "odd-float.h5"
    with h5py.File(p, "w") as f:
        t = h5py.h5t.IEEE_F16LE.copy()
        t.set_ebias(10**6)
        h5py.h5d.create(f.id, b"odd", t, h5py.h5s.create_simple((3,)))
        f.create_dataset("w", data=np.arange(3, dtype=np.float32))
    with h5py.File(p, "r") as f, pytest.raises(ValueError, match="Insufficient precision"):
        f["odd"].dtype  # noqa: B018 - what h5py says about it
    r = cli("inspect", "--format", "json", p)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [t["name"] for t in out["tensors"]] == ["w"]
    assert [o["name"] for o in out["objects"]] == ["odd"] and "numpy cannot represent" in json.dumps(out["objects"])


def test_zarr_shape_larger_than_memory(tmp_path):
    """Found by the orbax fuzz: a Zarr shape of [4, 10^18] (float32) raised numpy's ValueError
    ('Maximum allowed dimension exceeded') and [2, 10^17] a MemoryError for 0.4 EB, both internal
    errors, when the chunk rows were assembled. Now: more than 2^63 bytes is refused when the
    metadata is read; a shape that fits the format but not memory is one line when read."""
    from ckptctl.formats import open_reader

    def grid(c):
        return {"name": "regular", "configuration": {"chunk_shape": c}}

    root = _zarr_item(tmp_path / "a", True, {"shape": [4, 10**18]})
    r = cli("inspect", "--format", "json", root)
    _clean(r, "2^63")
    assert r.exit_code == 1 and "more than 2^63 bytes" in r.stderr, r.stderr
    root = _zarr_item(tmp_path / "b", True, {"shape": [2, 10**17], "chunk_grid": grid([1, 4])})
    with open_reader(root) as rd, ft.memory_cap():
        assert rd.info().tensors[0].shape == (2, 10**17)
        with pytest.raises(CkptError, match="too large to assemble in memory"):
            next(iter(rd.iter_chunks("w")))


@pytest.mark.parametrize("store", ["folder", "ocdbt"])
def test_orbax_tree_key_with_a_lone_surrogate(tmp_path, store):
    """Found by the orbax fuzz: a _METADATA tree key holding the JSON escape \\ud800 (a lone
    surrogate once parsed) raised UnicodeEncodeError when it was looked up, in the OCDBT store
    (key.encode()) and in a plain folder (os.stat): internal errors. Now the key names no array:
    one line."""
    if store == "folder":
        root = _zarr_item(tmp_path / "item", False, {})
    else:
        import shutil

        fx = ft.FIXTURES / "jax_gguf" / "orbax_single"
        if not fx.is_dir():
            pytest.skip("../shared/fixtures/jax_gguf is absent")
        root = tmp_path / "item"
        shutil.copytree(fx, root)
    md = json.loads((root / "_METADATA").read_text())
    entry = next(iter(md["tree_metadata"].values()))
    entry["key_metadata"][0]["key"] = "\ud800"
    (root / "_METADATA").write_text(json.dumps(md))  # ensure_ascii: written as the escape \ud800
    assert "\\ud800" in (root / "_METADATA").read_text()
    r = cli("inspect", "--format", "json", root)
    _clean(r, store)
    assert r.exit_code == 1, r.stdout


def test_keras2_names_that_are_not_utf8(tmp_path):
    """Found by the hdf5 fuzz: a Keras 2 file whose root has an attribute named with a non-UTF-8
    byte (h5py lists that name as bytes: re.fullmatch raised TypeError, then the JSON encoder
    refused a bytes key) or whose layer_names holds one (h5py could not look the layer up:
    UnicodeEncodeError). All internal errors; now the file lists, names escaped as elsewhere."""
    import h5py
    import numpy as np

    p = tmp_path / "names.h5"
    with h5py.File(p, "w") as f:
        f.attrs["layer_names"] = [b"dense", b"d\xffx"]
        f.attrs[b"\xffnote"] = 1
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"kernel:0"]
        g.create_dataset("kernel:0", data=np.arange(4, dtype=np.float32))
    with h5py.File(p, "r") as f:
        assert b"\xffnote" in list(f.attrs.keys())
    r = run("inspect", "--format", "json", p)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [t["name"] for t in out["tensors"]] == ["dense/kernel:0"]
    assert out["metadata"]["\udcffnote"] == 1 and out["metadata"]["layers"] == 2


def test_shard_name_too_long_for_the_file_system(tmp_path):
    """Found by the sharded fuzz (a range of the index duplicated): a weight_map shard name of 300
    characters made Path.exists() raise OSError (ENAMETOOLONG) out of the reader. Now NotFound."""
    import torch
    from safetensors.torch import save_file

    from ckptctl.errors import NotFound
    from ckptctl.formats import open_reader

    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": "x" * 300 + ".safetensors"}}
        )
    )
    with pytest.raises(NotFound, match="cannot be looked up"), open_reader(tmp_path) as rd:
        rd.info()
    r = cli("inspect", tmp_path)
    _clean(r, "long name")
    assert r.exit_code == 1 and "File name too long" in r.stderr


def test_hdf5_dataset_name_not_utf8_reads_its_data(tmp_path):
    """Found by the hdf5 fuzz: a dataset name with a byte that is not UTF-8 is listed as a
    surrogate escape, but reading its data through h5py (chunked, compressed: no direct byte
    range) opened it by that str and h5py raised UnicodeEncodeError. Now opened by bytes: the
    chunks are the values h5py reads."""
    import h5py
    import numpy as np

    from ckptctl.formats import open_reader

    p = tmp_path / "raw.h5"
    want = np.arange(6, dtype=np.float32)
    with h5py.File(p, "w") as f:
        f.create_dataset(b"w\xff", data=want, chunks=(3,), compression="gzip")
    with open_reader(p) as rd:
        (t,) = rd.info().tensors
        assert t.name == "w\udcff"
        assert b"".join(bytes(c) for c in rd.iter_chunks(t.name)) == want.tobytes()
