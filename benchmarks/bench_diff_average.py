"""Benchmark `ckptctl diff` and `ckptctl average` against the naive ways and against `cat`.

    python benchmarks/bench_diff_average.py                      # full size: 2 x 4 GB diff, 5 x 1 GB average
    python benchmarks/bench_diff_average.py --diff-gb 0.5 --avg-gb 0.2   # a quick look

Generates float32 checkpoints shaped like a transformer (embedding, attention and MLP matrices,
norms) under --dir (default /tmp/ckptctl-bench, deleted at the end unless --keep), as
safetensors and as PyTorch zip (.pt). B is A plus small noise in every tensor, so every byte
differs and diff does all of its arithmetic (the worst case; identical bytes take the fast path,
shown in a separate row). Every candidate runs as a fresh process on a warm page cache; the
table gives the best wall time of --repeat runs and the peak RSS (/usr/bin/time's %M).

Baselines:
  cat          `cat A B > /dev/null`: reading the inputs once
  floor        for average: reading the inputs once plus writing (cp + sync) one output-sized file
  naive diff   torch.load both files (weights_only=True), then per tensor float64 max|a-b|,
               relative L2 and cosine, like a notebook would
  fairseq avg  fairseq's scripts/average_checkpoints.py: torch.load each file, sum in the
               parameter dtype, divide, torch.save
Targets (issue 5): peak RSS < 400 MB; diff <= 2x cat; average <= 1.5x cat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PIECE = 1 << 24  # elements generated at a time

NAIVE_DIFF = r"""
import sys, torch
a = torch.load(sys.argv[1], weights_only=True)
b = torch.load(sys.argv[2], weights_only=True)
out = {}
for k in a:
    x, y = a[k].double(), b[k].double()
    d = x - y
    na, nb = x.norm(), y.norm()
    out[k] = (d.abs().max().item(), (d.norm() / na).item(), ((x * y).sum() / (na * nb)).item())
print(len(out))
"""

FAIRSEQ_AVG = r"""
import sys, collections, torch
inputs, out = sys.argv[1:-1], sys.argv[-1]
params_dict = collections.OrderedDict()
params_keys = None
for fpath in inputs:
    state = torch.load(fpath, map_location="cpu", weights_only=True)
    model_params = state
    if params_keys is None:
        params_keys = list(model_params.keys())
    for k in params_keys:
        p = model_params[k]
        if isinstance(p, torch.HalfTensor):
            p = p.float()
        if k not in params_dict:
            params_dict[k] = p.clone()
        else:
            params_dict[k] += p
averaged = collections.OrderedDict()
for k, v in params_dict.items():
    averaged[k] = v
    if averaged[k].is_floating_point():
        averaged[k].div_(len(inputs))
    else:
        averaged[k] //= len(inputs)
torch.save(averaged, out)
"""


def transformer_specs(total_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a float32 transformer of about `total_bytes`."""
    params = total_bytes // 4
    d = 2048 if params > 600_000_000 else 1024 if params > 100_000_000 else 512
    vocab = 50_000
    specs: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    used = vocab * d
    layer = 12 * d * d + 9 * d
    i = 0
    while used + layer <= params or i == 0:
        p = f"layers.{i}."
        for n in ("q", "k", "v", "o"):
            specs.append((p + f"attn.{n}.weight", (d, d)))
        specs += [(p + "attn.o.bias", (d,)), (p + "mlp.up.weight", (4 * d, d)), (p + "mlp.up.bias", (4 * d,)),
                  (p + "mlp.down.weight", (d, 4 * d)), (p + "mlp.down.bias", (d,)),
                  (p + "ln1.weight", (d,)), (p + "ln1.bias", (d,)), (p + "ln2.weight", (d,)), (p + "ln2.bias", (d,))]
        used += layer
        i += 1
    specs.append(("norm.weight", (d,)))
    return specs


def write_safetensors(path: Path, specs, seed: int, noise_seed: int | None = None, noise: float = 1e-3) -> None:
    header = {}
    off = 0
    for name, shape in specs:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for idx, (_name, shape) in enumerate(specs):
            rng = np.random.default_rng(seed * 100_003 + idx)
            nrng = np.random.default_rng(noise_seed * 100_003 + idx) if noise_seed is not None else None
            left = int(np.prod(shape))
            while left:
                k = min(PIECE, left)
                x = rng.random(k, dtype=np.float32) - np.float32(0.5)
                if nrng is not None:
                    x += (nrng.random(k, dtype=np.float32) - np.float32(0.5)) * np.float32(noise)
                f.write(x.tobytes())
                left -= k


