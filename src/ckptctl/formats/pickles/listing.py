"""A semantics-free listing of the globals a pickle names (picklescan's way: opcodes only), the
fallback for pickles that fail."""

from __future__ import annotations

from typing import Any

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
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
