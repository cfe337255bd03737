"""The restricted unpickler: reads any pickle without importing or calling anything from it.

`Machine` is a pickle virtual machine written in Python. It implements every opcode of
protocols 0-5, but where `pickle` would import a global and call it, it builds inert records:

- `Global(module, name)` for every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT the pickle asks for
  (all of them are recorded in order in `Machine.globals`, even when the pickle later fails);
- `TensorRecord` for torch's rebuild functions (`_rebuild_tensor_v2/_v3`, parameters, quantized,
  `_rebuild_from_type_v2`, ...), with the storage reference that `persistent_load` resolved;
- `NumpyArray` / `NumpyScalar` for numpy's `_reconstruct` + BUILD and `scalar`;
- real dicts (`ODict` for OrderedDict), lists, tuples, sets, bytes for the containers we understand;
- `Opaque(type, args, state, ...)` for everything else (argparse.Namespace, pathlib paths,
  TrainingArguments, `os.system`'s "result", ...).

Nothing here can run code from the file: no object from the pickle is ever called, hashed deeply,
compared or printed with its own methods. Large binary payloads (> INLINE_MAX) are not read into
memory when the pickle comes from a file: they become a `Span(offset, length)` instead (numpy
arrays inside a pickle are then read like any other tensor). Errors of any kind become
`CorruptFile` carrying the globals seen so far (`err.globals`).

`describe()` walks the unpickled object: tensors with their '/'-joined names, tied weights,
opaque objects, file-level metadata (`epoch`, `global_step`, `hyper_parameters`, ...) and the
checkpoint kind (lightning, state_dict, training, hf-optimizer, hf-rng-state, module, optimizer,
torchscript). A pickled nn.Module (any object whose state holds `_parameters`, `_buffers` and
`_modules`, whatever its class), a TorchScript module tree and a pickled optimizer are named as
their own `state_dict()` would name them (`raw_names=True`: as the pickle holds them).

The package: records.py (the inert records), buffer.py (reading the bytes), machine.py (the opcode
loop and the global recorder), loads.py (running it over one pickle or pickles back to back), semantics.py (what calls and BUILD mean), rebuild_torch.py /
rebuild_numpy.py / rebuild_builtins.py (the vocabularies), listing.py (an opcode-only listing for
pickles that fail), safety.py (which globals can run code), walk.py (describe, render) and
modules.py (nn.Module and TorchScript views).
"""

from __future__ import annotations

from ckptctl.formats.pickles.buffer import FIRST_WINDOW, WINDOW
from ckptctl.formats.pickles.listing import (
    UNRESOLVED,
    opcode_global_pairs,
    opcode_globals,
)
from ckptctl.formats.pickles.loads import scan_globals, unpickle_bytes
from ckptctl.formats.pickles.machine import (
    INLINE_MAX,
    LENIENT_MAX,
    MAX_STRING,
    Machine,
)
from ckptctl.formats.pickles.modules import (
    MAX_MODULES,
    TSClass,
    is_module,
    is_optimizer,
    torchscript_decls,
    wrapper_hint,
)
from ckptctl.formats.pickles.records import (
    TENSORISH,
    Global,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    ODict,
    Opaque,
    PersistentRef,
    PickleError,
    Span,
    StorageRef,
    TensorRecord,
    numpy_torch_dtype,
)
from ckptctl.formats.pickles.safety import UNDERSTOOD, classify, classify_pair
from ckptctl.formats.pickles.semantics import (
    MAX_KEY_DEPTH,
    NESTED_LOADERS,
    nested_payload,
)
from ckptctl.formats.pickles.walk import (
    MAX_OBJECTS,
    MAX_WALK_DEPTH,
    MAX_WALK_NODES,
    Described,
    describe,
    render,
)

__all__ = [
    "FIRST_WINDOW",
    "INLINE_MAX",
    "LENIENT_MAX",
    "MAX_KEY_DEPTH",
    "MAX_MODULES",
    "MAX_OBJECTS",
    "MAX_STRING",
    "MAX_WALK_DEPTH",
    "MAX_WALK_NODES",
    "NESTED_LOADERS",
    "TENSORISH",
    "UNDERSTOOD",
    "UNRESOLVED",
    "WINDOW",
    "Described",
    "Global",
    "Machine",
    "NumpyArray",
    "NumpyDtype",
    "NumpyScalar",
    "ODict",
    "Opaque",
    "PersistentRef",
    "PickleError",
    "Span",
    "StorageRef",
    "TSClass",
    "TensorRecord",
    "classify",
    "classify_pair",
    "describe",
    "is_module",
    "is_optimizer",
    "nested_payload",
    "numpy_torch_dtype",
    "opcode_global_pairs",
    "opcode_globals",
    "render",
    "scan_globals",
    "torchscript_decls",
    "unpickle_bytes",
    "wrapper_hint",
]
