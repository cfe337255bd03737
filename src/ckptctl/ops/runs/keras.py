"""Keras `ModelCheckpoint` run layout: `.keras` archives, `.weights.h5` files (and Keras 2 `.h5` /
`.hdf5` names like `weights.03-0.41.h5`), a sharded `w01.weights.json`. The user's pattern decides
the name, so epoch and metrics are read from its numbers (`parse_keras_name`); `best.keras` (a
save_best_only file) has the role "best" and is folded into the epoch file it is a byte copy of
(`keras_twin`). Reading goes through tf.read_target (the registry's readers). Pure: no printing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ckptctl.ops.runs.base import Layout
from ckptctl.ops.runs.names import untmp
from ckptctl.ops.runs.tf import read_target, reader_registered

if TYPE_CHECKING:
    from ckptctl.ops.runs.model import RunCheckpoint

KERAS_FORMAT = "keras"


# ---- Keras ModelCheckpoint names ---------------------------------------------------------------
KERAS_SUFFIXES = (".weights.h5", ".keras", ".weights.json")  # .weights.json: Keras 3 sharded weights index
KERAS_SHARDED_FORMAT = "keras-sharded"
_H5 = (".h5", ".hdf5")
_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![A-Za-z])(?:nan|inf)(?![A-Za-z]))|(?P<word>[A-Za-z][A-Za-z_]*)"
)
EPOCH_WORDS = {"epoch", "epochs", "ep", "e"}
STEP_WORDS = {"step", "steps", "global_step", "batch", "iter", "iteration"}
# words that put a number in front of them without naming a metric (`w01`, `model-001`, `weights.03`)
GENERIC_WORDS = {"w", "weights", "weight", "model", "ckpt", "checkpoint", "cp", "keras", "save", "saved", "run"}
_METRIC_WORD = re.compile(
    r"^(val|train|test|eval|valid|validation)_|loss|acc|auc|mae|mse|rmse|mape|f1|precision|recall|iou|"
    r"dice|ppl|perplexity|err|score|bleu|rouge|top\d|reward|crossentropy|kl",
    re.I,
)


def keras_stem(name: str) -> str | None:
    """The user-written part of a Keras ModelCheckpoint file name, or None if not Keras-like."""
    for suf in KERAS_SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    for suf in _H5:  # Keras 2: 'weights.{epoch:02d}-{val_loss:.2f}.hdf5'
        if name.endswith(suf) and len(name) > len(suf):
            stem = name[: -len(suf)]
            if re.search(r"\d\.\d", stem) or re.search(r"(?:^|[-_.])(?:weights|epoch|ep)[-_.=]?\d", stem, re.I):
                return stem
    return None


def is_keras_name(name: str) -> bool:
    return keras_stem(name) is not None


def parse_keras_name(name: str) -> tuple[int | None, int | None, dict[str, float]]:
    """(step, epoch, metrics) from a ModelCheckpoint file name.

    Every number of the name is a value. A value is named when a metric-like word stands before
    it (`val_loss0.41`, `loss-0.41`) or any word with `=` (`lr=0.001`); the epoch is the value after
    `epoch`/`ep`, else the first whole number standing on its own or after a generic word (`w01`,
    `model-001`, `weights.03`); numbers glued to other words (`resnet50`) belong to the name.
    Unnamed values after the epoch are "metric", "metric2", ... in order.
    """
    stem = keras_stem(name)
    if stem is None:
        stem = name
    toks: list[tuple[str | None, str, str, int]] = []  # (label, sep, number text, start)
    prev_word: tuple[str, int] | None = None  # (word, end)
    prev_num_end: int | None = None
    for m in _TOKEN.finditer(stem):
        if m.group("word") is not None:
            prev_word = (m.group("word"), m.end())
            continue
        text = m.group("num")
        start = m.start()
        label = sep = None
        if prev_word is not None and (prev_num_end is None or prev_word[1] > prev_num_end):
            gap = stem[prev_word[1] : start]
            if re.fullmatch(r"[-_=:. ]?", gap):
                label, sep = prev_word[0].rstrip("_"), gap
                last = label.rsplit("_", 1)[-1]
                if last != label and last.lower() in EPOCH_WORDS | STEP_WORDS:  # `ckpt_e07`, `run_step100`
                    label = last
        # `--0.41`, `=-0.41`: a negative value
        if start >= 1 and stem[start - 1] == "-" and (start == 1 or stem[start - 2] in "-_=:"):
            text = "-" + text
        toks.append((label, sep or "", text, start))
        prev_num_end = m.end()
    step = epoch = None
    epoch_at: int | None = None
    for i, (label, _sep, text, _) in enumerate(toks):
        if label and label.lower() in EPOCH_WORDS and re.fullmatch(r"\d+", text):
            epoch, epoch_at = int(text), i
            break
    if epoch is None:
        for i, (label, sep, text, _) in enumerate(toks):
            if not re.fullmatch(r"\d+", text):
                continue
            low = (label or "").lower()
            if (
                label is None
                or low in GENERIC_WORDS
                or (sep and not _METRIC_WORD.search(low) and sep != "=" and low not in STEP_WORDS)
            ):
                epoch, epoch_at = int(text), i
                break
    metrics: dict[str, float] = {}
    unnamed = 0
    for i, (label, sep, text, _) in enumerate(toks):
        if i == epoch_at:
            continue
        low = (label or "").lower()
        try:
            v = float(text)
        except ValueError:
            continue
        if label and low in STEP_WORDS and re.fullmatch(r"\d+", text):
            step = int(text)
            continue
        if label and low not in GENERIC_WORDS and low not in EPOCH_WORDS and (sep == "=" or _METRIC_WORD.search(low)):
            metrics[label] = v
            continue
        if epoch_at is not None and i < epoch_at:
            continue  # part of the name (`resnet50-epoch03`)
        if epoch_at is None and re.fullmatch(r"\d+", text):
            continue
        if label and sep == "" and low not in GENERIC_WORDS:
            continue  # glued to a word: part of the name
        unnamed += 1
        metrics["metric" if unnamed == 1 else f"metric{unnamed}"] = v
    return step, epoch, metrics


_BEST = re.compile(r"(?:^|[-_.])best(?:$|[-_.])", re.I)


def keras_role(name: str) -> str | None:
    """`best.keras`, `best_model.keras`, `model_best.weights.h5`: the save_best_only file."""
    stem = keras_stem(name)
    if stem is None:
        return None
    if stem.endswith(".weights"):
        stem = stem[: -len(".weights")]
    if re.search(r"\d", stem):
        return None
    if _BEST.search(stem):
        return "best"
    m = re.match(
        r"^(?:(?:model|weights|checkpoint|ckpt)[_-]?)?(last|latest|final)(?:[_-]?(?:model|weights|checkpoint|ckpt))?$",
        stem,
        re.I,
    )
    return m.group(1).lower() if m else None


def _zip_members(path: Path) -> list[tuple[str, int, int]] | None:
    """(name, CRC-32, size) of every member, from the zip's central directory (no member is read)."""
    import zipfile

    from ckptctl.errors import CkptError
    from ckptctl.sources import is_remote, open_file

    try:
        with zipfile.ZipFile(open_file(path) if is_remote(path) else path) as z:
            return sorted((i.filename, i.CRC, i.file_size) for i in z.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, OverflowError, CkptError):
        return None


