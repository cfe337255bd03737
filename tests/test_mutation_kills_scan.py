"""Tests written to kill mutants of `tools/mutation.sh scan` (docs/testing.md, "Mutation
testing"): the verdicts of `ckptctl.formats.pickles.safety` and the walk over every pickle a
file holds (`ckptctl.ops.scan_walk`), through `scan_file` and the `scan` command in-process.

The attack corpus of test_scan_blind_spots.py is checked there through `python -m ckptctl`, which
mutmut cannot tie to a function; here every file of it is scanned in-process, one test per file
(a mutant of the .npy walk then runs only the .npy cases)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from test_scan_blind_spots import _bytes, _call4, _p4, _s, build_corpus, system
from zip_patch import patch_central

from ckptctl.ops.scan import scan_file

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

with tempfile.TemporaryDirectory() as _d:
    CORPUS_NAMES = sorted(build_corpus(Path(_d), Path(_d) / "MARKER"))


def nest_in_loads(payload: bytes, depth: int) -> bytes:
    """`payload` handed to pickle.loads by a pickle, `depth` times over."""
    for _ in range(depth):
        payload = _p4(_call4("pickle", "loads", _bytes(payload)))
    return payload


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    marker = d / "MARKER"
    return d, marker, build_corpus(d, marker)


def _globals(res) -> dict[str, tuple[str, list[str]]]:
    return {n: (c, res.where.get(n, [])) for n, c in res.globals}


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_every_attack_is_dangerous_in_process(corpus, name):
    """scan_file names the dangerous global, classes it dangerous, and says where it was."""
    d, marker, expected = corpus
    glob, where = expected[name]
    res = scan_file(d / name)
    assert res.verdict == "dangerous", (name, res)
    g = _globals(res)
    assert glob in g, (name, list(g))
    assert g[glob][0] == "dangerous", (name, g[glob])
    if where is not None:
        assert any(where in w for w in g[glob][1]), (name, g[glob])
    assert not marker.exists()


def test_benign_checkpoints_are_safe_and_list_only_what_they_hold(tmp_path):
    sd = {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for f in ("zip.pt", "legacy.pt"):
        res = scan_file(tmp_path / f)
        assert res.verdict == "safe", res
        assert res.error is None and res.pickle
        assert all(c == "safe" for _n, c in res.globals)
        assert "torch._utils._rebuild_tensor_v2" in dict(res.globals)


def test_plain_npy_and_npz_have_no_pickle(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6.0))
    np.savez(tmp_path / "a.npz", x=np.ones(3), y=np.zeros(2, dtype=np.int8))
    for f in ("a.npy", "a.npz"):
        res = scan_file(tmp_path / f)
        assert res.verdict == "safe", res
        assert res.globals == [], res
        assert res.error is None


def test_two_clean_pickles_back_to_back_are_both_read(tmp_path):
    p = tmp_path / "two.pkl"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=2) + pickle.dumps(np.arange(3), protocol=2))
    res = scan_file(p)
    names = dict(res.globals)
    # the second pickle's globals are found: the walk went on after the first STOP
    assert "numpy.core.multiarray._reconstruct" in names or "numpy._core.multiarray._reconstruct" in names
    assert res.verdict != "dangerous"
    assert res.error is None


def test_payload_after_a_benign_pickle_is_located_by_byte(tmp_path):
    first = pickle.dumps([1, 2, 3], protocol=2)
    p = tmp_path / "c.pkl"
    p.write_bytes(first + system(tmp_path / "M"))
    res = scan_file(p)
    assert res.verdict == "dangerous"
    where = _globals(res)["os.system"][1]
    assert where == [f"pickle #2 (byte {len(first)})"], where


def test_nested_payload_location_names_loader_and_depth(tmp_path):
    ev = system(tmp_path / "M")
    p = tmp_path / "n.pkl"
    p.write_bytes(_p4(_call4("pickle", "loads", _bytes(_p4(_call4("pickle", "loads", _bytes(ev)))))))
    res = scan_file(p)
    g = _globals(res)
    assert g["os.system"][1] == ["pickle > pickle.loads payload (depth 1) > pickle.loads payload (depth 2)"]
    assert g["pickle.loads"][0] == "dangerous"


def test_nested_depth_limit_is_exactly_eight(tmp_path):
    ev = system(tmp_path / "M")
    payload = ev
    payload = nest_in_loads(payload, 8)
    p = tmp_path / "eight.pkl"
    p.write_bytes(payload)
    g = _globals(scan_file(p))
    assert "os.system" in g and "<pickles nested deeper than 8>" not in g  # depth 8 is still walked
    p.write_bytes(_p4(_call4("pickle", "loads", _bytes(payload))))
    g = _globals(scan_file(p))
    assert "<pickles nested deeper than 8>" in g and "os.system" not in g
    assert g["<pickles nested deeper than 8>"][0] == "dangerous"


def test_zip_member_names_and_compression(tmp_path):
    """Stored and deflated pickle members, by name and by content; torch storages are not pickles."""
    ev = system(tmp_path / "M")
    p = tmp_path / "z.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a/stored.pkl", ev, compress_type=zipfile.ZIP_STORED)
        z.writestr("a/deflated.pickle", ev, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("a/sniffed", ev, compress_type=zipfile.ZIP_STORED)
        z.writestr("a/data/0", ev, compress_type=zipfile.ZIP_STORED)  # a storage: raw bytes
        z.writestr("a/readme.txt", b"hello", compress_type=zipfile.ZIP_DEFLATED)
    res = scan_file(p)
    assert res.verdict == "dangerous"
    where = _globals(res)["os.system"][1]
    assert sorted(where) == ["member a/deflated.pickle", "member a/sniffed", "member a/stored.pkl"], where


def test_zip_inside_a_pickle_file_after_it(tmp_path):
    """A zip appended to a pickle: both are walked (the zip's members by their own names)."""
    ev = system(tmp_path / "M")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x/hook.pkl", ev)
    p = tmp_path / "pz.bin"
    p.write_bytes(pickle.dumps({"ok": 1}, protocol=2) + buf.getvalue())
    res = scan_file(p)
    assert res.verdict == "dangerous"
    assert _globals(res)["os.system"][1] == ["member x/hook.pkl"]


def test_npy_object_payload_version_2_header(tmp_path):
    """An .npy of format version 2 (4-byte header length) holding objects."""
    ev = system(tmp_path / "M")
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (-(12 + len(header) + 1) % 64) + b"\n"
    p = tmp_path / "v2.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header + ev)
    res = scan_file(p)
    assert res.verdict == "dangerous", res
    assert _globals(res)["os.system"][1] == ["npy object payload"]
    # the same header with a numeric dtype: its data is not a pickle
    p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.replace(b"|O", b"<f8") + ev[:8])
    res = scan_file(p)
    assert res.verdict != "dangerous" and "os.system" not in dict(res.globals)


