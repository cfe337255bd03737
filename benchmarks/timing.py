"""Timing that survives a noisy, shared machine: the helper every bench_*.py uses.

The disk and the 2 cores of the machines this runs on are shared: the same `cp && sync` of 4 GB
takes 2.8-8 s within one minute. So a benchmark here
  - runs each candidate as a fresh process and reads its cost from the kernel (os.wait4):
    wall seconds, CPU seconds of the child and everything it waited for (user + sys) and peak
    RSS (ru_maxrss: the largest of the process tree's members);
  - interleaves its candidates (A, B, C, A, B, C, ...), so a slow spell of the disk lands on
    every candidate rather than on one;
  - keeps the best of N per candidate (wall and CPU taken separately: the best wall is the run
    that waited least, the best CPU the one disturbed least) and the highest peak RSS.
CPU seconds are the figure to trust when the disk or the cores are busy; wall times are
printed beside them.

    from timing import Candidate, interleave, machine, md_table
    res = interleave([Candidate("cp", ["cp", a, b], cleanup=[b]), ...], repeat=3)
    res["cp"].wall, res["cp"].cpu, res["cp"].rss_mb
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PY = sys.executable

# Measure ckptctl as installed: pip writes bytecode caches at install time, and a user's imports
# read them. A machine that sets PYTHONDONTWRITEBYTECODE (this project's does) would make every
# measured process compile ckptctl's ~60 modules again (0.1-0.15 s each time), so the processes
# measured here, which inherit this environment, may write and reuse them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def compile_tree(path: str) -> None:
    """Write the bytecode caches of a source tree before anything is measured."""
    subprocess.run([PY, "-m", "compileall", "-q", path], check=False, stdout=subprocess.DEVNULL)


@dataclass
class Sample:
    """One run of one process."""

    wall: float  # seconds
    user: float  # CPU seconds in user mode (the child and its waited-for children)
    sys: float  # CPU seconds in the kernel
    rss_mb: float  # peak resident set, MB (10^6 bytes)
    code: int  # exit code
    err: str  # last line of stderr

    @property
    def cpu(self) -> float:
        return self.user + self.sys


TIME = shutil.which("time", path="/usr/bin:/bin")  # GNU time: the peak RSS of the program itself


def run(
    cmd: Sequence[str],
    *,
    env: dict | None = None,
    cwd: str | None = None,
    stdout=subprocess.DEVNULL,
    timeout: float | None = None,
) -> Sample:
    """Run `cmd` as a fresh process; its wall time and CPU time from os.wait4, its peak RSS from
    /usr/bin/time when there is one (a child's ru_maxrss also counts the pages of this Python
    process it was forked from: `cp` would show 15 MB)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        full = [TIME, "-q", "-f", "%M", "-o", rss.name, *cmd] if TIME else list(cmd)
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=stdout, stderr=err, env=env, cwd=cwd, start_new_session=True)
        if timeout is not None:
            deadline = t0 + timeout
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    os.killpg(p.pid, 9)  # the program too, not only /usr/bin/time
                    pid, status, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.005)
        else:
            _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        kib = ru.ru_maxrss  # KiB on Linux
        if TIME:
            text = open(rss.name).read().split()  # noqa: SIM115 - a temporary file
            if text and text[-1].isdigit():
                kib = int(text[-1])
    return Sample(wall, ru.ru_utime, ru.ru_stime, kib * 1024 / 1e6, p.returncode, lines[-1] if lines else "")


