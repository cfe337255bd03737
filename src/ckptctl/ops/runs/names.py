"""Checkpoint names: the suffixes, temporary and role names, and the step / epoch / metrics a
file or folder name carries; durations for --keep-since / --min-age. Pure functions."""

from __future__ import annotations

import re

from ckptctl.errors import UsageError
from ckptctl.ops.select import NON_MODEL_HEADS  # noqa: F401 - re-exported: select defines the model part

# file suffixes that hold one checkpoint each
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".h5", ".hdf5", ".pkl", ".keras", ".gguf")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".h5.index.json", ".pt.index.json", ".weights.json")
# side files trainers write next to a model that are not checkpoints on their own
AUX_NAMES = re.compile(
    r"^(training_args\.bin|optimizer(_\d+)?\.(pt|bin|safetensors)|scheduler\.pt|scaler\.pt|"
    r"rng_state(_\d+)?\.pth|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|"
    r"zero_pp_rank_.*\.pt|.*_optim_states\.pt)$"
)
# temporary names of saves in progress (or interrupted)
TMP_FILE = re.compile(r"(\.tmp|\.temp|\.part|\.partial|\.incomplete|~)$|\.tmp[.\-_]?\w*$|\.ckptctl-tmp-\w+$", re.I)
TMP_DIR = re.compile(r"^(tmp-checkpoint-\d+|.*\.orbax-checkpoint-tmp-\d+|.+\.tmp\w*)$", re.I)
ROLE_STEM = re.compile(
    r"^(?:checkpoint[_-]?|model[_-]?|ckpt[_-]?)?(last|best|latest|final)"
    r"(?:[_-]?(?:model|checkpoint|ckpt))?(?:-v\d+)?$",
    re.I,
)
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}$")
TF_DATA = re.compile(r"^(?P<prefix>.+)\.(?:index|data-\d{5}-of-\d{5})$")
# step / epoch in names
_NUM = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf|-inf)"
KV = re.compile(r"(?:^|(?<=[-_ ]))([A-Za-z][\w.]*?)=" + _NUM + r"(?=$|[-_ ])")
STEP_PATTERNS = [
    re.compile(r"^checkpoint-(\d+)$"),  # HF Trainer
    re.compile(r"(?:^|[-_.])(?:global[-_]?)?steps?[=_-]?(\d+)(?=$|[-_.])", re.I),
    re.compile(r"(?:^|[-_.])(?:iter|iteration)[=_-]?(\d+)(?=$|[-_.])", re.I),
    re.compile(r"^ckpt-(\d+)$"),  # tf.train.CheckpointManager
    re.compile(r"^(\d+)$"),  # Orbax step folders
]
EPOCH_PATTERN = re.compile(r"(?:^|[-_.])epoch[=_-]?(\d+)(?=$|[-_.])", re.I)
FAIRSEQ = re.compile(r"^checkpoint_(\d+)_(\d+)$")
FAIRSEQ_EPOCH = re.compile(r"^checkpoint(\d+)$")
TRAILING_NUM = re.compile(r"[-_.](\d{2,})$")  # model_00010000; not attempt_1
STEP_KEYS = ("global_step", "step", "num_updates", "iteration", "global_steps", "train_step", "iter")
EPOCH_KEYS = ("epoch", "current_epoch")
OPTIM_HEADS = ("optimizer", "optimizers", "optimizer_states", "optim", "last_optimizer_state", "opt_state")


# ---- names -------------------------------------------------------------------------------------
def strip_suffix(name: str) -> str:
    """Name without a known checkpoint suffix (a dotted name like `val_loss=0.12` keeps its dot)."""
    for suf in INDEX_SUFFIXES + FILE_SUFFIXES + (".distcp",):
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def parse_name(name: str) -> tuple[int | None, int | None, dict[str, float]]:
    """(step, epoch, metrics) from a checkpoint's file or folder name."""
    stem = strip_suffix(name)
    stem = SHARD_NAME.sub("", stem)
    step = epoch = None
    metrics: dict[str, float] = {}
    for key, val in KV.findall(stem):
        k = key.lower()
        try:
            v = float(val)
        except ValueError:
            continue
        if k in ("step", "global_step", "steps"):
            if v == int(v):
                step = int(v)
        elif k == "epoch":
            if v == int(v):
                epoch = int(v)
        else:
            metrics[key] = v
    m = FAIRSEQ.match(stem)
    if m:
        return int(m.group(2)), int(m.group(1)), metrics
    m = FAIRSEQ_EPOCH.match(stem)
    if m:
        return step, int(m.group(1)), metrics
    if step is None:
        for pat in STEP_PATTERNS:
            m = pat.search(stem)
            if m:
                step = int(m.group(1))
                break
    if epoch is None:
        m = EPOCH_PATTERN.search(stem)
        if m:
            epoch = int(m.group(1))
    if step is None and epoch is None and not KV.search(stem):
        m = TRAILING_NUM.search(stem)
        if m:
            step = int(m.group(1))
    return step, epoch, metrics


# ---- durations ---------------------------------------------------------------------------------
_DUR = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)", re.I)
_DUR_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """'7d' -> 604800; '1d12h', '90m', '45s', '2w'; '0' means none. Raises UsageError."""
    t = text.strip().lower().replace(" ", "")
    if t in ("0", "0s"):
        return 0.0
    pos = 0
    total = 0.0
    for m in _DUR.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2).lower()]
        pos = m.end()
    if pos != len(t) or not t:
        raise UsageError(f"invalid duration {text!r}: use a number with a unit, e.g. 90s, 30m, 12h, 7d, 2w")
    return total


# ---- reading steps and metrics -----------------------------------------------------------------
def untmp(name: str) -> str:
    """The name a temporary save will have once finished (`tmp-checkpoint-5` -> `checkpoint-5`)."""
    name = re.sub(r"\.orbax-checkpoint-tmp-\d+$", "", name)
    name = re.sub(r"^tmp-(checkpoint-\d+)$", r"\1", name)
    name = TMP_FILE.sub("", name)
    return name.lstrip(".") or name
