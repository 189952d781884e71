"""Hypothesis strategies for Flux Fill inputs, for the plugin's items and for your own ``@given`` tests.

Every strategy yields values FluxFillPipeline accepts, and leans towards the edges where float16
breaks: empty and full masks, saturated images, the largest guidance, prompts past the token limit.
Pictures are built by :mod:`pytest_fluxguard.recipes`, so a failing example prints as calls you can
paste back. Draw ``seeds()`` for the torch generator: hypothesis does not manage torch's RNG.
"""

from __future__ import annotations

from hypothesis import strategies as st
from PIL import Image

from . import recipes
from .inputs import FillInputs

__all__ = [
    "FLUX_FILL_GUIDANCE",
    "FillInputs",
    "fill_inputs",
    "guidance_scales",
    "images",
    "images_per_prompt",
    "inference_steps",
    "masks",
    "prompts",
    "seeds",
    "side_lengths",
    "sizes",
    "strengths",
]

FLUX_FILL_GUIDANCE = 30.0  # FluxFillPipeline's default guidance_scale
FLUX_SIZE_MULTIPLE = 16  # 2 * vae_scale_factor of the released Flux VAE
# Below this, steps * strength can round to zero denoising steps and FluxFillPipeline refuses the call.
MIN_STRENGTH = 0.01
_CHANNEL = st.integers(0, 255)
_COLOUR = st.tuples(_CHANNEL, _CHANNEL, _CHANNEL)
_WORDS = ("fox", "a", "Schnee", "雪", "🦊", "naïve", "ça")


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator().manual_seed``."""
    return st.integers(0, 2**32 - 1)


def side_lengths(max_size: int = 256, multiple: int = FLUX_SIZE_MULTIPLE) -> st.SearchStrategy[int]:
    """Heights or widths FluxFillPipeline takes as they are: multiples of ``multiple`` up to ``max_size``.

    ``multiple`` is ``2 * pipe.vae_scale_factor``: 16 for Flux, smaller for tiny test models.
    """
    if max_size < multiple:
        raise ValueError(f"max_size {max_size} is below the smallest legal size, {multiple} pixels.")
    return st.integers(1, max_size // multiple).map(lambda count: count * multiple)


def sizes(max_size: int = 256, multiple: int = FLUX_SIZE_MULTIPLE) -> st.SearchStrategy[tuple[int, int]]:
    """(height, width) pairs, square or not."""
    return st.tuples(side_lengths(max_size, multiple), side_lengths(max_size, multiple))


def masks(height: int, width: int) -> st.SearchStrategy[Image.Image]:
    """Masks of one size: empty, full, rectangles, blobs, thin strokes and bands touching a border."""
    rows, columns = st.integers(0, height - 1), st.integers(0, width - 1)
    point = st.tuples(rows, columns)  # (row, column) inside the picture
    return st.one_of(
        st.builds(recipes.empty_mask, st.just(height), st.just(width)),
        st.builds(recipes.full_mask, st.just(height), st.just(width)),
        st.builds(
            recipes.rectangle_mask,
            height=st.just(height),
            width=st.just(width),
            top=rows,
            left=columns,
            rows=st.integers(1, height),
            columns=st.integers(1, width),
        ),
        st.builds(
            recipes.border_mask,
            height=st.just(height),
            width=st.just(width),
            side=st.sampled_from(recipes.BORDER_SIDES),
            thickness=st.integers(1, max(1, min(height, width) // 2)),
        ),
        st.builds(
            recipes.blob_mask,
            height=st.just(height),
            width=st.just(width),
            discs=st.lists(
                st.tuples(rows, columns, st.integers(0, max(height, width))), min_size=1, max_size=4
            ),
        ),
        st.builds(recipes.stroke_mask, height=st.just(height), width=st.just(width), start=point, end=point),
    )


def images(height: int, width: int) -> st.SearchStrategy[Image.Image]:
    """RGB images of one size: noise, flat colours, gradients and saturated extremes."""
    size = {"height": st.just(height), "width": st.just(width)}
    return st.one_of(
        st.builds(recipes.noise_image, **size, seed=seeds()),
        st.builds(recipes.flat_image, **size, colour=_COLOUR),
        st.builds(recipes.gradient_image, **size, start=_COLOUR, end=_COLOUR, vertical=st.booleans()),
        st.builds(recipes.extreme_image, **size, pattern=st.sampled_from(recipes.EXTREME_PATTERNS)),
    )


def prompts(max_sequence_length: int = 512) -> st.SearchStrategy[str]:
    """Empty, any unicode, and longer than ``max_sequence_length`` tokens (T5 truncates, CLIP at 77)."""
    return st.one_of(
        st.just(""),
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.builds(
            recipes.repeated_words,
            word=st.sampled_from(_WORDS),
            count=st.integers(max_sequence_length + 1, max_sequence_length + 16),
        ),
    )


def guidance_scales(max_guidance: float = 100.0) -> st.SearchStrategy[float]:
    """Guidance from 0 to ``max_guidance``, FluxFill's default 30 included when in range.

    Above 65.5 every float16 Flux model overflows: FluxTransformer2DModel multiplies the guidance
    by 1000 in the working dtype, which passes 65504.
    """
    values = st.floats(0.0, max_guidance)
    return st.one_of(st.just(FLUX_FILL_GUIDANCE), values) if max_guidance >= FLUX_FILL_GUIDANCE else values


def inference_steps(max_steps: int = 4) -> st.SearchStrategy[int]:
    """Denoising steps from 1 to ``max_steps``."""
    return st.integers(1, max_steps)


def strengths() -> st.SearchStrategy[float]:
    """Strength from a faint touch-up to a full repaint (1.0, the default)."""
    return st.one_of(st.just(1.0), st.floats(MIN_STRENGTH, 1.0))


def images_per_prompt(max_images: int = 2) -> st.SearchStrategy[int]:
    """How many images one call returns."""
    return st.integers(1, max_images)


@st.composite
def _fill_inputs(
    draw: st.DrawFn,
    max_size: int,
    multiple: int,
    max_steps: int,
    max_images: int,
    max_sequence_length: int,
    max_guidance: float,
) -> FillInputs:
    height, width = draw(sizes(max_size, multiple))
    return FillInputs(
        prompt=draw(prompts(max_sequence_length)),
        image=draw(images(height, width)),
        mask_image=draw(masks(height, width)),
        height=height,
        width=width,
        guidance_scale=draw(guidance_scales(max_guidance)),
        num_inference_steps=draw(inference_steps(max_steps)),
        strength=draw(strengths()),
        num_images_per_prompt=draw(images_per_prompt(max_images)),
        max_sequence_length=max_sequence_length,
        seed=draw(seeds()),
    )


def fill_inputs(
    max_size: int = 256,
    multiple: int = FLUX_SIZE_MULTIPLE,
    max_steps: int = 4,
    max_images: int = 2,
    max_sequence_length: int = 512,
    max_guidance: float = 100.0,
) -> st.SearchStrategy[FillInputs]:
    """Whole FluxFillPipeline calls; pass ``example.pipeline_kwargs()`` to the pipeline."""
    side_lengths(max_size, multiple)  # fail now, not at the first draw, on an impossible size
    return _fill_inputs(max_size, multiple, max_steps, max_images, max_sequence_length, max_guidance)
