"""Remote outputs: `convert ... s3://` and `average ... -o s3://` against moto's real S3 server on
loopback (conftest.s3_server, behind a byte-counting proxy), no client mocks.

Every output is downloaded with boto3 and read back with the producer's library (safetensors,
torch, h5py); bytes are compared with what that library writes or with the source tensors,
never with another ckptctl output. Failures are made real: processes SIGKILLed or interrupted at
a pause point (writeutil.pause_point) while a multipart upload is open, a verify that finds the
uploaded bytes changed, a missing bucket. After each, the bucket is listed: no object at DST, an
existing DST unchanged, and no pending multipart upload once a later write has run.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, run
from test_faults import Paused, _no_process_left  # noqa: F401 - the fixture kills what a test left running

BUCKET = "writes"
MB = 1024 * 1024


@pytest.fixture
def s3(s3_env):
    import boto3

    c = boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )
    try:
        c.create_bucket(Bucket=BUCKET)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", []):  # each test starts empty
        c.delete_object(Bucket=BUCKET, Key=o["Key"])
    for u in c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) or []:
        c.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
    return c


def keys(c) -> dict[str, int]:
    return {o["Key"]: o["Size"] for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def pending(c) -> list[str]:
    return [u["Key"] for u in c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) or []]


def get(c, key: str) -> bytes:
    return c.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def source(path: Path, mb: float = 2.0) -> dict:
    """A torch checkpoint of float32/float16/int64 tensors, `mb` MiB in all."""
    import torch

    g = torch.Generator().manual_seed(1)
    n = int(mb * MB / 4 / 3)
    sd = {
        "enc.weight": torch.randn(n, generator=g),
        "enc.bias": torch.randn(n, generator=g).half(),
        "dec.weight": torch.randn(n // 2, 2, generator=g),
        "step": torch.tensor([3, 4, 5]),
    }
    torch.save(sd, path)
    return sd


def same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert str(g.dtype) == str(w.dtype) and tuple(g.shape) == tuple(w.shape), k
        assert g.contiguous().numpy().tobytes() == w.contiguous().numpy().tobytes(), k


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---- every writer to s3:// ----------------------------------------------------------------------
def test_convert_to_s3_safetensors_is_the_reference_file(s3, tmp_path, s3_server):
    """The uploaded object is byte-identical to safetensors.torch.save_file's file of the same
    tensors, and only it is at DST (no temporary left beside it, no pending upload)."""
    from safetensors.torch import save_file

    sd = source(tmp_path / "m.pt", mb=40)  # several parts: a real multipart upload
    save_file(sd, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    proxy = s3_server[1]
    proxy.reset()
    res = run("-v", "convert", tmp_path / "m.pt", f"s3://{BUCKET}/out/model.safetensors")
    assert res.returncode == 0, res.stderr
    assert f"wrote s3://{BUCKET}/out/model.safetensors: 4 tensors" in res.stderr
    assert "verified 4 tensors bit-exact" in res.stderr
    size = (tmp_path / "ref.safetensors").stat().st_size
    # the bytes went up once (the copy to DST is server-side) and came down once (verify)
    up, down = proxy.bytes_up, proxy.bytes_down
    assert size <= up < size * 1.01 + 100_000
    assert size <= down < size * 1.01 + 100_000
    assert keys(s3) == {"out/model.safetensors": size}
    assert get(s3, "out/model.safetensors") == (tmp_path / "ref.safetensors").read_bytes()
    assert pending(s3) == []
    m = __import__("re").search(r"remote: ([\d,]+) bytes uploaded in (\d+) parts", res.stderr)
    from ckptctl.sources import UPLOAD_PART

    assert m and int(m.group(1).replace(",", "")) == size and int(m.group(2)) == -(-size // UPLOAD_PART) > 1


def test_convert_from_s3_downloads_the_source_once_and_verify_still_reads_the_output(
    s3, tmp_path, s3_server, monkeypatch
):
    """S3 -> local: verify checks the bytes on disk against the checksums of what came over the
    wire, so the source is downloaded once, not twice; a byte changed on disk after the write is
    still caught (verify reads the output, not its own report)."""
    from safetensors.torch import load_file

    sd = source(tmp_path / "m.pt", mb=24)
    s3.upload_file(str(tmp_path / "m.pt"), BUCKET, "in/m.pt")
    size = (tmp_path / "m.pt").stat().st_size
    proxy = s3_server[1]
    proxy.reset()
    res = run("convert", f"s3://{BUCKET}/in/m.pt", tmp_path / "out.safetensors")
    assert res.returncode == 0, res.stderr
    assert size * 0.95 < proxy.bytes_down < size * 1.2, (proxy.bytes_down, size)  # once, not twice
    same_tensors(load_file(tmp_path / "out.safetensors"), sd)

    # verify reads the file it wrote: damage it between write and verify, the convert fails
    from ckptctl.ops import convert_verify

    real = convert_verify.verify_output

    def damaged(plan, at=None, progress=None):
        target = Path(at or plan.dst)
        files = [target] if target.is_file() else sorted(target.rglob("*.safetensors"))
        with open(files[0], "r+b") as f:
            f.seek(-3, 2)
            b = f.read(1)
            f.seek(-3, 2)
            f.write(bytes([b[0] ^ 0x10]))
        return real(plan, at, progress)

    from ckptctl.ops import convert as convert_mod

    monkeypatch.setattr(convert_mod, "verify_output", damaged)
    res = cli("convert", f"s3://{BUCKET}/in/m.pt", tmp_path / "out2.safetensors")
    assert res.exit_code == 1, res.output
    assert "verify failed" in res.output and not (tmp_path / "out2.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pt", ".h5"])
def test_convert_to_s3_read_back_with_the_producer_library(s3, tmp_path, suffix):
    import torch

    sd = source(tmp_path / "m.pt", mb=20)
    res = run("convert", tmp_path / "m.pt", f"s3://{BUCKET}/model{suffix}")
    assert res.returncode == 0, res.stderr
    assert list(keys(s3)) == [f"model{suffix}"] and pending(s3) == []
    local = tmp_path / f"down{suffix}"
    s3.download_file(BUCKET, f"model{suffix}", str(local))
    if suffix == ".pt":
        got = torch.load(local, weights_only=True)
    else:
        import h5py

        with h5py.File(local, "r") as f:
            got = {}
            f.visititems(
                lambda n, o: got.__setitem__(n, torch.from_numpy(o[()])) if isinstance(o, h5py.Dataset) else None
            )
        got = {k.replace("/", "."): v for k, v in got.items()}
    same_tensors(got, sd)


def test_convert_to_s3_sharded_folder(s3, tmp_path):
    from safetensors.torch import load_file

    sd = source(tmp_path / "m.pt", mb=6)
    res = run("convert", tmp_path / "m.pt", f"s3://{BUCKET}/run/hf", "--max-shard-size", "3MB")
    assert res.returncode == 0, res.stderr
    got_keys = keys(s3)
    index = json.loads(get(s3, "run/hf/model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert set(got_keys) == {"run/hf/model.safetensors.index.json", *(f"run/hf/{s}" for s in shards)}
    got = {}
    for s in shards:
        (tmp_path / s).write_bytes(get(s3, f"run/hf/{s}"))
        part = load_file(tmp_path / s)
        assert all(index["weight_map"][k] == s for k in part)
        got.update(part)
    same_tensors(got, sd)
    assert pending(s3) == []


def test_average_to_s3_reads_remote_inputs(s3, tmp_path):
    """average of two objects on S3 into a third: the mean the test computes with numpy."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal(300_000).astype(np.float32), "n": np.array([1, 2], dtype=np.int64)}
    b = {"w": rng.standard_normal(300_000).astype(np.float32), "n": np.array([5, 6], dtype=np.int64)}
    for name, d in (("a", a), ("b", b)):
        save_file(d, tmp_path / f"{name}.safetensors")
        s3.upload_file(str(tmp_path / f"{name}.safetensors"), BUCKET, f"in/{name}.safetensors")
    res = run(
        "average",
        f"s3://{BUCKET}/in/a.safetensors",
        f"s3://{BUCKET}/in/b.safetensors",
        "-o",
        f"s3://{BUCKET}/avg.safetensors",
    )
    assert res.returncode == 0, res.stderr
    (tmp_path / "avg.safetensors").write_bytes(get(s3, "avg.safetensors"))
    got = load_file(tmp_path / "avg.safetensors")
    want = ((a["w"].astype(np.float64) + b["w"].astype(np.float64)) / 2).astype(np.float32)
    assert got["w"].tobytes() == want.tobytes()
    assert got["n"].tolist() == [5, 6]  # integers: copied from the last input
    assert set(keys(s3)) == {"in/a.safetensors", "in/b.safetensors", "avg.safetensors"}
    assert pending(s3) == []
    res = run(
        "average",
        f"s3://{BUCKET}/in/a.safetensors",
        f"s3://{BUCKET}/in/b.safetensors",
        "-o",
        f"s3://{BUCKET}/avg.safetensors",
    )
    assert res.returncode == 1 and "already exists (--force to overwrite)" in one_line(res.stderr)


