"""convert's metadata: what of the source's metadata is carried over (--metadata keep/all/drop)."""

from __future__ import annotations

import json
import re

from ckptctl.errors import UsageError

MAX_META_VALUE = 65536  # longer metadata values are not carried over
# metadata keys that describe the source container, not the weights: not carried over
CONTAINER_KEYS = {
    "byteorder",
    ".format_version",
    ".storage_alignment",
    "archive",
    "version",
    ".data/serialization_id",
    "serialization_id",
    "total_size",
    "protocol",
}

METADATA_MODES = ("keep", "all", "drop")
REDACTED = "<redacted>"
# an absolute local path inside a text: POSIX (/home/u/x, two parts at least, not the '//' of a URL),
# Windows (C:\x, C:/x) or a file: URL; it starts the text or follows a space, quote, '=', ':', ',', '(' or '['
_ABS_PATH = re.compile(
    r"""(?:(?<=^)|(?<=[\s"'=,(\[]))(?:file://)?(?:/(?!/)[^\s"',)\]/]+(?:/[^\s"',)\]]*)+|"""
    r"""[A-Za-z]:[\\/][^\s"',)\]]*)"""
)


def redact_paths(text: str) -> tuple[str, int]:
    """text with the folders of every absolute local path replaced by <redacted> (the file name,
    the part after the last separator, is kept): `/home/u/run/best.ckpt` -> `<redacted>/best.ckpt`."""
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        n += 1
        path = m.group(0).rstrip("/\\")
        tail = re.split(r"[/\\]", path)[-1]
        return f"{REDACTED}/{tail}" if tail and tail != path else REDACTED

    return _ABS_PATH.sub(repl, text), n


def _redact_value(v, counter: list[int]):
    if isinstance(v, str):
        out, n = redact_paths(v)
        counter[0] += n
        return out
    if isinstance(v, dict):
        return {_redact_value(str(k), counter): _redact_value(x, counter) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_redact_value(x, counter) for x in v]
    return v


def carry_metadata(meta: dict, notes: list[str], mode: str = "keep") -> dict[str, str]:
    """Source metadata as str -> str (JSON for other values); ckptctl's own keys are rebuilt.

    mode "keep" (the default) copies it with absolute local paths redacted (see redact_paths),
    "all" copies it verbatim, "drop" copies nothing (the writer still adds what its format needs,
    e.g. safetensors' {"format": "pt"})."""
    if mode not in METADATA_MODES:
        raise UsageError(f"--metadata {mode!r}: use keep (absolute paths redacted), all or drop")
    if mode == "drop":
        if any(not str(k).startswith("ckptctl.") and k not in CONTAINER_KEYS for k in meta):
            notes.append("--metadata drop: the source's metadata is not copied")
        return {}
    out: dict[str, str] = {}
    dropped = []
    redacted = [0]
    for k, v in meta.items():
        k = str(k)
        if k.startswith("ckptctl.") or k in CONTAINER_KEYS:
            continue
        if mode == "keep":
            k, v = _redact_value(k, redacted), _redact_value(v, redacted)
        s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        if len(s) > MAX_META_VALUE:
            dropped.append(k)
            continue
        out[k] = s
    if dropped:
        notes.append(f"metadata not carried over (values over {MAX_META_VALUE // 1024} KiB): {', '.join(dropped)}")
    if redacted[0]:
        notes.append(
            f"metadata: {redacted[0]} absolute local path{'s' if redacted[0] != 1 else ''} redacted "
            f"to {REDACTED}/<file name> (--metadata all copies them, --metadata drop copies no metadata)"
        )
    return out
