"""See the guard work in seconds, offline: plain float16 goes black, guarded float16 matches float32.

Run ``python -m guarded_diffusers.demo``. It saves the bundled tiny Flux Fill model with an
injected float16 overflow to a temporary folder, loads it back with ``from_pretrained`` (the
path users take) and fills the same masked image four ways: plain float16, guarded float16,
plain bfloat16 (the usual advice) and plain float32 (the reference). It prints the guard's
report and each result's PSNR against float32, and writes the float16, guarded and float32
images side by side as one PNG.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont
from transformers.utils import logging as transformers_logging

from .core.fidelity import as_displayed, psnr
from .pipelines.flux_fill import GuardedFluxFillPipeline
from .testing import INJECTION_SITES, sample_inputs, save_tiny_pipeline

PANEL_SIZE = 256
CAPTION_HEIGHT = 40


def quiet() -> None:
    """Silence loading chatter and progress bars so the report and the PSNR table stand out.

    The guard logs under diffusers' logger, so its warnings go quiet too: the demo prints the
    same incidents from the report.
    """
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)


def fill(
    model: Path, pipeline_class: type[FluxFillPipeline], dtype: torch.dtype, steps: int, size: int, seed: int
) -> FluxPipelineOutput:
    """Load ``model`` as users do and fill the sample image; one seed gives every run the same noise."""
    pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        **sample_inputs(size, seed),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )


def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a readable size; its tiny bitmap font where Pillow predates sizes (10.0)."""
    try:
        return ImageFont.load_default(size=14)
    except TypeError:
        return ImageFont.load_default()


def panel(image: np.ndarray, caption: str) -> Image.Image:
    """One image as a viewer shows it (NaN as black), enlarged without blurring, over its caption."""
    pixels = (as_displayed(image) * 255).round().astype(np.uint8)
    enlarged = Image.fromarray(pixels).resize((PANEL_SIZE, PANEL_SIZE), Image.Resampling.NEAREST)
    framed = Image.new("RGB", (PANEL_SIZE, PANEL_SIZE + CAPTION_HEIGHT), "white")
    framed.paste(enlarged, (0, 0))
    ImageDraw.Draw(framed).multiline_text(
        (6, PANEL_SIZE + 3), caption, fill="black", font=caption_font(), spacing=2
    )
    return framed


def side_by_side(panels: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Panels in one row with a white gap between them."""
    width = sum(item.width for item in panels) + gap * (len(panels) - 1)
    row = Image.new("RGB", (width, max(item.height for item in panels)), "white")
    left = 0
    for item in panels:
        row.paste(item, (left, 0))
        left += item.width + gap
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Defaults that finish in seconds on a laptop CPU; every injection site is one flag away."""
    parser = argparse.ArgumentParser(
        prog="python -m guarded_diffusers.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--site",
        choices=sorted(INJECTION_SITES),
        default="single_block_mlp",
        help="where the float16 overflow is injected (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo.png"), help="PNG to write (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weights, image and noise seed (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the four fills, print the report and the PSNR table, write the PNG; 0 on success."""
    args = parse_args(argv)
    quiet()
    run = {"steps": args.steps, "size": args.size, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="guarded-diffusers-demo-") as folder:
        model = Path(folder)
        module = save_tiny_pipeline(model, site=args.site, seed=args.seed)
        plain16 = fill(model, FluxFillPipeline, torch.float16, **run).images[0]
        guarded = fill(model, GuardedFluxFillPipeline, torch.float16, **run)
        plain_bf16 = fill(model, FluxFillPipeline, torch.bfloat16, **run).images[0]
        reference = fill(model, FluxFillPipeline, torch.float32, **run).images[0]
    guarded16 = guarded.images[0]

    print(
        f"Tiny Flux Fill, {args.size}x{args.size}, {args.steps} steps, float16 overflow injected in {module}"
    )
    print("\nGuard report (guarded float16):")
    print("\n".join(f"  {line}" for line in str(guarded.guard_report).splitlines()))
    print("\nPSNR against float32 (higher is closer):")
    results = {
        "plain float16": plain16,
        "guarded float16": guarded16,
        "plain bfloat16 (usual advice)": plain_bf16,
    }
    scores = {name: psnr(image, reference) for name, image in results.items()}
    for name, image in results.items():
        non_finite = 1.0 - float(np.isfinite(image).mean())
        note = f"  ({non_finite:.0%} of pixels non-finite, shown black)" if non_finite else ""
        print(f"  {name:<30} {scores[name]:6.2f} dB{note}")

    panels = [
        panel(plain16, f"plain float16\nPSNR {scores['plain float16']:.1f} dB"),
        panel(guarded16, f"guarded float16\nPSNR {scores['guarded float16']:.1f} dB"),
        panel(reference, "float32\nreference"),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(args.out)
    print(f"\nWrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
