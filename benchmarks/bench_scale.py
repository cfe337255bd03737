#!/usr/bin/env python
"""Benchmark ckptctl at mixture-of-experts scale: 10^5 tiny tensors (issue 13, item 6).

Generates, in a temporary folder (deleted at the end unless --keep):
  moe.safetensors   100k bf16 [2, 4] tensors named model.layers.{L}.mlp.experts.{0..255}.w{1,2,3}.weight
  moe.pt            the same dict saved with torch.save (torch zip)
  sharded/          the same tensors in 128 safetensors shards + model.safetensors.index.json
Then runs every candidate as a fresh process, IN TURNS (round 1: A, B, C, ...; round 2: A, B, C,
...), keeps the best of --repeat per candidate, and prints a markdown table of CPU seconds
(user + sys of the child, from getrusage), wall seconds and peak RSS. On a shared machine the
CPU seconds are the figure to trust: wall time includes waiting for other processes' cores.

    python benchmarks/bench_scale.py                       # 100k tensors, best of 3
    python benchmarks/bench_scale.py --tensors 20000 --repeat 2
    python benchmarks/bench_scale.py --before /path/to/other/src   # also an older ckptctl, in turns
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import record  # noqa: E402 - beside this file, on the path above

PY = sys.executable
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def names(n: int) -> list[str]:
    out = [
        f"model.layers.{layer}.mlp.experts.{e}.{w}.weight"
        for layer in range(max(1, n // 768))
        for e in range(256)
        for w in ("w1", "w2", "w3")
    ][:n]
    out += [f"model.extra.{i}.weight" for i in range(len(out), n)]
    return out


def write_safetensors(path: str, tensor_names: list[str]) -> None:
    """bf16 [2, 4] tensors (16 bytes each), header written by hand (no library needed)."""
    hdr: dict = {"__metadata__": {"format": "pt"}}
    for i, n in enumerate(tensor_names):
        hdr[n] = {"dtype": "BF16", "shape": [2, 4], "data_offsets": [16 * i, 16 * i + 16]}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(16 * len(tensor_names)))


def generate(d: str, n: int, shards: int) -> dict[str, str]:
    tn = names(n)
    paths = {
        "st": os.path.join(d, "moe.safetensors"),
        "pt": os.path.join(d, "moe.pt"),
        "sharded": os.path.join(d, "sharded"),
    }
    write_safetensors(paths["st"], tn)
    os.makedirs(paths["sharded"], exist_ok=True)
    per, wm = -(-n // shards), {}
    for s in range(shards):
        part = tn[s * per : (s + 1) * per]
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(paths["sharded"], fn), part)
        wm.update(dict.fromkeys(part, fn))
    with open(os.path.join(paths["sharded"], "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 16 * n}, "weight_map": wm}, f)
    listing = os.path.join(d, "names.json")
    with open(listing, "w") as f:
        json.dump(tn, f)
    subprocess.run(
        [
            PY,
            "-c",
            "import json, sys, torch\nn = json.load(open(sys.argv[2]))\n"
            "torch.save({k: torch.zeros(2, 4, dtype=torch.bfloat16) for k in n}, sys.argv[1])",
            paths["pt"],
            listing,
        ],
        check=True,
    )
    os.remove(listing)
    return paths


def candidates(p: dict[str, str], trees: dict[str, str]) -> list[tuple[str, list[str], dict]]:
    jobs = [
        ("inspect --format json, safetensors", ["inspect", p["st"], "-f", "json"]),
        ("inspect --format json, .pt", ["inspect", p["pt"], "-f", "json"]),
        ("inspect --format json, 128 shards", ["inspect", p["sharded"], "-f", "json"]),
        ("inspect (table), safetensors", ["inspect", p["st"]]),
        ("inspect (table), .pt", ["inspect", p["pt"]]),
        ("inspect (table), 128 shards", ["inspect", p["sharded"]]),
        ("ls of the 128-shard folder", ["ls", p["sharded"]]),
        ("diff --no-values safetensors vs .pt", ["diff", p["st"], p["pt"], "--no-values"]),
        ("diff --no-values safetensors vs shards", ["diff", p["st"], p["sharded"], "--no-values"]),
    ]
    out = []
    for label, args in jobs:
        for tree, src in trees.items():
            env = {**os.environ, "PYTHONPATH": src}
            out.append((f"{label}" + (f" [{tree}]" if len(trees) > 1 else ""), [PY, "-m", "ckptctl", *args], env))
    hdr = (
        "import json, struct, sys\nf = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]\n"
        "print(len(json.loads(f.read(n))))"
    )
    out.append(("reference: json.loads of the safetensors header", [PY, "-c", hdr, p["st"]], dict(os.environ)))
    out.append(
        (
            "reference: torch.load(mmap=True) of the .pt",
            [PY, "-c", "import sys, torch; print(len(torch.load(sys.argv[1], mmap=True, weights_only=True)))", p["pt"]],
            dict(os.environ),
        )
    )
    return out


def run_once(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(CPU seconds user+sys, wall seconds, peak RSS in MB) of one fresh process (os.wait4)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in (0, 1):  # diff exits 1 when the sides differ
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().decode()[-500:]}")
    return ru.ru_utime + ru.ru_stime, wall, ru.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each candidate runs once per round")
    ap.add_argument("--before", metavar="SRC", help="another ckptctl src/ folder, run in turns with this one")
    ap.add_argument("--only", help="run only candidates whose label contains this text")
    ap.add_argument("--dir", help="where to generate (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="ckptctl-scale-")
    os.makedirs(d, exist_ok=True)
    try:
        t = time.perf_counter()
        paths = generate(d, args.tensors, args.shards)
        print(f"generated {args.tensors:,} tensors in {time.perf_counter() - t:.1f} s under {d}", file=sys.stderr)
        trees = {"after": SRC} if not args.before else {"before": args.before, "after": SRC}
        cands = [c for c in candidates(paths, trees) if not args.only or args.only in c[0]]
        best: dict[str, list[float]] = {}
        for rnd in range(args.repeat):
            for label, cmd, env in cands:  # in turns: a noisy minute hits every candidate alike
                cpu, wall, rss = run_once(cmd, env)
                b = best.setdefault(label, [cpu, wall, rss])
                b[0], b[1], b[2] = min(b[0], cpu), min(b[1], wall), max(b[2], rss)
            print(f"round {rnd + 1}/{args.repeat} done", file=sys.stderr)
        print(
            f"\n{args.tensors:,} tensors ({args.shards} shards for the folder), best of {args.repeat} in turns, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores\n"
        )
        print("| job | CPU s (user+sys) | wall s | peak RSS MB |")
        print("|---|---:|---:|---:|")
        for label, _cmd, _env in cands:
            cpu, wall, rss = best[label]
            record("scale", label, "ckptctl" if "reference" not in label else "reference", wall, cpu, rss)
            print(f"| {label} | {cpu:.2f} | {wall:.2f} | {rss:.0f} |")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
