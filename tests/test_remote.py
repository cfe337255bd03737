"""Remote checkpoints: s3:// against moto's S3 server and https:// against a Range-honouring HTTP
server, both real servers on loopback started by the fixtures in conftest.py (no client mocks).

Bytes on the wire are counted by a TCP proxy in front of moto and by the HTTP server itself, so
the header-only claim is measured, not assumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL, cli, real_files, run

TF = REAL.parent / "tensorflow"
MB = 1024 * 1024


def _client(env):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )


def _bucket(env, name: str):
    c = _client(env)
    try:
        c.create_bucket(Bucket=name)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    return c


def _upload(env, bucket: str, root: Path, prefix: str = "") -> None:
    c = _bucket(env, bucket)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, prefix + p.relative_to(root).as_posix())


def _inspect_json(target, env=None) -> tuple[int, dict | None, str]:
    res = cli("inspect", "--format", "json", "--all", target, env=env)
    doc = json.loads(res.stdout) if res.exit_code == 0 else None
    return res.exit_code, doc, res.stderr


def _strip(doc, local: str, remote: str):
    """The JSON with the remote URL prefix written as the local folder."""
    text = json.dumps(doc, sort_keys=True)
    return json.loads(text.replace(remote, local))


# ---- the real fixtures, remote == local ------------------------------------------------------
def _fixture_files() -> list[Path]:
    files = [f for f in real_files() if f.is_file()]
    if TF.is_dir():
        files += sorted(TF.glob("*.h5")) + sorted(TF.glob("keras3_modelcheckpoint/*.keras"))
    return files


@pytest.fixture(scope="module")
def fixtures_bucket(s3_server):
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is absent")
    env = {"AWS_ENDPOINT_URL": s3_server[0]}
    _upload(env, "fixtures", REAL, "real/")
    if TF.is_dir():
        _upload(env, "fixtures", TF, "tensorflow/")
    return "s3://fixtures"


def test_real_fixtures_inspect_same_over_s3(s3_env, fixtures_bucket):
    files = _fixture_files()
    assert len(files) > 20
    root = str(REAL.parent)
    compared = 0
    for f in files:
        rel = f.relative_to(REAL.parent).as_posix()
        url = f"{fixtures_bucket}/{rel}"
        code_l, doc_l, err_l = _inspect_json(f)
        code_r, doc_r, err_r = _inspect_json(url)
        assert code_r == code_l, (rel, err_r, err_l)
        if code_l == 0:
            assert _strip(doc_r, root, fixtures_bucket) == _strip(doc_l, root, root), rel
            compared += 1
        else:  # the same one-line error, naming the URL instead of the path
            assert err_r.replace(fixtures_bucket, root) == err_l, rel
    assert compared > 15
    # folders: the sharded safetensors folder and a torch zip folder, resolved by listing
    for rel in ("real/safetensors_sharded/fluxml",):
        code_l, doc_l, _ = _inspect_json(REAL.parent / rel)
        code_r, doc_r, err = _inspect_json(f"{fixtures_bucket}/{rel}")
        assert code_l == code_r == 0, err
        assert _strip(doc_r, root, fixtures_bucket) == _strip(doc_l, root, root)
        assert len(doc_r["tensors"]) == len(doc_l["tensors"]) > 5


def test_real_fixtures_inspect_same_over_https(http_server):
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is absent")
    import shutil

    shutil.copytree(REAL, http_server.root / "real")
    if TF.is_dir():
        shutil.copytree(TF, http_server.root / "tensorflow")
    root = str(http_server.root)
    seen: set[str] = set()  # one file per fixture folder (the S3 test above runs them all)
    files = []
    for f in _fixture_files():
        folder = f.parent.name + f.suffix
        if folder not in seen:
            seen.add(folder)
            files.append(http_server.root / f.relative_to(REAL.parent))
    assert len(files) >= 8
    for f in files:
        url = f"{http_server.url}/{f.relative_to(http_server.root).as_posix()}"
        code_l, doc_l, err_l = _inspect_json(f)
        code_r, doc_r, err_r = _inspect_json(url)
        assert code_r == code_l, (url, err_r, err_l)
        if code_l == 0:
            assert _strip(doc_r, root, http_server.url) == _strip(doc_l, root, root), url
    # a sharded checkpoint over https: name its index; shards come by URL beside it
    idx = "real/safetensors_sharded/fluxml/model.safetensors.index.json"
    code, doc, err = _inspect_json(f"{http_server.url}/{idx}")
    assert code == 0, err
    assert _strip(doc, root, http_server.url) == _strip(_inspect_json(http_server.root / idx)[1], root, root)


# ---- big checkpoints: header-only, counted on the wire ---------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~100 MB safetensors, ~100 MB .pt zip and a 2-shard ~100 MB safetensors folder, written by
    safetensors/torch themselves."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(1280, 1024, generator=g) for i in range(20)}  # 20 x 5 MiB
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    torch.save(sd, d / "model.pt")
    shard = d / "sharded"
    shard.mkdir()
    names = sorted(sd)
    wm = {}
    for k, part in enumerate((names[:10], names[10:])):
        fn = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, shard / fn, metadata={"format": "pt"})
        wm.update({n: fn for n in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d, sd


@pytest.fixture(scope="module")
def big_bucket(s3_server, big):
    env = {"AWS_ENDPOINT_URL": s3_server[0]}
    _upload(env, "big", big[0])
    return "s3://big"


@pytest.mark.parametrize("rel", ["model.safetensors", "model.pt", "sharded"])
def test_inspect_big_s3_reads_under_2mb(s3_env, s3_server, big, big_bucket, rel):
    proxy = s3_server[1]
    local = big[0] / rel
    size = sum(p.stat().st_size for p in ([local] if local.is_file() else local.iterdir()))
    assert size > 100 * MB
    proxy.reset()
    code, doc, err = _inspect_json(f"{big_bucket}/{rel}")
    assert code == 0, err
    assert len(doc["tensors"]) == 20
    assert doc == _strip(_inspect_json(local)[1], f"{big_bucket}/{rel}", str(local))
    assert 0 < proxy.bytes_down < 2 * MB, proxy.bytes_down


@pytest.mark.parametrize("rel", ["model.safetensors", "model.pt", "sharded/model.safetensors.index.json"])
def test_inspect_big_https_reads_under_2mb(http_server, big, rel):
    for p in big[0].rglob("*"):
        if p.is_file():
            dst = http_server.root / p.relative_to(big[0])
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)
    http_server.reset()
    code, doc, err = _inspect_json(f"{http_server.url}/{rel}")
    assert code == 0, err
    assert len(doc["tensors"]) == 20
    assert 0 < http_server.bytes < 2 * MB, http_server.bytes
    assert http_server.requests <= 24, (rel, http_server.requests)


# ---- values: diff and convert stream remote bytes exactly -----------------------------------
def test_convert_s3_pt_to_local_safetensors_bit_exact(s3_env, big, big_bucket, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "out.safetensors"
    res = cli("convert", f"{big_bucket}/model.pt", out)
    assert res.exit_code == 0, res.stderr
    got = load_file(out)
    sd = big[1]
    assert sorted(got) == sorted(sd)
    for k, t in sd.items():
        assert got[k].tobytes() == t.numpy().tobytes(), k


def test_convert_https_safetensors_to_local_pt_bit_exact(http_server, big, tmp_path):
    import torch

    os.link(big[0] / "model.safetensors", http_server.root / "model.safetensors")
    out = tmp_path / "out.pt"
    res = cli("convert", f"{http_server.url}/model.safetensors", out)
    assert res.exit_code == 0, res.stderr
    got = torch.load(out, weights_only=True)
    for k, t in big[1].items():
        assert torch.equal(got[k], t), k


def test_diff_remote_against_local(s3_env, big, big_bucket, tmp_path):
    from safetensors.torch import save_file

    # identical values: exit 0; one changed tensor: exit 1 and it is named
    res = cli("diff", f"{big_bucket}/model.safetensors", big[0] / "model.pt")
    assert res.exit_code == 0, res.stdout + res.stderr
    sd = dict(big[1])
    sd["layers.3.weight"] = sd["layers.3.weight"].clone()
    sd["layers.3.weight"][7, 7] += 1.0
    save_file(sd, tmp_path / "changed.safetensors")
    res = cli("diff", "--format", "json", f"{big_bucket}/sharded", tmp_path / "changed.safetensors")
    assert res.exit_code == 1, res.stderr
    assert "layers.3.weight" in res.stdout
    assert "layers.4.weight" not in json.dumps([r for r in json.loads(res.stdout).get("changed", [])])


def test_diff_no_values_and_scan_remote(s3_env, s3_server, big, big_bucket):
    proxy = s3_server[1]
    proxy.reset()
    res = cli("diff", "--no-values", f"{big_bucket}/model.safetensors", f"{big_bucket}/model.pt")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert proxy.bytes_down < 2 * MB
    res = cli("scan", f"{big_bucket}/model.pt")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "model.pt" in res.stdout


# ---- errors: one line naming the URL, exit 1, no traceback -----------------------------------
def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_errors_s3_missing_bucket_and_key(s3_env, big_bucket):
    res = run("inspect", "s3://no-such-bucket-xyz/model.safetensors", env=s3_env, timeout=60)
    assert res.returncode == 1
    line = _one_line(res)
    assert "no such bucket" in line and "s3://no-such-bucket-xyz" in line
    res = run("inspect", f"{big_bucket}/missing.safetensors", env=s3_env, timeout=60)
    assert res.returncode == 1
    line = _one_line(res)
    assert "s3://big/missing.safetensors" in line and "no such" in line


def test_secret_storage_option_never_printed(s3_env):
    secret = "SUPERSECRETkey-9f8e7d"
    res = run(
        "inspect",
        "--storage-option",
        f"secret={secret}",
        "--storage-option",
        "key=AKIAEXAMPLE",
        "s3://no-such-bucket-xyz/m.safetensors",
        env=s3_env,
        timeout=60,
    )
    assert res.returncode == 1
    assert secret not in res.stderr and secret not in res.stdout
    _one_line(res)
    # after the command too; an option the file system does not take is one line, exit 2
    res = run(
        "inspect",
        "s3://no-such-bucket-xyz/m.safetensors",
        "--storage-option",
        f"password={secret}",
        env=s3_env,
        timeout=60,
    )
    assert res.returncode in (1, 2)
    assert secret not in res.stderr and "Traceback" not in res.stderr


def test_errors_http_missing_denied_norange_timeout(http_server, big, tmp_path):
    os.link(big[0] / "model.safetensors", http_server.root / "model.safetensors")
    url = f"{http_server.url}/model.safetensors"
    res = cli("inspect", f"{http_server.url}/nothing.safetensors")
    assert res.exit_code == 1 and "no such object" in _one_line(res)

    http_server.mode = "deny"
    res = cli("inspect", url)
    assert res.exit_code == 1
    assert "access denied" in _one_line(res) and url in res.stderr

    # a server that ignores Range: what lies in the first block still reads (bounded: the rest of
    # the 200 body is never read); a read further in is refused, not downloaded whole
    os.link(big[0] / "model.pt", http_server.root / "model.pt")
    http_server.mode = "ignore-range"
    http_server.reset()
    res = cli("inspect", "--format", "json", url)
    assert res.exit_code == 0, res.stderr
    assert len(json.loads(res.stdout)["tensors"]) == 20
    res = cli("inspect", f"{http_server.url}/model.pt")  # the zip directory sits at the end
    assert res.exit_code == 1
    line = _one_line(res)
    assert "ignores HTTP Range" in line and f"{http_server.url}/model.pt" in line
    res = cli("convert", url, tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "ignores HTTP Range" in _one_line(res)
    assert not (tmp_path / "x.safetensors").exists()
    # the server pushes what the socket buffers take before the client hangs up; never a whole object
    assert http_server.bytes < 100 * MB, http_server.bytes

    http_server.mode = "slow"
    res = cli("inspect", url, env={"CKPTCTL_TIMEOUT": "0.5"})
    assert res.exit_code == 1
    line = _one_line(res)
    assert "timed out" in line and url.rsplit("/", 1)[0] in line


def test_missing_extra_and_remote_destination(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        res = cli("inspect", "gs://bucket/model.safetensors")
        assert res.exit_code == 1
        assert _one_line(res) == "error: gs:// needs the gcs extra: pip install 'ckptctl[gcs]'"
    from safetensors.numpy import save_file

    save_file({"a": np.arange(4, dtype=np.float32)}, tmp_path / "a.safetensors")
    res = cli("convert", tmp_path / "a.safetensors", "https://example.org/out.safetensors")
    assert res.exit_code == 2
    assert "https:// is read-only" in _one_line(res)
    # ls and prune on remote run folders: tests/test_runs_remote.py


def test_credentials_in_urls_never_printed(http_server):
    secret = "Zq8-SIGNATURE-7f3a"
    for url in (
        f"{http_server.url}/missing.safetensors?X-Amz-Signature={secret}&X-Amz-Expires=60",
        http_server.url.replace("http://", f"http://user:{secret}@") + "/missing.safetensors",
    ):
        res = cli("inspect", url)
        assert res.exit_code == 1
        line = _one_line(res)
        assert secret not in res.stderr and "***" in line, line


def test_tf_bundles_and_gguf_over_https_same_as_local(http_server):
    """TF bundles (index named, data shard by URL beside it) and GGUF over plain HTTPS (no listing):
    the same JSON as from the local copy."""
    import shutil

    jax = REAL.parent / "jax_gguf"
    if not (TF.is_dir() and jax.is_dir()):
        pytest.skip("../shared/fixtures/tensorflow or jax_gguf is absent")
    www = http_server.root
    shutil.copytree(TF / "tf2_manager_run", www / "tf")
    shutil.copy(jax / "tiny-llama.gguf", www / "m.gguf")
    for name in ("tf/ckpt-20.index", "tf/ckpt-20.data-00000-of-00001", "m.gguf"):
        code_l, doc_l, err_l = _inspect_json(www / name)
        code_r, doc_r, err_r = _inspect_json(f"{http_server.url}/{name}")
        assert code_l == code_r == 0, (name, err_l, err_r)
        assert _strip(doc_r, str(www), http_server.url) == _strip(doc_l, str(www), str(www)), name