def keras_twin(c: RunCheckpoint, cands: list[RunCheckpoint]) -> RunCheckpoint | None:
    """The epoch file that `best.keras` is a copy of: same size and the same members with the same
    CRC-32s in the zip directory (ModelCheckpoint(save_best_only=True) next to a per-epoch one)."""
    if not c.path.name.endswith(".keras") or c.error is not None:
        return None
    mine: list[tuple[str, int, int]] | None = None
    hits = []
    for s in cands:
        if (
            s is c
            or s.layout != "keras"
            or s.run != c.run
            or s.size != c.size
            or s.error is not None
            or not s.path.name.endswith(".keras")
            or len(s.files) != 1
        ):
            continue
        if mine is None:
            mine = _zip_members(c.path)
            if not mine:
                return None
        if _zip_members(s.path) == mine:
            hits.append(s)
    return max(hits, key=lambda s: (s.epoch or 0, s.mtime)) if hits else None


def enrich(c: RunCheckpoint, read_info: bool) -> None:
    """Step/epoch/metrics of a Keras checkpoint from its name (parse_keras_name), and its info
    through the normal reader (tf.read_target: the TF/Keras reading path)."""
    name = untmp(c.path.name) if c.incomplete else c.path.name
    step, epoch, metrics = parse_keras_name(name)
    c.metrics.update(metrics)
    if step is not None:
        c.step, c.step_source = step, "name"
    if epoch is not None:
        c.epoch = epoch
    for suf, fmt in ((".keras", KERAS_FORMAT), (".weights.json", KERAS_SHARDED_FORMAT)):
        if c.path.name.endswith(suf):
            c.format = c.format or fmt
            if not reader_registered(fmt):
                return
    read_target(c, c.path, read_info)


class Keras(Layout):
    name = "keras"
    owns = ("keras",)

    def claim_file(self, name: str) -> str | None:
        return "keras" if is_keras_name(name) else None  # before fairseq: checkpoint3.keras is Keras epoch 3

    def enrich(self, c: RunCheckpoint, read_info: bool) -> None:
        enrich(c, read_info)

    def role(self, name: str) -> str | None:
        return (keras_role(name) or "") if is_keras_name(name) else None

    def twin(self, c: RunCheckpoint, stepped: list[RunCheckpoint]) -> RunCheckpoint | None:
        return keras_twin(c, stepped)


LAYOUT = Keras()
