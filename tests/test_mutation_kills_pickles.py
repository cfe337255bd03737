"""Tests written to kill mutants of `tools/mutation.sh pickles` (docs/testing.md, "Mutation
testing"): the restricted machine's record of globals, the loaders whose payload it hands to
`scan` (pickle.loads, torch.load of a BytesIO, ... called by REDUCE, NEWOBJ or NEWOBJ_EX), the
opcode listing after a failure and the scan of pickles back to back. Effects are checked through
`scan_file`, `open_reader(...).info()` and the CLI in-process; nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
from conftest import cli
from test_scan_blind_spots import _bytes, _call4, _p4, _s, system

from ckptctl.errors import CorruptFile
from ckptctl.formats import open_reader
from ckptctl.ops.scan import scan_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PAYLOAD_WHERE = "pickle > pickle.loads payload (depth 1)"


def _where(res, name: str) -> list[str]:
    return res.where.get(name, [])


def _newobj_ex(module: str, name: str, args: bytes, kwargs: dict[str, bytes]) -> bytes:
    """cls.__new__(cls, *args, **kwargs) by NEWOBJ_EX (protocol 4)."""
    body = _s(module) + _s(name) + b"\x93" + b"(" + args + b"t" + b"}"
    for k, v in kwargs.items():
        body += _s(k) + v + b"s"
    return body + b"\x92"


@pytest.mark.parametrize("key", ["data", "b", "f", "file", "str", "s"])
def test_loader_payload_passed_by_keyword_is_walked(tmp_path, key):
    ev = system(tmp_path / "M")
    p = tmp_path / "kw.pkl"
    p.write_bytes(_p4(_newobj_ex("pickle", "loads", b"", {key: _bytes(ev)})))
    res = scan_file(p)
    assert res.verdict == "dangerous"
    assert dict(res.globals).get("os.system") == "dangerous", res.globals
    assert _where(res, "os.system") == [PAYLOAD_WHERE]


def test_keyword_that_is_not_a_payload_is_not_walked(tmp_path):
    ev = system(tmp_path / "M")
    p = tmp_path / "kw.pkl"
    p.write_bytes(_p4(_newobj_ex("pickle", "loads", b"", {"fix_imports": _bytes(ev)})))
    res = scan_file(p)
    assert dict(res.globals) == {"pickle.loads": "dangerous"}


def test_positional_payload_wins_over_keywords(tmp_path):
    ev = system(tmp_path / "M")
    p = tmp_path / "kw.pkl"
    p.write_bytes(_p4(_newobj_ex("pickle", "loads", _bytes(ev), {"data": _bytes(b"\x80\x02N.")})))
    res = scan_file(p)
    assert _where(res, "os.system") == [PAYLOAD_WHERE]


def test_newobj_of_a_loader_walks_its_payload(tmp_path):
    ev = system(tmp_path / "M")
    p = tmp_path / "newobj.pkl"
    p.write_bytes(_p4(_s("pickle") + _s("loads") + b"\x93" + b"(" + _bytes(ev) + b"t" + b"\x81"))
    res = scan_file(p)
    assert _where(res, "os.system") == [PAYLOAD_WHERE]


def test_python2_text_payload_is_walked_as_latin1(tmp_path):
    """pickle.loads of a str (a python-2 pickle's byte string read as latin-1 text)."""
    ev = system(tmp_path / "M")  # starts with \x80\x02: not ASCII
    text = ev.decode("latin1")
    p = tmp_path / "py2.pkl"
    p.write_bytes(_p4(_call4("pickle", "loads", _s(text))))
    res = scan_file(p)
    assert _where(res, "os.system") == [PAYLOAD_WHERE]
    assert res.error is None


def test_text_payload_with_a_wide_character_is_read_not_fatal(tmp_path):
    """A payload text that latin-1 cannot encode: the character becomes '?' (0x3f, not an opcode),
    the nested pickle fails there, and the outer pickle is still read to its end."""
    p = tmp_path / "wide.pkl"
    body = _call4("pickle", "loads", _s("\u0100 not a pickle")) + b"0" + _s("os") + _s("system") + b"\x93"
    p.write_bytes(_p4(body))
    res = scan_file(p)
    assert dict(res.globals)["os.system"] == "dangerous"
    assert _where(res, "os.system") == ["pickle"]
    assert res.error == "pickle > pickle.loads payload (depth 1): malformed pickle at byte 0: unknown opcode 0x3f"


def test_torch_load_of_a_file_name_is_not_a_payload(tmp_path):
    p = tmp_path / "tl.pkl"
    p.write_bytes(_p4(_call4("torch", "load", _s("\x80\x02cos\nsystem\n."))))  # a (weird) file name
    res = scan_file(p)
    assert dict(res.globals) == {"torch.load": "dangerous"}


@pytest.mark.parametrize("module", ["io", "_io"])
def test_bytesio_payload_by_either_module_name(tmp_path, module):
    ev = system(tmp_path / "M")
    p = tmp_path / "bio.pkl"
    p.write_bytes(_p4(_call4("torch", "load", _call4(module, "BytesIO", _bytes(ev)))))
    res = scan_file(p)
    assert _where(res, "os.system") == ["pickle > torch.load payload (depth 1)"]


def test_other_calls_do_not_walk_their_bytes(tmp_path):
    ev = system(tmp_path / "M")
    p = tmp_path / "other.pkl"
    p.write_bytes(_p4(_call4("mylib", "decode", _bytes(ev))))
    res = scan_file(p)
    assert dict(res.globals) == {"mylib.decode": "unknown"}
    assert res.verdict == "unknown"


def test_globals_named_after_a_failure_are_still_listed(tmp_path):
    """BUILD on a list fails the machine; os.system comes after: the opcode listing finds it."""
    p = tmp_path / "fail.pkl"
    p.write_bytes(b"\x80\x02]}b0cos\nsystem\n0N.")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals
    r = cli("inspect", p)
    assert r.exit_code == 1
    assert "BUILD on a list" in r.stderr and "os.system" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_reduce_with_bad_arguments_is_one_clean_error(tmp_path):
    p = tmp_path / "bad.pkl"
    p.write_bytes(b"\x80\x02cmylib\nf\n]R.")  # REDUCE with a list, not a tuple
    r = cli("inspect", p)
    assert r.exit_code == 1
    assert "REDUCE with a list arguments" in r.stderr or "REDUCE with list" in r.stderr, r.stderr
    p.write_bytes(b"\x80\x02K\x05)R.")  # REDUCE calls an int
    r = cli("inspect", p)
    assert r.exit_code == 1 and "REDUCE calls a" in r.stderr, r.stderr


def test_newobj_with_bad_arguments_is_one_clean_error(tmp_path):
    p = tmp_path / "bad.pkl"
    p.write_bytes(b"\x80\x04" + _s("mylib") + _s("C") + b"\x93]\x81.")  # NEWOBJ with a list
    r = cli("inspect", p)
    assert r.exit_code == 1 and "NEWOBJ with" in r.stderr, r.stderr
    p.write_bytes(b"\x80\x04" + _s("mylib") + _s("C") + b"\x93)]\x92.")  # NEWOBJ_EX, list kwargs
    r = cli("inspect", p)
    assert r.exit_code == 1 and "NEWOBJ_EX with non-dict keyword arguments" in r.stderr, r.stderr
    p.write_bytes(b"\x80\x04K\x05)\x81.")  # NEWOBJ on an int
    r = cli("inspect", p)
    assert r.exit_code == 1 and "NEWOBJ on a" in r.stderr, r.stderr


def test_pickles_after_the_first_are_listed_by_inspect(tmp_path):
    """A plain pickle followed by another: the reader lists the second one's globals and says so."""
    first = pickle.dumps({"a": 1}, protocol=2)
    ev = system(tmp_path / "M")
    p = tmp_path / "two.pkl"
    p.write_bytes(first + ev + ev)
    with open_reader(p) as r:
        info = r.info()
    assert info.globals == ["os.system"], info.globals  # the first pickle names none
    assert any(
        f"{2 * len(ev)} bytes follow the pickle's end (more pickles, asking for os.system)" in w for w in info.warnings
    ), info.warnings
    p.write_bytes(first + b"garbage!")
    with open_reader(p) as r:
        info = r.info()
    assert any("8 bytes follow the pickle's end (not a pickle)" in w for w in info.warnings), info.warnings


def test_globals_are_recorded_in_order_once_each(tmp_path):
    p = tmp_path / "g.pkl"
    p.write_bytes(b"\x80\x02cmylib\nA\n0cmylib\nB\n0cmylib\nA\n0N.")
    with open_reader(p) as r:
        info = r.info()
    assert list(info.globals) == ["mylib.A", "mylib.B"]
    r = cli("scan", p, "--format", "json")
    assert r.exit_code == 0
    assert [g["name"] for g in json.loads(r.stdout)[0]["globals"]] == ["mylib.A", "mylib.B"]


def test_stack_global_built_from_memo_strings_is_resolved_after_a_failure(tmp_path):
    """The opcode listing tracks strings through the memo (BINPUT/BINGET) like picklescan."""
    body = _s("os") + b"q\x00" + _s("system") + b"q\x01" + b"]}b"  # fail: BUILD on a list
    body += b"0h\x00h\x01\x93"
    p = tmp_path / "memo.pkl"
    p.write_bytes(b"\x80\x04" + body + b".")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals


def test_load_from_bytes_of_latin1_text_is_walked(tmp_path):
    """torch.storage._load_from_bytes given a str (a python-2 byte string): still a payload."""
    ev = system(tmp_path / "M")
    p = tmp_path / "lfb.pkl"
    p.write_bytes(_p4(_call4("torch.storage", "_load_from_bytes", _s(ev.decode("latin1")))))
    res = scan_file(p)
    assert res.where.get("os.system") == ["pickle > torch.storage._load_from_bytes payload (depth 1)"], res.where


def test_bytesio_whose_state_is_not_its_getstate_tuple(tmp_path):
    """A BytesIO rebuilt with a dict as its BUILD state carries no payload: nothing to walk, no error."""
    bio = _s("_io") + _s("BytesIO") + b"\x93)\x81" + b"}" + _s("x") + b"K\x01sb"  # NEWOBJ, BUILD {'x': 1}
    p = tmp_path / "bio_state.pkl"
    p.write_bytes(_p4(_call4("torch", "load", bio)))
    res = scan_file(p)
    assert dict(res.globals) == {"torch.load": "dangerous", "_io.BytesIO": "unknown"}, res.globals
    assert res.error is None, res.error


FAIL = b"\x80\x02]}b"  # BUILD on a list: the machine stops here, the opcode listing goes on


def test_inst_after_a_failure_is_listed(tmp_path):
    p = tmp_path / "inst.pkl"
    p.write_bytes(FAIL + b"0(ios\nsystem\n0N.")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals


@pytest.mark.parametrize(
    "put,get",
    [
        (b"p7\n", b"g7\n"),  # PUT / GET (protocol 0)
        (b"q\x07", b"h\x07"),  # BINPUT / BINGET
        (b"r\x07\x00\x00\x00", b"j\x07\x00\x00\x00"),  # LONG_BINPUT / LONG_BINGET
    ],
    ids=["put", "binput", "long_binput"],
)
def test_stack_global_from_memoized_strings_after_a_failure(tmp_path, put, get):
    """The listing follows strings through the memo, whichever opcode stored and fetched them."""
    mod = _s("os") + put
    name = _s("system") + put.replace(b"7", b"8").replace(b"\x07", b"\x08")
    getm = get
    getn = get.replace(b"7", b"8").replace(b"\x07", b"\x08")
    p = tmp_path / "memo.pkl"
    p.write_bytes(b"\x80\x04" + mod + b"0" + name + b"0" + b"]}b0" + getm + getn + b"\x93.")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals


def test_stack_global_from_bytes_after_a_failure_is_unresolved(tmp_path):
    """Only text names a module: bytes pushed for STACK_GLOBAL give '<unresolved>', dangerous."""
    p = tmp_path / "bytes_sg.pkl"
    p.write_bytes(b"\x80\x04]}b0" + _bytes(b"os") + _bytes(b"system") + b"\x93.")
    res = scan_file(p)
    names = dict(res.globals)
    assert names.get("<unresolved>.<unresolved>") == "dangerous", names
    assert res.verdict == "dangerous"


def test_stack_global_from_memoize_after_a_failure(tmp_path):
    """Protocol 4's MEMOIZE stores the string just pushed (memo index = memo size)."""
    p = tmp_path / "memoize.pkl"
    p.write_bytes(b"\x80\x04" + _s("os") + b"\x940" + _s("system") + b"\x940" + b"]}b0" + b"h\x00h\x01\x93.")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals


def test_put_on_an_empty_stack_does_not_end_the_listing(tmp_path):
    """The machine fails at once (PUT with nothing pushed); the listing goes on to the GLOBAL."""
    p = tmp_path / "put_first.pkl"
    p.write_bytes(b"\x80\x02p0\ncos\nsystem\n0N.")
    res = scan_file(p)
    assert dict(res.globals).get("os.system") == "dangerous", res.globals


def test_mark_frame_and_proto_between_the_names_push_nothing(tmp_path):
    """MARK, FRAME and PROTO push no value: the listing still pairs 'os' with 'system'."""
    frame = b"\x95" + (20).to_bytes(8, "little")
    p = tmp_path / "frame.pkl"
    p.write_bytes(b"\x80\x04]}b0" + _s("os") + b"(" + frame + b"\x80\x04" + _s("system") + b"\x93.")
    res = scan_file(p)
    names = dict(res.globals)
    assert names.get("os.system") == "dangerous", names
    assert not any("<unresolved>" in n for n in names), names


def test_globals_after_a_failure_in_a_compressed_data_pkl(tmp_path):
    """A torch archive whose data.pkl is deflated (unpickled from memory, not from the file)
    fails part-way; the refusal still names os.system, found after the failure."""
    import zipfile

    p = tmp_path / "defl.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", FAIL + b"0cos\nsystem\n0N.", compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("archive/version", b"3\n")
    with pytest.raises(CorruptFile) as e, open_reader(p) as r:
        r.info()
    assert "BUILD on a list" in str(e.value)
    assert "it asks for os.system, which can run code (nothing was run)" in str(e.value), str(e.value)


def test_stack_global_with_too_few_names_pushed_is_listed_unresolved(tmp_path):
    """The listing pairs STACK_GLOBAL with the last two values pushed, whatever there is: nothing
    (both unresolved), or one name and a failed memo fetch (the module kept)."""
    p = tmp_path / "short.pkl"
    p.write_bytes(b"\x80\x04\x93cos\nsystem\n0N.")  # STACK_GLOBAL first: the machine underflows
    names = dict(scan_file(p).globals)
    assert names.get("<unresolved>.<unresolved>") == "dangerous", names
    assert names.get("os.system") == "dangerous", names
    p.write_bytes(b"\x80\x04" + _s("os") + b"h\x05\x93cos\nsystem\n0N.")  # BINGET of nothing: fails
    names = dict(scan_file(p).globals)
    assert names.get("os.<unresolved>") == "dangerous", names
    assert names.get("os.system") == "dangerous", names


def test_memoize_on_an_empty_stack_does_not_end_the_listing(tmp_path):
    p = tmp_path / "memoize_first.pkl"
    p.write_bytes(b"\x80\x04\x94cos\nsystem\n0N.")
    assert dict(scan_file(p).globals).get("os.system") == "dangerous"


def _newobj(module: str, name: str, args: bytes) -> bytes:
    """A protocol-2 pickle: NEWOBJ of module.name with the given argument-tuple opcodes."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + args + b"\x81."


@pytest.mark.parametrize(
    "module,name,args,expected",
    [
        # NEWOBJ of a class ckptctl rebuilds goes to its handler, like REDUCE does (pickle calls
        # cls.__new__(cls, *args)): a real set, a real OrderedDict, a torch.Size
        ("builtins", "set", b"(K\x01K\x02l\x85", {1, 2}),  # set([1, 2])
        ("builtins", "frozenset", b"(K\x03l\x85", frozenset({3})),
        ("collections", "OrderedDict", b")", {}),
    ],
)
def test_newobj_of_a_rebuilt_class_goes_to_its_handler(module, name, args, expected):
    from ckptctl.formats import pickles

    got = pickles.Machine(_newobj(module, name, args)).load()
    assert not isinstance(got, pickles.Opaque) and isinstance(got, type(expected)) and got == expected, got


def test_newobj_of_an_unknown_class_is_opaque_and_names_it():
    from ckptctl.formats import pickles

    got = pickles.Machine(_newobj("argparse", "Namespace", b")")).load()
    assert isinstance(got, pickles.Opaque) and got.type == "argparse.Namespace", got


def test_calling_an_opaque_object_is_opaque_with_its_arguments():
    """REDUCE on what an unknown class returned: recorded, never called (the type says so)."""
    from ckptctl.formats import pickles

    got = pickles.Machine(b"\x80\x02cargparse\nNamespace\n)RK\x01\x85R.").load()
    assert isinstance(got, pickles.Opaque)
    assert got.type == "argparse.Namespace(...)" and got.args == (1,)


def test_reduce_on_a_plain_value_names_what_it_is():
    from ckptctl.formats import pickles

    with pytest.raises(CorruptFile) as e:
        pickles.Machine(b"\x80\x02K\x01)R.").load()
    assert e.value.message == "malformed pickle: REDUCE calls a int"
