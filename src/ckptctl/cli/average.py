"""`ckptctl average CKPT... -o OUT`: uniform, weighted or EMA mean of checkpoints, streamed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ckptctl.cli import output
from ckptctl.cli.common import StripPrefixOpt, check_paths, handle_errors
from ckptctl.cli.complete import complete_key_paths, complete_metric_names
from ckptctl.cli.output import Fmt, clean, human_bytes

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "  ckptctl average step_800.safetensors step_900.safetensors step_1000.safetensors -o avg.safetensors\n\n"
    "  ckptctl average run/ --last 5 -o last5.safetensors\n\n"
    "  ckptctl average run/ --best-n 3 --metric eval_loss -o best3.safetensors\n\n"
    "  ckptctl average a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o mix.pt\n\n"
    "  ckptctl average run/ --ema 0.9 --dtype bf16 -o ema.safetensors"
)


def register(app: typer.Typer) -> None:
    @app.command(
        "average",
        help="Average checkpoints tensor by tensor in bounded memory: uniform mean, --weights, or "
        "--ema in step order. Inputs are files, or one run folder with --last/--steps/--best-n. "
        "Floats accumulate in float64 (--accumulate fp32) and are written in the inputs' dtype "
        "(or --dtype); integer and bool tensors are copied from the last input. Training "
        "checkpoints average their model weights (--key/--all as in convert). The output records "
        "its inputs, steps and weights in its metadata.",
        short_help="Average checkpoints (mean, weighted, EMA).",
        epilog=EXAMPLES,
    )
    @handle_errors
    def average_cmd(
        inputs: Annotated[list[Path], typer.Argument(help="Checkpoints (files or folders), or one run folder.")],
        out: Annotated[
            Path,
            typer.Option(
                "--output", "-o", help="Output file; its suffix picks the format (.safetensors, .pt/.bin/.ckpt, .h5)."
            ),
        ],
        weights: Annotated[
            str | None,
            typer.Option(
                "--weights", help="Weights, one per input in step order, e.g. 0.2,0.3,0.5 (normalised to sum 1)."
            ),
        ] = None,
        ema: Annotated[
            float | None,
            typer.Option(
                "--ema", help="Exponential moving average with this decay, oldest first: acc = decay*acc + (1-decay)*x."
            ),
        ] = None,
        last: Annotated[int | None, typer.Option("--last", help="Run folder: the last N checkpoints.", min=1)] = None,
        steps: Annotated[
            str | None, typer.Option("--steps", help="Run folder: these steps, e.g. 800,900,1000.")
        ] = None,
        best_n: Annotated[
            int | None, typer.Option("--best-n", help="Run folder: the N best by --metric.", min=1)
        ] = None,
        metric: Annotated[
            str | None,
            typer.Option(
                "--metric", autocompletion=complete_metric_names, help="Metric for --best-n (e.g. eval_loss)."
            ),
        ] = None,
        maximize: Annotated[bool, typer.Option("--maximize", help="--best-n: higher is better.")] = False,
        key: Annotated[
            str | None,
            typer.Option(
                "--key", autocompletion=complete_key_paths, help="Average this sub-tree only (e.g. state_dict)."
            ),
        ] = None,
        all_: Annotated[
            bool, typer.Option("--all", help="Training checkpoints: every tensor, not just the model weights.")
        ] = False,
        strip: StripPrefixOpt = None,
        dtype: Annotated[
            str | None, typer.Option("--dtype", help="Output dtype of floating tensors (e.g. bf16, fp16, fp32).")
        ] = None,
        accumulate: Annotated[str, typer.Option("--accumulate", help="Accumulator: fp64 (default) or fp32.")] = "fp64",
        to: Annotated[
            str | None, typer.Option("--to", help="Output format when the suffix does not say: safetensors, pt or h5.")
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Check the inputs and show the plan; write nothing.")
        ] = False,
        fmt: Annotated[
            Fmt, typer.Option("--format", "-f", help="Summary as table (text) or json.", case_sensitive=False)
        ] = Fmt.table,
    ) -> None:
        check_paths(inputs)  # first: a typo says so
        from ckptctl.ops import average as ops

        try:
            plan = ops.plan_average(
                list(inputs),
                out,
                weights=ops.parse_weights(weights) if weights is not None else None,
                ema=ema,
                last=last,
                steps=ops.parse_steps(steps) if steps is not None else None,
                best_n=best_n,
                metric=metric,
                maximize=maximize,
                key=key,
                all_=all_,
                strip_prefix=strip,
                dtype=dtype,
                accumulate=accumulate,
                to=to,
                force=force,
            )
        except ops.PreflightError as e:
            for line in e.problems[:50]:
                output.note(f"  {line}")
            if len(e.problems) > 50:
                output.note(f"  ... and {len(e.problems) - 50} more")
            raise
        for n in plan.notes:
            output.note(f"note: {n}")
        if dry_run:
            plan.close()
            _summary(plan, None, fmt)
            return
        with output.progress(plan.read_bytes, "average") as bar:
            result = ops.run_average(plan, bar.advance)
        _summary(plan, result, fmt)


def _summary(plan, result, fmt: Fmt) -> None:
    doc = plan.to_json()
    if result is not None:
        doc["bytes_written"] = result.bytes_written
    doc["written"] = result is not None
    if fmt == Fmt.json:
        output.print_json(doc)
        return
    method = {"mean": "mean", "weighted": "weighted mean"}.get(plan.method) or f"EMA, decay {plan.decay:g}"
    verb = "averaged" if result is not None else "would average (dry run)"
    lines = [
        f"{verb} {len(plan.inputs)} checkpoints ({method}) -> {plan.dst} ({plan.fmt}"
        + (f", {human_bytes(result.bytes_written)})" if result is not None else ")")
    ]
    for inp, w in zip(plan.inputs, plan.weights):
        step = f"step {inp.step}, " if inp.step is not None else ""
        lines.append(f"  {inp.label}  ({step}weight {w:.6g})")
    dts = sorted({t.out.dtype for t in plan.averaged})
    lines.append(
        f"{len(plan.averaged)} floating tensors averaged in {plan.accumulate}, written as "
        f"{', '.join(dts) or '-'}" + ("" if plan.dtype else " (the inputs' dtype)")
    )
    copied = [t.out.name for t in plan.copied]
    if copied:
        shown = ", ".join(copied[:5]) + (" ..." if len(copied) > 5 else "")
        what = "tensor" if len(copied) == 1 else "tensors"
        lines.append(
            f"{len(copied)} integer/bool {what} copied from the last input ({plan.inputs[-1].label}), "
            f"not averaged: {shown}"
        )
    tied = [t.out.name for t in plan.tensors if t.mode == "alias"]
    if tied:
        lines.append(f"{len(tied)} tied {'tensor' if len(tied) == 1 else 'tensors'} kept tied")
    if plan.fmt != "torch-zip":
        lines.append(
            "provenance (inputs, steps, weights, method) is in the output's metadata: ckptctl inspect " + str(plan.dst)
        )
    out = sys.stdout
    for line in lines:
        out.write(("- " if fmt == Fmt.markdown else "") + clean(line) + "\n")
