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
"""

from __future__ import annotations

import codecs
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, UnsafeFile

INLINE_MAX = 1 << 20  # binary payloads larger than this stay in the file (Span)
MAX_STRING = 256 << 20  # a single text string larger than this is refused
WINDOW = 1 << 20  # bytes read from the file at a time (at most)
FIRST_WINDOW = 64 << 10  # the first read of a pickle (legacy files have data right after theirs)
MAX_KEY_DEPTH = 100  # nesting of tuples used as dict keys / set items (C hashing recurses)
MAX_WALK_DEPTH = 400  # nesting of containers that describe() follows
MAX_WALK_NODES = 5_000_000  # objects describe() visits (shared references can explode)
MAX_OBJECTS = 500  # opaque objects listed in CheckpointInfo.objects
LENIENT_MAX = 64 << 20  # bytes of a failed pickle that the opcode listing looks at


class PickleError(CorruptFile):
    """A pickle that does not hold together; `.globals` lists what it asked for before that.

    `.more_globals` lists names that a plain opcode listing (picklescan's way: no semantics)
    finds in the rest of the failing pickle: a loader more lenient than ours could reach them.
    """

    def __init__(self, message: str, path=None, globals: list[str] | None = None, pos: int | None = None,
                 more_globals: list[str] | None = None):
        super().__init__(message, path)
        self.globals = list(globals or [])
        self.pos = pos
        self.more_globals = list(more_globals or [])
        self.more_pairs: list[tuple[str, str]] = []  # more_globals as (module, name)


# ---- inert records ---------------------------------------------------------------------------
class Global:
    """A global the pickle asked for. Never imported; identity-hashed."""

    __slots__ = ("module", "name", "full")

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name
        self.full = f"{module}.{name}" if module else name


class Opaque:
    """An object of a class we do not import: its type name and whatever the pickle gave it."""

    __slots__ = ("type", "args", "kwargs", "state", "items", "dictitems", "__weakref__")

    def __init__(self, type_: str, args: tuple = (), kwargs: dict | None = None):
        self.type = type_
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: list | None = None
        self.dictitems: list | None = None

    def fields(self) -> dict:
        """The object's attributes: BUILD state dict (or the dict part of (dict, slots))."""
        out: dict = {}
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
            for part in st:
                if isinstance(part, dict):
                    out.update(part)
        elif isinstance(st, dict):
            out.update(st)
        if self.kwargs:
            for k, v in self.kwargs.items():
                out.setdefault(k, v)
        return out


class ODict(dict):
    """collections.OrderedDict (and defaultdict): a dict that also keeps its BUILD state."""

    pickle_state: Any = None
    pickle_type: str = "collections.OrderedDict"


@dataclass(frozen=True, eq=False)
class Span:
    """Bytes that stay in the file: `length` bytes at absolute `offset`."""

    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(eq=False)
class StorageRef:
    """A storage a persistent id names. `dtype` is the storage's element type; `numel` counts those."""

    key: str
    dtype: str
    numel: int
    location: str = ""
    view_offset: int = 0  # legacy storage views: element offset into the root storage
    view_numel: int | None = None
    extra: Any = None  # reader-private (where the bytes are)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.BY_NAME[self.dtype].itemsize


@dataclass(eq=False)
class TensorRecord:
    storage: StorageRef | None  # None: a tensor without data (meta / unknown storage)
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    qparams: Any = None
    note: str | None = None  # why it has no data


@dataclass(eq=False)
class NumpyDtype:
    code: str  # 'f4', 'i8', 'b1', 'V16', 'O8', ...
    byteorder: str = "="

    @property
    def kind(self) -> str:
        return self.code[:1]


@dataclass(eq=False)
class NumpyArray:
    shape: tuple[int, ...] = ()
    dtype: NumpyDtype | None = None
    fortran: bool = False
    data: Any = None  # bytes | Span | list (object arrays) | None before BUILD


@dataclass(eq=False)
class NumpyScalar:
    dtype: NumpyDtype | None
    data: bytes | None

    def value(self) -> Any:
        return _numpy_scalar_value(self.dtype, self.data)


class PersistentRef:
    """A persistent id nobody resolved (a plain pickle that refers to outside data)."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any):
        self.pid = pid


_NUMPY_CODES = {
    "b1": "bool", "i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32",
    "u4": "uint32", "i8": "int64", "u8": "uint64", "f2": "float16", "f4": "float32",
    "f8": "float64", "c8": "complex64", "c16": "complex128",
}
_NUMPY_NAMES = {
    "bool": "b1", "bool_": "b1", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8", "float16": "f2",
    "float32": "f4", "float64": "f8", "complex64": "c8", "complex128": "c16",
    "half": "f2", "single": "f4", "double": "f8", "float": "f8", "int": "i8",
}
_STRUCT = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q",
           "u8": "Q", "f2": "e", "f4": "f", "f8": "d"}


def numpy_torch_dtype(dt: NumpyDtype | None) -> str | None:
    """torch dtype name of a numpy dtype code, or None (strings, objects, records)."""
    if dt is None:
        return None
    return _NUMPY_CODES.get(dt.code)


def _numpy_scalar_value(dt: NumpyDtype | None, data: Any) -> Any:
    if dt is None or not isinstance(data, (bytes, bytearray)):
        return None
    code = dt.code
    bo = ">" if dt.byteorder == ">" else "<"
    try:
        if code in _STRUCT:
            v = struct.unpack(bo + _STRUCT[code], bytes(data))[0]
            return v
        if code in ("c8", "c16"):
            f = "f" if code == "c8" else "d"
            re_, im = struct.unpack(bo + f + f, bytes(data))
            return complex(re_, im)
    except struct.error:
        return None
    return None


# ---- the machine -----------------------------------------------------------------------------
class no_gc:
    """Pause the cyclic garbage collector while building many objects (it rescans them all)."""

    def __enter__(self):
        import gc

        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        import gc

        if self._was:
            gc.enable()


_ENCODINGS = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf8", "utf-8", "ascii", "us-ascii"}


class _NeedBytes(Exception):
    pass


class Machine:
    """One pickle from a byte buffer or a file region, without running anything.

    `persistent_load(pid) -> object` resolves BINPERSID/PERSID (torch storages); without it
    persistent ids become `PersistentRef`. `source` is bytes (a whole member already in memory)
    or a readable binary file object positioned anywhere: `start`/`end` give the absolute region.
    """

    def __init__(
        self,
        source: bytes | bytearray | memoryview | Any,
        *,
        start: int = 0,
        end: int | None = None,
        persistent_load=None,
        encoding: str = "latin1",
        path=None,
        preload: bytes = b"",
        lenient: bool = True,
    ):
        self.path = path
        self.lenient = lenient  # on failure, list the rest's globals by opcodes (reads up to LENIENT_MAX)
        self.persistent_load = persistent_load
        self.encoding = encoding
        self.globals: list[str] = []
        self.pairs: list[tuple[str, str]] = []  # (module, name) of every global, as asked for
        # pickles the file carries as data and hands to a loader (pickle.loads(b'...'),
        # torch.storage._load_from_bytes, an object-dtype numpy payload): (who, payload) with
        # payload bytes | Span | None (built at load time: not a constant). `scan` walks them.
        self.nested: list[tuple[str, Any]] = []
        self._globals_seen: dict[tuple[str, str], Global] = {}
        self.warnings: list[str] = []
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._file = None
            buf = bytes(source)
            self._data = buf[start:end] if (start or end is not None) else buf
            self._base = start
            self._end = start + len(self._data)
        else:
            self._file = source
            self._data = bytes(preload)  # bytes of the file from `start` on, already read
            self._base = start
            if end is None:
                source.seek(0, os.SEEK_END)
                end = source.tell()
            self._end = end
        self.pos = start  # absolute position of the next unread byte
        self._start = start
        self._window = FIRST_WINDOW
        self.protocol = 0

    # -- buffer management ---------------------------------------------------------------------
    def _fill(self, data: bytes, pos: int, need: int) -> tuple[bytes, int]:
        """Make data[pos:pos+need] available (reading more of the file); returns (data, pos)."""
        if self._file is None:
            raise _NeedBytes
        abs_pos = self._base + pos
        have = data[pos:]
        want = max(need - len(have), self._window)
        self._window = min(self._window * 2, WINDOW)
        avail = self._end - (abs_pos + len(have))
        want = min(want, avail)
        if want > 0:
            self._file.seek(abs_pos + len(have))
            more = self._file.read(want)
            have = have + more
        self._base = abs_pos
        if len(have) < need:
            self._data = have
            raise _NeedBytes
        return have, 0

    def _fill_soft(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """Read ahead as far as the region allows (at most WINDOW bytes more)."""
        abs_pos = self._base + pos
        have = data[pos:]
        want = min(self._window, self._end - (abs_pos + len(have)))
        self._window = min(self._window * 2, WINDOW)  # start small: the pickle may end soon
        if want <= 0:
            return data, pos
        self._file.seek(abs_pos + len(have))
        more = self._file.read(want)
        self._base = abs_pos
        return have + more, 0

    def _skip(self, data: bytes, pos: int, n: int) -> tuple[bytes, int]:
        """Skip n bytes that stay in the file."""
        if pos + n <= len(data):
            return data, pos + n
        abs_target = self._base + pos + n
        if abs_target > self._end:
            self._base += pos
            raise _NeedBytes
        self._base = abs_target
        return b"", 0

    # -- records -------------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> Global:
        key = (module, name)
        g = self._globals_seen.get(key)
        if g is None:
            g = Global(module, name)
            self._globals_seen[key] = g
        self.globals.append(g.full)
        self.pairs.append(key)
        return g

    def _fail(self, msg: str, pos: int | None = None):
        where = f" at byte {pos}" if pos is not None else ""
        raise PickleError(f"malformed pickle{where}: {msg}", self.path, self.globals, pos)

    def _lenient(self) -> list[tuple[str, str]]:
        """Globals a plain opcode listing finds in this pickle (after a failure), not seen yet."""
        try:
            if self._file is None:
                raw = self._data
            else:
                self._file.seek(self._start)
                raw = self._file.read(min(self._end - self._start, LENIENT_MAX))
            found = opcode_global_pairs(raw)
        except Exception:  # noqa: BLE001 - best effort on a pickle already known to be bad
            return []
        seen = set(self.pairs)
        return [g for g in dict.fromkeys(found) if g not in seen]

    # -- the loop ------------------------------------------------------------------------------
    def load(self) -> Any:
        """Run until STOP; returns the object. Raises PickleError (a CorruptFile)."""
        try:
            with no_gc():
                return self._load()
        except PickleError as e:
            if not e.more_globals and self.lenient:
                e.more_pairs = self._lenient()
                e.more_globals = [f"{a}.{b}" for a, b in e.more_pairs]
            raise

    def _load(self) -> Any:
        try:
            return self._run()
        except PickleError:
            raise
        except UnsafeFile as e:
            err = PickleError(e.message, self.path, self.globals)
            raise err from None
        except _NeedBytes:
            raise PickleError(
                f"pickle ends without a STOP (truncated at byte {self._end})", self.path, self.globals, self._end
            ) from None
        except RecursionError:
            raise PickleError("malformed pickle: objects nested too deeply", self.path, self.globals) from None
        except MemoryError:
            raise PickleError("malformed pickle: too large to list in memory", self.path, self.globals) from None
        except CorruptFile as e:
            raise PickleError(e.message, self.path, self.globals) from None
        except (IndexError, struct.error) as e:
            if "pop" in str(e) or "list index" in str(e):
                self._fail("stack underflow (an opcode needs more objects than the pickle pushed)")
            self._fail(f"an opcode's argument runs past the end ({e})")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, OverflowError, AttributeError,
                EOFError) as e:
            self._fail(f"{type(e).__name__}: {e}")

    def _run(self) -> Any:  # noqa: C901 - one opcode loop
        data = self._data
        pos = self.pos - self._base
        stack: list = []
        metastack: list = []
        memo: dict = {}
        append = stack.append
        unpack_from = struct.unpack_from
        n = len(data)
        while True:
            if pos + 16 > n:
                if self._file is not None:
                    data, pos = self._fill_soft(data, pos)
                    n = len(data)
                if pos >= n:
                    self._base += pos
                    raise _NeedBytes
            op = data[pos]
            pos += 1
            # ---- the frequent opcodes of torch pickles first
            if op == 0x71:  # BINPUT
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == 0x68:  # BINGET
                try:
                    append(memo[data[pos]])
                except KeyError:
                    self._fail(f"memo key {data[pos]} not found", self._base + pos)
                pos += 1
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x58 or op == 0x8C or op == 0x8D:  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                if op == 0x8C:
                    ln = data[pos]
                    pos += 1
                elif op == 0x58:
                    ln = unpack_from("<I", data, pos)[0]
                    pos += 4
                else:
                    ln = unpack_from("<Q", data, pos)[0]
                    pos += 8
                if ln > MAX_STRING:
                    self._fail(f"a text string of {ln} bytes", self._base + pos)
                if pos + ln > n:
                    data, pos = self._fill_or_fail(data, pos, ln)
                    n = len(data)
                append(str(data[pos : pos + ln], "utf-8", "surrogatepass"))
                pos += ln
            elif op == 0x4B:  # BININT1
                append(data[pos])
                pos += 1
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                append = stack.append
            elif op == 0x74:  # TUPLE
                items = stack
                if not metastack:
                    self._fail("TUPLE without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                append(tuple(items))
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x86:  # TUPLE2
                b = stack.pop()
                stack[-1] = (stack[-1], b)
            elif op == 0x87:  # TUPLE3
                c = stack.pop()
                b = stack.pop()
                stack[-1] = (stack[-1], b, c)
            elif op == 0x29:  # EMPTY_TUPLE
                append(())
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack[-1] = self._call(stack[-1], args)
            elif op == 0x89:  # NEWFALSE
                append(False)
            elif op == 0x88:  # NEWTRUE
                append(True)
            elif op == 0x4E:  # NONE
                append(None)
            elif op == 0x51:  # BINPERSID
                pid = stack.pop()
                append(self._persistent(pid))
            elif op == 0x75:  # SETITEMS
                items = stack
                if not metastack:
                    self._fail("SETITEMS without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                self._setitems(stack[-1], items)
            elif op == 0x7D:  # EMPTY_DICT
                append({})
            elif op == 0x5D:  # EMPTY_LIST
                append([])
            elif op == 0x4A:  # BININT
                append(unpack_from("<i", data, pos)[0])
                pos += 4
            elif op == 0x4D:  # BININT2
                append(unpack_from("<H", data, pos)[0])
                pos += 2
            elif op == 0x72:  # LONG_BINPUT
                memo[unpack_from("<I", data, pos)[0]] = stack[-1]
                pos += 4
            elif op == 0x6A:  # LONG_BINGET
                key = unpack_from("<I", data, pos)[0]
                pos += 4
                try:
                    append(memo[key])
                except KeyError:
                    self._fail(f"memo key {key} not found", self._base + pos)
            elif op == 0x63 or op == 0x69:  # GLOBAL, INST
                module, pos, data = self._readline(data, pos)
                name, pos, data = self._readline(data, pos)
                n = len(data)
                g = self._global(module.decode("utf-8", "surrogateescape"), name.decode("utf-8", "surrogateescape"))
                if op == 0x63:
                    append(g)
                else:
                    items = stack
                    if not metastack:
                        self._fail("INST without MARK", self._base + pos)
                    stack = metastack.pop()
                    append = stack.append
                    append(self._call(g, tuple(items)))
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                module = stack.pop()
                if type(name) is not str or type(module) is not str:
                    self._fail("STACK_GLOBAL needs two strings", self._base + pos - 1)
                append(self._global(module, name))
            elif op == 0x2E:  # STOP
                self.pos = self._base + pos
                self._data = data
                if not stack:
                    self._fail("empty stack at STOP", self._base + pos - 1)
                return stack.pop()
            elif op == 0x61:  # APPEND
                v = stack.pop()
                self._extend(stack[-1], [v])
            elif op == 0x65:  # APPENDS
                items = stack
                if not metastack:
                    self._fail("APPENDS without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                self._extend(stack[-1], items)
            elif op == 0x73:  # SETITEM
                v = stack.pop()
                k = stack.pop()
                self._setitems(stack[-1], [k, v])
            elif op == 0x62:  # BUILD
                state = stack.pop()
                self._build(stack[-1], state)
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                cls = stack.pop()
                append(self._new(cls, args, None))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = stack.pop()
                args = stack.pop()
                cls = stack.pop()
                append(self._new(cls, args, kwargs))
            elif op == 0x80:  # PROTO
                self.protocol = data[pos]
                pos += 1
                if self.protocol > 5:
                    self._fail(f"unsupported pickle protocol {self.protocol}", self._base + pos - 1)
            elif op == 0x95:  # FRAME
                pos += 8
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                elif metastack:
                    stack = metastack.pop()
                    append = stack.append
                else:
                    self._fail("POP on an empty stack", self._base + pos - 1)
            elif op == 0x31:  # POP_MARK
                if not metastack:
                    self._fail("POP_MARK without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
            elif op == 0x32:  # DUP
                append(stack[-1])
            elif op == 0x70:  # PUT
                line, pos, data = self._readline(data, pos)
                n = len(data)
                memo[int(line)] = stack[-1]
            elif op == 0x67:  # GET
                line, pos, data = self._readline(data, pos)
                n = len(data)
                try:
                    append(memo[int(line)])
                except KeyError:
                    self._fail(f"memo key {int(line)} not found", self._base + pos)
            elif op == 0x42 or op == 0x43 or op == 0x8E or op == 0x96 or op == 0x54 or op == 0x55:
                # BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8, BINSTRING, SHORT_BINSTRING
                if op == 0x43 or op == 0x55:
                    ln = data[pos]
                    pos += 1
                elif op == 0x42:
                    ln = unpack_from("<I", data, pos)[0]
                    pos += 4
                elif op == 0x54:
                    ln = unpack_from("<i", data, pos)[0]
                    pos += 4
                    if ln < 0:
                        self._fail("BINSTRING with a negative length", self._base + pos)
                else:
                    ln = unpack_from("<Q", data, pos)[0]
                    pos += 8
                if ln > INLINE_MAX and self._file is not None:
                    abs_off = self._base + pos
                    if abs_off + ln > self._end:
                        self._fail(f"a {ln}-byte string runs past the end", abs_off)
                    data, pos = self._skip(data, pos, ln)
                    n = len(data)
                    append(Span(abs_off, ln))
                else:
                    if pos + ln > n:
                        data, pos = self._fill_or_fail(data, pos, ln)
                        n = len(data)
                    raw = data[pos : pos + ln]
                    pos += ln
                    if op == 0x54 or op == 0x55:
                        append(self._decode_str(raw))
                    elif op == 0x96:
                        append(bytearray(raw))
                    else:
                        append(raw)
            elif op == 0x49:  # INT
                line, pos, data = self._readline(data, pos)
                n = len(data)
                if line == b"01":
                    append(True)
                elif line == b"00":
                    append(False)
                else:
                    append(int(line))
            elif op == 0x4C:  # LONG
                line, pos, data = self._readline(data, pos)
                n = len(data)
                if line.endswith(b"L"):
                    line = line[:-1]
                append(int(line))
            elif op == 0x8A:  # LONG1
                ln = data[pos]
                pos += 1
                if pos + ln > n:
                    data, pos = self._fill_or_fail(data, pos, ln)
                    n = len(data)
                append(int.from_bytes(data[pos : pos + ln], "little", signed=True))
                pos += ln
            elif op == 0x8B:  # LONG4
                ln = unpack_from("<i", data, pos)[0]
                pos += 4
                if ln < 0 or ln > 1 << 16:
                    self._fail(f"LONG4 of {ln} bytes", self._base + pos)
                if pos + ln > n:
                    data, pos = self._fill_or_fail(data, pos, ln)
                    n = len(data)
                append(int.from_bytes(data[pos : pos + ln], "little", signed=True))
                pos += ln
            elif op == 0x46:  # FLOAT
                line, pos, data = self._readline(data, pos)
                n = len(data)
                append(float(line))
            elif op == 0x47:  # BINFLOAT
                append(unpack_from(">d", data, pos)[0])
                pos += 8
            elif op == 0x53:  # STRING
                line, pos, data = self._readline(data, pos)
                n = len(data)
                if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
                    line = line[1:-1]
                else:
                    self._fail("STRING opcode argument must be quoted", self._base + pos)
                append(self._decode_str(_escape_decode(line)))
            elif op == 0x56:  # UNICODE
                line, pos, data = self._readline(data, pos)
                n = len(data)
                append(str(line, "raw-unicode-escape"))
            elif op == 0x6C:  # LIST
                items = stack
                if not metastack:
                    self._fail("LIST without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                append(items)
            elif op == 0x64:  # DICT
                items = stack
                if not metastack:
                    self._fail("DICT without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                d: dict = {}
                self._setitems(d, items)
                append(d)
            elif op == 0x6F:  # OBJ
                items = stack
                if not metastack:
                    self._fail("OBJ without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                if not items:
                    self._fail("OBJ without a class", self._base + pos - 1)
                append(self._call(items[0], tuple(items[1:])))
            elif op == 0x50:  # PERSID
                line, pos, data = self._readline(data, pos)
                n = len(data)
                append(self._persistent(line.decode("ascii", "replace")))
            elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1, EXT2, EXT4
                if op == 0x82:
                    code = data[pos]
                    pos += 1
                elif op == 0x83:
                    code = unpack_from("<H", data, pos)[0]
                    pos += 2
                else:
                    code = unpack_from("<i", data, pos)[0]
                    pos += 4
                append(self._global("", f"<extension code {code}>"))
            elif op == 0x8F:  # EMPTY_SET
                append(set())
            elif op == 0x90:  # ADDITEMS
                items = stack
                if not metastack:
                    self._fail("ADDITEMS without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                target = stack[-1]
                if isinstance(target, set):
                    for it in items:
                        self._check_key(it)
                        target.add(it)
                elif isinstance(target, Opaque):
                    target.items = (target.items or []) + list(items)
                else:
                    self._fail("ADDITEMS on something that is not a set", self._base + pos - 1)
            elif op == 0x91:  # FROZENSET
                items = stack
                if not metastack:
                    self._fail("FROZENSET without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                for it in items:
                    self._check_key(it)
                append(frozenset(items))
            elif op == 0x97:  # NEXT_BUFFER
                self._fail("protocol-5 out-of-band buffer (the data is not in the file)", self._base + pos - 1)
            elif op == 0x98:  # READONLY_BUFFER
                pass
            else:
                self._fail(f"unknown opcode 0x{op:02x}", self._base + pos - 1)

    def leftover(self) -> bytes:
        """Bytes already read past this pickle's STOP (the next pickle's preload)."""
        return self._data[self.pos - self._base :] if self._file is not None else b""

    def _fill_or_fail(self, data: bytes, pos: int, ln: int) -> tuple[bytes, int]:
        try:
            return self._fill(data, pos, ln)
        except _NeedBytes:
            self._fail(f"a {ln}-byte string runs past the end", self._base + pos)
        raise AssertionError  # pragma: no cover

    def _readline(self, data: bytes, pos: int) -> tuple[bytes, int, bytes]:
        end = data.find(b"\n", pos)
        while end < 0:
            if self._file is None or self._base + len(data) >= self._end:
                self._fail("a text opcode without its newline", self._base + pos)
            have = len(data) - pos
            data, pos = self._fill(data, pos, have + 1)
            end = data.find(b"\n", pos)
            if have > 1 << 20 and end < 0:
                self._fail("a text opcode argument longer than 1 MiB", self._base + pos)
        line = data[pos:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line, end + 1, data

    def _decode_str(self, raw: bytes) -> str | bytes:
        if self.encoding == "bytes":
            return raw
        return raw.decode(self.encoding, "surrogateescape" if self.encoding.startswith("utf") else "strict")

    # -- semantics -----------------------------------------------------------------------------
    def _check_key(self, k: Any) -> None:
        """Only hash what cannot run away: flat-enough tuples of hashable records and scalars."""
        t = type(k)
        if t in (str, int, float, bool, bytes, type(None), complex):
            return
        if t is tuple or t is frozenset:
            _check_depth(k, 0, self)
            return
        if isinstance(k, (Global, Opaque, TensorRecord, StorageRef, NumpyArray, NumpyScalar,
                          NumpyDtype, Span, PersistentRef, slice)):
            return
        self._fail(f"unhashable {t.__name__} used as a dict key or set item")

    def _setitems(self, target: Any, items: list) -> None:
        if len(items) % 2:
            self._fail("SETITEMS with an odd number of items")
        if isinstance(target, dict):
            for i in range(0, len(items), 2):
                k = items[i]
                if type(k) is not str:
                    self._check_key(k)
                target[k] = items[i + 1]
        elif isinstance(target, Opaque):
            if target.dictitems is None:
                target.dictitems = []
            for i in range(0, len(items), 2):
                target.dictitems.append((items[i], items[i + 1]))
        else:
            self._fail(f"SETITEM on a {_kind(target)}")

    def _extend(self, target: Any, items: list) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Opaque):
            target.items = (target.items or []) + list(items)
        else:
            self._fail(f"APPEND on a {_kind(target)}")

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            return PersistentRef(pid)
        return self.persistent_load(pid)

    def _build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, Opaque):
            if isinstance(inst.state, dict) and isinstance(state, dict):
                inst.state.update(state)
            else:
                inst.state = state
        elif isinstance(inst, NumpyArray):
            _numpy_build(self, inst, state)
        elif isinstance(inst, NumpyDtype):
            if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
                inst.byteorder = state[1]
        elif isinstance(inst, ODict):
            inst.pickle_state = state
        elif isinstance(inst, (TensorRecord, NumpyScalar)):
            pass  # tensor subclasses' python attributes: nothing we show
        else:
            self._fail(f"BUILD on a {_kind(inst)}")

    def _call(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            self._fail(f"REDUCE with {_kind(args)} arguments")
        if isinstance(func, Global):
            if func.full in NESTED_LOADERS:
                self._nested(func.full, args, None)
            h = _HANDLERS.get(func.full)
            if h is not None:
                return h(self, func, args, None)
            return Opaque(func.full, args)
        if isinstance(func, Opaque):
            return Opaque(f"{func.type}(...)", args)
        self._fail(f"REDUCE calls a {_kind(func)}")

    def _nested(self, who: str, args: tuple, kwargs: Any) -> None:
        """A loader called on data of this pickle: remember the payload (a nested pickle)."""
        arg = args[0] if args else None
        if arg is None and isinstance(kwargs, dict):
            arg = next((v for k, v in kwargs.items() if k in ("data", "b", "f", "file", "str", "s")), None)
        if isinstance(arg, str) and not who.endswith(("loads", "_load_from_bytes")):
            arg = None  # torch.load('other.pt'): a file name, not data (the loader is flagged by name)
        self.nested.append((who, nested_payload(arg)))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if type(args) is not tuple:
            self._fail(f"NEWOBJ with {_kind(args)} arguments")
        if kwargs is not None and not isinstance(kwargs, dict):
            self._fail("NEWOBJ_EX with non-dict keyword arguments")
        if isinstance(cls, Global):
            if cls.full in NESTED_LOADERS:
                self._nested(cls.full, args, kwargs)
            h = _HANDLERS.get(cls.full)
            if h is not None:
                return h(self, cls, args, kwargs)
            return Opaque(cls.full, args, kwargs)
        if isinstance(cls, Opaque):
            return Opaque(cls.type, args, kwargs)
        self._fail(f"NEWOBJ on a {_kind(cls)}")


def _escape_decode(raw: bytes) -> bytes:
    """Python-2 string escapes; invalid ones ('\\o') pass through without a DeprecationWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return codecs.escape_decode(raw)[0]


