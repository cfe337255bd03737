"""Benchmark `ckptctl diff` and `ckptctl average` against the naive ways and against `cat`.

    python benchmarks/bench_diff_average.py                      # full size: 2 x 4 GB diff, 5 x 1 GB average
    python benchmarks/bench_diff_average.py --diff-gb 0.5 --avg-gb 0.2   # a quick look

Generates float32 checkpoints shaped like a transformer (embedding, attention and MLP matrices,
norms) under --dir (default /tmp/ckptctl-bench, deleted at the end unless --keep), as
safetensors and as PyTorch zip (.pt). B is A plus small noise in every tensor, so every byte
differs and diff does all of its arithmetic (the worst case; identical bytes take the fast path,
shown in a separate row). Every candidate runs as a fresh process on a warm page cache; the
candidates of a table run in turns (A, B, C, A, B, C, ...) so a slow minute of a shared disk hits
them alike; the table gives the best wall time and the best CPU seconds (user + sys) of --repeat
runs and the peak RSS (/usr/bin/time's %U %S %M). `--before OLD/src` adds every ckptctl row run
from an older source tree, interleaved with the current one (before/after in one table).

Baselines:
  cat          `cat A B > /dev/null`: reading the inputs once
  floor        for average: reading the inputs once plus writing (cp + sync) one output-sized file
  naive diff   torch.load both files (weights_only=True), then per tensor float64 max|a-b|,
               relative L2 and cosine, like a notebook would
  fairseq avg  fairseq's scripts/average_checkpoints.py: torch.load each file, sum in the
               parameter dtype, divide, torch.save
Targets (issue 13): peak RSS < 400 MB; diff of equal files <= 1.5x cat, every byte different <= 2.5x
cat; average <= 1.2x the floor.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import record  # noqa: E402 - beside this file, on the path above

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
        specs += [
            (p + "attn.o.bias", (d,)),
            (p + "mlp.up.weight", (4 * d, d)),
            (p + "mlp.up.bias", (4 * d,)),
            (p + "mlp.down.weight", (d, 4 * d)),
            (p + "mlp.down.bias", (d,)),
            (p + "ln1.weight", (d,)),
            (p + "ln1.bias", (d,)),
            (p + "ln2.weight", (d,)),
            (p + "ln2.bias", (d,)),
        ]
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
    code = "import sys, torch\nfrom safetensors.torch import load_file\ntorch.save(load_file(sys.argv[1]), sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True)


def measure(cmd: list[str], ok=(0,), env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user+sys, peak RSS in MB) of one fresh process, by /usr/bin/time.

    Not os.wait4 on our own child: a child forked from this (large) process counts the pages it
    shared with us before exec in its peak RSS.
    """
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptctl-bench-time-{os.getpid()}.txt"
    t0 = time.perf_counter()
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(stats), *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    wall = time.perf_counter() - t0
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")
    _e, user, sys_, rss_kb = stats.read_text().split()[-4:]
    stats.unlink()
    return wall, float(user) + float(sys_), int(rss_kb) / 1024