def to_pt(src: Path, dst: Path) -> None:
    code = ("import sys, torch\nfrom safetensors.torch import load_file\n"
            "torch.save(load_file(sys.argv[1]), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True)


def measure(cmd: list[str], ok=(0,)) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process, by /usr/bin/time.

    Not os.wait4 on our own child: a child forked from this (large) process counts the pages it
    shared with us before exec in its peak RSS.
    """
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptctl-bench-time-{os.getpid()}.txt"
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")
    rss_kb = stats.read_text().split()[-1]
    stats.unlink()
    return wall, int(rss_kb) / 1024


def warm(files) -> None:
    """Read files once so that every candidate starts from a warm page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def best(cmd: list[str], repeat: int, ok=(0,), cleanup: Path | None = None, inputs=()) -> tuple[float, float]:
    walls, rss = [], []
    for _ in range(repeat):
        if cleanup is not None and cleanup.exists():
            cleanup.unlink()
        if inputs:
            warm(inputs)
        w, r = measure(cmd, ok)
        walls.append(w)
        rss.append(r)
    if cleanup is not None and cleanup.exists():
        cleanup.unlink()
    return min(walls), max(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diff-gb", type=float, default=4.0)
    ap.add_argument("--avg-gb", type=float, default=1.0)
    ap.add_argument("--avg-n", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckptctl-bench"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true", help="skip the torch.load baselines (they need RAM)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    ck = [py, "-m", "ckptctl"]
    rows: list[tuple[str, str, float, float, float | None]] = []
    try:
        # ---- data
        t0 = time.perf_counter()
        specs = transformer_specs(int(args.diff_gb * 1e9))
        A, B = d / "A.safetensors", d / "B.safetensors"
        write_safetensors(A, specs, seed=1)
        write_safetensors(B, specs, seed=1, noise_seed=2)
        avg_specs = transformer_specs(int(args.avg_gb * 1e9))
        inputs = [d / f"step_{(i + 1) * 1000}.safetensors" for i in range(args.avg_n)]
        for i, p in enumerate(inputs):
            write_safetensors(p, avg_specs, seed=1, noise_seed=10 + i, noise=0.05)
        pts = {}
        if not args.skip_naive:
            for p in [A, B, *inputs]:
                pts[p] = p.with_suffix(".pt")
                to_pt(p, pts[p])
        print(f"generated in {time.perf_counter() - t0:.0f} s: diff 2 x {A.stat().st_size / 1e9:.2f} GB "
              f"({len(specs)} tensors), average {args.avg_n} x {inputs[0].stat().st_size / 1e9:.2f} GB "
              f"({len(avg_specs)} tensors)", file=sys.stderr)

        # ---- diff
        cat_w, cat_r = best(["cat", str(A), str(B)], args.repeat, inputs=[A, B])
        rows.append(("diff 2 x %.1f GB" % args.diff_gb, "cat A B > /dev/null", cat_w, cat_r, 1.0))
        w, r = best([*ck, "diff", str(A), str(B), "--format", "json"], args.repeat, ok=(1,), inputs=[A, B])
        rows.append(("", "ckptctl diff (safetensors, every byte differs)", w, r, w / cat_w))
        w, r = best([*ck, "diff", str(A), str(A), "--format", "json"], args.repeat, ok=(0,), inputs=[A])
        rows.append(("", "ckptctl diff A A (identical: byte fast path)", w, r, w / cat_w))
        if pts:
            w, r = best([*ck, "diff", str(pts[A]), str(pts[B]), "--format", "json"], args.repeat, ok=(1,),
                        inputs=[pts[A], pts[B]])
            rows.append(("", "ckptctl diff (.pt zip, every byte differs)", w, r, w / cat_w))
            w, r = best([*ck, "diff", str(A), str(pts[A]), "--format", "json"], args.repeat, ok=(0,),
                        inputs=[A, pts[A]])
            rows.append(("", "ckptctl diff A.safetensors A.pt (equal)", w, r, w / cat_w))
            w, r = best([py, "-c", NAIVE_DIFF, str(pts[A]), str(pts[B])], 1, inputs=[pts[A], pts[B]])
            rows.append(("", "naive: torch.load both + float64 stats", w, r, w / cat_w))

        # ---- average
        out = d / "avg.safetensors"
        cat_w, cat_r = best(["cat", *map(str, inputs)], args.repeat, inputs=inputs)
        rows.append((f"average {args.avg_n} x {args.avg_gb:.1f} GB", "cat inputs > /dev/null", cat_w, cat_r, 1.0))
        floor = d / "floor.safetensors"
        w, r = best(["sh", "-c", 'cat "$@" > /dev/null && cp "$1" "$0" && sync "$0"', str(floor), *map(str, inputs)],
                    args.repeat, cleanup=floor, inputs=inputs)
        rows.append(("", "floor: cat inputs + cp one input + sync (the output must be written too)", w, r,
                     w / cat_w))
        w, r = best([*ck, "average", *map(str, inputs), "-o", str(out), "--format", "json"], args.repeat,
                    cleanup=out, inputs=inputs)
        rows.append(("", "ckptctl average -> safetensors", w, r, w / cat_w))
        out_pt = d / "avg.pt"
        if pts:
            w, r = best([*ck, "average", *map(str, inputs), "-o", str(out_pt), "--format", "json"], args.repeat,
                        cleanup=out_pt, inputs=inputs)
            rows.append(("", "ckptctl average -> .pt", w, r, w / cat_w))
            ptin = [pts[p] for p in inputs]
            w, r = best([*ck, "average", *map(str, ptin), "-o", str(out), "--format", "json"], args.repeat,
                        cleanup=out, inputs=ptin)
            rows.append(("", "ckptctl average .pt inputs -> safetensors", w, r, w / cat_w))
            w, r = best([py, "-c", FAIRSEQ_AVG, *map(str, ptin), str(out_pt)], 1, cleanup=out_pt, inputs=ptin)
            rows.append(("", "fairseq average_checkpoints (torch.load, .pt)", w, r, w / cat_w))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    print("| task | candidate | wall (s) | peak RSS (MB) | x cat |")
    print("|---|---|---:|---:|---:|")
    for task, cand, w, r, ratio in rows:
        print(f"| {task} | {cand} | {w:.2f} | {r:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