# ---- failures: nothing at DST, an existing DST unchanged ----------------------------------------
def _existing(s3, key: str) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"the old object")
    return hashlib.sha256(get(s3, key)).hexdigest()


def test_killed_with_an_upload_open_then_the_next_write_cleans_up(s3, tmp_path, monkeypatch):
    """SIGKILL while a multipart upload is open (parts sent, not completed): DST keeps its old
    bytes; the unfinished upload and the local staged copy are the killed run's only traces, and
    the next write to the same DST removes both (its process is gone) and succeeds."""
    from safetensors.torch import load_file

    stage = tmp_path / "stage"
    stage.mkdir()
    monkeypatch.setenv("CKPTCTL_TMPDIR", str(stage))
    sd = source(tmp_path / "m.pt", mb=40)
    old = _existing(s3, "model.safetensors")
    p = Paused(["convert", "--force", tmp_path / "m.pt", f"s3://{BUCKET}/model.safetensors"], "upload-parts")
    assert len(pending(s3)) == 1  # the upload really is open while the process is stopped
    p.kill()
    assert hashlib.sha256(get(s3, "model.safetensors")).hexdigest() == old
    assert list(keys(s3)) == ["model.safetensors"]  # no half object anywhere
    assert len(list(stage.iterdir())) == 1
    res = run("convert", "--force", tmp_path / "m.pt", f"s3://{BUCKET}/model.safetensors")
    assert res.returncode == 0, res.stderr
    assert "(unfinished upload), left by an interrupted ckptctl run" in res.stderr
    assert pending(s3) == [] and list(keys(s3)) == ["model.safetensors"]
    assert list(stage.iterdir()) == []
    (tmp_path / "d.safetensors").write_bytes(get(s3, "model.safetensors"))
    same_tensors(load_file(tmp_path / "d.safetensors"), sd)


