"""The fixture suites of ../shared/fixtures (real, tensorflow, jax_gguf) once more over loopback S3:
every file and folder is uploaded once per session to moto's S3 server (conftest.s3_server, behind a
byte-counting proxy), and `inspect`, `scan`, `diff --no-values` and `convert` must give the same
JSON (paths aside) and the same exit codes on the s3:// copy as on the local one. Converted values
are also checked against the producers' own sha256 in EXPECTED.json.

Then, per format that reads through the byte-source layer since issue 10 (TF bundles, GGUF, Orbax):
a checkpoint of tens of MB written by the producer's library (gguf-py, tensorstore, tests/tf_writer)
is inspected from S3 with the bytes on the wire counted (well under 2 MB), converted bit-exactly,
and the remote failures (missing key, a server that ignores Range, a connection reset half way) are
one line naming the URL, exit 1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL, cli, real_params, run, s3_client, s3_upload

FIXTURES = REAL.parent
SUITES = ("real", "tensorflow", "jax_gguf")
BUCKET = "suites"
MB = 1024 * 1024


# ---- helpers ------------------------------------------------------------------------------------
_client = s3_client
_upload = s3_upload


def _targets(suite: str) -> list[str]:
    """Every file of the suite's MANIFEST.tsv, every folder, and every TF checkpoint prefix (P of
    P.index, which names no file itself): paths relative to ../shared/fixtures."""
    root = FIXTURES / suite
    rows = (root / "MANIFEST.tsv").read_text().splitlines()[1:]
    out = {f"{suite}/{r.split(chr(9), 1)[0]}" for r in rows if r.strip()}
    for p in root.rglob("*"):
        if p.is_dir():
            out.add(p.relative_to(FIXTURES).as_posix())
    for rel in list(out):
        if rel.endswith(".index"):
            out.add(rel[: -len(".index")])
    return sorted(out)


def _same(text_remote: str, text_local: str) -> tuple[str, str]:
    """Both outputs with the remote URL root written as the local folder."""
    return text_remote.replace(f"s3://{BUCKET}", os.fspath(FIXTURES)), text_local


def _json(res) -> object:
    return json.loads(res.stdout) if res.stdout.strip() else None


def _compare(args_for, label: str) -> int:
    """Run the command on the local and the s3:// paths: same exit code, same stdout (JSON) and
    stderr once the URL root reads as the local folder. Returns the exit code."""
    loc = cli(*args_for(os.fspath(FIXTURES)))
    rem = cli(*args_for(f"s3://{BUCKET}"))
    assert rem.exit_code == loc.exit_code, (label, loc.stderr, rem.stderr)
    out_r, out_l = _same(rem.stdout, loc.stdout)
    if loc.exit_code in (0, 1) and out_l.strip().startswith(("{", "[")):
        assert json.loads(out_r) == json.loads(out_l), label
    else:
        assert out_r == out_l, label
    err_r, err_l = _same(rem.stderr, loc.stderr)
    assert err_r == err_l, label
    assert "Traceback" not in rem.stderr and "internal error" not in rem.stderr, (label, rem.stderr)
    return loc.exit_code


@pytest.fixture(scope="session")
def suites(s3_server) -> dict[str, bool]:
    """Every present suite uploaded once to s3://suites/<suite>/..."""
    present = {}
    for s in SUITES:
        root = FIXTURES / s
        present[s] = (root / "MANIFEST.tsv").is_file()
        if present[s]:
            _upload(s3_server[0], BUCKET, root, f"{s}/")
    return present


def _need(suites: dict, suite: str | None) -> str:
    if suite is None or not suites.get(suite):
        pytest.skip(f"../shared/fixtures/{suite} is absent")
    return suite


def _present() -> list[str]:
    return [s for s in SUITES if (FIXTURES / s / "MANIFEST.tsv").is_file()]


@functools.cache
def _units(suite: str) -> list[str]:
    """The targets that are one checkpoint (local inspect succeeds), for scan/diff/convert."""
    out = []
    for rel in _targets(suite):
        if cli("inspect", "--format", "json", FIXTURES / rel).exit_code == 0:
            out.append(rel)
    return out


