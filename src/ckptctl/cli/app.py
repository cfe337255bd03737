"""The Typer app: wires the commands together. Each command lives in its own module."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from ckptctl import __version__
from ckptctl.cli import output

HELP = (
    "Inspect, diff, convert, prune and average ML checkpoints: fast, safe, exact.\n\n"
    "Reads PyTorch (.pt/.pth/.bin/.ckpt, zip, legacy and TorchScript), safetensors, HDF5/Keras "
    "(.h5, .keras), HF sharded folders, torch.distributed.checkpoint folders, TensorFlow "
    "checkpoints, GGUF and Orbax, without running any code from the files; local paths or "
    "s3://, gs://, az://, hf:// and https:// URLs."
)

# Global flags also accepted after the command (`ckptctl convert ... -q`), unless that command
# has an option of the same name.
GLOBAL_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose", "--no-color": "no_color"}
# Global options with a value, also accepted after the command (`ckptctl inspect s3://b/x
# --storage-option anon=true`): they configure remote storage for every path of the command.
GLOBAL_VALUE_OPTIONS = ("--storage-option",)
_STORAGE_META = "ckptctl.storage_options"
# words people type for a command that is called something else here
SYNONYMS = {
    "list": "ls",
    "info": "inspect",
    "show": "inspect",
    "stat": "inspect",
    "cat": "inspect",
    "compare": "diff",
    "cmp": "diff",
    "export": "convert",
    "save": "convert",
    "mean": "average",
    "avg": "average",
    "merge": "average",
    "soup": "average",
    "rm": "prune",
    "clean": "prune",
    "gc": "prune",
    "check": "scan",
    "audit": "scan",
    "sample": "demo",
}
_GLOBAL_META = "ckptctl.global_flags"


class CkptctlGroup(TyperGroup):
    """Typer's group plus: global flags after the command, synonyms in "did you mean", and
    --no-color reaching Typer's own help and error panels."""

    def main(self, *args, **kwargs):
        plain_types(self)
        for cmd in self.commands.values():
            plain_types(cmd)
        saved = os.environ.get("NO_COLOR")
        try:
            return super().main(*args, **kwargs)
        finally:  # --no-color sets NO_COLOR for this invocation only (matters in-process)
            if saved is None:
                os.environ.pop("NO_COLOR", None)
            else:
                os.environ["NO_COLOR"] = saved

    def resolve_command(self, ctx, args):
        try:
            name, cmd, rest = super().resolve_command(ctx, args)
        except Exception as e:
            _suggest_synonym(e, args, self.commands)
            raise
        if cmd is not None and not ctx.resilient_parsing:
            rest, values = hoist_global_values(cmd, rest)
            if values:
                ctx.meta[_STORAGE_META] = values
            rest, found = hoist_global_flags(cmd, rest)
            if found:
                ctx.meta[_GLOBAL_META] = found
                if "no_color" in found:
                    os.environ["NO_COLOR"] = "1"
        return name, cmd, rest


# What the help's type column shows for repeatable options (Typer would say <list[str]>)
LIST_TYPES = {
    "--include": "<glob>",
    "--exclude": "<glob>",
    "--filter": "<glob>",
    "--strip-prefix": "<prefix>",
    "--rename": "<old=new>",
}


def plain_types(cmd) -> None:
    """The help's type column without Typer's Python types: nothing for flags (not `<bool>`), a
    placeholder for repeatable options (`<glob>`, not `<list[str]>`), `<path>...` for several
    path arguments (not `<list[Path]>`). An explicit metavar is left as it is."""
    if getattr(cmd, "_plain_types", False):
        return
    cmd._plain_types = True
    get_help_option = getattr(cmd, "get_help_option", None)
    if get_help_option is not None:  # -h/--help is made when help is shown, not in cmd.params

        def help_option(ctx, _orig=get_help_option):
            opt = _orig(ctx)
            if opt is not None:
                opt.display_type_rich = lambda ctx: None
            return opt

        cmd.get_help_option = help_option
    for p in getattr(cmd, "params", ()):
        if getattr(p, "metavar", None) is not None or not hasattr(p, "display_type_rich"):
            continue
        if getattr(p, "param_type_name", "") == "option" and (p.is_flag or p.count):
            p.display_type_rich = lambda ctx: None
        elif getattr(p, "multiple", False) or getattr(p, "nargs", 1) != 1:
            long = max(p.opts, key=len)
            label = LIST_TYPES.get(long)
            if label is None:
                label = p.display_type(None) if not getattr(p, "multiple", False) else "<text>"
                label = label.replace("<list[Path]>", "<path>").replace("<list[str]>", "<text>")
            if getattr(p, "param_type_name", "") == "argument":
                label += "..."
            p.display_type_rich = lambda ctx, label=label: label


