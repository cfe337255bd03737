"""`ls` of run folders on object storage: the loopback moto S3 server and a Range HTTP
server from conftest.py (real servers, no client mocks).

- ls s3://bucket/run gives the same JSON as ls of the same folder on disk (paths aside), planned
  from one recursive listing plus header reads, and those reads run concurrently: a delaying
  proxy in front of the server counts the requests in flight at once.
- prune s3://bucket/run plans from listings only (dry run changes nothing), --yes deletes exactly
  the objects of the planned checkpoints, re-checks each object (size, ETag) first and skips a
  checkpoint whose object changed; --trash on remote storage is refused.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path


from conftest import cli, run
from run_builders import hf_run, st_run


def _client(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing-secret")


def _upload(env, bucket: str, root: Path, prefix: str) -> None:
    c = _client(env)
    try:
        c.create_bucket(Bucket=bucket)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(root.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, prefix + p.relative_to(root).as_posix())


def _keys(env, bucket: str, prefix: str) -> set[str]:
    c = _client(env)
    out: set[str] = set()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def _comparable(rows: list[dict], base: str) -> list[dict]:
    """ls JSON with the folder written as <RUN> and mtime left out (S3 LastModified is upload time)."""
    text = json.dumps(rows, sort_keys=True).replace(base.rstrip("/"), "<RUN>")
    out = json.loads(text)
    for r in out:
        r.pop("mtime")
    return out


# ---- ls ---------------------------------------------------------------------------------------
def test_ls_s3_same_json_as_local(s3_env, tmp_path):
    root = hf_run(tmp_path / "hf", steps=(10, 20, 30))  # checkpoint-N/ folders: prefixes on S3
    st_run(root, steps=(5, 6))  # plus loose step files with __metadata__ metrics
    _upload(s3_env, "runs-ls", root, "exp1/")
    local = cli("ls", "--format", "json", root)
    remote = cli("ls", "--format", "json", "s3://runs-ls/exp1")
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.stderr
    rows_l, rows_r = json.loads(local.stdout), json.loads(remote.stdout)
    assert [r["name"] for r in rows_r] == [r["name"] for r in rows_l]
    assert len(rows_r) == 5 and rows_r[0]["path"].startswith("s3://runs-ls/exp1/")
    assert _comparable(rows_r, "s3://runs-ls/exp1") == _comparable(rows_l, str(root))
    # the table too: same rows (the time column aside), totals on the last line
    tl = cli("ls", root).stdout.splitlines()
    tr = cli("ls", "s3://runs-ls/exp1").stdout.splitlines()
    assert [ln.split()[:3] for ln in tr] == [ln.split()[:3] for ln in tl]


def test_ls_s3_one_checkpoint_folder_and_missing(s3_env, tmp_path):
    root = hf_run(tmp_path / "hf", steps=(10, 20))
    _upload(s3_env, "runs-one", root, "r/")
    res = cli("ls", "--format", "json", "s3://runs-one/r/checkpoint-20")
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [(r["name"], r["step"], r["layout"]) for r in rows] == [("checkpoint-20", 20, "hf-trainer")]
    gone = run("ls", "s3://runs-one/nothing-here", env=s3_env)
    assert gone.returncode == 1 and gone.stdout == ""
    assert len(gone.stderr.strip().splitlines()) == 1 and "s3://runs-one/nothing-here" in gone.stderr
    assert "Traceback" not in gone.stderr


class DelayProxy:
    """A TCP relay that holds every request `delay` seconds before passing it on, and counts the
    requests in flight at once (sent by the client, not yet answered) and in all."""

    def __init__(self, target_port: int, delay: float):
        self.target, self.delay = target_port, delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            state = {"waiting": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, src, dst, state) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    if not state["waiting"]:
                        state["waiting"] = True
                        self.requests += 1
                        self.in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _down(self, src, dst, state) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    if state["waiting"]:
                        state["waiting"] = False
                        self.in_flight -= 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    @staticmethod
    def _close(*socks) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_ls_s3_header_reads_run_concurrently(s3_env, s3_server, tmp_path, monkeypatch):
    """40 checkpoints behind a proxy that delays every request: a serial ls would have one request
    in flight at a time; the header reads go out together (thread pool), so many are in flight at
    once, and the number of requests stays about one per checkpoint plus the listing."""
    n = 40
    root = st_run(tmp_path / "many", steps=tuple(range(1, n + 1)))
    _upload(s3_env, "runs-many", root, "big/")
    _url, counting = s3_server
    proxy = DelayProxy(int(_url.rsplit(":", 1)[1]), delay=0.05)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        res = cli("ls", "--format", "json", "s3://runs-many/big")
    finally:
        proxy.close()
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert all(r["num_params"] == 20 and r["error"] is None for r in rows)
    assert proxy.max_in_flight >= 4, proxy.max_in_flight  # serial: 1
    assert n <= proxy.requests <= 2 * n + 4, proxy.requests  # header reads (+ a HEAD or two) and the listing


def test_ls_https_folder_refused_file_listed(http_server, tmp_path):
    st_run(http_server.root / "run", steps=(7,))
    folder = run("ls", f"{http_server.url}/run/")
    assert folder.returncode != 0 and folder.stdout == ""
    lines = folder.stderr.strip().splitlines()
    assert len(lines) == 1 and "listing" in lines[0] and f"{http_server.url}/run" in lines[0], folder.stderr
    one = run("ls", "--format", "json", f"{http_server.url}/run/model_00000007.safetensors")
    assert one.returncode == 0, one.stderr
    rows = json.loads(one.stdout)
    assert [(r["step"], r["num_params"], r["metrics"]) for r in rows] == [(7, 20, {"eval_loss": 1.0})]
