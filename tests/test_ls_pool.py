"""ls of many Lightning .ckpt files: the forked workers' results come back (they used to fail to
pickle, and the parent silently read every checkpoint a second time), equal to a serial run; and
the score a ModelCheckpoint callback holds as a 0-d tensor is read without importing numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ckptctl.ops import runs

torch = pytest.importorskip("torch")

CB = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1}"


def _lightning_run(root, n: int) -> None:
    root.mkdir()
    for i in range(n):
        score = torch.tensor(1.0 / (i + 1), dtype=torch.float32 if i % 2 else torch.bfloat16)
        torch.save(
            {
                "epoch": i,
                "global_step": 10 * i,
                "pytorch-lightning_version": "2.1.0",
                "state_dict": {"layer.weight": torch.full((4, 3), float(i)), "layer.bias": torch.zeros(4)},
                "callbacks": {
                    CB: {
                        "monitor": "val_loss",
                        "best_model_score": score,
                        "current_score": score,
                        "best_model_path": str(root / "epoch=0-step=0.ckpt"),
                    }
                },
                "optimizer_states": [],
                "lr_schedulers": [],
            },
            root / f"epoch={i}-step={10 * i}.ckpt",
        )


def test_lightning_run_parsed_in_workers_equals_serial_and_skips_numpy(tmp_path):
    root = tmp_path / "run"
    n = runs.PARALLEL_MIN + 4
    _lightning_run(root, n)
    code = (
        "import json, sys; from ckptctl.ops.runs import discover, POOL_STATE; "
        "print(json.dumps([c.to_json() for c in discover(sys.argv[1])])); "
        "print('numpy' in sys.modules, POOL_STATE['used'], POOL_STATE['error'], file=sys.stderr)"
    )
    outs = []
    for jobs in ("1", "2"):
        env = dict(os.environ, CKPTCTL_JOBS=jobs)
        p = subprocess.run(
            [sys.executable, "-c", code, str(root)], check=False, capture_output=True, text=True, env=env, timeout=300
        )
        assert p.returncode == 0, p.stderr
        assert p.stderr.strip() == ("False False None" if jobs == "1" else "False True None"), p.stderr
        outs.append(json.loads(p.stdout))
    serial, parallel = outs
    assert serial == parallel
    assert [r["step"] for r in serial] == [10 * i for i in range(n)]
    # the callback's score, read from the 0-d tensor (bfloat16 for even i, float32 for odd)
    for i in range(4):
        want = float(torch.tensor(1.0 / (i + 1), dtype=torch.float32 if i % 2 else torch.bfloat16).float())
        assert serial[i]["metrics"] == {"val_loss": want}, (i, serial[i]["metrics"])


@pytest.mark.parametrize("how", ["raise RuntimeError('boom')", "os._exit(3)"])
def test_a_child_that_fails_or_dies_leaves_its_share_to_the_parent(tmp_path, how):
    """A forked child that raises, or dies without sending anything back: the parent lists its
    checkpoints itself, the listing equals a serial one, and POOL_STATE says the pool failed."""
    root = tmp_path / "run"
    n = runs.PARALLEL_MIN + 4
    _lightning_run(root, n)
    code = (
        "import json, os, sys; from ckptctl.ops.runs import discover, POOL_STATE, discovery\n"
        "if sys.argv[2] == 'break':\n"
        f"    def broken(share):\n        {how}\n"
        "    discovery._enrich_share = broken\n"
        "print(json.dumps([c.to_json() for c in discover(sys.argv[1])]))\n"
        "print(POOL_STATE['used'], POOL_STATE['error'], file=sys.stderr)"
    )
    outs = []
    for jobs, mode in (("1", "serial"), ("2", "break")):
        env = dict(os.environ, CKPTCTL_JOBS=jobs)
        p = subprocess.run(
            [sys.executable, "-c", code, str(root), mode],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        outs.append((json.loads(p.stdout), p.stderr.strip()))
    (serial, _), (broken, state) = outs
    assert state == ("False RuntimeError: boom" if "boom" in how else "False a worker ended without its results")
    assert broken == serial
    assert [r["step"] for r in broken] == [10 * i for i in range(n)]
    assert all(r["num_tensors"] == 2 and r["error"] is None for r in broken)
