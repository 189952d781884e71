"""The search one item runs: the inputs it draws, within what the pipeline carries, and the peaks it climbs.

The pipeline's call decides what is drawn (``call_shape``). Where the transformer embeds the guidance
(Flux), raw items draw it only up to what the item's dtype carries through diffusers' own
``guidance x 1000`` (a limit of every such Flux model, reported once per session, not the model's fault);
every example's component peaks go to ``hypothesis.target()``, so the search climbs towards overflow.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis import target

from .calls import call_shape
from .options import FluxGuardOptions
from .strategies import FillInputs, call_inputs, pipeline_vocabularies
from .target import Target

# Largest guidance_scale drawn unless --fluxguard-max-guidance says otherwise: Flux's embedded guidance,
# and classifier-free guidance (Stable Diffusion, SD3), whose usual range ends far lower.
DEFAULT_MAX_GUIDANCE = 100.0
CFG_MAX_GUIDANCE = 20.0
# FluxTransformer2DModel.forward computes ``guidance * 1000`` in the working dtype.
GUIDANCE_EMBEDDING_SCALE = 1000.0
# A model with no explicit --fluxguard-max-size draws sizes up to this many latent patches a side:
# 16 x the size multiple (2 x vae_scale_factor for Flux): 256 px for Flux, 64 px for the tiny test models.
DEFAULT_PATCHES = 16
# One image per call: Flux computes each image of a batch on its own, so a second one is another noise
# seed at twice the cost of the call; hypothesis draws seeds anyway.
ITEM_IMAGES = 1


def guidance_limit(dtype: str) -> float:
    """The largest guidance_scale whose ``x 1000`` the dtype holds: 65.504 for float16."""
    import torch

    return torch.finfo(getattr(torch, dtype)).max / GUIDANCE_EMBEDDING_SCALE


def item_max_guidance(
    options: FluxGuardOptions, target: Target, embeds_guidance: bool
) -> tuple[float, float | None]:
    """The largest guidance the item draws, and the dtype's limit when that lowered it (raw items).

    Where the transformer ``embeds_guidance``, raw (and baked) items stay within what plain diffusers carries:
    beyond it every float16 Flux model overflows in ``FluxTransformer2DModel.forward``, whatever the
    weights. Guarded items draw the full range (the guard's ``guidance`` fix carries it). Pipelines
    without guidance embeddings draw classifier-free guidance up to 20; an explicit option applies
    to every item.
    """
    if options.max_guidance is not None:
        return options.max_guidance, None
    if not embeds_guidance:
        return CFG_MAX_GUIDANCE, None
    if target.mode != "guarded":  # raw and baked items run plain diffusers
        limit = guidance_limit(target.dtype)
        if limit < DEFAULT_MAX_GUIDANCE:
            return limit, limit
    return DEFAULT_MAX_GUIDANCE, None


def item_strategy(pipe: Any, options: FluxGuardOptions, target: Target) -> st.SearchStrategy[FillInputs]:
    """The calls an item draws for ``pipe`` (its call's arguments, its tokenizers, its size multiple)
    under ``options``.

    Raises ValueError when --fluxguard-max-size is below the model's smallest legal size.
    """
    shape = call_shape(pipe)
    multiple = shape.size_multiple
    max_size = options.max_size or DEFAULT_PATCHES * multiple
    if max_size < multiple:
        raise ValueError(
            f"--fluxguard-max-size {max_size} is below this model's smallest size, {multiple} px."
        )
    return call_inputs(
        shape,
        max_size=max_size,
        max_steps=options.max_steps,
        max_images=ITEM_IMAGES,
        max_sequence_length=options.max_sequence_length,
        max_guidance=item_max_guidance(options, target, shape.embeds_guidance)[0],
        vocabularies=pipeline_vocabularies(pipe, options.max_sequence_length),
        max_lora_scale=options.max_lora_scale if target.lora is not None else None,
    )


def target_peaks(peaks: dict[str, float]) -> None:
    """Hand each component's peak over its dtype's maximum to hypothesis' targeted search."""
    for component, ratio in peaks.items():
        target(ratio, label=f"{component} peak / dtype max")
