"""Run discovery: find the checkpoints in a training-run folder, with their step and metrics.

Shared by `ls`, `prune` and the run-level `diff` / `average`. Pure: no printing.

A run folder holds checkpoints written by a trainer:
  HF Trainer      checkpoint-500/ (model.safetensors, optimizer.pt, ..., trainer_state.json)
  Lightning       epoch=3-step=1200.ckpt, epoch=3-step=1200-val_loss=0.12.ckpt, last.ckpt
  fairseq         checkpoint_3_1200.pt, checkpoint3.pt, checkpoint_best.pt, checkpoint_last.pt
  DCP             step_100/ (.metadata + __0_0.distcp)
  Orbax           100/ (_CHECKPOINT_METADATA, default/, metrics/ ...): see runs_orbax.py
  DeepSpeed       global_step100/ + a `latest` file naming it
  TensorFlow      ckpt-5.index + ckpt-5.data-00000-of-00001 + a `checkpoint` state file,
                  SavedModel folders; Keras ModelCheckpoint `.keras` / `.weights.h5` (see runs_tf.py)
  plain           step_1000.pt, model_00010000.safetensors, sharded index + shards, model folders

Everything is lazy: readers' `info()` (headers and pickles), small JSON/text side files, and the
0-d `current_score` tensor of a Lightning ModelCheckpoint callback (and a TF checkpoint's 0-d
`epoch` variable); no other tensor data.
The step stored inside a checkpoint beats the one parsed from its name.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.errors import CkptError, NotFound, UsageError
from ckptctl.model import CheckpointInfo
from ckptctl.ops import runs_tf

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
# top-level names in a training checkpoint that are not the model
NON_MODEL_HEADS = {
    "optimizer", "optimizers", "optimizer_states", "optim", "last_optimizer_state",
    "optimizer_history", "lr_scheduler", "lr_schedulers", "scheduler", "callbacks", "loops",
    "rng_state", "rng_states", "scaler", "grad_scaler", "extra_state", "amp", "opt_state",
}
OPTIM_HEADS = ("optimizer", "optimizers", "optimizer_states", "optim", "last_optimizer_state", "opt_state")


@dataclass
class RunCheckpoint:
    path: Path  # the file or the folder (checkpoint-N/, DCP dir, shard folder, index file)
    files: list[Path]  # every file that belongs to it (deleting it = deleting these)
    step: int | None
    step_source: str  # "trainer_state" | "global_step" | "metadata" | "name" | "none"
    format: str | None  # registry format name ("orbax" when we only recognise it)
    size: int  # bytes on disk (apparent size of all files)
    mtime: float  # newest modification time among its files and folders
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # symlinks / copies / `latest` files naming it
    info: CheckpointInfo | None = None  # metadata only; TensorInfo.loc may be None: open a reader to read
    error: str | None = None  # one-line reason if broken or incomplete
    incomplete: bool = False
    # beyond the shared API
    run: Path | None = None  # the run folder it was found in
    layout: str = "file"  # hf-trainer | lightning | fairseq | dcp | orbax | deepspeed | tf | tf-savedmodel | keras | sharded | folder | file
    epoch: int | None = None
    role: str | None = None  # last | best | latest | final: a copy that matched no stepped checkpoint
    best_of_run: list[str] = field(default_factory=list)  # "trainer_state best_model_checkpoint", ...
    best_ref: dict[str, Any] | None = None  # what this checkpoint says is the run's best
    dirs: list[Path] = field(default_factory=list)  # folders to remove after its files (deepest first)
    copies: list[Path] = field(default_factory=list)  # last/best copies folded into it as aliases

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def broken(self) -> bool:
        return self.error is not None and not self.incomplete

    @property
    def has_optimizer(self) -> bool | None:
        if self.layout in ("hf-trainer", "folder", "deepspeed") and self.path.is_dir():
            for f in self.files:
                if re.match(r"^(optimizer.*\.(pt|bin|safetensors)|.*optim_states\.pt)$", f.name) or any(
                    p.startswith("optimizer") for p in f.relative_to(self.path).parts[:-1]
                ):
                    return True
        if self.info is None:
            return None
        for t in self.info.tensors:
            if _head(t.name) in OPTIM_HEADS:
                return True
        for o in self.info.objects:
            if _head(o.name) in OPTIM_HEADS:
                return True
        return False

    @property
    def model_tensors(self) -> list:
        """Tensors of the model itself (state_dict/ of a training checkpoint; else optimizer state,
        schedulers, callbacks left out): what inspect shows and convert writes by default."""
        if self.info is None:
            return []
        from ckptctl.ops.select import model_weights  # the rule convert/average/inspect use

        return model_weights(self.info.tensors)

    @property
    def num_tensors(self) -> int | None:
        return None if self.info is None else len(self.model_tensors)

    @property
    def num_params(self) -> int | None:
        if self.info is None:
            return None
        return sum(t.numel for t in self.model_tensors if t.alias_of is None)

    @property
    def tensor_bytes(self) -> int | None:
        if self.info is None:
            return None
        return sum(t.nbytes for t in self.model_tensors if t.alias_of is None)

    @property
    def dtype_mix(self) -> dict[str, int]:
        mix: dict[str, int] = {}
        for t in self.model_tensors:
            mix[t.dtype] = mix.get(t.dtype, 0) + 1
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]))

    @property
    def unsafe_globals(self) -> list[str]:
        """Globals of its pickle that could run code if it were loaded with pickle/torch.load."""
        if self.info is None or not self.info.globals:
            return []
        from ckptctl.ops.inspect import dangerous_globals

        return dangerous_globals(self.info)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        def rel(p: Path) -> str:
            if relative_to is not None:
                try:
                    return os.fspath(p.relative_to(relative_to))
                except ValueError:
                    pass
            return os.fspath(p)

        return {
            "path": os.fspath(self.path),
            "name": self.name,
            "run": os.fspath(self.run) if self.run is not None else None,
            "step": self.step,
            "step_source": self.step_source,
            "epoch": self.epoch,
            "format": self.format,
            "layout": self.layout,
            "kind": self.info.kind if self.info is not None else None,
            "total_bytes": self.size,
            "num_files": len(self.files),
            "files": [rel(f) for f in self.files],
            "num_tensors": self.num_tensors,
            "num_params": self.num_params,
            "tensor_bytes": self.tensor_bytes,
            "dtypes": self.dtype_mix,
            "has_optimizer": self.has_optimizer,
            "metrics": dict(self.metrics),  # NaN/Inf as floats: print_json writes them strictly
            "aliases": self.aliases,
            "role": self.role,
            "best_of_run": self.best_of_run,
            "mtime": self.mtime,
            "incomplete": self.incomplete,
            "unsafe_globals": self.unsafe_globals,
            "error": self.error,
        }


def bytes_on_disk(ckpts: list[RunCheckpoint]) -> int:
    """What `du -b` counts for these checkpoints: their files and the copies folded into them as
    aliases (a real last.ckpt copy), each inode once (hard links), symlinks not followed."""
    return _file_stats([f for c in ckpts for f in c.files + c.copies])[1]


def _head(name: str) -> str:
    return re.split(r"[/.]", name, maxsplit=1)[0]


@dataclass
class Run:
    """What discovery found in one folder (and below it, when recursive)."""

    path: Path
    checkpoints: list[RunCheckpoint]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing when pruning, not when listing
    ignored: list[Path] = field(default_factory=list)  # files seen that are not checkpoints
    subdirs: list[Path] = field(default_factory=list)  # folders not entered (non-recursive)
    # run-level "best" pointers: (what says so, resolved checkpoint path or None)
    best: list[tuple[str, Path | None]] = field(default_factory=list)
    # symlinks and `latest`-style files met while scanning, resolved once every checkpoint is known
    links: list[Path] = field(default_factory=list, repr=False)
    alias_files: list[Path] = field(default_factory=list, repr=False)


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


def role_of(name: str) -> str | None:
    if runs_tf.is_keras_name(name):
        return runs_tf.keras_role(name)
    m = ROLE_STEM.match(strip_suffix(name))
    return m.group(1).lower() if m else None


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


# ---- file system helpers -----------------------------------------------------------------------
def _walk_files(root: Path) -> tuple[list[Path], list[Path], float, int]:
    """(files, dirs deepest first, newest mtime, total size) under root, never following symlinks."""
    files: list[Path] = []
    dirs: list[Path] = []
    newest = 0.0
    size = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, topdown=True, followlinks=False):
        d = Path(dirpath)
        dirs.append(d)
        try:
            newest = max(newest, os.lstat(d).st_mtime)
        except OSError:
            pass
        # symlinked folders are listed by os.walk as dirs: treat the link itself as a file
        for name in list(dirnames):
            p = d / name
            if p.is_symlink():
                dirnames.remove(name)
                filenames.append(name)
        dirnames.sort()
        for name in sorted(filenames):
            p = d / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            files.append(p)
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    dirs.sort(key=lambda p: (-len(p.parts), os.fspath(p)))
    return files, dirs, newest, size


def _file_stats(paths: list[Path]) -> tuple[float, int]:
    newest = 0.0
    size = 0
    seen: set[tuple[int, int]] = set()
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        newest = max(newest, st.st_mtime)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_size
    return newest, size


def _read_small_text(path: Path, limit: int = 1 << 16) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_json(path: Path, limit: int = 256 << 20) -> Any:
    try:
        if path.stat().st_size > limit:
            return None
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


# ---- what a folder is --------------------------------------------------------------------------
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "commit_success.txt", "manifest.ocdbt")


def _dir_layout(path: Path, names: list[str] | None = None) -> str | None:
    """The layout of a folder that is ONE checkpoint, or None (a run folder or something else)."""
    name = path.name
    try:
        names = names if names is not None else os.listdir(path)
    except OSError:
        return None
    nameset = set(names)
    tf = runs_tf.dir_kind(path, names)
    if tf is not None:
        return None if tf == "run" else tf
    if re.match(r"^(tmp-)?checkpoint-\d+$", name):
        return "hf-trainer"
    if ".metadata" in nameset or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if re.match(r"^(\w+[_-])?\d+$", name) and (nameset & set(ORBAX_MARKERS) or _orbax_items(path, names)):
        return "orbax"
    if ".orbax-checkpoint-tmp-" in name:
        return "orbax"
    if re.match(r"^global_step\d+$", name):
        return "deepspeed"
    if any(n.endswith(INDEX_SUFFIXES) for n in names):
        return "sharded"
    from ckptctl.formats import MODEL_FILES

    if nameset & set(MODEL_FILES):
        return "folder"
    if _explicit_step(name) and _has_checkpoint_file(path):
        return "folder"
    return None


def _explicit_step(name: str) -> bool:
    """The name says step/iter/epoch outright (`step_100`, `epoch=3`, `iter_0001000`)."""
    stem = strip_suffix(name)
    return bool(STEP_PATTERNS[1].search(stem) or STEP_PATTERNS[2].search(stem) or EPOCH_PATTERN.search(stem)
                or re.search(r"(?:^|[-_])(step|epoch)=", stem))


def _checkpoint_layout(path: Path) -> str | None:
    """_dir_layout, except that a model folder holding other checkpoints is a run, not one checkpoint.

    (An HF output folder has the final model.safetensors next to its checkpoint-N/ folders; a
    folder of loose model files in several formats is a run of unstepped checkpoints.)
    """
    layout = _dir_layout(path)
    if layout not in ("folder", "sharded"):
        return layout
    try:
        entries = list(os.scandir(path))
    except OSError:
        return layout
    models = 0
    for e in entries:
        if e.is_symlink() or e.name.startswith("."):
            continue
        if e.is_dir():
            if _dir_layout(Path(e.path)) is not None or _holds_checkpoints(Path(e.path)):
                return None
        elif e.is_file() and (e.name.endswith(INDEX_SUFFIXES) or (
                _is_checkpoint_file_name(e.name) and not SHARD_NAME.search(strip_suffix(e.name)))):
            models += 1
    return None if models >= 2 else layout


def _holds_checkpoints(path: Path) -> bool:
    """A folder with a checkpoint file or checkpoint folder directly inside (a run)."""
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_symlink() or e.name.startswith("."):
                    continue
                if e.is_file() and _is_checkpoint_file_name(e.name):
                    return True
                if e.is_dir() and _dir_layout(Path(e.path)) is not None:
                    return True
    except OSError:
        return False
    return False


def _orbax_items(path: Path, names: list[str]) -> bool:
    """An Orbax step folder holds item folders (default/, state/, params/) with _METADATA etc."""
    for n in names:
        p = path / n
        if p.is_dir() and not p.is_symlink():
            try:
                inner = set(os.listdir(p))
            except OSError:
                continue
            if inner & {"_METADATA", "_sharding", "manifest.ocdbt", "checkpoint", "ocdbt.process_0"}:
                return True
    return False


def _has_checkpoint_file(path: Path, depth: int = 2) -> bool:
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False) and e.name.endswith(FILE_SUFFIXES + (".distcp",)):
                    return True
                if depth > 1 and e.is_dir(follow_symlinks=False) and _has_checkpoint_file(Path(e.path), depth - 1):
                    return True
    except OSError:
        return False
    return False


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A folder that is one checkpoint (checkpoint-N/, DCP, Orbax step, shards, model folder)."""
    p = Path(path)
    return p.is_dir() and _checkpoint_layout(p) is not None


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder holding checkpoints (a run), as opposed to a folder that is one checkpoint.

    Cheap: looks at names only. True when the folder is not itself one checkpoint and holds at
    least one checkpoint file or checkpoint folder.
    """
    p = Path(path)
    if not p.is_dir() or is_checkpoint_dir(p):
        return False
    try:
        entries = list(os.scandir(p))
    except OSError:
        return False
    for e in entries:
        if e.is_symlink():
            continue
        if e.is_file() and (_is_checkpoint_file_name(e.name) or TF_DATA.match(e.name)):
            return True
        if e.is_dir() and _checkpoint_layout(Path(e.path)) is not None:
            return True
    return False


def _is_checkpoint_file_name(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(name) and not name.startswith(".")


# ---- discovery ---------------------------------------------------------------------------------
def discover(run_dir: str | os.PathLike, recursive: bool = False) -> list[RunCheckpoint]:
    """The checkpoints of a run folder, sorted by step (unknown last), then mtime."""
    return scan_run(run_dir, recursive=recursive).checkpoints


def scan_run(run_dir: str | os.PathLike, recursive: bool = False, read_info: bool = True) -> Run:
    """Discover a run: checkpoints, aliases, run-level best pointers, warnings.

    `run_dir` may also be one checkpoint (a file or a checkpoint folder): the run is then that
    one checkpoint, in its parent folder.
    """
    root = Path(run_dir)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        if runs_tf.tf_prefix_of(root) is None:  # run/ckpt-20 names a TF checkpoint by its prefix
            raise NotFound("no such file or directory", root) from None
        st = None
    except PermissionError:
        raise NotFound("permission denied", root) from None
    except OSError as e:
        raise NotFound(e.strerror or str(e), root) from None
    if st is None or not stat.S_ISDIR(st.st_mode) or is_checkpoint_dir(root):
        parent = root.parent
        run = Run(path=parent, checkpoints=[])
        c = _make_single(root, parent)
        if c is None:
            raise UsageError(f"not a checkpoint or a run folder (expected one of: {', '.join(FILE_SUFFIXES)})", root)
        run.checkpoints.append(c)
    else:
        run = Run(path=root, checkpoints=[])
        _scan_dir(root, root, run, recursive)
        _resolve_links(run, root)
    _enrich_all(run.checkpoints, read_info)
    _resolve_copies(run)
    if run.path == root:  # a run folder, not one checkpoint named on its own
        _resolve_best(run)
    run.checkpoints.sort(key=sort_key)
    return run


PARALLEL_MIN = 24  # checkpoints that need a pickle parsed before a process pool pays off
POOL_STATE: dict[str, Any] = {"used": False, "error": None}  # what the last discovery did (for tests)


def _jobs() -> int:
    env = os.environ.get("CKPTCTL_JOBS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _enrich_all(cks: list[RunCheckpoint], read_info: bool) -> None:
    """Read every checkpoint's step, metrics and info. Parsing pickles is CPU-bound pure Python
    (~5 ms for a Lightning .ckpt): with many of them, forked workers share it across cores."""
    heavy = [c for c in cks if read_info and c.layout not in ("orbax", "tf") and (
        c.path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl") or c.layout in ("dcp", "deepspeed"))]
    jobs = _jobs()
    if jobs < 2 or len(heavy) < PARALLEL_MIN or "torch" in sys.modules or not hasattr(os, "fork"):
        for c in cks:
            _enrich(c, read_info)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    heavy_ids = {id(c) for c in heavy}
    light = [c for c in cks if id(c) not in heavy_ids]
    size = max(4, -(-len(heavy) // (jobs * 4)))
    batches = [heavy[i:i + size] for i in range(0, len(heavy), size)]
    finished: set[int] = set()
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_enrich_batch, b) for b in batches]
            for c in light:  # meanwhile, here
                _enrich(c, read_info)
                finished.add(id(c))
            done = [f.result() for f in futures]
    except Exception as e:  # noqa: BLE001 - no pool (sandbox, pickling): do it here instead
        POOL_STATE.update(used=False, error=f"{type(e).__name__}: {e}")
        for c in cks:
            if id(c) not in finished:
                _enrich(c, read_info)
        return
    POOL_STATE.update(used=True, error=None)
    for batch, results in zip(batches, done):
        for c, r in zip(batch, results):
            c.__dict__.update(r.__dict__)


def _enrich_batch(batch: list[RunCheckpoint]) -> list[RunCheckpoint]:
    """In a worker. `TensorInfo.loc` is reader-private (and may hold closures): it stays here."""
    from dataclasses import replace

    for c in batch:
        _enrich(c, True)
        if c.info is not None:
            c.info.tensors = [replace(t, loc=None) if t.loc is not None else t for t in c.info.tensors]
    return batch


def sort_key(c: RunCheckpoint):
    return (c.step is None, c.step if c.step is not None else 0, c.epoch is None, c.epoch or 0, c.mtime,
            os.fspath(c.path))


def _make_single(path: Path, run: Path) -> RunCheckpoint | None:
    if runs_tf.tf_prefix_of(path) is not None:  # run/ckpt-20, ckpt-20.index, ckpt-20.data-00000-of-00001
        return runs_tf.single(path)
    if path.is_dir():
        layout = _checkpoint_layout(path)
        if layout is None:
            return None
        return _dir_checkpoint(path, run, layout)
    if path.name.endswith(INDEX_SUFFIXES):
        return _index_checkpoint(path, run, set())
    return _file_checkpoint(path, run)


def _scan_dir(folder: Path, root: Path, run: Run, recursive: bool) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        raise NotFound("permission denied", folder) from None
    except OSError as e:
        raise NotFound(e.strerror or str(e), folder) from None
    names = [e.name for e in entries]
    claimed: set[str] = set()
    links: list[os.DirEntry] = []
    alias_files: list[Path] = []
    # 1. sharded models at this level: the index claims its shards
    for e in entries:
        if e.name.endswith(INDEX_SUFFIXES) and e.is_file(follow_symlinks=False):
            c = _index_checkpoint(Path(e.path), folder, claimed, run.warnings)
            if c is not None:
                run.checkpoints.append(c)
    # 2. TensorFlow name-prefix groups (ckpt-5.index + ckpt-5.data-00000-of-00001)
    runs_tf.scan_tf_groups(folder, names, claimed, run)
    # 3. everything else
    for e in entries:
        n = e.name
        if n in claimed:
            continue
        p = Path(e.path)
        if e.is_symlink():
            links.append(e)
            continue
        if e.is_dir(follow_symlinks=False):
            layout = _checkpoint_layout(p)
            if layout is not None or (TMP_DIR.match(n) and _has_checkpoint_file(p)):
                run.checkpoints.append(_dir_checkpoint(p, folder, layout or "folder"))
            elif recursive and not n.startswith(".") and n not in ("__pycache__", "node_modules"):
                _scan_dir(p, root, run, recursive)
            elif not n.startswith("."):
                run.subdirs.append(p)
            continue
        if not e.is_file(follow_symlinks=False):
            continue
        if n in ("latest", "checkpoint", "latest_checkpointed_iteration.txt"):
            alias_files.append(p)
            continue
        if TMP_FILE.search(n) and _is_checkpoint_file_name(TMP_FILE.sub("", n).lstrip(".")):
            c = _file_checkpoint(p, folder)
            c.incomplete = True
            c.error = "incomplete: a temporary file of a save in progress or interrupted"
            run.checkpoints.append(c)
            continue
        if _is_checkpoint_file_name(n):
            run.checkpoints.append(_file_checkpoint(p, folder))
        elif n.endswith(FILE_SUFFIXES):
            run.ignored.append(p)
    run.links.extend(Path(e.path) for e in links)
    run.alias_files.extend(alias_files)


def _resolve_links(run: Run, root: Path) -> None:
    real_root = os.path.realpath(root)
    by_real = {os.path.realpath(c.path): c for c in run.checkpoints}
    for link in run.links:
        target = os.path.realpath(link)
        if target in by_real:
            by_real[target].aliases.append(link.name)
            continue
        try:
            shown = os.readlink(link)
        except OSError:
            shown = "?"
        if not os.path.exists(target):
            run.warnings.append(f"{link}: dangling symlink (-> {shown}); ignored")
        elif not (target == real_root or target.startswith(real_root + os.sep)):
            run.warnings.append(f"{link}: symlink to outside the run folder (-> {shown}); not listed")
        elif _is_checkpoint_file_name(link.name) or os.path.isdir(target):
            run.warnings.append(f"{link}: symlink to {shown}, which is not a listed checkpoint")
    for f in run.alias_files:
        text = _read_small_text(f, 4096)
        if not text:
            continue
        target_name = None
        if f.name == "checkpoint":  # TF CheckpointManager state: model_checkpoint_path: "ckpt-5"
            target_name = runs_tf.state_latest(text)
        elif f.name == "latest_checkpointed_iteration.txt":  # Megatron: an iteration number
            t = text.strip()
            if t.isdigit():
                target_name = f"iter_{int(t):07d}"
        else:  # DeepSpeed: a tag like global_step1200
            target_name = text.strip()
        if not target_name or "\n" in target_name:
            continue
        target = os.path.realpath(f.parent / target_name)
        if target in by_real:
            by_real[target].aliases.append(f.name)


def _file_checkpoint(path: Path, run: Path) -> RunCheckpoint:
    mtime, size = _file_stats([path])
    layout = "file"
    if path.suffix == ".ckpt":
        layout = "lightning"
    elif runs_tf.is_keras_name(path.name):  # before fairseq: checkpoint3.keras is Keras epoch 3
        layout = "keras"
    elif FAIRSEQ.match(strip_suffix(path.name)) or FAIRSEQ_EPOCH.match(strip_suffix(path.name)):
        layout = "fairseq"
    return RunCheckpoint(path=path, files=[path], step=None, step_source="none", format=None, size=size,
                         mtime=mtime, run=run, layout=layout)


def _index_checkpoint(index: Path, folder: Path, claimed: set[str], warnings: list[str] | None = None) -> RunCheckpoint | None:
    doc = _read_json(index, 64 << 20)
    files = [index]
    claimed.add(index.name)
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        for shard in sorted(set(map(str, doc["weight_map"].values()))):
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                continue
            p = folder / shard
            if os.path.lexists(p):
                files.append(p)
                if len(Path(shard).parts) == 1:
                    claimed.add(shard)
    mtime, size = _file_stats(files)
    return RunCheckpoint(path=index, files=files, step=None, step_source="none", format=None, size=size,
                         mtime=mtime, run=folder, layout="keras" if index.name.endswith(".weights.json") else "sharded")


def _dir_checkpoint(path: Path, run: Path, layout: str) -> RunCheckpoint:
    files, dirs, mtime, size = _walk_files(path)
    c = RunCheckpoint(path=path, files=files, step=None, step_source="none", format=None, size=size,
                      mtime=mtime, run=run, layout=layout, dirs=dirs)
    names = {f.name for f in files if f.parent == path}
    if TMP_DIR.match(path.name):
        c.incomplete = True
        c.error = "incomplete: a temporary folder of a save in progress or interrupted"
    elif layout == "hf-trainer" and "trainer_state.json" not in names:
        c.incomplete = True
        c.error = "incomplete: no trainer_state.json (save interrupted?)"
    elif layout == "dcp" and ".metadata" not in names:
        c.incomplete = True
        c.error = "incomplete: .distcp files without .metadata (save interrupted?)"
    elif not files:
        c.incomplete = True
        c.error = "incomplete: empty folder"
    return c


# ---- reading steps and metrics -----------------------------------------------------------------
def untmp(name: str) -> str:
    """The name a temporary save will have once finished (`tmp-checkpoint-5` -> `checkpoint-5`)."""
    name = re.sub(r"\.orbax-checkpoint-tmp-\d+$", "", name)
    name = re.sub(r"^tmp-(checkpoint-\d+)$", r"\1", name)
    name = TMP_FILE.sub("", name)
    return name.lstrip(".") or name


def _enrich(c: RunCheckpoint, read_info: bool) -> None:
    if c.layout in runs_tf.LAYOUTS:
        runs_tf.enrich(c, read_info)
        return
    step, epoch, metrics = parse_name(untmp(c.path.name) if c.incomplete else c.path.name)
    c.metrics.update(metrics)
    if step is not None:
        c.step, c.step_source = step, "name"
    if epoch is not None:
        c.epoch = epoch
    if c.layout == "orbax":
        from ckptctl.ops.runs_orbax import enrich as enrich_orbax

        enrich_orbax(c, read_info)
        return
    if c.layout == "hf-trainer":
        _trainer_state(c)
    if not read_info:
        return
    if c.error is not None and not c.files:
        return
    _read_info(c)


def _trainer_state(c: RunCheckpoint) -> None:
    doc = _read_json(c.path / "trainer_state.json")
    if not isinstance(doc, dict):
        if (c.path / "trainer_state.json").exists() and c.error is None:
            c.error = "trainer_state.json is not valid JSON"
        return
    gs = doc.get("global_step")
    if isinstance(gs, int) and not isinstance(gs, bool):
        c.step, c.step_source = gs, "trainer_state"
    ep = doc.get("epoch")
    if isinstance(ep, (int, float)) and not isinstance(ep, bool):
        c.epoch = int(ep) if float(ep).is_integer() else c.epoch
        c.metrics.setdefault("epoch", float(ep))
    for entry in doc.get("log_history") or []:
        if not isinstance(entry, dict) or entry.get("step") != c.step:
            continue
        for k, v in entry.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            f = _as_float(v)  # an int too big for a float is not a metric (float() would raise)
            if f is not None:
                c.metrics[k] = f
    best = doc.get("best_model_checkpoint")
    if isinstance(best, str) and best:
        ref: dict[str, Any] = {"source": "trainer_state best_model_checkpoint", "path": best}
        if isinstance(doc.get("best_metric"), (int, float)):
            ref["score"] = float(doc["best_metric"])
        c.best_ref = ref


def _read_info(c: RunCheckpoint) -> None:
    from ckptctl import formats

    try:
        try:
            fmt, target, opened = formats.resolve_opened(c.path)
        except CkptError:
            alt = primary_file(c) if c.path.is_dir() and c.layout in ("folder", "deepspeed", "hf-trainer") else None
            if alt is None:
                raise
            fmt, target, opened = formats.resolve_opened(alt)
        c.format = fmt
        reader = formats.reader_for(fmt, target, opened)  # the zip the sniffer parsed goes to the reader
        with reader:
            info = reader.info()
            c.info = info
            c.format = info.format
            _from_info(c, reader, info)
    except CkptError as e:
        if c.error is None:
            c.error = e.message
    except ModuleNotFoundError as e:
        if c.error is None:
            c.error = f"no reader available ({e.name})"
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, MemoryError) as e:
        if c.error is None:
            c.error = f"unreadable: {type(e).__name__}: {e}".splitlines()[0]


def primary_file(c: RunCheckpoint) -> Path | None:
    """The model file of a multi-file checkpoint folder whose reader cannot pick one itself."""
    cands = [f for f in c.files if f.name.endswith(FILE_SUFFIXES) and not AUX_NAMES.match(f.name)
             and not f.is_symlink()]
    if not cands:
        return None
    model = [f for f in cands if "model" in f.name]
    pool = model or cands
    return max(pool, key=lambda f: (f.stat().st_size, f.name))


def _from_info(c: RunCheckpoint, reader, info: CheckpointInfo) -> None:
    """Step, epoch and metrics from what the reader found (file metadata, Lightning callbacks)."""
    meta = _flatten(info.metadata)
    if c.layout == "file" and info.kind:
        c.layout = "lightning" if info.kind == "lightning" else c.layout
    inner_step = None
    for k in STEP_KEYS:
        v = _as_int(meta.get(k))
        if v is not None:
            inner_step = v
            break
    if inner_step is None:  # fairseq keeps num_updates in optimizer_history[-1]
        hist = [(k, v) for k, v in meta.items() if re.match(r"^optimizer_history/\d+/num_updates$", k)]
        if hist:
            inner_step = _as_int(max(hist, key=lambda kv: int(kv[0].split("/")[1]))[1])
    if inner_step is not None and c.step_source != "trainer_state":
        c.step = inner_step
        c.step_source = "global_step" if info.format != "safetensors" else "metadata"
    for k in EPOCH_KEYS:
        v = _as_int(meta.get(k))
        if v is not None:
            c.epoch = v
            break
    # plain numeric metadata: safetensors __metadata__ strings, top-level scalars of a pickle
    # (HDF5 attributes describe the file, not the training: left out)
    if info.format in ("safetensors", "torch-zip", "torch-legacy", "pickle"):
        top = {k: v for k, v in meta.items() if "/" not in k}
        _numeric_into(c, top, "metadata")
    for k in ("extra_state/val_loss", "extra_state/best"):
        f = _as_float(meta.get(k))
        if f is not None:
            c.metrics.setdefault(k.split("/", 1)[1] if k.endswith("val_loss") else "best_val_loss", f)
    _lightning_callbacks(c, reader, info, meta)


def _numeric_into(c: RunCheckpoint, d: dict, source: str) -> None:
    skip = set(STEP_KEYS) | set(EPOCH_KEYS) | {"format", "total_size"}
    for k, v in d.items():
        key = str(k)
        if key in skip or key.startswith(".") or "version" in key.lower() or "seed" in key.lower():
            if key in STEP_KEYS and c.step_source in ("none", "name"):
                iv = _as_int(v)
                if iv is not None:
                    c.step, c.step_source = iv, source
            if key in EPOCH_KEYS:
                iv = _as_int(v)
                if iv is not None:
                    c.epoch = iv
            continue
        f = _as_float(v)
        if f is not None:
            c.metrics[key] = f


_CB = re.compile(r"^callbacks/(?P<cb>ModelCheckpoint.*?)/(?P<field>monitor|best_model_score|best_model_path|current_score)$")


def _lightning_callbacks(c: RunCheckpoint, reader, info: CheckpointInfo, meta: dict[str, Any]) -> None:
    found: dict[str, dict[str, Any]] = {}
    for k, v in meta.items():
        m = _CB.match(k)
        if m:
            found.setdefault(m.group("cb"), {})[m.group("field")] = v
    for t in info.tensors:
        m = _CB.match(t.name)
        if m and m.group("field") == "current_score" and t.numel == 1 and t.nbytes <= 16:  # the one read
            try:
                found.setdefault(m.group("cb"), {})[m.group("field")] = reader.read_scalar(t.name)
            except Exception:  # noqa: BLE001 - a score we cannot read is just not shown
                continue
    for cb, d in found.items():
        monitor = d.get("monitor")
        if not isinstance(monitor, str):
            mm = re.search(r"'monitor':\s*'([^']+)'", cb)
            monitor = mm.group(1) if mm else None
        if not monitor:
            continue
        cur = _as_float(d.get("current_score"))
        if cur is not None:
            c.metrics[monitor] = cur
        best_path = d.get("best_model_path")
        if isinstance(best_path, str) and best_path:
            ref: dict[str, Any] = {"source": f"Lightning ModelCheckpoint best_model_path ({monitor})",
                                   "path": best_path, "monitor": monitor}
            score = _as_float(d.get("best_model_score"))
            if score is not None:
                ref["score"] = score
            mode = re.search(r"'mode':\s*'(min|max)'", cb)
            if mode:
                ref["mode"] = mode.group(1)
            c.best_ref = ref


def _flatten(d: Any, prefix: str = "", out: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(d, dict) and depth < 6:
        for k, v in d.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, (dict, list)) and depth < 5:
                _flatten(v, key, out, depth + 1)
            out[key] = v
    elif isinstance(d, list) and depth < 6:
        for i, v in enumerate(d[:64]):
            key = f"{prefix}/{i}"
            if isinstance(v, (dict, list)):
                _flatten(v, key, out, depth + 1)
            out[key] = v
    return out


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        return int(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return _as_int(v.item())
        except Exception:  # noqa: BLE001
            return None
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return None
    if isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", s, re.I):
            return float(s)
        return None
    if hasattr(v, "item") and not isinstance(v, bytes):
        try:
            return _as_float(v.item())
        except Exception:  # noqa: BLE001
            return None
    return None


# ---- copies and bests --------------------------------------------------------------------------
def _resolve_copies(run: Run) -> None:
    """checkpoint_last.pt / last.ckpt / checkpoint_best.pt: aliases when they equal a stepped one."""
    keep: list[RunCheckpoint] = []
    stepped = [c for c in run.checkpoints if role_of(c.path.name) is None]
    for c in run.checkpoints:
        role = role_of(c.path.name) if len(c.files) == 1 else None
        if role is None:
            keep.append(c)
            continue
        twin = None
        if c.step is not None and c.error is None:
            for s in stepped:
                if s.run == c.run and s.step == c.step and s.size == c.size and s.error is None and len(s.files) == 1:
                    twin = s
                    break
        if twin is None and c.layout == "keras":  # best.keras: a byte copy of one epoch's file?
            twin = runs_tf.keras_twin(c, stepped)
        if twin is not None:
            twin.aliases.append(c.path.name)
            twin.aliases.extend(c.aliases)
            twin.copies.extend(c.files + c.copies)
            run.ignored.append(c.path)
        else:
            c.role = role
            keep.append(c)
    run.checkpoints = keep


def _resolve_best(run: Run) -> None:
    """The run's best checkpoint as the newest trainer state / Lightning callback names it."""
    by_run: dict[Path | None, list[RunCheckpoint]] = {}
    for c in run.checkpoints:
        by_run.setdefault(c.run, []).append(c)
    for group in by_run.values():
        refs = [c for c in group if c.best_ref]
        if not refs:
            continue
        newest = max(refs, key=lambda c: (c.step is not None, c.step or 0, c.mtime))
        ref = newest.best_ref or {}
        target = _match_path(ref.get("path", ""), group)
        run.best.append((ref.get("source", "best"), target.path if target else None))
        if target is not None:
            target.best_of_run.append(ref.get("source", "best"))
        else:
            run.notes.append(
                f"{newest.path.name}: {ref.get('source')} names {ref.get('path')!r}, which is not in this run "
                "folder; nothing protected for it"
            )


def _match_path(ref: str, group: list[RunCheckpoint]) -> RunCheckpoint | None:
    if not ref:
        return None
    ref_path = Path(ref)
    for c in group:  # exact path first (absolute or relative to the current folder)
        try:
            if os.path.realpath(ref_path) == os.path.realpath(c.path):
                return c
        except OSError:
            pass
    hits = [c for c in group if c.path.name == ref_path.name]
    return hits[0] if len(hits) == 1 else None


_primary_file = primary_file  # the name ops/diff.py looks up
