#!/usr/bin/env python
"""Benchmark `ckptctl ls` over run folders of 200 checkpoints of ~1 GB each.

The checkpoints are sparse files: every header, pickle and JSON side file is real and complete,
the tensor data regions are holes (they read as zeros, take no disk space). So a lister that
reads tensor data would show it as bytes read (rchar) and time; one that reads metadata only
does not. Three run folders:

  safetensors  200 x model_<step>.safetensors (1 GB, 64 fp32/bf16 tensors, __metadata__ step/loss)
  lightning    200 x epoch=E-step=S.ckpt: a torch zip (what torch.save writes: data.pkl,
               data/N members 64-byte aligned, CRC 0) with state_dict + Adam optimizer_states
               (1/3 + 2/3 of 1 GB) + a ModelCheckpoint callback with 0-d score tensors
  hf-trainer   200 x checkpoint-N/: model.safetensors (1/3 GB) + optimizer.pt (2/3 GB, sparse
               torch zip) + scheduler.pt, rng_state.pth, training_args.bin (torch.save) +
               trainer_state.json (log_history growing with the step)

Each candidate runs as a fresh process (warm page cache, best of 3): wall time, peak RSS
(rusage of the child), bytes read (rchar from /proc/self/io at exit). Baselines: `ls -lR`
(the floor: a stat per file) and the naive Python a user would write (safetensors.safe_open
per file; torch.load(mmap=True, weights_only=True) per .ckpt / optimizer.pt).

Usage: python benchmarks/bench_ls.py [--n 200] [--size-gb 1] [--keep] [--dir /tmp/ckptctl-bench-ls]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, record, run

GB = 1000**3


# ---- sparse safetensors ------------------------------------------------------------------------
def sparse_safetensors(path: Path, total: int, n_tensors: int, metadata: dict[str, str]) -> None:
    per = total // n_tensors
    header: dict = {"__metadata__": metadata}
    off = 0
    for i in range(n_tensors):
        dtype, item = ("BF16", 2) if i % 4 == 3 else ("F32", 4)
        cols = 1024
        rows = max(1, per // (item * cols))
        nbytes = rows * cols * item
        header[f"model.layers.{i}.weight"] = {
            "dtype": dtype,
            "shape": [rows, cols],
            "data_offsets": [off, off + nbytes],
        }
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


# ---- sparse torch zip ----------------------------------------------------------------------------
class FakeStorage:
    def __init__(self, key: str, numel: int, data: bytes | None = None):
        self.key, self.numel, self.data = key, numel, data


class FakeTensor:
    def __init__(self, storage: FakeStorage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape


class _TorchPickler(pickle.Pickler):
    """Pickles FakeTensors exactly the way torch.save pickles float32 tensors."""

    def __init__(self, f):
        super().__init__(f, protocol=2)
        import torch

        self._torch = torch

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", self._torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            stride, acc = [], 1
            for s in reversed(obj.shape):
                stride.insert(0, acc)
                acc *= s
            return (
                self._torch._utils._rebuild_tensor_v2,
                (obj.storage, 0, tuple(obj.shape), tuple(stride), False, collections.OrderedDict()),
            )
        return NotImplemented


def sparse_torch_zip(path: Path, obj, storages: list[FakeStorage]) -> None:
    """A zip laid out like torch.save's: members stored, payloads 64-byte aligned, CRC 0."""
    import io

    buf = io.BytesIO()
    _TorchPickler(buf).dump(obj)
    prefix = path.name.rsplit(".", 1)[0]
    members: list[tuple[str, bytes | int]] = [
        ("data.pkl", buf.getvalue()),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
    ]
    members += [(f"data/{s.key}", s.data if s.data is not None else s.numel * 4) for s in storages]
    members += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    central = []
    with open(path, "wb") as f:
        for name, payload in members:
            full = f"{prefix}/{name}".encode()
            size = payload if isinstance(payload, int) else len(payload)
            start = f.tell()
            base = start + 30 + len(full)
            pad = (-(base + 4)) % 64
            extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, 0, size, size, len(full), len(extra)))
            f.write(full + extra)
            if isinstance(payload, int):
                f.seek(payload, os.SEEK_CUR)  # a hole: reads as zeros, no disk space
            else:
                f.write(payload)
            central.append((full, size, start))
        cd_start = f.tell()
        for full, size, start in central:
            f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    20,
                    20,
                    0,
                    0,
                    0,
                    0x21,
                    0,
                    size,
                    size,
                    len(full),
                    0,
                    0,
                    0,
                    0,
                    0,
                    start,
                )
            )
            f.write(full)
        cd_size = f.tell() - cd_start
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), cd_size, cd_start, 0))


