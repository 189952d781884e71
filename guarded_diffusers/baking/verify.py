"""The self-check: a bake is written only if it is the same function and a better float16 model.

Every figure is a PSNR of the pipeline's images against the original's float32 images on the
calibration calls, the worst call counting: the baked float32 pipeline must stay within
``MIN_FLOAT32_PSNR`` of it (it is exact up to eps), and the baked float16 pipeline must be at
least as faithful as the original in float16 and in bfloat16. Half-precision copies are cast the
way ``from_pretrained(torch_dtype=...)`` loads them (T5's ``wo`` stays float32).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from ..core.casting import cast_keeping_float32
from ..core.fidelity import psnr
from .calibrate import Call, run_images

MIN_FLOAT32_PSNR = 80.0
# Rounding noise between two float16 runs of nearly the same weights: "at least as faithful" within it.
FLOAT16_TOLERANCE_DB = 0.1


def cast_copy(pipe: Any, dtype: torch.dtype) -> Any:
    """A copy of ``pipe`` with every model cast as diffusers and transformers load it at ``dtype``."""
    components = {}
    logger = diffusers_logging.get_logger("diffusers")
    level = logger.level
    logger.setLevel(diffusers_logging.ERROR)  # ModelMixin.to() warns about casting after loading
    try:
        for name, component in pipe.components.items():
            if isinstance(component, nn.Module):
                component = copy.deepcopy(component)
                cast_keeping_float32(component, dtype)
            components[name] = component
    finally:
        logger.setLevel(level)
    copied = type(pipe)(**components)
    copied.set_progress_bar_config(disable=True)
    return copied


def worst_psnr(images: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The lowest PSNR over the calls (inf when every image is equal)."""
    return min(psnr(image, ref) for image, ref in zip(images, reference, strict=True))


def run_psnr(pipe: Any, calls: Sequence[Call], reference: Sequence[np.ndarray]) -> float:
    return worst_psnr(run_images(pipe, calls), reference)


@dataclasses.dataclass
class Checks:
    """The self-check's figures (dB against the original float32 images) and its verdict."""

    baked_float32: float
    original_float16: float | None = None
    original_bfloat16: float | None = None
    baked_float16: float | None = None
    per_cut_float32: dict[str, float] = dataclasses.field(default_factory=dict)
    # Where the factors sit (``placement``): at the cuts' writers, or one layer earlier where a cut
    # allows it; with both possible, each one's baked float16 figure (the better one is kept).
    placement: str = "writers"
    placements_float16: dict[str, float] = dataclasses.field(default_factory=dict)

    def problems(self, remaining: bool) -> list[str]:
        """Why the bake must not be written; float16 fidelity is not judged while overflows remain."""
        found = []
        if self.baked_float32 < MIN_FLOAT32_PSNR:
            worst = min(self.per_cut_float32.items(), key=lambda item: item[1], default=None)
            where = f" (worst cut alone: {worst[0]} at {worst[1]:.1f} dB)" if worst else ""
            found.append(
                f"baked float32 is {self.baked_float32:.1f} dB from the original, "
                f"under {MIN_FLOAT32_PSNR:g}{where}"
            )
        if remaining or self.baked_float16 is None:
            return found
        floor = max(self.original_float16 or -math.inf, self.original_bfloat16 or -math.inf)
        if self.baked_float16 < floor - FLOAT16_TOLERANCE_DB:
            found.append(
                f"baked float16 is {self.baked_float16:.1f} dB, less faithful than the original's "
                f"float16 ({self.original_float16:.1f} dB) or bfloat16 ({self.original_bfloat16:.1f} dB)"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        def db(value: float | None) -> float | str | None:
            return value if value is None or math.isfinite(value) else "inf"

        return {
            "baked_float32_db": db(self.baked_float32),
            "original_float16_db": db(self.original_float16),
            "original_bfloat16_db": db(self.original_bfloat16),
            "baked_float16_db": db(self.baked_float16),
            "per_cut_float32_db": {name: db(value) for name, value in self.per_cut_float32.items()},
            "placement": self.placement,
            "placements_float16_db": {name: db(value) for name, value in self.placements_float16.items()},
        }
