"""TensorFlow and Keras run layouts, plugged into ops/runs/ (discovery) and ops/prune.py.

TensorFlow (`tf.train.CheckpointManager`, TF 1 `tf.train.Saver`, `Checkpoint.save`):
  ckpt-10.index + ckpt-10.data-00000-of-00001 (+ more shards), ..., and a `checkpoint` state file
  (CheckpointState in protobuf text format) naming the latest and every kept prefix:
      model_checkpoint_path: "ckpt-20"
      all_model_checkpoint_paths: "ckpt-10"
      all_model_checkpoint_paths: "ckpt-20"
      all_model_checkpoint_timestamps: 1796193738.90
      all_model_checkpoint_timestamps: 1796193738.97
      last_preserved_timestamp: 1796193737.47
  One checkpoint per prefix (layout "tf"): its `.index` and every data shard; the step is the
  `-N` the writer appends to the prefix. Prune removes a prefix's files together and then drops
  it (and its timestamp) from the state file, rewritten atomically (`rewrite_state`).
  A SavedModel folder (saved_model.pb + variables/variables.*) is one checkpoint ("tf-savedmodel").

Keras (`keras.callbacks.ModelCheckpoint`): `.keras` archives and `.weights.h5` files (and Keras 2
`.h5` / `.hdf5` names like `weights.03-0.41.h5`; a sharded `w01.weights.json` with the shards
its weight_map names), layout "keras". The user's pattern decides the
name, so epoch and metrics are read from its numbers (`parse_keras_name`): `epoch03-0.4100.keras`
is epoch 3 with one unnamed value 0.41 (metric name "metric"; a second one "metric2", ...),
`epoch=3-val_loss=0.41.keras` names it `val_loss`. `best.keras` (a save_best_only file) has the
role "best".

Readers come from the registry (formats.open_reader): TF bundles ("tf-bundle") and `.keras`
archives ("keras") are read when their reader is registered; before that they are listed
without tensor counts, and without an error.
"""

from __future__ import annotations

import codecs
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptctl.ops.runs.base import RUN, Layout
from ckptctl.ops.runs.walk import isfile, islink, lexists, listdir, realpath

if TYPE_CHECKING:  # the runs package imports this module; the names it shares are imported lazily
    from ckptctl.ops.runs.model import Run, RunCheckpoint

TF_FORMAT = "tf-bundle"
LAYOUTS = ("tf", "tf-savedmodel", "keras")
STATE_FILE = "checkpoint"

TF_FILE = re.compile(r"^(?P<prefix>.+)\.(?:index|data-(?P<shard>\d{5})-of-(?P<of>\d{5}))$")
TF_STEP = re.compile(r"-(\d+)$")  # Saver / CheckpointManager / Checkpoint.save append -{number}
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


# ---- the `checkpoint` state file ----------------------------------------------------------------
_FIELD = re.compile(r"^\s*(?P<key>[A-Za-z_]\w*)\s*:\s*(?P<val>.*?)\s*$")
_STR = re.compile(r'^"((?:[^"\\]|\\.)*)"$|^\'((?:[^\'\\]|\\.)*)\'$')


@dataclass
class StateFile:
    """A parsed CheckpointState: each field with the line it sits on, so a rewrite keeps the rest."""

    path: Path
    lines: list[str]  # with their line endings
    latest: str | None = None
    paths: list[tuple[int, str]] = field(default_factory=list)  # (line number, all_model_checkpoint_paths)
    timestamps: list[tuple[int, str]] = field(default_factory=list)  # (line number, raw value)
    problem: str | None = None  # why it cannot be rewritten line by line


def _unescape(raw: str) -> str | None:
    m = _STR.match(raw)
    if not m:
        return None
    body = m.group(1) if m.group(1) is not None else m.group(2)
    try:
        return codecs.escape_decode(body.encode("utf-8"))[0].decode("utf-8", "surrogateescape")
    except (ValueError, UnicodeDecodeError):
        return None