def _kind(x: Any) -> str:
    if isinstance(x, Global):
        return f"global {x.full}"
    if isinstance(x, Opaque):
        return f"{x.type} object"
    return type(x).__name__


def _check_depth(k: Any, depth: int, m: Machine) -> None:
    if depth > MAX_KEY_DEPTH:
        m._fail("a dict key nested too deeply")
    for it in k:
        if type(it) is tuple or type(it) is frozenset:
            _check_depth(it, depth + 1, m)
        elif isinstance(it, (list, dict, set, bytearray)):
            m._fail(f"unhashable {type(it).__name__} inside a dict key")


# ---- handlers for the globals we understand --------------------------------------------------
def _ints(x: Any, what: str, m: Machine) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)):
        m._fail(f"{what} is a {_kind(x)}, not a tuple of ints")
    for v in x:
        if type(v) is not int or v < 0:
            m._fail(f"{what} holds {v!r:.40}, not a non-negative int")
    return tuple(x)


def _dtype_of_global(g: Any, m: Machine) -> str:
    if isinstance(g, Global) and g.module == "torch":
        if g.name in dtypes.BY_NAME:
            return g.name
        try:
            return dtypes.get(g.name).name
        except KeyError:
            pass
    if isinstance(g, str) and g.removeprefix("torch.") in dtypes.BY_NAME:
        return g.removeprefix("torch.")
    m._fail(f"unknown tensor dtype {getattr(g, 'full', g)!r:.60}")
    raise AssertionError  # pragma: no cover


