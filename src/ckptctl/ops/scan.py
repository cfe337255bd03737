"""scan: which globals a pickle-based checkpoint asks for, and whether they can run code. Pure.

Each global is classified by `ckptctl.formats.pickles.safety.classify` ('safe' | 'unknown' |
'dangerous'; the rules and the reasons for them, TorchScript's `__torch__.*` classes included,
are documented there, beside the restricted unpickler that records the globals); this module
walks every pickle a file holds and merges the verdicts.

Nothing here unpickles: the readers' restricted unpickler reports the globals without importing
them, even for files that then fail to parse.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ckptctl.errors import CkptError, UnknownFormat
from ckptctl.formats.pickles.safety import classify
from ckptctl.ops.scan_walk import walk_file

if TYPE_CHECKING:
    from ckptctl.sources import RemotePath

VERDICT_ORDER = {"dangerous": 3, "error": 2, "unknown": 1, "safe": 0}


@dataclass
class ScanResult:
    path: str
    format: str | None = None
    pickle: bool = True
    globals: list[tuple[str, str]] = field(default_factory=list)  # (name, class)
    error: str | None = None  # the file, or part of it, could not be read
    note: str | None = None
    where: dict[str, list[str]] = field(default_factory=dict)  # global -> where it was found
    unknown_format: bool = False  # no reader knows the file (walk_file may still find pickles)

    @property
    def verdict(self) -> str:
        classes = {c for _, c in self.globals}
        if "dangerous" in classes:
            return "dangerous"
        if self.error is not None and not self.globals:
            return "error"  # nothing could be listed: no verdict
        if "unknown" in classes:
            return "unknown"
        return "safe"

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "verdict": self.verdict,
            "pickle": self.pickle,
            "globals": [{"name": n, "class": c, "where": self.where.get(n, [])} for n, c in self.globals],
            "error": self.error,
            "note": self.note,
        }


def _classified(names: list[str]) -> list[tuple[str, str]]:
    return [(g, classify(g)) for g in dict.fromkeys(names)]


NO_PICKLE = ("safetensors", "hdf5")
# formats with no pickle whose metadata scan still reads (a damaged file is an error, not "safe")
NO_PICKLE_NOTES = {
    "tf-bundle": "TensorFlow checkpoint: an index table and raw tensor bytes, no pickle",
    "gguf": "GGUF holds no pickle: metadata and tensor bytes only, nothing runs when it is loaded",
    "orbax": "Orbax: JSON metadata and Zarr arrays (OCDBT), no pickle: loading it runs no code",
}
# files a folder scan looks at (besides anything whose first bytes are a pickle or a zip); names
# like .model/.data are left to the content check: tokenizers and TF shards use them too
SCAN_SUFFIXES = (
    ".safetensors",
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".h5",
    ".hdf5",
    ".pkl",
    ".pickle",
    ".joblib",
    ".zip",
    ".npz",
    ".npy",
    ".keras",
    ".gguf",
)


def scan_file(path: str | os.PathLike) -> ScanResult:
    """Scan one file or checkpoint folder. Never raises for what is inside the file.

    The file's reader lists what it understands; then every pickle reachable in the file is
    walked (`walk_file`: concatenated pickles, zip members, a zip's prefix and comment, .npy
    object payloads, pickles nested as bytes) and its globals are added, with where they were."""
    from ckptctl.sources import as_path

    res = _scan_format(path)
    p = as_path(path)  # a URL stays one
    if not p.is_file():
        return res
    try:
        walk = walk_file(p)
    except OSError as e:
        res.error = res.error or f"cannot read: {e.strerror or e}"
        return res
    except CkptError as e:  # a remote read failed
        res.error = res.error or e.message
        return res
    merged: dict[str, str] = dict(res.globals)
    for name, cls, where in walk.found:
        old = merged.get(name)
        if old is None or VERDICT_ORDER[cls] > VERDICT_ORDER[old]:
            merged[name] = cls
        places = res.where.setdefault(name, [])
        if where not in places and len(places) < 8:
            places.append(where)
    res.globals = list(merged.items())
    if walk.parsed or walk.found:
        res.pickle = True
        if res.unknown_format:  # not a checkpoint ckptctl reads, but it holds pickles
            res.format = res.format or walk.kind or "pickle"
            res.note, res.error = res.error or res.note, None
    if walk.errors and res.error is None and res.pickle:
        res.error = "; ".join(walk.errors[:3]) + (f" (and {len(walk.errors) - 3} more)" if len(walk.errors) > 3 else "")
    return res


def _scan_format(path: str | os.PathLike) -> ScanResult:
    """What the file's own reader lists."""
    from ckptctl.formats import open_reader, resolve
    from ckptctl.formats.pickles import PickleError

    p = os.fspath(path)
    res = ScanResult(p)
    try:
        fmt, target = resolve(path)
    except UnknownFormat as e:
        res.unknown_format = True
        return _scan_unknown(p, res, e)
    except CkptError as e:
        res.error = e.message
        res.pickle = False
        return res
    res.format = fmt
    if fmt in NO_PICKLE_NOTES:
        return _scan_no_pickle(res, target, NO_PICKLE_NOTES[fmt])
    if fmt in NO_PICKLE:
        res.pickle = False
        return res
    if fmt == "sharded":
        return _scan_sharded(p, res, target)
    if fmt in ("keras", "keras-sharded"):
        return _scan_keras(res, fmt, target)
    try:
        with open_reader(target) as reader:
            info = reader.info()
            names = list(info.globals)
            if fmt == "dcp":
                more, errors = reader.scan_items()
                names += more
                if errors:
                    res.error = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        res.globals = _classified(names)
        if info.warnings and fmt == "pickle":
            res.note = "; ".join(info.warnings)
        if fmt == "torchscript":
            code = info.metadata.get("code")
            n = sum(1 for f in code if f.endswith(".py")) if isinstance(code, dict) else 0
            res.note = (
                f"a TorchScript archive: torch.jit.load compiles its code ({n} file(s) in code/) "
                "and runs it when the model is used; ckptctl read its weights without running any"
            )
    except PickleError as e:
        more = _raw_globals(fmt, target) if fmt == "torchscript" else []  # its other pickles
        res.globals = _classified(e.globals + e.more_globals + more)
        res.error = e.message
    except CkptError as e:  # the pickles may be fine and the damage elsewhere: list them anyway
        res.globals = _classified(getattr(e, "globals", None) or _raw_globals(fmt, target))
        res.error = e.message
    return res


