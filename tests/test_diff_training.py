"""issue 16, `diff` part: training checkpoints compare their model weights by default (the rule
convert and average use), --all/--key/--include/--exclude, NaN/Inf norms in --along, both runs'
metrics side by side, and --ignore-dtype across a cast. Inputs are written with torch/safetensors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, run

torch = pytest.importorskip("torch")

from ckptctl.ops import diff as ops  # noqa: E402
from ckptctl.ops.diff_along import along_run  # noqa: E402

CALLBACK = (
    "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
    "'every_n_epochs': 1, 'train_time_interval': None}"
)


def weights(seed: int, n: int = 3, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(n):
        sd[f"layers.{i}.weight"] = torch.randn(8, 8, generator=g) * scale
        sd[f"layers.{i}.bias"] = torch.randn(8, generator=g) * scale
    return sd


def lightning_dict(sd: dict, step: int, opt_fill: float = 0.0, score: float = 0.5) -> dict:
    """What Lightning's ModelCheckpoint saves: state_dict + optimizer_states + callbacks + loops."""
    state = {
        i: {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.full_like(t, opt_fill),
            "exp_avg_sq": torch.full_like(t, abs(opt_fill)),
        }
        for i, t in enumerate(sd.values())
    }
    return {
        "epoch": step // 100,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {
            CALLBACK: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(score),
                "current_score": torch.tensor(score),
                "kth_value": torch.tensor(float("inf")),
                "best_model_path": f"/home/someone/run/epoch={step // 100}.ckpt",
            }
        },
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(len(sd)))}]}],
        "lr_schedulers": [{"last_epoch": step // 100}],
    }


def n_tensors(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(n_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(n_tensors(v) for v in obj)
    return 0


def number(obj: dict, key: str) -> float:
    """A float field of ckptctl's JSON: a number, or null with the reason in the object's
    "nonfinite" map (the strict-JSON form of the output layer; a bare NaN before it)."""
    v = obj[key]
    if v is None:
        return float(obj["nonfinite"][key])
    return float(v)


@pytest.fixture
def ckpts(tmp_path):
    sd = weights(1)
    a = lightning_dict(sd, 100, opt_fill=0.1, score=0.9)
    b = lightning_dict(sd, 200, opt_fill=0.2, score=0.4)  # same weights, other optimizer/callback state
    torch.save(a, tmp_path / "a.ckpt")
    torch.save(b, tmp_path / "b.ckpt")
    sd2 = dict(sd)
    sd2["layers.1.bias"] = sd["layers.1.bias"] * 2
    torch.save(lightning_dict(sd2, 200, opt_fill=0.2), tmp_path / "c.ckpt")
    others = n_tensors(a) - n_tensors(a["state_dict"])
    assert others == 18 + 3  # 6 params x (step, exp_avg, exp_avg_sq) + 3 callback scalars
    return tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt", sd, others


# ---- point 3: one rule for training checkpoints ----------------------------------------------------
def test_two_ckpts_compare_model_weights_by_default(ckpts):
    a, b, c, sd, others = ckpts
    p = run("diff", a, b)
    assert p.returncode == 0, p.stdout + p.stderr  # the weights are the same; optimizer state is not
    assert not any(ln.startswith(("optimizer", "callbacks", "state_dict/")) for ln in p.stdout.splitlines())
    assert p.stdout.splitlines()[-1].startswith("equal (bit-exact): 6 tensors")
    note = [ln for ln in p.stderr.splitlines() if "model weights only" in ln]
    assert note == [
        f"comparing model weights only (state_dict/; {others} optimizer/other tensors left out of each; "
        "--all to include)"
    ]
    doc = json.loads(run("diff", a, c, "-f", "json").stdout)
    assert [d["name"] for d in doc["changed"]] == ["model.layers.1.bias"]
    assert doc["num_identical"] == 5 and doc["selection"]["a"]["left_out"] == others
    assert doc["changed"][0]["max_abs_diff"] == pytest.approx(float(sd["layers.1.bias"].abs().max()), rel=1e-6)
    p = run("diff", a, c)
    assert p.returncode == 1 and p.stdout.splitlines()[-1] == "different (bit-exact): 1 changed, 5 identical"


def test_all_compares_optimizer_state_and_callbacks(ckpts):
    a, b, _c, _sd, others = ckpts
    p = run("diff", a, b, "--all")
    assert p.returncode == 1
    assert "model weights only" not in p.stderr
    doc = json.loads(cli("diff", a, b, "--all", "-f", "json").stdout)
    changed = {d["name"] for d in doc["changed"]}
    assert {f"optimizer_states/0/state/{i}/{k}" for i in range(6) for k in ("step", "exp_avg", "exp_avg_sq")} <= changed
    assert f"callbacks/{CALLBACK}/best_model_score" in changed
    assert doc["num_identical"] + doc["num_changed"] == 6 + others
    assert "state_dict/model.layers.0.weight" not in changed  # weights still equal, under their full names
    # --exclude with --all: what is left is equal again
    p = run("diff", a, b, "--all", "--exclude", "optimizer_states/*", "--exclude", "callbacks/*")
    assert p.returncode == 0 and "equal (bit-exact): 6 tensors" in p.stdout
    # --key: one part, on each side
    doc = json.loads(cli("diff", a, b, "--key", "optimizer_states/0", "-f", "json").stdout)
    assert doc["num_changed"] == 18 and doc["key_a"] == doc["key_b"] == "optimizer_states/0"
    assert {d["name"] for d in doc["changed"]} == {
        f"state/{i}/{k}" for i in range(6) for k in ("step", "exp_avg", "exp_avg_sq")
    }
    p = run("diff", a, b, "--key", "state_dict", "--all")
    assert p.returncode == 2 and "--key and --all" in p.stderr


def test_include_and_exclude_match_like_convert(ckpts):
    a, _b, c, _sd, _others = ckpts
    r = cli("diff", a, c, "--include", "model.layers.0", "-f", "json")  # a module prefix
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["num_identical"] == 2 and doc["num_changed"] == 0
    r = cli("diff", a, c, "--include", "state_dict/model.layers.1.*", "-f", "json")  # the full name works too
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and [d["name"] for d in doc["changed"]] == ["model.layers.1.bias"]
    assert doc["num_identical"] == 1
    r = cli("diff", a, c, "-x", "*.bias")
    assert r.exit_code == 0 and "equal (bit-exact): 3 tensors" in r.stdout
    assert cli("diff", a, c, "--exclude", "model.layers.1.bias").exit_code == 0
    p = run("diff", a, c, "--include", "nothing.here")
    assert p.returncode == 2 and "no tensor left to compare" in p.stderr and "Traceback" not in p.stderr
    # the same option names and help text as convert's
    import typer.main

    from ckptctl.cli.app import app

    group = typer.main.get_command(app)
    opts = {cmd: {p.name: p for p in group.commands[cmd].params} for cmd in ("diff", "convert")}
    for name in ("include", "exclude"):
        d, cv = opts["diff"][name], opts["convert"][name]
        assert d.help == cv.help and set(cv.opts) <= set(d.opts)


def test_along_uses_model_weights_only(tmp_path):
    """Optimizer state with NaN (and the callback's inf kth_value) never enters --along by default."""
    run_dir = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    run_dir.mkdir(parents=True)
    states = {}
    for i, step in enumerate((100, 200, 300)):
        sd = {k: v + 0.1 * i for k, v in weights(7).items()}
        states[step] = sd
        ck = lightning_dict(sd, step, opt_fill=float("nan") if step == 300 else 0.5)
        torch.save(ck, run_dir / f"epoch={i}-step={step}.ckpt")
    p = run("diff", run_dir, "--along")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no NaN/Inf in any checkpoint" in p.stdout
    assert "comparing model weights only (state_dict/; 21 optimizer/other tensors left out" in p.stderr
    res = along_run(run_dir)
    assert res.num_tensors == 6
    for s, step in zip(res.steps, (100, 200, 300)):
        flat = np.concatenate([t.double().numpy().ravel() for t in states[step].values()])
        assert s.weight_norm == pytest.approx(np.linalg.norm(flat), rel=1e-12)
        assert s.nonfinite == 0
    # --all: everything, so the callbacks' inf and the optimizer's NaN show
    p = run("diff", run_dir, "--along", "--all")
    assert p.returncode == 1 and "first NaN/Inf at step 100" in p.stdout
    res = along_run(run_dir, all_=True)
    assert [s.nonfinite for s in res.steps] == [1, 1, 1 + 2 * sum(t.numel() for t in states[300].values())]
    assert math.isinf(res.steps[0].weight_norm)


# ---- point 4: NaN/Inf norms are nan/inf, not 0 ------------------------------------------------------
def _st_run(folder: Path, steps, bad: dict) -> dict:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    out = {}
    for i, s in enumerate(steps):
        w = {f"blocks.{j}.weight": torch.full((4, 4), 0.1 * (i + 1) + j) for j in range(5)}
        for name, val in bad.get(s, {}).items():
            w[name] = torch.full((4, 4), val)
        out[s] = w
        save_file(w, str(folder / f"step_{s}.safetensors"), metadata={"step": str(s)})
    return out


def test_along_after_nan_reports_nan_not_zero(tmp_path):
    every = {f"blocks.{j}.weight": float("nan") for j in range(5)}  # a diverged run: every weight NaN
    _st_run(tmp_path / "run", (10, 20, 30, 40), {30: every, 40: every})
    p = run("diff", tmp_path / "run", "--along")
    assert p.returncode == 1
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.strip()[:2].isdigit()}
    for step in ("30", "40"):
        assert rows[step][1] == "nan" and "nan" in rows[step][2:4], rows[step]  # rel update, weight norm
        assert "80" in rows[step]  # 5 tensors x 16 NaN
    assert rows["20"][1] != "nan"
    doc = json.loads(cli("diff", tmp_path / "run", "--along", "-f", "json").stdout)
    st = {s["step"]: s for s in doc["steps"]}
    assert math.isnan(number(st[30], "weight_norm")) and math.isnan(number(st[30], "update_rel_l2"))
    assert math.isnan(number(st[40], "update_norm"))
    assert number(st[20], "weight_norm") == pytest.approx(np.sqrt(16 * sum((0.2 + j) ** 2 for j in range(5))), rel=1e-6)
    # the bad-tensor list: cut in the summary line, complete with -v (table column and summary)
    names = [f"blocks.{j}.weight" for j in range(5)]
    assert "blocks.0.weight, blocks.1.weight, blocks.2.weight ... (5 in all; -v lists every one)" in p.stdout
    assert st[30]["nonfinite_tensors"] == names
    pv = run("-v", "diff", tmp_path / "run", "--along")
    assert pv.returncode == 1
    assert f"first NaN/Inf at step 30 (step_30.safetensors): 80 elements in {', '.join(names)}" in pv.stdout
    assert "NaN/Inf tensors" in pv.stdout and pv.stdout.count(", ".join(names)) == 3  # steps 30, 40, summary


def test_along_inf_is_inf(tmp_path):
    _st_run(tmp_path / "run", (1, 2, 3), {2: {"blocks.1.weight": float("inf")}, 3: {"blocks.1.weight": float("inf")}})
    res = along_run(tmp_path / "run")
    assert math.isinf(res.steps[1].weight_norm) and math.isinf(res.steps[1].update_rel_l2)
    assert math.isnan(res.steps[2].update_rel_l2)  # inf - inf
    assert res.steps[1].nonfinite == 16 and res.steps[1].nonfinite_tensors == ["blocks.1.weight"]
    p = run("diff", tmp_path / "run", "--along", "-f", "csv")
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [r["weight_norm"] for r in rows][1:] == ["inf", "inf"]
    assert rows[1]["update_rel_l2"] == "inf" and rows[2]["update_rel_l2"] == "nan"


# ---- point 5: both runs' metrics side by side -------------------------------------------------------
def _hf_run(root: Path, losses: dict, seed: int) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    history = []
    for step, loss in losses.items():
        history.append({"epoch": step / 1000, "loss": 2.0, "learning_rate": 1e-4, "step": step})
        history.append({"epoch": step / 1000, "eval_loss": loss, "eval_runtime": 1.5, "step": step})
        ck = root / f"checkpoint-{step}"
        ck.mkdir()
        save_file(weights(seed + step), str(ck / "model.safetensors"), metadata={"format": "pt"})
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        # json.dumps writes NaN as the HF Trainer does (bare NaN)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": list(history)}))


def test_two_runs_show_both_runs_metrics(tmp_path):
    _hf_run(tmp_path / "ra", {500: 0.9, 1000: 0.7, 1500: 0.6}, seed=0)
    _hf_run(tmp_path / "rb", {500: 0.8, 1000: float("nan"), 1500: 0.5}, seed=1)
    shutil.copy(tmp_path / "ra" / "checkpoint-500" / "model.safetensors", tmp_path / "rb" / "checkpoint-500")
    p = run("diff", tmp_path / "ra", tmp_path / "rb")
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    head = lines[0]
    assert "eval_loss A" in head and "eval_loss B" in head
    assert head.index("eval_loss A") < head.index("eval_loss B") < head.index("result")
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln.strip()[:1].isdigit()}
    assert rows["500"][1:3] == ["0.9", "0.8"] and rows["500"][5] == "equal"
    assert rows["1000"][1:3] == ["0.7", "nan"]
    assert rows["1500"][1:3] == ["0.6", "0.5"]
    assert "eval_runtime" not in head and "metrics not shown: learning_rate, eval_runtime (--wide" in p.stdout
    doc = json.loads(cli("diff", tmp_path / "ra", tmp_path / "rb", "-f", "json").stdout)
    st = {s["step"]: s for s in doc["steps"]}
    assert st[500]["metrics"]["a"]["eval_loss"] == 0.9 and st[500]["metrics"]["b"]["eval_loss"] == 0.8
    assert math.isnan(number(st[1000]["metrics"]["b"], "eval_loss"))
    assert st[1500]["metrics"]["a"]["loss"] == 2.0 and "eval_loss" in doc["metrics"]
    assert st[500]["equal"] and not st[1000]["equal"]
    csv_text = cli("diff", tmp_path / "ra", tmp_path / "rb", "-f", "csv").stdout
    assert csv_text.splitlines()[0].endswith("eval_loss_a,eval_loss_b,eval_runtime_a,eval_runtime_b")
    wide = run("diff", tmp_path / "ra", tmp_path / "rb", "--wide").stdout
    assert "eval_runtime A" in wide.splitlines()[0]


# ---- point 6: equal up to a cast ------------------------------------------------------------------
@pytest.fixture
def cast_pair(tmp_path):
    from safetensors.torch import save_file

    sd = weights(3, n=14, scale=0.5)  # 28 tensors, |x| < 4: an fp16 cast errs by less than 1e-3
    sd["counts"] = torch.arange(10, dtype=torch.int64)
    torch.save(sd, tmp_path / "model.pt")
    half = {k: (v.half() if v.is_floating_point() else v.int()) for k, v in sd.items()}
    save_file(half, str(tmp_path / "model-fp16.safetensors"))
    return tmp_path, sd, half


def test_dtype_change_says_so_and_ignore_dtype_compares_values(cast_pair):
    d, sd, half = cast_pair
    pt, fp16 = d / "model.pt", d / "model-fp16.safetensors"
    p = run("diff", pt, fp16, "--atol", "1e-3")
    assert p.returncode == 1
    assert (
        "29 tensors changed dtype only (float32 -> float16 ×28, int64 -> int32 ×1), values equal "
        "(atol=0.001, rtol=0): --ignore-dtype counts them as equal"
    ) in p.stdout
    assert p.stdout.splitlines()[-1] == "different (atol=0.001, rtol=0): 29 changed (29 in dtype only), 0 identical"
    p = run("diff", pt, fp16, "--atol", "1e-3", "--ignore-dtype")
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines()[-1].startswith("equal (atol=0.001, rtol=0, across dtypes too): 29 tensors")
    # no tolerance given: within the cast's own rounding (eps of the less precise dtype)
    p = run("diff", pt, fp16, "--ignore-dtype")
    assert p.returncode == 0, p.stdout
    doc = json.loads(cli("diff", pt, fp16, "--ignore-dtype", "-f", "json").stdout)
    assert doc["equal"] and doc["ignore_dtype"] and doc["num_dtype_only"] == 29
    # without --ignore-dtype and without a tolerance: the dtype change and the hint
    p = run("diff", pt, fp16)
    assert p.returncode == 1 and "changed dtype (float32 -> float16 ×28, int64 -> int32 ×1): --ignore-dtype" in p.stdout


def test_ignore_dtype_still_finds_real_changes(cast_pair):
    from safetensors.torch import save_file

    d, sd, half = cast_pair
    bad = dict(half)
    bad["layers.2.weight"] = (sd["layers.2.weight"] * 1.01).half()  # 1%: ten fp16 steps
    bad["layers.3.bias"] = half["layers.3.bias"].clone()
    bad["layers.3.bias"][0] = float("inf")  # an overflow is a change
    save_file(bad, str(d / "bad.safetensors"))
    doc = json.loads(cli("diff", d / "model.pt", d / "bad.safetensors", "--ignore-dtype", "-f", "json").stdout)
    assert not doc["equal"] and {c["name"] for c in doc["changed"]} == {"layers.2.weight", "layers.3.bias"}
    assert doc["num_identical"] == 27
    eps, tiny = float(np.finfo(np.float16).eps), float(np.finfo(np.float16).tiny)
    c = next(c for c in doc["changed"] if c["name"] == "layers.2.weight")
    assert (c["atol"], c["rtol"]) == (tiny, eps)
    # the reference: how many elements move by more than the cast's rounding allows
    x = sd["layers.2.weight"].double().numpy().ravel()
    y = bad["layers.2.weight"].double().numpy().ravel()
    assert c["num_diff"] == int(np.count_nonzero(np.abs(x - y) > tiny + eps * np.abs(y))) > 0
    p = run("diff", d / "model.pt", d / "bad.safetensors", "--ignore-dtype")
    assert p.returncode == 1
    assert p.stdout.splitlines()[-1] == (
        "different (same dtype bit-exact, across dtypes within the cast's rounding): 2 changed, 27 identical"
    )
    # bf16: a coarser cast, a wider default tolerance
    import ml_dtypes  # noqa: F401

    bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(bf, str(d / "bf16.safetensors"))
    assert run("diff", d / "model.pt", d / "bf16.safetensors", "--ignore-dtype").returncode == 0
    assert run("diff", d / "model-fp16.safetensors", d / "bf16.safetensors", "--ignore-dtype").returncode == 0
    assert ops.cast_tolerance("float32", "bfloat16") == (float(np.finfo(ml_dtypes.bfloat16).tiny), 2.0**-7)


def test_rtol_never_makes_a_finite_value_close_to_inf(tmp_path):
    """|a - inf| <= atol + rtol * |inf| holds in IEEE arithmetic; an overflow is still a change."""
    from safetensors.numpy import save_file

    a = {"w": np.array([1.0, 2.0, 3.0, np.inf, np.nan], np.float32), "c": np.array([1 + 1j, 2], np.complex64)}
    b = {
        "w": np.array([1.0, np.inf, -np.inf, np.inf, np.nan], np.float32),
        "c": np.array([np.inf + 0j, 2], np.complex64),
    }
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    r = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--rtol", "1e-3", "-f", "json")
    assert r.exit_code == 1
    got = {c["name"]: c["num_diff"] for c in json.loads(r.stdout)["changed"]}
    assert got == {"w": 2, "c": 1}  # inf == inf and NaN == NaN stay equal


def test_a_tensor_gone_all_nan_has_nan_statistics_not_zero(tmp_path):
    from safetensors.numpy import save_file

    w = np.linspace(-1, 1, 64, dtype=np.float32)
    save_file({"w": w, "v": w}, str(tmp_path / "a.safetensors"))
    v = w.copy()
    v[3] = np.nan
    save_file({"w": np.full(64, np.nan, np.float32), "v": v}, str(tmp_path / "b.safetensors"))
    res = ops.diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    by = {d.name: d for d in res.changed}
    assert all(math.isnan(x) for x in (by["w"].rel_l2, by["w"].max_abs_diff, by["w"].cosine))
    assert by["v"].rel_l2 == 0.0 and by["v"].num_diff == 1  # the finite pairs still say something
    p = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    row = next(ln.split() for ln in p.stdout.splitlines() if ln.startswith("w "))
    assert p.returncode == 1 and row[1:5] == ["values", "nan", "nan", "nan"]


@pytest.mark.skipif(
    not hasattr(__import__("ckptctl.ops.select", fromlist=["x"]), "default_part"),
    reason="the shared rule for {'model':..., 'optimizer':...} dicts (select.default_part) is not in this tree yet",
)
def test_plain_model_and_optimizer_dict_compares_the_model(tmp_path):
    sd = weights(5)
    for name, step, fill in (("a.pt", 1, 0.1), ("b.pt", 2, 0.2)):
        opt = {
            "state": {i: {"exp_avg": torch.full_like(t, fill)} for i, t in enumerate(sd.values())},
            "param_groups": [{"lr": 0.1, "params": list(range(len(sd)))}],
        }
        torch.save({"model": sd, "optimizer": opt, "epoch": step}, tmp_path / name)
    p = run("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "comparing model weights only (6 optimizer/other tensors left out of each; --all to include)" in p.stderr
    assert "equal (bit-exact): 6 tensors" in p.stdout
    assert run("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--all").returncode == 1