def _tensor(m: Machine, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None, fn: str) -> TensorRecord:
    shape = _ints(size, f"{fn}: size", m)
    strides = _ints(stride, f"{fn}: stride", m)
    if len(shape) != len(strides):
        m._fail(f"{fn}: size {shape} and stride {strides} differ in length")
    if type(offset) is not int or offset < 0:
        m._fail(f"{fn}: storage offset {offset!r:.40}")
    note = None
    if isinstance(storage, StorageRef):
        sdt = storage.dtype
        if dtype is None:
            dtype = sdt
        dt = dtypes.BY_NAME[dtype]
        # the element range the view touches must lie inside the storage
        if math.prod(shape):
            last = offset + sum((s - 1) * st for s, st in zip(shape, strides))
            cap_bytes = (storage.view_numel if storage.view_numel is not None else storage.numel) * dtypes.BY_NAME[sdt].itemsize
            if (last + 1) * dt.itemsize > cap_bytes:
                m._fail(
                    f"tensor view (offset {offset}, size {list(shape)}, stride {list(strides)}) reaches past "
                    f"the end of storage {storage.key!r} ({cap_bytes} bytes)"
                )
    else:
        if dtype is None:
            dtype = "uint8"
            if isinstance(storage, (Global, Opaque)):
                dtype = _storage_dtype_name(storage) or "uint8"
        note = "no data in the file (the storage is not part of the checkpoint)"
        storage = None
    return TensorRecord(storage, offset, shape, strides, dtype, note=note)


