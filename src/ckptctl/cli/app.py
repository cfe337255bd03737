"""The Typer app: wires the commands together. Each command lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptctl import __version__
from ckptctl.cli import output

HELP = (
    "Inspect, diff, convert, prune and average ML checkpoints: fast, safe, exact.\n\n"
    "Reads PyTorch (.pt/.pth/.bin/.ckpt, zip and legacy), safetensors, HDF5/Keras (.h5), "
    "HF sharded folders and torch.distributed.checkpoint folders, without running any code "
    "from the files."
)

app = typer.Typer(
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
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour (also: NO_COLOR=1).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")] = False,
) -> None:
    output.STATE.no_color = no_color
    output.STATE.quiet = quiet
    output.STATE.verbose = verbose
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
    app()