def hoist_global_flags(cmd, args: list[str]) -> tuple[list[str], set[str]]:
    """Take the global flags out of a command's arguments (stopping at `--`).

    A flag the command defines itself stays with the command, and the word after an option that
    takes a value is that option's value, never a flag.
    """
    own: set[str] = set()
    takes_value: set[str] = set()
    for p in getattr(cmd, "params", ()):
        opts = [*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())]
        own.update(opts)
        if (
            getattr(p, "param_type_name", "") == "option"
            and not getattr(p, "is_flag", False)
            and not getattr(p, "count", False)
        ):
            takes_value.update(getattr(p, "opts", ()))
    rest: list[str] = []
    found: set[str] = set()
    skip = False
    for i, tok in enumerate(args):
        if skip:
            rest.append(tok)
            skip = False
            continue
        if tok == "--":
            rest.extend(args[i:])
            break
        if tok in GLOBAL_FLAGS and tok not in own:
            found.add(GLOBAL_FLAGS[tok])
            continue
        if tok in takes_value:
            skip = True
        rest.append(tok)
    return rest, found


def hoist_global_values(cmd, args: list[str]) -> tuple[list[str], list[str]]:
    """Take `--storage-option VALUE` / `--storage-option=VALUE` out of a command's arguments."""
    own = {o for p in getattr(cmd, "params", ()) for o in getattr(p, "opts", ())}
    rest: list[str] = []
    values: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            rest.extend(args[i:])
            break
        name = tok.split("=", 1)[0]
        if name in GLOBAL_VALUE_OPTIONS and name not in own:
            if "=" in tok:
                values.append(tok.split("=", 1)[1])
            elif i + 1 < len(args):
                values.append(args[i + 1])
                i += 1
            else:
                rest.append(tok)  # click then says the option needs a value
            i += 1
            continue
        rest.append(tok)
        i += 1
    return rest, values


def _suggest_synonym(e: Exception, args: list[str], commands) -> None:
    msg = getattr(e, "message", None)
    if not isinstance(msg, str) or not args or "No such command" not in msg or "Did you mean" in msg:
        return
    target = SYNONYMS.get(args[0].lower())
    if target and target in commands:
        # click's UsageError carries the message it prints (found above by getattr; click marks it Final)
        e.message = f"{msg.rstrip('.')}. Did you mean {target!r}?"  # type: ignore[attr-defined]


def _no_color(value: bool) -> bool:
    # eager, so that `ckptctl --no-color --help` is plain too
    if value:
        os.environ["NO_COLOR"] = "1"
    return value


app = typer.Typer(
    cls=CkptctlGroup,
    name="ckptctl",
    help=HELP,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    no_color: Annotated[
        bool, typer.Option("--no-color", callback=_no_color, is_eager=True, help="No colour (also: NO_COLOR=1).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")] = False,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            metavar="<key=value>",
            help="Option for remote storage (s3://, gs://, az://, hf://, https://), repeatable; "
            "e.g. anon=true, endpoint_url=http://host:9000. Credentials come from each "
            "SDK's usual environment (AWS_PROFILE, AWS_ENDPOINT_URL, HF_TOKEN, ...).",
        ),
    ] = None,
) -> None:
    after = ctx.meta.get(_GLOBAL_META, set())  # the same flags given after the command
    from ckptctl import sources

    try:  # a fresh remote configuration per invocation (matters in-process)
        sources.configure(list(storage_option or []) + list(ctx.meta.get(_STORAGE_META, [])))
    except Exception as e:  # noqa: BLE001 - a malformed KEY=VALUE: one line, exit 2
        output.error(str(e))
        raise typer.Exit(2) from None
    output.STATE.no_color = no_color or "no_color" in after
    output.STATE.quiet = quiet or "quiet" in after
    output.STATE.verbose = verbose or "verbose" in after
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        typer.echo("\nTip: `ckptctl demo ./demo-run` writes a small sample run to try every command on.")
        raise typer.Exit()


def _register() -> None:
    from ckptctl.cli import average, convert, demo, diff, inspect, ls, prune, scan

    for mod in (inspect, ls, diff, convert, prune, average, scan, demo):
        mod.register(app)


_register()


def main() -> None:
    # A short-lived process that builds 10^5-10^6 small objects (JSON headers, TensorInfo, rows)
    # and makes few cycles: with the default thresholds (700, 10, 10) the cyclic collector walked
    # the growing heap again and again, over half the CPU of `inspect` of 10^5 tensors (issue 13).
    # Memory is freed by reference counting as before; cycles are still collected, less often.
    import gc

    gc.set_threshold(50_000, 20, 10)
    # prog_name: `python -m ckptctl` shows and completes as `ckptctl` (_CKPTCTL_COMPLETE)
    app(prog_name="ckptctl")