def _storage_dtype_name(x: Any) -> str | None:
    name = x.name if isinstance(x, Global) else None
    if name and name in dtypes.BY_STORAGE:
        return dtypes.BY_STORAGE[name].name
    return None


def _h_rebuild_v2(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) < 4:
        m._fail(f"{g.full} with {len(a)} arguments")
    return _tensor(m, a[0], a[1], a[2], a[3], None, g.name)


def _h_rebuild_v3(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) < 7:
        m._fail(f"{g.full} with {len(a)} arguments")
    return _tensor(m, a[0], a[1], a[2], a[3], _dtype_of_global(a[6], m), g.name)


def _h_rebuild_qtensor(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) < 5:
        m._fail(f"{g.full} with {len(a)} arguments")
    t = _tensor(m, a[0], a[1], a[2], a[3], None, g.name)
    t.qparams = a[4]
    return t


def _h_first_tensor(m: Machine, g: Global, a: tuple, kw) -> Any:
    """_rebuild_parameter(data, ...), Parameter(data, ...), _rebuild_device_tensor_from_cpu_tensor."""
    if not a:
        if kw and "data" in kw:
            return kw["data"]
        return Opaque(g.full, a, kw)
    t = a[0]
    if isinstance(t, (TensorRecord, NumpyArray)):
        if g.name == "_rebuild_device_tensor_from_cpu_tensor" and len(a) > 1 and isinstance(t, TensorRecord):
            want = _dtype_of_global(a[1], m)
            if want != t.dtype:
                m.warnings.append(f"a tensor is cast from {t.dtype} to {want} when torch loads it; listed as stored ({t.dtype})")
        return t
    return Opaque(g.full, a, kw)


def _h_from_numpy(m: Machine, g: Global, a: tuple, kw) -> Any:
    return a[0] if a and isinstance(a[0], NumpyArray) else Opaque(g.full, a, kw)


def _h_meta(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) < 3:
        m._fail(f"{g.full} with {len(a)} arguments")
    dt = _dtype_of_global(a[0], m)
    shape = _ints(a[1], "size", m)
    stride = _ints(a[2], "stride", m)
    return TensorRecord(None, 0, shape, stride, dt, note="a 'meta' tensor: shape and dtype only")


_SPARSE_PARTS = {
    "torch.sparse_coo": ("indices", "values", "size", "is_coalesced"),
    "torch.sparse_csr": ("crow_indices", "col_indices", "values", "size"),
    "torch.sparse_bsr": ("crow_indices", "col_indices", "values", "size"),
    "torch.sparse_csc": ("ccol_indices", "row_indices", "values", "size"),
    "torch.sparse_bsc": ("ccol_indices", "row_indices", "values", "size"),
}


def _h_sparse(m: Machine, g: Global, a: tuple, kw) -> Any:
    """_rebuild_sparse_tensor(layout, data): an object whose parts (indices, values) are tensors."""
    layout = a[0] if a else None
    layout = layout.full if isinstance(layout, Global) else layout
    parts = _SPARSE_PARTS.get(layout) if isinstance(layout, str) else None
    if parts is None or len(a) < 2 or not isinstance(a[1], tuple):
        return Opaque(g.full, a)
    o = Opaque(f"{layout} tensor")
    o.state = dict(zip(parts, a[1]))
    return o


def _h_nested(m: Machine, g: Global, a: tuple, kw) -> Any:
    o = Opaque("torch.nested tensor")
    o.state = dict(zip(("buffer", "sizes", "strides", "storage_offsets"), a))
    return o


def _h_get_layout(m: Machine, g: Global, a: tuple, kw) -> Any:
    return a[0] if len(a) == 1 and isinstance(a[0], str) else Opaque(g.full, a)


def _h_from_type_v2(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) < 3:
        m._fail(f"{g.full} with {len(a)} arguments")
    func, _new_type, args = a[0], a[1], a[2]
    if type(args) is not tuple:
        m._fail(f"{g.full} with non-tuple arguments")
    result = m._call(func, args)
    if len(a) > 3 and isinstance(result, Opaque) and a[3] is not None:
        m._build(result, a[3])
    return result


def _h_ordered_dict(m: Machine, g: Global, a: tuple, kw) -> Any:
    d = ODict()
    d.pickle_type = g.full
    if g.name == "defaultdict":
        return d  # the first argument is the default factory (a global, classified on its own)
    if a:
        src = a[0]
        if isinstance(src, dict):
            for k, v in src.items():
                d[k] = v
        elif isinstance(src, (list, tuple)):
            for pair in src:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    m._fail(f"{g.full} built from a sequence that is not of pairs")
                m._check_key(pair[0])
                d[pair[0]] = pair[1]
        else:
            m._fail(f"{g.full} built from a {_kind(src)}")
    return d


def _h_size(m: Machine, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], (tuple, list)):
        return tuple(a[0])
    return ()


def _h_set(m: Machine, g: Global, a: tuple, kw) -> Any:
    if not a:
        return set() if g.name == "set" else frozenset()
    src = a[0]
    if not isinstance(src, (list, tuple, set, frozenset, dict, str, bytes)):
        m._fail(f"{g.full} of a {_kind(src)}")
    for it in src:
        m._check_key(it)
    return set(src) if g.name == "set" else frozenset(src)


def _h_slice(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) > 3 or any(x is not None and type(x) is not int for x in a):
        return Opaque(g.full, a)
    return slice(*a)


def _h_complex(m: Machine, g: Global, a: tuple, kw) -> Any:
    if len(a) <= 2 and all(type(x) in (int, float) for x in a):
        return complex(*a)
    return Opaque(g.full, a)


def _h_bytearray(m: Machine, g: Global, a: tuple, kw) -> Any:
    if not a:
        return bytearray()
    if isinstance(a[0], (bytes, bytearray)):
        return bytearray(a[0])
    if isinstance(a[0], str) and len(a) >= 2 and isinstance(a[1], str) and a[1].lower() in _ENCODINGS:
        return bytearray(a[0].encode(a[1]))
    if isinstance(a[0], list) and all(type(x) is int and 0 <= x < 256 for x in a[0]):
        return bytearray(a[0])
    return Opaque(g.full, a)


def _h_bytes(m: Machine, g: Global, a: tuple, kw) -> Any:
    """builtins.bytes(): protocols 0-2 pickle b'' as a call with no arguments."""
    if not a:
        return b""
    b = _h_bytearray(m, g, a, kw)
    return bytes(b) if isinstance(b, bytearray) else b


def _h_codecs_encode(m: Machine, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], str):
        enc = a[1] if len(a) > 1 else "utf-8"
        if isinstance(enc, str) and enc.lower() in _ENCODINGS:
            try:
                return a[0].encode(enc)
            except UnicodeEncodeError:
                m._fail(f"_codecs.encode: text does not fit {enc}")
    return Opaque(g.full, a)


def _h_object(m: Machine, g: Global, a: tuple, kw) -> Any:
    return Opaque(g.full, a, kw)


def _h_reconstructor(m: Machine, g: Global, a: tuple, kw) -> Any:
    """copyreg._reconstructor(cls, base, state): an instance of cls."""
    if len(a) >= 1:
        return m._new(a[0], (), None)
    return Opaque(g.full, a)


def _h_newobj(m: Machine, g: Global, a: tuple, kw) -> Any:
    """copyreg.__newobj__(cls, *args)."""
    if len(a) >= 1:
        return m._new(a[0], tuple(a[1:]), None)
    return Opaque(g.full, a)


