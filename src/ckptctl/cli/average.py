"""`ckptctl average` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("average", help="(not built yet)")
    def _stub() -> None:
        typer.echo("ckptctl average: not built yet", err=True)
        raise typer.Exit(2)
