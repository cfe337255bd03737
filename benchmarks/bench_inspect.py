#!/usr/bin/env python
"""Benchmark `ckptctl inspect` against loading with torch / safetensors / h5py.

Generates a ~4 GB checkpoint (about 300 fp32 tensors, the largest ~10% of the total) in each
format under /tmp — safetensors, torch zip, torch legacy, HDF5, TensorFlow bundle — with little
memory: the safetensors data is a sparse file, the torch files are saved from tensors that map it,
the HDF5 datasets are allocated without being filled, the TF bundle (TF 2 object-based keys,
written by tests/tf_writer.py) has a sparse data shard. Then every candidate runs as a fresh process
(best of --repeat runs for wall time, the largest peak RSS seen) and a markdown table is printed.

    python benchmarks/bench_inspect.py                 # 4 GB per format
    python benchmarks/bench_inspect.py --size-gb 0.5   # quick
    python benchmarks/bench_inspect.py --keep --dir /tmp/bench

The data is deleted at the end unless --keep is given. The machine should be otherwise idle:
the figures are wall times of whole processes.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Candidate, interleave, record  # noqa: E402

PY = sys.executable

# every candidate is one fresh Python process; {path} is the checkpoint
INSPECT = "ckptctl inspect --format json"
SNIPPETS = {
    "torch.load(weights_only=True)": (
        "import torch; sd = torch.load({path!r}, weights_only=True, map_location='cpu'); print(len(sd))"
    ),
    "torch.load(mmap=True, weights_only=True)": (
        "import torch; sd = torch.load({path!r}, mmap=True, weights_only=True, map_location='cpu'); print(len(sd))"
    ),
    "safetensors.safe_open (list keys)": (
        "from safetensors import safe_open\n"
        "with safe_open({path!r}, 'np') as f:\n"
        "    print(len([(k, f.get_slice(k).get_shape()) for k in f.keys()]))"
    ),
    "h5py (list datasets)": (
        "import h5py\nout = []\n"
        "with h5py.File({path!r}, 'r') as f:\n"
        "    f.visititems(lambda n, o: out.append((n, o.shape, o.dtype)) if isinstance(o, h5py.Dataset) else None)\n"
        "print(len(out))"
    ),
    "gguf-py GGUFReader (list tensors)": (
        "from gguf import GGUFReader\nr = GGUFReader({path!r})\n"
        "print(len([(t.name, t.shape, t.tensor_type) for t in r.tensors]))"
    ),
}
BASELINES = {
    "safetensors": ["safetensors.safe_open (list keys)"],
    "torch-zip": ["torch.load(weights_only=True)", "torch.load(mmap=True, weights_only=True)"],
    "torch-legacy": ["torch.load(weights_only=True)", "torch.load(mmap=True, weights_only=True)"],
    "hdf5": ["h5py (list datasets)"],
    "tf-bundle": [],  # TensorFlow's own reader is not installed (ckptctl reads TF without it)
    "gguf": ["gguf-py GGUFReader (list tensors)"],
}
# wrapped around `ckptctl inspect` once (not timed) to learn whether it imported torch / h5py
IMPORT_PROBE = (
    "import sys\nfrom ckptctl.cli.app import app\n"
    "try:\n    app(['inspect', sys.argv[1], '--format', 'json'])\nexcept SystemExit as e:\n    code = e.code\n"
    "sys.stderr.write('IMPORTED=' + ','.join(m for m in ('torch', 'h5py', 'numpy') if m in sys.modules) + '\\n')\n"
    "sys.exit(code)\n"
)


# ---- data -------------------------------------------------------------------------------------
def plan(size_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """~300 fp32 tensors totalling size_gb GB: an embedding of ~10%, 24 transformer-ish layers."""
    total = size_gb * 1e9
    layers = 24
    d = max(8, int(math.sqrt(0.9 * total / (layers * 12 * 4))) // 8 * 8)
    vocab = max(8, int(0.1 * total / (4 * d)))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + f"self_attn.{n}.weight", (d, d)))
            out.append((p + f"self_attn.{n}.bias", (d,)))
        out.append((p + "mlp.up_proj.weight", (4 * d, d)))
        out.append((p + "mlp.up_proj.bias", (4 * d,)))
        out.append((p + "mlp.down_proj.weight", (d, 4 * d)))
        out.append((p + "mlp.down_proj.bias", (d,)))
        out.append((p + "input_layernorm.weight", (d,)))
        out.append((p + "post_attention_layernorm.weight", (d,)))
    out.append(("model.norm.weight", (d,)))
    out.append(("lm_head.bias", (vocab,)))
    return out


def write_safetensors(path: str, tensors) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Header + a sparse data buffer (f.truncate): no data is written. Returns name -> (offset, shape)."""
    header, offsets, pos = {}, {}, 0
    for name, shape in tensors:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = (pos, shape)
        pos += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(8 + len(hb) + pos)
    base = 8 + len(hb)
    return {k: (base + off, shape) for k, (off, shape) in offsets.items()}


