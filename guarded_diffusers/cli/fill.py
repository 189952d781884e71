"""``fluxguard fill``: guarded inpainting from the shell, with a progress bar and a table of incidents."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..pipelines.flux_fill import GuardedFluxFillPipeline
from ..testing import sample_inputs, save_tiny_pipeline
from .inputs import (
    UsageError,
    image_and_mask,
    image_output,
    model_folder,
)
from .outcome import guard_settings, loading, run_and_write

# The bundled model: tiny, random, built on the fly, with a float16 overflow for the guard to catch.
BUNDLED_SITE = "single_block_mlp"
BUNDLED_SIZE = 32


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
    settings = guard_settings(args)
    with tempfile.TemporaryDirectory(prefix="fluxguard-bundled-") as scratch:
        model = args.model
        if model is None:
            model = Path(scratch)
            module = save_tiny_pipeline(model, site=BUNDLED_SITE, seed=0)
            print(f"bundled tiny random Flux Fill model, float16 overflow injected in {module}")
        with loading(model):
            pipe = GuardedFluxFillPipeline.from_pretrained(
                model,
                dtype=getattr(torch, args.dtype),
                guard_plan=settings.plan,
                guard_strategies=settings.strategies,
                guard_max_extra_memory=settings.budget,
            )
        _check_size(inputs, args, pipe.vae_scale_factor * 2)
        call = {
            **inputs,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance,
            "max_sequence_length": args.max_sequence_length,
            "generator": torch.Generator().manual_seed(args.seed),
        }
        return run_and_write(pipe, call, args, output, "fill")
