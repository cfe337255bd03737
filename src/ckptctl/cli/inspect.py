"""`ckptctl inspect PATH`: tensors, metadata and totals of one checkpoint."""

from __future__ import annotations

import json
import operator
import sys
from enum import Enum
from itertools import repeat
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import WideOpt, check_paths, handle_errors
from ckptctl.cli.complete import complete_key_paths, complete_tensor_names
from ckptctl.cli.output import Column, InspectFmt, clean, human_bytes, human_count
from ckptctl.errors import UsageError

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl inspect model.safetensors\n\n"
    "  ckptctl inspect last.ckpt --filter 'state_dict/encoder.*' --sort size\n\n"
    "  ckptctl inspect last.ckpt --key optimizer_states/0\n\n"
    "  ckptctl inspect checkpoint-500/ --format json | jq .num_params"
)


def _set_raw_names(ctx: typer.Context, value: bool) -> bool:
    from ckptctl.formats import READER_OPTIONS

    if value:  # every reader this command opens (open_reader), until the command ends
        READER_OPTIONS["raw_names"] = True
        ctx.call_on_close(lambda: READER_OPTIONS.pop("raw_names", None))
    return value


RawNamesOpt = Annotated[
    bool,
    typer.Option(
        "--raw-names",
        callback=_set_raw_names,
        help="Name a pickled nn.Module (or optimizer) by its pickle paths (_modules/0/_parameters/weight) "
        "instead of its state_dict() names (0.weight).",
    ),
]


class SortKey(str, Enum):
    order = "order"
    name = "name"
    size = "size"


TENSOR_COLUMNS = [
    Column("name", "name", name_like=True),
    Column("dtype", "dtype"),
    Column("shape", "shape", human=lambda s: "[" + ", ".join(map(str, s)) + "]" if s else "[]"),
    Column("numel", "params", human=human_count, justify="right"),
    Column("nbytes", "bytes", human=human_bytes, justify="right"),
    Column("alias_of", "tied to", human=lambda a: clean(a) if a else ""),
]

_ALIAS_OF = operator.attrgetter("alias_of")
FOLD_ABOVE = 1000  # tables of more rows are folded unless --no-fold (--fold: at any size)
# a folded table: a row may stand for many tensors (ops/inspect.py fold); params and bytes are its totals
FOLDED_COLUMNS = [
    TENSOR_COLUMNS[0],
    Column("count", "tensors", human=lambda n: f"{n:,}", justify="right"),
    *TENSOR_COLUMNS[1:],
]