# ---- the suites: remote == local -----------------------------------------------------------------
@pytest.mark.parametrize("suite", real_params(_present(), "../shared/fixtures is absent"))
def test_suite_inspect_same_over_s3(s3_env, suites, suite):
    _need(suites, suite)
    codes = {}
    for rel in _targets(suite):
        codes[rel] = _compare(lambda root, rel=rel: ("inspect", "--format", "json", "--all", f"{root}/{rel}"), rel)
    assert sum(1 for c in codes.values() if c == 0) >= 3, codes  # real checkpoints, not only errors
    if suite == "jax_gguf":  # the new formats in their natural shapes: a step folder, an item, a GGUF
        assert codes["jax_gguf/orbax_run/100"] == codes["jax_gguf/orbax_single"] == 0
        assert codes["jax_gguf/tiny-llama.gguf"] == 0
        assert codes["jax_gguf/orbax_run"] == 1  # a run folder: name one step
    if suite == "tensorflow":  # a folder with a `checkpoint` state file, a prefix, an index
        assert codes["tensorflow/tf2_manager_run"] == codes["tensorflow/tf2_manager_run/ckpt-10"] == 0
        assert codes["tensorflow/google_tftools/model-three-variables.ckpt.index"] == 0


@pytest.mark.parametrize("suite", real_params(_present(), "../shared/fixtures is absent"))
def test_suite_scan_and_diff_no_values_same_over_s3(s3_env, suites, suite):
    _need(suites, suite)
    units = _units(suite)
    assert len(units) >= 3
    for rel in units:
        _compare(lambda root, rel=rel: ("scan", "--format", "json", f"{root}/{rel}"), f"scan {rel}")
    # each checkpoint against the next one of the suite: changed shapes, names, dtypes and metadata.
    # Folders other than Orbax steps may also be runs locally (diff then aligns two runs step by
    # step): remote runs are the ls/prune work; `diff` reads a remote folder as the checkpoint it
    # names. Their files are compared here; the folders themselves in inspect/scan/convert.
    pairs = [u for u in units if not (FIXTURES / u).is_dir() or (FIXTURES / u / "_CHECKPOINT_METADATA").is_file()]
    codes = []
    for a, b in zip(pairs, pairs[1:] + pairs[:1]):
        codes.append(
            _compare(
                lambda root, a=a, b=b: (
                    "diff",
                    "--no-values",
                    "--all",
                    "--format",
                    "json",
                    f"{root}/{a}",
                    f"{root}/{b}",
                ),
                f"diff {a} {b}",
            )
        )
    assert 1 in codes  # some pairs differ (the comparison is not vacuous)


def _tensor_sha(path: Path) -> dict[str, str]:
    """sha256 of every tensor's stored bytes, from the safetensors layout itself (any dtype)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for k, v in header.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            out[k] = hashlib.sha256(raw[8 + n + a : 8 + n + b]).hexdigest()
    return out


@pytest.mark.parametrize("suite", real_params(_present(), "../shared/fixtures is absent"))
def test_suite_convert_same_over_s3(s3_env, suites, suite, tmp_path):
    """convert s3://... -> local safetensors: same exit code and the same bytes as from the local
    copy; for the TF/JAX/GGUF suites also the producers' sha256 of every tensor (EXPECTED.json)."""
    _need(suites, suite)
    expected = {}
    if (FIXTURES / suite / "EXPECTED.json").is_file():
        expected = json.loads((FIXTURES / suite / "EXPECTED.json").read_text())
    converted = checked = 0
    (tmp_path / "l").mkdir()
    (tmp_path / "r").mkdir()
    for i, rel in enumerate(_units(suite)):
        out_l, out_r = tmp_path / "l" / f"{i}.safetensors", tmp_path / "r" / f"{i}.safetensors"
        loc = cli("convert", "--all", FIXTURES / rel, out_l)
        rem = cli("convert", "--all", f"s3://{BUCKET}/{rel}", out_r)
        assert rem.exit_code == loc.exit_code, (rel, loc.stderr, rem.stderr)
        err_r = _same(rem.stderr, loc.stderr)[0].replace(os.fspath(tmp_path / "r"), os.fspath(tmp_path / "l"))
        assert err_r == loc.stderr, rel
        if loc.exit_code != 0:
            assert not out_r.exists(), rel
            continue
        converted += 1
        assert out_r.read_bytes() == out_l.read_bytes(), rel
        key = rel.split("/", 1)[1]
        want = expected.get(key) or expected.get(key.removesuffix(".index"))
        if want:
            got = _tensor_sha(out_r)
            for name, t in want.items():
                short = name.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
                if short in got and "sha256" in t:
                    assert got[short] == t["sha256"], (rel, name)
                    checked += 1
    assert converted >= 2
    if suite != "real":
        assert checked >= 10, checked


