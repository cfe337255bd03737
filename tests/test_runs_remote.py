"""`ls` and `prune` of run folders on object storage: the loopback moto S3 server and a Range HTTP
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

from conftest import cli, run, s3_client, s3_upload
from run_builders import hf_run, st_run


def _client(env):
    return s3_client(env["AWS_ENDPOINT_URL"])


def _upload(env, bucket: str, root: Path, prefix: str) -> None:
    s3_upload(env["AWS_ENDPOINT_URL"], bucket, root, prefix)


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


# ---- prune ------------------------------------------------------------------------------------
def _hf_bucket(env, tmp_path, bucket: str, steps=(100, 200, 300, 400, 500)):
    root = hf_run(tmp_path / bucket, steps=steps, save_best=False)
    (root / "README.md").write_text("not a checkpoint\n")
    _upload(env, bucket, root, "run/")
    return root


def test_prune_s3_dry_run_then_yes_deletes_exactly_the_planned(s3_env, tmp_path):
    root = _hf_bucket(s3_env, tmp_path, "prune-a")
    before = _keys(s3_env, "prune-a", "run/")
    per_ckpt = {s: {k for k in before if k.startswith(f"run/checkpoint-{s}/")} for s in (100, 200, 300, 400, 500)}
    assert all(len(v) >= 2 for v in per_ckpt.values())  # model, trainer_state, optimizer ...
    dry = run("prune", "s3://prune-a/run", "--keep-last", "3", "--min-age", "0", "--format", "json", env=s3_env)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True
    assert sorted(d["step"] for d in plan["checkpoints"] if d["action"] == "delete") == [100, 200]
    assert _keys(s3_env, "prune-a", "run/") == before  # nothing touched
    yes = run("prune", "s3://prune-a/run", "--keep-last", "3", "--min-age", "0", "--yes", env=s3_env)
    assert yes.returncode == 0, yes.stderr
    left = _keys(s3_env, "prune-a", "run/")
    assert left == before - per_ckpt[100] - per_ckpt[200]
    assert "run/README.md" in left
    assert sorted(root.iterdir())  # the local copy is not involved


def test_prune_s3_changed_object_is_skipped(s3_env, tmp_path, monkeypatch):
    """An object rewritten between the plan and the deletion (same key, other bytes) is not
    deleted: its checkpoint is skipped with one line, the others go."""
    _hf_bucket(s3_env, tmp_path, "prune-b")
    before = _keys(s3_env, "prune-b", "run/")
    from ckptctl import sources
    from ckptctl.ops import prune as pr
    from ckptctl.ops.runs import scan_run

    sources.configure([])
    runs = [scan_run(sources.as_path("s3://prune-b/run"))]
    plan = pr.make_plan(runs, pr.Policy(keep_last=2, min_age=0.0))
    assert sorted(d.ckpt.step for d in plan.to_delete) == [100, 200, 300]
    _client(s3_env).put_object(
        Bucket="prune-b", Key="run/checkpoint-200/trainer_state.json", Body=b'{"global_step": 200}'
    )
    outcome = pr.execute(plan)
    assert sorted(d.ckpt.step for d in outcome.done) == [100, 300]
    assert [d.ckpt.step for d in outcome.skipped] == [200]
    assert "checkpoint-200/trainer_state.json changed since the plan was made" in outcome.skipped_messages[0]
    left = _keys(s3_env, "prune-b", "run/")
    gone = {k for k in before if k.startswith(("run/checkpoint-100/", "run/checkpoint-300/"))}
    assert before - left == gone


def test_prune_s3_changed_object_cli_one_line_exit_1(s3_env, tmp_path, monkeypatch):
    _hf_bucket(s3_env, tmp_path, "prune-c", steps=(1, 2, 3))
    from ckptctl.ops import prune_execute as pr  # where _verify_remote lives and is called

    real_verify = pr._verify_remote

    def change_then_verify(d):  # the object changes right after the plan, before the re-check
        if d.ckpt.step == 1:
            _client(s3_env).put_object(Bucket="prune-c", Key="run/checkpoint-1/model.safetensors", Body=b"x" * 10)
        return real_verify(d)

    monkeypatch.setattr(pr, "_verify_remote", change_then_verify)
    res = cli("prune", "s3://prune-c/run", "--keep-last", "1", "--min-age", "0", "--yes")
    assert res.exit_code == 1
    skipped = [ln for ln in res.stderr.splitlines() if "changed since the plan was made" in ln]
    assert len(skipped) == 1 and "checkpoint-1/model.safetensors" in skipped[0]
    left = _keys(s3_env, "prune-c", "run/")
    assert any(k.startswith("run/checkpoint-1/") for k in left)  # skipped: all its objects stay
    assert not any(k.startswith("run/checkpoint-2/") for k in left)
    assert any(k.startswith("run/checkpoint-3/") for k in left)


def test_prune_s3_trash_refused(s3_env, tmp_path):
    _hf_bucket(s3_env, tmp_path, "prune-d", steps=(1, 2))
    before = _keys(s3_env, "prune-d", "run/")
    res = run(
        "prune",
        "s3://prune-d/run",
        "--keep-last",
        "1",
        "--min-age",
        "0",
        "--yes",
        "--trash",
        str(tmp_path / "trash"),
        env=s3_env,
    )
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--trash" in res.stderr
    assert _keys(s3_env, "prune-d", "run/") == before
    assert not (tmp_path / "trash").exists()


# ---- run folders in the other commands ------------------------------------------------------------
def test_average_of_an_s3_run_folder_is_the_mean_of_its_last_checkpoints(s3_env, tmp_path):
    """`average s3://bucket/run --last 2` picks the run's last two checkpoints from the listing and
    writes their mean: checked against numpy's float64 mean of the tensors safetensors reads."""
    import numpy as np
    from safetensors.numpy import load_file

    root = hf_run(tmp_path / "hf", steps=(10, 20, 30))
    _upload(s3_env, "runs-avg", root, "exp/")
    out = tmp_path / "avg.safetensors"
    res = run("average", "s3://runs-avg/exp", "--last", "2", "-o", out)
    assert res.returncode == 0, res.stderr
    got = load_file(out)
    a = load_file(root / "checkpoint-20" / "model.safetensors")
    b = load_file(root / "checkpoint-30" / "model.safetensors")
    assert set(got) == set(a)
    for k, v in a.items():
        if v.dtype.kind == "f":
            want = ((v.astype(np.float64) + b[k].astype(np.float64)) / 2).astype(v.dtype)
            assert got[k].tobytes() == want.tobytes(), k
        else:
            assert got[k].tobytes() == b[k].tobytes(), k  # integers: copied from the last input


