#!/usr/bin/env python
"""Benchmark `ckptctl convert` against `cp` of the same file and the naive load-everything way.

Generates a ~4 GB fp32 `.pt` with torch.save (7 tensors of 500 MB plus 100 of 5 MB by
default: the largest tensor is 1/8 of the file) and its safetensors twin under /tmp, then
runs each candidate as a fresh process and prints a markdown table of wall time, peak RSS
(/usr/bin/time) and throughput relative to `cp` measured in the same run (cp time / time:
1.0 = as fast as cp). Candidates take turns (one run each, --repeat rounds) and the best is
kept, so a slow spell of a shared disk does not land on one candidate. Outputs are deleted
after each run and `sync` runs before each one, so a run does not pay for an earlier run's
writeback; the data is deleted at the end.

    python benchmarks/bench_convert.py                  # 4 GB
    python benchmarks/bench_convert.py --size-gb 0.5    # quick
    python benchmarks/bench_convert.py --only pt-st,cast

Note: ckptctl fsyncs its output before renaming it into place (and verifies it by default,
while that fsync runs); `cp` does neither, so `cp + sync` is shown too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PY = sys.executable
CKPTCTL = [PY, "-m", "ckptctl", "-q"]
TIME = shutil.which("time", path="/usr/bin:/bin")

NAIVE = {
    "pt-st": "import torch; from safetensors.torch import save_file; "
             "save_file(torch.load({src!r}, weights_only=True), {dst!r})",
    "st-pt": "import torch; from safetensors.torch import load_file; torch.save(load_file({src!r}), {dst!r})",
    "pt-h5": "import torch, h5py\nsd = torch.load({src!r}, weights_only=True)\n"
             "with h5py.File({dst!r}, 'w') as f:\n    for k, v in sd.items(): f[k] = v.numpy()",
    "cast": "import torch; from safetensors.torch import save_file; "
            "save_file({{k: v.to(torch.bfloat16) for k, v in torch.load({src!r}, weights_only=True).items()}}, {dst!r})",
}
JOBS = [  # (key, title, source, output name, extra ckptctl args)
    ("pt-st", "`.pt` → safetensors", "pt", "out.safetensors", []),
    ("st-pt", "safetensors → `.pt`", "st", "out.pt", []),
    ("pt-h5", "`.pt` → `.h5`", "pt", "out.h5", []),
    ("cast", "`.pt` → safetensors, cast to bf16", "pt", "out_bf16.safetensors", ["--dtype", "bf16"]),
    ("tf-st", "TF bundle → safetensors", "tf", "out_tf.safetensors", []),
]

GENERATE = """
import sys, torch
from safetensors.torch import save_file
big, small, big_n, small_n, pt, st = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
g = torch.Generator().manual_seed(0)
sd = {}
for i in range(big_n):
    sd[f"layers.{i}.mlp.weight"] = torch.randn(big // 4096, 1024, generator=g)
for i in range(small_n):
    sd[f"layers.{i}.norm.weight"] = torch.randn(small // 4, generator=g)
torch.save(sd, pt)
save_file(sd, st, metadata={"format": "pt"})
"""


def write_tf_from_safetensors(st: str, prefix: str) -> list[str]:
    """The same tensors as a TF bundle (tests/tf_writer.py, streamed from the safetensors file,
    CRC32C of each tensor computed as TF does), TF 2 object-based keys."""
    import struct

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tf_writer import write_bundle_streaming

    with open(st, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    specs = [(f"model/{k.replace('.', '/')}/.ATTRIBUTES/VARIABLE_VALUE", "float32", tuple(v["shape"]),
              (st, 8 + n + v["data_offsets"][0]))
             for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
    return [str(p) for p in write_bundle_streaming(prefix, specs)]


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit code, last stderr line) of one fresh process."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        full = [TIME, "-q", "-f", "%M", "-o", rss.name, *cmd] if TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        kb = ru.ru_maxrss
        if TIME:
            text = open(rss.name).read().split()
            kb = int(text[-1]) if text and text[-1].isdigit() else kb
    return wall, kb / 1024, os.waitstatus_to_exitcode(status), lines[-1] if lines else ""


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def round_robin(runs: list[tuple[str, list[str], str, int]]) -> list[tuple[str, dict]]:
    """Each candidate (name, command, output, runs) run in turns (cp, cp + sync, convert, ...,
    cp, ...), so a slow spell of the disk is shared by every candidate rather than charged to
    one; per candidate, the best wall time and the highest peak RSS, or its first failure."""
    done: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in runs}
    failed: dict[str, dict] = {}
    for rep in range(max(n for *_, n in runs)):
        for name, cmd, out, n in runs:
            if rep >= n or name in failed:
                continue
            remove(out)
            subprocess.run(["sync"], check=False)  # no writeback of an earlier run in this one's time
            wall, rss, code, last = measure(cmd)
            remove(out)
            if code != 0:
                failed[name] = {"ok": False, "error": last[:120]}
            else:
                done[name].append((wall, rss))
    return [(name, failed.get(name) or {"ok": True, "wall": min(w for w, _ in done[name]),
                                        "rss": max(r for _, r in done[name])}) for name, *_ in runs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size in GB (default 4)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per candidate (the naive baseline runs once); best wall time kept (default 3)")
    ap.add_argument("--only", default="", help="comma-separated jobs: " + ",".join(j[0] for j in JOBS))
    ap.add_argument("--no-naive", action="store_true", help="skip the naive load-everything baselines")
    ap.add_argument("--dir", default=None, help="where to put the data (default: a new folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args()

    folder = args.dir or tempfile.mkdtemp(prefix="ckptctl-bench-convert-", dir="/tmp")
    os.makedirs(folder, exist_ok=True)
    pt, st = os.path.join(folder, "src.pt"), os.path.join(folder, "src.safetensors")
    total = int(args.size_gb * 1e9)
    big = total // 8 // 4096 * 4096  # the largest tensor: 1/8 of the file
    big_n, small_n = 7, 100
    small = max(4, (total - big_n * big) // small_n // 4 * 4)
    try:
        if not (os.path.exists(pt) and os.path.exists(st)):
            print(f"generating {total / 1e9:.1f} GB in {folder} ...", file=sys.stderr)
            subprocess.run([PY, "-c", GENERATE, str(big), str(small), str(big_n), str(small_n), pt, st], check=True)
        only = set(filter(None, args.only.split(",")))
        tf = os.path.join(folder, "tf", "ckpt-1000")  # a TF checkpoint prefix
        tf_files = [f"{tf}.index", f"{tf}.data-00000-of-00001"]
        if (not only or "tf-st" in only) and not all(os.path.exists(p) for p in tf_files):
            write_tf_from_safetensors(st, tf)
        for p in (pt, st, *[f for f in tf_files if os.path.exists(f)]):  # warm the page cache
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
        srcs = {"pt": pt, "st": st, "tf": tf}
        rows = []
        for key, title, s, outname, extra in JOBS:
            if only and key not in only:
                continue
            src, out = srcs[s], os.path.join(folder, outname)
            copy = os.path.join(folder, "copy.bin")
            data = tf_files[1] if s == "tf" else src  # cp copies the TF data shard, where the bytes are
            runs = [("cp", ["cp", data, copy], copy, args.repeat),
                    ("cp + sync", ["sh", "-c", f"cp '{data}' '{copy}' && sync '{copy}'"], copy, args.repeat),
                    ("ckptctl convert", [*CKPTCTL, "convert", src, out, *extra], out, args.repeat),
                    ("ckptctl convert --no-verify", [*CKPTCTL, "convert", src, out, "--no-verify", *extra], out,
                     args.repeat)]
            if not args.no_naive and key in NAIVE:  # no naive TF way without TensorFlow
                code = NAIVE[key].format(src=src, dst=out)
                runs.append(("naive (load everything, save)", [PY, "-c", code], out, 1))
            cands = round_robin(runs)
            cp = cands[0][1]
            for name, r in cands:
                rows.append((title, name, r, cp))
            print(f"done: {title}", file=sys.stderr)
        print(f"\n{total / 1e9:.1f} GB fp32 checkpoint, {big_n} tensors of {big / 1e6:.0f} MB + {small_n} of "
              f"{small / 1e6:.1f} MB; warm page cache; {os.cpu_count()} cores; best of {args.repeat} "
              "(naive: 1 run)\n")
        print("| conversion | candidate | wall (s) | peak RSS (MB) | throughput vs cp |")
        print("|---|---|---:|---:|---:|")
        for title, name, r, cp in rows:
            if not r["ok"]:
                print(f"| {title} | {name} | failed: {r['error']} | | |")
                continue
            ratio = cp["wall"] / r["wall"] if cp.get("ok") else float("nan")
            print(f"| {title} | {name} | {r['wall']:.2f} | {r['rss']:.0f} | {ratio:.2f}x |")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
