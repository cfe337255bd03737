"""Faithful replicas of real training-run folders, written with the frameworks' own savers.

transformers and lightning are not installed here (and pull unpinned torch), so these mimic what
they write: file names, trainer_state.json, the .ckpt dict (epoch, global_step,
pytorch-lightning_version, state_dict, optimizer_states, lr_schedulers, callbacks with a
ModelCheckpoint state, loops, hyper_parameters), fairseq's checkpoint_E_U.pt + best/last copies,
DCP step folders (torch.distributed.checkpoint itself) and Orbax step folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np


def tiny_state(seed: int, n: int = 3):
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(n):
        sd[f"layers.{i}.weight"] = torch.randn(4, 4, generator=g)
        sd[f"layers.{i}.bias"] = torch.randn(4, generator=g)
    return sd


def adam_state(sd: dict, step: int):
    import torch

    state = {
        i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.ones_like(t)}
        for i, t in enumerate(sd.values())
    }
    return {
        "state": state,
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": list(range(len(sd)))}
        ],
    }


def set_mtime(path: Path, t: float) -> None:
    """Set mtime on a file or every file and folder of a checkpoint folder (never follows links)."""
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for dp, dns, fns in os.walk(path):
            paths += [Path(dp) / n for n in dns + fns]
    for p in paths:
        os.utime(p, (t, t), follow_symlinks=False)


def age_tree(root: Path, seconds: float = 3600) -> None:
    """Make everything under root look older than --min-age, keeping relative order."""
    time.time()
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = Path(dp) / n
            st = os.lstat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)), follow_symlinks=False)


def hf_run(root: Path, steps=(500, 1000, 1500, 2000), eval_loss=None, save_best: bool = True) -> Path:
    """HF Trainer output_dir with checkpoint-N/ folders."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    eval_loss = eval_loss or {s: 1.0 / (i + 1) + (0.3 if i == len(steps) - 1 else 0) for i, s in enumerate(steps)}
    history = []
    for i, step in enumerate(steps):
        history.append(
            {"epoch": (i + 1) * 0.5, "grad_norm": 1.5, "learning_rate": 1e-4, "loss": 2.0 - 0.1 * i, "step": step}
        )
        history.append(
            {
                "epoch": (i + 1) * 0.5,
                "eval_loss": eval_loss[step],
                "eval_runtime": 1.23,
                "eval_samples_per_second": 100.0,
                "eval_steps_per_second": 10.0,
                "step": step,
            }
        )
        ck = root / f"checkpoint-{step}"
        ck.mkdir()
        sd = tiny_state(step)
        save_file({k: v.contiguous() for k, v in sd.items()}, ck / "model.safetensors", metadata={"format": "pt"})
        torch.save(adam_state(sd, step), ck / "optimizer.pt")
        torch.save({"base_lrs": [1e-4], "last_epoch": step, "_step_count": step + 1}, ck / "scheduler.pt")
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
            ck / "rng_state.pth",
        )
        torch.save(
            {"output_dir": str(root), "save_steps": 500, "metric_for_best_model": "eval_loss"}, ck / "training_args.bin"
        )
        best_so_far = min(steps[: i + 1], key=eval_loss.get) if save_best else None
        state = {
            "best_global_step": best_so_far,
            "best_metric": eval_loss[best_so_far] if best_so_far else None,
            "best_model_checkpoint": f"{root.name}/checkpoint-{best_so_far}" if best_so_far else None,
            "epoch": (i + 1) * 0.5,
            "eval_steps": 500,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": list(history),
            "logging_steps": 500,
            "max_steps": steps[-1],
            "num_input_tokens_seen": 0,
            "num_train_epochs": 2,
            "save_steps": 500,
            "stateful_callbacks": {},
            "total_flos": 1234.0,
            "train_batch_size": 8,
            "trial_name": None,
            "trial_params": None,
        }
        (ck / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return root


def lightning_ckpt(
    path: Path, epoch: int, step: int, val_loss: float, best_path: str, best_score: float, seed: int | None = None
) -> Path:
    import torch

    sd = tiny_state(seed if seed is not None else step)
    key = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}"
    )
    ckpt = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "loops": {
            "fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": epoch + 1, "completed": epoch}}}
        },
        "callbacks": {
            key: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(best_score),
                "best_model_path": best_path,
                "current_score": torch.tensor(val_loss),
                "dirpath": str(path.parent),
                "best_k_models": {},
                "kth_best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
                "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0,
                "stopped_epoch": 0,
                "best_score": torch.tensor(best_score),
                "patience": 3,
            },
        },
        "optimizer_states": [adam_state(sd, step)],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": epoch}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "hidden": 4},
    }
    torch.save(ckpt, path)
    return path