def warm(files) -> None:
    """Read files once so that every candidate starts from a warm page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


class Cand:
    """One command of a table; its runs are interleaved with the other candidates of the table."""

    def __init__(
        self,
        label: str,
        cmd: list[str],
        ok=(0,),
        inputs=(),
        cleanup: Path | None = None,
        env: dict | None = None,
        repeat: int | None = None,
    ):
        self.label, self.cmd, self.ok, self.inputs, self.cleanup, self.env = label, cmd, ok, inputs, cleanup, env
        self.repeat = repeat
        self.runs: list[tuple[float, float, float]] = []

    def run(self) -> None:
        if self.cleanup is not None and self.cleanup.exists():
            self.cleanup.unlink()
        if self.inputs:
            warm(self.inputs)
        self.runs.append(measure(self.cmd, self.ok, self.env))
        if self.cleanup is not None and self.cleanup.exists():
            self.cleanup.unlink()

    @property
    def best(self) -> tuple[float, float, float]:
        """Best wall, best CPU seconds (each over the runs), the largest peak RSS."""
        return (min(r[0] for r in self.runs), min(r[1] for r in self.runs), max(r[2] for r in self.runs))


def interleave(cands: list[Cand], repeat: int) -> None:
    """A, B, C, A, B, C, ...: a slow minute of the shared disk hits every candidate alike."""
    for i in range(repeat):
        for c in cands:
            if i < (c.repeat if c.repeat is not None else repeat):
                c.run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diff-gb", type=float, default=4.0)
    ap.add_argument("--avg-gb", type=float, default=1.0)
    ap.add_argument("--avg-n", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckptctl-bench"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per candidate (best of N, interleaved)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the torch.load baselines (they need RAM)")
    ap.add_argument("--skip-pt", action="store_true", help="no .pt files (no torch needed)")
    ap.add_argument("--only", choices=("diff", "average"), help="one of the two tables")
    ap.add_argument(
        "--before",
        type=Path,
        metavar="SRC",
        help="also run every ckptctl row with PYTHONPATH=SRC (an older src/ tree), interleaved",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated files (and reuse them next time)")
    args = ap.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    ck = [py, "-m", "ckptctl"]
    here = os.environ.copy()
    old = None
    if args.before is not None:
        old = {**here, "PYTHONPATH": str(args.before.resolve())}

    def ckpt(label: str, argv: list[str], **kw) -> list[Cand]:
        out = [Cand(label, [*ck, *argv], env=here, **kw)]
        if old is not None:
            out.append(Cand(label + " [before]", [*ck, *argv], env=old, **kw))
        return out

    tables: list[tuple[str, list[Cand]]] = []
    try:
        # ---- data (kept files are reused when their size matches)
        t0 = time.perf_counter()
        specs = transformer_specs(int(args.diff_gb * 1e9))
        A, B = d / "A.safetensors", d / "B.safetensors"
        avg_specs = transformer_specs(int(args.avg_gb * 1e9))
        inputs = [d / f"step_{(i + 1) * 1000}.safetensors" for i in range(args.avg_n)]
        want = {A: (specs, 1, None, 1e-3), B: (specs, 1, 2, 1e-3)}
        want.update({p: (avg_specs, 1, 10 + i, 0.05) for i, p in enumerate(inputs)})
        pts = {}
        for p, (sp, seed, ns, noise) in want.items():
            size = sum(int(np.prod(s)) * 4 for _n, s in sp)
            if not (p.exists() and p.stat().st_size > size):
                write_safetensors(p, sp, seed=seed, noise_seed=ns, noise=noise)
            if not args.skip_pt:
                pts[p] = p.with_suffix(".pt")
                if not pts[p].exists() or pts[p].stat().st_mtime < p.stat().st_mtime:
                    to_pt(p, pts[p])
        print(
            f"data ready in {time.perf_counter() - t0:.0f} s: diff 2 x {A.stat().st_size / 1e9:.2f} GB "
            f"({len(specs)} tensors), average {args.avg_n} x {inputs[0].stat().st_size / 1e9:.2f} GB "
            f"({len(avg_specs)} tensors)",
            file=sys.stderr,
        )

        # ---- diff
        if args.only in (None, "diff"):
            c: list[Cand] = [Cand("cat A B > /dev/null", ["cat", str(A), str(B)], inputs=[A, B])]
            c += ckpt(
                "ckptctl diff A B (safetensors, every byte differs)",
                ["diff", str(A), str(B), "--format", "json"],
                ok=(1,),
                inputs=[A, B],
            )
            c += ckpt("ckptctl diff A A (identical bytes)", ["diff", str(A), str(A), "--format", "json"], inputs=[A])
            if pts:
                c += ckpt(
                    "ckptctl diff A.safetensors A.pt (equal)",
                    ["diff", str(A), str(pts[A]), "--format", "json"],
                    inputs=[A, pts[A]],
                )
                c += ckpt(
                    "ckptctl diff A.pt B.pt (every byte differs)",
                    ["diff", str(pts[A]), str(pts[B]), "--format", "json"],
                    ok=(1,),
                    inputs=[pts[A], pts[B]],
                )
                if not args.skip_naive:
                    c.append(
                        Cand(
                            "naive: torch.load both + float64 stats",
                            [py, "-c", NAIVE_DIFF, str(pts[A]), str(pts[B])],
                            inputs=[pts[A], pts[B]],
                            repeat=1,
                        )
                    )
            tables.append((f"diff 2 x {args.diff_gb:g} GB", c))

        # ---- average
        if args.only in (None, "average"):
            out = d / "avg.safetensors"
            floor = d / "floor.safetensors"
            c = [
                Cand("cat inputs > /dev/null", ["cat", *map(str, inputs)], inputs=inputs),
                Cand(
                    "floor: cat inputs + cp one input + sync (the output must be written too)",
                    ["sh", "-c", 'cat "$@" > /dev/null && cp "$1" "$0" && sync "$0"', str(floor), *map(str, inputs)],
                    cleanup=floor,
                    inputs=inputs,
                ),
            ]
            c += ckpt(
                "ckptctl average -> safetensors",
                ["average", *map(str, inputs), "-o", str(out), "--format", "json"],
                cleanup=out,
                inputs=inputs,
            )
            if pts:
                out_pt = d / "avg.pt"
                ptin = [pts[p] for p in inputs]
                c += ckpt(
                    "ckptctl average -> .pt",
                    ["average", *map(str, inputs), "-o", str(out_pt), "--format", "json"],
                    cleanup=out_pt,
                    inputs=inputs,
                )
                c += ckpt(
                    "ckptctl average .pt inputs -> safetensors",
                    ["average", *map(str, ptin), "-o", str(out), "--format", "json"],
                    cleanup=out,
                    inputs=ptin,
                )
                if not args.skip_naive:
                    c.append(
                        Cand(
                            "fairseq average_checkpoints (torch.load, .pt)",
                            [py, "-c", FAIRSEQ_AVG, *map(str, ptin), str(out_pt)],
                            cleanup=out_pt,
                            inputs=ptin,
                            repeat=1,
                        )
                    )
            tables.append((f"average {args.avg_n} x {args.avg_gb:g} GB", c))

        for _task, cands in tables:
            interleave(cands, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    print(
        f"best of {args.repeat}, candidates interleaved, warm page cache; CPU = user + sys of the process; "
        f"x = wall / the table's first row (x floor for average: wall / the floor row)"
    )
    print("| task | candidate | wall (s) | CPU (s) | peak RSS (MB) | x first | x floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, cands in tables:
        base = cands[0].best[0]
        fl = next((c.best[0] for c in cands if c.label.startswith("floor")), None)
        for i, c in enumerate(cands):
            w, cpu, r = c.best
            record("diff-average", task, c.label, w, cpu, r)
            xf = f"{w / fl:.2f}" if fl else ""
            print(f"| {task if i == 0 else ''} | {c.label} | {w:.2f} | {cpu:.2f} | {r:.0f} | {w / base:.2f} | {xf} |")


if __name__ == "__main__":
    main()
