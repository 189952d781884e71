"""Every tiny pipeline family with its float16 overflow sites and the arguments of one call.

A site name means the same module wherever it appears: the other Flux families and SD3 share the
Fill sites whose modules they have (SD3's joint blocks have the Flux double blocks' feed-forwards;
every family has a VAE decoder with the same path, QwenImage's causal 3D one too), QwenImage adds
its double-stream block's image feed-forward, and the UNet families add a site in the UNet's middle
cross-attention block, where a UNet's activations are largest. Flux Fill keeps its residual-stream
sites too, two of which float16 clips silently instead of going non-finite (``SILENTLY_CLIPPED_SITES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .builders import (
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from .flux_fill import (
    INJECTION_SITES,
    LASTING_STREAM_SITES,
    RESIDUAL_SITES,
    TINY,
    TinySpec,
    _amplify_channels,
    sample_inputs,
    tiny_flux_fill_pipeline,
)

__all__ = ["FAMILIES", "Family"]

Injector = Callable[[Any, int], str]
# Flux and SD3 pad prompts to this many T5 tokens instead of 512 / 256: the tiny models stay fast.
_MAX_SEQUENCE_LENGTH = 32


def _unet_mid_feed_forward(pipe: Any, block: int) -> str:
    """Amplify the GEGLU projection of the UNet's middle transformer block ``block``."""
    feed_forward = pipe.unet.mid_block.attentions[0].transformer_blocks[block].ff
    _amplify_channels(feed_forward.net[0].proj, feed_forward.net[2])
    return f"unet.mid_block.attentions.0.transformer_blocks.{block}.ff.net.0.proj"


def _qwen_image_feed_forward(pipe: Any, block: int) -> str:
    """Amplify the GELU projection of a Qwen double-stream block's image feed-forward.

    Not the text one: the last block's text stream is read by no one (as in SD3's last joint block).
    """
    feed_forward = pipe.transformer.transformer_blocks[block].img_mlp
    _amplify_channels(feed_forward.net[0].proj, feed_forward.net[2])
    return f"transformer.transformer_blocks.{block}.img_mlp.net.0.proj"


def _fill_sites(*names: str) -> dict[str, Injector]:
    return {name: INJECTION_SITES[name] for name in names}


def _text_inputs(size: int, seed: int) -> dict[str, Any]:
    return {key: sample_inputs(size, seed)[key] for key in ("prompt", "height", "width")}


def _t5_inputs(size: int, seed: int) -> dict[str, Any]:
    return {**_text_inputs(size, seed), "max_sequence_length": _MAX_SEQUENCE_LENGTH}


def _fill_inputs(size: int, seed: int) -> dict[str, Any]:
    return {**sample_inputs(size, seed), "max_sequence_length": _MAX_SEQUENCE_LENGTH}


def _kontext_inputs(size: int, seed: int) -> dict[str, Any]:
    """Kontext edits an image; by default it resizes both image and output to ~1 megapixel."""
    return {
        **_t5_inputs(size, seed),
        "image": sample_inputs(size, seed)["image"],
        "max_area": size * size,
        "_auto_resize": False,
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one family's tiny pipeline, where it overflows float16, and what a call needs."""

    build: Callable[[int, TinySpec], DiffusionPipeline]
    sites: Mapping[str, Injector]
    inputs: Callable[[int, int], dict[str, Any]]

    def inject(self, pipe: DiffusionPipeline, site: str, block: int = 0) -> str:
        """Make ``pipe`` overflow float16 at ``site``, in place (on float32 weights); returns the module."""
        if site not in self.sites:
            raise ValueError(
                f"Unknown injection site {site!r}; this family's sites: {', '.join(self.sites)}."
            )
        return self.sites[site](pipe, block)

    def save(
        self, path: str | Path, site: str | None = None, seed: int = 0, spec: TinySpec = TINY
    ) -> str | None:
        """Build, optionally inject ``site``, save to ``path``; returns the overflowing module."""
        pipe = self.build(seed, spec)
        module = self.inject(pipe, site) if site is not None else None
        pipe.save_pretrained(path)
        return module

    def call_kwargs(self, size: int = 32, seed: int = 0, steps: int = 2) -> dict[str, Any]:
        """Arguments of one call returning numpy images; ``seed`` draws the inputs and the generator."""
        return {
            **self.inputs(size, seed),
            "num_inference_steps": steps,
            "output_type": "np",
            "generator": torch.Generator().manual_seed(seed),
        }


_FLUX_SITES = (
    "single_block_mlp",
    "double_block_ff",
    "double_block_ff_context",
    "t5_ff",
    "clip_mlp",
    "vae_decoder",
)
_UNET_SITES = {"unet_mid_ff": _unet_mid_feed_forward, **_fill_sites("clip_mlp", "vae_decoder")}

FAMILIES: dict[str, Family] = {
    "flux_fill": Family(
        tiny_flux_fill_pipeline,
        {**INJECTION_SITES, **RESIDUAL_SITES, **LASTING_STREAM_SITES},
        _fill_inputs,
    ),
    "flux": Family(tiny_flux_pipeline, _fill_sites(*_FLUX_SITES), _t5_inputs),
    # Kontext encodes its input image: the VAE encoder runs too.
    "flux_kontext": Family(
        tiny_flux_kontext_pipeline, _fill_sites(*_FLUX_SITES, "vae_encoder"), _kontext_inputs
    ),
    "sd3": Family(
        tiny_sd3_pipeline,
        _fill_sites("double_block_ff", "double_block_ff_context", "vae_decoder"),
        _t5_inputs,
    ),
    # Qwen's default call: no guidance_scale (its transformer embeds none), no true CFG.
    "qwen": Family(
        tiny_qwen_image_pipeline,
        {"img_mlp": _qwen_image_feed_forward, **_fill_sites("vae_decoder")},
        _text_inputs,
    ),
    "sdxl": Family(tiny_sdxl_pipeline, _UNET_SITES, _text_inputs),
    "sd15": Family(tiny_sd15_pipeline, _UNET_SITES, _text_inputs),
}
