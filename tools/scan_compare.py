"""Compare `ckptctl scan` with picklescan and modelscan on the same corpus.

    python tools/scan_compare.py [--corpus DIR] [--markdown]

The corpus: the real malicious fixtures (../shared/fixtures/real/malicious) plus the attack files
tests/test_scan_blind_spots.py builds (written to a temporary folder; nothing is ever loaded).
picklescan and modelscan are NOT dependencies of ckptctl: install them into the same venv
(`pip install picklescan modelscan`) to run this. Each tool runs as a subprocess per file;
a file counts as flagged when the tool's exit status says so (ckptctl scan: 1 with a dangerous
verdict; picklescan: 1 = dangerous globals found; modelscan: 1 = issues found).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "fixtures" / "real" / "malicious"


def ckptctl(path: Path) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "ckptctl", "scan", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        return json.loads(p.stdout)[0]["verdict"]
    except (ValueError, IndexError, KeyError):
        return f"exit {p.returncode}"


def _tool(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0])
    if not Path(exe).exists():
        return "not installed"
    p = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if p.returncode == 1:
        return "dangerous"
    if p.returncode == 0:
        return "clean"
    if "skipped" in out.lower() or "not supported" in out.lower():
        return "skipped"
    return f"error (exit {p.returncode})"


def picklescan(path: Path) -> str:
    return _tool(["picklescan", "-p", str(path)])


def modelscan(path: Path) -> str:
    exe = shutil.which("modelscan") or str(Path(sys.executable).parent / "modelscan")
    if not Path(exe).exists():
        return "not installed"
    p = subprocess.run([exe, "-p", str(path)], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if p.returncode == 1:
        return "dangerous"
    if "Total skipped:" in out:
        return "skipped" if p.returncode == 3 else "clean (some skipped)"
    return "clean" if p.returncode == 0 else f"error (exit {p.returncode})"


def build(dest: Path) -> list[Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from test_scan_blind_spots import build_corpus  # noqa: E402

    files = []
    if REAL.is_dir():
        for f in sorted(REAL.iterdir()):
            if f.is_file():
                shutil.copy(f, dest / f"real_{f.name}")
                files.append(dest / f"real_{f.name}")
    gen = dest / "generated"
    gen.mkdir()
    build_corpus(gen, gen / "MARKER")
    files += sorted(p for p in gen.iterdir() if p.name != "MARKER")
    # benign controls: a scanner that flags these has false positives
    import argparse
    import pickle

    import numpy as np
    import torch

    ok = dest / "benign"
    ok.mkdir()
    sd = {"w": torch.randn(8, 8), "b": torch.zeros(8, dtype=torch.bfloat16)}
    torch.save(sd, ok / "benign_zip.pt")
    torch.save(sd, ok / "benign_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, ok / "benign_namespace.pt")
    np.save(ok / "benign.npy", np.arange(10.0))
    np.savez(ok / "benign.npz", a=np.ones(3))
    (ok / "benign_dict.pkl").write_bytes(pickle.dumps({"step": 3, "loss": [1.0, 0.5]}, protocol=4))
    files += sorted(ok.iterdir())
    return files


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp))
        rows = [(f.name, ckptctl(f), picklescan(f), modelscan(f)) for f in files]
        if (Path(tmp) / "generated" / "MARKER").exists():
            print("a payload ran: MARKER exists", file=sys.stderr)
            return 2
    if args.markdown:
        print("| file | ckptctl scan | picklescan | modelscan |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = max(len(r[0]) for r in rows)
        for r in rows:
            print(f"{r[0]:<{w}}  {r[1]:<10} {r[2]:<14} {r[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