def write_torch(st_path: str, layout, path: str, legacy: bool) -> None:
    """torch.save of tensors that map the (sparse) safetensors file: pages, not copies."""
    import torch

    with open(st_path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    sd = {}
    for name, (off, shape) in layout.items():
        sd[name] = torch.frombuffer(mm, dtype=torch.float32, count=math.prod(shape), offset=off).view(shape)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    del sd


def write_hdf5(path: str, tensors) -> None:
    """Contiguous fp32 datasets allocated at creation and never filled (fast, sparse where the FS allows)."""
    import h5py

    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["framework"] = "bench"
        for name, shape in tensors:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            f.create_dataset(name, shape=shape, dtype="<f4", dcpl=dcpl)


def write_gguf(path: str, size_gb: float) -> int:
    """A llama-shaped GGUF of ~size_gb GB written by gguf-py (the `dev` extra): a 32000-token
    tokenizer in the metadata, 32 layers of Q4_K matrices (Q6_K ffn_down and output), F32 norms;
    header and tensor infos only, the data a sparse hole (truncate). Returns the tensor count."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    from gguf import GGMLQuantizationType as Q

    def nbytes(shape, q) -> int:
        blk, size = GGML_QUANT_SIZES[q]
        return math.prod(shape) // blk * size

    def plan_for(d: int, layers: int = 32, vocab: int = 32000):
        ff = -(-d * 8 // 3 // 256) * 256
        out = [("token_embd.weight", (vocab, d), Q.Q4_K)]
        for i in range(layers):
            p = f"blk.{i}."
            out += [
                (p + n, (d, d), Q.Q4_K)
                for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")
            ]
            out += [
                (p + "ffn_gate.weight", (ff, d), Q.Q4_K),
                (p + "ffn_up.weight", (ff, d), Q.Q4_K),
                (p + "ffn_down.weight", (d, ff), Q.Q6_K),
            ]
            out += [(p + "attn_norm.weight", (d,), Q.F32), (p + "ffn_norm.weight", (d,), Q.F32)]
        out += [("output_norm.weight", (d,), Q.F32), ("output.weight", (vocab, d), Q.Q6_K)]
        return out

    d = 256
    while sum(nbytes(s, q) for _n, s, q in plan_for(d)) < size_gb * 1e9:
        d += 256
    tensors = plan_for(d)
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 32)
    w.add_uint32("llama.embedding_length", d)
    w.add_array("tokenizer.ggml.tokens", [f"<tok{i}>" for i in range(32000)])
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(32000)])
    w.add_array("tokenizer.ggml.token_type", [1] * 32000)
    for name, shape, q in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    start = GGUFWriter.ggml_pad(f.tell(), w.data_alignment)
    f.truncate(start + sum(GGUFWriter.ggml_pad(nbytes(s, q), w.data_alignment) for _n, s, q in tensors))
    w.close()
    return len(tensors)


# ---- measuring --------------------------------------------------------------------------------
TIME = shutil.which("time", path="/usr/bin:/bin")


def measure(cmd: list[str]) -> tuple[float, float, int, str, float]:
    """(wall s, peak RSS MiB, exit code, last stderr line, CPU s = user + sys) of one fresh process.

    Peak RSS comes from /usr/bin/time when present: a child's ru_maxrss counts the RSS of the
    process that forked it, so measuring from this (larger) Python process would inflate it.
    CPU time is less sensitive than wall time to other work on the machine.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        full = [TIME, "-q", "-f", "%M %U %S", "-o", rss.name, *cmd] if TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        kb, cpu = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
        if TIME:
            text = open(rss.name).read().split()
            if len(text) >= 3 and text[-3].isdigit():
                kb, cpu = int(text[-3]), float(text[-2]) + float(text[-1])
    return wall, kb / 1024, code, lines[-1] if lines else "", cpu


def run_candidates(cmds: list[list[str]], repeat: int) -> list[dict]:
    """Each command's best wall and CPU time and peak RSS, the candidates in turns (A, B, A, B,
    ...: benchmarks/timing.py), so a busy spell of the machine is shared by all of them."""
    res = interleave([Candidate(str(i), cmd) for i, cmd in enumerate(cmds)], repeat, before_each=None)
    out = []
    for i in range(len(cmds)):
        r = res[str(i)]
        if not r.ok:
            out.append({"ok": False, "error": (r.error or "").replace("|", "\\|")[:100]})
        else:
            out.append({"ok": True, "wall": r.wall, "rss": r.rss_mb * 1e6 / 2**20, "cpu": r.cpu})
    return out


def imported(path: str) -> str:
    res = subprocess.run([PY, "-c", IMPORT_PROBE, path], capture_output=True, text=True)
    for line in res.stderr.splitlines():
        if line.startswith("IMPORTED="):
            return line.removeprefix("IMPORTED=") or "-"
    return "?"


def generate(spec: dict) -> None:
    tensors = plan(spec["size_gb"])
    files, formats = spec["files"], spec["formats"]
    layout = write_safetensors(files["safetensors"], tensors)
    for fmt, legacy in (("torch-zip", False), ("torch-legacy", True)):
        if fmt in formats and not os.path.exists(files[fmt]):  # kept from an earlier --keep run
            write_torch(files["safetensors"], layout, files[fmt], legacy=legacy)
    if "hdf5" in formats:
        write_hdf5(files["hdf5"], tensors)
    if "tf-bundle" in formats:
        write_tf(files["tf-bundle"], tensors)
    if "gguf" in formats:
        write_gguf(files["gguf"], spec["size_gb"])


def write_tf(prefix: str, tensors) -> None:
    """A TF bundle (P.index + a sparse P.data-00000-of-00001) with TF 2 object-based keys."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tf_writer import write_bundle_streaming

    specs = [
        (f"model/{name.replace('.', '/')}/.ATTRIBUTES/VARIABLE_VALUE", "float32", shape, None)
        for name, shape in tensors
    ]
    write_bundle_streaming(prefix, specs)


def checkpoint_files(fmt: str, path: str) -> list[str]:
    if fmt == "tf-bundle":
        return [f"{path}.index", f"{path}.data-00000-of-00001"]
    return [path]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--generate":
        generate(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="size of each checkpoint in GB (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per candidate; best wall time is kept (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument(
        "--dir",
        default=None,
        help="where to write the data (default: a new folder in /tmp); "
        "torch files already there from a --keep run of the same size are reused",
    )
    ap.add_argument("--formats", default="safetensors,torch-zip,torch-legacy,hdf5,tf-bundle,gguf")
    args = ap.parse_args()

    base = args.dir or tempfile.mkdtemp(prefix="ckptctl-bench-", dir="/tmp")
    os.makedirs(base, exist_ok=True)
    formats = args.formats.split(",")
    tensors = plan(args.size_gb)
    files = {
        "safetensors": os.path.join(base, "model.safetensors"),
        "torch-zip": os.path.join(base, "model.pt"),
        "torch-legacy": os.path.join(base, "model_legacy.pt"),
        "hdf5": os.path.join(base, "model.h5"),
        "tf-bundle": os.path.join(base, "tf", "ckpt-1000"),  # a prefix, as TF users name it
        "gguf": os.path.join(base, "model.gguf"),
    }
    try:
        t0 = time.perf_counter()
        # generate in a child process: torch's 400 MB would otherwise stay in this one
        subprocess.run(
            [PY, __file__, "--generate", json.dumps({"size_gb": args.size_gb, "files": files, "formats": formats})],
            check=True,
        )
        largest = max(4 * math.prod(s) for _, s in tensors)
        print(
            f"generated {len(tensors)} fp32 tensors per file (largest {largest / 1e6:.0f} MB) "
            f"in {time.perf_counter() - t0:.1f} s under {base}\n",
            file=sys.stderr,
            flush=True,
        )

        rows = []
        for fmt in formats:
            path = files[fmt]
            size = sum(os.path.getsize(f) for f in checkpoint_files(fmt, path))
            subprocess.run(["cat", *checkpoint_files(fmt, path)], stdout=subprocess.DEVNULL)  # warm page cache
            cmds = [[PY, "-m", "ckptctl", *INSPECT.split()[1:], path]]
            cmds += [[PY, "-c", SNIPPETS[name].format(path=path)] for name in BASELINES[fmt]]
            ins, *others = run_candidates(cmds, args.repeat)
            rows.append((fmt, size, "`ckptctl inspect`", ins, imported(path), None))
            for name, res in zip(BASELINES[fmt], others):
                uses = "torch" if name.startswith("torch") else name.split(".")[0].split(" ")[0]
                rows.append((fmt, size, f"`{name}`", res, uses, ins))

        print("| format | file | command | wall | CPU | peak RSS | imports | time vs inspect | RSS vs inspect |")
        print("|---|---|---|---|---|---|---|---|---|")
        for fmt, size, name, r, imp, ref in rows:
            if r["ok"]:
                record("inspect", fmt, name, r["wall"], r["cpu"], r["rss"] * 2**20 / 1e6)
            if not r["ok"]:
                print(f"| {fmt} | {size / 1e9:.2f} GB | {name} | failed: {r['error']} | | | {imp} | | |")
                continue
            tr = rr = ""
            if ref is not None and ref["ok"]:
                tr = f"{r['wall'] / ref['wall']:.1f}×"
                rr = f"{r['rss'] / ref['rss']:.1f}×"
            print(
                f"| {fmt} | {size / 1e9:.2f} GB | {name} | {r['wall']:.3f} s | {r['cpu']:.2f} s | {r['rss']:.0f} MiB "
                f"| {imp} "
                f"| {tr} | {rr} |"
            )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"\n{len(tensors)} tensors per file; best of {args.repeat} runs (wall, CPU = user + sys), largest "
            f"peak RSS; each a fresh process with a warm page cache; load average {load:.1f} on "
            f"{os.cpu_count()} CPUs at the end. Targets for inspect: < 0.5 s, < 100 MB."
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