def test_killed_after_upload_before_copy_leaves_dst_alone(s3, tmp_path):
    """SIGKILL between the upload and the copy to DST (stage 'staged', before verify): the only
    thing left is the hidden temporary, which the next write removes; DST is untouched."""
    source(tmp_path / "m.pt", mb=2)
    old = _existing(s3, "m.safetensors")
    p = Paused(["convert", "--force", tmp_path / "m.pt", f"s3://{BUCKET}/m.safetensors"], "staged")
    tmp = [k for k in keys(s3) if k != "m.safetensors"]
    assert len(tmp) == 1 and tmp[0].startswith(".m.safetensors.ckptctl-tmp-")
    p.kill()
    assert hashlib.sha256(get(s3, "m.safetensors")).hexdigest() == old
    res = run("convert", "--force", tmp_path / "m.pt", f"s3://{BUCKET}/m.safetensors")
    assert res.returncode == 0, res.stderr
    assert f"note: removed s3://{BUCKET}/{tmp[0]}, left by an interrupted ckptctl run" in res.stderr
    assert list(keys(s3)) == ["m.safetensors"] and pending(s3) == []
    assert hashlib.sha256(get(s3, "m.safetensors")).hexdigest() != old


def test_interrupted_upload_is_aborted(s3, tmp_path):
    """Ctrl-C (SIGINT) while parts are up: the process aborts its own multipart upload, exit 130."""
    source(tmp_path / "m.pt", mb=40)
    p = Paused(["convert", tmp_path / "m.pt", f"s3://{BUCKET}/m.safetensors"], "upload-parts")
    assert len(pending(s3)) == 1
    p.p.send_signal(signal.SIGINT)
    res = p.resume()
    assert res.returncode == 130, res.stderr
    assert one_line(res.stderr.split("paused at upload-parts", 1)[1]) == "error: interrupted"
    assert pending(s3) == [] and keys(s3) == {}