def register(app: typer.Typer) -> None:
    @app.command(
        "inspect",
        help="Show the tensors (name, dtype, shape, bytes), metadata and totals of a checkpoint. "
        "Of a training checkpoint (Lightning .ckpt, a dict of model + optimizer) the model weights are "
        "shown and counted, as convert and average take them and ls counts them; --all shows every "
        "tensor, --key PATH one part. Reads headers and pickles only: no tensor data, no code from the file.",
        short_help="Tensors, metadata and totals of one checkpoint.",
        epilog=EXAMPLES,
    )
    @handle_errors
    def inspect_cmd(
        path: Annotated[Path, typer.Argument(help="A checkpoint file or folder (sharded, DCP, checkpoint-N/).")],
        fmt: Annotated[
            InspectFmt, typer.Option("--format", "-f", help="table, tree, json, csv or markdown.", case_sensitive=False)
        ] = InspectFmt.table,
        filters: Annotated[
            list[str] | None,
            typer.Option(
                "--filter",
                "-k",
                help="Only tensors whose name matches this glob (repeatable).",
                autocompletion=complete_tensor_names,
            ),
        ] = None,
        sort: Annotated[SortKey, typer.Option("--sort", help="order (as stored), name or size.")] = SortKey.order,
        key: Annotated[
            str | None,
            typer.Option(
                "--key",
                autocompletion=complete_key_paths,
                metavar="PATH",
                help="Show only the sub-tree PATH (e.g. optimizer_states/0).",
            ),
        ] = None,
        all_: Annotated[
            bool,
            typer.Option(
                "--all",
                help="Training checkpoints: show every tensor (optimizer state, ...), not just the model weights.",
            ),
        ] = False,
        fold: Annotated[
            bool | None,
            typer.Option(
                "--fold/--no-fold",
                help="Table and markdown: one row for tensors whose names differ only in numbers "
                "(layers.{0..59}.experts.{0..255}.w1) and that share dtype and shape; params and bytes are "
                f"the row's totals. Default: folded above {FOLD_ABOVE:,} rows. JSON and CSV always list "
                "every tensor.",
            ),
        ] = None,
        wide: WideOpt = False,
        raw_names: RawNamesOpt = False,
    ) -> None:
        check_paths(path)  # first: a typo says so
        from ckptctl.ops.inspect import inspect

        output.STATE.wide = output.STATE.wide or wide
        if key is not None and all_:
            raise UsageError("--key and --all do not go together")
        result = inspect(path, filters, sort.value, key=key, all_=all_)
        info = result.info
        if result.left_out:
            n, total = result.num_tensors, len(info.tensors)
            if result.part_kind == "key":
                output.note(f"showing --key {result.root}: {n} of {total} tensors; --all for every tensor")
            else:
                where = f" under {result.root}/" if result.root else ""
                output.note(
                    f"showing model weights{where}: {n} of {total} tensors; --all for optimizer state and the rest"
                )
        if result.dangerous:  # one loud line naming every dangerous call; a warning, not an error:
            # inspect did its job (nothing was run); `scan` is the command whose exit code reports danger.
            # Printed even with -q: it is the one thing about this file the user must not miss.
            output.err_console().print(
                "[bold yellow]warning:[/] "
                + output.markup_safe(
                    f"{info.path}: UNSAFE pickle: it asks for {', '.join(result.dangerous)}, which can run code "
                    "when loaded with pickle or torch.load. Nothing was run; do not torch.load this file "
                    "(`ckptctl scan` exits 1 on it; `ckptctl convert` to safetensors gets the weights)."
                )
            )
        for w in info.warnings:
            output.warn(f"{info.path}: {w}")
        if filters and not result.tensors:
            output.warn(f"no tensor matches {', '.join(filters)}")
        if fmt in (InspectFmt.table, InspectFmt.markdown) and (
            fold or (fold is None and len(result.tensors) > FOLD_ABOVE)
        ):
            from ckptctl.ops.inspect import fold as fold_rows

            folds = fold_rows(result.tensors)
            if len(folds) < len(result.tensors):
                _summary(info, result, markdown=fmt == InspectFmt.markdown, rows=len(folds))
                output.render_rows([f.row() for f in folds], FOLDED_COLUMNS, fmt.value)
                return
        if fmt == InspectFmt.json:
            doc = info.to_json(tensors=False)
            # totals of the part shown (the model weights by default), as `ls` counts them; when the
            # part is the whole file (the same TensorInfo objects in the same order, no tied weights),
            # the file's totals just computed are the part's (10^5 tensors: each is a pass over them)
            file_totals = (doc["num_tensors"], doc["num_params"], doc["total_bytes"], doc["dtypes"])
            same = (
                len(result.part) == len(info.tensors)
                and all(map(operator.is_, result.part, info.tensors))
                and not any(map(operator.is_not, map(_ALIAS_OF, info.tensors), repeat(None)))
            )
            doc.update(
                num_tensors=result.num_tensors,
                num_params=file_totals[1] if same else result.num_params,
                total_bytes=file_totals[2] if same else result.total_bytes,
                dtypes=dict(file_totals[3]) if same else result.dtype_mix,
            )
            doc["part"] = {
                "kind": result.part_kind,
                "root": result.root,
                "left_out": result.left_out,
                "file_num_tensors": file_totals[0],
                "file_num_params": file_totals[1],
                "file_total_bytes": file_totals[2],
            }
            doc["tensors"] = output.TensorRows(result.tensors)  # written from the fields, row by row
            if filters:
                doc["filter"] = filters
            doc["unsafe_globals"] = result.dangerous
            output.print_json(doc)
            return
        rows = [t.to_json() for t in result.tensors]
        if fmt == InspectFmt.csv:
            output.render_rows(rows, TENSOR_COLUMNS, "csv")
            return
        _summary(info, result, markdown=fmt == InspectFmt.markdown)
        if fmt == InspectFmt.tree:
            _tree(result)
        else:
            output.render_rows(rows, TENSOR_COLUMNS, fmt.value)


