"""One opcode sequence of the restricted unpickler taken in one step: the arguments of a tensor
as `torch.save` writes them (protocol 2), which repeat 10^5 times in a mixture-of-experts
checkpoint. The machine (machine.py) tries it at a MARK followed by a MARK; the bytes must match
exactly, with every memo reference already defined, or nothing happens and the opcode loop runs as usual.

What it does is what the opcode loop would do, in the same order, with the same calls: the memo
entries written, `persistent_load` of the same persistent id tuple, `_call` of whatever the memo
holds (the OrderedDict of backward hooks, the rebuild function on the stack), so every global
is still recorded and classified by the loop (a GLOBAL opcode never matches here: only memo
references do), errors are raised by the same code with the same messages, and nothing is
imported or called that the loop would not. The sequence, after the MARK of REDUCE's arguments:

    (                                 MARK: the persistent id tuple
      <get> <get>                     'storage', the storage class global (BINGET or LONG_BINGET)
      X<n><digits> <put>              BINUNICODE key (decimal digits), BINPUT or LONG_BINPUT
      <get> <int>                     'cpu', numel (BININT1, BININT2 or BININT)
    t <put> Q                         TUPLE, BINPERSID
    <int>                             storage offset
    <tuple> <tuple>                   size, stride: EMPTY_TUPLE, or ints then TUPLE1/2/3 or MARK...TUPLE, then <put>
    NEWFALSE|NEWTRUE                  requires_grad
    <get> ) R <put>                   backward hooks: OrderedDict()
    t <put> R <put>                   the argument tuple, REDUCE
"""

from __future__ import annotations

import re
import struct
from typing import Any

from ckptctl.formats.pickles.records import Global

_INT = rb"(?:K.|M..|J....)"  # BININT1, BININT2, BININT
_GET = rb"(h.|j....)"  # BINGET, LONG_BINGET
_PUT = rb"(q.|r....)"  # BINPUT, LONG_BINPUT
_TUPLE = rb"(?:\)|(" + _INT + rb"\x85|" + _INT * 2 + rb"\x86|" + _INT * 3 + rb"\x87|\(" + _INT + rb"*t)" + _PUT + rb")"
_ENTRY = re.compile(
    rb"\(" + _GET + _GET + rb"X(.{4})([0-9]{1,20})" + _PUT + _GET + rb"(" + _INT + rb")t" + _PUT + rb"Q"
    rb"(" + _INT + rb")" + _TUPLE + _TUPLE + rb"([\x88\x89])" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT,
    re.DOTALL,
)
_MISSING = object()
MAX_KEY = 1 << 16  # a state_dict key longer than this is left to the loop
u32 = struct.Struct("<I").unpack_from


def _int(tok: bytes) -> int:
    if tok[0] == 0x4B:
        return tok[1]
    if tok[0] == 0x4D:
        return tok[1] | tok[2] << 8
    return int.from_bytes(tok[1:], "little", signed=True)


def _tuple_of(body: bytes | None, cache: dict) -> tuple | None:
    """The ints of a matched tuple (None: one is negative; the loop raises the error)."""
    if body is None:
        return ()
    t = cache.get(body)
    if t is None:
        out = []
        i = 1 if body[0] == 0x28 else 0
        end = len(body) - 1
        while i < end:
            c = body[i]
            if c == 0x4B:
                out.append(body[i + 1])
                i += 2
            elif c == 0x4D:
                out.append(body[i + 1] | body[i + 2] << 8)
                i += 3
            else:
                v = int.from_bytes(body[i + 1 : i + 5], "little", signed=True)
                if v < 0:
                    return None
                out.append(v)
                i += 5
        t = cache[body] = tuple(out)
    return t


def _call(m: Any, func: Any, args: tuple, handlers: dict) -> Any:
    """m._call(func, args), the handler looked up once per global."""
    if type(func) is not Global:
        return m._call(func, args)
    h: Any = handlers.get(func)
    if h is None:
        h = handlers[func] = m._handler(func) or False
    return h(m, func, args, None) if h else m._call(func, args)