def test_cli_scan_exit_codes_in_process(tmp_path):
    ev = system(tmp_path / "M")
    (tmp_path / "evil.pkl").write_bytes(ev)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    r = cli("scan", tmp_path / "ok.pt")
    assert r.exit_code == 0, r.output
    r = cli("scan", tmp_path / "evil.pkl", "--format", "json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc[0]["verdict"] == "dangerous"
    assert {g["name"]: g["class"] for g in doc[0]["globals"]} == {"os.system": "dangerous"}
    assert not (tmp_path / "M").exists()


def test_payload_built_at_load_time_is_named_where_it_is_called(tmp_path):
    p = tmp_path / "computed.pkl"
    p.write_bytes(_p4(_call4("torch.storage", "_load_from_bytes", _call4("mylib", "make_bytes"))))
    res = scan_file(p)
    g = _globals(res)
    assert g["torch.storage._load_from_bytes(<bytes built at load time>)"] == ("dangerous", ["pickle"]), g


def _big_system_pickle(marker) -> bytes:
    """os.system(<a 1.1 MiB bytes argument>): over the machine's 1 MiB inline limit, so a loader's
    payload holding it stays in the file (a Span) instead of being read into memory."""
    return _p4(_call4("os", "system", _bytes(b"\0" * (1100 * 1024))))


def test_large_nested_payload_is_walked_in_place(tmp_path):
    p = tmp_path / "big.pkl"
    p.write_bytes(_p4(_call4("pickle", "loads", _bytes(_big_system_pickle(tmp_path / "M")))))
    res = scan_file(p)
    g = _globals(res)
    assert g["os.system"] == ("dangerous", ["pickle > pickle.loads payload (depth 1)"]), g
    assert res.error is None, res.error


def test_large_nested_payloads_count_towards_the_depth_limit(tmp_path):
    payload = _big_system_pickle(tmp_path / "M")
    payload = nest_in_loads(payload, 8)
    p = tmp_path / "big8.pkl"
    p.write_bytes(payload)
    g = _globals(scan_file(p))
    assert "os.system" in g and "<pickles nested deeper than 8>" not in g
    p.write_bytes(_p4(_call4("pickle", "loads", _bytes(payload))))
    g = _globals(scan_file(p))
    assert "<pickles nested deeper than 8>" in g and "os.system" not in g


def test_unnamed_zip_members_are_sniffed_for_a_zip_or_an_npy(tmp_path):
    """Members whose names say nothing: a zip inside (stored) and an object .npy (deflated) are
    recognised by their first bytes and walked."""
    from test_scan_blind_spots import Evil

    ev = system(tmp_path / "M")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("hook.pkl", ev)
    arr = io.BytesIO()
    np.save(arr, np.array([Evil(tmp_path / "M")], dtype=object), allow_pickle=True)
    p = tmp_path / "outer.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/inner.dat", inner.getvalue(), compress_type=zipfile.ZIP_STORED)
        z.writestr("x/arr.dat", arr.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    res = scan_file(p)
    g = _globals(res)
    assert g["os.system"][1] == ["member x/inner.dat > member hook.pkl"], g
    sysname = "posix.system" if os.name == "posix" else "nt.system"
    assert g[sysname][1] == ["member x/arr.dat > npy object payload"], g


def test_compressed_member_too_large_to_scan_is_unknown_and_said(tmp_path):
    from ckptctl.ops.scan_walk import IN_MEMORY

    p = tmp_path / "big.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/hook.pkl", system(tmp_path / "M"), compress_type=zipfile.ZIP_DEFLATED)
    patch_central(p, "x/hook.pkl", "usize", IN_MEMORY + 1)
    res = scan_file(p)
    g = _globals(res)
    assert g == {"<unscanned pickle member x/hook.pkl>": ("unknown", ["member x/hook.pkl"])}, g
    assert res.verdict == "unknown"
    assert res.error == f"member x/hook.pkl: compressed and too large to scan ({IN_MEMORY + 1} bytes)", res.error