# ---- one large-ish checkpoint per new format: header-only on the wire, values bit-exact ------------
ROWS, COLS, LAYERS = 1024, 1024, 6  # 6 x 4 MiB float32 = 24 MiB per checkpoint


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.weight": rng.standard_normal((ROWS, COLS)).astype(np.float32) for i in range(LAYERS)}


@pytest.fixture(scope="session")
def big_new(tmp_path_factory, s3_server):
    """~24 MB each, written by the producers' libraries: a GGUF (gguf-py, with a 32k-token vocabulary
    in its header), a TF bundle (tests/tf_writer, TF's byte layout) and an Orbax OCDBT item
    (tensorstore, as Orbax writes it); uploaded to s3://bignew/. Returns (folder, arrays)."""
    gguf = pytest.importorskip("gguf", reason="gguf-py (dev extra) writes GGUF files")
    pytest.importorskip("tensorstore", reason="tensorstore (dev extra) writes OCDBT/Zarr")
    from test_orbax import ts_item
    from tf_writer import write_bundle

    d = tmp_path_factory.mktemp("bignew")
    arrays = _arrays(1)
    w = gguf.GGUFWriter(os.fspath(d / "model.gguf"), "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(32000)])
    for name, arr in arrays.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    write_bundle(d / "tf" / "ckpt-1", {f"{n}/.ATTRIBUTES/VARIABLE_VALUE": a for n, a in arrays.items()})
    ts_item(
        d / "orbax",
        {n.replace(".", "/"): a for n, a in arrays.items()},
        chunks={n.replace(".", "/"): [ROWS // 2, COLS] for n in arrays},
    )
    _upload(s3_server[0], "bignew", d)
    return d, arrays


NEW_FORMATS = {"gguf": "model.gguf", "tf-bundle": "tf/ckpt-1", "orbax": "orbax"}


def _name(fmt: str, name: str) -> str:
    return name.replace(".", "/") if fmt == "orbax" else name


@pytest.mark.parametrize("fmt", sorted(NEW_FORMATS))
def test_inspect_big_new_format_over_s3_reads_under_2mb(s3_env, s3_server, big_new, fmt):
    d, arrays = big_new
    rel = NEW_FORMATS[fmt]
    local = d / rel
    on_disk = sum(
        p.stat().st_size
        for p in d.rglob("*")
        if p.is_file() and (p == local or local in p.parents or p.name.startswith(local.name + "."))
    )
    assert on_disk > 20 * MB  # Orbax's zstd takes a little off random floats
    proxy = s3_server[1]
    proxy.reset()
    res = cli("inspect", "--format", "json", f"s3://bignew/{rel}")
    assert res.exit_code == 0, res.stderr
    down = proxy.bytes_down
    doc = json.loads(res.stdout)
    assert doc["format"] == fmt
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(_name(fmt, n) for n in arrays)
    assert all(t["shape"] == [ROWS, COLS] and t["dtype"] == "float32" for t in doc["tensors"])
    local_doc = json.loads(cli("inspect", "--format", "json", local).stdout)
    assert json.loads(res.stdout.replace("s3://bignew", os.fspath(d))) == local_doc
    print(f"\ninspect s3://bignew/{rel} ({fmt}): {down:,} bytes down of {on_disk:,} on disk")
    assert 0 < down < 2 * MB, down
    # diff --no-values of two remote ones of different formats reads headers only too
    proxy.reset()
    res = cli("diff", "--no-values", f"s3://bignew/{rel}", "s3://bignew/model.gguf")
    assert res.exit_code in ((0,) if fmt != "orbax" else (1,)), res.stdout + res.stderr  # orbax names: a/b
    assert proxy.bytes_down < 2 * MB, proxy.bytes_down


@pytest.mark.parametrize("fmt", sorted(NEW_FORMATS))
def test_convert_big_new_format_from_s3_bit_exact(s3_env, big_new, fmt, tmp_path):
    from safetensors.numpy import load_file

    arrays = big_new[1]
    out = tmp_path / "out.safetensors"
    res = cli("convert", f"s3://bignew/{NEW_FORMATS[fmt]}", out)
    assert res.exit_code == 0, res.stderr
    got = load_file(out)
    assert sorted(got) == sorted(_name(fmt, n) for n in arrays)
    for n, a in arrays.items():
        assert got[_name(fmt, n)].tobytes() == a.tobytes(), n
    # a value changed on one side: diff streams both from S3 and names that tensor only
    res = cli(
        "diff",
        "--format",
        "json",
        f"s3://bignew/{NEW_FORMATS[fmt]}",
        "s3://bignew/model.gguf",
        *(["--rename", r"/=."] if fmt == "orbax" else []),
    )
    assert res.exit_code == 0, res.stdout + res.stderr


# ---- errors for the new formats: one line naming the URL, exit 1 ------------------------------------
def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    return lines[0]


def _serve(http_server, big_new) -> None:
    d = big_new[0]
    for p in d.rglob("*"):
        if p.is_file():
            dst = http_server.root / p.relative_to(d)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)


def test_new_formats_missing_key_over_s3_and_https(s3_env, big_new, http_server, tmp_path):
    _serve(http_server, big_new)
    base = http_server.url
    r = run("inspect", "s3://bignew/nothing.gguf", env=s3_env)  # a real process: exit code, stderr
    assert r.returncode == 1 and r.stdout == ""
    assert "no such" in _one_line(r) and "s3://bignew/nothing.gguf" in r.stderr
    for url in (
        f"{base}/nothing.gguf",
        f"{base}/tf/ckpt-9.index",
        "s3://bignew/tf/ckpt-9",
        "s3://bignew/tf/ckpt-9.index",
    ):
        r = cli("inspect", url)
        assert r.exit_code == 1, (url, r.stderr)
        line = _one_line(r)
        assert "no such" in line and url.rsplit("/", 1)[0] in line, line
    # a TF index whose data shard is gone: the shard's URL is named
    os.unlink(http_server.root / "tf" / "ckpt-1.data-00000-of-00001")
    r = cli("inspect", f"{base}/tf/ckpt-1.index")
    assert r.exit_code == 1
    assert f"{base}/tf/ckpt-1.data-00000-of-00001" in _one_line(r) and "missing" in r.stderr
    # an Orbax item with one of its OCDBT data files deleted from the bucket
    c = _client(os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in c.list_objects_v2(Bucket="bignew", Prefix="orbax/")["Contents"]]
    _upload(os.environ["AWS_ENDPOINT_URL"], "orbaxgone", big_new[0] / "orbax")
    node = max((k for k in keys if "/d/" in k), key=lambda k: c.head_object(Bucket="bignew", Key=k)["ContentLength"])
    c.delete_object(Bucket="orbaxgone", Key=node.removeprefix("orbax/"))
    r = cli("convert", "s3://orbaxgone", tmp_path / "x.safetensors")
    assert r.exit_code == 1, r.stderr
    line = _one_line(r)
    assert "s3://orbaxgone" in line and "missing" in line, line
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("fmt", ["gguf", "tf-bundle"])
def test_new_formats_server_ignoring_range(http_server, big_new, fmt, tmp_path):
    """A server that answers every ranged GET with the whole object: header reads past the first
    block and every value read are refused in one line, never downloaded whole."""
    _serve(http_server, big_new)
    url = f"{http_server.url}/{'model.gguf' if fmt == 'gguf' else 'tf/ckpt-1.index'}"
    http_server.mode = "ignore-range"
    http_server.reset()
    r = run("convert", url, tmp_path / "x.safetensors")
    assert r.returncode == 1, r.stderr
    line = _one_line(r)
    assert "ignores HTTP Range" in line and http_server.url in line, line
    assert not (tmp_path / "x.safetensors").exists()
    assert http_server.bytes < 40 * MB, http_server.bytes  # what socket buffers take, not the object


@pytest.mark.parametrize("fmt", ["gguf", "tf-bundle"])
def test_new_formats_connection_reset_half_way(http_server, big_new, fmt, tmp_path):
    """The server cuts every value read half way (headers read fine): retried a bounded number of
    times, then one line naming the URL, exit 1, and no output file."""
    _serve(http_server, big_new)
    name = "model.gguf" if fmt == "gguf" else "tf/ckpt-1.index"
    url = f"{http_server.url}/{name}"
    r = run("inspect", url)
    assert r.returncode == 0, r.stderr
    http_server.mode = "reset"
    http_server.cut = (lambda path, start: start >= 4 * MB) if fmt == "gguf" else (lambda path, start: ".data-" in path)
    r = run("convert", url, tmp_path / "x.safetensors")
    assert r.returncode == 1, r.stderr
    line = _one_line(r)
    assert http_server.url in line and ("connection" in line or "cut" in line), line
    assert not (tmp_path / "x.safetensors").exists()
