"""Dynamic shell completion: tensor names for --filter/--include, metric names for --keep-best/--sort.

Each completer is an `autocompletion=` callback of a typer.Option. It looks at the command line
typed so far (the parsed `ctx.params`, then the raw `args`) for a checkpoint path or a run
folder, reads only metadata (a header, a pickle), and returns the names that start with what is
being typed. A completer never raises and never prints: any problem means "no completions".

Wiring, in a command module:

    from ckptctl.cli.complete import complete_tensor_names
    typer.Option("--filter", autocompletion=complete_tensor_names, ...)

This module is imported by every command module, so it imports nothing heavy at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer

# More matches than this and the completer offers the next name level ("encoder.layers.")
# instead of every tensor: a 70B model has thousands of names.
MAX_ITEMS = 200
# at most this many checkpoints on the command line are opened for names (diff A B)
MAX_PATHS = 2
_SEPARATORS = "./"


def complete_tensor_names(ctx: typer.Context, args: list[str], incomplete: str) -> list[str]:
    """Tensor names of the checkpoint(s) already on the command line that start with `incomplete`."""
    try:
        names: list[str] = []
        seen: set[str] = set()
        for path in _candidate_paths(ctx, args, want_dir=False)[:MAX_PATHS]:
            for name in tensor_names(path):
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        return narrow(names, incomplete or "")
    except Exception:  # a completer must never crash the shell
        return []


def complete_metric_names(ctx: typer.Context, args: list[str], incomplete: str) -> list[str]:
    """Metric names found in the run folder already on the command line (via ops.runs.discover)."""
    try:
        for path in _candidate_paths(ctx, args, want_dir=True):
            names = metric_names(path)
            if names:
                prefix = incomplete or ""
                return [n for n in names if n.startswith(prefix)]
        return []
    except Exception:
        return []


def metric_completer(*fixed: str):
    """A completer offering `fixed` keys first (`ls --sort step|mtime|size|METRIC`), then metrics."""

    def complete(ctx: typer.Context, args: list[str], incomplete: str) -> list[str]:
        try:
            names = list(fixed) + [m for m in complete_metric_names(ctx, args, "") if m not in fixed]
            return [n for n in names if n.startswith(incomplete or "")]
        except Exception:
            return list(fixed)

    return complete


def complete_key_paths(ctx: typer.Context, args: list[str], incomplete: str) -> list[str]:
    """Sub-tree paths (`state_dict`, `optimizer_states/0`) of the checkpoint on the command line,
    for `--key`: every '/'-joined prefix of its tensor names."""
    try:
        keys: list[str] = []
        seen: set[str] = set()
        for path in _candidate_paths(ctx, args, want_dir=False)[:MAX_PATHS]:
            for name in tensor_names(path):
                parts = name.split("/")
                for i in range(1, len(parts)):
                    k = "/".join(parts[:i])
                    if k not in seen:
                        seen.add(k)
                        keys.append(k)
        return [k for k in keys if k.startswith(incomplete or "")][:MAX_ITEMS]
    except Exception:
        return []


def complete_name_prefixes(ctx: typer.Context, args: list[str], incomplete: str) -> list[str]:
    """Name prefixes ending at a separator (`model.`, `module.encoder.`, `state_dict/`), for
    `--strip-prefix`: the next level after what is typed."""
    try:
        names: list[str] = []
        for path in _candidate_paths(ctx, args, want_dir=False)[:MAX_PATHS]:
            names.extend(tensor_names(path))
        return [p for p in narrow(names, incomplete or "", limit=0) if p and p[-1] in _SEPARATORS]
    except Exception:
        return []


# ---- the pieces, testable on their own ----------------------------------------------------------
def tensor_names(path: str | os.PathLike) -> list[str]:
    """Every tensor name of one checkpoint, from its metadata only; [] on any error."""
    try:
        from ckptctl.formats import open_reader

        reader = open_reader(path)
        try:
            info = reader.info()
        finally:
            reader.close()
        return [t.name for t in info.tensors if _completable(t.name)]
    except Exception:
        return []


def metric_names(run_dir: str | os.PathLike) -> list[str]:
    """Metric names of the checkpoints in a run folder, sorted; [] when ops.runs is absent or fails."""
    try:
        import importlib

        runs = importlib.import_module("ckptctl.ops.runs")
        discover = getattr(runs, "discover", None)
        if discover is None:
            return []
        found = discover(Path(run_dir))
        names: set[str] = set()
        for item in _as_items(found):
            metrics = item.get("metrics") if isinstance(item, dict) else getattr(item, "metrics", None)
            if isinstance(metrics, dict):
                names.update(str(k) for k in metrics if _completable(str(k)))
        return sorted(names)
    except Exception:
        return []


def narrow(names: Iterable[str], incomplete: str, limit: int = MAX_ITEMS) -> list[str]:
    """Names starting with `incomplete`; when there are too many, the next level of prefixes.

    `--filter` takes a prefix as well as a glob, so `encoder.` is a useful completion in itself.
    A glob being typed (`*`, `?`, `[`) gets no completions.
    """
    if any(ch in incomplete for ch in "*?["):
        return []
    hits = [n for n in names if n.startswith(incomplete)]
    if len(hits) <= limit:
        return hits
    out: list[str] = []
    seen: set[str] = set()
    for n in hits:
        cut = _next_separator(n, len(incomplete))
        p = n[: cut + 1] if cut >= 0 else n
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _next_separator(name: str, start: int) -> int:
    idx = [i for i in (name.find(s, start) for s in _SEPARATORS) if i >= 0]
    return min(idx) if idx else -1


def _completable(name: str) -> bool:
    # a shell cannot take a completion with a newline or escape in it; such names are skipped
    return bool(name) and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)


def _as_items(found) -> Iterator:
    if found is None:
        return iter(())
    if isinstance(found, dict):
        return iter(found.values())
    for attr in ("checkpoints", "items", "entries"):
        inner = getattr(found, attr, None)
        if isinstance(inner, (list, tuple)):
            return iter(inner)
    return iter(found)


def _candidate_paths(ctx: typer.Context | None, args: list[str] | None, want_dir: bool) -> list[Path]:
    """Existing paths on the command line: parsed parameters first, then the raw words."""
    out: list[Path] = []
    values: list = []
    words = set((getattr(ctx, "command_path", "") or "").split()) if ctx is not None else set()
    if ctx is not None:
        for v in (getattr(ctx, "params", None) or {}).values():
            values.extend(v if isinstance(v, (list, tuple)) else [v])
        values.extend(getattr(ctx, "args", None) or [])
    values.extend(a for a in (args or []) if not str(a).startswith("-"))
    for v in values:
        if not isinstance(v, (str, os.PathLike)) or isinstance(v, bool):
            continue
        s = os.fspath(v)
        if not s or s.startswith("-") or s in words:
            continue
        p = Path(os.path.expanduser(s))
        try:
            ok = p.is_dir() if want_dir else p.exists()
        except OSError:
            ok = False
        if ok and p not in out:
            out.append(p)
    return out