def _scan_no_pickle(res: ScanResult, target: Path | RemotePath, note: str) -> ScanResult:
    """A format that holds no pickle: nothing in it runs code when loaded. Its metadata is still
    read, so that a damaged checkpoint is an error rather than 'safe'."""
    from ckptctl.formats import open_reader

    res.pickle = False
    try:
        with open_reader(target) as reader:
            reader.info()
    except CkptError as e:
        res.error = e.message
        return res
    res.note = note
    return res


def _raw_globals(fmt: str, target: Path | RemotePath) -> list[str]:
    """Globals of the pickles in a file that the reader could not list, found without semantics."""
    try:
        if fmt in ("torch-zip", "torchscript"):
            from ckptctl.formats.torch_zip import scan_zip_pickles

            return scan_zip_pickles(target)[0]
        if fmt in ("torch-legacy", "pickle"):
            from ckptctl.formats.pickles import scan_globals

            with open(target, "rb") as f:
                return scan_globals(f, 0, os.fstat(f.fileno()).st_size, target)[0]
    except (OSError, CkptError):
        pass
    return []


def _scan_unknown(p: str, res: ScanResult, e: UnknownFormat) -> ScanResult:
    """Zips that are not torch checkpoints (TorchScript, other archives) still have pickles to scan."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head == b"PK\x03\x04":  # walk_file lists its pickles
        res.format = "zip"
        res.note = e.message
        res.pickle = False
        return res
    res.pickle = False
    if head == b"\x93NUM":  # walk_file reads its header: an object array's payload is a pickle
        res.format = "npy"
        res.note = "a NumPy .npy array"
        return res
    res.error = e.message
    return res


def _scan_sharded(p: str, res: ScanResult, index: Path | RemotePath) -> ScanResult:
    from ckptctl.formats import open_reader

    try:
        with open_reader(index) as reader:
            files = [f for f in reader.info().files if os.fspath(f) != os.fspath(index)]
    except CkptError as e:
        res.error = e.message
        return res
    pickled = False
    errors: list[str] = []
    merged: dict[str, str] = {}
    for f in files:
        sub = scan_file(f)
        pickled = pickled or sub.pickle
        for n, c in sub.globals:
            if n not in merged or VERDICT_ORDER[c] > VERDICT_ORDER[merged[n]]:
                merged[n] = c
        for n, places in sub.where.items():
            res.where.setdefault(n, []).extend(f"{os.path.basename(f)}: {w}" for w in places[:4])
        if sub.error:
            errors.append(f"{os.path.basename(f)}: {sub.error}")
    res.pickle = pickled
    res.globals = list(merged.items())
    if errors:
        res.error = "; ".join(errors)
    return res


def _scan_keras(res: ScanResult, fmt: str, target: Path | RemotePath) -> ScanResult:
    """A Keras archive or weights set holds no pickle; a .keras config may hold Lambda bytecode."""
    res.pickle = False
    res.note = (
        "no pickle: a zip of JSON config and HDF5 weights"
        if fmt == "keras"
        else "no pickle: a JSON index and HDF5 weight shards"
    )
    if fmt == "keras":
        from ckptctl.formats.keras_zip import config_code

        try:
            res.globals = [(what, "dangerous") for what in config_code(target)]
        except CkptError as e:
            res.error = e.message
    return res


def _looks_scannable(path: Path) -> bool:
    if path.name.lower().endswith(SCAN_SUFFIXES):
        return True
    if path.name.endswith(".index"):  # a TF checkpoint, once (its data shards are not listed)
        from ckptctl.formats.tf_bundle import is_index

        return is_index(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head in (b"PK\x03\x04", b"\x93NUM")


def _is_orbax(p: Path) -> bool:
    from ckptctl.formats.orbax import is_orbax_dir

    return not p.is_symlink() and is_orbax_dir(p)


def expand(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, bool]]:
    """(path, named) for each thing to scan: named files as given, folders walked for checkpoints.

    A DCP folder (with .metadata) is one checkpoint; its .distcp files are not listed again.
    """
    from ckptctl.sources import is_remote

    for raw in paths:
        if is_remote(raw):
            yield from _expand_remote(raw)
            continue
        p = Path(raw)
        if not p.is_dir():
            yield p, True
            continue
        if (p / ".metadata").is_file() or _is_orbax(p):
            yield p, True
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            here = Path(root)
            keep = []
            for d in dirs:
                if (here / d / ".metadata").is_file() or _is_orbax(here / d):
                    yield here / d, False
                else:
                    keep.append(d)
            dirs[:] = keep
            for name in sorted(files):
                fp = here / name
                if fp.is_file() and _looks_scannable(fp):
                    yield fp, False


def _expand_remote(url) -> Iterator[tuple[Path, bool]]:
    """expand() for a URL: the same walk, from one (cached) listing per remote folder."""
    from ckptctl.sources import as_path, open_source

    # a RemotePath: it has the read-only part of Path's interface, all this walk (and the
    # format probes it calls) use
    p = cast(Path, as_path(url))
    if not p.is_dir():
        yield p, True
        return
    if (p / ".metadata").is_file() or _is_orbax(p):
        yield p, True
        return
    todo = [p]
    while todo:
        here = todo.pop(0)
        subs, files = [], []
        for e in here.iterdir():
            if not e.is_dir():
                files.append(e)
            elif (e / ".metadata").is_file() or _is_orbax(e):
                yield e, False
            else:
                subs.append(e)
        for e in files:
            if e.name.lower().endswith(SCAN_SUFFIXES) or (e.name.endswith(".index") and _looks_scannable(e)):
                yield e, False
            elif not e.name.endswith(".index"):
                with open_source(e) as src:
                    head = src.pread(0, 4)
                if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head in (
                    b"PK\x03\x04",
                    b"\x93NUM",
                ):
                    yield e, False
        todo[:0] = subs  # depth first, in name order, like os.walk with sorted dirs


def scan(paths: Sequence[str | os.PathLike]) -> list[ScanResult]:
    return [scan_file(p) for p, _named in expand(paths)]