def _h_jit_list(m: Machine, g: Global, a: tuple, kw) -> Any:
    """torch.jit._pickle.build_intlist / build_doublelist / ... (TorchScript pickles): the list."""
    return a[0] if len(a) == 1 and isinstance(a[0], list) else Opaque(g.full, a)


def _h_jit_type_tag(m: Machine, g: Global, a: tuple, kw) -> Any:
    """torch.jit._pickle.restore_type_tag(value, 'Dict[str, float]'): the value."""
    return a[0] if a else Opaque(g.full, a)


def _h_np_reconstruct(m: Machine, g: Global, a: tuple, kw) -> Any:
    return NumpyArray()


def _h_np_dtype(m: Machine, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], str):
        code = a[0]
        code = _NUMPY_NAMES.get(code, code)
        if code in ("?", "bool"):
            code = "b1"
        return NumpyDtype(code)
    if a and isinstance(a[0], Global):  # numpy 2 may pass a dtype class
        return NumpyDtype(_NUMPY_NAMES.get(a[0].name.removesuffix("DType").lower(), a[0].name))
    return NumpyDtype("?")


def _h_np_scalar(m: Machine, g: Global, a: tuple, kw) -> Any:
    dt = a[0] if a and isinstance(a[0], NumpyDtype) else None
    raw = a[1] if len(a) > 1 else None
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    return NumpyScalar(dt, raw if isinstance(raw, (bytes, bytearray)) else None)


def _h_np_frombuffer(m: Machine, g: Global, a: tuple, kw) -> Any:
    """numpy's protocol-5 reduce: _frombuffer(buffer, dtype, shape, order)."""
    if len(a) != 4 or not isinstance(a[1], NumpyDtype):
        return Opaque(g.full, a)
    buf = a[0]
    if isinstance(buf, bytearray):
        buf = bytes(buf)
    if not isinstance(buf, (bytes, Span)):
        return Opaque(g.full, a)
    return NumpyArray(_ints(a[2], "numpy shape", m), a[1], a[3] == "F", buf)


def _numpy_build(m: Machine, arr: NumpyArray, state: Any) -> None:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        m._fail("numpy array BUILD state is not (version, shape, dtype, fortran, data)")
    if len(state) == 5:
        state = state[1:]
    shape, dt, fortran, raw = state
    arr.shape = _ints(shape, "numpy shape", m)
    arr.dtype = dt if isinstance(dt, NumpyDtype) else None
    arr.fortran = bool(fortran)
    if isinstance(raw, str):
        raw = raw.encode("latin1")  # python-2 era: bytes were str, decoded as latin1
    arr.data = raw
    if arr.dtype is not None and arr.dtype.kind == "O" and isinstance(raw, (bytes, bytearray, Span)):
        m.nested.append(("numpy object array", raw))  # object arrays' data is pickled objects


# Calls that unpickle data the pickle itself carries. Their argument, when a constant, is a whole
# nested pickle (or torch archive) that `scan` walks; the calls themselves are classified by name.
NESTED_LOADERS = frozenset({
    "pickle.loads", "pickle.load", "pickle._loads", "pickle._load", "_pickle.loads", "_pickle.load",
    "cPickle.loads", "cPickle.load", "dill.loads", "dill.load", "dill._dill.loads", "dill._dill.load",
    "cloudpickle.loads", "cloudpickle.load", "cloudpickle.cloudpickle.loads", "torch.storage._load_from_bytes",
    "torch.load", "torch.serialization.load", "numpy.loads", "numpy.load", "joblib.load",
    "pandas.read_pickle", "pandas.io.pickle.read_pickle", "pickle.Unpickler", "_pickle.Unpickler",
})


def nested_payload(arg: Any) -> bytes | Span | None:
    """The bytes a loader would unpickle: a bytes constant, or a BytesIO built from one."""
    if isinstance(arg, (bytes, bytearray)):
        return bytes(arg)
    if isinstance(arg, Span):
        return arg
    if isinstance(arg, str):
        return arg.encode("latin1", "replace")  # python-2 pickles' byte strings
    if isinstance(arg, Opaque) and arg.type in ("io.BytesIO", "_io.BytesIO"):
        if arg.args:
            return nested_payload(arg.args[0])
        if isinstance(arg.state, tuple) and arg.state:  # BytesIO.__getstate__: (value, pos, dict)
            return nested_payload(arg.state[0])
    return None


_TORCH_UTILS = "torch._utils."
_HANDLERS: dict[str, Any] = {
    _TORCH_UTILS + "_rebuild_tensor_v2": _h_rebuild_v2,
    _TORCH_UTILS + "_rebuild_tensor": _h_rebuild_v2,
    _TORCH_UTILS + "_rebuild_tensor_v3": _h_rebuild_v3,
    _TORCH_UTILS + "_rebuild_qtensor": _h_rebuild_qtensor,
    _TORCH_UTILS + "_rebuild_parameter": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_parameter_with_state": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_device_tensor_from_cpu_tensor": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_device_tensor_from_numpy": _h_from_numpy,
    _TORCH_UTILS + "_rebuild_xla_tensor": _h_from_numpy,
    _TORCH_UTILS + "_rebuild_meta_tensor_no_storage": _h_meta,
    _TORCH_UTILS + "_rebuild_sparse_tensor": _h_sparse,
    _TORCH_UTILS + "_rebuild_nested_tensor": _h_nested,
    "torch.serialization._get_layout": _h_get_layout,
    "torch._tensor._rebuild_from_type_v2": _h_from_type_v2,
    "torch._tensor._rebuild_from_type": _h_from_type_v2,
    "torch.nn.parameter.Parameter": _h_first_tensor,
    "torch.nn.parameter.Buffer": _h_first_tensor,
    "torch.Size": _h_size,
    "collections.OrderedDict": _h_ordered_dict,
    "collections.defaultdict": _h_ordered_dict,
    "builtins.set": _h_set,
    "builtins.frozenset": _h_set,
    "__builtin__.set": _h_set,
    "__builtin__.frozenset": _h_set,
    "builtins.slice": _h_slice,
    "__builtin__.slice": _h_slice,
    "builtins.complex": _h_complex,
    "__builtin__.complex": _h_complex,
    "builtins.bytearray": _h_bytearray,
    "__builtin__.bytearray": _h_bytearray,
    "builtins.bytes": _h_bytes,
    "__builtin__.bytes": _h_bytes,
    "builtins.object": _h_object,
    "__builtin__.object": _h_object,
    "_codecs.encode": _h_codecs_encode,
    "copyreg._reconstructor": _h_reconstructor,
    "copy_reg._reconstructor": _h_reconstructor,
    "copyreg.__newobj__": _h_newobj,
    "copy_reg.__newobj__": _h_newobj,
    "numpy.core.multiarray._reconstruct": _h_np_reconstruct,
    "torch.jit._pickle.build_intlist": _h_jit_list,
    "torch.jit._pickle.build_doublelist": _h_jit_list,
    "torch.jit._pickle.build_boollist": _h_jit_list,
    "torch.jit._pickle.build_tensorlist": _h_jit_list,
    "torch.jit._pickle.build_complexlist": _h_jit_list,
    "torch.jit._pickle.restore_type_tag": _h_jit_type_tag,
    "numpy._core.multiarray._reconstruct": _h_np_reconstruct,
    "numpy.dtype": _h_np_dtype,
    "numpy.core.numeric._frombuffer": _h_np_frombuffer,
    "numpy._core.numeric._frombuffer": _h_np_frombuffer,
    "numpy.core.multiarray.scalar": _h_np_scalar,
    "numpy._core.multiarray.scalar": _h_np_scalar,
}