def torch_tensor_args(m: Any, data: bytes, pos: int, memo: dict, stack: list, cache: dict, handlers: dict) -> int:
    """At the MARK of a REDUCE's arguments (data[pos] is the next MARK): run the whole tensor
    sequence, leaving the result in stack[-1]; returns the position after it, or -1 when the
    bytes are not that sequence (then nothing was done). `cache`: sizes and strides parsed, by
    their bytes; `handlers`: the machine's rebuild handler of each global called (_call's lookup)."""
    mt = _ENTRY.match(data, pos)
    if mt is None or not stack:
        return -1
    (g_st, g_cls, klen, key_b, p_key, g_loc, numel_t, p_pid, off_t, shape_b, p_shape, stride_b, p_stride, rg, g_od,
     p_hooks, p_args, p_res) = mt.groups()  # fmt: skip
    if int.from_bytes(klen, "little") != len(key_b):
        return -1
    # memo indices: BINGET/BINPUT carry one byte, LONG_ ones four (inline: 10 of them per tensor)
    k_key = p_key[1] if len(p_key) == 2 else u32(p_key, 1)[0]
    k_pid = p_pid[1] if len(p_pid) == 2 else u32(p_pid, 1)[0]
    k_loc = g_loc[1] if len(g_loc) == 2 else u32(g_loc, 1)[0]
    k_od = g_od[1] if len(g_od) == 2 else u32(g_od, 1)[0]
    k_shape = None if p_shape is None else p_shape[1] if len(p_shape) == 2 else u32(p_shape, 1)[0]
    k_stride = None if p_stride is None else p_stride[1] if len(p_stride) == 2 else u32(p_stride, 1)[0]
    # the references must not name an entry this sequence writes before them (then the loop
    # would read the new value): rare enough to leave to the loop
    if k_loc == k_key or k_od == k_key or k_od == k_pid or k_od == k_shape or k_od == k_stride:
        return -1
    get = memo.get
    storage_s = get(g_st[1] if len(g_st) == 2 else u32(g_st, 1)[0], _MISSING)
    cls = get(g_cls[1] if len(g_cls) == 2 else u32(g_cls, 1)[0], _MISSING)
    loc, od = get(k_loc, _MISSING), get(k_od, _MISSING)
    if storage_s is _MISSING or cls is _MISSING or loc is _MISSING or od is _MISSING:
        return -1
    numel = numel_t[1] if numel_t[0] == 0x4B else _int(numel_t)
    offset = off_t[1] if off_t[0] == 0x4B else _int(off_t)
    shape = () if shape_b is None else cache.get(shape_b) or _tuple_of(shape_b, cache)
    stride = () if stride_b is None else cache.get(stride_b) or _tuple_of(stride_b, cache)
    if numel < 0 or offset < 0 or shape is None or stride is None:
        return -1
    # the effects, in the loop's order
    key = key_b.decode("ascii")
    memo[k_key] = key
    pid = (storage_s, cls, key, loc, numel)
    memo[k_pid] = pid
    load = m.persistent_load
    storage = load(pid) if load is not None else m._persistent(pid)
    if k_shape is not None:
        memo[k_shape] = shape
    if k_stride is not None:
        memo[k_stride] = stride
    hooks = _call(m, od, (), handlers)
    memo[p_hooks[1] if len(p_hooks) == 2 else u32(p_hooks, 1)[0]] = hooks
    args = (storage, offset, shape, stride, rg == b"\x88", hooks)
    memo[p_args[1] if len(p_args) == 2 else u32(p_args, 1)[0]] = args
    v = stack[-1] = _call(m, stack[-1], args, handlers)
    memo[p_res[1] if len(p_res) == 2 else u32(p_res, 1)[0]] = v
    return mt.end()


def torch_entries(m: Any, data: bytes, pos: int, memo: dict, stack: list, cache: dict, handlers: dict) -> int:
    """torch_tensor_args at `pos`, then as long as the next bytes are another entry of a
    state_dict (its key: BINUNICODE and BINPUT; the rebuild function: BINGET; then MARK MARK),
    that entry too, opcode by opcode as the loop would run them. Returns the position the loop
    goes on from (every opcode before it done), or -1 when nothing was done."""
    end = torch_tensor_args(m, data, pos, memo, stack, cache, handlers)
    if end < 0:
        return -1
    n = len(data)
    while end + 5 <= n and data[end] == 0x58:  # BINUNICODE
        ln = u32(data, end + 1)[0]
        q = end + 5 + ln
        if ln > MAX_KEY or q + 7 > n:  # long (or cut by the buffer's end): the loop's business
            return end
        try:
            key = str(data[end + 5 : q], "utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return end
        stack.append(key)
        c = data[q]
        if c == 0x72:  # LONG_BINPUT
            memo[u32(data, q + 1)[0]] = key
            q += 5
        elif c == 0x71:  # BINPUT
            memo[data[q + 1]] = key
            q += 2
        else:
            return q
        if q + 5 > n:
            return q
        c = data[q]
        if c == 0x6A:  # LONG_BINGET
            k = u32(data, q + 1)[0]
            r = q + 5
        elif c == 0x68:  # BINGET
            k = data[q + 1]
            r = q + 2
        else:
            return q
        v = memo.get(k, _MISSING)
        if v is _MISSING:
            return q
        stack.append(v)
        if r + 2 > n or data[r] != 0x28 or data[r + 1] != 0x28:
            return r
        end = torch_tensor_args(m, data, r + 1, memo, stack, cache, handlers)
        if end < 0:
            return r
    return end