@dataclass
class Candidate:
    name: str
    cmd: Sequence[str]
    repeat: int | None = None  # runs of this candidate (default: interleave's repeat)
    cleanup: Sequence[str] = ()  # paths removed before and after every run (outputs)
    env: dict | None = None
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class Result:
    name: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None  # the first failure, if the candidate failed

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def wall(self) -> float:
        return min(s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return min(s.cpu for s in self.samples)

    @property
    def rss_mb(self) -> float:
        return max(s.rss_mb for s in self.samples)

    def walls(self) -> list[float]:
        return [s.wall for s in self.samples]


RECORD_ENV = "CKPTCTL_BENCH_RECORD"


def record(bench: str, row: str, candidate: str, wall: float, cpu: float, rss_mb: float) -> None:
    """Append one measured figure to the file named by $CKPTCTL_BENCH_RECORD (JSON lines), if set.

    benchmarks/run_all.py sets it and builds the README's table of targets from these records
    (run_all.TARGETS names them by bench, row and candidate, the labels the bench prints)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    import json

    line = {"bench": bench, "row": row, "candidate": candidate, "wall": wall, "cpu": cpu, "rss_mb": rss_mb}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def sync() -> None:
    """Flush every dirty page, so a run does not pay for an earlier run's write-back."""
    subprocess.run(["sync"], check=False)


def interleave(
    cands: Sequence[Candidate],
    repeat: int = 3,
    *,
    before_each: Callable[[], None] | None = sync,
    log: Callable[[str], None] | None = None,
) -> dict[str, Result]:
    """Run the candidates in turns (A, B, C, A, B, C, ...), `repeat` rounds (a candidate's own
    `repeat` may be smaller); a candidate that fails once is not run again. `before_each` runs
    before every run (default: `sync`)."""
    results = {c.name: Result(c.name) for c in cands}
    rounds = max([c.repeat or repeat for c in cands] or [0])
    for r in range(rounds):
        for c in cands:
            res = results[c.name]
            if r >= (c.repeat or repeat) or res.error is not None:
                continue
            for p in c.cleanup:
                remove(p)
            if before_each:
                before_each()
            s = run(c.cmd, env=c.env)
            for p in c.cleanup:
                remove(p)
            if s.code not in c.ok_codes:
                res.error = f"exit {s.code}: {s.err[:160]}"
            else:
                res.samples.append(s)
            if log:
                log(f"  {c.name}: {s.wall:.2f} s wall, {s.cpu:.2f} s CPU, {s.rss_mb:.0f} MB (exit {s.code})")
    return results


def cell(r: Result, base: Result | None = None, *, rss: bool = True) -> str:
    """`wall s / CPU s` (and `ratio×` to `base` by wall, and `MB`) for a markdown table."""
    if not r.ok:
        return f"failed: {r.error}"
    out = f"{r.wall:.2f} s / {r.cpu:.2f} s"
    if base is not None and base.ok and base.wall > 0:
        out += f" ({r.wall / base.wall:.2f}×)"
    if rss:
        out += f", {r.rss_mb:.0f} MB"
    return out


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; `align` one char per column: l or r (default: first l, others r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line: date (UTC), CPU model and cores, memory, kernel, Python, load average."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    load = ""
    try:
        load = "load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    except OSError:
        pass
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{date}; {os.cpu_count()} cores ({model}), {mem} RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {load}"
    )


def speed_probe() -> str:
    """How fast this machine is right now, in two numbers a reader can compare between runs: CPU
    seconds of 10^7 Python additions (the interpreter: what inspect, ls and the unpickler spend)
    and a 256 MiB memory copy in GB/s (what convert's verify and diff spend). Best of 3 each,
    about 3 s in all. The same code measured 1.25-1.35x slower in one hour than in another on
    this shared machine, with no load and no steal time to show for it: this line shows it."""

    def additions() -> float:
        t = time.process_time()
        s = 0
        for i in range(10_000_000):
            s += i
        return time.process_time() - t

    src = bytearray(b"\x01") * (256 << 20)
    dst = bytearray(b"\x02") * len(src)  # both touched: the copy measures memory, not page faults
    into = memoryview(dst)

    def copy() -> float:
        t = time.perf_counter()
        into[:] = src
        return time.perf_counter() - t

    cpu = min(additions() for _ in range(3))
    gbs = len(src) / min(copy() for _ in range(3)) / 1e9
    return f"10^7 Python additions {cpu:.2f} CPU s, memory copy {gbs:.1f} GB/s"


def parse_size(text: str) -> int:
    """'1G', '500M', '4GB', '0.5' (GB) -> bytes (10^9 based)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t) * 10**9)


__all__ = [
    "PY",
    "Candidate",
    "Result",
    "Sample",
    "cell",
    "interleave",
    "machine",
    "md_table",
    "parse_size",
    "remove",
    "run",
    "sync",
]
