"""The opcode interpreter of the restricted unpickler (protocols 0-5, memo, persistent ids, the
global recorder): what it builds instead of importing and calling, and why nothing here can run
code from the file, is described in the package docstring (formats/pickles/__init__.py)."""

from __future__ import annotations

import codecs
import struct
from typing import Any

from ckptctl.errors import CorruptFile, UnsafeFile
from ckptctl.formats.gcpause import paused_gc
from ckptctl.formats.pickles.buffer import Buffered, _NeedBytes
from ckptctl.formats.pickles.fastpath import torch_entries
from ckptctl.formats.pickles.listing import opcode_global_pairs
from ckptctl.formats.pickles.records import Global, Opaque, PickleError, Span
from ckptctl.formats.pickles.semantics import Semantics

INLINE_MAX = 1 << 20  # binary payloads larger than this stay in the file (Span)
MAX_STRING = 256 << 20  # a single text string larger than this is refused
LENIENT_MAX = 64 << 20  # bytes of a failed pickle that the opcode listing looks at
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U16 = struct.Struct("<H").unpack_from


class Machine(Buffered, Semantics):
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
        super().__init__(source, start, end, preload)
        self.protocol = 0

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
            with paused_gc():
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
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, OverflowError, AttributeError, EOFError) as e:
            self._fail(f"{type(e).__name__}: {e}")

    def _run(self) -> Any:  # noqa: C901 - one opcode loop
        data = self._data
        pos = self.pos - self._base
        stack: list = []
        metastack: list = []
        memo: dict = {}
        append = stack.append
        unpack_from = struct.unpack_from
        u32, i32, u16 = _U32, _I32, _U16
        n = len(data)
        tensor_entries = torch_entries  # fastpath.py
        tuples: dict[bytes, tuple] = {}  # the sizes/strides it parsed, by their bytes
        handlers: dict = {}  # its rebuild handler of each global
        v: Any  # the value just pushed (memoized in the same turn when a PUT follows)
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
            # ---- the frequent opcodes of torch pickles first (protocol 2: torch.save's default;
            # past 256 memo entries every PUT/GET is a LONG_ one). An if-chain is the fastest
            # dispatch CPython has for this (a call per opcode costs more than ten comparisons);
            # a value that the next opcode memoizes (BINPUT/LONG_BINPUT right after it) is
            # memoized in the same turn.
            if op == 0x72:  # LONG_BINPUT
                memo[u32(data, pos)[0]] = stack[-1]
                pos += 4
            elif op == 0x6A:  # LONG_BINGET
                key = u32(data, pos)[0]
                pos += 4
                try:
                    append(memo[key])
                except KeyError:
                    self._fail(f"memo key {key} not found", self._base + pos)
            elif op == 0x71:  # BINPUT
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == 0x68:  # BINGET
                try:
                    append(memo[data[pos]])
                except KeyError:
                    self._fail(f"memo key {data[pos]} not found", self._base + pos)
                pos += 1
            elif op == 0x4B:  # BININT1
                append(data[pos])
                pos += 1
            elif op == 0x58 or op == 0x8C:  # BINUNICODE, SHORT_BINUNICODE
                if op == 0x8C:
                    ln = data[pos]
                    pos += 1
                else:
                    ln = u32(data, pos)[0]
                    pos += 4
                    if ln > MAX_STRING:
                        self._fail(f"a text string of {ln} bytes", self._base + pos)
                if pos + ln > n:
                    data, pos = self._fill_or_fail(data, pos, ln)
                    n = len(data)
                v = str(data[pos : pos + ln], "utf-8", "surrogatepass")
                append(v)
                pos += ln
                if pos + 5 <= n:
                    nx = data[pos]
                    if nx == 0x72:
                        memo[u32(data, pos + 1)[0]] = v
                        pos += 5
                    elif nx == 0x71:
                        memo[data[pos + 1]] = v
                        pos += 2
            elif op == 0x28:  # MARK
                if pos < n and data[pos] == 0x28:  # a tensor's arguments as torch.save writes them?
                    end = tensor_entries(self, data, pos, memo, stack, tuples, handlers)
                    if end >= 0:  # those and the entries after them done
                        pos = end
                        continue
                metastack.append(stack)
                stack = []
                append = stack.append
            elif op == 0x74:  # TUPLE
                items = stack
                if not metastack:
                    self._fail("TUPLE without MARK", self._base + pos - 1)
                stack = metastack.pop()
                append = stack.append
                v = tuple(items)
                append(v)
                if pos + 5 <= n:
                    nx = data[pos]
                    if nx == 0x72:
                        memo[u32(data, pos + 1)[0]] = v
                        pos += 5
                    elif nx == 0x71:
                        memo[data[pos + 1]] = v
                        pos += 2
            elif op == 0x86:  # TUPLE2
                b = stack.pop()
                v = stack[-1] = (stack[-1], b)
                if pos + 5 <= n:
                    nx = data[pos]
                    if nx == 0x72:
                        memo[u32(data, pos + 1)[0]] = v
                        pos += 5
                    elif nx == 0x71:
                        memo[data[pos + 1]] = v
                        pos += 2
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                v = stack[-1] = self._call(stack[-1], args)
                if pos + 5 <= n:
                    nx = data[pos]
                    if nx == 0x72:
                        memo[u32(data, pos + 1)[0]] = v
                        pos += 5
                    elif nx == 0x71:
                        memo[data[pos + 1]] = v
                        pos += 2
            elif op == 0x51:  # BINPERSID
                pid = stack.pop()
                append(self._persistent(pid))
            elif op == 0x89:  # NEWFALSE
                append(False)
            elif op == 0x29:  # EMPTY_TUPLE
                append(())
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x87:  # TUPLE3
                c = stack.pop()
                b = stack.pop()
                stack[-1] = (stack[-1], b, c)
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x4D:  # BININT2
                append(u16(data, pos)[0])
                pos += 2
            elif op == 0x4A:  # BININT
                append(i32(data, pos)[0])
                pos += 4
            elif op == 0x8D:  # BINUNICODE8
                ln = unpack_from("<Q", data, pos)[0]
                pos += 8
                if ln > MAX_STRING:
                    self._fail(f"a text string of {ln} bytes", self._base + pos)
                if pos + ln > n:
                    data, pos = self._fill_or_fail(data, pos, ln)
                    n = len(data)
                append(str(data[pos : pos + ln], "utf-8", "surrogatepass"))
                pos += ln
            elif op == 0x88:  # NEWTRUE
                append(True)
            elif op == 0x4E:  # NONE
                append(None)
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

    def _decode_str(self, raw: bytes) -> str | bytes:
        if self.encoding == "bytes":
            return raw
        return raw.decode(self.encoding, "surrogateescape" if self.encoding.startswith("utf") else "strict")


def _escape_decode(raw: bytes) -> bytes:
    """Python-2 string escapes; invalid ones ('\\o') pass through without a DeprecationWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return codecs.escape_decode(raw)[0]