def lightning_obj(epoch: int, step: int, total: int, n_params: int = 32):
    storages: list[FakeStorage] = []

    def tensor(numel: int, shape, data: bytes | None = None) -> FakeTensor:
        s = FakeStorage(str(len(storages)), numel, data)
        storages.append(s)
        return FakeTensor(s, shape)

    per = total // (3 * n_params) // 4 // 1024 * 1024  # elements per parameter tensor
    sd, state = {}, {}
    for i in range(n_params):
        sd[f"model.layers.{i}.weight"] = tensor(per, (per // 1024, 1024))
    for i in range(n_params):
        state[i] = {
            "step": tensor(1, (), struct.pack("<f", float(step))),
            "exp_avg": tensor(per, (per // 1024, 1024)),
            "exp_avg_sq": tensor(per, (per // 1024, 1024)),
        }
    loss = 1.0 / (1 + step / 1000)
    key = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}"
    )
    obj = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": step}}},
        "callbacks": {
            key: {
                "monitor": "val_loss",
                "best_model_score": tensor(1, (), struct.pack("<f", loss)),
                "best_model_path": f"/runs/x/epoch={epoch}-step={step}.ckpt",
                "current_score": tensor(1, (), struct.pack("<f", loss)),
                "dirpath": "/runs/x",
                "best_k_models": {},
                "kth_best_model_path": "",
                "last_model_path": "",
            }
        },
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(n_params))}]}],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": epoch}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "layers": n_params},
    }
    return obj, storages