# Globals ckptctl understands (scan calls them safe): the handlers above, storages, dtypes, and
# the plain-data classes of torch.distributed.checkpoint's .metadata.
UNDERSTOOD: frozenset[str] = frozenset(
    set(_HANDLERS)
    | {f"torch.{d.storage}" for d in dtypes.BY_NAME.values() if d.storage}
    | {f"torch.cuda.{d.storage}" for d in dtypes.BY_NAME.values() if d.storage}
    | {f"torch.{name}" for name in dtypes.BY_NAME}
    | {
        "torch.storage.UntypedStorage", "torch.storage.TypedStorage", "torch.storage._LegacyStorage",
        "torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_channel_affine_float_qparams",
        "torch.per_tensor_symmetric", "torch.per_channel_symmetric",
        "torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr",
        "torch.sparse_bsc", "torch._mkldnn", "torch.contiguous_format", "torch.channels_last",
        "torch.channels_last_3d", "torch.preserve_format", "torch.device",
        "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "numpy.ndarray", "numpy.core.multiarray._reconstruct",
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


# ---- a semantics-free listing (the fallback for pickles that fail) ----------------------------
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
UNRESOLVED = "<unresolved>"


def opcode_globals(raw: bytes) -> list[str]:
    """Globals named by GLOBAL/INST/STACK_GLOBAL opcodes of one pickle, tracking strings through
    the memo like picklescan does. STACK_GLOBAL arguments that are not plain strings give
    '<unresolved>' names. Stops quietly at the first opcode it cannot parse."""
    return [f"{a}.{b}" for a, b in opcode_global_pairs(raw)]


def opcode_global_pairs(raw: bytes) -> list[tuple[str, str]]:
    """opcode_globals as (module, name) pairs."""
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # what each push left on top, strings or None
    ops = _partial_ops(raw)
    try:
        for op, arg, _pos in ops:
            name = op.name
            if name in ("GLOBAL", "INST"):
                mod, _, nm = str(arg).partition(" ")
                found.append((mod, nm))
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name == "STACK_GLOBAL":
                a = recent[-2] if len(recent) >= 2 else None
                b = recent[-1] if recent else None
                found.append((a if isinstance(a, str) else UNRESOLVED, b if isinstance(b, str) else UNRESOLVED))
                recent.append(None)
            elif name in ("FRAME", "PROTO", "MARK", "STOP"):
                pass
            else:
                recent.append(None)
            if len(recent) > 64:
                del recent[:32]
    except Exception:  # noqa: BLE001 - the listing ends where parsing ends
        pass
    return found


def _partial_ops(raw: bytes) -> list:
    import io
    import pickletools
    import warnings

    out: list = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for item in pickletools.genops(io.BytesIO(raw)):
                out.append(item)
                if len(out) >= 10_000_000:
                    break
    except Exception:  # noqa: BLE001 - the listing ends where parsing ends
        pass
    return out


# ---- convenience -----------------------------------------------------------------------------
def unpickle_bytes(data: bytes, *, persistent_load=None, path=None, encoding: str = "latin1") -> tuple[Any, list[str]]:
    """(object, globals) of one pickle held in memory."""
    m = Machine(data, persistent_load=persistent_load, path=path, encoding=encoding)
    obj = m.load()
    return obj, m.globals


def scan_globals(f, start: int, end: int, path=None, limit: int = 64) -> tuple[list[str], str | None]:
    """Globals of every pickle found back to back in f[start:end] (like picklescan does).

    Returns (globals, error) where error describes why the scan stopped early (None at a clean
    end). Never raises for malformed data.
    """
    found: list[str] = []
    pos = start
    for _ in range(limit):
        if pos >= end:
            return found, None
        m = Machine(f, start=pos, end=end, path=path)
        try:
            m.load()
        except PickleError as e:
            found.extend(m.globals)
            found.extend(e.more_globals)
            return found, e.message
        found.extend(m.globals)
        if m.pos <= pos:
            return found, None
        pos = m.pos
    return found, None


# ---- describe: names, tensors, objects, metadata, kind -----------------------------------------
TENSORISH = (TensorRecord, NumpyArray)


@dataclass
class Described:
    tensors: list[tuple[str, Any, str | None]] = field(default_factory=list)  # (name, record, alias_of)
    objects: list[tuple[str, str]] = field(default_factory=list)  # (path, type)
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    warnings: list[str] = field(default_factory=list)


def _key_str(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None or isinstance(k, (int, float)):
        return str(k)
    if isinstance(k, bytes):
        return k.decode("utf-8", "replace")
    if isinstance(k, tuple):
        return "(" + ", ".join(_key_str(x) for x in k) + ")"
    if isinstance(k, Global):
        return k.full
    if isinstance(k, Opaque):
        return f"<{k.type}>"
    return f"<{type(k).__name__}>"


class _Walker:
    def __init__(self, path=None, raw_names: bool = False, torchscript: dict | None = None):
        self.path = path
        self.raw = raw_names
        self.ts = torchscript  # TorchScript class declarations (see torchscript_decls), or None
        self.views: list[_ModuleView] = []
        self.out = Described()
        self.seen_tensor: dict[int, str] = {}  # id(record) -> first name
        self.seen_view: dict[tuple, str] = {}  # (storage, dtype, offset, shape, stride) -> first name
        self.seen_obj: set[int] = set()
        self.nodes = 0
        self.more_objects = 0
        self.names: set[str] = set()

    def tensor(self, name: str, rec: Any) -> None:
        alias = self.seen_tensor.get(id(rec))
        if alias is None and isinstance(rec, TensorRecord) and rec.storage is not None:
            key = (id(rec.storage), rec.dtype, rec.offset, rec.shape, rec.stride)
            alias = self.seen_view.get(key)
            if alias is None:
                self.seen_view[key] = name
        if alias is None:
            self.seen_tensor[id(rec)] = name
        if name in self.names:  # two paths that print the same ('a/b' key vs nested a -> b)
            i = 2
            while f"{name}#{i}" in self.names:
                i += 1
            name = f"{name}#{i}"
        self.names.add(name)
        self.out.tensors.append((name, rec, alias))

    def walk(self, obj: Any, parts: list[str], ancestors: set[int], depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_WALK_NODES:
            raise CorruptFile(
                f"the pickle's object graph is too large to list (over {MAX_WALK_NODES:,} objects "
                "through shared references)", self.path)
        if isinstance(obj, TENSORISH):
            if isinstance(obj, NumpyArray) and numpy_torch_dtype(obj.dtype) is None:
                self.obj(parts, f"numpy.ndarray[{obj.dtype.code if obj.dtype else '?'}]", obj)
                return
            self.tensor("/".join(parts) if parts else "tensor", obj)
            return
        t = type(obj)
        if t in (str, int, float, bool, bytes, type(None), complex, Span, Global, NumpyScalar, NumpyDtype):
            return
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the pickle nests objects deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(obj)
        if oid in ancestors:
            return  # a cycle
        ancestors.add(oid)
        try:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if _is_leaf(v):
                        continue
                    self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
            elif t is list or t is tuple:
                for i, v in enumerate(obj):
                    if _is_leaf(v):
                        continue
                    self.walk(v, parts + [str(i)], ancestors, depth + 1)
            elif isinstance(obj, Opaque):
                if not self.raw and self.special(obj, parts, ancestors, depth):
                    return
                self.obj(parts, obj.type, obj)
                for k, v in obj.fields().items():
                    if not _is_leaf(v):
                        self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
                for i, v in enumerate(obj.args or ()):
                    if not _is_leaf(v):
                        self.walk(v, parts + [f"args/{i}"], ancestors, depth + 1)
                for i, v in enumerate(obj.items or ()):
                    if not _is_leaf(v):
                        self.walk(v, parts + [str(i)], ancestors, depth + 1)
                for k, v in obj.dictitems or ():
                    if not _is_leaf(v):
                        self.walk(v, parts + [_key_str(k)], ancestors, depth + 1)
                st = obj.state
                if st is not None and not isinstance(st, dict) and not (
                    isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict))
                ):
                    if not _is_leaf(st):
                        self.walk(st, parts + ["state"], ancestors, depth + 1)
            elif isinstance(obj, (set, frozenset)):
                pass
            elif isinstance(obj, PersistentRef):
                self.obj(parts, "<persistent id>", obj)
        finally:
            ancestors.discard(oid)

    def obj(self, parts: list[str], type_: str, obj: Any) -> None:
        if id(obj) in self.seen_obj:
            return
        self.seen_obj.add(id(obj))
        if len(self.out.objects) >= MAX_OBJECTS:
            self.more_objects += 1
            return
        self.out.objects.append(("/".join(parts), type_))

    # -- whole nn.Module pickles, optimizers and TorchScript modules: state_dict() names ----------
    def special(self, obj: Opaque, parts: list[str], ancestors: set[int], depth: int) -> bool:
        """List obj under the names its own state_dict() gives, when it is a module (eager or
        TorchScript), a torch.compile wrapper or an optimizer. False: walk it as any object."""
        ancestors.discard(id(obj))  # walk() marked it; the module walk marks it again
        if self.ts is not None and obj.type.startswith("__torch__.") and self.ts_is_module(obj):
            view = _ModuleView(parts, "torchscript")
            self.views.append(view)
            self.ts_module(obj, view, "", ancestors, depth, None)
            return True
        if is_module(obj):
            view = _ModuleView(parts, "module")
            self.views.append(view)
            self.module(obj, view, "", ancestors, depth, None)
            return True
        if obj.type in _COMPILE_WRAPPERS and obj.args and is_module(obj.args[0]):
            # torch.save(torch.compile(m)) pickles OptimizedModule(m, context): its state_dict()
            # names are m's under `_orig_mod.`
            view = _ModuleView(parts, "module")
            self.views.append(view)
            view.add_module("", obj.type, obj, None)
            self.obj(parts, obj.type, obj)
            self.module(obj.args[0], view, "_orig_mod.", ancestors, depth + 1, view.training.get(""))
            return True
        if is_optimizer(obj):
            self.optimizer(obj, parts, ancestors, depth)
            return True
        return False

    def _full(self, view: _ModuleView, name: str) -> str:
        return "/".join(view.parts + [name]) if view.parts else name

    def module(self, mod: Opaque, view: _ModuleView, prefix: str, ancestors: set[int], depth: int,
               parent_training: Any) -> None:
        """What nn.Module.state_dict() does: own parameters (None skipped), persistent buffers,
        then each child under `name.`; a module reached twice is listed twice, like torch does."""
        self.nodes += 1
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the pickle nests modules deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(mod)
        if oid in ancestors:
            return  # a module that contains itself: torch's state_dict() would recurse forever
        ancestors.add(oid)
        try:
            f = mod.fields()
            view.add_module(prefix, mod.type, mod, parent_training)
            self.obj(view.parts + ([prefix[:-1]] if prefix else []), mod.type, mod)
            nonpersistent = f.get("_non_persistent_buffers_set")
            nonpersistent = nonpersistent if isinstance(nonpersistent, (set, frozenset)) else set()
            for group in ("_parameters", "_buffers"):
                for k, v in f[group].items():
                    name = prefix + _key_str(k)
                    if v is None:
                        continue
                    if group == "_buffers" and k in nonpersistent:
                        view.nonpersistent.append(name)
                        continue
                    if isinstance(v, TENSORISH):
                        self.tensor(self._full(view, name), v)
                    else:
                        view.odd.append(f"{name} ({_kind(v)})")
            for k, v in f.items():
                if isinstance(k, str) and isinstance(v, TENSORISH):
                    view.attributes.append(prefix + k)
            for k, child in f["_modules"].items():
                if child is None:
                    continue
                name = prefix + _key_str(k)
                if is_module(child):
                    self.module(child, view, name + ".", ancestors, depth + 1, view.training.get(prefix))
                elif not _is_leaf(child):
                    self.walk(child, view.parts + [name], ancestors, depth + 1)
        finally:
            ancestors.discard(oid)

    def ts_is_module(self, obj: Opaque) -> bool:
        decl = self.ts.get(obj.type) if self.ts else None
        if decl is not None:
            return decl.is_module
        st = obj.state
        return isinstance(st, dict) and "training" in st

    def ts_module(self, mod: Opaque, view: _ModuleView, prefix: str, ancestors: set[int], depth: int,
                  parent_training: Any) -> None:
        """A TorchScript module object of data.pkl: attributes in its state; which tensors are
        parameters and buffers comes from the class's `__parameters__`/`__buffers__` lines."""
        self.nodes += 1
        if depth > MAX_WALK_DEPTH:
            raise CorruptFile(f"the archive nests modules deeper than {MAX_WALK_DEPTH} levels", self.path)
        oid = id(mod)
        if oid in ancestors:
            return
        ancestors.add(oid)
        try:
            decl = self.ts.get(mod.type)
            st = mod.state
            view.add_module(prefix, mod.type, mod, parent_training, decl)
            self.obj(view.parts + ([prefix[:-1]] if prefix else []), mod.type, mod)
            if not isinstance(st, dict):  # a class with its own __getstate__: listed as it is
                if st is not None and not _is_leaf(st):
                    self.walk(st, view.parts + [prefix + "state" if prefix else "state"], ancestors, depth + 1)
                return
            if decl is not None:
                order = [k for k in decl.parameters + decl.buffers if k in st]
            else:
                order = [k for k, v in st.items() if isinstance(v, TENSORISH)]
            for k in order:
                v = st[k]
                if v is None:
                    continue
                if isinstance(v, TENSORISH):
                    self.tensor(self._full(view, prefix + k), v)
                    if decl is not None and k in decl.buffers and not mod.type.startswith("__torch__.torch."):
                        view.user_buffers.append(prefix + k)
                else:
                    view.odd.append(f"{prefix}{k} ({_kind(v)})")
            chosen = set(order)
            for k, v in st.items():
                if not isinstance(k, str) or k in chosen:
                    continue
                name = prefix + k
                if isinstance(v, TENSORISH):
                    view.attributes.append(name)
                elif isinstance(v, Opaque) and v.type.startswith("__torch__.") and self.ts_is_module(v):
                    self.ts_module(v, view, name + ".", ancestors, depth + 1, view.training.get(prefix))
        finally:
            ancestors.discard(oid)

    def optimizer(self, opt: Opaque, parts: list[str], ancestors: set[int], depth: int) -> None:
        """torch.save(optimizer): named like optimizer.state_dict() (`state/<i>/exp_avg`, the
        parameters numbered in param_groups order); the parameters themselves as `params/<i>`."""
        f = opt.fields()
        self.obj(parts, opt.type, opt)
        index: dict[int, int] = {}
        params: list[Any] = []
        groups = []
        for g in f["param_groups"]:
            if not isinstance(g, dict):
                continue
            ids = []
            for p in g.get("params") or ():
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                ids.append(index[id(p)])
            groups.append({**{_key_str(k): render(v) for k, v in g.items() if k != "params"}, "params": ids})
        base = parts
        state = f["state"]
        for p, st in state.items():
            i = index.get(id(p))
            key = str(i) if i is not None else _key_str(p)
            self.walk(st, base + ["state", key], ancestors, depth + 1)
        for i, p in enumerate(params):
            if isinstance(p, TENSORISH):
                self.tensor("/".join(base + ["params", str(i)]), p)
        label = "/".join(base + ["optimizer"]) if base else "optimizer"
        self.out.metadata[label] = _class_name(opt.type)
        self.out.metadata[("/".join(base) + "/" if base else "") + "param_groups"] = groups
        if params:
            self.out.warnings.append(
                f"{'/'.join(base) + ': ' if base else ''}a whole pickled optimizer: its state is listed under "
                f"optimizer.state_dict() names (state/<i>/...); the {len(params)} parameters it also holds "
                "are listed as params/<i>")


# ---- nn.Module views -----------------------------------------------------------------------------
_MODULE_KEYS = ("_parameters", "_buffers", "_modules")
_COMPILE_WRAPPERS = {"torch._dynamo.eval_frame.OptimizedModule"}
_DATA_PARALLEL = {"torch.nn.parallel.data_parallel.DataParallel",
                  "torch.nn.parallel.distributed.DistributedDataParallel"}
_WRAPPER_PREFIXES = {"module.": "a DataParallel/DistributedDataParallel wrapper",
                     "_orig_mod.": "a torch.compile wrapper"}
MAX_MODULES = 500  # modules described in the metadata


def is_module(obj: Any) -> bool:
    """An nn.Module instance, whatever its class: its state holds _parameters, _buffers, _modules."""
    if not isinstance(obj, Opaque):
        return False
    f = obj.fields()
    return all(isinstance(f.get(k), dict) for k in _MODULE_KEYS)


def is_optimizer(obj: Any) -> bool:
    if not isinstance(obj, Opaque):
        return False
    f = obj.fields()
    return isinstance(f.get("state"), dict) and isinstance(f.get("param_groups"), list) and "defaults" in f


def _class_name(t: str) -> str:
    """A TorchScript class name as the Python class it was compiled from (without __torch__. and
    the ___torch_mangle_N parts); other names as they are."""
    if t.startswith("__torch__."):
        parts = [p for p in t.split(".")[1:] if not p.startswith("___torch_mangle_")]
        return ".".join(parts) or t
    return t


def _hyper(f: dict) -> list[tuple[str, str]]:
    """A module's simple hyper-attributes (in_features=4, eps=1e-05, kernel_size=(3, 3), ...)."""
    out: list[tuple[str, str]] = []
    for k, v in f.items():
        if not isinstance(k, str) or k.startswith("_") or k == "training":
            continue
        if v is None or isinstance(v, (bool, int, float)):
            out.append((k, repr(v)))
        elif isinstance(v, str) and len(v) <= 80:
            out.append((k, repr(v)))
        elif isinstance(v, (tuple, list)) and len(v) <= 8 and all(type(x) in (int, float, bool) for x in v):
            out.append((k, repr(tuple(v))))
        if len(out) >= 16:
            break
    return out


@dataclass
class _ModuleView:
    """One module tree found in a pickle: where it is and what state_dict() leaves out."""

    parts: list[str]  # the '/'-path of the module in the pickle ([] for the root)
    kind: str  # module | torchscript
    root_type: str | None = None
    modules: list[tuple[str, str]] = field(default_factory=list)  # (path, 'Class(k=v, ...)')
    more_modules: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # prefix -> training flag
    nonpersistent: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # tensors that are neither parameter nor buffer
    odd: list[str] = field(default_factory=list)  # parameters that are not tensors
    user_buffers: list[str] = field(default_factory=list)  # TorchScript: buffers of non-torch classes

    def add_module(self, prefix: str, type_: str, obj: Opaque, parent_training: Any, decl: Any = None) -> None:
        f = obj.fields()
        training = f.get("training")
        self.training[prefix] = training
        if self.root_type is None:
            self.root_type = type_
        if len(self.modules) >= MAX_MODULES:
            self.more_modules += 1
            return
        hyper = _hyper(f)
        if decl is not None:
            declared = set(decl.parameters) | set(decl.buffers)
            hyper = [(k, v) for k, v in hyper if k not in declared]
            hyper += [(k, _ts_literal(v)) for k, v in decl.finals.items() if k not in dict(hyper)]
        # by name: TorchScript writes its constants in no stable order, and an eager module and
        # its TorchScript archive then describe themselves alike
        hyper.sort()
        if isinstance(training, bool) and (not prefix or training != parent_training):
            hyper.append(("training", repr(training)))
        if hyper or not prefix:  # containers (Sequential, ModuleList, ...) are in `objects` only
            text = _class_name(type_) + ("(" + ", ".join(f"{k}={v}" for k, v in hyper) + ")" if hyper else "")
            self.modules.append((prefix[:-1] if prefix.endswith(".") else prefix, text))


def _names_note(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _finish_view(out: Described, view: _ModuleView, names: list[str]) -> None:
    """Metadata (classes, hyper-attributes, training) and notes of one module tree."""
    base = "/".join(view.parts) + "/" if view.parts else ""
    where = f"{base.rstrip('/')}: " if base else ""
    for path, text in view.modules:
        out.metadata[base + "module" + (f"/{path}" if path else "")] = text
    if view.more_modules:
        out.warnings.append(f"{where}{view.more_modules} more modules are not described in the metadata")
    if view.nonpersistent:
        out.warnings.append(
            f"{where}{len(view.nonpersistent)} non-persistent buffer(s) left out, as state_dict() does: "
            f"{_names_note(view.nonpersistent)} (--raw-names lists them)")
    if view.attributes:
        out.warnings.append(
            f"{where}{len(view.attributes)} tensor attribute(s) that are neither parameters nor buffers left "
            f"out, as state_dict() does: {_names_note(view.attributes)} (--raw-names lists them)")
    if view.user_buffers:
        out.warnings.append(
            f"{where}a TorchScript archive does not record whether a buffer is persistent: "
            f"{_names_note(view.user_buffers)} listed; if the model's state_dict() leaves one out "
            "(register_buffer(..., persistent=False)), --exclude it")
    if view.odd:
        out.warnings.append(f"{where}parameters or buffers that are not tensors, not listed: {_names_note(view.odd)}")
    prefix = None
    if view.root_type in _DATA_PARALLEL:
        prefix = "module."
    elif view.root_type in _COMPILE_WRAPPERS:
        prefix = "_orig_mod."
    if prefix is not None and names and all(n.startswith(prefix) for n in names):
        out.warnings.append(wrapper_hint(prefix, where))


def wrapper_hint(prefix: str, where: str = "") -> str:
    return (f"{where}every name starts with {prefix!r} ({_WRAPPER_PREFIXES[prefix]}): names are kept as "
            f"the wrapper's state_dict() gives them; --strip-prefix {prefix} gives the inner model's names")


# ---- TorchScript class declarations ------------------------------------------------------------
@dataclass
class TSClass:
    """What a TorchScript class declares in its header lines (read as text, never compiled)."""

    is_module: bool
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    finals: dict[str, str] = field(default_factory=dict)  # `in_features : Final[int] = 4`


_TS_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_TS_FINAL = re.compile(r"^  (\w+) : Final\[[^\]]*\] = (.{1,80})$")


def torchscript_decls(files: dict[str, str]) -> dict[str, TSClass]:
    """Class declarations of TorchScript code files ({'code/__torch__/a/b.py': text}) by the class's
    global name ('__torch__.a.b.Class'). Only each class's header lines are looked at: the
    `class X(Module):` line, `__parameters__ = [...]`, `__buffers__ = [...]` and `Final` constants."""
    out: dict[str, TSClass] = {}
    for fname, text in files.items():
        rel = fname.split("code/", 1)[-1]
        if not rel.endswith(".py"):
            continue
        module = rel[:-3].replace("/", ".")
        cur: TSClass | None = None
        for line in text.splitlines():
            if line.startswith("class "):
                m = re.match(r"class (\w+)\(([\w.]*)\):", line)
                cur = None
                if m:
                    cur = TSClass(is_module=m.group(2) == "Module")
                    out[f"{module}.{m.group(1)}"] = cur
                continue
            if cur is None or not line.startswith("  ") or line.startswith("   "):
                continue
            if line.startswith("  def "):
                cur = None  # the header ends where the methods start
                continue
            if line.startswith("  __parameters__ = ["):
                cur.parameters = [_ts_unescape(x) for x in _TS_QUOTED.findall(line)]
            elif line.startswith("  __buffers__ = ["):
                cur.buffers = [_ts_unescape(x) for x in _TS_QUOTED.findall(line)]
            else:
                fm = _TS_FINAL.match(line)
                if fm:
                    cur.finals[fm.group(1)] = fm.group(2).strip()
    return out


def _ts_literal(text: str) -> str:
    """A Final constant's literal as Python writes it ('1.0000000000000001e-05' -> '1e-05'); the
    text itself when it is not a plain literal. ast.literal_eval evaluates literals only."""
    import ast

    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text
    return repr(v) if isinstance(v, (int, float, bool, str, tuple, type(None))) else text


def _ts_unescape(s: str) -> str:
    return s.replace('\\"', '"').replace("\\\\", "\\")


def _is_leaf(v: Any) -> bool:
    return type(v) in (str, int, float, bool, bytes, type(None))


def describe(root: Any, path=None, *, raw_names: bool = False, torchscript: dict | None = None) -> Described:
    """Tensors, opaque objects, metadata and kind of an unpickled checkpoint object.

    An nn.Module (the root or any sub-tree, recognised by its _parameters/_buffers/_modules
    state) is listed under the names its state_dict() gives ('0.weight', 'encoder.layers.1.bias';
    under a sub-tree: 'model/0.weight'), a pickled optimizer like its state_dict(). `raw_names`
    lists every object as the pickle holds it instead ('_modules/0/_parameters/weight').
    `torchscript`: the archive's class declarations (torchscript_decls) for a TorchScript data.pkl.
    """
    w = _Walker(path, raw_names, torchscript)
    w.walk(root, [], set(), 0)
    out = w.out
    for view in w.views:
        base = "/".join(view.parts) + "/" if view.parts else ""
        names = [n[len(base):] for n, _r, _a in out.tensors if n.startswith(base)]
        _finish_view(out, view, names)
    if w.more_objects:
        out.warnings.append(f"{w.more_objects} more opaque objects are not listed")
    for rec_name, rec, _alias in out.tensors:
        if isinstance(rec, TensorRecord) and rec.storage is None:
            out.warnings.append(f"tensor {rec_name!r} has no data in this file: {rec.note}")
    out.kind = _kind_of(root)
    if w.views and not w.views[0].parts:
        out.kind = w.views[0].kind
    elif not raw_names and is_optimizer(root):
        out.kind = "optimizer"
    if isinstance(root, dict) and out.kind != "state_dict":
        out.metadata.update(_metadata_of(root))
    if out.kind == "state_dict" and out.tensors:
        for prefix in _WRAPPER_PREFIXES:
            if all(n.startswith(prefix) for n, _r, _a in out.tensors):
                out.warnings.append(wrapper_hint(prefix))
    return out


_MODEL_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "ema", "params")


def _kind_of(root: Any) -> str | None:
    if not isinstance(root, dict) or not root:
        return None
    keys = {k for k in root if isinstance(k, str)}
    if "pytorch-lightning_version" in keys or (
        {"state_dict", "optimizer_states"} <= keys and ({"epoch", "global_step"} & keys)
    ):
        return "lightning"
    vals = list(root.values())
    if all(isinstance(v, TENSORISH) for v in vals):
        return "state_dict"
    if {"state", "param_groups"} <= keys:
        return "hf-optimizer"
    if {"python", "numpy", "cpu"} <= keys:
        return "hf-rng-state"
    if any(k in keys for k in _MODEL_KEYS):
        return "training"
    return None


def _has_tensor(v: Any, depth: int = 0, budget: list | None = None) -> bool:
    if budget is None:
        budget = [10000]
    budget[0] -= 1
    if budget[0] < 0 or depth > 40:
        return True  # too big to call small metadata
    if isinstance(v, TENSORISH):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x, depth + 1, budget) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x, depth + 1, budget) for x in v)
    if isinstance(v, Opaque):
        return any(_has_tensor(x, depth + 1, budget) for x in v.fields().values()) or any(
            _has_tensor(x, depth + 1, budget) for x in (v.args or ()))
    return False


