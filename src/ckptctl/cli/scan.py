"""`ckptctl scan PATH...`: the globals pickle-based checkpoints ask for, and whether they can run code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import FormatOpt, check_paths, handle_errors
from ckptctl.cli.output import Column, Fmt
from ckptctl.errors import UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl scan downloaded/pytorch_model.bin\n\n"
    "  ckptctl scan checkpoints/ --format json | jq '.[] | select(.verdict != \"safe\")'\n\n"
    "  ckptctl scan model.pt && python train.py --resume model.pt"
)

HELP = (
    "List the globals (module.name) that pickle-based checkpoints (.pt, .pth, .bin, .ckpt, .pkl, DCP "
    "folders) ask for, each classified [bold]safe[/] (ckptctl understands it: tensor rebuilds, storages, "
    "dtypes, OrderedDict, numpy arrays), [bold]unknown[/] (a class ckptctl does not know, e.g. "
    "argparse.Namespace) or [bold]dangerous[/] (can run code, touch files, processes or the network "
    "when the file is loaded with pickle or torch.load: os.system, builtins.eval, subprocess, ...). "
    "Every pickle in a file is walked: pickles back to back, every pickle member of a zip, a pickle "
    "before a zip or in its comment, pickles nested as bytes (pickle.loads, torch.storage._load_from_bytes, "
    "numpy object arrays). Nothing in the files is run. safetensors and HDF5 files are 'safe (no pickle)'. Folders are "
    "walked for checkpoint files.\n\n"
    "Exit status: 0 when nothing is dangerous (unknown globals are reported but do not fail), "
    "1 when any file asks for a dangerous global or could not be read."
)

COLUMNS = [
    Column("path", "path", name_like=True),
    Column("verdict", "verdict"),
    Column("global", "global", name_like=True),
    Column("class", "class"),
]
NOTE = Column("note", "note", name_like=True)


def _verdict_text(r) -> str:
    if r.verdict == "safe" and not r.pickle and r.error is None:
        return "safe (no pickle)"
    return r.verdict


def _with_where(r, name: str) -> str:
    """'os.system (in member archive/extra.pkl)' when it was found somewhere other than the file's pickle."""
    places = [w for w in r.where.get(name, []) if w != "pickle"]
    return f"{name} (in {'; '.join(places[:3])})" if places else name


def _rows(results, repeat: bool, all_globals: bool = True) -> list[dict]:
    rows: list[dict] = []
    for r in results:
        note = r.error if r.error else (r.note or "")
        head = {"path": r.path, "verdict": _verdict_text(r), "note": note}
        shown = r.globals if all_globals else [(n, c) for n, c in r.globals if c != "safe"]
        hidden = len(r.globals) - len(shown)
        if hidden:
            shown = [*shown, (f"(+{hidden} safe: --all-globals)", "safe")]
        if not shown:
            rows.append({**head, "global": "", "class": ""})
            continue
        for i, (name, cls) in enumerate(shown):
            if i == 0 or repeat:
                rows.append({**head, "global": name, "class": cls})
            else:
                rows.append({"path": "", "verdict": "", "note": "", "global": name, "class": cls})
    return rows


def register(app: typer.Typer) -> None:
    @app.command("scan", help=HELP, short_help="Security verdict for pickle-based checkpoints.", epilog=EXAMPLES)
    @handle_errors
    def scan_cmd(
        paths: Annotated[list[Path], typer.Argument(help="Checkpoint files or folders (walked for checkpoint files).")],
        fmt: FormatOpt = Fmt.table,
        all_globals: Annotated[
            bool,
            typer.Option(
                "--all-globals",
                "-a",
                help="List safe globals too (tables list only unknown and "
                "dangerous ones; csv and json always list all).",
            ),
        ] = False,
    ) -> None:
        check_paths(paths)  # first: a typo says so
        from ckptctl.ops.scan import scan

        if not paths:
            raise UsageError("name at least one file or folder to scan")
        results = scan(list(paths))
        if not results:
            output.warn("no checkpoint files found in " + ", ".join(str(p) for p in paths))
        if fmt == Fmt.json:
            output.print_json([r.to_json() for r in results])
        else:
            cols = COLUMNS + ([NOTE] if any(r.error or r.note for r in results) else [])
            full = all_globals or fmt == Fmt.csv
            output.render_rows(_rows(results, repeat=fmt == Fmt.csv, all_globals=full), cols, fmt.value)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        if results:
            parts = [f"{counts[v]} {v}" for v in ("dangerous", "unknown", "safe", "error") if counts.get(v)]
            output.note(f"scanned {len(results)} file{'s' if len(results) != 1 else ''}: " + ", ".join(parts))
        bad = [r for r in results if r.verdict == "dangerous"]
        for r in bad:
            names = ", ".join(_with_where(r, n) for n, c in r.globals if c == "dangerous")
            output.error(f"{r.path}: UNSAFE: asks for {names}; do not load it with pickle or torch.load")
        failed = [r for r in results if r.verdict == "error"]
        if bad or failed:
            raise typer.Exit(1)
