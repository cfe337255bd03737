"""demo: write a small, realistic sample of training runs to try every command on.

It writes with the frameworks' own savers (torch.save, safetensors, h5py), the way real runs do:
an HF Trainer run (checkpoint-N/ folders with trainer_state.json), the same run gone wrong (its
weights and losses turn NaN at step 300: hf-run-nan/), a Lightning run (epoch=E-step=S.ckpt +
last.ckpt), and single files in each format. A few MB in all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckptctl.errors import UsageError

STEPS = (100, 200, 300, 400)
EVAL_LOSS = {100: 2.31, 200: 1.87, 300: 1.62, 400: 1.71}  # best is step 300, not the last
NAN_FROM = 300  # hf-run-nan: the step from which blocks.1's attention weights and the losses are NaN


def _model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(512, 64)
            self.blocks = nn.ModuleList(
                nn.ModuleDict({"attn": nn.Linear(64, 192), "proj": nn.Linear(64, 64), "norm": nn.LayerNorm(64)})
                for _ in range(2)
            )
            self.norm = nn.BatchNorm1d(64)  # gives an int64 buffer: num_batches_tracked
            self.lm_head = nn.Linear(64, 512, bias=False)
            self.lm_head.weight = self.embed.weight  # tied, as in most language models

    return TinyLM()


def _train_step(model, opt, step: int) -> None:
    import torch

    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    opt.step()
    model.norm.num_batches_tracked += 100


def write_demo(root: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write the sample under `root`; returns the paths written."""
    import argparse
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    if root.exists() and any(root.iterdir()) and not force:
        raise UsageError(f"{root} exists and is not empty (use --force to write into it)")
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hf = root / "hf-run"
    pl = root / "lightning-run"
    nan_run = root / "hf-run-nan"
    for d in (hf, pl, nan_run):
        d.mkdir(exist_ok=True)
    log_history: list[dict] = []
    nan_history: list[dict] = []
    best_step = min(EVAL_LOSS, key=EVAL_LOSS.__getitem__)
    for i, step in enumerate(STEPS):
        _train_step(model, opt, step)
        sd = model.state_dict()
        # -- HF Trainer layout: checkpoint-N/ ------------------------------------------------
        ck = hf / f"checkpoint-{step}"
        ck.mkdir(exist_ok=True)
        weights = {k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}  # HF drops tied copies
        save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
        torch.save(opt.state_dict(), ck / "optimizer.pt")
        torch.save({"base_lrs": [1e-3], "last_epoch": step}, ck / "scheduler.pt")
        random.seed(step)
        np.random.seed(step)
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
            ck / "rng_state.pth",
        )
        torch.save(argparse.Namespace(output_dir=str(hf), learning_rate=1e-3, save_steps=100), ck / "training_args.bin")
        log_history.append({"step": step, "epoch": i + 1.0, "loss": round(EVAL_LOSS[step] + 0.2, 4)})
        log_history.append({"step": step, "epoch": i + 1.0, "eval_loss": EVAL_LOSS[step]})
        best = min((s for s in STEPS if s <= step), key=EVAL_LOSS.__getitem__)
        state = {
            "global_step": step,
            "epoch": i + 1.0,
            "best_metric": EVAL_LOSS[best],
            "best_model_checkpoint": str(hf / f"checkpoint-{best}"),
            "log_history": list(log_history),
            "max_steps": STEPS[-1],
        }
        (ck / "trainer_state.json").write_text(json.dumps(state, indent=2))
        written.append(ck)
        # -- the same run gone wrong: from NAN_FROM on, blocks.1.attn and the losses are NaN ----
        bad = step >= NAN_FROM
        ck = nan_run / f"checkpoint-{step}"
        ck.mkdir(exist_ok=True)
        save_file(
            {
                k: (torch.full_like(v, float("nan")) if bad and k.startswith("blocks.1.attn.") else v)
                for k, v in weights.items()
            },
            ck / "model.safetensors",
            metadata={"format": "pt"},
        )
        loss = float("nan") if bad else EVAL_LOSS[step]
        nan_history.append({"step": step, "epoch": i + 1.0, "loss": loss + 0.2 if not bad else loss})
        nan_history.append({"step": step, "epoch": i + 1.0, "eval_loss": loss})
        # json.dumps writes NaN bare, as the HF Trainer's own trainer_state.json does
        (ck / "trainer_state.json").write_text(
            json.dumps(
                {"global_step": step, "epoch": i + 1.0, "log_history": list(nan_history), "max_steps": STEPS[-1]},
                indent=2,
            )
        )
        written.append(ck)
        # -- Lightning layout: epoch=E-step=S.ckpt ------------------------------------------
        ckpt = {
            "epoch": i,
            "global_step": step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": step}],
            "callbacks": {
                "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
                "'every_n_epochs': 1, 'train_time_interval': None}": {
                    "monitor": "val_loss",
                    "best_model_score": torch.tensor(EVAL_LOSS[best]),
                    "best_model_path": str(pl / f"epoch={STEPS.index(best)}-step={best}.ckpt"),
                    "current_score": torch.tensor(EVAL_LOSS[step]),
                }
            },
            "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 1e-3, "hidden": 64, "vocab": 512},
        }
        path = pl / f"epoch={i}-step={step}.ckpt"
        torch.save(ckpt, path)
        written.append(path)
    last = pl / "last.ckpt"
    if last.is_symlink() or last.exists():
        last.unlink()
    last.symlink_to(f"epoch={len(STEPS) - 1}-step={STEPS[-1]}.ckpt")
    written.append(last)

    # -- single files in each format ----------------------------------------------------------
    sd = model.state_dict()
    torch.save(sd, root / "model.pt")  # keeps the tied lm_head.weight as one tensor
    written.append(root / "model.pt")
    half = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
        for k, v in sd.items()
        if k != "lm_head.weight"
    }
    save_file(half, root / "model-bf16.safetensors", metadata={"format": "pt", "note": "bf16 copy"})
    written.append(root / "model-bf16.safetensors")
    import h5py

    with h5py.File(root / "model.h5", "w") as f:
        f.attrs["framework"] = "demo"
        for k, v in sd.items():
            if k == "lm_head.weight":
                continue
            f.create_dataset(k.replace(".", "/"), data=v.numpy())
    written.append(root / "model.h5")
    best_dir = hf / f"checkpoint-{best_step}"
    (root / "README.txt").write_text(
        "A sample of training runs written by `ckptctl demo`. Try:\n\n"
        f"  ckptctl ls {hf}\n"
        f"  ckptctl ls {pl}\n"
        f"  ckptctl inspect {root / 'model.pt'}\n"
        f"  ckptctl inspect {pl / 'last.ckpt'} --format tree\n"
        f"  ckptctl diff {hf / 'checkpoint-300'} {hf / 'checkpoint-400'}\n"
        f"  ckptctl diff {hf} --along\n"
        f"  ckptctl ls {nan_run}                 # a run that went NaN at step {NAN_FROM}\n"
        f"  ckptctl diff {nan_run} --along\n"
        f"  ckptctl diff {hf} {nan_run}\n"
        f"  ckptctl convert {pl / 'last.ckpt'} {root / 'last.safetensors'}\n"
        f"  ckptctl average {hf} --last 3 -o {root / 'avg.safetensors'}\n"
        f"  ckptctl prune {hf} --keep-last 1 --keep-best eval_loss --min-age 0   # dry run; best is {best_dir.name}\n"
        f"  ckptctl scan {root}\n"
    )
    written.append(root / "README.txt")
    return written