def adam_obj(total: int, n_params: int = 32):
    storages: list[FakeStorage] = []

    def tensor(numel, shape, data=None):
        s = FakeStorage(str(len(storages)), numel, data)
        storages.append(s)
        return FakeTensor(s, shape)

    per = total // (2 * n_params) // 4 // 1024 * 1024
    state = {
        i: {
            "step": tensor(1, (), struct.pack("<f", 1.0)),
            "exp_avg": tensor(per, (per // 1024, 1024)),
            "exp_avg_sq": tensor(per, (per // 1024, 1024)),
        }
        for i in range(n_params)
    }
    return {"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(n_params))}]}, storages


# ---- the three runs ------------------------------------------------------------------------------
def make_runs(base: Path, n: int, size: int) -> dict[str, Path]:
    import torch

    runs = {}
    d = base / "safetensors"
    d.mkdir(parents=True)
    for i in range(n):
        step = (i + 1) * 500
        sparse_safetensors(
            d / f"model_{step:08d}.safetensors",
            size,
            64,
            {"format": "pt", "step": str(step), "eval_loss": repr(1.0 / (1 + step / 1000))},
        )
    runs["safetensors"] = d

    d = base / "lightning"
    d.mkdir()
    for i in range(n):
        step = (i + 1) * 500
        obj, st = lightning_obj(i, step, size)
        sparse_torch_zip(d / f"epoch={i}-step={step}.ckpt", obj, st)
    os.symlink(f"epoch={n - 1}-step={n * 500}.ckpt", d / "last.ckpt")
    runs["lightning"] = d

    d = base / "hf-trainer"
    d.mkdir()
    history = []
    small_rng = {"python": None, "cpu": torch.random.get_rng_state()}
    for i in range(n):
        step = (i + 1) * 500
        ck = d / f"checkpoint-{step}"
        ck.mkdir()
        sparse_safetensors(ck / "model.safetensors", size // 3, 64, {"format": "pt"})
        obj, st = adam_obj(size - size // 3)
        sparse_torch_zip(ck / "optimizer.pt", obj, st)
        torch.save({"base_lrs": [1e-4], "last_epoch": step}, ck / "scheduler.pt")
        torch.save(small_rng, ck / "rng_state.pth")
        torch.save({"output_dir": str(d), "save_steps": 500}, ck / "training_args.bin")
        history += [
            {"epoch": i / 10, "grad_norm": 1.0, "learning_rate": 1e-4, "loss": 2.0 / (1 + i), "step": step},
            {"epoch": i / 10, "eval_loss": 1.0 / (1 + i), "eval_runtime": 1.0, "step": step},
        ]
        (ck / "trainer_state.json").write_text(
            json.dumps(
                {
                    "global_step": step,
                    "epoch": i / 10,
                    "log_history": history,
                    "best_model_checkpoint": f"{d}/checkpoint-{step}",
                    "best_metric": 1.0 / (1 + i),
                },
                indent=2,
            )
        )
    runs["hf-trainer"] = d
    return runs


# ---- measuring -----------------------------------------------------------------------------------
RCHAR_HOOK = (
    "import atexit,os,sys\n"
    "def _io():\n"
    "    with open(os.environ['BENCH_IO'], 'w') as f: f.write(open('/proc/self/io').read())\n"
    "atexit.register(_io)\n"
)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", RCHAR_HOOK + code]


def ckptctl(*args: str) -> list[str]:
    return py(
        f"import sys, runpy; sys.argv = ['ckptctl'] + {list(args)!r}; runpy.run_module('ckptctl', run_name='__main__')"
    )


NAIVE = {
    "safetensors": (
        "import glob, json\nfrom safetensors import safe_open\nrows = []\n"
        "for p in sorted(glob.glob(D + '/*.safetensors')):\n"
        "    with safe_open(p, 'np') as f:\n"
        "        rows.append((p, f.metadata(), sum(1 for k in f.keys() for _ in [f.get_slice(k).get_shape()])))\n"
        "print(len(rows))\n"
    ),
    "lightning": (
        "import glob, torch\nrows = []\n"
        "for p in sorted(glob.glob(D + '/epoch=*.ckpt')):\n"
        "    ck = torch.load(p, mmap=True, weights_only=True, map_location='cpu')\n"
        "    rows.append((p, ck['global_step'], sum(t.numel() for t in ck['state_dict'].values())))\n"
        "print(len(rows))\n"
    ),
    "hf-trainer": (
        "import glob, json, torch\nfrom safetensors import safe_open\nrows = []\n"
        "for d in sorted(glob.glob(D + '/checkpoint-*')):\n"
        "    st = json.load(open(d + '/trainer_state.json'))\n"
        "    with safe_open(d + '/model.safetensors', 'np') as f:\n"
        "        n = len(list(f.keys()))\n"
        "    opt = torch.load(d + '/optimizer.pt', mmap=True, weights_only=True)\n"
        "    rows.append((d, st['global_step'], n, len(opt['state'])))\n"
        "print(len(rows))\n"
    ),
}


def measure_all(cands: list[tuple[str, list[str]]], reps: int = 3) -> dict[str, tuple[float, float, int | None, float]]:
    """label -> (best wall s, peak RSS MB, bytes read, best CPU s) of fresh processes, the
    candidates in turns (A, B, C, A, B, C, ...: benchmarks/timing.py) after one warm-up round.

    Wall, CPU (user + sys) and peak RSS come from os.wait4; bytes read from the child's own
    /proc/self/io at exit."""
    samples: dict[str, list] = {label: [] for label, _ in cands}
    rchar: dict[str, int | None] = {}
    fd, io_name = tempfile.mkstemp()
    os.close(fd)
    env = dict(os.environ, BENCH_IO=io_name)
    try:
        for i in range(reps + 1):
            for label, cmd in cands:
                Path(io_name).write_text("")
                s = run(cmd, env=env)
                if s.code != 0:
                    raise SystemExit(f"{label} failed ({s.code}): {s.err}")
                if i == 0:
                    continue  # warm-up
                samples[label].append(s)
                try:
                    text = Path(io_name).read_text()
                    rchar[label] = int(dict(line.split(": ") for line in text.splitlines())["rchar"])
                except (OSError, KeyError, ValueError):
                    rchar[label] = None
    finally:
        os.unlink(io_name)
    return {
        label: (min(x.wall for x in ss), max(x.rss_mb for x in ss), rchar.get(label), min(x.cpu for x in ss))
        for label, ss in samples.items()
    }


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="checkpoints per run folder")
    ap.add_argument("--size-gb", type=float, default=1.0, help="apparent size of each checkpoint")
    ap.add_argument("--dir", default=None, help="where to generate (default: a fresh folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated folders")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate_only:  # in a child process: torch stays out of the measuring process
        make_runs(Path(a.dir), a.n, int(a.size_gb * GB))
        return
    base = Path(a.dir or tempfile.mkdtemp(prefix="ckptctl-bench-ls-", dir="/tmp"))
    if a.dir:
        shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--generate-only",
                "--n",
                str(a.n),
                "--size-gb",
                str(a.size_gb),
                "--dir",
                str(base),
            ],
            check=True,
        )
        runs = {k: base / k for k in ("safetensors", "lightning", "hf-trainer")}
        gen = time.perf_counter() - t0
        apparent = {
            k: sum(p.stat().st_size for p in v.rglob("*") if p.is_file() and not p.is_symlink())
            for k, v in runs.items()
        }
        print(
            f"generated {len(runs)} run folders of {a.n} checkpoints in {gen:.1f} s under {base} "
            f"(apparent sizes: {', '.join(f'{k} {human(v)}' for k, v in apparent.items())})\n",
            file=sys.stderr,
        )
        rows = []
        for name, d in runs.items():
            ds = str(d)
            cands = [
                ("`ckptctl ls`", ckptctl("ls", ds)),
                ("`ckptctl ls --format json`", ckptctl("ls", ds, "--format", "json")),
                ("`ls -lR` (floor: stat only)", ["ls", "-lR", ds]),
                ("naive Python (safe_open / torch.load mmap)", py(f"D = {ds!r}\n" + NAIVE[name])),
            ]
            res = measure_all(cands, a.reps)
            naive = res["naive Python (safe_open / torch.load mmap)"][0]
            floor = res["`ls -lR` (floor: stat only)"][0]
            for label, (wall, rss, rchar, cpu) in res.items():
                rows.append(
                    (
                        name,
                        label,
                        wall,
                        cpu,
                        rss,
                        a.n / wall,
                        rchar if label != "`ls -lR` (floor: stat only)" else None,
                        wall / naive,
                        wall / floor,
                        apparent[name],
                    )
                )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"**ls** (`benchmarks/bench_ls.py`): {a.n} checkpoints of {a.size_gb:g} GB each per run folder "
            f"(sparse files); fresh processes, candidates in turns, best of {a.reps}, warm cache; "
            f"load average {load:.1f} at the end. Target: 200 Lightning `.ckpt` in <= 0.5 s.\n"
        )
        print(
            "| run folder | candidate | wall (s) | CPU user+sys (s) | peak RSS (MB) | checkpoints/s | bytes read "
            "| wall vs naive | wall vs `ls -lR` |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, label, wall, cpu, rss, rate, rchar, vn, vf, _app in rows:
            record("ls", name, label, wall, cpu, rss)
            print(
                f"| {name} ({human(_app)}) | {label} | {wall:.3f} | {cpu:.2f} | {rss:.0f} | {rate:.0f} | "
                f"{human(rchar)} | {vn:.2f}× | {vf:.1f}× |"
            )
        print(f"\nMeasured {machine()}.")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
