"""Fuzz targets for every ckptctl parser, the mutator that feeds them, and a crash-safe runner.

Used two ways:
- tests/test_fuzz_parsers.py: a short, deterministic run inside the test suite (hypothesis drives
  `mutate` through `st.randoms()`, so a failing input shrinks to the mutations that matter);
- tools/fuzz.sh -> `python tools/fuzz_targets.py campaign ...`: the long run (>= 10,000 inputs per
  parser), each parser in a worker subprocess that a supervisor restarts after a crash.

Seeds are real, small, valid files written by the producer's own library (safetensors, torch,
h5py, torch.distributed.checkpoint, gguf-py, TensorStore, tests/tf_writer.py) or taken from
../shared/fixtures when present. Inputs are seeds with bit flips, truncations, length-field edits
(any 1/2/4/8-byte word that looks like a length or offset, set to 0, the file size +- 1, 2^31,
2^63, 10^18, ...), numbers in JSON replaced, ranges deleted, duplicated or overwritten, and a
few wholly random files. Formats with checksums are also mutated *under* the checksum (the OCDBT
manifest is decoded, mutated, re-compressed and re-sealed; the TF index is rebuilt from mutated
entries) so that the parser behind the checksum is reached.

The property (`check_one`): reading an input either gives a result or raises a CkptError
subclass. Anything else is a finding: another exception, a MemoryError (the worker runs under
RLIMIT_AS: a length field claiming 10^18, or 10^10, must not allocate), a hang (CPU-time alarm
per input, and a wall-clock limit in the supervisor), or the worker dying (a signal inside a C
library, e.g. libhdf5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # tf_writer: TF's byte layout, independent of ckptctl

# parsers that link a C library able to crash the process: always fuzzed in a worker subprocess
SUBPROCESS_PARSERS = ("hdf5", "keras")


# ---- mutation ----------------------------------------------------------------------------------
INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    10**10,
    10**12,
    10**18,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
]
TEXT_NUMBERS = [
    "-1",
    "0",
    "1",
    "-9223372036854775809",
    "18446744073709551616",
    "1000000000000000000",
    "1e308",
    "1e999",
    "-0",
    "2.5",
    "NaN",
    "Infinity",
    "99999999999999999999999999",
    "[]",
    "null",
    '"7"',
    "{}",
    "true",
]
_NUM = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def length_fields(data: bytes, limit: int = 1 << 16) -> list[int]:
    """Offsets of little-endian u32/u64 words (in the first `limit` bytes) whose value could be a
    length or an offset into the file: where a length-field edit hurts most."""
    n = len(data)
    out = []
    for off in range(min(n, limit) - 3):
        v = struct.unpack_from("<I", data, off)[0]
        if 1 <= v <= n and (off + 8 > n or struct.unpack_from("<Q", data, off)[0] == v or off % 4 == 0):
            out.append(off)
    return out


def mutate(data: bytes, rnd: random.Random, fields: list[int] | None = None, text: bool = False) -> bytes:
    """1-5 random edits of `data` (bit flips, interesting bytes, truncation, length-field edits,
    JSON number swaps, range deletion/duplication/overwrite, random inserts)."""
    d = bytearray(data)
    for _ in range(rnd.choice((1, 1, 1, 2, 2, 3, 5))):
        if not d:
            d = bytearray(rnd.randbytes(rnd.randint(1, 64)))
            continue
        n = len(d)
        op = rnd.randrange(11)
        pos = rnd.randrange(n)
        if op == 0:
            d[pos] ^= 1 << rnd.randrange(8)
        elif op == 1:
            d[pos] = rnd.choice((0, 0xFF, 0x7F, 0x80, 1, rnd.randrange(256)))
        elif op == 2:
            del d[rnd.randrange(n) :]
        elif op in (3, 4) and not text:
            if fields and rnd.randrange(4):
                pos = rnd.choice(fields)
            width = rnd.choice((1, 2, 4, 4, 8, 8))
            old = int.from_bytes(d[pos : pos + width].ljust(width, b"\0"), "little")
            v = rnd.choice(INTERESTING + [n, n + 1, n - 1, old + 1, old - 1, old * 2, old // 2, old + 4096])
            v %= 1 << (8 * width)
            d[pos : pos + width] = v.to_bytes(width, rnd.choice(("little", "little", "little", "big")))
        elif op in (3, 4):
            nums = list(_NUM.finditer(bytes(d)))
            if nums:
                m = rnd.choice(nums)
                d[m.start() : m.end()] = rnd.choice(TEXT_NUMBERS).encode()
            else:
                d.insert(pos, rnd.randrange(256))
        elif op == 5:
            del d[pos : pos + rnd.randint(1, 64)]
        elif op == 6:
            chunk = d[pos : pos + rnd.randint(1, 256)]
            at = rnd.randrange(n + 1)
            d[at:at] = chunk * rnd.choice((1, 1, 2, 16))
        elif op == 7:
            d[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        elif op == 8:
            src = rnd.randrange(n)
            ln = rnd.randint(1, 64)
            d[pos : pos + ln] = d[src : src + ln]
        elif op == 9 and text:
            d[pos:pos] = rnd.choice((b"{", b"}", b"[", b"]", b",", b'"', b":", b"\\", b"\\ud800", b"\xff", b"\x00"))
        else:
            ln = rnd.randint(1, 8)
            d[pos : pos + ln] = rnd.randbytes(ln)
    return bytes(d)


JSON_VALUES = [
    None,
    True,
    0,
    -1,
    1.5,
    10**18,
    2**64,
    -(2**63) - 1,
    1e308,
    "",
    "x",
    "\ud800",
    "F32",
    "../../etc",
    [],
    [0],
    [-1],
    [1, 2],
    [2**63, 1],
    [[1]],
    {},
    {"a": 1},
    [None],
    ["x", 0],
]


def mutate_json(data: bytes, rnd: random.Random) -> bytes:
    """Structure-aware edits of a JSON document: a random node replaced by a value of another type
    (or an extreme number), a key deleted, renamed or duplicated; falls back to `mutate`."""
    try:
        doc = json.loads(data)
    except ValueError:
        return mutate(data, rnd, None, True)
    levels: dict[int, list] = {}  # depth -> (container, key) pairs: a depth first, then a node

    def walk(x, depth):
        if isinstance(x, dict):
            for k in list(x):
                levels.setdefault(depth, []).append((x, k))
                walk(x[k], depth + 1)
        elif isinstance(x, list):
            for i in range(len(x)):
                levels.setdefault(depth, []).append((x, i))
                walk(x[i], depth + 1)

    walk(doc, 0)
    for _ in range(rnd.choice((1, 1, 2, 3))):
        if not levels:
            break
        c, k = rnd.choice(levels[rnd.choice(sorted(levels))])
        op = rnd.randrange(4)
        if op == 0 or isinstance(c, list):
            if isinstance(c, list) and k >= len(c):
                continue
            c[k] = rnd.choice(JSON_VALUES)
        elif op == 1 and k in c:
            del c[k]
        elif op == 2 and k in c:
            c[rnd.choice(("", "__metadata__", k + "x", k.upper(), "\x00", k[:-1]))] = c.pop(k)
        elif k in c:
            c[k] = {"nested": c[k]} if rnd.randrange(2) else [c[k], c[k]]
    return json.dumps(doc, ensure_ascii=rnd.randrange(2) == 0).encode("utf-8", "surrogatepass")


# ---- seeds -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Seed:
    """One valid checkpoint: `template` (a file or a folder) copied once into the work folder; each
    input replaces the file at `target` (relative to the copy) and the reader opens `entry`."""

    parser: str
    name: str
    template: Path
    target: str  # the file inputs replace ("" = the template itself is the file)
    entry: str  # what ckptctl opens ("" = the copy itself)
    text: bool = False
    # body -> the target file's bytes (checksums re-sealed), or {relative path: bytes} for several
    encode: Callable[[bytes, random.Random], bytes | dict[str, bytes]] | None = None
    data: bytes = b""  # the bytes mutate() starts from (the decoded body when `encode` is set)
    fields: list[int] = dataclasses.field(default_factory=list)

    def generate(self, rnd: random.Random) -> bytes:
        if rnd.randrange(60) == 0:
            return rnd.randbytes(rnd.randint(0, 512))  # now and then no structure at all
        if self.text and rnd.randrange(2):
            body = mutate_json(self.data, rnd)
        else:
            body = mutate(self.data, rnd, self.fields, self.text)
        return self.encode(body, rnd) if self.encode else body


def _file_seed(parser, name, path: Path, text=False) -> Seed:
    data = path.read_bytes()
    return Seed(parser, name, path, "", "", text, None, data, [] if text else length_fields(data))


def _dir_seed(parser, name, root: Path, target: str, entry: str = "", text=False) -> Seed:
    data = (root / target).read_bytes()
    return Seed(parser, name, root, target, entry, text, None, data, [] if text else length_fields(data))


def _quiet():
    warnings.simplefilter("ignore")


def seeds_safetensors(d: Path) -> list[Seed]:
    import torch
    from safetensors.torch import save_file

    p = d / "st.safetensors"
    save_file(
        {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b": torch.ones(3, dtype=torch.bfloat16),
            "i": torch.tensor([1, -2], dtype=torch.int64),
            "m": torch.tensor([True, False]),
        },
        p,
        metadata={"format": "pt", "epoch": "3"},
    )
    out = [_file_seed("safetensors", "save_file", p)]
    hdr_len = struct.unpack_from("<Q", out[0].data)[0]
    raw = out[0].data
    body = raw[8 : 8 + hdr_len]

    def reseal(header: bytes, rnd: random.Random) -> bytes:  # the JSON mutated, the length kept right
        return struct.pack("<Q", len(header)) + header + raw[8 + hdr_len :]

    out.append(Seed("safetensors", "header-json", p, "", "", True, reseal, body))
    fx = FIXTURES / "real" / "safetensors" / "kolanich_overall.safetensors"
    if fx.is_file():
        out.append(_file_seed("safetensors", "fixture-kolanich", fx))
    return out


def seeds_pickle(d: Path) -> list[Seed]:
    import pickle
    from collections import OrderedDict

    import numpy as np
    import torch

    out = []
    p = d / "np.pkl"
    p.write_bytes(
        pickle.dumps(
            {
                "w": np.arange(6, dtype=np.float32).reshape(2, 3),
                "n": 3,
                "s": "x",
                "b": np.ones(2, np.float16),
                "t": (1.5, None, b"by"),
            },
            protocol=2,
        )
    )
    out.append(_file_seed("pickle", "numpy-proto2", p))
    p = d / "od.pkl"
    p.write_bytes(
        pickle.dumps(OrderedDict(a=1, w=np.arange(3, dtype=np.int32), b=[1, 2, {"c": 2.5}], d="text"), protocol=0)
    )
    out.append(_file_seed("pickle", "proto0-text", p))
    p = d / "torch.pkl"  # torch pickles a tensor's storage as a nested torch.save (_load_from_bytes)
    p.write_bytes(pickle.dumps({"w": torch.arange(4, dtype=torch.float32)}, protocol=4))
    out.append(_file_seed("pickle", "torch-tensor-proto4", p))
    return out


def seeds_torch_zip(d: Path) -> list[Seed]:
    import torch

    p = d / "model.pt"
    torch.save(
        {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b": torch.ones(3, dtype=torch.float16),
            "step": 7,
            "opt": {"lr": 0.1},
        },
        p,
    )
    out = [_file_seed("torch-zip", "torch.save", p)]
    fx = FIXTURES / "real" / "torch_zip" / "candle_test_with_key.pt"
    if fx.is_file():
        out.append(_file_seed("torch-zip", "fixture-candle", fx))
    return out


def seeds_torch_legacy(d: Path) -> list[Seed]:
    import torch

    p = d / "legacy.pt"
    t = torch.arange(8, dtype=torch.float32)
    torch.save(
        {"w": t.reshape(2, 4), "v": t[2:5], "b": torch.ones(2, dtype=torch.int16)},
        p,
        _use_new_zipfile_serialization=False,
    )
    return [_file_seed("torch-legacy", "torch.save-legacy", p)]


def seeds_hdf5(d: Path) -> list[Seed]:
    import h5py
    import numpy as np

    p = d / "model.h5"
    with h5py.File(p, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        g.create_dataset("kernel:0", data=np.arange(12, dtype=np.float32).reshape(3, 4))
        g.create_dataset("bias:0", data=np.ones(4, np.float16), chunks=(2,), compression="gzip")
        f.create_dataset("s", data=np.array([1, 2], ">i4"))
    out = [_file_seed("hdf5", "h5py-keras2", p)]
    fx = FIXTURES / "tensorflow" / "keras2_full.h5"
    if fx.is_file():
        out.append(_file_seed("hdf5", "fixture-keras2", fx))
    return out


def seeds_keras(d: Path) -> list[Seed]:
    fx = FIXTURES / "tensorflow" / "keras3_modelcheckpoint" / "best.keras"
    if fx.is_file():
        return [_file_seed("keras", "fixture-keras3", fx)]
    # without ../shared: a .keras archive written with zipfile + h5py (Keras 3's layout)
    import zipfile

    import h5py
    import numpy as np

    h = d / "model.weights.h5"
    with h5py.File(h, "w") as f:
        f.create_group("layers/dense/vars").create_dataset("0", data=np.ones((2, 3), np.float32))
    p = d / "model.keras"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        z.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
        z.write(h, "model.weights.h5")
    return [_file_seed("keras", "zipfile+h5py", p)]


def seeds_dcp(d: Path) -> list[Seed]:
    import torch
    import torch.distributed.checkpoint as dcp

    root = d / "dcp"
    with warnings.catch_warnings():
        _quiet()
        dcp.save(
            {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}, "step": 5},
            checkpoint_id=str(root),
            no_dist=True,
        )
    return [_dir_seed("dcp", "dcp.save", root, ".metadata")]


def seeds_sharded(d: Path) -> list[Seed]:
    import torch
    from safetensors.torch import save_file

    root = d / "sharded"
    root.mkdir()
    wm = {}
    for i, names in enumerate((["a", "b"], ["c"])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: torch.full((2, 2), float(i)) for n in names}, root / fn, metadata={"format": "pt"})
        wm.update({n: fn for n in names})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 48}, "weight_map": wm}))
    return [_dir_seed("sharded", "hf-index", root, "model.safetensors.index.json", text=True)]


def seeds_tf(d: Path) -> list[Seed]:
    import numpy as np
    import tf_writer

    root = d / "tf"
    captured: list = []
    orig = tf_writer.table

    def spy(items, **kw):
        captured[:] = list(items)
        return orig(items, **kw)

    tf_writer.table = spy
    try:
        arrays = {f"layer{i}/w/.ATTRIBUTES/VARIABLE_VALUE": np.full((i + 1, 2), i, np.float32) for i in range(6)}
        arrays["s/.ATTRIBUTES/VARIABLE_VALUE"] = np.array([b"ab", b"c"], dtype=object)
        tf_writer.write_bundle(
            root / "ckpt", arrays, block_size=128, slices={"layer5/w/.ATTRIBUTES/VARIABLE_VALUE": [3, 3]}
        )
    finally:
        tf_writer.table = orig
    items = list(captured)
    out = [_dir_seed("tf-bundle", "index-bytes", root, "ckpt.index", "ckpt")]

    # under the checksums: one or two entries (keys or entry protos) mutated, the table rebuilt
    def rebuild(blob: bytes, rnd: random.Random) -> bytes:
        its = [list(kv) for kv in items]
        for _ in range(rnd.choice((1, 1, 2))):
            kv = rnd.choice(its)
            j = rnd.randrange(2)
            kv[j] = mutate(kv[j], rnd, None, False)
        if rnd.randrange(8) == 0:
            del its[rnd.randrange(len(its))]
        return tf_writer.table(
            [tuple(kv) for kv in its], block_size=rnd.choice((64, 128, 4096)), restart_interval=rnd.choice((1, 2, 16))
        )

    out.append(Seed("tf-bundle", "entries-resealed", root, "ckpt.index", "ckpt", False, rebuild, b""))
    out.append(_object_graph_seed(d / "tf-graph"))
    fx = FIXTURES / "tensorflow" / "tf2_manager_run"
    if fx.is_dir():
        out.append(_dir_seed("tf-bundle", "fixture-tf2-manager", fx, "ckpt-10.index", "ckpt-10"))
    return out


def _object_graph_seed(root: Path) -> Seed:
    """A TF 2 bundle whose _CHECKPOINTABLE_OBJECT_GRAPH (a TrackableObjectGraph proto, stored as a
    string tensor) is the body mutated; index and data are rewritten with right sizes and CRCs."""
    import numpy as np
    import tf_writer as tw

    def attr(name, full, key):
        return tw.f_bytes(1, name.encode()) + tw.f_bytes(2, full.encode()) + tw.f_bytes(3, key.encode())

    k_w, k_m = "model/w/.ATTRIBUTES/VARIABLE_VALUE", "optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    nodes = [
        tw.f_bytes(2, attr("VARIABLE_VALUE", "dense/kernel", k_w)),
        tw.f_bytes(2, attr("VARIABLE_VALUE", "Adam/m/dense/kernel", k_m)),
        tw.f_bytes(3, tw.f_varint(1, 0) + tw.f_bytes(2, b"m") + tw.f_varint(3, 1)),
    ]
    graph = b"".join(tw.f_bytes(1, n) for n in nodes)
    arrays = {k_w: np.arange(6, dtype=np.float32).reshape(2, 3), k_m: np.zeros((2, 3), np.float32)}

    def write(body: bytes, rnd: random.Random | None = None) -> dict[str, bytes]:
        tw.write_bundle(root / "ckpt", {**arrays, "_CHECKPOINTABLE_OBJECT_GRAPH": np.array([body], dtype=object)})
        return {
            "ckpt.index": (root / "ckpt.index").read_bytes(),
            "ckpt.data-00000-of-00001": (root / "ckpt.data-00000-of-00001").read_bytes(),
        }

    write(graph)
    return Seed(
        "tf-bundle", "object-graph-resealed", root, "ckpt.index", "ckpt", False, write, graph, length_fields(graph)
    )


def seeds_gguf(d: Path) -> list[Seed]:
    out = []
    fx = FIXTURES / "jax_gguf" / "tiny-llama.gguf"
    if fx.is_file():
        out.append(_file_seed("gguf", "fixture-tiny-llama", fx))
    import gguf
    import numpy as np

    p = d / "small.gguf"
    w = gguf.GGUFWriter(os.fspath(p), "llama")
    w.add_key_value("general.name", "fuzz", gguf.GGUFValueType.STRING)
    w.add_key_value("llama.context_length", 64, gguf.GGUFValueType.UINT32)
    w.add_key_value("tokenizer.ggml.tokens", ["a", "bc"], gguf.GGUFValueType.ARRAY)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("blk.0.attn_q.weight", np.ones((2, 8), np.float16))
    w.add_tensor("q8", np.zeros((1, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.append(_file_seed("gguf", "gguf-py", p))
    return out


def _ocdbt_encode_seed(parser, name, root: Path, rel: str, entry: str, magic: int) -> Seed:
    """A seed whose body is the decoded OCDBT manifest/node: inputs are re-compressed and re-sealed
    (length and CRC-32C right), so the parser behind the envelope sees them."""
    import google_crc32c
    import zstandard

    from ckptctl.formats import ocdbt

    raw = (root / rel).read_bytes()
    body = ocdbt.decode_envelope(raw, magic, "seed", root / rel)

    def seal(b: bytes, rnd: random.Random) -> bytes:
        comp = rnd.choice((0, 1, 1))
        payload = zstandard.ZstdCompressor().compress(b) if comp else b
        head = struct.pack(">I", magic) + b"\0" * 8 + b"\x00" + bytes([comp])
        whole = bytearray(head + payload + b"\0\0\0\0")
        struct.pack_into("<Q", whole, 4, len(whole))
        struct.pack_into("<I", whole, len(whole) - 4, google_crc32c.value(bytes(whole[:-4])))
        return bytes(whole)

    return Seed(parser, name, root, rel, entry, False, seal, body, length_fields(body))


def seeds_orbax(d: Path) -> list[Seed]:
    """Orbax: the OCDBT manifest (as bytes, and decoded under its checksum), a B-tree node file,
    the _METADATA tree JSON, and Zarr array metadata (.zarray v2, zarr.json v3)."""
    import numpy as np

    out = []
    fx = FIXTURES / "jax_gguf" / "orbax_single"
    if fx.is_dir():
        out.append(_dir_seed("orbax", "manifest-bytes", fx, "manifest.ocdbt"))
        from ckptctl.formats import ocdbt

        magic = struct.unpack_from(">I", (fx / "manifest.ocdbt").read_bytes())[0]
        out.append(_ocdbt_encode_seed("orbax", "manifest-resealed", fx, "manifest.ocdbt", "", magic))
        out.append(_dir_seed("orbax", "metadata-json", fx, "_METADATA", text=True))
        nodes = sorted((fx / "d").iterdir())
        if nodes:
            out.append(_dir_seed("orbax", "btree-node-bytes", fx, f"d/{nodes[0].name}"))
            with contextlib.suppress(Exception):
                nmagic = struct.unpack_from(">I", nodes[0].read_bytes())[0]
                if nmagic != magic:
                    out.append(_ocdbt_encode_seed("orbax", "btree-node-resealed", fx, f"d/{nodes[0].name}", "", nmagic))
        del ocdbt
    # a Zarr v2 item written by hand, as orbax does without OCDBT (numpy chunk bytes)
    root = d / "zarr2"
    root.mkdir()
    tree = {}
    for name, arr in {"params/w": np.arange(12, dtype=np.float32).reshape(3, 4), "params/b": np.ones(4, "<f2")}.items():
        parts = name.split("/")
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in parts],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
        z = root / ".".join(parts)
        z.mkdir()
        chunks = [max(1, s // 2) for s in arr.shape]
        (z / ".zarray").write_text(
            json.dumps(
                {
                    "chunks": chunks,
                    "compressor": None,
                    "dimension_separator": ".",
                    "dtype": arr.dtype.str,
                    "fill_value": None,
                    "filters": None,
                    "order": "C",
                    "shape": list(arr.shape),
                    "zarr_format": 2,
                }
            )
        )
        grid = [-(-s // c) for s, c in zip(arr.shape, chunks)]
        for idx in np.ndindex(*grid):
            block = np.zeros(chunks, dtype=arr.dtype)
            src = arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))]
            block[tuple(slice(0, s) for s in src.shape)] = src
            (z / ".".join(map(str, idx))).write_bytes(block.tobytes())
    (root / "_METADATA").write_text(
        json.dumps(
            {
                "tree_metadata": tree,
                "use_ocdbt": False,
                "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True,
            }
        )
    )
    out.append(_dir_seed("orbax", "zarray-json", root, "params.w/.zarray", text=True))
    out.append(_dir_seed("orbax", "zarr2-metadata-json", root, "_METADATA", text=True))
    z3 = _zarr3_seed(d / "zarr3")
    if z3:
        out.append(z3)
    return out


def _zarr3_seed(root: Path) -> Seed | None:
    try:
        import numpy as np
        import tensorstore
    except ImportError:
        return None
    root.mkdir()
    arr = np.arange(16, dtype=np.float32).reshape(4, 4)
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 1}}]
    spec = {
        "driver": "zarr3",
        "kvstore": f"file://{root}/w/",
        "metadata": {
            "shape": [4, 4],
            "data_type": "float32",
            "codecs": codecs,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 4]}},
        },
    }
    tensorstore.open(spec, create=True, open=True).result().write(arr).result()
    tree = {
        str(("w",)): {
            "key_metadata": [{"key": "w", "key_type": 2}],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
    }
    (root / "_METADATA").write_text(
        json.dumps(
            {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True, "store_array_data_equal_to_fill_value": True}
        )
    )
    return _dir_seed("orbax", "zarr3-json", root, "w/zarr.json", text=True)


SEEDS: dict[str, Callable[[Path], list[Seed]]] = {
    "safetensors": seeds_safetensors,
    "pickle": seeds_pickle,
    "torch-zip": seeds_torch_zip,
    "torch-legacy": seeds_torch_legacy,
    "dcp": seeds_dcp,
    "sharded": seeds_sharded,
    "tf-bundle": seeds_tf,
    "gguf": seeds_gguf,
    "orbax": seeds_orbax,
    "hdf5": seeds_hdf5,
    "keras": seeds_keras,
}
PARSERS = list(SEEDS)


def build_seeds(parser: str, d: Path) -> list[Seed]:
    d = Path(d) / parser
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return SEEDS[parser](d)


# ---- the target --------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the CPU-time alarm: an input took too long (a BaseException, so that no
    `except Exception` inside ckptctl swallows it)."""


