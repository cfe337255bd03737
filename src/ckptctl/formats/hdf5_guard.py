"""The HDF5 crash guard: libhdf5 is C, and a damaged or crafted file can segfault it, loop forever
or make it allocate what a damaged length asks for. Before ckptctl opens a local HDF5 file, a
forked child walks its metadata under a CPU and an address-space budget; a child that dies of a
signal, runs out of its CPU budget or of memory turns into one CorruptFile line in the parent."""

from __future__ import annotations

import os
from collections.abc import Callable

from ckptctl.errors import CorruptFile

# CPU seconds the crash guard's child may spend walking a file's metadata: base + per MiB of file
GUARD_CPU_BASE = 60
GUARD_CPU_PER_MB = 5
# address space the child may add to what the process maps: libhdf5 allocates what a damaged
# length asks for (a 12 KB file made it touch 23 GB and be OOM-killed); a walk needs far less
GUARD_MEMORY = 1 << 30
_GUARD_NO_MEMORY = 3  # the child's exit status when libhdf5 ran out of that budget


def crash_guard(path, walk: Callable[[], object]) -> None:
    """Open and walk the file in a forked child before this process does: libhdf5 is C, and a
    damaged or crafted file can crash it (a segfault would kill ckptctl with no message). When
    the child dies of a signal, the file is refused with one line; when it finishes (or fails
    with a Python exception, which the walk here will meet and report again) the parent goes
    on. Costs one fork and a second metadata walk; tensor data is not read by the child.
    Local files only (a remote file object's I/O threads do not survive a fork), and only
    while this process runs one thread (a fork copies no other thread, nor the locks they
    hold: the child could wait forever)."""
    import signal
    import threading

    if not hasattr(os, "fork") or threading.active_count() > 1:
        return

    pid = os.fork()
    if pid == 0:  # the child: never returns, never flushes the parent's buffers
        try:
            import faulthandler

            faulthandler.disable()  # die of the signal quietly, not with a Python traceback
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            import resource

            # libhdf5 loops forever on some damaged files: a CPU budget far above what a walk
            # needs (~0.25 s per MB of a file of small datasets) ends it with SIGXCPU
            budget = GUARD_CPU_BASE + GUARD_CPU_PER_MB * (os.path.getsize(path) >> 20)
            resource.setrlimit(resource.RLIMIT_CPU, (budget, budget + 5))
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = _vm_size() + GUARD_MEMORY
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
            walk()
        except BaseException as e:  # noqa: BLE001 - the parent reports Python-level failures itself
            if _out_of_memory(e):  # the parent, with no cap, would allocate it for real
                os._exit(_GUARD_NO_MEMORY)
        os._exit(0)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _GUARD_NO_MEMORY:
        raise CorruptFile(
            f"damaged HDF5 structure: libhdf5 asked for more than {GUARD_MEMORY >> 30} GiB of memory "
            "reading its metadata; refused",
            path,
        )
    if os.WIFSIGNALED(status):
        try:
            sig = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            sig = f"signal {os.WTERMSIG(status)}"
        if sig == "SIGXCPU":
            raise CorruptFile(
                "damaged HDF5 structure: libhdf5 did not finish reading its metadata (stopped "
                "after a CPU budget far above what the file needs); refused",
                path,
            )
        raise CorruptFile(f"damaged HDF5 structure: libhdf5 crashed reading it ({sig}); refused", path)


def _vm_size() -> int:
    """Bytes of address space this process maps (0 when /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _out_of_memory(e: BaseException | None) -> bool:
    """A MemoryError, or h5py's error for a failed allocation inside libhdf5, anywhere in the chain."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, MemoryError) or "memory allocation failed" in str(e) or "Unable to allocate" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
