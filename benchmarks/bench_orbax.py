#!/usr/bin/env python
"""Benchmark ckptctl on an Orbax checkpoint against TensorStore (what Orbax itself reads with).

Writes a ~4 GB Orbax-shaped checkpoint with TensorStore the way Orbax does (one OCDBT database,
zstd-compressed B+tree nodes, one Zarr v2 array per leaf with a zstd compressor and one chunk per
array, `_METADATA` with the tree), about 300 float32 arrays in a Flax-like tree
(`params/layers_3/attn/q/kernel`). Needs `pip install tensorstore` (the `dev` extra has it); JAX
and Orbax are not needed. Then, every candidate a fresh process (best of --repeat wall times,
largest peak RSS):

- inspect: `ckptctl inspect --format json` vs TensorStore listing the OCDBT keys and opening every
  array for its dtype and shape (`import tensorstore` alone too);
- values: read every array and hash its bytes: ckptctl's own OCDBT/Zarr decoder (its Reader)
  vs TensorStore (`ts.open(...).read()`), and `ckptctl convert` to safetensors.

    python benchmarks/bench_orbax.py                  # 4 GB
    python benchmarks/bench_orbax.py --size-gb 0.5    # quick
    python benchmarks/bench_orbax.py --keep --dir /tmp/bench-orbax

The data is deleted at the end unless --keep is given.
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
from bench_inspect import PY, plan, run_candidates  # noqa: E402

TS_LIST = r"""
import sys, tensorstore as ts
root = sys.argv[1]
kv = ts.KvStore.open({'driver': 'ocdbt', 'base': 'file://' + root}).result()
keys = [k.decode() for k in kv.list().result() if k.endswith(b'/.zarray')]
out = []
for k in keys:
    a = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': 'file://' + root, 'path': k[:-7]}},
                open=True).result()
    out.append((k[:-8], str(a.dtype), a.shape))
print(len(out))
"""
TS_READ = r"""
import sys, hashlib, tensorstore as ts
root = sys.argv[1]
kv = ts.KvStore.open({'driver': 'ocdbt', 'base': 'file://' + root}).result()
n = 0
for k in kv.list().result():
    if k.endswith(b'/.zarray'):
        a = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': 'file://' + root,
                     'path': k.decode()[:-7]}}, open=True).result()
        hashlib.sha256(a.read().result().tobytes()).hexdigest()
        n += 1
print(n)
"""
CK_READ = r"""
import sys, hashlib
from ckptctl.formats import open_reader
with open_reader(sys.argv[1]) as r:
    for t in r.info().tensors:
        h = hashlib.sha256()
        for c in r.iter_chunks(t.name):
            h.update(c)
print('ok')
"""
IMPORT_PROBE = (
    "import sys\nfrom ckptctl.cli.app import app\n"
    "try:\n    app(['inspect', sys.argv[1], '--format', 'json'])\nexcept SystemExit as e:\n    code = e.code\n"
    "sys.stderr.write('IMPORTED=' + ','.join(m for m in ('jax', 'tensorstore', 'torch', 'h5py', 'numpy', 'zstandard')"
    " if m in sys.modules) + '\\n')\nsys.exit(code)\n"
)


def generate(root: str, size_gb: float) -> int:
    import numpy as np
    import tensorstore as ts

    os.makedirs(root, exist_ok=True)
    ctx = ts.Context()
    base = {"driver": "ocdbt", "base": "file://" + root, "config": {"compression": {"id": "zstd"}}}
    rng = np.random.default_rng(0)
    tree = {}
    total = 0
    for name, shape in plan(size_gb):
        # model.layers.3.self_attn.q_proj.weight -> params/layers_3/self_attn/q_proj/kernel (Flax names)
        parts = ["params"] + [p for p in name.replace("model.", "").replace("layers.", "layers_").split(".")]
        parts = [("kernel" if p == "weight" and len(shape) == 2 else "scale" if p == "weight" else p) for p in parts]
        key = ".".join(parts)
        arr = rng.standard_normal(shape, dtype=np.float32)
        t = ts.open(
            {
                "driver": "zarr",
                "kvstore": {**base, "path": key + "/"},
                "metadata": {
                    "shape": list(shape),
                    "chunks": list(shape),
                    "dtype": "<f4",
                    "compressor": {"id": "zstd", "level": 1},
                },
            },
            create=True,
            open=True,
            context=ctx,
        ).result()
        t.write(arr).result()
        total += arr.nbytes
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in parts],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
        }
    with open(os.path.join(root, "_METADATA"), "w") as f:
        json.dump(
            {
                "tree_metadata": tree,
                "use_ocdbt": True,
                "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True,
                "custom_metadata": None,
            },
            f,
        )
    return total


def imported(path: str) -> str:
    res = subprocess.run([PY, "-c", IMPORT_PROBE, path], capture_output=True, text=True)
    for line in res.stderr.splitlines():
        if line.startswith("IMPORTED="):
            return line.removeprefix("IMPORTED=") or "-"
    return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-values", action="store_true", help="inspect only")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="ckptctl-bench-orbax-")
    root = os.path.join(work, "orbax")
    try:
        if not os.path.exists(os.path.join(root, "_METADATA")):
            print(f"writing a {args.size_gb} GB Orbax-shaped checkpoint to {root} ...", file=sys.stderr)
            generate(root, args.size_gb)
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        n = len(json.load(open(os.path.join(root, "_METADATA")))["tree_metadata"])
        print(
            f"**Orbax** (`benchmarks/bench_orbax.py`): a {args.size_gb:g} GB Orbax-shaped checkpoint written with "
            f"TensorStore as Orbax writes it, {n} float32 arrays in one OCDBT database, zstd Zarr v2 chunks, "
            f"{disk / 1e9:.2f} GB on disk; candidates in turns, inspect best of {args.repeat}, values one run each. "
            f"`ckptctl inspect` imported: {imported(root)}.\n"
        )
        rows = [
            ("inspect", "`ckptctl inspect --format json`", [PY, "-m", "ckptctl", "inspect", root, "--format", "json"]),
            ("inspect", "TensorStore: list keys, open every array", [PY, "-c", TS_LIST, root]),
            ("inspect", "`import tensorstore` alone", [PY, "-c", "import tensorstore"]),
        ]
        if not args.no_values:
            out = os.path.join(work, "out.safetensors")
            rows += [
                ("values", "ckptctl Reader: read + sha256 every array", [PY, "-c", CK_READ, root]),
                ("values", "TensorStore: read + sha256 every array", [PY, "-c", TS_READ, root]),
                (
                    "values",
                    "`ckptctl convert` → safetensors (verify on)",
                    ["sh", "-c", f"rm -f {out}; {PY} -m ckptctl convert {root} {out}"],
                ),
            ]
        # candidates of a task take turns (A, B, C, A, B, C, ...: a busy spell is shared), best of N
        print("| task | candidate | wall | CPU (user + sys) | peak RSS |\n|---|---|---:|---:|---:|")
        for task in ("inspect", "values"):
            these = [(label, cmd) for t, label, cmd in rows if t == task]
            if not these:
                continue
            results = run_candidates([cmd for _l, cmd in these], args.repeat if task == "inspect" else 1)
            for (label, _cmd), r in zip(these, results, strict=True):
                if r["ok"]:
                    print(
                        f"| {task} | {label} | {r['wall']:.2f} s | {r['cpu']:.2f} s | {r['rss']:.0f} MiB |", flush=True
                    )
                else:
                    print(f"| {task} | {label} | failed: {r['error']} | | |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