def test_named_member_with_a_bad_local_header_is_an_error(tmp_path):
    """A torch archive with an extra pickle member whose local header is damaged: the weights list,
    the member's failure is the scan's error (not silently skipped)."""
    p = tmp_path / "badlocal.pt"
    torch.save({"w": torch.ones(2)}, p)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("badlocal/extra/hook.pkl", system(tmp_path / "M"), compress_type=zipfile.ZIP_STORED)
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        off = z.getinfo("badlocal/extra/hook.pkl").header_offset
    data[off : off + 4] = b"XXXX"
    p.write_bytes(bytes(data))
    res = scan_file(p)
    assert "os.system" not in dict(res.globals)
    assert res.error == "member badlocal/extra/hook.pkl: bad local header", res.error


@pytest.mark.parametrize(
    "module,name,cls",
    [
        # a builtin or a listed module reached through an attribute chain classify() alone misses
        ("mylib", "tools.eval", "dangerous"),
        ("mylib", "helpers.pickle.loads", "dangerous"),
        ("mylib", "a.b.exec", "dangerous"),
        # no chain: a library's own function that happens to be called eval is not builtins.eval
        ("mylib", "eval", "unknown"),
        ("mylib", "Outer.Inner", "unknown"),
        ("builtins", "eval", "dangerous"),
        ("torch._utils", "_rebuild_tensor_v2", "safe"),
    ],
)
def test_classify_pair_follows_attribute_chains(module, name, cls):
    from ckptctl.formats.pickles.safety import classify_pair

    assert classify_pair(module, name) == cls


def test_a_builtin_reached_through_a_chain_is_dangerous_in_a_file(tmp_path):
    p = tmp_path / "chain.pkl"
    p.write_bytes(_p4(_call4("mylib", "tools.eval", _s("1+1"))))
    res = scan_file(p)
    assert dict(res.globals) == {"mylib.tools.eval": "dangerous"}
    assert res.verdict == "dangerous"


NONE = pickle.dumps(None, protocol=2)  # 4 bytes


def test_second_pickle_of_a_zip_member_is_located_within_the_member(tmp_path):
    p = tmp_path / "two.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("pad.txt", b"x" * 100)
        z.writestr("x/two.pkl", NONE + system(tmp_path / "M"), compress_type=zipfile.ZIP_STORED)
    g = _globals(scan_file(p))
    assert g["os.system"][1] == [f"member x/two.pkl #2 (byte {len(NONE)})"], g


def test_concatenated_pickles_up_to_the_limit_are_walked_and_more_is_dangerous(tmp_path):
    from ckptctl.ops.scan_walk import MAX_CONCAT

    ev = system(tmp_path / "M")
    p = tmp_path / "many.pkl"
    p.write_bytes(NONE * (MAX_CONCAT - 1) + ev)  # the payload is pickle number MAX_CONCAT
    g = _globals(scan_file(p))
    assert g["os.system"][1] == [f"pickle #{MAX_CONCAT} (byte {4 * (MAX_CONCAT - 1)})"], g
    assert not any(n.startswith("<more than") for n in g), g
    p.write_bytes(NONE * MAX_CONCAT + ev)  # one more: not walked, and not called safe
    res = scan_file(p)
    g = _globals(res)
    assert "os.system" not in g
    assert g[f"<more than {MAX_CONCAT} pickles back to back: the rest not walked>"][0] == "dangerous", g
    assert res.verdict == "dangerous"


