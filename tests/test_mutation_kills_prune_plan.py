"""Tests written for `tools/mutation.sh prune_plan` (docs/testing.md, "Mutation testing"): prune's
planner (`validate`, `make_plan`, `_decide_group`), through the public `make_plan`.

The CLI tests of test_prune.py cost about 10 s a mutant here; these call `make_plan` in-process on
small run folders (real files, a fixed `now`), and assert the whole decision: which checkpoints
are kept or deleted, and every reason, protection and policy the plan gives for each. The files
exist on disk, so the plan's snapshots (taken of every checkpoint to delete) are real."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
from run_builders import age_tree, st_run, tf_manager_run

from ckptctl.errors import UsageError
from ckptctl.ops.prune import FileSnap, Policy, make_plan
from ckptctl.ops.runs import Run, RunCheckpoint, scan_run

NOW = 2_000_000_000.0
DAY = 86400.0


def ck(root: Path, step: int | None, *, age: float = DAY, metrics=None, name=None, **kw) -> RunCheckpoint:
    """A one-file checkpoint on disk, `age` seconds older than NOW."""
    p = root / (name or f"model_{step}.safetensors")
    if kw.get("layout") in ("orbax",) or p.suffix == "":
        p.mkdir(parents=True, exist_ok=True)
        f = p / "data"
    else:
        root.mkdir(parents=True, exist_ok=True)
        f = p
    f.write_bytes(b"x" * (10 + (step or 0) % 7))
    os.utime(f, (NOW - age, NOW - age))
    return RunCheckpoint(
        path=p,
        files=[f],
        step=step,
        step_source="name",
        format="safetensors",
        size=f.stat().st_size,
        mtime=NOW - age,
        metrics=dict(metrics or {}),
        run=root,
        **kw,
    )


def steps_run(root: Path, steps=(100, 200, 300, 400, 500, 600, 700, 800), metrics=None, ages=None) -> Run:
    """Checkpoints at `steps`, the higher step written later (a day ago ... 8 days ago)."""
    n = len(steps)
    cks = [
        ck(root, s, age=(ages or {}).get(s, DAY * (n - i)), metrics=(metrics or {}).get(s)) for i, s in enumerate(steps)
    ]
    return Run(path=root, checkpoints=cks)


def plan(runs, now=NOW, **policy):
    return make_plan(runs if isinstance(runs, list) else [runs], Policy(**policy), now=now)


def by_step(p) -> dict:
    return {d.ckpt.step: d for d in p.decisions}


def kept(p) -> list:
    return sorted(d.ckpt.step for d in p.decisions if d.keep)


def deleted(p) -> list:
    return sorted(d.ckpt.step for d in p.decisions if not d.keep)


# ---- validate ---------------------------------------------------------------------------------------
def test_no_policy_is_refused_with_the_reason(tmp_path):
    run = steps_run(tmp_path / "r")
    with pytest.raises(UsageError) as e:
        plan(run)
    assert e.value.message == (
        "no retention policy given, so nothing can be decided: add at least one of --keep-last N, "
        "--keep-every K, --keep-best METRIC, --keep-steps S,..., --keep-since DURATION, --exp-spacing "
        "(every checkpoint not kept by a policy would be deleted; nothing was deleted)"
    )
    with pytest.raises(UsageError) as e:
        plan(run, keep_last=1, mode="min")
    assert e.value.message == "--mode only applies to --keep-best METRIC"
    with pytest.raises(UsageError) as e:
        plan(run, keep_last=1, best_n=2)
    assert e.value.message == "--best-n only applies to --keep-best METRIC"
    # each policy alone is enough, and --keep-since 0 is a policy (is not None)
    for pol in (
        {"keep_last": 1},
        {"keep_every": 300},
        {"keep_steps": [100]},
        {"keep_since": 0.0, "keep_since_text": "0s"},
        {"exp_spacing": True},
        {"keep_best": "loss", "mode": "min", "best_n": 2},
    ):
        run = steps_run(tmp_path / f"r{len(pol)}{sorted(pol)[0]}", metrics={s: {"loss": s / 1000} for s in (100, 800)})
        assert plan(run, **pol).decisions


# ---- policies: which checkpoints, and the exact reasons ------------------------------------------------
def test_keep_last_takes_the_highest_steps_not_the_newest_files(tmp_path):
    # step 200 was written last (a resumed run), steps 700 and 800 long ago
    run = steps_run(tmp_path / "r", ages={200: 3600.0, 700: 9 * DAY, 800: 10 * DAY})
    p = plan(run, keep_last=2)
    assert kept(p) == [200, 700, 800]
    d = by_step(p)
    assert d[700].kept_by == ["last 2"] and d[700].protected_by == []
    assert d[800].kept_by == ["last 2"] and d[800].protected_by == ["newest"]
    assert d[200].kept_by == [] and d[200].protected_by == ["newest (modified last)"]
    assert d[200].reasons == ["newest (modified last)"]
    assert d[800].reasons == ["newest", "last 2"]
    assert d[100].reasons == ["no policy keeps it"] and d[100].keep is False
    assert all(x.root == tmp_path / "r" for x in p.decisions)


def test_keep_every(tmp_path):
    p = plan(steps_run(tmp_path / "r"), keep_every=300)
    assert kept(p) == [300, 600, 800]
    assert by_step(p)[300].kept_by == ["step divisible by 300"]
    assert by_step(p)[600].reasons == ["step divisible by 300"]


def test_keep_best_min_max_best_n_and_labels(tmp_path):
    losses = {100: 0.9, 200: 0.6, 300: 0.1, 400: 0.5, 500: 0.7, 600: 0.2, 700: 0.8, 800: 0.85}
    mk = lambda name: steps_run(tmp_path / name, metrics={s: {"eval_loss": v} for s, v in losses.items()})  # noqa: E731
    p = plan(mk("a"), keep_best="eval_loss", mode="min")
    assert kept(p) == [300, 800]
    assert by_step(p)[300].kept_by == ["best eval_loss (0.1)"]
    p = plan(mk("b"), keep_best="eval_loss", mode="min", best_n=2)
    assert kept(p) == [300, 600, 800]
    assert by_step(p)[300].kept_by == ["best eval_loss #1 (0.1)"]
    assert by_step(p)[600].kept_by == ["best eval_loss #2 (0.2)"]
    p = plan(mk("c"), keep_best="eval_loss", mode="max", best_n=3)
    assert kept(p) == [100, 700, 800]
    assert by_step(p)[100].kept_by == ["best eval_loss #1 (0.9)"]
    assert by_step(p)[800].kept_by == ["best eval_loss #2 (0.85)"]
    assert by_step(p)[700].kept_by == ["best eval_loss #3 (0.8)"]
    assert p.notes == [] and p.warnings == []  # mode given: nothing guessed


def test_keep_best_ties_go_to_the_later_step_and_nan_is_never_best(tmp_path):
    vals = {100: 0.5, 200: math.nan, 300: 0.5, 400: 0.7, 500: math.nan}
    run = steps_run(tmp_path / "r", steps=(100, 200, 300, 400, 500), metrics={s: {"loss": v} for s, v in vals.items()})
    p = plan(run, keep_best="loss", mode="min")
    assert by_step(p)[300].kept_by == ["best loss (0.5)"] and by_step(p)[100].kept_by == []
    run = steps_run(tmp_path / "s", steps=(100, 200, 300, 400, 500), metrics={s: {"loss": v} for s, v in vals.items()})
    p = plan(run, keep_best="loss", mode="max", best_n=4)
    # 0.7, then 0.5 at 300 and at 100; the two NaN are never "best", whatever best_n says
    assert [by_step(p)[s].kept_by for s in (400, 300, 100)] == [
        ["best loss #1 (0.7)"],
        ["best loss #2 (0.5)"],
        ["best loss #3 (0.5)"],
    ]
    assert by_step(p)[200].kept_by == [] and by_step(p)[200].keep is False
    assert by_step(p)[500].kept_by == [] and by_step(p)[500].protected_by == ["newest"]


def test_keep_best_all_nan_keeps_none_by_it(tmp_path):
    run = steps_run(tmp_path / "r", steps=(100, 200, 300), metrics={s: {"loss": math.nan} for s in (100, 200, 300)})
    p = plan(run, keep_best="loss", mode="min")
    assert kept(p) == [300] and all(d.kept_by == [] for d in p.decisions)


def test_keep_steps_and_the_absent_ones_warned(tmp_path):
    p = plan(steps_run(tmp_path / "r"), keep_steps=[200, 500, 250, 999])
    assert kept(p) == [200, 500, 800]
    assert by_step(p)[500].kept_by == ["step 500 listed"]
    assert p.warnings == ["--keep-steps: no checkpoint at step 250, 999"]
    p = plan(steps_run(tmp_path / "s"), keep_steps=[200])
    assert p.warnings == []


def test_keep_since_boundary_is_kept(tmp_path):
    ages = {s: DAY * (9 - s // 100) for s in (100, 200, 300, 400, 500, 600, 700, 800)}  # 8 days ... 1 day
    p = plan(steps_run(tmp_path / "r", ages=ages), keep_since=3 * DAY, keep_since_text="3d")
    assert kept(p) == [600, 700, 800]  # 600 is exactly 3 days old: kept (>=)
    assert by_step(p)[600].kept_by == ["modified within 3d"]
    assert by_step(p)[800].reasons == ["newest", "modified within 3d"]


def test_exp_spacing_reason(tmp_path):
    p = plan(steps_run(tmp_path / "r"), exp_spacing=True)
    assert kept(p) == [100, 200, 400, 800]
    assert by_step(p)[400].kept_by == ["exponential spacing (first at/after step 400)"]


def test_policies_are_a_union_and_reasons_accumulate(tmp_path):
    losses = {100: 0.9, 200: 0.6, 300: 0.1, 400: 0.5, 500: 0.7, 600: 0.2, 700: 0.8, 800: 0.85}
    run = steps_run(tmp_path / "r", metrics={s: {"eval_loss": v} for s, v in losses.items()})
    p = plan(run, keep_last=2, keep_every=400, keep_best="eval_loss", mode="min", keep_steps=[300])
    assert kept(p) == [300, 400, 700, 800]
    assert by_step(p)[300].kept_by == ["best eval_loss (0.1)", "step 300 listed"]
    assert by_step(p)[800].kept_by == ["last 2", "step divisible by 400"]
    assert by_step(p)[800].protected_by == ["newest"]
    assert p.bytes_freed == sum(d.ckpt.size for d in p.decisions if not d.keep)


# ---- protections ------------------------------------------------------------------------------------
def test_every_checkpoint_at_the_top_step_is_newest(tmp_path):
    root = tmp_path / "r"
    cks = [ck(root, 100, age=5 * DAY), ck(root, 200, age=4 * DAY, name="a_200.safetensors")]
    cks.append(ck(root, 200, age=3 * DAY, name="b_200.safetensors"))
    p = plan(Run(path=root, checkpoints=cks), keep_steps=[100])
    assert [(d.ckpt.path.name, d.protected_by) for d in p.decisions] == [
        ("model_100.safetensors", []),
        ("a_200.safetensors", ["newest"]),
        ("b_200.safetensors", ["newest"]),
    ]
    assert deleted(p) == []


def test_aliases_role_best_of_run_protect_and_say_so(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, 100, age=8 * DAY, aliases=["best.safetensors", "x"]),
        ck(root, 200, age=7 * DAY, best_of_run=["trainer_state best_model_checkpoint", "callback"]),
        ck(root, 300, age=6 * DAY),
        ck(root, None, age=6 * DAY, name="last.safetensors", role="last"),
        ck(root, 400, age=5 * DAY),
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_last=1)
    d = {x.ckpt.path.name: x for x in p.decisions}
    assert d["model_100.safetensors"].protected_by == ["alias target: best.safetensors, x"]
    assert d["model_200.safetensors"].protected_by == [
        "best per trainer_state best_model_checkpoint",
        "best per callback",
    ]
    assert d["last.safetensors"].protected_by == ["the run's last checkpoint"] and d["last.safetensors"].keep
    assert d["model_300.safetensors"].keep is False
    assert [x.ckpt.path.name for x in p.to_delete] == ["model_300.safetensors"]


def test_min_age_protects_young_checkpoints_and_is_noted(tmp_path):
    root = tmp_path / "r"
    cks = [ck(root, 100, age=300.0), ck(root, 200, age=119.0), ck(root, 300, age=120.0), ck(root, 400, age=50.0)]
    p = plan(Run(path=root, checkpoints=cks), keep_last=1)
    d = by_step(p)
    assert d[200].protected_by == ["modified 119s ago, under --min-age 2m (may be being written)"]
    assert d[300].protected_by == [] and d[300].keep is False  # exactly --min-age: old enough
    assert d[100].keep is False
    assert d[400].protected_by == ["newest", "modified 50s ago, under --min-age 2m (may be being written)"]
    # 200 is kept by --min-age alone (400 has other reasons too)
    assert p.notes == [
        "1 checkpoint(s) kept only because they were modified within --min-age 2m (a save may be in progress); "
        "--min-age 0 includes them"
    ]
    cks = [ck(tmp_path / "s", s, age=a) for s, a in ((100, 3 * 3600.0), (200, 2 * 3600.0), (300, 4000.0))]
    p = plan(Run(path=tmp_path / "s", checkpoints=cks), keep_steps=[300], min_age=7200.0, min_age_text="2h")
    assert by_step(p)[100].keep is False
    assert by_step(p)[300].protected_by == ["newest", "modified 66m ago, under --min-age 2h (may be being written)"]
    assert by_step(p)[200].protected_by == []  # exactly 2h: not under it
    assert p.notes == []  # 300 is kept by a policy too


def test_min_age_uses_the_clock_when_no_now_is_given(tmp_path):
    root = st_run(tmp_path / "run", steps=(1, 2, 3))  # just written
    p = make_plan([scan_run(root)], Policy(keep_last=1))
    assert deleted(p) == [] and all("under --min-age 2m" in " ".join(d.protected_by) for d in p.decisions)
    age_tree(root, 3600)
    p = make_plan([scan_run(root)], Policy(keep_last=1))
    assert deleted(p) == [1, 2]
    assert [s.path for s in by_step(p)[1].snapshot] == [root / "model_00000001.safetensors"]


def test_ages_are_said_in_minutes_hours_and_days(tmp_path):
    root = tmp_path / "r"
    cks = [ck(root, 100, age=3 * DAY), ck(root, 200, age=2 * 3600.0 + 5), ck(root, 300, age=600.0)]
    p = plan(Run(path=root, checkpoints=cks), keep_steps=[100, 200, 300], min_age=4 * DAY, min_age_text="4d")
    assert [by_step(p)[s].protected_by[-1].split(",")[0] for s in (100, 200, 300)] == [
        "modified 3d ago",
        "modified 2h ago",
        "modified 10m ago",
    ]


def test_broken_and_incomplete_are_kept_unless_include_broken(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, 100, age=8 * DAY),
        ck(root, 900, age=7 * DAY, error="bad header"),  # the highest step, but broken: not the newest
        ck(root, 950, age=7 * DAY, error="no trainer_state.json", incomplete=True, name="tmp-checkpoint-950"),
        ck(root, None, age=7 * DAY, incomplete=True, name="partial"),
        ck(root, 200, age=6 * DAY),
        ck(root, 300, age=5 * DAY),
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_last=2)
    d = {x.ckpt.path.name: x for x in p.decisions}
    assert d["model_900.safetensors"].protected_by == ["unreadable: bad header (kept; --include-broken deletes it)"]
    assert d["tmp-checkpoint-950"].protected_by == ["no trainer_state.json (kept; --include-broken deletes it)"]
    assert d["partial"].protected_by == ["incomplete (kept; --include-broken deletes it)"]
    assert d["model_300.safetensors"].protected_by == ["newest"]  # not 900 or 950: they are not healthy
    assert d["model_200.safetensors"].kept_by == ["last 2"] and d["model_100.safetensors"].keep is False
    p = plan(Run(path=root, checkpoints=cks), keep_last=2, include_broken=True)
    d = {x.ckpt.path.name: x for x in p.decisions}
    assert d["model_900.safetensors"].keep is False
    assert d["model_900.safetensors"].reasons == ["unreadable, --include-broken: bad header"]
    assert d["tmp-checkpoint-950"].keep is False
    assert d["tmp-checkpoint-950"].reasons == ["unreadable, --include-broken: no trainer_state.json"]
    assert d["partial"].keep is False and d["partial"].reasons == ["no policy keeps it"]
    assert sorted(x.ckpt.path.name for x in p.to_delete) == [
        "model_100.safetensors",
        "model_900.safetensors",
        "partial",
        "tmp-checkpoint-950",
    ]


def test_an_orbax_save_in_progress_is_never_deleted(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, 100, age=8 * DAY, layout="orbax", name="100"),
        ck(root, 200, age=7 * DAY, layout="orbax", name="200.orbax-checkpoint-tmp-123", incomplete=True),
        ck(root, 300, age=6 * DAY, layout="orbax", name="300"),
    ]
    for include in (False, True):
        p = plan(Run(path=root, checkpoints=cks), keep_last=1, include_broken=include)
        assert by_step(p)[200].protected_by == [
            "an Orbax save in progress or interrupted (temporary folder): never deleted, even with --include-broken"
        ]
        assert deleted(p) == [100]


def test_a_checkpoint_without_a_step_is_kept_and_said_once(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, 100, age=8 * DAY),
        ck(root, None, age=7 * DAY, name="weights.safetensors"),
        ck(root, None, age=7 * DAY, name="final.safetensors", role="final"),
        ck(root, 200, age=6 * DAY),
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_last=1)
    d = {x.ckpt.path.name: x for x in p.decisions}
    assert d["weights.safetensors"].protected_by == ["step unknown: prune only deletes checkpoints whose step it knows"]
    assert d["final.safetensors"].protected_by == ["the run's final checkpoint"]  # already protected: no more
    assert deleted(p) == [100]


def test_keras_epochs_rank_when_no_step_is_known(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, None, age=(9 - e) * DAY, name=f"weights.{e:02d}.keras", layout="keras", epoch=e) for e in (1, 2, 3, 4)
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_last=2, keep_steps=[1, 7])
    d = {x.ckpt.epoch: x for x in p.decisions}
    assert d[4].protected_by == ["newest"] and d[4].kept_by == ["last 2"]
    assert d[3].kept_by == ["last 2"]
    assert d[1].kept_by == ["epoch 1 listed"]
    assert d[2].keep is False and d[2].reasons == ["no policy keeps it"]
    assert p.warnings == ["--keep-steps: no checkpoint at step 7"]  # epoch 1 counts as present
    p = plan(Run(path=root, checkpoints=cks), keep_every=2)
    assert {x.ckpt.epoch for x in p.decisions if x.keep} == {2, 4}
    assert d[2].ckpt.epoch == 2 and {x.ckpt.epoch: x for x in p.decisions}[2].kept_by == ["epoch divisible by 2"]
    # one checkpoint with a step: steps rank, and the others are "step unknown"
    cks2 = [ck(tmp_path / "s", None, name=f"w.{e}.keras", layout="keras", epoch=e) for e in (1, 2)]
    cks2.append(ck(tmp_path / "s", 50, layout="keras"))
    p = plan(Run(path=tmp_path / "s", checkpoints=cks2), keep_last=1)
    assert {x.ckpt.path.name: x.protected_by for x in p.decisions} == {
        "w.1.keras": ["step unknown: prune only deletes checkpoints whose step it knows"],
        "w.2.keras": ["step unknown: prune only deletes checkpoints whose step it knows"],
        "model_50.safetensors": ["newest"],
    }
    # a keras folder where nothing has an epoch either: steps (none) rank nothing
    cks3 = [ck(tmp_path / "t", None, name=f"w{e}.keras", layout="keras") for e in (1, 2)]
    p = plan(Run(path=tmp_path / "t", checkpoints=cks3), keep_last=1)
    assert all(x.keep and "step unknown" in x.protected_by[0] for x in p.decisions)


def test_epoch_of_a_non_keras_checkpoint_does_not_switch_to_epochs(tmp_path):
    root = tmp_path / "r"
    cks = [ck(root, None, age=(5 - e) * DAY, name=f"e{e}.ckpt", layout="lightning", epoch=e) for e in (1, 2, 3)]
    p = plan(Run(path=root, checkpoints=cks), keep_last=1)
    assert deleted(p) == [] and all("step unknown" in x.protected_by[0] for x in p.decisions)


# ---- make_plan: groups, metrics, notes, snapshots -------------------------------------------------------
def test_each_run_folder_is_decided_on_its_own(tmp_path):
    a = [ck(tmp_path / "a", s, age=(10 - s // 100) * DAY) for s in (100, 200, 300)]
    b = [ck(tmp_path / "b", s, age=(10 - s // 100) * DAY) for s in (100, 200)]
    # one Run (a recursive scan) holding two run folders: the newest of each is protected
    p = plan(Run(path=tmp_path, checkpoints=a + b), keep_steps=[100])
    assert [(d.ckpt.run.name, d.ckpt.step, d.keep) for d in p.decisions] == [
        ("a", 100, True),
        ("a", 200, False),
        ("a", 300, True),
        ("b", 100, True),
        ("b", 200, True),
    ]
    assert all(d.root == tmp_path for d in p.decisions)
    # two Runs: each one's warnings and notes are carried over
    ra = Run(path=tmp_path / "a", checkpoints=a, warnings=["wa"], notes=["na"])
    rb = Run(path=tmp_path / "b", checkpoints=b, warnings=["wb"], notes=["nb"])
    p = make_plan([ra, rb], Policy(keep_last=1), now=NOW)
    assert p.warnings == ["wa", "wb"] and p.notes == ["na", "nb"]
    assert [(d.root.name, d.ckpt.step, d.keep) for d in p.decisions] == [
        ("a", 100, False),
        ("a", 200, False),
        ("a", 300, True),
        ("b", 100, False),
        ("b", 200, True),
    ]


def test_keep_best_metric_missing_everywhere_or_somewhere(tmp_path):
    run = steps_run(tmp_path / "r", metrics={100: {"acc": 0.5, "loss": 1.0}, 200: {"bleu": 3.0}})
    with pytest.raises(UsageError) as e:
        plan(run, keep_best="eval_loss")
    assert e.value.message == "no checkpoint has the metric 'eval_loss' (metrics found: acc, bleu, loss)"
    with pytest.raises(UsageError) as e:
        plan(steps_run(tmp_path / "s"), keep_best="eval_loss")
    assert e.value.message == "no checkpoint has the metric 'eval_loss' (no checkpoint carries any metric)"
    root = tmp_path / "t"
    cks = [
        ck(root, 100, age=5 * DAY, metrics={"loss": 0.1}),
        ck(root, 200, age=4 * DAY),
        ck(root, 250, age=4 * DAY, error="broken"),  # broken: not counted as missing the metric
        ck(root, 300, age=3 * DAY, metrics={"loss": 0.5}),
        ck(root, 400, age=2 * DAY),
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_best="loss", mode="min")
    assert p.warnings == ["2 checkpoint(s) have no 'loss' metric; --keep-best cannot keep them"]
    assert kept(p) == [100, 250, 400]


def test_the_mode_is_guessed_from_the_name_and_said(tmp_path):
    mets = {100: {"eval_accuracy": 0.9}, 200: {"eval_accuracy": 0.5}, 300: {"eval_accuracy": 0.6}}
    pol = Policy(keep_best="eval_accuracy")
    p = make_plan([steps_run(tmp_path / "r", steps=(100, 200, 300), metrics=mets)], pol, now=NOW)
    assert pol.mode == "max" and p.policy.mode == "max"
    assert kept(p) == [100, 300]
    assert p.notes == [
        "--keep-best eval_accuracy: higher is better (guessed from the name; set --mode min|max to be sure)"
    ]
    mets = {100: {"val_loss": 0.9}, 200: {"val_loss": 0.5}, 300: {"val_loss": 0.6}}
    p = plan(steps_run(tmp_path / "s", steps=(100, 200, 300), metrics=mets), keep_best="val_loss")
    assert kept(p) == [200, 300] and p.policy.mode == "min"
    assert p.notes == ["--keep-best val_loss: lower is better (guessed from the name; set --mode min|max to be sure)"]


def test_the_mode_comes_from_the_checkpoint_callback_of_the_latest_step(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, 100, age=5 * DAY, metrics={"val_loss": 0.1}, best_ref={"monitor": "val_loss", "mode": "min"}),
        ck(root, 200, age=4 * DAY, metrics={"val_loss": 0.5}, best_ref={"monitor": "val_loss", "mode": "max"}),
        ck(root, 300, age=3 * DAY, metrics={"val_loss": 0.9}, best_ref={"monitor": "val_loss", "mode": "auto"}),
        ck(root, 400, age=2 * DAY, metrics={"val_loss": 0.2}, best_ref={"monitor": "other", "mode": "min"}),
    ]
    p = plan(Run(path=root, checkpoints=cks), keep_best="val_loss")
    assert p.policy.mode == "max" and p.notes == []  # the latest callback with a usable mode says max
    assert by_step(p)[300].kept_by == ["best val_loss (0.9)"]


def test_a_checkpoint_whose_files_vanish_before_the_plan_is_kept(tmp_path):
    run = steps_run(tmp_path / "r", steps=(100, 200, 300))
    by = {c.step: c for c in run.checkpoints}
    os.unlink(by[100].files[0])
    p = plan(run, keep_last=1)
    assert by_step(p)[100].keep is True
    assert by_step(p)[100].reasons == [
        "no policy keeps it",
        "could not stat its files (No such file or directory); kept",
    ]
    assert by_step(p)[200].keep is False
    assert by_step(p)[200].snapshot == [FileSnap.take(by[200].files[0])]
    assert by_step(p)[300].snapshot == []  # kept: no snapshot taken
    assert [d.ckpt.step for d in p.to_delete] == [200]


def test_tensorflow_state_file_rewrite_is_announced(tmp_path):
    root = tf_manager_run(tmp_path / "tf", steps=(1, 2, 3))
    age_tree(root)
    p = make_plan([scan_run(root)], Policy(keep_last=1))
    assert deleted(p) == [1, 2]
    assert p.notes == [
        f"{root / 'checkpoint'}: TensorFlow checkpoint state; ckpt-1, ckpt-2 will be dropped from "
        "all_model_checkpoint_paths (with their timestamps) once deleted"
    ]
    assert p.warnings == []
    p = make_plan([scan_run(root)], Policy(keep_last=3))
    assert p.notes == [] and deleted(p) == []


def test_time_is_read_once_when_not_given(tmp_path, monkeypatch):
    run = steps_run(tmp_path / "r", steps=(100, 200))
    monkeypatch.setattr(time, "time", lambda: NOW)
    p = make_plan([run], Policy(keep_since=DAY + 1, keep_since_text="1d"))
    assert by_step(p)[200].kept_by == ["modified within 1d"] and by_step(p)[100].keep is False


def test_a_tensorflow_state_file_that_cannot_be_rewritten_is_warned(tmp_path):
    root = tf_manager_run(tmp_path / "tf", steps=(1, 2, 3))
    state = root / "checkpoint"
    state.write_text(state.read_text() + "this line is not a field\n")
    age_tree(root)
    p = make_plan([scan_run(root)], Policy(keep_last=1))
    assert deleted(p) == [1, 2]
    n = len(state.read_text().splitlines())
    assert p.warnings == [
        f"{state}: TensorFlow checkpoint state cannot be rewritten: line {n} is not `field: value`; "
        "it will still name ckpt-1, ckpt-2 once deleted"
    ]
    assert p.notes == []


def test_remote_checkpoints_are_planned_from_the_listing(tmp_path, monkeypatch):
    """Objects on a bucket: each one's size and ETag as the listing gave them (no local stat),
    a TensorFlow folder warned about its state file, an object that cannot be listed kept."""
    from ckptctl.errors import NotFound
    from ckptctl.ops.prune import RemoteSnap
    from ckptctl.sources import RemotePath

    listing = {}

    def info(self):
        if self.url not in listing:
            raise NotFound("no such object", self.url)
        return listing[self.url]

    monkeypatch.setattr(RemotePath, "info", info)

    def rck(step, layout="tf", age=DAY * 5, n_files=2):
        base = f"s3://bucket/run/ckpt-{step}"
        files = [RemotePath(f"{base}.index")] + [RemotePath(f"{base}.data-{k}") for k in range(n_files - 1)]
        for k, f in enumerate(files):
            listing[f.url] = {"size": 100 + step + k, "ETag": f'"e{step}-{k}"'}
        return RunCheckpoint(
            path=RemotePath(f"{base}.index"),
            files=files,
            step=step,
            step_source="name",
            format="tf",
            size=sum(100 + step + k for k in range(n_files)),
            mtime=NOW - age + step,
            run=RemotePath("s3://bucket/run"),
            layout=layout,
        )

    cks = [rck(1), rck(2), rck(3), rck(4)]
    del listing[cks[1].files[1].url]  # gone from the listing: kept, and said why
    p = plan(Run(path=RemotePath("s3://bucket/run"), checkpoints=cks), keep_last=1)
    d = by_step(p)
    assert d[1].keep is False and d[1].snapshot == [
        RemoteSnap(cks[0].files[0], 101, "e1-0", None),
        RemoteSnap(cks[0].files[1], 102, "e1-1", None),
    ]
    assert d[3].keep is False and [s.etag for s in d[3].snapshot] == ["e3-0", "e3-1"]
    assert d[2].keep is True and d[2].reasons[-1].startswith("could not stat its objects (")
    assert d[2].reasons[-1].endswith("); kept")
    assert p.warnings == [
        "s3://bucket/run: the TensorFlow `checkpoint` state file is not rewritten on remote storage; "
        "it will still name the deleted checkpoints"
    ]
    assert p.notes == []
    # not TensorFlow: no such warning
    other = [rck(5, layout="hf-trainer"), rck(6, layout="hf-trainer")]
    p = plan(Run(path=RemotePath("s3://bucket/run"), checkpoints=other), keep_last=1)
    assert [x.ckpt.step for x in p.to_delete] == [5] and p.warnings == []


def test_keras_epochs_with_exponential_spacing_and_a_step_that_is_not_an_epoch(tmp_path):
    root = tmp_path / "r"
    cks = [
        ck(root, None, age=(20 - e) * DAY, name=f"weights.{e:02d}.keras", layout="keras", epoch=e)
        for e in (1, 2, 3, 5, 8, 9)
    ]
    p = plan(Run(path=root, checkpoints=cks), exp_spacing=True)
    kept_epochs = {x.ckpt.epoch: x.kept_by for x in p.decisions if x.keep}
    assert kept_epochs == {
        1: ["exponential spacing (first at/after epoch 1)"],
        2: ["exponential spacing (first at/after epoch 2)"],
        5: ["exponential spacing (first at/after epoch 4)"],
        8: ["exponential spacing (first at/after epoch 8)"],
        9: [],
    }
    # a keras checkpoint that knows its step: its epoch is not a step --keep-steps can name
    root = tmp_path / "s"
    cks = [ck(root, 50, layout="keras", epoch=3), ck(root, 60, layout="keras", epoch=4, age=DAY / 2)]
    p = plan(Run(path=root, checkpoints=cks), keep_steps=[3, 50])
    assert p.warnings == ["--keep-steps: no checkpoint at step 3"]


def test_every_tensorflow_folder_gets_its_note_even_after_one_that_cannot_be_rewritten(tmp_path):
    a = tf_manager_run(tmp_path / "run" / "a", steps=(1, 2))
    (a / "checkpoint").write_text((a / "checkpoint").read_text() + "garbage\n")
    b = tf_manager_run(tmp_path / "run" / "b", steps=(1, 2))
    age_tree(tmp_path / "run")
    p = make_plan([scan_run(tmp_path / "run", recursive=True)], Policy(keep_last=1))
    assert sorted(os.fspath(d.ckpt.path.relative_to(tmp_path / "run")) for d in p.to_delete) == [
        "a/ckpt-1",
        "b/ckpt-1",
    ]
    assert [w.split(":")[0] for w in p.warnings] == [str(a / "checkpoint")]
    assert p.notes == [
        f"{b / 'checkpoint'}: TensorFlow checkpoint state; ckpt-1 will be dropped from "
        "all_model_checkpoint_paths (with their timestamps) once deleted"
    ]