def lightning_run(
    root: Path, steps=(100, 200, 300, 400), val_loss=None, last: str | None = "symlink", name_metric: bool = False
) -> Path:
    """lightning_logs/version_0/checkpoints/ as ModelCheckpoint(save_top_k=-1, save_last=...) leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    val_loss = val_loss or {s: 1.0 / (i + 1) + (0.5 if i == len(steps) - 1 else 0) for i, s in enumerate(steps)}
    best = None
    files = []
    for epoch, step in enumerate(steps):
        name = f"epoch={epoch}-step={step}" + (f"-val_loss={val_loss[step]:.2f}" if name_metric else "") + ".ckpt"
        if best is None or val_loss[step] < val_loss[best[0]]:
            best = (step, name)
        p = lightning_ckpt(root / name, epoch, step, val_loss[step], str(root.resolve() / best[1]), val_loss[best[0]])
        files.append(p)
    if last == "symlink":
        os.symlink(files[-1].name, root / "last.ckpt")
    elif last == "copy":
        shutil.copy2(files[-1], root / "last.ckpt")
    return root


def fairseq_run(root: Path, epochs_updates=((1, 100), (2, 200), (3, 300)), best_of: int = 1) -> Path:
    """checkpoint_E_U.pt (+ checkpoint_best.pt / checkpoint_last.pt as regular copies)."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch, upd in epochs_updates:
        sd = tiny_state(upd)
        obj = {
            "args": None,
            "cfg": {"common": {"seed": 1}, "optimization": {"lr": [0.25]}},
            "model": sd,
            "optimizer_history": [
                {
                    "criterion_name": "CrossEntropyCriterion",
                    "optimizer_name": "FairseqNAG",
                    "lr_scheduler_state": {"best": 2.5},
                    "num_updates": upd,
                }
            ],
            "extra_state": {
                "epoch": epoch,
                "val_loss": 3.0 - epoch * 0.1,
                "best": 2.5,
                "train_iterator": {"epoch": epoch, "iterations_in_epoch": 0},
            },
            "last_optimizer_state": adam_state(sd, upd),
        }
        p = root / f"checkpoint_{epoch}_{upd}.pt"
        torch.save(obj, p)
        paths.append(p)
    shutil.copy2(paths[best_of], root / "checkpoint_best.pt")
    shutil.copy2(paths[-1], root / "checkpoint_last.pt")
    return root


def dcp_run(root: Path, steps=(100, 200)) -> Path:
    import torch.distributed.checkpoint as dcp

    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        sd = {"model": {k: v for k, v in tiny_state(step).items()}}
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(sd, checkpoint_id=str(root / f"step_{step}"), no_dist=True)
    return root


