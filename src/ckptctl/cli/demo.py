"""`ckptctl demo DIR`: write a small sample of training runs to try every command on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli.common import handle_errors

EXAMPLES = "[bold]Examples[/]\n\n  ckptctl demo ./demo-run\n\n  ckptctl demo ./demo-run && ckptctl ls ./demo-run/hf-run"


def register(app: typer.Typer) -> None:
    @app.command(
        "demo",
        help="Write a small sample of training runs (an HF Trainer run, a Lightning run, and one "
        "file in each format, a few MB in all) to try every command on.",
        short_help="Write a small sample run to try every command on.",
        epilog=EXAMPLES,
    )
    @handle_errors
    def demo_cmd(
        directory: Annotated[Path, typer.Argument(help="Where to write the sample (created if missing).")],
        force: Annotated[bool, typer.Option("--force", help="Write into a folder that is not empty.")] = False,
    ) -> None:
        from ckptctl.ops.demo import write_demo

        write_demo(directory, force=force)
        print((directory / "README.txt").read_text(), end="")