def _summary(info, result, markdown: bool, rows: int | None = None) -> None:
    dtype_mix = ", ".join(f"{d} ×{n}" for d, n in result.dtype_mix.items()) or "-"
    tied = sum(1 for t in result.part if t.alias_of)
    of = ""
    if result.left_out:
        what = f"--key {result.root}" if result.part_kind == "key" else "model weights"
        of = f" {what}, of {info.num_tensors} in the file (--all for every tensor)"
    num_params, total_bytes = result.num_params, result.total_bytes  # each a pass over the tensors
    lines = [
        ("path", info.path),
        ("format", info.format + (f" ({info.kind})" if info.kind and info.kind != info.format else "")),
        ("tensors", f"{result.num_tensors}" + (f" ({tied} tied)" if tied else "") + of),
        ("params", f"{human_count(num_params)} ({num_params:,})"),
        ("size", f"{human_bytes(total_bytes)} ({total_bytes:,} bytes)"),
        ("dtypes", dtype_mix),
    ]
    if len(info.files) > 1:
        lines.append(("files", str(len(info.files))))
    if len(result.tensors) != result.num_tensors:
        lines.append(("shown", f"{len(result.tensors)} of {result.num_tensors}"))
    if rows is not None:
        lines.append(
            (
                "rows",
                f"{rows:,} for {len(result.tensors):,} tensors (names that differ only in numbers, "
                "with one dtype and shape, share a row; --no-fold for one row per tensor)",
            )
        )
    for k, v in info.metadata.items():
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        if len(text) > 200 and not output.STATE.wide:
            text = text[:197] + "..."
        lines.append((f"meta {k}", text))
    for o in info.objects:
        lines.append(("object", f"{o.name or '/'}: {o.type}"))
    lines = [(clean(k), v) for k, v in lines]  # metadata keys come from the file too
    width = min(max(len(k) for k, _ in lines), 24)  # a long metadata key overflows, it does not push every value right
    out = sys.stdout
    if markdown:
        for k, v in lines:
            out.write(f"- **{k}**: {clean(v).replace('|', chr(92) + '|')}\n")
        out.write("\n")
        return
    if output.color_enabled(sys.stdout):
        con = output.out_console()
        for k, v in lines:
            con.print(f"[bold]{output.markup_safe(f'{k:<{width}}')}[/]  {output.markup_safe(v)}")
        con.print()
        return
    for k, v in lines:
        out.write(f"{k:<{width}}  {clean(v)}\n")
    out.write("\n")


def _tree(result) -> None:
    from ckptctl.ops.inspect import build_tree

    root = build_tree(result.tensors)

    def label(node) -> str:
        if node.tensor is not None:
            t = node.tensor
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            if t.alias_of is not None:
                return f"{clean(node.name)}  {t.dtype} {shape}  tied to {clean(t.alias_of)}"
            return f"{clean(node.name)}  {t.dtype} {shape}  {human_bytes(t.nbytes)}"
        return (
            f"{clean(node.name)}/  ({node.count} tensors, {human_count(node.numel)} params, {human_bytes(node.nbytes)})"
        )

    if output.color_enabled(sys.stdout):
        from rich.markup import escape
        from rich.tree import Tree

        def add(parent, node):
            for child in node.children.values():
                style = "" if child.tensor is not None else "bold"
                text = escape(label(child))
                sub = parent.add(f"[{style}]{text}[/]" if style else text)
                add(sub, child)

        tree = Tree(escape(f"{clean(result.info.path)}  ({root.count} tensors, {human_bytes(root.nbytes)})"))
        add(tree, root)
        output.out_console().print(tree)
        return

    lines: list[str] = [f"{clean(result.info.path)}  ({root.count} tensors, {human_bytes(root.nbytes)})"]

    def walk(node, prefix: str) -> None:
        kids = list(node.children.values())
        for i, child in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(prefix + ("└── " if last else "├── ") + label(child))
            walk(child, prefix + ("    " if last else "│   "))

    walk(root, "")
    sys.stdout.write("\n".join(lines) + "\n")