def test_average_interrupted_leaves_nothing(s3, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        save_file({"w": rng.standard_normal(6 * MB).astype(np.float32)}, tmp_path / f"{name}.safetensors")
    old = _existing(s3, "avg.safetensors")
    p = Paused(
        [
            "average",
            "--force",
            tmp_path / "a.safetensors",
            tmp_path / "b.safetensors",
            "-o",
            f"s3://{BUCKET}/avg.safetensors",
        ],
        "upload-parts",
    )
    assert len(pending(s3)) == 1
    p.p.send_signal(signal.SIGINT)
    res = p.resume()
    assert res.returncode == 130, res.stderr
    assert pending(s3) == [] and list(keys(s3)) == ["avg.safetensors"]
    assert hashlib.sha256(get(s3, "avg.safetensors")).hexdigest() == old


def test_verify_reads_the_remote_bytes_and_a_mismatch_leaves_dst_alone(s3, tmp_path):
    """Between upload and verify the uploaded temporary is changed behind ckptctl's back (one
    byte of tensor data flipped): verify, which re-reads the remote object, fails in one line;
    nothing reaches DST and the temporary is gone."""
    source(tmp_path / "m.pt", mb=2)
    old = _existing(s3, "m.safetensors")
    p = Paused(["convert", "--force", tmp_path / "m.pt", f"s3://{BUCKET}/m.safetensors"], "staged")
    (tmp,) = [k for k in keys(s3) if k != "m.safetensors"]
    data = bytearray(get(s3, tmp))
    data[-5] ^= 0x40
    s3.put_object(Bucket=BUCKET, Key=tmp, Body=bytes(data))
    res = p.resume()
    assert res.returncode == 1, res.stderr
    line = one_line(res.stderr.split("paused at staged", 1)[1])
    assert line.startswith(f"error: s3://{BUCKET}/m.safetensors: verify failed: tensor ")
    assert "differs from the source at byte" in line
    assert list(keys(s3)) == ["m.safetensors"] and pending(s3) == []
    assert hashlib.sha256(get(s3, "m.safetensors")).hexdigest() == old


# ---- one-line errors, no secrets ----------------------------------------------------------------
def test_missing_bucket_is_one_line_and_secrets_stay_hidden(s3, tmp_path):
    source(tmp_path / "m.pt", mb=0.1)
    secret = "S3cr3t-Value-9431"
    res = run(
        "-v",
        "convert",
        tmp_path / "m.pt",
        "s3://no-such-bucket-x/m.safetensors",
        "--storage-option",
        f"secret={secret}",
        "--storage-option",
        "key=testing",
        env={"AWS_SECRET_ACCESS_KEY": "testing-secret"},
    )
    assert res.returncode == 1
    assert one_line(res.stderr) == "error: s3://no-such-bucket-x: no such bucket"
    assert secret not in res.stderr + res.stdout and "testing-secret" not in res.stderr + res.stdout
    res = run("average", tmp_path / "m.pt", tmp_path / "m.pt", "-o", "s3://no-such-bucket-x/a.safetensors")
    assert res.returncode == 1 and one_line(res.stderr) == "error: s3://no-such-bucket-x: no such bucket"


@pytest.mark.parametrize(
    "url,why",
    [
        ("https://example.org/m.safetensors", "https:// is read-only"),
        ("hf://user/repo/m.safetensors", "does not write to hf://"),
    ],
)
def test_read_only_protocols_are_refused(tmp_path, url, why):
    source(tmp_path / "m.pt", mb=0.1)
    res = run("convert", tmp_path / "m.pt", url)
    assert res.returncode == 2
    assert why in one_line(res.stderr)
    res = run("average", tmp_path / "m.pt", tmp_path / "m.pt", "-o", url)
    assert res.returncode == 2 and why in one_line(res.stderr)


def test_existing_dst_needs_force_and_source_is_not_dst(s3, tmp_path):
    from safetensors.torch import save_file

    save_file(source(tmp_path / "m.pt", mb=0.1), tmp_path / "m.safetensors")
    s3.upload_file(str(tmp_path / "m.safetensors"), BUCKET, "m.safetensors")
    old = hashlib.sha256(get(s3, "m.safetensors")).hexdigest()
    res = cli("convert", tmp_path / "m.pt", f"s3://{BUCKET}/m.safetensors")
    assert res.exit_code == 1 and "already exists (--force to overwrite)" in res.stderr
    res = cli("convert", f"s3://{BUCKET}/m.safetensors", f"s3://{BUCKET}/m.safetensors", "--force")
    assert res.exit_code == 2 and "is the source" in res.stderr
    assert hashlib.sha256(get(s3, "m.safetensors")).hexdigest() == old


# ---- the upload itself: parts, memory bound ------------------------------------------------------
def test_upload_sends_bounded_parts_in_order(s3, monkeypatch):
    """Upload with 5 MiB parts: the object is the bytes written, in order, in ceil(n/5 MiB)
    parts, and never more than UPLOAD_IN_FLIGHT + 1 parts are held at once."""
    from ckptctl import sources

    monkeypatch.setattr(sources.upload, "UPLOAD_PART", 5 * MB)  # read by Upload in its own module
    sources.configure([])
    import threading

    lock = threading.Lock()
    state = {"now": 0, "max": 0, "parts": 0}
    real = sources.Upload._upload_part

    def spy(self, number, data):
        with lock:
            state["now"] += 1
            state["parts"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            return real(self, number, data)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(sources.Upload, "_upload_part", spy)
    rng = np.random.default_rng(3)
    blob = rng.integers(0, 256, 23 * MB + 17, dtype=np.uint8).tobytes()
    up = sources.Upload(f"s3://{BUCKET}/blob")
    for i in range(0, len(blob), 3 * MB + 1):  # writes that do not line up with parts
        up.write(blob[i : i + 3 * MB + 1])
    assert pending(s3) == ["blob"] and "blob" not in keys(s3)
    up.complete()
    assert get(s3, "blob") == blob
    assert state["parts"] == 5 and 1 <= state["max"] <= sources.UPLOAD_IN_FLIGHT
    assert pending(s3) == []
