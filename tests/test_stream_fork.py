"""ops/stream.py's shared worker pool in a forked child (ls's fork workers, the HDF5 guard, and
mutmut's per-mutant workers all fork a process that may already have used the pool)."""

from __future__ import annotations

import os
import signal

from ckptctl.ops import stream


def test_the_shared_pool_runs_work_in_a_forked_child():
    assert stream.submit(lambda: 1).result(timeout=30) == 1  # the parent's pool and its threads exist
    pid = os.fork()
    if pid == 0:  # the child: its inherited pool has no threads
        signal.alarm(30)  # a hang ends the child (SIGALRM) instead of the test run
        try:
            ok = stream.submit(lambda: 2).result(timeout=20) == 2
        except BaseException:  # noqa: BLE001 - any failure is the child's exit code
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert stream.submit(lambda: 3).result(timeout=30) == 3  # the parent's pool is untouched
