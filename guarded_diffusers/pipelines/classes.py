"""The named guarded classes: one per diffusers pipeline that goes black in float16, beside Flux Fill.

Each is ``GuardedPipeline`` over its diffusers parent and nothing else; ``guard(pipe)`` turns an
instance of the parent into one of these. What a class adds is which inputs its call requires.
"""

from __future__ import annotations

from typing import ClassVar

from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from .guarded import GuardedPipeline

_IMAGE = {"image": "the picture to start from"}
_INPAINT = {"image": "the picture to repaint", "mask_image": "where to repaint it (white = repaint)"}


class GuardedFluxPipeline(GuardedPipeline, FluxPipeline):
    """FluxPipeline (text to image), guarded: every stage checked, overflows located, fixed, reported."""


class GuardedFluxImg2ImgPipeline(GuardedPipeline, FluxImg2ImgPipeline):
    """FluxImg2ImgPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _IMAGE


class GuardedFluxInpaintPipeline(GuardedPipeline, FluxInpaintPipeline):
    """FluxInpaintPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _INPAINT


class GuardedFluxKontextPipeline(GuardedPipeline, FluxKontextPipeline):
    """FluxKontextPipeline (image editing; the image is optional), guarded."""


class GuardedFluxKontextInpaintPipeline(GuardedPipeline, FluxKontextInpaintPipeline):
    """FluxKontextInpaintPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _INPAINT


class GuardedStableDiffusion3Pipeline(GuardedPipeline, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline, guarded."""


class GuardedStableDiffusion3Img2ImgPipeline(GuardedPipeline, StableDiffusion3Img2ImgPipeline):
    """StableDiffusion3Img2ImgPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _IMAGE


class GuardedStableDiffusion3InpaintPipeline(GuardedPipeline, StableDiffusion3InpaintPipeline):
    """StableDiffusion3InpaintPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _INPAINT


class GuardedStableDiffusionXLPipeline(GuardedPipeline, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline, guarded; its VAE's ``force_upcast`` stays diffusers' (docs/pipelines.md)."""


class GuardedStableDiffusionXLImg2ImgPipeline(GuardedPipeline, StableDiffusionXLImg2ImgPipeline):
    """StableDiffusionXLImg2ImgPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _IMAGE


class GuardedStableDiffusionXLInpaintPipeline(GuardedPipeline, StableDiffusionXLInpaintPipeline):
    """StableDiffusionXLInpaintPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _INPAINT


class GuardedStableDiffusionPipeline(GuardedPipeline, StableDiffusionPipeline):
    """StableDiffusionPipeline (SD 1.x and 2.x), guarded."""


class GuardedStableDiffusionImg2ImgPipeline(GuardedPipeline, StableDiffusionImg2ImgPipeline):
    """StableDiffusionImg2ImgPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _IMAGE


class GuardedStableDiffusionInpaintPipeline(GuardedPipeline, StableDiffusionInpaintPipeline):
    """StableDiffusionInpaintPipeline, guarded."""

    required_inputs: ClassVar[dict[str, str]] = _INPAINT
