"""``fluxguard generate``: any diffusers pipeline folder, guarded, from the shell.

The folder's pipeline class decides the inputs: text to image takes a prompt; image to image and
Kontext an ``--image`` too; inpainting an ``--image`` and a ``--mask``. Only the options the
pipeline's call takes are passed on; the rest keep the pipeline's own defaults.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..pipelines.attach import guard
from ..testing.families import FAMILIES
from .inputs import (
    UsageError,
    image_and_mask,
    image_output,
    pipeline_folder,
    read_image,
)
from .outcome import guard_settings, loading, run_and_write

# The bundled model: a tiny random Flux text-to-image pipeline with a float16 overflow to catch.
BUNDLED_FAMILY, BUNDLED_SITE, BUNDLED_SIZE, BUNDLED_STEPS = "flux", "single_block_mlp", 32, 4
BUNDLED_PROMPT = "a paper cup on a wooden table"


def _call_arguments(args: argparse.Namespace, pipe: DiffusionPipeline, bundled: bool) -> dict[str, Any]:
    """The options, for the parameters ``pipe``'s call takes; a required input not given is a usage error."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    given: dict[str, Any] = {
        "prompt": args.prompt if args.prompt is not None else BUNDLED_PROMPT if bundled else None,
        "height": args.height or (BUNDLED_SIZE if bundled else None),
        "width": args.width or (BUNDLED_SIZE if bundled else None),
        "num_inference_steps": args.steps or (BUNDLED_STEPS if bundled else None),
        "guidance_scale": args.guidance,
        "max_sequence_length": args.max_sequence_length,
    }
    if args.mask is not None:
        given["image"], given["mask_image"] = image_and_mask(args.image, args.mask)
    elif args.image is not None:
        given["image"] = read_image(args.image, "--image", "RGB")
    for name, what in getattr(pipe, "required_inputs", {}).items():
        if given.get(name) is None:
            option = "--mask" if name == "mask_image" else f"--{name}"
            raise UsageError(f"{option} is required by {type(pipe).guarded_base.__name__}: {what}")
    unused = [
        name for name in ("image", "mask_image") if given.get(name) is not None and name not in parameters
    ]
    if unused:
        raise UsageError(f"{type(pipe).guarded_base.__name__} takes no {', '.join(unused)}")
    if given["prompt"] is None:
        raise UsageError("--prompt is required with MODEL (only the bundled model has a default)")
    call = {name: value for name, value in given.items() if value is not None and name in parameters}
    return {**call, "generator": torch.Generator().manual_seed(args.seed)}


def run_generate(args: argparse.Namespace) -> int:
    """Check every input, load (or build) the model, guard it, generate, write; 1 if the guard gave up."""
    if args.model is not None:
        pipeline_folder(args.model)
    if args.mask is not None and args.image is None:
        raise UsageError("--mask needs --image: the picture it marks")
    output = image_output(args.output)
    settings = guard_settings(args)
    with tempfile.TemporaryDirectory(prefix="fluxguard-bundled-") as scratch:
        model = args.model
        if model is None:
            model = Path(scratch)
            module = FAMILIES[BUNDLED_FAMILY].save(model, BUNDLED_SITE)
            print(f"bundled tiny random Flux model, float16 overflow injected in {module}")
        with loading(model):
            pipe = DiffusionPipeline.from_pretrained(model, dtype=getattr(torch, args.dtype))
            pipe = guard(
                pipe, strategies=settings.strategies, plan=settings.plan, max_extra_memory=settings.budget
            )
        call = _call_arguments(args, pipe, bundled=args.model is None)
        return run_and_write(pipe, call, args, output, "generate")
