#!/usr/bin/env python
"""Benchmark ckptctl on remote checkpoints, against real servers on loopback.

Starts moto's S3 server (behind a byte-counting TCP proxy) and a Range-honouring HTTP server on
127.0.0.1 (the same ones tests/test_remote.py uses), generates a safetensors file, a torch zip
and a 2-shard safetensors folder of --size-gb each (bench_inspect.py's layout: ~300 fp32
tensors), then measures, each as a fresh `python -m ckptctl -v` process:

- inspect over s3:// and https://: bytes received, requests, wall time;
- convert s3:// -> local: throughput, CPU seconds and peak RSS, against a plain download of the
  same object with boto3's download_file (s3transfer: 8 MiB parts, 10 threads; what `aws s3 cp` does);
- convert local -> s3:// (with verify, which re-reads the upload, and with --no-verify) against
  boto3's upload_file of the same file.

    python benchmarks/bench_remote.py                 # 0.5 GB per checkpoint
    python benchmarks/bench_remote.py --size-gb 1

Needs the dev extra (moto[server], s3fs, aiohttp, boto3). Loopback only; the figures measure
ckptctl's overhead and request pattern, not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAST_CPU = [0.0]  # user+sys seconds of the last child timed (its own, not moto's)


def timed(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MiB, exit code, stderr) of one child process; its CPU s in LAST_CPU."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode("utf-8", "replace")
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    LAST_CPU[0] = ru.ru_utime + ru.ru_stime
    return time.perf_counter() - t, ru.ru_maxrss / 1024, p.returncode, err


def generate(base: Path, size_gb: float) -> dict[str, Path]:
    import bench_inspect as bi

    tensors = bi.plan(size_gb)
    st = base / "model.safetensors"
    layout = bi.write_safetensors(str(st), tensors)
    pt = base / "model.pt"
    bi.write_torch(str(st), layout, str(pt), legacy=False)
    sh = base / "sharded"
    sh.mkdir()
    half = len(tensors) // 2
    wm = {}
    for k, part in enumerate((tensors[:half], tensors[half:])):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        bi.write_safetensors(str(sh / name), part)
        wm.update({n: name for n, _ in part})
    (sh / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return {"safetensors": st, "torch zip": pt, "sharded folder": sh}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--generate":
        generate(Path(sys.argv[2]), float(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; best is kept")
    args = ap.parse_args()

    import boto3
    from conftest import CountingProxy, RangeServer

    base = Path(tempfile.mkdtemp(prefix="ckptctl-bench-remote-", dir="/tmp"))
    port = free_port()
    # moto in its own process: its memory (the objects) must not count as ours (fork-inherited RSS)
    moto = subprocess.Popen(
        [
            PY,
            "-c",
            "import time; from moto.server import ThreadedMotoServer as T; "
            f"T(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(86400)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    proxy = CountingProxy(port)
    http = RangeServer(base)
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    env.pop("AWS_PROFILE", None)
    try:
        t0 = time.perf_counter()
        # generate in a child process: torch's memory would otherwise be inherited by every child we time
        subprocess.run([PY, __file__, "--generate", str(base), str(args.size_gb)], check=True)
        files = {
            "safetensors": base / "model.safetensors",
            "torch zip": base / "model.pt",
            "sharded folder": base / "sharded",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3.create_bucket(Bucket="bench")
        for p in sorted(base.rglob("*")):
            if p.is_file():
                s3.upload_file(str(p), "bench", p.relative_to(base).as_posix())
        print(f"generated and uploaded in {time.perf_counter() - t0:.1f} s under {base}\n", file=sys.stderr)

        def size_of(p: Path) -> int:
            return sum(f.stat().st_size for f in ([p] if p.is_file() else p.iterdir()))

        print("| what | object | size | bytes received | requests | wall | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for what, p in files.items():
            rel = p.relative_to(base).as_posix()
            for scheme, url in (
                ("s3", f"s3://bench/{rel}"),
                ("https", f"{http.url}/{rel}" + ("/model.safetensors.index.json" if p.is_dir() else "")),
            ):
                best = None
                for _ in range(args.repeat):
                    proxy.reset()
                    http.reset()
                    wall, rss, code, err = timed([PY, "-m", "ckptctl", "-v", "inspect", "--format", "json", url], env)
                    if code != 0:
                        raise SystemExit(f"inspect {url} failed: {err.strip()}")
                    got = proxy.bytes_down if scheme == "s3" else http.bytes
                    m = re.search(r"remote: (\d+) ranged requests", err)
                    reqs = int(m.group(1)) if m else -1
                    if best is None or wall < best[0]:
                        best = (wall, rss, got, reqs)
                wall, rss, got, reqs = best
                print(
                    f"| inspect over {scheme} | {what} | {size_of(p) / 1e9:.2f} GB | {got / 1e6:.3f} MB | "
                    f"{reqs} ranged + listing/HEAD | {wall:.2f} s | {rss:.0f} MiB |"
                )

        # ls of a run of 50 checkpoints: bytes and requests, and what latency costs (a relay that
        # holds every request 100 ms): one listing plus the header reads, 16 in flight
        from test_runs_remote import DelayProxy

        run_dir = base / "run"
        run_dir.mkdir()
        subprocess.run(
            [
                PY,
                "-c",
                "import sys, numpy as np; from safetensors.numpy import save_file\n"
                "for i in range(50):\n"
                "    save_file({f'layer.{j}.weight': np.full((64, 64), i, np.float32) for j in range(8)},\n"
                "              f'{sys.argv[1]}/step-{(i + 1) * 100}.safetensors',\n"
                "              metadata={'step': str((i + 1) * 100), 'eval_loss': str(1.0 / (i + 1))})",
                str(run_dir),
            ],
            check=True,
            cwd=base,
        )
        for p in sorted(run_dir.iterdir()):
            s3.upload_file(str(p), "bench", f"run/{p.name}")
        slow = DelayProxy(port, delay=0.1)
        slow_env = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{slow.port}")
        print(
            "\n| ls of a run of 50 checkpoints (s3) | bytes received | requests | wall | wall, +100 ms per request "
            "| latency cost | max in flight |"
        )
        print("|---|---|---|---|---|---|---|")
        best_ls = None
        for _ in range(args.repeat):
            proxy.reset()
            wall, rss, code, err = timed([PY, "-m", "ckptctl", "-v", "ls", "--format", "json", "s3://bench/run"], env)
            if code != 0:
                raise SystemExit(f"ls failed: {err.strip()[-300:]}")
            got, m = proxy.bytes_down, re.search(r"remote: (\d+) ranged requests", err)
            slow.max_in_flight = slow.requests = 0
            wall_slow, _rss, code, err = timed(
                [PY, "-m", "ckptctl", "ls", "--format", "json", "s3://bench/run"], slow_env
            )
            if code != 0:
                raise SystemExit(f"ls through the delaying relay failed: {err.strip()[-300:]}")
            row = (wall, wall_slow, got, int(m.group(1)) if m else -1, slow.requests, slow.max_in_flight)
            if best_ls is None or row[1] < best_ls[1]:
                best_ls = row
        wall, wall_slow, got, ranged, reqs, most = best_ls
        print(
            f"| ckptctl ls s3://bench/run | {got / 1e6:.3f} MB | {ranged} ranged, {reqs} in all | {wall:.2f} s | "
            f"{wall_slow:.2f} s | {(wall_slow - wall) / 0.1:.0f} request latencies (serial: {reqs}) | {most} |"
        )
        slow.close()

        size = files["safetensors"].stat().st_size
        out = base / "out"
        out.mkdir()

        def compare(title: str, cands: list[tuple[str, list[str]]], before) -> list[tuple]:
            """Best of --repeat per candidate (by wall), candidates interleaved in each round."""
            best: dict[str, tuple] = {}
            for _ in range(args.repeat):
                for name, cmd in cands:
                    before()
                    wall, rss, code, err = timed(cmd, env)
                    if code != 0:
                        raise SystemExit(f"{name} failed: {err.strip()[-300:]}")
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, LAST_CPU[0], rss)
            print(f"\n| {title} | size | wall | CPU (user+sys) | throughput | peak RSS |")
            print("|---|---|---|---|---|---|")
            rows = [(name, *best[name]) for name, _ in cands]
            for name, wall, cpu, rss in rows:
                print(
                    f"| {name} | {size / 1e9:.2f} GB | {wall:.2f} s | {cpu:.2f} s | {size / wall / 1e6:.0f} MB/s "
                    f"| {rss:.0f} MiB |"
                )
            return rows

        def clear_out() -> None:
            for f in out.iterdir():
                f.unlink()

        rows = compare(
            "S3 -> local",
            [
                (
                    "`ckptctl convert s3://... local.safetensors`",
                    [PY, "-m", "ckptctl", "convert", "s3://bench/model.safetensors", str(out / "c.safetensors")],
                ),
                (
                    "`ckptctl convert s3://... local.safetensors --no-verify`",
                    [
                        PY,
                        "-m",
                        "ckptctl",
                        "convert",
                        "--no-verify",
                        "s3://bench/model.safetensors",
                        str(out / "n.safetensors"),
                    ],
                ),
                (
                    "boto3 download_file (s3transfer, like `aws s3 cp`)",
                    [
                        PY,
                        "-c",
                        "import boto3,sys; boto3.client('s3').download_file('bench', 'model.safetensors', "
                        f"{str(out / 'd.safetensors')!r})",
                    ],
                ),
            ],
            clear_out,
        )
        print(
            f"\nratio convert --no-verify / plain download: {rows[2][1] / rows[1][1]:.2f}x the download's throughput; "
            f"with verify (which reads the output back and checks it against CRC-32Cs of the bytes as they arrived): {rows[2][1] / rows[0][1]:.2f}x"
        )

        def clear_bucket() -> None:
            for o in s3.list_objects_v2(Bucket="bench", Prefix="up/").get("Contents", []):
                s3.delete_object(Bucket="bench", Key=o["Key"])

        src = str(files["safetensors"])
        rows = compare(
            "local -> S3",
            [
                (
                    "`ckptctl convert local.safetensors s3://...` (upload, verify re-reads it, server-side copy)",
                    [PY, "-m", "ckptctl", "convert", src, "s3://bench/up/c.safetensors"],
                ),
                (
                    "`ckptctl convert ... s3://... --no-verify`",
                    [PY, "-m", "ckptctl", "convert", "--no-verify", src, "s3://bench/up/n.safetensors"],
                ),
                (
                    "boto3 upload_file (s3transfer, like `aws s3 cp`)",
                    [PY, "-c", f"import boto3; boto3.client('s3').upload_file({src!r}, 'bench', 'up/u.safetensors')"],
                ),
            ],
            clear_bucket,
        )
        print(
            f"\nratio convert --no-verify / plain upload: {rows[2][1] / rows[1][1]:.2f}x the upload's throughput; "
            f"with verify: {rows[2][1] / rows[0][1]:.2f}x"
        )
        print(
            f"\nbest of {args.repeat}, candidates interleaved; loopback, load average {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs."
        )
    finally:
        http.close()
        proxy.close()
        moto.kill()
        moto.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
