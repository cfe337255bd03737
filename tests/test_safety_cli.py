"""Dangerous pickles are reported by every command that lists them, and never run."""

from __future__ import annotations

import json

import numpy as np
from conftest import cli, run  # noqa: F401


# protocol-2 pickle: os.system("touch <marker>") via GLOBAL + REDUCE. Never unpickled here.
def _evil_pickle(marker) -> bytes:
    cmd = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little") + cmd + b"q\x01\x85q\x02Rq\x03."


def test_inspect_warns_once_naming_every_dangerous_call(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_evil_pickle(marker))
    p = run("inspect", evil)
    assert p.returncode == 0, p.stderr
    unsafe = [ln for ln in p.stderr.splitlines() if "UNSAFE" in ln]
    assert len(unsafe) == 1 and "os.system" in unsafe[0] and str(evil) in unsafe[0]
    assert "Traceback" not in p.stderr
    assert not marker.exists()
    # inspect succeeded (nothing was run): a warning, not an `error:` line with exit 0; -q keeps it
    assert unsafe[0].startswith("warning: ") and "error:" not in p.stderr
    q = run("inspect", evil, "-q")
    assert q.returncode == 0 and q.stderr.startswith("warning: ") and "UNSAFE" in q.stderr
    # scan is the command whose exit code reports the danger
    s = run("scan", evil)
    assert s.returncode == 1 and "UNSAFE" in s.stderr


def test_inspect_real_malicious_fixtures_warn_and_exit_0(real_dir):
    for name in ("modelscan_unsafe_zip_pytorch.pt", "picklescan_malicious0.pkl"):
        path = real_dir / "malicious" / name
        if not path.exists():
            continue
        p = run("inspect", path)
        assert p.returncode == 0, p.stderr
        lines = p.stderr.strip().splitlines()
        assert [ln for ln in lines if "UNSAFE" in ln][0].startswith("warning: "), p.stderr
        assert not any(ln.startswith("error:") for ln in lines), p.stderr


def test_ls_marks_unsafe_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    marker = tmp_path / "pwned"
    (tmp_path / "step_200.pt").write_bytes(_evil_pickle(marker))
    save_file({"w": np.ones(3, dtype=np.float32)}, tmp_path / "step_100.safetensors")
    r = cli("ls", tmp_path, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = {d["step"]: d for d in json.loads(r.stdout)}
    assert rows[200]["unsafe_globals"] == ["os.system"]
    assert rows[100]["unsafe_globals"] == []
    p = run("ls", tmp_path)
    line = next(ln for ln in p.stdout.splitlines() if "step_200.pt" in ln)
    assert "UNSAFE pickle: os.system" in line
    assert not marker.exists()
