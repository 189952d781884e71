"""What a loaded pipeline's call takes: the arguments an item draws, the sizes it accepts, its guidance.

Read from the pipeline's own ``__call__`` signature and config, so any diffusers pipeline class works:
text to image draws no image or mask because its call has no ``image`` or ``mask_image``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from guarded_diffusers import pixel_multiple


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The parameter names of a pipeline's call, its default guidance_scale, the multiple its
    heights and widths must be of, and whether its transformer embeds the guidance (Flux's
    ``guidance x 1000`` in the working dtype)."""

    parameters: frozenset[str]
    default_guidance: float
    size_multiple: int
    embeds_guidance: bool


def call_shape(pipe: Any) -> CallShape:
    """The shape of ``pipe``'s call (a raw pipeline; a guarded one keeps its base class's call)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    guidance = parameters.get("guidance_scale")
    config = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    return CallShape(
        parameters=frozenset(parameters),
        default_guidance=float(guidance.default) if guidance is not None else 0.0,
        size_multiple=pixel_multiple(pipe),
        embeds_guidance=bool(config.get("guidance_embeds", False)),
    )
