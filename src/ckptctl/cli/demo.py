"""`ckptctl demo DIR` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo", help="(not built yet)")
    def _stub() -> None:
        raise typer.Exit(2)