def orbax_run(root: Path, steps=(1000, 2000, 3000)) -> Path:
    """Orbax CheckpointManager step folders: <step>/_CHECKPOINT_METADATA + default/_METADATA and two
    arrays stored the way Orbax does with use_ocdbt=False (a Zarr v2 folder per array; no
    compressor, so numpy writes the chunk bytes). No commit markers, as older Orbax on local disks."""
    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        d = root / str(step)
        (d / "default").mkdir(parents=True)
        (d / "_CHECKPOINT_METADATA").write_text(
            json.dumps(
                {
                    "item_handlers": {"default": "PyTreeCheckpointHandler"},
                    "metrics": {},
                    "init_timestamp_nsecs": 1,
                    "commit_timestamp_nsecs": 2,
                    "custom": {"loss": 0.5},
                }
            )
        )
        arrays = {("dense", "kernel"): np.full((4, 3), step, np.float32), ("dense", "bias"): np.arange(3, dtype="<i4")}
        tree = {}
        for keys, arr in arrays.items():
            tree[str(keys)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
            }
            z = d / "default" / ".".join(keys)
            z.mkdir()
            (z / ".zarray").write_text(
                json.dumps(
                    {
                        "chunks": list(arr.shape),
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
            (z / ".".join("0" for _ in arr.shape)).write_bytes(arr.tobytes())
        (d / "default" / "_METADATA").write_text(
            json.dumps({"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False})
        )
    return root


def st_run(
    root: Path,
    steps=(100, 200, 300, 400),
    metric: str | None = "eval_loss",
    values=None,
    name="model_{step:08d}.safetensors",
    dtype=np.float32,
) -> Path:
    """Plain safetensors step files with __metadata__ step and metric."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    values = values or {s: 1.0 / (i + 1) for i, s in enumerate(steps)}
    for s in steps:
        meta = {"format": "pt", "step": str(s)}
        if metric:
            meta[metric] = repr(float(values[s]))
        arr = (np.arange(16, dtype=np.float32).reshape(4, 4) + s).astype(dtype)
        save_file({"w": arr, "b": np.full(4, s, dtype=dtype)}, str(root / name.format(step=s)), metadata=meta)
    return root


def tree_hash(root: Path) -> dict[str, str]:
    """Every entry under root: symlink target, file sha256 + mtime, or dir marker."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in sorted(dns + fns):
            p = Path(dp) / n
            rel = os.fspath(p.relative_to(root))
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{st.st_mtime_ns}:{st.st_ino}"
    return out


TF_FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "tensorflow"


def tf_bundle_bytes() -> tuple[bytes, bytes]:
    """(index, data shard) bytes of a real one-shard TF 2 checkpoint (the fixture's ckpt-10);
    when ../shared/fixtures is absent, a valid bundle from tests/tf_writer.py (TF's byte layout,
    written independently of ckptctl) so the run tests still read real checkpoints."""
    src = TF_FIXTURES / "tf2_manager_run"
    if (src / "ckpt-10.index").is_file():
        return (src / "ckpt-10.index").read_bytes(), (src / "ckpt-10.data-00000-of-00001").read_bytes()
    import tempfile

    import numpy as np
    from tf_writer import write_bundle

    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d) / "ckpt-10"
        write_bundle(
            prefix,
            {
                "model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.arange(12, dtype=np.float32).reshape(3, 4),
                "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(10, dtype=np.int64),
            },
        )
        return (Path(d) / "ckpt-10.index").read_bytes(), (Path(d) / "ckpt-10.data-00000-of-00001").read_bytes()


def tf_manager_run(
    root: Path,
    steps=(1, 2, 3),
    prefix: str = "ckpt-{step}",
    shards: int = 1,
    state: str | None = "managed",
    absolute: bool = False,
) -> Path:
    """A tf.train.CheckpointManager-style folder: {prefix}.index + every data shard per step, and a
    `checkpoint` state file in TF's text format naming the last step and every step (state="managed"),
    or none (state=None). Shard 0 holds the real data bytes; further shards are padding."""
    root.mkdir(parents=True, exist_ok=True)
    index, data = tf_bundle_bytes()
    names = []
    for s in steps:
        p = prefix.format(step=s)
        names.append(os.fspath(root / p) if absolute else p)
        (root / f"{p}.index").write_bytes(index)
        for k in range(shards):
            (root / f"{p}.data-{k:05d}-of-{shards:05d}").write_bytes(data if k == 0 else b"\0" * (64 + k))
    if state == "managed":
        lines = [f'model_checkpoint_path: "{names[-1]}"']
        lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
        lines += [f"all_model_checkpoint_timestamps: {1796193700.5 + i}" for i in range(len(names))]
        lines += ["last_preserved_timestamp: 1796193600.25"]
        (root / "checkpoint").write_text("\n".join(lines) + "\n")
    return root