class Workspace:
    """A private copy of each seed's template; `place(seed, data)` writes one input into it."""

    def __init__(self, seeds: list[Seed], root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.copies: dict[int, Path] = {}
        for i, s in enumerate(seeds):
            dst = self.root / f"{i}-{s.template.name}"
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            if s.template.is_dir():
                shutil.copytree(s.template, dst)
            else:
                shutil.copyfile(s.template, dst)
            self.copies[i] = dst

    def place(self, i: int, seed: Seed, data: bytes | dict[str, bytes]) -> Path:
        copy = self.copies[i]
        for rel, b in data.items() if isinstance(data, dict) else [(seed.target, data)]:
            (copy / rel if rel else copy).write_bytes(b)
        return copy / seed.entry if seed.entry else copy


CHUNK_BUDGET = 4 << 20  # bytes of tensor data read per input (a few tensors, all their chunks)


def exercise(entry: Path, data: bytes | None = None) -> str:
    """Everything a user's command would parse: sniff + open_reader + info() + the chunks of the
    first tensors, the scan walk, and for pickles the machine and describe() on the raw bytes.
    Returns 'ok', 'error' (a CkptError) or 'caught'; anything else propagates."""
    from ckptctl.errors import CkptError
    from ckptctl.formats import open_reader
    from ckptctl.ops import scan as scan_mod

    outcome = "ok"
    try:
        with open_reader(entry) as rd:
            info = rd.info()
            got = 0
            for t in info.tensors[:6]:
                for c in rd.iter_chunks(t.name):
                    got += len(c)
                    if got > CHUNK_BUDGET:
                        break
    except CkptError as e:
        # "caught": a C library crashed in the HDF5 reader's guard child and ckptctl refused the
        # file cleanly (the property holds; counted apart, since it is a libhdf5 bug worth seeing)
        outcome = "caught" if "libhdf5 crashed" in str(e) else "error"
    try:
        scan_mod.scan_file(entry)
    except CkptError:
        pass
    if data is not None:
        from ckptctl.formats import pickles

        try:
            pickles.describe(pickles.Machine(data).load())
        except CkptError:
            pass
    return outcome


@contextlib.contextmanager
def bounded(cpu_seconds: float):
    """A CPU-time alarm (ITIMER_PROF: user+sys, so a loaded machine does not fire it) raising Hang."""

    def fire(signum, frame):
        raise Hang(f"more than {cpu_seconds} s of CPU on one input")

    old = signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_cap(extra: int = 2 << 30):
    """RLIMIT_AS = what the process maps now + `extra`: an allocation a length field asks for
    (10^10, 10^18 bytes) fails with MemoryError instead of succeeding lazily or swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_one(ws: Workspace, i: int, seed: Seed, data: bytes, cpu_seconds: float = 10.0) -> str:
    """Place and exercise one input; 'ok' / 'error', or raise whatever is a finding."""
    entry = ws.place(i, seed, data)
    with bounded(cpu_seconds):
        return exercise(entry, data if seed.parser == "pickle" else None)


def save_input(stem: Path, data: bytes | dict[str, bytes]) -> None:
    """stem.bin, or stem--<file> for each file of a several-file input."""
    if isinstance(data, dict):
        for rel, b in data.items():
            stem.with_name(f"{stem.name}--{rel.replace('/', '_')}").write_bytes(b)
    else:
        stem.with_suffix(".bin").write_bytes(data)


def finding_key(exc: BaseException) -> str:
    """Exception type + the innermost ckptctl frame: one key per distinct bug."""
    where = "?"
    for fr in traceback.extract_tb(exc.__traceback__):
        if "/ckptctl/" in fr.filename:
            where = f"{fr.filename.split('/ckptctl/')[-1]}:{fr.lineno}"
    return f"{type(exc).__name__}@{where}"


# ---- the long run: worker + supervisor ---------------------------------------------------------
def _input(seeds: list[Seed], parser: str, seed: int, i: int) -> tuple[int, bytes]:
    rnd = random.Random(f"{seed}:{parser}:{i}")
    k = i % len(seeds)
    return k, seeds[k].generate(rnd)


def worker(parser: str, start: int, n: int, seed: int, out: Path) -> None:
    """Run inputs start..n-1 of `parser`; progress in out/<parser>.cur (the input now running),
    findings in out/findings/, tallies appended to out/<parser>.log."""
    os.nice(0)
    out = Path(out)
    (out / "findings").mkdir(parents=True, exist_ok=True)
    if parser in SUBPROCESS_PARSERS:
        # this worker is the crash boundary: a libhdf5 crash should kill it (the supervisor saves
        # the input), not be turned into a clean error by the reader's own fork guard
        from ckptctl.formats.hdf5 import HDF5Reader

        HDF5Reader._crash_guard = lambda self: None
    seeds = build_seeds(parser, out / "seeds")
    ws = Workspace(seeds, out / "work" / parser)
    cur = out / f"{parser}.cur"
    tally = {"ok": 0, "error": 0, "caught": 0, "finding": 0}
    t0, c0 = time.monotonic(), time.process_time()
    with warnings.catch_warnings(), memory_cap():
        _quiet()
        cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        for i in range(start, n):
            # a loop inside C code (libhdf5) never returns to Python for the alarm: the kernel
            # ends this worker with SIGXCPU after 5 s more CPU, and the supervisor records a hang
            resource.setrlimit(resource.RLIMIT_CPU, (int(time.process_time()) + 5, cpu_hard))
            k, data = _input(seeds, parser, seed, i)
            # the input now running, and the tally of those before it (read by the supervisor
            # when this worker dies, so that no input goes uncounted)
            cur.write_text(f"{i}\t{ws.copies[k]}\t{seeds[k].name}\t{json.dumps(tally)}")
            try:
                outcome = check_one(ws, k, seeds[k], data)
                tally[outcome] += 1
                if outcome == "caught" and tally["caught"] <= 20:
                    save_input(out / "findings" / f"{parser}-caught-{i}", data)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - every other exception is what we look for
                tally["finding"] += 1
                key = finding_key(e)
                name = hashlib.sha1(key.encode()).hexdigest()[:10]
                p = out / "findings" / f"{parser}-{name}"
                if not p.with_suffix(".txt").exists():
                    save_input(p, data)
                    p.with_suffix(".txt").write_text(
                        f"parser {parser} seed {seeds[k].name} input {i}\n{key}\n"
                        + "".join(traceback.format_exception(e))
                    )
    cur.write_text(f"done\t\t\t{json.dumps(tally)}")
    with open(out / f"{parser}.log", "a") as f:
        f.write(
            json.dumps(
                {
                    "start": start,
                    "end": n,
                    **tally,
                    "wall": round(time.monotonic() - t0, 1),
                    "cpu": round(time.process_time() - c0, 1),
                }
            )
            + "\n"
        )


def campaign(parser: str, n: int, seed: int, out: Path, wall_limit: float = 120.0) -> dict:
    """Run `worker` in a subprocess; when it dies (a signal, a hang past `wall_limit`) record the
    input it was on as a crash and start a new worker after it. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "findings").mkdir(exist_ok=True)
    log = out / f"{parser}.log"
    log.unlink(missing_ok=True)
    cur = out / f"{parser}.cur"
    start, crashes, totals = 0, [], {}
    t0 = time.monotonic()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    while start < n:
        cur.write_text("")
        cmd = [sys.executable, __file__, "worker", parser, str(start), str(n), str(seed), str(out)]
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])},
            start_new_session=True,
        )
        last, last_t = None, time.monotonic()
        now_killed = False
        while proc.poll() is None:
            time.sleep(0.5)
            now = cur.read_text() if cur.exists() else ""
            if now != last:
                last, last_t = now, time.monotonic()
            elif now and time.monotonic() - last_t > wall_limit:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and any child it forked
                proc.wait()
                now_killed = True
                break
        now = cur.read_text() if cur.exists() else ""
        if now.count("\t") == 3:
            for key, v in json.loads(now.split("\t")[3]).items():
                totals[key] = totals.get(key, 0) + v
        if proc.returncode == 0 and now.startswith("done"):
            break
        if not now[:1].isdigit():
            raise RuntimeError(f"worker for {parser} failed before its first input (exit {proc.returncode})")
        i_s, copy, seed_name, _ = now.split("\t")
        i = int(i_s)
        rc = proc.returncode or 0
        what = (
            "hang (5 s of CPU on one input, SIGXCPU)"
            if rc == -signal.SIGXCPU
            else f"died of {signal.Signals(-rc).name}"
            if rc < 0 and now_killed is False
            else f"hang (no progress for {wall_limit:.0f} s, killed)"
            if now_killed
            else f"exit status {rc}"
        )
        p = out / "findings" / f"{parser}-crash-{i}"
        if Path(copy).is_dir():  # the input the worker died on, as it placed it
            shutil.copytree(copy, p.with_suffix(".dir"), dirs_exist_ok=True)
        else:
            shutil.copyfile(copy, p.with_suffix(".bin"))
        p.with_suffix(".txt").write_text(f"parser {parser} seed {seed_name} input {i}\nworker died: {what}\n")
        crashes.append({"input": i, "what": what})
        start = i + 1
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = {
        "parser": parser,
        "inputs": n,
        **{k: totals.get(k, 0) for k in ("ok", "error", "caught")},
        "findings": totals.get("finding", 0),
        "crashes": crashes,
        "wall_s": round(time.monotonic() - t0, 1),
        "cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 1),
    }
    with open(out / "summary.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        parser, start, n, seed, out = argv[1:6]
        worker(parser, int(start), int(n), int(seed), Path(out))
        return 0
    if argv[:1] == ["campaign"]:
        import argparse

        ap = argparse.ArgumentParser(prog="fuzz_targets.py campaign")
        ap.add_argument("--parser", action="append", choices=PARSERS, help="default: every parser")
        ap.add_argument("-n", type=int, default=10_000, help="inputs per parser")
        ap.add_argument("--seed", type=int, default=1)
        ap.add_argument("--out", type=Path, default=REPO / "fuzz-out")
        a = ap.parse_args(argv[1:])
        code = 0
        for parser in a.parser or PARSERS:
            s = campaign(parser, a.n, a.seed, a.out)
            print(json.dumps(s), flush=True)
            code |= bool(s["findings"] or s["crashes"])
        return code
    print("usage: fuzz_targets.py campaign [--parser P ...] [-n N] [--seed S] [--out DIR]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
