"""The exact bake against a fine-tuned "fp16-fix" VAE, on the same tiny VAE (issue 18, item 10).

Run from the repository root:  python bench/vae_fp16_fix.py [--steps N] [--json PATH] [--threads N]
(one torch thread by default: on these tiny convolutions more threads only add overhead).

SDXL's community "fp16-fix" VAE was fine-tuned to keep the output the same while scaling down the
activations inside the decoder. Here the same recipe runs on a copy of the tiny Flux Fill decoder
with the ``vae_decoder`` overflow (its first up block's resnet ``conv1`` amplified: float32 and
bfloat16 finite, float16 NaN), in float32: loss = MSE of the decoded image against the original
decoder's on fresh latents (half random, half the original encoder's latents of sample images) +
``weight`` x mean(relu(|x| - T) / T)^2 over every conv, norm and linear output ``x``, T = 2**13 (the
bake's own headroom target), Adam with steps relative to each tensor's RMS, warm-up then cosine.
The penalty weight is chosen from a sweep by the float16 fidelity on validation latents; the sweep
counts in the time to make it. The bake runs on the same pipeline (``bake(pipe, [call])``, one
calibration call).

Measured against the original float32 decoder on held-out latents (others than training's and
validation's), the worst image counting: PSNR of the decoded images in float32 (how far the
function moved) and float16 (or bfloat16), the peak |activation| of the decoder in float32, the
RMS of the amplified ``conv1``'s weight against the original's (the scale-invariant direction the
bake takes), the seconds to make each VAE, and the whole FluxFillPipeline's images with each VAE
swapped in, against the original pipeline in float32 (two held-out calls of 4 steps). The clean
VAE gets the same treatment with the chosen weight.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import numpy as np
import torch
from bake import call
from diffusers import AutoencoderKL, FluxFillPipeline
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from guarded_diffusers import bake
from guarded_diffusers.baking.calibrate import run_images
from guarded_diffusers.baking.choose import HEADROOM_PEAK
from guarded_diffusers.baking.verify import cast_copy, run_psnr, worst_psnr
from guarded_diffusers.testing import inject_overflow, sample_inputs, tiny_flux_fill_pipeline

SITE = "vae_decoder"
# The layer SITE amplifies; the clean VAE's own is reported for comparison.
OVERFLOWING = "decoder.up_blocks.0.resnets.0.conv1"
WATCHED = (nn.Conv2d, nn.GroupNorm, nn.Linear)
BATCH = 8
HELD_OUT = 32
WEIGHTS = (1e-3, 1e-2, 1e-1)
LEARNING_RATE = 1e-2  # per step, relative to each tensor's RMS
# Seeds of validation and held-out latents: past every training step's seed (1..steps).
VALIDATION_SEED, HELD_OUT_SEED = 10**5, 10**5 + 1
PROCESSOR = VaeImageProcessor()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def outputs_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every conv, norm and linear output of ``module`` inside the block: what penalty and peak read."""
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, output: outputs.append(output))
        for layer in module.modules()
        if isinstance(layer, WATCHED)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def latents(vae: AutoencoderKL, seed: int, count: int) -> torch.Tensor:
    """Half random normal latents, half the float32 encoder's latents of sample images, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count // 2, vae.config.latent_channels, 16, 16, generator=generator)
    images = [sample_inputs(32, seed=seed * count + index)["image"] for index in range(count - count // 2)]
    with torch.no_grad():
        encoded = vae.encode(PROCESSOR.preprocess(images)).latent_dist.sample(generator)
    return torch.cat([noise, encoded])


def decode(vae: AutoencoderKL, z: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Images in [0, 1] decoded by ``vae`` cast to ``dtype`` (a copy: ``vae`` stays float32)."""
    cast = vae if dtype == torch.float32 else copy.deepcopy(vae).to(dtype)
    with torch.no_grad():
        sample = cast.decode(z.to(dtype)).sample.float()
    return PROCESSOR.postprocess(sample, output_type="np")


def peak(vae: AutoencoderKL, z: torch.Tensor) -> float:
    """The decoder's largest |activation| in float32: what float16 must hold."""
    with torch.no_grad(), outputs_of(vae.decoder) as outputs:
        vae.decode(z)
    return max(float(output.abs().max()) for output in outputs)


def fine_tune(original: AutoencoderKL, weight: float, steps: int) -> AutoencoderKL:
    """A copy of ``original`` whose decoder is fine-tuned to the same output with activations under T.

    Adam's steps are scaled to each tensor's RMS (as LAMB and Adafactor do): a plain learning rate
    cannot move the amplified weights (about 2e4) in a few hundred steps.
    """
    tuned = copy.deepcopy(original)
    decoder = tuned.decoder.train()
    optimizer = torch.optim.Adam(
        [
            {"params": [p], "lr": LEARNING_RATE * float(p.detach().square().mean().sqrt().clamp(min=1e-2))}
            for p in decoder.parameters()
        ]
    )
    warm_up = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warm_up) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    for step in range(steps):
        z = latents(original, step + 1, BATCH)
        with torch.no_grad():
            target = original.decode(z).sample
        with outputs_of(decoder) as outputs:
            output = tuned.decode(z).sample
        penalty = sum(((x.abs() - HEADROOM_PEAK).relu() / HEADROOM_PEAK).square().mean() for x in outputs)
        loss = (output - target).square().mean() + weight * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return tuned.eval().requires_grad_(False)