def render(v: Any, depth: int = 0, budget: list | None = None) -> Any:
    """A JSON-able rendering of a pickled value (opaque objects as '<module.Class>')."""
    if budget is None:
        budget = [2000]
    budget[0] -= 1
    if budget[0] < 0 or depth > 12:
        return "..."
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, complex):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, Span):
        return f"<{v.length} bytes>"
    if isinstance(v, dict):
        return {_key_str(k): render(x, depth + 1, budget) for k, x in list(v.items())[:500]}
    if isinstance(v, (list, tuple)):
        return [render(x, depth + 1, budget) for x in v[:500]]
    if isinstance(v, (set, frozenset)):
        items = [render(x, depth + 1, budget) for x in list(v)[:500]]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(v, NumpyScalar):
        val = v.value()
        return render(val, depth + 1, budget) if val is not None else "<numpy scalar>"
    if isinstance(v, TensorRecord):
        return f"<tensor {v.dtype} {list(v.shape)}>"
    if isinstance(v, NumpyArray):
        return f"<ndarray {numpy_torch_dtype(v.dtype) or (v.dtype.code if v.dtype else '?')} {list(v.shape)}>"
    if isinstance(v, Global):
        return f"<{v.full}>"
    if isinstance(v, Opaque):
        if v.type in _RECORD_TYPES or (v.dictitems and not v.args and v.state is None):
            items = dict(v.fields())
            for k, x in v.dictitems or ():
                items[k] = x
            return {_key_str(k): render(x, depth + 1, budget) for k, x in list(items.items())[:500]}
        if v.type in _PATH_TYPES and v.args and all(isinstance(a, str) for a in v.args):
            return "/".join(a.rstrip("/") if i == 0 and a != "/" else a for i, a in enumerate(v.args)).replace("//", "/")
        return f"<{v.type}>"
    return f"<{type(v).__name__}>"