def parse_state(path: Path, text: str) -> StateFile:
    st = StateFile(path=path, lines=text.splitlines(keepends=True))
    for i, line in enumerate(st.lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _FIELD.match(line)
        if not m:
            st.problem = f"line {i + 1} is not `field: value`"
            continue
        key, val = m.group("key"), m.group("val")
        if key in ("model_checkpoint_path", "all_model_checkpoint_paths"):
            s = _unescape(val)
            if s is None:
                st.problem = f"line {i + 1}: {key} is not a quoted string"
                continue
            if key == "model_checkpoint_path":
                st.latest = s
            else:
                st.paths.append((i, s))
        elif key == "all_model_checkpoint_timestamps":
            st.timestamps.append((i, val))
    return st


def read_state(folder: Path) -> StateFile | None:
    from ckptctl.ops.runs.walk import _read_small_text

    p = folder / STATE_FILE
    if not p.is_file() or p.is_symlink():
        return None
    text = _read_small_text(p, 1 << 20)
    if text is None:
        return None
    return parse_state(p, text)


def state_latest(text: str) -> str | None:
    """The prefix `model_checkpoint_path` names (ops/runs.py marks that checkpoint with an alias)."""
    return parse_state(Path(STATE_FILE), text).latest


def _resolve_in(folder: Path, name: str) -> str:
    p = Path(name)
    return realpath(p if p.is_absolute() else folder / p)


# ---- TensorFlow prefixes -----------------------------------------------------------------------
def tf_step(prefix: str) -> int | None:
    m = TF_STEP.search(prefix)
    return int(m.group(1)) if m else None


def scan_tf_groups(folder: Path, names: list[str], claimed: set[str], run: Run) -> None:
    """One RunCheckpoint per TF prefix in `folder`: its .index and every data shard."""
    from ckptctl.ops.runs.model import RunCheckpoint
    from ckptctl.ops.runs.names import parse_name
    from ckptctl.ops.runs.walk import _file_stats

    groups: dict[str, dict[str, Any]] = {}
    for n in names:
        m = TF_FILE.match(n)
        if not m or n in claimed or not isfile(folder / n) or islink(folder / n):
            continue
        g = groups.setdefault(m.group("prefix"), {"index": None, "shards": {}, "members": []})
        g["members"].append(n)
        if m.group("shard") is None:
            g["index"] = n
        else:
            g["shards"][int(m.group("shard"))] = int(m.group("of"))
    if not groups:
        return
    state = read_state(folder)
    if state is not None:
        here = {realpath(folder / p) for p in groups}
        missing = [p for _, p in state.paths if _resolve_in(folder, p) not in here]
        if state.latest and _resolve_in(folder, state.latest) not in here:
            run.warnings.append(f"{state.path}: its latest checkpoint {state.latest!r} is not in this folder")
        if missing:
            run.notes.append(f"{state.path} lists {', '.join(missing)}, not in this folder")
    for prefix in sorted(groups):
        g = groups[prefix]
        files = [folder / n for n in sorted(g["members"])]
        claimed.update(g["members"])
        mtime, size = _file_stats(files)
        step = tf_step(prefix)
        _, epoch, metrics = parse_name(prefix)
        if step is None:
            step = parse_name(prefix)[0]
        c = RunCheckpoint(
            path=folder / prefix,
            files=files,
            step=step,
            step_source="name" if step is not None else "none",
            format=TF_FORMAT,
            size=size,
            mtime=mtime,
            metrics=metrics,
            run=folder,
            layout="tf",
            epoch=epoch,
        )
        shards: dict[int, int] = g["shards"]
        counts = set(shards.values())
        if g["index"] is None:
            c.incomplete = True
            c.error = "incomplete: data shard(s) without a .index (save interrupted?)"
        elif not shards:
            c.incomplete = True
            c.error = "incomplete: a .index without its data shard(s)"
        elif len(counts) > 1:
            c.error = f"data shards of different counts ({', '.join(f'of-{n:05d}' for n in sorted(counts))})"
        else:
            of = counts.pop()
            absent = [i for i in range(of) if i not in shards]
            if absent:
                c.incomplete = True
                c.error = (
                    "incomplete: missing data shard(s) "
                    + ", ".join(f"{prefix}.data-{i:05d}-of-{of:05d}" for i in absent[:3])
                    + ("…" if len(absent) > 3 else "")
                )
        run.checkpoints.append(c)


def tf_prefix_of(path: Path) -> str | None:
    """The TF prefix a path names: `ckpt-20.index`, `ckpt-20.data-00000-of-00001`, or `ckpt-20`
    itself when `ckpt-20.index` sits beside it (and no file or folder of that name exists)."""
    m = TF_FILE.match(path.name)
    if m and isfile(path):
        return m.group("prefix")
    if not lexists(path) and isfile(path.parent / f"{path.name}.index"):
        return path.name
    return None


def single(path: Path) -> RunCheckpoint | None:
    """The TF checkpoint `path` names (all its files), as ls of one checkpoint shows it."""
    from ckptctl.ops.runs.model import Run

    prefix = tf_prefix_of(path)
    if prefix is None:
        return None
    folder = path.parent
    try:
        names = sorted(n for n in listdir(folder) if n.startswith(prefix + "."))
    except OSError:
        return None
    names = [n for n in names if (m := TF_FILE.match(n)) and m.group("prefix") == prefix]
    tmp = Run(path=folder, checkpoints=[])
    scan_tf_groups(folder, names, set(), tmp)
    return tmp.checkpoints[0] if tmp.checkpoints else None


def is_saved_model(path: Path, names: list[str] | set[str]) -> bool:
    return any(n in names for n in SAVED_MODEL_FILES)


def dir_kind(path: Path, names: list[str]) -> str | None:
    """'tf-savedmodel' for a SavedModel folder (one checkpoint), 'run' for a folder of TF
    prefixes (never one checkpoint, even when named like an Orbax step), else None."""
    if is_saved_model(path, names):
        return "tf-savedmodel"
    if any(n.endswith(".index") and TF_FILE.match(n) for n in names):
        return "run"
    return None


# ---- reading -----------------------------------------------------------------------------------
def reader_registered(fmt: str) -> bool:
    from ckptctl import formats

    return fmt in formats.READERS


def enrich(c: RunCheckpoint, read_info: bool) -> None:
    """Step/epoch/metrics of a TF checkpoint, and its info through the normal reader (a Keras
    checkpoint's names are read by keras.enrich, which then reads it through read_target)."""
    from ckptctl.ops.runs.names import parse_name, untmp

    name = untmp(c.path.name) if c.incomplete else c.path.name
    target: Path | None
    if c.layout == "tf-savedmodel":
        step, epoch, metrics = parse_name(name)
        c.metrics.update(metrics)
        if step is not None:
            c.step, c.step_source = step, "name"
        c.epoch = epoch if epoch is not None else c.epoch
        c.format = TF_FORMAT
        if not reader_registered(TF_FORMAT):
            return
        target = c.path
    else:  # tf: the prefix's .index (the registry names a TF checkpoint by it)
        if not reader_registered(TF_FORMAT):
            return
        target = next((f for f in c.files if f.name.endswith(".index")), None)
    read_target(c, target, read_info)


def read_target(c: RunCheckpoint, target: Path | None, read_info: bool) -> None:
    """The info of a TF or Keras checkpoint (its `target` file or folder) through the normal reader."""
    if not read_info or target is None or (c.error is not None and c.incomplete):
        return
    _read(c, target)


def _read(c: RunCheckpoint, target: Path) -> None:
    from ckptctl import formats
    from ckptctl.errors import CkptError

    try:
        with formats.open_reader(target) as reader:
            info = reader.info()
            c.info = info
            c.format = info.format
            if c.layout in ("tf", "tf-savedmodel"):
                _tf_epoch(c, reader, info)
    except CkptError as e:
        c.error = c.error or e.message
    except ModuleNotFoundError as e:
        c.error = c.error or f"no reader available ({e.name})"
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, MemoryError) as e:
        c.error = c.error or f"unreadable: {type(e).__name__}: {e}".splitlines()[0]


