"""`ckptctl convert SRC DST`: lossless, streaming conversion between PyTorch, safetensors and HDF5."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import ExcludeOpt, IncludeOpt, StripPrefixOpt, check_paths, handle_errors
from ckptctl.cli.complete import complete_key_paths
from ckptctl.cli.inspect import RawNamesOpt
from ckptctl.cli.output import human_bytes

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl convert pytorch_model.bin model.safetensors\n\n"
    "  ckptctl convert last.ckpt weights.safetensors --strip-prefix model. --dtype bf16\n\n"
    "  ckptctl convert model.safetensors out/ --to pt --max-shard-size 2GB"
)

HELP = (
    "Convert a checkpoint to safetensors, PyTorch (.pt/.pth/.bin) or HDF5 (.h5), tensor by tensor: "
    "bytes, dtypes (bf16, fp8, ...), shapes and tied weights survive; memory stays flat. The output "
    "format comes from DST's suffix or --to. From a training checkpoint (Lightning .ckpt, any dict "
    "with a state_dict) the model weights are written. The output is written to a temporary file, "
    "renamed when complete and then re-read and compared with the source."
)


class MetadataMode(str, Enum):
    keep = "keep"
    all = "all"
    drop = "drop"


def register(app: typer.Typer) -> None:
    @app.command(
        "convert", help=HELP, short_help="Convert between PyTorch, safetensors and HDF5, exactly.", epilog=EXAMPLES
    )
    @handle_errors
    def convert_cmd(
        src: Annotated[Path, typer.Argument(help="Checkpoint file or folder (sharded, DCP, checkpoint-N/).")],
        dst: Annotated[
            Path,
            typer.Argument(
                help="Output file (.safetensors, .pt/.pth/.bin/.ckpt, .h5/.hdf5), or a folder with --max-shard-size."
            ),
        ],
        to: Annotated[
            str | None, typer.Option("--to", help="Output format: safetensors, pt or h5 (default: from DST's suffix).")
        ] = None,
        key: Annotated[
            str | None,
            typer.Option(
                "--key",
                autocompletion=complete_key_paths,
                help="Write only the sub-tree PATH, without the PATH/ prefix (e.g. optimizer_states/0).",
            ),
        ] = None,
        all_: Annotated[
            bool, typer.Option("--all", help="Write every tensor of a training checkpoint under its '/'-joined name.")
        ] = False,
        include: IncludeOpt = None,
        exclude: ExcludeOpt = None,
        strip_prefix: StripPrefixOpt = None,
        add_prefix: Annotated[str | None, typer.Option("--add-prefix", help="Prepend this to every name.")] = None,
        rename: Annotated[
            list[str] | None,
            typer.Option(
                "--rename", help="OLD=NEW: regex substitution on names (applied after --strip-prefix); repeatable."
            ),
        ] = None,
        dtype: Annotated[
            str | None,
            typer.Option(
                "--dtype",
                help="Cast floating tensors to this dtype "
                "(bf16, fp16, fp32, fp64, fp8_e4m3, fp8_e5m2); ints and "
                "bools are kept.",
            ),
        ] = None,
        max_shard_size: Annotated[
            str | None,
            typer.Option(
                "--max-shard-size",
                help="Write HF-style shards of at most this size (5GB, 500MiB) plus the index into the folder DST.",
            ),
        ] = None,
        dedupe_tied: Annotated[
            bool,
            typer.Option(
                "--dedupe-tied",
                help="Store tied weights once and record the aliases in the file's metadata (safetensors).",
            ),
        ] = False,
        verify: Annotated[
            bool,
            typer.Option(
                "--verify/--no-verify", help="Re-read the output and compare every tensor's bytes with the source."
            ),
        ] = True,
        force: Annotated[bool, typer.Option("--force", help="Overwrite DST if it exists.")] = False,
        metadata: Annotated[
            MetadataMode,
            typer.Option(
                "--metadata",
                case_sensitive=False,
                help="The source's file metadata (training state, hyper-parameters, ...): keep copies it with "
                "every absolute local path's folders replaced by <redacted>/ (the file name is kept); all "
                "copies it verbatim; drop copies none (the format's own entries, e.g. safetensors' "
                "format=pt, are still written).",
            ),
        ] = MetadataMode.keep,
        raw_names: RawNamesOpt = False,
    ) -> None:
        check_paths(src)  # first: a typo says so
        from ckptctl.errors import UsageError
        from ckptctl.ops.convert import commit_output, plan_convert, verify_output, write_output

        shard = None
        if max_shard_size is not None:
            try:
                shard = output.parse_size(max_shard_size)
            except ValueError:
                raise UsageError(f"--max-shard-size {max_shard_size!r}: expected a size like 5GB or 500MiB") from None
        plan = plan_convert(
            src,
            dst,
            to=to,
            key=key,
            all_=all_,
            include=include,
            exclude=exclude,
            strip_prefix=strip_prefix,
            add_prefix=add_prefix,
            rename=rename,
            dtype=dtype,
            max_shard_size=shard,
            dedupe_tied=dedupe_tied,
            verify=verify,
            force=force,
            metadata=metadata.value,
        )
        with plan.reader:
            for g in plan.dangerous:
                output.warn(
                    f"{plan.info.path}: UNSAFE pickle: it asks for {g}, which can run code when loaded with "
                    "pickle or torch.load. Nothing was run: ckptctl reads the tensors without unpickling, "
                    "and the converted file holds weights only."
                )
            for w in plan.warnings:
                output.warn(f"{plan.info.path}: {w}")
            for n in plan.notes:
                output.note(n)
            with output.progress(plan.total_bytes, f"writing {dst.name}") as bar:
                staged = write_output(plan, progress=bar.advance)
            try:
                verified = None
                if verify:
                    with output.progress(plan.total_bytes, f"verifying {dst.name}") as bar:
                        verified = verify_output(plan, staged.out, progress=bar.advance)
                result = commit_output(plan, staged, verified)
            finally:
                staged.discard()
        files = f" in {len(plan.files)} shards" if len(plan.files) > 1 else ""
        cast = f", cast to {plan.cast_to}" if plan.cast_to else ""
        plural = "" if result.num_tensors == 1 else "s"
        msg = (
            f"wrote {plan.dst}: {result.num_tensors} tensor{plural}, {human_bytes(plan.total_bytes)}{cast}, "
            f"{result.fmt}{files}"
        )
        if result.verified:
            msg += f"; verified {result.verified_tensors} tensor{plural} bit-exact"
            if plan.cast_to:
                msg += " (against the cast source)"
        else:
            msg += "; not verified (--no-verify)"
        left = left_out(plan.selection)
        if left:
            msg += f"; {left}"
        output.note(msg)


def left_out(sel) -> str:
    """What the selection left out, for the final line (a note above is easy to miss)."""
    parts = []
    if sel.outside_root:
        n = sel.outside_root
        if sel.training_default:
            parts.append(
                f"{n} tensor{'s' if n != 1 else ''} left out (optimizer state and the rest "
                "of the training checkpoint; --all to keep them)"
            )
        else:
            parts.append(f"{n} tensor{'s' if n != 1 else ''} outside --key {sel.root} left out")
    if sel.filtered_out:
        n = sel.filtered_out
        parts.append(f"{n} tensor{'s' if n != 1 else ''} left out by --include/--exclude")
    return "; ".join(parts)