def timed(make: Callable[[], Any]) -> tuple[Any, float]:
    """What ``make`` returns and the seconds it took."""
    start = time.perf_counter()
    return make(), time.perf_counter() - start


def tiny_pipeline(site: str | None) -> tuple[FluxFillPipeline, str]:
    """The tiny pipeline with ``site`` injected, and the VAE layer that overflows (the same, clean)."""
    pipe = tiny_flux_fill_pipeline(seed=0)
    module = inject_overflow(pipe, site) if site is not None else f"vae.{OVERFLOWING}"
    pipe.set_progress_bar_config(disable=True)
    return pipe, module.removeprefix("vae.")


def weight_rms(vae: AutoencoderKL, layer: str) -> float:
    return float(vae.get_submodule(layer).weight.detach().square().mean().sqrt())


def compare(
    site: str | None, steps: int, weight: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the table for one VAE, and the sweep when ``weight`` is None (chosen by it)."""
    original, layer = tiny_pipeline(site)
    baked, _ = tiny_pipeline(site)
    _, bake_seconds = timed(lambda: bake(baked, [call(0, 2)]))
    validation = latents(original.vae, VALIDATION_SEED, HELD_OUT)
    held_out = latents(original.vae, HELD_OUT_SEED, HELD_OUT)
    expected = list(decode(original.vae, validation, torch.float32))
    sweep = []
    for candidate in WEIGHTS if weight is None else (weight,):
        tuned, seconds = timed(lambda candidate=candidate: fine_tune(original.vae, candidate, steps))
        sweep.append(
            {
                "weight": candidate,
                "vae": tuned,
                "seconds": seconds,
                "validation_fp16": worst_psnr(list(decode(tuned, validation, torch.float16)), expected),
                "validation_fp32": worst_psnr(list(decode(tuned, validation, torch.float32)), expected),
                "peak": peak(tuned, validation),
            }
        )
    chosen = max(sweep, key=lambda entry: entry["validation_fp16"])
    calls = [call(seed, 4) for seed in (1, 2)]
    pipe_reference = run_images(original, calls)
    expected = list(decode(original.vae, held_out, torch.float32))
    arms = {
        "original": (original.vae, ("fp16", "bf16"), None),
        f"fp16-fix (weight {chosen['weight']:g})": (
            chosen["vae"],
            ("fp32", "fp16"),
            sum(entry["seconds"] for entry in sweep),
        ),
        "baked": (baked.vae, ("fp32", "fp16"), bake_seconds),
    }
    rows = []
    for name, (vae, dtypes, seconds) in arms.items():
        swapped = FluxFillPipeline(**{**original.components, "vae": vae})
        swapped.set_progress_bar_config(disable=True)
        for dtype in dtypes:
            pipe = swapped if dtype == "fp32" else cast_copy(swapped, DTYPES[dtype])
            rows.append(
                {
                    "vae": site or "clean",
                    "arm": f"{name} {dtype}",
                    "decode_psnr": worst_psnr(list(decode(vae, held_out, DTYPES[dtype])), expected),
                    "peak": peak(vae, held_out),
                    "weight_rms_ratio": weight_rms(vae, layer) / weight_rms(original.vae, layer),
                    "seconds": seconds,
                    "pipeline_psnr": run_psnr(pipe, calls, pipe_reference),
                }
            )
    return rows, [{key: value for key, value in entry.items() if key != "vae"} for entry in sweep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    _common.add_threads_option(parser)
    parser.set_defaults(threads=1)  # convolutions this small run several times faster on one thread
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.quiet()
    start = time.perf_counter()
    rows, sweep = compare(SITE, args.steps, None)
    chosen = max(sweep, key=lambda entry: entry["validation_fp16"])["weight"]
    clean_rows, _ = compare(None, args.steps, chosen)
    rows += clean_rows
    elapsed = time.perf_counter() - start
    print(_common.machine_summary())
    print(
        f"tiny Flux Fill VAE, `{SITE}` injected and clean; fine-tune {args.steps} steps of {BATCH} latents, "
        f"T = 2^{math.log2(HEADROOM_PEAK):g}; {HELD_OUT} held-out latents; {elapsed:.0f} s in all"
    )
    print("\npenalty weight sweep (validation latents, worst image):")
    print("| weight | fp16 vs original fp32 (dB) | fp32 vs original fp32 (dB) | peak abs. activation | s |")
    print("|---|---|---|---|---|")
    for entry in sweep:
        print(
            f"| {entry['weight']:g} | {entry['validation_fp16']:.1f} | {entry['validation_fp32']:.1f} | "
            f"{entry['peak']:.3g} | {entry['seconds']:.0f} |"
        )
    print(
        "\n| VAE | decoder | decode PSNR vs original fp32, worst held-out latent (dB) "
        f"| peak abs. activation in fp32 | `{OVERFLOWING}` weight RMS vs original | time to make (s) "
        "| pipeline PSNR vs original fp32, worst of 2 calls (dB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        print(
            f"| {row['vae']} | {row['arm']} | {row['decode_psnr']:.1f} | {row['peak']:.3g} | "
            f"{row['weight_rms_ratio']:.3g} | {seconds} | "
            f"{row['pipeline_psnr']:.1f} |"
        )
    if args.json:
        payload = {"rows": rows, "sweep": sweep, "steps": args.steps, "seconds": elapsed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
