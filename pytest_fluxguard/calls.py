"""What a loaded pipeline's call takes: the arguments an item draws, the sizes it accepts, its guidance.

Read from the pipeline's own ``__call__`` signature and config, so any diffusers pipeline class works:
text to image draws no image or mask because its call has no ``image`` or ``mask_image``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

# Stable Diffusion (1.5 and XL) refuses heights and widths that are not multiples of 8.
UNET_SIZE_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The parameter names of a pipeline's call, its default guidance_scale, the multiple its
    heights and widths must be of, and whether its transformer embeds the guidance (Flux's
    ``guidance x 1000`` in the working dtype)."""

    parameters: frozenset[str]
    default_guidance: float
    size_multiple: int
    embeds_guidance: bool


def _size_multiple(pipe: Any) -> int:
    """Flux packs 2 x 2 latents (2 x vae_scale_factor); SD3 patches them (x patch_size); UNets take 8."""
    scale = pipe.vae_scale_factor
    if hasattr(pipe, "_pack_latents"):
        return 2 * scale
    patch_size = getattr(pipe, "patch_size", None)
    if patch_size:
        return scale * patch_size
    return math.lcm(UNET_SIZE_MULTIPLE, scale)


def call_shape(pipe: Any) -> CallShape:
    """The shape of ``pipe``'s call (a raw pipeline; a guarded one keeps its base class's call)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    guidance = parameters.get("guidance_scale")
    config = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    return CallShape(
        parameters=frozenset(parameters),
        default_guidance=float(guidance.default) if guidance is not None else 0.0,
        size_multiple=_size_multiple(pipe),
        embeds_guidance=bool(config.get("guidance_embeds", False)),
    )