def test_pickles_past_the_per_file_limit_are_not_called_safe(tmp_path):
    from ckptctl.ops.scan_walk import MAX_CONCAT, MAX_PICKLES

    ev = system(tmp_path / "M")
    members = MAX_PICKLES // MAX_CONCAT
    p = tmp_path / "limit.zip"
    with zipfile.ZipFile(p, "w") as z:  # exactly MAX_PICKLES pickles, the payload the last
        for i in range(members):
            body = NONE * (MAX_CONCAT - 1) + (ev if i == members - 1 else NONE)
            z.writestr(f"m{i:03d}.pkl", body)
    g = _globals(scan_file(p))
    assert "os.system" in g and not any(n.startswith("<more than") for n in g), list(g)
    with zipfile.ZipFile(p, "a") as z:  # one pickle more
        z.writestr("zz.pkl", ev)
    g = _globals(scan_file(p))
    assert g[f"<more than {MAX_PICKLES} pickles in the file: the rest not walked>"] == ("dangerous", ["member zz.pkl"])


def test_failing_pickles_in_a_zip_member_are_still_listed(tmp_path):
    """No reader lists a plain zip: only the walk's opcode listing after a failure finds these.
    A protocol-2 pickle second in its member (its header says a pickle starts there), and a
    protocol-0 pickle first in a member named like a pickle."""
    fail_then_system = b"]}b0cos\nsystem\n0N."
    p = tmp_path / "fail.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/a.pkl", NONE + b"\x80\x02" + fail_then_system)
        z.writestr("x/b.pkl", fail_then_system)
    res = scan_file(p)
    g = _globals(res)
    assert sorted(g["os.system"][1]) == [f"member x/a.pkl #2 (byte {len(NONE)})", "member x/b.pkl"], g
    assert g["os.system"][0] == "dangerous"


def test_too_deep_marker_says_where(tmp_path):
    payload = system(tmp_path / "M")
    payload = nest_in_loads(payload, 9)
    p = tmp_path / "nine.pkl"
    p.write_bytes(payload)
    where = _globals(scan_file(p))["<pickles nested deeper than 8>"][1]
    assert len(where) == 1 and where[0].startswith("pickle > pickle.loads payload (depth 1) > "), where
    assert where[0].endswith("pickle.loads payload (depth 9)"), where


def test_a_zip_named_like_a_pickle_inside_a_checkpoint_is_walked_as_a_zip(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("hook.pkl", system(tmp_path / "M"))
    p = tmp_path / "nested.pt"
    torch.save({"w": torch.ones(2)}, p)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("nested/extra/inner.pkl", inner.getvalue())
    res = scan_file(p)
    assert _globals(res)["os.system"][1] == ["member nested/extra/inner.pkl > member hook.pkl"]
    assert res.error is None, res.error  # not also read as a (broken) pickle


def test_zip_with_the_longest_comment_is_found(tmp_path):
    p = tmp_path / "comment.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/hook.pkl", system(tmp_path / "M"))
        z.comment = b"c" * 65535
    assert _globals(scan_file(p))["os.system"][1] == ["member x/hook.pkl"]


def test_globals_before_and_after_a_failure_in_a_zip_member_are_both_kept(tmp_path):
    p = tmp_path / "both.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/c.pkl", b"\x80\x02cos\nsystem\n0]}b0csubprocess\nPopen\n0N.")
    g = _globals(scan_file(p))
    assert g["os.system"] == ("dangerous", ["member x/c.pkl"]), g
    assert g["subprocess.Popen"] == ("dangerous", ["member x/c.pkl"]), g


@pytest.mark.parametrize(
    "name,cls",
    [
        # a listed name of a module listed by names, followed by attributes: the first part decides
        ("builtins.eval.x", "dangerous"),
        ("builtins.eval.a.b", "dangerous"),
        ("torch.load.a", "dangerous"),
        # the shortest dunder is five characters; four underscores are not one
        ("mylib.Foo.__a__", "dangerous"),
        ("mylib.____", "unknown"),
    ],
)
def test_classify_listed_names_with_attributes_and_dunder_edges(name, cls):
    from ckptctl.formats.pickles.safety import classify

    assert classify(name) == cls


def test_a_global_found_in_many_places_lists_the_first_eight(tmp_path):
    """One line per dangerous global, however often it occurs: its first 8 places, in order."""
    p = tmp_path / "many.zip"
    with zipfile.ZipFile(p, "w") as z:
        for i in range(10):
            z.writestr(f"x/{i}.pkl", system(tmp_path / "M"))
    res = scan_file(p)
    cls, where = _globals(res)["os.system"]
    assert cls == "dangerous"
    assert where == [f"member x/{i}.pkl" for i in range(8)], where
    assert not (tmp_path / "M").exists()
