"""Shared test helpers: run the CLI in-process (CliRunner) and as a subprocess; real fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "fixtures" / "real"


def real_files() -> list[Path]:
    """Every file listed in ../shared/fixtures/real/MANIFEST.tsv (empty when the folder is absent)."""
    manifest = REAL / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    rows = manifest.read_text().splitlines()[1:]
    return [REAL / r.split("\t", 1)[0] for r in rows if r.strip()]


def real_manifest() -> dict[str, dict[str, str]]:
    manifest = REAL / "MANIFEST.tsv"
    if not manifest.is_file():
        return {}
    lines = manifest.read_text().splitlines()
    head = lines[0].split("\t")
    return {r.split("\t")[0]: dict(zip(head, r.split("\t"))) for r in lines[1:] if r.strip()}


needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/fixtures/real is absent")
REAL_ABSENT = "../shared/fixtures/real is absent"


def real_params(items, reason: str = REAL_ABSENT) -> list:
    """`items` for a parametrize over real fixtures, or, when there are none (../shared absent),
    one parameter skipped with `reason`: the test shows as skipped, it never silently vanishes."""
    items = list(items)
    return items or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


def real_expected() -> dict[str, dict[str, str]]:
    """tests/real_expected.tsv: per real fixture, the exit code and result inspect and convert
    must give (see the file's header)."""
    lines = [
        ln
        for ln in (REPO / "tests" / "real_expected.tsv").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    head = lines[0].split("\t")
    return {r.split("\t")[0]: dict(zip(head, r.split("\t"))) for r in lines[1:]}


@pytest.fixture
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is absent")
    return REAL


def cli(*args: str | os.PathLike, env: dict | None = None):
    """Run ckptctl in-process; returns click's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from ckptctl.cli import output
    from ckptctl.cli.app import app

    output.STATE.__init__()  # global flags do not leak between invocations
    runner = CliRunner()
    return runner.invoke(app, [os.fspath(a) for a in args], env=env, catch_exceptions=False)


def run(*args: str | os.PathLike, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m ckptctl` as a real process (exit codes, stderr, no tty)."""
    full_env = dict(os.environ)
    full_env.pop("CKPTCTL_DEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *[os.fspath(a) for a in args]],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def every_tensor(args: tuple) -> list:
    """`args` with `--all` after the command for inspect/convert/diff/average.

    Training checkpoints (optimizer state beside the model) show model weights by default; tests
    that compare with what the producer wrote (EXPECTED.json lists every variable, optimizer
    slots included) ask for every tensor.
    """
    args = list(args)
    if args and args[0] in ("inspect", "convert", "diff", "average") and "--all" not in args:
        args.insert(1, "--all")
    return args


# ---- remote storage on loopback (tests/test_remote.py) --------------------------------------
class CountingProxy:
    """A TCP relay on 127.0.0.1 in front of a server: counts connections and bytes sent back."""

    def __init__(self, port: int):
        import socket
        import threading

        self.target = port
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.bytes_down = self.bytes_up = self.connections = 0

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src, dst, way: str) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                with self._lock:
                    if way == "down":
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), behind a byte-counting proxy; stopped at the end.

    Yields (endpoint_url through the proxy, proxy). Clients find it through AWS_ENDPOINT_URL.
    """
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (dev extra)")
    pytest.importorskip("s3fs", reason="s3fs is not installed (dev extra)")
    # port 0: the kernel picks a free port as the server binds it. A port found free beforehand
    # can be taken by another process (another pytest-xdist worker) before the server binds it,
    # and then ThreadedMotoServer.start() waits forever for a server that never came up.
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    proxy = CountingProxy(port)
    try:
        yield f"http://127.0.0.1:{proxy.port}", proxy
    finally:
        proxy.close()
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_ENDPOINT_URL and dummy credentials pointing at the loopback S3 server."""
    url, proxy = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for v in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }


class RangeServer:
    """A real HTTP/1.1 server on 127.0.0.1 serving files under `root`, honouring Range.

    Counts requests and body bytes. `mode` switches behaviour for error tests: "normal",
    "ignore-range" (200 with the whole body), "slow" (sleeps before answering), "deny" (403),
    "reset" (ranged GETs for which `cut(path, start)` is true send half their body, then the
    connection is reset).
    """

    def __init__(self, root: Path):
        import http.server
        import threading
        import time

        srv = self
        self.root = Path(root)
        self.requests = 0
        self.bytes = 0
        self.mode = "normal"
        self.cut = lambda path, start: True  # which ranged GETs "reset" mode cuts
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _target(self):
                rel = self.path.split("?", 1)[0].lstrip("/")
                p = (srv.root / rel).resolve()
                if srv.root.resolve() not in p.parents or not p.is_file():
                    return None
                return p

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    try:
                        self.wfile.write(body)
                    except OSError:
                        return
                    with srv._lock:
                        srv.bytes += len(body)

            def _reset(self, body: bytes, start: int, end: int, size: int):
                import socket
                import struct

                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                with srv._lock:
                    srv.bytes += len(body) // 2
                self.close_connection = True
                self.connection.close()  # RST: linger 0

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                with srv._lock:
                    srv.requests += 1
                if srv.mode == "slow":
                    time.sleep(3)
                if srv.mode == "deny":
                    return self._send(403, b"forbidden", head=head)
                p = self._target()
                if p is None:
                    return self._send(404, b"not found", head=head)
                size = p.stat().st_size
                rng = self.headers.get("Range")
                if head:
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                    return
                if rng and srv.mode != "ignore-range" and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a)
                    end = min(int(b) if b else size - 1, size - 1)
                    if start >= size:
                        return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                    with open(p, "rb") as f:
                        f.seek(start)
                        body = f.read(end - start + 1)
                    if srv.mode == "reset" and srv.cut(self.path, start):
                        return self._reset(body, start, end, size)
                    return self._send(
                        206, body, {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"}
                    )
                if srv.mode == "ignore-range":  # stream the whole body like a server without Range
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    try:
                        with open(p, "rb") as f:
                            while chunk := f.read(1 << 16):
                                self.wfile.write(chunk)
                                with srv._lock:
                                    srv.bytes += len(chunk)
                    except OSError:
                        pass
                    return
                return self._send(200, p.read_bytes())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = 0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path):
    """A Range-honouring HTTP server on loopback over tmp_path/www; stopped after the test."""
    pytest.importorskip("aiohttp", reason="aiohttp is not installed (dev extra)")
    root = tmp_path / "www"
    root.mkdir()
    srv = RangeServer(root)
    try:
        yield srv
    finally:
        srv.close()


def s3_client(endpoint_url: str):
    """A boto3 client of the loopback S3 server (the producer's own client: tests upload with it
    and list what ckptctl left, never through ckptctl)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )


def s3_upload(endpoint_url: str, bucket: str, root: Path, prefix: str = "") -> None:
    """Every file under `root` to s3://bucket/prefix..., the bucket created if needed."""
    c = s3_client(endpoint_url)
    try:
        c.create_bucket(Bucket=bucket)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(root.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, prefix + p.relative_to(root).as_posix())
