"""Shared CLI plumbing: the error boundary every command runs inside, and shared options."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.complete import complete_name_prefixes, complete_tensor_names
from ckptctl.errors import CkptError, UsageError
from ckptctl.sources import as_path, is_remote, redact


def debug_enabled() -> bool:
    return os.environ.get("CKPTCTL_DEBUG", "") not in ("", "0")


def handle_errors(fn: Callable | None = None, *, error_code: int | None = None):
    """Turn every failure into one line on stderr and an exit code; never a traceback.

    `error_code` overrides the exit code of failures (diff uses 2, like diff(1)).
    CKPTCTL_DEBUG=1 prints the traceback as well.
    """

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                return _inner(*args, **kwargs)
            finally:
                _remote_summary()

        def _inner(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except typer.Exit:
                raise
            except CkptError as e:
                _report(str(e))
                raise typer.Exit(error_code or e.exit_code) from None
            except KeyboardInterrupt:
                _report("interrupted")
                raise typer.Exit(130) from None
            except BrokenPipeError:
                # the reader of our stdout went away (`| head`): stop quietly
                try:
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
                except OSError:
                    pass
                raise typer.Exit(error_code or 1) from None
            except MemoryError:
                _report("out of memory")
                raise typer.Exit(error_code or 1) from None
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                _report(f"{where}{e.strerror or e}")
                raise typer.Exit(error_code or 1) from None
            except Exception as e:  # a bug of ours: still one line, and how to see more
                _report(f"internal error: {type(e).__name__}: {e} (CKPTCTL_DEBUG=1 shows the traceback)")
                raise typer.Exit(error_code or 1) from None

        return wrapper

    return deco(fn) if fn is not None else deco


def check_paths(*paths: str | os.PathLike | list | tuple | None) -> None:
    """Refuse the first input path that does not exist, before any other logic runs.

    Called at the top of every command that reads input paths, so that a typo gets
    `no such file or directory: X` (a usage error, exit 2) instead of whatever the command's
    own checks would say about the other arguments. A dangling symlink counts as missing; other
    failures (a path through a file, permission denied) are left to the command.
    Accepts single paths, lists of paths (None items and lists are skipped/flattened).
    """
    for p in paths:
        if p is None:
            continue
        if isinstance(p, (list, tuple)):
            check_paths(*p)
            continue
        if is_remote(p):
            continue  # a URL: the reader reports a missing object (one request, not two)
        try:
            os.stat(p)
        except FileNotFoundError:
            from ckptctl.formats import names_something

            if not names_something(p):  # a TF checkpoint is named by its prefix, not a file
                raise UsageError(f"no such file or directory: {os.fspath(p)}") from None
        except (OSError, ValueError):
            pass  # not a directory, permission denied, ...: the command reports it (exit 1)


def refuse_remote(what: str, *paths) -> None:
    """One line (exit 2) when a command that does not read remote storage yet gets a URL."""
    for p in paths:
        if isinstance(p, (list, tuple)):
            refuse_remote(what, *p)
        elif p is not None and is_remote(p):
            raise UsageError(f"{what} on remote storage ({as_path(p)}) is not supported yet")


def _remote_summary() -> None:
    """-v: what remote storage cost this command (ranged GETs and bytes received)."""
    from ckptctl.sources import STATS

    if STATS["requests"]:
        output.debug(f"remote: {STATS['requests']} ranged requests, {STATS['bytes']:,} bytes received")
    if STATS.get("sent"):
        output.debug(f"remote: {STATS['sent']:,} bytes uploaded in {STATS.get('parts', 0)} parts")


def _report(msg: str) -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    output.error(redact(msg))  # never a storage-option secret or a credential from the environment


FormatOpt = Annotated[
    output.Fmt,
    typer.Option("--format", "-f", help="Output format: table, json, csv or markdown.", case_sensitive=False),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Show long names in full instead of eliding them.")]

# Name selection, the same on every command that picks tensors (convert, diff, average).
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        "--filter",
        "-k",
        autocompletion=complete_tensor_names,
        help="Only tensors matching this glob (or module prefix); repeatable.",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        "-x",
        autocompletion=complete_tensor_names,
        help="Leave out tensors matching this glob; repeatable.",
    ),
]
StripPrefixOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--strip-prefix",
        autocompletion=complete_name_prefixes,
        help="Remove this name prefix (e.g. module.) where present; repeatable.",
    ),
]
