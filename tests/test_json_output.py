"""Strict JSON for every command (issue 16): no bare NaN/Infinity; a non-finite float is written
as null and the nearest enclosing object maps its path to "nan", "inf" or "-inf" under "nonfinite"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import run

from ckptctl.cli import output

NAN, INF = float("nan"), float("inf")


def _no_constants(name):
    raise ValueError(f"bare {name} in JSON output")


def strict_loads(text: str):
    return json.loads(text, parse_constant=_no_constants)


def test_encoder_nested_dicts_and_lists(capsys):
    doc = {
        "name": "run",
        "eval_loss": NAN,
        "loss": 0.5,
        "norms": [1.0, INF, [2.0, -INF]],
        "steps": [{"step": 1, "grad_norm": -INF, "per_layer": [0.1, NAN]}, {"step": 2, "grad_norm": 3.0}],
        "nested": {"deeper": {"x": np.float32("nan"), "y": np.float64("inf"), "z": np.float32(1.5)}},
        "tuple": (NAN, 1),
        7: NAN,  # a non-string key, as json.dumps writes it
    }
    output.print_json(doc)
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    got = strict_loads(text)
    assert got["name"] == "run" and got["loss"] == 0.5
    assert got["eval_loss"] is None and got["norms"] == [1.0, None, [2.0, None]]
    assert got["tuple"] == [None, 1] and got["7"] is None
    assert got["nonfinite"] == {"eval_loss": "nan", "norms.1": "inf", "norms.2.1": "-inf", "tuple.0": "nan", "7": "nan"}
    # a value inside a list of objects belongs to its own object, not to the outer one
    assert got["steps"][0] == {
        "step": 1,
        "grad_norm": None,
        "per_layer": [0.1, None],
        "nonfinite": {"grad_norm": "-inf", "per_layer.1": "nan"},
    }
    assert got["steps"][1] == {"step": 2, "grad_norm": 3.0}  # no "nonfinite" where all is finite
    assert got["nested"] == {"deeper": {"x": None, "y": None, "z": 1.5, "nonfinite": {"x": "nan", "y": "inf"}}}
    assert list(got)[-1] == "nonfinite"


def test_encoder_edge_cases():
    assert output.strict_json(NAN) is None  # nothing encloses it: just null
    assert output.strict_json([NAN, {"a": INF}]) == [None, {"a": None, "nonfinite": {"a": "inf"}}]
    # a field already named "nonfinite" that is not ours is never overwritten
    assert output.strict_json({"nonfinite": 3.0, "a": NAN}) == {"nonfinite": 3.0, "a": None, "_nonfinite": {"a": "nan"}}
    # an input that already went through the encoder keeps its record and gains the new ones
    once = output.strict_json({"a": NAN})
    assert output.strict_json({**once, "b": -INF}) == {"a": None, "nonfinite": {"a": "nan", "b": "-inf"}, "b": None}
    assert output.strict_json({"s": {3}, "b": b"\x01", "i": np.int64(4), "f": 1e308 * 10}) == {
        "s": [3],
        "b": "01",
        "i": 4,
        "f": None,
        "nonfinite": {"f": "inf"},
    }
    assert output.strict_json({"big": 2**80, "t": True, "n": None}) == {"big": 2**80, "t": True, "n": None}


def test_prune_json_of_a_nan_run_is_strict(tmp_path):
    """prune's plan lists each checkpoint's metrics: it used to write bare NaN."""
    from run_builders import age_tree, hf_run

    root = hf_run(tmp_path / "run", steps=(10, 20, 30), eval_loss={10: 0.5, 20: NAN, 30: INF})
    age_tree(root)
    r = run("prune", root, "--keep-last", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = strict_loads(r.stdout)
    by = {Path(c["path"]).name: c for c in doc["checkpoints"]}
    assert by["checkpoint-20"]["metrics"]["eval_loss"] is None
    assert by["checkpoint-20"]["metrics"]["nonfinite"]["eval_loss"] == "nan"
    assert by["checkpoint-30"]["metrics"]["nonfinite"]["eval_loss"] == "inf"
    assert by["checkpoint-10"]["metrics"]["eval_loss"] == 0.5
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]  # dry run


def test_print_json_fast_path_and_strict_path_agree(capsys):
    """A document without NaN/Inf is encoded directly; one with them through strict_json: a numpy
    NaN that only turns into a float while encoding still takes the strict path."""
    doc = {"s": {3, 1, 2}, "t": (1, 2.5), "b": b"\x00\xff", "i": np.int32(7), "f": np.float32(0.5), 3: "k"}
    output.print_json(doc)
    fast = capsys.readouterr().out
    assert (
        strict_loads(fast)
        == output.strict_json(doc)
        == {"s": [1, 2, 3], "t": [1, 2.5], "b": "00ff", "i": 7, "f": 0.5, "3": "k"}
    )
    output.print_json({"x": np.float32("nan"), "y": [np.float64("-inf")]})
    assert strict_loads(capsys.readouterr().out) == {"x": None, "y": [None], "nonfinite": {"x": "nan", "y.0": "-inf"}}