TF_EPOCH_NAMES = ("epoch", "current_epoch")


def _tf_epoch(c: RunCheckpoint, reader, info) -> None:
    """`tf.train.Checkpoint(epoch=tf.Variable(...))`: the one 0-d integer read, like Lightning's
    current_score (4-8 bytes; the only tensor data run discovery reads from a TF checkpoint)."""
    for t in info.tensors:
        base = t.name.split("/.ATTRIBUTES/", 1)[0]
        if base in TF_EPOCH_NAMES and t.numel == 1 and not t.shape and t.dtype.startswith(("int", "uint")):
            try:
                v = int(reader.read(t.name).reshape(-1)[0])
            except Exception:  # noqa: BLE001 - an epoch we cannot read is just not shown
                return
            if v >= 0:
                c.epoch = v
            return


# ---- prune: the state file after deletion ------------------------------------------------------
@dataclass
class StateRewrite:
    path: Path
    dropped: list[str]  # prefixes dropped from all_model_checkpoint_paths
    done: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": os.fspath(self.path), "dropped": self.dropped, "rewritten": self.done, "error": self.error}


def _removed_by_folder(ckpts: list[RunCheckpoint]) -> dict[Path, set[str]]:
    out: dict[Path, set[str]] = {}
    for c in ckpts:
        if c.layout == "tf":
            out.setdefault(c.path.parent, set()).add(realpath(c.path))
    return out


