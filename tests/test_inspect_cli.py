"""`ckptctl inspect`: every output format, filters and sorting, on real files."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import REAL, cli, real_expected, real_params, run


@pytest.fixture
def model(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "encoder.layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "encoder.layer.0.bias": np.zeros(3, dtype=np.float16),
        "encoder.layer.1.weight": np.ones((8, 4), dtype=np.float32),
        "decoder.weight": np.ones((2, 2), dtype=np.int64),
        "scale": np.array(2.0, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "step": "1200"})
    return path, tensors


def test_json_has_the_documented_keys_and_exact_numbers(model):
    path, tensors = model
    r = cli("inspect", path, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("path", "format", "tensors", "metadata", "num_tensors", "num_params", "total_bytes"):
        assert key in doc
    assert doc["format"] == "safetensors"
    assert doc["num_tensors"] == len(tensors)
    assert doc["num_params"] == sum(a.size for a in tensors.values())
    assert doc["total_bytes"] == sum(a.nbytes for a in tensors.values())
    assert doc["metadata"] == {"format": "pt", "step": "1200"}
    by = {t["name"]: t for t in doc["tensors"]}
    assert by["encoder.layer.0.bias"]["dtype"] == "float16"
    assert by["scale"]["shape"] == [] and by["scale"]["nbytes"] == 8
    assert by["empty"]["shape"] == [0, 4] and by["empty"]["nbytes"] == 0
    assert r.stderr == ""


def test_table_is_plain_when_piped_and_shows_summary(model):
    path, _ = model
    p = run("inspect", path)
    assert p.returncode == 0, p.stderr
    assert "\x1b[" not in p.stdout
    assert "safetensors" in p.stdout and "encoder.layer.1.weight" in p.stdout
    assert "params" in p.stdout and "dtypes" in p.stdout


def test_csv_rows_are_exact(model):
    path, tensors = model
    r = cli("inspect", path, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["name"] for row in rows} == set(tensors)
    row = next(x for x in rows if x["name"] == "encoder.layer.1.weight")
    assert row["nbytes"] == "128" and row["dtype"] == "float32"


def test_markdown_and_tree(model):
    path, _ = model
    md = cli("inspect", path, "--format", "markdown").stdout
    assert "| name" in md and "|---" in md.replace(" ", "").replace(":", "")
    tree = cli("inspect", path, "--format", "tree").stdout
    assert "encoder/" in tree and "layer/" in tree
    assert "(3 tensors" in tree  # encoder subtotal


def test_tree_counts_a_tied_weight_once(tmp_path):
    """`inspect --format tree` totals equal the header's: a tied weight (one storage under two
    names, as torch.save writes an LM head tied to its embedding) is listed but counted once."""
    import torch

    emb = torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16)
    sd = {"model.embed.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.ones(16)}
    path = tmp_path / "tied.pt"
    torch.save(sd, path)
    tree = cli("inspect", path, "--format", "tree", "--all").stdout
    unique = 64 * 16 * 4 + 16 * 4  # bytes of the two distinct tensors, as torch stores them
    doc = json.loads(cli("inspect", path, "--format", "json", "--all").stdout)
    assert doc["total_bytes"] == unique
    assert f"4.2 kB ({unique:,} bytes)" in tree  # the header's size line
    root = next(line for line in tree.splitlines() if line.startswith(str(path)))
    assert root.endswith("(3 tensors, 4.2 kB)"), root  # 8.3 kB when the tie was counted twice
    assert "tied to model.embed.weight" in tree
    lm = next(line for line in tree.splitlines() if "lm_head/" in line)
    assert "0 params" in lm and "0 B" in lm, lm  # its bytes are counted under model.embed


def test_filter_and_sort(model):
    path, _ = model
    doc = json.loads(cli("inspect", path, "-f", "json", "--filter", "encoder.*", "--sort", "size").stdout)
    names = [t["name"] for t in doc["tensors"]]
    assert names == ["encoder.layer.1.weight", "encoder.layer.0.weight", "encoder.layer.0.bias"]
    assert doc["num_tensors"] == 6  # totals describe the file, the list is filtered
    doc = json.loads(cli("inspect", path, "-f", "json", "-k", "scale", "-k", "decoder*", "--sort", "name").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["decoder.weight", "scale"]
    r = cli("inspect", path, "--filter", "nothing*")
    assert r.exit_code == 0 and "no tensor matches" in r.stderr


@pytest.mark.parametrize("rel", real_params(sorted(real_expected()) if REAL.is_dir() else []), ids=str)
def test_every_real_fixture_inspects_as_the_table_says(rel):
    """tests/real_expected.tsv gives each fixture's exit code and tensor count."""
    path = REAL / rel
    want = real_expected()[rel]
    p = run("inspect", path, "--format", "json")
    assert "Traceback" not in p.stderr
    assert p.returncode == int(want["inspect_exit"]), p.stderr
    if p.returncode == 0:
        doc = json.loads(p.stdout)
        assert doc["num_tensors"] == len(doc["tensors"]) == int(want["inspect_tensors"])
    else:
        assert p.stdout == ""
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0]