_RECORD_TYPES = {"argparse.Namespace", "lightning.fabric.utilities.data.AttributeDict",
                 "pytorch_lightning.utilities.parsing.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                 "types.SimpleNamespace"}
_PATH_TYPES = {"pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path", "pathlib.PurePosixPath",
               "pathlib.PureWindowsPath"}
_META_DICTS = {"hyper_parameters", "hparams", "datamodule_hyper_parameters", "args", "config", "cfg", "hparams_name"}
_META_MAX_CHARS = 16384


def _metadata_of(root: dict) -> dict[str, Any]:
    import json

    meta: dict[str, Any] = {}
    for k, v in root.items():
        key = _key_str(k)
        if v is None or isinstance(v, (bool, int, float, str)):
            meta[key] = render(v)
        elif isinstance(v, NumpyScalar):
            meta[key] = render(v)
        elif key == "callbacks" and isinstance(v, dict):
            for cb, state in v.items():
                fields = state if isinstance(state, dict) else state.fields() if isinstance(state, Opaque) else {}
                for fk, fv in fields.items():
                    if fv is None or isinstance(fv, (bool, int, float, str, NumpyScalar)):
                        meta[f"callbacks/{_key_str(cb)}/{_key_str(fk)}"] = render(fv)
        elif isinstance(v, (dict, Opaque, list, tuple)) and (key in _META_DICTS or not _has_tensor(v)):
            if isinstance(v, Opaque) and v.type not in _RECORD_TYPES and key not in _META_DICTS:
                continue  # listed in CheckpointInfo.objects
            r = render(v)
            try:
                text = json.dumps(r, default=str)
            except (TypeError, ValueError):
                continue
            if len(text) <= _META_MAX_CHARS:
                meta[key] = r
    return meta
