#!/usr/bin/env python
"""Benchmark `ckptctl convert` against a durable copy (`cp SRC DST && sync DST`) of the same file.

Generates a ~4 GB fp32 `.pt` with torch.save (7 tensors of 1/8 of the file plus 100 small ones)
and its safetensors twin under /tmp, then runs each candidate as a fresh process, in turns
(benchmarks/timing.py: A, B, C, A, B, C, ...; best of --repeat; `sync` before every run, outputs
deleted after it) and prints a markdown table: wall s / CPU s (user + sys), the wall-time ratio
to `cp && sync` measured in the same rounds (the target: <= 1.3x, <= 1.5x with a cast) and peak
RSS. ckptctl fsyncs its output before it renames it into place, so the fair floor is `cp` +
`sync`, not `cp` (shown too). The data is deleted at the end unless --keep/--dir.

    python benchmarks/bench_convert.py                  # 4 GB
    python benchmarks/bench_convert.py --size 1G        # what the noisy shared machine affords
    python benchmarks/bench_convert.py --quick          # 0.3 GB, 2 rounds, no naive baselines
    python benchmarks/bench_convert.py --only pt-st,cast --before /work/main/src   # old vs new
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Candidate, cell, interleave, machine, md_table, parse_size, record

PY = sys.executable
CKPTCTL = [PY, "-m", "ckptctl", "-q"]

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
    specs = [
        (
            f"model/{k.replace('.', '/')}/.ATTRIBUTES/VARIABLE_VALUE",
            "float32",
            tuple(v["shape"]),
            (st, 8 + n + v["data_offsets"][0]),
        )
        for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ]
    return [str(p) for p in write_bundle_streaming(prefix, specs)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="checkpoint size, e.g. 4G, 1G, 500M (default 4G)")
    ap.add_argument("--size-gb", type=float, default=None, help=argparse.SUPPRESS)  # the old spelling
    ap.add_argument("--quick", action="store_true", help="0.3 GB, 2 rounds, no naive baselines, no TF job")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; best of them kept (default 3; naive: 1 run)")
    ap.add_argument("--only", default="", help="comma-separated jobs: " + ",".join(j[0] for j in JOBS))
    ap.add_argument("--no-naive", action="store_true", help="skip the naive load-everything baselines")
    ap.add_argument("--no-cp", action="store_true", help="skip plain `cp` (keep `cp && sync`)")
    ap.add_argument(
        "--before",
        metavar="SRC",
        default=None,
        help="also run ckptctl from this source tree (e.g. /work/main/src) as 'before'",
    )
    ap.add_argument("--markdown", action="store_true", help="print only the markdown (for run_all.py)")
    ap.add_argument("--dir", default=None, help="where to put the data (default: a new folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeat, args.no_naive = "0.3G", min(args.repeat, 2), True
        args.only = args.only or "pt-st,st-pt,pt-h5,cast"
    total = int(args.size_gb * 1e9) if args.size_gb else parse_size(args.size)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    folder = args.dir or tempfile.mkdtemp(prefix="ckptctl-bench-convert-", dir="/tmp")
    os.makedirs(folder, exist_ok=True)
    pt, st = os.path.join(folder, "src.pt"), os.path.join(folder, "src.safetensors")
    big = total // 8 // 4096 * 4096  # the largest tensor: 1/8 of the file
    big_n, small_n = 7, 100
    small = max(4, (total - big_n * big) // small_n // 4 * 4)
    here = os.path.dirname(os.path.abspath(__file__))
    src_now = os.path.join(here, "..", "src")
    env_now = {**os.environ, "PYTHONPATH": os.path.abspath(src_now)}
    env_before = {**os.environ, "PYTHONPATH": os.path.abspath(args.before)} if args.before else None
    try:
        if not (os.path.exists(pt) and os.path.exists(st)):
            log(f"generating {total / 1e9:.2f} GB in {folder} ...")
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
            cands = [Candidate("cp + sync", ["sh", "-c", f"cp '{data}' '{copy}' && sync '{copy}'"], cleanup=[copy])]
            if not args.no_cp:
                cands.append(Candidate("cp", ["cp", data, copy], cleanup=[copy]))
            conv = [*CKPTCTL, "convert", src, out, *extra]
            if env_before:
                cands.append(Candidate("before", conv, cleanup=[out], env=env_before))
            cands.append(Candidate("convert", conv, cleanup=[out], env=env_now))
            cands.append(Candidate("--no-verify", [*conv, "--no-verify"], cleanup=[out], env=env_now))
            if not args.no_naive and key in NAIVE:  # no naive TF way without TensorFlow
                cands.append(
                    Candidate("naive", [PY, "-c", NAIVE[key].format(src=src, dst=out)], repeat=1, cleanup=[out])
                )
            log(f"{title}:")
            res = interleave(cands, args.repeat, log=log)
            rows.append((title, res))
        names = [
            c for c in ("cp + sync", "cp", "before", "convert", "--no-verify", "naive") if any(c in r for _t, r in rows)
        ]
        heads = {
            "cp + sync": "`cp && sync` (the floor)",
            "cp": "`cp` (no sync)",
            "before": "convert, before",
            "convert": "`ckptctl convert` (verify on)",
            "--no-verify": "`--no-verify`",
            "naive": "naive `save(load(...))`",
        }
        table = []
        for title, res in rows:
            base = res["cp + sync"]
            for n, r in res.items():
                if r.ok:
                    record("convert", title, n, r.wall, r.cpu, r.rss_mb)
            table.append(
                [title, *[cell(res[n], None if n == "cp + sync" else base) if n in res else "" for n in names]]
            )
        print(
            f"**convert** (`benchmarks/bench_convert.py --size {args.size}`): {total / 1e9:.2f} GB fp32 `.pt`, "
            f"{big_n} × {big / 1e6:.0f} MB + {small_n} × {small / 1e6:.1f} MB tensors; warm page cache; "
            f"candidates in turns, best of {args.repeat} (naive: 1 run), `sync` before each run. "
            "Cells: wall s / CPU s (user + sys) (wall ÷ `cp && sync` of the same rounds), peak RSS. "
            "Targets: ≤ 1.3× `cp && sync` (≤ 1.5× with a cast), RSS < 150 MB.\n"
        )
        print(md_table(["conversion", *[heads[n] for n in names]], table))
        print(f"\nMeasured {machine()}.")
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