def plan_state(ckpts: list[RunCheckpoint]) -> list[StateRewrite]:
    """What pruning `ckpts` will drop from each folder's state file (folders it names none of: left)."""
    out = []
    for folder, removed in sorted(_removed_by_folder(ckpts).items()):
        st = read_state(folder)
        if st is None:
            continue
        dropped = [p for _, p in st.paths if _resolve_in(folder, p) in removed]
        if dropped:
            out.append(
                StateRewrite(
                    path=st.path,
                    dropped=dropped,
                    error=None if st.problem is None else f"cannot be rewritten: {st.problem}",
                )
            )
    return out


def rewrite_state(folder: Path, removed: set[str]) -> StateRewrite | None:
    """Drop the removed prefixes (real paths) and their timestamps from folder/checkpoint.

    Reads the file as it is now (a save since the plan may have added a line), keeps every other
    line byte for byte, and replaces it atomically: temp file in the folder, fsync, rename, fsync
    of the folder. `model_checkpoint_path` is never dropped (prune protects the checkpoint it
    names). Returns None when the file names none of them (left as it is).
    """
    st = read_state(folder)
    if st is None:
        return None
    drop_idx = [
        k
        for k, (_, p) in enumerate(st.paths)
        if _resolve_in(folder, p) in removed
        and not (st.latest is not None and _resolve_in(folder, st.latest) == _resolve_in(folder, p))
    ]
    if not drop_idx:
        return None
    res = StateRewrite(path=st.path, dropped=[st.paths[k][1] for k in drop_idx])
    if st.problem is not None:
        res.error = f"not rewritten: {st.problem}"
        return res
    # timestamps pair with paths by position (TF zips the two lists)
    drop_lines = {st.paths[k][0] for k in drop_idx} | {st.timestamps[k][0] for k in drop_idx if k < len(st.timestamps)}
    text = "".join(line for i, line in enumerate(st.lines) if i not in drop_lines)
    try:
        _atomic_write(st.path, text.encode("utf-8", "surrogateescape"))
        res.done = True
    except OSError as e:
        res.error = f"{e.filename or st.path}: {e.strerror or e}"
    return res


def _atomic_write(path: Path, data: bytes) -> None:
    mode = os.stat(path).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".ckptctl-tmp-state", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    from ckptctl.formats.writeutil import fsync_dir

    fsync_dir(path.parent)


def after_prune(removed: list[RunCheckpoint]) -> list[StateRewrite]:
    """Rewrite the state file of every folder where TF checkpoints were removed."""
    out = []
    for folder, real in sorted(_removed_by_folder(removed).items()):
        r = rewrite_state(folder, real)
        if r is not None:
            out.append(r)
    return out


class TensorFlow(Layout):
    name = "tf"
    owns = ("tf", "tf-savedmodel")
    alias_files = (STATE_FILE,)

    def claim_dir(self, path: Path, names: list[str], nameset: set[str]) -> str | None:
        kind = dir_kind(path, names)
        return RUN if kind == "run" else kind

    def names_checkpoint(self, path: Path) -> bool:  # run/ckpt-20, ckpt-20.index, ckpt-20.data-00000-of-00001
        return tf_prefix_of(path) is not None

    def single(self, path: Path) -> RunCheckpoint | None:
        return single(path)

    def scan(self, folder: Path, names: list[str], claimed: set[str], run: Run) -> None:
        scan_tf_groups(folder, names, claimed, run)

    def enrich(self, c: RunCheckpoint, read_info: bool) -> None:
        enrich(c, read_info)

    def alias_target(self, file_name: str, text: str) -> str | None:
        return state_latest(text)  # model_checkpoint_path: "ckpt-5"

    def plan_prune(self, ckpts: list[RunCheckpoint]) -> list[StateRewrite]:
        return plan_state(ckpts)

    def after_prune(self, removed: list[RunCheckpoint]) -> list[StateRewrite]:
        return after_prune(removed)


LAYOUT = TensorFlow()
