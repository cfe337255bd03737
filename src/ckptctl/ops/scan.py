"""scan: which globals a pickle-based checkpoint asks for, and whether they can run code. Pure.

`classify('module.name')` is 'dangerous' for the union of what picklescan (`_unsafe_globals`) and
modelscan (`unsafe_globals`, CRITICAL and HIGH) flag, plus a few more ways to reach code, files,
processes or the network; 'safe' for the globals ckptctl's restricted unpickler understands
(torch rebuild functions, storages, dtypes, OrderedDict, numpy arrays, DCP metadata classes,
pathlib paths); 'unknown' for everything else (argparse.Namespace, a training library's classes):
those cannot be listed as safe, but nothing says they run code either.

Nothing here unpickles: the readers' restricted unpickler reports the globals without importing
them, even for files that then fail to parse.

TorchScript archives: their pickles name `__torch__.*` classes. Those are not Python imports
(`pickle` cannot import them: there is no `__torch__` module); `torch.jit.load` resolves them
against the TorchScript code in the archive's `code/`, which it compiles, and runs when the model
is used (and in a class's own `__setstate__`, on load). So they are 'unknown', like a pickled
model's `__main__.Net`: not known to run Python code, but backed by code nobody here has
reviewed. ckptctl reads the archive's weights without compiling or running any of it. Other
globals in TorchScript pickles (`torch.jit._pickle.build_intlist`, ...) are plain data builders
the restricted unpickler understands: 'safe'.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptctl.errors import CkptError, UnknownFormat

# module -> "*" (everything in it and in its submodules) or the names in it that are dangerous
_ALL = "*"
_BUILTINS = {
    "eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "open", "apply",
    "breakpoint", "globals", "locals", "vars", "input", "raw_input", "reload", "file", "help", "exit", "quit",
}
DANGEROUS: dict[str, str | frozenset[str]] = {
    "builtins": frozenset(_BUILTINS),
    "__builtin__": frozenset(_BUILTINS),
    # processes, the OS and the interpreter
    "os": _ALL, "posix": _ALL, "nt": _ALL, "subprocess": _ALL, "sys": _ALL, "pty": _ALL, "commands": _ALL,
    "runpy": _ALL, "shutil": _ALL, "multiprocessing": _ALL, "ctypes": _ALL, "_ctypes": _ALL,
    "importlib": _ALL, "imp": _ALL, "marshal": _ALL, "code": _ALL, "codeop": _ALL,
    "types": frozenset({"FunctionType", "CodeType", "LambdaType", "MethodType", "ModuleType"}),
    "platform": frozenset({"popen"}),
    "io": frozenset({"open", "open_code", "FileIO"}), "_io": frozenset({"open", "open_code", "FileIO"}),
    # other pickles / code loaders
    "pickle": _ALL, "_pickle": _ALL, "cPickle": _ALL, "dill": _ALL, "cloudpickle": _ALL, "joblib": frozenset({"load"}),
    "numpy": frozenset({"load"}), "numpy.testing._private.utils": _ALL, "numpy.f2py": _ALL,
    "torch": frozenset({"load"}), "torch.serialization": frozenset({"load"}), "torch.hub": _ALL,
    "torch.jit": frozenset({"load"}),
    "torch._dynamo.guards": frozenset({"GuardBuilder.get"}),
    "torch._inductor.codecache": frozenset({"compile_file"}),
    "torch.fx.experimental.symbolic_shapes": frozenset({"ShapeEnv.evaluate_guards_expression"}),
    "torch.jit.unsupported_tensor_ops": frozenset({"execWrapper"}),
    "torch.utils._config_module": frozenset({"ConfigModule.load_config"}),
    "torch.utils.bottleneck.__main__": frozenset({"run_cprofile", "run_autograd_prof"}),
    "torch.utils.collect_env": frozenset({"run"}),
    "torch.utils.data.datapipes.utils.decoder": frozenset({"basichandlers"}),
    # debuggers, profilers and tools that run code
    "bdb": _ALL, "pdb": _ALL, "timeit": _ALL, "trace": _ALL, "pydoc": _ALL, "pip": _ALL, "venv": _ALL,
    "ensurepip": _ALL, "idlelib": _ALL, "lib2to3": _ALL, "distutils.file_util": _ALL,
    "cProfile": frozenset({"run", "runctx"}), "profile": frozenset({"run", "runctx", "Profile.run", "Profile.runctx"}),
    "doctest": frozenset({"debug_script"}),
    # call builders that turn data into calls
    "functools": frozenset({"partial"}),
    "operator": frozenset({"attrgetter", "itemgetter", "methodcaller"}),
    # the network
    "socket": _ALL, "ssl": _ALL, "webbrowser": _ALL, "httplib": _ALL, "http.client": _ALL, "requests": _ALL,
    "urllib": _ALL, "urllib2": _ALL, "aiohttp": _ALL, "asyncio": _ALL, "ftplib": _ALL, "smtplib": _ALL,
    "telnetlib": _ALL, "xmlrpc": _ALL,
}

_SAFE_EXTRA = frozenset({
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
})


def _safe() -> frozenset[str]:
    from ckptctl.formats.pickles import UNDERSTOOD

    return UNDERSTOOD | _SAFE_EXTRA


def classify(global_name: str) -> str:
    """'safe' | 'unknown' | 'dangerous' for a 'module.name' global."""
    from ckptctl.formats.pickles import UNRESOLVED

    if UNRESOLVED in global_name:
        return "dangerous"  # a STACK_GLOBAL built from something other than plain strings: evasion
    if global_name in _safe():
        return "safe"
    # 'module.name' is ambiguous (both may hold dots): try every split
    parts = global_name.split(".")
    for i in range(1, len(parts) + 1):
        module = ".".join(parts[:i])
        rule = DANGEROUS.get(module)
        if rule is None:
            continue
        if rule == _ALL:
            return "dangerous"
        name = ".".join(parts[i:])
        if name in rule or name.split(".", 1)[0] in rule:
            return "dangerous"
    return "unknown"


VERDICT_ORDER = {"dangerous": 3, "error": 2, "unknown": 1, "safe": 0}


@dataclass
class ScanResult:
    path: str
    format: str | None = None
    pickle: bool = True
    globals: list[tuple[str, str]] = field(default_factory=list)  # (name, class)
    error: str | None = None  # the file, or part of it, could not be read
    note: str | None = None

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
            "globals": [{"name": n, "class": c} for n, c in self.globals],
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
SCAN_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".h5", ".hdf5", ".pkl", ".pickle", ".joblib",
                 ".zip", ".npz", ".keras", ".gguf")


def scan_file(path: str | os.PathLike) -> ScanResult:
    """Scan one file or checkpoint folder. Never raises for what is inside the file."""
    from ckptctl.formats import open_reader, resolve
    from ckptctl.formats.pickles import PickleError

    p = os.fspath(path)
    res = ScanResult(p)
    try:
        fmt, target = resolve(path)
    except UnknownFormat as e:
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
            res.note = (f"a TorchScript archive: torch.jit.load compiles its code ({n} file(s) in code/) "
                        "and runs it when the model is used; ckptctl read its weights without running any")
    except PickleError as e:
        more = _raw_globals(fmt, target) if fmt == "torchscript" else []  # its other pickles
        res.globals = _classified(e.globals + e.more_globals + more)
        res.error = e.message
    except CkptError as e:  # the pickles may be fine and the damage elsewhere: list them anyway
        res.globals = _classified(getattr(e, "globals", None) or _raw_globals(fmt, target))
        res.error = e.message
    return res


def _scan_no_pickle(res: ScanResult, target: Path, note: str) -> ScanResult:
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


def _raw_globals(fmt: str, target: Path) -> list[str]:
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
    if head == b"PK\x03\x04":
        from ckptctl.formats.torch_zip import scan_zip_pickles

        names, errors = scan_zip_pickles(p)
        res.format = "zip"
        res.globals = _classified(names)
        res.note = e.message
        if not names:
            res.pickle = False
        if errors:
            res.error = "; ".join(errors[:3])
        return res
    res.pickle = False
    res.error = e.message
    return res


def _scan_sharded(p: str, res: ScanResult, index: Path) -> ScanResult:
    from ckptctl.formats import open_reader

    try:
        with open_reader(index) as reader:
            files = [f for f in reader.info().files if os.fspath(f) != os.fspath(index)]
    except CkptError as e:
        res.error = e.message
        return res
    pickled = False
    errors: list[str] = []
    names: list[str] = []
    for f in files:
        sub = scan_file(f)
        pickled = pickled or sub.pickle
        names += [n for n, _ in sub.globals]
        if sub.error:
            errors.append(f"{os.path.basename(f)}: {sub.error}")
    res.pickle = pickled
    res.globals = _classified(names)
    if errors:
        res.error = "; ".join(errors)
    return res


def _scan_keras(res: ScanResult, fmt: str, target: Path) -> ScanResult:
    """A Keras archive or weights set holds no pickle; a .keras config may hold Lambda bytecode."""
    res.pickle = False
    res.note = ("no pickle: a zip of JSON config and HDF5 weights" if fmt == "keras"
                else "no pickle: a JSON index and HDF5 weight shards")
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
    return head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04"


def _is_orbax(p: Path) -> bool:
    from ckptctl.formats.orbax import is_orbax_dir

    return not p.is_symlink() and is_orbax_dir(p)


def expand(paths: list[str | os.PathLike]) -> Iterator[tuple[Path, bool]]:
    """(path, named) for each thing to scan: named files as given, folders walked for checkpoints.

    A DCP folder (with .metadata) is one checkpoint; its .distcp files are not listed again.
    """
    for raw in paths:
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


def scan(paths: list[str | os.PathLike]) -> list[ScanResult]:
    return [scan_file(p) for p, _named in expand(paths)]