def test_diff_of_two_s3_runs_pairs_their_steps_as_locally(s3_env, tmp_path):
    """`diff s3://.../a s3://.../b` compares the runs step by step, with the same verdicts and
    exit code as the same folders on disk (one step's weights changed in run b)."""
    import torch
    from safetensors.torch import load_file, save_file

    a = hf_run(tmp_path / "a", steps=(10, 20))
    b = hf_run(tmp_path / "b", steps=(10, 20))
    sd = load_file(b / "checkpoint-20" / "model.safetensors")
    name = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[name] = sd[name] + torch.ones_like(sd[name])
    save_file(sd, b / "checkpoint-20" / "model.safetensors", metadata={"format": "pt"})
    _upload(s3_env, "runs-diff", a, "a/")
    _upload(s3_env, "runs-diff", b, "b/")
    local = run("diff", "--format", "json", a, b)
    remote = run("diff", "--format", "json", "s3://runs-diff/a", "s3://runs-diff/b")
    assert local.returncode == remote.returncode == 1, remote.stderr
    steps_l = {s["step"]: (s["equal"], s["num_changed"]) for s in json.loads(local.stdout)["steps"]}
    steps_r = {s["step"]: (s["equal"], s["num_changed"]) for s in json.loads(remote.stdout)["steps"]}
    assert steps_r == steps_l == {10: (True, 0), 20: (False, 1)}
