"""Which globals can run code: the security classification of what a pickle asks for.

`classify('module.name')` is 'dangerous' for the union of what picklescan (`_unsafe_globals`) and
modelscan (`unsafe_globals`, CRITICAL and HIGH) flag, plus a few more ways to reach code, files,
processes or the network; 'safe' for the globals ckptctl's restricted unpickler understands
(torch rebuild functions, storages, dtypes, OrderedDict, numpy arrays, DCP metadata classes,
pathlib paths); 'unknown' for everything else (argparse.Namespace, a training library's classes):
those cannot be listed as safe, but nothing says they run code either.

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

from ckptctl import dtypes
from ckptctl.formats.pickles.listing import UNRESOLVED
from ckptctl.formats.pickles.semantics import HANDLERS

# Globals ckptctl understands (scan calls them safe): the rebuild tables' globals, storages, dtypes, and
# the plain-data classes of torch.distributed.checkpoint's .metadata.
UNDERSTOOD: frozenset[str] = frozenset(
    set(HANDLERS)
    | {f"torch.{d.storage}" for d in dtypes.BY_NAME.values() if d.storage}
    | {f"torch.cuda.{d.storage}" for d in dtypes.BY_NAME.values() if d.storage}
    | {f"torch.{name}" for name in dtypes.BY_NAME}
    | {
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.storage._LegacyStorage",
        "torch.per_tensor_affine",
        "torch.per_channel_affine",
        "torch.per_channel_affine_float_qparams",
        "torch.per_tensor_symmetric",
        "torch.per_channel_symmetric",
        "torch.strided",
        "torch.sparse_coo",
        "torch.sparse_csr",
        "torch.sparse_csc",
        "torch.sparse_bsr",
        "torch.sparse_bsc",
        "torch._mkldnn",
        "torch.contiguous_format",
        "torch.channels_last",
        "torch.channels_last_3d",
        "torch.preserve_format",
        "torch.device",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "torch.serialization._get_layout",
        "torch.distributed.checkpoint.metadata.Metadata",
        "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
        "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
        "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
        "torch.distributed.checkpoint.metadata.TensorProperties",
        "torch.distributed.checkpoint.metadata.MetadataIndex",
        "torch.distributed.checkpoint.metadata.StorageMeta",
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.distributed.checkpoint.filesystem._StoragePrefix",
    }
)

# module -> "*" (everything in it and in its submodules) or the names in it that are dangerous
_ALL = "*"
_BUILTINS = {
    "eval",
    "exec",
    "execfile",
    "compile",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "open",
    "apply",
    "breakpoint",
    "globals",
    "locals",
    "vars",
    "input",
    "raw_input",
    "reload",
    "file",
    "help",
    "exit",
    "quit",
}
DANGEROUS: dict[str, str | frozenset[str]] = {
    "builtins": frozenset(_BUILTINS),
    "__builtin__": frozenset(_BUILTINS),
    # processes, the OS and the interpreter
    "os": _ALL,
    "posix": _ALL,
    "nt": _ALL,
    "subprocess": _ALL,
    "sys": _ALL,
    "pty": _ALL,
    "commands": _ALL,
    "runpy": _ALL,
    "shutil": _ALL,
    "multiprocessing": _ALL,
    "ctypes": _ALL,
    "_ctypes": _ALL,
    "importlib": _ALL,
    "imp": _ALL,
    "marshal": _ALL,
    "code": _ALL,
    "codeop": _ALL,
    "types": frozenset({"FunctionType", "CodeType", "LambdaType", "MethodType", "ModuleType"}),
    "platform": frozenset({"popen"}),
    "io": frozenset({"open", "open_code", "FileIO"}),
    "_io": frozenset({"open", "open_code", "FileIO"}),
    # other pickles / code loaders
    "pickle": _ALL,
    "_pickle": _ALL,
    "cPickle": _ALL,
    "dill": _ALL,
    "cloudpickle": _ALL,
    "joblib": frozenset({"load"}),
    "numpy": frozenset({"load"}),
    "numpy.testing._private.utils": _ALL,
    "numpy.f2py": _ALL,
    "torch": frozenset({"load"}),
    "torch.serialization": frozenset({"load"}),
    "torch.hub": _ALL,
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
    "bdb": _ALL,
    "pdb": _ALL,
    "timeit": _ALL,
    "trace": _ALL,
    "pydoc": _ALL,
    "pip": _ALL,
    "venv": _ALL,
    "ensurepip": _ALL,
    "idlelib": _ALL,
    "lib2to3": _ALL,
    "distutils.file_util": _ALL,
    "cProfile": frozenset({"run", "runctx"}),
    "profile": frozenset({"run", "runctx", "Profile.run", "Profile.runctx"}),
    "doctest": frozenset({"debug_script"}),
    "pandas": frozenset({"read_pickle"}),
    "pandas.io.pickle": _ALL,
    "numpy.lib.npyio": frozenset({"load"}),
    "numpy.lib._npyio_impl": frozenset({"load"}),
    "torch.jit._serialization": frozenset({"load"}),
    "yaml": frozenset({"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}),
    "cloudpickle.cloudpickle": frozenset(
        {
            "_builtin_type",
            "_make_function",
            "_function_setstate",
            "_make_cell",
            "_make_empty_cell",
            "subimport",
            "_make_skeleton_class",
        }
    ),
    "pkgutil": frozenset({"resolve_name", "get_loader", "find_loader", "get_importer"}),
    "zipimport": _ALL,
    "_imp": _ALL,
    "_posixsubprocess": _ALL,
    "_osx_support": _ALL,
    "_aix_support": _ALL,
    "_pyrepl": _ALL,
    "uuid": frozenset({"_get_command_stdout", "_popen"}),
    "imaplib": frozenset({"IMAP4_stream"}),
    "logging": frozenset({"FileHandler"}),
    "logging.config": _ALL,
    "test": _ALL,
    "tempfile": _ALL,
    "_thread": frozenset({"start_new_thread", "start_new", "start_joinable_thread"}),
    "threading": frozenset({"Thread", "Timer"}),
    "signal": _ALL,
    # call builders that turn data into calls
    "functools": frozenset({"partial", "partialmethod", "reduce"}),
    "_functools": frozenset({"partial", "reduce"}),
    "operator": frozenset({"attrgetter", "itemgetter", "methodcaller", "call"}),
    "_operator": frozenset({"attrgetter", "itemgetter", "methodcaller", "call"}),
    # the network
    "socket": _ALL,
    "ssl": _ALL,
    "webbrowser": _ALL,
    "httplib": _ALL,
    "http.client": _ALL,
    "requests": _ALL,
    "urllib": _ALL,
    "urllib2": _ALL,
    "aiohttp": _ALL,
    "asyncio": _ALL,
    "ftplib": _ALL,
    "smtplib": _ALL,
    "telnetlib": _ALL,
    "xmlrpc": _ALL,
}

_SAFE_EXTRA = frozenset(
    {
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.Path",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
    }
)


def _safe() -> frozenset[str]:
    return UNDERSTOOD | _SAFE_EXTRA


def classify(global_name: str) -> str:

    if UNRESOLVED in global_name:
        return "dangerous"  # a STACK_GLOBAL built from something other than plain strings: evasion
    if global_name in _safe():
        return "safe"
    parts = global_name.split(".")
    if _listed(parts):
        return "dangerous"
    # attributes reached through an object's internals (builtins.eval.__call__, os.system.__self__,
    # Class.__init__.__globals__): pickle resolves dotted names attribute by attribute
    if any(_dunder(x) and x not in _PLAIN_DUNDERS for x in parts[1:]):
        return "dangerous"
    # `pkg.mod.os.system`: an attribute of a module that pkg.mod imported (pickle follows dotted
    # names); the module split is unknown here, so only unmistakable module names count
    for i in range(1, len(parts) - 1):
        if parts[i] in _REEXPORTED and _listed(parts[i:]):
            return "dangerous"
    return "unknown"


def classify_pair(module: str, name: str) -> str:
    """classify() of a global asked for as (module, name). A dotted name is an attribute chain
    that pickle (protocol 4+) follows from the module: `torch.serialization` + `os.system` is
    os.system, reached through the module torch.serialization imported. Every tail of the chain
    is classified too."""
    cls = classify(f"{module}.{name}" if module else name)
    if cls == "dangerous" or "." not in name:
        return cls
    chain = name.split(".")
    for i in range(len(chain)):
        if _listed(chain[i:]) or chain[i] in _BUILTINS:
            return "dangerous"
    return cls


def _listed(parts: list[str]) -> bool:
    """'module.name' split on dots is in DANGEROUS (the module part may hold dots: try every split)."""
    for i in range(1, len(parts) + 1):
        module = ".".join(parts[:i])
        rule = DANGEROUS.get(module)
        if rule is None:
            continue
        if rule == _ALL:
            return True
        name = ".".join(parts[i:])
        if name in rule or name.split(".", 1)[0] in rule:
            return True
    return False


def _dunder(x: str) -> bool:
    return len(x) > 4 and x.startswith("__") and x.endswith("__")


_REEXPORTED = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "builtins",
        "__builtin__",
        "pty",
        "runpy",
        "importlib",
        "socket",
        "shutil",
        "ctypes",
        "marshal",
        "webbrowser",
    }
)
# dunder names that are module names or plain pickle helpers, not an object's internals
_PLAIN_DUNDERS = frozenset({"__main__", "__torch__", "__builtin__", "__mp_main__", "__newobj__", "__newobj_ex__"})
