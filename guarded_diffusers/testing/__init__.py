"""Tiny offline pipelines of every family and fp16 overflow injection, for our tests and yours.

Everything here is built from a seed without any file or network access: random weights, real
tokenizers made in memory. Save the result with ``save_pretrained()`` and load it back with
``from_pretrained()`` to exercise the path users take.

- ``flux_fill``: the Flux Fill pipeline and its injection sites (``INJECTION_SITES``, the
  residual-stream ``RESIDUAL_SITES`` and
  ``LASTING_STREAM_SITES``), ``sample_inputs``;
- ``triggers``: overflows only some inputs reach (tokens, mask coverage, image saturation);
- ``builders``: Flux text-to-image, Kontext, SD3, SDXL and SD 1.5 built from the Fill one's parts,
  and QwenImage with its own VAE, Qwen2.5-VL text encoder and in-memory Qwen2 tokenizer;
- ``families``: every family with its sites and the arguments of one call (``FAMILIES``).
"""

from .builders import (
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from .families import FAMILIES, Family
from .flux_fill import (
    INJECTION_SITES,
    LASTING_STREAM_SITES,
    MID,
    RESIDUAL_SITES,
    SILENTLY_CLIPPED_SITES,
    TINY,
    TinySpec,
    inject_overflow,
    sample_inputs,
    save_tiny_pipeline,
    tiny_flux_fill_pipeline,
)
from .triggers import (
    TRIGGERED_SITES,
    inject_image_saturation_overflow,
    inject_mask_coverage_overflow,
    inject_token_overflow,
    inject_triggered_overflow,
    reachable_token_ids,
    save_triggered_pipeline,
    trigger_token_ids,
)

__all__ = [
    "FAMILIES",
    "INJECTION_SITES",
    "LASTING_STREAM_SITES",
    "MID",
    "RESIDUAL_SITES",
    "SILENTLY_CLIPPED_SITES",
    "TINY",
    "TRIGGERED_SITES",
    "Family",
    "TinySpec",
    "inject_image_saturation_overflow",
    "inject_mask_coverage_overflow",
    "inject_overflow",
    "inject_token_overflow",
    "inject_triggered_overflow",
    "reachable_token_ids",
    "sample_inputs",
    "save_tiny_pipeline",
    "save_triggered_pipeline",
    "tiny_flux_fill_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
    "trigger_token_ids",
]
