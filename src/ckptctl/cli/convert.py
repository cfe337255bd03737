"""`ckptctl convert` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert", help="(not built yet)")
    def _stub() -> None:
        typer.echo("ckptctl convert: not built yet", err=True)
        raise typer.Exit(2)
