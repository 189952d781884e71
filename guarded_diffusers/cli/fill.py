"""``fluxguard fill``: guarded inpainting from the shell, with a progress bar and a table of incidents."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ..core.devices import resolve_device
from ..core.report import GuardReport, NonFiniteError
from ..demo import quiet
from ..pipelines.flux_fill import GuardedFluxFillPipeline
from ..testing import sample_inputs, save_tiny_pipeline
from .inputs import (
    UsageError,
    device,
    image_and_mask,
    image_output,
    in_command_terms,
    memory_fraction,
    model_folder,
    precision_plan,
    strategy_names,
)
from .log import BarStream, guard_lines

# The bundled model: tiny, random, built on the fly, with a float16 overflow for the guard to catch.
BUNDLED_SITE = "single_block_mlp"
BUNDLED_SIZE = 32
TABLE_COLUMNS = ("stage", "step", "module", "strategy", "fixed module", "error", "recovered")


def incident_table(report: GuardReport) -> str:
    """The report's incidents as aligned columns; ``no incidents`` when there are none."""
    if not report.incidents:
        return "no incidents"
    rows = [
        (
            incident.stage,
            "-" if incident.step is None else str(incident.step),
            incident.module or "-",
            incident.strategy or "-",
            incident.fixed_module or "-",
            "-" if incident.error is None else f"{incident.error:.1e}",
            "yes" if incident.recovered else "degraded" if incident.degraded else "no",
        )
        for incident in report.incidents
    ]
    widths = [max(len(row[column]) for row in [TABLE_COLUMNS, *rows]) for column in range(len(TABLE_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [TABLE_COLUMNS, *rows]
    )


def _inputs(args: argparse.Namespace) -> dict[str, object]:
    """Prompt, image and mask from the options, or the built-in sample ones for the bundled model."""
    if args.model is not None:
        missing = [
            option
            for option, value in (("--image", args.image), ("--mask", args.mask), ("--prompt", args.prompt))
            if value is None
        ]
        if missing:
            raise UsageError(
                f"{', '.join(missing)} required with MODEL {args.model} (only the bundled model has defaults)"
            )
    sample = sample_inputs(BUNDLED_SIZE, args.seed)
    if (args.image is None) != (args.mask is None):
        raise UsageError("--image and --mask go together: give both, or neither for the built-in sample")
    if args.image is not None:
        sample["image"], sample["mask_image"] = image_and_mask(args.image, args.mask)
    sample["width"], sample["height"] = sample["image"].size
    if args.prompt is not None:
        sample["prompt"] = args.prompt
    return sample


def _write_report(report: GuardReport, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.to_json(indent=2) + "\n", encoding="utf-8")


def _check_size(inputs: dict[str, object], args: argparse.Namespace, multiple: int) -> None:
    """The picture must hold at least one of the model's pixel blocks each way."""
    width, height = inputs["width"], inputs["height"]
    if width < multiple or height < multiple:
        raise UsageError(
            f"--image {args.image} is {width}x{height} pixels; "
            f"this model needs at least {multiple} pixels each way"
        )


def run_fill(args: argparse.Namespace) -> int:
    """Check every input, load (or build) the model, fill, write the image; 1 if the guard gave up."""
    if args.model is not None:
        model_folder(args.model)
    inputs = _inputs(args)
    output = image_output(args.output)
    plan = precision_plan(args.plan) if args.plan is not None else None
    strategies = strategy_names(args.strategies)
    budget = memory_fraction(args.max_extra_memory)
    device(args.device)
    quiet()
    stderr = BarStream(sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fluxguard-bundled-") as scratch:
        model = args.model
        if model is None:
            model = Path(scratch)
            module = save_tiny_pipeline(model, site=BUNDLED_SITE, seed=0)
            print(f"bundled tiny random Flux Fill model, float16 overflow injected in {module}")
        try:
            pipe = GuardedFluxFillPipeline.from_pretrained(
                model,
                dtype=getattr(torch, args.dtype),
                guard_plan=plan,
                guard_strategies=strategies,
                guard_max_extra_memory=budget,
            )
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load {model}: {str(error).splitlines()[0]}") from None
        _check_size(inputs, args, pipe.vae_scale_factor * 2)
        pipe.to(resolve_device(args.device))
        pipe.set_progress_bar_config(disable=False, desc="fill", file=stderr)
        try:
            with guard_lines(stderr, "fill"):
                result = pipe(
                    **inputs,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    max_sequence_length=args.max_sequence_length,
                    generator=torch.Generator().manual_seed(args.seed),
                )
        except NonFiniteError as error:
            print(incident_table(error.report))
            _write_report(error.report, args.report)
            reason = in_command_terms(str(error).splitlines()[0])
            stderr.line(f"fluxguard fill: the guard could not recover, no image written: {reason}")
            return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(output)
    print(incident_table(result.guard_report))
    _write_report(result.guard_report, args.report)
    print(f"wrote {output}" + (f" and {args.report}" if args.report is not None else ""))
    return 0
